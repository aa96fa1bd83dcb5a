"""Runs and checkpoints on disk: safe to write, safe to load, complete enough to resume exactly.

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
        LATEST                 the name of the newest complete checkpoint
        BEST                   the name of the checkpoint with the lowest validation loss

A checkpoint is written into a temporary folder that is renamed into place only when complete, and LATEST is
replaced atomically afterwards: a crash at any moment leaves the previous checkpoint intact and pointed to.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from minigpt.common import UserError, atomic_path, read_json, write_json
from minigpt.model import GPT, ModelConfig

FORMAT_VERSION = 1


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
    """Write checkpoint `step` atomically, point LATEST (and BEST) at it, prune all but the newest `keep_last`."""
    model = unwrap(model)
    root = checkpoints_dir(run)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    final = root / name
    tmp = root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    # The head shares the embedding's storage; safetensors stores each tensor once, so it is left out and re-tied.
    weights = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(weights, tmp / "model.safetensors", metadata={"format": "minigpt", "version": str(FORMAT_VERSION)})
    write_json(tmp / "model.json", {"format": "minigpt-checkpoint", "version": FORMAT_VERSION, "step": step,
                                    "model": model_config_dict(model.config), **meta})
    if trainer_state is not None:
        torch.save(trainer_state, tmp / "trainer.pt")
    for f in tmp.iterdir():
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())
    if final.exists():  # re-saving a step (e.g. after a resume): replace it as a whole
        old = root / f".{name}.old"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    _write_pointer(root / "LATEST", name)
    if is_best:
        _write_pointer(root / "BEST", name)
    _prune(root, keep_last)
    return final


def _write_pointer(path: Path, name: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(name + "\n")


def _read_pointer(path: Path) -> str | None:
    return path.read_text().strip() if path.exists() else None


def _prune(root: Path, keep_last: int) -> None:
    keep = {_read_pointer(root / "LATEST"), _read_pointer(root / "BEST")}
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    for path in steps[: max(len(steps) - keep_last, 0)]:
        if path.name not in keep:
            shutil.rmtree(path, ignore_errors=True)


def model_config_dict(config: ModelConfig) -> dict[str, Any]:
    from minigpt.config import to_dict

    return to_dict(config)


def latest_checkpoint(run: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    root = checkpoints_dir(run)
    name = _read_pointer(root / "LATEST")
    if name and (root / name / "model.safetensors").exists():
        return root / name
    return None


def resolve_checkpoint(path: str | os.PathLike, which: str = "latest") -> Path:
    """A run folder (its LATEST or BEST checkpoint) or a checkpoint folder -> the checkpoint folder."""
    path = Path(path)
    if (path / "model.safetensors").exists():
        return path
    if not path.exists():
        raise UserError(f"{path} does not exist: give a run folder or a checkpoint folder")
    root = checkpoints_dir(path)
    if which not in ("latest", "best"):
        named = root / which
        if (named / "model.safetensors").exists():
            return named
        raise UserError(f"{path} has no checkpoint {which!r}")
    name = _read_pointer(root / which.upper())
    if name is None and which == "best":
        name = _read_pointer(root / "LATEST")
    if name is None or not (root / name / "model.safetensors").exists():
        raise UserError(f"{path} holds no checkpoint: train first (minigpt train --run-dir {path})")
    return root / name


def read_checkpoint_meta(ckpt: Path) -> dict[str, Any]:
    meta = read_json(ckpt / "model.json")
    if meta.get("format") != "minigpt-checkpoint" or meta.get("version", 0) > FORMAT_VERSION:
        raise UserError(f"{ckpt} is not a minigpt checkpoint this version can read")
    return meta


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", which: str = "latest",
               dtype: torch.dtype | None = None) -> tuple[GPT, dict[str, Any]]:
    """Load a checkpoint's model (in eval mode) and its metadata. Never executes code from the files."""
    from minigpt.config import from_dict

    ckpt = resolve_checkpoint(path, which)
    meta = read_checkpoint_meta(ckpt)
    config = from_dict(ModelConfig, meta["model"])
    with torch.device("meta"):
        model = GPT(config)
    weights = load_file(ckpt / "model.safetensors", device=str(device))
    weights["lm_head.weight"] = weights["wte.weight"]
    model.load_state_dict(weights, assign=True)
    model.lm_head.weight = model.wte.weight  # assign=True replaced the parameter objects: tie them again
    if dtype is not None:
        model = model.to(dtype)
    meta["checkpoint"] = str(ckpt)
    return model.eval(), meta


def load_trainer_state(ckpt: Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    path = ckpt / "trainer.pt"
    if not path.exists():
        raise UserError(f"{ckpt} has no trainer state to resume from (weights only)")
    return torch.load(path, map_location=device, weights_only=True)


def run_tokenizer_path(run: str | os.PathLike) -> Path:
    """Where a run keeps its tokenizer (a checkpoint folder's run is two levels up)."""
    path = Path(run)
    for candidate in (path, path.parent.parent):
        if (candidate / "tokenizer.json").exists():
            return candidate / "tokenizer.json"
    raise UserError(f"no tokenizer.json found for {path}")


def load_run(path: str | os.PathLike, device: str | torch.device = "cpu", which: str = "latest",
             dtype: torch.dtype | None = None):
    """Model, tokenizer and metadata of a run or checkpoint, checked against each other."""
    from minigpt.tokenizer import Tokenizer

    model, meta = load_model(path, device, which, dtype)
    tokenizer = Tokenizer.load(run_tokenizer_path(Path(meta["checkpoint"])))
    expected = meta.get("tokenizer_hash")
    if expected and tokenizer.hash != expected:
        raise UserError(f"the tokenizer beside {path} (hash {tokenizer.hash}) is not the one the model was "
                        f"trained with ({expected})")
    return model, tokenizer, meta
