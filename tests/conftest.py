"""Shared fixtures: a small real corpus (the first bundled Wikipedia articles), its tokenizer and its shards.

Everything is written under pytest's temporary folders; nothing touches the working directory.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from minigpt.data.prepare import PrepareConfig, prepare
from minigpt.text import corpus
from minigpt.text.tokenizer import Tokenizer


@pytest.fixture(scope="session", autouse=True)
def sft_cache(tmp_path_factory) -> Path:
    """Prepared conversations (sft_data.py) go to a temporary cache, never to the user's ~/.cache."""
    path = tmp_path_factory.mktemp("minigpt-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("MINIGPT_CACHE", str(path))
    yield path
    mp.undo()


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
    prepare(PrepareConfig(sources=[str(wiki_sample)], tokenizer=str(tok_path), out=str(out),
                          val_fraction=0.05, workers=1))
    return out


TINY_MODEL = dict(n_layer=2, n_head=2, n_embd=32, block_size=64)
GREETINGS = [("Hello", "Hi there!"), ("How are you?", "I am fine, thank you."), ("What is your name?", "I am minigpt.")]


@pytest.fixture(scope="session")
def base_run(tmp_path_factory, tiny_shards) -> Path:
    """A small model pretrained for a few steps on `tiny_shards` (its tokenizer has the chat tokens)."""
    from minigpt.model.gpt import ModelConfig
    from minigpt.train.train import TrainConfig, train

    run = tmp_path_factory.mktemp("base") / "run"
    return train(TrainConfig(run_dir=str(run), data=str(tiny_shards), model=ModelConfig(**TINY_MODEL), batch_size=8,
                             max_steps=30, warmup_steps=3, lr=3e-3, eval_every=30, eval_batches=2,
                             checkpoint_every=30, sample_prompt="", device="cpu"))


@pytest.fixture(scope="session")
def greetings_file(tmp_path_factory) -> Path:
    """Three tiny dialogues, repeated: a model fine-tuned on them answers them word for word."""
    path = tmp_path_factory.mktemp("chats") / "greetings.jsonl"
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for _ in range(20) for q, a in GREETINGS]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def chat_run(tmp_path_factory, base_run, greetings_file) -> Path:
    """`base_run` fine-tuned on `greetings_file` until it has learnt the answers."""
    from minigpt.train.sft import SFTConfig, finetune

    run = tmp_path_factory.mktemp("chat") / "run"
    return finetune(SFTConfig(base=str(base_run), run_dir=str(run), datasets=[str(greetings_file)], held_out=0.2,
                              batch_size=8, max_steps=80, lr=1e-2, warmup_steps=5, eval_every=80,
                              checkpoint_every=80, sample_prompt="", device="cpu"))
