"""Training throughput: our loop (`minigpt train`) against a plain hand-written PyTorch loop, same model, same batch.

    python bench/train_cpu.py                      # tiny preset, 32 x 256 tokens per step, bundled Wikipedia
    python bench/train_cpu.py --steps 30 --rounds 3

The plain loop is the nanoGPT style: a random batch sliced from a memory-mapped token file each step, forward,
backward, gradient clipping, PyTorch's default AdamW, a learning rate set by hand. Both train the same GPT module
class from the same initial weights on the same shards in this process, alternating rounds so that background load
hits both alike; each side's best round is reported, evaluation and checkpoint time excluded.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from minigpt.log import read_metrics
from minigpt.model import GPT, ModelConfig
from minigpt.shards import open_shard, read_meta
from minigpt.train import TrainConfig, build_data, learning_rate, train


def plain_loop(data: Path, cfg: TrainConfig, steps: int) -> float:
    """tokens/s of a nanoGPT-style loop over the training shard."""
    meta = read_meta(data)
    tokens = open_shard(data / meta["splits"]["train"]["shards"][0]["file"])
    torch.manual_seed(cfg.seed)
    model = GPT(ModelConfig.from_preset("tiny", vocab_size=meta["tokenizer"]["n_vocab"])).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    B, T = cfg.batch_size, model.config.block_size
    rng = np.random.default_rng(0)

    def get_batch():
        ix = rng.integers(0, len(tokens) - T - 1, B)
        x = torch.stack([torch.from_numpy(tokens[i : i + T].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(tokens[i + 1 : i + 1 + T].astype(np.int64)) for i in ix])
        return x, y

    x, y = get_batch()
    start = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, cfg)
        _, loss = model(x, y)
        x, y = get_batch()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 10 == 0:
            loss.item()
    return steps * B * T / (time.perf_counter() - start)


def our_loop(data: Path, cfg: TrainConfig, steps: int, run: Path) -> float:
    cfg = TrainConfig(**{**cfg.__dict__, "run_dir": str(run), "max_steps": steps, "log_every": steps,
                         "eval_every": steps, "checkpoint_every": steps, "sample_prompt": ""})
    train(cfg)
    return [r["tokens_per_s"] for r in read_metrics(run) if "tokens_per_s" in r][-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/wiki-bpe8k", help="shards folder (built from bundled wiki if missing)")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per round")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    data = Path(args.data)
    cfg = TrainConfig(data=str(data), device="cpu")
    if not (data / "meta.json").exists():
        build_data(cfg)
    ours, plain = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            ours.append(our_loop(data, cfg, args.steps, Path(tmp) / f"run{r}"))
            plain.append(plain_loop(data, cfg, args.steps))
    best_ours, best_plain = max(ours), max(plain)
    print(f"\nTraining the tiny preset ({cfg.batch_size} x 256 tokens per step), {args.steps} steps x {args.rounds} "
          f"rounds, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'loop':<28} | {'tokens/s (best)':>15} | {'median':>8}")
    print("-" * 58)
    print(f"{'minigpt train':<28} | {best_ours:>15,.0f} | {statistics.median(ours):>8,.0f}")
    print(f"{'plain PyTorch (nanoGPT style)':<28} | {best_plain:>15,.0f} | {statistics.median(plain):>8,.0f}")
    print(f"ours / plain: {best_ours / best_plain:.2f}x")


if __name__ == "__main__":
    main()
