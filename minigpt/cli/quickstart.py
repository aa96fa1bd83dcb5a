"""`minigpt quickstart`: the whole pipeline on a CPU in minutes."""

from __future__ import annotations

from minigpt.common import config as configlib
from minigpt.quickstart.quickstart import QuickstartConfig, quickstart


def add_arguments(parser) -> None:
    parser.add_argument("--config", help="TOML, YAML or JSON file of settings (flags override it)")
    configlib.add_arguments(parser, QuickstartConfig)


def main(args) -> None:
    quickstart(configlib.config_from_args(QuickstartConfig, args))
