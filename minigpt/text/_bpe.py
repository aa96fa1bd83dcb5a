"""The byte-pair-encoding engine behind minigpt.text.tokenizer: chunk counting, the merge loop, a reference encoder.

Training works on the unique pre-split chunks of the input and their frequencies, never on the corpus itself:

1. `count_chunks` streams documents, splits each with the pre-split regular expression and counts the chunks
   (in worker processes when the input is large), so memory grows with the number of distinct chunks only.
2. `merge_loop` keeps, for every adjacent pair of token ids, its count (weighted by chunk frequency) and the set
   of chunks it occurs in. Each step takes the most frequent pair from a heap, rewrites only the chunks that hold
   it, and adjusts the counts of the pairs next to each rewritten spot. Nothing is ever recounted from scratch.

Ties between pairs of equal count go to the smaller pair of ids: smallest left id, then smallest right id. Ids
below 256 are the byte values and later ids are numbered in merge order, so the rule is deterministic and needs
no knowledge of how a hash table iterates.

`merge_loop` runs compiled C (minigpt/text/_bpe_c.c) when the extension was built and pure Python otherwise; both
give the same merges (tests/test_tokenizer.py checks it). `reference_encode_chunk` is the slow, readable
rank-based encoder of one chunk: the vocabulary dump uses it, and reference.encode, which the tests hold tiktoken
to, is built on it.
"""

from __future__ import annotations

import heapq
import multiprocessing
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from itertools import pairwise

import regex

try:  # the optional compiled merge loop; see setup.py
    from minigpt.text import _bpe_c
except ImportError:  # not built (no compiler at install time): the pure-Python loop below does the same work
    _bpe_c = None

BATCH_CHARS = 1 << 20  # text per worker task: big enough to amortise pickling, small enough to stream
Merge = tuple[int, int, int]  # (left id, right id, id of the merged token)


def clean_text(text: str) -> str:
    """Text as tiktoken encodes it: lone surrogates (not valid in UTF-8) become U+FFFD.

    A high and a low surrogate written as two code points are joined into the character they spell, exactly as
    tiktoken's `encode` does, so training, the reference encoder and the fast encoder all see the same text.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


# ----------------------------------------------------------------------------------------------------------------
# Counting pre-split chunks


_compiled: dict[str, regex.Pattern] = {}


def _regex(pattern: str) -> regex.Pattern:
    if pattern not in _compiled:
        _compiled[pattern] = regex.compile(pattern)
    return _compiled[pattern]


def _count_batch(pattern: str, docs: list[str]) -> Counter[str]:
    findall = _regex(pattern).findall
    counts: Counter[str] = Counter()
    for doc in docs:
        counts.update(findall(doc))
    return counts


def _fork_pool(workers: int):
    """A process pool sharing our already-imported modules (fork), or None where forking is not the safe default."""
    if workers < 2 or not sys.platform.startswith("linux"):
        return None
    return multiprocessing.get_context("fork").Pool(workers)


def count_chunks(texts: Iterable[str], pattern: str, workers: int = 2,
                 on_bytes: Callable[[int], None] | None = None) -> tuple[Counter[str], int, int]:
    """Count the pre-split chunks of a stream of documents: (chunk -> count, documents, UTF-8 bytes).

    Documents are gathered into batches of about a million characters. A lone batch is counted here; once a
    second one arrives, batches go to `workers` forked processes (at most two per worker in flight), so small
    inputs pay nothing for a pool and memory stays bounded by the distinct chunks, not the corpus.
    """
    counts: Counter[str] = Counter()
    n_docs = n_bytes = 0
    pool, pool_tried, pending, held = None, False, [], []
    batch: list[str] = []
    batch_chars = 0

    def submit(docs: list[str]) -> None:
        nonlocal pool, pool_tried
        held.append(docs)
        if not pool_tried and workers >= 2:
            if len(held) == 1:
                return  # wait for a second batch before paying for a pool
            pool_tried = True
            pool = _fork_pool(workers)
        while held:
            docs = held.pop(0)
            if pool is None:
                counts.update(_count_batch(pattern, docs))
            else:
                pending.append(pool.apply_async(_count_batch, (pattern, docs)))
        while len(pending) > 2 * workers:
            counts.update(pending.pop(0).get())

    try:
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"training input must be strings, not {type(text).__name__}")
            text = clean_text(text)
            size = len(text.encode("utf-8"))
            n_docs += 1
            n_bytes += size
            if on_bytes is not None:
                on_bytes(size)
            batch.append(text)
            batch_chars += len(text)
            if batch_chars >= BATCH_CHARS:
                submit(batch)
                batch, batch_chars = [], 0
        if batch:
            submit(batch)
        for docs in held:
            counts.update(_count_batch(pattern, docs))
        for result in pending:
            counts.update(result.get())
    finally:
        if pool is not None:
            pool.terminate()
    return counts, n_docs, n_bytes


# ----------------------------------------------------------------------------------------------------------------
# The merge loop


def merge_loop(words: list[bytes], freqs: list[int], n_merges: int,
               on_merge: Callable[[int], None] | None = None, compiled: bool | None = None) -> list[Merge]:
    """Merges learnt from the chunks `words` (UTF-8 bytes) occurring `freqs` times each, until `n_merges` new tokens.

    Returns (left, right, new) id triples in merge order. `new` is normally the next free id; when the merged
    bytes already form a token (two merge paths to one string) it is that token's id and no id is spent, so the
    vocabulary never holds duplicates. Stops early when no pair occurs any more. `on_merge(k)` is told how many
    new tokens were made since its last call. `compiled=None` picks C when built, True insists on it, False
    forbids it.
    """
    if compiled is None:
        compiled = _bpe_c is not None
    if compiled:
        if _bpe_c is None:
            raise RuntimeError("the compiled BPE extension minigpt._bpe_c is not built")
        return _bpe_c.merge_loop(list(words), list(freqs), int(n_merges), on_merge)
    return _merge_loop_py(words, freqs, n_merges, on_merge)


def _merge_loop_py(words_in: list[bytes], freqs: list[int], n_merges: int,  # noqa: C901 (docs/code.md)
                   on_merge: Callable[[int], None] | None) -> list[Merge]:
    words = [list(w) for w in words_in]
    token_bytes = [bytes([i]) for i in range(256)]
    id_of = {b: i for i, b in enumerate(token_bytes)}
    counts: dict[tuple[int, int], int] = {}
    where: dict[tuple[int, int], set[int]] = {}
    for wi, w in enumerate(words):
        f = freqs[wi]
        for pair in pairwise(w):
            counts[pair] = counts.get(pair, 0) + f
            if pair in where:
                where[pair].add(wi)
            else:
                where[pair] = {wi}
    # A max-heap through negated counts; ties pop the smaller (left, right) pair first. Entries go stale when a
    # count changes: a popped entry whose count no longer matches is pushed again with the true count if that is
    # lower, or dropped if higher (a fresher entry was pushed when the count rose).
    heap = [(-c, pair) for pair, c in counts.items()]
    heapq.heapify(heap)
    merges: list[Merge] = []
    while len(token_bytes) - 256 < n_merges and heap:
        neg, pair = heapq.heappop(heap)
        count = counts.get(pair, 0)
        if count != -neg:
            if 0 < count < -neg:
                heapq.heappush(heap, (-count, pair))
            continue
        a, b = pair
        merged = token_bytes[a] + token_bytes[b]
        new = id_of.get(merged)
        if new is None:
            new = id_of[merged] = len(token_bytes)
            token_bytes.append(merged)
            if on_merge is not None:
                on_merge(1)
        merges.append((a, b, new))
        delta: dict[tuple[int, int], int] = {}
        for wi in where.pop(pair):
            w = words[wi]
            n = len(w)
            sites = [i for i in range(n - 1) if w[i] == a and w[i + 1] == b]
            if not sites:
                continue  # a stale entry: this word lost the pair to an earlier merge
            f = freqs[wi]
            if len(sites) > 1:
                _rewrite(words, wi, sites, new, f, delta, where)
                continue
            # The common case, one merge site s: (x, a) b (y) becomes (x, ab) (y).
            s = sites[0]
            if s:
                x = w[s - 1]
                q = (x, a)
                delta[q] = delta.get(q, 0) - f
                q = (x, new)
                delta[q] = delta.get(q, 0) + f
                if q in where:
                    where[q].add(wi)
                else:
                    where[q] = {wi}
            if s + 2 < n:
                y = w[s + 2]
                q = (b, y)
                delta[q] = delta.get(q, 0) - f
                q = (new, y)
                delta[q] = delta.get(q, 0) + f
                if q in where:
                    where[q].add(wi)
                else:
                    where[q] = {wi}
            w[s:s + 2] = [new]
        counts.pop(pair)  # every occurrence was merged
        delta.pop(pair, None)
        for q, d in delta.items():
            if d:
                c = counts.get(q, 0) + d
                if c:
                    counts[q] = c
                else:
                    del counts[q]
                if d > 0:
                    heapq.heappush(heap, (-c, q))
    return merges


def _rewrite(words: list[list[int]], wi: int, sites: list[int], new: int, f: int,
             delta: dict[tuple[int, int], int], where: dict[tuple[int, int], set[int]]) -> None:
    """Merge the pair at `sites` (candidate positions, left to right) in word `wi`; note count changes in `delta`.

    Only pairs touching a merge site change: old pairs starting one before, at, or one after a site, and new
    pairs on either side of a merged token. All other pairs map one to one onto the rewritten word. With equal
    halves ("aaa"), candidates overlap and the leftmost wins, as a left-to-right scan would do.
    """
    w = words[wi]
    n = len(w)
    kept: list[int] = []
    for s in sites:
        if not kept or s > kept[-1] + 1:
            kept.append(s)
    out: list[int] = []
    prev = 0
    for s in kept:
        out += w[prev:s]
        out.append(new)
        prev = s + 2
    out += w[prev:]
    old_js = set()
    for s in kept:
        old_js.update((s - 1, s, s + 1))
    for j in old_js:
        if 0 <= j < n - 1:
            q = (w[j], w[j + 1])
            delta[q] = delta.get(q, 0) - f
    m = len(out)
    new_ks = set()
    for k, s in enumerate(kept):
        pos = s - k  # each earlier merge shortened the word by one
        new_ks.update((pos - 1, pos))
    for k in new_ks:
        if 0 <= k < m - 1:
            q = (out[k], out[k + 1])
            delta[q] = delta.get(q, 0) + f
            if q in where:
                where[q].add(wi)
            else:
                where[q] = {wi}
    words[wi] = out


# ----------------------------------------------------------------------------------------------------------------
# Reference encoder


def reference_encode_chunk(chunk: bytes, ranks: Mapping[bytes, int], max_rank: int | None = None) -> list[int]:
    """Encode one pre-split chunk by ranks, slowly and plainly (tiktoken's algorithm, written out).

    A chunk that is itself a token is that token. Otherwise start from single bytes and repeatedly merge the
    adjacent pair whose concatenation has the lowest rank, until no adjacent concatenation is a token (or, with
    `max_rank`, none ranks below it: that is how the vocabulary dump recovers which two tokens formed a token).
    """
    if max_rank is None and chunk in ranks:
        return [ranks[chunk]]
    parts = [chunk[i:i + 1] for i in range(len(chunk))]
    while len(parts) > 1:
        best, best_rank = -1, None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and (max_rank is None or rank < max_rank) and (best_rank is None or rank < best_rank):
                best, best_rank = i, rank
        if best < 0:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    return [ranks[p] for p in parts]
