"""Fault injection: torn logs, corrupt checkpoints, full disks, users' files, bad inputs (issue 20).

Each test reproduces one way a run gets hurt and checks the promise of docs/reliability.md: nothing already written
is lost, a damaged checkpoint is named and the newest intact one used, and a user's mistake is one line with exit
status 2 and no traceback (the CLI runs as a subprocess, as a user runs it). Models are tiny and runs a few steps.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_MODEL

from minigpt.cli import main as cli_main
from minigpt.common import UserError
from minigpt.model.gpt import ModelConfig
from minigpt.runs import checkpoint as ckptlib
from minigpt.runs.checksums import CorruptCheckpoint, write_checksums
from minigpt.runs.loading import latest_checkpoint, load_model, resolve_checkpoint, verify_checkpoint
from minigpt.runs.log import MetricsLogger, read_metrics
from minigpt.text.tokenizer import Tokenizer
from minigpt.train.train import TrainConfig, train

WALL_CLOCK = ("time", "tokens_per_s", "mfu")  # differ between any two runs


def tiny_config(run: Path, data: Path, **overrides) -> TrainConfig:
    base = dict(run_dir=str(run), data=str(data), model=ModelConfig(**TINY_MODEL), batch_size=8, max_steps=8,
                warmup_steps=2, lr=3e-3, log_every=1, eval_every=1000, eval_batches=1, checkpoint_every=4,
                keep_last=3, sample_prompt="", device="cpu", seed=7)
    return TrainConfig(**{**base, **overrides})


def train_args(run: Path, data: Path, **extra) -> list[str]:
    """`minigpt train` flags equal to tiny_config's."""
    args = ["--run-dir", str(run), "--data", str(data), "--device", "cpu", "--batch-size", "8", "--warmup-steps",
            "2", "--lr", "3e-3", "--eval-batches", "1", "--sample-prompt", "", "--seed", "7", "--keep-last", "3"]
    args += [x for k, v in TINY_MODEL.items() for x in (f"--model.{k.replace('_', '-')}", str(v))]
    defaults = dict(max_steps=8, log_every=1, eval_every=1000, checkpoint_every=4)
    for key, value in {**defaults, **extra}.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def minigpt(*args, env: dict[str, str] | None = None, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minigpt", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def one_error_line(result: subprocess.CompletedProcess, stage: str) -> str:
    """Exit 2, no traceback, and exactly one `minigpt STAGE: error:` line, which is returned."""
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr and "Error:" not in result.stderr.replace("error:", ""), result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith(f"minigpt {stage}: error: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def records(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK} for r in read_metrics(run)]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory, tiny_shards) -> Path:
    """A run of 8 steps with checkpoints at steps 4 and 8 (tests corrupt copies of it)."""
    return train(tiny_config(tmp_path_factory.mktemp("faults") / "run", tiny_shards))


@pytest.fixture
def run_copy(tmp_path, two_checkpoints) -> Path:
    return Path(shutil.copytree(two_checkpoints, tmp_path / "run"))


STEP4, STEP8 = "step_00000004", "step_00000008"


# ----------------------------------------------------------------------------------------------------------------
# Corruptions of a checkpoint file


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garble_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[10:40] = b"\x00garbage\xff" * 3
    path.write_bytes(bytes(data))


def garble_tensor_data(path: Path, fill: bytes = b"\x5a") -> None:
    """Overwrite 64 bytes in the middle of the tensor data: same size, valid header."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = fill * 64
    path.write_bytes(bytes(data))


CORRUPTIONS = {"truncated": truncate, "garbled header": garble_header, "garbage in the tensors": garble_tensor_data}


# ----------------------------------------------------------------------------------------------------------------
# 1. A torn last line in metrics.jsonl


def test_resume_after_a_torn_metrics_line_drops_it_and_says_so(run_copy, tiny_shards, capsys):
    metrics = run_copy / "metrics.jsonl"
    before = records(run_copy)
    with open(metrics, "a") as f:
        f.write('{"step": 9, "loss": 6.8')  # the disk filled during this write
    assert cli_main(["train", *train_args(run_copy, tiny_shards, max_steps=10), "--resume"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "unreadable line" in line]
    assert len(notes) == 1 and "dropped 1 unreadable line (line 10: '{\"step\": 9, \"loss\": 6.8')" in notes[0]
    after = records(run_copy)
    assert after[:9] == before and [r["step"] for r in after] == [*range(1, 9), 8, 9, 10, 10]  # 8, 10: evaluations
    assert all(json.loads(line) for line in metrics.read_text().splitlines())


def test_a_failed_metrics_write_leaves_no_torn_line(tmp_path, monkeypatch):
    logger = MetricsLogger(tmp_path)
    logger.log({"step": 1, "loss": 5.0})
    whole = (tmp_path / "metrics.jsonl").read_bytes()
    real_write = os.write

    def half_then_full(fd, data):  # a write that gets half the line down, then finds the disk full
        if len(data) > 10:
            return real_write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(OSError):
        logger.log({"step": 2, "loss": 4.0})
    monkeypatch.undo()
    assert (tmp_path / "metrics.jsonl").read_bytes() == whole
    logger.log({"step": 2, "loss": 4.0})
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


# ----------------------------------------------------------------------------------------------------------------
# 2-3. Corrupt checkpoints: detected, named in one line, the newest intact one used


def test_checkpoints_carry_checksums_that_sha256sum_accepts(two_checkpoints):
    ckpt = latest_checkpoint(two_checkpoints)
    lines = (ckpt / "SHA256SUMS").read_text().splitlines()
    assert sorted(line.split("  ")[1] for line in lines) == ["model.json", "model.safetensors", "trainer.pt"]
    if shutil.which("sha256sum"):
        check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=ckpt, capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(run_copy, corruption, capsys):
    CORRUPTIONS[corruption](run_copy / "checkpoints" / STEP8 / "model.safetensors")
    assert resolve_checkpoint(run_copy) == run_copy / "checkpoints" / STEP4
    (warning,) = capsys.readouterr().err.strip().splitlines()
    assert f"{STEP8}/model.safetensors is corrupt" in warning and warning.endswith(str(run_copy / "checkpoints" /
                                                                                         STEP4))
    model, meta = load_model(run_copy)
    assert meta["step"] == 4
    reference, _ = load_model(run_copy / "checkpoints" / STEP4)
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_corrupt_checkpoint_named_explicitly_is_an_error(run_copy, corruption):
    ckpt = run_copy / "checkpoints" / STEP8
    CORRUPTIONS[corruption](ckpt / "model.safetensors")
    for where, which in ((ckpt, "latest"), (run_copy, STEP8)):
        with pytest.raises(CorruptCheckpoint, match=f"{STEP8}/model.safetensors is corrupt"):
            load_model(where, which=which)


def test_every_checkpoint_corrupt_is_one_error_line(run_copy):
    for step in (STEP4, STEP8):
        garble_tensor_data(run_copy / "checkpoints" / step / "model.safetensors")
    line = one_error_line(minigpt("eval", run_copy, "--tasks", "none", "--max-batches", "1"), "eval")
    assert "holds no intact checkpoint" in line and STEP4 in line and STEP8 in line


def test_eval_and_chat_fall_back_and_name_the_checkpoint(run_copy):
    garble_tensor_data(run_copy / "checkpoints" / STEP8 / "model.safetensors")
    result = minigpt("eval", run_copy, "--tasks", "none", "--max-batches", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"using the newest intact checkpoint, {run_copy / 'checkpoints' / STEP4}" in result.stderr
    report = json.loads((run_copy / "eval" / "report.json").read_text())
    assert [c["step"] for c in report["checkpoints"]] == [4]

    result = minigpt("chat", run_copy, "--prompt", "Hello", "--max-new-tokens", "3", "--seed", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{STEP8}/model.safetensors is corrupt" in result.stderr and STEP4 in result.stderr
    explicit = minigpt("chat", run_copy / "checkpoints" / STEP8, "--prompt", "Hello")
    assert "is corrupt" in one_error_line(explicit, "chat")


def test_serve_falls_back_and_names_the_checkpoint(run_copy, capsys):
    pytest.importorskip("fastapi")
    from minigpt.serve.serve import ServeConfig, load_app

    truncate(run_copy / "checkpoints" / STEP8 / "model.safetensors")
    _, name = load_app(ServeConfig(model=str(run_copy)))
    assert name == "run" and f"using the newest intact checkpoint, {run_copy / 'checkpoints' / STEP4}" in \
        capsys.readouterr().err
    with pytest.raises(CorruptCheckpoint, match="cut short"):
        load_app(ServeConfig(model=str(run_copy / "checkpoints" / STEP8)))


def test_resume_from_a_corrupt_latest_continues_from_the_previous_one_exactly(run_copy, two_checkpoints,
                                                                              tiny_shards, capsys):
    truncate(run_copy / "checkpoints" / STEP8 / "trainer.pt")  # weights intact, optimizer state cut short
    assert cli_main(["train", *train_args(run_copy, tiny_shards), "--resume"]) == 0
    captured = capsys.readouterr()
    assert f"{STEP8}/trainer.pt is corrupt" in captured.err and f"resuming {run_copy} at step 4" in captured.out
    # steps 5-8 trained again from step 4 give the uninterrupted run's weights and log
    assert records(run_copy) == records(two_checkpoints)
    again, _ = load_model(run_copy)
    original, _ = load_model(two_checkpoints)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), original.state_dict().values(),
                                                 strict=True))
    verify_checkpoint(latest_checkpoint(run_copy), need_trainer=True)


def test_a_damaged_or_lost_latest_pointer_never_hides_the_checkpoints(run_copy, tiny_shards):
    """Without a readable LATEST a new run would have started over the checkpoints; the step folders still count."""
    latest = run_copy / "checkpoints" / "LATEST"
    for damage in (lambda: latest.write_bytes(b"\xff\xfe\x00garbage"), latest.unlink):
        damage()
        assert latest_checkpoint(run_copy).name == STEP8 and resolve_checkpoint(run_copy).name == STEP8
        before = snapshot(run_copy)
        with pytest.raises(UserError, match="already holds checkpoints"):
            train(tiny_config(run_copy, tiny_shards))
        assert snapshot(run_copy) == before


def test_checkpoints_without_checksums_still_load(run_copy):
    """Backward compatible: checkpoints written before SHA256SUMS load, with the structural checks only."""
    for step in (STEP4, STEP8):
        (run_copy / "checkpoints" / step / "SHA256SUMS").unlink()
    model, meta = load_model(run_copy)
    assert meta["step"] == 8
    assert resolve_checkpoint(run_copy, need_trainer=True).name == STEP8
    truncate(run_copy / "checkpoints" / STEP8 / "trainer.pt")  # still caught: a zip without its directory
    assert resolve_checkpoint(run_copy, need_trainer=True).name == STEP4
    # Without a checksum, garbage that decodes as NaN is still refused rather than scored as a NaN loss.
    garble_tensor_data(run_copy / "checkpoints" / STEP4 / "model.safetensors", fill=b"\xff")
    with pytest.raises(CorruptCheckpoint, match="NaN or infinite"):
        load_model(run_copy / "checkpoints" / STEP4)


def test_a_tampered_trainer_state_is_refused_and_resume_falls_back(run_copy, tiny_shards):
    """A trainer.pt holding objects torch will not load without running code: never unpickled; resume falls back to
    the older intact checkpoint saying why, as for a damaged one, and refuses in one line when none is left."""
    for step in (STEP8, STEP4):
        ckpt = run_copy / "checkpoints" / step
        state = torch.load(ckpt / "trainer.pt", weights_only=True)
        state["when"] = datetime.datetime(2026, 12, 1)
        torch.save(state, ckpt / "trainer.pt")
        write_checksums(ckpt)  # whoever changed the file also updated the checksums
        if step == STEP8:
            assert resolve_checkpoint(run_copy, need_trainer=True).name == STEP4
    line = one_error_line(minigpt("train", *train_args(run_copy, tiny_shards, max_steps=10), "--resume"), "train")
    assert "trainer.pt holds objects other than tensors" in line and "weights_only" not in line


def test_a_truncated_trainer_state_without_fallback_is_one_error_line(tmp_path, tiny_shards):
    run = train(tiny_config(tmp_path / "run", tiny_shards, max_steps=4))
    truncate(run / "checkpoints" / STEP4 / "trainer.pt")
    line = one_error_line(minigpt("train", *train_args(run, tiny_shards), "--resume"), "train")
    assert f"holds no intact checkpoint: {run / 'checkpoints' / STEP4 / 'trainer.pt'} is corrupt" in line


# ----------------------------------------------------------------------------------------------------------------
# 4. Users' files are never replaced


def test_tokenizer_train_refuses_to_replace_a_users_file(tmp_path, wiki_sample):
    thesis = tmp_path / "thesis.txt"
    thesis.write_text("Chapter 1. Months of work.\n")
    line = one_error_line(minigpt("tokenizer", "train", wiki_sample, "--vocab-size", "300", "--workers", "1",
                                  "--out", thesis), "tokenizer")
    assert "thesis.txt exists and is not a minigpt tokenizer file" in line and "--force" in line
    assert thesis.read_text() == "Chapter 1. Months of work.\n"
    notes = tmp_path / "tok.vocab"  # the readable dump's name beside --out tok.json
    notes.write_text("my notes\n")
    assert "tok.vocab exists" in one_error_line(minigpt("tokenizer", "train", wiki_sample, "--vocab-size", "300",
                                                        "--out", tmp_path / "tok.json"), "tokenizer")
    assert notes.read_text() == "my notes\n" and not (tmp_path / "tok.json").exists()
    # an earlier tokenizer's files are the command's own: replaced; --force replaces anything
    assert cli_main(["tokenizer", "train", str(wiki_sample), "--vocab-size", "300", "--workers", "1", "--out",
                     str(tmp_path / "tok.json"), "--force"]) == 0
    assert cli_main(["tokenizer", "train", str(wiki_sample), "--vocab-size", "290", "--workers", "1", "--out",
                     str(tmp_path / "tok.json")]) == 0
    assert Tokenizer.load(tmp_path / "tok.json").n_vocab == 290


def test_train_refuses_a_run_dir_holding_other_files(tmp_path, tiny_shards):
    run = tmp_path / "mine"
    run.mkdir()
    for name in ("config.json", "metrics.jsonl", "loss.png", "tokenizer.json", "notes.md"):
        (run / name).write_text(f"the user's {name}\n")
    before = snapshot(run)
    line = one_error_line(minigpt("train", *train_args(run, tiny_shards, max_steps=2)), "train")
    assert "already holds config.json, metrics.jsonl, loss.png, tokenizer.json, not from a minigpt run" in line
    assert snapshot(run) == before


def test_train_restarts_its_own_run_that_stopped_before_a_checkpoint(tmp_path, tiny_shards):
    run = train(tiny_config(tmp_path / "run", tiny_shards, max_steps=2, checkpoint_every=1000))
    shutil.rmtree(run / "checkpoints")  # as if killed before its first checkpoint
    (run / "notes.md").write_text("kept\n")
    train(tiny_config(run, tiny_shards, max_steps=3, checkpoint_every=1000))
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3]
    assert (run / "notes.md").read_text() == "kept\n"


# ----------------------------------------------------------------------------------------------------------------
# 5. Full disks


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs (root only: skipped where mounting is refused) and a function that fills it to `free` bytes."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if shutil.which("mount") is None or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3M", "tmpfs",
                                                         str(mount)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root); the injected ENOSPC tests cover the same code")

    def fill(free: int = 0) -> Path:
        filler = mount / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            while True:
                os.write(fd, bytes(4096))
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        finally:
            os.close(fd)
        os.truncate(filler, max(filler.stat().st_size - free, 0))
        return filler

    yield mount, fill
    subprocess.run(["umount", str(mount)], check=True)


def test_tokenizer_train_on_a_full_disk_is_one_line_and_keeps_the_old_file(small_disk, wiki_sample):
    mount, fill = small_disk
    out = mount / "tok.json"
    assert cli_main(["tokenizer", "train", str(wiki_sample), "--vocab-size", "290", "--workers", "1", "--out",
                     str(out)]) == 0
    before = snapshot(mount)
    fill(free=0)
    line = one_error_line(minigpt("tokenizer", "train", wiki_sample, "--vocab-size", "300", "--workers", "1",
                                  "--out", out), "tokenizer")
    assert "disk full" in line
    assert {k: v for k, v in snapshot(mount).items() if k != "filler"} == before


def test_a_checkpoint_write_on_a_full_disk_keeps_the_previous_one(small_disk, tiny_shards):
    mount, fill = small_disk
    run = mount / "run"
    assert cli_main(["train", *train_args(run, tiny_shards, max_steps=4)]) == 0
    size = sum(p.stat().st_size for p in (run / "checkpoints" / STEP4).iterdir())
    filler = fill(free=size // 2)  # room for log lines and the plot, not for a checkpoint
    line = one_error_line(minigpt("train", *train_args(run, tiny_shards), "--resume"), "train")
    assert f"disk full while writing checkpoint {STEP8}" in line and f"{STEP4} is intact" in line
    assert latest_checkpoint(run).name == STEP4 and not list((run / "checkpoints").glob(".*"))
    verify_checkpoint(run / "checkpoints" / STEP4, need_trainer=True)
    filler.unlink()  # space freed: the same command finishes the run
    assert cli_main(["train", *train_args(run, tiny_shards), "--resume"]) == 0
    assert latest_checkpoint(run).name == STEP8


def test_injected_enospc_in_a_checkpoint_write_keeps_the_previous_one(run_copy, tiny_shards, monkeypatch):
    """The same promise where no tmpfs can be mounted: the write fails as a full disk makes it fail."""
    real_save = ckptlib.save_file

    def full_disk(tensors, path, metadata=None):
        real_save(tensors, path, metadata=metadata)
        with open(path, "r+b") as f:
            f.truncate(100)  # a partial file, as the failing write leaves it
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(ckptlib, "save_file", full_disk)
    with pytest.raises(UserError, match=f"disk full while writing checkpoint step_00000012 .*{STEP8} is intact"):
        train(tiny_config(run_copy, tiny_shards, max_steps=12, resume=True))
    monkeypatch.undo()
    assert latest_checkpoint(run_copy).name == STEP8 and not list((run_copy / "checkpoints").glob(".*"))
    assert resolve_checkpoint(run_copy, need_trainer=True).name == STEP8


def test_cli_turns_any_disk_full_error_into_one_line(monkeypatch, capsys):
    from minigpt.cli import tokenizer

    def full(args):
        raise RuntimeError("writer failed") from OSError(errno.ENOSPC, "No space left on device", "/x/y.json")

    monkeypatch.setattr(tokenizer, "main", full)
    assert cli_main(["tokenizer", "stats", "--text", "x"]) == 2
    assert capsys.readouterr().err == ("minigpt tokenizer: error: disk full writing into /x: free some space, then "
                                       "run the command again\n")


# ----------------------------------------------------------------------------------------------------------------
# 5-7, 9. Bad inputs: exit 2, one line, nothing written


@pytest.mark.parametrize("lr", ["nan", "inf"])
def test_a_non_finite_learning_rate_is_refused(tmp_path, tiny_shards, lr):
    line = one_error_line(minigpt("train", *train_args(tmp_path / "run", tiny_shards), "--lr", lr), "train")
    assert f"lr must be a finite number, not {lr}" in line
    assert not (tmp_path / "run").exists()


def test_a_non_utf8_tokenizer_file_is_one_line(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_bytes('{"format": "minigpt-tokenizer", "name": "caf\u00e9"}'.encode("latin-1"))
    line = one_error_line(minigpt("tokenizer", "encode", "--tokenizer", path, "hello"), "tokenizer")
    assert "not UTF-8" in line


def _unusable_inputs(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "no-text").mkdir()
    (tmp_path / "no-text" / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    (tmp_path / "blob.txt").write_bytes(b"\x00\x01\x02" * 1000)
    (tmp_path / "latin1.txt").write_bytes("Caf\u00e9 cr\u00e8me br\u00fbl\u00e9e, d\u00e9j\u00e0 vu.\n"
                                          .encode("latin-1"))
    return {"empty file": tmp_path / "empty.txt", "folder without text": tmp_path / "no-text",
            "binary file": tmp_path / "blob.txt", "latin-1 file": tmp_path / "latin1.txt"}


@pytest.mark.parametrize("case", ["empty file", "folder without text", "binary file", "latin-1 file"])
def test_tokenizer_training_on_unusable_text_is_refused(tmp_path, case):
    source = _unusable_inputs(tmp_path)[case]
    out = tmp_path / "out" / "tok.json"
    line = one_error_line(minigpt("tokenizer", "train", source, "--vocab-size", "300", "--workers", "1", "--out",
                                  out), "tokenizer")
    expected = {"empty file": "1 empty", "folder without text": "no .txt, .md, .jsonl or .parquet files",
                "binary file": "1 binary", "latin-1 file": "1 not UTF-8"}[case]
    assert "no text to train on" in line and expected in line
    assert not out.exists()


def test_a_skipped_input_among_good_ones_is_reported(tmp_path, wiki_sample):
    latin1 = _unusable_inputs(tmp_path)["latin-1 file"]
    result = minigpt("tokenizer", "train", wiki_sample, latin1, "--vocab-size", "300", "--workers", "1", "--out",
                     tmp_path / "tok.json")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warning: 1 input skipped (1 not UTF-8)" in result.stderr
    assert Tokenizer.load(tmp_path / "tok.json").info["documents"] == 400


def test_a_data_path_that_holds_no_shards_is_refused_at_once(tmp_path, tiny_shards):
    typo = tmp_path / "dat" / "wiki"
    line = one_error_line(minigpt("train", *train_args(tmp_path / "r1", tiny_shards), "--data", typo), "train")
    assert f"{typo} holds no shards (it does not exist)" in line and "minigpt prepare" in line
    assert not typo.exists() and not (tmp_path / "dat").exists()

    corpus_file = tmp_path / "corpus.txt"
    corpus_file.write_text("Some text of the user's own.\n" * 100)
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("More text.\n")
    for data in (corpus_file, folder):
        before = snapshot(tmp_path)
        start = time.perf_counter()
        result = minigpt("train", *train_args(tmp_path / "r2", tiny_shards), "--data", data)
        assert f"{data} holds no shards" in one_error_line(result, "train")
        assert "merging" not in result.stderr and time.perf_counter() - start < 30  # no tokenizer trained first
        assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------------------------------------------
# 8. The log of a resumed run equals the uninterrupted run's, whatever the cadences


def test_stopped_and_resumed_run_logs_what_the_uninterrupted_run_logs(tmp_path, tiny_shards, monkeypatch):
    cadences = dict(max_steps=14, log_every=3, checkpoint_every=4, eval_every=5)  # 4 is not a multiple of 3
    reference = train(tiny_config(tmp_path / "reference", tiny_shards, **cadences))
    real_save = ckptlib.BackgroundSaver.save

    def stop_after_step_8(self, run, model, step, *args, **kwargs):  # the run dies right after its step-8 checkpoint
        real_save(self, run, model, step, *args, **kwargs)
        if step == 8:
            self.wait()
            raise KeyboardInterrupt

    monkeypatch.setattr(ckptlib.BackgroundSaver, "save", stop_after_step_8)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tmp_path / "stopped", tiny_shards, **cadences))
    monkeypatch.undo()
    stopped = records(tmp_path / "stopped")
    assert [r["step"] for r in stopped] == [3, 5, 6]  # steps 7 and 8 are in the window the checkpoint carries
    train(tiny_config(tmp_path / "stopped", tiny_shards, **cadences, resume=True))
    assert records(tmp_path / "stopped") == records(reference)


KILL_CADENCES = dict(max_steps=60, log_every=5, checkpoint_every=7, eval_every=30)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_shards) -> Path:
    return train(tiny_config(tmp_path_factory.mktemp("uninterrupted") / "run", tiny_shards, **KILL_CADENCES))


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_then_resumed_run_logs_what_the_uninterrupted_run_logs(tmp_path, tiny_shards, uninterrupted, sig):
    cadences = KILL_CADENCES
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "minigpt", "train", *train_args(run, tiny_shards, **cadences)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while latest_checkpoint(run) is None or latest_checkpoint(run).name < "step_00000021":
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.005)
    proc.send_signal(sig)
    proc.wait()
    killed_at = int(latest_checkpoint(run).name.split("_")[1])
    assert 21 <= killed_at < 60
    assert cli_main(["train", *train_args(run, tiny_shards, **cadences), "--resume"]) == 0
    assert records(run) == records(uninterrupted)


# ----------------------------------------------------------------------------------------------------------------
# 10. Export on a base install (no `tokenizers`)


def test_export_needs_no_tokenizers_library(tmp_path, two_checkpoints):
    out = tmp_path / "export"
    blocked = ("import sys; sys.modules['tokenizers'] = None; sys.modules['transformers'] = None; "
               "from minigpt.cli import main; sys.exit(main(sys.argv[1:]))")
    result = subprocess.run([sys.executable, "-c", blocked, "export", str(two_checkpoints), str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    tokenizers = pytest.importorskip("tokenizers")
    ours = Tokenizer.load(two_checkpoints / "tokenizer.json")
    theirs = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    text = "Hello world! The year 1234567 <|endoftext|> caf\u00e9  tabs\tand\nnewlines."
    assert theirs.encode(text).ids == ours.encode(text, allowed_special="all")
    assert theirs.decode(ours.encode(text, allowed_special="all"), skip_special_tokens=False) == text


@pytest.mark.parametrize("pattern", ["gpt4", "gpt2"])
def test_tokenizer_json_equals_what_the_tokenizers_library_builds(wiki_sample, pattern):
    """The hand-written tokenizer.json against the same pipeline assembled with the library's own classes."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

    from minigpt.interop import hf_tokenizer
    from minigpt.text.tokenizer import PATTERNS

    texts = [json.loads(line)["text"] for line in wiki_sample.read_text().splitlines()[:100]]
    tok = Tokenizer.train(texts, 400, pattern=pattern, progress=False, workers=1)
    vocab = hf_tokenizer.ordinary_tokens(tok)
    chars = [hf_tokenizer.to_chars(t) for t in vocab]
    merges = [(chars[a], chars[b]) for a, b in hf_tokenizer.derive_merges(vocab)]
    reference = tokenizers.Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=merges,
                                                ignore_merges=True))
    if pattern == "gpt2":
        reference.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        reference.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(hf_tokenizer.hf_pattern(PATTERNS[pattern])), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    reference.decoder = decoders.ByteLevel()
    reference.post_processor = processors.ByteLevel(trim_offsets=False)
    reference.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in tok.special_tokens])
    assert hf_tokenizer.tokenizer_json(tok) == json.loads(reference.to_str())
