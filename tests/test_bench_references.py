"""The references the CPU benchmarks race against do the same work as ours, so that their ratios mean something:
prepare_bench's pool writes the very tokens `minigpt prepare` writes; tokenizer_bench's Hugging Face tokenizer is
GPT-2's; train_cpu's plain loop with fused AdamW and the chunked loss computes what the plain one does, and the
script runs end to end.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minigpt.data.prepare import PrepareConfig, prepare
from minigpt.data.shards import open_shard, read_meta

ROOT = Path(__file__).resolve().parents[1]


def load_bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_prepare_references_write_what_prepare_writes(tmp_path, wiki_sample):
    bench = load_bench("prepare_bench")
    out = tmp_path / "ours"
    prepare(PrepareConfig(sources=[str(wiki_sample)], tokenizer="gpt2", out=str(out), val_fraction=0, workers=2))
    meta = read_meta(out)
    ours = np.concatenate([open_shard(out / s["file"]) for s in meta["splits"]["train"]["shards"]])
    enc = bench.tiktoken_gpt2()
    for name, run in [("pool", lambda p: bench.reference_pool(enc, [str(wiki_sample)], 2, p, shard_tokens=10_000)),
                      ("one", lambda p: bench.reference_one_process(enc, [str(wiki_sample)], p, shard_tokens=10_000))]:
        written = run(tmp_path / name)
        files = sorted(tmp_path.glob(f"{name}_*.bin"))
        sizes = [f.stat().st_size // 2 for f in files]
        assert len(files) > 1 and all(s == 10_000 for s in sizes[:-1]) and 0 < sizes[-1] <= 10_000, name
        theirs = np.concatenate([np.fromfile(f, dtype=np.uint16) for f in files])
        assert written == len(theirs) == len(ours), name
        assert np.array_equal(theirs, ours), name


def test_tokenizer_reference_is_gpt2(wiki_sample):
    bench = load_bench("tokenizer_bench")
    hf, tk = bench.gpt2_hf(), bench.tiktoken_gpt2()
    texts = [json.loads(line)["text"] for line in wiki_sample.read_text().splitlines()[:100]]
    texts += ["It's 2026: don't   stop\n\n\tnow!", "naïve café — 東京 🙂", "  leading and trailing  ", "x" * 300]
    assert [hf.encode(t, add_special_tokens=False).ids for t in texts] == [tk.encode_ordinary(t) for t in texts]


def test_plain_loop_with_the_tricks_computes_the_same(tiny_shards):
    bench = load_bench("train_cpu")
    cfg = bench.TrainConfig(data=str(tiny_shards), device="cpu", batch_size=2)
    _, plain = bench.plain_loop(tiny_shards, cfg, 3, tricks=False)
    _, tricks = bench.plain_loop(tiny_shards, cfg, 3, tricks=True)
    assert plain == pytest.approx(tricks, rel=1e-4)


def test_train_cpu_runs(tiny_shards):
    cmd = [sys.executable, str(ROOT / "bench" / "train_cpu.py"), "--data", str(tiny_shards), "--steps", "2",
           "--rounds", "1", "--batch-size", "2"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert [r.split(" | ")[0] for r in rows[1:]] == ["| minigpt train", "| plain, same tricks", "| plain, defaults"]
