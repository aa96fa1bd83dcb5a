"""`minigpt model`: a GPT-2 shape's parameters per component and its training FLOPs per token.

    minigpt model --preset gpt2
    minigpt model --preset tiny --n-layer 8 --seq-len 512

Nothing is allocated: the model is built on the meta device, so even gpt2-xl costs no memory.
"""

from __future__ import annotations

import torch

from minigpt.common import config
from minigpt.model.gpt import GPT, ModelConfig


def parameter_table(model: GPT) -> list[tuple[str, int]]:
    """Parameters per component (embeddings, attention, MLP, LayerNorms), GPT-2 counting."""
    cfg = model.config
    groups = {"token embedding (tied head)": cfg.vocab_size * cfg.n_embd, "position embedding": 0,
              "attention": 0, "MLP": 0, "LayerNorms": 0}
    for name, p in model.named_parameters():
        if name.startswith("wpe"):
            groups["position embedding"] += p.numel()
        elif ".attn." in name:
            groups["attention"] += p.numel()
        elif ".mlp." in name:
            groups["MLP"] += p.numel()
        elif "ln_" in name:
            groups["LayerNorms"] += p.numel()
    return list(groups.items())


def add_arguments(parser) -> None:
    parser.add_argument("--config", help="TOML/YAML/JSON file with model settings")
    config.add_arguments(parser, ModelConfig)
    parser.add_argument("--seq-len", type=int, default=None, help="context length for the FLOPs estimate "
                        "(default: block_size)")


def main(args) -> None:
    cfg = config.config_from_args(ModelConfig, args)
    with torch.device("meta"):  # shapes only: even gpt2-xl costs no memory
        model = GPT(cfg)
    seq = args.seq_len or cfg.block_size
    total = model.num_params()
    print(f"shape: {cfg.n_layer} layers, {cfg.n_head} heads, width {cfg.n_embd}, context {cfg.block_size}, "
          f"vocabulary {cfg.vocab_size} (embedding rows {cfg.padded_vocab_size})")
    for name, count in parameter_table(model):
        print(f"  {name:<28} {count:>15,}  {100 * count / total:5.1f}%")
    print(f"  {'total':<28} {total:>15,}")
    print(f"  {'non-embedding':<28} {model.num_params(embeddings=False):>15,}")
    print(f"training FLOPs per token at context {seq}: {model.flops_per_token(seq):,} "
          f"(6N + 12 L C T, N without wpe)")
