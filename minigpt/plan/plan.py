"""`minigpt plan`: from a budget and a GPU to a training run, with its arithmetic shown, before a cent is spent.

    minigpt plan --gpu A100-40GB --usd 15 --usd-per-hour 1.29      # what $15 of one A100 40GB buys
    minigpt plan --gpu H100-SXM --gpus 8 --hours 2                  # a node for two hours
    minigpt plan --gpu T4 --tokens 1e9 --model.preset gpt2 --json   # one model, a token budget, for scripts
    minigpt plan --gpu A100-40GB --gpus 8 --model.preset gpt2-xl --tokens 1e9   # DDP or FSDP: which fits

For each candidate (the GPT-2 presets and the compute-optimal size for the budget, or the one model given) it
estimates FLOPs per token, tokens/s at an assumed MFU, tokens, steps, the micro-batch and accumulation that fit
in memory with and without gradient checkpointing, with DDP (every GPU holds the whole training state) and with
FSDP (each holds 1/N of it), precision, hours, dollars, checkpoint disk use and the
validation loss a published scaling law expects; then it prints the `minigpt prepare` and `minigpt train`
commands of the recommended run. docs/plan.md derives and sources every number.

The estimates themselves are model/estimate.py's, shared with `train --dry-run`.
"""

from __future__ import annotations

import dataclasses
import math
import textwrap
from typing import Literal

from minigpt.common import UserError
from minigpt.common.config import load_file, opt
from minigpt.model.estimate import (
    ANCHOR,
    GPUS,
    OPTIMAL_TOKENS_PER_PARAM,
    TOKEN_EFFICIENCY,
    GiB,
    GPUSpec,
    RunEstimate,
    compute_optimal_params,
    default_mfu,
    estimate_run,
    find_gpu,
    largest_micro_batch,
    learning_rate_for,
    num_params,
    recompute_flops_per_token,
    shape_near,
    token_efficiency,
    training_memory,
)
from minigpt.model.gpt import PRESETS, ModelConfig

# ----------------------------------------------------------------------------------------------------------------
# The plan: candidates for a budget, the recommended one, its commands

# the shipped recipes the commands start from (minigpt/recipes/gpt2-124m.toml, gpt2-124m-muon.toml)
RECIPES = {"adamw": "gpt2-124m", "muon": "gpt2-124m-muon"}
DATASET_TOKENS = 10e9  # FineWeb-Edu sample-10BT in GPT-2 tokens, as the prepare command makes it
WARMUP_TOKENS = 375e6  # GPT-3's warm-up: 715 steps of 2^19 tokens in the recipe


@dataclasses.dataclass
class PlanConfig:
    """Settings of `minigpt plan`."""

    gpu: str = opt("A100-40GB", f"the card: {', '.join(GPUS)} (or a name as torch reports it)")
    gpus: int = opt(1, "GPUs training together, data parallel")
    parallel: Literal["auto", "ddp", "fsdp"] = opt("auto", "how the GPUs share the training state: ddp, each holds "
                                                           "all of it; fsdp, each 1/N (train --parallel fsdp); auto: "
                                                           "DDP, or FSDP where only FSDP fits without checkpointing")
    optimizer: Literal["adamw", "muon"] = opt("adamw", "as train --optimizer: muon's memory and Newton-Schulz time, "
                                                        "and its loss at the tokens times a token-efficiency factor "
                                                        "(docs/plan.md)")
    usd: float = opt(0.0, "budget in dollars (with --usd-per-hour)")
    usd_per_hour: float = opt(0.0, "price of one GPU for one hour, in dollars")
    hours: float = opt(0.0, "budget in wall-clock hours")
    tokens: float = opt(0.0, "budget in training tokens, e.g. 10e9")
    model: ModelConfig | None = opt(None, "plan for this model alone (default: compare the GPT-2 presets and the "
                                          "compute-optimal size)")
    seq_len: int = opt(0, "tokens per training sequence (0: the model's context window, 1024 for the proposals)")
    batch_tokens: int = opt(2**19, "tokens per optimizer step, by gradient accumulation")
    dataset_tokens: float = opt(DATASET_TOKENS, "tokens in the prepared data (FineWeb-Edu sample-10BT: about 10B)")
    vocab_size: int = opt(50257, "vocabulary of the data's tokenizer (GPT-2's)")
    mfu: float = opt(0.0, "model FLOPs utilisation to assume (0: the card's measured figure, else 0.315)")
    precision: Literal["auto", "bf16", "fp16"] = opt("auto", "auto: bf16 where the card has it natively, else fp16")
    checkpointing: Literal["auto", "on", "off"] = opt("auto", "gradient checkpointing; auto: only where nothing "
                                                              "fits without it")
    keep_last: int = opt(2, "checkpoints kept, as train --keep-last (the best is kept too)")
    overhead: float = opt(0.05, "share of a time or money budget kept for compiling, evaluating and checkpointing")
    json: bool = opt(False, "print the plan as JSON")

    def __post_init__(self) -> None:
        if not all(math.isfinite(x) for x in (self.usd, self.usd_per_hour, self.hours, self.tokens, self.mfu,
                                                 self.dataset_tokens)):
            raise ValueError("budgets, prices and --mfu must be finite numbers (not inf or nan)")
        if sum(1 for budget in (self.usd, self.hours, self.tokens) if budget) != 1:
            raise ValueError("give one budget: --usd (with --usd-per-hour), --hours or --tokens")
        if self.usd and not self.usd_per_hour:
            raise ValueError("--usd needs --usd-per-hour, the price of one GPU for an hour")
        if min(self.usd, self.usd_per_hour, self.hours, self.tokens, self.mfu, self.seq_len) < 0 or self.mfu > 1:
            raise ValueError("budgets, prices and --seq-len may not be negative; --mfu is a fraction of the peak")
        if self.gpus < 1 or self.keep_last < 1 or not 0 <= self.overhead < 1:
            raise ValueError("--gpus and --keep-last must be at least 1, --overhead in [0, 1)")
        if self.parallel == "fsdp" and self.gpus < 2:
            raise ValueError("--parallel fsdp shards over several GPUs: give --gpus 2 or more")


@dataclasses.dataclass
class Fit:
    micro_batch: int
    checkpointing: bool
    memory_bytes: int  # per GPU


@dataclasses.dataclass
class Candidate:
    name: str
    model: ModelConfig
    micro_batch_plain: int | None  # the largest that fits without checkpointing (None: none, or not searched)
    micro_batch_checkpointing: int | None
    parallel: str = "ddp"  # the way the GPUs share the state that the run below uses
    fits: dict[str, Fit | None] = dataclasses.field(default_factory=dict)  # ddp, fsdp -> the best fit of each
    run: RunEstimate | None = None  # None where nothing fits or the budget buys no step
    tokens_per_param: float = 0.0
    epochs: float = 0.0
    hours: float | None = None  # training and the kept share
    usd: float | None = None


@dataclasses.dataclass
class Plan:
    gpu: GPUSpec
    gpus: int
    budget: str
    mfu: float
    mfu_source: str
    compute_flops: float | None  # what a time budget buys at that MFU
    optimal_params: float
    candidates: list[Candidate]
    recommended: str | None
    reasons: list[str]
    commands: list[str]
    warnings: list[str] = dataclasses.field(default_factory=list)  # where the numbers leave what they come from


def plan(cfg: PlanConfig) -> Plan:
    gpu = find_gpu(cfg.gpu)
    precision = gpu.precision if cfg.precision == "auto" else cfg.precision
    if precision == "bf16" and gpu.precision != "bf16":
        raise UserError(f"the {gpu.name} has no native bf16 (compute capability {gpu.capability}): use fp16")
    mfu, mfu_source = (cfg.mfu, "given") if cfg.mfu else default_mfu(gpu)
    hours = cfg.hours or (cfg.usd / (cfg.usd_per_hour * cfg.gpus) if cfg.usd else 0.0)
    train_s = hours * 3600 * (1 - cfg.overhead)
    compute = train_s * mfu * gpu.peak_flops * cfg.gpus if hours else None
    optimal = compute_optimal_params(compute) if compute else cfg.tokens / OPTIMAL_TOKENS_PER_PARAM
    if cfg.model is not None:
        model = dataclasses.replace(cfg.model, vocab_size=cfg.vocab_size)  # train.py takes it from the tokenizer
        if model.gradient_checkpointing and cfg.checkpointing == "auto":  # asked for with the model's own flag
            cfg = dataclasses.replace(cfg, checkpointing="on")
        if cfg.seq_len > model.block_size:
            raise UserError(f"--seq-len {cfg.seq_len} exceeds the model's context window {model.block_size}: "
                            "raise --model.block-size")
        models = [model]
    else:
        block = max(1024, cfg.seq_len)  # GPT-2's context, or longer if asked
        models = [ModelConfig.from_preset(name, vocab_size=cfg.vocab_size, block_size=block)
                  for name in PRESETS if name.startswith("gpt2")]
        shape = shape_near(optimal, block, cfg.vocab_size)
        models += [shape] if all(num_params(m) != num_params(shape) for m in models) else []
    cfg, batch_note = _valid_batch_tokens(cfg, models)
    candidates = [_candidate(cfg, m, gpu, precision, train_s, hours) for m in models]
    best, reasons = _recommend(candidates, optimal, cfg)
    budget = (f"${cfg.usd:,.2f} at ${cfg.usd_per_hour:,.2f} per GPU-hour = " if cfg.usd else "") + (
        f"{hours:,.2f} hours of {cfg.gpus} GPU{'s' * (cfg.gpus > 1)}" if hours else f"{cfg.tokens:,.0f} tokens")
    return Plan(gpu, cfg.gpus, budget, mfu, mfu_source, compute, optimal, candidates, best and best.name, reasons,
                _commands(cfg, best) if best else [], batch_note + _warnings(best, cfg))


def nearest_multiple(n: int, step: int) -> int:
    return max(step, round(n / step) * step)


def _valid_batch_tokens(cfg: PlanConfig, models: list[ModelConfig]) -> tuple[PlanConfig, list[str]]:
    """--batch-tokens made a whole number of sequences on every GPU (e.g. 2^19 over 3 GPUs is not), saying so."""
    step = math.lcm(*[(cfg.seq_len or m.block_size) * cfg.gpus for m in models])
    if cfg.batch_tokens % step == 0:
        return cfg, []
    chosen = nearest_multiple(cfg.batch_tokens, step)
    return dataclasses.replace(cfg, batch_tokens=chosen), [
        f"--batch-tokens {cfg.batch_tokens:,} is not a whole number of {cfg.seq_len or models[0].block_size}-token "
        f"sequences on each of {cfg.gpus} GPUs (a multiple of {step:,}): planning with the nearest, --batch-tokens "
        f"{chosen}"]


# Chinchilla's fit was drawn from runs of 70M-16B parameters on 5B-500B tokens; ours is anchored at 124M on 10B.
FIT_TOKENS = (1e9, 1e12)
FIT_PARAMS_MAX = 16e9
MANY_EPOCHS = 4  # Muennighoff et al. 2023: up to ~4 passes, repeated tokens are nearly as good as fresh ones


def _warnings(best: Candidate | None, cfg: PlanConfig) -> list[str]:
    """One line for each way the recommended plan leaves the region its numbers come from."""
    if best is None or best.run is None:
        return []
    run, out = best.run, []
    if run.expected_loss >= math.log(cfg.vocab_size) - 1e-9:
        out.append(f"{_si(run.total_tokens)} tokens is too few for the loss fit, which predicts worse than a uniform "
                   f"guess over {cfg.vocab_size:,} tokens: the expected loss is capped at ln {cfg.vocab_size} = "
                   f"{math.log(cfg.vocab_size):.2f}")
    elif not FIT_TOKENS[0] <= run.total_tokens <= FIT_TOKENS[1] or run.params > FIT_PARAMS_MAX:
        out.append(f"{_si(run.params)} parameters on {_si(run.total_tokens)} tokens is outside the runs the loss fit "
                   f"comes from ({_si(FIT_TOKENS[0])}-{_si(FIT_TOKENS[1])} tokens, up to {_si(FIT_PARAMS_MAX)} "
                   "parameters): read the expected loss as a rough guess")
    if best.epochs > MANY_EPOCHS:
        out.append(f"{best.epochs:,.1f} passes over {_si(cfg.dataset_tokens)} tokens of data: repeats are counted as "
                   f"worth less (Muennighoff et al. 2023) and past ~16 passes more steps buy almost nothing; give "
                   f"more data (--dataset-tokens) or a smaller budget")
    return out


def _name(model: ModelConfig) -> str:
    """The preset's name for a preset's shape, d<depth> for a depth_shape, else <layers>x<width>."""
    shape = (model.n_layer, model.n_head, model.n_embd)
    preset = PRESETS.get(model.preset, {})
    if shape == (preset.get("n_layer"), preset.get("n_head"), preset.get("n_embd")):
        return model.preset
    return f"d{model.n_layer}" if shape == (model.n_layer,) * 2 + (64 * model.n_layer,) else \
        f"{model.n_layer}x{model.n_embd}"


def _candidate(cfg: PlanConfig, model: ModelConfig, gpu: GPUSpec, precision: str, train_s: float,
               hours: float) -> Candidate:
    seq = cfg.seq_len or model.block_size
    search = dict(seq_len=seq, tokens_per_step=cfg.batch_tokens, world=cfg.gpus, precision=precision, gpu=gpu,
                  optimizer=cfg.optimizer)
    found, fits = {}, {}
    for mode in ("ddp", "fsdp") if cfg.gpus > 1 else ("ddp",):
        plain = largest_micro_batch(model, checkpointing=False, parallel=mode, **search) \
            if cfg.checkpointing != "on" else None
        ckpt = largest_micro_batch(model, checkpointing=True, parallel=mode, **search) \
            if cfg.checkpointing != "off" else None
        found[mode], fits[mode], micro = (plain, ckpt), None, plain or ckpt
        if micro:
            memory = training_memory(model, micro_batch=micro, seq_len=seq, precision=precision,
                                     checkpointing=not plain, grad_accum=cfg.batch_tokens // (seq * cfg.gpus * micro),
                                     shards=cfg.gpus if mode == "fsdp" else 0, optimizer=cfg.optimizer)
            fits[mode] = Fit(micro, not plain, memory.total)
    # auto: DDP (the least communication) unless only FSDP fits without recomputing the blocks
    parallel = cfg.parallel if cfg.parallel != "auto" else "fsdp" if (
        fits.get("fsdp") and not fits["fsdp"].checkpointing and not (fits["ddp"] and not fits["ddp"].checkpointing)
    ) else "ddp"
    plain, ckpt = found[parallel]
    candidate = Candidate(_name(model), model, plain, ckpt, parallel, fits)
    if not (plain or ckpt):
        return candidate
    micro = plain or ckpt
    settings = dict(seq_len=seq, micro_batch=micro, grad_accum=cfg.batch_tokens // (seq * cfg.gpus * micro),
                    world=cfg.gpus, precision=precision, gpu=gpu, mfu=cfg.mfu or None, checkpointing=not plain,
                    keep_checkpoints=cfg.keep_last, parallel=parallel, optimizer=cfg.optimizer,
                    unique_tokens=cfg.dataset_tokens)
    if hours:  # as many whole steps as the time buys
        steps = int(train_s * estimate_run(model, steps=1, **settings).tokens_per_s // cfg.batch_tokens)
    else:
        steps = math.ceil(cfg.tokens / cfg.batch_tokens)
    if steps >= 1:
        run = candidate.run = estimate_run(model, steps=steps, **settings)
        candidate.tokens_per_param = run.total_tokens / run.params
        candidate.epochs = run.total_tokens / cfg.dataset_tokens
        candidate.hours = hours or run.hours / (1 - cfg.overhead)
        candidate.usd = candidate.hours * cfg.gpus * cfg.usd_per_hour if cfg.usd_per_hour else None
    return candidate


def _recommend(candidates: list[Candidate], optimal: float, cfg: PlanConfig) -> tuple[Candidate | None, list[str]]:
    """The lowest expected loss, or a published GPT-2 shape within 0.02 nats of it: its results compare with the
    reference runs, and it exports to Hugging Face as that very architecture."""
    runnable = [c for c in candidates if c.run is not None]
    if not runnable:
        if any(c.micro_batch_plain or c.micro_batch_checkpointing for c in candidates):
            return None, [f"the budget buys no step of {cfg.batch_tokens:,} tokens for any model that fits: give a "
                          "larger budget or a smaller --batch-tokens"]
        return None, ["nothing fits this card, not even one sequence per micro-batch with gradient checkpointing: "
                      "choose a card with more memory, more GPUs with --parallel fsdp, or a smaller model"]
    best = min(runnable, key=lambda c: c.run.expected_loss)
    reasons = [f"lowest expected loss: {best.name} ({best.run.expected_loss:.3f})"]
    preset = min((c for c in runnable if c.name in PRESETS), key=lambda c: c.run.expected_loss, default=None)
    if preset not in (None, best) and preset.run.expected_loss - best.run.expected_loss <= 0.02:
        reasons.append(f"{preset.name} is within 0.02 of it ({preset.run.expected_loss:.3f}), below the fit's "
                       "accuracy, and a published shape with reference runs to compare against: take it")
        best = preset
    run = best.run
    reasons.append(f"{best.tokens_per_param:.1f} tokens per parameter against a compute-optimal "
                   f"{OPTIMAL_TOKENS_PER_PARAM} ({_si(optimal)} parameters for this budget)")
    reasons += [_parallel_reason(best, cfg.gpus)] if cfg.gpus > 1 else []
    reasons.append(f"micro-batch {run.micro_batch} x {run.grad_accum} accumulation " + (
        "with gradient checkpointing: nothing fits without it" if run.checkpointing else
        "without gradient checkpointing: it fits, and recomputing the blocks would cost "
        f"{100 * recompute_flops_per_token(best.model, run.seq_len) / run.flops_per_token:.0f}% more compute"))
    if best.epochs > 1:
        reasons.append(f"{best.epochs:.1f} passes over {_si(cfg.dataset_tokens)} tokens: repeated data is worth less "
                       "than fresh (up to ~4 epochs nearly as much, Muennighoff et al. 2023)"
                       + ("; the commands prepare FineWeb-Edu's 100B-token sample instead"
                          if cfg.dataset_tokens == DATASET_TOKENS else ""))
    return best, reasons


def _parallel_reason(best: Candidate, gpus: int) -> str:
    ddp, fsdp = best.fits.get("ddp"), best.fits.get("fsdp")
    if best.parallel == "ddp":
        return ("DDP: every GPU holds the whole training state, and it fits; FSDP would add the gathering of each "
                "block's weights for memory this run does not need")
    if ddp is None:
        return (f"FSDP: the whole training state does not fit one card (DDP needs more than the card even at one "
                f"sequence per micro-batch); sharded over {gpus} GPUs it does")
    return (f"FSDP: sharding the weights, gradients and optimizer state over {gpus} GPUs leaves room for micro-batch "
            f"{fsdp.micro_batch} without gradient checkpointing, where DDP fits only "
            f"{ddp.micro_batch}{' with it' if ddp.checkpointing else ''}")


def _commands(cfg: PlanConfig, best: Candidate) -> list[str]:
    """`minigpt prepare` and `minigpt train` for the run: the shipped recipe, and a flag wherever the plan differs."""
    name = RECIPES[cfg.optimizer]
    recipe, run, model = load_file(name), best.run, best.model
    more_data = best.epochs > 1 and cfg.dataset_tokens == DATASET_TOKENS
    sample, data = ("sample-100BT", "data/fineweb-edu-100B") if more_data else ("sample-10BT", "data/fineweb-edu-10B")
    settings = {"max_steps": run.steps, "batch_size": run.micro_batch, "seq_len": run.seq_len,
                "batch_tokens": run.tokens_per_step, "precision": run.precision,
                "warmup_steps": min(round(WARMUP_TOKENS / run.tokens_per_step), max(run.steps // 10, 1)),
                "lr": learning_rate_for(run.params), "keep_last": cfg.keep_last, "data": data,
                # Moonlight's scaling makes Muon's lr AdamW's (the recipe's muon_lr is its lr)
                **({"muon_lr": learning_rate_for(run.params)} if cfg.optimizer == "muon" else {}),
                "run_dir": recipe["run_dir"] if best.name == "gpt2" else f"runs/{best.name}"}
    args = [f"--{key.replace('_', '-')} {value}" for key, value in settings.items() if recipe.get(key) != value]
    base = ModelConfig.from_preset(recipe["model"]["preset"])
    if model.preset in PRESETS and model.preset != base.preset:
        args.append(f"--model.preset {model.preset}")
        base = ModelConfig.from_preset(model.preset)
    for field in dataclasses.fields(ModelConfig):  # (the vocabulary comes from the data's tokenizer)
        value, flag = getattr(model, field.name), "model." + field.name.replace("_", "-")
        if field.name not in ("preset", "vocab_size", "gradient_checkpointing") and value != getattr(base, field.name):
            args.append(f"--{flag}" if value is True else f"--no-{flag}" if value is False else f"--{flag} {value}")
    args += ["--model.gradient-checkpointing"] if run.checkpointing else []
    args += ["--parallel fsdp"] if run.parallel == "fsdp" else []
    launcher = f"torchrun --standalone --nproc_per_node {cfg.gpus} -m minigpt" if cfg.gpus > 1 else "minigpt"
    return [f"minigpt prepare --sources hf:HuggingFaceFW/fineweb-edu:{sample} --tokenizer gpt2 --out {data}",
            f"{launcher} train --config {name} {' '.join(args)}".rstrip()]


# ----------------------------------------------------------------------------------------------------------------
# Output


def _si(x: float) -> str:
    scale, unit = next(((s, u) for s, u in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")) if abs(x) >= s), (1, ""))
    return f"{x / scale:.3g}{unit}"


def format_plan(p: Plan, cfg: PlanConfig) -> str:
    gpu, gib = p.gpu, lambda n: f"{n / GiB:.1f} GiB"
    wrap = lambda text: textwrap.fill(text, 118, subsequent_indent="    ")  # noqa: E731
    head = [wrap(f"{p.gpus} x {gpu.name}: {gpu.peak_flops / 1e12:.0f} TFLOP/s dense {gpu.precision}, "
                 f"{gpu.memory_bytes / GiB:.0f} GiB of which {gib(gpu.usable_bytes)} planned for (1 GiB and 10% kept "
                 "back)"), wrap(f"budget: {p.budget}" + (f", {100 * cfg.overhead:.0f}% of it kept for compiling, "
                                                         "evaluating, checkpointing" if not cfg.tokens else ""))]
    if p.compute_flops:
        head.append(wrap(f"compute: {p.compute_flops:.3g} FLOPs at MFU {100 * p.mfu:.1f}%; compute-optimal size "
                         "(Hoffmann et al. 2022: C = 6 N D, D = 20 N): N = sqrt(C / 120) = "
                         f"{_si(p.optimal_params)} parameters"))
    def fit_cell(c: Candidate, mode: str) -> str:
        fit = c.fits.get(mode)
        return f"{fit.micro_batch}{' ckpt' * fit.checkpointing}, {gib(fit.memory_bytes)}" if fit else "no fit"

    muon = cfg.optimizer == "muon"
    searched = lambda ckpt, n: "-" if cfg.checkpointing == ("off" if ckpt else "on") else str(n or "no fit")  # noqa: E731
    entries = [
        ("parameters", lambda c, r: _si(r.params)),
        ("FLOPs per token (6N + 12LCT)", lambda c, r: _si(r.flops_per_token)),
        (f"tokens/s, all GPUs (MFU {100 * p.mfu:.1f}%)", lambda c, r: _si(r.tokens_per_s)),
        ("tokens trained", lambda c, r: _si(r.total_tokens)),
        ("tokens per parameter (optimal: 20)", lambda c, r: f"{c.tokens_per_param:.1f}"),
        (f"epochs of {_si(cfg.dataset_tokens)} tokens", lambda c, r: f"{c.epochs:.2f}"),
        (f"steps of {cfg.batch_tokens:,} tokens", lambda c, r: f"{r.steps:,}"),
        ("micro-batch that fits, plain", [searched(False, c.micro_batch_plain) for c in p.candidates]),
        ("micro-batch that fits, checkpointing", [searched(True, c.micro_batch_checkpointing) for c in p.candidates]),
        *[(f"fits with {mode.upper()} (micro-batch, memory)", [fit_cell(c, mode) for c in p.candidates])
          for mode in ("ddp", "fsdp") if p.gpus > 1],
        *[("parallel", lambda c, r: r.parallel.upper())] * (p.gpus > 1),
        ("micro-batch x accumulation", lambda c, r: f"{r.micro_batch} x {r.grad_accum}" + " ckpt" * r.checkpointing),
        ("precision", lambda c, r: r.precision + " + scaling" * (r.precision == "fp16")),
        ("peak memory per GPU", lambda c, r: gib(r.memory.total)),
        ("hours (kept share included)", lambda c, r: f"{c.hours:.2f}"),
        ("dollars", lambda c, r: f"${c.usd:,.2f}" if c.usd is not None else "-"),
        (f"checkpoint (weights + {'Muon/AdamW' if muon else 'AdamW'})",
         lambda c, r: f"{r.checkpoint_bytes / 1e9:.2f} GB"),
        (f"disk, {cfg.keep_last + 2} checkpoints at most", lambda c, r: f"{r.checkpoint_disk_bytes / 1e9:.1f} GB"),
        *[("expected val loss, AdamW (estimate)", lambda c, r: f"{r.adamw_expected_loss:.2f}")] * muon,
        (f"expected val loss{', Muon' * muon} (estimate)", lambda c, r: f"{r.expected_loss:.2f}")]
    rows = [("", [c.name for c in p.candidates])] + [
        (label, cell if isinstance(cell, list) else [cell(c, c.run) if c.run else "-" for c in p.candidates])
        for label, cell in entries]
    widths = [max(len(label) for label, _ in rows)] + [max(len(r[1][i]) for r in rows) for i in range(len(rows[0][1]))]
    table = ["  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip([label, *cells], widths,
                                                                                      strict=True))).rstrip()
             for label, cells in rows]
    sources = [wrap(f"expected val loss: Hoffmann et al. 2022's fit L = 1.69 + 406.4/N^0.34 + 410.7/D^0.28, shifted "
                    f"to llm.c's GPT-2 124M at 9.9B FineWeb tokens ({ANCHOR['loss']}): an estimate (another tokenizer "
                    "and data than the fit's; FineWeb's validation, not FineWeb-Edu's; a tuned run)"),
               wrap(f"tokens/s: MFU {p.mfu_source}; memory: eager PyTorch (torch.compile usually needs less); "
                    "docs/plan.md derives every row")] + ([wrap(muon_sources(p))] if muon else [])
    advice = [f"recommended: {p.recommended}"] if p.recommended else ["no plan:"]
    advice += [wrap(f"  - {reason}") for reason in p.reasons]
    commands = ["", "commands:"] + [f"  {command}" for command in p.commands] if p.commands else []
    return "\n".join(head + [""] + table + [""] + sources + [""] + advice + commands)


def muon_sources(p: Plan) -> str:
    """Where Muon's expected loss comes from: the factor taken, and every source it was the smallest of."""
    factor, source = token_efficiency()
    others = "; ".join(f"{name}: {value:g}x" for name, value in TOKEN_EFFICIENCY.items() if name != source)
    ns = next((c.run.newton_schulz_flops for c in p.candidates if c.run), 0)
    return (f"Muon: the fit at the tokens x {factor:g}, the smallest token-efficiency factor of its sources: "
            f"{source} (taken); {others}. Newton-Schulz: {_si(ns)} FLOPs per step on every GPU ({p.candidates[0].name}"
            "), counted in tokens/s")
