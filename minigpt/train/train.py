"""`minigpt train`: the one training loop, for pretraining here and for chat fine-tuning (sft.py).

    minigpt train                                   # tiny model on the bundled Wikipedia summaries, on the CPU
    minigpt train --config my.toml --max-steps 5000 --model.preset gpt2 --precision bf16 --compile
    torchrun --nproc_per_node 8 -m minigpt train --config gpt2.toml     # data parallel over 8 GPUs
    minigpt train --run-dir runs/tiny --resume      # continue from the latest checkpoint

One optimizer step:
    for each of `grad_accum` micro-batches (B, T):   loss_sum += CE(model(x), y)   (autocast in bf16/fp16)
    loss = loss_sum / (targets counted over the whole step and every rank); backward (all-reduce once, at the last)
    clip the gradient norm; optimizer step (AdamW, or Muon + AdamW: model/optim.py) at the schedule's lr; zero grads

Normalising by the targets of the whole step makes accumulation and data parallelism exact: 2 ranks x B rows
give the same update as 1 rank x 2B rows, and masked targets (-100, in fine-tuning) never count.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist

from minigpt.chat.session import continue_text
from minigpt.common import UserError, print0, progress, seed_everything, write_json
from minigpt.common import config as configlib
from minigpt.common.config import opt
from minigpt.eval.evaluate import benchmark_scores
from minigpt.eval.tasks import check_task_names
from minigpt.model.gpt import GPT, ModelConfig
from minigpt.model.optim import apply_schedule, check_optimizer_settings, make_optimizer
from minigpt.runs.checkpoint import BackgroundSaver, check_new_run_dir
from minigpt.runs.checkpoint_sharded import ShardedSaver, load_optimizer_state
from minigpt.runs.loading import check_tokenizer, latest_checkpoint, load_model, load_trainer_state, resolve_checkpoint
from minigpt.runs.log import MetricsLogger, evaluation_line, plot_loss_curves, summary_line
from minigpt.runs.parallel import accumulation, gathered_copy, global_norm, shard_model
from minigpt.runs.runtime import (
    autocast_context,
    barrier,
    loss_chunk_rows,
    minutes_passed,
    peak_flops,
    resolve_precision,
    setup_runtime,
)
from minigpt.runs.tracking import check_packages, tracker_names
from minigpt.train.data import DEFAULT_DATA, TrainData, pretraining_data


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
    optimizer: Literal["adamw", "muon"] = opt("adamw", "adamw: AdamW on every parameter (GPT-2's recipe); muon: "
                                                        "Muon on the blocks' matrices, AdamW on the rest")
    lr: float = opt(3e-3, "peak learning rate (AdamW's)")
    schedule: Literal["cosine", "wsd"] = opt("cosine", "after the warm-up: cosine down to lr x min_lr_ratio, or wsd "
                                                       "(hold the peak, then a straight line down to it over the "
                                                       "last --decay-fraction of the steps)")
    decay_fraction: float = opt(0.3, "wsd: the share of the steps spent decaying")
    min_lr_ratio: float = opt(0.1, "the schedule decays to lr x this")
    warmup_steps: int = opt(50, "linear warm-up steps")
    weight_decay: float = opt(0.1, "AdamW weight decay, on weight matrices only")
    muon_lr: float = opt(6e-3, "muon: peak learning rate of the weight matrices (scaled by 0.2 x sqrt(larger "
                               "side), so the same value means AdamW's update size at any width)")
    muon_momentum: float = opt(0.95, "muon: Nesterov momentum")
    muon_momentum_warmup: int = opt(0, "muon: steps over which momentum rises from 0.85 to --muon-momentum (0: off)")
    muon_weight_decay: float = opt(0.1, "muon: decoupled weight decay of the matrices (x lr, as AdamW's)")
    muon_ns_steps: int = opt(5, "muon: Newton-Schulz iterations per step")
    muon_params: list[str] = opt(["h.*.attn.*.weight", "h.*.mlp.*.weight"], "muon: the parameters Muon steps, as "
                                                                            "name patterns (2-D matrices only)")
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
    gpu: str = opt("", "the card --dry-run plans for where it finds no GPU (minigpt plan --gpu's names; on a GPU the "
                       "card itself)")
    parallel: Literal["ddp", "fsdp"] = opt("ddp", "how torchrun's processes share the model: ddp, each holds all of "
                                                  "it, its gradients and AdamW state; fsdp, each holds 1/N of them "
                                                  "(runs/parallel.py; sharded checkpoints)")
    fsdp_reshard: bool = opt(True, "fsdp: gather each block's weights for its forward and again for its backward "
                                   "pass (least memory); off: keep them, and the step's gradients, until its end")
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
    tracker: list[str] = opt([], "also log to these trackers: tensorboard, wandb (several allowed; none: only "
                                 "metrics.jsonl); W&B honours WANDB_MODE=offline, WANDB_ENTITY, WANDB_DIR")
    tracker_project: str = opt("minigpt", "the W&B project")
    tracker_name: str = opt("", "the run's name in W&B (default: --run-dir)")
    tensorboard: bool = opt(False, "the same as --tracker tensorboard")

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
        check_optimizer_settings(self)
        self.tracker = tracker_names(self.tracker)


# ----------------------------------------------------------------------------------------------------------------
# One optimizer step


@dataclasses.dataclass
class StepResult:
    loss: torch.Tensor  # mean loss per counted target over the step's micro-batches and every rank (on the device)
    grad_norm: torch.Tensor  # before clipping; not finite when an fp16 step overflowed
    tokens: int  # positions computed, every rank
    applied: bool  # False when the fp16 loss scaler skipped the update (an overflow)


def train_step(model: torch.nn.Module, micro_batches: list[tuple], optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, *, precision: str, device: torch.device, grad_clip: float,
               chunk_rows: int = 0, world: int = 1, accumulate: Callable[[bool], Any] | None = None) -> StepResult:
    """Micro-batches -> loss, backward, clipping, one optimizer step; the gradients are zero again after it.

    Each micro-batch is (x, y) or (x, y, extra forward kwargs), x and y (B, T). The summed loss is divided by the
    targets counted over the whole step and every rank, so accumulation and data parallelism are exact: two
    micro-batches of B rows give the update of one of 2B rows. Under DistributedDataParallel (`world` > 1) the
    gradients are all-reduced once, at the last micro-batch; a sharded model brings its own `accumulate(last)`.
    """
    counted = sum((b[1] != -100).sum() for b in micro_batches).to(device, torch.float32)
    if world > 1:
        dist.all_reduce(counted)
    loss_sum = torch.zeros((), device=device)
    for i, (x, y, *extra) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        sync = accumulate(last) if accumulate else model.no_sync() if world > 1 and not last else \
            contextlib.nullcontext()
        with sync, autocast_context(precision, device):
            # [1]: the logits (B, T, vocab) are not kept past this line (at GPT-2 124M, 32 x 1024 rows in bf16:
            # 3.3 GB that `_, loss = ...` would hold into the next micro-batch's forward pass)
            loss = model(x, y, reduction="sum", chunk_rows=chunk_rows, **(extra[0] if extra else {}))[1]
        # DistributedDataParallel averages gradients over ranks: scale by world to get the global mean.
        scaler.scale(loss * (world / counted)).backward()
        loss_sum += loss.detach()
    if grad_clip > 0 or scaler.is_enabled():
        scaler.unscale_(optimizer)
        # max_norm inf: the norm alone, which tells a skipped fp16 step below
        grad_norm = global_norm(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or math.inf))
    else:
        grad_norm = torch.zeros(())
    scaler.step(optimizer)  # with fp16, skipped when a gradient overflowed (the scale then halves)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if world > 1:
        dist.all_reduce(loss_sum)
    # The scaler skips a step on every rank alike (it reduces the overflow flag over the gradients, which
    # DistributedDataParallel already averaged). Reading the flag is a host sync, paid in fp16 only.
    applied = not scaler.is_enabled() or bool(torch.isfinite(grad_norm).item())
    return StepResult(loss_sum / counted, grad_norm, sum(b[0].numel() for b in micro_batches) * world, applied)


# ----------------------------------------------------------------------------------------------------------------
# The loop: set-up, then steps with logging, evaluation and checkpoints around them


class TrainingDiverged(UserError):
    pass


MAX_SKIPPED_IN_A_ROW = 40  # consecutive fp16 overflows before a run is called diverged


@dataclasses.dataclass
class Progress:
    """What a checkpoint must carry besides weights and optimizer for a resumed run to go on (and log) exactly."""

    step: int = 0  # optimizer steps applied
    best_val: float = math.inf
    tokens_seen: int = 0  # positions computed (skipped fp16 steps included: the data moved on)
    skipped_steps: int = 0  # fp16 steps whose update the scaler dropped: not counted as steps
    window_loss: float = 0.0  # the training loss of the steps not yet logged, summed
    window_steps: int = 0
    window_tokens: int = 0


class Trainer:
    """One run of `train`: `__init__` sets it up (resuming if asked), `run()` loops until max_steps."""

    def __init__(self, cfg: TrainConfig, data: TrainData | None = None, model: GPT | None = None,
                 stage: str = "train") -> None:
        self.cfg, self.stage = cfg, stage
        self.rt = rt = setup_runtime(cfg.device)
        self.run_dir = run = Path(cfg.run_dir)
        self.precision = resolve_precision(cfg.precision, rt.device)
        if rt.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for fp32 matmuls on Ampere and newer
            torch.backends.cudnn.allow_tf32 = True
        resume_from = self._resume_point()
        check_packages(tracker_names(cfg.tracker, cfg.tensorboard))  # on every rank, before any work
        if cfg.eval_tasks:
            check_task_names(cfg.eval_tasks)
        seed_everything(cfg.seed)  # same initial weights on every rank
        meta: dict[str, Any] = {}
        if resume_from is not None:
            model, meta = load_model(resume_from, rt.device)
        elif model is None and cfg.init_from:
            model, meta = load_model(cfg.init_from, rt.device)
        self.seq_len = cfg.seq_len or (model.config.block_size if model is not None else cfg.model.block_size)
        self.data = data = data if data is not None else pretraining_data(cfg, rt, self.seq_len, self.precision)
        self.tokenizer = data.tokenizer
        if meta:
            check_tokenizer(meta, self.tokenizer)
        if model is None:
            model = GPT(dataclasses.replace(cfg.model, vocab_size=self.tokenizer.n_vocab))
        if model.config.vocab_size != self.tokenizer.n_vocab:
            raise UserError(f"the model has {model.config.vocab_size} tokens but the tokenizer "
                            f"{self.tokenizer.n_vocab}")
        if self.seq_len > model.config.block_size:
            raise UserError(f"seq_len {self.seq_len} exceeds the model's context window {model.config.block_size}")
        self.raw_model = model = model.to(rt.device).train()
        self.sharded = cfg.parallel == "fsdp" and rt.distributed  # one process has nothing to shard
        if self.sharded:
            shard_model(model, self.precision, cfg.fsdp_reshard)  # before the optimizer: it steps the shards
        tokens_per_micro = cfg.batch_size * self.seq_len * rt.world
        if cfg.batch_tokens % tokens_per_micro:
            near = max(tokens_per_micro, round(cfg.batch_tokens / tokens_per_micro) * tokens_per_micro)
            raise UserError(f"batch_tokens {cfg.batch_tokens} is not a multiple of batch_size x seq_len x processes "
                            f"= {tokens_per_micro}: the nearest that is, --batch-tokens {near}")
        self.accum = max(cfg.batch_tokens // tokens_per_micro, 1)
        self.optimizer = make_optimizer(model, cfg, rt.device)
        self.scaler = torch.amp.GradScaler(rt.device.type, enabled=self.precision == "fp16")
        self.progress = Progress()
        if resume_from is not None:
            self._load_state(resume_from, tokens_per_micro * self.accum)
        self.model = torch.compile(model) if cfg.compile else model
        if rt.distributed and not self.sharded:
            from torch.nn.parallel import DistributedDataParallel

            self.model = DistributedDataParallel(self.model, device_ids=[rt.local_rank] if rt.device.type == "cuda"
                                                 else None)
        settings = {"stage": stage, **configlib.to_dict(cfg), "resolved": {
            "precision": self.precision, "seq_len": self.seq_len, "grad_accum": self.accum, "world_size": rt.world,
            "tokens_per_step": tokens_per_micro * self.accum, "model": configlib.to_dict(model.config)}}
        self.logger = MetricsLogger(run, self.progress.step if resume_from else None,
                                    tracker_names(cfg.tracker, cfg.tensorboard), config=settings,
                                    project=cfg.tracker_project, name=cfg.tracker_name)
        if rt.rank == 0:
            run.mkdir(parents=True, exist_ok=True)
            write_json(run / "config.json", settings)
            self.tokenizer.save(run / "tokenizer.json")
        self.chunk_rows = loss_chunk_rows(cfg.chunked_loss, rt.device, model.config.padded_vocab_size)
        self.saver = ShardedSaver(self.optimizer, model) if self.sharded else BackgroundSaver()
        self.accumulate = accumulation(self.model, cfg.fsdp_reshard) if self.sharded else None
        print0(f"{stage}: {model.num_params():,} parameters, {self.precision}, {rt.device.type} x {rt.world}, "
               f"{tokens_per_micro * self.accum:,} tokens per step ({self.accum} micro-batch"
               f"{'es' if self.accum > 1 else ''} of {cfg.batch_size} x {self.seq_len} per process); {data.describe}")

    def _resume_point(self) -> Path | None:
        run, cfg = self.run_dir, self.cfg
        latest = latest_checkpoint(run)
        if latest is not None and not cfg.resume:
            raise UserError(f"{run} already holds checkpoints (latest: {latest.name}): pass --resume to continue "
                            "it, or choose another --run-dir")
        if latest is None:
            restarted = check_new_run_dir(run)  # never replace files another program (or the user) wrote
            if cfg.resume or restarted:
                print0(f"{run} has no checkpoint yet: starting a new run")
            return None
        # the newest checkpoint that is intact, trainer state included (a damaged one is named and skipped)
        return resolve_checkpoint(run, "latest", need_trainer=True)

    def _load_state(self, ckpt: Path, tokens_per_step: int) -> None:
        state = load_trainer_state(ckpt, self.rt.device)
        load_optimizer_state(self.optimizer, self.raw_model, state["optimizer"], ckpt)
        self.scaler.load_state_dict(state["scaler"])
        self.data.train.load_state_dict(state["data"])
        torch.set_rng_state(state["rng_cpu"].cpu())
        if self.rt.device.type == "cuda" and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"].cpu())
        step = int(state["step"])
        self.progress = Progress(step, float(state["best_val"]), int(state.get("tokens_seen", step * tokens_per_step)),
                                 int(state.get("skipped_steps", 0)))
        if "loss_window" in state:  # (else an older checkpoint: a fresh window) tokens/s counts new tokens only
            self.progress.window_loss, self.progress.window_steps = (float(state["loss_window"]),
                                                                     int(state["window_steps"]))
        print0(f"resuming {self.run_dir} at step {step} from {ckpt}")

    # -- around the steps ----------------------------------------------------------------------------------------

    def save(self, val_loss: float | None) -> None:
        """A checkpoint of the current step: copied to host memory here, written on a thread while training goes
        on. The other ranks never wait for rank 0's disk (they read nothing it writes until the run ends)."""
        p = self.progress
        is_best = val_loss is not None and val_loss < p.best_val
        if is_best:
            p.best_val = val_loss
        if self.rt.rank != 0 and not self.sharded:  # a sharded checkpoint: every process writes its share
            return
        state = {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                 "data": self.data.train.state_dict(), "rng_cpu": torch.get_rng_state(), "step": p.step,
                 "best_val": p.best_val, "tokens_seen": p.tokens_seen, "skipped_steps": p.skipped_steps,
                 # the training-loss window not yet logged: a resumed run logs the same averages
                 "loss_window": torch.tensor(p.window_loss), "window_steps": p.window_steps,
                 "window_tokens": p.window_tokens}
        if self.rt.device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state()
        meta = {"stage": self.stage, "tokenizer_hash": self.tokenizer.hash, "val_loss": val_loss,
                "tokens_seen": p.tokens_seen}
        self.saver.save(self.run_dir, self.raw_model, p.step, meta, state, self.cfg.keep_last, is_best)

    def evaluate(self) -> dict[str, Any]:
        """Validation metrics, benchmark scores and a sample at the current step, logged and plotted."""
        cfg, rt, step = self.cfg, self.rt, self.progress.step
        self.model.eval()
        metrics = self.data.evaluate(self.raw_model)
        self.model.train()
        if not math.isfinite(metrics["val_loss"]):
            raise TrainingDiverged(f"validation loss became {metrics['val_loss']} at step {step}")
        record: dict[str, Any] = {"step": step, **metrics}
        # what rank 0 computes alone needs a whole model (a sharded one computes only with every process)
        alone = gathered_copy(self.raw_model, rt.rank, bool(cfg.eval_tasks or cfg.sample_prompt))
        if cfg.eval_tasks and rt.rank == 0:
            # Flat names ("hellaswag/acc_norm"): `minigpt eval` plots them across training from metrics.jsonl.
            with autocast_context(self.precision, rt.device):
                record.update(benchmark_scores(alone, self.tokenizer, cfg.eval_tasks, cfg.eval_tasks_limit,
                                               shards=cfg.data if self.stage == "train" else None))
        if cfg.sample_prompt and rt.rank == 0:
            if self.data.sample is not None:
                record["sample"] = self.data.sample(alone)
            else:
                record["sample"] = continue_text(alone, self.tokenizer, cfg.sample_prompt, cfg.sample_tokens, cfg.seed)
            alone.train()
        self.logger.log(record)
        if rt.rank == 0:
            self.logger.image("loss_plot", plot_loss_curves(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png",
                                                       title=f"{self.run_dir.name}: loss"), step)
        return record

    def log(self, lr: float, grad_norm: torch.Tensor, seconds: float) -> dict[str, Any]:
        """The logged line of the steps since the last one (their mean loss); empties the window."""
        p, rt = self.progress, self.rt
        loss = p.window_loss / p.window_steps
        if not math.isfinite(loss):
            raise TrainingDiverged(f"training loss became {loss} at step {p.step}")
        tokens_per_s = p.window_tokens / seconds
        record = {"step": p.step, "loss": loss, "lr": lr, "grad_norm": float(grad_norm),
                  "tokens_per_s": tokens_per_s, "tokens": p.tokens_seen,
                  **(self.data.train_metrics() if self.data.train_metrics else {})}
        if self.scaler.is_enabled():
            record.update(loss_scale=self.scaler.get_scale(), skipped_steps=p.skipped_steps)
        peak = peak_flops(rt.device)
        if peak:
            record["mfu"] = self.raw_model.flops_per_token(self.seq_len) * tokens_per_s / rt.world / peak
        self.logger.log(record)
        p.window_loss, p.window_steps, p.window_tokens = 0.0, 0, 0
        return record

    # -- the loop ------------------------------------------------------------------------------------------------

    def run(self) -> Path:
        cfg, p, rt = self.cfg, self.progress, self.rt
        data = self.data.train
        bar = progress(total=cfg.max_steps, desc=self.stage, unit="step", initial=p.step)
        checkpoint_steps = cfg.checkpoint_every or max(cfg.max_steps // 10, 1)
        window_start, last_save, skipped_in_a_row = time.perf_counter(), time.monotonic(), 0
        # The window's loss is summed on the device, step after step, and read once per logged line; a checkpoint
        # carries its value, so a resumed run adds the same numbers in the same order and logs the same losses.
        window_loss = torch.tensor(p.window_loss, device=rt.device)
        last_eval: dict[str, Any] = {}
        try:
            while p.step < cfg.max_steps:
                lr = apply_schedule(self.optimizer, p.step, cfg)
                micro = [data.batch(data.step + i) for i in range(self.accum)]
                data.step += self.accum
                result = train_step(self.model, micro, self.optimizer, self.scaler,
                                    precision="fp32" if self.sharded else self.precision, device=rt.device,
                                    grad_clip=cfg.grad_clip, chunk_rows=self.chunk_rows, world=rt.world,
                                    accumulate=self.accumulate)  # (FSDP: its policy, not autocast)
                p.tokens_seen += result.tokens
                p.window_tokens += result.tokens
                if not result.applied:  # the data moved on; the step count, the schedule and the loss did not
                    p.skipped_steps += 1
                    skipped_in_a_row += 1
                    if skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:  # the scale fell by 2^40: the loss is not finite
                        raise TrainingDiverged(f"{skipped_in_a_row} fp16 steps in a row overflowed at step {p.step}")
                    continue
                skipped_in_a_row = 0
                p.step += 1
                p.window_steps += 1
                window_loss += result.loss
                at_end = p.step == cfg.max_steps
                if p.step % cfg.log_every == 0 or at_end:
                    p.window_loss = window_loss.item()  # the only host synchronisation of a normal step
                    window_loss.zero_()
                    record = self.log(lr, result.grad_norm, time.perf_counter() - window_start)
                    bar.set_postfix({"loss": f"{record['loss']:.3f}", "tok/s": f"{record['tokens_per_s']:,.0f}",
                                     **({"mfu": f"{100 * record['mfu']:.1f}%"} if "mfu" in record else {})},
                                    refresh=False)
                    window_start = time.perf_counter()
                bar.update(1)
                val_loss, paused = None, time.perf_counter()
                if p.step % cfg.eval_every == 0 or at_end:
                    last_eval = self.evaluate()
                    val_loss = last_eval["val_loss"]
                    bar.write(evaluation_line(last_eval))
                timed = cfg.checkpoint_minutes and p.step % cfg.log_every == 0  # the clock is asked when logging
                if p.step % checkpoint_steps == 0 or at_end or (timed and minutes_passed(last_save,
                                                                                         cfg.checkpoint_minutes, rt)):
                    p.window_loss = window_loss.item()  # the loss not yet logged goes into the checkpoint
                    if p.window_steps and not math.isfinite(p.window_loss):  # never save weights past a divergence
                        raise TrainingDiverged(f"training loss became {p.window_loss} by step {p.step}")
                    self.save(val_loss)
                    last_save = time.monotonic()
                # evaluations and checkpoints are not training: the window's clock stops for them (its tokens do not)
                window_start += time.perf_counter() - paused
        except TrainingDiverged as exc:
            self.saver.wait(raise_error=False)
            kept = latest_checkpoint(self.run_dir)
            raise TrainingDiverged(f"{exc}: stopped; the last good checkpoint is {kept or 'none (none was saved)'}. "
                                   "Lower --lr, raise --warmup-steps or use --precision bf16") from None
        finally:
            bar.close()
            self.saver.wait(raise_error=False)  # a save in flight (Ctrl-C, SIGTERM, an error) still reaches the disk
            self.logger.close()  # after: a tracker slow to finish (W&B uploading) never holds up the checkpoint
        self.saver.wait()  # its error, if it had one (a full disk): the run did not end with its checkpoint
        barrier(rt)  # every rank returns once the last checkpoint is on disk
        if rt.rank == 0 and last_eval:
            print0(summary_line(self.run_dir, p.step, last_eval))
        return self.run_dir


def train(cfg: TrainConfig, data: TrainData | None = None, model: GPT | None = None, stage: str = "train") -> Path:
    """Train by `cfg`; returns the run folder. `data` and `model` let fine-tuning supply its own."""
    return Trainer(cfg, data, model, stage).run()
