"""Where and how a training process runs: its device and place among torchrun's processes, its precision.

    rt = setup_runtime("auto")              # one process, or one of torchrun's (NCCL between GPUs, gloo on CPUs)
    precision = resolve_precision("auto", rt.device)    # bf16 / fp16 with loss scaling / fp32, by the hardware
    with autocast_context(precision, rt.device): ...

Shared by the training loop (train.py), fine-tuning (train/sft.py) and the dry run (plan/dry_run.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time

import torch
import torch.distributed as dist

from minigpt.common import pick_device, print0
from minigpt.model.estimate import gpu_for_device, precision_for_capability
from minigpt.model.gpt import logit_chunk_rows

# ----------------------------------------------------------------------------------------------------------------
# Processes


@dataclasses.dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world: int = 1

    @property
    def distributed(self) -> bool:
        return self.world > 1


def setup_runtime(device_name: str) -> Runtime:
    """One process, or one of torchrun's: NCCL between GPUs, gloo between CPU processes."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Runtime(pick_device(device_name))
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Runtime(device, rank, local_rank, world)


def barrier(rt: Runtime) -> None:
    if rt.distributed:
        dist.barrier()


def minutes_passed(since: float, minutes: float, rt: Runtime) -> bool:
    """Whether `minutes` of wall time (time.monotonic) have passed since `since`. Under torchrun rank 0's clock
    decides for every rank (one broadcast of one number), so all ranks act on it at the same step."""
    due = time.monotonic() - since >= 60 * minutes
    if rt.distributed:
        flag = torch.tensor([float(due)], device=rt.device)
        dist.broadcast(flag, src=0)
        due = bool(flag.item())
    return due


# ----------------------------------------------------------------------------------------------------------------
# Precision and the kernels it selects


def native_bf16(device: torch.device) -> bool:
    """Whether the GPU computes bf16 in hardware: compute capability 8.0 and up (A100, H100, L4, RTX 30xx/40xx).

    `torch.cuda.is_bf16_supported()` also says yes on a V100 or T4, where bf16 is emulated and several times slower
    than fp16, so it cannot decide this.
    """
    return device.type == "cuda" and precision_for_capability(torch.cuda.get_device_capability(device)) == "bf16"


def resolve_precision(name: str, device: torch.device) -> str:
    """`auto`: bf16 where the GPU has it natively, fp16 with loss scaling on older GPUs, fp32 on CPUs and MPS."""
    if name == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if native_bf16(device) else "fp16"
    if name == "bf16" and device.type == "cuda" and not native_bf16(device):
        print0(f"warning: {torch.cuda.get_device_name(device)} has no native bf16 (compute capability "
               f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))}): it is emulated and slow; "
               "--precision fp16 (with loss scaling) is the fast choice on this card")
    return name


def autocast_context(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def loss_chunk_rows(setting: str, device: torch.device, vocab_rows: int) -> int:
    """Positions per chunk of the chunked loss (0: the plain path). Chunks of ~2M logits stay in a CPU's cache."""
    if setting == "off" or (setting == "auto" and device.type != "cpu"):
        return 0
    return logit_chunk_rows(device, vocab_rows)


def peak_flops(device: torch.device) -> float | None:
    """The card's dense bf16 peak (FLOP/s) from model/estimate.py's table, for MFU; None for a CPU or a card it
    lacks."""
    if device.type != "cuda":
        return None
    spec = gpu_for_device(torch.cuda.get_device_name(device))
    return spec.peak_flops if spec is not None else None
