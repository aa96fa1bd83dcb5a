"""The quickstart sized to a time budget: a short speed probe on this machine, then a design for M minutes.

    minigpt quickstart --minutes 30

`seconds_per_step` times the training step `minigpt train` runs (forward, chunked loss, backward, clipping, fused
AdamW) on random tokens for a given shape; `design_for_minutes` uses it to choose the model and the steps that
fill the budget, following the search in docs/quickstart.md.
"""

from __future__ import annotations

import time

import torch


def seconds_per_step(vocab_size: int, n_layer: int, n_head: int, n_embd: int, block_size: int, batch_size: int,
                     steps: int = 6, warmup: int = 2, documents_per_row: int = 0) -> float:
    """Median seconds of one pretraining step of this shape on this machine's CPU (random tokens, no data); with
    `documents_per_row`, rows packed with that many conversations, as fine-tuning computes them."""
    from minigpt.model import GPT, ModelConfig, logit_chunk_rows
    from minigpt.optim import make_optimizer
    from minigpt.train import TrainConfig

    cfg = ModelConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, vocab_size=vocab_size)
    generator = torch.Generator().manual_seed(0)
    model = GPT(cfg).train()
    optimizer = make_optimizer(model, TrainConfig(), torch.device("cpu"))
    rows = logit_chunk_rows(torch.device("cpu"), cfg.padded_vocab_size)
    x = torch.randint(0, vocab_size, (batch_size, block_size), generator=generator)
    y = torch.randint(0, vocab_size, (batch_size, block_size), generator=generator)
    extra = {}
    if documents_per_row:
        doc_ids = torch.arange(block_size) * documents_per_row // block_size  # (T,): equal spans, 0, 0, ..., 1, ...
        extra["doc_ids"] = doc_ids.expand(batch_size, block_size)
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        loss = model(x, y, reduction="sum", chunk_rows=rows, **extra)[1] / y.numel()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def sft_seconds_per_step(vocab_size: int, n_layer: int, n_head: int, n_embd: int, block_size: int,
                         rows: int) -> float:
    """A fine-tuning step: rows of the full window, each packed with conversations of about 40 tokens (the bundled
    mix's average), attending through the block-diagonal mask."""
    return seconds_per_step(vocab_size, n_layer, n_head, n_embd, block_size, rows,
                            documents_per_row=max(block_size // 40, 1))
