"""`minigpt train`: the one training loop, for pretraining here and for chat fine-tuning (sft.py).

    minigpt train                                   # tiny model on the bundled Wikipedia summaries, on the CPU
    minigpt train --config my.toml --max-steps 5000 --model.preset gpt2 --precision bf16 --compile
    torchrun --nproc_per_node 8 -m minigpt train --config gpt2.toml     # data parallel over 8 GPUs
    minigpt train --run-dir runs/tiny --resume      # continue from the latest checkpoint

One optimizer step:
    for each of `grad_accum` micro-batches (B, T):   loss_sum += CE(model(x), y)   (autocast in bf16/fp16)
    loss = loss_sum / (targets counted over the whole step and every rank); backward (all-reduce once, at the last)
    clip the gradient norm; AdamW step at the warm-up/cosine learning rate; zero the gradients

Normalising by the targets of the whole step makes accumulation and data parallelism exact: 2 ranks x B rows
give the same update as 1 rank x 2B rows, and masked targets (-100, in fine-tuning) never count.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
import torch.distributed as dist

from minigpt import config as configlib
from minigpt.checkpoint import (
    BackgroundSaver,
    check_new_run_dir,
    latest_checkpoint,
    load_model,
    load_trainer_state,
    resolve_checkpoint,
)
from minigpt.common import UserError, pick_device, print0, progress, seed_everything, write_json
from minigpt.config import opt
from minigpt.log import MetricsLogger, plot_loss_curves
from minigpt.model import GPT, ModelConfig, logit_chunk_rows

DEFAULT_DATA = "data/wiki-bpe8k"


@dataclasses.dataclass
class TrainConfig:
    """Settings of `minigpt train` (and the base of `minigpt sft`)."""

    run_dir: str = opt("runs/tiny", "folder for checkpoints, logs and plots")
    data: str = opt(DEFAULT_DATA, "token shards folder (minigpt prepare); the default one is built from --corpus "
                                  "on first use, any other must exist")
    corpus: list[str] = opt(["wiki"], "corpora the default --data is built from on first use")
    vocab_size: int = opt(8192, "vocabulary of the BPE tokenizer trained for --corpus (0: GPT-2's own)")
    model: ModelConfig = dataclasses.field(default_factory=lambda: ModelConfig.from_preset("tiny"))
    init_from: str = opt("", "start from this run's or checkpoint's weights instead of random ones")

    batch_size: int = opt(16, "sequences per micro-batch, per process")
    seq_len: int = opt(0, "tokens per sequence (0: the model's context window)")
    batch_tokens: int = opt(0, "tokens per optimizer step; gradient accumulation makes up the difference "
                               "(0: one micro-batch per process)")
    max_steps: int = opt(500, "optimizer steps in all (the default takes about 4 minutes on 2 CPU cores)")
    lr: float = opt(3e-3, "peak learning rate")
    min_lr_ratio: float = opt(0.1, "the cosine decays to lr x this")
    warmup_steps: int = opt(50, "linear warm-up steps")
    weight_decay: float = opt(0.1, "AdamW weight decay, on weight matrices only")
    decay_embeddings: bool = opt(True, "also decay the token and position embeddings")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.95, "AdamW beta2")
    grad_clip: float = opt(1.0, "clip the gradient norm to this (0: off)")
    fused_adamw: bool = opt(True, "AdamW as one fused kernel on CUDA and CPU (off: PyTorch's per-tensor-list "
                                  "foreach implementation, same arithmetic)")

    precision: Literal["auto", "fp32", "bf16", "fp16"] = opt("auto", "auto: bf16 on GPUs that compute it natively "
                                                             "(compute capability 8.0+), fp16 with loss scaling on "
                                                             "older GPUs, fp32 on CPUs")
    compile: bool = opt(False, "torch.compile the model")
    chunked_loss: Literal["auto", "on", "off"] = opt("auto", "compute head and loss in chunks without holding all "
                                                     "logits (auto: on CPUs, where it is faster; GPUs use the "
                                                     "plain path that torch.compile fuses)")
    device: str = opt("auto", "auto, cpu, cuda, mps")
    seed: int = opt(1337, "seed for initialisation, data order and dropout")

    log_every: int = opt(10, "steps between logged training losses")
    eval_every: int = opt(100, "steps between validation evaluations (and samples); also at the end")
    eval_batches: int = opt(20, "validation batches per evaluation (0: the whole split)")
    eval_tasks: list[str] = opt([], "benchmarks also scored at each evaluation, e.g. hellaswag,lambada,recall "
                                    "(minigpt eval's task names; none by default)")
    eval_tasks_limit: int = opt(200, "examples per benchmark at each evaluation (a fixed seeded subset; 0: all); "
                                     "under torchrun rank 0 scores them while the others wait, so keep it small")
    sample_prompt: str = opt("The", "prompt for the samples shown at each evaluation ('' for none)")
    sample_tokens: int = opt(48, "tokens per sample")
    checkpoint_every: int = opt(0, "steps between checkpoints (0: a tenth of max_steps); also at the end")
    checkpoint_minutes: float = opt(30.0, "also save once this many minutes have passed since the last save "
                                          "(0: only by steps), so a crash never costs more than that")
    keep_last: int = opt(2, "checkpoints kept (the best by validation loss is kept too)")
    resume: bool = opt(False, "continue the run in --run-dir from its latest checkpoint")
    tensorboard: bool = opt(False, "also log to TensorBoard (needs the tensorboard package)")

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{field.name} must be a finite number, not {value}")
        for name in ("batch_size", "max_steps", "log_every", "eval_every", "keep_last"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.checkpoint_every < 0 or not 0 <= self.checkpoint_minutes < math.inf:
            raise ValueError("checkpoint_every and checkpoint_minutes may not be negative")
        if min(self.seq_len, self.batch_tokens, self.warmup_steps, self.eval_batches, self.eval_tasks_limit) < 0:
            raise ValueError("seq_len, batch_tokens, warmup_steps, eval_batches and eval_tasks_limit may not be "
                             "negative")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("lr must be positive and min_lr_ratio in [0, 1]")


# ----------------------------------------------------------------------------------------------------------------
# What the loop needs from a data source (pretraining shards here, conversations in sft.py)


class Batches(Protocol):
    step: int  # the next micro-batch to take

    def batch(self, step: int) -> tuple: ...  # (x, y), or (x, y, extra forward kwargs such as {"doc_ids": ...})
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclasses.dataclass
class TrainData:
    tokenizer: Any
    train: Batches  # (x, y) micro-batches by step; y is -100 where a position does not count
    evaluate: Callable[[torch.nn.Module], dict[str, float]]  # validation metrics, "val_loss" among them
    describe: str = ""
    sample: Callable[[GPT], str] | None = None  # text to show at each evaluation (default: continue sample_prompt)
    train_metrics: Callable[[], dict[str, float]] | None = None  # more numbers for each logged step (e.g. "fill")


# ----------------------------------------------------------------------------------------------------------------
# Distributed set-up


@dataclasses.dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world: int = 1

    @property
    def distributed(self) -> bool:
        return self.world > 1


def setup_runtime(device_name: str) -> Runtime:
    """One process, or one of torchrun's: NCCL between GPUs, gloo between CPU processes."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Runtime(pick_device(device_name))
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Runtime(device, rank, local_rank, world)


def barrier(rt: Runtime) -> None:
    if rt.distributed:
        dist.barrier()


# ----------------------------------------------------------------------------------------------------------------
# Precision, optimizer, schedule


def native_bf16(device: torch.device) -> bool:
    """Whether the GPU computes bf16 in hardware: compute capability 8.0 and up (A100, H100, L4, RTX 30xx/40xx).

    `torch.cuda.is_bf16_supported()` also says yes on a V100 or T4, where bf16 is emulated and several times slower
    than fp16, so it cannot decide this.
    """
    from minigpt.plan import precision_for_capability

    return device.type == "cuda" and precision_for_capability(torch.cuda.get_device_capability(device)) == "bf16"


def resolve_precision(name: str, device: torch.device) -> str:
    """`auto`: bf16 where the GPU has it natively, fp16 with loss scaling on older GPUs, fp32 on CPUs and MPS."""
    if name == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if native_bf16(device) else "fp16"
    if name == "bf16" and device.type == "cuda" and not native_bf16(device):
        print0(f"warning: {torch.cuda.get_device_name(device)} has no native bf16 (compute capability "
               f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))}): it is emulated and slow; "
               "--precision fp16 (with loss scaling) is the fast choice on this card")
    return name


def autocast_context(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_optimizer(model: GPT, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on the weight matrices (and embeddings if asked), never on biases or LayerNorms."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_embedding = name.startswith(("wte", "wpe"))
        if p.dim() >= 2 and (cfg.decay_embeddings or not is_embedding):
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # Fused: one kernel over all parameters, on GPUs and (since PyTorch 2.4) CPUs; on this project's 2-core CPU it
    # steps the tiny model in 5 ms where the default per-parameter loop takes 42 ms (bench/train_cpu.py).
    fused = cfg.fused_adamw and device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=fused,
                             foreach=None if fused else True)


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to `lr`, then a cosine down to `lr * min_lr_ratio` at `max_steps`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(cfg.max_steps - cfg.warmup_steps, 1)
    progress_ = min((step - cfg.warmup_steps) / span, 1.0)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * progress_))


def loss_chunk_rows(setting: str, device: torch.device, vocab_rows: int) -> int:
    """Positions per chunk of the chunked loss (0: the plain path). Chunks of ~2M logits stay in a CPU's cache."""
    if setting == "off" or (setting == "auto" and device.type != "cpu"):
        return 0
    return logit_chunk_rows(device, vocab_rows)


def peak_flops(device: torch.device) -> float | None:
    """The card's dense bf16 peak (FLOP/s) from plan.py's table, for MFU; None for a CPU or a card it lacks."""
    from minigpt.plan import gpu_for_device

    if device.type != "cuda":
        return None
    spec = gpu_for_device(torch.cuda.get_device_name(device))
    return spec.peak_flops if spec is not None else None


# ----------------------------------------------------------------------------------------------------------------
# Pretraining data: shards, built from the bundled corpus on first use


def build_data(cfg: TrainConfig) -> None:
    """Train a tokenizer on `cfg.corpus` (unless GPT-2's is asked for) and prepare the shards into `cfg.data`."""
    from minigpt import corpus, shards
    from minigpt.tokenizer import Tokenizer

    print0(f"{cfg.data} does not exist yet: preparing it from {', '.join(cfg.corpus)}")
    with tempfile.TemporaryDirectory() as tmp:
        if cfg.vocab_size:
            texts = (text for source in cfg.corpus for text in corpus.load_documents(source))
            tokenizer = Tokenizer.train(texts, cfg.vocab_size, name=f"{'+'.join(cfg.corpus)}-bpe{cfg.vocab_size}")
            spec = str(tokenizer.save(Path(tmp) / "tokenizer.json"))
        else:
            spec = "gpt2"
        # A few percent held out: enough validation text on small corpora, and held-out articles for probes.
        shards.prepare(shards.PrepareConfig(sources=list(cfg.corpus), tokenizer=spec, out=cfg.data,
                                            val_fraction=0.02))


def pretraining_data(cfg: TrainConfig, rt: Runtime, seq_len: int, precision: str) -> TrainData:
    from minigpt.dataloader import TokenLoader
    from minigpt.evaluate import language_model_metrics
    from minigpt.shards import shards_tokenizer

    if not (Path(cfg.data) / "meta.json").exists():
        # Only the default folder is built implicitly: a --data of the user's own that holds no shards is a typo or
        # a wrong folder, and building a corpus into it would hide that (and write where nobody asked).
        if not cfg.corpus or cfg.data != DEFAULT_DATA:
            if not Path(cfg.data).exists():
                raise UserError(f"{cfg.data} holds no shards (it does not exist): make them with minigpt prepare "
                                f"--sources ... --out {cfg.data}, or leave out --data to use the bundled corpus")
            what = "a file" if Path(cfg.data).is_file() else "a folder without meta.json"
            raise UserError(f"{cfg.data} holds no shards ({what}): to train on its text, make shards of it first "
                            f"with minigpt prepare --sources {cfg.data} --out DIR, then pass --data DIR")
        if rt.rank == 0:
            build_data(cfg)
        barrier(rt)
    tokenizer = shards_tokenizer(cfg.data)
    # vocab_size: a token id the model has no embedding for is a one-line error, not an index error on the GPU
    train = TokenLoader(cfg.data, "train", cfg.batch_size, seq_len, cfg.seed, rt.rank, rt.world, True, rt.device,
                        vocab_size=tokenizer.n_vocab)
    val = TokenLoader(cfg.data, "val", cfg.batch_size, seq_len, cfg.seed, rt.rank, rt.world, False, rt.device,
                      vocab_size=tokenizer.n_vocab)

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        with autocast_context(precision, rt.device):
            m = language_model_metrics(model, val, max_batches=cfg.eval_batches)
        return {"val_loss": m["loss"], "val_ppl": m["ppl"], "val_bpb": m["bpb"]}

    describe = (f"{train.num_tokens:,} training tokens, {val.num_tokens:,} validation tokens, "
                f"{train.windows_per_epoch:,} windows of {seq_len} per epoch")
    return TrainData(tokenizer, train, evaluate, describe)


# ----------------------------------------------------------------------------------------------------------------
# The loop


class TrainingDiverged(UserError):
    pass


MAX_SKIPPED_IN_A_ROW = 40  # consecutive fp16 overflows before a run is called diverged


def train(cfg: TrainConfig, data: TrainData | None = None, model: GPT | None = None, stage: str = "train") -> Path:
    """Train by `cfg`; returns the run folder. `data` and `model` let fine-tuning supply its own."""
    rt = setup_runtime(cfg.device)
    run = Path(cfg.run_dir)
    precision = resolve_precision(cfg.precision, rt.device)
    if rt.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for fp32 matmuls on Ampere and newer
        torch.backends.cudnn.allow_tf32 = True

    resume_from = latest_checkpoint(run)
    if resume_from is not None and not cfg.resume:
        raise UserError(f"{run} already holds checkpoints (latest: {resume_from.name}): pass --resume to continue "
                        "it, or choose another --run-dir")
    if resume_from is None:
        restarted = check_new_run_dir(run)  # never replace files another program (or the user) wrote
        if cfg.resume or restarted:
            print0(f"{run} has no checkpoint yet: starting a new run")
    else:  # the newest checkpoint that is intact, trainer state included (a damaged one is named and skipped)
        resume_from = resolve_checkpoint(run, "latest", need_trainer=True)

    if cfg.eval_tasks:
        from minigpt.tasks import check_task_names

        check_task_names(cfg.eval_tasks)
    seed_everything(cfg.seed)  # same initial weights on every rank
    meta: dict[str, Any] = {}
    if resume_from is not None:
        model, meta = load_model(resume_from, rt.device)
    elif model is None and cfg.init_from:
        model, meta = load_model(cfg.init_from, rt.device)
    seq_len = cfg.seq_len or (model.config.block_size if model is not None else cfg.model.block_size)
    if data is None:
        data = pretraining_data(cfg, rt, seq_len, precision)
    tokenizer = data.tokenizer
    if meta:
        _check_tokenizer(meta, tokenizer)
    if model is None:
        model = GPT(dataclasses.replace(cfg.model, vocab_size=tokenizer.n_vocab))
    if model.config.vocab_size != tokenizer.n_vocab:
        raise UserError(f"the model has {model.config.vocab_size} tokens but the tokenizer {tokenizer.n_vocab}")
    if seq_len > model.config.block_size:
        raise UserError(f"seq_len {seq_len} exceeds the model's context window {model.config.block_size}")
    model = model.to(rt.device).train()
    raw_model = model

    tokens_per_micro = cfg.batch_size * seq_len * rt.world
    accum = 1
    if cfg.batch_tokens:
        if cfg.batch_tokens % tokens_per_micro:
            raise UserError(f"batch_tokens {cfg.batch_tokens} is not a multiple of batch_size x seq_len x processes "
                            f"= {tokens_per_micro}")
        accum = cfg.batch_tokens // tokens_per_micro

    optimizer = make_optimizer(raw_model, cfg, rt.device)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=precision == "fp16")
    start_step, best_val = 0, math.inf
    tokens_seen = 0
    skipped_steps = 0  # fp16 steps whose update the gradient scaler dropped (an overflow): not counted as progress
    state: dict[str, Any] = {}
    if resume_from is not None:
        state = load_trainer_state(resume_from, rt.device)
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        data.train.load_state_dict(state["data"])
        torch.set_rng_state(state["rng_cpu"].cpu())
        if rt.device.type == "cuda" and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"].cpu())
        start_step, best_val = int(state["step"]), float(state["best_val"])
        skipped_steps = int(state.get("skipped_steps", 0))
        tokens_seen = int(state.get("tokens_seen", start_step * tokens_per_micro * accum))
        print0(f"resuming {run} at step {start_step} from {resume_from}")

    if cfg.compile:
        model = torch.compile(model)
    if rt.distributed:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None)

    logger = MetricsLogger(run, cfg.tensorboard, resume_step=start_step if resume_from else None)
    if rt.rank == 0:
        run.mkdir(parents=True, exist_ok=True)
        write_json(run / "config.json", {"stage": stage, **configlib.to_dict(cfg), "resolved": {
            "precision": precision, "seq_len": seq_len, "grad_accum": accum, "world_size": rt.world,
            "tokens_per_step": tokens_per_micro * accum, "model": configlib.to_dict(raw_model.config)}})
        tokenizer.save(run / "tokenizer.json")
    chunk_rows = loss_chunk_rows(cfg.chunked_loss, rt.device, raw_model.config.padded_vocab_size)
    flops_per_token = raw_model.flops_per_token(seq_len)
    peak = peak_flops(rt.device)
    print0(f"{stage}: {raw_model.num_params():,} parameters, {precision}, {rt.device.type} x {rt.world}, "
           f"{tokens_per_micro * accum:,} tokens per step ({accum} micro-batch{'es' if accum > 1 else ''} of "
           f"{cfg.batch_size} x {seq_len} per process); {data.describe}")

    saver = BackgroundSaver()

    def checkpoint(step: int, val_loss: float | None) -> None:
        nonlocal best_val
        is_best = val_loss is not None and val_loss < best_val
        if is_best:
            best_val = val_loss
        if rt.rank == 0:
            trainer_state = {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                             "data": data.train.state_dict(), "rng_cpu": torch.get_rng_state(), "step": step,
                             "best_val": best_val, "tokens_seen": tokens_seen, "skipped_steps": skipped_steps,
                             # the training-loss window not yet logged: a resumed run logs the same averages
                             "loss_window": loss_window.detach().cpu().clone(), "window_steps": window_steps,
                             "window_tokens": window_tokens}
            if rt.device.type == "cuda":
                trainer_state["rng_cuda"] = torch.cuda.get_rng_state()
            meta = {"stage": stage, "tokenizer_hash": tokenizer.hash, "val_loss": val_loss,
                    "tokens_seen": tokens_seen}
            # Copied to host memory here, written on a thread while training goes on; the other ranks never
            # wait for rank 0's disk (they read nothing it writes until the run ends).
            saver.save(run, raw_model, step, meta, trainer_state, cfg.keep_last, is_best)

    def evaluate_and_sample(step: int) -> dict[str, float]:
        model.eval()
        metrics = data.evaluate(raw_model)
        model.train()
        if not math.isfinite(metrics["val_loss"]):
            raise TrainingDiverged(f"validation loss became {metrics['val_loss']} at step {step}")
        record = {"step": step, **metrics}
        if cfg.eval_tasks and rt.rank == 0:
            from minigpt.evaluate import benchmark_scores

            # Flat names ("hellaswag/acc_norm"): `minigpt eval` plots them across training from metrics.jsonl.
            with autocast_context(precision, rt.device):
                record.update(benchmark_scores(raw_model, tokenizer, cfg.eval_tasks, cfg.eval_tasks_limit,
                                               shards=cfg.data if stage == "train" else None))
        if cfg.sample_prompt and rt.rank == 0:
            if data.sample is not None:
                record["sample"] = data.sample(raw_model)
            else:
                record["sample"] = sample_text(raw_model, tokenizer, cfg.sample_prompt, cfg.sample_tokens, cfg.seed)
            raw_model.train()
        logger.log(record)
        if rt.rank == 0:
            plot_loss_curves(run / "metrics.jsonl", run / "loss.png", title=f"{run.name}: loss")
        return record

    step = start_step
    bar = progress(total=cfg.max_steps, desc=stage, unit="step", initial=start_step)
    loss_window = torch.zeros((), device=rt.device)
    window_steps, window_tokens, window_start = 0, 0, time.perf_counter()
    if "loss_window" in state:  # checkpoints from before this field start a fresh window
        loss_window += state["loss_window"].to(rt.device)
        window_steps, window_tokens = int(state["window_steps"]), int(state["window_tokens"])
    checkpoint_steps = cfg.checkpoint_every or max(cfg.max_steps // 10, 1)
    skipped_in_a_row = 0
    last_save = time.monotonic()
    last_eval: dict[str, float] = {}
    try:
        while step < cfg.max_steps:
            lr = learning_rate(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro = [data.train.batch(data.train.step + i) for i in range(accum)]
            data.train.step += accum
            counted = sum((b[1] != -100).sum() for b in micro).to(rt.device, torch.float32)
            if rt.distributed:
                dist.all_reduce(counted)
            step_tokens = sum(b[0].numel() for b in micro) * rt.world
            step_loss = torch.zeros((), device=rt.device)
            for i, (x, y, *extra) in enumerate(micro):
                last = i == accum - 1
                sync = model.no_sync() if rt.distributed and not last else contextlib.nullcontext()
                with sync, autocast_context(precision, rt.device):
                    # [1]: the logits (B, T, vocab) are not kept past this line (at GPT-2 124M, 32 x 1024 rows in
                    # bf16: 3.3 GB that `_, loss = ...` would hold into the next micro-batch's forward pass)
                    loss_sum = model(x, y, reduction="sum", chunk_rows=chunk_rows, **(extra[0] if extra else {}))[1]
                # DistributedDataParallel averages gradients over ranks: scale by world to get the global mean.
                scaler.scale(loss_sum * (rt.world / counted)).backward()
                step_loss += loss_sum.detach()
            if cfg.grad_clip > 0 or scaler.is_enabled():
                scaler.unscale_(optimizer)
                # max_norm inf: the norm alone, which tells a skipped fp16 step below
                grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip or math.inf)
            else:
                grad_norm = torch.zeros(())
            scaler.step(optimizer)  # with fp16, skipped when a gradient overflowed (the scale then halves)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if rt.distributed:
                dist.all_reduce(step_loss)
            window_tokens += step_tokens
            tokens_seen += step_tokens
            # The scaler skips a step on every rank alike (it reduces the overflow flag over the gradients, which
            # DistributedDataParallel already averaged). Reading the flag is a host sync, paid in fp16 only.
            if scaler.is_enabled() and not torch.isfinite(grad_norm).item():
                skipped_steps += 1  # the data moved on; the step count, the schedule and the loss window did not
                skipped_in_a_row += 1
                if skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:  # the scale fell by 2^40: the loss itself is not finite
                    raise TrainingDiverged(f"{skipped_in_a_row} fp16 steps in a row overflowed at step {step}")
                continue
            skipped_in_a_row = 0
            step += 1
            loss_window += step_loss / counted
            window_steps += 1

            if step % cfg.log_every == 0 or step == cfg.max_steps:
                loss = loss_window.item() / window_steps  # the only host synchronisation of a normal step
                if not math.isfinite(loss):
                    raise TrainingDiverged(f"training loss became {loss} at step {step}")
                elapsed = time.perf_counter() - window_start
                tokens_per_s = window_tokens / elapsed
                record = {"step": step, "loss": loss, "lr": lr, "grad_norm": float(grad_norm),
                          "tokens_per_s": tokens_per_s, "tokens": tokens_seen,
                          **(data.train_metrics() if data.train_metrics else {})}
                if scaler.is_enabled():
                    record.update(loss_scale=scaler.get_scale(), skipped_steps=skipped_steps)
                postfix = {"loss": f"{loss:.3f}", "tok/s": f"{tokens_per_s:,.0f}"}
                if peak:
                    record["mfu"] = flops_per_token * tokens_per_s / rt.world / peak
                    postfix["mfu"] = f"{100 * record['mfu']:.1f}%"
                logger.log(record)
                bar.set_postfix(postfix, refresh=False)
                loss_window.zero_()
                window_steps, window_tokens, window_start = 0, 0, time.perf_counter()
            bar.update(1)

            at_end = step == cfg.max_steps
            val_loss = None
            if step % cfg.eval_every == 0 or at_end:
                last_eval = evaluate_and_sample(step)
                val_loss = last_eval["val_loss"]
                scores = [f"{k} {v:.4f}" for k, v in last_eval.items() if "/" in k and not k.endswith("/n")]
                bar.write(f"step {step}: validation loss {val_loss:.4f}"
                          + (f", bits per byte {last_eval['val_bpb']:.4f}" if "val_bpb" in last_eval else "")
                          + (f"\n  benchmarks: {', '.join(scores)}" if scores else "")
                          + (f"\n  sample: {last_eval['sample']!r}" if last_eval.get("sample") else ""))
                window_start = time.perf_counter()  # evaluation time is not training throughput
            if step % checkpoint_steps == 0 or at_end or _minutes_passed(last_save, cfg.checkpoint_minutes, step,
                                                                          cfg.log_every, rt):
                if window_steps and not math.isfinite(loss_window.item()):  # never save weights past a divergence
                    raise TrainingDiverged(f"training loss became {loss_window.item()} by step {step}")
                checkpoint(step, val_loss)
                last_save = time.monotonic()
                window_start = time.perf_counter()
    except TrainingDiverged as exc:
        saver.wait(raise_error=False)
        kept = latest_checkpoint(run)
        raise TrainingDiverged(f"{exc}: stopped; the last good checkpoint is {kept or 'none (none was saved)'}. "
                               "Lower --lr, raise --warmup-steps or use --precision bf16") from None
    finally:
        bar.close()
        logger.close()
        saver.wait(raise_error=False)  # a save in flight (Ctrl-C, SIGTERM, an error) still reaches the disk
    saver.wait()  # its error, if it had one (a full disk): the run did not end with its checkpoint
    barrier(rt)  # every rank returns once the last checkpoint is on disk
    if rt.rank == 0 and last_eval:
        print0(summary_line(run, step, last_eval))
    return run


def _minutes_passed(since: float, minutes: float, step: int, log_every: int, rt: Runtime) -> bool:
    """Whether `minutes` of wall time have passed since the last save, asked at logging steps only; under torchrun
    rank 0's clock decides for every rank (one broadcast of one number), so all ranks save at the same step."""
    if not minutes or step % log_every:
        return False
    due = time.monotonic() - since >= 60 * minutes
    if rt.distributed:
        flag = torch.tensor([float(due)], device=rt.device)
        dist.broadcast(flag, src=0)
        due = bool(flag.item())
    return due


def summary_line(run: Path, step: int, metrics: dict[str, float]) -> str:
    parts = [f"{run}: step {step}", f"validation loss {metrics['val_loss']:.4f}"]
    if "val_bpb" in metrics:
        parts.append(f"bits per byte {metrics['val_bpb']:.4f}")
    text = ", ".join(parts)
    if metrics.get("sample"):
        text += f"\nsample: {metrics['sample']}"
    return text


def _check_tokenizer(meta: dict[str, Any], tokenizer: Any) -> None:
    expected = meta.get("tokenizer_hash")
    if expected and expected != tokenizer.hash:
        raise UserError(f"the checkpoint was trained with tokenizer {expected}, but the data uses {tokenizer.hash}: "
                        "prepare the data with the checkpoint's tokenizer")


def sample_text(model: GPT, tokenizer: Any, prompt: str, max_new_tokens: int, seed: int) -> str:
    """A short seeded sample from the generation engine (the same one `chat` and `serve` use)."""
    from minigpt.engine import Engine, SamplingParams

    ids = tokenizer.encode(prompt) or [tokenizer.eot_id]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.8, top_k=50, seed=seed,
                            stop_token_ids=[tokenizer.eot_id])
    # prepack=False: for one short sample, packing the weights for oneDNN (cpu_inference.py) costs more than it saves
    engine = Engine(model, max_batch=1, prepack=False)
    (completion,) = engine.generate([ids[-(model.config.block_size - 1):]], params)
    model.train()
    return prompt + tokenizer.decode(completion.tokens)


# ----------------------------------------------------------------------------------------------------------------
# Command line: `minigpt train`


def add_arguments(parser) -> None:
    recipes = ", ".join(name for name, _, _ in configlib.list_recipes("train"))
    parser.add_argument("--config", help=f"TOML, YAML or JSON file of settings, or a shipped recipe ({recipes}); "
                                         "flags override it")
    parser.add_argument("--list-configs", action="store_true", help="list the shipped recipes and exit")
    parser.add_argument("--dry-run", action="store_true", help="print what the run would do (data, tokens, epochs, "
                        "steps, checkpoints, memory, time) and exit without training")
    configlib.add_arguments(parser, TrainConfig)


def list_configs(stage: str) -> str:
    """The shipped recipes of a stage, one per line: name and what it is."""
    rows = configlib.list_recipes(stage)
    width = max((len(name) for name, _, _ in rows), default=0)
    return "\n".join(f"{name:<{width}}  {text}" for name, _, text in rows) + "\n"


def main(args) -> None:
    if args.list_configs:
        print(list_configs("train"), end="")
        return
    cfg = configlib.config_from_args(TrainConfig, args)
    if args.dry_run:
        from minigpt.dry_run import train_dry_run

        print(train_dry_run(cfg), end="")
        return
    try:
        train(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

