"""The KV cache: keys and values of past tokens kept between forward passes, so that decoding a token costs one
token's work rather than the whole prefix's.

`KVCache` holds the storage, one row per sequence, each row at its own length; `CacheStep` is one forward pass's
view of it (where the new tokens go, what each may attend to), built once and shared by every layer. GPT (gpt.py)
takes a cache in `hidden_states` and `forward`; the generation engine (chat/engine.py) and the scorer
(eval/scoring.py) own one and decide which rows take part in each pass.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F


class CacheShape(Protocol):
    """What a cache is sized from: a ModelConfig (gpt.py, which imports this module)."""

    n_layer: int
    n_head: int
    block_size: int

    @property
    def head_dim(self) -> int: ...


ALL = slice(None)  # every row of a cache


class KVCache:
    """Keys and values of past tokens, one row per sequence, each row at its own length.

    Storage is preallocated for the whole context window: k, v are (n_layer, rows, n_head, max_len, head_dim).
    A forward pass with a cache appends its new tokens to each row it touches (a slice of rows) at that row's
    current length, so sequences of different lengths decode together without padding. The generation engine
    (chat/engine.py) owns the cache and decides which rows take part in each step.
    """

    def __init__(self, config: CacheShape, rows: int, max_len: int | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        max_len = max_len or config.block_size
        shape = (config.n_layer, rows, config.n_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = torch.zeros(rows, dtype=torch.long, device=device)  # tokens held per row
        # the same on the host: a decoding step sizes its work from them without waiting for the GPU (change the
        # lengths through the methods below and forward passes only, which keep both)
        self.host_lengths = [0] * rows
        self.max_len = max_len

    @property
    def rows(self) -> int:
        return self.k.shape[1]

    def reset(self, rows: slice = ALL) -> None:
        """Forget the tokens of some rows (all by default); their storage is reused."""
        self.lengths[rows] = 0
        self.host_lengths[rows] = [0] * len(range(self.rows)[rows])

    def move_row(self, src: int, dst: int) -> None:
        """Copy row `src` (keys, values, length) into row `dst`: keeps live rows packed at the front."""
        n = self.host_lengths[src]
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.lengths[dst] = n
        self.host_lengths[dst] = n

    def set_lengths(self, lengths: torch.Tensor) -> None:
        """Every row's length at once, (rows,) (keys and values copied in from elsewhere)."""
        self.lengths.copy_(lengths)
        self.host_lengths = [int(n) for n in lengths.tolist()]


class CacheStep:
    """One forward pass's view of a KV cache: where the new tokens go and what each may attend to.

    Built once per forward pass and shared by every layer, so the index and mask arithmetic is not repeated.
    `lengths` (B,) marks how many of the T new tokens of each row are real when rows are right-padded; padding
    is neither stored nor attended to. Sizes come from the cache's host copy of its lengths (and from `lengths`,
    best given on the host): a decoding step never waits for the GPU to learn how long its rows are.
    """

    def __init__(self, cache: KVCache, rows: slice, T: int, lengths: torch.Tensor | None, limit: int):
        device = cache.lengths.device
        self.cache, self.rows = cache, rows
        start = cache.lengths[rows]  # (B,)
        start_host = cache.host_lengths[rows]
        B = start.shape[0]
        steps = torch.arange(T, device=device)[None, :]  # (1, T)
        self.positions = start[:, None] + steps  # (B, T): absolute position of each new token in its row
        if lengths is None:
            self.end, self.end_host = start + T, [n + T for n in start_host]
        else:
            self.end_host = [n + int(m) for n, m in zip(start_host, lengths.tolist(), strict=True)]
            lengths = lengths.to(device, non_blocking=True)
            self.end = start + lengths
        if max(self.end_host) > limit:
            raise ValueError("the KV cache is full: the sequence reached the context window")
        self.keep = None if lengths is None else (steps < lengths[:, None]).reshape(-1)  # (B*T,) real tokens
        # Where each new token's keys go, as row indices into a layer's cache viewed (rows * H * max_len, D): the
        # (row, head, position) of every new token and head. One index_copy_ per layer then stores them all.
        _, H, max_len, _ = cache.k.shape[1:]
        first_row = rows.start or 0
        assert rows.step in (None, 1) and first_row >= 0, "cache rows are a contiguous slice"
        heads = torch.arange(H, device=device)[None, None, :]  # (1, 1, H)
        flat = ((first_row + torch.arange(B, device=device)[:, None, None]) * H + heads) * max_len \
            + self.positions[:, :, None]  # (B, T, H)
        flat = flat.reshape(B * T, H)
        self.write_index = (flat if self.keep is None else flat[self.keep]).reshape(-1)
        self.span = min(max(start_host) + T, cache.max_len)  # the longest row's prefix, no further
        # Rows that start empty (a prefill) attend causally among their new tokens alone: right padding comes after
        # every real token, so no mask is needed. One row decoding one token sees its whole prefix: no mask either.
        self.fresh = max(start_host) == 0
        self.mask = None
        if not self.fresh and (B > 1 or T > 1):
            key_pos = torch.arange(self.span, device=device)
            causal = (key_pos[None, None, :] <= self.positions[:, :, None])[:, None]  # (B, 1, T, span)
            # An additive mask (0 or -inf) is a little faster in scaled_dot_product_attention than a boolean one.
            self.mask = torch.zeros(causal.shape, dtype=cache.k.dtype, device=device).masked_fill_(~causal,
                                                                                                float("-inf"))

    def commit(self) -> None:
        """After the last layer: each row now holds its new tokens."""
        self.cache.lengths[self.rows] = self.end
        self.cache.host_lengths[self.rows] = self.end_host

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store this layer's new keys and values, then attend over each row's whole prefix. q, k, v: (B, H, T, D)."""
        B, H, T, D = k.shape
        k_layer, v_layer = self.cache.k[layer], self.cache.v[layer]  # (rows, H, max_len, D)
        for store, new in ((k_layer, k), (v_layer, v)):
            new = new.transpose(1, 2).reshape(B * T * H, D)  # (B, H, T, D) -> one row per (token, head)
            if self.keep is not None:
                new = new.view(B * T, H * D)[self.keep].view(-1, D)
            store.view(-1, D).index_copy_(0, self.write_index, new.to(store.dtype))
        if self.fresh:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        keys = k_layer[self.rows, :, : self.span].to(q.dtype)  # (B, H, span, D)
        values = v_layer[self.rows, :, : self.span].to(q.dtype)
        # (the mask follows q's dtype: under autocast q may be bf16 while the cache and mask are float32)
        mask = None if self.mask is None else self.mask.to(q.dtype)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
