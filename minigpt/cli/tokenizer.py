"""`minigpt tokenizer train | encode | decode | stats`: learn a byte-level BPE vocabulary, use it, measure it."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from minigpt.common import UserError
from minigpt.text import _bpe, corpus
from minigpt.text.corpus import Skipped
from minigpt.text.tokenizer import DEFAULT_PATTERN, FORMAT, PATTERNS, NoText, Tokenizer, load_tokenizer


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
