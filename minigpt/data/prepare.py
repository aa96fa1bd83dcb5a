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

Layout of the output folder (the shard format is in shards.py; see docs/data.md):
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
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from minigpt.common import UserError, disk_full, progress, write_json
from minigpt.common.config import opt
from minigpt.data import pipeline
from minigpt.data.shards import FORMAT_VERSION, HEADER_BYTES, ShardWriter, read_meta, token_dtype
from minigpt.data.workdir import JOURNAL, WorkDir, check_out, say
from minigpt.data.workers import cpu_count
from minigpt.text import corpus, hub
from minigpt.text.tokenizer import load_tokenizer

SPLITS = ("train", "val")


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
