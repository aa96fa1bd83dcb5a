"""Packed rows: attention stays inside each conversation, packed loss equals padded loss equals each conversation
alone, rows fill the window, batches are deterministic, resumable and split across ranks, weights repeat sources,
and evaluation is bounded, under autocast and synchronised once."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from minigpt.data.sft_batches import (
    ConversationBatches,
    ConversationSet,
    Part,
    assemble,
    evaluation_rows,
    held_out_loss,
    pack,
    plan_epoch,
)
from minigpt.data.sft_data import PrepareSettings, prepare_source
from minigpt.model.gpt import GPT, ModelConfig, document_attention
from minigpt.text.chat_format import render
from minigpt.text.tokenizer import Tokenizer

WINDOW = 64


@pytest.fixture(scope="module")
def tokenizer(tiny_shards) -> Tokenizer:
    return Tokenizer.load(tiny_shards / "tokenizer.json")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tokenizer):
    """150 conversations of 10 to 120 tokens (some longer than WINDOW), prepared."""
    root = tmp_path_factory.mktemp("packing")
    rng = np.random.default_rng(0)
    words = ["the", "of", "and", "in", "a", "is", "was", "to", "for", "as", "on", "by", "with"]
    rows = []
    for _ in range(150):
        say = lambda k: " ".join(rng.choice(words, int(k)))  # noqa: E731
        answer = say(rng.integers(1, 60) if rng.random() < 0.9 else 90)
        rows.append({"messages": [{"role": "user", "content": say(rng.integers(1, 8))},
                                  {"role": "assistant", "content": answer}]})
    path = root / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return prepare_source(str(path), tokenizer, PrepareSettings(held_out=0.2, workers=1), root / "cache", quiet=True)


@pytest.fixture(scope="module")
def model(tokenizer) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=WINDOW, vocab_size=tokenizer.n_vocab)).eval()


def test_document_attention_is_block_diagonal_causal():
    positions, mask = document_attention(torch.tensor([[0, 0, 0, 1, 1, 2]]))
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0]]
    expected = torch.zeros(6, 6, dtype=torch.bool)
    for block in ((0, 3), (3, 5), (5, 6)):
        for i in range(*block):
            expected[i, block[0]:i + 1] = True
    assert torch.equal(mask[0, 0], expected)


def test_a_conversation_cannot_see_its_neighbours_in_a_row(model, tokenizer):
    a = render(tokenizer, [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there"}])[0]
    b = render(tokenizer, [{"role": "user", "content": "Name?"}, {"role": "assistant", "content": "Mini."}])[0]
    c = render(tokenizer, [{"role": "user", "content": "Other"}, {"role": "assistant", "content": "Else!"}])[0]

    def row(first, second):
        x = torch.tensor([first + second + [0] * (WINDOW - len(first) - len(second))])
        doc = torch.tensor([[0] * len(first) + [1] * len(second) + [2] * (WINDOW - len(first) - len(second))])
        with torch.no_grad():
            return model(x, doc_ids=doc)[0][0]

    ab, cb, ac = row(a, b), row(c, b), row(a, c)
    torch.testing.assert_close(ab[len(a):len(a) + len(b)], cb[len(c):len(c) + len(b)])  # b ignores what precedes it
    torch.testing.assert_close(ab[:len(a)], ac[:len(a)])  # a ignores what follows it
    with torch.no_grad():
        alone = model(torch.tensor([b]))[0][0]
    torch.testing.assert_close(ab[len(a):len(a) + len(b)], alone)  # positions restart: packed equals alone
    assert not torch.allclose(ab[:len(a)], cb[:len(c)])  # (the rows do differ where they should)


def test_packed_loss_equals_padded_loss_equals_each_conversation_alone(prepared, model):
    convs = ConversationSet([Part(prepared.split("train"))], WINDOW)
    packed_rows = plan_epoch(convs, seed=5, epoch=0, packed=True)
    padded_rows = plan_epoch(convs, seed=5, epoch=0, packed=False)
    assert sorted(np.concatenate(packed_rows).tolist()) == sorted(np.concatenate(padded_rows).tolist())
    assert convs.truncated.any() and max(map(len, packed_rows)) > 1 and len(packed_rows) < len(padded_rows)

    def total(rows, packed):
        x, y, doc, _ = assemble(convs, rows, pad_id=0, packed=packed)
        extra = {} if doc is None else {"doc_ids": torch.from_numpy(doc)}
        with torch.no_grad():
            return model(torch.from_numpy(x), torch.from_numpy(y), reduction="sum", **extra)[1].item()

    packed = sum(total(packed_rows[i:i + 8], True) for i in range(0, len(packed_rows), 8))
    padded = sum(total(padded_rows[i:i + 8], False) for i in range(0, len(padded_rows), 8))
    alone = 0.0
    for i in np.concatenate(padded_rows):  # the reference: each conversation rendered and scored by itself
        ids, trained = convs.parts[0].split.conversation(int(i), WINDOW + 1)
        x, y = torch.from_numpy(ids[:-1])[None], torch.from_numpy(np.where(trained[1:], ids[1:], -100))[None]
        with torch.no_grad():
            alone += model(x, y, reduction="sum")[1].item()
    assert packed == pytest.approx(alone, rel=1e-5) and padded == pytest.approx(alone, rel=1e-5)


def test_rows_are_filled_on_the_bundled_mix_and_on_smoltalk_lengths(tmp_path, tokenizer):
    settings = PrepareSettings(workers=2)
    parts = [Part(prepare_source(s, tokenizer, settings, tmp_path, quiet=True).split("train"))
             for s in ("chatterbot", "wiki-qa")]
    convs = ConversationSet(parts, 256)  # the tiny preset's window
    rows = plan_epoch(convs, seed=0, epoch=0, packed=True)
    fill = convs.positions[np.concatenate(rows)].sum() / (len(rows) * 256)
    assert fill > 0.9
    assert all(convs.positions[r].sum() <= 256 for r in rows)
    rng = np.random.default_rng(0)  # SmolTalk-like: 60 to 1,000 tokens and a long tail, GPT-2's 1,024 window
    lengths = np.clip(rng.lognormal(np.log(400), 0.7, 20_000), 60, 4000).astype(np.int64)
    positions = np.minimum(lengths - 1, 1024)
    rows = pack(rng.permutation(len(lengths)), positions, 1024)
    assert sorted(np.concatenate(rows).tolist()) == list(range(len(lengths)))
    assert positions.sum() / (len(rows) * 1024) > 0.9


def test_batches_are_pure_in_the_step_resumable_and_split_across_ranks(prepared):
    convs = ConversationSet([Part(prepared.split("train"))], WINDOW)
    a = ConversationBatches(convs, 4, pad_id=0, seed=1)
    b = ConversationBatches(convs, 4, pad_id=0, seed=1)
    for step in (0, 7, 40, 3):  # 40 is past the first epoch
        xa, ya, da = a.batch(step)
        xb, yb, db = b.batch(step)
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(da["doc_ids"], db["doc_ids"])
    assert a.rows_in_epoch(0) * 1 < 41 * 4
    a.step = 9
    c = ConversationBatches(convs, 4, pad_id=0, seed=1)
    c.load_state_dict(a.state_dict())
    assert c.step == 9
    with pytest.raises(Exception, match="cannot resume"):
        ConversationBatches(convs, 4, pad_id=0, seed=2).load_state_dict(a.state_dict())
    rows = lambda batch: {tuple(r.tolist()) for r in batch[0]}  # noqa: E731
    ranks = [rows(ConversationBatches(convs, 2, 0, 1, rank=r, world=2).batch(3)) for r in range(2)]
    assert ranks[0] | ranks[1] == rows(a.batch(3)) and not ranks[0] & ranks[1]
    x, y, doc = a.batch(0)
    real = (doc["doc_ids"] != doc["doc_ids"].max(dim=1, keepdim=True).values) | (x != 0)
    assert ((y != -100) <= real).all()  # padding is never a target
    assert 0 < a.metrics()["fill"] <= 1 and a.metrics()["fill"] == 0  # counted per window, reset when read


def test_weights_repeat_or_subsample_a_source(prepared):
    split = prepared.split("train")
    usable = int(ConversationSet([Part(split)], WINDOW).usable.sum())
    triple = ConversationSet([Part(split, 3.0)], WINDOW).epoch(np.random.default_rng(0))
    assert len(triple) == 3 * usable and np.bincount(triple).max() == 3
    half = ConversationSet([Part(split, 1.5)], WINDOW)
    first, second = half.epoch(np.random.default_rng([0, 0])), half.epoch(np.random.default_rng([0, 1]))
    assert len(first) == len(second) == usable + round(0.5 * usable)
    assert set(np.flatnonzero(np.bincount(first) == 2)) != set(np.flatnonzero(np.bincount(second) == 2))


class Spy(torch.nn.Module):
    """A model wrapper that records each forward call's autocast state."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, *args, **kwargs):
        self.calls.append(torch.is_autocast_enabled("cpu"))
        return self.model(*args, **kwargs)


def test_evaluation_is_bounded_under_autocast_and_synchronised_once(prepared, model, monkeypatch):
    convs = ConversationSet([Part(prepared.split("val"))], WINDOW)
    every = evaluation_rows(convs, seed=0, packed=True)
    assert evaluation_rows(convs, seed=0, packed=True, limit=2 * 3) == every[:6]
    spy = Spy(model)
    syncs = []
    for name in ("item", "tolist", "__bool__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda t, *a, _o=original, **k: syncs.append(1) or _o(t, *a, **k))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bounded = held_out_loss(spy, convs, every[:6], 0, batch_size=3, packed=True)
    monkeypatch.undo()
    assert spy.calls == [True, True] and len(syncs) == 1
    full = held_out_loss(model, convs, every, 0, batch_size=3, packed=True)
    padded = held_out_loss(model, convs, evaluation_rows(convs, 0, packed=False), 0, batch_size=3, packed=False)
    assert full == pytest.approx(padded, rel=1e-5) and bounded == pytest.approx(full, rel=0.1)
