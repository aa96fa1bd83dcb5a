"""`minigpt serve`: the OpenAI-compatible server and web chat of serve/."""

from __future__ import annotations

import dataclasses
import os
import sys

from minigpt.common import config as configlib
from minigpt.serve.serve import API_KEY_ENV, ServeConfig, bind, is_loopback, load_app, server_modules


def add_arguments(parser) -> None:
    parser.add_argument("--config", help="TOML, YAML or JSON file of settings (flags override it)")
    configlib.add_arguments(parser, ServeConfig)


def main(args) -> None:
    cfg = configlib.config_from_args(ServeConfig, args)
    if not cfg.api_key and os.environ.get(API_KEY_ENV):
        cfg = dataclasses.replace(cfg, api_key=os.environ[API_KEY_ENV])
    _, uvicorn = server_modules()
    sock = bind(cfg.host, cfg.port)
    app, name = load_app(cfg)
    if not is_loopback(cfg.host) and not cfg.api_key:
        print(f"warning: serving on {cfg.host} without an API key: anyone who can reach this port can use the "
              f"model (set --api-key or ${API_KEY_ENV})", file=sys.stderr)
    shown = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    print(f"serving {name} at http://{shown}:{sock.getsockname()[1]}/ (web chat) and /v1 (OpenAI API); Ctrl-C stops",
          file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level=cfg.log_level, timeout_graceful_shutdown=5))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
