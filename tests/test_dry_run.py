"""`train --dry-run` and `sft --dry-run`: the plan printed without training, on the numbers plan.py computes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from minigpt.common import config as configlib
from minigpt.data.shards import read_meta
from minigpt.model import estimate
from minigpt.model.gpt import ModelConfig
from minigpt.plan.dry_run import sft_dry_run, train_dry_run
from minigpt.train.sft import SFTConfig, dataset_facts
from minigpt.train.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def number(text: str, pattern: str) -> float:
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not in:\n{text}"
    return float(match.group(1).replace(",", ""))


def test_the_gpt2_recipe_plans_on_a_cpu_only_machine(tmp_path):
    """The README's command, as a user runs it: no data yet, no GPU; the plan, exit 0, nothing written. It answers
    for the card the recipe names, as minigpt plan does (bf16, the GPU's loss path: 30.8 GiB), not for this CPU
    (fp32 and the chunked loss: 12.7 GiB, the figure it printed before)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "minigpt", "train", "--config", "gpt2-124m", "--dry-run"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "32 x 1024 tokens x 16 micro-batches x 1 process = 524,288 tokens per step" in out
    assert "19,073 steps = 10.00B tokens" in out
    assert "holds no shards yet: make them first, e.g. minigpt prepare --sources hf:HuggingFaceFW/fineweb-edu" in out
    assert "1.49 GB each" in out and "planned for: NVIDIA A100 80GB" in out and "bf16 on cuda" in out
    est = estimate.estimate_run(ModelConfig.from_preset("gpt2"), seq_len=1024, micro_batch=32, grad_accum=16,
                                world=1, steps=19073, precision="bf16", gpu=estimate.GPUS["A100-80GB"], mfu=None,
                                checkpointing=False, keep_checkpoints=2)
    assert f"memory:      {est.memory.total / 2**30:.1f} GiB at the peak per GPU" in out
    assert f"{est.memory.total / 2**30:.1f} GiB" == "30.8 GiB"  # minigpt plan's figure for this run
    assert f"about {est.hours:,.1f} hours on 1 x NVIDIA A100 80GB" in out and "this CPU" not in out
    assert list(tmp_path.iterdir()) == []  # no run folder, no data folder
    # another card by name; this machine's CPU when asked for
    other = subprocess.run(command + ["--gpu", "H100-SXM"], capture_output=True, text=True, cwd=tmp_path, env=env,
                           timeout=300).stdout
    assert "planned for: NVIDIA H100 SXM 80GB" in other and "30.8 GiB at the peak per GPU" in other
    cpu = subprocess.run(command + ["--device", "cpu", "--model.n-layer", "1"], capture_output=True, text=True,
                         cwd=tmp_path, env=env, timeout=300).stdout
    assert "planned for:" not in cpu and "bf16 on cpu" in cpu and "GiB at the peak per process" in cpu
    assert re.search(r"time: +about [\d,.]+ hours on this CPU", cpu), cpu


def test_a_gpt2_schedule_on_a_small_corpus_warns_about_epochs(tiny_shards):
    """The README's old example: the 124M recipe on a corpus of a hundred thousand tokens repeats it ~100K times."""
    cfg = configlib.resolve(TrainConfig, "gpt2-124m", {"data": str(tiny_shards), "device": "cpu",
                                                        "model": {"n_layer": 1}})  # one layer: a quick CPU probe
    text = train_dry_run(cfg)
    train_tokens = read_meta(tiny_shards)["splits"]["train"]["tokens"]
    epochs = 19073 * 524288 / train_tokens
    assert number(text, r"= ([\d,.]+) epochs of the") == pytest.approx(epochs, rel=1e-3)
    warning = [line for line in text.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and f"read its training data {epochs:,.0f} times" in warning[0]


def test_small_runs_state_their_arithmetic_and_do_not_warn(tiny_shards):
    cfg = TrainConfig(data=str(tiny_shards), model=ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32),
                      batch_size=8, batch_tokens=512, max_steps=40, checkpoint_every=15, keep_last=2, device="cpu")
    text = train_dry_run(cfg)
    train_tokens = read_meta(tiny_shards)["splits"]["train"]["tokens"]
    assert "8 x 32 tokens x 2 micro-batches x 1 process = 512 tokens per step" in text
    assert number(text, r"= ([\d,.]+) epochs") == pytest.approx(40 * 512 / train_tokens, abs=0.005)
    assert "every 15 steps and every 30 minutes and at the end (about 3 by steps)" in text
    assert "warning" not in text


def test_on_a_gpu_the_time_and_memory_are_plans(monkeypatch, tiny_shards):
    """A (faked) A100: hours, tokens/s and memory fit are exactly what minigpt plan's estimate_run says."""
    monkeypatch.setattr("minigpt.plan.dry_run.pick_device", lambda name="auto": torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-40GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(
        total_memory=40 * 2**30))
    cfg = configlib.resolve(TrainConfig, "gpt2-124m", {"data": str(tiny_shards), "max_steps": 8717})
    text = train_dry_run(cfg)
    model = ModelConfig.from_preset("gpt2", vocab_size=read_meta(tiny_shards)["tokenizer"]["n_vocab"])
    est = estimate.estimate_run(model, seq_len=1024, micro_batch=32, grad_accum=16, world=1, steps=8717,
                               precision="bf16", gpu=estimate.GPUS["A100-40GB"], mfu=None, checkpointing=False,
                               keep_checkpoints=2)
    assert f"about {est.hours:,.1f} hours on 1 x NVIDIA A100 40GB at {est.tokens_per_s:,.0f} tokens/s" in text
    assert f"{est.memory.total / 2**30:.1f} GiB at the peak per GPU" in text and "will not fit" not in text
    big = configlib.from_dict(TrainConfig, {**configlib.to_dict(cfg), "batch_size": 128, "batch_tokens": 524288})
    assert "will not fit in this card's" in train_dry_run(big)


def test_sft_dry_run_counts_conversations_and_steps(base_run, greetings_file, tmp_path):
    cfg = SFTConfig(base=str(base_run), run_dir=str(tmp_path / "chat"), datasets=[str(greetings_file)],
                    held_out=0.2, batch_size=4, epochs=3, device="cpu", sft_cache=str(tmp_path / "cache"))
    text = sft_dry_run(cfg, dataset_facts(cfg))
    conversations = int(number(text, r"x1: ([\d,]+) conversations"))
    held = int(number(text, r"conversations \(([\d,]+) held out\)"))
    assert conversations + held == 60
    rows = int(number(text, r"in ([\d,]+) rows of 64"))
    steps_per_epoch = -(-rows // 4)
    assert f"{steps_per_epoch:,} steps at 4 rows a step" in text
    assert number(text, r"length: +([\d,]+) steps") == max(-(-3 * rows // 4), 1)
    assert not (tmp_path / "chat").exists()
