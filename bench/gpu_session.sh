#!/usr/bin/env bash
# The one command of a GPU session for the training speed table (bench/train_gpu.py), on a bare machine.
#
#     bash bench/gpu_session.sh                      # uniform random tokens: needs nothing but torch and minigpt
#     bash bench/gpu_session.sh data/fineweb-gpt2    # a carried shards folder (minigpt prepare, GPT-2 tokenizer)
#     bash bench/gpu_session.sh random --only fused,ref --steps 50     # further flags go to train_gpu.py
#     bash bench/gpu_session.sh optimizer data/bundled-gpt2   # AdamW vs Muon on GPT-2 124M instead (optimizer_gpu.py)
#
# Runs from the repository copy without installing anything: PYTHONPATH points at it (the image has torch, numpy,
# regex, tiktoken, safetensors, tqdm, matplotlib, pyyaml). Writes into $OUT (default ./out):
#     env.txt             nvidia-smi, Python, torch and CUDA versions, C compiler (Triton needs one to compile)
#     train_gpu.log       the benchmark's stdout: one line per finished row, then the Markdown table
#     train_gpu.stderr    progress bars and the tracebacks of failed rows
#     train_gpu.json      the rows, rewritten after every row (so a timeout still leaves the finished ones)
# Time: at most 20 s + 40 s for the checks and TIMEOUT_S (default 480) for the benchmark, 9 minutes in all; rows
# stop starting after BUDGET_S (default 330) seconds, so the benchmark normally ends by itself with a full table.
# `optimizer DATA`: bench/optimizer_gpu.py (600 steps of each optimizer, same tokens: val-loss curves, tokens/s, the
# measured token-efficiency factor) into optimizer_gpu.{log,stderr,json}, within TIMEOUT_S (default 270) seconds.
# DATA: shards made here with GPT-2's tokenizer and carried (the GPU has no network), e.g.
#     minigpt prepare --sources wiki news bible --tokenizer gpt2 --val-fraction 0.05 --out data/bundled-gpt2
set -uo pipefail
cd "$(dirname "$0")/.."
DATA="${1:-random}"
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-$(command -v python || command -v python3)}"

{
    date -u
    timeout 20 nvidia-smi || echo "nvidia-smi failed or is missing"
    timeout 40 "$PY" -c 'import sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda, "|",
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA DEVICE")'
    echo "C compiler: $(command -v gcc || command -v cc || echo none)"
} 2>&1 | tee "$OUT/env.txt"

# Every import the benchmark needs, checked before the first row: one line naming what is missing, and no table
# run that would trip over it minutes later.
"$PY" - <<'PY' 2>&1 | tee -a "$OUT/env.txt"
import importlib, shutil, sys
needed = ["torch", "numpy", "regex", "tiktoken", "safetensors", "tqdm", "matplotlib", "yaml",
          "minigpt.train.train", "minigpt.data.loader", "minigpt.data.prepare", "minigpt.text.tokenizer", "minigpt.runs.log"]
missing = []
for name in needed:
    try:
        importlib.import_module(name)
    except Exception as exc:  # an ImportError, or a module that fails while importing
        missing.append(f"{name} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
import torch
if torch.cuda.is_available():
    try:
        importlib.import_module("triton")  # torch.compile's GPU code generator
    except Exception:
        missing.append("triton (torch.compile rows need it)")
    if not (shutil.which("gcc") or shutil.which("cc")):
        missing.append("a C compiler (Triton compiles a small launcher with it)")
if missing:
    print("gpu_session: missing before the first row: " + "; ".join(missing))
    sys.exit(2)
print("gpu_session: every import the benchmark needs is here")
PY
[ "${PIPESTATUS[0]}" -eq 0 ] || exit 2

if [ "$DATA" = optimizer ]; then
    timeout -k 10 "${TIMEOUT_S:-270}" "$PY" bench/optimizer_gpu.py --data "${2:?optimizer needs a shards folder}" \
        --json "$OUT/optimizer_gpu.json" "${@:3}" 2> "$OUT/optimizer_gpu.stderr" | tee "$OUT/optimizer_gpu.log"
    rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || { echo "optimizer_gpu.py exit status $rc"; tail -n 25 "$OUT/optimizer_gpu.stderr"; }
    exit "$rc"
fi

timeout -k 10 "${TIMEOUT_S:-480}" "$PY" bench/train_gpu.py --data "$DATA" --json "$OUT/train_gpu.json" \
    --budget-s "${BUDGET_S:-330}" "${@:2}" 2> "$OUT/train_gpu.stderr" | tee "$OUT/train_gpu.log"
rc=${PIPESTATUS[0]}
if [ "$rc" -ne 0 ]; then
    echo "train_gpu.py exit status $rc$([ "$rc" -eq 124 ] && echo ' (timed out: the rows finished so far follow)')"
    [ -f "$OUT/train_gpu.json" ] && "$PY" -c 'import json, sys
for r in json.load(open(sys.argv[1]))["rows"]:
    print(r["key"], r["status"], r.get("batch"), r.get("tokens_per_s"), r.get("mfu"), r.get("peak_mem_gib"))' \
        "$OUT/train_gpu.json"
    echo "--- last lines of train_gpu.stderr:"
    tail -n 40 "$OUT/train_gpu.stderr" | tr '\r' '\n' | grep -v "it/s\|step/s" | tail -n 25
fi
exit "$rc"
