"""SHA256SUMS: the sha256 of every file in a folder, in `sha256sum`'s format (`sha256sum -c SHA256SUMS` checks them by
hand). Checkpoints carry one (loading.py verifies it before loading) and so do exports (interop/hf.py replaces only
the files it lists, unchanged).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from minigpt.common import UserError

CHECKSUMS = "SHA256SUMS"


class CorruptCheckpoint(UserError):
    """A checkpoint whose files are missing, cut short, garbled or changed since they were written."""


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_checksums(folder: Path) -> None:
    """SHA256SUMS of every file in `folder` and its subfolders (paths relative to it, as sha256sum -c reads them)."""
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS)
    (folder / CHECKSUMS).write_text("".join(f"{file_sha256(folder / p)}  {p}\n" for p in files))


def read_checksums(ckpt: Path) -> dict[str, str] | None:
    """name -> sha256 from SHA256SUMS (sha256sum's format), or None for a checkpoint written without one."""
    path = ckpt / CHECKSUMS
    if not path.exists():
        return None
    sums = {}
    try:
        lines = path.read_text(encoding="ascii").splitlines()
    except (UnicodeDecodeError, OSError):
        raise CorruptCheckpoint(f"{path} is unreadable") from None
    for lineno, line in enumerate(lines, 1):
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise CorruptCheckpoint(f"{path} is damaged at line {lineno}")
        sums[name] = digest
    return sums
