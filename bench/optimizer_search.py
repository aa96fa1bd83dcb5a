"""AdamW against Muon at small scale, at equal tokens and at equal wall time (docs/training.md, "Muon: the search").

    python bench/optimizer_search.py costs --out runs/opt-search                  # Muon's step over AdamW's, in turns
    python bench/optimizer_search.py run S_adamw_4e-3_cosine_1337 S_muon_8e-3_wsd_mw_1337 --parallel 2
    python bench/optimizer_search.py table --out runs/opt-search                  # every trial, then the ratios

A trial is named by what it sets, `SIZE_OPTIMIZER_LR_SCHEDULE[_mw][_aLR]_SEED`:
- SIZE: S, the quickstart's shape (4 layers x 128, 1.9M parameters with the embeddings), or M (6 layers x 320,
  10.1M with them, 7.4M without); both with the quickstart's vocabulary (8,192), context (256) and batch (8 x 256
  tokens per step), on its bundled articles and tokenizer (built once into OUT/data).
- OPTIMIZER and LR: `adamw` at --lr LR, or `muon` at --muon-lr LR with AdamW on the embeddings, head, biases and
  LayerNorms at `aLR` (default: ADAMW_LR, the AdamW sweep's best at that size).
- SCHEDULE: cosine or wsd (the decay over the last 30% of the steps); `mw`: Muon's momentum warm-up (0.85 -> 0.95)
  over the first 30% of the steps.
- the steps are fixed per size (STEPS: what fits the search into about 90 minutes of a shared 2-core machine), the
  warm-up is the quickstart's (a tenth of the steps, at most 50), the validation split (the held-out 2% of the
  articles, 25,575 tokens) is scored whole EVALS times per trial (S: every tenth of the steps; M: every fifth,
  where ten evaluations would cost 40% of the training).

Results do not depend on what else the machine does: every trial runs a fixed number of steps, and time enters
only through `costs`, which times a Muon step against an AdamW step of the same shape in turns (a few steps of
each per round, the median ratio over rounds), so load that drifts over minutes cancels. Each trial appends one
JSON line to OUT/trials.jsonl (its exact `minigpt train` command, steps, tokens, seconds, the validation curve, the
final validation loss and held-out bits per byte); a trial already there is skipped, so an interrupted search
resumes where it stopped.

Token efficiency (the issue's figure): AdamW's tokens to reach its final validation loss over the new recipe's
tokens to reach the same loss, read off the new recipe's curve by linear interpolation between evaluations (where
the new recipe ends above AdamW's final loss, AdamW's tokens to the new recipe's final loss over all of the new
recipe's tokens instead: a ratio below 1). At equal wall time: the same over Muon's step cost (`costs`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COMMON = dict(vocab_size=8192, block_size=256, batch_size=8)
SIZES: dict[str, dict[str, int]] = {"S": dict(n_layer=4, n_head=4, n_embd=128),
                                    "M": dict(n_layer=6, n_head=5, n_embd=320)}
STEPS = {"S": 400, "M": 100}
EVALS = {"S": 10, "M": 5}  # validation points per trial, each over the whole split
ADAMW_LR = {"S": 4e-3, "M": 2e-3}  # the embeddings' (AdamW's) lr in Muon trials: the AdamW sweep's best per size
NAME = re.compile(r"^(?P<size>[SM])_(?P<optimizer>adamw|muon)_(?P<lr>[0-9.e-]+)_(?P<schedule>cosine|wsd)"
                  r"(?P<mw>_mw)?(?:_a(?P<adamw_lr>[0-9.e-]+))?_(?P<seed>\d+)$")


def parse(name: str) -> dict:
    m = NAME.match(name)
    if not m:
        raise SystemExit(f"trial name {name!r} is not SIZE_OPTIMIZER_LR_SCHEDULE[_mw][_aLR]_SEED, e.g. "
                         "S_muon_8e-3_wsd_mw_1337")
    t = m.groupdict()
    return {"size": t["size"], "optimizer": t["optimizer"], "lr": float(t["lr"]), "schedule": t["schedule"],
            "momentum_warmup": bool(t["mw"]), "seed": int(t["seed"]),
            "adamw_lr": float(t["adamw_lr"]) if t["adamw_lr"] else ADAMW_LR[t["size"]]}


def train_command(name: str, out: Path) -> list[str]:
    t = parse(name)
    steps = STEPS[t["size"]]
    shape = {**SIZES[t["size"]], "block_size": COMMON["block_size"]}
    cmd = [sys.executable, "-m", "minigpt", "train", "--data", str(out / "data"), "--run-dir", str(out / name),
           "--vocab-size", str(COMMON["vocab_size"]), *[f"--model.{k.replace('_', '-')}={v}" for k, v in shape.items()],
           "--batch-size", str(COMMON["batch_size"]), "--max-steps", str(steps), "--device", "cpu",
           "--seed", str(t["seed"]), "--schedule", t["schedule"], "--warmup-steps", str(max(min(50, steps // 10), 1)),
           "--eval-every", str(steps // EVALS[t["size"]]), "--eval-batches", "0", "--checkpoint-every", str(steps),
           "--keep-last", "1", "--log-every", str(steps // 10), "--sample-tokens", "0", "--no-resume"]
    if t["optimizer"] == "adamw":
        cmd += ["--optimizer", "adamw", "--lr", f"{t['lr']:g}"]
    else:
        cmd += ["--optimizer", "muon", "--muon-lr", f"{t['lr']:g}", "--lr", f"{t['adamw_lr']:g}"]
        if t["momentum_warmup"]:
            cmd += ["--muon-momentum-warmup", str(int(0.3 * steps))]
    return cmd


def shown(cmd: list[str]) -> str:
    """The command as a user types it (`minigpt train ...`, paths relative to the repository)."""
    return "minigpt " + " ".join(shlex.quote(a) for a in cmd[3:])


def records(out: Path) -> list[dict]:
    path = out / "trials.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def run_trial(name: str, out: Path, threads: int) -> dict:
    from minigpt.runs.log import read_metrics

    cmd = train_command(name, out)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    with open(out / f"{name}.log", "w") as log:
        subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, check=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    evals = [r for r in read_metrics(out / name) if "val_loss" in r]
    t = parse(name)
    steps = STEPS[t["size"]]
    tokens_per_step = COMMON["batch_size"] * COMMON["block_size"]
    return {"trial": name, **t, "steps": steps, "tokens": steps * tokens_per_step,
            "command": shown(cmd), "threads": threads, "seconds": round(seconds, 1),
            "curve": [[r["step"], round(r["val_loss"], 5)] for r in evals],
            "val_loss": evals[-1]["val_loss"], "bits_per_byte": evals[-1]["val_bpb"]}


def cmd_run(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.trials:
        parse(name)
    from minigpt.quickstart.quickstart import QuickstartConfig, build_pretraining_data

    build_pretraining_data(QuickstartConfig(device="cpu", vocab_size=COMMON["vocab_size"]), out / "data")
    done = {r["trial"] for r in records(out) if "trial" in r}
    pending = [name for name in dict.fromkeys(args.trials) if name not in done]
    if args.parallel == 1:
        for name in pending:
            _log(out, run_trial(name, out, args.threads))
        return
    running: list[tuple[str, subprocess.Popen]] = []
    while pending or running:  # each trial in its own process, which appends its own line
        while pending and len(running) < args.parallel:
            name = pending.pop(0)
            cmd = [sys.executable, __file__, "_one", name, "--out", str(out), "--threads", str(args.threads)]
            running.append((name, subprocess.Popen(cmd, cwd=ROOT)))
        time.sleep(2)
        for name, proc in list(running):
            if proc.poll() is not None:
                running.remove((name, proc))
                print(f"trial {name} ended with status {proc.returncode}", flush=True)


def _log(out: Path, record: dict) -> None:
    with open(out / "trials.jsonl", "a") as f:  # one short line per write: parallel trials do not interleave
        f.write(json.dumps(record) + "\n")
    print(f"{record['trial']}: val loss {record['val_loss']:.4f}, {record['bits_per_byte']:.4f} bits/byte, "
          f"{record['seconds']:.0f} s", flush=True)


def cmd_one(args) -> None:
    _log(Path(args.out), run_trial(args.name, Path(args.out), args.threads))


def relative_cost(size: str, threads: int, rounds: int = 7, steps: int = 3) -> dict:
    """A Muon step's time over an AdamW step's on this shape (the step `minigpt train` takes on a CPU: forward,
    chunked loss, backward, clipping, optimizer), timed in turns: a few steps of each per round, the median of the
    rounds' ratios, so that a machine whose speed drifts over minutes gives the same ratio."""
    import torch

    from minigpt.model.gpt import ModelConfig
    from minigpt.quickstart.budget import training_step

    torch.set_num_threads(threads)
    cfg = ModelConfig(**SIZES[size], block_size=COMMON["block_size"], vocab_size=COMMON["vocab_size"])
    steppers, seconds = {}, {}
    for optimizer_name in ("adamw", "muon"):
        torch.manual_seed(0)
        step = training_step(cfg, COMMON["batch_size"], optimizer_name)
        step()  # warm-up
        steppers[optimizer_name], seconds[optimizer_name] = step, []
    ratios = []
    for _ in range(rounds):
        for optimizer_name, step in steppers.items():
            start = time.perf_counter()
            for _ in range(steps):
                step()
            seconds[optimizer_name].append((time.perf_counter() - start) / steps)
        ratios.append(seconds["muon"][-1] / seconds["adamw"][-1])
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return {"costs": size, "threads": threads, "muon_over_adamw": round(median(ratios), 4),
            "ratio_spread": [round(min(ratios), 4), round(max(ratios), 4)],
            "adamw_s_per_step": round(median(seconds["adamw"]), 4),
            "muon_s_per_step": round(median(seconds["muon"]), 4)}


def cmd_costs(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for size in args.sizes:
        record = relative_cost(size, args.threads, args.rounds)
        with open(out / "costs.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)


# ----------------------------------------------------------------------------------------------------------------
# The table and the ratios


def tokens_to_reach(curve: list[list[float]], loss: float, tokens_per_step: int) -> float | None:
    """The tokens at which a validation curve first reaches `loss`, interpolated linearly between evaluations
    (None: it never does)."""
    previous = None
    for step, value in curve:
        if value <= loss:
            if previous is None:
                return step * tokens_per_step
            (s0, v0) = previous
            return (s0 + (step - s0) * (v0 - loss) / (v0 - value)) * tokens_per_step
        previous = (step, value)
    return None


def token_efficiency(adamw: dict, new: dict) -> float:
    """AdamW's tokens to its final validation loss over the new recipe's tokens to that loss (where the new recipe
    never gets there: AdamW's tokens to the new recipe's final loss over the new recipe's tokens)."""
    per_step = COMMON["batch_size"] * COMMON["block_size"]
    reached = tokens_to_reach(new["curve"], adamw["val_loss"], per_step)
    if reached is not None:
        return adamw["tokens"] / reached
    return (tokens_to_reach(adamw["curve"], new["val_loss"], per_step) or adamw["tokens"]) / new["tokens"]


def latest_costs(out: Path, threads: int | None = None) -> dict[str, dict]:
    path = out / "costs.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []
    return {r["costs"]: r for r in rows if threads is None or r["threads"] == threads}


def cmd_table(args) -> None:
    out = Path(args.out)
    trials = [r for r in records(out) if "trial" in r]
    print("| trial | optimizer | lr (Muon / AdamW) | schedule | momentum warm-up | seed | steps | tokens | "
          "val loss | bits/byte | command |")
    print("|---|---|---|---|---|---:|---:|---:|---:|---:|---|")
    for r in sorted(trials, key=lambda r: (r["size"], r["optimizer"], r["seed"], r["val_loss"])):
        lr = f"{r['lr']:g}" if r["optimizer"] == "adamw" else f"{r['lr']:g} / {r['adamw_lr']:g}"
        print(f"| {r['trial']} | {r['optimizer']} | {lr} | {r['schedule']} | "
              f"{'yes' if r['momentum_warmup'] else 'no' if r['optimizer'] == 'muon' else '-'} | {r['seed']} | "
              f"{r['steps']:,} | {r['tokens'] / 1e6:.2f}M | {r['val_loss']:.4f} | {r['bits_per_byte']:.4f} | "
              f"`{r['command']}` |")
    costs = latest_costs(out, args.cost_threads)
    if costs:
        print("\n| size | threads | AdamW s/step | Muon s/step | Muon / AdamW (median of rounds) | spread |")
        print("|---|---:|---:|---:|---:|---|")
        for size, c in sorted(costs.items()):
            print(f"| {size} | {c['threads']} | {c['adamw_s_per_step']:.3f} | {c['muon_s_per_step']:.3f} | "
                  f"{c['muon_over_adamw']:.3f} | {c['ratio_spread'][0]:.3f}-{c['ratio_spread'][1]:.3f} |")
    by_name = {r["trial"]: r for r in trials}
    pairs = [p.split(":") for p in args.pairs]
    if not pairs:
        return
    print("\n| size | seed | AdamW (baseline) | new recipe | AdamW final loss | new final loss | "
          "token efficiency | at equal wall time |")
    print("|---|---:|---|---|---:|---:|---:|---:|")
    ratios: dict[str, list[tuple[float, float]]] = {}
    for base_name, new_name in pairs:
        base, new = by_name[base_name], by_name[new_name]
        eff = token_efficiency(base, new)
        cost = costs.get(new["size"], {}).get("muon_over_adamw", 1.0) if new["optimizer"] == "muon" else 1.0
        ratios.setdefault(new["size"], []).append((eff, eff / cost))
        print(f"| {new['size']} | {new['seed']} | {base_name} | {new_name} | {base['val_loss']:.4f} | "
              f"{new['val_loss']:.4f} | {eff:.2f}x | {eff / cost:.2f}x |")
    median = lambda xs: sorted(xs)[len(xs) // 2] if len(xs) % 2 else sum(sorted(xs)[len(xs) // 2 - 1:][:2]) / 2  # noqa: E731
    print("\n| sizes | runs | token efficiency: median (min-max) | at equal wall time: median (min-max) |")
    print("|---|---:|---|---|")
    groups = {**{size: r for size, r in sorted(ratios.items())}, "all": [x for r in ratios.values() for x in r]}
    for size, r in groups.items():
        tok, wall = [x[0] for x in r], [x[1] for x in r]
        print(f"| {size} | {len(r)} | {median(tok):.2f}x ({min(tok):.2f}-{max(tok):.2f}) | "
              f"{median(wall):.2f}x ({min(wall):.2f}-{max(wall):.2f}) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run trials (skipping those already in OUT/trials.jsonl)")
    p.add_argument("trials", nargs="+")
    p.add_argument("--out", default="runs/opt-search")
    p.add_argument("--parallel", type=int, default=1, help="trials at once, each its own process")
    p.add_argument("--threads", type=int, default=2, help="CPU threads per trial")
    p = sub.add_parser("_one")
    p.add_argument("name")
    p.add_argument("--out")
    p.add_argument("--threads", type=int)
    p = sub.add_parser("costs", help="Muon's step time over AdamW's per size, measured in turns")
    p.add_argument("--out", default="runs/opt-search")
    p.add_argument("--sizes", nargs="+", default=list(SIZES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p = sub.add_parser("table", help="print every trial, the step costs and the ratios (Markdown)")
    p.add_argument("--out", default="runs/opt-search")
    p.add_argument("--pairs", nargs="*", default=[],
                   help="ADAMW_TRIAL:NEW_TRIAL pairs whose token efficiency to print (same size and seed)")
    p.add_argument("--cost-threads", type=int, default=None, help="use the step costs measured at these threads")
    args = parser.parse_args()
    {"run": cmd_run, "_one": cmd_one, "costs": cmd_costs, "table": cmd_table}[args.command](args)


if __name__ == "__main__":
    main()
