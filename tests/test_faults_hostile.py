"""The surfaces a hostile user tried in issue 32, one section per numbered item: nothing hangs, nothing is silently
lost, every mistake is one line with exit status 2. The CLI runs as a subprocess, as a user runs it.

The hub tests need no network: the hub is pointed at an unresolvable name (nohost.invalid) or a closed localhost
port, or `datasets` is replaced by a fake package on PYTHONPATH that streams records and then stalls.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from test_faults import STEP4, STEP8, minigpt, one_error_line, snapshot, tiny_config

from minigpt.cli import main as cli_main
from minigpt.model import estimate as estlib
from minigpt.runs.loading import resolve_checkpoint
from minigpt.train.train import train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory, tiny_shards) -> Path:
    """A run of 8 steps with checkpoints at steps 4 and 8 (tests change copies of it)."""
    return train(tiny_config(tmp_path_factory.mktemp("hostile") / "run", tiny_shards))


def env_with(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if "PROXY" not in k.upper() and not k.endswith("_OFFLINE")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [extra.pop("PYTHONPATH", ""), str(REPO)]))
    return {**env, **extra}


# ----------------------------------------------------------------------------------------------------------------
# 1. The hub: bounded retries, DNS failures at once, SIGINT and SIGTERM stop it

needs_datasets = pytest.mark.skipif(importlib.util.find_spec("datasets") is None, reason="needs minigpt[hub]")
HUB = "hf:HuggingFaceFW/fineweb-edu:sample-10BT"


@needs_datasets
def test_hub_host_that_does_not_resolve_fails_at_once_in_one_line(tmp_path):
    start = time.monotonic()
    result = minigpt("prepare", "--sources", HUB, "--out", tmp_path / "p", "--workers", "1",
                     env=env_with(HF_ENDPOINT="http://nohost.invalid"), timeout=60)
    elapsed = time.monotonic() - start
    line = one_error_line(result, "prepare")
    assert "nohost.invalid does not resolve" in line and "run the same command" in line, line
    assert "Retrying" not in result.stderr  # not retried like a dropped connection
    assert elapsed < 20, f"{elapsed:.1f} s"  # the bound: imports (~3 s) + one lookup (at most hub.RESOLVE_TIMEOUT)


@needs_datasets
def test_an_unreachable_hub_gives_up_within_retry_time(tmp_path):
    """A closed port is retried (by huggingface_hub 5 times per attempt, then by us) but never past --retry-time."""
    start = time.monotonic()
    result = minigpt("prepare", "--sources", HUB, "--out", tmp_path / "p", "--workers", "1", "--retry-time", "3",
                     env=env_with(HF_ENDPOINT="http://127.0.0.1:9"), timeout=60)
    elapsed = time.monotonic() - start
    line = one_error_line(result, "prepare")
    assert "could not reach" in line and "127.0.0.1" in line and "run the same command" in line, line
    assert elapsed < 3 + 15, f"{elapsed:.1f} s"  # --retry-time plus imports


FAKE_DATASETS = '''
"""A stand-in for `datasets`: FAKE_HUB_RECORDS records, then (with FAKE_HUB_STALL) a stall a signal must break."""
import os, time

class _Stream:
    def __init__(self):
        self.pos = 0
    def state_dict(self):
        return {"pos": self.pos}
    def load_state_dict(self, state):
        self.pos = state["pos"]
    def __iter__(self):
        while self.pos < int(os.environ["FAKE_HUB_RECORDS"]):
            self.pos += 1
            yield {"text": f"document {self.pos}: " + "the quick brown fox jumps over the lazy dog. " * 20}
        if os.environ.get("FAKE_HUB_STALL"):
            time.sleep(3600)

def load_dataset(name, config=None, split="train", streaming=True):
    return _Stream()
'''


@pytest.fixture
def fake_hub(tmp_path) -> dict[str, str]:
    (tmp_path / "fake" / "datasets").mkdir(parents=True)
    (tmp_path / "fake" / "datasets" / "__init__.py").write_text(textwrap.dedent(FAKE_DATASETS))
    return env_with(PYTHONPATH=str(tmp_path / "fake"), HF_ENDPOINT="http://127.0.0.1:9", FAKE_HUB_RECORDS="2000")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_to_the_process_group_stops_a_stalled_hub_prepare_promptly_and_it_resumes(tmp_path, fake_hub, sig):
    """Sent to the whole group, as Ctrl-C and `timeout` do: the workers used to die holding the pool's queue lock and
    the main process then waited on it forever."""
    out = tmp_path / "p"
    args = [sys.executable, "-m", "minigpt", "prepare", "--sources", "hf:fake/set", "--out", str(out), "--workers",
            "2", "--shard-tokens", "20000", "--chunk-chars", "20000"]
    proc = subprocess.Popen(args, env={**fake_hub, "FAKE_HUB_STALL": "1"}, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    journal = out.with_name(".p.partial") / "prepare-journal.json"
    deadline = time.monotonic() + 60
    while not journal.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # into the stall, every record read
    assert proc.poll() is None, proc.stderr.read()
    workers = [int(pid) for task in Path(f"/proc/{proc.pid}/task").iterdir()
               for pid in (task / "children").read_text().split()]
    assert len(workers) == 2
    os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("prepare did not stop within 10 s of the signal")
    stderr = proc.stderr.read()
    assert proc.returncode == 130, stderr
    assert "run the same command to continue" in stderr and "Traceback" not in stderr, stderr
    for _ in range(50):  # the workers are gone too (they may take a moment to be reaped)
        if not [pid for pid in workers if Path(f"/proc/{pid}").exists()]:
            break
        time.sleep(0.1)
    else:
        pytest.fail("worker processes outlived prepare")
    result = minigpt("prepare", "--sources", "hf:fake/set", "--out", out, "--workers", "2", "--shard-tokens",
                     "20000", "--chunk-chars", "20000", env=fake_hub, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "resuming" in result.stderr
    meta = json.loads((out / "meta.json").read_text())
    assert sum(split["documents"] for split in meta["splits"].values()) == 2000  # none lost, none read twice


# ----------------------------------------------------------------------------------------------------------------
# 2. Export into an earlier export's folder: only minigpt's own files are replaced


def cli(capsys, *args: object) -> tuple[int, str, str]:
    """`minigpt ARGS` in this process (faster than a subprocess for the stages that load a model)."""
    capsys.readouterr()
    code = cli_main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(code: int, err: str, stage: str) -> str:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith(f"minigpt {stage}: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def earlier_export(tmp_path, two_checkpoints, capsys) -> Path:
    out = tmp_path / "export"
    code, _, err = cli(capsys, "export", two_checkpoints, out)
    assert code == 0, err
    return out


def test_reexport_of_an_unchanged_export_replaces_it(earlier_export, two_checkpoints, capsys):
    sums = (earlier_export / "SHA256SUMS").read_text()
    assert "model.safetensors" in sums and "README.md" in sums
    code, _, err = cli(capsys, "export", two_checkpoints, earlier_export, "--checkpoint", "step_4")
    assert code == 0, err
    assert "/step_00000004" in json.loads((earlier_export / "config.json").read_text())["minigpt"]["checkpoint"]


@pytest.mark.parametrize("change", ["user file", "edited README", "user folder"])
def test_reexport_refuses_a_folder_with_user_files_or_edits_and_force_keeps_them(earlier_export, two_checkpoints,
                                                                                  capsys, change):
    if change == "user file":
        (earlier_export / "my_eval_results.txt").write_text("mine")
    elif change == "user folder":
        (earlier_export / "evals").mkdir()
    else:
        (earlier_export / "README.md").write_text("my own model card")
    before = snapshot(earlier_export)
    line = one_line(*cli(capsys, "export", two_checkpoints, earlier_export)[::2], "export")
    assert "refusing" in line and "--force" in line, line
    assert ("README.md" in line) == (change == "edited README"), line
    assert snapshot(earlier_export) == before  # nothing touched
    code, _, err = cli(capsys, "export", two_checkpoints, earlier_export, "--force")
    assert code == 0, err
    if change == "user file":
        assert (earlier_export / "my_eval_results.txt").read_text() == "mine"  # --force keeps other files
    elif change == "user folder":
        assert (earlier_export / "evals").is_dir()
    else:
        assert (earlier_export / "README.md").read_text() != "my own model card"  # --force overwrites ours
    check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=earlier_export, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_export_refuses_a_folder_that_never_was_an_export_and_writes_with_the_umask(tmp_path, two_checkpoints,
                                                                                     capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "config.json").write_text('{"minigpt": {"format": "minigpt-hf-export"}}')  # looks like one, isn't
    line = one_line(*cli(capsys, "export", two_checkpoints, folder)[::2], "export")
    assert "not a minigpt export" in line, line
    old = os.umask(0o022)
    try:
        code, _, err = cli(capsys, "export", two_checkpoints, tmp_path / "shared")
    finally:
        os.umask(old)
    assert code == 0, err
    assert (tmp_path / "shared").stat().st_mode & 0o777 == 0o755  # item 10: not 0700
    assert (tmp_path / "shared" / "model.safetensors").stat().st_mode & 0o777 == 0o644


# ----------------------------------------------------------------------------------------------------------------
# 3. Tracebacks that were: a table given as a string, infinite budgets, a closed pipe


def test_a_config_file_giving_a_string_for_a_table_is_one_line(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text('model = "tiny"\n')
    line = one_line(*cli(capsys, "train", "--config", config, "--run-dir", tmp_path / "run")[::2], "train")
    assert "model must be a table" in line and 'model.preset = "tiny"' in line, line


@pytest.mark.parametrize("usd", ["inf", "nan", "-5", "0"])
def test_plan_refuses_a_budget_that_is_not_a_positive_number_in_one_line(capsys, usd):
    line = one_line(*cli(capsys, "plan", "--usd", usd, "--usd-per-hour", "2")[::2], "plan")
    assert "finite" in line or "negative" in line or "give one budget" in line, line


@pytest.mark.parametrize("args", [["plan", "--tokens", "1e9"], ["model", "--preset", "gpt2"], ["--help"]],
                         ids=["plan", "model", "help"])
def test_a_closed_pipe_ends_the_command_quietly(args):
    """`minigpt plan ... | head -1`: the reader has gone before we print (closed before we start, so it always
    happens, whatever the pipe's buffer holds)."""
    proc = subprocess.Popen([sys.executable, "-m", "minigpt", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env_with(), text=True)
    proc.stdout.close()
    stderr = proc.stderr.read()
    proc.wait(timeout=60)
    assert proc.returncode in (0, 141) and "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr


# ----------------------------------------------------------------------------------------------------------------
# 4. Weights without their checksums are "unverified", said in one line and in what is written


@pytest.fixture
def run_copy(tmp_path, two_checkpoints) -> Path:
    return Path(shutil.copytree(two_checkpoints, tmp_path / "run"))


def test_a_checkpoint_without_checksums_is_reported_unverified(run_copy, tmp_path, capsys):
    (run_copy / "checkpoints" / STEP8 / "SHA256SUMS").unlink()
    code, out, err = cli(capsys, "sample", run_copy, "--prompt", "The", "--max-new-tokens", "2", "--device", "cpu")
    assert code == 0, err
    assert err.count("has no SHA256SUMS: its weights are unverified") == 1, err
    code, _, err = cli(capsys, "export", run_copy, tmp_path / "export")
    assert code == 0 and "unverified" in err, err
    assert json.loads((tmp_path / "export" / "config.json").read_text())["minigpt"]["verified"] is False
    code, _, err = cli(capsys, "eval", run_copy, "--tasks", "none", "--out", tmp_path / "eval", "--max-batches", "1",
                       "--device", "cpu")
    assert code == 0 and "unverified" in err, err
    assert [e["verified"] for e in json.loads((tmp_path / "eval" / "report.json").read_text())["checkpoints"]] \
        == [False]


def test_resume_prefers_the_newest_verified_checkpoint_and_says_why(run_copy, capsys):
    (run_copy / "checkpoints" / STEP8 / "SHA256SUMS").unlink()
    assert resolve_checkpoint(run_copy, need_trainer=True).name == STEP4
    err = capsys.readouterr().err
    assert f"{STEP8} has no SHA256SUMS" in err and "resuming from the newest verified checkpoint, " in err, err
    (run_copy / "checkpoints" / STEP4 / "SHA256SUMS").unlink()  # none verified: the newest, said so
    assert resolve_checkpoint(run_copy, need_trainer=True).name == STEP8
    assert "no checkpoint of" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# 5. GPU names: one table of what cards report, short names, ambiguity refused, never a bigger card


@pytest.mark.parametrize("name,card", [("NVIDIA GH200 480GB", "GH200 96GB HBM3"), ("NVIDIA H100 NVL", "H100 NVL 94GB"),
                                       ("h100-sxm", "H100 SXM 80GB"), ("nvidia a100-sxm4-80gb", "A100 80GB")])
def test_plan_reads_the_names_cards_report(capsys, name, card):
    code, out, err = cli(capsys, "plan", "--gpu", name, "--tokens", "1e9")
    assert code == 0, err
    assert out.splitlines()[0].startswith(f"1 x NVIDIA {card}:"), out.splitlines()[0]


@pytest.mark.parametrize("name,candidates", [("a100", ["A100-40GB", "A100-80GB"]),
                                             ("H100", ["H100-SXM", "H100-PCIe", "H100-NVL"]),
                                             ("GH200", ["GH200-96GB", "GH200-144GB"])])
def test_plan_refuses_an_ambiguous_gpu_listing_the_candidates(capsys, name, candidates):
    line = one_line(*cli(capsys, "plan", "--gpu", name, "--tokens", "1e9")[::2], "plan")
    assert "could be" in line and all(c in line for c in candidates), line


# ----------------------------------------------------------------------------------------------------------------
# 6. Plans outside what their numbers know: clamped, penalised, warned about in one line


def test_plan_never_expects_a_loss_above_a_uniform_guess_and_says_why(capsys):
    code, out, err = cli(capsys, "plan", "--tokens", "1", "--json")
    assert code == 0, err
    result = json.loads(out)
    losses = [c["run"]["expected_loss"] for c in result["candidates"] if c["run"]]
    assert losses and max(losses) <= math.log(50257) + 1e-9
    assert [line for line in err.splitlines() if line.startswith("warning: ")] == [f"warning: {result['warnings'][0]}"]
    assert "uniform guess" in err


def test_plan_counts_repeated_data_for_less_and_warns(capsys):
    code, out, err = cli(capsys, "plan", "--usd", "1e12", "--usd-per-hour", "2", "--json")
    assert code == 0, err
    result = json.loads(out)
    best = next(c for c in result["candidates"] if c["name"] == result["recommended"])
    fresh = estlib.expected_loss(best["run"]["params"], best["run"]["total_tokens"])
    assert best["run"]["expected_loss"] > fresh + 0.1  # 1.6e9 epochs are not worth 1.6e9 x the data
    assert "passes over" in err and "outside the runs the loss fit comes from" in err


def test_quickstart_refuses_minutes_past_a_day_in_one_line(tmp_path, capsys):
    line = one_line(*cli(capsys, "quickstart", "--minutes", "100000", "--run-dir", tmp_path / "q")[::2], "quickstart")
    assert "at most 1440" in line, line


def test_plan_says_which_of_no_fit_or_no_step(capsys):
    code, out, _ = cli(capsys, "plan", "--gpu", "T4", "--tokens", "1e9", "--model.preset", "gpt2-xl",
                       "--seq-len", "1024", "--model.block-size", "1024")
    assert "nothing fits this card" in out and "budget buys no step" not in out
    code, out, _ = cli(capsys, "plan", "--gpu", "A100-40GB", "--hours", "1e-9")
    assert "budget buys no step" in out and "nothing fits" not in out


# ----------------------------------------------------------------------------------------------------------------
# 7. --gpus that do not divide the step; 8. a port in use


@pytest.mark.parametrize("gpus,chosen", [("3", "525312"), ("1000", "1024000")])
def test_plan_chooses_the_nearest_valid_batch_tokens_and_says_so(capsys, gpus, chosen):
    code, out, err = cli(capsys, "plan", "--gpus", gpus, "--hours", "1")
    assert code == 0, err
    assert f"planning with the nearest, --batch-tokens {chosen}" in err
    assert f"--batch-tokens {chosen}" in out  # in the train command it prints


needs_serve = pytest.mark.skipif(importlib.util.find_spec("uvicorn") is None, reason="needs minigpt[serve]")


@needs_serve
def test_serve_on_a_port_in_use_is_one_line_before_announcing(two_checkpoints):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = minigpt("serve", "--model", two_checkpoints, "--port", port, "--device", "cpu", env=env_with(),
                         timeout=60)
    line = one_error_line(result, "serve")
    assert f"port {port} on 127.0.0.1 is in use" in line, line
    assert "serving" not in result.stderr


# ----------------------------------------------------------------------------------------------------------------
# 9. The dry run's CPU speed: a warm-up, then the median of several passes of the run's micro-batch


def test_dry_run_cpu_speed_skips_the_warm_up_and_takes_the_median(monkeypatch):
    from minigpt.model.gpt import ModelConfig
    from minigpt.plan import dry_run

    # the clock's readings: the warm-up's start (it is never timed), then start and end of each timed pass: 1 s,
    # 1 s, an outlier of 9 s, 1 s, 1 s
    readings = iter([0.0, 100.0, 101.0, 101.0, 102.0, 102.0, 111.0, 111.0, 112.0, 112.0, 113.0])

    def perf_counter() -> float:
        return next(readings)

    monkeypatch.setattr(dry_run, "_probe_clock", perf_counter)
    monkeypatch.setattr(dry_run, "PROBE_SECONDS", 1e9)
    model = ModelConfig(n_layer=1, n_head=1, n_embd=16, block_size=64, vocab_size=64)
    rate, how = dry_run.cpu_tokens_per_second(model, 64, micro_batch=8)
    assert rate == pytest.approx(8 * 64 / 1.0)  # 8 sequences of 64 tokens in the median second
    assert "median of 5" in how and "8 x 64 tokens after a warm-up" in how


# ----------------------------------------------------------------------------------------------------------------
# 10. The smaller points


def test_recipes_are_offered_to_their_own_stage(capsys):
    line = one_line(*cli(capsys, "train", "--config", "gpt2-124m-sft")[::2], "train")
    assert "gpt2-124m-sft is a recipe for minigpt sft" in line, line
    line = one_line(*cli(capsys, "train", "--config", "nosuch")[::2], "train")
    listed = line.split("recipe: ")[1]
    code, out, _ = cli(capsys, "train", "--list-configs")
    assert sorted(listed.rstrip(")").split(", ")) == sorted(row.split()[0] for row in out.splitlines())
    code, out, _ = cli(capsys, "sft", "--list-configs")
    assert out.split()[0] == "gpt2-124m-sft"


def test_prepare_from_a_folder_without_text_files_says_so(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    line = one_line(*cli(capsys, "prepare", "--sources", tmp_path / "empty", "--out", tmp_path / "p")[::2], "prepare")
    assert f"no text files in {tmp_path / 'empty'}" in line, line


@pytest.mark.parametrize("stage", ["serve", "sft"])
def test_a_user_folder_with_a_config_json_is_not_called_a_run_to_train(tmp_path, capsys, stage):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "config.json").write_text('{"learning_rate": 0.1}')
    flag = "--model" if stage == "serve" else "--base"
    code, _, err = cli(capsys, stage, flag, tmp_path / "mine", "--run-dir" if stage == "sft" else "--port",
                       tmp_path / "chat" if stage == "sft" else "0")
    line = one_line(code, err, stage)
    assert "is not a minigpt run or checkpoint folder" in line and "minigpt train" not in line, line


def test_sft_on_unusable_data_says_so_once_and_caches_nothing(base_run, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"foo": i}) + "\n" for i in range(50)))
    code, _, err = cli(capsys, "sft", "--base", base_run, "--datasets", bad, "--run-dir", tmp_path / "chat",
                       "--sft-cache", tmp_path / "cache", "--workers", "2", "--device", "cpu")
    line = one_line(code, err, "sft")
    assert "no usable conversations" in line and err.count("no usable conversations") == 1, err
    assert not any((tmp_path / "cache").rglob("meta.json"))
