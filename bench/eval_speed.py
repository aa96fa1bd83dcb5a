"""Multiple-choice scoring speed: our batched scorer against lm-evaluation-harness's own batched HF scorer.

    python bench/eval_speed.py                        # random tiny-preset model, GPT-2 vocabulary, 200 HellaSwag
    python bench/eval_speed.py --run runs/quickstart/base \
        --tasks arc_easy,arc_challenge,winogrande,lambada,hellaswag,piqa
    python bench/eval_speed.py --run runs/tiny --tasks arc_easy --limit 500 --rounds 5

Ways to score the same (context, continuation) token pairs with the same weights:
  ours, batch N       score_pairs: questions sorted by length, about N pairs per pass, each shared context run
                      once (a KV cache its choices extend), only the scored positions through the output head,
                      oneDNN-prepacked weights on x86 CPUs (the default path of `minigpt eval`)
  ours, default kernels
                      the same without the prepacked weights: what batching and sharing alone give
  ours, batch 1       score_pairs one question at a time
  lm-eval hf, batch N the reference: lm-evaluation-harness's `HFLM` (what `lm_eval --model hf` runs) on the same
                      weights, exported to a Hugging Face folder (`minigpt.interop.hf.export_hf`, the code of `minigpt
                      export`; a random model is saved the way bench/eval_parity.py saves it), float32, its default
                      float32 log-softmax, `batch_size=N`, scoring through `HFLM._loglikelihood_tokens`, the batched
                      scorer behind its `loglikelihood`: sequences sorted longest first, N per padded forward pass,
                      one-token continuations of one context scored once (its logits cache)
  naive               one forward pass per pair, logits at every position, float64 log-softmax
                      (reference.score_pairs), PyTorch's default kernels: the second reference
Every scorer gets the same token ids (tokenized beforehand, by our tokenizer, with lm-evaluation-harness's rule for
where the context ends), so tokenizing is not timed for any of them; lm-evaluation-harness's model loading and
request building are not timed either. Throughput is in examples per second (an example is all of its choices).
The scorers take turns, `--rounds` rounds, each round starting with the next scorer; median and best are printed.
Every scorer's log-likelihoods are compared with the naive loop's (lm-eval's float32 log-softmax drifts by up to
~1e-3 over long continuations: bench/eval_parity.py). Offline, as bench/eval_parity.py runs lm-evaluation-harness.
Measure on a quiet machine: the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_BATCH = 32


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def take_turns(runs: dict, rounds: int) -> tuple[dict[str, list[float]], dict]:
    """Seconds of each run per round (each round starting with the next run) and each run's last result."""
    keys = list(runs)
    times: dict[str, list[float]] = {k: [] for k in keys}
    results: dict = {}
    for r in range(rounds):
        for key in keys[r % len(keys):] + keys[:r % len(keys)]:
            start = time.perf_counter()
            results[key] = runs[key]()
            times[key].append(time.perf_counter() - start)
    return times, results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", help="a run or checkpoint folder (default: a random tiny-preset model with GPT-2's "
                                      "vocabulary)")
    parser.add_argument("--tasks", default="hellaswag", help="comma list of minigpt eval task names")
    parser.add_argument("--limit", type=int, default=200, help="examples per task (our fixed seeded subset)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help="pairs per pass, ours and lm-eval's")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds, taking turns")
    parser.add_argument("--no-lm-eval", action="store_true", help="leave out lm-evaluation-harness")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="eval_speed_"))
    import eval_parity  # bench/eval_parity.py, beside this file: its offline setup and HF folder

    eval_parity.offline_env(work)  # before anything imports huggingface_hub, datasets or transformers
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import torch

    from minigpt.eval import evaluate, reference, scoring, tasks
    from minigpt.model.gpt import GPT, ModelConfig
    from minigpt.runs.loading import load_run
    from minigpt.text.tokenizer import Tokenizer

    if args.run:
        model, tokenizer, _ = load_run(args.run)
        what = args.run
    else:
        tokenizer = Tokenizer.gpt2()
        torch.manual_seed(0)
        model = GPT(ModelConfig.from_preset("tiny", vocab_size=tokenizer.n_vocab)).eval()
        what = "random tiny preset (4 layers, width 128, context 256), GPT-2 vocabulary"
    lm = None
    if not args.no_lm_eval:
        from lm_eval.models.huggingface import HFLM

        from minigpt.interop.hf import export_hf

        hf_dir = work / "hf_model"
        if args.run:
            export_hf(args.run, hf_dir)
        else:
            eval_parity.save_hf_folder(model, hf_dir)
        threads = torch.get_num_threads()
        lm = HFLM(pretrained=str(hf_dir), device="cpu", dtype="float32", batch_size=args.batch_size)
        torch.set_num_threads(threads)  # the same threads for every scorer, whatever loading did
    print(f"{what}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"lm_eval {eval_parity.lm_eval_version() if lm else '-'}; load average before: {load_average()}")

    b = args.batch_size
    names = {"ours": f"ours, batch {b}", "default": f"ours, batch {b}, default kernels", "one": "ours, batch 1",
             "lm_eval": f"lm-eval hf, batch {b}", "naive": "naive (one pair per pass, full logits)"}
    totals: dict[str, list[float]] = {}
    rows = []
    for task_name in [t for t in args.tasks.split(",") if t]:
        task = tasks.load_task(task_name, limit=args.limit)
        pairs, _ = evaluate.task_pairs(task, tokenizer)
        runs = {names["ours"]: lambda p=pairs: [s.logprob for s in scoring.score_pairs(model, p, b)],
                names["default"]: lambda p=pairs: [s.logprob for s in scoring.score_pairs(model, p, b,
                                                                                          prepack=False)],
                names["one"]: lambda p=pairs: [s.logprob for s in scoring.score_pairs(model, p, 1)]}
        if lm is not None:
            requests = [(("", ""), context, continuation) for context, continuation in pairs]
            runs[names["lm_eval"]] = lambda r=requests: [lp for lp, _ in lm._loglikelihood_tokens(r,
                                                                                                  disable_tqdm=True)]
        runs[names["naive"]] = lambda p=pairs: [s.logprob for s in reference.score_pairs(model, p)]
        times, logprobs = take_turns(runs, args.rounds)
        naive_logprobs = logprobs[names["naive"]]
        tokens = sum(len(c) + len(k) for c, k in pairs)
        print(f"\n{task_name}: {len(task.examples)} examples, {len(pairs)} pairs, {tokens:,} tokens; "
              f"median (best) of {args.rounds} rounds")
        print("| scorer | seconds | examples/s | ours (batch N) is this many times as fast | max abs diff vs naive |")
        print("|---|---:|---:|---:|---:|")
        mine = times[names["ours"]]
        for name, t in times.items():
            diff = max(abs(a - r) for a, r in zip(logprobs[name], naive_logprobs, strict=True))
            faster = f"{statistics.median(t) / statistics.median(mine):.2f}x ({min(t) / min(mine):.2f}x)"
            rate = len(task.examples) / statistics.median(t)
            print(f"| {name} | {statistics.median(t):.2f} ({min(t):.2f}) | {rate:.1f} "
                  f"| {'' if name == names['ours'] else faster} | {diff:.1e} |")
            totals.setdefault(name, []).append(statistics.median(t))
            totals.setdefault(name + " (best)", []).append(min(t))
        rows.append(task_name)
    if len(rows) > 1:
        print(f"\nall {len(rows)} tasks ({', '.join(rows)}): sum of medians (sum of bests)")
        print("| scorer | seconds | ours (batch N) is this many times as fast |")
        print("|---|---:|---:|")
        mine, mine_best = sum(totals[names["ours"]]), sum(totals[names["ours"] + " (best)"])
        for name in times:
            t, best = sum(totals[name]), sum(totals[name + " (best)"])
            faster = f"{t / mine:.2f}x ({best / mine_best:.2f}x)"
            print(f"| {name} | {t:.2f} ({best:.2f}) | {'' if name == names['ours'] else faster} |")
    print(f"load average after: {load_average()}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
