"""The generation engine: one KV-cached decoder behind `minigpt sample`, `chat` and `serve`.

Sequences live in the rows of one preallocated KV cache, packed at the front (row i holds the i-th live
sequence). Each `step()` decodes one token for every live sequence in a single forward pass; `add()` prefills new
prompts (right-padded into one forward pass) into free rows while the others wait one step. A finished or cancelled
sequence gives its row back at once: the last live row moves into the hole, so the live rows stay a contiguous
slice of the cache and no step gathers or copies the cache. That is continuous batching: the server admits
requests between steps, `generate()` admits queued prompts as rows free up.

Sampling is per sequence: greedy (temperature 0) or temperature with top-k and top-p, penalties and logit bias,
stop tokens, and each sequence's own random generator, so a seeded request gives the same tokens whatever else
shares its batch.

    with Engine(model) as engine:
        for events in engine.stream([prompt_ids], SamplingParams(max_new_tokens=50, temperature=0.8, top_k=50)):
            for event in events: print(event.token)

`TextDecoder` turns a token stream into text: UTF-8 sequences split across tokens are held back until complete,
stop strings end the text without ever showing a part of them, and special tokens can be left out (`skip`).
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import itertools
import weakref
from collections import deque
from collections.abc import Collection, Iterable, Iterator, Sequence

import torch

from minigpt.model.cache import KVCache
from minigpt.model.cpu_inference import prepacked
from minigpt.model.gpt import GPT


@dataclasses.dataclass
class SamplingParams:
    """How to choose each next token. Defaults sample at temperature 1 from the whole distribution."""

    max_new_tokens: int = 256  # further bounded by the context window
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # keep the k most likely tokens (0: all)
    top_p: float = 1.0  # keep the smallest set whose probability reaches p (1: all)
    stop_token_ids: Sequence[int] = ()  # end the sequence when one is produced (it is not part of the output)
    seed: int | None = None  # a seeded sequence draws the same tokens whatever else shares its batch
    presence_penalty: float = 0.0  # subtracted from the logit of every token already generated
    frequency_penalty: float = 0.0  # subtracted once per earlier occurrence in the generated tokens
    logit_bias: dict[int, float] = dataclasses.field(default_factory=dict)  # added to logits by token id
    top_logprobs: int = 0  # also report this many most likely tokens with their log-probabilities
    skip_token_ids: Collection[int] = ()  # produce no text (special tokens; vLLM's skip_special_tokens)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError("max_new_tokens must be at least 0")
        if self.temperature < 0:
            raise ValueError("temperature must be at least 0")
        if self.top_k < 0:
            raise ValueError("top_k must be at least 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5


@dataclasses.dataclass
class TokenEvent:
    """One token produced for one sequence. `logprob` is the model's own (before temperature, penalties, top-k)."""

    seq_id: int
    token: int
    logprob: float
    top_logprobs: list[tuple[int, float]]
    finish_reason: str | None = None  # "stop" (token is a stop token), "length", or None while going on
    index: int = 0  # the prompt's position in `Engine.stream`


@dataclasses.dataclass(eq=False)  # identity: two generations are never "equal"
class Generation:
    """One prompt being continued. The engine fills `output` (stop tokens excluded) and `finish_reason`."""

    seq_id: int
    prompt: list[int]
    params: SamplingParams
    max_new_tokens: int
    generator: torch.Generator
    output: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    counts: torch.Tensor | None = None  # (vocab,) occurrences in the output, kept when penalties are on
    next_input: int | None = None  # the last sampled token, fed in the next step

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class Completion:
    tokens: list[int]
    logprobs: list[float]
    finish_reason: str


class Engine:
    """KV-cached, continuously batched decoding for one model.

    With `prepack` (the default) on a CPU, the engine multiplies by oneDNN-packed copies of the model's large
    weights (cpu_inference.prepacked: 1.3-4x faster decoding on x86 CPUs, as much memory again as those weights)
    for as long as it lives: until `close()`, the end of a `with Engine(...)` block, or its garbage collection. The
    model is then exactly as before. Close an engine before training its model further.
    """

    def __init__(self, model: GPT, max_batch: int = 16, max_len: int | None = None, seed: int | None = None,
                 prepack: bool = True):
        self.model = model.eval()
        self.config = model.config
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.cache = KVCache(model.config, max_batch, max_len, device=self.device, dtype=self.dtype)
        packing = contextlib.ExitStack()
        if prepack and self.device.type == "cpu":
            packing.enter_context(prepacked(model))
        self._finalizer = weakref.finalize(self, packing.close)  # holds the stack, not the engine
        self.max_len = self.cache.max_len
        self.live: list[Generation] = []  # live[i] occupies cache row i
        self._ids = itertools.count()
        self._seeds = torch.Generator().manual_seed(seed) if seed is not None else torch.Generator()
        if seed is None:
            self._seeds.seed()

    def close(self) -> None:
        """Give the model back as it was (no packed weights). The engine may still decode, with the default kernels."""
        self._finalizer()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- admitting and releasing sequences ---------------------------------------------------------------------

    @property
    def max_batch(self) -> int:
        return self.cache.rows

    @property
    def free_rows(self) -> int:
        return self.max_batch - len(self.live)

    def check_prompt(self, prompt: Sequence[int]) -> None:
        """Raise ValueError for a prompt this engine cannot continue (empty, too long, unknown ids)."""
        if len(prompt) == 0:
            raise ValueError("the prompt is empty")
        if len(prompt) >= self.max_len:
            raise ValueError(f"the prompt has {len(prompt)} tokens; the context window holds {self.max_len}, "
                             "and at least one must be left to generate")
        if min(prompt) < 0 or max(prompt) >= self.config.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size})")

    def new_generation(self, prompt: Sequence[int], params: SamplingParams) -> Generation:
        self.check_prompt(prompt)
        generator = torch.Generator(device=self.device)
        seed = params.seed if params.seed is not None else int(torch.randint(2**62, (1,), generator=self._seeds))
        generator.manual_seed(seed)
        budget = min(params.max_new_tokens, self.max_len - len(prompt))
        return Generation(next(self._ids), list(prompt), params, budget, generator)

    @torch.inference_mode()
    def add(self, sequences: list[Generation]) -> list[TokenEvent]:
        """Prefill new sequences into free rows and sample their first token (one event each)."""
        if len(sequences) > self.free_rows:
            raise RuntimeError(f"{len(sequences)} sequences do not fit in {self.free_rows} free rows")
        events: list[TokenEvent] = []
        admitted = []
        for seq in sequences:
            if seq.max_new_tokens == 0:
                seq.finish_reason = "length"
            else:
                admitted.append(seq)
        if not admitted:
            return events
        start = len(self.live)
        rows = slice(start, start + len(admitted))
        lengths = torch.tensor([len(s.prompt) for s in admitted])  # (B,) on the host: no device sync to read
        width = int(lengths.max())
        idx = torch.zeros(len(admitted), width, dtype=torch.long, device=self.device)  # (B, T), right-padded
        for i, seq in enumerate(admitted):
            idx[i, : len(seq.prompt)] = torch.tensor(seq.prompt, device=self.device)
        self.cache.reset(rows)
        hidden = self.model.hidden_states(idx, self.cache, rows, lengths)  # (B, T, C)
        ends = lengths.to(self.device) - 1
        last = hidden[torch.arange(len(admitted), device=self.device), ends]  # (B, C): each prompt's end
        self.live.extend(admitted)
        events = self._sample_and_advance(self._logits(last), admitted)
        self._release_finished()
        return events

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        """Decode one token for every live sequence."""
        if not self.live:
            return []
        tokens = torch.tensor([[s.next_input] for s in self.live], device=self.device)  # (B, 1)
        hidden = self.model.hidden_states(tokens, self.cache, slice(0, len(self.live)))  # (B, 1, C)
        events = self._sample_and_advance(self._logits(hidden[:, -1]), list(self.live))
        self._release_finished()
        return events

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, C) final hidden states -> (B, vocab) float32 logits."""
        return self.model.logits(hidden).float()

    def cancel(self, seq: Generation, reason: str = "cancelled") -> None:
        """Stop a live sequence now (a client went away) and free its row."""
        if not seq.done:
            seq.finish_reason = reason
        self._release_finished()

    def _release_finished(self) -> None:
        i = 0
        while i < len(self.live):
            if self.live[i].done:
                last = len(self.live) - 1
                if i != last:  # move the last live row into the hole
                    self.cache.move_row(last, i)
                    self.live[i] = self.live[last]
                self.live.pop()
            else:
                i += 1

    # -- sampling ----------------------------------------------------------------------------------------------

    def _sample_and_advance(self, logits: torch.Tensor, seqs: list[Generation]) -> list[TokenEvent]:
        tokens, logprobs, tops = sample(logits, seqs)
        events = []
        for seq, token, logprob, top in zip(seqs, tokens, logprobs, tops, strict=True):
            finish = None
            if token in seq.params.stop_token_ids:
                finish = "stop"
            else:
                seq.output.append(token)
                seq.logprobs.append(logprob)
                seq.next_input = token
                if seq.counts is not None:
                    seq.counts[token] += 1
                if len(seq.output) >= seq.max_new_tokens:
                    finish = "length"
            seq.finish_reason = finish
            events.append(TokenEvent(seq.seq_id, token, logprob, top, finish))
        return events

    # -- whole requests ----------------------------------------------------------------------------------------

    def run(self, generations: Sequence[Generation]) -> Iterator[list[TokenEvent]]:
        """Continue `generations` to their end, yielding each step's events; the engine must not be shared meanwhile.

        More generations than rows wait in a queue and join as rows free up.
        """
        queue = deque(generations)
        try:
            while queue or self.live:
                admit = [queue.popleft() for _ in range(min(self.free_rows, len(queue)))]
                events = self.add(admit) if admit else []
                events += self.step()
                if events:
                    yield events
        finally:  # a consumer that stops early (closes the generator) frees the rows at once
            for g in generations:
                if g in self.live:
                    self.cancel(g)

    def stream(self, prompts: Iterable[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
               ) -> Iterator[list[TokenEvent]]:
        """Continue every prompt, yielding each step's events as they are made; `event.index` is the prompt's."""
        generations = self._generations(prompts, params)
        index = {g.seq_id: i for i, g in enumerate(generations)}
        for events in self.run(generations):
            for event in events:
                event.index = index[event.seq_id]
            yield events

    def generate(self, prompts: Iterable[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
                 ) -> list[Completion]:
        """Continue every prompt to its end; completions come back in prompt order."""
        generations = self._generations(prompts, params)
        for _ in self.run(generations):
            pass
        return [Completion(g.output, g.logprobs, g.finish_reason or "length") for g in generations]

    def _generations(self, prompts: Iterable[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
                     ) -> list[Generation]:
        prompts = list(prompts)
        params_list = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params_list)} sampling parameters")
        return [self.new_generation(p, sp) for p, sp in zip(prompts, params_list, strict=True)]


def sample(logits: torch.Tensor, seqs: Sequence[Generation]) -> tuple[list[int], list[float], list[list]]:
    """Choose one token per row of `logits` (B, V) by each sequence's parameters.

    Returns the tokens, the model's log-probability of each (before any processing), and the requested top
    alternatives. Each row draws its randomness from its own sequence's generator.
    """
    B, V = logits.shape
    log_norm = torch.logsumexp(logits, dim=-1, keepdim=True)  # (B, 1): logprob = logit - log_norm, the model's own
    adjusted = [bool(s.params.logit_bias or s.params.presence_penalty or s.params.frequency_penalty) for s in seqs]
    scores = logits.clone() if any(adjusted) else logits
    for i, seq in enumerate(seqs):
        p = seq.params
        if not adjusted[i]:
            continue
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), device=logits.device)
            scores[i, ids] += torch.tensor(list(p.logit_bias.values()), device=logits.device, dtype=scores.dtype)
        if p.presence_penalty or p.frequency_penalty:
            if seq.counts is None:
                seq.counts = torch.zeros(V, device=logits.device)
                if seq.output:
                    seq.counts.index_add_(0, torch.tensor(seq.output, device=logits.device),
                                          torch.ones(len(seq.output), device=logits.device))
            scores[i] -= p.presence_penalty * (seq.counts > 0) + p.frequency_penalty * seq.counts

    chosen = scores.argmax(dim=-1)
    if not all(s.params.greedy for s in seqs):
        greedy = torch.tensor([s.params.greedy for s in seqs], device=logits.device)
        temperature = torch.tensor([max(s.params.temperature, 1e-5) for s in seqs], device=logits.device)
        scores = scores / temperature[:, None]
        top_k = [s.params.top_k for s in seqs]
        top_p = [s.params.top_p for s in seqs]
        if any(0 < k < V for k in top_k):
            k = torch.tensor([k if 0 < k < V else V for k in top_k], device=logits.device)
            kth = scores.topk(int(k.max()), dim=-1).values.gather(1, (k - 1)[:, None])  # (B, 1)
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if any(p < 1.0 for p in top_p):
            sorted_scores, order = scores.sort(dim=-1, descending=True)
            probs = sorted_scores.softmax(dim=-1)
            before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
            drop = before >= torch.tensor(top_p, device=logits.device)[:, None]  # the first token is always kept
            scores = scores.scatter(1, order, sorted_scores.masked_fill(drop, float("-inf")))
        probs = scores.softmax(dim=-1)
        # Exponential race (equivalent to sampling from probs): each row's noise from its own generator.
        noise = torch.empty_like(probs)
        for i, seq in enumerate(seqs):
            noise[i].exponential_(generator=seq.generator)
        sampled = (probs / noise).argmax(dim=-1)
        chosen = torch.where(greedy, chosen, sampled)

    tokens = chosen.tolist()
    picked = (logits.gather(1, chosen[:, None]) - log_norm)[:, 0].tolist()
    n_top = max(s.params.top_logprobs for s in seqs)
    tops: list[list] = [[] for _ in seqs]
    if n_top:
        values, ids = (logits - log_norm).topk(min(n_top, V), dim=-1)
        for i, seq in enumerate(seqs):
            k = seq.params.top_logprobs
            tops[i] = list(zip(ids[i, :k].tolist(), values[i, :k].tolist(), strict=True))
    return tokens, picked, tops


class TextDecoder:
    """Token ids in, text out, as soon as it is safe to show.

    Bytes of a character split across tokens wait for the rest (invalid UTF-8 becomes U+FFFD). Text that might
    be the start of a stop string waits until it is clearly not; when a stop string appears, the text before it
    is released and `stopped` becomes true. Tokens in `skip` (special tokens, usually) give no text at all.
    """

    def __init__(self, token_bytes, stop: Sequence[str] = (), skip: Collection[int] = ()):
        self._token_bytes = token_bytes  # callable: id -> bytes
        self._skip = frozenset(skip)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = [s for s in stop if s]
        self._held = ""
        self.stopped = False
        self.text = ""  # everything released so far

    def push(self, token: int) -> str:
        if self.stopped or token in self._skip:
            return ""
        return self._release(self._held + self._utf8.decode(self._token_bytes(token)), final=False)

    def finish(self) -> str:
        if self.stopped:
            return ""
        return self._release(self._held + self._utf8.decode(b"", final=True), final=True)

    def _release(self, pending: str, final: bool) -> str:
        cut = min((i for i in (pending.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self._held = pending[:cut], ""
        elif final:
            out, self._held = pending, ""
        else:
            keep = 0  # longest tail of pending that starts some stop string
            for s in self._stop:
                for n in range(min(len(s) - 1, len(pending)), keep, -1):
                    if s.startswith(pending[-n:]):
                        keep = n
                        break
            out, self._held = (pending[:-keep], pending[-keep:]) if keep else (pending, "")
        self.text += out
        return out
