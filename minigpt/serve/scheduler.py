"""The serving loop: one thread owns the generation engine and feeds it requests between decode steps.

`minigpt serve` (api.py) turns each HTTP request into a `Job`: one or more `Choice`s (a prompt, sampling
parameters, stop strings) and a `deliver` callback. The engine thread repeats one iteration for as long as there is
work:

    drop cancelled jobs (their client went away) and end overdue ones (--request-timeout)
    admit waiting choices into free cache rows: Engine.add prefills them, with their first token
    Engine.step: one more token for every live sequence
    turn each token into text (TextDecoder: stop strings, split UTF-8) and deliver it to its job

So new prompts join at token granularity while the others keep decoding (continuous batching), and a finished or
cancelled sequence frees its row for the next waiting one at once. Nothing but this thread touches the Engine or
the model; other threads only append to the waiting queue, set `Job.cancelled`, and read the counters in `stats`.
Jobs wait in a bounded queue: `submit` raises `QueueFull` when `max_queue` jobs wait beyond those the free rows
will take (HTTP 429).

`deliver(items)` is called on the engine thread with a list of `Update`, `PromptScores`, a final `Done`, or an
exception; it must only hand the items over (api.py puts them on an asyncio queue with call_soon_threadsafe).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

import torch

from minigpt.chat.engine import Engine, Generation, SamplingParams, TextDecoder

log = logging.getLogger("minigpt.serve.serve")


class QueueFull(Exception):
    """The waiting queue is full: try again later."""


class JobTimeout(Exception):
    """A job waited in the queue for its whole time limit without starting."""


@dataclasses.dataclass(eq=False)  # identity: the n choices of one prompt are distinct
class Choice:
    """One sequence to generate: a prompt and how to continue it."""

    prompt: list[int]
    params: SamplingParams
    stop: Sequence[str] = ()
    index: int = 0  # its place in the job, set by Job
    # Engine-thread state:
    gen: Generation | None = None
    decoder: TextDecoder | None = None
    generated: int = 0  # tokens the model produced, a final stop token included
    finish_reason: str | None = None


@dataclasses.dataclass
class Update:
    """New output of one choice: text released by its decoder and the tokens behind it."""

    index: int
    text: str = ""
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None


@dataclasses.dataclass
class PromptScores:
    """Log-probability of each prompt token given those before it (None for the first), and the top alternatives."""

    index: int
    logprobs: list[float | None]
    top_logprobs: list[list[tuple[int, float]] | None]


@dataclasses.dataclass
class Done:
    completion_tokens: int


class Job:
    """The choices of one request, delivered through `deliver` (called on the engine thread)."""

    def __init__(self, choices: list[Choice], deliver: Callable[[list], None], timeout: float | None = None,
                 score_prompts: int | None = None):
        self.choices = choices
        for i, choice in enumerate(choices):
            choice.index = i
        self.deliver = deliver
        self.deadline = time.monotonic() + timeout if timeout else None
        self.score_prompts = score_prompts  # None: no prompt scores; k: with the top k alternatives per token
        self.cancelled = False  # set by any thread; the engine thread acts on it
        self.started = False
        self.admitted = 0  # choices handed to the engine so far

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)


@dataclasses.dataclass
class Stats:
    """Counters for /metrics and /health, written by the engine thread only."""

    running: int = 0  # live sequences after the last step
    free_rows: int = 0  # engine rows not yet taken: set after each step and as each job is admitted
    steps: int = 0
    tokens_generated: int = 0
    jobs_finished: int = 0
    errors: int = 0


@torch.inference_mode()
def prompt_logprobs(model, prompt: Sequence[int], top: int = 0, chunk: int = 256
                    ) -> tuple[list[float | None], list[list[tuple[int, float]] | None]]:
    """Each prompt token's log-probability under the model given the tokens before it, from one forward pass.

    Logits are float32 and normalised position by position in chunks, so a long prompt over a 50k vocabulary never
    holds all (T, V) log-probabilities at once. The first token has no context: its entries are None.
    """
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt)], device=device)  # (1, T)
    hidden = model.hidden_states(ids)[0, :-1]  # (T-1, C): position t predicts token t+1
    targets = ids[0, 1:]
    logprobs: list[float | None] = [None]
    tops: list[list[tuple[int, float]] | None] = [None]
    for start in range(0, hidden.shape[0], chunk):
        lp = model.logits(hidden[start:start + chunk]).float().log_softmax(-1)  # (t, V)
        logprobs += lp.gather(1, targets[start:start + chunk, None])[:, 0].tolist()
        if top:
            values, ids_top = lp.topk(top, dim=-1)
            tops += [list(zip(i, v, strict=True)) for i, v in zip(ids_top.tolist(), values.tolist(), strict=True)]
        else:
            tops += [[] for _ in range(lp.shape[0])]
    return logprobs, tops


class Scheduler:
    """Owns an Engine on a background thread and runs the jobs submitted to it."""

    def __init__(self, model, tokenizer, max_batch: int = 16, max_queue: int = 64, seed: int | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.engine = Engine(model, max_batch=max_batch, seed=seed)
        self.window = self.engine.max_len  # longest sequence (prompt + output)
        self.vocab_size = model.config.vocab_size
        self.max_batch, self.max_queue = max_batch, max_queue
        self.stats = Stats(free_rows=max_batch)
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()  # submitted, not started; guarded by _cond
        self._active: list[Job] = []  # started, not finished; engine thread only
        self._owner: dict[int, tuple[Job, Choice]] = {}  # seq_id -> its job and choice; engine thread only
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="minigpt-engine", daemon=True)

    # -- any thread --------------------------------------------------------------------------------------------

    def start(self) -> Scheduler:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    @property
    def queued(self) -> int:
        return len(self._waiting)

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopping:
                raise RuntimeError("the server is shutting down")
            # Jobs that free rows will take at the next iteration do not count as waiting (a request arriving
            # mid-step on an idle server is not queued, even with max_queue 0).
            if len(self._waiting) >= self.max_queue + self.stats.free_rows:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting")
            self._waiting.append(job)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """Forget a job (its client went away): its rows are freed before the next step."""
        job.cancelled = True
        with self._cond:
            self._cond.notify()

    # -- the engine thread -------------------------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not (self._stopping or self._waiting or self._active):
                        self._cond.wait()
                    if self._stopping:
                        break
                try:
                    self._iterate()
                except Exception as exc:  # a bug or a device error: fail what is in flight, keep serving
                    log.exception("engine step failed")
                    self.stats.errors += 1
                    self._fail_all(exc)
        self._fail_all(RuntimeError("the server is shutting down"))

    def _iterate(self) -> None:
        now = time.monotonic()
        for job in list(self._active):
            if job.cancelled:
                self._drop(job)
            elif job.deadline is not None and now > job.deadline:
                self._expire(job)
        with self._cond:
            for job in [j for j in self._waiting if j.cancelled or (j.deadline is not None and now > j.deadline)]:
                self._waiting.remove(job)
                if not job.cancelled:
                    self._send(job, [JobTimeout("the request waited its whole time limit in the queue")])

        pending: dict[Job, list] = {}
        admit = self._admit(pending)
        if admit:  # prefill; the first tokens go out before the next step, which may take a while
            self._collect(self.engine.add(admit), pending)
            self._flush(pending)
            pending = {}
        if self.engine.live:
            self._collect(self.engine.step(), pending)
            self.stats.steps += 1
        self._flush(pending)
        self.stats.running = len(self.engine.live)
        self.stats.free_rows = self.engine.free_rows

    def _collect(self, events, pending: dict[Job, list]) -> None:
        self.stats.tokens_generated += len(events)
        for event in events:
            job, choice = self._owner[event.seq_id]
            pending.setdefault(job, []).append(self._update(job, choice, event))

    def _flush(self, pending: dict[Job, list]) -> None:
        """Deliver what each job got, closing the jobs now finished."""
        for job, items in pending.items():
            if job.finished and job in self._active:
                self._active.remove(job)
                self.stats.jobs_finished += 1
                items.append(Done(sum(c.generated for c in job.choices)))
            self._send(job, items)

    def _admit(self, pending: dict[Job, list]) -> list[Generation]:
        """Hand waiting choices to free rows: jobs already started first (n > 1 may span steps), then new ones."""
        admit: list[Generation] = []
        queue = [j for j in self._active if j.admitted < len(j.choices)]
        while len(admit) < self.engine.free_rows:
            if not queue:
                with self._cond:
                    if not self._waiting:
                        break
                    job = self._waiting.popleft()
                    # the rows this job takes are no longer free for `submit`'s count, from now on
                    self.stats.free_rows = max(self.engine.free_rows - len(admit) - len(job.choices), 0)
                job.started = True
                self._active.append(job)
                queue.append(job)
                if job.score_prompts is not None:
                    pending.setdefault(job, []).extend(self._score(job))
            job = queue[0]
            while job.admitted < len(job.choices) and len(admit) < self.engine.free_rows:
                choice = job.choices[job.admitted]
                job.admitted += 1
                choice.decoder = TextDecoder(self.tokenizer.token_bytes, choice.stop, choice.params.skip_token_ids)
                if choice.params.max_new_tokens == 0:  # prompt scores only
                    choice.finish_reason = "length"
                    pending.setdefault(job, []).append(Update(choice.index, finish_reason="length"))
                    continue
                try:
                    choice.gen = self.engine.new_generation(choice.prompt, choice.params)
                except ValueError as exc:  # serve_api checks prompts first; this is the last line of defence
                    self._fail(job, exc)
                    admit = [g for g in admit if not g.done]  # the failed job's choices were cancelled
                    break
                self._owner[choice.gen.seq_id] = (job, choice)
                admit.append(choice.gen)
            if job.admitted == len(job.choices) or job not in self._active:
                queue.pop(0)
        return admit

    def _score(self, job: Job) -> list[PromptScores]:
        seen: dict[tuple[int, ...], tuple] = {}
        out = []
        for i, choice in enumerate(job.choices):
            key = tuple(choice.prompt)
            if key not in seen:
                seen[key] = prompt_logprobs(self.model, choice.prompt, job.score_prompts or 0)
            out.append(PromptScores(i, *seen[key]))
        return out

    def _update(self, job: Job, choice: Choice, event) -> Update:
        choice.generated += 1
        finish = event.finish_reason
        text = "" if finish == "stop" else choice.decoder.push(event.token)
        if choice.decoder.stopped and finish != "stop":  # a stop string, maybe completed by the last allowed token
            if finish is None:  # end it now and free the row
                self.engine.cancel(choice.gen, "stop")
            finish = "stop"
        if finish is not None:
            text += choice.decoder.finish()
            choice.finish_reason = finish
            del self._owner[event.seq_id]
        return Update(choice.index, text, [event.token], [event.logprob], [event.top_logprobs], finish)

    def _release(self, job: Job, reason: str | None) -> list[Update]:
        """Stop every unfinished choice of a job; with a reason, report it as their finish."""
        updates = []
        for choice in job.choices:
            if choice.finish_reason is not None:
                continue
            if choice.gen is not None:
                self._owner.pop(choice.gen.seq_id, None)
                if not choice.gen.done:
                    self.engine.cancel(choice.gen, reason or "cancelled")
            choice.finish_reason = reason or "cancelled"
            if reason is not None:
                tail = choice.decoder.finish() if choice.decoder is not None else ""
                updates.append(Update(choice.index, tail, finish_reason=reason))
        if job in self._active:
            self._active.remove(job)
        return updates

    def _drop(self, job: Job) -> None:
        self._release(job, None)

    def _expire(self, job: Job) -> None:
        """The time limit passed mid-generation: end each choice as if it had reached max_tokens."""
        updates = self._release(job, "length")
        self._send(job, [*updates, Done(sum(c.generated for c in job.choices))])

    def _fail(self, job: Job, exc: BaseException) -> None:
        self._release(job, None)
        self._send(job, [exc])

    def _fail_all(self, exc: BaseException) -> None:
        for job in list(self._active):
            try:
                self._fail(job, exc)
            except Exception:  # the engine itself may be what broke: still tell the clients
                self._send(job, [exc])
        self._active.clear()
        self._owner.clear()
        try:
            for gen in list(self.engine.live):
                self.engine.cancel(gen)
        except Exception:
            log.exception("could not release the engine's rows")
        if self._stopping:
            with self._cond:
                waiting, self._waiting = list(self._waiting), deque()
            for job in waiting:
                self._send(job, [exc])
        self.stats.running = len(self.engine.live)
        self.stats.free_rows = self.engine.free_rows

    @staticmethod
    def _send(job: Job, items: list) -> None:
        if job.cancelled:
            return
        try:
            job.deliver(items)
        except Exception:  # e.g. the event loop closed under a request: nothing left to tell
            log.debug("could not deliver to a job", exc_info=True)
