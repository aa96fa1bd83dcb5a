"""`minigpt export`: a run's checkpoint as a Hugging Face GPT-2 folder (the work is in hf.py).

    minigpt export runs/chat --format hf exports/chat
    minigpt export runs/tiny --checkpoint best --format hf exports/tiny
"""

from __future__ import annotations

FORMATS = ("hf",)


def add_arguments(parser) -> None:
    parser.add_argument("run", metavar="RUN", help="a run folder or a checkpoint folder")
    parser.add_argument("out", metavar="OUT",
                        help="the folder to write (new, empty, or an earlier export, which is replaced)")
    parser.add_argument("--format", choices=FORMATS, default="hf",
                        help="hf: config.json, model.safetensors, generation_config.json, tokenizer files, README.md "
                             "(default: hf)")
    parser.add_argument("--checkpoint", default="latest", help="latest, best or step_N (default: latest)")


def main(args) -> None:
    from minigpt.hf import export_hf

    out = export_hf(args.run, args.out, args.checkpoint)
    print(f"wrote {out}: " + ", ".join(sorted(p.name for p in out.iterdir())))
