"""`minigpt prepare` under faults: kill -9 and SIGTERM mid-run, a hub stream that drops, a full disk, a stale or
busy work folder, a crash inside the final swap. Each interrupted run is continued by rerunning the same command,
and the result is compared byte for byte with an uninterrupted run's."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from minigpt.cli import main as cli_main
from minigpt.common import UserError
from minigpt.data import shards, workdir
from minigpt.data.prepare import PrepareConfig, prepare
from minigpt.data.shards import read_meta
from minigpt.data.workdir import JOURNAL
from minigpt.text import corpus, hub

WORDS = ["the", "cat", "sat", "on", "a", "mat", "while", "dogs", "ran", "past", "quickly", "and", "birds", "sang",
         "songs", "of", "spring", "over", "green", "hills", "near", "rivers", "where", "fish", "swam"]
FILES, ROWS = 4, 150
SHARD_TOKENS = 8_000  # several shards finish within a second


@pytest.fixture(scope="module")
def parquet_dir(tmp_path_factory) -> Path:
    """FILES Parquet files of ROWS documents each (ids unique across files), a few empty rows among them."""
    root = tmp_path_factory.mktemp("pq") / "corpus"
    root.mkdir()
    rng = np.random.default_rng(0)
    for f in range(FILES):
        texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(10, 120)))) + f". Doc {f}-{i}." for i in range(ROWS)]
        texts[7] = ""
        ids = list(range(f * ROWS, (f + 1) * ROWS))
        pq.write_table(pa.table({"text": texts, "id": ids}), root / f"part-{f}.parquet", row_group_size=40)
    return root


def args_for(source: str | Path, out: Path, workers: int = 1, *extra: str) -> list[str]:
    return ["prepare", "--sources", str(source), "--tokenizer", "gpt2", "--out", str(out), "--workers", str(workers),
            "--shard-tokens", str(SHARD_TOKENS), "--chunk-chars", "3000", "--val-fraction", "0.05", *extra]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def reference(parquet_dir, tmp_path_factory) -> dict[str, bytes]:
    """An uninterrupted run's files."""
    out = tmp_path_factory.mktemp("ref") / "out"
    assert cli_main(args_for(parquet_dir, out)) == 0
    assert len(read_meta(out)["splits"]["train"]["shards"]) >= 5
    return snapshot(out)


SLOW_CLI = """
import sys, time
from minigpt.text import corpus
real = corpus._read_file
def slow(*args, **kwargs):  # a slow disk: this run can be stopped part-way, after a few shards
    for item in real(*args, **kwargs):
        time.sleep(0.004)
        yield item
corpus._read_file = slow
from minigpt.cli import main
sys.exit(main(sys.argv[1:]))
"""


def start_slow_run(tmp_path: Path, args: list[str]) -> subprocess.Popen:
    script = tmp_path / "slow_cli.py"
    script.write_text(SLOW_CLI)
    return subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_for_journal(proc: subprocess.Popen, work: Path, finished: int) -> dict:
    """Poll the work folder until its journal lists `finished` finished shards (the run must still be going)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        try:
            journal = json.loads((work / JOURNAL).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            journal = None
        if journal and len(journal["shards"]["train"]["finished"]) >= finished:
            return journal
        time.sleep(0.02)
    raise AssertionError("no journal with finished shards appeared")


def finished_files(journal: dict) -> list[str]:
    return [s["file"] for split in ("train", "val") for s in journal["shards"][split]["finished"]]


def file_ids(folder: Path, names: list[str]) -> dict[str, tuple[int, int]]:
    return {name: ((st := (folder / name).stat()).st_ino, st.st_mtime_ns) for name in names}


def spy_reads(monkeypatch) -> list[tuple[str, dict | None]]:
    """Record every file the corpus reader opens, with where it starts in it."""
    opened: list[tuple[str, dict | None]] = []
    real = corpus._read_file

    def spy(path, source, text_field, skipped, at=None):
        opened.append((path.name, at))
        yield from real(path, source, text_field, skipped, at)

    monkeypatch.setattr(corpus, "_read_file", spy)
    for name in ("_parquet_column_bytes", "_parquet_file"):  # the footer is read for the ETA and for reading
        real_fn = getattr(corpus, name)
        monkeypatch.setattr(corpus, name, lambda path, *a, _real=real_fn: (opened.append((path.name, "footer")),
                                                                            _real(path, *a))[1])
    return opened


# ----------------------------------------------------------------------------------------------------------------
# kill -9 and SIGTERM


def test_kill_9_then_the_same_command_resumes_without_redoing_finished_shards(
        parquet_dir, reference, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    work = tmp_path / ".out.partial"
    proc = start_slow_run(tmp_path, args_for(parquet_dir, out, 2))
    journal = wait_for_journal(proc, work, finished=2)
    proc.kill()  # SIGKILL: no handler runs
    proc.wait()
    journal = json.loads((work / JOURNAL).read_text())  # the last one written before the kill
    (work / ".prepare-journal.json.x1y2.tmp").write_text('{"half": ')  # as if killed inside an atomic write
    done = finished_files(journal)
    before = file_ids(work, done)
    resume_file = journal["position"]["file"]

    opened = spy_reads(monkeypatch)
    capsys.readouterr()
    assert cli_main(args_for(parquet_dir, out, 2)) == 0
    err = capsys.readouterr().err
    assert f"resuming the unfinished run in {work}: {len(done)} finished shard" in err
    assert f"reading on at {parquet_dir}, file {resume_file + 1} of {FILES}" in err
    # Finished work is not redone: the finished shards are the very same files, and the rerun opened no file
    # before the one the journal stopped in (not even its footer), and that one at the journal's place.
    assert file_ids(out, done) == before
    assert {name for name, _ in opened} <= {f"part-{f}.parquet" for f in range(resume_file, FILES)}
    assert (f"part-{resume_file}.parquet", journal["position"].get("at")) in opened
    assert snapshot(out) == reference
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "slow_cli.py"]  # no orphan


def test_sigterm_stops_cleanly_and_the_rerun_with_other_workers_is_identical(parquet_dir, reference, tmp_path,
                                                                               capsys):
    out = tmp_path / "out"
    work = tmp_path / ".out.partial"
    proc = start_slow_run(tmp_path, args_for(parquet_dir, out, 1))
    wait_for_journal(proc, work, finished=1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert f"stopped; the work so far is kept in {work} (" in err and "Traceback" not in err
    journal = json.loads((work / JOURNAL).read_text())  # written at the last chunk, not only at shard ends
    assert not out.exists()
    capsys.readouterr()
    assert cli_main(args_for(parquet_dir, out, 2)) == 0
    err = capsys.readouterr().err
    assert "resuming the unfinished run" in err
    first_bar = next(line for line in err.replace("\r", "\n").splitlines() if line.startswith("prepare:"))
    assert " 0%" not in first_bar  # the progress bar starts where the first run stopped
    assert sum(journal["text_bytes"]) > 0
    assert snapshot(out) == reference
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "slow_cli.py"]


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face streams that drop


class FakeHub:
    """`datasets.load_dataset` for hf:fake/corpus: a stream over the local Parquet files that raises
    ConnectionError at record `fail_at` (by id) `failures` times; counts the records each stream reads."""

    def __init__(self, monkeypatch, files: list[Path], fail_at: int | None = None, failures: int = 0,
                 records: int | None = None) -> None:
        import datasets

        self.files, self.fail_at, self.failures, self.records = files, fail_at, failures, records
        self.read = 0
        self.resumed_states = 0
        real = getattr(datasets.load_dataset, "real", datasets.load_dataset)  # not an earlier fake

        def load_dataset(name, config=None, split=None, streaming=False, **kwargs):
            assert (name, config, split, streaming) == ("fake/corpus", None, "train", True)
            stream = real("parquet", data_files=[str(f) for f in self.files], split="train", streaming=True)
            if self.records is not None:  # a dataset card that states the split's size
                stream.info.splits = datasets.SplitDict({"train": datasets.SplitInfo("train", num_examples=records)})
            stream = stream.map(self._check)
            real_load = stream.load_state_dict

            def load_state_dict(state):
                self.resumed_states += 1
                return real_load(state)

            stream.load_state_dict = load_state_dict
            return stream

        load_dataset.real = real
        monkeypatch.setattr(datasets, "load_dataset", load_dataset)
        # the fake stream needs no network: its dropped connections are not a host that fails to resolve (CI
        # machines resolve no names at all)
        monkeypatch.setattr(hub, "check_hub_resolves", lambda source: None)

    def _check(self, example):
        if example["id"] == self.fail_at and self.failures > 0:
            self.failures -= 1
            raise ConnectionError("Connection reset by peer")
        self.read += 1
        return example


def hub_args(out: Path, *extra: str) -> list[str]:
    return [*args_for("hf:fake/corpus", out, 1), "--retry-wait", "0", *extra]


@pytest.fixture()
def hub_reference(parquet_dir, tmp_path, monkeypatch) -> dict[str, bytes]:
    pytest.importorskip("datasets")
    files = sorted(parquet_dir.glob("*.parquet"))
    fake = FakeHub(monkeypatch, files)
    assert cli_main(hub_args(tmp_path / "ref")) == 0
    assert fake.read == FILES * ROWS
    return snapshot(tmp_path / "ref")


def test_a_dropped_hub_stream_is_retried_and_resumed_without_loss_or_duplicates(
        parquet_dir, hub_reference, tmp_path, monkeypatch, capsys):
    files = sorted(parquet_dir.glob("*.parquet"))
    fake = FakeHub(monkeypatch, files, fail_at=ROWS + 17, failures=1, records=FILES * ROWS)
    capsys.readouterr()
    assert cli_main(hub_args(tmp_path / "out")) == 0
    err = capsys.readouterr().err
    assert "hf:fake/corpus: ConnectionError: Connection reset by peer at record 167; retrying in" in err
    assert fake.resumed_states == 1 and fake.read == FILES * ROWS  # every record read once
    assert "%|" in err  # a known number of records gives the bar a total (an ETA)
    assert snapshot(tmp_path / "out") == hub_reference


def test_a_hub_stream_that_keeps_failing_gives_up_in_one_line_and_the_rerun_continues(
        parquet_dir, hub_reference, tmp_path, monkeypatch, capsys):
    files = sorted(parquet_dir.glob("*.parquet"))
    out, work = tmp_path / "out", tmp_path / ".out.partial"
    FakeHub(monkeypatch, files, fail_at=2 * ROWS + 5, failures=10**9)
    capsys.readouterr()
    assert cli_main(hub_args(out, "--retries", "3")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("minigpt prepare: error: could not reach hf:fake/corpus at ")
    assert ("gave up after 3 failed attempts in a row (ConnectionError: Connection reset by peer); the work so far "
            "is kept in ") in err
    assert err.endswith("run the same command to continue once the network is back")
    journal = json.loads((work / JOURNAL).read_text())
    assert 0 < journal["position"]["record"] <= 2 * ROWS + 5
    assert not out.exists()
    fake = FakeHub(monkeypatch, files)  # the network is back
    assert cli_main(hub_args(out, "--retries", "3")) == 0
    err = capsys.readouterr().err
    assert f"reading on at hf:fake/corpus, record {journal['position']['record']:,}" in err
    assert fake.resumed_states == 1 and fake.read == FILES * ROWS - journal["position"]["record"]
    assert snapshot(out) == hub_reference
    assert not work.exists()


# ----------------------------------------------------------------------------------------------------------------
# A full disk


def test_enospc_is_one_line_keeps_the_previous_output_and_the_rerun_completes(parquet_dir, reference, tmp_path,
                                                                              monkeypatch, capsys):
    out = tmp_path / "out"
    assert cli_main(args_for(parquet_dir, out)) == 0  # a previous output, which must survive
    real, calls = shards._write_all, []

    def full_disk(f, data):
        calls.append(1)
        if len(calls) > 40:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(f, data)

    monkeypatch.setattr(shards, "_write_all", full_disk)
    capsys.readouterr()
    assert cli_main(args_for(parquet_dir, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("minigpt prepare: error: the disk is full (No space left on device); the work so far is "
                          f"kept in {tmp_path / '.out.partial'} (")
    assert err.endswith(f"{out} is untouched; free some space and run the same command to continue")
    assert snapshot(out) == reference
    monkeypatch.setattr(shards, "_write_all", real)
    assert cli_main(args_for(parquet_dir, out)) == 0
    assert "resuming the unfinished run" in capsys.readouterr().err
    assert snapshot(out) == reference
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.fixture()
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3M", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_a_really_full_disk(parquet_dir, reference, small_disk, capsys):
    out = small_disk / "out"
    need = sum(len(v) for v in reference.values())
    filler = small_disk / "filler"
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    filler.write_bytes(b"\0" * (free - need // 2))  # room for about half the output
    capsys.readouterr()
    assert cli_main(args_for(parquet_dir, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "the disk is full (No space left on device); the work so far is kept in" in err
    assert (small_disk / ".out.partial" / JOURNAL).exists()
    filler.unlink()
    assert cli_main(args_for(parquet_dir, out)) == 0
    assert snapshot(out) == reference
    assert sorted(p.name for p in small_disk.iterdir()) == ["out"]


# ----------------------------------------------------------------------------------------------------------------
# The work folder: stale, busy, left by older versions; a crash inside the final swap


def interrupt_after(monkeypatch, documents: int) -> None:
    real, seen = corpus._read_file, []

    def interrupted(*args, **kwargs):
        for item in real(*args, **kwargs):
            seen.append(1)
            if len(seen) > documents:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(corpus, "_read_file", interrupted)


def test_a_different_command_discards_stale_work_with_a_message(parquet_dir, reference, tmp_path, monkeypatch,
                                                                 capsys):
    out, work = tmp_path / "out", tmp_path / ".out.partial"
    with monkeypatch.context() as m:
        interrupt_after(m, 300)
        with pytest.raises(KeyboardInterrupt):
            prepare(PrepareConfig(sources=[str(parquet_dir)], tokenizer="gpt2", out=str(out), workers=1,
                                  shard_tokens=SHARD_TOKENS // 2, chunk_chars=3000, val_fraction=0.05))
    assert (work / JOURNAL).exists()
    capsys.readouterr()
    assert cli_main(args_for(parquet_dir, out)) == 0
    err = capsys.readouterr().err
    assert (f"discarding the unfinished work in {work}: it was started by a different command (the shard sizes "
            f"differ)") in err
    assert "resuming" not in err
    assert snapshot(out) == reference


def test_a_second_run_on_the_same_output_is_refused_while_the_first_holds_it(parquet_dir, tmp_path):
    work = tmp_path / ".out.partial"
    work.mkdir()
    lock_holder = subprocess.Popen([sys.executable, "-c", (  # another process, as a running prepare
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(work / workdir.LOCK)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.lockf(fd, fcntl.LOCK_EX)\nprint('locked', flush=True)\ntime.sleep(60)")], stdout=subprocess.PIPE,
        text=True)
    assert lock_holder.stdout.readline().strip() == "locked"
    try:
        with pytest.raises(UserError, match="another minigpt prepare is writing .*out"):
            prepare(PrepareConfig(sources=[str(parquet_dir)], tokenizer="gpt2", out=str(tmp_path / "out")))
    finally:
        lock_holder.kill()
        lock_holder.wait()
    assert work.is_dir()  # the other run's folder is left alone


def test_folders_of_older_versions_are_removed(parquet_dir, reference, tmp_path, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    legacy = tmp_path / f".out.tmp-{int(dead.stdout)}"
    legacy.mkdir()
    (legacy / "train_000000.bin").write_bytes(b"x" * 100)
    other = tmp_path / ".other.tmp-1"  # another output's: not ours to touch
    other.mkdir()
    assert cli_main(args_for(parquet_dir, tmp_path / "out")) == 0
    assert f"removed {legacy}, left by an interrupted run of an older minigpt" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-1", "out"]


def test_a_crash_between_the_renames_of_the_final_swap_is_recovered(parquet_dir, reference, tmp_path, monkeypatch,
                                                                    capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "meta.json").write_text("{}")  # a previous output
    real = os.replace

    def crash_before_the_new_output_goes_in(src, dst):
        if Path(src).name == ".out.partial":  # the old output has gone aside; the new one is not in place yet
            raise KeyboardInterrupt
        real(src, dst)

    with monkeypatch.context() as m:
        m.setattr(workdir.os, "replace", crash_before_the_new_output_goes_in)
        assert cli_main(args_for(parquet_dir, out)) == 130
    assert not out.exists() and (tmp_path / ".out.replaced" / "meta.json").exists()
    capsys.readouterr()
    assert cli_main(args_for(parquet_dir, out)) == 0
    assert "every shard was finished; putting them in place" in capsys.readouterr().err
    assert snapshot(out) == reference
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
