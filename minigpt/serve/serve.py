"""`minigpt serve`: an OpenAI-compatible HTTP server and a web chat page for a trained run.

    minigpt serve --model runs/quickstart/chat                     # http://127.0.0.1:8000/ (web chat)
    minigpt serve --model RUN --max-batch 32 --api-key "$KEY"      # or MINIGPT_API_KEY=... minigpt serve ...

Endpoints: /v1/chat/completions, /v1/completions (both streamed or not), /v1/models, /tokenize, /detokenize,
/tokenizer_info (as vLLM has them, so lm-evaluation-harness can use the server's own tokenizer), /health,
/metrics (Prometheus) and the chat page at /. Five modules share the work, imports running one way
(serve -> api -> jobs -> scheduler; protocol below api and jobs):

    serve.py      settings, building and running the server (its flags: minigpt/cli/serve.py)
    api.py        the endpoints (FastAPI + pydantic): requests -> jobs -> JSON answers and SSE streams
    jobs.py       OpenAI-shaped requests -> scheduler jobs, their tokens back to the request coroutines
    protocol.py   what needs no web framework: OpenAI-shaped errors, the gate (API key, body size limit,
                  request counts) as plain ASGI, Prometheus metrics, the page's Content-Security-Policy
    scheduler.py  the engine thread: continuous batching, stop strings, time limits, cancellation

docs/serving.md has the design, the parameters and measured load numbers. FastAPI and uvicorn are an optional
extra (`pip install minigpt[serve]`): nothing imports them until a server is built, so `import minigpt` and every
other stage work without them.
"""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import os
import socket
import threading
import time

from minigpt.common import UserError, parse_dtype, pick_device
from minigpt.common.config import opt
from minigpt.runs.loading import load_run

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


def server_modules():
    """Import the web stack, or say how to install it."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as exc:
        raise UserError(f"serving needs FastAPI and uvicorn ({exc.name} is missing): pip install minigpt[serve]"
                        ) from None
    from minigpt.serve import api as serve_api  # (FastAPI and pydantic: imported when a server starts, not before)

    return serve_api, uvicorn


def create_app(model, tokenizer, cfg: ServeConfig, name: str = "minigpt"):
    """The FastAPI application for a loaded model (its engine thread starts with the app's lifespan)."""
    serve_api, _ = server_modules()
    return serve_api.build_app(model, tokenizer, cfg, name)


def load_app(cfg: ServeConfig):
    """Load `cfg.model` and build its app. Returns (app, name)."""
    import torch


    server_modules()
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


def is_loopback(host: str) -> bool:
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
        _, uvicorn = server_modules()
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
# The listening socket


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or a one-line UserError (a port in use, a privileged port, an address this
    machine does not have). Bound before the model loads and before the address is announced."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except (socket.gaierror, OSError) as exc:
        raise UserError(f"cannot serve on {host}: {exc.strerror or exc}; check --host") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (a port in TIME_WAIT; a listener still fails)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on {host} is in use (another server?): stop it or choose another --port") \
                from None
        if exc.errno == errno.EACCES:
            raise UserError(f"port {port} needs administrator rights: choose one above 1023 with --port") from None
        raise UserError(f"cannot serve on {host}:{port}: {exc.strerror or exc}; check --host and --port") from None
    return sock
