"""`minigpt runs`: runs side by side, read from their metrics.jsonl: steps, tokens, final validation loss and bits
per byte, benchmark scores, time.

    minigpt runs                                  # every run under runs/
    minigpt runs runs/quickstart runs/gpt2-124m   # runs under these folders (or these run folders)
    minigpt runs --json                           # the same numbers, for a script

A run is any folder holding a metrics.jsonl (its stage comes from its config.json). The scores are the run's last
evaluation: validation loss and bits per byte, and the benchmarks `--eval-tasks` scored then. Two times: `wall`,
from the run's start to its last logged line (a pause between a stop and its resume counts), and `training`, the
logged windows' tokens over their measured throughput (evaluations, checkpoints and pauses do not count).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from minigpt.common import UserError
from minigpt.runs.log import read_metrics


def find_runs(paths: list[str | os.PathLike]) -> list[Path]:
    """The run folders (holding metrics.jsonl) at or under each path, in path order, each once."""
    found: dict[Path, None] = {}
    for path in map(Path, paths):
        if not path.exists():
            raise UserError(f"{path} does not exist: give run folders or folders of runs")
        if (path / "metrics.jsonl").is_file():
            found[path] = None
        for metrics in sorted(path.rglob("metrics.jsonl")) if path.is_dir() else []:
            found[metrics.parent] = None
    return list(found)


def _stage(run: Path) -> str:
    try:
        config = json.loads((run / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    return str(config.get("stage", "")) if isinstance(config, dict) else ""


def summarize(run: str | os.PathLike) -> dict[str, Any]:
    """One run's figures from its metrics.jsonl; a figure the log lacks is None."""
    run = Path(run)
    records = [r for r in read_metrics(run) if isinstance(r.get("step"), int)]
    trained = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    last_eval = evals[-1] if evals else {}
    counted = [r for r in trained if "tokens" in r]
    tokens = [r["tokens"] for r in counted]
    # seconds of each logged window: its tokens over its measured throughput (only training counts in either)
    windows = [(r["tokens"] - before) / r["tokens_per_s"] for before, r in zip([0, *tokens], counted, strict=False)
               if r.get("tokens_per_s")]
    times = [r["time"] for r in records if "time" in r]
    wall = times[-1] - times[0] + (windows[0] if windows else 0.0) if times else None
    return {"run": str(run), "stage": _stage(run), "steps": max((r["step"] for r in records), default=0),
            "tokens": tokens[-1] if tokens else None, "loss": trained[-1]["loss"] if trained else None,
            "evaluated_at": last_eval.get("step"), "val_loss": last_eval.get("val_loss"),
            "val_bpb": last_eval.get("val_bpb"),
            "benchmarks": {k: v for k, v in last_eval.items() if "/" in k and not k.endswith("/n")},
            "wall_seconds": wall, "training_seconds": sum(windows) if windows else None}


# ----------------------------------------------------------------------------------------------------------------
# The table


def _count(n: float | None) -> str:
    if n is None:
        return "-"
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= size:
            return f"{n / size:.1f}{suffix}"
    return f"{n:.0f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def format_table(rows: list[dict[str, Any]]) -> str:
    """The runs as one aligned table; a benchmark column for each score any run has."""
    benchmarks = sorted({name for row in rows for name in row["benchmarks"]})
    header = ["run", "stage", "steps", "tokens", "loss", "val loss", "val bpb", *benchmarks, "wall", "training"]
    body = [[row["run"], row["stage"] or "-", f"{row['steps']:,}", _count(row["tokens"]), _number(row["loss"]),
             _number(row["val_loss"]), _number(row["val_bpb"]),
             *(_number(row["benchmarks"].get(name)) for name in benchmarks),
             _duration(row["wall_seconds"]), _duration(row["training_seconds"])] for row in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    # text columns to the left, numbers to the right
    lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths,
                                                                                                      strict=True)))
             for line in [header, *body]]
    return "\n".join(line.rstrip() for line in lines) + "\n"
