"""`minigpt runs`: compare runs side by side."""

from __future__ import annotations

import json

from minigpt.common import UserError
from minigpt.runs.compare import find_runs, format_table, summarize


def add_arguments(parser) -> None:
    parser.add_argument("paths", nargs="*", default=["runs"], metavar="PATH",
                        help="run folders, or folders searched for runs (default: runs)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON instead of a table")


def main(args) -> None:
    found = find_runs(args.paths)
    if not found:
        raise UserError(f"no runs in {', '.join(map(str, args.paths))} (a run folder holds metrics.jsonl)")
    rows = [summarize(run) for run in found]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_table(rows), end="")
