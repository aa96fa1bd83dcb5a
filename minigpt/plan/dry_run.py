"""`minigpt train --dry-run` and `minigpt sft --dry-run`: what a run would do, before it does any of it.

    minigpt train --config gpt2-124m --dry-run          # on any machine: the recipe's card where there is no GPU
    minigpt train --config gpt2-124m --dry-run --gpu H100-SXM     # another card
    minigpt sft --config gpt2-124m-sft --base runs/gpt2-124m --dry-run

Prints the resolved settings, the data the run would read (tokens, documents or conversations), tokens per step, steps,
total tokens, how many epochs of its data that is, checkpoint size, count and disk use, memory per GPU and an estimate
of the time on the device it sees; warns in plain words when the run would repeat its data more than a few times or
would not fit. Trains nothing and writes nothing (sft prepares its conversations if they are not prepared yet, as the
run would). The numbers come from model/estimate.py's `estimate_run`, so `minigpt plan` and the dry run never disagree.
On a GPU they are that card's; on a machine without one, the card the settings name (`--gpu`, or the recipe's own), as
the run would go there: its precision, its loss path, its memory and time; only a run asked for on the CPU (`--device
cpu`, or no card named) gets the CPU's figures, its time from one timed forward and backward pass. Under torchrun with
`--parallel fsdp` the memory is per GPU with the state sharded over the processes.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from pathlib import Path

import torch

from minigpt.common import pick_device, world_size
from minigpt.common.config import from_dict, recipe_expectation
from minigpt.data.shards import read_meta
from minigpt.model import estimate
from minigpt.model.estimate import find_gpu
from minigpt.model.gpt import GPT, ModelConfig
from minigpt.model.optim import muon_parameter_names
from minigpt.runs.loading import read_checkpoint_meta, resolve_checkpoint, run_tokenizer_path
from minigpt.runs.runtime import loss_chunk_rows, resolve_precision
from minigpt.text.tokenizer import Tokenizer

TOO_MANY_EPOCHS = 4  # more passes than this over the same tokens: memorising more than learning
GPT2_VOCAB = 50257


STATE = {"adamw": "AdamW moments", "muon": "Muon's momentum, AdamW's moments"}  # a checkpoint's optimizer state


@dataclasses.dataclass
class RunShape:
    """The numbers a run's length follows from, whichever stage it is."""

    model: ModelConfig
    seq_len: int
    micro_batch: int
    grad_accum: int
    world: int
    steps: int
    precision: str
    device: torch.device
    keep_last: int
    checkpoint_every: int
    checkpoint_minutes: float
    chunk_rows: int
    gpu: object = None  # estimate.GPUSpec: the card planned for when this machine has none
    parallel: str = "ddp"
    optimizer: str = "adamw"


def _size(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:,.2f}{unit}"
    return f"{n:,.0f}"


def _bytes(n: float) -> str:
    return f"{n / 1e9:,.2f} GB" if n >= 1e8 else f"{n / 1e6:,.1f} MB"


PROBE_PASSES = 5  # timed passes after the warm-up; the median is taken (one pass alone read 10x slow, issue 32)
PROBE_SECONDS = 4.0  # ... or fewer, at least 3, when the passes are slow
_probe_clock = time.perf_counter  # (a test scripts it)


def cpu_tokens_per_second(model_cfg: ModelConfig, seq_len: int, micro_batch: int = 1) -> tuple[float, str]:
    """Training tokens/s on this CPU: forward and backward passes of the run's micro-batch (sequences of at most 128
    tokens, at most 2,048 tokens a pass, the FLOPs then scaled to the run's context), one warm-up pass first (it pays
    for allocations and the kernels' first use), then the median of up to PROBE_PASSES timed ones. The optimizer
    step is left out (small beside them)."""
    probe_len = min(seq_len, 128)
    batch = max(1, min(micro_batch, 2048 // probe_len))
    with torch.device("meta"):  # no random initialisation: at GPT-2 sizes it takes longer than the probe
        model = GPT(model_cfg)
    model = model.to_empty(device="cpu").train()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.01)  # any finite values cost the same (uninitialised memory could hold slow denormals)
    x = torch.zeros(batch, probe_len, dtype=torch.long)
    seconds: list[float] = []
    for i in range(PROBE_PASSES + 1):
        start = _probe_clock()
        model(x, x, reduction="sum")[1].backward()
        model.zero_grad(set_to_none=True)
        if i:  # the first pass is the warm-up
            seconds.append(_probe_clock() - start)
        if len(seconds) >= 3 and sum(seconds) > PROBE_SECONDS:
            break
    median = statistics.median(seconds)
    rate = batch * probe_len / median * model.flops_per_token(probe_len) / model.flops_per_token(seq_len)
    return rate, (f"median of {len(seconds)} forward and backward passes of {batch} x {probe_len} tokens after a "
                  f"warm-up, scaled to context {seq_len}")


def run_lines(shape: RunShape, train_tokens: int | None, train_what: str) -> tuple[list[str], list[str]]:
    """The lines shared by both stages, and the warnings: length, epochs, checkpoints, memory, time."""
    gpu = shape.gpu
    if shape.device.type == "cuda" and gpu is None:  # a card here: its own figures
        gpu = estimate.gpu_for_device(torch.cuda.get_device_name(shape.device))
        if gpu is not None:  # the card's real memory (an 80 GB A100 and a 40 GB one share a name pattern)
            gpu = dataclasses.replace(gpu, memory_bytes=torch.cuda.get_device_properties(shape.device).total_memory)
    est = estimate.estimate_run(shape.model, seq_len=shape.seq_len, micro_batch=shape.micro_batch,
                            grad_accum=shape.grad_accum, world=shape.world, steps=shape.steps,
                            precision=shape.precision, gpu=gpu, mfu=None,
                            checkpointing=shape.model.gradient_checkpointing, keep_checkpoints=shape.keep_last,
                            loss_chunk_rows=shape.chunk_rows, parallel=shape.parallel,
                            optimizer=shape.optimizer)
    lines, warnings = [], []
    lines.append(f"batch:       {shape.micro_batch} x {shape.seq_len} tokens x {shape.grad_accum} micro-batch"
                 f"{'es' if shape.grad_accum > 1 else ''} x {shape.world} process{'es' if shape.world > 1 else ''}"
                 f" = {est.tokens_per_step:,} tokens per step")
    length = f"length:      {shape.steps:,} steps = {_size(est.total_tokens)} tokens"
    if train_tokens:
        epochs = est.total_tokens / train_tokens
        length += f" = {epochs:,.2f} epochs of the {_size(train_tokens)} {train_what}"
        if epochs > TOO_MANY_EPOCHS:
            warnings.append(f"this run would read its training data {epochs:,.0f} times ({epochs:,.0f} epochs of "
                            f"{_size(train_tokens)} tokens): past a few epochs a model memorises rather than "
                            "learns. Give it more data (minigpt prepare) or fewer steps (--max-steps)")
    lines.append(length + f"; {est.total_tokens / est.params:,.1f} tokens per parameter (compute-optimal: ~20)")
    every = shape.checkpoint_every or max(shape.steps // 10, 1)
    saves = math.ceil(shape.steps / every)
    minutes = f" and every {shape.checkpoint_minutes:g} minutes" if shape.checkpoint_minutes else ""
    lines.append(f"checkpoints: every {every:,} steps{minutes} and at the end (about {saves} by steps); "
                 f"{_bytes(est.checkpoint_bytes)} each (weights and {STATE[shape.optimizer]}); {shape.keep_last} "
                 f"kept + the best + the one being written: {_bytes(est.checkpoint_disk_bytes)} on disk at most, about "
                 f"{_bytes(saves * est.checkpoint_bytes)} written")
    mem = est.memory
    card = "this card" if shape.gpu is None else f"the {shape.gpu.name}"
    where = f"per GPU, of {est.usable_bytes / 2**30:.1f} GiB usable on {card}" if est.usable_bytes else "per process"
    lines.append(f"memory:      {mem.total / 2**30:.1f} GiB at the peak {where} (estimate: weights "
                 f"{mem.weights / 2**30:.2f}, {shape.optimizer} {mem.optimizer / 2**30:.2f}, activations "
                 f"{mem.activations / 2**30:.2f}, temporaries {mem.temporaries / 2**30:.2f} GiB)")
    if est.fits is False:
        warnings.append(f"{mem.total / 2**30:.1f} GiB will not fit in {card}'s {est.usable_bytes / 2**30:.1f} "
                        "GiB: lower --batch-size (--batch-tokens keeps the step the same) or turn on "
                        "--model.gradient-checkpointing")
    if est.tokens_per_s is not None:
        lines.append(f"time:        about {est.hours:,.1f} hours on {shape.world} x {gpu.name} at "
                     f"{est.tokens_per_s:,.0f} tokens/s ({100 * est.mfu:.0f}% MFU, {est.mfu_source})")
    elif shape.device.type == "cpu":
        rate, how = cpu_tokens_per_second(shape.model, shape.seq_len, shape.micro_batch)
        hours = est.total_tokens / rate / 3600
        when = f"{hours:,.1f} hours" if hours >= 1 else f"{hours * 60:,.1f} minutes"
        lines.append(f"time:        about {when} on this CPU at {rate:,.0f} tokens/s ({how})")
    else:
        name = torch.cuda.get_device_name(shape.device) if shape.device.type == "cuda" else shape.device.type
        lines.append(f"time:        no estimate for {name} (not in minigpt plan's table)")
    return lines, warnings


def target(cfg) -> tuple[torch.device, str, object]:
    """(device, precision, card) a run of settings `cfg` is planned for: this machine's device, or where it has
    no GPU and the settings name one (`--gpu`, a recipe's `gpu`), that card, as a GPU run would resolve them."""
    device = pick_device(cfg.device)
    if device.type != "cpu" or cfg.device != "auto" or not cfg.gpu:
        return device, resolve_precision(cfg.precision, device), None
    gpu = find_gpu(cfg.gpu)
    return torch.device("cuda"), gpu.precision if cfg.precision == "auto" else cfg.precision, gpu


def target_line(gpu) -> list[str]:
    return [f"planned for: {gpu.name}, the card the settings name (no GPU here; --gpu NAME for another, "
            "--device cpu for this machine)"] if gpu is not None else []


def train_dry_run(cfg, builds_default_data: bool = False, recipe: str | None = None) -> str:
    """The plan of `minigpt train` with settings `cfg` (a TrainConfig), as text; `builds_default_data`: train
    would build cfg.data from the bundled corpus on first use."""
    device, precision, gpu = target(cfg)
    world = world_size()
    data = Path(cfg.data)
    lines = [f"dry run of minigpt train: nothing is trained or written ({cfg.run_dir})"]
    train_tokens, vocab = None, cfg.vocab_size or GPT2_VOCAB
    if (data / "meta.json").exists():
        meta = read_meta(data)
        split = meta["splits"]["train"]
        train_tokens, vocab = split["tokens"], meta["tokenizer"]["n_vocab"]
        lines.append(f"data:        {data}: {split['tokens']:,} training tokens in {split['documents']:,} "
                     f"documents ({split['text_bytes'] / 1e6:,.1f} MB of text), {meta['splits']['val']['tokens']:,} "
                     "validation tokens")
    elif builds_default_data:
        lines.append(f"data:        {data} is built from {', '.join(cfg.corpus)} on first use (a BPE vocabulary of "
                     f"{cfg.vocab_size:,} tokens, then shards): its size is known once built")
    else:
        lines.append(f"data:        {data} holds no shards yet: make them first, e.g. minigpt prepare --sources "
                     f"hf:HuggingFaceFW/fineweb-edu:sample-10BT --tokenizer gpt2 --out {data} (epochs unknown)")
    model = dataclasses.replace(cfg.model, vocab_size=vocab)
    seq_len = cfg.seq_len or model.block_size
    per_micro = cfg.batch_size * seq_len * world
    accum = max(cfg.batch_tokens // per_micro, 1) if cfg.batch_tokens else 1
    with torch.device("meta"):
        params = GPT(model).num_params()
    lines.insert(1, f"model:       {model.preset or 'custom'}: {model.n_layer} layers x {model.n_embd} wide, "
                    f"{model.n_head} heads, context {model.block_size}, vocabulary {vocab:,}: {params:,} parameters"
                    + (", gradient checkpointing" if model.gradient_checkpointing else ""))
    schedule = "cosine" if cfg.schedule == "cosine" else f"held, then the last {cfg.decay_fraction:.0%} linearly"
    lines.insert(2, f"training:    {precision} on {device.type}{' with torch.compile' if cfg.compile else ''}; lr "
                    f"{cfg.lr:g} after {cfg.warmup_steps:,} warm-up steps, {schedule} to "
                    f"{cfg.lr * cfg.min_lr_ratio:g}; "
                    f"AdamW ({cfg.beta1}, {cfg.beta2}), weight decay {cfg.weight_decay:g}, clipping at "
                    f"{cfg.grad_clip:g}" + (f"; Muon on the blocks' matrices: lr {cfg.muon_lr:g} (AdamW-sized "
                                            f"updates), momentum {cfg.muon_momentum:g}, weight decay "
                                            f"{cfg.muon_weight_decay:g}" if cfg.optimizer == "muon" else ""))
    if cfg.optimizer == "muon":
        with torch.device("meta"):
            muon_parameter_names(GPT(model), cfg.muon_params)  # a pattern that takes a LayerNorm: one line now
    expected = recipe_expectation(recipe)
    if expected:
        lines.insert(3, f"expected:    {expected} (the recipe {recipe}'s header)")
    shape = RunShape(model, seq_len, cfg.batch_size, accum, world, cfg.max_steps, precision, device, cfg.keep_last,
                     cfg.checkpoint_every, cfg.checkpoint_minutes,
                     loss_chunk_rows(cfg.chunked_loss, device, model.padded_vocab_size), gpu, cfg.parallel,
                     cfg.optimizer)
    more, warnings = run_lines(shape, train_tokens, "training tokens")
    return "\n".join(lines[:1] + target_line(gpu) + lines[1:] + more + [f"warning: {w}" for w in warnings]) + "\n"


def sft_dry_run(cfg, facts: dict) -> str:
    """The plan of `minigpt sft` with settings `cfg` (an SFTConfig) on its data, `facts` (sft.dataset_facts), as
    text."""
    device, precision, gpu = target(cfg)
    world = world_size()
    ckpt = resolve_checkpoint(cfg.base)
    tokenizer = Tokenizer.load(run_tokenizer_path(ckpt)).with_chat_tokens()  # GPT-2's gains four chat tokens
    model = dataclasses.replace(from_dict(ModelConfig, read_checkpoint_meta(ckpt)["model"]),
                                vocab_size=tokenizer.n_vocab)
    window, train = facts["window"], facts["train"]
    accum = max(cfg.batch_tokens // (cfg.batch_size * window * world), 1)
    rows_per_step = cfg.batch_size * world * accum
    steps = max(math.ceil(cfg.epochs * train["rows"] / rows_per_step), 1) if cfg.epochs else cfg.max_steps
    lines = [f"dry run of minigpt sft: nothing is trained ({cfg.run_dir})",
             f"base:        {ckpt} ({model.n_layer} layers x {model.n_embd} wide, context {window})",
             f"training:    {precision} on {device.type}; lr {cfg.lr:g} after {cfg.warmup_steps:,} warm-up steps; "
             f"{'packed rows' if cfg.pack else 'one conversation per row'}"]
    for s in facts["sources"]:
        skipped = sum(s["skipped"].values()) if isinstance(s["skipped"], dict) else s["skipped"]
        lines.append(f"source:      {s['source']} x{s['weight']:g}: {s['conversations']:,} conversations "
                     f"({s['held_out']:,} held out), {s['tokens']:,} tokens, {s['trained_tokens']:,} of them the "
                     f"assistant's; {skipped:,} records left out")
    lines.append(f"one epoch:   {train['conversations']:,} conversations in {train['rows']:,} rows of {window} "
                 f"({100 * train['fill']:.1f}% of positions real), {train['trained_tokens']:,} trained tokens, "
                 f"{train['truncated']:,} cut at the window, {train['beyond_window']:,} left out (no answer "
                 f"inside the window); {train['steps_per_epoch']:,} steps at {rows_per_step} rows a step")
    epoch_tokens = train["rows"] * window
    shape = RunShape(model, window, cfg.batch_size, accum, world, steps, precision, device, cfg.keep_last,
                     cfg.checkpoint_every, cfg.checkpoint_minutes,
                     loss_chunk_rows(cfg.chunked_loss, device, model.padded_vocab_size), gpu, cfg.parallel)
    more, warnings = run_lines(shape, epoch_tokens, "positions of one epoch")
    return "\n".join(lines[:1] + target_line(gpu) + lines[1:] + more + [f"warning: {w}" for w in warnings]) + "\n"
