"""Fine-tuning: the chat format and its loss mask, vocabulary growth, the stage end to end (learning, the fill
metric, resuming, epochs), the dataset facts, and the command line's answers to bad sources."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from minigpt.cli import main as cli_main
from minigpt.model.gpt import GPT, ModelConfig
from minigpt.runs.loading import load_run
from minigpt.runs.log import read_metrics
from minigpt.text.chat_format import Message, render
from minigpt.text.conversations import load_conversations
from minigpt.text.tokenizer import Tokenizer
from minigpt.train.sft import SFTConfig, answer_quality, dataset_facts, grow_vocabulary


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
    ids, trained = render(tokenizer, [Message("user", "What is a cat?"), Message("assistant", "A small animal.")])
    x = torch.tensor(ids[:-1])[None]
    y = torch.tensor(np.where(trained[1:], ids[1:], -100))[None]
    logits, loss_sum = model(x, y, reduction="sum")
    logits.retain_grad()
    loss_sum.backward()
    counted = y != -100
    assert logits.grad[~counted].abs().max() == 0  # no gradient flows from masked positions
    assert logits.grad[counted].abs().max() > 0
    manual = torch.nn.functional.cross_entropy(logits[counted].detach(), y[counted], reduction="sum")
    assert loss_sum.item() == pytest.approx(manual.item(), rel=1e-6)


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


def test_finetuning_learns_the_answers_ends_its_turn_and_logs_the_fill(chat_run, base_run, greetings_file):
    metrics = read_metrics(chat_run)
    evals = [r for r in metrics if "val_loss" in r]
    train_losses = [r["loss"] for r in metrics if "loss" in r]
    assert train_losses[-1] < 0.2 * train_losses[0] and evals[-1]["val_loss"] < 1.0
    fills = [r["fill"] for r in metrics if "loss" in r]
    assert fills and all(0.5 < f <= 1 for f in fills)  # three ~20-token greetings a row of 64: most of it real
    model, tokenizer, meta = load_run(chat_run)
    assert meta["stage"] == "sft"
    convs = load_conversations([str(greetings_file)])[:3]
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
    weighted = args[:6] + [str(greetings_file) + "*2"] + args[7:] + ["--resume", "--max-steps", "8"]
    assert cli_main(weighted) == 2 and "cannot resume fine-tuning" in capsys.readouterr().err
    assert cli_main(["sft", "--base", str(tmp_path / "nothing"), "--run-dir", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli_main(["sft", "--list"]) == 0 and "wiki-qa" in capsys.readouterr().out


def test_bad_sources_are_one_line_never_a_traceback(tmp_path, base_run, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    latin = tmp_path / "latin1.jsonl"
    latin.write_bytes('{"messages": [{"role": "user", "content": "Café"}]}\n'.encode("latin-1") * 3)
    binary = tmp_path / "blob.json"
    binary.write_bytes(bytes(range(256)) * 40)
    common = ["--base", str(base_run), "--run-dir", str(tmp_path / "r"), "--device", "cpu", "--max-steps", "1"]
    for source, message in ((latin, "3 lines, records or files that are not UTF-8"), (binary, "1 binary files"),
                            (tmp_path / "missing.parquet", "no conversations at"),
                            ("hf:", "a Hugging Face source looks like")):
        assert cli_main(["sft", "--datasets", str(source), *common]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    parquet = tmp_path / "chats.parquet"  # the shape of SmolTalk's files: a messages column of role/content
    rows = [{"messages": [{"role": "user", "content": f"Say {i}"}, {"role": "assistant", "content": f"{i}!"}]}
            for i in range(200)]
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    assert cli_main(["sft", "--datasets", str(parquet), str(latin), *common, "--batch-size", "2",
                     "--sample-prompt", ""]) == 0  # beside a usable source, an unusable one is a warning
    err = capsys.readouterr().err
    assert f"warning: no usable conversations in {latin}: 3 lines" in err and "193 conversations" in err


def test_dataset_facts_and_epochs(tmp_path, base_run, greetings_file):
    cfg = SFTConfig(base=str(base_run), datasets=[str(greetings_file) + "*2", "chatterbot*0.5"], batch_size=4,
                    held_out=0.2, eval_batches=1)
    facts = dataset_facts(cfg)
    greetings, chatter = facts["sources"]
    assert (greetings["weight"], chatter["weight"]) == (2.0, 0.5)
    assert greetings["conversations"] + greetings["held_out"] == 60 and greetings["skipped"] == {}
    train = facts["train"]
    assert train["beyond_window"] > 0  # chatterbot has a few long prompts: no answer inside a 64-token window
    assert train["conversations"] == 2 * greetings["conversations"] + round(0.5 * (chatter["conversations"]
                                                                                 - train["beyond_window"]))
    assert train["positions"] <= train["rows"] * facts["window"] and 0.75 < train["fill"] <= 1  # a 64-token window
    assert train["steps_per_epoch"] == -(-train["rows"] // 4) and facts["held_out"]["evaluated_rows"] == 4
    unpacked = dataset_facts(SFTConfig(**{**cfg.__dict__, "pack": False}))
    assert unpacked["train"]["rows"] == unpacked["train"]["conversations"] > train["rows"]
    assert unpacked["train"]["fill"] < train["fill"] and unpacked["train"]["trained_tokens"] == train["trained_tokens"]
    run = tmp_path / "epochs"
    assert cli_main(["sft", "--base", str(base_run), "--run-dir", str(run), "--datasets", str(greetings_file),
                     "--batch-size", "4", "--epochs", "2", "--sample-prompt", "", "--device", "cpu"]) == 0
    steps = json.loads((run / "config.json").read_text())["max_steps"]
    rows = dataset_facts(SFTConfig(base=str(base_run), datasets=[str(greetings_file)], batch_size=4))["train"]["rows"]
    assert steps == -(-2 * rows // 4)


def test_the_shipped_recipe_resolves():
    from minigpt.common import config
    from minigpt.text.conversations import FieldMap, parse_source

    cfg = config.resolve(SFTConfig, "gpt2-124m-sft")
    assert ("gpt2-124m-sft", "sft") in [(name, stage) for name, stage, _ in config.list_recipes("sft")]
    assert [parse_source(s).source.startswith("hf:") for s in cfg.datasets] == [True, True]
    assert FieldMap.parse(cfg.fields).prompt[0] == "question" and cfg.epochs == 1 and cfg.pack
    assert cfg.batch_tokens % (cfg.batch_size * 1024) == 0  # whole micro-batches of GPT-2's window


def test_torchrun_two_processes_equal_one_process(tmp_path, base_run, greetings_file):
    """Two ranks (the first prepares the data into a fresh cache while the other waits) take the rows one process
    takes: the same losses and validation loss."""
    import os
    import subprocess
    import sys

    common = ["--base", str(base_run), "--datasets", str(greetings_file) + "*2", "--held-out", "0.2",
              "--max-steps", "3", "--log-every", "1", "--eval-every", "3", "--sample-prompt", "", "--device", "cpu"]
    assert cli_main(["sft", "--run-dir", str(tmp_path / "one"), "--batch-size", "4", *common]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "minigpt",
           "sft", "--run-dir", str(tmp_path / "two"), "--batch-size", "2", "--sft-cache", str(tmp_path / "c"), *common]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    for key in ("loss", "val_loss"):
        a, b = [r[key] for r in one if key in r], [r[key] for r in two if key in r]
        assert len(a) == len(b) > 0 and a == pytest.approx(b, rel=1e-5)
    assert len(list((tmp_path / "c").iterdir())) == 1  # prepared once
