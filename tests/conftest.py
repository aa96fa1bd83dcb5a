"""Shared fixtures: a small real corpus (the first bundled Wikipedia articles), its tokenizer and its shards.

Everything is written under pytest's temporary folders; nothing touches the working directory.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from minigpt import corpus, shards
from minigpt.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def wiki_sample(tmp_path_factory) -> Path:
    """A JSONL file of 400 Wikipedia summaries (about 200 kB)."""
    path = tmp_path_factory.mktemp("corpus") / "wiki400.jsonl"
    docs = itertools.islice(corpus.iter_documents("wiki"), 400)
    path.write_text("".join(json.dumps({"text": d.text}) + "\n" for d in docs))
    return path


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory, wiki_sample) -> Path:
    """Shards of `wiki_sample` with a 512-token BPE vocabulary trained on it (tokenizer.json inside)."""
    root = tmp_path_factory.mktemp("shards")
    texts = (json.loads(line)["text"] for line in wiki_sample.read_text().splitlines())
    tok_path = Tokenizer.train(texts, 512, progress=False, workers=1).save(root / "tokenizer.json")
    out = root / "data"
    shards.prepare(shards.PrepareConfig(sources=[str(wiki_sample)], tokenizer=str(tok_path), out=str(out),
                                        val_fraction=0.05, workers=1))
    return out
