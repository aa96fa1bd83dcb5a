"""`minigpt prepare`: corpora -> token shards on disk, tokenized in parallel, streamed, resumable.

    minigpt prepare                                      # bundled Wikipedia summaries, GPT-2's tokenizer
    minigpt prepare --sources shakespeare news --tokenizer runs/tok/tokenizer.json --out data/mix
    minigpt prepare --sources hf:HuggingFaceFW/fineweb-edu:sample-10BT --out data/edu   # needs minigpt[hub]
    minigpt prepare --list                               # the bundled corpora and their sizes

Data flow (pipeline.py): the main process streams documents (text/corpus.py, text/hub.py), decides each one's split, and
packs them into chunks of about `chunk_chars` characters; a pool of worker processes, each holding its own
tokenizer, turns chunks into token arrays; the main process writes the results in submission order, so the shards
are byte-identical whatever the number of workers. At most two chunks per worker are in flight, so memory stays flat
however large the corpus.

Resuming (workdir.py): shards are written into the work folder `.NAME.partial` beside --out; after each finished
shard a journal records where the sources stand (file and row, or the hub stream's state), the split's state and the
counts. Rerunning the same command after a crash, kill -9, SIGTERM, a full disk or a lost network continues from
there and ends byte-identical to an uninterrupted run. On success the work folder becomes --out.

Layout of the output folder (see docs/data.md):
    meta.json                 format version, tokenizer hash, counts, text bytes per split, skipped inputs
    tokenizer.json            a copy of the tokenizer the shards were made with
    train_000000.bin, ...     shards: a 64-byte header, then the tokens as little-endian uint16 (or uint32)
    val_000000.bin, ...

Token stream: every document is preceded by the end-of-text token, so a split reads `eot doc eot doc ...`
(as in GPT-2's training data: a sample that starts at an eot starts a document). The split rule is in pipeline.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import mmap
import os
import signal
import struct
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from minigpt.common import UserError, disk_full, progress, read_json, write_json
from minigpt.common.config import opt
from minigpt.data import pipeline
from minigpt.data.workdir import JOURNAL, WorkDir, check_out, say
from minigpt.text import corpus, hub
from minigpt.text.tokenizer import Tokenizer, load_tokenizer

FORMAT_VERSION = 1
MAGIC = b"MGPTTOKS"
HEADER = struct.Struct("<8sIIQ")  # magic, format version, bytes per token, token count
HEADER_BYTES = 64  # the struct above, zero-padded so token data starts 64-byte aligned
SPLITS = ("train", "val")
DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}


@dataclasses.dataclass
class PrepareConfig:
    """Settings of `minigpt prepare`."""

    sources: list[str] = opt(["wiki"], "corpora: bundled names (wiki, shakespeare, news, bible), files, folders, "
                                       "globs of .txt/.md/.jsonl/.parquet, or hf:NAME[:CONFIG[:SPLIT]]")
    tokenizer: str = opt("gpt2", "tokenizer file saved by the tokenizer stage, or gpt2 for GPT-2's own")
    out: str = opt("data/shards", "output folder; replaced atomically, only when the run succeeds (work in "
                                  "progress waits in .NAME.partial beside it; rerun the same command to resume)")
    workers: int = opt(0, "tokenizer processes (0 = one per CPU core)")
    val_fraction: float = opt(0.005, "share of text held out for validation, by document (documents over 1 Mi "
                                     "characters by 64 Ki-character sections); the first always is, unless this is 0")
    shard_tokens: int = opt(100_000_000, "tokens per shard file (the last one of a split holds the rest)")
    seed: int = opt(0, "seed of the train/validation split")
    text_field: str = opt("text", "field of .jsonl records, column of .parquet files and hf: rows holding the text")
    chunk_chars: int = opt(250_000, "characters of text handed to a worker at a time")
    force: bool = opt(False, "replace --out even when it holds files prepare did not write (they are deleted)")
    retries: int = opt(8, "failed attempts in a row at an hf: stream before giving up (the work is kept)")
    retry_time: float = opt(600.0, "seconds an hf: stream may go without a record before giving up, however many "
                                   "attempts are left (the libraries' own retries included; the work is kept)")
    retry_wait: float = opt(1.0, "seconds before retrying an hf: stream; doubles per failure, with jitter")

    def __post_init__(self) -> None:
        if not self.sources:
            raise ValueError("give at least one source")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), not {self.val_fraction}")
        if self.workers < 0:
            raise ValueError(f"workers must be 0 (one per core) or more, not {self.workers}")
        if self.shard_tokens < 1 or self.chunk_chars < 1:
            raise ValueError("shard_tokens and chunk_chars must be positive")
        if self.retries < 1 or self.retry_wait < 0 or not self.retry_time > 0:
            raise ValueError("retries must be 1 or more, retry_wait 0 or more and retry_time above 0")


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


# ----------------------------------------------------------------------------------------------------------------
# Tokenizers


def shards_tokenizer(directory: str | os.PathLike):
    """The tokenizer a shards folder was built with (a copy is kept inside it), checked against its meta."""
    tokenizer = Tokenizer.load(Path(directory) / "tokenizer.json")
    check_tokenizer(directory, tokenizer)
    return tokenizer


def token_dtype(n_vocab: int) -> np.dtype:
    """uint16 while every id fits (n_vocab <= 65536), else uint32; little-endian on disk."""
    return DTYPES[2] if n_vocab <= 2**16 else DTYPES[4]


# ----------------------------------------------------------------------------------------------------------------
# Shard files


class ShardWriter:
    """Appends tokens to `{split}_000000.bin`, `{split}_000001.bin`, ... of at most `shard_tokens` tokens each.

    Writes go straight to the file (no Python buffer), so after `write` returns its tokens are with the kernel and
    `state()` describes the files exactly; `sync()` makes them durable. `resume(state)` continues such a state.
    """

    def __init__(self, directory: str | os.PathLike, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.directory, self.split, self.dtype = Path(directory), split, np.dtype(dtype)
        self.shard_tokens = shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._file = None
        self._count = 0
        self.finished = 0  # shards finished by this writer (not counting resumed ones)

    def write(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens)
        if tokens.size and int(tokens.max()) > np.iinfo(self.dtype).max:
            raise ValueError(f"token id {int(tokens.max())} does not fit {self.dtype.name}")
        tokens = tokens.astype(self.dtype, copy=False)
        while tokens.size:
            if self._file is None:
                self._open()
            take = min(tokens.size, self.shard_tokens - self._count)
            _write_all(self._file, tokens[:take].tobytes())
            self._count += take
            tokens = tokens[take:]
            if self._count == self.shard_tokens:
                self._finish()

    def _open(self) -> None:
        name = f"{self.split}_{len(self.shards):06d}.bin"
        self._file = open(self.directory / name, "wb", buffering=0)  # noqa: SIM115 - stays open across write()s
        self.shards.append({"file": name, "tokens": 0})
        self._count = 0
        _write_all(self._file, _header(self.dtype, 0))

    def _finish(self) -> None:
        self._file.seek(0)
        _write_all(self._file, _header(self.dtype, self._count))  # the real count, now that it is known
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        self.shards[-1]["tokens"] = self._count
        self.finished += 1

    def close(self) -> list[dict[str, Any]]:
        """Finish the open shard; returns [{"file", "tokens"}, ...] for meta.json."""
        if self._file is not None:
            self._finish()
        return self.shards

    def abort(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):  # a full disk may refuse even this
                self._file.close()
            self._file = None

    def sync(self) -> None:
        if self._file is not None:
            os.fsync(self._file.fileno())

    def state(self) -> dict[str, Any]:
        """{"finished": [{"file", "tokens"}, ...], "open": {"file", "tokens"} or None}, JSON-able."""
        if self._file is None:
            return {"finished": [dict(s) for s in self.shards], "open": None}
        return {"finished": [dict(s) for s in self.shards[:-1]],
                "open": {"file": self.shards[-1]["file"], "tokens": self._count}}

    def resume(self, state: dict[str, Any]) -> None:
        """Continue from `state()`: finished shards are checked (size and header) and left alone, the open one is
        cut back to the tokens `state` counted, and this split's files that `state` does not know are removed.
        Raises ValueError when a file is missing or does not match."""
        itemsize = self.dtype.itemsize
        for shard in state["finished"]:
            path = self.directory / shard["file"]
            if not path.is_file() or path.stat().st_size != HEADER_BYTES + shard["tokens"] * itemsize:
                raise ValueError(f"{shard['file']} is missing or has the wrong size")
            with open(path, "rb") as f:
                if f.read(HEADER_BYTES) != _header(self.dtype, shard["tokens"]):
                    raise ValueError(f"{shard['file']} has a damaged header")
        self.shards = [dict(s) for s in state["finished"]]
        keep = {s["file"] for s in self.shards}
        if state["open"] is not None:
            name, count = state["open"]["file"], state["open"]["tokens"]
            path, need = self.directory / name, HEADER_BYTES + count * itemsize
            if not path.is_file() or path.stat().st_size < need:
                raise ValueError(f"{name} is missing or shorter than the journal says")
            self._file = open(path, "r+b", buffering=0)  # noqa: SIM115 - stays open across write()s
            self._file.truncate(need)  # tokens written after the journal are written again
            self._file.seek(need)
            self._count = count
            self.shards.append({"file": name, "tokens": 0})
            keep.add(name)
        for path in self.directory.glob(f"{self.split}_*.bin"):
            if path.name not in keep:
                path.unlink()


def _write_all(f, data: bytes) -> None:
    """An unbuffered file's write may take only part of the data (a disk filling up): loop until all is written."""
    view = memoryview(data)
    while view:
        view = view[f.write(view):]


def _header(dtype: np.dtype, count: int) -> bytes:
    return HEADER.pack(MAGIC, FORMAT_VERSION, dtype.itemsize, count).ljust(HEADER_BYTES, b"\0")


def open_shard(path: str | os.PathLike) -> np.ndarray:
    """One shard's tokens as a read-only array over a memory map (asked to read at random: `advise_random`),
    after checking its header against the file size."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"shard {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if len(head) < HEADER_BYTES or head[:8] != MAGIC:
        raise UserError(f"{path} is not a minigpt token shard (bad magic bytes)")
    _, version, itemsize, count = HEADER.unpack(head[:HEADER.size])
    if version != FORMAT_VERSION:
        raise UserError(f"{path} has shard format {version}; this minigpt reads format {FORMAT_VERSION}")
    if itemsize not in DTYPES:
        raise UserError(f"{path} has an unknown token size of {itemsize} bytes")
    size = path.stat().st_size
    if size != HEADER_BYTES + count * itemsize:
        raise UserError(f"{path} is truncated or corrupt: header says {count:,} tokens, the file has "
                        f"{(size - HEADER_BYTES) / itemsize:,.1f}")
    if count == 0:
        return np.zeros(0, DTYPES[itemsize])
    return np.frombuffer(random_access_map(path), dtype=DTYPES[itemsize], count=count, offset=HEADER_BYTES)


def random_access_map(path: str | os.PathLike) -> mmap.mmap:
    """A read-only map of a file that the kernel is told will be read at random places, so that a page fault reads
    that page rather than the next hundreds of KB (the default read-ahead suits sequential reads; docs/data.md
    measures the difference on a cold shard).

    madvise(MADV_RANDOM) on the map where Python offers it (Linux, macOS, BSD); elsewhere posix_fadvise(RANDOM) on
    the descriptor the map is made from, where that exists. `map.advice` says which was given."""
    fd = os.open(path, os.O_RDONLY)
    try:
        madvise = hasattr(mmap, "MADV_RANDOM") and hasattr(mmap.mmap, "madvise")
        advice = "madvise" if madvise else "fadvise" if hasattr(os, "posix_fadvise") else None
        if advice == "fadvise":
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        mapped = _Map(fd, 0, access=mmap.ACCESS_READ)
    finally:
        os.close(fd)  # the map holds its own reference to the file
    if advice == "madvise":
        mapped.madvise(mmap.MADV_RANDOM)
    mapped.advice = advice
    return mapped


class _Map(mmap.mmap):
    advice: str | None = None


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    directory = Path(directory)
    if not (directory / "meta.json").is_file():
        raise UserError(f"{directory} holds no prepared shards (no meta.json): run minigpt prepare --out {directory}")
    meta = read_json(directory / "meta.json")
    if meta.get("format") != "minigpt-shards":
        raise UserError(f"{directory}/meta.json does not describe minigpt shards")
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{directory} has shard format {meta.get('format_version')}; this minigpt reads format "
                        f"{FORMAT_VERSION}: run minigpt prepare again")
    return meta


def check_tokenizer(directory: str | os.PathLike, tokenizer) -> dict[str, Any]:
    """Refuse a tokenizer other than the one the shards were built with; returns the meta on success."""
    meta = read_meta(directory)
    built = meta["tokenizer"]
    if built["hash"] != tokenizer.hash or built["n_vocab"] != tokenizer.n_vocab:
        raise UserError(f"{directory} was tokenized with {built['name']} (hash {built['hash']}, {built['n_vocab']} "
                        f"tokens), not with this tokenizer (hash {tokenizer.hash}, {tokenizer.n_vocab} tokens): use "
                        f"that tokenizer, or prepare the data again with this one")
    return meta


# ----------------------------------------------------------------------------------------------------------------
# The stage


def prepare(cfg: PrepareConfig) -> Path:
    """Tokenize `cfg.sources` into shards under `cfg.out` (replaced only on success); returns that folder.

    Resumes the work of an interrupted run of the same command (see workdir.py and docs/data.md)."""
    out = Path(cfg.out)
    for source in cfg.sources:
        corpus.check_source(source)
        corpus.check_has_text_files(source)
    tokenizer = load_tokenizer(cfg.tokenizer)  # fails here, cleanly, before any worker starts
    out.parent.mkdir(parents=True, exist_ok=True)
    with WorkDir(out) as work:
        check_out(out, cfg.force)
        run = _Run(cfg, tokenizer, work)
        with _sigterm_as_interrupt():
            run.run()
    return out


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a scheduler stopping the job) stops the run like Ctrl-C does: cleanly, keeping its work. SIGINT is
    made to interrupt even where the shell started us with it ignored (a background job of a script): a signal
    sent on purpose stops the run."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class _Run:
    """One run of `prepare`: restores the journal's state (or starts afresh), streams, writes, journals, swaps."""

    def __init__(self, cfg: PrepareConfig, tokenizer, work: WorkDir) -> None:
        self.cfg, self.tokenizer, self.work = cfg, tokenizer, work
        self.dtype = token_dtype(tokenizer.n_vocab)
        self.command = _command(cfg, tokenizer, self.dtype)
        self.writers = [ShardWriter(work.path, split, self.dtype, cfg.shard_tokens) for split in SPLITS]
        self.journal = work.load(self.command)
        if self.journal is not None and not self.journal.get("complete"):
            try:
                for writer, split in zip(self.writers, SPLITS, strict=True):
                    writer.resume(self.journal["shards"][split])
            except (ValueError, KeyError) as exc:
                say(f"discarding the unfinished work in {work.path}: {exc}")
                work.clear()
                self.journal = None
                self.writers = [ShardWriter(work.path, split, self.dtype, cfg.shard_tokens) for split in SPLITS]
        j = self.journal or {}
        self.skipped = corpus.Skipped(**j.get("skipped", {}))
        self.splitter = pipeline.Splitter(cfg.seed, cfg.val_fraction, j.get("splitter"))
        retry = hub.RetryPolicy(cfg.retries, cfg.retry_wait, cfg.retry_time)
        self.reader = pipeline.Sources(list(cfg.sources), cfg.text_field, self.skipped, j.get("position"), retry)
        self.reader.expected = {int(k): v for k, v in j.get("expected_records", {}).items()}
        self.text_bytes = list(j.get("text_bytes", [0, 0]))
        self.resumed_bytes = sum(self.text_bytes)
        self.good: dict[str, Any] | None = self.journal  # the state after the last chunk that ended a document
        self.saved = self.journal is not None  # whether the journal on disk says `good`
        self.finished_unsaved = False  # a shard finished since the journal was written

    # ------------------------------------------------------------------------------------------------------------

    def run(self) -> None:
        cfg = self.cfg
        if self.journal is not None and self.journal.get("complete"):
            say(f"resuming {self.work.path}: every shard was finished; putting them in place")
            self._finish()
            return
        if self.journal is not None:
            self._say_resuming()
        workers = cfg.workers or cpu_count()
        self.total = self.journal.get("total_bytes") if self.journal is not None else self._known_total()
        start = time.perf_counter()
        try:
            with pipeline.encoder(cfg.tokenizer, self.tokenizer, self.dtype, workers) as encoder, \
                    progress(self.total, desc="prepare", unit="B", unit_scale=True, unit_divisor=1000,
                             initial=self.resumed_bytes) as bar:
                chunks = pipeline.chunks(self.reader, self.splitter, self.skipped, cfg.chunk_chars)
                for (train, val, train_bytes, val_bytes), resume in encoder.map_tagged(chunks):
                    self._write(train, val, train_bytes, val_bytes, resume)
                    bar.update(train_bytes + val_bytes)
                    if self.total is None:
                        bar.total = self._estimated_total(bar.n)
            self._close()
        except BaseException as exc:
            self._stopped(exc)
            raise
        self._finish(time.perf_counter() - start, workers)

    def _write(self, train: np.ndarray, val: np.ndarray, train_bytes: int, val_bytes: int,
               resume: dict[str, Any] | None) -> None:
        finished = sum(w.finished for w in self.writers)
        self.writers[0].write(train)
        self.writers[1].write(val)
        self.text_bytes[0] += train_bytes
        self.text_bytes[1] += val_bytes
        self.finished_unsaved |= sum(w.finished for w in self.writers) > finished
        if resume is None:  # inside a large document: a shard finished here is journaled at the next resume point
            return
        self.good = {"command": self.command, "complete": False, **resume, "text_bytes": list(self.text_bytes),
                     "shards": {split: w.state() for split, w in zip(SPLITS, self.writers, strict=True)},
                     "expected_records": {str(k): v for k, v in self.reader.expected.items()},
                     "total_bytes": self.total}
        self.saved = False
        if self.finished_unsaved:
            self._save()

    def _save(self) -> None:
        """Write the journal for `good`, the shard files synced first so that it never claims more than is on disk."""
        if self.good is None or self.saved:
            return
        for writer in self.writers:
            writer.sync()
        self.work.save(self.good)
        self.saved, self.finished_unsaved = True, False

    def _stopped(self, exc: BaseException) -> None:
        """Keep what a rerun can use, and say so; errors in the input discard the work instead."""
        for writer in self.writers:
            writer.abort()
        if isinstance(exc, UserError) and not isinstance(exc, hub.StreamFailed):
            self.work.clear()  # bad input: a rerun would fail the same way, and fixing the input makes it stale
            return
        with contextlib.suppress(OSError):  # a full disk may refuse the journal too: the previous one stands
            self._save()
        if not (self.work.path / JOURNAL).exists():
            if isinstance(exc, hub.StreamFailed):
                raise hub.StreamFailed(f"{exc}; run the same command again once the network is back") from None
            return
        kept = f"the work so far is kept in {self.work.path} ({self._summary(self.good)})"
        if full := disk_full(exc):
            untouched = f"; {self.cfg.out} is untouched" if Path(self.cfg.out).exists() else ""
            why = getattr(full, "strerror", None) or full
            raise UserError(f"the disk is full ({why}); {kept}{untouched}; free some space and run the "
                            f"same command to continue") from None
        if isinstance(exc, hub.StreamFailed):
            raise hub.StreamFailed(f"{exc}; {kept}; run the same command to continue once the network is "
                                   f"back") from None
        say(f"stopped; {kept}; run the same command to continue")

    def _close(self) -> None:
        """Finish the last shards, check the splits, write meta.json and the tokenizer; journal as complete."""
        shards = {split: w.close() for split, w in zip(SPLITS, self.writers, strict=True)}
        for split in SPLITS if self.cfg.val_fraction > 0 else ("train",):
            if not shards[split]:
                raise UserError(f"the {split} split came out empty ({sum(self.splitter.documents)} documents in all, "
                                f"{self.skipped.total()} skipped): give a larger corpus or change --val-fraction")
        counts = {split: _Counts(self.splitter.documents[i], self.text_bytes[i]) for i, split in enumerate(SPLITS)}
        meta = _meta(self.cfg, self.tokenizer, self.dtype, counts, shards, self.skipped)
        write_json(self.work.path / "meta.json", meta)
        self.tokenizer.save(self.work.path / "tokenizer.json")  # the shards carry their tokenizer
        self.good = {**(self.good or {}), "command": self.command, "complete": True}
        self.saved = False
        self._save()

    def _finish(self, elapsed: float | None = None, workers: int = 0) -> None:
        self.work.finish(self.cfg.force)
        meta = read_meta(self.cfg.out)
        line = f"prepared {self.cfg.out}: " + ", ".join(
            f"{split} {meta['splits'][split]['documents']:,} documents / {meta['splits'][split]['tokens']:,} tokens"
            for split in SPLITS) + f"; skipped {sum(meta['skipped'].values())}"
        if elapsed is not None:
            done = sum(self.text_bytes) - self.resumed_bytes
            line += (f" ({done / 1e6:.1f} MB of text tokenized by this run, {done / 1e6 / max(elapsed, 1e-9):.1f} "
                     f"MB/s on {workers} worker{'s' if workers > 1 else ''})")
        print(line, file=sys.stderr)

    # ------------------------------------------------------------------------------------------------------------

    def _summary(self, journal: dict[str, Any] | None) -> str:
        """"3 finished shards (train 2, val 1), 1,234,567 tokens" for a journal."""
        if not journal:
            return "no finished shard"
        shards = journal["shards"]
        n = [len(shards[split]["finished"]) for split in SPLITS]
        tokens = sum(s["tokens"] for split in SPLITS for s in shards[split]["finished"]) + \
            sum(shards[split]["open"]["tokens"] for split in SPLITS if shards[split]["open"])
        return f"{sum(n)} finished shard{'s' if sum(n) != 1 else ''} (train {n[0]}, val {n[1]}), {tokens:,} tokens"

    def _say_resuming(self) -> None:
        j = self.journal
        say(f"resuming the unfinished run in {self.work.path}: {self._summary(j)}, "
            f"{sum(j['splitter']['documents']):,} documents / {sum(j['text_bytes']) / 1e6:,.1f} MB of text done; "
            f"reading on at {self.reader.describe(j['position'])}")

    def _known_total(self) -> int | None:
        if self.journal is not None and self.journal.get("total_bytes") is not None:
            return self.journal["total_bytes"]
        sizes = [corpus.corpus_size(s, self.cfg.text_field).text_bytes for s in self.cfg.sources]
        return None if None in sizes else sum(sizes)

    def _estimated_total(self, done: int) -> float | None:
        """For hf: sources: their record counts (from the dataset card) times the mean bytes per document so far."""
        if not all(s.startswith("hf:") for s in self.cfg.sources) or len(self.reader.expected) < len(self.cfg.sources):
            return None
        documents = sum(self.splitter.documents)
        return done / documents * sum(self.reader.expected.values()) if documents else None


def _command(cfg: PrepareConfig, tokenizer, dtype: np.dtype) -> dict[str, Any]:
    """What the output depends on: a journal made by another command is stale (workers and chunk size do not
    change a byte of the output, so they may differ between runs)."""
    return {"sources": list(cfg.sources), "inputs": [corpus.fingerprint(s) for s in cfg.sources],
            "text_field": cfg.text_field, "tokenizer": _tokenizer_meta(cfg, tokenizer), "dtype": dtype.name,
            "split": _split_meta(cfg), "shard_tokens": cfg.shard_tokens, "format_version": FORMAT_VERSION}


def _tokenizer_meta(cfg: PrepareConfig, tokenizer) -> dict[str, Any]:
    name = "gpt2" if cfg.tokenizer == "gpt2" else str(Path(cfg.tokenizer).resolve())
    return {"name": name, "hash": tokenizer.hash, "n_vocab": tokenizer.n_vocab, "eot_id": tokenizer.eot_id}


def _split_meta(cfg: PrepareConfig) -> dict[str, Any]:
    return {"rule": pipeline.split_rule(), "seed": cfg.seed, "val_fraction": cfg.val_fraction,
            "large_document_chars": pipeline.LARGE_DOC_CHARS, "section_chars": pipeline.SECTION_CHARS}


@dataclasses.dataclass
class _Counts:
    documents: int = 0
    text_bytes: int = 0


def _meta(cfg: PrepareConfig, tokenizer, dtype: np.dtype, counts: dict[str, _Counts],
          shards: dict[str, list[dict[str, Any]]], skipped: corpus.Skipped) -> dict[str, Any]:
    """meta.json's content (bench/train_gpu.py writes random shards with it too)."""
    return {
        "format": "minigpt-shards",
        "format_version": FORMAT_VERSION,
        "tokenizer": _tokenizer_meta(cfg, tokenizer),
        "dtype": dtype.name,
        "header_bytes": HEADER_BYTES,
        "eot": "before each document",
        "sources": list(cfg.sources),
        "text_field": cfg.text_field,
        "split": _split_meta(cfg),
        "shard_tokens": cfg.shard_tokens,
        "splits": {split: {"documents": counts[split].documents,
                           "tokens": sum(s["tokens"] for s in shards[split]),
                           "text_bytes": counts[split].text_bytes,
                           "shards": shards[split]} for split in SPLITS},
        "skipped": dataclasses.asdict(skipped),
    }
