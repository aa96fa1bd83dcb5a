"""Runs and checkpoints on disk: their layout, and writing them safely (loading.py finds, verifies and reads them).

A run folder:

    RUN/
      config.json            the resolved settings of the stage that made it (train or sft)
      tokenizer.json         the tokenizer the model was trained with (its hash is in every checkpoint)
      metrics.jsonl          one JSON object per logged step and evaluation (log.py)
      loss.png               the loss curves, redrawn at each evaluation
      checkpoints/
        step_00000500/       one checkpoint:
          model.safetensors    weights only (tensors, no code: safe to load from anywhere)
          model.json           format version, ModelConfig, step, tokenizer hash, validation loss
          trainer.pt           optimizer, gradient scaler, RNG states, data position (tensors and plain values;
                               loaded with weights_only=True, so it cannot run code either)
          SHA256SUMS           the sha256 of each file above (`sha256sum -c SHA256SUMS` checks them by hand)
        step_00001000/       one checkpoint of an FSDP run (--parallel fsdp, checkpoint_sharded.py):
          model/shard-*.safetensors       each process's share of the weights, written by that process
          optimizer/shard-*.safetensors   each process's share of the AdamW moments (safetensors headers say where
                                          each share lies: torch.distributed.checkpoint's Hugging Face layout)
          model.json, trainer.pt, SHA256SUMS  as above; model.json lists the shards, SHA256SUMS covers them all
        LATEST                 the name of the newest complete checkpoint
        BEST                   the name of the checkpoint with the lowest validation loss

A checkpoint is written into a temporary folder that is renamed into place only when complete, and LATEST is
replaced atomically afterwards: a crash at any moment leaves the previous checkpoint intact and pointed to. A full
disk stops the write with one line and removes the partial folder; the previous checkpoint stays as it was.

A new run starts only in a folder that holds no files it would replace but an earlier run's own (`check_new_run_dir`).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from minigpt.common import UserError, atomic_path, disk_full, write_json
from minigpt.common.config import to_dict
from minigpt.model.gpt import GPT, ModelConfig
from minigpt.runs.checksums import write_checksums

FORMAT_VERSION = 1
SHARDED_VERSION = 2  # model.json of a sharded checkpoint: earlier versions of minigpt cannot read it, and say so
# What `train` writes at the top of a run folder; a new run replaces them only if an earlier minigpt run wrote them.
RUN_FILES = ("config.json", "metrics.jsonl", "loss.png", "tokenizer.json", "tokenizer.vocab")
SHARD_PARTS = ("model", "optimizer")  # the subfolders of a sharded checkpoint


def unwrap(model: torch.nn.Module) -> GPT:
    """The plain GPT inside DistributedDataParallel and torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):  # DistributedDataParallel
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        else:
            return model


def checkpoints_dir(run: str | os.PathLike) -> Path:
    return Path(run) / "checkpoints"


def save_checkpoint(run: str | os.PathLike, model: torch.nn.Module, step: int, meta: dict[str, Any],
                    trainer_state: dict[str, Any] | None = None, keep_last: int = 3, is_best: bool = False) -> Path:
    """Write checkpoint `step` atomically, point LATEST (and BEST) at it, prune all but the newest `keep_last`.

    A full disk raises a UserError saying the previous checkpoint is intact (the partial folder is removed).
    """
    model = unwrap(model)
    # The head shares the embedding's storage; safetensors stores each tensor once, so it is left out and re-tied.
    weights = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    return _write_checkpoint(run, weights, model.config, step, meta, trainer_state, keep_last, is_best)


def _write_checkpoint(run: str | os.PathLike, weights: dict[str, torch.Tensor], config: ModelConfig, step: int,
                      meta: dict[str, Any], trainer_state: dict[str, Any] | None, keep_last: int,
                      is_best: bool) -> Path:
    root, name, tmp = new_checkpoint_folder(run, step)
    try:
        save_file(weights, tmp / "model.safetensors", metadata={"format": "minigpt", "version": str(FORMAT_VERSION)})
        write_json(tmp / "model.json", {"format": "minigpt-checkpoint", "version": FORMAT_VERSION, "step": step,
                                        "model": model_config_dict(config), **meta})
        if trainer_state is not None:
            with open(tmp / "trainer.pt", "wb") as f:  # a file object: a full disk surfaces as OSError(ENOSPC)
                torch.save(trainer_state, f)
        write_checksums(tmp)
        fsync_tree(tmp)
    except Exception as exc:
        error = failed_write(root, name, tmp, exc)
        if error is exc:
            raise
        raise error from None
    return publish_checkpoint(root, name, tmp, keep_last, is_best)


def new_checkpoint_folder(run: str | os.PathLike, step: int) -> tuple[Path, str, Path]:
    """(checkpoints folder, name, temporary folder) for checkpoint `step`; the temporary folder is empty and new."""
    root = checkpoints_dir(run)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    tmp = root / f".{name}.tmp"
    for stale in root.glob(".step_*.tmp"):  # one save at a time: any other is what a killed process left
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir()
    return root, name, tmp


def failed_write(root: Path, name: str, tmp: Path, exc: BaseException) -> BaseException:
    """Remove a partial checkpoint folder; the error to raise: one line for a full disk, else `exc` itself."""
    shutil.rmtree(tmp, ignore_errors=True)
    if disk_full(exc):
        previous = read_pointer(root / "LATEST")
        kept = f"the previous checkpoint {root / previous} is intact" if previous else "no checkpoint was kept"
        return UserError(f"disk full while writing checkpoint {name} in {root}: {kept}; free some space, then "
                         "continue with --resume")
    return exc


def publish_checkpoint(root: Path, name: str, tmp: Path, keep_last: int, is_best: bool) -> Path:
    """Rename a complete temporary folder into place, point LATEST (and BEST) at it, prune old checkpoints."""
    final = root / name
    if final.exists():  # re-saving a step (e.g. after a resume): replace it as a whole
        old = root / f".{name}.old"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    _fsync_dir(root)  # the rename itself reaches the disk before LATEST names the new folder
    _write_pointer(root / "LATEST", name)
    if is_best:
        _write_pointer(root / "BEST", name)
    _prune(root, keep_last)
    return final


class BackgroundSaver:
    """Checkpoints written on a thread, so a long run pays only for copying its state to host memory.

    `save` copies the weights and the trainer state (optimizer moments included) to the CPU, then writes them
    while training goes on: at GPT-2 124M that is 1.5 GB, several seconds of disk writes and hashing that a
    synchronous save would add to every checkpoint step. One save runs at a time: the next waits for the one before.
    An error in the writer (a full disk) is raised by the next `save` or by `wait`, which the loop calls at its end.
    The files and their order of appearance are those of `save_checkpoint`: LATEST moves only after the folder is
    complete, so a crash during a background write leaves the previous checkpoint in place.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, run: str | os.PathLike, model: torch.nn.Module, step: int, meta: dict[str, Any],
             trainer_state: dict[str, Any] | None = None, keep_last: int = 3, is_best: bool = False) -> None:
        self.wait()
        model = unwrap(model)
        weights = {k: _host_copy(v) for k, v in model.state_dict().items() if k != "lm_head.weight"}
        state = _host_copy(trainer_state)
        args = (run, weights, model.config, step, dict(meta), state, keep_last, is_best)
        self._thread = threading.Thread(target=self._write, args=args, name=f"checkpoint-{step}", daemon=True)
        self._thread.start()

    def _write(self, *args: Any) -> None:
        try:
            _write_checkpoint(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the training thread by wait()
            self._error = exc

    def wait(self, raise_error: bool = True) -> None:
        """Block until the save in flight is on disk; raise its error, if it had one (and `raise_error`)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None and raise_error:
            error, self._error = self._error, None
            raise error


def _host_copy(value: Any) -> Any:
    """A deep copy of tensors (on the CPU) inside dicts, lists and tuples; other values as they are."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True).contiguous()
    if isinstance(value, dict):
        return {k: _host_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_host_copy(v) for v in value)
    return value


def fsync_tree(folder: Path) -> None:
    """Every file under `folder` and its subfolders on disk (before the rename that publishes them)."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        else:
            _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # folders cannot be opened on some platforms (Windows): nothing to sync there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_pointer(path: Path, name: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(name + "\n")


def read_pointer(path: Path) -> str | None:
    """The checkpoint name in LATEST or BEST; None when absent or not a plain folder name (a damaged pointer)."""
    try:
        name = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return name if name and "/" not in name and "\\" not in name and not name.startswith(".") else None


def _prune(root: Path, keep_last: int) -> None:
    keep = {read_pointer(root / "LATEST"), read_pointer(root / "BEST")}
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    for path in steps[: max(len(steps) - keep_last, 0)]:
        if path.name not in keep:
            shutil.rmtree(path, ignore_errors=True)


def model_config_dict(config: ModelConfig) -> dict[str, Any]:
    return to_dict(config)


def check_new_run_dir(run: str | os.PathLike) -> bool:
    """Refuse (UserError) to start a run in a folder where it would replace files minigpt did not write.

    True when the folder holds an earlier run that stopped before its first checkpoint (its config.json says it is
    a minigpt run): those files are the run's own and are replaced. Files of other names are never touched.
    """
    run = Path(run)
    if not run.exists():
        return False
    if not run.is_dir():
        raise UserError(f"{run} exists and is not a folder: choose another --run-dir")
    present = [name for name in RUN_FILES if (run / name).exists()]
    if not present:
        return False
    try:
        config = json.loads((run / "config.json").read_text(encoding="utf-8"))
        ours = isinstance(config, dict) and config.get("stage") in ("train", "sft") and "resolved" in config
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        ours = False
    if not ours:
        raise UserError(f"{run} already holds {', '.join(present)}, not from a minigpt run: choose another --run-dir "
                        "(nothing was changed)")
    return True

