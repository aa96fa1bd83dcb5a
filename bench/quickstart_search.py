"""The quickstart's design, searched at a fixed wall-clock budget on this machine (docs/quickstart.md).

    python bench/quickstart_search.py pretrain --budget-s 330 --out runs/qs-search          # stage 1: designs
    python bench/quickstart_search.py finetune --base runs/qs-search/B2 --budget-s 120 --out runs/qs-search
    python bench/quickstart_search.py decode --chat runs/qs-search/B2-sft-base/chat            # stage 3
    python bench/quickstart_search.py table --out runs/qs-search                              # the Markdown table

Equal time, not equal steps: a design's steps are its budget over its own time per step, so a design that computes
faster trains on more tokens. This VM's speed drifts by 2-5x from minute to minute (other tenants), so each
design's time per step is measured relative to T0's, in turns (`relative_costs`), and scaled by T0's time on a quiet
machine (--t0-s-per-step: 500 steps in 3 min 53 s on 2026-11-29, 0.467 s). The trials themselves then run at
that fixed number of steps, which makes their results independent of what else the machine does; `--parallel 2`
runs two at once on one thread each (the probe's figures are for two threads, as the quickstart runs).

Metrics: bits per byte of the held-out articles (the validation split; independent of the vocabulary) for
pretraining designs; for fine-tuning designs the answer measures of the quickstart's report on held-out questions
(ends its turn, names the subject, repeats itself) under the chat decoding and greedily. Every trial appends one
JSON line to OUT/trials.jsonl; `table` prints them all.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Pretraining designs: vocabulary, shape, context, batch, learning rate. "T0" is the quickstart before the search.
DESIGNS: dict[str, dict] = {
    "T0": dict(vocab_size=8192, n_layer=4, n_head=4, n_embd=128, block_size=256, batch_size=16, lr=3e-3),
    "V4": dict(vocab_size=4096, n_layer=4, n_head=4, n_embd=128, block_size=256, batch_size=16, lr=3e-3),
    "V2": dict(vocab_size=2048, n_layer=4, n_head=4, n_embd=128, block_size=256, batch_size=16, lr=3e-3),
    "V2w": dict(vocab_size=2048, n_layer=4, n_head=6, n_embd=192, block_size=256, batch_size=16, lr=3e-3),
    "V2d": dict(vocab_size=2048, n_layer=6, n_head=6, n_embd=192, block_size=256, batch_size=16, lr=3e-3),
    "V4w": dict(vocab_size=4096, n_layer=4, n_head=6, n_embd=192, block_size=256, batch_size=16, lr=3e-3),
    "V2s": dict(vocab_size=2048, n_layer=3, n_head=4, n_embd=128, block_size=256, batch_size=16, lr=3e-3),
    "V2b8": dict(vocab_size=2048, n_layer=4, n_head=4, n_embd=128, block_size=256, batch_size=8, lr=3e-3),
    "V2c128": dict(vocab_size=2048, n_layer=4, n_head=4, n_embd=128, block_size=128, batch_size=32, lr=3e-3),
    "V2lr5": dict(vocab_size=2048, n_layer=4, n_head=4, n_embd=128, block_size=256, batch_size=16, lr=5e-3),
    "V2lr2": dict(vocab_size=2048, n_layer=4, n_head=4, n_embd=128, block_size=256, batch_size=16, lr=2e-3),
    "T0b8": dict(vocab_size=8192, n_layer=4, n_head=4, n_embd=128, block_size=256, batch_size=8, lr=3e-3),
    "T0lr6": dict(vocab_size=8192, n_layer=4, n_head=4, n_embd=128, block_size=256, batch_size=16, lr=6e-3),
    "T0b8lr6": dict(vocab_size=8192, n_layer=4, n_head=4, n_embd=128, block_size=256, batch_size=8, lr=6e-3),
    "T0b8lr10": dict(vocab_size=8192, n_layer=4, n_head=4, n_embd=128, block_size=256, batch_size=8, lr=1e-2),
    "D6b8": dict(vocab_size=8192, n_layer=6, n_head=4, n_embd=128, block_size=256, batch_size=8, lr=3e-3),
    "T0b8lr4": dict(vocab_size=8192, n_layer=4, n_head=4, n_embd=128, block_size=256, batch_size=8, lr=4e-3),
    "T0b8lr4m0": dict(vocab_size=8192, n_layer=4, n_head=4, n_embd=128, block_size=256, batch_size=8, lr=4e-3,
                      train=dict(min_lr_ratio=0.0)),
    "T0b8lr4wd0": dict(vocab_size=8192, n_layer=4, n_head=4, n_embd=128, block_size=256, batch_size=8, lr=4e-3,
                       train=dict(weight_decay=0.0)),
    "T0b8lr2": dict(vocab_size=8192, n_layer=4, n_head=4, n_embd=128, block_size=256, batch_size=8, lr=2e-3),
    "T0lr10": dict(vocab_size=8192, n_layer=4, n_head=4, n_embd=128, block_size=256, batch_size=16, lr=1e-2),
    "V16": dict(vocab_size=16384, n_layer=4, n_head=4, n_embd=128, block_size=256, batch_size=16, lr=3e-3),
    "T0c128": dict(vocab_size=8192, n_layer=4, n_head=4, n_embd=128, block_size=128, batch_size=32, lr=3e-3),
}
# Fine-tuning designs: learning rate, rows per step, the conversation mix.
SFT_DESIGNS: dict[str, dict] = {
    "base": dict(sft_lr=1e-3, sft_batch_size=8, sft_datasets=["chatterbot", "wiki-qa"]),
    "lr3": dict(sft_lr=3e-3, sft_batch_size=8, sft_datasets=["chatterbot", "wiki-qa"]),
    "b16": dict(sft_lr=2e-3, sft_batch_size=16, sft_datasets=["chatterbot", "wiki-qa"]),
    "short": dict(sft_lr=1e-3, sft_batch_size=8, sft_datasets=["chatterbot", "wiki-qa", "wiki-qa-short"]),
    "short-lr3": dict(sft_lr=3e-3, sft_batch_size=8, sft_datasets=["chatterbot", "wiki-qa", "wiki-qa-short"]),
    "short-lr6": dict(sft_lr=6e-3, sft_batch_size=8, sft_datasets=["chatterbot", "wiki-qa", "wiki-qa-short"]),
    "short-lr3-b4": dict(sft_lr=3e-3, sft_batch_size=4, sft_datasets=["chatterbot", "wiki-qa", "wiki-qa-short"]),
    "only-short-lr3": dict(sft_lr=3e-3, sft_batch_size=8, sft_datasets=["chatterbot", "wiki-qa-short"]),
    "only-short-lr3-b4": dict(sft_lr=3e-3, sft_batch_size=4, sft_datasets=["chatterbot", "wiki-qa-short"]),
    "only-short-lr6-b4": dict(sft_lr=6e-3, sft_batch_size=4, sft_datasets=["chatterbot", "wiki-qa-short"]),
}
# Chat decodings tried on one fine-tuned model (engine.SamplingParams fields).
DECODINGS: dict[str, dict] = {
    "greedy": dict(temperature=0.0),
    "t0.7": dict(temperature=0.7, top_p=0.9),
    "t0.7-f0.5": dict(temperature=0.7, top_p=0.9, frequency_penalty=0.5),
    "t0.7-f1": dict(temperature=0.7, top_p=0.9, frequency_penalty=1.0),
    "t0.5-f0.5": dict(temperature=0.5, top_p=0.9, frequency_penalty=0.5),
    "t0.5-f1": dict(temperature=0.5, top_p=0.9, frequency_penalty=1.0),
    "t0.3-f1": dict(temperature=0.3, top_p=0.9, frequency_penalty=1.0),
    "greedy-f1": dict(temperature=0.0, frequency_penalty=1.0),
    "t0.7-p0.5": dict(temperature=0.7, top_p=0.9, presence_penalty=0.5),
}


def design_config(name: str, out: Path, budget_s: float, seconds_per_step: float):
    from minigpt.model.gpt import ModelConfig
    from minigpt.quickstart.quickstart import QuickstartConfig

    d = {k: v for k, v in DESIGNS[name].items() if k != "train"}
    model = ModelConfig(**{k: d.pop(k) for k in ("n_layer", "n_head", "n_embd", "block_size")},
                        vocab_size=d["vocab_size"])
    steps = max(int(budget_s / seconds_per_step), 10)
    return QuickstartConfig(run_dir=str(out / name), model=model, pretrain_steps=steps, device="cpu", **d)


def log_trial(out: Path, record: dict) -> None:
    with open(out / "trials.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def run_pretrain_trial(name: str, out: Path, budget_s: float, seconds_per_step: float) -> dict:
    import dataclasses

    from minigpt.quickstart import quickstart
    from minigpt.quickstart.quickstart import held_out_bits_per_byte, pretrain
    from minigpt.runs.loading import load_run

    cfg = design_config(name, out, budget_s, seconds_per_step)
    data = out / f"data-{cfg.vocab_size}"
    if "train" in DESIGNS[name]:  # `minigpt train` settings the quickstart does not expose, for this trial only
        plain = quickstart.pretraining_config
        quickstart.pretraining_config = lambda *a: dataclasses.replace(plain(*a), **DESIGNS[name]["train"])
    start = time.perf_counter()
    pretrain(cfg, data, out / name / "base")
    model, _, meta = load_run(out / name / "base")
    return {"stage": "pretrain", "design": name, **DESIGNS[name], "steps": cfg.pretrain_steps,
            "tokens": cfg.pretrain_steps * cfg.batch_size * cfg.model.block_size,
            "params": model.num_params(), "non_embedding_params": model.num_params(embeddings=False),
            "probe_s_per_step": seconds_per_step, "budget_s": budget_s,
            "bits_per_byte": held_out_bits_per_byte(model, data), "val_loss": meta.get("val_loss"),
            "wall_s": round(time.perf_counter() - start, 1)}


def answer_rates(chat: Path, decoding: dict, questions: int = 100, seed: int = 1337) -> dict:
    from minigpt.chat.engine import SamplingParams
    from minigpt.runs.loading import load_run
    from minigpt.text.conversations import load_conversations, split_conversations
    from minigpt.train.sft import answer_quality

    model, tokenizer, _ = load_run(chat)
    _, held = split_conversations(load_conversations(["wiki-qa"]), 0.05, seed)
    q = answer_quality(model, tokenizer, held[:questions], params=SamplingParams(**decoding))
    _, talk = split_conversations(load_conversations(["chatterbot"]), 0.05, seed)
    t = answer_quality(model, tokenizer, talk[:20], params=SamplingParams(**decoding))
    return {"ended": q["ended_rate"], "subject": q["subject_rate"], "repeats": q["repetition_rate"],
            "talk_ended": t["ended_rate"], "talk_repeats": t["repetition_rate"],
            "examples": [a["answer"] for a in q["answers"][:3]]}


def run_sft_trial(base: Path, sft: str, out: Path, budget_s: float, seconds_per_step: float) -> dict:
    from minigpt.quickstart.quickstart import QuickstartConfig, finetune_chat

    design = json.loads((base / "design.json").read_text())
    steps = max(int(budget_s / seconds_per_step), 10)
    cfg = QuickstartConfig(sft_steps=steps, device="cpu", **SFT_DESIGNS[sft])
    run = out / f"{base.name}-sft-{sft}" / "chat"
    start = time.perf_counter()
    finetune_chat(cfg, base / "base", run)
    wall = time.perf_counter() - start
    from minigpt.text.chat_format import CHAT_DECODING

    return {"stage": "finetune", "design": design["name"], "sft": sft, **SFT_DESIGNS[sft], "steps": steps,
            "probe_s_per_step": seconds_per_step, "budget_s": budget_s, "wall_s": round(wall, 1),
            "chat_decoding": answer_rates(run, {k: v for k, v in CHAT_DECODING.items()}),
            "greedy": answer_rates(run, {"temperature": 0.0})}


# ----------------------------------------------------------------------------------------------------------------
# Command line


SHAPE_KEYS = ("vocab_size", "n_layer", "n_head", "n_embd", "block_size", "batch_size")


def relative_costs(names: list[str], rounds: int = 7) -> dict[str, float]:
    """Each design's time per step over T0's, timed in turns (a few steps of every design per round, the median
    ratio over rounds): this VM's speed drifts by 2-5x over minutes, which a ratio taken within a round cancels."""

    from minigpt.model.gpt import ModelConfig
    from minigpt.quickstart.budget import training_step

    shape = lambda name: tuple(DESIGNS[name][k] for k in SHAPE_KEYS)  # noqa: E731 - designs of one shape, one cost
    by_shape = {shape(name): name for name in reversed(["T0", *names])}
    steppers = {}
    for name in by_shape.values():
        d = DESIGNS[name]
        cfg = ModelConfig(**{k: d[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")})
        step = training_step(cfg, d["batch_size"])
        step()  # warm-up
        steppers[name] = step
    ratios: dict[str, list[float]] = {name: [] for name in steppers}
    for _ in range(rounds):
        times = {}
        for name, step in steppers.items():
            start = time.perf_counter()
            for _ in range(3):
                step()
            times[name] = time.perf_counter() - start
        for name in steppers:
            ratios[name].append(times[name] / times["T0"])
    medians = {name: sorted(r)[len(r) // 2] for name, r in ratios.items()}
    return {name: medians[by_shape[shape(name)]] for name in names}


def cmd_pretrain(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = args.only or list(DESIGNS)
    costs = {name: args.cost for name in names} if args.cost else relative_costs(names)
    probes = {name: costs[name] * args.t0_s_per_step for name in names}
    for name in names:
        print(f"cost {name}: {costs[name]:.2f} x T0 -> {int(args.budget_s / probes[name])} steps", flush=True)
    from minigpt.quickstart.quickstart import build_pretraining_data

    for name in names:  # each vocabulary's tokenizer and shards once, before trials share them
        build_pretraining_data(design_config(name, out, args.budget_s, probes[name]),
                               out / f"data-{DESIGNS[name]['vocab_size']}")
    pending = list(names)
    running: list[tuple[str, subprocess.Popen]] = []
    while pending or running:
        while pending and len(running) < args.parallel:
            name = pending.pop(0)
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
            cmd = [sys.executable, __file__, "_trial", name, "--out", str(out), "--budget-s", str(args.budget_s),
                   "--s-per-step", str(probes[name])]
            log = open(out / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
            running.append((name, subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)))
        time.sleep(2)
        for name, proc in list(running):
            if proc.poll() is not None:
                running.remove((name, proc))
                print(f"trial {name} ended with status {proc.returncode}", flush=True)


def cmd_trial(args) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    out = Path(args.out)
    record = run_pretrain_trial(args.name, out, args.budget_s, args.s_per_step)
    (out / args.name / "design.json").write_text(json.dumps({"name": args.name, **DESIGNS[args.name]}))
    log_trial(out, record)
    print(json.dumps(record))


def cmd_finetune(args) -> None:
    from minigpt.quickstart.budget import sft_seconds_per_step

    out, base = Path(args.out), Path(args.base)
    design = json.loads((base / "design.json").read_text())
    for sft in args.only or list(SFT_DESIGNS):
        s = SFT_DESIGNS[sft]
        if args.s_per_step:
            probe = args.s_per_step * s["sft_batch_size"] / 8
        else:
            probe = sft_seconds_per_step(design["vocab_size"], design["n_layer"], design["n_head"], design["n_embd"],
                                         design["block_size"], s["sft_batch_size"])
        record = run_sft_trial(base, sft, out, args.budget_s, probe)
        log_trial(out, record)
        print(json.dumps(record), flush=True)


def cmd_decode(args) -> None:
    out, chat = Path(args.out), Path(args.chat)
    for name in args.only or list(DECODINGS):
        record = {"stage": "decode", "chat": str(chat), "decoding": name, **answer_rates(chat, DECODINGS[name])}
        log_trial(out, record)
        print(json.dumps(record), flush=True)


def cmd_table(args) -> None:
    records = [json.loads(line) for line in (Path(args.out) / "trials.jsonl").read_text().splitlines() if line]
    pct = lambda x: f"{100 * x:.0f}%"  # noqa: E731
    print("| design | vocab | layers x width | context | batch | lr | params (non-emb.) | ms/step | steps | "
          "tokens | held-out bits/byte |")
    print("|---|---:|---|---:|---:|---:|---|---:|---:|---:|---:|")
    for r in sorted((r for r in records if r["stage"] == "pretrain"), key=lambda r: r["bits_per_byte"]):
        print(f"| {r['design']} | {r['vocab_size']:,} | {r['n_layer']} x {r['n_embd']} | {r['block_size']} | "
              f"{r['batch_size']} | {r['lr']:g} | {r['params'] / 1e6:.2f}M ({r['non_embedding_params'] / 1e6:.2f}M) "
              f"| {1000 * r['probe_s_per_step']:.0f} | {r['steps']:,} | {r['tokens'] / 1e6:.1f}M | "
              f"{r['bits_per_byte']:.3f} |")
    sft = [r for r in records if r["stage"] == "finetune"]
    if sft:
        print("\n| base | fine-tuning | lr | rows | mix | steps | ends (chat / greedy) | names subject "
              "(chat / greedy) | repeats (chat / greedy) |")
        print("|---|---|---:|---:|---|---:|---:|---:|---:|")
        for r in sft:
            c, g = r["chat_decoding"], r["greedy"]
            print(f"| {r['design']} | {r['sft']} | {r['sft_lr']:g} | {r['sft_batch_size']} | "
                  f"{'+'.join(r['sft_datasets'])} | {r['steps']} | {pct(c['ended'])} / {pct(g['ended'])} | "
                  f"{pct(c['subject'])} / {pct(g['subject'])} | {pct(c['repeats'])} / {pct(g['repeats'])} |")
    dec = [r for r in records if r["stage"] == "decode"]
    if dec:
        print("\n| chat model | decoding | ends its turn | names the subject | repeats itself | small talk ends |")
        print("|---|---|---:|---:|---:|---:|")
        for r in dec:
            print(f"| {Path(r['chat']).parent.name} | {r['decoding']} | {pct(r['ended'])} | {pct(r['subject'])} | "
                  f"{pct(r['repeats'])} | {pct(r['talk_ended'])} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pretrain")
    p.add_argument("--budget-s", type=float, default=330)
    p.add_argument("--out", default="runs/qs-search")
    p.add_argument("--only", nargs="*")
    p.add_argument("--parallel", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--t0-s-per-step", type=float, default=0.467,
                   help="T0's seconds per step on this machine when quiet (500 steps in 3 min 53 s, 2026-11-29)")
    p.add_argument("--cost", type=float, default=0.0,
                   help="these designs' time per step over T0's, as measured before (0: measure now, in turns); "
                        "designs of one shape then get exactly the same steps")
    p = sub.add_parser("_trial")
    p.add_argument("name")
    p.add_argument("--out")
    p.add_argument("--budget-s", type=float)
    p.add_argument("--s-per-step", type=float)
    p = sub.add_parser("finetune")
    p.add_argument("--base", required=True)
    p.add_argument("--budget-s", type=float, default=120)
    p.add_argument("--out", default="runs/qs-search")
    p.add_argument("--only", nargs="*")
    p.add_argument("--s-per-step", type=float, default=0.0,
                   help="seconds per fine-tuning step of 8 rows on a quiet machine (0: probe now; a busy machine "
                        "then gets fewer steps); designs with other row counts scale it")
    p = sub.add_parser("decode")
    p.add_argument("--chat", required=True)
    p.add_argument("--out", default="runs/qs-search")
    p.add_argument("--only", nargs="*")
    p = sub.add_parser("table")
    p.add_argument("--out", default="runs/qs-search")
    args = parser.parse_args()
    {"pretrain": cmd_pretrain, "_trial": cmd_trial, "finetune": cmd_finetune, "decode": cmd_decode,
     "table": cmd_table}[args.command](args)


if __name__ == "__main__":
    main()
