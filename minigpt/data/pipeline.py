"""The data path of `minigpt prepare`: sources -> documents -> train/validation split -> chunks -> tokens.

    reader = Sources(["notes/", "hf:org/data"], "text", skipped, start=None)   # documents, resumable
    splitter = Splitter(seed=0, val_fraction=0.005)                            # the split rule, resumable
    for chunk, resume in chunks(reader, splitter, skipped, chunk_chars=250_000):
        ...                                   # resume: where a later run continues after this chunk, or None
    with encoder("gpt2", tokenizer, dtype, workers) as pool:                 # workers.OrderedPool
        for (train, val, train_bytes, val_bytes), tag in pool.map_tagged(tagged_chunks): ...

Everything here runs in the main process except `_encode_chunk`, which runs in worker processes (see prepare.py for
how the results are written, and docs/data.md for the rule below).

Split rule. A document goes to validation when blake2b(f"{seed}:{source id}") read as a fraction in [0, 1) falls
below `val_fraction`. A document longer than `LARGE_DOC_CHARS` characters (or a large file read in pieces) is split
into sections of at most `SECTION_CHARS` characters, cut after a blank line where there is one, and each section
is decided the same way with the key f"{source id}#{n}" (n counts the document's sections from 0), so a corpus that
is one huge document still holds out about `val_fraction` of its text. The first document of a run (the first
section, for a large one) always goes to validation unless `val_fraction` is 0, so even a tiny corpus has a
validation split. Within a split, consecutive sections of one document continue without an end-of-text; a section
whose predecessor went to the other split starts a new stretch with one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from minigpt.common import is_held_out, pool_worker_signals
from minigpt.data.workers import OrderedPool
from minigpt.text import corpus

LARGE_DOC_CHARS = 2**20  # documents longer than this are split into sections for the train/validation split
SECTION_CHARS = 2**16  # the most characters of one section

Chunk = list[tuple[int, bool, str]]  # (split index: 0 train, 1 validation; end-of-text before it; text)


def split_rule() -> str:
    """The rule in one line, for meta.json."""
    return (f"blake2b(f'{{seed}}:{{source id}}') < val_fraction per document; documents over {LARGE_DOC_CHARS:,} "
            f"characters go by sections of at most {SECTION_CHARS:,} characters keyed f'{{source id}}#{{n}}'; "
            f"the first document (or section) of the run always goes to validation")


def sections(text: str, size: int | None = None) -> list[str]:
    """`text` cut into pieces of at most `size` (default SECTION_CHARS) characters, after a blank line where
    possible, else after a line."""
    size = size or SECTION_CHARS
    out, start = [], 0
    while len(text) - start > size:
        end = text.rfind("\n\n", start, start + size) + 2
        if end <= start + 1:
            end = text.rfind("\n", start, start + size) + 1
        if end <= start:
            end = start + size
        out.append(text[start:end])
        start = end
    out.append(text[start:])
    return out


# ----------------------------------------------------------------------------------------------------------------
# Documents of all sources, and the split


class Sources:
    """The documents of several sources in order; `position()` after a document says where a later run resumes."""

    def __init__(self, sources: list[str], text_field: str, skipped: corpus.Skipped,
                 start: dict[str, Any] | None = None, retry: Any = None) -> None:
        self.sources, self.text_field, self.skipped, self.retry = sources, text_field, skipped, retry
        self.index = start["source"] if start else 0
        self._start = {k: v for k, v in start.items() if k != "source"} if start else {}
        self._stream: corpus.DocumentStream | None = None
        self.expected: dict[int, int] = {}  # records of hf: sources, once their streams tell

    def __iter__(self) -> Iterator[corpus.Document]:
        first = self.index
        for index in range(first, len(self.sources)):
            self.index = index
            self._stream = corpus.DocumentStream(self.sources[index], self.text_field, self.skipped,
                                                 start=self._start if index == first else None, retry=self.retry)
            for doc in self._stream:
                if self._stream.expected_records is not None:
                    self.expected[index] = self._stream.expected_records
                yield doc
        self.index, self._stream = len(self.sources), None

    def position(self) -> dict[str, Any]:
        if self._stream is None:  # not started (a resumed position stands) or finished
            return {"source": self.index, **(self._start if self.index < len(self.sources) else {})}
        return {"source": self.index, **self._stream.position()}

    def describe(self, position: dict[str, Any]) -> str:
        index = position["source"]
        if index >= len(self.sources):
            return "the end of the sources"
        rest = {k: v for k, v in position.items() if k != "source"}
        return f"{self.sources[index]}, {corpus.describe_position(self.sources[index], rest)}"


class Splitter:
    """Applies the split rule of the module docstring; `state()` / `Splitter(..., state)` carry it across runs."""

    def __init__(self, seed: int, val_fraction: float, state: dict[str, Any] | None = None) -> None:
        self.seed, self.val_fraction = seed, val_fraction
        state = state or {}
        self.first = state.get("first", True)  # nothing has gone to a split yet
        self.large = state.get("large", False)  # the current document goes by sections
        self.section = state.get("section", 0)  # the next section's number within it
        self.prev = state.get("prev")  # the split of its last section (or of the last document)
        self.documents = list(state.get("documents", [0, 0]))  # stretches started per split (= end-of-text tokens)

    def state(self) -> dict[str, Any]:
        return {"first": self.first, "large": self.large, "section": self.section, "prev": self.prev,
                "documents": list(self.documents)}

    def _held_out(self, key: str) -> bool:
        held = (self.first and self.val_fraction > 0) or is_held_out(key, self.val_fraction, self.seed)
        self.first = False
        return held

    def split(self, doc: corpus.Document) -> Chunk:
        """The (split, starts, text) pieces of one document (or of one piece of a large file)."""
        if not doc.continues:
            self.large, self.section = len(doc.text) > LARGE_DOC_CHARS, 0
        elif not self.large:  # a later piece of a file that started small: it stays with its first piece
            return [(self.prev, False, doc.text)]
        if not self.large:
            split = int(self._held_out(doc.source))
            self.documents[split] += 1
            self.prev = split
            return [(split, True, doc.text)]
        out = []
        for text in sections(doc.text):
            split = int(self._held_out(f"{doc.source}#{self.section}"))
            starts = self.section == 0 or split != self.prev
            self.documents[split] += starts
            out.append((split, starts, text))
            self.prev = split
            self.section += 1
        return out


def chunks(reader: Sources, splitter: Splitter, skipped: corpus.Skipped,
           chunk_chars: int) -> Iterator[tuple[Chunk, dict[str, Any] | None]]:
    """Split documents packed into chunks of about `chunk_chars` characters, each with where a later run resumes
    once the chunk is written (None for a chunk that ends inside a large document: no resume point there)."""
    chunk: Chunk = []
    size = 0

    def resume() -> dict[str, Any]:
        return {"position": reader.position(), "splitter": splitter.state(), "skipped": vars(skipped).copy()}

    for doc in reader:
        pieces = splitter.split(doc)
        for i, piece in enumerate(pieces):
            chunk.append(piece)
            size += len(piece[2])
            if size >= chunk_chars:
                yield chunk, resume() if i == len(pieces) - 1 else None
                chunk, size = [], 0
    yield chunk, resume()  # possibly empty: it carries the final position


# ----------------------------------------------------------------------------------------------------------------
# Tokenizing (worker processes)

_worker: dict[str, Any] = {}


def _init_worker(spec: str, dtype: str) -> None:
    pool_worker_signals()  # the main process handles Ctrl-C and SIGTERM and then ends the pool
    # An exception escaping a Pool initializer makes the pool restart the worker forever; keep it for the task.
    try:
        from minigpt.text.tokenizer import load_tokenizer  # (the main process checked the spec before starting us)

        _worker["tokenizer"] = load_tokenizer(spec)
    except Exception as exc:  # noqa: BLE001 - re-raised by the first task
        _worker["error"] = exc
    _worker["dtype"] = np.dtype(dtype)


def _encode_chunk(chunk: Chunk) -> tuple[np.ndarray, np.ndarray, int, int]:
    """One chunk -> (train tokens, val tokens, train text bytes, val text bytes); every stretch that starts is
    preceded by end-of-text. Text bytes are counted here, not in the main process, which is the bottleneck."""
    if "error" in _worker:
        raise _worker["error"]
    tok = _worker["tokenizer"]
    eot = tok.eot_id
    out: tuple[list[int], list[int]] = ([], [])
    nbytes = [0, 0]
    # One call per document: measured 2.4x faster than tiktoken's encode_ordinary_batch on one thread, whose
    # thread pool costs ~60 us per document (docs/data.md). The parallelism is the processes.
    for split, starts, text in chunk:
        if starts:
            out[split].append(eot)
        out[split].extend(tok.encode_ordinary(text))
        nbytes[split] += len(text.encode("utf-8"))
    return np.array(out[0], _worker["dtype"]), np.array(out[1], _worker["dtype"]), nbytes[0], nbytes[1]


def encoder(spec: str, tokenizer, dtype: np.dtype, workers: int) -> OrderedPool:
    """Chunks -> (train tokens, val tokens, train bytes, val bytes), in order, on `workers` processes (each loads
    the tokenizer `spec`), or in this process with `tokenizer` when there is one."""
    return OrderedPool(_encode_chunk, workers, _init_worker, (spec, dtype.str),
                       local_init=lambda: _worker.update(tokenizer=tokenizer, dtype=dtype), reset=_worker.clear)
