"""`minigpt eval`: score a run (eval/evaluate.py) and write its report."""

from __future__ import annotations

from minigpt.common import config
from minigpt.eval.evaluate import EvalConfig, evaluate


def add_arguments(parser) -> None:
    parser.add_argument("run", help="run folder or checkpoint folder (an imported GPT-2 is a run folder too)")
    parser.add_argument("--config", help="TOML, YAML or JSON file of settings (flags override it)")
    config.add_arguments(parser, EvalConfig, skip=("run",))


def main(args) -> None:
    overrides = config.overrides_from_args(args, EvalConfig)
    cfg = config.resolve(EvalConfig, getattr(args, "config", None), {**overrides, "run": args.run})
    evaluate(cfg)
