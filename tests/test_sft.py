"""Fine-tuning: the chat format and its loss mask, conversation formats, batches, vocabulary growth, the stage."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from minigpt.chat import Message, render
from minigpt.checkpoint import load_run
from minigpt.cli import main as cli_main
from minigpt.common import UserError
from minigpt.log import read_metrics
from minigpt.model import GPT, ModelConfig
from minigpt.sft import (
    Conversation,
    ConversationBatches,
    answer_quality,
    article_opening,
    chatterbot_conversations,
    encode_conversation,
    file_conversations,
    grow_vocabulary,
    load_conversations,
    split_conversations,
    wiki_qa_conversations,
)
from minigpt.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_shards) -> Tokenizer:
    return Tokenizer.load(tiny_shards / "tokenizer.json")


def test_render_marks_only_assistant_text_and_its_end(tokenizer):
    t = tokenizer.chat_token_ids
    messages = [Message("system", "Be brief."), Message("user", "Hi <|end|>"), Message("assistant", "Hello."),
                Message("user", "Bye"), Message("assistant", "Bye!")]
    ids, trained = render(tokenizer, messages)
    assert ids[0] == tokenizer.eot_id and ids[1] == t["<|system|>"]
    assert ids.count(t["<|end|>"]) == 5  # the user's "<|end|>" is plain text, not the token
    kept = [i for i, flag in zip(ids, trained, strict=True) if flag]
    hello, bye = tokenizer.encode_ordinary("Hello."), tokenizer.encode_ordinary("Bye!")
    assert kept == hello + [t["<|end|>"]] + bye + [t["<|end|>"]]
    prompt, _ = render(tokenizer, messages[:2], add_generation_prompt=True)
    assert prompt[-1] == t["<|assistant|>"]


def test_masked_positions_contribute_nothing(tokenizer):
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=64, vocab_size=tokenizer.n_vocab))
    conv = Conversation("k", [Message("user", "What is a cat?"), Message("assistant", "A small animal.")])
    x, y = encode_conversation(tokenizer, conv, 64)
    x, y = torch.from_numpy(x)[None], torch.from_numpy(y)[None]
    logits, loss_sum = model(x, y, reduction="sum")
    logits.retain_grad()
    loss_sum.backward()
    counted = y != -100
    assert logits.grad[~counted].abs().max() == 0  # no gradient flows from masked positions
    assert logits.grad[counted].abs().max() > 0
    manual = torch.nn.functional.cross_entropy(logits[counted].detach(), y[counted], reduction="sum")
    assert loss_sum.item() == pytest.approx(manual.item(), rel=1e-6)


def test_three_file_formats(tmp_path):
    path = tmp_path / "mixed.jsonl"
    rows = [{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                          {"role": "assistant", "content": "A"}]},
            {"instruction": "Add", "input": "1 and 2", "output": "3"},
            {"conversations": [{"from": "human", "value": "Hey"}, {"from": "gpt", "value": "Hello"}]},
            {"messages": [{"role": "user", "content": "no answer"}]}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    convs = list(file_conversations(path))
    assert [[m.role for m in c.messages] for c in convs] == [["system", "user", "assistant"], ["user", "assistant"],
                                                             ["user", "assistant"]]
    assert convs[1].messages[0].content == "Add\n\n1 and 2"
    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps(rows[:2]))
    assert len(list(file_conversations(as_list))) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(UserError, match="not a conversation"):
        list(file_conversations(bad))
    with pytest.raises(UserError, match="no conversations at"):
        load_conversations([str(tmp_path / "missing.jsonl")])


def test_bundled_conversations():
    chatter = list(chatterbot_conversations())
    assert len(chatter) > 500 and all(c.messages[-1].role == "assistant" for c in chatter)
    wiki = list(wiki_qa_conversations())
    assert len(wiki) > 9000 and all(c.subject for c in wiki[:100])
    first = wiki[0]
    assert first.subject in first.messages[0].content and first.messages[1].content
    text = "Alpha is one. Beta is two. Gamma " + "x" * 400
    assert article_opening(text, max_chars=30) == "Alpha is one. Beta is two."


def test_held_out_split_is_deterministic_and_disjoint():
    convs = [Conversation(f"k{i}", []) for i in range(2000)]
    train_a, held_a = split_conversations(convs, 0.1, seed=3)
    train_b, held_b = split_conversations(convs, 0.1, seed=3)
    assert [c.key for c in held_a] == [c.key for c in held_b]
    assert not {c.key for c in held_a} & {c.key for c in train_a}
    assert 120 < len(held_a) < 280


def test_batches_pad_deterministically_and_resume():
    rng = np.random.default_rng(0)
    examples = [(np.arange(n), np.where(np.arange(n) % 2 == 0, np.arange(n), -100)) for n in rng.integers(3, 20, 30)]
    a = ConversationBatches(examples, 4, pad_id=999, seed=1)
    b = ConversationBatches(examples, 4, pad_id=999, seed=1)
    for step in (0, 5, 9):
        xa, ya = a.batch(step)
        xb, yb = b.batch(step)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert ((xa == 999) <= (ya == -100)).all()  # padding is never a target
    a.step = 7
    c = ConversationBatches(examples, 4, pad_id=999, seed=1)
    c.load_state_dict(a.state_dict())
    assert c.step == 7
    rows = lambda x: {tuple(r[r != 999].tolist()) for r in x}  # noqa: E731
    ranks = [rows(ConversationBatches(examples, 2, 999, 1, rank=r, world=2).batch(0)[0]) for r in range(2)]
    assert ranks[0] | ranks[1] == rows(a.batch(0)[0]) and not ranks[0] & ranks[1]


def test_growing_the_vocabulary_keeps_old_tokens_exact():
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=50257)).eval()
    grown = grow_vocabulary(model, 50261).eval()
    assert grown.config.vocab_size == 50261 and grown.lm_head.weight is grown.wte.weight
    idx = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        old, new = model(idx)[0], grown(idx)[0]
    torch.testing.assert_close(new[..., :50257], old, rtol=1e-6, atol=1e-6)
    assert torch.allclose(grown.wte.weight[50258], model.wte.weight[:50257].mean(0))


def test_finetuning_learns_the_answers_and_ends_its_turn(chat_run, base_run, greetings_file):
    evals = [r for r in read_metrics(chat_run) if "val_loss" in r]
    train_losses = [r["loss"] for r in read_metrics(chat_run) if "loss" in r]
    assert train_losses[-1] < 0.2 * train_losses[0] and evals[-1]["val_loss"] < 1.0
    model, tokenizer, meta = load_run(chat_run)
    assert meta["stage"] == "sft"
    convs = list(file_conversations(greetings_file))[:3]
    quality = answer_quality(model, tokenizer, convs)
    assert quality["ended_rate"] == 1.0
    assert [a["answer"] for a in quality["answers"]] == [c.messages[1].content for c in convs]
    config = json.loads((chat_run / "config.json").read_text())
    assert config["stage"] == "sft" and config["base"] == str(base_run)


def test_sft_resume_and_errors(tmp_path, base_run, greetings_file, capsys):
    args = ["sft", "--base", str(base_run), "--run-dir", str(tmp_path / "r"), "--datasets", str(greetings_file),
            "--max-steps", "4", "--batch-size", "4", "--sample-prompt", "", "--device", "cpu", "--log-every", "1"]
    assert cli_main(args) == 0
    assert cli_main(args[:-6] + ["--max-steps", "6", "--log-every", "1", "--sample-prompt", "", "--resume"]) == 0
    assert [r["step"] for r in read_metrics(tmp_path / "r") if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert cli_main(["sft", "--base", str(tmp_path / "nothing"), "--run-dir", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli_main(["sft", "--list"]) == 0 and "wiki-qa" in capsys.readouterr().out
