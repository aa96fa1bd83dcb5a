"""Shards in one call: a tokenizer trained on corpora (or GPT-2's), then `prepare` with a few percent held out.

What `minigpt train` does when its default data folder does not exist yet, and the quickstart's first step:

    build_shards("data/wiki-bpe8k", ["wiki"], vocab_size=8192)   # vocab_size 0: GPT-2's own vocabulary
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from minigpt.common import print0
from minigpt.data.prepare import PrepareConfig, prepare
from minigpt.text import corpus
from minigpt.text.tokenizer import Tokenizer

# A few percent held out: enough validation text on small corpora, and held-out articles for the recall probe.
VAL_FRACTION = 0.02


def build_shards(out: str | os.PathLike, corpora: Sequence[str], vocab_size: int) -> Path:
    """Train a `vocab_size` tokenizer on `corpora` (0: take GPT-2's) and prepare their shards into `out`."""
    print0(f"{out} does not exist yet: preparing it from {', '.join(corpora)}")
    with tempfile.TemporaryDirectory() as tmp:
        if vocab_size:
            texts = (text for source in corpora for text in corpus.load_documents(source))
            tokenizer = Tokenizer.train(texts, vocab_size, name=f"{'+'.join(corpora)}-bpe{vocab_size}")
            spec = str(tokenizer.save(Path(tmp) / "tokenizer.json"))
        else:
            spec = "gpt2"
        return prepare(PrepareConfig(sources=list(corpora), tokenizer=spec, out=str(out), val_fraction=VAL_FRACTION))
