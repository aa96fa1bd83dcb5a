"""What the training loop takes from a data source, and the pretraining one: token shards. Fine-tuning supplies its
own (sft.py); the loop (train.py) only ever sees a `TrainData`, and never builds data: the default shards are made
by `ensure_pretraining_data`, which the `minigpt train` command and the quickstart call before training.

    ensure_pretraining_data(cfg, rt)                       # cfg: a TrainConfig; builds data/wiki-bpe8k once
    data = pretraining_data(cfg, rt, seq_len, precision)   # opens the shards
    x, y = data.train.batch(step)[:2]                      # micro-batches by step, resumable
    metrics = data.evaluate(model)                         # {"val_loss": ..., ...}
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

from minigpt.common import UserError
from minigpt.data.build import build_shards
from minigpt.data.loader import TokenLoader
from minigpt.data.shards import shards_tokenizer
from minigpt.eval.evaluate import language_model_metrics
from minigpt.model.gpt import GPT
from minigpt.runs.runtime import Runtime, autocast_context, barrier

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
# Pretraining data: token shards, the default ones built from the bundled corpus before the first run


def builds_default_data(cfg) -> bool:
    """Whether `cfg.data` is the default folder, which `minigpt train` builds from `cfg.corpus` when it is missing.
    Only that one: a --data of the user's own that holds no shards is a typo or a wrong folder, and building a
    corpus into it would hide that (and write where nobody asked)."""
    return bool(cfg.corpus) and cfg.data == DEFAULT_DATA


def ensure_pretraining_data(cfg, rt: Runtime) -> None:
    """Build `cfg.data` from `cfg.corpus` if it is the default folder and holds no shards yet (rank 0 builds, the
    other ranks wait); a --data of the user's own that holds no shards is refused in one line."""
    if (Path(cfg.data) / "meta.json").exists():
        return
    if not builds_default_data(cfg):
        _refuse_missing(cfg.data)
    if rt.rank == 0:
        build_shards(cfg.data, cfg.corpus, cfg.vocab_size)
    barrier(rt)


def _refuse_missing(data: str, default: bool = False) -> None:
    if default:
        raise UserError(f"{data} holds no shards yet: `minigpt train` builds it on first use (from Python, call "
                        "minigpt.train.data.ensure_pretraining_data before training)")
    if not Path(data).exists():
        raise UserError(f"{data} holds no shards (it does not exist): make them with minigpt prepare --sources ... "
                        f"--out {data}, or leave out --data to use the bundled corpus")
    what = "a file" if Path(data).is_file() else "a folder without meta.json"
    raise UserError(f"{data} holds no shards ({what}): to train on its text, make shards of it first with "
                    f"minigpt prepare --sources {data} --out DIR, then pass --data DIR")


def pretraining_data(cfg, rt: Runtime, seq_len: int, precision: str) -> TrainData:
    """The shards in `cfg.data`, opened for this process's rank (nothing is built here)."""
    if not (Path(cfg.data) / "meta.json").exists():
        _refuse_missing(cfg.data, default=builds_default_data(cfg))
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


