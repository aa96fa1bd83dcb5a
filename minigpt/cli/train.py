"""`minigpt train`: pretraining from the command line, a recipe or a config file."""

from __future__ import annotations

import torch.distributed as dist

from minigpt.common import config as configlib
from minigpt.plan.dry_run import train_dry_run
from minigpt.runs.runtime import setup_runtime
from minigpt.train.data import builds_default_data, ensure_pretraining_data
from minigpt.train.train import TrainConfig, train


def add_arguments(parser) -> None:
    recipes = ", ".join(name for name, _, _ in configlib.list_recipes("train"))
    parser.add_argument("--config", help=f"TOML, YAML or JSON file of settings, a run's config.json (to repeat "
                                         f"it), or a shipped recipe ({recipes}); flags override it")
    parser.add_argument("--list-configs", action="store_true", help="list the shipped recipes and exit")
    parser.add_argument("--dry-run", action="store_true", help="print what the run would do (data, tokens, epochs, "
                        "steps, checkpoints, memory, time) and exit without training")
    configlib.add_arguments(parser, TrainConfig)


def main(args) -> None:
    if args.list_configs:
        print(configlib.format_recipes("train"), end="")
        return
    cfg = configlib.config_from_args(TrainConfig, args, stage="train")
    if args.dry_run:
        print(train_dry_run(cfg, builds_default_data(cfg), args.config), end="")
        return
    try:
        ensure_pretraining_data(cfg, setup_runtime(cfg.device))  # the default shards, built on first use
        train(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
