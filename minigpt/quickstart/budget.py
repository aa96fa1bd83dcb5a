"""The quickstart sized to a time budget: a short speed probe on this machine, then a design for M minutes.

    minigpt quickstart --minutes 30

`seconds_per_step` times `train.train_step` itself, the step `minigpt train` runs (forward, chunked loss, backward,
clipping, the quickstart's optimizer: Muon with AdamW, or fused AdamW alone), on random tokens for a given shape;
`design_for_minutes` uses it to choose the model and the steps that fill the budget, following the search in
docs/quickstart.md.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from minigpt.common import UserError, print0
from minigpt.model.gpt import GPT, ModelConfig, logit_chunk_rows
from minigpt.model.optim import make_optimizer
from minigpt.train.train import TrainConfig, train_step


def training_step(cfg: ModelConfig, batch_size: int, optimizer: str = "adamw",
                  documents_per_row: int = 0) -> Callable[[], None]:
    """One training step of a fresh model of shape `cfg` with `optimizer` (adamw or muon) on random tokens, as a
    function to call and time: `train.train_step` itself, the step `minigpt train` takes (forward, chunked loss,
    backward, clipping, the optimizer). With `documents_per_row`, rows packed with that many conversations, as
    fine-tuning computes them."""
    generator = torch.Generator().manual_seed(0)
    model = GPT(cfg).train()
    stepper = make_optimizer(model, TrainConfig(optimizer=optimizer), torch.device("cpu"))
    rows = logit_chunk_rows(torch.device("cpu"), cfg.padded_vocab_size)
    x = torch.randint(0, cfg.vocab_size, (batch_size, cfg.block_size), generator=generator)
    y = torch.randint(0, cfg.vocab_size, (batch_size, cfg.block_size), generator=generator)
    batch: tuple = (x, y)
    if documents_per_row:
        doc_ids = torch.arange(cfg.block_size) * documents_per_row // cfg.block_size  # (T,): equal spans, 0, 0, ...
        batch = (x, y, {"doc_ids": doc_ids.expand(batch_size, cfg.block_size)})
    scaler = torch.amp.GradScaler("cpu", enabled=False)

    def step() -> None:
        train_step(model, [batch], stepper, scaler, precision="fp32", device=torch.device("cpu"), grad_clip=1.0,
                   chunk_rows=rows)

    return step


def seconds_per_step(vocab_size: int, n_layer: int, n_head: int, n_embd: int, block_size: int, batch_size: int,
                     steps: int = 6, warmup: int = 2, documents_per_row: int = 0, optimizer: str = "adamw") -> float:
    """Median seconds of one `training_step` of this shape and `optimizer` on this machine's CPU (random tokens,
    no data)."""
    cfg = ModelConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, vocab_size=vocab_size)
    step = training_step(cfg, batch_size, optimizer, documents_per_row)
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def sft_seconds_per_step(vocab_size: int, n_layer: int, n_head: int, n_embd: int, block_size: int,
                         rows: int) -> float:
    """A fine-tuning step: rows of the full window, each packed with conversations of about 40 tokens (the bundled
    mix's average), attending through the block-diagonal mask."""
    return seconds_per_step(vocab_size, n_layer, n_head, n_embd, block_size, rows,
                            documents_per_row=max(block_size // 40, 1))


# ----------------------------------------------------------------------------------------------------------------
# A design for M minutes

# Shapes tried in turn, growing by about 2x in compute per token; the vocabulary and the rest of the design stay
# the default's (docs/quickstart.md: the search at 10 minutes found the vocabulary and learning rates).
SHAPES = [(4, 4, 128), (6, 6, 192), (8, 8, 256), (8, 6, 384), (12, 6, 384)]  # (layers, heads, width)
# The default design trains on about this many tokens per parameter (1,000 Muon steps of 2,048 tokens, 1.87M
# parameters); a larger shape is chosen only when the budget gives it at least as many (compute-optimal training
# keeps this ratio: a model twice the size wants twice the tokens). It was 2.1 with AdamW's 1,950 steps: Muon
# needs fewer tokens for the same loss (docs/training.md, "Muon: the search").
TOKENS_PER_PARAMETER = 1.1
FIXED_SECONDS = 30.0  # start-up, tokenizer and shards, the conversations' tokens, the report (measured: 25 s)
PRETRAIN_SHARE = 0.77  # of the rest, as in the default design (about 300 s of pretraining, 90 s of fine-tuning)


def design_for_minutes(cfg):
    """`cfg` (a QuickstartConfig) with the largest shape of SHAPES that its minutes train on at least
    TOKENS_PER_PARAMETER tokens per parameter, and the steps that fill the time, from a speed probe per shape."""
    import dataclasses


    budget = cfg.minutes * 60 - FIXED_SECONDS
    if budget <= 60:
        raise UserError(f"--minutes {cfg.minutes:g} leaves no time to train: give at least 3 minutes")
    pretrain_s, sft_s = PRETRAIN_SHARE * budget, (1 - PRETRAIN_SHARE) * budget
    chosen = None
    for layers, heads, width in SHAPES:
        shape = dataclasses.replace(cfg.model, n_layer=layers, n_head=heads, n_embd=width,
                                    vocab_size=cfg.vocab_size)
        step_s = seconds_per_step(cfg.vocab_size, layers, heads, width, shape.block_size, cfg.batch_size,
                                  optimizer=cfg.optimizer)
        steps = int(pretrain_s / step_s)
        with torch.device("meta"):
            params = GPT(ModelConfig(**{**dataclasses.asdict(shape), "preset": ""})).num_params()
        tokens = steps * cfg.batch_size * shape.block_size
        print0(f"probe: {layers} layers x {width}: {step_s * 1000:.0f} ms a step -> {steps:,} steps, "
               f"{tokens / params:.1f} tokens per parameter")
        if chosen is None or tokens >= TOKENS_PER_PARAMETER * params:
            chosen = (shape, steps, layers, heads, width)
        else:
            break
    shape, steps, layers, heads, width = chosen
    sft_steps = int(sft_s / sft_seconds_per_step(cfg.vocab_size, layers, heads, width, shape.block_size,
                                                 cfg.sft_batch_size))
    print0(f"--minutes {cfg.minutes:g}: {layers} layers x {width}, {steps:,} pretraining and {sft_steps:,} "
           "fine-tuning steps")
    return dataclasses.replace(cfg, model=shape, pretrain_steps=max(steps, 10), sft_steps=max(sft_steps, 10))
