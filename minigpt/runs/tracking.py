"""Trackers: metrics.jsonl mirrored to TensorBoard or Weights & Biases, to watch a run from another machine.

    minigpt train --tracker wandb --tracker-project gpt2 --tracker-name 124m-lr6e-4
    WANDB_MODE=offline minigpt train --tracker wandb tensorboard     # no network; `wandb sync` uploads later

`MetricsLogger` (log.py) hands every record it writes to the trackers opened here: the numbers as scalars at the
record's step (the tracker's step axis is the training step), the samples as text, the loss plot as an image, and
the run's config.json (settings and what they resolved to) as the tracker's config. Only rank 0 opens trackers.

Resuming follows metrics.jsonl's rule, that a resumed run logs each step once:
- TensorBoard: each record is flushed as it is written, and the writer of a resumed run opens with `purge_step`
  one past the checkpoint, so readers drop what the stopped run logged after it, and the resumed run logs those
  steps again (as metrics.jsonl is cut back and written again).
- W&B cannot take back a step it holds. The run's id is kept in RUN/tracking.json and a resumed run continues
  that W&B run. It first asks what W&B holds: online, its server (`run.step`); offline, the files of the run's
  earlier processes (`wandb_history`: W&B buffers, so a killed process leaves fewer steps there than it was
  given). It sends the steps W&B lacks up to the checkpoint from metrics.jsonl, then only steps past what W&B
  holds. Those in between are computed again and equal (the resume is exact): W&B's history equals an
  uninterrupted run's.

A tracker that cannot start (package missing, not logged in, no network) is one line and exit 2. One that fails
mid-run (a full disk, a lost service, any exception inside it) is dropped with one warning line: training goes
on, and metrics.jsonl still has every step.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import struct
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from minigpt.common import UserError, print0, write_json

TRACKERS = ("none", "tensorboard", "wandb")
STATE_FILE = "tracking.json"  # in the run folder: the W&B run id, which a resumed run continues
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}  # name: (module, pip name)


def tracker_names(names: Sequence[str], tensorboard: bool = False) -> list[str]:
    """The trackers asked for, in order and once each ("a,b" split; "none" dropped); ValueError for unknown ones.

    `tensorboard` is the older `--tensorboard` setting, the same as naming it."""
    out: list[str] = []
    for name in [part.strip() for item in names for part in item.split(",") if part.strip()]:
        if name not in TRACKERS:
            raise ValueError(f"unknown tracker {name!r}: use {', '.join(TRACKERS)}")
        if name != "none" and name not in out:
            out.append(name)
    if tensorboard and "tensorboard" not in out:
        out.append("tensorboard")
    return out


def check_packages(names: Sequence[str]) -> None:
    """Refuse, in one line, a tracker whose package is not installed (every rank checks: all of them stop)."""
    for name in names:
        module, pip_name = PACKAGES[name]
        try:
            __import__(module)
        except ImportError:
            raise UserError(f"--tracker {name} needs the {pip_name} package: pip install {pip_name} (or pip install "
                            f"'minigpt[track]'), or run without it (--tracker none)") from None


# ----------------------------------------------------------------------------------------------------------------
# The trackers: each turns a record into its own calls


def numbers(record: dict[str, Any]) -> dict[str, float]:
    """The record's finite numbers, step and wall-clock time aside: what becomes a scalar."""
    return {key: value for key, value in record.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("step", "time")
            and math.isfinite(value)}


class TensorBoardTracker:
    name = "tensorboard"

    def __init__(self, run: Path, resume_step: int | None, config: dict[str, Any],
                 previous: list[dict[str, Any]]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.folder = run / "tensorboard"
        earlier = any(self.folder.glob("events.out.tfevents.*"))
        # Readers drop the events at and after purge_step that earlier writers left (steps start at 1): a fresh
        # run hides a stopped earlier attempt's, a resumed one what came after its checkpoint. Each record is
        # flushed as it comes, so everything up to the checkpoint is on disk (the checkpoint is saved after it).
        self.writer = SummaryWriter(str(self.folder), purge_step=0 if resume_step is None else resume_step + 1)
        if resume_step is None or not earlier:
            # four spaces: TensorBoard's text plugin renders Markdown, and this shows the JSON as written
            text = "".join(f"    {line}\n" for line in json.dumps(config, indent=2).splitlines())
            self.writer.add_text("config", text, 0)
        if resume_step is not None and not earlier:  # the tracker is new to a resumed run: give it the history
            for record in previous:
                self.log(record, record["step"])

    def log(self, record: dict[str, Any], step: int) -> None:
        for key, value in numbers(record).items():
            self.writer.add_scalar(key, value, step)
        if record.get("sample"):
            self.writer.add_text("sample", record["sample"], step)
        self.writer.flush()  # a killed run leaves every step it logged: a resume then purges exactly

    def image(self, tag: str, path: Path, step: int) -> None:
        import matplotlib.image

        self.writer.add_image(tag, matplotlib.image.imread(str(path))[..., :3], step, dataformats="HWC")  # (H, W, 3)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

    def where(self) -> str:
        return f"tensorboard --logdir {self.folder}"


class WandbTracker:
    name = "wandb"

    def __init__(self, run: Path, resume_step: int | None, config: dict[str, Any], project: str, name: str,
                 previous: list[dict[str, Any]]) -> None:
        import wandb

        state = read_state(run)
        resumed = resume_step is not None and "wandb" in state
        # A fresh run (or the first with this tracker) is a new W&B run; a resumed one continues the stored one.
        run_id = state["wandb"]["id"] if resumed else secrets.token_hex(4)
        try:
            self.run = wandb.init(project=project, name=name, id=run_id, resume="allow", job_type=config.get("stage"),
                                  dir=os.environ.get("WANDB_DIR") or str(run),
                                  settings=wandb.Settings(silent=True, console="off"))
            self.run.config.update(config, allow_val_change=True)
        except Exception as exc:  # wandb's own errors (no API key, a refused login, no network) and any other
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UserError(f"wandb could not start its run: {first} (or set WANDB_MODE=offline to log locally and "
                            "upload later with wandb sync)") from None
        write_json(run / STATE_FILE, {**state, "wandb": {"id": run_id, "project": project}})
        self.wandb = wandb
        # The last step W&B holds: online, its server's; offline, what the files of the run's earlier processes
        # hold (W&B buffers them, so a killed process leaves fewer steps there than it was given).
        self.held = None
        if resumed:
            self.held = self.run.step - 1 if not self.run.offline else self._held_offline(resume_step)
        # the samples W&B holds, so that each table logged has them all; then the steps it lacks, from metrics.jsonl
        self.samples = [[r["step"], r["sample"]] for r in previous if r.get("sample") and r["step"] <= (self.held or 0)]
        for record in previous:
            if self.held is not None and record["step"] > self.held:
                self.run.log(self._data(record), step=record["step"])

    def _held_offline(self, resume_step: int) -> int:
        try:
            return max((row["_step"] for row in wandb_history(self.folder(), self.run.id)), default=0)
        except Exception as exc:  # a format this reader does not know (a newer wandb): assume the checkpoint's
            print(f"warning: cannot read W&B's earlier files in {self.folder()} ({type(exc).__name__}: {exc}): "
                  f"W&B gets the steps after {resume_step} again", file=sys.stderr, flush=True)
            return resume_step

    def folder(self) -> Path:
        return Path(self.run.dir).parent.parent  # WANDB_DIR/wandb/offline-run-DATE-ID/files -> WANDB_DIR/wandb

    def _data(self, record: dict[str, Any]) -> dict[str, Any]:
        data: dict[str, Any] = numbers(record)
        if record.get("sample"):
            self.samples.append([record["step"], record["sample"]])
            data["samples"] = self.wandb.Table(columns=["step", "sample"], data=list(self.samples))
        return data

    def log(self, record: dict[str, Any], step: int) -> None:
        if self.held is None or step > self.held:  # W&B holds the others from before the resume
            self.run.log(self._data(record), step=step)

    def image(self, tag: str, path: Path, step: int) -> None:
        if self.held is None or step > self.held:
            self.run.log({tag: self.wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        self.run.finish()

    def where(self) -> str:
        if self.run.offline:
            return (f"offline run {self.run.id}, files in {self.folder()}; upload with: wandb sync "
                    f"{self.folder()}/offline-run-*-{self.run.id}")
        return f"run {self.run.id}: {self.run.url}"


def wandb_records(folder: str | os.PathLike, run_id: str) -> Iterator[Any]:
    """The records (`wandb_internal_pb2.Record`: history, config, ...) in the local files of W&B run `run_id` under
    `folder` (RUN/wandb), in the order its processes wrote them; a file cut short ends at its last whole record.

    Each process of a run writes WANDB_DIR/wandb/[offline-]run-DATE-ID/run-ID.wandb: a 7-byte header (":W&B",
    0xBEE1, version), then LevelDB's log format (32 KiB blocks; records of a 7-byte header, crc32, length and
    kind: whole, first, middle or last piece, then the piece), each record a `wandb_internal_pb2.Record`.
    """
    from wandb.proto import wandb_internal_pb2

    paths = Path(folder).glob(f"*run-*-{run_id}/run-{run_id}.wandb")  # [offline-]run-DATE-ID: by DATE
    for path in sorted(paths, key=lambda p: p.parent.name.split("run-", 1)[1]):
        for payload in _log_records(path.read_bytes()):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            yield record


def wandb_history(folder: str | os.PathLike, run_id: str) -> list[dict[str, Any]]:
    """The history rows ({"_step": N, key: value, ...}) of `wandb_records`, in order."""
    rows = []
    for record in wandb_records(folder, run_id):
        if record.WhichOneof("record_type") == "history":
            row = {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in record.history.item}
            rows.append({**row, "_step": record.history.step.num or row.get("_step", 0)})
    return rows


def _log_records(data: bytes, block: int = 32768) -> Iterator[bytes]:
    if data[:4] != b":W&B":
        raise ValueError("not a W&B transaction log")
    pos, parts = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little room left in the block for a header: padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack_from("<IHB", data, pos)
        if kind == 0:  # zeros: the rest of the block is unused
            pos += block - pos % block
            continue
        piece = data[pos + 7 : pos + 7 + length]
        if len(piece) < length:  # cut short: the process died mid-write
            return
        pos += 7 + length
        parts = piece if kind in (1, 2) else parts + piece
        if kind in (1, 4):
            yield parts


def read_state(run: Path) -> dict[str, Any]:
    path = run / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none yet, or damaged: the trackers start new runs
        return {}
    return state if isinstance(state, dict) and isinstance(state.get("wandb", {}), dict) else {}


# ----------------------------------------------------------------------------------------------------------------
# The set of trackers of a run: a failing one is dropped, never the run


class Trackers:
    """Hands each call to every tracker; one that raises is closed, named in one warning line and dropped."""

    def __init__(self, trackers: list[Any]) -> None:
        self.trackers = trackers

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def _each(self, what: str, step: int | None, *args: Any) -> None:
        for tracker in list(self.trackers):
            try:
                getattr(tracker, what)(*args)
            except Exception as exc:
                self.trackers.remove(tracker)
                first = (str(exc).strip().splitlines() or [""])[0][:200]
                at = f" at step {step}" if step is not None else ""
                # tqdm.write: the line goes above the progress bar, not into it
                tqdm.write(f"warning: the {tracker.name} tracker failed{at} ({type(exc).__name__}: {first}): it is "
                           "dropped, training goes on and metrics.jsonl keeps every step", file=sys.stderr)
                if what != "close":
                    with contextlib.suppress(Exception):  # it failed once already; its warning is out
                        tracker.close()

    def log(self, record: dict[str, Any]) -> None:
        if "step" in record:
            self._each("log", record["step"], record, record["step"])

    def image(self, tag: str, path: Path | None, step: int) -> None:
        if path is not None:
            self._each("image", step, tag, Path(path), step)

    def close(self) -> None:
        offline = [t for t in self.trackers if t.name == "wandb" and t.run.offline]
        self._each("close", None)
        for tracker in offline:  # said again at the end: where the files went, and how to upload them
            print0(f"wandb: {tracker.where()}")


def open_trackers(names: Sequence[str], run: str | os.PathLike, *, config: dict[str, Any], project: str,
                  name: str, resume_step: int | None, previous: list[dict[str, Any]]) -> Trackers:
    """The trackers `names` for run folder `run` (rank 0 only: the caller checks).

    `resume_step`: the checkpoint's step when resuming, else None; `previous`: the records metrics.jsonl keeps
    (those up to the checkpoint), which a tracker that lost some of them is given again.
    """
    run = Path(run)
    previous = [r for r in previous if isinstance(r.get("step"), int)]
    check_packages(names)
    opened: list[Any] = []
    try:
        for tracker in sorted(names, key=lambda t: t != "wandb"):  # W&B first: a refused login leaves no files
            try:
                if tracker == "tensorboard":
                    opened.append(TensorBoardTracker(run, resume_step, config, previous))
                elif tracker == "wandb":
                    opened.append(WandbTracker(run, resume_step, config, project, name, previous))
            except OSError as exc:  # a folder it may not write, a full disk
                raise UserError(f"the {tracker} tracker could not start: {exc}") from None
    except BaseException:
        Trackers(opened).close()
        raise
    for tracker in opened:
        print0(f"{tracker.name}: {tracker.where()}")
    return Trackers(opened)
