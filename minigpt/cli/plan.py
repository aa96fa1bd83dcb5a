"""`minigpt plan`: from a budget and a GPU to a training run (the table of plan/plan.py)."""

from __future__ import annotations

import dataclasses
import json
import sys

from minigpt.common import config
from minigpt.plan.plan import PlanConfig, format_plan, plan


def add_arguments(parser) -> None:
    parser.add_argument("--config", help="TOML, YAML or JSON file of settings (flags override it)")
    config.add_arguments(parser, PlanConfig)


def main(args) -> None:
    cfg = config.config_from_args(PlanConfig, args)
    result = plan(cfg)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(json.dumps(dataclasses.asdict(result), indent=1) if cfg.json else format_plan(result, cfg))
