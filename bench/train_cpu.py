"""Training throughput on the CPU: our loop (`minigpt train`) against plain hand-written PyTorch loops, same model.

    python bench/train_cpu.py                      # tiny preset, 16 x 256 tokens per step, bundled Wikipedia
    python bench/train_cpu.py --steps 30 --rounds 7
    python bench/train_cpu.py --steps 2 --rounds 1 --data DIR   # a smoke run

Three loops train the same GPT module class from the same initial weights on the same shards, in this process:

  minigpt train        `minigpt.train.train.train` (its defaults: fused AdamW, the chunked head and loss on CPUs), with
                       evaluation and checkpoints moved to the end and left out of the timing
  plain, same tricks   the reference: a nanoGPT-style loop (a random batch sliced from the memory-mapped training
                       shard each step, forward, backward, gradient clipping, AdamW, a learning rate set by hand)
                       given the two one-line settings ours uses: `torch.optim.AdamW(..., fused=True)` and the
                       chunked loss, by calling the model as `model(x, y, chunk_rows=...)`, whose forward pass then
                       computes head and loss with `minigpt.model.gpt.chunked_cross_entropy`
  plain, defaults      the same loop with PyTorch's default AdamW (foreach) and the plain `F.cross_entropy` over
                       the full (B, T, V) logits: what the two settings buy

The loops take turns, each round starting with the next one, so that the machine's slower moments hit all alike.
Each loop's median and best round are printed, and the ratio of ours to each plain loop per round (the median of
those paired ratios is the figure to quote: it is what one round of each, side by side, shows).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from minigpt.data.build import build_shards
from minigpt.data.shards import open_shard, read_meta
from minigpt.model.gpt import GPT, ModelConfig, logit_chunk_rows
from minigpt.model.optim import learning_rate
from minigpt.runs.log import read_metrics
from minigpt.train.train import TrainConfig, train

OURS, SAME, DEFAULTS = "minigpt train", "plain, same tricks", "plain, defaults"


def plain_loop(data: Path, cfg: TrainConfig, steps: int, tricks: bool) -> tuple[float, float]:
    """(tokens/s, last loss) of a nanoGPT-style loop over the training shard; `tricks`: fused AdamW and the
    chunked loss (the same arithmetic up to float rounding: tests/test_bench_references.py checks the losses)."""
    meta = read_meta(data)
    tokens = open_shard(data / meta["splits"]["train"]["shards"][0]["file"])
    torch.manual_seed(cfg.seed)
    model = GPT(ModelConfig.from_preset("tiny", vocab_size=meta["tokenizer"]["n_vocab"])).train()
    # nanoGPT's parameter groups: weight decay on the matrices (embeddings included), none on biases and LayerNorms
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=tricks or None)
    chunk_rows = logit_chunk_rows(torch.device("cpu"), model.config.padded_vocab_size) if tricks else 0
    B, T = cfg.batch_size, model.config.block_size
    rng = np.random.default_rng(0)

    def get_batch() -> tuple[torch.Tensor, torch.Tensor]:
        ix = rng.integers(0, len(tokens) - T - 1, B)
        x = torch.stack([torch.from_numpy(tokens[i : i + T].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(tokens[i + 1 : i + 1 + T].astype(np.int64)) for i in ix])
        return x, y

    x, y = get_batch()
    start = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, cfg)
        loss = model(x, y, chunk_rows=chunk_rows)[1]
        x, y = get_batch()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 10 == 0:
            loss.item()
    last = loss.item()
    return steps * B * T / (time.perf_counter() - start), last


def our_loop(data: Path, cfg: TrainConfig, steps: int, run: Path) -> float:
    """tokens/s that `minigpt train` logs over `steps` steps (one logging window: evaluation and saving come after)."""
    cfg = TrainConfig(**{**cfg.__dict__, "run_dir": str(run), "max_steps": steps, "log_every": steps,
                         "eval_every": steps, "eval_batches": 1, "checkpoint_every": steps, "sample_prompt": ""})
    train(cfg)
    return [r["tokens_per_s"] for r in read_metrics(run) if "tokens_per_s" in r][-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/wiki-bpe8k", help="shards folder (built from bundled wiki if missing)")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per loop and round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; every loop runs once per round")
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size, help="sequences per step")
    parser.add_argument("--no-defaults", action="store_true", help="leave out the plain loop with PyTorch defaults")
    args = parser.parse_args()
    data = Path(args.data)
    cfg = TrainConfig(data=str(data), device="cpu", batch_size=args.batch_size)
    if not (data / "meta.json").exists():
        build_shards(data, cfg.corpus, cfg.vocab_size)
    loops = [OURS, SAME] + ([] if args.no_defaults else [DEFAULTS])
    results: dict[str, list[float]] = {name: [] for name in loops}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name in loops[r % len(loops):] + loops[:r % len(loops)]:
                if name == OURS:
                    results[name].append(our_loop(data, cfg, args.steps, Path(tmp) / f"run{r}"))
                else:
                    results[name].append(plain_loop(data, cfg, args.steps, tricks=name == SAME)[0])
    print(f"\nTraining the tiny preset ({cfg.batch_size} x 256 tokens per step), {args.steps} steps x {args.rounds} "
          f"rounds, taking turns; {torch.get_num_threads()} threads, torch {torch.__version__}; load average "
          f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
    print("| loop | tokens/s, median | best | rounds | ours / this loop: median of rounds | range |")
    print("|---|---:|---:|---|---:|---|")
    ours = results[OURS]
    for name in loops:
        runs = results[name]
        ratios = [a / b for a, b in zip(ours, runs, strict=True)]
        paired = "" if name == OURS else f"{statistics.median(ratios):.2f}x"
        spread = "" if name == OURS else f"{min(ratios):.2f}-{max(ratios):.2f}x"
        print(f"| {name} | {statistics.median(runs):,.0f} | {max(runs):,.0f} | "
              f"{', '.join(f'{v:,.0f}' for v in runs)} | {paired} | {spread} |")
    for name in loops[1:]:
        print(f"ours / {name}: median {statistics.median(ours) / statistics.median(results[name]):.2f}x, "
              f"best {max(ours) / max(results[name]):.2f}x")


if __name__ == "__main__":
    main()
