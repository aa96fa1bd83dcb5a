"""The factual-recall probe: cloze questions on the bundled Wikipedia summaries, grouped by whether the run trained
on the article (docs/evaluation.md, "The factual-recall probe").

An article whose first sentence reads "X is a/an/the ..." becomes a question: the prompt up to the article
("Paris\\n\\nParis is the"), the next three words as the true continuation (" capital and largest"), and the same
span of other articles with the same copula and article as distractors. The run's shards say which articles it
saw: their split rule is recomputed from meta.json.

Questions come out as plain records; tasks.py's `load_task("recall")` caches the articles' clozes beside the
benchmarks' documents and turns the questions into a Task, as it does for every other source.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from minigpt.common import is_held_out
from minigpt.data.shards import read_meta
from minigpt.text import corpus

RECALL = "recall"  # the task's name; also seeds its orders and its distractors
RECALL_WORDS = 3  # words in each continuation
_COPULA = re.compile(r"\b(is|was|are|were) (a|an|the) ")
_WORD = re.compile(r"[\w'-]+")


def recall_cloze(text: str) -> dict[str, str] | None:
    """"Title\\n\\nX is a Y Z W ..." -> the prompt up to the article and the next three words, or None.

    Only the first sentence is used, the copula must come within its first 150 characters, and the three words
    must be plain words (no punctuation between them), so every continuation is a comparable span."""
    title, sep, body = text.partition("\n\n")
    if not sep:
        return None
    sentence = body.split(". ", 1)[0]
    m = _COPULA.search(sentence)
    if m is None or m.start() > 150:
        return None
    words = sentence[m.end():].split(" ")[:RECALL_WORDS]
    if len(words) < RECALL_WORDS or not all(_WORD.fullmatch(w) for w in words):
        return None
    return {"context": f"{title}\n\n{body[:m.end() - 1]}", "span": " ".join(words), "key": m.group(0).strip()}


def recall_docs() -> list[dict[str, Any]]:
    """Every bundled Wikipedia article that makes a question: its source id, whether it is the corpus's first
    document, and its `recall_cloze`."""
    docs = []
    for i, doc in enumerate(corpus.iter_documents("wiki")):
        cloze = recall_cloze(doc.text)
        if cloze is not None:
            docs.append({"source": doc.source, "first": i == 0, **cloze})
    return docs


def recall_grouping(shards: str | os.PathLike | None) -> tuple[Callable[[dict[str, Any]], str], str]:
    """Which articles the run trained on, from its shards' split rule; returns (doc -> group, explanation).

    - shards built from the bundled `wiki` corpus: an article is "heldout" where `common.is_held_out` (with the
      seed and fraction in meta.json) put it in validation, or it was the corpus's first document; else "seen".
    - shards from other data: no article was trained on as such, so all are "heldout".
    - no shards known (an imported model): all are reported together as "all".
    """
    if not shards or not (Path(shards) / "meta.json").is_file():
        return (lambda doc: "all"), "training data unknown: all articles reported together"
    meta = read_meta(shards)
    if "wiki" not in meta["sources"]:
        return (lambda doc: "heldout"), f"{shards} was not built from the bundled wiki corpus: all articles held out"
    seed, fraction = meta["split"]["seed"], meta["split"]["val_fraction"]
    first_held = meta["sources"][0] == "wiki" and fraction > 0

    def group(doc: dict[str, Any]) -> str:
        held = (first_held and doc["first"]) or is_held_out(doc["source"], fraction, seed)
        return "heldout" if held else "seen"

    return group, f"seen/held-out by the split rule of {shards} (seed {seed}, validation fraction {fraction})"


def recall_questions(docs: list[dict[str, Any]], shards: str | os.PathLike | None, limit: int, distractors: int,
                     seed: int) -> tuple[list[dict[str, Any]], str]:
    """The questions on `docs` (`recall_docs`), grouped by `recall_grouping(shards)`; returns (questions, the
    grouping's explanation). Each question is {"source", "context", "choices", "label", "group"}: the true span
    and `distractors` wrong ones in a seeded order, `label` the true one's index.

    Groups come in name order, each in its own seeded order; `limit` (0: all) takes that many articles of each.
    An article whose copula and article have too few other spans is left out."""
    group, note = recall_grouping(shards)
    by_key: dict[str, dict[str, str]] = {}  # copula and article -> distinct spans (by casefold)
    for doc in docs:
        by_key.setdefault(doc["key"], {}).setdefault(doc["span"].casefold(), doc["span"])
    pools = {key: sorted(spans.values()) for key, spans in by_key.items()}
    groups: dict[str, list[dict[str, Any]]] = {}
    for doc in docs:
        groups.setdefault(group(doc), []).append(doc)
    questions = []
    for name in sorted(groups):
        members = groups[name]
        random.Random(f"{RECALL}:{seed}").shuffle(members)
        taken = 0
        for doc in members:
            if limit and taken >= limit:
                break
            # Distractors share the copula and article ("was an"), so every choice reads grammatically.
            pool = pools[doc["key"]]
            if len(pool) <= distractors:
                continue
            rng = random.Random(f"{RECALL}:{seed}:{doc['source']}")
            true = doc["span"].casefold()
            wrong = [s for s in rng.sample(pool, distractors + 1) if s.casefold() != true][:distractors]
            choices = [doc["span"], *wrong]
            rng.shuffle(choices)
            questions.append({"source": doc["source"], "context": doc["context"], "choices": choices,
                              "label": choices.index(doc["span"]), "group": name})
            taken += 1
    return questions, note
