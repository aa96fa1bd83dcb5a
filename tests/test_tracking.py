"""Trackers (TensorBoard, W&B offline), `minigpt runs`, and a run's config.json given back as --config (issue 30).

W&B runs offline, with its folders and $HOME under tmp_path: nothing reaches the network. It runs in subprocesses
only (wandb.init starts a service process that would outlive a test run in this one).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_MODEL

from minigpt.cli import main as cli_main
from minigpt.model.gpt import ModelConfig
from minigpt.runs.compare import summarize
from minigpt.runs.loading import latest_checkpoint
from minigpt.runs.log import read_metrics
from minigpt.runs.tracking import TensorBoardTracker, read_state, wandb_history, wandb_records
from minigpt.train.train import TrainConfig, train

WALL_CLOCK = ("time", "tokens_per_s", "mfu")  # differ between any two runs
CADENCES = dict(max_steps=24, log_every=1, checkpoint_every=7, eval_every=10)


def tiny_config(run: Path, data: Path, **overrides) -> TrainConfig:
    base = dict(run_dir=str(run), data=str(data), model=ModelConfig(**TINY_MODEL), batch_size=8, warmup_steps=2,
                lr=3e-3, eval_batches=1, sample_prompt="The", sample_tokens=6, device="cpu", seed=7, **CADENCES)
    return TrainConfig(**{**base, **overrides})


def train_args(run: Path, data: Path, **extra) -> list[str]:
    """`minigpt train` flags equal to tiny_config's."""
    args = ["--run-dir", str(run), "--data", str(data), "--device", "cpu", "--batch-size", "8", "--warmup-steps",
            "2", "--lr", "3e-3", "--eval-batches", "1", "--sample-prompt", "The", "--sample-tokens", "6", "--seed",
            "7"]
    args += [x for k, v in TINY_MODEL.items() for x in (f"--model.{k.replace('_', '-')}", str(v))]
    for key, value in {**CADENCES, **extra}.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def offline_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return {**env, "HOME": str(home), "WANDB_MODE": "offline", "WANDB_SILENT": "true",
            "WANDB_CONFIG_DIR": str(home / "wandb-config"), "WANDB_CACHE_DIR": str(home / "wandb-cache"),
            "WANDB_DATA_DIR": str(home / "wandb-data"), "PYTHONUNBUFFERED": "1"}


def by_step(records: list[dict]) -> dict[int, dict]:
    """Each step's numbers, the records of one step (training and evaluation) merged, wall-clock fields aside."""
    out: dict[int, dict] = {}
    for r in records:
        out.setdefault(r["step"], {}).update({k: v for k, v in r.items() if k not in (*WALL_CLOCK, "step")
                                              and isinstance(v, (int, float))})
    return out


def wandb_files_settle(folder: Path, quiet_s: float = 1.0, limit_s: float = 60) -> None:
    """Wait until no file of W&B's under `folder` has changed for `quiet_s` (its service process outlives a
    killed training process for a moment, writing what it had been given)."""
    def sizes() -> dict[Path, int]:
        return {f: f.stat().st_size for f in folder.rglob("*.wandb")}

    deadline, last, since = time.time() + limit_s, sizes(), time.time()
    while time.time() - since < quiet_s and time.time() < deadline:
        time.sleep(0.1)
        if (now := sizes()) != last:
            last, since = now, time.time()


def last_logged_step(run: Path) -> int:
    records = read_metrics(run)
    return records[-1]["step"] if records else 0


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_shards) -> Path:
    return train(tiny_config(tmp_path_factory.mktemp("uninterrupted") / "run", tiny_shards))


# ----------------------------------------------------------------------------------------------------------------
# A run stopped after its checkpoint and resumed logs one history to each tracker


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_a_stopped_and_resumed_run_logs_one_history_to_wandb_and_tensorboard(tmp_path, tiny_shards, uninterrupted,
                                                                             sig):
    # SIGKILL: W&B's buffered records die with the process (the resumed run gives them again from metrics.jsonl);
    # SIGINT: W&B is closed cleanly and holds steps past the checkpoint (the resumed run must not send them again)
    run, env = tmp_path / "run", offline_env(tmp_path)
    cmd = [sys.executable, "-m", "minigpt", "train", *train_args(run, tiny_shards), "--tracker", "wandb",
           "tensorboard"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (last_logged_step(run) >= 16 and last_logged_step(run) % 7 in (2, 3, 4)):  # a few steps past step 14's
        assert proc.poll() is None, "training ended before it could be stopped"
        assert time.time() < deadline
        time.sleep(0.002)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    wandb_files_settle(run / "wandb")  # W&B's service process may still be writing what it was given
    checkpoint = int(latest_checkpoint(run).name.split("_")[1])
    assert last_logged_step(run) > checkpoint  # steps past the checkpoint were logged: the resume logs them again
    # what the stopped process left in W&B's files: a killed one's last buffered rows may or may not have been written
    held = max((row["_step"] for row in wandb_history(run / "wandb", read_state(run)["wandb"]["id"])), default=0)
    if sig == signal.SIGINT:
        assert held > checkpoint

    resumed = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run_id = read_state(run)["wandb"]["id"]
    assert len(list((run / "wandb").glob(f"offline-run-*-{run_id}"))) == 2  # one W&B run, in two processes
    assert f"wandb sync {run / 'wandb'}/offline-run-*-{run_id}" in resumed.stdout  # where its files went
    expected = by_step(read_metrics(uninterrupted))

    # W&B: its files, in order, hold each step once, with the uninterrupted run's numbers
    rows = wandb_history(run / "wandb", run_id)
    assert [row["_step"] for row in rows] == sorted(expected)
    for row in rows:
        numbers = {k: v for k, v in row.items() if not k.startswith(("_", "samples/", "loss_plot/"))
                   and k not in WALL_CLOCK}
        assert numbers == expected[row["_step"]], row["_step"]
    # the last samples table (written by the resumed process) holds every sample
    last = [row for row in rows if "samples/path" in row][-1]
    files = sorted((run / "wandb").glob(f"offline-run-*-{run_id}"))[-1] / "files"
    table = json.loads((files / last["samples/path"]).read_text())
    assert table["data"] == [[r["step"], r["sample"]] for r in read_metrics(uninterrupted) if "sample" in r]
    # the loss plot at each evaluation, except one in a killed process's lost stretch (the steps after the last one
    # W&B's files held and up to the checkpoint), which the resumed run gives again as numbers, not pictures
    plots = [row["_step"] for row in rows if "loss_plot/path" in row]
    assert plots == [step for step in (10, 20, 24) if step <= held or step > checkpoint]

    # TensorBoard, read by its own reader: each scalar's steps and values are the uninterrupted run's (float32)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    for tag in ["loss", "lr", "grad_norm", "tokens", "val_loss", "val_bpb"]:
        want = [(step, np.float32(numbers[tag])) for step, numbers in sorted(expected.items()) if tag in numbers]
        assert [(e.step, np.float32(e.value)) for e in events.Scalars(tag)] == want, tag
    assert [e.step for e in events.Tensors("sample/text_summary")] == [10, 20, 24]
    # the resolved config: TensorBoard's text at step 0, W&B's run config
    config = json.loads((run / "config.json").read_text())
    (text,) = events.Tensors("config/text_summary")
    assert text.step == 0 and json.loads(text.tensor_proto.string_val[0].decode()) == {**config, "resume": False}
    updates = {item.key: json.loads(item.value_json) for record in wandb_records(run / "wandb", run_id)
               if record.WhichOneof("record_type") == "config" for item in record.config.update}
    assert {k: updates[k] for k in config} == config


def test_a_tracker_that_fails_mid_run_is_dropped_with_one_warning(tmp_path, tiny_shards, monkeypatch, capsys):
    real_log = TensorBoardTracker.log

    def full_disk_at_step_5(self, record, step):
        if step == 5:
            raise OSError(28, "No space left on device")
        real_log(self, record, step)

    monkeypatch.setattr(TensorBoardTracker, "log", full_disk_at_step_5)
    run = train(tiny_config(tmp_path / "run", tiny_shards, max_steps=8, eval_every=100, sample_prompt="",
                            tracker=["tensorboard"]))
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: the tensorboard tracker failed at step 5 (OSError: [Errno 28] No space left on "
                        "device): it is dropped, training goes on and metrics.jsonl keeps every step"]
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == list(range(1, 9))
    assert latest_checkpoint(run).name == "step_00000008"


def test_a_missing_tracker_package_or_login_is_one_line(tmp_path, tiny_shards):
    blocked = ("import sys; sys.modules['wandb'] = None; from minigpt.cli import main; "
               "sys.exit(main(sys.argv[1:]))")
    run = tmp_path / "run"
    result = subprocess.run([sys.executable, "-c", blocked, "train", *train_args(run, tiny_shards), "--tracker",
                             "wandb"], capture_output=True, text=True, timeout=120, env=offline_env(tmp_path))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.splitlines()[-1] == ("minigpt train: error: --tracker wandb needs the wandb package: pip "
                                              "install wandb (or pip install 'minigpt[track]'), or run without it "
                                              "(--tracker none)")
    assert not run.exists()
    # online without an API key (and a $HOME without credentials): refused before any network call
    env = {**offline_env(tmp_path), "WANDB_MODE": "online"}
    result = subprocess.run([sys.executable, "-m", "minigpt", "train", *train_args(run, tiny_shards), "--tracker",
                             "tensorboard", "wandb"], capture_output=True, text=True, timeout=120, env=env,
                            stdin=subprocess.DEVNULL)
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert len(errors) == 1 and errors[0].startswith("minigpt train: error: wandb could not start its run: No API "
                                                     "key configured"), result.stderr
    assert "WANDB_MODE=offline" in errors[0] and not [p for p in run.rglob("*") if p.is_file()]
    assert cli_main(["train", *train_args(run, tiny_shards), "--tracker", "mlflow"]) == 2  # no such tracker


# ----------------------------------------------------------------------------------------------------------------
# A run's own config.json repeats it


def test_a_runs_config_json_repeats_it_and_only_for_its_stage(tmp_path, tiny_shards, capsys):
    first, again = tmp_path / "first", tmp_path / "again"
    assert cli_main(["train", *train_args(first, tiny_shards, max_steps=12, eval_every=6)]) == 0
    assert cli_main(["train", "--config", str(first / "config.json"), "--run-dir", str(again)]) == 0
    losses = [[r["loss"] for r in read_metrics(run) if "loss" in r] for run in (first, again)]
    assert len(losses[0]) == 12 and losses[0] == losses[1]  # bit for bit
    saved = [{k: v for k, v in json.loads((run / "config.json").read_text()).items() if k != "run_dir"}
             for run in (first, again)]
    assert saved[0] == saved[1]
    capsys.readouterr()
    assert cli_main(["sft", "--config", str(first / "config.json"), "--run-dir", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err == (f"minigpt sft: error: {first}/config.json holds the settings of a minigpt "
                                       f"train run, which minigpt sft does not take: repeat it with minigpt train "
                                       f"--config {first}/config.json\n")


def test_a_fine_tuned_runs_config_json_repeats_it(tmp_path, base_run, greetings_file, capsys):
    first, again = tmp_path / "first", tmp_path / "again"
    assert cli_main(["sft", "--base", str(base_run), "--run-dir", str(first), "--datasets", str(greetings_file),
                     "--held-out", "0.2", "--batch-size", "4", "--max-steps", "6", "--log-every", "1",
                     "--eval-every", "6", "--sample-prompt", "", "--device", "cpu", "--tracker", "tensorboard"]) == 0
    assert cli_main(["sft", "--config", str(first / "config.json"), "--run-dir", str(again)]) == 0
    losses = [[r["loss"] for r in read_metrics(run) if "loss" in r] for run in (first, again)]
    assert len(losses[0]) == 6 and losses[0] == losses[1]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for run in (first, again):  # fine-tuning logs to the trackers as pretraining does (the same loop)
        events = EventAccumulator(str(run / "tensorboard")).Reload()
        assert [np.float32(e.value) for e in events.Scalars("loss")] == [np.float32(x) for x in losses[0]]
        assert [e.step for e in events.Scalars("fill")] == list(range(1, 7))
    capsys.readouterr()
    assert cli_main(["train", "--config", str(first / "config.json"), "--run-dir", str(tmp_path / "x")]) == 2
    assert "holds the settings of a minigpt sft run, which minigpt train does not take" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# `minigpt runs`


def test_runs_compares_runs_from_their_logs(tmp_path, tiny_shards, base_run, capsys):
    runs = tmp_path / "runs"
    scored = train(tiny_config(runs / "scored", tiny_shards, max_steps=6, eval_every=3, sample_prompt="",
                               eval_tasks=["hellaswag"], eval_tasks_limit=4))
    log = read_metrics(scored)
    capsys.readouterr()
    assert cli_main(["runs", str(runs), str(base_run), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["run"] for row in rows] == [str(scored), str(base_run)]
    final = [r for r in log if "val_loss" in r][-1]
    assert rows[0]["stage"] == "train" and rows[0]["steps"] == 6 and rows[0]["tokens"] == 6 * 8 * 64
    assert rows[0]["val_loss"] == final["val_loss"] and rows[0]["val_bpb"] == final["val_bpb"]
    assert rows[0]["benchmarks"] == {"hellaswag/acc": final["hellaswag/acc"],
                                     "hellaswag/acc_norm": final["hellaswag/acc_norm"]}
    assert 0 < rows[0]["training_seconds"] <= rows[0]["wall_seconds"] < 120
    assert rows[1] == summarize(base_run) and rows[1]["benchmarks"] == {} and rows[1]["steps"] == 30

    assert cli_main(["runs", str(runs), str(base_run)]) == 0
    header, first, second = capsys.readouterr().out.splitlines()
    assert header.split() == ["run", "stage", "steps", "tokens", "loss", "val", "loss", "val", "bpb", "hellaswag/acc",
                              "hellaswag/acc_norm", "wall", "training"]
    loss = [r for r in log if "loss" in r][-1]["loss"]
    assert first.split()[:7] == [str(scored), "train", "6", "3.1k", f"{loss:.4f}", f"{final['val_loss']:.4f}",
                                 f"{final['val_bpb']:.4f}"]
    assert second.split()[7:9] == ["-", "-"]  # no benchmark scored in that run
    assert cli_main(["runs", str(tmp_path / "none")]) == 2
    (tmp_path / "empty").mkdir()
    assert cli_main(["runs", str(tmp_path / "empty")]) == 2
    assert "no runs in" in capsys.readouterr().err
