"""`minigpt prepare`: corpora into token shards (data/prepare.py), or the list of bundled corpora."""

from __future__ import annotations

from minigpt.common import config
from minigpt.data.prepare import PrepareConfig, prepare
from minigpt.text import corpus


def add_arguments(parser) -> None:
    parser.add_argument("--config", help="TOML/YAML/JSON file with prepare settings")
    parser.add_argument("--list", action="store_true", help="list the bundled corpora with their sizes and exit")
    config.add_arguments(parser, PrepareConfig)


def main(args) -> None:
    if args.list:
        print("\n".join(corpus.describe_bundled()))
        return
    prepare(config.config_from_args(PrepareConfig, args))
