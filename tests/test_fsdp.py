"""FSDP (--parallel fsdp) on the CPU with gloo: the losses of one process, sharded checkpoints that resume at another
number of processes and keep the integrity checks, exports equal to a whole checkpoint's, a two-node torchrun.

Each torchrun run is tiny (2 layers, 32 wide, a few steps) and starts two processes on the 2 shared cores with
OMP_NUM_THREADS=1. Tolerance: FSDP reduce-scatters where one process sums, so the gradients add the same numbers in
another order; in float32 that moves a loss by a few 1e-7 relative per step (DDP beside one process, the same
effect, stays within 1e-5 in test_train.py), and 1e-5 over eight steps leaves room for the drift to compound.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minigpt.cli import main as cli_main
from minigpt.runs import checkpoint as ckptlib
from minigpt.runs.checksums import CorruptCheckpoint
from minigpt.runs.loading import is_sharded, latest_checkpoint, load_model, resolve_checkpoint, verify_checkpoint
from minigpt.runs.log import read_metrics

ROOT = Path(__file__).resolve().parents[1]
RTOL = 1e-5
SHAPE = {"model.n-layer": 2, "model.n-head": 2, "model.n-embd": 32, "model.block-size": 32}


def args(run: Path, data: Path, **extra) -> list[str]:
    """`minigpt train` flags: a tiny model, 256 tokens per step, a fixed seed (extra: more flags)."""
    settings = {"run-dir": run, "data": data, "device": "cpu", **SHAPE, "batch-size": 8, "warmup-steps": 3,
                "lr": 3e-3, "log-every": 1, "eval-every": 1000, "eval-batches": 2, "checkpoint-every": 2,
                "keep-last": 5, "sample-prompt": "", "seed": 5,
                **{k.replace("_", "-"): v for k, v in extra.items()}}
    return [x for k, v in settings.items() for x in (f"--{k}", str(v))]


def torchrun(*flags: str, nproc: int = 2, timeout: int = 240) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m",
           "minigpt", "train", *flags]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=child_env())
    assert result.returncode == 0, result.stderr[-4000:]


def child_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r}


def assert_close_losses(got: dict[int, float], expected: dict[int, float]) -> None:
    assert got and set(got) <= set(expected), (got, expected)
    for step, loss in got.items():
        assert loss == pytest.approx(expected[step], rel=RTOL), step


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_shards) -> dict[str, Path]:
    """The runs the tests compare, made once:
    reference  one process, 8 steps of 8 x 32 tokens
    fsdp       2 FSDP processes, 4 steps of 2 micro-batches of 2 x 32 each, gradient checkpointing (sharded
               checkpoints at 2 and 4)
    ddp        2 DDP processes, 4 steps of 4 x 32 each
    to_one     `fsdp` resumed at step 4 by one process (4 x 32, 2 micro-batches) to step 8
    to_two     one process to step 4 (a whole checkpoint), resumed by 2 FSDP processes that keep the step's
               weights gathered and gradients unsharded (--no-fsdp-reshard) to step 8
    bf16       2 FSDP processes in bf16 (FSDP's mixed-precision policy: the GPU path, on gloo) and one process
               with autocast, 3 steps each"""
    root = tmp_path_factory.mktemp("fsdp")
    data = tiny_shards
    out = {name: root / name for name in ("reference", "fsdp", "ddp", "to_one", "to_two", "bf16", "bf16_single")}
    assert cli_main(["train", *args(out["reference"], data, max_steps=8, eval_every=4, sample_prompt="The")]) == 0
    # (the whole validation split at the end: the processes' shares of it differ by a batch)
    torchrun(*args(out["fsdp"], data, max_steps=4, batch_size=2, batch_tokens=256, parallel="fsdp", eval_every=4,
                   sample_prompt="The", eval_batches=0), "--model.gradient-checkpointing")
    torchrun(*args(out["ddp"], data, max_steps=4, batch_size=4))
    shutil.copytree(out["fsdp"], out["to_one"])
    assert cli_main(["train", *args(out["to_one"], data, max_steps=8, batch_size=4, batch_tokens=256),
                     "--resume"]) == 0
    assert cli_main(["train", *args(out["to_two"], data, max_steps=4, batch_size=4, batch_tokens=256,
                                    eval_every=4, eval_batches=0)]) == 0
    torchrun(*args(out["to_two"], data, max_steps=8, batch_size=2, batch_tokens=256, parallel="fsdp", eval_every=4),
             "--no-fsdp-reshard", "--resume")
    torchrun(*args(out["bf16"], data, max_steps=3, batch_size=4, parallel="fsdp", precision="bf16"))
    assert cli_main(["train", *args(out["bf16_single"], data, max_steps=3, precision="bf16")]) == 0
    return out


def test_two_fsdp_processes_train_like_one_process_and_like_ddp(runs):
    reference, fsdp, ddp = losses(runs["reference"]), losses(runs["fsdp"]), losses(runs["ddp"])
    assert sorted(fsdp) == [1, 2, 3, 4]
    assert_close_losses(fsdp, reference)
    assert_close_losses(fsdp, ddp)
    # the evaluation (every process, the whole split) as one process's (to_two's first run), and the sample (rank 0
    # alone, from a gathered copy)
    evals = {name: next(r for r in read_metrics(runs[name]) if r.get("step") == 4 and "val_loss" in r)
             for name in ("to_two", "fsdp")}
    assert evals["fsdp"]["val_loss"] == pytest.approx(evals["to_two"]["val_loss"], rel=RTOL)
    assert evals["fsdp"]["sample"].startswith("The")
    config = json.loads((runs["fsdp"] / "config.json").read_text())
    assert config["parallel"] == "fsdp" and config["resolved"]["world_size"] == 2


def test_fsdp_in_bf16_keeps_fp32_master_weights_and_trains_like_autocast(runs):
    """bf16 under FSDP is its policy (bf16 weights gathered, bf16 gradients reduced in fp32 into fp32 shards), not
    autocast: close to one process's autocast run, not equal (LayerNorms and residuals in bf16 here; 1e-2 is a few
    bf16 roundings of a loss near 6), and the checkpoint holds the fp32 master weights."""
    got, single = losses(runs["bf16"]), losses(runs["bf16_single"])
    assert sorted(got) == [1, 2, 3]
    for step, loss in got.items():
        assert loss == pytest.approx(single[step], rel=1e-2)
    ckpt = latest_checkpoint(runs["bf16"])
    dtypes = {v.dtype for f in json.loads((ckpt / "model.json").read_text())["shards"]["model"]
              for v in load_file(ckpt / f).values()}
    assert dtypes == {torch.float32}


FP16_CHILD = """
import torch, torch.distributed as dist
from minigpt.model.gpt import GPT, ModelConfig
from minigpt.model.optim import make_optimizer
from minigpt.runs.parallel import accumulation, shard_model
from minigpt.train.train import TrainConfig, train_step
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = shard_model(GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=64)).train(), "fp16")
optimizer = make_optimizer(model, TrainConfig(), torch.device("cpu"))
scaler = torch.amp.GradScaler("cpu")  # what Trainer makes for fp16
before = {n: p.to_local().clone() for n, p in model.named_parameters()}
unscale = scaler.unscale_
def overflow_on_rank_1(opt):  # an infinite gradient in rank 1's shard of one weight, nowhere else
    if rank == 1:
        model.h[0].mlp.c_fc.weight.grad.to_local()[0, 0] = float("inf")
    unscale(opt)
scaler.unscale_ = overflow_on_rank_1
x = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(rank))
result = train_step(model, [(x, x)], optimizer, scaler, precision="fp32", device=torch.device("cpu"), grad_clip=1.0,
                    world=2, accumulate=accumulation(model, True))
changed = any(not torch.equal(before[n], p.to_local()) for n, p in model.named_parameters())
import sys
sys.stdout.write(f"rank {rank}: applied {result.applied}, stepped {changed}, scale {scaler.get_scale()};\\n")
sys.stdout.flush()  # one write per process: the two share a pipe
dist.destroy_process_group()
"""


def test_an_fp16_overflow_in_one_shard_skips_the_step_on_every_process(tmp_path):
    """fp16 under FSDP: each process sees its shard of the gradients only. An overflow in rank 1's shard must skip
    the step on rank 0 too (GradScaler's check over DTensor gradients reduces the flag over the shards), or the two
    would update different parts of the model."""
    script = tmp_path / "child.py"
    script.write_text(FP16_CHILD)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=child_env())
    assert result.returncode == 0, result.stderr[-3000:]
    reports = sorted(re.findall(r"rank \d: [^;]*;", result.stdout))
    assert reports == [f"rank {r}: applied False, stepped False, scale 32768.0;" for r in (0, 1)], result.stdout


def test_fsdp_checkpoints_are_sharded_and_load_as_one_model(runs):
    ckpt = latest_checkpoint(runs["fsdp"])
    meta = json.loads((ckpt / "model.json").read_text())
    assert meta["version"] == ckptlib.SHARDED_VERSION and meta["shards"]["world"] == 2
    assert [Path(f).parent.name for f in meta["shards"]["model"]] == ["model", "model"]
    assert not (ckpt / "model.safetensors").exists()
    # each process wrote about half of the weights: the shards are shares, not copies
    sizes = [(ckpt / f).stat().st_size for f in meta["shards"]["model"]]
    whole = sum(v.numel() * 4 for k, v in load_model(runs["reference"])[0].state_dict().items()
                if k != "lm_head.weight")
    assert all(0.4 * whole < s < 0.6 * whole for s in sizes)
    # sha256sum accepts the checksums of every file, shards included
    check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=ckpt, capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout.count(": OK") == 2 + 2 + 2  # model.json, trainer.pt, 4 shards
    # the whole model, assembled in one process, is the one one process trained, as DDP's is: within 1e-5 (the
    # attention's key biases get a gradient of rounding errors, softmax ignoring a shift shared by every key, and
    # AdamW turns those into steps of lr's size: 1.4e-6 apart after 4 steps here, DDP's 2.6e-6)
    sharded, _ = load_model(runs["fsdp"])
    single, _ = load_model(runs["reference"], which="step_00000004")
    ddp, _ = load_model(runs["ddp"])
    for (name, a), (_, b), (_, c) in zip(sharded.state_dict().items(), single.state_dict().items(),
                                         ddp.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=name)
        torch.testing.assert_close(c, b, rtol=0, atol=1e-5, msg=name)
    assert sharded.lm_head.weight is sharded.wte.weight


def test_sharded_checkpoints_resume_in_one_process_and_one_in_two(runs):
    reference = losses(runs["reference"])
    for name in ("to_one", "to_two"):
        got = losses(runs[name])
        assert sorted(got) == list(range(1, 9))
        assert_close_losses(got, reference)
    # to_two ended with a sharded checkpoint written by two processes; to_one with a whole one by one
    assert is_sharded(latest_checkpoint(runs["to_two"]))
    assert not is_sharded(latest_checkpoint(runs["to_one"]))


def test_export_of_a_sharded_checkpoint_is_that_of_a_whole_one(runs, tmp_path):
    from minigpt.interop.hf import export_hf

    copy = tmp_path / "whole"
    copy.mkdir()
    shutil.copy(runs["fsdp"] / "tokenizer.json", copy / "tokenizer.json")
    model, meta = load_model(runs["fsdp"])
    ckptlib.save_checkpoint(copy, model, meta["step"], {"tokenizer_hash": meta["tokenizer_hash"]})
    a = export_hf(runs["fsdp"], tmp_path / "from-shards")
    b = export_hf(copy, tmp_path / "from-whole")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert load_file(a / "model.safetensors").keys() == load_file(b / "model.safetensors").keys()


@pytest.fixture
def sharded_copy(runs, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(runs["fsdp"], run)
    return run


def shard(run: Path, step: int, part: str, rank: int = 1) -> Path:
    return next((run / "checkpoints" / f"step_{step:08d}" / part).glob(f"shard-{rank + 1:05d}-*"))


@pytest.mark.parametrize("damage", ["truncated weights", "tampered moments", "stray shard", "missing shard"])
def test_a_damaged_shard_is_named_and_the_previous_checkpoint_used(sharded_copy, damage, capsys):
    target = shard(sharded_copy, 4, "optimizer" if damage == "tampered moments" else "model")
    if damage == "truncated weights":
        target.write_bytes(target.read_bytes()[:-100])
    elif damage == "tampered moments":
        data = bytearray(target.read_bytes())
        data[-5] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "stray shard":
        shutil.copy(target, target.with_name("shard-00003-model-00001-of-00001.safetensors"))
    else:
        target.unlink()
    with pytest.raises(CorruptCheckpoint):
        verify_checkpoint(target.parents[1], need_trainer=True)
    assert resolve_checkpoint(sharded_copy, need_trainer=True).name == "step_00000002"
    assert "using the newest intact checkpoint" in capsys.readouterr().err


def test_resume_from_a_damaged_sharded_checkpoint_continues_from_the_previous_one(sharded_copy, runs, tiny_shards,
                                                                               capsys):
    data = bytearray(shard(sharded_copy, 4, "optimizer").read_bytes())
    data[-5] ^= 0xFF
    shard(sharded_copy, 4, "optimizer").write_bytes(bytes(data))
    assert cli_main(["train", *args(sharded_copy, tiny_shards, max_steps=8, batch_size=4, batch_tokens=256),
                     "--resume"]) == 0
    assert "resuming" in capsys.readouterr().out
    assert_close_losses(losses(sharded_copy), losses(runs["reference"]))
    assert sorted(losses(sharded_copy)) == list(range(1, 9))


# ----------------------------------------------------------------------------------------------------------------
# Multi-node as users launch it: two torchrun agents, one per "node", meeting at a c10d rendezvous endpoint


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node(flags: list[str], port: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "rehearsal",
           "-m", "minigpt", "train", *flags]
    return subprocess.Popen(cmd, stdout=log.open("ab"), stderr=subprocess.STDOUT, env=child_env())


def kill_node(agent: subprocess.Popen) -> None:
    """A node dies: torchrun's agent and its worker (which torchrun starts in a session of its own) at once."""
    children = Path(f"/proc/{agent.pid}/task/{agent.pid}/children")
    workers = [int(pid) for pid in children.read_text().split()] if children.exists() else []
    for pid in [agent.pid, *workers]:
        with contextlib.suppress(ProcessLookupError):  # (ended already)
            os.kill(pid, signal.SIGKILL)
    agent.wait()


def test_two_nodes_train_and_resume_after_one_is_killed(tmp_path, tiny_shards):
    run = tmp_path / "two-nodes"
    # a constant learning rate after warm-up (min-lr-ratio 1): the run is killed long before its 1,000 steps and
    # resumed to a few steps past the kill, with the schedule of a run of that length
    flags = args(run, tiny_shards, batch_size=4, checkpoint_every=5, parallel="fsdp", checkpoint_minutes=0,
                 min_lr_ratio=1)
    port = free_port()
    nodes = [node([*flags, "--max-steps", "1000"], port, tmp_path / f"node{i}.log") for i in range(2)]
    try:
        deadline = time.time() + 180
        while latest_checkpoint(run) is None or latest_checkpoint(run).name < "step_00000010":
            assert all(n.poll() is None for n in nodes), (tmp_path / "node0.log").read_text()[-3000:]
            assert time.time() < deadline, "no checkpoint in time"
            time.sleep(0.01)
        kill_node(nodes[1])
        # the survivor's collectives fail (its peer is gone): it exits with an error instead of hanging
        assert nodes[0].wait(timeout=120) != 0
    finally:
        for n in nodes:
            if n.poll() is None:
                kill_node(n)
    killed_at = int(latest_checkpoint(run).name.split("_")[1])
    assert 10 <= killed_at < 1000
    # both nodes started again with --resume: they continue from the last checkpoint to the end
    steps = killed_at + 6
    port = free_port()
    nodes = [node([*flags, "--max-steps", str(steps), "--resume"], port, tmp_path / f"resume{i}.log")
             for i in range(2)]
    codes = [n.wait(timeout=240) for n in nodes]
    assert codes == [0, 0], (tmp_path / "resume0.log").read_text()[-3000:]
    got = losses(run)
    assert sorted(got) == list(range(1, steps + 1))
    # the same losses as one process with the same global batch (2 x 4 rows a step)
    single = tmp_path / "single"
    assert cli_main(["train", *args(single, tiny_shards, max_steps=steps, checkpoint_every=1000, min_lr_ratio=1)]) == 0
    assert_close_losses(got, losses(single))


# ----------------------------------------------------------------------------------------------------------------
# Muon: every process orthogonalises the same whole matrix


@pytest.fixture(scope="module")
def muon_runs(tmp_path_factory, tiny_shards) -> dict[str, Path]:
    """--optimizer muon: one process 6 steps (reference), 2 DDP processes 4 steps, 2 FSDP processes 4 steps (sharded
    checkpoints at 2 and 4) and that run resumed by one process to step 6 (the momentum buffers read from shards)."""
    root = tmp_path_factory.mktemp("muon")
    out = {name: root / name for name in ("reference", "ddp", "fsdp", "to_one")}
    muon = {"optimizer": "muon", "muon_momentum_warmup": 4}
    assert cli_main(["train", *args(out["reference"], tiny_shards, max_steps=6, **muon)]) == 0
    torchrun(*args(out["ddp"], tiny_shards, max_steps=4, batch_size=4, **muon))
    torchrun(*args(out["fsdp"], tiny_shards, max_steps=4, batch_size=2, batch_tokens=256, parallel="fsdp", **muon))
    shutil.copytree(out["fsdp"], out["to_one"])
    assert cli_main(["train", *args(out["to_one"], tiny_shards, max_steps=6, batch_size=4, batch_tokens=256, **muon),
                     "--resume"]) == 0
    return out


def test_muon_on_two_ddp_or_fsdp_processes_steps_like_one_process(muon_runs):
    reference = losses(muon_runs["reference"])
    for name in ("ddp", "fsdp"):
        assert sorted(losses(muon_runs[name])) == [1, 2, 3, 4]
        assert_close_losses(losses(muon_runs[name]), reference)
    single, _ = load_model(muon_runs["reference"], which="step_00000004")
    for name in ("ddp", "fsdp"):
        model, _ = load_model(muon_runs[name])
        for (key, a), (_, b) in zip(model.state_dict().items(), single.state_dict().items(), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=f"{name}: {key}")
        # (a shard orthogonalised alone would move the matrices by Muon's whole step, ~1e-3 here, not 1e-5)


def test_muon_momentum_is_sharded_in_the_checkpoint_and_resumes_in_one_process(muon_runs):
    ckpt = latest_checkpoint(muon_runs["fsdp"])
    files = json.loads((ckpt / "model.json").read_text())["shards"]["optimizer"]
    keys = set().union(*(load_file(ckpt / f).keys() for f in files))
    assert "h.0.mlp.c_fc.weight.momentum_buffer" in keys and "wte.weight.exp_avg" in keys
    assert not any(k.startswith("h.0.mlp.c_fc.weight.exp_avg") for k in keys)  # Muon's matrices: one buffer
    got, reference = losses(muon_runs["to_one"]), losses(muon_runs["reference"])
    assert sorted(got) == list(range(1, 7))
    assert_close_losses(got, reference)
