"""The shipped GPU recipes, end to end at toy scale: the same files with the model and the data overridden to the
tiny preset and a small Parquet folder, through `prepare` (killed with -9 after a finished shard, then resumed by
the same command), a few training steps, a resume, and evaluation. What a real run does, in under a minute."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_prepare_faults import WORDS, start_slow_run, wait_for_journal

from minigpt.common.config import list_recipes
from minigpt.data.shards import read_meta
from minigpt.runs.loading import latest_checkpoint, read_checkpoint_meta
from minigpt.runs.log import read_metrics

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ["gpt2-124m", "gpt2-124m-a100-40gb", "gpt2-124m-muon-a100-40gb"]


def minigpt(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "minigpt", *args], capture_output=True, text=True, env=env,
                          timeout=600)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A folder of Parquet files prepared with GPT-2's tokenizer, the way the README prepares FineWeb-Edu; the
    first run is killed with -9 once a shard is finished and the same command finishes the job."""
    tmp = tmp_path_factory.mktemp("recipes")
    corpus = tmp / "parquet"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    for f in range(3):
        texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(20, 150)))) + "." for _ in range(200)]
        pq.write_table(pa.table({"text": texts}), corpus / f"part-{f:05d}.parquet", row_group_size=50)
    out = tmp / "shards"
    args = ["prepare", "--sources", str(corpus), "--tokenizer", "gpt2", "--out", str(out), "--workers", "1",
            "--shard-tokens", "8000", "--chunk-chars", "3000", "--val-fraction", "0.1"]
    proc = start_slow_run(tmp, args)
    journal = wait_for_journal(proc, tmp / ".shards.partial", finished=1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = minigpt(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    done = len(journal["shards"]["train"]["finished"])
    assert "resum" in (resumed.stdout + resumed.stderr).lower()  # it says that it continues, and from where
    meta = read_meta(out)
    assert len(meta["splits"]["train"]["shards"]) > done and meta["splits"]["val"]["tokens"] > 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["parquet", "shards", "slow_cli.py"]  # no orphan
    return out


@pytest.mark.parametrize("recipe", RECIPES)
def test_a_recipe_trains_resumes_and_evaluates_at_toy_scale(recipe, prepared, tmp_path):
    assert recipe in [name for name, stage, _ in list_recipes() if stage == "train"]
    run = tmp_path / "run"
    # everything else (schedule shape, optimizer, checkpointing, precision choice, gradient checkpointing) is the
    # recipe's own; on a CPU its fp16 or bf16 becomes fp32, as --precision auto would choose
    toy = ["--config", recipe, "--data", str(prepared), "--run-dir", str(run), "--model.n-layer", "2",
           "--model.n-head", "2", "--model.n-embd", "64", "--model.block-size", "64",
           "--batch-size", "4", "--seq-len", "64", "--batch-tokens", "512", "--warmup-steps", "2",
           "--eval-every", "3", "--eval-batches", "2", "--eval-tasks-limit", "4", "--no-compile",
           "--precision", "auto", "--device", "cpu", "--checkpoint-every", "3"]
    first = minigpt("train", *toy, "--max-steps", "3")
    assert first.returncode == 0, first.stderr[-3000:]
    assert read_checkpoint_meta(latest_checkpoint(run))["step"] == 3
    config = json.loads((run / "config.json").read_text())
    assert config["lr"] == 6e-4 and config["model"]["n_layer"] == 2  # the recipe's schedule, the toy shape
    if recipe.endswith("a100-40gb"):  # the plan's run on that card (tests/test_gpu_paths.py)
        assert config["model"]["gradient_checkpointing"] is False and config["gpu"] == "A100-40GB"
    if "muon" in recipe:  # Muon at AdamW's lr (Moonlight's scaling) with wsd; its momentum in the checkpoint
        assert (config["optimizer"], config["muon_lr"], config["schedule"]) == ("muon", 6e-4, "wsd")
        state = torch.load(latest_checkpoint(run) / "trainer.pt", weights_only=True)["optimizer"]
        assert any("momentum_buffer" in s for s in state["state"].values())
    second = minigpt("train", *toy, "--max-steps", "6", "--resume")  # the same run, extended
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming" in second.stdout + second.stderr
    records = read_metrics(run / "metrics.jsonl")
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 6  # continued where it stopped: no step twice
    assert any(k.startswith("hellaswag/") for r in records for k in r)  # the recipe's in-training benchmark ran
    evaluated = minigpt("eval", str(run), "--tasks", "hellaswag", "--limit", "4", "--data", str(prepared))
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    report = json.loads((run / "eval" / "report.json").read_text())
    assert report["checkpoints"][-1]["language_model"]["val"]["bpb"] > 0
    assert "hellaswag" in report["checkpoints"][-1]["tasks"]


def test_muon_recipes_are_their_adamw_siblings_but_for_the_optimizer_and_the_tokens():
    from minigpt.common.config import load_file, recipe_expectation

    for muon, adamw in (("gpt2-124m-muon", "gpt2-124m"), ("gpt2-124m-muon-a100-40gb", "gpt2-124m-a100-40gb")):
        a, b = load_file(muon), load_file(adamw)
        differ = {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}
        assert differ == {"run_dir", "max_steps", "optimizer", "muon_lr", "muon_weight_decay", "muon_momentum",
                          "muon_momentum_warmup", "schedule", "decay_fraction"}, differ
        assert a["max_steps"] == math.ceil(b["max_steps"] / 1.36) and a["muon_lr"] == b["lr"]
        assert "3.28" in recipe_expectation(muon) and "1.36" in recipe_expectation(muon)
    dry = minigpt("train", "--config", "gpt2-124m-muon-a100-40gb", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "expected:    validation loss about 3.28" in dry.stdout and "modded-nanogpt" in dry.stdout
    assert "Muon on the blocks' matrices: lr 0.0006" in dry.stdout
