"""`minigpt import`: a run made from a local Hugging Face GPT-2 folder."""

from __future__ import annotations

from minigpt.interop.hf import import_hf
from minigpt.runs.loading import load_run


def add_arguments(parser) -> None:
    parser.add_argument("source", metavar="HF_DIR", help="folder with config.json (model_type gpt2), "
                        "model.safetensors and tokenizer.json or vocab.json + merges.txt")
    parser.add_argument("run", metavar="RUN", help="the run folder to create (must not exist, or be empty)")


def main(args) -> None:
    run = import_hf(args.source, args.run)
    model, tokenizer, _ = load_run(run)  # read back what was written, as every later stage will
    print(f"wrote {run}: {model.num_params():,} parameters, tokenizer {tokenizer.name} ({tokenizer.n_vocab} ids, "
          f"hash {tokenizer.hash}); checkpoint step_00000000")
