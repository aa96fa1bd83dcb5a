"""`minigpt chat`: the history window, streaming, and the real interactive program driven through a terminal."""

from __future__ import annotations

import os
import sys

import pexpect
import pytest

from minigpt.chat.session import ChatSession
from minigpt.cli import main as cli_main
from minigpt.runs.loading import load_run
from minigpt.text.chat_format import Message, fit_to_window, render
from minigpt.text.tokenizer import Tokenizer


def test_history_keeps_the_system_prompt_and_drops_the_oldest_turns(tiny_shards):
    tok = Tokenizer.load(tiny_shards / "tokenizer.json")
    messages = [Message("system", "You are a helpful assistant.")]
    for i in range(30):
        messages += [Message("user", f"Question number {i} about cats?"), Message("assistant", f"Answer {i}.")]
    messages.append(Message("user", "Last question?"))
    kept, ids = fit_to_window(tok, messages, window=128, reply_room=32)
    assert len(ids) + 32 <= 128
    assert kept[0].role == "system" and kept[-1].content == "Last question?"
    assert 1 < len(kept) < len(messages)
    assert kept[1:] == messages[len(messages) - len(kept) + 1 :]  # a suffix of the conversation
    assert kept[1].role == "user"  # whole turns are dropped
    assert ids == render(tok, kept, add_generation_prompt=True)[0]


def test_session_streams_and_stops_at_the_end_of_its_turn(chat_run):
    model, tokenizer, _ = load_run(chat_run)
    session = ChatSession(model, tokenizer, temperature=0)
    pieces = list(session.reply("How are you?"))
    assert len(pieces) > 2  # token by token, not one block at the end
    assert "".join(pieces) == "I am fine, thank you."
    assert [m.role for m in session.history] == ["user", "assistant"]
    session.reply("Hello").__next__()
    # a 64-token window holds one exchange with room for the reply: the first turn was dropped, whole
    assert [(m.role, m.content) for m in session.history] == [("user", "Hello")]
    session.reset()  # the fixture model learnt single-turn dialogues only
    assert "".join(session.reply("Hello")) == "Hi there!" and len(session.history) == 2


def test_one_shot_prompt(chat_run, capsys):
    assert cli_main(["chat", str(chat_run), "--prompt", "Hello", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.strip() == "Hi there!"


def test_chat_needs_chat_tokens(base_run, tmp_path, capsys):
    from minigpt.runs.checkpoint import checkpoints_dir

    # a base run whose tokenizer lacks chat tokens: GPT-2's own
    gpt2_run = tmp_path / "gpt2run"
    (gpt2_run / "checkpoints").mkdir(parents=True)
    Tokenizer.gpt2().save(gpt2_run / "tokenizer.json")
    assert cli_main(["chat", str(gpt2_run)]) == 2
    assert "holds no checkpoint" in capsys.readouterr().err
    assert checkpoints_dir(gpt2_run).exists()


@pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals")
def test_interactive_chat_in_a_terminal(chat_run):
    env = {**os.environ, "COLUMNS": "200", "TERM": "dumb", "PYTHONUNBUFFERED": "1"}
    child = pexpect.spawn(sys.executable, ["-m", "minigpt", "chat", str(chat_run), "--temperature", "0"], env=env,
                          encoding="utf-8", timeout=60)
    try:
        child.expect("/help for commands")
        child.expect_exact("you> ")
        child.sendline("Hello")
        child.expect_exact("bot> ")
        child.expect_exact("you> ")  # the answer ended: the prompt is back
        assert child.before.strip() == "Hi there!"
        child.sendline("/reset")
        child.expect_exact("(conversation cleared)")
        child.expect_exact("you> ")
        child.sendline("What is your name?")
        child.expect_exact("bot> ")
        child.expect_exact("you> ")
        assert "I am minigpt." in child.before and "<|end|>" not in child.before
        child.sendline("/temp 0.5")
        child.expect_exact("(temperature 0.5)")
        child.sendline("/system Be nice.")
        child.expect_exact("conversation cleared")
        child.sendline("/help")
        child.expect_exact("/quit")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
