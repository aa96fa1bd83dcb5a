"""Between the HTTP layer and the engine: a `Server` turns OpenAI-shaped requests into scheduler jobs and hands
their tokens back to the request coroutines; api.py builds the endpoints on it.

Generation runs on the scheduler's engine thread (scheduler.py); each request coroutine receives its tokens
through an asyncio queue (`Channel`) that the engine thread fills with `call_soon_threadsafe`. A client that goes
away has its job cancelled.
"""

from __future__ import annotations

import asyncio
import codecs
import functools
import json
import re
import time

from fastapi import Request

from minigpt.chat.engine import SamplingParams
from minigpt.serve.protocol import (
    MAX_CHOICES,
    MAX_STOP,
    APIError,
    Metrics,
    SamplingRequest,
)
from minigpt.serve.scheduler import Choice, Done, Job, JobTimeout, QueueFull, Scheduler, Update
from minigpt.text.chat_format import (
    end_of_turn_ids,
    special_ids,
    stop_ids,
)


class Channel:
    """Items from the engine thread, handed to this request's coroutine through an asyncio queue."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[list] = asyncio.Queue()
        self.started = time.perf_counter()

    def deliver(self, items: list) -> None:  # called on the engine thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, items)


class ClientGone(Exception):
    """The client disconnected."""


class Server:
    """Everything the endpoints share: model facts, the scheduler, metrics and settings."""

    def __init__(self, model, tokenizer, cfg, name: str):
        self.tokenizer, self.cfg, self.name = tokenizer, cfg, name
        self.scheduler = Scheduler(model, tokenizer, cfg.max_batch, cfg.max_queue, cfg.seed)
        self.window = self.scheduler.window
        self.vocab_size = self.scheduler.vocab_size
        self.metrics = Metrics()
        self.created = int(time.time())
        self.chat_stop = stop_ids(tokenizer) if tokenizer.chat_token_ids else None
        self.turn_stop = end_of_turn_ids(tokenizer)  # both endpoints stop where the exported model stops
        self.special = special_ids(tokenizer)
        self.token_str = functools.lru_cache(maxsize=1 << 16)(self._token_str)

    def _token_str(self, token: int) -> str:
        """A token as text, or as `bytes:\\xNN...` when its bytes are not valid UTF-8 on their own (as OpenAI)."""
        raw = self.tokenizer.token_bytes(token)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.name:
            raise APIError(404, f"The model `{model}` does not exist; this server has `{self.name}`.",
                           param="model", code="model_not_found")

    def check_prompt(self, ids: list[int], param: str, generating: bool) -> None:
        if not ids:
            raise APIError(400, f"The {param} is empty.", param=param, code="invalid_value")
        limit = self.window - 1 if generating else self.window
        if len(ids) > limit:
            room = ", and at least one token must be left for the reply" if generating else ""
            raise APIError(400, f"This model's maximum context length is {self.window} tokens; the {param} has "
                                f"{len(ids)} tokens{room}.", param=param, code="context_length_exceeded")
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise APIError(400, f"Token ids must be in [0, {self.vocab_size}).", param=param, code="invalid_value")

    def encode(self, text: str) -> list[int]:
        """Prompt text -> ids; special-token text becomes the special token (as Hugging Face tokenizers do)."""
        try:
            return self.tokenizer.encode(text, allowed_special="all")
        except Exception as exc:  # e.g. lone surrogates from JSON escapes
            raise APIError(400, f"The text cannot be encoded: {exc}", param="prompt", code="invalid_value"
                           ) from None

    # -- sampling settings shared by both endpoints --

    def sampling(self, body: SamplingRequest, max_tokens: int, stop_tokens: list[int], top_logprobs: int
                 ) -> list[SamplingParams]:
        """One SamplingParams per choice of a prompt: the n choices get seeds seed, seed+1, ... when seeded."""
        bias = {}
        for key, value in (body.logit_bias or {}).items():
            if not re.fullmatch(r"[0-9]{1,9}", key.strip()) or int(key) >= self.vocab_size:
                raise APIError(400, f"logit_bias keys must be token ids in [0, {self.vocab_size}), not {key!r}.",
                               param="logit_bias", code="invalid_value")
            if not -100 <= value <= 100:
                raise APIError(400, "logit_bias values must be in [-100, 100].", param="logit_bias",
                               code="invalid_value")
            bias[int(key)] = float(value)
        top_k = body.top_k or 0
        return [SamplingParams(max_new_tokens=max_tokens,
                               temperature=1.0 if body.temperature is None else body.temperature,
                               top_k=max(top_k, 0), top_p=1.0 if body.top_p is None else body.top_p,
                               stop_token_ids=stop_tokens,
                               seed=None if body.seed is None else (body.seed + i) % 2**64,
                               presence_penalty=body.presence_penalty or 0.0,
                               frequency_penalty=body.frequency_penalty or 0.0,
                               logit_bias=bias, top_logprobs=top_logprobs,
                               skip_token_ids=() if body.skip_special_tokens is False else self.special)
                for i in range(body.n or 1)]

    def max_tokens(self, body: SamplingRequest, prompt_tokens: int, default: int, least: int) -> int:
        """The tokens to generate: as asked, if the longest prompt plus that many fit the window (else a 400, as
        OpenAI and vLLM answer), or by default `default` cut to the room the window leaves."""
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        value = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if value is None:
            return max(min(default, self.window - prompt_tokens), least)
        if value < least or value > self.window:
            raise APIError(400, f"{param} must be in [{least}, {self.window}] (this model's context window), not "
                                f"{value}.", param=param, code="invalid_value")
        if prompt_tokens + value > self.window:
            raise APIError(400, f"This model's maximum context length is {self.window} tokens. However, you "
                                f"requested {prompt_tokens + value} tokens ({prompt_tokens} in the prompt, {value} "
                                f"in the completion). Reduce the prompt or {param}.", param=param,
                           code="context_length_exceeded")
        return value

    @staticmethod
    def stop_strings(body: SamplingRequest) -> list[str]:
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > MAX_STOP:
            raise APIError(400, f"At most {MAX_STOP} stop strings are allowed.", param="stop", code="invalid_value")
        return [s for s in stop if s]

    # -- running a job --

    def submit(self, choices: list[Choice], prompt_tokens: int, score_prompts: int | None = None
               ) -> tuple[Job, Channel]:
        if len(choices) > MAX_CHOICES:
            raise APIError(400, f"A request may ask for at most {MAX_CHOICES} choices (prompts x n).", param="n",
                           code="invalid_value")
        channel = Channel()
        timeout = self.cfg.request_timeout or None
        job = Job(choices, channel.deliver, timeout, score_prompts)
        try:
            self.scheduler.submit(job)
        except QueueFull:
            self.metrics.rejected += 1
            raise APIError(429, "The server is busy: too many requests are waiting. Retry shortly.",
                           type="rate_limit_error", code="queue_full") from None
        except RuntimeError as exc:
            raise APIError(503, str(exc), type="server_error", code="unavailable") from None
        self.metrics.prompt_tokens += prompt_tokens
        return job, channel

    async def items(self, channel: Channel):
        """The job's items in order, until Done; engine-side errors become APIErrors."""
        first = True
        while True:
            for item in await channel.queue.get():
                if isinstance(item, ClientGone):
                    raise item
                if isinstance(item, BaseException):
                    raise engine_error(item)
                if first and isinstance(item, Update) and item.tokens:
                    first = False
                    self.metrics.first_token(time.perf_counter() - channel.started)
                yield item
                if isinstance(item, Done):
                    return

    async def collect(self, request: Request, job: Job, channel: Channel) -> list:
        """All items of a job not streamed, cancelling it if the client disconnects meanwhile."""

        async def watch():
            while (await request.receive())["type"] != "http.disconnect":
                pass
            self.scheduler.cancel(job)
            channel.queue.put_nowait([ClientGone()])

        watcher = asyncio.create_task(watch())
        try:
            return [item async for item in self.items(channel)]
        finally:
            watcher.cancel()
            self.scheduler.cancel(job)  # a no-op when it finished; frees its rows when it did not


def engine_error(exc: BaseException) -> APIError:
    if isinstance(exc, JobTimeout):
        return APIError(503, "The server was too busy to start this request within its time limit.",
                        type="server_error", code="timeout")
    if isinstance(exc, ValueError):
        return APIError(400, str(exc), code="invalid_value")
    return APIError(500, f"The engine failed: {exc}", type="server_error", code="engine_error")


def sse_event(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'), ensure_ascii=False)}\n\n"


class TextOffsets:
    """Character offset of each token in the text decoded so far (OpenAI's `text_offset`)."""

    def __init__(self, token_bytes) -> None:
        self._bytes = token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.chars = 0

    def take(self, tokens: list[int]) -> list[int]:
        out = []
        for t in tokens:
            out.append(self.chars)
            self.chars += len(self._utf8.decode(self._bytes(t)))
        return out


def usage_counts(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
