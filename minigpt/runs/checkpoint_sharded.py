"""Checkpoints of sharded (FSDP) runs: every process writes its own share; any number of processes reads them.

    saver = ShardedSaver(optimizer, model)  # in place of checkpoint.BackgroundSaver; every process calls save()
    saver.save(run, model, step, meta, trainer_state, keep_last, is_best)
    load_optimizer_state(optimizer, model, state["optimizer"], ckpt)     # any checkpoint into any optimizer

The shares are written by torch.distributed.checkpoint (DCP) in its Hugging Face layout: one safetensors file per
process and part (model/ for the weights, optimizer/ for the AdamW moments), whose header records where in each
whole tensor the process's rows lie. Reading needs nothing else (JSON headers, never a pickle: no code runs), so a
checkpoint written by 8 processes resumes in 2 or in 1, and `load_model` assembles the whole model from it in one
process for eval, chat, serve and export. What is not a tensor (the optimizer's settings, the data position, RNG
states, the gradient scaler) goes into trainer.pt from rank 0, as in every checkpoint.

A save is a collective: every process writes its shard, then rank 0 writes model.json, trainer.pt and the
checksums of every file, and renames the folder into place, as `checkpoint.save_checkpoint` does: the checks the
project promises (checksums, headers, the newest intact checkpoint used) hold for sharded checkpoints too. A
process that fails to write (a full disk) makes every process raise, and the previous checkpoint stays in place.
Sharded saves are synchronous: each process writes 1/N of the state, in the time DCP takes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from minigpt.common import UserError, write_json
from minigpt.model.optim import optimizer_kind
from minigpt.runs.checkpoint import (
    SHARD_PARTS,
    SHARDED_VERSION,
    checkpoints_dir,
    failed_write,
    fsync_tree,
    model_config_dict,
    new_checkpoint_folder,
    publish_checkpoint,
    unwrap,
)
from minigpt.runs.checksums import CorruptCheckpoint, write_checksums
from minigpt.runs.loading import is_sharded, read_shards


def _rank() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _agree(failed: bool) -> bool:
    """Whether any process failed (every process learns it)."""
    if not dist.is_initialized():
        return failed
    flag = torch.tensor([float(failed)])
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def parameter_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each parameter in the optimizer's order, the order of its state_dict's indices. (Ask before
    the first forward pass: after one, FSDP may hold the root's gathered weights in the parameters' place.)"""
    names = {id(p): n for n, p in unwrap(model).named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


class ShardedSaver:
    """`save` and `wait` as checkpoint.BackgroundSaver's, for a sharded model: called on every process."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> None:
        self.optimizer, self.names = optimizer, parameter_names(model, optimizer)

    def save(self, run: str | os.PathLike, model: torch.nn.Module, step: int, meta: dict[str, Any],
             trainer_state: dict[str, Any], keep_last: int = 3, is_best: bool = False) -> Path:
        from torch.distributed.checkpoint import HuggingFaceStorageWriter, save

        rank, world = _rank()
        model, names = unwrap(model), self.names
        saved = trainer_state["optimizer"]
        moments = {f"{names[i]}.{key}": value for i, state in saved["state"].items() for key, value in state.items()
                   if isinstance(value, torch.Tensor)}
        rest = {i: {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
                for i, state in saved["state"].items()}
        trainer_state = {**trainer_state, "optimizer": {"state": rest, "param_groups": saved["param_groups"]}}
        weights = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied: stored once
        root, name = checkpoints_dir(run), f"step_{step:08d}"
        tmp = root / f".{name}.tmp"
        error: BaseException | None = None
        if rank == 0:
            try:
                new_checkpoint_folder(run, step)
            except Exception as exc:  # noqa: BLE001 - raised below, once every process knows
                error = exc
        if not _agree(error is not None):  # the folder exists on every process's view before anyone writes
            try:
                for part, tensors in zip(SHARD_PARTS, (weights, moments), strict=True):
                    save(tensors, storage_writer=HuggingFaceStorageWriter(str(tmp / part), save_distributed=True))
                for path in tmp.glob(f"*/shard-{rank + 1:05d}-*"):  # this process's files reach the disk
                    with open(path, "rb") as handle:
                        os.fsync(handle.fileno())
            except Exception as exc:  # noqa: BLE001
                error = exc
        if _agree(error is not None):
            raise self._failed(root, name, tmp, error, rank)
        if rank == 0:
            try:
                shards = {part: sorted(p.relative_to(tmp).as_posix() for p in (tmp / part).glob("*.safetensors"))
                          for part in SHARD_PARTS}
                write_json(tmp / "model.json", {"format": "minigpt-checkpoint", "version": SHARDED_VERSION,
                                                "step": step, "model": model_config_dict(model.config),
                                                "shards": {"world": world, **shards}, **meta})
                with open(tmp / "trainer.pt", "wb") as f:
                    torch.save(trainer_state, f)
                write_checksums(tmp)
                fsync_tree(tmp)
                publish_checkpoint(root, name, tmp, keep_last, is_best)
            except Exception as exc:  # noqa: BLE001
                error = exc
        if _agree(error is not None):
            raise self._failed(root, name, tmp, error, rank)
        return root / name

    @staticmethod
    def _failed(root: Path, name: str, tmp: Path, error: BaseException | None, rank: int) -> BaseException:
        if rank == 0:
            error = failed_write(root, name, tmp, error) if error is not None else None
        if error is None:
            return UserError(f"writing checkpoint {name} in {root} failed on another process (its error is in "
                             "that process's output); the previous checkpoint is intact")
        return error

    def wait(self, raise_error: bool = True) -> None:
        """Nothing to wait for: a sharded save is complete when `save` returns."""


# ----------------------------------------------------------------------------------------------------------------
# Reading the optimizer's state, whatever wrote it, into whatever optimizer resumes


def load_optimizer_state(optimizer: torch.optim.Optimizer, model: torch.nn.Module, saved: dict[str, Any],
                         ckpt: Path) -> None:
    """Load `saved` (trainer.pt's "optimizer") and, from a sharded checkpoint, its moments into `optimizer`.

    Any combination works: a whole checkpoint into a whole optimizer (load_state_dict, as ever), a whole one into
    a sharded optimizer (each process keeps its rows of each moment), a sharded one into either (each process reads
    the rows it needs from whichever shards hold them).
    """
    saved_kind, kind = optimizer_kind(saved["param_groups"]), optimizer_kind(optimizer.param_groups)
    if saved_kind != kind:
        raise UserError(f"{ckpt} was trained with --optimizer {saved_kind} and this run asks for --optimizer "
                        f"{kind}: pass --optimizer {saved_kind} to resume it (or --init-from it in a new --run-dir "
                        f"to start {kind} from its weights)")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if is_sharded(ckpt):
        saved = _read_moments(optimizer, model, saved, ckpt)
    elif any(hasattr(p, "device_mesh") for p in params):
        saved = _distributed(saved, params)
    try:
        optimizer.load_state_dict(saved)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise UserError(f"{ckpt}'s optimizer state does not fit this run's optimizer ({exc})") from None


def _distributed(saved: dict[str, Any], params: list[torch.Tensor]) -> dict[str, Any]:
    """A whole optimizer state with each parameter-shaped tensor cut to this process's shard of its parameter."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    state = {}
    for i, entries in saved["state"].items():
        p = params[int(i)]
        state[i] = {k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
                    if isinstance(p, DTensor) and isinstance(v, torch.Tensor) and v.shape == p.shape else v
                    for k, v in entries.items()}
    return {**saved, "state": state}


def _read_moments(optimizer: torch.optim.Optimizer, model: torch.nn.Module, saved: dict[str, Any],
                  ckpt: Path) -> dict[str, Any]:
    """trainer.pt's optimizer settings with the moments of a sharded checkpoint, as load_state_dict takes them:
    shaped like each parameter (sharded where it is), read by DCP from the shards that hold their rows."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    names = parameter_names(model, optimizer)
    index = {name: i for i, name in enumerate(names)}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    targets, owners = {}, {}
    for key, meta in HuggingFaceStorageReader(str(ckpt / "optimizer")).read_metadata().state_dict_metadata.items():
        name, _, kind = key.rpartition(".")  # "h.0.attn.c_attn.weight.exp_avg"
        if name not in index:
            raise CorruptCheckpoint(f"{ckpt / 'optimizer'} holds state for {name!r}, a parameter this model lacks")
        p = params[index[name]]
        dtype = meta.properties.dtype
        targets[key] = torch.zeros_like(p, dtype=dtype) if tuple(meta.size) == tuple(p.shape) else \
            torch.zeros(tuple(meta.size), dtype=dtype, device="cpu")  # a scalar such as AdamW's step count
        owners[key] = (index[name], kind)
    read_shards(ckpt / "optimizer", targets)
    state = {int(i): dict(entries) for i, entries in saved["state"].items()}
    for key, (i, kind) in owners.items():
        state.setdefault(i, {})[kind] = targets[key]
    return {"state": state, "param_groups": saved["param_groups"]}
