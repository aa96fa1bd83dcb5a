"""Optimizers and schedules: Newton-Schulz, Muon against torch.optim.Muon, MuonAdamW as one optimizer, wsd."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minigpt.model import optim
from minigpt.model.gpt import GPT, ModelConfig
from minigpt.model.optim import (
    Muon,
    MuonAdamW,
    apply_schedule,
    learning_rate,
    make_optimizer,
    muon_momentum,
    orthogonalise,
)
from minigpt.train.train import TrainConfig

SMALL = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64)


def muon_config(**overrides) -> TrainConfig:
    return TrainConfig(**{"optimizer": "muon", "device": "cpu", "fused_adamw": False, **overrides})


def set_grads(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)


@pytest.mark.parametrize("shape", [(48, 48), (96, 32), (32, 96)])
def test_orthogonalise_gives_singular_values_near_one_in_the_direction_of_u_vt(shape):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    o = orthogonalise(g, 5)
    assert o.shape == g.shape and o.dtype == torch.float32  # fp32 on the CPU
    s = torch.linalg.svdvals(o)
    assert 0.6 < s.min() and s.max() < 1.3  # the quintic's band, not 1 exactly (its steeper slope at zero)
    u, _, vt = torch.linalg.svd(g, full_matrices=False)
    assert torch.nn.functional.cosine_similarity(o.flatten(), (u @ vt).flatten(), dim=0) > 0.95


def torch_muon_pair(seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    mine = [torch.randn(shape, generator=g) for shape in ((48, 16), (16, 48), (24, 24))]
    return mine, [p.clone() for p in mine]


@pytest.mark.parametrize("in_bf16", [True, False])
def test_muon_steps_like_torch_optim_muon(monkeypatch, in_bf16):
    """Three steps of ours and of torch.optim.Muon (match_rms_adamw) from the same weights and gradients. torch's
    Newton-Schulz runs in bf16 always: computing ours in bf16 too gives the same numbers; in fp32 (ours on CPUs)
    the steps differ by bf16's rounding only."""
    if in_bf16:
        monkeypatch.setattr(optim, "newton_schulz_dtype", lambda device: torch.bfloat16)
    mine, theirs = torch_muon_pair()
    settings = dict(lr=0.02, weight_decay=0.1, momentum=0.95, adjust_lr_fn="match_rms_adamw")
    ours, reference = Muon(mine, **settings), torch.optim.Muon(theirs, **settings)
    start = [p.clone() for p in mine]
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        for a, b in zip(mine, theirs, strict=True):
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
        ours.step()
        reference.step()
    for a, b, p0 in zip(mine, theirs, start, strict=True):
        moved = (b - p0).norm()
        assert moved > 0.1
        assert (a - b).norm() <= (1e-6 if in_bf16 else 0.02) * moved  # the steps, compared relative to their size


def test_muon_adamw_state_round_trips_into_a_fresh_optimizer_with_identical_next_steps():
    cfg = muon_config(muon_momentum_warmup=10)
    torch.manual_seed(0)
    model = GPT(ModelConfig(**SMALL))
    opt = make_optimizer(model, cfg, torch.device("cpu"))
    for step in range(3):
        apply_schedule(opt, step, cfg)
        set_grads(model, step)
        opt.step()
    twin = copy.deepcopy(model)
    fresh = make_optimizer(twin, cfg, torch.device("cpu"))
    fresh.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert any("momentum_buffer" in s for s in fresh.state.values())
    for step in range(3, 6):
        for o, m in ((opt, model), (fresh, twin)):
            apply_schedule(o, step, cfg)
            set_grads(m, step)
            o.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)


def test_the_loop_sees_the_inner_optimizers_groups_and_zero_grad_clears_both():
    model = GPT(ModelConfig(**SMALL))
    opt = make_optimizer(model, muon_config(), torch.device("cpu"))
    assert isinstance(opt, MuonAdamW)
    assert opt.param_groups[0] is opt.muon.param_groups[0] and opt.param_groups[1:] == opt.adamw.param_groups
    assert all(a is b for a, b in zip(opt.param_groups[1:], opt.adamw.param_groups, strict=True))
    for group in opt.param_groups:
        group["lr"] = 0.123
    assert [g["lr"] for g in opt.muon.param_groups + opt.adamw.param_groups] == [0.123] * 3
    muon_params = {id(p) for p in opt.muon.param_groups[0]["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in muon_params}
    assert names == {f"h.{i}.{m}.weight" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                     "mlp.c_proj")}
    set_grads(model, 0)
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in model.parameters())


def test_schedule_sets_each_groups_own_peak_and_muons_momentum():
    cfg = muon_config(lr=1e-3, muon_lr=0.02, warmup_steps=0, max_steps=100, muon_momentum_warmup=10,
                      muon_momentum=0.95)
    opt = make_optimizer(GPT(ModelConfig(**SMALL)), cfg, torch.device("cpu"))
    assert apply_schedule(opt, 0, cfg) == 1e-3
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.02, 1e-3, 1e-3])
    assert opt.param_groups[0]["momentum"] == pytest.approx(0.85)
    assert [muon_momentum(s, cfg) for s in (0, 5, 10, 50)] == pytest.approx([0.85, 0.90, 0.95, 0.95])
    assert muon_momentum(0, muon_config(muon_momentum_warmup=0)) == 0.95  # off: the target from the first step


def old_cosine(step: int, lr: float, warmup: int, max_steps: int, min_ratio: float) -> float:
    """The schedule before wsd existed, kept verbatim: cosine must not move by one bit."""
    if step < warmup:
        return lr * (step + 1) / warmup
    span = max(max_steps - warmup, 1)
    progress_ = min((step - warmup) / span, 1.0)
    floor = lr * min_ratio
    return floor + 0.5 * (lr - floor) * (1.0 + math.cos(math.pi * progress_))


def test_cosine_is_bit_identical_to_the_old_formula():
    cfg = TrainConfig(lr=6e-4, warmup_steps=715, max_steps=19073, min_lr_ratio=0.1)
    for step in list(range(0, 800)) + list(range(800, 19200, 97)):
        assert learning_rate(step, cfg) == old_cosine(step, 6e-4, 715, 19073, 0.1)


def test_wsd_holds_the_peak_then_decays_linearly_to_the_floor():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1, schedule="wsd", decay_fraction=0.2)
    assert learning_rate(0, cfg) == pytest.approx(0.1)
    assert [learning_rate(s, cfg) for s in range(9, 88)] == [1.0] * 79  # the stable part, up to the last 22 steps
    assert learning_rate(88, cfg) == 1.0  # the decay starts here
    assert learning_rate(99, cfg) == pytest.approx(1.0 - 0.9 * 11 / 22)  # half way down, a straight line
    assert learning_rate(110, cfg) == pytest.approx(0.1)
    drops = [learning_rate(s, cfg) - learning_rate(s + 1, cfg) for s in range(88, 110)]
    assert drops == pytest.approx([0.9 / 22] * 22)


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minigpt", "train", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


@pytest.mark.parametrize("flags, says", [
    (["--optimizer", "sgd"], "invalid choice: 'sgd'"),
    (["--lr", "0"], "lr (0.0) and muon_lr (0.006) must be positive"),
    (["--muon-lr", "-1"], "muon_lr (-1.0) must be positive"),
    (["--optimizer", "muon", "--muon-params", "h.*"], "Muon steps 2-D weight matrices only"),
    (["--optimizer", "muon", "--muon-params", "blocks.*"], "match no parameter"),
    (["--optimizer", "muon", "--muon-params", "h.*", "--dry-run"], "Muon steps 2-D weight matrices only"),
])
def test_bad_optimizer_settings_are_one_line_and_exit_2(tmp_path, tiny_shards, flags, says):
    result = run_cli("--run-dir", str(tmp_path / "run"), "--data", str(tiny_shards), "--device", "cpu",
                     "--max-steps", "1", *flags, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0] and "Traceback" not in result.stderr, result.stderr


def test_fp16_grad_scaler_unscales_and_skips_for_both_optimizers():
    """The real GradScaler on the CPU (torch 2.13 has it there): unscale_ reaches Muon's and AdamW's gradients
    alike, a finite step equals the unscaled step, and an inf in one Muon matrix skips every group's update."""
    cfg = muon_config()
    torch.manual_seed(0)
    model = GPT(ModelConfig(**SMALL))
    twin = copy.deepcopy(model)
    opt, plain = make_optimizer(model, cfg, torch.device("cpu")), make_optimizer(twin, cfg, torch.device("cpu"))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=True)
    for o in (opt, plain):
        apply_schedule(o, 0, cfg)
    x = torch.randint(0, SMALL["vocab_size"], (2, SMALL["block_size"]), generator=torch.Generator().manual_seed(0))
    scaler.scale(model(x, x)[1]).backward()
    twin(x, x)[1].backward()
    scaler.unscale_(opt)
    scaler.step(opt)
    scaler.update()
    plain.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b)  # a power-of-two scale: the same gradients, the same step
    before = [p.clone() for p in model.parameters()]
    scaler.scale(model(x, x)[1]).backward()
    opt.muon.param_groups[0]["params"][0].grad[0, 0] = math.inf  # an overflow in one Muon matrix
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before, strict=True))
    assert scaler.get_scale() == 512.0


@pytest.mark.parametrize("first, then", [("adamw", "muon"), ("muon", "adamw")])
def test_resuming_with_the_other_optimizer_is_one_line_naming_the_one_to_pass(tmp_path, tiny_shards, capsys, first,
                                                                              then):
    from minigpt.cli import main as cli_main

    args = ["train", "--run-dir", str(tmp_path / "run"), "--data", str(tiny_shards), "--device", "cpu",
            "--model.n-layer", "1", "--model.n-embd", "32", "--model.n-head", "2", "--model.block-size", "16",
            "--batch-size", "2", "--max-steps", "2", "--sample-prompt", ""]
    assert cli_main([*args, "--optimizer", first]) == 0
    capsys.readouterr()
    assert cli_main([*args, "--max-steps", "4", "--resume", "--optimizer", then]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"was trained with --optimizer {first}" in err[0]
    assert f"pass --optimizer {first} to resume it" in err[0]


def test_under_bf16_autocast_newton_schulz_runs_outside_it_on_fp32_momentum(monkeypatch):
    """train_step's autocast covers the forward passes only: Muon's step (its momentum and Newton-Schulz) sees fp32
    gradients and keeps fp32 buffers, whatever the precision of the matmuls before it."""
    from minigpt.train.train import train_step

    seen = []
    real = optim.orthogonalise

    def recording(g, *args, **kwargs):
        seen.append((torch.is_autocast_enabled("cpu"), g.dtype))
        return real(g, *args, **kwargs)

    monkeypatch.setattr(optim, "orthogonalise", recording)
    model = GPT(ModelConfig(**SMALL))
    opt = make_optimizer(model, muon_config(), torch.device("cpu"))
    x = torch.randint(0, SMALL["vocab_size"], (2, SMALL["block_size"]))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    train_step(model, [(x, x)], opt, scaler, precision="bf16", device=torch.device("cpu"), grad_clip=1.0)
    assert seen and set(seen) == {(False, torch.float32)}
    assert {s["momentum_buffer"].dtype for s in opt.state.values() if "momentum_buffer" in s} == {torch.float32}
