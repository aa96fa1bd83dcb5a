"""The optimizers and the learning-rate schedules of the training loop.

    optimizer = make_optimizer(model, cfg, device)      # cfg: a TrainConfig (or anything with the fields below)
    lr = apply_schedule(optimizer, step, cfg)           # sets every group's lr (and Muon's momentum) for this step

Two optimizers, one object to the loop:
- `adamw` (the default, GPT-2's recipe): AdamW with weight decay on the weight matrices, never on biases or
  LayerNorms.
- `muon`: Muon on the 2-D weight matrices inside the blocks (attention and MLP), AdamW on the rest (embeddings and
  the tied head, biases, LayerNorms), as nanochat and modded-nanogpt split them. `MuonAdamW` holds both in one
  torch.optim.Optimizer: one list of param_groups (each with its own peak lr), one state_dict, so the loop, the
  fp16 scaler, clipping, checkpoints (whole or sharded) and the schedule treat it like AdamW.

Schedules: linear warm-up, then `cosine` down to lr x min_lr_ratio, or `wsd` (warm-up, stable, decay): the peak
held until the last `decay_fraction` of the steps, then a straight line down to the same floor.
"""

from __future__ import annotations

import fnmatch
import math
from typing import Any, Protocol

import torch

from minigpt.common import UserError
from minigpt.model.gpt import GPT


class OptimizerSettings(Protocol):
    optimizer: str
    lr: float
    weight_decay: float
    decay_embeddings: bool
    beta1: float
    beta2: float
    fused_adamw: bool
    muon_lr: float
    muon_momentum: float
    muon_weight_decay: float
    muon_ns_steps: int
    muon_params: list[str]


class ScheduleSettings(Protocol):
    lr: float
    min_lr_ratio: float
    warmup_steps: int
    max_steps: int
    schedule: str
    decay_fraction: float
    muon_lr: float
    muon_momentum: float
    muon_momentum_warmup: int


# ----------------------------------------------------------------------------------------------------------------
# Muon


NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic, torch.optim.Muon's default


def newton_schulz_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs, where it is fast and Muon is known to tolerate it (torch.optim.Muon always uses it); fp32 on
    CPUs, whose bf16 matmuls are slower than fp32 ones (3x here on 2 cores)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def orthogonalise(g: torch.Tensor, steps: int, coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                  eps: float = 1e-7) -> torch.Tensor:
    """G (m, n) -> approximately U V^T of its SVD, by a quintic Newton-Schulz iteration (torch.optim.Muon's, the
    same operations in the same order): the singular values land between about 0.6 and 1.3, which is all Muon
    needs. Computed in `newton_schulz_dtype`; returned in it."""
    a, b, c = coefficients
    x = g.to(newton_schulz_dtype(g.device))
    tall = x.size(0) > x.size(1)
    if tall:  # iterate on the smaller Gram matrix
        x = x.T
    x = x / x.norm().clamp(min=eps)  # spectral norm <= Frobenius norm <= 1: inside the iteration's basin
    for _ in range(steps):
        gram = x @ x.T  # (m, m), m the smaller side
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)  # a x + (b G + c G^2) x
    return x.T if tall else x


def update_scale(shape: torch.Size, adjust_lr_fn: str | None) -> float:
    """What Muon multiplies its lr by for a matrix of `shape` (torch.optim.Muon's two rules). match_rms_adamw
    (Moonlight, Liu et al. 2025): 0.2 x sqrt(larger side), which gives the orthogonalised update the RMS of an
    AdamW update, so Muon's lr and weight decay mean what AdamW's do, at any width."""
    rows, cols = shape
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1.0, rows / cols))  # "original" (Keller Jordan's)


class Muon(torch.optim.Muon):
    """torch.optim.Muon (its settings, checks and state), stepping each whole matrix even when FSDP holds a shard.

    Under FSDP a parameter and its gradient are DTensors holding a slice of rows: orthogonalising the slice would
    be a different optimizer, so the momentum is gathered into the whole matrix, orthogonalised (identically on
    every process), and each process applies its own rows. Under DDP every process already holds the same
    all-reduced gradient and so takes the same step.
    """

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # noqa: D102 (as torch.optim.Muon.step)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)  # fp32, like the parameter
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = _whole_matrix_step(update, group["ns_steps"], group["ns_coefficients"], group["eps"])
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update.to(p.dtype), alpha=-lr * update_scale(p.shape, group["adjust_lr_fn"]))
        return loss


def _whole_matrix_step(update: torch.Tensor, steps: int, coefficients: tuple[float, float, float],
                       eps: float) -> torch.Tensor:
    """Orthogonalise `update`; a DTensor (an FSDP shard) is gathered first and its own rows handed back."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(update, DTensor):
        whole = orthogonalise(update.full_tensor(), steps, coefficients, eps)
        # every process computed the same matrix: each keeps its rows, nothing is sent
        return distribute_tensor(whole, update.device_mesh, update.placements, src_data_rank=None)
    return orthogonalise(update, steps, coefficients, eps)


class MuonAdamW(torch.optim.Optimizer):
    """Muon's groups then AdamW's, in one optimizer: its param_groups are theirs (the same dicts), its state theirs."""

    def __init__(self, muon: Muon, adamw: torch.optim.AdamW) -> None:
        self.muon, self.adamw = muon, adamw
        super().__init__(muon.param_groups + adamw.param_groups, {})
        self._share()

    def _share(self) -> None:
        n = len(self.muon.param_groups)
        self.muon.param_groups, self.adamw.param_groups = self.param_groups[:n], self.param_groups[n:]
        self.muon.state = self.adamw.state = self.state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if [optimizer_kind([g]) for g in state_dict["param_groups"]] != [optimizer_kind([g]) for g in
                                                                          self.param_groups]:
            raise ValueError("the saved optimizer is not Muon with AdamW over the same groups")
        super().load_state_dict(state_dict)  # builds new group dicts and a new state: the two share them again
        self._share()

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # noqa: D102
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss


def check_optimizer_settings(cfg: OptimizerSettings | ScheduleSettings) -> None:
    """ValueError (one line for the user) for settings no optimizer or schedule can run with."""
    if cfg.lr <= 0 or cfg.muon_lr <= 0:
        raise ValueError(f"lr ({cfg.lr}) and muon_lr ({cfg.muon_lr}) must be positive")
    if not 0 <= cfg.min_lr_ratio <= 1 or not 0 < cfg.decay_fraction <= 1:
        raise ValueError("min_lr_ratio must be in [0, 1] and decay_fraction in (0, 1]")
    if not 0 <= cfg.muon_momentum < 1 or cfg.muon_weight_decay < 0:
        raise ValueError("muon_momentum must be in [0, 1) and muon_weight_decay at least 0")
    if cfg.muon_ns_steps < 1 or cfg.muon_momentum_warmup < 0:
        raise ValueError("muon_ns_steps must be at least 1 and muon_momentum_warmup at least 0")


def optimizer_kind(param_groups: list[dict[str, Any]]) -> str:
    """"muon" when a group is Muon's (make_optimizer marks it), else "adamw": what --optimizer built these groups
    (live ones or a checkpoint's)."""
    return "muon" if any(group.get("optimizer") == "muon" for group in param_groups) else "adamw"


# ----------------------------------------------------------------------------------------------------------------
# Building the optimizer


def make_optimizer(model: GPT, cfg: OptimizerSettings, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over the whole model, or Muon on the blocks' weight matrices and AdamW on the rest (cfg.optimizer).

    Muon's group is marked `optimizer: "muon"`: the schedule gives it Muon's peak lr and momentum.
    """
    muon_names = muon_parameter_names(model, cfg.muon_params) if cfg.optimizer == "muon" else set()
    decay, no_decay, matrices = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_embedding = name.startswith(("wte", "wpe"))
        if name in muon_names:
            matrices.append(p)
        elif p.dim() >= 2 and (cfg.decay_embeddings or not is_embedding):
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # Fused: one kernel over all parameters, on GPUs and (since PyTorch 2.4) CPUs; on this project's 2-core CPU it
    # steps the tiny model in 5 ms where the default per-parameter loop takes 42 ms (bench/train_cpu.py).
    fused = cfg.fused_adamw and device.type in ("cuda", "cpu")
    adamw = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=fused,
                              foreach=None if fused else True)
    if cfg.optimizer == "adamw":
        return adamw
    muon = Muon([{"params": matrices, "optimizer": "muon"}], lr=cfg.muon_lr, weight_decay=cfg.muon_weight_decay,
                momentum=cfg.muon_momentum, ns_steps=cfg.muon_ns_steps, adjust_lr_fn="match_rms_adamw")
    return MuonAdamW(muon, adamw)


def muon_parameter_names(model: torch.nn.Module, patterns: list[str]) -> set[str]:
    """The parameters whose names match `patterns` (shell-style), each checked to be a 2-D matrix."""
    names = {name for name, _ in model.named_parameters()
             if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)}
    if not names:
        raise UserError(f"muon_params {patterns} match no parameter of the model (names such as "
                         "h.0.attn.c_attn.weight)")
    for name, p in model.named_parameters():
        if name in names and p.dim() != 2:
            raise UserError(f"Muon steps 2-D weight matrices only, and muon_params {patterns} take {name} "
                             f"({p.dim()}-D): leave biases, LayerNorms and such to AdamW")
    return names


# ----------------------------------------------------------------------------------------------------------------
# Schedules


def learning_rate(step: int, cfg: ScheduleSettings, peak: float | None = None) -> float:
    """Linear warm-up to `peak` (cfg.lr by default), then cosine or warm-up-stable-decay down to peak x
    min_lr_ratio at `max_steps`."""
    peak = cfg.lr if peak is None else peak
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    floor = peak * cfg.min_lr_ratio
    if getattr(cfg, "schedule", "cosine") == "wsd":
        decay_steps = max(round(cfg.max_steps * cfg.decay_fraction), 1)
        decay_start = max(cfg.max_steps - decay_steps, cfg.warmup_steps)
        if step < decay_start:
            return peak
        progress_ = min((step - decay_start) / max(cfg.max_steps - decay_start, 1), 1.0)
        return peak + (floor - peak) * progress_
    span = max(cfg.max_steps - cfg.warmup_steps, 1)
    progress_ = min((step - cfg.warmup_steps) / span, 1.0)
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress_))


def muon_momentum(step: int, cfg: ScheduleSettings) -> float:
    """Muon's momentum, rising linearly from 0.85 to cfg.muon_momentum over the first muon_momentum_warmup steps
    (modded-nanogpt's warm-up: less momentum while the gradients change fastest)."""
    if step >= cfg.muon_momentum_warmup:
        return cfg.muon_momentum
    start = min(0.85, cfg.muon_momentum)
    return start + (cfg.muon_momentum - start) * step / cfg.muon_momentum_warmup


def apply_schedule(optimizer: torch.optim.Optimizer, step: int, cfg: ScheduleSettings) -> float:
    """Set every group's lr and Muon's momentum for `step` (peaks from cfg, so a resume may change them); returns
    AdamW's lr."""
    for group in optimizer.param_groups:
        if group.get("optimizer") == "muon":
            group["lr"] = learning_rate(step, cfg, cfg.muon_lr)
            group["momentum"] = muon_momentum(step, cfg)
        else:
            group["lr"] = learning_rate(step, cfg)
    return learning_rate(step, cfg)
