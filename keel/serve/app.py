"""The OpenAI-compatible HTTP server: FastAPI routes over the continuous-batching engine.

Routes: GET /v1/models, POST /v1/chat/completions and /v1/completions (plain JSON or server-sent
events with "stream": true), GET /health, GET /metrics (Prometheus text).

This module owns the app and its routes only: what is served (`ServedModel`), the exception
handlers, the auth and body-parsing glue, `serve` and `background_server`. Building engine
requests and OpenAI responses is `keel.serve.openai`'s; the counters are `keel.serve.metrics`'.

A completions prompt is a string, token ids, or a batch of either; with `n` samples per prompt the
choices come back with index = prompt index * n + sample index, all run together on the engine.
Streaming interleaves the choices' chunks, each with its choice's index; logprobs and echo are
not streamed (a 400 with stream: true). `logprobs` (chat: with `top_logprobs`; completions: an int, with `echo` for the prompt's
own tokens) are the model's raw log-softmax, before temperature and penalties.

Every failure a client can cause gets the OpenAI error object with a 4xx status: 400 for a body
that is not JSON, a missing or mistyped field, a value out of range or a prompt that does not fit
the context (a prompt too long to fit whatever it tokenises to is refused before tokenising);
401 for a wrong API key (/metrics needs it too; /health never does); 403 for a Host header that
is not this server's while no key is set (a web page must not drive a key-less server through DNS
rebinding); 404 for an unknown model or route; 408 past `request_timeout_s`; 413 for a body over
the limit; 415 for a body not sent as application/json (a browser's form or text/plain "simple
request" must not reach the model); 429 with Retry-After when the waiting queue is full. Bodies
are read and validated by hand (not by FastAPI's dependency injection) so that each of these is
decided here. A server-side failure of one request is a logged 500 for that request alone,
counted in /metrics. A client that disconnects cancels its request, which frees its batch slot on
the engine's next step. Templating and tokenising run on a worker thread, so a big prompt never
stalls the event loop (and /health) for the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from keel.config import ServeConfig
from keel.errors import KeelError
from keel.engine.batching import Engine
from keel.serve.metrics import CountStatus, ServeMetrics
from keel.serve.openai import (ApiError, Generation, RequestBuilder, chat_chunks, chat_logprobs, chat_opening,
                               chat_reply, completion_chunks, completion_logprobs, completion_prompt_ids,
                               completion_reply, merge_usage, read_body, render_messages, run_all, streaming_response)
from keel.serve.schemas import ChatCompletionRequest, CompletionRequest, describe, error_body
from keel.serve.text import THINK_OPEN, TextStream

log = logging.getLogger("keel.serve")
ROUTES = ("/v1/models", "/v1/chat/completions", "/v1/completions", "/health", "/metrics")


@dataclass
class ServedModel:
    """A backend, its tokenizer and its engine, under the name clients use."""

    name: str
    backend: object
    tokenizer: object
    engine: Engine  # or a keel.engine.vllm_engine.VllmEngine, which is its own backend
    context: int

    @property
    def eos_id(self) -> int:
        return self.engine.eos_id


def load_served(model_dir: str | Path, cfg: ServeConfig) -> ServedModel:
    """Build the backend named by `cfg` over `model_dir` and an engine for it. vllm runs vLLM's
    own engine (`keel.engine.vllm_engine.VllmEngine`), which is the backend too."""
    from keel.engine.backends import load_backend, parse_spec
    from keel.models import load_tokenizer, special_ids

    name = cfg.model_name or Path(model_dir).resolve().name
    if cfg.backend.partition(":")[0] == "vllm":
        from keel.engine.vllm_engine import VllmEngine

        _, device, dtype = parse_spec(cfg.backend) if ":" in cfg.backend else ("vllm", cfg.device, cfg.dtype)
        tokenizer = load_tokenizer(model_dir)
        engine = VllmEngine(model_dir, eos_id=special_ids(tokenizer)[0], device=device, dtype=dtype,
                            max_batch=cfg.max_batch, max_waiting=cfg.max_waiting, max_context=cfg.max_context or None,
                            seed=cfg.seed)
        return make_served(engine, tokenizer, cfg, name, engine)
    backend, tokenizer = load_backend(model_dir, cfg.backend, cfg.device, cfg.dtype, cfg.provider)
    return make_served(backend, tokenizer, cfg, name)


def make_served(backend, tokenizer, cfg: ServeConfig, name: str, engine=None) -> ServedModel:
    """`backend` served under `name`, on `engine` (a continuous-batching `Engine` over the backend
    when None; a VllmEngine is its own backend)."""
    from keel.models import special_ids

    if cfg.max_context > backend.max_context:
        raise KeelError(f"max_context {cfg.max_context} exceeds the model's {backend.max_context} positions: "
                        f"set it to at most {backend.max_context} (0 uses the model's)", field="max_context")
    eos, _ = special_ids(tokenizer)
    engine = engine or Engine(backend, eos_id=eos, max_batch=cfg.max_batch, max_waiting=cfg.max_waiting)
    return ServedModel(name, backend, tokenizer, engine, cfg.max_context or backend.max_context)


# ----------------------------------------------------------------------------- glue


def _add_error_handlers(app: FastAPI) -> None:
    """Every error leaves as an OpenAI error object, FastAPI's own ones included."""

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return JSONResponse(error_body(str(e.detail), "invalid_request_error", None, code), e.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e: RequestValidationError):  # FastAPI's 422, as OpenAI's 400
        return JSONResponse(error_body(str(e.errors()[0].get("msg", "invalid request"))), 400)

    @app.exception_handler(Exception)
    async def _internal_error(request, e: Exception):  # a bug or a broken backend, never the client's input
        log.exception("internal error")
        return JSONResponse(error_body(f"internal error: {type(e).__name__}", "server_error"), 500)


def _auth(request: HttpRequest, api_key: str) -> None:
    """401 unless the request carries `api_key` as a bearer token (any request, when it is "")."""
    if not api_key:
        return
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    # compare_digest: the time taken must not tell how much of a guessed key was right
    if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), api_key.encode()):
        raise ApiError(401, "invalid API key: send it as 'Authorization: Bearer KEY'", "invalid_api_key")


_LOOPBACK = ("localhost", "127.0.0.1", "::1")
_ANY_ADDRESS = ("0.0.0.0", "::", "")


class HostCheck:
    """ASGI middleware: 403 for a Host header naming another server, when no API key is set and
    the server is bound to one address. A page on evil.example whose name is re-pointed at
    127.0.0.1 (DNS rebinding) reaches a loopback server with "Host: evil.example"; the bound
    address, and loopback names for a loopback server, are what a real client sends."""

    def __init__(self, app, cfg: ServeConfig):
        self.app = app
        self.allowed = None
        if not cfg.api_key and cfg.host not in _ANY_ADDRESS:
            self.allowed = {cfg.host.lower(), *(_LOOPBACK if cfg.host in _LOOPBACK else ())}

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.allowed is not None:
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1").lower()
            name = host[1:host.find("]")] if host.startswith("[") else host.rpartition(":")[0] or host
            if name not in self.allowed:
                response = ApiError(403, f"the Host header {host!r} is not this server's; send "
                                         f"Host: {sorted(self.allowed)[0]} (or set an api_key)", "host_not_allowed").response()
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


async def _parse(request: HttpRequest, schema, cfg: ServeConfig, model_name: str):
    """The authorised, size-checked, validated body, for the model this server serves."""
    _auth(request, cfg.api_key)
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        raise ApiError(415, f"send the body as JSON with 'Content-Type: application/json' (got {media_type or 'none'!r})",
                       "unsupported_media_type")
    raw = await read_body(request, cfg.max_body_bytes)
    try:
        body = schema.model_validate_json(raw)
    except ValidationError as e:
        message, param = describe(e)
        raise ApiError(400, message, "invalid_value", param) from None
    if body.model != model_name:
        raise ApiError(404, f"the model {body.model!r} does not exist; this server serves {model_name!r}",
                       "model_not_found", "model")
    return body


# ----------------------------------------------------------------------------- the app


def create_app(served: ServedModel, cfg: ServeConfig = ServeConfig()) -> FastAPI:
    """The FastAPI app. Its lifespan starts the engine's thread and stops it on shutdown."""
    metrics = ServeMetrics()
    requests = RequestBuilder(served.context, served.backend.vocab_size, served.backend.device,
                              cfg.default_max_tokens, cfg.seed)
    tok = served.tokenizer
    # One worker: tokenisers are not safe to share between threads, and a queue of big prompts
    # waits there rather than occupying every thread of the pool.
    tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="keel-tokenize")
    # No token is longer than the tokenizer's longest vocabulary entry, so a prompt of more
    # characters than context x that cannot fit: refused without tokenising it.
    max_prompt_chars = served.context * max(map(len, tok.get_vocab()), default=1)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        served.engine.start()
        try:
            yield
        finally:
            served.engine.stop()
            tokenizing.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="keel", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(HostCheck, cfg=cfg)
    app.add_middleware(CountStatus, metrics=metrics, routes=ROUTES)  # added last: outermost, counts the 403s too
    _add_error_handlers(app)

    async def off_loop(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(tokenizing, fn, *args)

    def check_prompt_chars(chars: int, param: str) -> None:
        if chars > max_prompt_chars:
            raise ApiError(400, f"the prompt has {chars} characters, more than can fit the model's context of "
                                f"{served.context} tokens (at most {max_prompt_chars} characters)",
                           "context_length_exceeded", param)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": served.name, "backend": served.backend.name}

    @app.get("/metrics")
    async def prometheus(request: HttpRequest):
        _auth(request, cfg.api_key)
        return PlainTextResponse(metrics.render(served.engine), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: HttpRequest):
        _auth(request, cfg.api_key)
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": 0, "owned_by": "keel",
                                            "max_model_len": served.context}]}

    def submit_all(reqs, streams) -> list[Generation]:
        """Queue every choice, or none (a 4xx)."""
        gens = [Generation(req, stream, metrics, cfg.request_timeout_s) for req, stream in zip(reqs, streams)]
        Generation.submit_all(served.engine, gens)
        return gens

    def stream_checks(body) -> None:
        if body.stream and body.logprobs is not None and body.logprobs is not False:
            raise ApiError(400, "logprobs is not supported with stream: true", "invalid_value", "logprobs")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest):
        body = await _parse(request, ChatCompletionRequest, cfg, served.name)
        stream_checks(body)
        check_prompt_chars(sum(len(m.text()) for m in body.messages), "messages")

        def tokenize():
            text = render_messages(tok, body.messages)
            return text, tok.encode(text, add_special_tokens=False)

        text, ids = await off_loop(tokenize)
        reqs = [requests.build(body, ids, i) for i in range(body.n)]
        # a template that opens the think block itself: the model's first tokens are reasoning
        streams = [TextStream(tok, body.stop_list(), in_think=text.rstrip().endswith(THINK_OPEN)) for _ in reqs]
        gens, reply = submit_all(reqs, streams), chat_reply(served.name)
        if body.stream:
            return streaming_response(request, gens, reply, chat_chunks, include_usage=body.include_usage(),
                                      timeout_s=cfg.request_timeout_s, opening=[chat_opening(reply)])
        finishes = await run_all(request, gens, cfg.request_timeout_s)
        choices = []
        for i, (gen, finish) in enumerate(zip(gens, finishes)):
            message = {"role": "assistant", "content": gen.text.sent_content}
            if gen.text.sent_reasoning:
                message["reasoning_content"] = gen.text.sent_reasoning
            choices.append(reply.choice(i, {"message": message}, finish, chat_logprobs(tok, gen, served.eos_id)))
        return {**reply.chunk({}, None, "chat.completion"), "choices": choices, "usage": merge_usage(gens, 1)}

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        body = await _parse(request, CompletionRequest, cfg, served.name)
        prompts = body.prompts()
        stream_checks(body)
        for p in prompts:
            if isinstance(p, str):
                check_prompt_chars(len(p), "prompt")
        ids = await off_loop(lambda: [completion_prompt_ids(tok, p) for p in prompts])
        reqs = [requests.build(body, p_ids, k * body.n + i) for k, p_ids in enumerate(ids) for i in range(body.n)]
        streams = [TextStream(tok, body.stop_list(), reasoning=False) for _ in reqs]
        gens, reply = submit_all(reqs, streams), completion_reply(served.name)
        if body.stream:
            return streaming_response(request, gens, reply, completion_chunks, include_usage=body.include_usage(),
                                      timeout_s=cfg.request_timeout_s, prompts=len(prompts))
        finishes = await run_all(request, gens, cfg.request_timeout_s)
        choices = []
        for j, (gen, finish) in enumerate(zip(gens, finishes)):
            text = gen.text.sent_content
            if body.echo:
                prompt = prompts[j // body.n]
                text = (prompt if isinstance(prompt, str) else tok.decode(prompt, skip_special_tokens=False)) + text
            choices.append(reply.choice(j, {"text": text}, finish,
                                        completion_logprobs(tok, gen, served.eos_id, body.echo)))
        return {**reply.chunk({}, None), "choices": choices, "usage": merge_usage(gens, len(prompts))}

    return app


# ----------------------------------------------------------------------------- running it


def serve(model_dir: str | Path, cfg: ServeConfig) -> None:
    """Load the model and serve it with uvicorn until interrupted."""
    import uvicorn

    served = load_served(model_dir, cfg)
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and not cfg.api_key:
        log.warning("serving on %s without an API key: anyone who can reach it can use it", cfg.host)
    print(f"serving {served.name!r} ({served.backend.name}, context {served.context}) "
          f"on http://{cfg.host}:{cfg.port}/v1", flush=True)
    uvicorn.run(create_app(served, cfg), host=cfg.host, port=cfg.port, log_level="warning")


@contextlib.contextmanager
def background_server(app: FastAPI, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0):
    """Run `app` with uvicorn on a thread (tests, benchmarks); yields its base URL. port 0 picks a
    free one."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="keel-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout)
