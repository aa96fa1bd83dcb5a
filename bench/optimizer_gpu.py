"""AdamW against Muon on GPT-2 124M, same tokens, on the first GPU lent: validation-loss curves, tokens/s, and the
token-efficiency factor `minigpt plan --optimizer muon` would otherwise take from public sources.

    python bench/optimizer_gpu.py --data data/bundled-gpt2 --json out/optimizer_gpu.json     # on a GPU
    python bench/optimizer_gpu.py --data DIR --device cpu --preset tiny --batch 4 --seq-len 64 --steps 30 \\
        --eval-every 10 --eval-batches 2 --no-compile      # CPU smoke (tests/test_train_gpu_bench.py)

Each row is `minigpt.train.train.train()`, the real loop, in a temporary run folder, from the same initial weights
on the same windows of the same shards, with the same batch, steps, warm-up, schedule and clipping; only the
optimizer differs (AdamW: gpt2-124m's lr 6e-4 scaled by --lr-scale; Muon: gpt2-124m-muon's, muon_lr = lr, the two
recipes' other settings). The data: shards made with GPT-2's tokenizer, here, then carried to the GPU (which has
no network): `minigpt prepare --sources wiki news bible --tokenizer gpt2 --val-fraction 0.05 --out
data/bundled-gpt2` takes 7 s and makes 3.0M training and 0.14M validation tokens (8.4 MB), so
a 600-step run sees them a few times: a comparison at equal tokens, not a FineWeb run.

Token efficiency = AdamW's tokens to reach its final validation loss / Muon's tokens to reach the same loss (Muon's
curve interpolated linearly between evaluations; "> N" when Muon's first evaluation is already lower, "< 1" when it
never gets there). tokens/s is each run's own, evaluations and checkpoints left out (metrics.jsonl's). Time: on
an H100, GPT-2 124M at 16 x 1024 tokens a step, eager bf16, about 100 s per 600-step row.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

ROWS = ("adamw", "muon")


def run_row(name: str, args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    """Train one optimizer; its validation curve (tokens, loss) and tokens/s from the run's metrics."""
    from minigpt.common.config import load_file
    from minigpt.model.gpt import ModelConfig
    from minigpt.runs.log import read_metrics
    from minigpt.train.train import TrainConfig, train

    recipe = load_file("gpt2-124m-muon")
    lr = recipe["lr"] * args.lr_scale
    muon = {k: recipe[k] for k in ("muon_weight_decay", "muon_momentum", "muon_momentum_warmup")} | {"muon_lr": lr}
    model = ModelConfig.from_preset(args.preset, block_size=max(args.seq_len, 1))
    cfg = TrainConfig(run_dir=str(run_dir), data=args.data, corpus=[], model=model, batch_size=args.batch,
                      seq_len=args.seq_len, max_steps=args.steps, lr=lr, warmup_steps=args.warmup,
                      schedule=args.schedule, decay_fraction=recipe["decay_fraction"], optimizer=name,
                      **(muon if name == "muon" else {}), precision=args.precision, compile=args.compile,
                      device=args.device, seed=args.seed, log_every=args.eval_every, eval_every=args.eval_every,
                      eval_batches=args.eval_batches, sample_prompt="", checkpoint_every=args.steps,
                      checkpoint_minutes=0, keep_last=1)
    start = time.perf_counter()
    train(cfg)
    records = read_metrics(run_dir)
    tokens_per_step = args.batch * args.seq_len
    curve = [(r["step"] * tokens_per_step, r["val_loss"]) for r in records if "val_loss" in r]
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][1:] or \
        [r["tokens_per_s"] for r in records if "tokens_per_s" in r]  # the first window holds compilation
    return {"optimizer": name, "lr": lr, "curve": curve, "final_val_loss": curve[-1][1],
            "tokens_per_s": sorted(rates)[len(rates) // 2], "seconds": time.perf_counter() - start}


def tokens_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """The tokens at which a validation curve first reaches `target` (linear between evaluations), or None."""
    previous = None
    for tokens, loss in curve:
        if loss <= target:
            if previous is None:
                return float(tokens)
            (t0, l0) = previous
            return t0 + (tokens - t0) * (l0 - target) / (l0 - loss)
        previous = (tokens, loss)
    return None


def token_efficiency(adamw: dict[str, Any], muon: dict[str, Any]) -> tuple[float | None, str]:
    """AdamW's tokens to its final loss / Muon's tokens to that loss, and how to read it."""
    target, adamw_tokens = adamw["final_val_loss"], adamw["curve"][-1][0]
    reached = tokens_to_reach(muon["curve"], target)
    if reached is None:
        return None, f"< 1 (Muon never reached AdamW's final {target:.4f})"
    if reached == muon["curve"][0][0] and muon["curve"][0][1] < target:
        return adamw_tokens / reached, f"> {adamw_tokens / reached:.2f} (already below at Muon's first evaluation)"
    return adamw_tokens / reached, f"{adamw_tokens / reached:.2f}"


def report(rows: dict[str, dict[str, Any]], args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    factor, reading = token_efficiency(rows["adamw"], rows["muon"])
    lines = [f"AdamW vs Muon: {args.preset}, {args.batch} x {args.seq_len} tokens a step, {args.steps} steps, "
             f"{args.schedule}, {args.precision}{' + compile' if args.compile else ''}, data {args.data}", "",
             "| tokens | " + " | ".join(f"{name} val loss" for name in rows) + " |",
             "|---:|" + "---:|" * len(rows)]
    for i, (tokens, _) in enumerate(rows["adamw"]["curve"]):
        lines.append(f"| {tokens:,} | " + " | ".join(f"{r['curve'][i][1]:.4f}" for r in rows.values()) + " |")
    lines += ["", "| optimizer | lr | final val loss | tokens/s (median window) | seconds |",
              "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['optimizer']} | {r['lr']:g} | {r['final_val_loss']:.4f} | {r['tokens_per_s']:,.0f} | "
              f"{r['seconds']:.0f} |" for r in rows.values()]
    speed = rows["muon"]["tokens_per_s"] / rows["adamw"]["tokens_per_s"]
    lines += ["", f"token efficiency (AdamW's tokens to its final loss / Muon's): {reading}",
              f"Muon's tokens/s / AdamW's: {speed:.3f}; at equal wall time: "
              + (f"{factor * speed:.2f}" if factor else "-")]
    return "\n".join(lines), {"settings": vars(args), "rows": rows, "token_efficiency": factor,
                              "token_efficiency_reading": reading, "speed_ratio": speed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a shards folder (minigpt prepare)")
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--batch", type=int, default=16, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--warmup", type=int, default=60)
    parser.add_argument("--schedule", default="wsd", choices=["cosine", "wsd"])
    parser.add_argument("--lr-scale", type=float, default=1.0, help="both optimizers' lr = 6e-4 x this")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--eval-batches", type=int, default=10, help="16 x 1024 x 10: the bundled data's val split")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                        help="torch.compile (off by default: a minute of compiling per row on a 4-minute budget)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--json", help="write the rows and the factor here")
    args = parser.parse_args(argv)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ROWS:
            rows[name] = run_row(name, args, Path(tmp) / name)
            print(f"{name}: final val loss {rows[name]['final_val_loss']:.4f}, "
                  f"{rows[name]['tokens_per_s']:,.0f} tokens/s", flush=True)
    text, data = report(rows, args)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(data, indent=1, default=str))
    return 0 if all(math.isfinite(r["final_val_loss"]) for r in rows.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
