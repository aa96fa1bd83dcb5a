"""`minigpt quickstart` at toy scale: every stage, the report's measures, resuming, and `--minutes` sizing."""

from __future__ import annotations

import json
import math

import pytest

from minigpt.cli import main as cli_main
from minigpt.model.gpt import ModelConfig
from minigpt.quickstart import budget as quickstart_budget
from minigpt.quickstart.quickstart import QuickstartConfig, pretraining_config, quickstart, sized_for


def toy(tmp_path, **changes) -> QuickstartConfig:
    model = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=64, vocab_size=512)
    return QuickstartConfig(run_dir=str(tmp_path / "qs"), vocab_size=512, model=model, batch_size=4,
                            pretrain_steps=6, sft_steps=6, sft_batch_size=4, questions=6, device="cpu", **changes)


def test_the_whole_pipeline_reports_both_models_and_resumes(tmp_path, capsys):
    root = quickstart(toy(tmp_path))
    report = json.loads((root / "report.json").read_text())
    for model in ("base", "chat"):
        assert 0 < report[model]["bits_per_byte"] < 8 and math.isfinite(report[model]["val_loss"])
        for rate in ("ended_rate", "subject_rate", "repetition_rate"):
            assert 0 <= report[model][rate] <= 1
    assert report["questions"] == 6 and len(report["examples"]) == 6
    assert report["decoding"]["frequency_penalty"] > 0  # the chat decoding, not greedy: greedy is reported apart
    assert report["chat_greedy"]["questions"] == 6
    markdown = (root / "report.md").read_text()
    assert "bits per byte" in markdown and "names the subject" in markdown and "Q: " in markdown
    assert report["design"]["pretrain_steps"] == 6
    assert list(report["stage_seconds"]) == ["data", "pretraining", "fine-tuning", "report"]
    assert sum(report["stage_seconds"].values()) <= report["seconds"] + 0.2  # each rounded to 0.1 s
    capsys.readouterr()
    quickstart(toy(tmp_path))  # again: nothing is trained twice
    out = capsys.readouterr().out
    assert "pretraining already done" in out and "fine-tuning already done" in out


def fake_speed(monkeypatch, per_parameter_s: float) -> None:
    """A machine whose step time grows with the model's size, so that the sizing is deterministic."""
    def seconds(vocab_size, n_layer, n_head, n_embd, block_size, batch_size, **_):
        params = vocab_size * n_embd + 12 * n_layer * n_embd ** 2
        return per_parameter_s * params * batch_size / 16

    monkeypatch.setattr(quickstart_budget, "seconds_per_step", seconds)
    monkeypatch.setattr(quickstart_budget, "sft_seconds_per_step", lambda *a: seconds(*a))


def test_more_minutes_buy_more_steps_then_a_larger_model(tmp_path, monkeypatch):
    fake_speed(monkeypatch, 2.5e-7)  # the default design: about 0.23 s a step, as on a quiet 2-core machine
    designs = {m: quickstart_budget.design_for_minutes(QuickstartConfig(minutes=m)) for m in (10, 30, 120)}
    width = {m: d.model.n_embd for m, d in designs.items()}
    assert designs[30].pretrain_steps > designs[10].pretrain_steps
    assert width[10] == QuickstartConfig().model.n_embd and width[120] > width[10]
    for minutes, d in designs.items():  # the chosen design fills the time it was given, within the fixed part
        pretrain_s = d.pretrain_steps * quickstart_budget.seconds_per_step(
            d.vocab_size, d.model.n_layer, d.model.n_head, d.model.n_embd, d.model.block_size, d.batch_size)
        sft_s = d.sft_steps * quickstart_budget.sft_seconds_per_step(
            d.vocab_size, d.model.n_layer, d.model.n_head, d.model.n_embd, d.model.block_size, d.sft_batch_size)
        assert pretrain_s + sft_s + quickstart_budget.FIXED_SECONDS == pytest.approx(60 * minutes, rel=0.02)
    # a resumed run keeps the design it started with, whatever this machine's speed is now
    cfg = QuickstartConfig(minutes=30, run_dir=str(tmp_path / "qs"))
    first = sized_for(cfg, tmp_path / "qs")
    fake_speed(monkeypatch, 1e-6)
    assert sized_for(cfg, tmp_path / "qs") == first


def test_pretraining_runs_the_designs_optimizer_and_schedule(tmp_path):
    for cfg in (QuickstartConfig(), QuickstartConfig(optimizer="adamw", schedule="cosine", lr=3e-3, muon_lr=5e-3)):
        train = pretraining_config(cfg, tmp_path / "data", tmp_path / "base")
        assert (train.optimizer, train.schedule, train.lr, train.muon_lr, train.max_steps) == (
            cfg.optimizer, cfg.schedule, cfg.lr, cfg.muon_lr, cfg.pretrain_steps)
    assert (QuickstartConfig().optimizer, QuickstartConfig().schedule) == ("muon", "wsd")  # the search's winner


def test_the_speed_probe_times_the_designs_optimizer(monkeypatch):
    built = []
    make = quickstart_budget.make_optimizer
    monkeypatch.setattr(quickstart_budget, "make_optimizer", lambda model, cfg, device: (
        built.append(cfg.optimizer), make(model, cfg, device))[1])
    quickstart_budget.seconds_per_step(512, 1, 2, 32, 64, 2, steps=1, warmup=0, optimizer="muon")
    assert built == ["muon"]  # a real step of Muon with AdamW was timed, not AdamW's

    probed = []
    monkeypatch.setattr(quickstart_budget, "seconds_per_step", lambda *a, optimizer="adamw", **_: (
        probed.append(optimizer), 0.25)[1])
    monkeypatch.setattr(quickstart_budget, "sft_seconds_per_step", lambda *a: 0.25)
    for optimizer in ("muon", "adamw"):
        probed.clear()
        quickstart_budget.design_for_minutes(QuickstartConfig(minutes=10, optimizer=optimizer))
        assert probed and set(probed) == {optimizer}


def test_too_few_minutes_is_one_line(tmp_path, capsys):
    assert cli_main(["quickstart", "--minutes", "1", "--run-dir", str(tmp_path / "qs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--minutes 1" in err[0] and "Traceback" not in err[0]
