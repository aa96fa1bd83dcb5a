"""GPT-2, exactly: the model of Radford et al. (2019), as a readable PyTorch module.

    tokens (B, T) -> wte + wpe -> N x [x + attn(ln_1(x)); x + mlp(ln_2(x))] -> ln_f -> tied head -> logits (B, T, V)

Parameter names follow OpenAI's checkpoint (wte, wpe, h.N.attn.c_attn, ln_f, ...), so converting to and from
Hugging Face `GPT2LMHeadModel` is a name table plus a transpose (interop/hf.py). Differences from that checkpoint are
only in storage: our linear layers are `nn.Linear` (weights stored (out, in); OpenAI's Conv1D stores (in, out)),
and the token embedding has extra rows up to a multiple of 64 so the head's matmul is fast; logits for those rows
are sliced off, so the padding is never predicted, sampled or trained.

Run `minigpt model --preset gpt2` (shape.py) for the parameter count and FLOPs of a shape. The KV cache that
decoding passes in is cache.py's. Speed-ups for CPU inference are applied from outside (cpu_inference.py),
inspection through hooks (eval/inspect.py).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from minigpt.common.config import opt
from minigpt.model.cache import ALL, CacheStep, KVCache


@dataclasses.dataclass
class ModelConfig:
    """The shape of a GPT-2 model. Start from a preset (`from_preset`) or give every field."""

    preset: str = opt("", "preset this shape started from (tiny, mini, gpt2, gpt2-medium, gpt2-large, gpt2-xl); "
                          "fields given explicitly override it")
    n_layer: int = opt(4, "transformer blocks")
    n_head: int = opt(4, "attention heads per block")
    n_embd: int = opt(128, "residual stream width")
    block_size: int = opt(256, "context window in tokens")
    vocab_size: int = opt(8192, "tokens in the vocabulary (set from the tokenizer when training)")
    bias: bool = opt(True, "biases in linear layers and LayerNorms (GPT-2 has them)")
    dropout: float = opt(0.0, "dropout on embeddings, attention weights and residual branches while training")
    layer_norm_eps: float = opt(1e-5, "LayerNorm epsilon (GPT-2: 1e-5)")
    pad_vocab_multiple: int = opt(64, "round the embedding rows up to a multiple of this (1 = no padding)")
    gradient_checkpointing: bool = opt(False, "recompute each block in the backward pass to save activation memory")

    def __post_init__(self) -> None:
        if self.preset and self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r} (known: {', '.join(PRESETS)})")
        for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "pad_vocab_multiple"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), not {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_multiple
        return (self.vocab_size + m - 1) // m * m

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        return cls(**cls.expand_dict({"preset": name, **overrides}))

    @classmethod
    def expand_dict(cls, data: dict[str, Any]) -> dict[str, Any]:
        """Settings that name a preset start from it; the other settings given override it. (An unknown name is
        refused by __post_init__, which config.from_dict turns into a one-line UserError.)"""
        return {**PRESETS.get(data.get("preset") or "", {}), **data}


# Published GPT-2 shapes (vocabulary 50257, context 1024), and two small ones for CPUs.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=256, vocab_size=8192),
    "mini": dict(n_layer=6, n_head=6, n_embd=384, block_size=512, vocab_size=8192),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024, vocab_size=50257),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280, block_size=1024, vocab_size=50257),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, block_size=1024, vocab_size=50257),
}


# ----------------------------------------------------------------------------------------------------------------
# The model


def _dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    # A plain call rather than nn.Dropout modules: when off, decoding skips three module calls per block.
    return F.dropout(x, p, training) if p and training else x


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, layer: int = 0, step: CacheStep | None = None,
                mask: torch.Tensor | Any | None = None) -> torch.Tensor:
        """`mask` replaces the plain causal mask (packed rows, see `document_attention`): a FlexAttention BlockMask,
        or a boolean (B, 1, T, T), True where a query may attend to a key."""
        B, T, C = x.shape
        # (B, T, 3C) -> (3, B, n_head, T, head_dim): q, k, v side by side, each split into heads
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4).unbind(0)
        if mask is not None and not isinstance(mask, torch.Tensor):
            y = flex_attention(q, k, v, mask)
        elif step is None:
            dropout = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None)
        else:
            y = step.attend(layer, q, k, v)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads side by side
        return _dropout(self.c_proj(y), self.dropout, self.training)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.c_fc(x), approximate="tanh")  # (B, T, 4C)
        return _dropout(self.c_proj(h), self.dropout, self.training)


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, layer: int = 0, step: CacheStep | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), layer, step, mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.padded_vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied: the head reads tokens out the way wte writes them in
        self.reset_parameters()

    # -- initialisation ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2's initialisation: N(0, 0.02) everywhere, residual output projections scaled by 1/sqrt(2 L)."""
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = 0.02 / math.sqrt(2 * self.config.n_layer) if name.endswith("c_proj") else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        self.wte.weight[self.config.vocab_size:] = 0.0  # padding rows: never read, never written

    # -- forward -----------------------------------------------------------------------------------------------

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None, rows: slice = ALL,
                      lengths: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The final residual stream after ln_f, (B, T, n_embd).

        With a cache, `idx` holds new tokens for the cache rows `rows` (a slice; all rows by default), placed after
        what each row already holds. `lengths` (B,) says how many of the T tokens of each row are real when rows
        are right-padded to a common T; each row's length advances by its real count.
        `doc_ids` (B, T) packs several documents into each row (no cache): see `document_attention`.
        """
        B, T = idx.shape
        step = mask = None
        if cache is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence of {T} tokens is longer than the context window "
                                 f"({self.config.block_size})")
            if doc_ids is None:
                positions = torch.arange(T, device=idx.device)[None, :]  # (1, T)
            elif idx.device.type in FLEX_DEVICES and not (self.config.dropout and self.training):
                positions, mask = document_positions(doc_ids), document_block_mask(doc_ids)
            else:
                positions, mask = document_attention(doc_ids)
        elif doc_ids is not None:
            raise ValueError("doc_ids cannot be combined with a KV cache")
        else:
            step = CacheStep(cache, rows, T, lengths, min(cache.max_len, self.config.block_size))
            positions = step.positions
        # Padding may run past the window: its positions are clamped for the lookup and its outputs unused.
        x = self.wte(idx) + self.wpe(positions.clamp(max=self.config.block_size - 1))  # (B, T, C)
        x = _dropout(x, self.config.dropout, self.training)
        for layer, block in enumerate(self.h):
            if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, layer, None, mask, use_reentrant=False)
            else:
                x = block(x, layer, step, mask)
        if step is not None:
            step.commit()
        return self.ln_f(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Project hidden states onto the real vocabulary: (..., n_embd) -> (..., vocab_size)."""
        return self.lm_head(hidden)[..., : self.config.vocab_size]

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None,
                rows: slice = ALL, reduction: str = "mean", chunk_rows: int = 0, doc_ids: torch.Tensor | None = None
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Logits (B, T, vocab_size) and, with targets (B, T), the next-token cross-entropy.

        Targets equal to -100 are ignored (padding, masked prompt tokens). `reduction` is "mean" over the
        counted targets or "sum". With `chunk_rows` > 0 (and targets) the head and the loss are computed that many
        positions at a time and no logits are returned (None): the (B, T, vocab) logits are never held in memory.
        `doc_ids` (B, T): several documents packed into each row, each seeing only itself (`document_attention`).
        """
        hidden = self.hidden_states(idx, cache, rows, doc_ids=doc_ids)
        if targets is not None and chunk_rows > 0:
            h, t = hidden.reshape(-1, hidden.size(-1)), targets.reshape(-1)
            loss = chunked_cross_entropy(h, self.lm_head.weight, t, self.config.vocab_size, chunk_rows)
            return None, loss if reduction == "sum" else loss / (t != -100).sum().clamp(min=1)
        logits = self.logits(hidden)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                                   ignore_index=-100, reduction=reduction)
        return logits, loss

    # -- accounting --------------------------------------------------------------------------------------------

    def num_params(self, embeddings: bool = True) -> int:
        """Parameters as GPT-2 counts them: the tied head once, the vocabulary padding not at all.

        With embeddings=False, token and position embeddings are left out (the "non-embedding" count).
        """
        total = sum(p.numel() for p in self.parameters())  # parameters() yields the tied weight once
        padding = (self.config.padded_vocab_size - self.config.vocab_size) * self.config.n_embd
        total -= padding
        if not embeddings:
            total -= self.config.vocab_size * self.config.n_embd + self.wpe.weight.numel()
        return total

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward): 6N + 12 L C T, as in the PaLM paper's appendix B.

        N counts every weight used in a matmul, the head included (so the token embedding counts, the position
        embedding does not); the second term is attention's QK^T and AV over a context of T tokens.
        """
        cfg = self.config
        T = seq_len or cfg.block_size
        n = self.num_params() - self.wpe.weight.numel()
        return 6 * n + 12 * cfg.n_layer * cfg.n_embd * T


# ----------------------------------------------------------------------------------------------------------------
# Packed rows: several documents in one row, each attending only to itself


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """doc_ids (B, T), each document a contiguous run of one id -> positions (B, T), restarting at 0 where each
    document starts (so a packed document gets the position embeddings it would get alone)."""
    index = torch.arange(doc_ids.shape[1], device=doc_ids.device)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.where(starts, index, 0).cummax(dim=1).values  # (B, T): where each position's document starts
    return index - first


def document_attention(doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions and a dense attention mask for rows that pack several documents: the reference path.

    doc_ids (B, T) -> positions (B, T) and a boolean mask (B, 1, T, T), True where query i may attend to key j:
    j <= i in the same document. The mask is block-diagonal causal, so packing never lets one document see
    another, and each document's outputs equal those of the document alone in its own row. Scaled dot-product
    attention with a dense mask computes every masked block and cannot use flash attention; where FlexAttention
    trains (CUDA), `document_block_mask` replaces it.
    """
    T = doc_ids.shape[1]
    index = torch.arange(T, device=doc_ids.device)
    same = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T)
    causal = index[:, None] >= index[None, :]  # (T, T)
    return document_positions(doc_ids), (same & causal)[:, None]


# Devices where packed rows attend through FlexAttention. torch 2.13 has no FlexAttention backward pass on CPUs,
# which keep the dense mask (tests/test_gpu_paths.py holds the two paths equal on the CPU, forward and backward).
FLEX_DEVICES = ("cuda",)


@torch.compiler.disable  # built once per forward pass, eagerly, outside any compiled graph
def document_block_mask(doc_ids: torch.Tensor) -> Any:
    """The FlexAttention BlockMask of `document_attention`'s mask: which 128 x 128 tiles of (query, key) are empty
    (skipped), full (no mask needed) or partial (the mask function decides, position by position). Per layer it
    costs a few integers per tile, where the dense mask cost B x T x T values, made into an additive mask again
    in every layer and kept for the backward pass (64 MiB per layer at 32 x 1024 in bf16)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def same_document_causal(b, h, q, k):  # noqa: ANN001, ANN202 (FlexAttention's mask_mod signature)
        return (doc_ids[b, q] == doc_ids[b, k]) & (k <= q)

    B, T = doc_ids.shape
    return create_block_mask(same_document_causal, B, None, T, T, device=doc_ids.device)


def flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: Any) -> torch.Tensor:
    """FlexAttention over q, k, v (B, H, T, D) with `block_mask`: compiled into one fused kernel on GPUs (uncompiled
    it is a slow reference implementation), eager elsewhere."""
    from torch.nn.attention.flex_attention import flex_attention as flex

    kernel = _compiled_flex() if q.device.type == "cuda" else flex
    return kernel(q, k, v, block_mask=block_mask)


@functools.cache
def _compiled_flex():  # noqa: ANN202
    from torch.nn.attention.flex_attention import flex_attention as flex

    return torch.compile(flex, dynamic=False)


# ----------------------------------------------------------------------------------------------------------------
# The loss without the logits


def logit_chunk_rows(device: torch.device, vocab_rows: int) -> int:
    """Positions per chunk when logits are made and used a chunk at a time: ~2M logits (8 MB) on a CPU, which stay
    in its cache while they are reduced, and ~64M on a GPU, which only bounds memory."""
    budget = 2**21 if device.type == "cpu" else 2**26
    return max(64, budget // vocab_rows)


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                          chunk_rows: int) -> torch.Tensor:
    """Summed cross-entropy of `hidden` (N, C) through the head `weight` (rows >= vocab_size, C) against `targets`
    (N,), -100 ignored, computed `chunk_rows` positions at a time.

    The full (N, vocab) logits are never stored: with gradients on, each chunk's gradient (softmax - one-hot) is
    folded into the gradients of `hidden` and `weight` on the spot and the chunk is freed. On this project's CPU
    that makes the head and loss 25% faster (the chunks stay in cache), and on any device it saves the memory of
    the logits and their gradient (2 x N x vocab floats). Equal to F.cross_entropy(..., reduction="sum") up to
    float rounding; tests/test_model.py checks loss and gradients.
    """
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _ChunkedCrossEntropy.apply(hidden, weight, targets, vocab_size, chunk_rows)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_rows):
        logits = (hidden[start : start + chunk_rows] @ weight[:vocab_size].t()).float()  # (chunk, V)
        total += F.cross_entropy(logits, targets[start : start + chunk_rows], ignore_index=-100, reduction="sum")
    return total


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, vocab_size, chunk_rows):  # noqa: ANN001, ANN205
        head = weight[:vocab_size]
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight)  # padding rows stay zero: never trained
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_rows):
            h, t = hidden[start : start + chunk_rows], targets[start : start + chunk_rows]
            logits = (h @ head.t()).float()  # (chunk, V)
            log_norm = torch.logsumexp(logits, dim=-1)  # (chunk,)
            counted = t != -100
            safe_t = t.clamp(min=0)
            total += ((log_norm - logits.gather(1, safe_t[:, None])[:, 0]) * counted).sum()
            grad = logits.sub_(log_norm[:, None]).exp_()  # softmax, in place of the logits
            grad[torch.arange(len(t), device=t.device), safe_t] -= 1.0
            grad.mul_(counted[:, None])  # ignored positions get no gradient
            grad = grad.to(h.dtype)
            grad_hidden[start : start + chunk_rows] = grad @ head
            grad_weight[:vocab_size].addmm_(grad.t(), h)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_output):  # noqa: ANN001, ANN205
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_output, grad_weight * grad_output, None, None, None
