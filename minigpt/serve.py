"""`minigpt serve`: an OpenAI-compatible HTTP server and a web chat page for a trained run.

    minigpt serve --model runs/quickstart/chat                     # http://127.0.0.1:8000/ (web chat)
    minigpt serve --model RUN --max-batch 32 --api-key "$KEY"      # or MINIGPT_API_KEY=... minigpt serve ...

Endpoints: /v1/chat/completions, /v1/completions (both streamed or not), /v1/models, /tokenize, /detokenize,
/tokenizer_info (as vLLM has them, so lm-evaluation-harness can use the server's own tokenizer), /health,
/metrics (Prometheus) and the chat page at /. Three modules share the work:

    serve.py      settings, the command line, and what needs no web framework: OpenAI-shaped errors, the gate
                  (API key, body size limit, request counts) as plain ASGI, Prometheus metrics, the page's CSP
    serve_api.py  the endpoints (FastAPI + pydantic): requests -> engine jobs -> JSON answers and SSE streams
    scheduler.py  the engine thread: continuous batching, stop strings, time limits, cancellation

docs/serving.md has the design, the parameters and measured load numbers. FastAPI and uvicorn are an optional
extra (`pip install minigpt[serve]`): nothing imports them until a server is built, so `import minigpt` and every
other stage work without them.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import hmac
import ipaddress
import json
import os
import re
import socket
import sys
import threading
import time
from collections import Counter
from importlib import resources
from typing import Any

from minigpt import config as configlib
from minigpt.common import UserError
from minigpt.config import opt

API_KEY_ENV = "MINIGPT_API_KEY"


@dataclasses.dataclass
class ServeConfig:
    """How to serve one run."""

    model: str = opt("", "run folder or checkpoint folder to serve (required)")
    checkpoint: str = opt("latest", "latest, best or a step_N folder name")
    served_model_name: str = opt("", "the model's name in the API (default: the run folder's name)")
    host: str = opt("127.0.0.1", "address to bind; anything but loopback exposes the server to the network")
    port: int = opt(8000, "TCP port")
    device: str = opt("cpu", "cpu, cuda, mps or auto")
    dtype: str = opt("float32", "weights' dtype: float32, bfloat16 or float16 (float32 for exact log-probs)")
    max_batch: int = opt(16, "sequences decoded together (rows of the KV cache)")
    max_queue: int = opt(64, "requests allowed to wait while every row is busy; beyond that the answer is 429")
    request_timeout: float = opt(300.0, "seconds a request may take, queueing included (0: no limit)")
    max_request_bytes: int = opt(1 << 20, "largest request body accepted (413 beyond)")
    api_key: str = opt("", f"require `Authorization: Bearer KEY` on the API (default: ${API_KEY_ENV})")
    cors_origin: list[str] = opt([], "origins allowed to call the API from a browser (none by default)")
    seed: int | None = opt(None, "seed for the engine's per-request seeds (requests without their own seed)")
    threads: int = opt(0, "CPU threads for torch (0: torch's default); 1 can be faster on a crowded machine")
    log_level: str = opt("info", "uvicorn's log level: critical, error, warning, info, debug")

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_queue < 0:
            raise ValueError("max_batch must be at least 1 and max_queue at least 0")
        if self.request_timeout < 0 or self.max_request_bytes < 1024:
            raise ValueError("request_timeout must be >= 0 and max_request_bytes >= 1024")
        if self.threads < 0:
            raise ValueError("threads must be at least 0")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port {self.port} is not a TCP port")
        if self.log_level not in ("critical", "error", "warning", "info", "debug", "trace"):
            raise ValueError(f"unknown log level {self.log_level!r}")


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
    """The web chat (minigpt/static/chat.html) and a Content-Security-Policy allowing exactly its inline code."""
    html = resources.files("minigpt").joinpath("static/chat.html").read_text(encoding="utf-8")

    def hashes(tag: str) -> str:
        found = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'" for s in found)

    csp = (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; connect-src 'self'; "
           "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return html, csp


def _server_modules():
    """Import the web stack, or say how to install it."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as exc:
        raise UserError(f"serving needs FastAPI and uvicorn ({exc.name} is missing): pip install minigpt[serve]"
                        ) from None
    from minigpt import serve_api

    return serve_api, uvicorn


def create_app(model, tokenizer, cfg: ServeConfig, name: str = "minigpt"):
    """The FastAPI application for a loaded model (its engine thread starts with the app's lifespan)."""
    serve_api, _ = _server_modules()
    return serve_api.build_app(model, tokenizer, cfg, name)


def load_app(cfg: ServeConfig):
    """Load `cfg.model` and build its app. Returns (app, name)."""
    import torch

    from minigpt.checkpoint import load_run
    from minigpt.common import parse_dtype, pick_device

    _server_modules()
    if not cfg.model:
        raise UserError("give the run to serve: --model RUN")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, tokenizer, _ = load_run(cfg.model, pick_device(cfg.device), cfg.checkpoint, parse_dtype(cfg.dtype))
    model.requires_grad_(False)  # inference only; a local switch, not torch's global grad mode
    name = cfg.served_model_name or _run_name(cfg.model)
    return create_app(model, tokenizer, cfg, name), name


def _run_name(path: str) -> str:
    """The run folder's name, also when given a checkpoint folder inside it (RUN/checkpoints/step_N)."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    if os.path.basename(parent) == "checkpoints":
        path = os.path.dirname(parent)
    return os.path.basename(path) or "minigpt"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class BackgroundServer:
    """Serve an app with uvicorn on a thread (tests, notebooks, benchmarks), on a free loopback port by default.

        with BackgroundServer(app) as server:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="x")
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        _, uvicorn = _server_modules()
        self.app = app
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.host, self.port = self._sock.getsockname()[:2]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on",
                                                    timeout_graceful_shutdown=2))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True,
                                        name="minigpt-uvicorn")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self._thread.join(10)
        self._sock.close()


# ----------------------------------------------------------------------------------------------------------------
# Command line: `minigpt serve`


def add_arguments(parser) -> None:
    parser.add_argument("--config", help="TOML, YAML or JSON file of settings (flags override it)")
    configlib.add_arguments(parser, ServeConfig)


def main(args) -> None:
    cfg = configlib.config_from_args(ServeConfig, args)
    if not cfg.api_key and os.environ.get(API_KEY_ENV):
        cfg = dataclasses.replace(cfg, api_key=os.environ[API_KEY_ENV])
    app, name = load_app(cfg)
    _, uvicorn = _server_modules()
    if not _is_loopback(cfg.host) and not cfg.api_key:
        print(f"warning: serving on {cfg.host} without an API key: anyone who can reach this port can use the "
              f"model (set --api-key or ${API_KEY_ENV})", file=sys.stderr)
    shown = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    print(f"serving {name} at http://{shown}:{cfg.port}/ (web chat) and /v1 (OpenAI API); Ctrl-C stops",
          file=sys.stderr, flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, timeout_graceful_shutdown=5)
