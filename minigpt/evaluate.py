"""Evaluation: how well a model predicts text.

Language modelling: mean cross-entropy (nats per token), perplexity e^loss, and bits per byte
    bpb = loss x tokens / (bytes x ln 2)
which does not depend on the tokenizer, so runs with different vocabularies compare.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from minigpt.checkpoint import unwrap


@torch.no_grad()
def language_model_metrics(model: torch.nn.Module, loader, max_batches: int = 0) -> dict[str, float]:
    """Loss, perplexity and bits per byte over a sequential loader (`max_batches` 0: the whole split).

    Under torchrun each rank scores its own windows; the sums are added across ranks at the end.
    """
    model = unwrap(model)
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=loader.device)
    tokens = torch.zeros((), dtype=torch.float64, device=loader.device)
    for i, (x, y) in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        _, loss = model(x, y, reduction="sum")
        loss_sum += loss.double()
        tokens += (y != -100).sum()
    loader.step = 0
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(loss_sum)
        dist.all_reduce(tokens)
    model.train(was_training)
    n = max(tokens.item(), 1.0)
    loss = loss_sum.item() / n
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "bpb": bits_per_byte(loss, n, n * loader.bytes_per_token),
            "tokens": n}


def bits_per_byte(loss: float, tokens: float, text_bytes: float) -> float:
    """Mean loss in nats per token -> bits per byte of the text those tokens encode."""
    return loss * tokens / (text_bytes * math.log(2))
