"""Log-likelihood scoring: how likely a model finds each continuation of a context, the way
lm-evaluation-harness scores multiple-choice and cloze tasks, so the two agree example by example
(bench/eval_parity.py).

    pairs = [encode_pair(tokenizer, "The sky is", " blue"), encode_pair(tokenizer, "The sky is", " green")]
    scores = score_pairs(model, pairs)          # [Score(logprob=..., greedy=...), ...]

- tokens: trailing spaces of the context move to the continuation; the context and the whole text are encoded, and
  the continuation is what the whole has past the context's tokens; an empty context is the end-of-text token;
  inputs longer than the context window lose tokens on the left.
- batching: pairs that share the tokens before their first scored position (the choices of one question) form a
  group whose context runs through the model once, into a KV cache that each choice's continuation then extends;
  groups go in batches of about `batch_size` pairs, longest first, so one forward pass scores the choices of many
  examples; only the positions that predict continuation tokens go through the output head, a chunk of
  positions at a time (bench/eval_speed.py measures the gain; reference.score_pairs is the slow reference).
"""

from __future__ import annotations

import dataclasses

import torch

from minigpt.common import UserError
from minigpt.model.cache import KVCache
from minigpt.model.cpu_inference import prepacked
from minigpt.model.gpt import GPT, logit_chunk_rows
from minigpt.runs.checkpoint import unwrap


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context, continuation) -> token ids, by lm-evaluation-harness's rule (see the module docstring)."""
    if not context:
        cont = tokenizer.encode_ordinary(continuation)
        return ([tokenizer.eot_id], cont) if cont[:1] != [tokenizer.eot_id] else (cont[:1], cont[1:])
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:  # the context was only spaces: now in the continuation, which starts a document
        return encode_pair(tokenizer, "", continuation)
    context_ids = tokenizer.encode_ordinary(context)
    whole = tokenizer.encode_ordinary(context + continuation)
    return context_ids, whole[len(context_ids):]


@dataclasses.dataclass
class Score:
    logprob: float  # summed log-probability of the continuation's tokens
    greedy: bool  # each continuation token is the model's most likely next token


def scored_sequence(context: list[int], continuation: list[int], window: int) -> tuple[list[int], int]:
    """The tokens one pair is scored on (input = all but the last, left-truncated to the window) and how many of
    the last are scored: the whole continuation, or its last `window` tokens if it is longer than the window."""
    if not continuation:
        raise UserError("a continuation encodes to no tokens: nothing to score")
    if not context:
        raise ValueError("a context must hold at least one token (encode_pair gives an empty one end-of-text)")
    return (context + continuation)[-(window + 1):], min(len(continuation), window)


@torch.inference_mode()
def score_pairs(model: torch.nn.Module, pairs: list[tuple[list[int], list[int]]], batch_size: int = 32,
                owners: list[int] | None = None, bar=None, prepack: bool = True) -> list[Score]:
    """Score token pairs (context ids, continuation ids), each context run once however many pairs share it.

    With `prepack` the products go through oneDNN-packed weights on x86 CPUs (same scores, faster).
    Pairs are grouped by the tokens before their first scored position (the choices of one multiple-choice
    question share them), and groups go in batches of about `batch_size` pairs, longest first. `owners[i]` names
    the example pair i belongs to: `bar` then advances by one as each example completes.
    """
    model = unwrap(model)
    # On x86 CPUs oneDNN multiplies faster by packed weights (cpu_inference), here for the length of this call;
    # with many rows per product every layer gains, the smallest too (min_weight=0). Autocast would not use them.
    if not prepack or torch.is_autocast_enabled("cpu"):
        return _score_pairs(model, pairs, batch_size, owners, bar)
    with prepacked(model, min_weight=0):
        return _score_pairs(model, pairs, batch_size, owners, bar)


def _score_pairs(model: GPT, pairs: list[tuple[list[int], list[int]]], batch_size: int, owners: list[int] | None,
                 bar) -> list[Score]:
    window = model.config.block_size
    seqs, scored = [], []
    for context, continuation in pairs:
        seq, k = scored_sequence(context, continuation, window)
        seqs.append(seq)
        scored.append(k)
    by_prefix: dict[tuple[int, ...], list[int]] = {}
    for i, (seq, k) in enumerate(zip(seqs, scored, strict=True)):
        by_prefix.setdefault(tuple(seq[:len(seq) - k]), []).append(i)
    # A prefix is run once for its group where that saves at least a third of the group's tokens (HellaSwag's
    # and ARC's questions); otherwise (PIQA's short questions before long answers, WinoGrande and LAMBADA, which
    # share nothing) its pairs are scored whole, in batches of their own: one plain causal pass over whole
    # sequences costs less than a prefix pass, copying cache rows and a pass over the rest.
    shared, whole = [], []
    for prefix, members in by_prefix.items():
        saved = (len(members) - 1) * len(prefix)
        total = len(members) * len(prefix) + sum(scored[i] - 1 for i in members)
        if 3 * saved >= total:
            shared.append((prefix, members))
        else:
            whole += [(prefix, [i]) for i in members]
    # A shared batch holds a KV cache of every pair's whole sequence: at most about 1 GiB of it per batch.
    cache_tokens = max(2**30 // (2 * model.config.n_layer * model.config.n_embd * 4), window + 1)
    batches: list[tuple[bool, list[tuple[tuple[int, ...], list[int]]]]] = []
    for is_shared, groups in ((True, shared), (False, whole)):
        pairs_in, longest = 0, 0
        for prefix, members in sorted(groups, key=lambda g: -(len(g[0]) + max(scored[i] for i in g[1]))):
            length = len(prefix) + max(scored[i] for i in members)
            full = pairs_in + len(members) > batch_size or (is_shared and (pairs_in + len(members)) * longest
                                                            > cache_tokens)
            if not batches or batches[-1][0] != is_shared or (pairs_in and full):
                batches.append((is_shared, []))
                pairs_in, longest = 0, length  # sorted longest first: the batch's first group is its longest
            batches[-1][1].append((prefix, members))
            pairs_in += len(members)
    remaining: dict[int, int] = {}
    for owner in owners or []:
        remaining[owner] = remaining.get(owner, 0) + 1
    out: list[Score | None] = [None] * len(seqs)
    for is_shared, batch in batches:
        members = [i for _, group in batch for i in group]
        batch_seqs, batch_scored = [seqs[i] for i in members], [scored[i] for i in members]
        if is_shared:
            logprobs, misses = _score_shared_prefixes(model, [p for p, _ in batch], [len(g) for _, g in batch],
                                                      batch_seqs, batch_scored)
        else:
            logprobs, misses = _score_whole(model, batch_seqs, batch_scored)
        for row, i in enumerate(members):
            out[i] = Score(float(logprobs[row]), bool(misses[row] == 0))
        if owners is not None and bar is not None:
            done = 0
            for i in members:
                remaining[owners[i]] -= 1
                done += remaining[owners[i]] == 0
            bar.update(done)
    return out  # type: ignore[return-value]


def _right_padded(rows: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (B, T) ids padded with token 0 on the right, and each row's real length (B,)."""
    x = torch.zeros(len(rows), max(max(map(len, rows)), 1), dtype=torch.long)
    for r, ids in enumerate(rows):
        x[r, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    return x.to(device), torch.tensor([len(ids) for ids in rows], device=device)


def _sum_per_sequence(model: GPT, hidden: torch.Tensor, owner: torch.Tensor, targets: torch.Tensor, n: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Score the picked positions `hidden` (P, C) against `targets` (P,) and add them up by `owner` (P,): the
    summed log-probability and the count of non-greedy tokens of each of the n sequences, float64 (n,)."""
    token_lp, misses = _score_positions(model, hidden, targets)
    sums = torch.zeros(n, dtype=torch.float64, device=hidden.device).index_add_(0, owner, token_lp)
    wrong = torch.zeros(n, dtype=torch.float64, device=hidden.device).index_add_(0, owner, misses)
    return sums, wrong


def _score_whole(model: GPT, seqs: list[list[int]], scored: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """As `_score_shared_prefixes`, for sequences that share nothing: one causal pass over each whole sequence
    (right-padded), then only the positions that predict the `scored` last tokens go through the head."""
    device = next(model.parameters()).device
    x, lengths = _right_padded([seq[:-1] for seq in seqs], device)
    hidden = model.hidden_states(x)  # (N, W, C); padding on the right is never attended to by real tokens
    k = torch.tensor(scored, device=device)
    pos = torch.arange(x.shape[1], device=device)[None, :]
    picked = (pos >= (lengths - k)[:, None]) & (pos < lengths[:, None])  # (N, W): positions predicting a target
    targets = torch.tensor([t for seq, n in zip(seqs, scored, strict=True) for t in seq[-n:]], device=device)
    return _sum_per_sequence(model, hidden[picked], picked.nonzero()[:, 0], targets, len(seqs))


def _score_shared_prefixes(model: GPT, prefixes: list[tuple[int, ...]], sizes: list[int], seqs: list[list[int]],
                           scored: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities and counts of non-greedy tokens (float64, one per sequence) for groups of sequences;
    the `sizes[g]` sequences of group g all begin with `prefixes[g]` and score their last `scored` tokens.

    1. Each prefix goes through the model once, into a KV cache with a row per group: its last position predicts
       the first scored token of every sequence in the group.
    2. Each group's cache row is copied to one row per sequence, and the rest of each sequence (its scored tokens
       but the last) runs on top of it: each of those positions predicts the next scored token.
    Only the scored positions go through the output head. This computes what a plain forward pass over each
    sequence would (tests/test_evaluate.py checks against reference.score_pairs), with each shared prefix computed once.
    """
    device = next(model.parameters()).device
    # under autocast the keys and values are made in the autocast dtype: store them so, at half the memory
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else \
        next(model.parameters()).dtype
    group_of = torch.repeat_interleave(torch.arange(len(prefixes)), torch.tensor(sizes)).to(device)  # (N,)
    rests = [seq[len(seq) - k:-1] for seq, k in zip(seqs, scored, strict=True)]  # k - 1 tokens each
    longest_prefix = max(map(len, prefixes))
    cache = KVCache(model.config, len(prefixes), longest_prefix, device, dtype)
    x, lengths = _right_padded([list(p) for p in prefixes], device)
    hidden = model.hidden_states(x, cache, lengths=lengths)  # (G, P, C)
    picked = [hidden[torch.arange(len(prefixes), device=device), lengths - 1][group_of]]  # (N, C)
    owner = [torch.arange(len(seqs), device=device)]
    if any(rests):
        per_sequence = KVCache(model.config, len(seqs), max(len(seq) - 1 for seq in seqs), device, dtype)
        per_sequence.k[:, :, :, :longest_prefix] = cache.k[:, group_of]  # (layers, N, heads, prefix, head_dim)
        per_sequence.v[:, :, :, :longest_prefix] = cache.v[:, group_of]
        per_sequence.set_lengths(cache.lengths[group_of])
        del cache
        y, rest_lengths = _right_padded(rests, device)
        rest_hidden = model.hidden_states(y, per_sequence, lengths=rest_lengths)  # (N, R, C)
        real = torch.arange(y.shape[1], device=device)[None, :] < rest_lengths[:, None]  # (N, R)
        picked.append(rest_hidden[real])  # row by row, position by position
        owner.append(real.nonzero()[:, 0])
    # targets in the order picked: each sequence's first scored token, then each sequence's others
    targets = torch.tensor([seq[-k] for seq, k in zip(seqs, scored, strict=True)]
                           + [t for seq, k in zip(seqs, scored, strict=True) for t in seq[len(seq) - k + 1:]],
                           device=device)
    return _sum_per_sequence(model, torch.cat(picked), torch.cat(owner), targets, len(seqs))


def _score_positions(model: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probability of each target, 1.0 where it is not the most likely token) for hidden states (N, C), as
    float64 (N,) each. The logits are made and reduced a chunk of positions at a time: over a 50k vocabulary a
    batch's (N, V) logits would be hundreds of MB, read twice (maximum and argmax, then the normaliser); in chunks
    they stay in a CPU's cache (under 10% faster on this project's CPU, docs/evaluation.md) and bound the memory on
    any device."""
    step = logit_chunk_rows(hidden.device, model.config.vocab_size)
    token_lp = torch.empty(len(targets), dtype=torch.float64, device=hidden.device)
    misses = torch.empty(len(targets), dtype=torch.float64, device=hidden.device)
    for start in range(0, len(targets), step):
        logits = model.logits(hidden[start:start + step]).float()  # (chunk, V)
        target = targets[start:start + step]
        lp, best = _log_softmax_at(logits, target)
        token_lp[start:start + step] = lp
        misses[start:start + step] = best != target
    return token_lp, misses


def _log_softmax_at(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log_softmax(logits)[i, targets[i]] as float64, argmax of each row) from float32 logits (N, V).

    logsumexp computed as torch.logsumexp does (max, then the log of the summed exp(logit - max)), with the
    maximum's pass also giving the argmax, so the logits are read twice instead of three times. Not log_softmax:
    on float32 CPU logits over 50,257 tokens its result drifts by +2e-6 per token on average (1e-5 at worst), which
    adds up to 1e-3 over a long continuation; this error is unbiased (2e-6 at worst), and no (N, V) result is kept.
    """
    best_logit, best = logits.max(-1)  # (N,), (N,)
    log_norm = best_logit + (logits - best_logit[:, None]).exp_().sum(-1).log_()
    return (logits.gather(1, targets[:, None]).squeeze(1) - log_norm).double(), best
