"""`minigpt model`: a model shape's parameters per component and FLOPs per token."""

from __future__ import annotations

import torch

from minigpt.common import config
from minigpt.model.gpt import GPT, ModelConfig
from minigpt.model.shape import parameter_table


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
