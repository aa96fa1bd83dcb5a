"""Prepared conversations: each source tokenized once, in worker processes, streamed to disk, reused by later runs.

    prepared = prepare_source("chats.jsonl", tokenizer, settings)   # tokenizes, or finds it done before
    train = prepared.split("train"); ids, trained = train.conversation(0)

Data flow (as `minigpt prepare` does for pretraining): the main process streams a source's raw records
(text/conversations.py) in chunks of about a megabyte; a pool of workers, each with its own tokenizer, parses them,
reads their messages, decides each one's split (a hash of its key: common.is_held_out), renders it in the chat format
and returns token arrays; the main process writes them in submission order, so the result is the same whatever the
number of workers. At most two chunks per worker are in flight, so memory stays flat whatever the source's size.

One folder per source under the cache (`--sft-cache`), named after the source and a hash of everything that decides
its content: the source's identity (files' paths, sizes and times; a bundled set's package version; a hub name),
the tokenizer's hash, --fields, --held-out, --seed and FORMAT_VERSION. A weight (`*3`) and the context window
are not part of it: they are applied when batches are made. Inside:

    meta.json            format, source, tokenizer, counts per split, what was skipped and why
    train_000000.bin     a token shard (shards.ShardWriter) of uint32 words, `token id | trained << 31`: the
                         conversations one after another as chat.render makes them (each starts with
                         <|endoftext|>); `trained` marks the assistant's tokens and their <|end|>
    train_index.npy      (conversations, 3) uint32: length, offset of the first trained token, trained tokens
    val_000000.bin, val_index.npy    the held-out conversations, the same way

It is written into a temporary folder renamed into place when complete: a killed preparation leaves nothing
half-made, and the next run starts it again; under torchrun the first process of each machine prepares while
the others wait.
"""

from __future__ import annotations

import dataclasses
import hashlib
import multiprocessing
import os
import re
import shutil
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from minigpt.common import UserError, is_held_out, pool_worker_signals, progress, read_json, write_json
from minigpt.data.shards import ShardWriter, open_shard
from minigpt.data.workers import OrderedPool, cpu_count
from minigpt.text import conversations as convlib
from minigpt.text.chat_format import render

FORMAT = "minigpt-sft-data"
FORMAT_VERSION = 1
SPLITS = ("train", "val")
TRAINED_BIT = np.uint32(1 << 31)
CHUNK_BYTES = 1 << 20  # raw input handed to a worker at a time
CHUNK_RECORDS = 2000  # ... or this many records, for sources whose size is not known (bundled, hub)
ONE_SHARD = 1 << 62  # every conversation of a split in one file: a conversation never spans two shards


@dataclasses.dataclass(frozen=True)
class PrepareSettings:
    """What decides the prepared content of a source (beside the source and the tokenizer)."""

    fields: convlib.FieldMap = convlib.FieldMap()
    held_out: float = 0.05
    seed: int = 0
    workers: int = 0  # tokenizer processes (0: one per core); not part of the content


def default_cache_dir() -> Path:
    """$MINIGPT_CACHE/sft, else $XDG_CACHE_HOME/minigpt/sft, else ~/.cache/minigpt/sft."""
    if os.environ.get("MINIGPT_CACHE"):
        return Path(os.environ["MINIGPT_CACHE"]) / "sft"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "minigpt" / "sft"


# ----------------------------------------------------------------------------------------------------------------
# Reading prepared data


class PreparedSplit:
    """One split of a prepared source: conversation i's tokens and loss mask, read from a memory map on demand."""

    def __init__(self, folder: Path, split: str):
        index = np.load(folder / f"{split}_index.npy")
        self.lengths = index[:, 0].astype(np.int64)  # tokens of each conversation
        self.first_trained = index[:, 1].astype(np.int64)  # where its first trained token is
        self.trained_tokens = index[:, 2].astype(np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)])
        shard = folder / f"{split}_000000.bin"
        self.words = open_shard(shard) if len(self.lengths) else np.zeros(0, np.uint32)
        if len(self.words) != self.offsets[-1]:
            raise UserError(f"{folder} is damaged ({split}: {len(self.words)} tokens, the index says "
                            f"{self.offsets[-1]}): delete it and run again")

    def __len__(self) -> int:
        return len(self.lengths)

    def conversation(self, i: int, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(token ids int64, trained bool) of conversation i, its first `limit` tokens if given."""
        start = int(self.offsets[i])
        end = int(self.offsets[i + 1]) if limit is None else min(int(self.offsets[i + 1]), start + limit)
        words = np.asarray(self.words[start:end])
        return (words & ~TRAINED_BIT).astype(np.int64), (words & TRAINED_BIT) != 0


@dataclasses.dataclass
class PreparedSource:
    source: str
    folder: Path
    meta: dict[str, Any]

    def split(self, name: str) -> PreparedSplit:
        return PreparedSplit(self.folder, name)

    @property
    def empty(self) -> bool:
        return not any(self.meta["splits"][split]["conversations"] for split in SPLITS)

    def problem(self) -> str:
        """Why nothing in this source is usable (for an empty one)."""
        fields = self.meta.get("unrecognised_fields")
        hint = f" (its records have the fields {', '.join(fields)}: map them with --fields)" if fields else ""
        return f"no usable conversations in {self.source}: " \
               f"{convlib.describe_skipped(self.meta['skipped']) or 'it is empty'}{hint}"

    def summary(self) -> str:
        if self.empty:
            return f"warning: {self.problem()}"
        counts = self.meta["splits"]
        text = (f"{self.source}: {counts['train']['conversations']:,} conversations ({counts['train']['tokens']:,} "
                f"tokens, {counts['train']['trained_tokens']:,} of them the assistant's), "
                f"{counts['val']['conversations']:,} held out")
        skipped = convlib.describe_skipped(self.meta["skipped"])
        return text + (f"; left out: {skipped}" if skipped else "")


# ----------------------------------------------------------------------------------------------------------------
# Tokenizing (worker processes)

_worker: dict[str, Any] = {}


def _init_worker(tokenizer_path: str, settings: PrepareSettings) -> None:
    if multiprocessing.parent_process() is not None:  # (also called in this process when there is one worker)
        pool_worker_signals()
    # An exception escaping a Pool initializer makes the pool restart the worker forever; keep it for the task.
    try:
        from minigpt.text.tokenizer import Tokenizer

        _worker["tokenizer"] = Tokenizer.load(tokenizer_path)
    except Exception as exc:  # noqa: BLE001 - re-raised by the first task
        _worker["error"] = exc
    _worker["settings"] = settings


@dataclasses.dataclass
class _Encoded:
    """One chunk's conversations, per split: words, index rows; and what was skipped."""

    words: tuple[np.ndarray, np.ndarray]
    index: tuple[np.ndarray, np.ndarray]
    skipped: Counter
    unrecognised: list[str] | None = None  # the fields of the first record in no known shape
    input_bytes: int = 0


def _encode_chunk(chunk: list[tuple[str, Any, int]]) -> _Encoded:
    if "error" in _worker:
        raise _worker["error"]
    tokenizer, settings = _worker["tokenizer"], _worker["settings"]
    words: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
    index: tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]] = ([], [])
    skipped: Counter = Counter()
    unrecognised = None
    for key, record, _ in chunk:
        messages = convlib.record_messages(record, settings.fields)
        if isinstance(messages, str):
            skipped[messages] += 1
            if messages == "not_a_conversation" and unrecognised is None:
                parsed = convlib.parse_line(record)[0] if isinstance(record, bytes) else record
                unrecognised = sorted(map(str, parsed)) if isinstance(parsed, dict) else [type(parsed).__name__]
            continue
        ids, trained = render(tokenizer, messages)
        split = 1 if is_held_out(key, settings.held_out, settings.seed, convlib.SPLIT_BYTEORDER) else 0
        mask = np.asarray(trained, dtype=bool)
        words[split].append(np.asarray(ids, dtype=np.uint32) | (mask.astype(np.uint32) << 31))
        index[split].append((len(ids), int(mask.argmax()), int(mask.sum())))
    as_words = tuple(np.concatenate(w) if w else np.zeros(0, np.uint32) for w in words)
    as_index = tuple(np.asarray(i, dtype=np.uint32).reshape(-1, 3) for i in index)
    return _Encoded(as_words, as_index, skipped, unrecognised, sum(n for _, _, n in chunk))


def _chunks(records: Iterable[tuple[str, Any, int]]) -> Iterator[list]:
    chunk: list = []
    size = 0
    for record in records:
        chunk.append(record)
        size += record[2]
        if size >= CHUNK_BYTES or len(chunk) >= CHUNK_RECORDS:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


# ----------------------------------------------------------------------------------------------------------------
# Preparing one source


def content_key(source: str, tokenizer, settings: PrepareSettings) -> str:
    fields = dataclasses.asdict(settings.fields)
    parts = [FORMAT, FORMAT_VERSION, convlib.source_fingerprint(source), tokenizer.hash, fields, settings.held_out,
             settings.seed]
    return hashlib.blake2b(repr(parts).encode(), digest_size=8).hexdigest()


def prepared_folder(source: str, tokenizer, settings: PrepareSettings, cache_dir: Path) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", source).strip("-.")[-48:] or "source"
    return Path(cache_dir) / f"{slug}-{content_key(source, tokenizer, settings)}"


def open_prepared(source: str, folder: Path) -> PreparedSource:
    meta = read_json(folder / "meta.json")
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{folder} is not prepared conversation data this minigpt reads: delete it and run again")
    return PreparedSource(source, folder, meta)


def prepare_source(source: str, tokenizer, settings: PrepareSettings, cache_dir: str | os.PathLike | None = None,
                   quiet: bool = False) -> PreparedSource:
    """Tokenize one source (no weight) into the cache, or find it prepared before; returns it either way."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    convlib.check_source(source)
    folder = prepared_folder(source, tokenizer, settings, cache)
    if (folder / "meta.json").is_file():
        prepared = open_prepared(source, folder)
        if not quiet and not prepared.empty:  # (an empty source is reported once, by the caller)
            print(f"prepared before ({folder}): {prepared.summary()}", file=sys.stderr)
        return prepared
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        meta = _write(source, tokenizer, settings, tmp, quiet)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished the same folder first: its copy is as good as ours
            if not (folder / "meta.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prepared = PreparedSource(source, folder, meta)
    if not quiet and not prepared.empty:  # (an empty source is reported once, by the caller)
        print(f"prepared {folder}: {prepared.summary()}", file=sys.stderr)
    return prepared


def _write(source: str, tokenizer, settings: PrepareSettings, tmp: Path, quiet: bool) -> dict[str, Any]:
    tokenizer_path = tokenizer.save(tmp / "tokenizer.json")  # the workers load it (no pickling a tokenizer)
    workers = settings.workers or cpu_count()
    writers = {split: ShardWriter(tmp, split, np.dtype("<u4"), ONE_SHARD) for split in SPLITS}
    index: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
    skipped: Counter = Counter()
    unrecognised = None
    size = convlib.source_size(source)
    bar_args = dict(unit="B", unit_scale=True, unit_divisor=1000) if size else dict(unit="chunk")
    try:
        with OrderedPool(_encode_chunk, workers, _init_worker, (str(tokenizer_path), settings),
                         reset=_worker.clear) as pool, \
                progress(size, desc=f"prepare {source}", disable=quiet or None, **bar_args) as bar:
            for encoded in pool.map(_chunks(convlib.iter_records(source, settings.fields, skipped))):
                for s, split in enumerate(SPLITS):
                    writers[split].write(encoded.words[s])
                    index[split].append(encoded.index[s])
                skipped.update(encoded.skipped)
                unrecognised = unrecognised or encoded.unrecognised
                bar.update(encoded.input_bytes if size else 1)
        for writer in writers.values():
            writer.close()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    rows = {split: np.concatenate(index[split]) if index[split] else np.zeros((0, 3), np.uint32) for split in SPLITS}
    for split in SPLITS:
        np.save(tmp / f"{split}_index.npy", rows[split])
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "source": source,
            "tokenizer": {"name": tokenizer.name, "hash": tokenizer.hash, "n_vocab": tokenizer.n_vocab},
            "fields": dataclasses.asdict(settings.fields), "held_out": settings.held_out, "seed": settings.seed,
            "word": "uint32: token id | trained << 31",
            "splits": {split: {"conversations": len(rows[split]), "tokens": int(rows[split][:, 0].sum()),
                               "trained_tokens": int(rows[split][:, 2].sum())} for split in SPLITS},
            "skipped": dict(sorted(skipped.items())), "unrecognised_fields": unrecognised}
    write_json(tmp / "meta.json", meta)
    return meta
