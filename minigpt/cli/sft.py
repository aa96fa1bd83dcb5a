"""`minigpt sft`: fine-tune a pretrained run into a chatbot."""

from __future__ import annotations

import torch

from minigpt.common import config as configlib
from minigpt.plan.dry_run import sft_dry_run
from minigpt.text.conversations import BUNDLED
from minigpt.train.sft import NOT_FOR_SFT, SFTConfig, dataset_facts, finetune


def add_arguments(parser) -> None:
    parser.add_argument("--config", help="TOML, YAML or JSON file of settings, a fine-tuned run's config.json (to "
                                         "repeat it), or a shipped recipe such as gpt2-124m-sft (flags override it)")
    configlib.add_arguments(parser, SFTConfig, skip=NOT_FOR_SFT)
    parser.add_argument("--list", action="store_true", help="list the bundled conversation sets and exit")
    parser.add_argument("--list-configs", action="store_true", help="list the shipped recipes and exit")
    parser.add_argument("--dry-run", action="store_true", help="print what the run would do (conversations, rows, "
                        "steps, epochs, checkpoints, memory, time) and exit without training")


def main(args) -> None:
    if args.list:
        for name, text in BUNDLED.items():
            print(f"{name:<14} {text}")
        return
    if args.list_configs:
        print(configlib.format_recipes("sft"), end="")
        return
    cfg = configlib.config_from_args(SFTConfig, args, stage="sft")
    if args.dry_run:
        print(sft_dry_run(cfg, dataset_facts(cfg)), end="")
        return
    try:
        finetune(cfg)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
