"""Preparing conversations for `minigpt sft` at scale: speed and the main process's memory on a large JSONL file.

    python bench/sft_prepare.py --mb 500 --dir /tmp/sft-bench      # the figure in docs/sft.md
    python bench/sft_prepare.py --mb 20 --workers 1                # quick

Writes `chats.jsonl` of about --mb megabytes in the OpenAI messages shape, once (SmolTalk-like: a system prompt on
a third of them, one to four user/assistant turns of Wikipedia sentences from the bundled summaries, 60 to ~1,500
GPT-2 tokens each), then prepares it with GPT-2's tokenizer (plus the chat tokens) into a fresh cache, in a child
process, and reports conversations, tokens, seconds, MB/s and the peak resident memory of that process (the main
one, which reads and writes) and of its largest worker.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import json, resource, sys, time
from minigpt.data.sft_data import PrepareSettings, prepare_source
from minigpt.text.tokenizer import Tokenizer
path, cache, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
tokenizer = Tokenizer.gpt2().with_chat_tokens()
start = time.perf_counter()
prepared = prepare_source(path, tokenizer, PrepareSettings(workers=workers), cache)
seconds = time.perf_counter() - start
splits = prepared.meta["splits"]
print(json.dumps({"seconds": seconds, "conversations": sum(s["conversations"] for s in splits.values()),
                  "tokens": sum(s["tokens"] for s in splits.values()),
                  "main_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "worker_peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def write_conversations(path: Path, megabytes: float, seed: int = 0) -> None:
    from minigpt.text.corpus import iter_documents

    sentences = [s for doc in iter_documents("wiki") for s in re.split(r"(?<=[.!?])\s+", doc.text) if len(s) > 20]
    rng = random.Random(seed)
    say = lambda n: " ".join(rng.choice(sentences) for _ in range(n))  # noqa: E731
    target, written = megabytes * 1e6, 0
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        while written < target:
            messages = [{"role": "system", "content": say(1)}] if rng.random() < 0.33 else []
            for _ in range(rng.choice((1, 1, 2, 2, 3, 4))):
                messages += [{"role": "user", "content": say(rng.randint(1, 3))},
                             {"role": "assistant", "content": say(rng.randint(1, 12))}]
            line = json.dumps({"messages": messages}, ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode("utf-8"))
    tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=500, help="size of the conversations file (default: 500)")
    parser.add_argument("--dir", default="", help="where the file and the cache go (default: a temporary folder)")
    parser.add_argument("--workers", type=int, default=0, help="tokenizer processes (0: one per core)")
    args = parser.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="sft-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"chats-{args.mb:g}mb.jsonl"
    if not path.exists():
        start = time.perf_counter()
        write_conversations(path, args.mb)
        print(f"wrote {path} ({path.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - start:.0f} s",
              file=sys.stderr)
    cache = Path(tempfile.mkdtemp(prefix="cache-", dir=root))
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), str(cache), str(args.workers)], check=True,
                         stdout=subprocess.PIPE, text=True)
    result = json.loads(out.stdout)
    result["input_mb"] = path.stat().st_size / 1e6
    result["mb_per_s"] = result["input_mb"] / result["seconds"]
    result["cache_mb"] = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()) / 1e6
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
