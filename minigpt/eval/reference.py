"""Slow, plainly correct versions of the fast paths, for the tests and benchmarks to hold them to.

    reference.encode(tokenizer, text) == tokenizer.encode(text)                  # pure-Python BPE vs tiktoken
    reference.generate(model, prompt, params) == Engine(model).generate(...)     # no KV cache vs the engine
    reference.score_pairs(model, pairs) ~= scoring.score_pairs(model, pairs)     # one pair per pass vs batched

Each does the obvious thing the documented way, with no batching, caching or reuse, so that reading it is enough
to believe it; the fast paths in text/tokenizer.py, chat/engine.py and scoring.py must give the same answers
(tests/test_tokenizer.py, test_engine.py, test_evaluate.py; bench/eval_speed.py measures the gap).
(The idea is tiktoken's `_educational` module: one place for the slow references.)
"""

from __future__ import annotations

from collections.abc import Sequence

import regex
import torch

from minigpt.chat.engine import Generation, SamplingParams, sample
from minigpt.eval.scoring import Score, scored_sequence
from minigpt.model.gpt import GPT
from minigpt.runs.checkpoint import unwrap
from minigpt.text import _bpe
from minigpt.text.tokenizer import AllowedSpecial, Tokenizer


def encode(tokenizer: Tokenizer, text: str, allowed_special: AllowedSpecial = frozenset()) -> list[int]:
    """The same ids as `tokenizer.encode`, computed in plain Python: split out the allowed special tokens, split
    the rest with the pre-split pattern, then merge each chunk's bytes by rank (`_bpe.reference_encode_chunk`)."""
    text = _bpe.clean_text(text)
    specials = tokenizer.special_tokens
    allowed = set(specials) if allowed_special == "all" else set(allowed_special)
    if allowed - set(specials):
        raise ValueError(f"unknown special tokens {sorted(allowed - set(specials))}")
    pieces = [text]
    if allowed:
        alternation = "|".join(regex.escape(s) for s in sorted(allowed, key=len, reverse=True))
        pieces = regex.split(f"({alternation})", text)  # odd positions hold the special tokens
    ids: list[int] = []
    split = regex.compile(tokenizer.pattern).findall
    for k, piece in enumerate(pieces):
        if k % 2:
            ids.append(specials[piece])
            continue
        for chunk in split(piece):
            ids += _bpe.reference_encode_chunk(chunk.encode("utf-8"), tokenizer.ranks)
    return ids


@torch.inference_mode()
def generate(model: GPT, prompt: Sequence[int], params: SamplingParams,
             generator: torch.Generator | None = None) -> list[int]:
    """Continue one prompt without a KV cache: the whole sequence runs through the model for every new token.
    Sampling is the engine's own `sample`, so seeded draws can be compared token for token."""
    device = next(model.parameters()).device
    seq = Generation(0, list(prompt), params, min(params.max_new_tokens, model.config.block_size - len(prompt)),
                     generator or torch.Generator(device=device).manual_seed(params.seed or 0))
    tokens = list(prompt)
    while len(seq.output) < seq.max_new_tokens:
        logits, _ = model(torch.tensor([tokens], device=device))
        (token,), _, _ = sample(logits[:, -1].float(), [seq])
        if token in params.stop_token_ids:
            break
        seq.output.append(token)
        tokens.append(token)
    return seq.output


@torch.inference_mode()
def score_pairs(model: torch.nn.Module, pairs: list[tuple[list[int], list[int]]]) -> list[Score]:
    """(context ids, continuation ids) pairs scored one per forward pass, logits at every position, log-softmax in
    float64: the summed log-probability of each continuation and whether each of its tokens is the argmax."""
    model = unwrap(model)
    device = next(model.parameters()).device
    out = []
    for context, continuation in pairs:
        seq, k = scored_sequence(context, continuation, model.config.block_size)
        logits, _ = model(torch.tensor([seq[:-1]], device=device))  # (1, T, V)
        logp = logits[0, -k:].double().log_softmax(-1)  # (k, V)
        target = torch.tensor(seq[-k:], device=device)
        out.append(Score(float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())))
    return out
