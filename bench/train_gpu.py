"""Training speed on a GPU: GPT-2 124M through `minigpt train` in each speed configuration, and a plain loop beside it.

    python bench/train_gpu.py                                  # GPT-2 124M, context 1024, random tokens, on the GPU
    python bench/train_gpu.py --data data/fineweb-gpt2 --json out/train_gpu.json
    python bench/train_gpu.py --only fused,ref --steps 50      # a subset of the rows (keys below)
    python bench/train_gpu.py --device cpu --preset tiny --steps 3 --warmup 1 --no-compile --threads 1    # CPU smoke

Rows (key: what runs). "ours" is `minigpt.train.train.train()` itself, the real loop, given a temporary run folder; its
throughput is read back from the run's metrics.jsonl. Each row builds its model, optimizer and compiled graph anew.
    eager     ours, bf16 autocast, eager, foreach AdamW
    compile   ours, bf16, torch.compile, foreach AdamW
    fused     ours, bf16, torch.compile, fused AdamW            (minigpt's default on a GPU)
    ckpt      ours, as fused + gradient checkpointing
    fp16      ours, fp16 autocast + GradScaler, compile, fused  (CUDA only)
    ref       a plain nanoGPT-style loop written below: its own GPT-2 module of the same shapes, bf16 autocast,
              torch.compile, fused AdamW, F.scaled_dot_product_attention(is_causal=True)
    max       ours as fused at the largest micro-batch that fits (CUDA only)
    max-ckpt  the same with gradient checkpointing             (CUDA only)

Fairness: ours and the plain loop train the same shapes (GPT-2's padded vocabulary included) from the same initial
weights on the same windows of the same shards, with the same batch, learning rate schedule, AdamW settings,
gradient clipping and number of steps, one after the other on one card. The first --warmup steps (compilation,
allocator warm-up) are left out of tokens/s; both sides synchronise with the GPU once every --warmup steps
to read their loss, as a logging loop does. Peak memory is torch.cuda.max_memory_allocated, reset before each row.
MFU is training FLOPs (GPT.flops_per_token: 6N + 12 L C T) x tokens/s over the card's dense bf16 peak
(minigpt.model.estimate.GPUS, through minigpt.runs.runtime.peak_flops). "loss first" and "loss @N" are the mean
training loss over the first --warmup steps and over the last logging window (up to step N); on --data random (uniform
tokens) nothing can be learned, and both stay near ln(vocab).

The largest micro-batch is searched by doubling --batch until CUDA runs out of memory (or --search-s / --max-batch
stop it), with two eager steps of the same model and fused AdamW each (fast: no compilation per batch size);
torch.compile usually needs less memory than eager, and the compiled row then runs at that batch, halving it if it
does not fit after all.
Rows never stop the table: a failing row reports its error and the exit status is 1. --budget-s skips the rows
that would start after that many seconds, so a time-limited session still gets a table; --json is rewritten after
every row.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import math
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import minigpt.train.train as trainlib
from minigpt.common import seed_everything, write_json
from minigpt.data import prepare, shards
from minigpt.data.loader import TokenLoader
from minigpt.model.gpt import GPT, ModelConfig
from minigpt.model.optim import learning_rate, make_optimizer
from minigpt.runs.log import read_metrics
from minigpt.runs.runtime import peak_flops
from minigpt.text import corpus
from minigpt.text.tokenizer import ENDOFTEXT, PATTERNS, Tokenizer

ROW_ORDER = ["eager", "compile", "fused", "ckpt", "fp16", "ref", "max", "max-ckpt"]  # as the table shows them
RUN_ORDER = ["eager", "fused", "ref", "compile", "ckpt", "fp16", "max", "max-ckpt"]  # most wanted first


@dataclasses.dataclass
class Row:
    key: str
    precision: str = "bf16"
    compile: bool = True
    fused: bool = True
    checkpointing: bool = False
    plain: bool = False  # the reference loop instead of minigpt.train.train
    batch: int = 0  # 0: --batch; max rows fill it in after the search
    status: str = "pending"
    result: dict[str, Any] = dataclasses.field(default_factory=dict)

    def label(self) -> str:
        who = "plain loop" if self.plain else "ours"
        parts = [self.precision + (" + GradScaler" if self.precision == "fp16" else ""),
                 "compile" if self.compile else "eager", "fused AdamW" if self.fused else "foreach AdamW"]
        if self.checkpointing:
            parts.append("grad checkpointing")
        if self.key.startswith("max"):
            parts.append("max batch")
        if self.plain:
            parts.append("SDPA")
        return f"{who}: {', '.join(parts)}"


def make_rows(compile_ok: bool) -> dict[str, Row]:
    rows = {
        "eager": Row("eager", compile=False, fused=False),
        "compile": Row("compile", fused=False),
        "fused": Row("fused"),
        "ckpt": Row("ckpt", checkpointing=True),
        "fp16": Row("fp16", precision="fp16"),
        "ref": Row("ref", plain=True),
        "max": Row("max"),
        "max-ckpt": Row("max-ckpt", checkpointing=True),
    }
    if not compile_ok:
        for key, row in rows.items():
            row.compile = key == "compile"  # that row is skipped rather than run as a copy of "eager"
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Data: a shards folder, or uniform random tokens written in minigpt's shard format


def synthetic_tokenizer(n_vocab: int) -> Tokenizer:
    """A stand-in vocabulary of exactly `n_vocab` ids (256 bytes, then byte pairs, then <|endoftext|>); it needs no
    files, so random shards work on a bare machine. Only its size and hash matter to training."""
    if not 257 <= n_vocab <= 256 + 256 * 256 + 1:
        raise ValueError(f"a synthetic vocabulary of {n_vocab} ids is not supported")
    pairs = (bytes(p) for p in itertools.product(range(256), repeat=2))
    vocab = [bytes([b]) for b in range(256)] + list(itertools.islice(pairs, n_vocab - 257))
    return Tokenizer(vocab, {ENDOFTEXT: n_vocab - 1}, PATTERNS["gpt2"], name=f"random-{n_vocab}")


def write_random_shards(out: Path, n_vocab: int, train_tokens: int, val_tokens: int, seed: int) -> Path:
    """Uniform random token ids as a shards folder that `minigpt train` reads like one made by `minigpt prepare`."""
    tokenizer = synthetic_tokenizer(n_vocab)
    dtype = shards.token_dtype(n_vocab)
    token_bytes = np.array([len(tokenizer.token_bytes(i)) for i in range(n_vocab)], dtype=np.int64)
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    written, counts = {}, {}
    for split, n in (("train", train_tokens), ("val", val_tokens)):
        tokens = rng.integers(0, n_vocab, n, dtype=np.int64)
        writer = shards.ShardWriter(out, split, dtype, prepare.PrepareConfig.shard_tokens)
        try:
            writer.write(tokens)
            written[split] = writer.close()
        except BaseException:
            writer.abort()
            raise
        counts[split] = prepare._Counts(documents=1, text_bytes=int(token_bytes[tokens].sum()))
    tokenizer.save(out / "tokenizer.json")
    cfg = prepare.PrepareConfig(sources=["uniform random tokens"], tokenizer=str(out / "tokenizer.json"), out=str(out))
    write_json(out / "meta.json", prepare._meta(cfg, tokenizer, dtype, counts, written, corpus.Skipped()))
    return out


# ----------------------------------------------------------------------------------------------------------------
# The reference: a plain GPT-2 and training loop, nanoGPT style, written for this benchmark


class PlainBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.attn_out = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        # (B, T, 3C) -> 3 x (B, heads, T, head_dim): q, k and v side by side, each head's columns together
        q, k, v = self.qkv(self.norm1(x)).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_out(a.transpose(1, 2).reshape(B, T, C))
        return x + self.down(F.gelu(self.up(self.norm2(x)), approximate="tanh"))


class PlainGPT(nn.Module):
    """GPT-2 with the shapes of minigpt's (embedding rows padded the same way); the loss is over all the rows, as
    nanoGPT computes it (minigpt slices the padding off first: at the start that differs by < 0.001)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.tok = nn.Embedding(cfg.padded_vocab_size, cfg.n_embd)
        self.pos = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(PlainBlock(cfg.n_embd, cfg.n_head) for _ in range(cfg.n_layer))
        self.norm = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.padded_vocab_size, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.size(1), device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1))


PLAIN_PREFIXES = {"wte.": "tok.", "wpe.": "pos.", "h.": "blocks.", "ln_f.": "norm.", "lm_head.": "head."}
PLAIN_INSIDE = {".ln_1.": ".norm1.", ".attn.c_attn.": ".qkv.", ".attn.c_proj.": ".attn_out.", ".ln_2.": ".norm2.",
                ".mlp.c_fc.": ".up.", ".mlp.c_proj.": ".down."}


def plain_state_dict(ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """minigpt's parameter names -> the plain module's (both store Linear weights as (out, in))."""
    out = {}
    for name, tensor in ours.items():
        prefix = next(p for p in PLAIN_PREFIXES if name.startswith(p))
        name = PLAIN_PREFIXES[prefix] + name[len(prefix):]
        for old, new in PLAIN_INSIDE.items():
            name = name.replace(old, new)
        out[name] = tensor
    return out


def plain_loop(row: Row, args: argparse.Namespace, model_cfg: ModelConfig, device: torch.device) -> dict[str, Any]:
    """Train PlainGPT from minigpt's initial weights on the same windows; tokens/s by synchronize + perf_counter."""
    seed_everything(args.seed)  # what train() does before building its model: the same initial weights
    init = GPT(model_cfg).state_dict()
    model = PlainGPT(model_cfg)
    model.load_state_dict(plain_state_dict(init))
    model = model.to(device).train()
    del init
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    fused = device.type in ("cuda", "cpu")
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)
    step_fn = torch.compile(model) if row.compile else model
    amp = torch.autocast(device.type, dtype=torch.bfloat16)
    # The same windows as minigpt's loader hands `train` (same seed), read on the CPU and moved here by hand.
    loader = TokenLoader(args.data_dir, "train", row.batch, args.seq_len, args.seed, shuffle=True, device="cpu")
    sched = trainlib.TrainConfig(lr=args.lr, warmup_steps=args.warmup, max_steps=args.steps)
    cuda = device.type == "cuda"

    def get_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = loader.batch(step)
        if cuda:
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)

    losses, windows = [], []
    x, y = get_batch(0)
    start = time.perf_counter()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, sched)
        with amp:
            loss = step_fn(x, y)
        x, y = get_batch(step + 1)  # while the GPU works through the forward
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        if (step + 1) % args.warmup == 0 or step + 1 == args.steps:  # log: the loop's one synchronisation
            windows.append(torch.stack(losses).mean().item())
            losses = []
            if step + 1 == args.warmup:
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    timed = args.steps - args.warmup
    return {"tokens_per_s": timed * row.batch * args.seq_len / elapsed, "loss_first": windows[0],
            "loss_last": windows[-1], "timed_steps": timed}


# ----------------------------------------------------------------------------------------------------------------
# Ours: minigpt.train.train.train() in a temporary run folder


def our_loop(row: Row, args: argparse.Namespace, model_cfg: ModelConfig, device: torch.device) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"train_gpu-{row.key}-") as tmp:
        cfg = trainlib.TrainConfig(
            run_dir=str(Path(tmp) / "run"), data=str(args.data_dir), corpus=[],
            model=dataclasses.replace(model_cfg, gradient_checkpointing=row.checkpointing),
            batch_size=row.batch, seq_len=args.seq_len, max_steps=args.steps, lr=args.lr, warmup_steps=args.warmup,
            precision=row.precision, compile=row.compile, device=str(device), seed=args.seed,
            log_every=args.warmup, eval_every=args.steps, eval_batches=1, sample_prompt="",
            checkpoint_every=args.steps, keep_last=1, fused_adamw=row.fused)
        run = trainlib.train(cfg)
        records = [r for r in read_metrics(run) if "tokens_per_s" in r]
    # Each record covers the steps since the one before: tokens/s over the windows after --warmup.
    tokens = time_s = 0.0
    previous = 0
    for r in records:
        window = r["tokens"] - previous
        previous = r["tokens"]
        if r["step"] > args.warmup:
            tokens += window
            time_s += window / r["tokens_per_s"]
    return {"tokens_per_s": tokens / time_s, "loss_first": records[0]["loss"], "loss_last": records[-1]["loss"],
            "timed_steps": args.steps - args.warmup}


# ----------------------------------------------------------------------------------------------------------------
# The largest micro-batch


def is_oom(exc: BaseException) -> bool:
    """CUDA's allocator, or a library (cuBLAS, cuDNN) failing to get its workspace."""
    text = str(exc)
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in text or "ALLOC_FAILED" in text


def fits(model_cfg: ModelConfig, batch: int, seq_len: int, device: torch.device) -> bool:
    """Two eager bf16 training steps of minigpt's GPT with fused AdamW at `batch` x `seq_len`, or out of memory."""
    ok = True
    model = optimizer = x = loss = None
    try:
        with device:  # initialised in place: no CPU copy of the weights per trial
            model = GPT(model_cfg).train()
        optimizer = make_optimizer(model, trainlib.TrainConfig(), device)
        x = torch.randint(0, model_cfg.vocab_size, (batch, seq_len + 1), device=device)
        for _ in range(2):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                _, loss = model(x[:, :-1], x[:, 1:], reduction="sum")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except RuntimeError as exc:  # torch.cuda.OutOfMemoryError is one
        if not is_oom(exc):
            raise
        ok = False
    del model, optimizer, x, loss
    release(device)
    return ok


def largest_batch(model_cfg: ModelConfig, args: argparse.Namespace, device: torch.device) -> tuple[int, str]:
    """Doubling from --batch until out of memory, --max-batch or --search-s; (0, note) when --batch does not fit."""
    start = time.perf_counter()
    best, batch, tried = 0, args.batch, []
    while batch <= args.max_batch:
        ok = fits(model_cfg, batch, args.seq_len, device)
        tried.append(f"{batch}{'' if ok else ' OOM'}")
        if not ok:
            break
        best, batch = batch, batch * 2
        if time.perf_counter() - start > args.search_s:
            tried.append("time")
            break
    return best, f"tried {', '.join(tried)} ({time.perf_counter() - start:.0f} s)"


# ----------------------------------------------------------------------------------------------------------------
# Running the rows


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_row(row: Row, args: argparse.Namespace, model_cfg: ModelConfig, device: torch.device) -> None:
    torch.compiler.reset()  # a fresh graph per row (and dynamo's per-function recompile limit never reached)
    release(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    result = (plain_loop if row.plain else our_loop)(row, args, model_cfg, device)
    result["wall_s"] = time.perf_counter() - t0
    if device.type == "cuda":
        result["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if args.peak:
        result["mfu"] = args.flops_per_token * result["tokens_per_s"] / args.peak
    row.result.update(result)
    row.status = "ok"
    torch.compiler.reset()
    release(device)


def run_guarded(row: Row, args: argparse.Namespace, model_cfg: ModelConfig, device: torch.device) -> None:
    """Run a row; out of memory and any other error become its status, and a max row halves its batch on OOM."""
    while True:
        oom = False
        try:
            run_row(row, args, model_cfg, device)
            return
        except Exception as exc:  # noqa: BLE001 - reported in the table; the other rows still run
            if is_oom(exc):
                oom = True  # handled below, once the exception (holding the failed step's tensors) is gone
            else:
                traceback.print_exc()
                first_line = str(exc).splitlines()[0] if str(exc) else ""
                row.status = f"error: {type(exc).__name__}: {first_line}"[:200]
        release(device)
        torch.compiler.reset()
        if not oom:
            return
        status = f"out of memory at batch {row.batch}"
        if row.key.startswith("max") and row.batch // 2 >= args.batch and not out_of_time(args):
            row.result.setdefault("notes", []).append(status)
            row.batch //= 2
            continue
        row.status = status
        return


def out_of_time(args: argparse.Namespace) -> bool:
    return time.perf_counter() - args.started > args.budget_s


def fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(rows: dict[str, Row], args: argparse.Namespace) -> None:
    print(f"\n## Training speed: {args.preset} ({args.n_params / 1e6:.1f}M parameters), {args.batch_desc}, "
          f"{args.steps} steps per row ({args.warmup} warm-up steps excluded), data {args.data}")
    print(f"device {args.device_name}, torch {torch.__version__}, bf16 peak "
          f"{fmt(args.peak and args.peak / 1e12, '.0f')} TFLOP/s, {args.flops_per_token / 1e6:.1f} MFLOP per token; "
          f"ln(vocab) = {math.log(args.n_vocab):.3f}\n")
    print(f"| key | configuration | batch | tokens/s | MFU | peak mem GiB | loss first | loss @{args.steps} | status |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for key in ROW_ORDER:
        if key not in rows:
            continue
        row, r = rows[key], rows[key].result
        print(f"| {key} | {row.label()} | {row.batch or '-'} | {fmt(r.get('tokens_per_s'), ',.0f')} | "
              f"{fmt(r.get('mfu') and 100 * r['mfu'], '.1f')}{'%' if r.get('mfu') else ''} | "
              f"{fmt(r.get('peak_mem_gib'), '.1f')} | {fmt(r.get('loss_first'), '.4f')} | "
              f"{fmt(r.get('loss_last'), '.4f')} | {row.status} |")
    ratio = ours_over_plain(rows)
    if ratio:
        print(f"\nours / plain loop (fused row / ref row, same shapes, batch and steps): {ratio:.3f}x")
    for key in ROW_ORDER:
        if key in rows and rows[key].result.get("notes"):
            print(f"{key}: {'; '.join(rows[key].result['notes'])}")


def ours_over_plain(rows: dict[str, Row]) -> float | None:
    ours, plain = rows.get("fused"), rows.get("ref")
    if ours and plain and ours.status == plain.status == "ok":
        return ours.result["tokens_per_s"] / plain.result["tokens_per_s"]
    return None


def save_json(rows: dict[str, Row], args: argparse.Namespace) -> None:
    if not args.json:
        return
    write_json(args.json, {
        "device": args.device_name, "torch": torch.__version__, "python": sys.version.split()[0],
        "preset": args.preset, "n_params": args.n_params, "n_vocab": args.n_vocab, "seq_len": args.seq_len,
        "steps": args.steps, "warmup": args.warmup, "data": args.data, "peak_flops": args.peak,
        "flops_per_token": args.flops_per_token, "ours_over_plain": ours_over_plain(rows),
        "rows": [{"key": k, "label": rows[k].label(), "batch": rows[k].batch, "precision": rows[k].precision,
                  "compile": rows[k].compile, "fused": rows[k].fused, "checkpointing": rows[k].checkpointing,
                  "plain": rows[k].plain, "status": rows[k].status, **rows[k].result}
                 for k in ROW_ORDER if k in rows]})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="random", help="shards folder (minigpt prepare; GPT-2's tokenizer for "
                        "the gpt2 preset), or 'random' for uniform random tokens written to a temporary folder")
    parser.add_argument("--preset", default="gpt2", help="model shape (minigpt.model.gpt.PRESETS)")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (cpu: a smoke run)")
    parser.add_argument("--batch", type=int, default=16, help="sequences per micro-batch (and the search's start)")
    parser.add_argument("--seq-len", type=int, default=0, help="tokens per sequence (0: the preset's context)")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per row")
    parser.add_argument("--warmup", type=int, default=10, help="first steps left out of tokens/s; also the "
                        "logging interval and the learning rate warm-up")
    parser.add_argument("--lr", type=float, default=6e-4)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--only", default="", help=f"comma-separated row keys ({', '.join(ROW_ORDER)})")
    parser.add_argument("--no-compile", action="store_true", help="no torch.compile (the compile row is skipped)")
    parser.add_argument("--max-batch", type=int, default=None, help="largest micro-batch the search tries "
                        "(default 1024; on the CPU, where nothing runs out of memory, the max rows run only "
                        "when this is given)")
    parser.add_argument("--search-s", type=float, default=60, help="stop doubling after this many seconds")
    parser.add_argument("--budget-s", type=float, default=1e9, help="rows that would start later are skipped")
    parser.add_argument("--random-tokens", type=int, default=8_000_000, help="training tokens for --data random")
    parser.add_argument("--json", default="", help="also write the rows here (rewritten after every row)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: its default)")
    args = parser.parse_args(argv)
    if args.max_batch is None and args.device != "cpu":
        args.max_batch = 1024
    if args.steps <= args.warmup or args.warmup < 1:
        parser.error("need 1 <= --warmup < --steps")
    unknown = set(filter(None, args.only.split(","))) - set(ROW_ORDER)
    if unknown:
        parser.error(f"unknown row keys: {', '.join(sorted(unknown))}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("CUDA is not available: use --device cpu for a smoke run")
    args.device_name = torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)"
    rows = make_rows(compile_ok=not args.no_compile)
    wanted = [k for k in RUN_ORDER if not args.only or k in args.only.split(",")]
    rows = {k: rows[k] for k in ROW_ORDER if k in wanted}

    with tempfile.TemporaryDirectory(prefix="train_gpu-data-") as tmp:
        base = ModelConfig.from_preset(args.preset)
        args.seq_len = args.seq_len or base.block_size
        if args.data == "random":
            val = 16 * (args.seq_len + 1) + 1
            args.data_dir = write_random_shards(Path(tmp) / "random", base.vocab_size, args.random_tokens, val,
                                                args.seed)
        else:
            args.data_dir = Path(args.data)
        args.n_vocab = shards.read_meta(args.data_dir)["tokenizer"]["n_vocab"]
        model_cfg = dataclasses.replace(base, vocab_size=args.n_vocab)
        with torch.device("meta"):
            shape = GPT(model_cfg)
        args.n_params, args.flops_per_token = shape.num_params(), shape.flops_per_token(args.seq_len)
        args.peak = peak_flops(device)
        args.batch_desc = f"micro-batch {args.batch} x {args.seq_len}"
        print(f"train_gpu: {args.device_name}, torch {torch.__version__}, {args.preset}, vocab {args.n_vocab}, "
              f"rows {', '.join(wanted)}", flush=True)

        for key in wanted:
            row = rows[key]
            if not key.startswith("max"):  # the max rows get theirs from the search
                row.batch = args.batch
            if not cuda and (key == "fp16" or (key.startswith("max") and args.max_batch is None)):
                row.status = "skipped: needs CUDA"
            elif key == "compile" and args.no_compile:
                row.status = "skipped: --no-compile"
            elif out_of_time(args):
                row.status = f"skipped: past --budget-s {args.budget_s:.0f}"
            else:
                if key.startswith("max"):
                    search_cfg = dataclasses.replace(model_cfg, gradient_checkpointing=row.checkpointing)
                    row.batch, note = largest_batch(search_cfg, args, device)
                    row.result["notes"] = [f"search: {note}"]
                    print(f"train_gpu: {key}: largest micro-batch {row.batch} ({note})", flush=True)
                if not row.batch:
                    row.status = f"skipped: batch {args.batch} does not fit"
                else:
                    run_guarded(row, args, model_cfg, device)
            r = row.result
            print(f"train_gpu: {key}: {row.status}, batch {row.batch}, "
                  f"{fmt(r.get('tokens_per_s'), ',.0f')} tokens/s, loss {fmt(r.get('loss_first'), '.4f')} -> "
                  f"{fmt(r.get('loss_last'), '.4f')}, {fmt(r.get('wall_s'), '.0f')} s "
                  f"(elapsed {time.perf_counter() - args.started:.0f} s)", flush=True)
            save_json(rows, args)

    print_table(rows, args)
    return 1 if any(row.status.startswith("error") for row in rows.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
