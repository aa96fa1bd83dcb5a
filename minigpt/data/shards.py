"""The token shard format: writing, mapping, reading a folder's meta.

A shard file is a 64-byte header (magic bytes, format version, bytes per token, token count, zero-padded so the
tokens start 64-byte aligned), then the tokens as little-endian uint16 (or uint32 when the vocabulary needs it).
A shards folder holds `{split}_000000.bin, ...`, the `meta.json` that lists them and `tokenizer.json`, the tokenizer
they were made with. `minigpt prepare` (prepare.py) and fine-tuning data (sft_data.py) write shards with
`ShardWriter`; the loader, evaluation and planning read them with `open_shard`, `read_meta` and `check_tokenizer`.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from minigpt.common import UserError, read_json
from minigpt.text.tokenizer import Tokenizer

FORMAT_VERSION = 1
MAGIC = b"MGPTTOKS"
HEADER = struct.Struct("<8sIIQ")  # magic, format version, bytes per token, token count
HEADER_BYTES = 64  # the struct above, zero-padded so token data starts 64-byte aligned
DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}


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
