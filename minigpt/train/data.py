"""What the training loop takes from a data source, and the pretraining one: token shards, built from the bundled
corpus on first use. Fine-tuning supplies its own (sft.py); the loop (train.py) only ever sees a `TrainData`.

    data = pretraining_data(cfg, rt, seq_len, precision)   # cfg: a TrainConfig
    x, y = data.train.batch(step)[:2]                      # micro-batches by step, resumable
    metrics = data.evaluate(model)                         # {"val_loss": ..., ...}
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

from minigpt.common import UserError, print0
from minigpt.data.loader import TokenLoader
from minigpt.data.prepare import PrepareConfig, prepare
from minigpt.data.shards import shards_tokenizer
from minigpt.eval.evaluate import language_model_metrics
from minigpt.model.gpt import GPT
from minigpt.runs.runtime import Runtime, autocast_context, barrier
from minigpt.text import corpus
from minigpt.text.tokenizer import Tokenizer

DEFAULT_DATA = "data/wiki-bpe8k"


class Batches(Protocol):
    step: int  # the next micro-batch to take

    def batch(self, step: int) -> tuple: ...  # (x, y), or (x, y, extra forward kwargs such as {"doc_ids": ...})
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclasses.dataclass
class TrainData:
    tokenizer: Any
    train: Batches  # (x, y) micro-batches by step; y is -100 where a position does not count
    evaluate: Callable[[torch.nn.Module], dict[str, float]]  # validation metrics, "val_loss" among them
    describe: str = ""
    sample: Callable[[GPT], str] | None = None  # text to show at each evaluation (default: continue sample_prompt)
    train_metrics: Callable[[], dict[str, float]] | None = None  # more numbers for each logged step (e.g. "fill")


# ----------------------------------------------------------------------------------------------------------------
# Pretraining data: shards, built from the bundled corpus on first use


def build_data(cfg) -> None:
    """Train a tokenizer on `cfg.corpus` (unless GPT-2's is asked for) and prepare the shards into `cfg.data`."""
    print0(f"{cfg.data} does not exist yet: preparing it from {', '.join(cfg.corpus)}")
    with tempfile.TemporaryDirectory() as tmp:
        if cfg.vocab_size:
            texts = (text for source in cfg.corpus for text in corpus.load_documents(source))
            tokenizer = Tokenizer.train(texts, cfg.vocab_size, name=f"{'+'.join(cfg.corpus)}-bpe{cfg.vocab_size}")
            spec = str(tokenizer.save(Path(tmp) / "tokenizer.json"))
        else:
            spec = "gpt2"
        # A few percent held out: enough validation text on small corpora, and held-out articles for probes.
        prepare(PrepareConfig(sources=list(cfg.corpus), tokenizer=spec, out=cfg.data, val_fraction=0.02))


def pretraining_data(cfg, rt: Runtime, seq_len: int, precision: str) -> TrainData:
    if not (Path(cfg.data) / "meta.json").exists():
        # Only the default folder is built implicitly: a --data of the user's own that holds no shards is a typo or
        # a wrong folder, and building a corpus into it would hide that (and write where nobody asked).
        if not cfg.corpus or cfg.data != DEFAULT_DATA:
            if not Path(cfg.data).exists():
                raise UserError(f"{cfg.data} holds no shards (it does not exist): make them with minigpt prepare "
                                f"--sources ... --out {cfg.data}, or leave out --data to use the bundled corpus")
            what = "a file" if Path(cfg.data).is_file() else "a folder without meta.json"
            raise UserError(f"{cfg.data} holds no shards ({what}): to train on its text, make shards of it first "
                            f"with minigpt prepare --sources {cfg.data} --out DIR, then pass --data DIR")
        if rt.rank == 0:
            build_data(cfg)
        barrier(rt)
    tokenizer = shards_tokenizer(cfg.data)
    # vocab_size: a token id the model has no embedding for is a one-line error, not an index error on the GPU
    train = TokenLoader(cfg.data, "train", cfg.batch_size, seq_len, cfg.seed, rt.rank, rt.world, True, rt.device,
                        vocab_size=tokenizer.n_vocab)
    val = TokenLoader(cfg.data, "val", cfg.batch_size, seq_len, cfg.seed, rt.rank, rt.world, False, rt.device,
                      vocab_size=tokenizer.n_vocab)

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        with autocast_context(precision, rt.device):
            m = language_model_metrics(model, val, max_batches=cfg.eval_batches)
        return {"val_loss": m["loss"], "val_ppl": m["ppl"], "val_bpb": m["bpb"]}

    describe = (f"{train.num_tokens:,} training tokens, {val.num_tokens:,} validation tokens, "
                f"{train.windows_per_epoch:,} windows of {seq_len} per epoch")
    return TrainData(tokenizer, train, evaluate, describe)


