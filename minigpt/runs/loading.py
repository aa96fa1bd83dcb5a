"""Finding, verifying and reading checkpoints: a run folder or a checkpoint folder -> a model, its tokenizer, its
trainer state (checkpoint.py writes them, and describes the layout).

Loading verifies before it reads: the checksums where SHA256SUMS exists (checkpoints written before it existed
still load), and the structure always (a safetensors header that describes the file's real size, valid JSON, a
readable trainer.pt). A run folder resolves to its newest intact checkpoint: when LATEST (or BEST) names a damaged
one, `resolve_checkpoint` says so in one line and falls back to the next, so `train --resume`, `eval`, `chat`,
`serve` and `export` all get the same fallback. A checkpoint folder named explicitly is used as it is or refused.
A sharded checkpoint loads into one process as a whole model (`load_model` assembles its shards), so every stage
reads it as it reads any other; resuming reads each process's share at whatever number of processes.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from minigpt.common import UserError, print0, read_json
from minigpt.common.config import from_dict
from minigpt.model.gpt import GPT, ModelConfig
from minigpt.runs.checkpoint import SHARD_PARTS, SHARDED_VERSION, checkpoints_dir, read_pointer
from minigpt.runs.checksums import CHECKSUMS, CorruptCheckpoint, file_sha256
from minigpt.runs.checksums import read_checksums as _read_checksums
from minigpt.text.tokenizer import Tokenizer

# ----------------------------------------------------------------------------------------------------------------
# Checksums and structure: what makes a checkpoint intact


def verify_checkpoint(ckpt: Path, need_trainer: bool = False) -> bool:
    """Raise CorruptCheckpoint (one line naming the file) unless the files a load needs are intact; whether they are
    verified (False: no SHA256SUMS, so damage inside the tensor data could pass unseen).

    The structure is checked always (cheap: headers only); checksums too where SHA256SUMS exists.
    `need_trainer`: trainer.pt too (resuming needs it, loading the model does not), unpickled as load_trainer_state
    will (weights_only, tensors memory-mapped, so cheap), so that one that would run code is skipped like a damaged
    one.
    """
    if is_sharded(ckpt):
        needed = _sharded_files(ckpt, need_trainer)
    else:
        needed = ["model.json", "model.safetensors"] + (["trainer.pt"] if need_trainer else [])
    for name in needed:
        if not (ckpt / name).is_file():
            if name == "trainer.pt":
                raise CorruptCheckpoint(f"{ckpt} has no trainer state to resume from (weights only: start a new run "
                                        "from it with --init-from)")
            raise CorruptCheckpoint(f"{ckpt} is incomplete: {name} is missing")
    # Structure first: it names the damage more precisely than a checksum can ("cut short").
    for name in needed:
        if name.endswith(".safetensors"):
            _check_safetensors(ckpt / name)
    try:
        read_checkpoint_meta(ckpt)
    except UserError as exc:
        raise CorruptCheckpoint(str(exc)) from None
    if need_trainer:
        try:
            zipfile.ZipFile(ckpt / "trainer.pt").close()  # torch.save writes a zip: a cut file has no directory
        except (zipfile.BadZipFile, OSError):
            raise CorruptCheckpoint(f"{ckpt / 'trainer.pt'} is corrupt: cut short or not written by torch.save") \
                from None
        load_trainer_state(ckpt, "cpu", mmap=True)  # raises CorruptCheckpoint for code or damage
    sums = _read_checksums(ckpt)
    if sums is None:
        return False
    for name in needed:
        if name not in sums:
            raise CorruptCheckpoint(f"{ckpt / CHECKSUMS} has no checksum for {name}")
        if file_sha256(ckpt / name) != sums[name]:
            raise CorruptCheckpoint(f"{ckpt / name} is corrupt: its sha256 differs from the one in {CHECKSUMS} "
                                    "(the file changed after it was written)")
    return True


def unverified_note(ckpt: Path) -> str:
    return (f"{ckpt} has no {CHECKSUMS}: its weights are unverified (damage inside them could go unnoticed; "
            "checkpoints minigpt writes carry one)")


def is_sharded(ckpt: Path) -> bool:
    """A checkpoint written by an FSDP run: its weights are shards in model/, not one model.safetensors."""
    return (ckpt / "model").is_dir()


def is_checkpoint(folder: Path) -> bool:
    """Whether a step_* folder holds a checkpoint's weights, whole or sharded (not verified)."""
    return (folder / "model.safetensors").exists() or is_sharded(folder)


def _sharded_files(ckpt: Path, need_trainer: bool) -> list[str]:
    """The files of a sharded checkpoint a load needs: those model.json lists. Its reader takes every .safetensors
    file in a part's folder, so a folder holding one model.json does not list is damaged too."""
    if not (ckpt / "model.json").is_file():
        raise CorruptCheckpoint(f"{ckpt} is incomplete: model.json is missing")
    needed = ["model.json"]
    for part in SHARD_PARTS[: 2 if need_trainer else 1]:
        try:
            listed = read_checkpoint_meta(ckpt)["shards"][part]
        except UserError as exc:
            raise CorruptCheckpoint(str(exc)) from None
        except (KeyError, TypeError):
            listed = None
        if not listed or not all(isinstance(n, str) and n.startswith(f"{part}/") and ".." not in n for n in listed):
            raise CorruptCheckpoint(f"{ckpt / 'model.json'} is damaged: it does not list the {part} shards")
        extra = sorted({p.relative_to(ckpt).as_posix() for p in (ckpt / part).glob("*.safetensors")} - set(listed))
        if extra:
            raise CorruptCheckpoint(f"{ckpt / extra[0]} is not one of the shards model.json lists")
        needed += listed
    return needed + (["trainer.pt"] if need_trainer else [])


def _check_safetensors(path: Path) -> None:
    """The header parses and describes exactly the bytes the file holds (a cut or padded file does not)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= size - 8:
            raise CorruptCheckpoint(f"{path} is corrupt: its header is cut short or garbled ({size:,} bytes)")
        try:
            header = json.loads(f.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, KeyError, TypeError, IndexError):
            raise CorruptCheckpoint(f"{path} is corrupt: its header is garbled") from None
    if not isinstance(end, int):
        raise CorruptCheckpoint(f"{path} is corrupt: its header is garbled")
    if 8 + n + end != size:
        raise CorruptCheckpoint(f"{path} is corrupt: it holds {size:,} bytes where its header describes "
                                f"{8 + n + end:,} (cut short or overwritten)")


# ----------------------------------------------------------------------------------------------------------------
# Finding: a run folder -> its newest intact checkpoint


def latest_checkpoint(run: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run (LATEST, or the newest step_* folder if LATEST is lost), or None.

    Not verified (see resolve_checkpoint): this answers "does the run hold checkpoints", cheaply.
    """
    root = checkpoints_dir(run)
    name = read_pointer(root / "LATEST")
    if name and is_checkpoint(root / name):
        return root / name
    steps = sorted(p for p in root.glob("step_*") if is_checkpoint(p)) if root.is_dir() else []
    return steps[-1] if steps else None


def resolve_checkpoint(path: str | os.PathLike, which: str = "latest", need_trainer: bool = False) -> Path:
    """A run folder (its LATEST or BEST checkpoint) or a checkpoint folder -> the checkpoint folder, verified.

    From a run folder, a damaged checkpoint is reported in one line and the newest intact one is used instead;
    a checkpoint folder, or one named with `which` (step_N), that is damaged raises CorruptCheckpoint.
    `need_trainer` also requires an intact trainer.pt (resuming).
    """
    path = Path(path)
    if is_checkpoint(path) or (path / "model.json").exists():
        return _verified(path, need_trainer)
    if not path.exists():
        raise UserError(f"{path} does not exist: give a run folder or a checkpoint folder")
    root = checkpoints_dir(path)
    if which not in ("latest", "best"):
        named = root / which
        if is_checkpoint(named) or (named / "model.json").exists():
            return _verified(named, need_trainer)
        raise UserError(f"{path} has no checkpoint {which!r}")
    pointed = read_pointer(root / which.upper())
    if pointed is None and which == "best":
        pointed = read_pointer(root / "LATEST")
    steps = sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True) if root.is_dir() else []
    candidates = ([root / pointed] if pointed else []) + [p for p in steps if p.name != pointed]
    problems: list[str] = []
    unverified: Path | None = None  # the newest intact checkpoint without checksums, used if no verified one
    for ckpt in candidates:
        try:
            verified = verify_checkpoint(ckpt, need_trainer)
        except CorruptCheckpoint as exc:
            problems.append(str(exc))
            continue
        if not verified and need_trainer:  # resuming: an older checkpoint that is verified is worth more
            unverified = unverified or ckpt
            continue
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            print0(f"warning: {problems[0]}{more}: using the newest intact checkpoint, {ckpt}", file=sys.stderr)
        if unverified is not None:
            print0(f"warning: {unverified_note(unverified)}: resuming from the newest verified checkpoint, {ckpt}",
                   file=sys.stderr)
        elif not verified:
            print0(f"warning: {unverified_note(ckpt)}", file=sys.stderr)
        return ckpt
    if unverified is not None:
        print0(f"warning: {unverified_note(unverified)}; no checkpoint of {path} is verified, so it is used",
               file=sys.stderr)
        return unverified
    if problems:
        raise CorruptCheckpoint(f"{path} holds no intact checkpoint: {'; '.join(problems)}")
    raise UserError(_no_checkpoint(path))


def _no_checkpoint(path: Path) -> str:
    """Why a folder without checkpoints cannot be loaded: a run that has not saved one yet, or no run at all."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        config = None
    stage = config.get("stage") if isinstance(config, dict) else None
    if stage in ("train", "sft") or (stage is None and (path / "checkpoints").is_dir()):
        return f"{path} holds no checkpoint yet: train first (minigpt {stage or 'train'} --run-dir {path})"
    if isinstance(config, dict) and config.get("model_type"):
        return (f"{path} is a Hugging Face model folder, not a minigpt run: make a run from it with "
                f"minigpt import {path} RUN")
    what = "its config.json is not a minigpt run's" if config is not None or (path / "config.json").exists() else \
        "no config.json, no checkpoints/"
    return f"{path} is not a minigpt run or checkpoint folder ({what}): give a run folder or a checkpoint folder"


def _verified(ckpt: Path, need_trainer: bool) -> Path:
    try:
        verified = verify_checkpoint(ckpt, need_trainer)
    except CorruptCheckpoint as exc:
        raise CorruptCheckpoint(f"{exc}; name another checkpoint, or give the run folder to use its newest intact "
                                "one") from None
    if not verified:
        print0(f"warning: {unverified_note(ckpt)}", file=sys.stderr)
    return ckpt


# ----------------------------------------------------------------------------------------------------------------
# Reading: the model, the trainer state, the tokenizer


def read_checkpoint_meta(ckpt: Path) -> dict[str, Any]:
    meta = read_json(ckpt / "model.json")
    if not isinstance(meta, dict) or meta.get("format") != "minigpt-checkpoint" \
            or not isinstance(meta.get("version", 0), int) or meta.get("version", 0) > SHARDED_VERSION:
        raise UserError(f"{ckpt} is not a minigpt checkpoint this version can read")
    return meta


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", which: str = "latest",
               dtype: torch.dtype | None = None) -> tuple[GPT, dict[str, Any]]:
    """Load a checkpoint's model (in eval mode) and its metadata. Never executes code from the files."""
    ckpt = resolve_checkpoint(path, which)
    meta = read_checkpoint_meta(ckpt)
    config = from_dict(ModelConfig, meta["model"])
    with torch.device("meta"):
        model = GPT(config)
    if is_sharded(ckpt):  # the whole weights, assembled in this process from every process's shard
        weights = {k: torch.empty(v.shape, device=device) for k, v in model.state_dict().items() if "lm_head" not in k}
        read_shards(ckpt / "model", weights)
    else:
        try:
            weights = load_file(ckpt / "model.safetensors", device=str(device))
        except SafetensorError as exc:
            raise CorruptCheckpoint(f"{ckpt / 'model.safetensors'} is unreadable ({exc})") from None
    # Without checksums (checkpoints from before them) garbage in the tensor data shows only as non-finite values.
    bad = next((k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise CorruptCheckpoint(f"{ckpt / 'model.safetensors'} is corrupt: {bad} holds NaN or infinite values")
    if "wte.weight" not in weights:
        raise CorruptCheckpoint(f"{ckpt / 'model.safetensors'} has no token embedding (wte.weight)")
    weights["lm_head.weight"] = weights["wte.weight"]
    try:
        model.load_state_dict(weights, assign=True)
    except RuntimeError as exc:  # names or shapes that do not fit model.json's configuration
        first = str(exc).strip().splitlines()
        raise CorruptCheckpoint(f"{ckpt}: the weights do not fit the model in model.json "
                                f"({first[1].strip() if len(first) > 1 else first[0]})") from None
    model.lm_head.weight = model.wte.weight  # assign=True replaced the parameter objects: tie them again
    if dtype is not None:
        model = model.to(dtype)
    meta["checkpoint"] = str(ckpt)
    meta["verified"] = (ckpt / CHECKSUMS).is_file()  # resolve_checkpoint checked the sums where there are any
    return model.eval(), meta


def read_shards(folder: Path, targets: dict[str, torch.Tensor]) -> None:
    """Fill `targets` (whole tensors, or this process's shards of them) from the shards in `folder`.

    torch.distributed.checkpoint's Hugging Face reader learns from the safetensors headers alone (JSON: no pickle,
    so no code runs) where each shard's rows belong, and copies into each target the rows it covers.
    """
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(targets, storage_reader=HuggingFaceStorageReader(str(folder)), no_dist=True)
    except Exception as exc:  # noqa: BLE001 - DCP wraps every reading error (names, shapes, files) in its own
        lines = str(exc).strip().splitlines()
        raise CorruptCheckpoint(f"{folder}: its shards do not fit this model "
                                f"({lines[-1].strip() if lines else type(exc).__name__})") from None


def load_trainer_state(ckpt: Path, device: str | torch.device = "cpu", mmap: bool = False) -> dict[str, Any]:
    """Optimizer, scaler, RNG and data state, loaded with weights_only=True: tensors and plain values, never code.
    `mmap`: tensors mapped rather than read (checking the file, cheaply)."""
    path = ckpt / "trainer.pt"
    if not path.exists():
        raise UserError(f"{ckpt} has no trainer state to resume from (weights only)")
    try:
        return torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        # torch's message suggests weights_only=False, i.e. running whatever code the file holds: never.
        raise CorruptCheckpoint(f"{path} holds objects other than tensors and plain values: refused, since loading "
                                "it could run code; resume from a checkpoint minigpt wrote") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CorruptCheckpoint(f"{path} is corrupt ({first})") from None


def check_tokenizer(meta: dict[str, Any], tokenizer: Any) -> None:
    """A checkpoint continued on data of another tokenizer is refused (its token ids would mean other words)."""
    expected = meta.get("tokenizer_hash")
    if expected and expected != tokenizer.hash:
        raise UserError(f"the checkpoint was trained with tokenizer {expected}, but the data uses {tokenizer.hash}: "
                        "prepare the data with the checkpoint's tokenizer")


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
    model, meta = load_model(path, device, which, dtype)
    tokenizer = Tokenizer.load(run_tokenizer_path(Path(meta["checkpoint"])))
    expected = meta.get("tokenizer_hash")
    if expected and tokenizer.hash != expected:
        raise UserError(f"the tokenizer beside {path} (hash {tokenizer.hash}) is not the one the model was "
                        f"trained with ({expected})")
    return model, tokenizer, meta
