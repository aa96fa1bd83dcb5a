"""bench/train_gpu.py: its CPU smoke mode end to end, and the parts a GPU session relies on but a CPU cannot reach
(the plain reference model's equivalence, the out-of-memory handling of the max-batch rows, GPT-2-sized random data).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from minigpt.data.shards import read_meta, shards_tokenizer
from minigpt.model.gpt import GPT, ModelConfig

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "train_gpu.py"
VOCAB = 8192  # the tiny preset's
SMOKE_KEYS = ["eager", "compile", "fused", "ckpt", "fp16", "ref", "max"]


def load_bench():
    spec = importlib.util.spec_from_file_location("train_gpu_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[str, dict]:
    """One CPU smoke run: tiny preset, 3 steps per row (the first left out of tokens/s), random tokens."""
    out = tmp_path_factory.mktemp("train_gpu") / "rows.json"
    cmd = [sys.executable, str(BENCH), "--device", "cpu", "--preset", "tiny", "--batch", "2", "--seq-len", "64",
           "--steps", "3", "--warmup", "1", "--no-compile", "--random-tokens", "50000", "--max-batch", "4",
           "--only", ",".join(SMOKE_KEYS), "--threads", "1", "--json", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=240)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout, json.loads(out.read_text())


def test_smoke_prints_the_table_with_every_row(smoke):
    stdout, data = smoke
    assert "| key | configuration | batch | tokens/s | MFU | peak mem GiB | loss first | loss @3 | status |" in stdout
    table = {line.split("|")[1].strip(): line for line in stdout.splitlines() if line.startswith("| ")}
    assert set(SMOKE_KEYS) <= set(table)
    rows = {r["key"]: r for r in data["rows"]}
    assert list(rows) == ["eager", "compile", "fused", "ckpt", "fp16", "ref", "max"]  # the table's order
    for key in ("eager", "fused", "ckpt", "ref", "max"):
        assert rows[key]["status"] == "ok", rows[key]
        assert table[key].rstrip().endswith("| ok |")
    assert rows["compile"]["status"] == "skipped: --no-compile"
    assert rows["fp16"]["status"] == "skipped: needs CUDA"
    assert rows["ref"]["plain"] and not rows["fused"]["plain"]
    assert rows["eager"]["fused"] is False and rows["fused"]["fused"] is True
    assert rows["ckpt"]["checkpointing"] is True
    assert "ours / plain loop" in stdout and data["ours_over_plain"] == pytest.approx(
        rows["fused"]["tokens_per_s"] / rows["ref"]["tokens_per_s"])


def test_smoke_measures_throughput_after_the_warmup(smoke):
    _, data = smoke
    for row in data["rows"]:
        if row["status"] == "ok":
            assert row["timed_steps"] == 2
            assert row["tokens_per_s"] > 0 and math.isfinite(row["tokens_per_s"])
            assert row["wall_s"] > 0
    assert data["flops_per_token"] > 0 and data["peak_flops"] is None  # no MFU on a CPU


def test_ours_and_the_plain_loop_start_from_the_same_loss(smoke):
    """Same initial weights and the same first window: the step-1 losses agree, whichever loop or optimizer."""
    _, data = smoke
    rows = {r["key"]: r for r in data["rows"]}
    first = rows["fused"]["loss_first"]
    for key in ("eager", "ckpt", "ref"):
        assert rows[key]["loss_first"] == pytest.approx(first, abs=0.01), key
    # ... and the same updates: three steps later they still agree.
    assert rows["ref"]["loss_last"] == pytest.approx(rows["fused"]["loss_last"], abs=0.01)


def test_losses_are_finite_and_near_ln_vocab_on_random_tokens(smoke):
    _, data = smoke
    assert data["n_vocab"] == VOCAB
    for row in data["rows"]:
        if row["status"] != "ok":
            continue
        for loss in (row["loss_first"], row["loss_last"]):
            assert math.isfinite(loss)
            assert abs(loss - math.log(VOCAB)) < 0.5, row  # uniform tokens: nothing below ln(vocab) to learn
        assert row["loss_last"] < row["loss_first"] + 0.1, row  # not diverging


def test_smoke_searches_the_largest_batch(smoke):
    _, data = smoke
    row = next(r for r in data["rows"] if r["key"] == "max")
    assert row["batch"] == 4  # doubled from --batch 2 up to --max-batch 4
    assert any("tried 2, 4" in note for note in row["notes"])


def test_plain_model_computes_minigpt_gpt2():
    """The reference module, given minigpt's weights, is the same function (fp32, no vocabulary padding)."""
    bench = load_bench()
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=128)
    torch.manual_seed(0)
    ours = GPT(cfg).eval()
    plain = bench.PlainGPT(cfg).eval()
    plain.load_state_dict(bench.plain_state_dict(ours.state_dict()))  # strict: every name maps
    x = torch.randint(0, 128, (3, 16))
    y = torch.randint(0, 128, (3, 16))
    with torch.no_grad():
        _, expected = ours(x, y)
        assert plain(x, y).item() == pytest.approx(expected.item(), abs=1e-5)
    assert plain.head.weight is plain.tok.weight


def test_random_shards_have_gpt2s_vocabulary_size(tmp_path):
    """--data random for the gpt2 preset: 50257 ids, readable by the loader, with a tokenizer needing no files."""
    bench = load_bench()
    out = bench.write_random_shards(tmp_path / "random", 50257, 20_000, 2_000, seed=0)
    tokenizer = shards_tokenizer(out)
    assert tokenizer.n_vocab == 50257 and tokenizer.eot_id == 50256
    meta = read_meta(out)
    assert meta["splits"]["train"]["tokens"] == 20_000 and meta["splits"]["val"]["tokens"] == 2_000
    assert meta["splits"]["train"]["text_bytes"] > 0


def _guarded(bench, row, fail_above: int, error: Exception | None = None):
    def fake_run_row(row, args, model_cfg, device):  # noqa: ANN001, ANN202
        if error is not None:
            raise error
        if row.batch > fail_above:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory at {row.batch}")
        row.status = "ok"

    args = argparse.Namespace(batch=4, budget_s=1e9, started=time.perf_counter())
    original = bench.run_row
    bench.run_row = fake_run_row
    try:
        bench.run_guarded(row, args, None, torch.device("cpu"))
    finally:
        bench.run_row = original
    return row


def test_a_max_row_halves_its_batch_until_it_fits():
    bench = load_bench()
    row = _guarded(bench, bench.Row("max", batch=32), fail_above=8)
    assert row.status == "ok" and row.batch == 8
    assert row.result["notes"] == ["out of memory at batch 32", "out of memory at batch 16"]
    row = _guarded(bench, bench.Row("max", batch=8), fail_above=2)  # never below --batch 4
    assert row.status == "out of memory at batch 4"


def test_other_rows_report_oom_and_errors_without_stopping():
    bench = load_bench()
    assert _guarded(bench, bench.Row("fused", batch=16), fail_above=8).status == "out of memory at batch 16"
    row = _guarded(bench, bench.Row("fp16", batch=16), fail_above=64, error=ValueError("boom\nmore"))
    assert row.status == "error: ValueError: boom"
    assert bench.is_oom(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"))
    assert not bench.is_oom(RuntimeError("shape mismatch"))


def test_gpu_session_names_a_missing_import_before_the_first_row(tmp_path):
    """A bare GPU image without one package: the session script stops at once with one line naming it, instead of
    tripping over it minutes into the table."""
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "tiktoken.py").write_text("raise ImportError('No module named tiktoken')\n")
    env = {**os.environ, "PYTHONPATH": str(shadow), "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}
    result = subprocess.run(["bash", str(ROOT / "bench" / "gpu_session.sh")], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 2
    lines = [line for line in result.stdout.splitlines() if line.startswith("gpu_session:")]
    assert len(lines) == 1 and "missing before the first row: tiktoken" in lines[0]
    assert not (tmp_path / "out" / "train_gpu.json").exists()  # the benchmark never started


# ----------------------------------------------------------------------------------------------------------------
# bench/optimizer_gpu.py: AdamW against Muon (the GPU session's second command), smoke-run on the CPU


def load_optimizer_bench():
    spec = importlib.util.spec_from_file_location("optimizer_gpu_bench", ROOT / "bench" / "optimizer_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_optimizer_bench_smoke_prints_both_curves_and_the_factor(tmp_path, tiny_shards):
    out = tmp_path / "optimizer.json"
    cmd = [sys.executable, str(ROOT / "bench" / "optimizer_gpu.py"), "--data", str(tiny_shards), "--device", "cpu",
           "--preset", "tiny", "--batch", "4", "--seq-len", "32", "--steps", "10", "--warmup", "2", "--eval-every",
           "5", "--eval-batches", "2", "--json", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| tokens | adamw val loss | muon val loss |" in proc.stdout and "token efficiency" in proc.stdout
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert [t for t, _ in rows["adamw"]["curve"]] == [t for t, _ in rows["muon"]["curve"]] == [640, 1280]
    assert rows["muon"]["lr"] == rows["adamw"]["lr"] == 6e-4  # gpt2-124m-muon's muon_lr = lr
    assert all(r["tokens_per_s"] > 0 and math.isfinite(r["final_val_loss"]) for r in rows.values())


def test_token_efficiency_reads_muons_curve_at_adamws_final_loss():
    bench = load_optimizer_bench()
    adamw = {"curve": [(100, 5.0), (200, 4.0), (300, 3.5)], "final_val_loss": 3.5}
    muon = {"curve": [(100, 4.5), (200, 3.0), (300, 2.8)], "final_val_loss": 2.8}
    assert bench.tokens_to_reach(muon["curve"], 3.5) == pytest.approx(100 + 100 * (4.5 - 3.5) / (4.5 - 3.0))
    factor, reading = bench.token_efficiency(adamw, muon)
    assert factor == pytest.approx(300 / (100 + 100 / 1.5)) and reading == f"{factor:.2f}"
    assert bench.token_efficiency(adamw, {"curve": [(100, 4.5), (300, 3.6)], "final_val_loss": 3.6})[0] is None
    early = bench.token_efficiency(adamw, {"curve": [(100, 3.0), (300, 2.0)], "final_val_loss": 2.0})
    assert early == (3.0, "> 3.00 (already below at Muon's first evaluation)")


def test_gpu_session_runs_the_optimizer_comparison(tmp_path, tiny_shards):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    smoke = ["--device", "cpu", "--preset", "tiny", "--batch", "2", "--seq-len", "32", "--steps", "4", "--warmup",
             "1", "--eval-every", "2", "--eval-batches", "1"]
    result = subprocess.run(["bash", str(ROOT / "bench" / "gpu_session.sh"), "optimizer", str(tiny_shards), *smoke],
                            capture_output=True, text=True, env=env, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads((tmp_path / "out" / "optimizer_gpu.json").read_text())
    assert set(data["rows"]) == {"adamw", "muon"} and "token efficiency" in (tmp_path / "out" /
                                                                               "optimizer_gpu.log").read_text()
