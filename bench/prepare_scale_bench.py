"""What `minigpt prepare` and the shard reader cost at scale, measured four ways (figures in docs/data.md).

    python bench/prepare_scale_bench.py parquet-memory [--before OLD_CHECKOUT]   # peak RSS, one 150 MB row group
    python bench/prepare_scale_bench.py cold-read                                 # bytes read from a cold 1 GB shard
    python bench/prepare_scale_bench.py resume                                    # kill -9 half-way, then resume
    python bench/prepare_scale_bench.py split                                     # one 50 MB file: share held out

parquet-memory: writes a Parquet file whose text column is about 150 MB in a single row group, runs
    `minigpt prepare` on it in a child process (2 workers) and prints the main process's own peak RSS (VmHWM; the
    workers are not included). --before runs the same with another checkout on PYTHONPATH (e.g. one made with
    `git worktree add /tmp/before bac8ac2`).
cold-read: writes a ~1 GB shard, drops it from the page cache (posix_fadvise DONTNEED, no root needed), reads 200
    random batches of 16 x 1025 tokens through TokenLoader and reports /proc/self/io read_bytes: with the kernel's
    default read-ahead (a plain np.memmap, as before), with madvise(MADV_RANDOM) (open_shard now) and with
    posix_fadvise(RANDOM) alone (the fallback).
resume: prepares a generated Parquet folder once uninterrupted, then again in a child killed with SIGKILL once half
    the shards are finished, then reruns the same command; prints the times, the work done before the kill and
    re-done after it, and checks the result byte for byte.
split: the split rule alone on one 50 MB text document at several validation fractions (no tokenizing).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
WORDS = ["the", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "as", "by", "at", "from", "his",
         "her", "an", "were", "are", "which", "this", "be", "or", "has", "had", "not", "but", "first", "also", "new",
         "one", "two", "after", "their", "its", "time", "school", "students", "learning", "energy", "water", "history"]


def words_text(rng: np.random.Generator, n_words: int) -> str:
    return " ".join(rng.choice(WORDS, size=n_words))


def child_env(pythonpath: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(pythonpath)}


# ----------------------------------------------------------------------------------------------------------------


# VmHWM, not ru_maxrss: a child's ru_maxrss also counts the forked copy of its parent (this script, holding the
# generated table) from before the exec; VmHWM belongs to the exec'd program's own address space.
PEAK = """
import sys
from minigpt.cli import main
rc = main(sys.argv[1:])
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(f"peak_rss_mb {int(hwm.split()[1]) / 1024:.0f}", file=sys.stderr)
sys.exit(rc)
"""


def parquet_memory(args) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        path = Path(tmp) / "one-row-group.parquet"
        rng = np.random.default_rng(0)
        texts = [words_text(rng, int(rng.integers(200, 1500))) for _ in range(40_000)]
        pq.write_table(pa.table({"text": texts, "id": range(len(texts))}), path, row_group_size=1 << 30)
        meta = pq.ParquetFile(path).metadata
        column = meta.row_group(0).column(0).total_uncompressed_size
        print(f"file: {path.stat().st_size / 1e6:.0f} MB on disk, {meta.num_row_groups} row group, text column "
              f"{column / 1e6:.0f} MB uncompressed, {meta.num_rows:,} rows")
        trees = [("before", Path(args.before))] if args.before else []
        for label, tree in [*trees, ("after", REPO)]:
            out = Path(tmp) / f"out-{label}"
            start = time.perf_counter()
            # cwd=tmp: with -c the current folder leads sys.path, and no checkout but `tree` may be found there.
            run = subprocess.run([sys.executable, "-c", PEAK, "prepare", "--sources", str(path), "--tokenizer",
                                  "gpt2", "--out", str(out), "--workers", "2"], env=child_env(tree),
                                 capture_output=True, text=True, cwd=tmp)
            elapsed = time.perf_counter() - start
            peak = [line for line in run.stderr.splitlines() if line.startswith("peak_rss_mb")]
            if run.returncode != 0 or not peak:
                sys.exit(f"{label} failed: {run.stderr[-2000:]}")
            print(f"{label:<7} main process peak RSS {peak[0].split()[1]} MB, {elapsed:.1f} s")
            shutil.rmtree(out)


# ----------------------------------------------------------------------------------------------------------------


def read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    raise RuntimeError("no read_bytes in /proc/self/io")


def drop_from_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cold_read(args) -> None:
    from minigpt.common import write_json
    from minigpt.data.loader import TokenLoader
    from minigpt.data.shards import FORMAT_VERSION, HEADER_BYTES, ShardWriter

    n_tokens = args.gb * 2**30 // 2
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        folder = Path(tmp)
        writer = ShardWriter(folder, "train", np.dtype("<u2"), shard_tokens=n_tokens)
        rng = np.random.default_rng(0)
        step = 2**24
        for start in range(0, n_tokens, step):
            writer.write(rng.integers(0, 50257, size=min(step, n_tokens - start), dtype=np.uint16))
        files = writer.close()
        write_json(folder / "meta.json", {
            "format": "minigpt-shards", "format_version": FORMAT_VERSION,
            "tokenizer": {"name": "gpt2", "hash": "-", "n_vocab": 50257, "eot_id": 50256}, "dtype": "uint16",
            "splits": {"train": {"documents": 1, "tokens": n_tokens, "text_bytes": n_tokens, "shards": files}}})
        path = folder / files[0]["file"]
        windows = args.batches * args.batch_size * (args.seq_len + 1) * 2
        print(f"shard: {path.stat().st_size / 2**30:.2f} GiB; {args.batches} random batches of {args.batch_size} x "
              f"{args.seq_len + 1} tokens = {windows / 2**20:.1f} MiB of windows")
        print(f"{'reader':<44} {'read from disk':>15} {'time':>8}")
        for label in ("default read-ahead (np.memmap, before)", "madvise(MADV_RANDOM) (open_shard, after)",
                      "posix_fadvise(RANDOM) only (the fallback)"):
            loader = TokenLoader(folder, "train", args.batch_size, args.seq_len, seed=1)
            if label.startswith("default"):
                loader._shards = [np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(n_tokens,))]
            elif label.startswith("posix_fadvise"):
                import mmap

                fd = os.open(path, os.O_RDONLY)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
                mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
                os.close(fd)
                loader._shards = [np.frombuffer(mapped, dtype="<u2", count=n_tokens, offset=HEADER_BYTES)]
            drop_from_cache(path)
            before, start = read_bytes(), time.perf_counter()
            for s in range(args.batches):
                loader.batch(s)
            elapsed = time.perf_counter() - start
            print(f"{label:<44} {(read_bytes() - before) / 2**20:11,.1f} MiB {elapsed:7.2f} s")
            del loader


# ----------------------------------------------------------------------------------------------------------------


def resume(args) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        root = Path(tmp)
        corpus = root / "corpus"
        corpus.mkdir()
        rng = np.random.default_rng(0)
        for f in range(args.files):
            texts = [words_text(rng, int(rng.integers(100, 1200))) for _ in range(args.rows)]
            pq.write_table(pa.table({"text": texts}), corpus / f"part-{f:03d}.parquet", row_group_size=1000)
        total = sum(len(t.encode()) for f in sorted(corpus.iterdir()) for t in pq.read_table(f)["text"].to_pylist())
        print(f"corpus: {args.files} Parquet files, {total / 1e6:.0f} MB of text; --shard-tokens {args.shard_tokens:,}"
              f", --workers 2")

        def command(out: Path) -> list[str]:
            return [sys.executable, "-m", "minigpt", "prepare", "--sources", str(corpus), "--tokenizer", "gpt2",
                    "--out", str(out), "--workers", "2", "--shard-tokens", str(args.shard_tokens)]

        start = time.perf_counter()
        subprocess.run(command(root / "full"), env=child_env(REPO), check=True, capture_output=True, cwd=root)
        full = time.perf_counter() - start
        print(f"uninterrupted run: {full:.1f} s")

        out, work = root / "out", root / ".out.partial"
        start = time.perf_counter()
        proc = subprocess.Popen(command(out), env=child_env(REPO), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, cwd=root)
        journal = {}
        while proc.poll() is None:
            with contextlib.suppress(FileNotFoundError, ValueError):
                journal = json.loads((work / "prepare-journal.json").read_text())
            if journal and len(journal["shards"]["train"]["finished"]) >= args.kill_after:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed_at = time.perf_counter() - start
        journal = json.loads((work / "prepare-journal.json").read_text())
        kept = sum(journal["text_bytes"])
        start = time.perf_counter()
        rerun = subprocess.run(command(out), env=child_env(REPO), capture_output=True, text=True, check=True,
                               cwd=root)
        again = time.perf_counter() - start
        said = [line for line in rerun.stderr.replace("\r", "\n").splitlines() if "resuming" in line]
        print(f"killed (SIGKILL) after {killed_at:.1f} s with {len(journal['shards']['train']['finished'])} train "
              f"shards finished: {kept / 1e6:.0f} MB of text ({kept / total:.0%}) kept")
        print(f"rerun of the same command: {again:.1f} s ({again / full:.0%} of the uninterrupted run), re-tokenized "
              f"{(total - kept) / 1e6:.0f} MB; it said: {said[0].strip() if said else '(nothing)'}")
        same = all((root / "full" / p.name).read_bytes() == p.read_bytes() for p in out.iterdir())
        same &= sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (root / "full").iterdir())
        print(f"byte-identical to the uninterrupted run: {same}; left beside the output: "
              f"{sorted(p.name for p in root.iterdir() if p.name not in ('corpus', 'full', 'out')) or 'nothing'}")


# ----------------------------------------------------------------------------------------------------------------


def split(args) -> None:
    from minigpt.data import pipeline
    from minigpt.text.corpus import Document

    rng = np.random.default_rng(0)
    paragraphs, size = [], 0
    while size < args.mb * 1_000_000:
        paragraph = words_text(rng, int(rng.integers(20, 200))) + ".\n\n"
        paragraphs.append(paragraph)
        size += len(paragraph)
    text = "".join(paragraphs)
    print(f"one document of {len(text) / 1e6:.1f} M characters ({len(pipeline.sections(text)):,} sections of at most "
          f"{pipeline.SECTION_CHARS:,} characters)")
    print(f"{'val_fraction':>12} {'held out (old rule)':>20} {'held out (sections)':>20} {'val stretches':>14}")
    for fraction in args.fractions:
        pieces = pipeline.Splitter(seed=0, val_fraction=fraction).split(Document(text, "book.txt"))
        held = sum(len(t) for s, _, t in pieces if s)
        stretches = sum(starts for s, starts, _ in pieces if s)
        print(f"{fraction:>12} {'100 %':>20} {held / len(text):>19.2%} {stretches:>14}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tmp", default=None, help="folder for the temporary files (on the disk to measure)")
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("parquet-memory")
    p.add_argument("--before", help="a checkout of the code before (its root goes on PYTHONPATH)")
    p = sub.add_parser("cold-read")
    p.add_argument("--gb", type=int, default=1)
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=1024)
    p = sub.add_parser("resume")
    p.add_argument("--files", type=int, default=20)
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--shard-tokens", type=int, default=2_000_000)
    p.add_argument("--kill-after", type=int, default=5, help="finished train shards before the kill")
    p = sub.add_parser("split")
    p.add_argument("--mb", type=float, default=50)
    p.add_argument("--fractions", type=float, nargs="+", default=[0.001, 0.005, 0.01, 0.05])
    args = parser.parse_args()
    {"parquet-memory": parquet_memory, "cold-read": cold_read, "resume": resume, "split": split}[args.what](args)


if __name__ == "__main__":
    main()
