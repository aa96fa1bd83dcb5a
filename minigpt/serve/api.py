"""The HTTP layer of `minigpt serve`: OpenAI-shaped requests in, engine jobs out, answers and SSE streams back.

Built by `build_app` (serve.py calls it; the pieces without FastAPI are in protocol.py). Request bodies
are pydantic models that accept unknown fields and explicit nulls, as OpenAI's API does; every error, our own or
FastAPI's, leaves in OpenAI's shape `{"error": {"message", "type", "param", "code"}}` with a 4xx status for bad
input. Requests become engine jobs through jobs.Server; a client that goes away has its job cancelled: a
stream when Starlette stops the response generator, a plain request when its disconnect watcher sees the
disconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from minigpt.serve.jobs import ClientGone, Server, TextOffsets, sse_event, usage_counts
from minigpt.serve.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    Gate,
    TokenizeRequest,
    chat_page,
    validation_error,
)
from minigpt.serve.scheduler import Choice, Done, Job, PromptScores, Update
from minigpt.text.chat_format import (
    ROLES_HINT,
    Message,
    chat_role,
    chat_template,
    render,
)

log = logging.getLogger("minigpt.serve.serve")

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


# ----------------------------------------------------------------------------------------------------------------
# /v1/chat/completions


def _chat_messages(body: ChatRequest) -> list[Message]:
    out = []
    for i, m in enumerate(body.messages):
        role = chat_role(m.role)
        if role is None:
            raise APIError(400, f"Unsupported role {m.role!r}: {ROLES_HINT}.",
                           param=f"messages.[{i}].role", code="invalid_value")
        content = m.content
        if isinstance(content, list):
            if any(p.type != "text" or p.text is None for p in content):
                raise APIError(400, "Only text content parts are supported.", param=f"messages.[{i}].content",
                               code="invalid_value")
            content = "\n".join(p.text for p in content)  # as fine-tuning reads such content
        out.append(Message(role, content or ""))
    return out


async def chat_completions(server: Server, body: ChatRequest, request: Request):  # noqa: C901 (docs/code.md)
    server.check_model(body.model)
    if server.chat_stop is None:
        raise APIError(400, "This model has no chat format (it was not fine-tuned with `minigpt sft`): use "
                            "/v1/completions.", param="messages", code="chat_not_supported")
    # Tokenizing a long text takes a while (0.5 s per MB): off the event loop, so other streams go on meanwhile.
    prompt, _ = await asyncio.to_thread(render, server.tokenizer, _chat_messages(body), add_generation_prompt=True)
    server.check_prompt(prompt, "messages", generating=True)
    k = (body.top_logprobs or 0) if body.logprobs else 0
    params = server.sampling(body, server.max_tokens(body, len(prompt), server.window, least=1), server.chat_stop, k)
    stop = server.stop_strings(body)
    job, channel = server.submit([Choice(prompt, p, stop) for p in params], len(prompt))
    ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": ident, "object": "chat.completion", "created": created, "model": server.name}

    def logprob_items(update: Update) -> list[dict]:
        out = []
        for token, lp, top in zip(update.tokens, update.logprobs, update.top_logprobs, strict=True):
            alternatives = [{"token": server.token_str(t), "logprob": v,
                             "bytes": list(server.tokenizer.token_bytes(t))} for t, v in top]
            out.append({"token": server.token_str(token), "logprob": lp,
                        "bytes": list(server.tokenizer.token_bytes(token)), "top_logprobs": alternatives})
        return out

    if body.stream:
        chunk_head = {**head, "object": "chat.completion.chunk"}
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def chunks():
            for i in range(len(params)):
                yield {**chunk_head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                  "logprobs": None, "finish_reason": None}]}
            async for item in server.items(channel):
                if isinstance(item, Update):
                    if item.text or (body.logprobs and item.tokens):
                        lp = {"content": logprob_items(item)} if body.logprobs else None
                        yield {**chunk_head, "choices": [{"index": item.index, "delta": {"content": item.text},
                                                          "logprobs": lp, "finish_reason": None}]}
                    if item.finish_reason:
                        yield {**chunk_head, "choices": [{"index": item.index, "delta": {}, "logprobs": None,
                                                          "finish_reason": item.finish_reason}]}
                elif isinstance(item, Done) and include_usage:
                    yield {**chunk_head, "choices": [], "usage": usage_counts(len(prompt), item.completion_tokens)}

        return _streaming(server, job, chunks())

    texts = [[] for _ in params]
    logprobs: list[list[dict]] = [[] for _ in params]
    finish: list[str | None] = [None] * len(params)
    usage = None
    for item in await server.collect(request, job, channel):
        if isinstance(item, Update):
            texts[item.index].append(item.text)
            if body.logprobs:
                logprobs[item.index] += logprob_items(item)
            finish[item.index] = item.finish_reason or finish[item.index]
        elif isinstance(item, Done):
            usage = usage_counts(len(prompt), item.completion_tokens)
    choices = [{"index": i, "message": {"role": "assistant", "content": "".join(texts[i])},
                "logprobs": {"content": logprobs[i]} if body.logprobs else None, "finish_reason": finish[i]}
               for i in range(len(params))]
    return JSONResponse({**head, "choices": choices, "usage": usage})


# ----------------------------------------------------------------------------------------------------------------
# /v1/completions


def _prompts(server: Server, prompt) -> list[list[int]]:
    """A string, a list of strings, a list of ids or a list of id lists -> the prompts' ids."""
    if isinstance(prompt, str):
        return [server.encode(prompt) if prompt else [server.tokenizer.eot_id]]  # "" starts a new document
    if not prompt:
        raise APIError(400, "The prompt is empty.", param="prompt", code="invalid_value")
    if isinstance(prompt[0], int):
        return [list(prompt)]
    if isinstance(prompt[0], str):
        return [server.encode(p) if p else [server.tokenizer.eot_id] for p in prompt]
    return [list(p) for p in prompt]


async def completions(server: Server, body: CompletionRequest, request: Request):  # noqa: C901 (docs/code.md)
    server.check_model(body.model)
    prompts = await asyncio.to_thread(_prompts, server, body.prompt)  # off the event loop, as in chat
    asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    for ids in prompts:
        server.check_prompt(ids, "prompt", generating=asked != 0)
    max_tokens = server.max_tokens(body, max(map(len, prompts)), COMPLETION_DEFAULT_MAX_TOKENS, least=0)
    want_logprobs = body.logprobs is not None
    k = body.logprobs or 0
    stop = server.stop_strings(body)
    choices = []
    for ids in prompts:
        choices += [Choice(ids, p, stop) for p in server.sampling(body, max_tokens, server.turn_stop, k)]
    score = k if (body.echo and want_logprobs) else None
    prompt_tokens = sum(len(ids) for ids in prompts)
    job, channel = server.submit(choices, prompt_tokens, score_prompts=score)
    ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": ident, "object": "text_completion", "created": created, "model": server.name}
    offsets = [TextOffsets(server.tokenizer.token_bytes) for _ in choices]
    echoed = [not body.echo] * len(choices)

    def top_dict(top, token: int, lp: float) -> dict[str, float]:
        out = {server.token_str(t): v for t, v in top}
        out.setdefault(server.token_str(token), lp)  # OpenAI: the sampled token always appears
        return out

    def logprobs_of(i: int, tokens, lps, tops) -> dict:
        return {"tokens": [server.token_str(t) for t in tokens], "token_logprobs": list(lps),
                "top_logprobs": [None if top is None else top_dict(top, t, lp)
                                 for t, lp, top in zip(tokens, lps, tops, strict=True)],
                "text_offset": offsets[i].take(tokens)}

    def echo_piece(i: int, scores: PromptScores | None) -> tuple[str, dict | None]:
        echoed[i] = True
        ids = choices[i].prompt
        text = server.tokenizer.decode(ids)
        if not want_logprobs:
            return text, None
        if scores is None:  # echo without prompt scores cannot happen with logprobs; keep the shape anyway
            scores = PromptScores(i, [None] * len(ids), [None] * len(ids))
        return text, logprobs_of(i, ids, scores.logprobs, scores.top_logprobs)

    def pieces(item) -> list[tuple[int, str, dict | None, str | None]]:
        """(index, text, logprobs, finish_reason) for the output an item adds."""
        out = []
        if isinstance(item, PromptScores):
            out.append((item.index, *echo_piece(item.index, item), None))
        elif isinstance(item, Update):
            if not echoed[item.index]:
                out.append((item.index, *echo_piece(item.index, None), None))
            lp = logprobs_of(item.index, item.tokens, item.logprobs, item.top_logprobs) if want_logprobs else None
            out.append((item.index, item.text, lp, item.finish_reason))
        return out

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def chunks():
            async for item in server.items(channel):
                for index, text, lp, finish in pieces(item):
                    if text or lp is not None and lp["tokens"] or finish:
                        yield {**head, "choices": [{"index": index, "text": text, "logprobs": lp,
                                                    "finish_reason": finish}]}
                if isinstance(item, Done) and include_usage:
                    yield {**head, "choices": [], "usage": usage_counts(prompt_tokens, item.completion_tokens)}

        return _streaming(server, job, chunks())

    texts: list[list[str]] = [[] for _ in choices]
    merged: list[dict | None] = [None] * len(choices)
    finish: list[str | None] = [None] * len(choices)
    usage = None
    for item in await server.collect(request, job, channel):
        for index, text, lp, reason in pieces(item):
            texts[index].append(text)
            finish[index] = reason or finish[index]
            if lp is not None:
                if merged[index] is None:
                    merged[index] = lp
                else:
                    for key in lp:
                        merged[index][key] += lp[key]
        if isinstance(item, Done):
            usage = usage_counts(prompt_tokens, item.completion_tokens)
    out = [{"index": i, "text": "".join(texts[i]), "logprobs": merged[i] if want_logprobs else None,
            "finish_reason": finish[i]} for i in range(len(choices))]
    for i in range(len(choices)):
        if want_logprobs and out[i]["logprobs"] is None:
            out[i]["logprobs"] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    return JSONResponse({**head, "choices": out, "usage": usage})


def _json_error(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


def _streaming(server: Server, job: Job, chunks) -> StreamingResponse:
    """Server-sent events from an async generator of chunks: `data: <json>` each, then `data: [DONE]`. An error
    once the stream has started becomes an error event (the status line is already sent); however the stream
    ends, the client gone included, the job is cancelled (a no-op when it finished) and its rows freed."""

    async def events():
        try:
            async for chunk in chunks:
                yield sse_event(chunk)
            yield "data: [DONE]\n\n"
        except APIError as exc:
            yield sse_event(exc.body())
        except Exception:  # a bug: the client still gets an error event rather than a stream cut without [DONE]
            log.exception("streaming a response failed")
            yield sse_event(APIError(500, "Internal error while streaming.", type="server_error",
                                code="engine_error").body())
        finally:
            server.scheduler.cancel(job)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ----------------------------------------------------------------------------------------------------------------
# The application


def build_app(model, tokenizer, cfg, name: str) -> FastAPI:  # noqa: C901 (docs/code.md)
    server = Server(model, tokenizer, cfg, name)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        server.scheduler.start()
        try:
            yield
        finally:
            server.scheduler.stop()

    app = FastAPI(title="minigpt", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return _json_error(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return _json_error(validation_error(list(exc.errors())))

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, exc: ClientGone):
        return Response(status_code=499)  # nobody reads it: the status nginx logs for "client closed request"

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _json_error(APIError(exc.status_code, str(exc.detail), code=kind))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        return _json_error(APIError(500, f"Internal error: {type(exc).__name__}", type="server_error"))

    @app.post("/v1/chat/completions")
    async def _chat(body: ChatRequest, request: Request):
        return await chat_completions(server, body, request)

    @app.post("/v1/completions")
    async def _completions(body: CompletionRequest, request: Request):
        return await completions(server, body, request)

    def model_card() -> dict[str, Any]:
        return {"id": server.name, "object": "model", "created": server.created, "owned_by": "minigpt",
                "max_model_len": server.window}

    @app.get("/v1/models")
    async def _models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def _model(model: str):
        server.check_model(model)
        return model_card()

    @app.post("/tokenize")
    async def _tokenize(body: TokenizeRequest):
        server.check_model(body.model)
        if body.messages is not None:
            if server.chat_stop is None:
                raise APIError(400, "This model has no chat format.", param="messages", code="chat_not_supported")
            add = True if body.add_generation_prompt is None else body.add_generation_prompt
            ids, _ = await asyncio.to_thread(render, tokenizer, _chat_messages(body), add_generation_prompt=add)
        elif body.prompt is not None:
            ids = await asyncio.to_thread(server.encode, body.prompt)
        else:
            raise APIError(400, "Give `prompt` or `messages`.", param="prompt", code="missing_required_parameter")
        strs = [server.token_str(t) for t in ids] if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": server.window, "tokens": ids, "token_strs": strs}

    @app.post("/detokenize")
    async def _detokenize(body: DetokenizeRequest):
        server.check_model(body.model)
        if body.tokens and (min(body.tokens) < 0 or max(body.tokens) >= tokenizer.n_vocab):
            raise APIError(400, f"Token ids must be in [0, {tokenizer.n_vocab}).", param="tokens",
                           code="invalid_value")
        return {"prompt": tokenizer.decode(body.tokens)}

    @app.get("/tokenizer_info")
    async def _tokenizer_info():
        info = {"tokenizer_class": "minigpt.Tokenizer", "name": tokenizer.name, "hash": tokenizer.hash,
                "vocab_size": tokenizer.n_vocab, "model_max_length": server.window,
                "eos_token": "<|endoftext|>", "bos_token": None, "pad_token": None,
                "special_tokens": tokenizer.special_tokens}
        if server.chat_stop is not None:  # our chat format as a Jinja template, for clients that render it
            info["chat_template"] = chat_template(tokenizer)
        return info

    @app.get("/health")
    async def _health():
        alive = server.scheduler.alive
        body = {"status": "ok" if alive else "error", "model": server.name,
                "running": server.scheduler.stats.running, "queued": server.scheduler.queued,
                "max_batch": server.scheduler.max_batch, "max_queue": server.scheduler.max_queue}
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def _metrics():
        return PlainTextResponse(server.metrics.render(server.scheduler),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/")
    async def _page():
        html, csp = chat_page()
        return HTMLResponse(html, headers={"Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff",
                                           "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"})

    app.add_middleware(Gate, api_key=cfg.api_key, max_bytes=cfg.max_request_bytes, metrics=server.metrics)
    if cfg.cors_origin:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cfg.cors_origin), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    return app
