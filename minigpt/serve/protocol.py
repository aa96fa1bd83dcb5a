"""What `minigpt serve` needs besides a web framework: OpenAI-shaped errors, the gate, metrics, the chat page.

(serve.py builds the server, api.py the endpoints, jobs.py the requests' jobs, scheduler.py the engine thread.)
Nothing here imports FastAPI (pydantic, for the request bodies, comes with it in the serve extra).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import re
from collections import Counter
from importlib import resources
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from minigpt.text.chat_format import CHAT_DECODING

# ----------------------------------------------------------------------------------------------------------------
# Errors in OpenAI's shape


class APIError(Exception):
    """An answer `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    async def send(self, send) -> None:
        """Answer with this error through a raw ASGI `send`."""
        payload = json.dumps(self.body()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


_RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "too_short", "too_long"}
_UNION_FIELDS = {"prompt": "a string, a list of strings, a list of token ids or a list of lists of token ids",
                 "stop": "a string or a list of strings", "content": "a string or a list of text parts"}


def _param(loc: tuple) -> str | None:
    """A validation error's location -> OpenAI's `param` ("messages.[0].role"); union branch names are dropped."""
    parts = []
    for p in loc[1:]:
        if isinstance(p, int):
            parts.append(f"[{p}]")
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(p)) and p not in ("str", "int", "float", "bool", "list"):
            parts.append(str(p))
        else:
            break
    return ".".join(parts) or None


def validation_error(errors: list[dict[str, Any]]) -> APIError:
    """FastAPI's (pydantic's) validation errors -> one 400 APIError naming the first bad parameter."""
    first = errors[0] if errors else {"type": "", "loc": ("body",), "msg": "invalid request"}
    kind, loc = first.get("type", ""), tuple(first.get("loc", ()))
    if kind == "json_invalid":
        return APIError(400, "We could not parse the JSON body of your request: it is not valid JSON.",
                        code="invalid_json")
    param = _param(loc)
    if param is None:
        return APIError(400, "The request body must be a JSON object, sent with `Content-Type: application/json`.",
                        code="invalid_request")
    if kind == "missing":
        return APIError(400, f"Missing required parameter: '{param}'.", param=param,
                        code="missing_required_parameter")
    field = param.split(".")[-1]
    if field in _UNION_FIELDS and kind not in _RANGE_ERRORS:
        return APIError(400, f"Invalid type for '{param}': expected {_UNION_FIELDS[field]}.", param=param,
                        code="invalid_type")
    if kind in _RANGE_ERRORS:
        return APIError(400, f"Invalid value for '{param}': {first.get('msg', '')}.", param=param,
                        code="invalid_value")
    return APIError(400, f"Invalid type for '{param}': {first.get('msg', '')}.", param=param, code="invalid_type")


# ----------------------------------------------------------------------------------------------------------------
# Metrics (Prometheus text format, written by hand: no client library needed)

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize", "/detokenize", "/tokenizer_info",
             "/health", "/metrics", "/")


class Metrics:
    """Request counts by endpoint and status, token counts and the time-to-first-token histogram."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, int]] = Counter()
        self.prompt_tokens = 0
        self.rejected = 0
        self.ttft = [0] * (len(TTFT_BUCKETS) + 1)
        self.ttft_sum = 0.0

    def count(self, path: str, status: int) -> None:
        endpoint = path if path in ENDPOINTS else ("/v1/models" if path.startswith("/v1/models/") else "other")
        self.requests[(endpoint, status)] += 1

    def first_token(self, seconds: float) -> None:
        i = next((i for i, b in enumerate(TTFT_BUCKETS) if seconds <= b), len(TTFT_BUCKETS))
        self.ttft[i] += 1
        self.ttft_sum += seconds

    def render(self, scheduler) -> str:
        stats = scheduler.stats
        lines = ["# HELP minigpt_requests_total HTTP requests answered, by endpoint and status.",
                 "# TYPE minigpt_requests_total counter"]
        for (endpoint, status), n in sorted(self.requests.items()):
            lines.append(f'minigpt_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
        simple = [("generated_tokens_total", "counter", "Tokens generated", stats.tokens_generated),
                  ("prompt_tokens_total", "counter", "Prompt tokens received", self.prompt_tokens),
                  ("engine_steps_total", "counter", "Decode steps run", stats.steps),
                  ("engine_errors_total", "counter", "Engine iterations that failed", stats.errors),
                  ("rejected_total", "counter", "Requests refused because the queue was full", self.rejected),
                  ("queue_depth", "gauge", "Requests waiting for a row", scheduler.queued),
                  ("running_sequences", "gauge", "Sequences being decoded", stats.running),
                  ("max_batch", "gauge", "Rows of the KV cache", scheduler.max_batch)]
        for name, kind, help_, value in simple:
            lines += [f"# HELP minigpt_{name} {help_}.", f"# TYPE minigpt_{name} {kind}", f"minigpt_{name} {value}"]
        lines += ["# HELP minigpt_time_to_first_token_seconds From a request entering the queue to its first token.",
                  "# TYPE minigpt_time_to_first_token_seconds histogram"]
        total = 0
        for bound, n in zip((*TTFT_BUCKETS, "+Inf"), self.ttft, strict=True):
            total += n
            lines.append(f'minigpt_time_to_first_token_seconds_bucket{{le="{bound}"}} {total}')
        lines += [f"minigpt_time_to_first_token_seconds_sum {self.ttft_sum:.6f}",
                  f"minigpt_time_to_first_token_seconds_count {total}"]
        return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# The gate: API key, body size and request counting, as plain ASGI around the app (streams pass untouched)

PUBLIC_PATHS = {"/", "/health"}  # reachable without the API key: the page holds no data, probes need no secret


class Gate:
    def __init__(self, app, api_key: str, max_bytes: int, metrics: Metrics):
        self.app, self.api_key, self.max_bytes, self.metrics = app, api_key.encode(), max_bytes, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            refusal = self._refuse(scope)
            if refusal is None and scope["method"] in ("POST", "PUT", "PATCH"):
                refusal, receive = await self._buffer_body(receive)
            if refusal is not None:
                return await refusal.send(send_counted)
            await self.app(scope, receive, send_counted)
        finally:
            self.metrics.count(scope["path"], status[0])

    def _refuse(self, scope) -> APIError | None:
        headers = dict(scope["headers"])
        if self.api_key and scope["path"] not in PUBLIC_PATHS and scope["method"] != "OPTIONS":
            scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.api_key):
                return APIError(401, "Incorrect or missing API key: send `Authorization: Bearer KEY`.",
                                code="invalid_api_key")
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return self._too_large()
        return None

    def _too_large(self) -> APIError:
        return APIError(413, f"The request body is larger than this server accepts ({self.max_bytes} bytes).",
                        code="request_too_large")

    async def _buffer_body(self, receive):
        """Read the whole body (at most max_bytes; chunked bodies have no length to check first), then replay it.

        Later receives go to the client's connection, so the app still sees a disconnect."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None, receive  # gone already: let the app see it
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return self._too_large(), receive
            if not message.get("more_body", False):
                break
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replaying():
            return replay.pop() if replay else await receive()

        return None, replaying


@functools.lru_cache(maxsize=1)
def chat_page() -> tuple[str, str]:
    """The web chat (minigpt/serve/static/chat.html) and a Content-Security-Policy allowing exactly its inline code."""
    html = resources.files("minigpt.serve").joinpath("static/chat.html").read_text(encoding="utf-8")
    for name in ("temperature", "top_p", "frequency_penalty"):  # the page starts from `minigpt chat`'s defaults
        html = html.replace("{{" + name + "}}", f"{CHAT_DECODING[name]:g}")

    def hashes(tag: str) -> str:
        found = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'" for s in found)

    csp = (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; connect-src 'self'; "
           "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return html, csp


# ----------------------------------------------------------------------------------------------------------------
# Request bodies: unknown fields pass, explicit nulls mean "the default"

MAX_N = 16  # choices per prompt
MAX_CHOICES = 256  # choices per request (prompts x n)
MAX_STOP = 16  # stop strings per request
MAX_LOGPROBS = 20



class _Body(BaseModel):
    # strict: "2" is not a number and "false" not a boolean, as the OpenAI API answers (ints still pass as floats)
    model_config = ConfigDict(extra="allow", strict=True)


class StreamOptions(_Body):
    include_usage: bool | None = None


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: str
    content: str | list[ContentPart] | None = None


class SamplingRequest(_Body):
    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # vLLM's extension; -1 or 0: off
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    n: int | None = Field(None, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    skip_special_tokens: bool | None = None  # vLLM's extension: false shows special tokens in the text


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class CompletionRequest(SamplingRequest):
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]  # no true -> 1
    echo: bool | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool | None = None
    add_special_tokens: bool | None = None  # accepted for vLLM's clients; our tokenizer adds none
    return_token_strs: bool | None = None


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[StrictInt]
