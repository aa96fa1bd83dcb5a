"""The GPU path's loose ends (issue 28), each shown on the CPU: the logged tokens/s, FlexAttention for packed rows,
no host synchronisation in a cached decoding step, padded fine-tuning batches of few widths, the A100 recipe and
the dry run that answers for the GPU a recipe targets."""

from __future__ import annotations

import shutil
import time
import types
from pathlib import Path

import pytest

from minigpt import train as trainlib
from minigpt.log import read_metrics
from minigpt.model import ModelConfig
from minigpt.train import TrainConfig

# ----------------------------------------------------------------------------------------------------------------
# tokens/s: the window's tokens over the window's training time, evaluations and checkpoints left out


class Clock:
    """time.perf_counter for train.py: 1 s per training step, 100 s per evaluation and save."""

    def __init__(self) -> None:
        self.now = 0.0

    def module(self) -> types.SimpleNamespace:
        return types.SimpleNamespace(perf_counter=lambda: self.now, monotonic=time.monotonic)


@pytest.fixture
def clock(monkeypatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(trainlib, "time", clock.module())
    real_step, real_save, real_evaluate = trainlib.train_step, trainlib.Trainer.save, trainlib.Trainer.evaluate

    def step(*args, **kwargs):
        clock.now += 1.0
        return real_step(*args, **kwargs)

    def slow(real):
        def wrapped(*args, **kwargs):
            clock.now += 100.0
            return real(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(trainlib, "train_step", step)
    monkeypatch.setattr(trainlib.Trainer, "save", slow(real_save))
    monkeypatch.setattr(trainlib.Trainer, "evaluate", slow(real_evaluate))
    return clock


def test_tokens_per_second_counts_training_time_only(tmp_path, tiny_shards, clock):
    """Log every 3 steps, evaluate every 4, save every 5: every window's rate is one step's tokens per second. (Before
    the fix a window a checkpoint or evaluation fell into counted all its tokens over the time after it: 3x.)"""
    cfg = TrainConfig(run_dir=str(tmp_path / "run"), data=str(tiny_shards), device="cpu", sample_prompt="",
                      model=ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32), batch_size=8, max_steps=9,
                      log_every=3, eval_every=4, eval_batches=1, checkpoint_every=5, checkpoint_minutes=0,
                      warmup_steps=1)
    trainlib.train(cfg)
    rates = [r["tokens_per_s"] for r in read_metrics(Path(cfg.run_dir)) if "tokens_per_s" in r]
    assert rates == [8 * 32] * 3
    # resumed from step 5 (the checkpoint of step 9 lost): the window its checkpoint carries (steps 4 and 5) was
    # timed by the process that ended, and the new one's rate counts its own steps only
    shutil.rmtree(Path(cfg.run_dir) / "checkpoints" / "step_00000009")
    cfg.resume = True
    trainlib.train(cfg)
    resumed = [r for r in read_metrics(Path(cfg.run_dir)) if "tokens_per_s" in r and r["step"] > 5]
    assert [r["step"] for r in resumed] == [6, 9] and [r["tokens_per_s"] for r in resumed] == [8 * 32] * 2
