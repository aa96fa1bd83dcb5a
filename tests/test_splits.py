"""The split rule (common.is_held_out) keeps every held-out set made so far: the bundled articles and conversations
held out today are pinned here by a digest of their keys, so a change to the rule, its key format or a reader's
keys cannot move documents between training and validation unnoticed."""

from __future__ import annotations

import hashlib

import pytest

from minigpt.common import is_held_out
from minigpt.text import conversations, corpus


def digest(keys: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:16]


def test_held_out_articles_of_the_bundled_wiki_are_unchanged():
    keys = [doc.source for doc in corpus.iter_documents("wiki")]
    held = [k for k in keys if is_held_out(k, 0.02, 0)]  # the quickstart's split: seed 0, 2%
    assert (len(keys), len(held), digest(held)) == (10033, 197, "8ba7c11838709377")


@pytest.mark.parametrize("source, seed, count, expected", [
    ("wiki-qa", 0, 510, "10a66b11a5c8ff3e"), ("wiki-qa", 1337, 506, "4da67d13fb95aa27"),
    ("chatterbot", 0, 111, "0f302e882f8b6050"), ("chatterbot", 1337, 93, "bdcb9d76dc25d1f6")])
def test_held_out_conversations_of_the_bundled_sets_are_unchanged(source, seed, count, expected):
    convs = conversations.load_conversations([source])
    _, held = conversations.split_conversations(convs, 0.05, seed)  # sft's default share
    assert (len(held), digest([c.key for c in held])) == (count, expected)


def test_the_two_byte_orders_are_different_splits():
    keys = [f"doc{i}" for i in range(2000)]
    little = {k for k in keys if is_held_out(k, 0.1, 0)}
    big = {k for k in keys if is_held_out(k, 0.1, 0, "big")}
    assert 150 < len(little) < 250 and 150 < len(big) < 250 and little != big
