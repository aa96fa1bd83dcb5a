"""Metrics: one JSON object per line in `metrics.jsonl`, mirrored to trackers when asked; loss curves as PNG.

Every stage logs through `MetricsLogger`; reports and plots read the JSONL file, never the stage's internals.
Trackers (TensorBoard, Weights & Biases: tracking.py) get each record after the file does. Only rank 0 writes;
other ranks get a logger that does nothing.

A line is appended with one write and cut back off if that write fails (a full disk), so the file holds whole
records only. A line torn anyway (the machine lost power mid-write, or an older version hit a full disk) is skipped
by `read_metrics` and dropped, with one line saying so, when a run resumes.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from minigpt.common import atomic_path, is_main_process
from minigpt.runs.tracking import Trackers, open_trackers


class MetricsLogger:
    """Append records to RUN/metrics.jsonl, and hand them to the trackers named (tracking.py)."""

    def __init__(self, run: str | os.PathLike, resume_step: int | None = None, trackers: Sequence[str] = (), *,
                 config: dict[str, Any] | None = None, project: str = "minigpt", name: str = "") -> None:
        self.enabled = is_main_process()
        self.path = Path(run) / "metrics.jsonl"
        self.trackers = Trackers([])
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept: list[dict[str, Any]] = []
        if resume_step is not None:
            kept = self.truncate_after(resume_step)
        elif self.path.exists():
            self.path.unlink()
        if trackers:
            self.trackers = open_trackers(trackers, run, config=config or {}, project=project,
                                          name=name or str(run), resume_step=resume_step, previous=kept)

    def truncate_after(self, step: int) -> list[dict[str, Any]]:
        """Drop records past `step` (a resumed run logs those steps again) and any torn line, saying so; returns
        the records kept."""
        if not self.path.exists():
            return []
        records, torn = _parse(self.path.read_bytes())
        kept = [line for line, record in records if record.get("step", 0) <= step]
        if torn:
            first = torn[0][1][:60]
            print(f"{self.path}: dropped {len(torn)} unreadable line{'s' if len(torn) > 1 else ''} (line "
                  f"{torn[0][0]}: {first!r}), left by a write that was cut short", file=sys.stderr, flush=True)
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        return [json.loads(line) for line in kept]

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {**record, "time": round(time.time(), 3)}
        data = (json.dumps(record) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            end = os.lseek(fd, 0, os.SEEK_END)
            try:
                done = 0
                while done < len(data):
                    done += os.write(fd, data[done:])
            except OSError:
                os.ftruncate(fd, end)  # a full disk must not leave half a record behind
                raise
        finally:
            os.close(fd)
        self.trackers.log(record)

    def image(self, tag: str, path: str | os.PathLike | None, step: int) -> None:
        """A picture (the loss plot) for the trackers, at `step`."""
        if self.enabled and path is not None:
            self.trackers.image(tag, Path(path), step)

    def close(self) -> None:
        self.trackers.close()


def _parse(raw: bytes) -> tuple[list[tuple[str, dict[str, Any]]], list[tuple[int, str]]]:
    """(line, record) for each whole record; (line number, text) for each line that is not one."""
    records, torn = [], []
    for lineno, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            records.append((line, record))
        else:
            torn.append((lineno, line))
    return records, torn


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (or of the one in a run folder); torn lines are skipped."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.exists():
        return []
    return [record for _, record in _parse(path.read_bytes())[0]]


def plot_loss_curves(metrics_path: str | os.PathLike, png_path: str | os.PathLike, title: str = "") -> Path | None:
    """Training loss (and validation loss where evaluated) against step, written atomically as a PNG."""
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1, alpha=0.8)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation loss", linewidth=1.5, markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats per token)")
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png_path = Path(png_path)
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return png_path


# ----------------------------------------------------------------------------------------------------------------
# How a record reads in the terminal


def evaluation_line(record: dict[str, Any]) -> str:
    scores = [f"{k} {v:.4f}" for k, v in record.items() if "/" in k and not k.endswith("/n")]
    return (f"step {record['step']}: validation loss {record['val_loss']:.4f}"
            + (f", bits per byte {record['val_bpb']:.4f}" if "val_bpb" in record else "")
            + (f"\n  benchmarks: {', '.join(scores)}" if scores else "")
            + (f"\n  sample: {record['sample']!r}" if record.get("sample") else ""))


def summary_line(run: Path, step: int, metrics: dict[str, float]) -> str:
    parts = [f"{run}: step {step}", f"validation loss {metrics['val_loss']:.4f}"]
    if "val_bpb" in metrics:
        parts.append(f"bits per byte {metrics['val_bpb']:.4f}")
    text = ", ".join(parts)
    if metrics.get("sample"):
        text += f"\nsample: {metrics['sample']}"
    return text
