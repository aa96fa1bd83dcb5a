"""Batches of prepared conversations for the training loop: packed rows (the default) or one padded row each.

Packed: each row of `window` positions holds several whole conversations one after another, with `doc_ids` saying
which positions belong to which; the model attends within each conversation only and restarts positions at 0 for
each (model.document_attention), so a packed conversation is computed exactly as it would be alone in its row.
Rows are filled first-fit-decreasing over a few thousand conversations at a time, in a fresh seeded order each
epoch: with short conversations almost no position is padding (measured fills are in docs/sft.md).
Padded (`--no-pack`, the reference): one conversation per row, right-padded to the longest of its batch rounded up
to a power of two from 64 (a few shapes for torch.compile).

Either way a conversation longer than the window is cut to its first `window + 1` tokens (conversations with no
assistant token inside that are left out), the targets are -100 everywhere but the assistant's tokens, and padding
is never a target. Each micro-batch is (x, y) or, packed, (x, y, {"doc_ids": d}): train.py passes the dict on to
the model's forward.

An epoch is every training conversation of every source, times its weight (`SOURCE*3`: three copies; `*0.5`: a
seeded half, drawn afresh each epoch). Batches are pure in (seed, step) and split across ranks: rank r takes rows
r, r + world, ... of the epoch's shuffled rows, so a resumed run continues with exactly the rows it would have had.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from minigpt.common import UserError
from minigpt.data.sft_data import PreparedSplit
from minigpt.runs.parallel import lockstep

PACK_WINDOW = 4096  # conversations packed together: enough to fill rows well, few enough to keep order random


@dataclasses.dataclass
class Part:
    """The conversations of one source in one split, with its mixture weight."""

    split: PreparedSplit
    weight: float = 1.0
    name: str = ""


class ConversationSet:
    """Several sources' conversations of one split behind one global numbering, cut to a window.

    `positions[i]` is how many training positions conversation i gives (its tokens - 1, at most `window`);
    conversations whose first assistant token lies beyond the window give nothing and are never used.
    """

    def __init__(self, parts: Sequence[Part], window: int):
        self.parts, self.window = list(parts), window
        self.base = np.cumsum([0] + [len(p.split) for p in self.parts])
        lengths = np.concatenate([p.split.lengths for p in self.parts] or [np.zeros(0, np.int64)])
        first = np.concatenate([p.split.first_trained for p in self.parts] or [np.zeros(0, np.int64)])
        self.trained = np.concatenate([p.split.trained_tokens for p in self.parts] or [np.zeros(0, np.int64)])
        self.positions = np.minimum(lengths - 1, window)
        self.usable = first <= window  # a trained token inside the first window + 1 tokens
        self.truncated = lengths - 1 > window

    def __len__(self) -> int:
        return int(self.base[-1])

    def conversation(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) of global conversation i: y is -100 except where the next token is trained."""
        part = int(np.searchsorted(self.base, i, side="right")) - 1
        ids, trained = self.parts[part].split.conversation(i - int(self.base[part]), self.window + 1)
        return ids[:-1], np.where(trained[1:], ids[1:], -100)

    def epoch(self, rng: np.random.Generator, weighted: bool = True) -> np.ndarray:
        """The usable conversations of one epoch, each source's `weight` times (a fraction: a random share)."""
        ids = []
        for p, part in enumerate(self.parts):
            own = np.arange(self.base[p], self.base[p + 1])[self.usable[self.base[p]:self.base[p + 1]]]
            weight = part.weight if weighted else 1.0
            whole, share = int(weight), weight - int(weight)
            ids += [own] * whole
            if share > 0:
                ids.append(rng.choice(own, size=round(share * len(own)), replace=False))
        return rng.permutation(np.concatenate(ids)) if ids else np.zeros(0, np.int64)

    def trained_tokens(self, ids: np.ndarray) -> int:
        """Targets the conversations `ids` give within the window (their assistant tokens and <|end|>s)."""
        whole = ids[~self.truncated[ids]]
        total = int(self.trained[whole].sum())
        return total + sum(int((self.conversation(int(i))[1] != -100).sum()) for i in ids[self.truncated[ids]])

    def signature(self) -> str:
        """Identifies the data and mixture: a resumed run must find the same."""
        parts = [(p.name, len(p.split), p.weight) for p in self.parts] + [self.window]
        return hashlib.blake2b(repr(parts).encode(), digest_size=8).hexdigest()


def pack(order: np.ndarray, positions: np.ndarray, window: int) -> list[np.ndarray]:
    """Rows of conversation ids, each row's positions adding up to at most `window`.

    First-fit decreasing within consecutive groups of PACK_WINDOW conversations of `order`: the longest first, each
    into the first row with room. Row order is group by group, rows of a group in the order they were opened.
    """
    rows: list[np.ndarray] = []
    for start in range(0, len(order), PACK_WINDOW):
        group = order[start:start + PACK_WINDOW]
        sizes = positions[group]
        by_size = np.argsort(-sizes, kind="stable")
        room = np.empty(len(group), dtype=np.int64)  # room left in each open row
        members: list[list[int]] = []
        for k in by_size:
            size = sizes[k]
            fits = np.flatnonzero(room[:len(members)] >= size)
            if len(fits):
                room[fits[0]] -= size
                members[fits[0]].append(int(group[k]))
            else:
                room[len(members)] = window - size
                members.append([int(group[k])])
        rows += [np.asarray(m, dtype=np.int64) for m in members]
    return rows


def plan_epoch(convs: ConversationSet, seed: int, epoch: int, packed: bool) -> list[np.ndarray]:
    """The rows of one training epoch (conversation ids per row) in training order, pure in (seed, epoch)."""
    rng = np.random.default_rng([seed, epoch])
    order = convs.epoch(rng)
    if not packed:
        return [order[i:i + 1] for i in range(len(order))]
    rows = pack(order, convs.positions, convs.window)
    return [rows[i] for i in rng.permutation(len(rows))]


def assemble(convs: ConversationSet, rows: Sequence[np.ndarray], pad_id: int, packed: bool
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int]:
    """x, y (B, width) and doc_ids (packed only) for some rows, and how many positions are real (not padding).

    Packed rows are `window` wide; padded rows as wide as the longest conversation among them, rounded up to
    one of a few widths (`padded_width`).
    """
    pieces = [[convs.conversation(int(i)) for i in row] for row in rows]
    width = convs.window if packed else padded_width(max(sum(len(x) for x, _ in p) for p in pieces), convs.window)
    x = np.full((len(rows), width), pad_id, dtype=np.int64)
    y = np.full((len(rows), width), -100, dtype=np.int64)
    doc = np.zeros((len(rows), width), dtype=np.int64) if packed else None
    real = 0
    for r, row in enumerate(pieces):
        at = 0
        for d, (xi, yi) in enumerate(row):
            x[r, at:at + len(xi)], y[r, at:at + len(yi)] = xi, yi
            if doc is not None:
                doc[r, at:at + len(xi)] = d
            at += len(xi)
        if doc is not None:
            doc[r, at:] = len(row)  # the padding is a document of its own: nothing real attends to it
        real += at
    return x, y, doc, real


def padded_width(longest: int, window: int) -> int:
    """The width a padded batch takes: 64, 128, 256, ... up to the window. A batch as wide as its longest
    conversation took a new width almost every step, and torch.compile compiles a graph per width (or one with
    dynamic shapes, slower); these are at most log2(window / 64) + 1 widths, for at most 2x the padding."""
    width = 64
    while width < longest:
        width *= 2
    return min(width, window)


def to_batch(x: np.ndarray, y: np.ndarray, doc: np.ndarray | None, device: torch.device) -> tuple:
    pin = device.type == "cuda"
    move = lambda a: (torch.from_numpy(a).pin_memory() if pin else torch.from_numpy(a)).to(device, non_blocking=pin)
    return (move(x), move(y)) if doc is None else (move(x), move(y), {"doc_ids": move(doc)})


class ConversationBatches:
    """Micro-batches for train.py: `batch(step)` is (x, y) or (x, y, {"doc_ids": ...}), pure in (seed, step)."""

    def __init__(self, convs: ConversationSet, batch_size: int, pad_id: int, seed: int = 0, rank: int = 0,
                 world: int = 1, device: torch.device | str = "cpu", packed: bool = True):
        self.convs, self.batch_size, self.pad_id, self.seed = convs, batch_size, pad_id, seed
        self.rank, self.world, self.device, self.packed = rank, world, torch.device(device), packed
        self.step = 0
        self._epoch_rows: list[int] = []  # rows in each epoch planned so far
        self._plans: dict[int, list[np.ndarray]] = {}
        self._real = self._computed = 0
        if self.rows_in_epoch(0) < batch_size * world:
            raise UserError(f"{self.rows_in_epoch(0)} training rows are fewer than one global batch "
                            f"({batch_size} x {world}): lower --batch-size or add conversations")

    def plan(self, epoch: int) -> list[np.ndarray]:
        """The rows of one epoch (conversation ids per row), in training order."""
        if epoch not in self._plans:
            self._plans = {e: p for e, p in self._plans.items() if e >= epoch - 1}  # keep memory bounded
            self._plans[epoch] = plan_epoch(self.convs, self.seed, epoch, self.packed)
        return self._plans[epoch]

    def rows_in_epoch(self, epoch: int) -> int:
        while len(self._epoch_rows) <= epoch:
            self._epoch_rows.append(len(self.plan(len(self._epoch_rows))))
        return self._epoch_rows[epoch]

    def _locate(self, place: int) -> tuple[int, int]:
        epoch = 0
        while place >= self.rows_in_epoch(epoch):
            place -= self.rows_in_epoch(epoch)
            epoch += 1
        return epoch, place

    def batch(self, step: int) -> tuple:
        places = self.rank + (step * self.batch_size + np.arange(self.batch_size)) * self.world
        rows = []
        for place in places:
            epoch, row = self._locate(int(place))
            rows.append(self.plan(epoch)[row])
        x, y, doc, real = assemble(self.convs, rows, self.pad_id, self.packed)
        self._real += real
        self._computed += x.size
        return to_batch(x, y, doc, self.device)

    def metrics(self) -> dict[str, float]:
        """`fill`: real tokens / computed positions over the batches made since the last call."""
        fill = self._real / max(self._computed, 1)
        self._real = self._computed = 0
        return {"fill": fill}

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "seed": self.seed, "data": self.convs.signature(), "packed": self.packed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state.get("data"), state.get("seed"), state.get("packed", self.packed)) != \
                (self.convs.signature(), self.seed, self.packed):
            raise UserError("cannot resume fine-tuning: the conversations, their weights, --pack or the seed changed")
        self.step = int(state["step"])


def evaluation_rows(convs: ConversationSet, seed: int, packed: bool, limit: int = 0) -> list[np.ndarray]:
    """The held-out rows scored at each evaluation: every held-out conversation once, in a fixed seeded order
    (packed like training), the first `limit` rows when limit > 0, so every evaluation scores the same."""
    rng = np.random.default_rng([seed, 2**31])
    order = convs.epoch(rng, weighted=False)
    rows = pack(order, convs.positions, convs.window) if packed else [order[i:i + 1] for i in range(len(order))]
    return rows[:limit] if limit else rows


@torch.no_grad()
def held_out_loss(model: torch.nn.Module, convs: ConversationSet, rows: Sequence[np.ndarray], pad_id: int,
                  batch_size: int, packed: bool, chunk_rows: int = 0, rank: int = 0, world: int = 1) -> float:
    """Mean loss per assistant token over `rows` (this rank scores rows rank, rank + world, ...; the sums are added
    across ranks). Sums stay on the device until the end: one host synchronisation per evaluation."""
    device = next(model.parameters()).device
    total = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, counted targets
    mine = list(rows[rank::world])
    batches = (to_batch(*assemble(convs, mine[i:i + batch_size], pad_id, packed)[:3], device)
               for i in range(0, len(mine), batch_size))
    empty = lambda: (torch.zeros(1, 1, dtype=torch.long, device=device),  # noqa: E731 (see lockstep)
                     torch.full((1, 1), -100, device=device))
    for batch in lockstep(batches, model, empty):
        extra = batch[2] if len(batch) == 3 else {}
        _, loss = model(batch[0], batch[1], reduction="sum", chunk_rows=chunk_rows, **extra)
        total[0] += loss.double()
        total[1] += (batch[1] != -100).sum()
    if world > 1:
        torch.distributed.all_reduce(total)
    loss_sum, count = total.tolist()
    return loss_sum / max(count, 1.0)
