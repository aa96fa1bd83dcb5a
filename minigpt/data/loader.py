"""Batches for training and evaluation, cut from memory-mapped token shards (written by `minigpt prepare`).

    loader = TokenLoader("data/shards", "train", batch_size=16, seq_len=1024, seed=0, rank=r, world_size=w,
                         vocab_size=50257)  # optional: refuse token ids the model has no embedding for
    for x, y in loader:        # (B, T) int64 each; y[:, t] is the token after x[:, t]
        ...
    state = loader.state_dict()             # {"step": n, ...}: save it with the checkpoint
    loader.load_state_dict(state)           # the next batch is the one that would have come next

A split's shards are read as one stream of N tokens. Window i is the T + 1 tokens starting at i * T, so consecutive
windows share one token and every token after the first is a target exactly once per epoch: there are
(N - 1) // T full windows.

Order:
- shuffle=True (training): epoch e visits every full window once, in the order of a permutation drawn from
  (seed, e); epochs follow each other without a gap, so the stream of windows is endless and a batch may straddle
  two epochs.
- shuffle=False (evaluation): the windows in stream order, one pass; the tokens left after the last full window
  (the final partial window) come as a last batch of shape (1, t) with t < T.

Ranks: the global order is dealt out like cards. Rank r of W takes windows r, r + W, r + 2W, ...; its step s is its
windows s * B ... s * B + B - 1 of that list, so the ranks' step-s batches together cover global windows
s * B * W ... (s + 1) * B * W - 1 (a global batch of W x B rows), disjoint and without a gap.

Everything is a pure function of (seed, step): `batch(step)` can be asked for any step, and resuming is setting
the step. The loader holds no background threads and reads only the windows it returns: shards are mapped with
random-access advice (shards.random_access_map), so a cold shard costs the pages read, not the kernel's read-ahead.

With `vocab_size`, every batch is checked (one max per batch): a token id at or beyond it is a UserError naming the
shard file, rather than an index error deep in the model's embedding.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minigpt.common import UserError
from minigpt.data.shards import open_shard, read_meta


class TokenLoader:
    """(x, y) int64 batches of shape (B, T) from one split of a shards folder; see the module docstring."""

    def __init__(self, shards_dir: str | os.PathLike, split: str, batch_size: int, seq_len: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True,
                 device: str | torch.device = "cpu", vocab_size: int | None = None) -> None:
        if batch_size < 1 or seq_len < 1:
            raise UserError(f"batch size and sequence length must be positive, not {batch_size} and {seq_len}")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside a world of {world_size}")
        meta = read_meta(shards_dir)
        if split not in meta["splits"]:
            raise UserError(f"{shards_dir} has no {split!r} split (it has: {', '.join(meta['splits'])})")
        info = meta["splits"][split]
        self.shards_dir, self.split = Path(shards_dir), split
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.device = torch.device(device)
        self.vocab_size = vocab_size
        self.meta = meta
        self._shards = [open_shard(self.shards_dir / s["file"]) for s in info["shards"]]
        for shard, entry in zip(self._shards, info["shards"], strict=True):
            if len(shard) != entry["tokens"]:
                raise UserError(f"{self.shards_dir / entry['file']} holds {len(shard):,} tokens but meta.json says "
                                f"{entry['tokens']:,}: prepare the data again")
        self._starts = np.cumsum([0] + [len(s) for s in self._shards])  # where each shard begins in the stream
        self.num_tokens = int(self._starts[-1])
        self.bytes_per_token = info["text_bytes"] / max(self.num_tokens, 1)
        self.windows_per_epoch = max(self.num_tokens - 1, 0) // seq_len
        self._partial = max(self.num_tokens - 1, 0) - self.windows_per_epoch * seq_len  # x tokens past the last full
        needed = seq_len + 1 if shuffle else 2
        if self.num_tokens < needed:
            raise UserError(f"the {split} split of {shards_dir} has {self.num_tokens:,} tokens, fewer than one window "
                            f"of {needed:,} (seq_len + 1): use a shorter sequence length or a larger corpus")
        self.step = 0
        self._perms: dict[int, np.ndarray] = {}

    # ------------------------------------------------------------------------------------------------------------
    # Which windows a step holds

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            rng = np.random.default_rng([self.seed % 2**64, epoch])
            self._perms[epoch] = rng.permutation(self.windows_per_epoch)
        return self._perms[epoch]

    def _rank_windows(self) -> int:
        """How many windows of one pass (sequential order, partial window included) fall to this rank."""
        total = self.windows_per_epoch + (1 if self._partial else 0)
        return max(0, (total - self.rank + self.world_size - 1) // self.world_size)

    def _full_rank_windows(self) -> int:
        return max(0, (self.windows_per_epoch - self.rank + self.world_size - 1) // self.world_size)

    def __len__(self) -> int:
        """Batches in one sequential pass for this rank (a shuffled loader is endless)."""
        if self.shuffle:
            raise TypeError("a shuffled TokenLoader is endless; see steps_per_epoch")
        full = self._full_rank_windows()
        return -(-full // self.batch_size) + (self._rank_windows() - full)

    @property
    def steps_per_epoch(self) -> int:
        """Whole global batches in one epoch of full windows."""
        return self.windows_per_epoch // (self.batch_size * self.world_size)

    def window_ids(self, step: int) -> np.ndarray:
        """The global window indices of this rank's batch at `step` (the final partial window is index N // T)."""
        if step < 0:
            raise IndexError(f"step {step} is negative")
        b, w = self.batch_size, self.world_size
        if self.shuffle:
            positions = self.rank + (step * b + np.arange(b)) * w  # places in the endless global order
            epochs, places = np.divmod(positions, self.windows_per_epoch)
            return np.array([self._permutation(int(e))[p] for e, p in zip(epochs, places, strict=True)], dtype=np.int64)
        if step >= len(self):
            raise IndexError(f"step {step} is past the end of a {len(self)}-batch pass")
        full = self._full_rank_windows()
        mine = np.arange(step * b, min((step + 1) * b, full))
        if mine.size == 0:  # the step after the last full batch: the partial window, alone
            mine = np.array([full])
        return self.rank + mine * w

    # ------------------------------------------------------------------------------------------------------------
    # Reading

    def _read(self, start: int, out: np.ndarray) -> None:
        """Copy tokens [start, start + len(out)) of the split's stream into `out`, across shard ends."""
        i = int(np.searchsorted(self._starts, start, side="right")) - 1
        done = 0
        while done < len(out):
            shard = self._shards[i]
            local = start + done - int(self._starts[i])
            take = min(len(out) - done, len(shard) - local)
            out[done:done + take] = shard[local:local + take]
            done += take
            i += 1

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (x, y) at `step`, each (B, T) int64, on the loader's device; pure in (seed, step)."""
        ids = self.window_ids(step)
        t = self.seq_len
        if not self.shuffle and ids[0] >= self.windows_per_epoch:  # the final partial window
            t = self._partial
        buf = np.empty((len(ids), t + 1), dtype=np.int64)  # (B, T + 1)
        for row, window in zip(buf, ids, strict=True):
            self._read(int(window) * self.seq_len, row)
        if self.vocab_size is not None and buf.size and int(buf.max()) >= self.vocab_size:
            self._out_of_vocabulary(buf, ids)
        tokens = torch.from_numpy(buf)
        x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()  # (B, T) each
        if self.device.type == "cuda":
            # Page-locked host memory lets the copy run asynchronously with the GPU's work.
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        if self.device.type != "cpu":
            return x.to(self.device), y.to(self.device)
        return x, y

    def _out_of_vocabulary(self, buf: np.ndarray, ids: np.ndarray) -> None:
        """Name the shard file and place of the first token id in `buf` beyond the vocabulary."""
        row, col = np.argwhere(buf >= self.vocab_size)[0]
        position = int(ids[row]) * self.seq_len + int(col)  # in the split's stream
        shard = int(np.searchsorted(self._starts, position, side="right")) - 1
        name = self.meta["splits"][self.split]["shards"][shard]["file"]
        raise UserError(f"{self.shards_dir / name} holds token id {int(buf[row, col])} (token "
                        f"{position - int(self._starts[shard]):,} of the file), beyond the model's vocabulary of "
                        f"{self.vocab_size}: these shards were made with another tokenizer; prepare them again")

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """From the current step on: endless when shuffled; one pass otherwise, after which the step returns to 0."""
        if self.shuffle:
            while True:
                out = self.batch(self.step)
                self.step += 1
                yield out
        while self.step < len(self):
            out = self.batch(self.step)
            self.step += 1
            yield out
        self.step = 0

    # ------------------------------------------------------------------------------------------------------------
    # Resuming

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "windows": self.step * self.batch_size * self.world_size, "split": self.split,
                "seed": self.seed, "shuffle": self.shuffle, "seq_len": self.seq_len, "batch_size": self.batch_size,
                "world_size": self.world_size, "num_tokens": self.num_tokens}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where `state` left off. A different batch size or world size is allowed when the windows
        already consumed are a whole number of the new global batches."""
        for key in ("split", "seed", "shuffle", "seq_len", "num_tokens"):
            if key in state and state[key] != getattr(self, key):
                hint = " (the shards changed)" if key == "num_tokens" else ""
                raise UserError(f"cannot resume the data loader: its {key} was {state[key]!r}, now "
                                f"{getattr(self, key)!r}{hint}")
        per_step = self.batch_size * self.world_size
        if state.get("batch_size", self.batch_size) * state.get("world_size", self.world_size) == per_step:
            self.step = int(state["step"])
        elif self.shuffle and state["windows"] % per_step == 0:
            self.step = state["windows"] // per_step
        else:
            raise UserError(f"cannot resume the data loader: {state['windows']:,} windows were consumed, not a "
                            f"whole number of global batches of {per_step} (batch size x world size)")
