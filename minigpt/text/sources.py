"""Where text comes from, for pretraining corpora (corpus.py) and conversations (conversations.py) alike: files,
folders and globs of files with known suffixes, and the Python packages that bundle data.

    source_files("notes/", (".txt", ".md"), ".txt or .md")    # [(path, source id), ...]; None: not a path at all
    package_dir("chatterbot_corpus", "pip install chatterbot-corpus", "the bundled conversations")

Hugging Face sources (`hf:NAME[:CONFIG[:SPLIT]]`) are streamed by hub.py, with retries and resume, for both.
"""

from __future__ import annotations

import glob as globlib
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

from minigpt.common import UserError


def walk(root: Path, suffixes: tuple[str, ...]) -> Iterator[Path]:
    """Files with one of `suffixes` below `root`, in sorted order, hidden files and folders left out."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and name.lower().endswith(suffixes):
                yield Path(dirpath) / name


def is_glob(source: str) -> bool:
    return any(c in source for c in "*?[")


def source_files(source: str, suffixes: tuple[str, ...], kinds: str) -> list[tuple[Path, str]] | None:
    """(path, source id) of each file a file, folder or glob source names; None when it names no path at all.

    A source id is what keys a document's or conversation's split: a folder's files by their path inside it, a
    glob's by the matched path, a file by its name. A glob that matches none of `kinds` (".txt or .md") is one line;
    a folder without such files gives an empty list (callers say what that means for them).
    """
    if is_glob(source):
        matches = sorted(p for p in globlib.glob(source, recursive=True)
                         if os.path.isfile(p) and p.lower().endswith(suffixes))
        if not matches:
            raise UserError(f"no {kinds} files match {source}")
        return [(Path(p), p) for p in matches]
    path = Path(source)
    if path.is_dir():
        return [(p, p.relative_to(path).as_posix()) for p in walk(path, suffixes)]
    if path.is_file():
        return [(path, path.name)]
    return None


def package_dir(package: str, install: str, needed_by: str) -> Path:
    """The folder of an installed Python package that bundles data; one line naming the install when missing."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"{needed_by} cannot be read without the {package.replace('_', '-')} package: {install}")
    return Path(spec.submodule_search_locations[0])
