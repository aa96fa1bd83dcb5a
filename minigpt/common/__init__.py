"""Small shared pieces: user errors, devices and dtypes, seeding, atomic files, progress bars, rank-0 printing.

Kept deliberately small; anything stage-specific lives in that stage's module.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing file, mismatched artifacts).

    The CLI prints it as one line and exits with status 2; anything else keeps its traceback.
    """


# ----------------------------------------------------------------------------------------------------------------
# Devices, dtypes, seeds


def pick_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA, then Apple's MPS, then the CPU; anything else is passed to `torch.device`."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UserError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for but CUDA is not available: use --device cpu")
    return device


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise UserError(f"unknown dtype {name!r}: use one of {', '.join(DTYPES)}") from None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------------------------
# Distributed helpers (rank 0 prints and writes; the others stay quiet)


def rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """The processes of this run: the process group's size, else torchrun's WORLD_SIZE (a dry run), else one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_held_out(key: str, fraction: float, seed: int, byteorder: Literal["little", "big"] = "little") -> bool:
    """The one split rule of documents and conversations: blake2b of f"{seed}:{key}" as a number in [0, 1) below
    `fraction`. Stable across runs, processes, machines and Python versions (unlike hash()).

    Pretraining documents read the digest little-endian and conversations big-endian, as they always have: every
    held-out set made so far stays the same (tests/test_splits.py pins those of the bundled data).
    """
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, byteorder) / 2**64 < fraction


def is_main_process() -> bool:
    return rank() == 0


def print0(*args: Any, **kwargs: Any) -> None:
    """`print` on rank 0 only."""
    if is_main_process():
        print(*args, **kwargs, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Files written atomically: a crash mid-write never leaves a half file under the final name.


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed over `path`, on failure removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~current_umask())  # mkstemp makes owner-only files; give the usual permissions
    try:
        yield tmp_path
        _fsync(tmp_path)
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically (pretty-printed, trailing newline)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not a JSON file (not UTF-8 text)") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a folder, not a JSON file") from None


def disk_full(exc: BaseException) -> BaseException | None:
    """The error in `exc`'s chain that says the disk (or quota) is full, or None.

    Python raises OSError(ENOSPC); torch.save wraps that OSError in a RuntimeError (kept as its context) and
    safetensors reports it only in its message, so both the chain and the text are looked at.
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return exc
        if any(text in str(exc) for text in ("No space left on device", "Disk quota exceeded")):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def pool_worker_signals() -> None:
    """Signals in a multiprocessing.Pool worker (its initializer calls this): the worker leaves the terminal's and
    `timeout`'s process group, so that Ctrl-C or a SIGTERM sent to the group reaches the main process alone, and
    dies with it (Linux). Before, the signal killed the workers too; an idle worker waits for its next task holding
    the pool's queue lock, one killed there never releases it, and the main process's Pool.terminate() then waited
    on that lock forever: only kill -9 ended `prepare` (issue 32). The main process now ends the pool in order."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # Pool.terminate()'s own SIGTERM, sent once it holds the lock
    os.setpgrp()
    _die_with_parent()


def _die_with_parent() -> None:
    """Exit once the parent process is gone (kill -9 of the main process no longer reaches a worker through the
    process group). A thread polling getppid() once a second: portable, where Linux's PR_SET_PDEATHSIG is not (and
    had no effect in this project's sandbox)."""
    import threading

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="minigpt-parent-watch").start()


# ----------------------------------------------------------------------------------------------------------------
# Progress bars


def progress(total: int | float | None = None, desc: str = "", unit: str = "it", disable: bool | None = None,
             **kwargs: Any):
    """A tqdm bar with rate and ETA, on stderr, silent on ranks other than 0 and when `disable` is true."""
    from tqdm.auto import tqdm

    if disable is None:
        disable = not is_main_process()
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True, file=sys.stderr,
                mininterval=0.5, **kwargs)
