"""The `minigpt` command: parses the stage name and hands the rest of the command line to that stage.

Each stage's command is a module of this package named as the stage (`minigpt train` is cli/train.py; `minigpt
import` is cli/import_.py, `import` being a Python keyword), with `add_arguments(parser)` and `main(args)`. A
command parses its flags into its stage's typed settings, calls the library (the sub-packages beside this one)
and prints; the library never parses a command line. Modules are imported only when their stage runs, so
`minigpt --help` is instant and one stage's extra dependencies (FastAPI, transformers) never burden another.
"""

from __future__ import annotations

import argparse
import importlib
import keyword
import os
import sys
from pathlib import Path
from typing import NoReturn

from minigpt.common import UserError, disk_full

# (command, one line of help), in the order data flows through the project; the command is module cli/COMMAND.py.
STAGES: list[tuple[str, str]] = [
    ("quickstart", "the whole pipeline on a CPU in minutes: data, pretraining, chat tuning"),
    ("model", "show a model shape: parameters per component and FLOPs per token"),
    ("tokenizer", "train a byte-level BPE vocabulary; encode, decode, measure compression"),
    ("plan", "from a budget and a GPU to a training run: size, batch, memory, hours, cost, loss"),
    ("prepare", "tokenize corpora into binary token shards for training"),
    ("train", "pretrain a GPT-2 on token shards (the tiny preset on bundled Wikipedia by default)"),
    ("eval", "score a run: validation loss, perplexity, bits per byte, benchmarks, recall"),
    ("runs", "compare runs side by side: steps, tokens, validation loss, bits per byte, benchmarks"),
    ("sft", "fine-tune a pretrained run into a chatbot on conversations"),
    ("chat", "talk to a fine-tuned model in the terminal"),
    ("serve", "an OpenAI-compatible HTTP server and web chat for a run (needs minigpt[serve])"),
    ("sample", "continue a prompt with any run, pretrained or fine-tuned"),
    ("inspect", "look inside a model: attention maps, per-token surprise, the logit lens"),
    ("export", "a checkpoint as a Hugging Face GPT-2 folder: weights, tokenizer, chat template"),
    ("import", "make a run from a local Hugging Face GPT-2 folder, e.g. OpenAI's GPT-2 124M"),
]


def command_module(stage: str) -> str:
    """The module of this package that is `minigpt STAGE`: the stage's name, with a trailing _ for a Python
    keyword (`import` -> import_)."""
    return f"{stage}_" if keyword.iskeyword(stage) else stage


def _top_parser() -> argparse.ArgumentParser:
    width = max(len(name) for name, _ in STAGES)
    stages = "\n".join(f"  {name:<{width}}  {help_}" for name, help_ in STAGES)
    parser = argparse.ArgumentParser(
        prog="minigpt",
        description="GPT-2 from scratch: tokenizer, data, pretraining, evaluation, chat fine-tuning, serving.",
        epilog=f"stages:\n{stages}\n\nRun `minigpt STAGE --help` for a stage's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("stage", choices=[name for name, _ in STAGES], metavar="STAGE", help="what to run")
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


class OneLineErrors(argparse.ArgumentParser):
    """A bad flag or value is one line and exit 2, as every other user error (argparse would print the whole
    usage, dozens of lines, above it)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (`{self.prog} --help` lists the options)\n")


def main(argv: list[str] | None = None) -> int:
    """Run one stage; its exit status. A reader that closed our stdout (`minigpt plan ... | head -1`) ends the stage
    quietly with 141, as a Unix tool killed by SIGPIPE does, instead of a BrokenPipeError traceback."""
    try:
        return _main(argv)
    except BrokenPipeError:
        # Python flushes stdout again at exit, which would raise once more: point it at /dev/null first.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    top = _top_parser()
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0 if argv else 2
    parsed = top.parse_args(argv[:1])
    name, help_ = next(s for s in STAGES if s[0] == parsed.stage)
    module = importlib.import_module(f"minigpt.cli.{command_module(name)}")
    parser = OneLineErrors(prog=f"minigpt {name}", description=help_,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    try:
        return int(module.main(args) or 0)
    except UserError as exc:
        print(f"minigpt {name}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        raise  # (an OSError: not a full disk) handled in main()
    except Exception as exc:
        full = disk_full(exc)
        if full is None:
            raise
        # A backstop: stages that write much (checkpoints) say more themselves. Files are replaced atomically, so
        # what was there before the failed write is still there.
        where = f" writing into {Path(full.filename).parent}" if isinstance(full, OSError) and full.filename else ""
        print(f"minigpt {name}: error: disk full{where}: free some space, then run the command again",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"minigpt {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
