"""Multiple-choice scoring speed: our batched scorer against a one-example-one-choice-at-a-time loop.

    python bench/eval_speed.py                        # random tiny-preset model, GPT-2 vocabulary, 200 HellaSwag
    python bench/eval_speed.py --run runs/tiny --task arc_easy --limit 500

Ways to score the same (context, continuation) pairs with the same weights:
  naive      one forward pass per pair, logits at every position (reference.score_pairs), PyTorch's default kernels
  batch 1    score_pairs one question at a time: its context once (a KV cache its choices extend), only the
             continuations' positions through the output head
  batch N    score_pairs: questions sorted by length, about N pairs per pass (the default path of `minigpt eval`)
  batch N, default kernels
             the same without the oneDNN-prepacked weights score_pairs uses on x86 CPUs: what batching and
             sharing alone give
Throughput is in examples per second (an example is all of its choices). The pairs are tokenized beforehand and
the tokenizing is not timed. Measure on a quiet machine: the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", help="a run or checkpoint folder (default: a random tiny-preset model with GPT-2's "
                                      "vocabulary)")
    parser.add_argument("--task", default="hellaswag")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds, taking turns; the best is reported")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import torch

    from minigpt import evaluate, tasks
    from minigpt.checkpoint import load_run
    from minigpt.model import GPT, ModelConfig
    from minigpt.reference import score_pairs as score_one_at_a_time
    from minigpt.tokenizer import Tokenizer

    if args.run:
        model, tokenizer, _ = load_run(args.run)
        what = args.run
    else:
        tokenizer = Tokenizer.gpt2()
        torch.manual_seed(0)
        model = GPT(ModelConfig.from_preset("tiny", vocab_size=tokenizer.n_vocab)).eval()
        what = "random tiny preset (4 layers, width 128, context 256), GPT-2 vocabulary"
    task = tasks.load_task(args.task, limit=args.limit)
    pairs, _ = evaluate.task_pairs(task, tokenizer)
    tokens = sum(len(c) + len(k) for c, k in pairs)
    print(f"{what}; {args.task}: {len(task.examples)} examples, {len(pairs)} pairs, {tokens:,} tokens; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; load average before: {load_average()}")

    runs = {"naive (one pair per pass, full logits)": lambda: score_one_at_a_time(model, pairs),
            "batch 1 (shared context, continuation positions only)": lambda: evaluate.score_pairs(model, pairs, 1),
            f"batch {args.batch_size}": lambda: evaluate.score_pairs(model, pairs, args.batch_size),
            f"batch {args.batch_size}, default kernels":
                lambda: evaluate.score_pairs(model, pairs, args.batch_size, prepack=False)}
    best = dict.fromkeys(runs, float("inf"))
    scores = {}
    for _ in range(args.repeats):  # taking turns, so that the machine's slower moments hit every scorer alike
        for name, fn in runs.items():
            start = time.perf_counter()
            scores[name] = fn()
            best[name] = min(best[name], time.perf_counter() - start)
    reference = scores[next(iter(runs))]
    results = {name: (best[name], max(abs(a.logprob - b.logprob) for a, b in zip(s, reference, strict=True)))
               for name, s in scores.items()}
    naive = results[next(iter(runs))][0]
    print("| scorer | seconds | examples/s | speed-up | max abs diff vs naive |")
    print("|---|---:|---:|---:|---:|")
    for name, (seconds, diff) in results.items():
        print(f"| {name} | {seconds:.2f} | {len(task.examples) / seconds:.1f} | {naive / seconds:.1f}x | {diff:.1e} |")
    print(f"load average after: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
