"""The work folder of `minigpt prepare`: where shards wait until the run is done, the journal that lets the same
command resume after a crash, and the final swap into --out.

    data/.shards.partial/            the work folder of `--out data/shards` (a fixed name: a rerun finds it)
        train_000000.bin ...         finished shards, and the one of each split being written
        prepare-journal.json         rewritten atomically after each finished shard: what a rerun needs
    data/.shards.replaced/           for a moment during the final swap: the previous output, removed right after

Rules (docs/data.md):
- A rerun of the same command continues from the journal; any other command (the journal's "command" differs:
  sources or their files, tokenizer, split settings, shard size) discards the work folder, saying why.
- The folder is locked while a run uses it, so two runs never write into one folder.
- On success the work folder is renamed to --out; a previous --out is renamed aside first and removed after.
  Whatever step a crash interrupts, the next run finishes or undoes it (`recover`).
- --out is replaced only when it holds nothing but what prepare writes (meta.json, tokenizer.json and .vocab,
  shard files), unless --force. A run that ends without a journal leaves no work folder behind.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from minigpt.common import UserError, write_json

JOURNAL = "prepare-journal.json"
LOCK = ".lock"  # in the work folder, locked while a run uses it
JOURNAL_FORMAT = "minigpt-prepare-journal"
JOURNAL_VERSION = 1
OUTPUT_FILE = re.compile(r"(train|val)_\d{6}\.bin|meta\.json|tokenizer\.(json|vocab)")
LEGACY = re.compile(r"\.(?P<name>.+)\.(tmp|old)-(?P<pid>\d+)")  # folders of minigpt before resumable prepare


def say(message: str) -> None:
    print(f"minigpt prepare: {message}", file=sys.stderr, flush=True)


def foreign_files(out: Path) -> list[str]:
    """What `out` holds that prepare did not write (folders end with /), sorted; [] for a missing folder."""
    if not out.is_dir():
        return []
    return sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir()
                  if not (p.is_file() and OUTPUT_FILE.fullmatch(p.name)))


def check_out(out: Path, force: bool) -> None:
    """Refuse an --out that is a file, or a folder holding files prepare did not write (unless `force`)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"refusing to replace {out}: it is a file, not a folder of prepared shards")
    foreign = foreign_files(out)
    if foreign and not force:
        listed = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise UserError(f"refusing to replace {out}: it holds files minigpt prepare did not write ({listed}); "
                        f"move them away, choose another --out, or pass --force to replace the folder and them")


def _alive(pid: int) -> bool:
    if os.name != "posix":  # os.kill(pid, 0) would end the process on Windows: assume it lives
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class WorkDir:
    """The work folder of one --out, locked while in use (a context manager)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.path = out.with_name(f".{out.name}.partial")
        self.replaced = out.with_name(f".{out.name}.replaced")
        self._lock: int | None = None

    # ------------------------------------------------------------------------------------------------------------
    # Lock and recovery

    def __enter__(self) -> WorkDir:
        self.path.mkdir(exist_ok=True)
        # A POSIX record lock (lockf), not flock: worker processes forked later do not inherit it, so workers
        # orphaned by a kill -9 of this process cannot keep the folder locked against the rerun.
        self._lock = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks; one run at a time is then the user's to ensure
            fcntl = None
        if fcntl is not None:
            try:
                fcntl.lockf(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(self._lock)
                self._lock = None
                raise UserError(f"another minigpt prepare is writing {self.out} (its work folder {self.path} is "
                                f"in use): wait for it to finish, or stop it") from None
        self._recover()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.path.is_dir() and not (self.path / JOURNAL).exists():
            shutil.rmtree(self.path, ignore_errors=True)  # nothing a rerun could use: leave no orphan
        if self._lock is not None:
            os.close(self._lock)  # releases the lock
            self._lock = None

    def _recover(self) -> None:
        """Finish or undo a final swap that a crash interrupted; remove older minigpt's temporary folders."""
        if self.replaced.exists():
            if self.out.exists():  # crashed after the new output went into place: the old one only awaits removal
                shutil.rmtree(self.replaced)
            else:  # crashed between the two renames: put the previous output back; the work folder is complete
                os.replace(self.replaced, self.out)
        stray = self.out / JOURNAL
        if stray.is_file() and _read_journal(stray).get("complete"):
            stray.unlink()  # crashed right after the swap, before the journal was dropped
        for folder in self.out.parent.iterdir():  # not glob(): an output's name may hold [ or *
            m = LEGACY.fullmatch(folder.name)
            if m and m["name"] == self.out.name and folder.is_dir() and not _alive(int(m["pid"])):
                shutil.rmtree(folder, ignore_errors=True)
                say(f"removed {folder}, left by an interrupted run of an older minigpt")

    # ------------------------------------------------------------------------------------------------------------
    # The journal

    def load(self, command: dict[str, Any]) -> dict[str, Any] | None:
        """The journal to resume from, or None after clearing the folder (saying why when there was work)."""
        path = self.path / JOURNAL
        leftovers = [p for p in self.path.iterdir() if p.name not in (JOURNAL, LOCK)]
        if not path.exists():
            if leftovers:
                say(f"starting over: {self.path} holds no journal (the last run stopped before finishing a shard)")
                self.clear()
            return None
        journal = _read_journal(path)
        reason = None
        if journal.get("format") != JOURNAL_FORMAT or journal.get("version") != JOURNAL_VERSION:
            reason = "its journal is unreadable or from another version of minigpt"
        else:
            for key, value in command.items():
                if journal["command"].get(key) != value:
                    reason = f"it was started by a different command ({_describe_key(key)} differ)"
                    break
        if reason:
            say(f"discarding the unfinished work in {self.path}: {reason}")
            self.clear()
            return None
        for p in leftovers:  # half-written temporary files of a killed run (atomic writes that never finished)
            if p.is_dir():
                shutil.rmtree(p)
            elif not OUTPUT_FILE.fullmatch(p.name):
                p.unlink()
        return journal

    def save(self, journal: dict[str, Any]) -> None:
        write_json(self.path / JOURNAL, {"format": JOURNAL_FORMAT, "version": JOURNAL_VERSION, **journal})

    def clear(self) -> None:
        """Empty the folder (it stays, locked)."""
        for p in self.path.iterdir():
            if p.name == LOCK:
                continue
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()

    # ------------------------------------------------------------------------------------------------------------
    # The swap

    def finish(self, force: bool) -> None:
        """Put the complete work folder in place of --out (checked again: files may have appeared meanwhile)."""
        check_out(self.out, force)
        (self.path / LOCK).unlink()  # still held through the open descriptor until this run ends
        if self.out.exists():
            os.replace(self.out, self.replaced)
            os.replace(self.path, self.out)
            (self.out / JOURNAL).unlink()
            shutil.rmtree(self.replaced)
        else:
            os.replace(self.path, self.out)
            (self.out / JOURNAL).unlink()
        with contextlib.suppress(OSError):  # make the renames durable where the platform allows it
            fd = os.open(self.out.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _read_journal(path: Path) -> dict[str, Any]:
    import json

    try:
        journal = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return journal if isinstance(journal, dict) and journal.get("format") == JOURNAL_FORMAT else {}


def _describe_key(key: str) -> str:
    return {"sources": "the sources", "inputs": "the input files", "tokenizer": "the tokenizers",
            "split": "the split settings", "shard_tokens": "the shard sizes", "text_field": "the text fields",
            "format_version": "the shard formats"}.get(key, key)
