"""`minigpt export`: a checkpoint as a Hugging Face GPT-2 folder."""

from __future__ import annotations

from minigpt.interop.hf import export_hf

FORMATS = ("hf",)


def add_arguments(parser) -> None:
    parser.add_argument("run", metavar="RUN", help="a run folder or a checkpoint folder")
    parser.add_argument("out", metavar="OUT",
                        help="the folder to write: new, empty, or an earlier export left as it was (its SHA256SUMS "
                             "lists minigpt's files), which is replaced")
    parser.add_argument("--format", choices=FORMATS, default="hf",
                        help="hf: config.json, model.safetensors, generation_config.json, tokenizer files, README.md "
                             "(default: hf)")
    parser.add_argument("--checkpoint", default="latest", help="latest, best or step_N (default: latest)")
    parser.add_argument("--force", action="store_true",
                        help="write into OUT even when it holds other files or edited ones: minigpt's files are "
                             "overwritten, the others kept")


def main(args) -> None:
    out = export_hf(args.run, args.out, args.checkpoint, args.force)
    print(f"wrote {out}: " + ", ".join(sorted(p.name for p in out.iterdir())))
