"""`minigpt eval`: how well a model predicts text, and how it does on standard benchmarks.

    minigpt eval runs/tiny                                   # validation loss, ppl, bpb and every benchmark
    minigpt eval runs/tiny --tasks hellaswag,lambada --limit 1000
    minigpt eval runs/tiny --text notes.txt --tasks none     # loss on your own text files
    minigpt eval runs/tiny --tasks my_questions.jsonl        # your own multiple-choice file (docs/evaluation.md)
    minigpt eval runs/tiny --all-checkpoints                 # every kept checkpoint, and a plot per metric

Language modelling: mean cross-entropy (nats per token), perplexity e^loss, and bits per byte
    bpb = loss x tokens / (bytes x ln 2)
which does not depend on the tokenizer, so runs with different vocabularies compare.

Benchmarks (tasks.py builds them): each choice is scored by the log-likelihood of its continuation given the
context (scoring.py: the tokenizing rule and the batching), the way lm-evaluation-harness does it, so the two agree
example by example (bench/eval_parity.py):
- acc picks the choice with the largest summed log-probability; acc_norm divides each by the number of characters
  of the choice's string (lm-evaluation-harness's definition, not a token count).

Results go to RUN/eval/report.json and RUN/eval/report.md (and are printed), beside random chance and GPT-2
124M's published figures. During training, `benchmark_scores` gives the same numbers as flat metric names.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import math
import time
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist

from minigpt.chat.engine import Engine, SamplingParams
from minigpt.common import UserError, atomic_path, pick_device, progress, read_json, write_json
from minigpt.common.config import opt
from minigpt.data.loader import TokenLoader
from minigpt.data.shards import check_tokenizer, read_meta
from minigpt.eval import tasks as tasklib
from minigpt.eval.scoring import encode_pair, score_pairs
from minigpt.runs.checkpoint import checkpoints_dir, unwrap
from minigpt.runs.loading import is_checkpoint, load_run, resolve_checkpoint
from minigpt.runs.log import read_metrics
from minigpt.runs.parallel import lockstep

REPORT_FORMAT, REPORT_VERSION = "minigpt-eval", 1


# ----------------------------------------------------------------------------------------------------------------
# Language modelling


@torch.no_grad()
def language_model_metrics(model: torch.nn.Module, loader, max_batches: int = 0) -> dict[str, float]:
    """Loss, perplexity and bits per byte over a sequential loader (`max_batches` 0: the whole split).

    Under torchrun each rank scores its own windows; the sums are added across ranks at the end.
    """
    model = unwrap(model)
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=loader.device)
    tokens = torch.zeros((), dtype=torch.float64, device=loader.device)
    empty = lambda: (torch.zeros(1, 1, dtype=torch.long, device=loader.device),  # noqa: E731 (see lockstep)
                     torch.full((1, 1), -100, device=loader.device))
    for x, y in lockstep(itertools.islice(loader, max_batches or None), model, empty):
        _, loss = model(x, y, reduction="sum")
        loss_sum += loss.double()
        tokens += (y != -100).sum()
    loader.step = 0
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(loss_sum)
        dist.all_reduce(tokens)
    model.train(was_training)
    n = max(tokens.item(), 1.0)
    loss = loss_sum.item() / n
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "bpb": bits_per_byte(loss, n, n * loader.bytes_per_token),
            "tokens": n}


def bits_per_byte(loss: float, tokens: float, text_bytes: float) -> float:
    """Mean loss in nats per token -> bits per byte of the text those tokens encode."""
    return loss * tokens / (text_bytes * math.log(2))


def shard_metrics(model: torch.nn.Module, tokenizer, shards: str | Path, split: str = "val", batch_size: int = 8,
                  max_batches: int = 0) -> dict[str, float]:
    """Loss, perplexity and bits per byte on one split of a shards folder, in windows of the context length."""
    check_tokenizer(shards, tokenizer)
    model = unwrap(model)
    device = next(model.parameters()).device
    loader = TokenLoader(shards, split, batch_size, model.config.block_size, shuffle=False, device=device)
    return language_model_metrics(model, loader, max_batches)


@torch.no_grad()
def text_metrics(model: torch.nn.Module, tokenizer, paths: list[str | Path], batch_size: int = 8) -> dict[str, float]:
    """Loss, perplexity and bits per byte on text files, each read as one document.

    A file is the end-of-text token followed by its tokens (as in the shards), cut into windows of the context
    length that overlap by one token, so every token after the first is predicted exactly once; bpb counts the
    files' UTF-8 bytes.
    """
    model = unwrap(model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    T = model.config.block_size
    windows: list[list[int]] = []
    text_bytes = 0
    for path in paths:
        try:
            data = Path(path).read_bytes()
            text = data.decode("utf-8")
        except OSError as exc:
            raise UserError(f"cannot read {path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise UserError(f"{path} is not UTF-8 text") from None
        text_bytes += len(data)
        ids = [tokenizer.eot_id, *tokenizer.encode_ordinary(text)]
        windows += [ids[start:start + T + 1] for start in range(0, len(ids) - 1, T)]
    if not windows:
        raise UserError("the text files hold no text to score")
    windows.sort(key=len, reverse=True)
    loss_sum, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        batch = windows[start:start + batch_size]
        width = len(batch[0]) - 1
        x = torch.zeros(len(batch), width, dtype=torch.long)
        y = torch.full((len(batch), width), -100, dtype=torch.long)  # (B, T): -100 where a row is padding
        for row, ids in enumerate(batch):
            x[row, :len(ids) - 1] = torch.tensor(ids[:-1])
            y[row, :len(ids) - 1] = torch.tensor(ids[1:])
        _, loss = model(x.to(device), y.to(device), reduction="sum")
        loss_sum += loss.item()
        count += int((y != -100).sum())
    model.train(was_training)
    loss = loss_sum / count
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "bpb": bits_per_byte(loss, count, text_bytes),
            "tokens": float(count)}


# ----------------------------------------------------------------------------------------------------------------
# Generation and exact match


_STOP_IDS: dict[str, list[int]] = {}


def stop_token_ids(tokenizer) -> list[int]:
    """Every token whose text holds a stop string (and the special tokens): generation ends at any of them."""
    if tokenizer.hash not in _STOP_IDS:
        stops = [s.encode() for s in tasklib.STOP]
        special = set(tokenizer.special_tokens.values())
        _STOP_IDS[tokenizer.hash] = [i for i in range(tokenizer.n_vocab)
                                     if i in special or any(s in tokenizer.token_bytes(i) for s in stops)]
    return _STOP_IDS[tokenizer.hash]


def generate_answers(model: torch.nn.Module, tokenizer, prompts: list[str], batch_size: int = 32,
                     max_new_tokens: int = 32, bar=None) -> list[str]:
    """Greedy continuations of `prompts` (left-truncated to fit), cut before the first stop string."""
    model = unwrap(model)
    budget = min(max_new_tokens, model.config.block_size // 2)
    keep = model.config.block_size - budget
    ids = [tokenizer.encode_ordinary(p)[-keep:] or [tokenizer.eot_id] for p in prompts]
    special = set(tokenizer.special_tokens.values())
    params = SamplingParams(max_new_tokens=budget, temperature=0.0, stop_token_ids=stop_token_ids(tokenizer))
    outputs: list[list[int]] = [[] for _ in prompts]
    with Engine(model, max_batch=batch_size) as engine:  # closed at once: a training run may update the weights next
        for events in engine.stream(ids, params):
            for event in events:
                if event.token not in special:  # the stop token itself may hold text before its stop string
                    outputs[event.index].append(event.token)
                if event.finish_reason is not None and bar is not None:
                    bar.update(1)
    texts = []
    for tokens in outputs:
        text = tokenizer.decode(tokens)
        cut = min([text.find(s) for s in tasklib.STOP if s in text], default=len(text))
        texts.append(text[:cut])
    return texts


# ----------------------------------------------------------------------------------------------------------------
# Tasks


@dataclasses.dataclass
class TaskResult:
    name: str
    metrics: dict[str, float]  # fractions for accuracies (0.31 = 31%)
    n: int
    shots: int
    chance: dict[str, float]
    reference: dict[str, float]
    seconds: float
    note: str = ""
    per_example: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def task_pairs(task: tasklib.Task, tokenizer) -> tuple[list[tuple[list[int], list[int]]], list[int]]:
    """Every (context, continuation) request of a task as token ids, and the example each belongs to."""
    pairs, owners = [], []
    for k, example in enumerate(task.examples):
        for context, continuation in example.requests:
            pairs.append(encode_pair(tokenizer, context, continuation))
            owners.append(k)
    return pairs, owners


def run_task(model: torch.nn.Module, tokenizer, task: tasklib.Task, batch_size: int = 32, show: bool = True,
             pairs: tuple[list, list] | None = None) -> TaskResult:
    """Score one task; `pairs` may hold `task_pairs(task, tokenizer)` computed earlier."""
    model = unwrap(model)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    examples = task.examples
    with progress(len(examples), desc=task.name, unit="ex", disable=None if show else True) as bar:
        if task.kind == "generate":
            answers = generate_answers(model, tokenizer, [e.prompt for e in examples], batch_size, bar=bar)
            per_example = [{"id": e.id, "answer": a, "correct": tasklib.exact_match(a, e.answers)}
                           for e, a in zip(examples, answers, strict=True)]
            metrics = {"em": tasklib.mean(r["correct"] for r in per_example)}
            chance = {"em": 0.0}
        else:
            token_pairs, owners = pairs or task_pairs(task, tokenizer)
            scores = score_pairs(model, token_pairs, batch_size, owners, bar)
            per_example, k = [], 0
            for e in examples:
                mine = scores[k:k + len(e.requests)]
                k += len(e.requests)
                record = {"id": e.id, "logprobs": [s.logprob for s in mine], "group": e.group}
                if task.kind == "cloze":
                    record["greedy"] = mine[0].greedy
                else:
                    record["pred"], record["pred_norm"] = tasklib.choose(record["logprobs"], e.lengths)
                    record["acc"] = record["pred"] in e.labels
                    record["acc_norm"] = record["pred_norm"] in e.labels
                    record["chance"] = len(e.labels) / len(e.requests)
                per_example.append(record)
            metrics, chance = tasklib.aggregate(task, per_example)
    model.train(was_training)
    return TaskResult(task.name, metrics, len(examples), task.shots, chance, task.reference,
                      time.perf_counter() - start, task.note, per_example)


_PREPARED: dict[tuple, tuple[tasklib.Task, tuple[list, list] | None]] = {}


def benchmark_scores(model: torch.nn.Module, tokenizer, tasks: list[str], limit: int, device: Any = None,
                     batch_size: int = 32, *, shots: int | None = None, shards: str | None = None,
                     seed: int = tasklib.SEED, show: bool = False) -> dict[str, float]:
    """Benchmark metrics under flat names ("hellaswag/acc_norm", "recall/heldout/acc"), for training logs.

    Tasks are read and tokenized once per process and reused on later calls. `device` is where the model's
    weights already are (it is not moved; default: found from the model). `shards` is the training data folder,
    which lets the recall probe tell trained articles from held-out ones. The model's train/eval mode is kept.
    """
    model = unwrap(model)
    if device is not None and torch.device(device).type != next(model.parameters()).device.type:
        raise UserError(f"the model is on {next(model.parameters()).device}, not {device}")
    out: dict[str, float] = {}
    for name in tasklib.task_names(tasks):
        key = (name, limit, shots, seed, str(shards), tokenizer.hash, model.config.block_size)
        if key not in _PREPARED:
            task = tasklib.load_task(name, limit, shots, seed, shards=shards)
            _PREPARED[key] = (task, None if task.kind == "generate" else task_pairs(task, tokenizer))
        task, pairs = _PREPARED[key]
        result = run_task(model, tokenizer, task, batch_size, show, pairs)
        out.update({f"{task.name}/{metric}": value for metric, value in result.metrics.items()})
    return out


# ----------------------------------------------------------------------------------------------------------------
# Reports


def evaluate_model(model: torch.nn.Module, tokenizer, task_list: list[tasklib.Task], shards: str | None = None,
                   split: str = "val", text: list[str] | None = None, batch_size: int = 32,
                   max_batches: int = 0, cache: dict | None = None) -> dict[str, Any]:
    """One model on everything asked: {"language_model": {...}, "tasks": {...}, "metrics": flat}."""
    entry: dict[str, Any] = {"language_model": {}, "tasks": {}, "metrics": {}}
    if shards:
        lm = shard_metrics(model, tokenizer, shards, split, max(batch_size // 4, 1), max_batches)
        entry["language_model"][split] = {**lm, "source": str(shards)}
    if text:
        entry["language_model"]["text"] = {**text_metrics(model, tokenizer, text, max(batch_size // 4, 1)),
                                           "source": ", ".join(map(str, text))}
    for where, lm in entry["language_model"].items():
        entry["metrics"].update({f"{where}/{k}": lm[k] for k in ("loss", "ppl", "bpb")})
    cache = {} if cache is None else cache
    for task in task_list:
        if task.kind != "generate" and task.name not in cache:
            cache[task.name] = task_pairs(task, tokenizer)
        result = run_task(model, tokenizer, task, batch_size, True, cache.get(task.name))
        entry["tasks"][task.name] = {k: v for k, v in dataclasses.asdict(result).items() if k != "per_example"}
        entry["metrics"].update({f"{task.name}/{k}": v for k, v in result.metrics.items()})
    return entry


def _format(metric: str, value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    name = metric.rsplit("/", 1)[-1]
    if name in ("acc", "acc_norm", "em"):
        return f"{100 * value:.2f}"
    if name == "n":
        return f"{value:,.0f}"
    return f"{value:.4f}" if name in ("loss", "bpb") else f"{value:,.2f}"


def report_markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown table: one row per metric, one column per checkpoint, then chance and GPT-2."""
    entries = report["checkpoints"]
    heads = [f"step {e['step']}" + ("" if e.get("verified", True) else " (unverified)") for e in entries]
    lines = [f"# Evaluation of {report['run']}", "",
             f"{report['date']}, {report['device']}. Accuracies in %, chance = random guessing; GPT-2 124M = "
             "published figures (HellaSwag: lm-evaluation-harness; LAMBADA: the GPT-2 paper).", "",
             "| task | metric | n | shots | " + " | ".join(heads) + " | chance | GPT-2 124M |",
             "|---|---|---:|---:|" + "---:|" * len(heads) + "---:|---:|"]
    last = entries[-1]
    for where, lm in last["language_model"].items():
        for k in ("loss", "ppl", "bpb"):
            values = " | ".join(_format(k, e["metrics"].get(f"{where}/{k}")) for e in entries)
            lines.append(f"| {where} ({lm['source']}) | {k} | {lm['tokens']:,.0f} tok | | {values} | | |")
    for name, task in last["tasks"].items():
        for metric in task["metrics"]:
            if metric.endswith("/n"):
                continue
            group_n = task["metrics"].get(metric.rsplit("/", 1)[0] + "/n") if "/" in metric else None
            n = group_n if group_n is not None else task["n"]
            values = " | ".join(_format(metric, e["metrics"].get(f"{name}/{metric}")) for e in entries)
            lines.append(f"| {name} | {metric} | {n:,.0f} | {task['shots']} | {values} | "
                         f"{_format(metric, task['chance'].get(metric))} | "
                         f"{_format(metric, task['reference'].get(metric))} |")
    notes = [f"- {name}: {task['note']}" for name, task in last["tasks"].items() if task["note"]]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def plot_metrics(report: dict[str, Any], run: Path, out: Path) -> list[Path]:
    """One PNG per metric: its value at each evaluated checkpoint, and as logged during training if it was."""
    series: dict[str, list[tuple[int, float]]] = {}
    for entry in report["checkpoints"]:
        for key, value in entry["metrics"].items():
            if not key.endswith("/n") and isinstance(value, (int, float)) and math.isfinite(value):
                series.setdefault(key, []).append((entry["step"], value))
    logged: dict[str, list[tuple[int, float]]] = {}
    for record in read_metrics(run / "metrics.jsonl"):
        for key, value in record.items():
            if "/" in key and isinstance(value, (int, float)) and "step" in record:
                logged.setdefault(key, []).append((record["step"], value))
    names = sorted(k for k in set(series) | set(logged) if len(series.get(k, [])) > 1 or k in logged)
    if not names:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name in names:
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
        if name in logged:
            ax.plot(*zip(*logged[name], strict=True), ".-", label="logged during training", alpha=0.7)
        if name in series:
            ax.plot(*zip(*series[name], strict=True), "o-", label="checkpoint evaluation")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(name)
        ax.set_title(f"{run.name}: {name}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out / "plots" / (name.replace("/", "_") + ".png")
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)
        written.append(path)
    return written


# ----------------------------------------------------------------------------------------------------------------
# The stage: `minigpt eval`'s settings, and a run scored into its report


@dataclasses.dataclass
class EvalConfig:
    """Settings of `minigpt eval`."""

    run: str = opt("", "run folder or checkpoint folder to evaluate")
    checkpoint: str = opt("latest", "which checkpoint of a run: latest, best, or a name like step_00001000")
    all_checkpoints: bool = opt(False, "evaluate every kept checkpoint of the run and plot each metric")
    data: str = opt("", "token shards for loss/ppl/bpb (default: the run's training data, if it still exists)")
    split: Literal["val", "train"] = opt("val", "split of --data to score")
    text: list[str] = opt([], "text files to score instead of (or besides) shards")
    max_batches: int = opt(0, "batches of --data to score (0: the whole split)")
    tasks: list[str] = opt(["all"], "benchmarks: all, none, a comma list of " + ", ".join(tasklib.TASK_NAMES)
                                    + ", or .jsonl / BIG-bench .json files")
    limit: int = opt(0, "examples per task, a fixed seeded subset (0: all)")
    shots: int = opt(-1, "few-shot examples per prompt (-1: each task's default: 5 for triviaqa/nq_open, else 0)")
    distractors: int = opt(4, "wrong continuations per article in the recall probe (chance = 1 / (this + 1))")
    seed: int = opt(tasklib.SEED, "seed of the subsets, few-shot draws and distractors")
    batch_size: int = opt(32, "sequences per forward pass")
    device: str = opt("auto", "auto, cpu, cuda, mps")
    out: str = opt("", "folder for report.json, report.md and plots (default: RUN/eval)")

    def __post_init__(self) -> None:
        if self.limit < 0 or self.max_batches < 0 or self.batch_size < 1:
            raise ValueError("limit and max_batches may not be negative; batch_size must be positive")


def _run_and_checkpoints(cfg: EvalConfig) -> tuple[Path, list[Path]]:
    if not cfg.run:
        raise UserError("give a run folder or checkpoint folder to evaluate")
    ckpt = resolve_checkpoint(cfg.run, cfg.checkpoint)
    run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt
    if not cfg.all_checkpoints:
        return run, [ckpt]
    found = sorted(p for p in checkpoints_dir(run).glob("step_*") if is_checkpoint(p))
    if not found:
        raise UserError(f"{run} has no kept checkpoints")
    return run, found


def _default_data(run: Path) -> str:
    """The shards the run was trained on, as its config.json recorded them, if that folder still exists."""
    config = run / "config.json"
    if not config.is_file():
        return ""
    data = read_json(config).get("data") or ""
    return data if data and (Path(data) / "meta.json").is_file() else ""


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Run `cfg`; writes report.json, report.md (and plots) and returns the report."""
    device = pick_device(cfg.device)
    run, checkpoints = _run_and_checkpoints(cfg)
    data = cfg.data or _default_data(run)
    if cfg.data and not (Path(cfg.data) / "meta.json").is_file():
        raise UserError(f"{cfg.data} holds no shards (no meta.json)")
    task_list = [tasklib.load_task(n, cfg.limit, cfg.shots, cfg.seed, cfg.distractors, data or None)
                 for n in tasklib.task_names(cfg.tasks)]
    entries, cache = [], {}
    for ckpt in checkpoints:
        model, tokenizer, meta = load_run(ckpt, device)
        shards = data
        # the default data: skipped, not refused, when its tokenizer differs
        if shards and not cfg.data and read_meta(shards)["tokenizer"]["hash"] != tokenizer.hash:
            shards = ""
        print(f"evaluating {ckpt} (step {meta.get('step', 0)})", flush=True)
        entry = evaluate_model(model, tokenizer, task_list, shards or None, cfg.split, cfg.text, cfg.batch_size,
                               cfg.max_batches, cache)
        entries.append({"checkpoint": str(ckpt), "step": int(meta.get("step", 0)),
                        "tokens_seen": meta.get("tokens_seen"), "verified": meta["verified"], **entry})
    report = {"format": REPORT_FORMAT, "version": REPORT_VERSION, "run": str(run),
              "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "device": str(device), "settings": dataclasses.asdict(cfg), "checkpoints": entries}
    out = Path(cfg.out) if cfg.out else run / "eval"
    write_json(out / "report.json", report)
    markdown = report_markdown(report)
    (out / "report.md").write_text(markdown)
    plots = plot_metrics(report, run, out)
    print(markdown + f"\nwrote {out / 'report.json'}, {out / 'report.md'}"
          + (f" and {len(plots)} plots in {out / 'plots'}" if plots else ""))
    return report
