"""The OpenAI-compatible HTTP server: FastAPI routes over the continuous-batching engine.

Routes: GET /v1/models, POST /v1/chat/completions and /v1/completions (plain JSON or server-sent
events with "stream": true), GET /health, GET /metrics (Prometheus text).

Every failure a client can cause gets the OpenAI error object with a 4xx status: 400 for a body
that is not JSON, a missing or mistyped field, a value out of range or a prompt that does not fit
the context; 401 for a wrong API key; 404 for an unknown model or route; 413 for a body over the
limit. Bodies are read and validated by hand (not by FastAPI's dependency injection) so that each
of these is decided here. A client that disconnects cancels its request, which frees its batch slot
on the engine's next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import random
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from keel.config import ServeConfig
from keel.errors import KeelError
from keel.rollout import SamplingParams
from keel.serve.batching import Engine, Request
from keel.serve.schemas import ChatCompletionRequest, CompletionRequest, describe, error_body
from keel.serve.text import THINK_OPEN, TextStream, render_chat

log = logging.getLogger("keel.serve")
ROUTES = ("/v1/models", "/v1/chat/completions", "/v1/completions", "/health", "/metrics")


class ApiError(Exception):
    """A request the server refuses, with its HTTP status and OpenAI error fields."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.type = status, message, code, param, type_

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(error_body(self.message, self.type, self.param, self.code), self.status, headers=headers)


@dataclass
class ServedModel:
    """A backend, its tokenizer and its engine, under the name clients use."""

    name: str
    backend: object
    tokenizer: object
    engine: Engine
    context: int

    @property
    def eos_id(self) -> int:
        return self.engine.eos_id


def load_served(model_dir: str | Path, cfg: ServeConfig) -> ServedModel:
    """Build the backend named by `cfg` over `model_dir` and an engine for it."""
    from keel.serve.backends import load_backend

    backend, tokenizer = load_backend(model_dir, cfg.backend, cfg.device, cfg.dtype, cfg.provider)
    return make_served(backend, tokenizer, cfg, cfg.model_name or Path(model_dir).resolve().name)


def make_served(backend, tokenizer, cfg: ServeConfig, name: str) -> ServedModel:
    from keel.models import special_ids

    if cfg.max_context > backend.max_context:
        raise KeelError(f"--max-context {cfg.max_context} exceeds the model's {backend.max_context} positions")
    eos, _ = special_ids(tokenizer)
    return ServedModel(name, backend, tokenizer, Engine(backend, eos_id=eos, max_batch=cfg.max_batch),
                       cfg.max_context or backend.max_context)


# ----------------------------------------------------------------------------- helpers


class _Metrics:
    def __init__(self):
        self.status = Counter()            # (path, status) -> responses
        self.latency_sum, self.latency_n = 0.0, 0
        self.ttft_sum, self.ttft_n = 0.0, 0
        self.lock = threading.Lock()

    def render(self, engine: Engine) -> str:
        s = engine.stats
        lines = ["# TYPE keel_http_responses_total counter"]
        lines += [f'keel_http_responses_total{{path="{p}",status="{c}"}} {n}' for (p, c), n in sorted(self.status.items())]
        gauges = {"keel_requests_running": engine.running, "keel_requests_waiting": engine.waiting}
        counters = {"keel_requests_admitted_total": s.admitted, "keel_requests_finished_total": s.finished,
                    "keel_requests_cancelled_total": s.cancelled, "keel_prompt_tokens_total": s.prompt_tokens,
                    "keel_generation_tokens_total": s.generated_tokens, "keel_decode_steps_total": s.decode_steps,
                    "keel_decode_rows_total": s.decode_rows}
        for name, v in gauges.items():
            lines += [f"# TYPE {name} gauge", f"{name} {v}"]
        for name, v in counters.items():
            lines += [f"# TYPE {name} counter", f"{name} {v}"]
        for name, total, n in (("keel_request_seconds", self.latency_sum, self.latency_n),
                               ("keel_time_to_first_token_seconds", self.ttft_sum, self.ttft_n)):
            lines += [f"# TYPE {name} summary", f"{name}_sum {total:.6f}", f"{name}_count {n}"]
        return "\n".join(lines) + "\n"


class _CountStatus:
    """ASGI middleware counting responses by route and status, for /metrics."""

    def __init__(self, app, metrics: _Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in ROUTES else "other"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                with self.metrics.lock:
                    self.metrics.status[(path, message["status"])] += 1
            await send(message)

        await self.app(scope, receive, counting_send)


async def _read_body(request: HttpRequest, limit: int) -> bytes:
    too_big = ApiError(413, f"the request body is over the server's limit of {limit} bytes", "request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_big
    return bytes(body)


def _render_chat(tokenizer, messages) -> str:
    try:
        return render_chat(tokenizer, [{"role": m.role, "content": m.text()} for m in messages])
    except KeelError as e:
        raise ApiError(400, str(e), "invalid_messages", "messages") from None


# ----------------------------------------------------------------------------- the app


def create_app(served: ServedModel, cfg: ServeConfig = ServeConfig()) -> FastAPI:
    """The FastAPI app. Its lifespan starts the engine's thread and stops it on shutdown."""
    metrics = _Metrics()
    seeds = random.Random(cfg.seed)
    seeds_lock = threading.Lock()
    tok = served.tokenizer

    @contextlib.asynccontextmanager
    async def lifespan(app):
        served.engine.start()
        try:
            yield
        finally:
            served.engine.stop()

    app = FastAPI(title="keel", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_CountStatus, metrics=metrics)

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

    def auth(request: HttpRequest) -> None:
        if not cfg.api_key:
            return
        given = request.headers.get("authorization", "")
        scheme, _, key = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), cfg.api_key.encode()):
            raise ApiError(401, "invalid API key: send it as 'Authorization: Bearer KEY'", "invalid_api_key")

    async def parse(request: HttpRequest, schema):
        auth(request)
        body = await _read_body(request, cfg.max_body_bytes)
        try:
            req = schema.model_validate_json(body)
        except ValidationError as e:
            message, param = describe(e)
            raise ApiError(400, message, "invalid_value", param) from None
        if req.model != served.name:
            raise ApiError(404, f"the model {req.model!r} does not exist; this server serves {served.name!r}",
                           "model_not_found", "model")
        return req

    def make_request(body, prompt: list[int]) -> Request:
        P = len(prompt)
        if P == 0:
            raise ApiError(400, "the prompt is empty", "invalid_value", "prompt")
        if P >= served.context:
            raise ApiError(400, f"the prompt has {P} tokens but the model's context is {served.context} tokens",
                           "context_length_exceeded", "messages")
        max_tokens = body.max_tokens if body.max_tokens is not None else min(cfg.default_max_tokens, served.context - P)
        if P + max_tokens > served.context:
            raise ApiError(400, f"prompt ({P} tokens) + max_tokens ({max_tokens}) exceeds the model's context of "
                           f"{served.context} tokens; lower max_tokens", "context_length_exceeded", "max_tokens")
        if min(prompt) < 0 or max(prompt) >= served.backend.vocab_size:
            raise ApiError(400, f"the prompt has a token id outside [0, {served.backend.vocab_size})", "invalid_value", "prompt")
        temperature = 1.0 if body.temperature is None else body.temperature
        params = SamplingParams(temperature, 1.0 if body.top_p is None else body.top_p, max_tokens)
        generator = None
        if temperature > 0:
            if body.seed is None:
                with seeds_lock:
                    seed = seeds.getrandbits(63)
            else:
                seed = body.seed
            generator = torch.Generator(device=served.backend.device)
            generator.manual_seed(seed % 2**63)
        return Request(prompt, params, generator)

    def submit(req: Request) -> tuple[asyncio.Queue, float]:
        """Queue `req` on the engine; its tokens (then None) arrive on the returned queue. Done
        before any response starts, so a refusal is still a clean 400."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def put(item):
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening
                loop.call_soon_threadsafe(queue.put_nowait, item)

        req.on_token = lambda r, t: put(t)
        req.on_done = lambda r: put(None)
        try:
            served.engine.submit(req)
        except KeelError as e:
            raise ApiError(400, str(e), "invalid_value") from None
        return queue, time.monotonic()

    async def run(request: HttpRequest, req: Request, ticket, stream: TextStream, usage: dict):
        """Yield (reasoning delta, content delta, finish_reason or None) until `req` ends; `usage`
        is filled in at the end."""
        queue, start = ticket
        ids: list[int] = []
        try:
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        req.cancel()
                        return
                    continue
                if item is None:
                    if req.finish_reason == "error":
                        raise RuntimeError(f"generation failed: {req.error}")
                    if req.finish_reason == "cancelled":
                        return
                    d_r, d_c, _ = stream.push(ids, final=True)
                    yield d_r, d_c, req.finish_reason
                    break
                ids.append(item)
                if len(ids) == 1:
                    with metrics.lock:
                        metrics.ttft_sum += time.monotonic() - start
                        metrics.ttft_n += 1
                d_r, d_c, stopped = stream.push(ids)
                if stopped:  # a stop string: end here, the engine drops the row
                    req.cancel()
                    yield d_r, d_c, "stop"
                    break
                if d_r or d_c:
                    yield d_r, d_c, None
        finally:
            req.cancel()  # no-op when finished; frees the slot when the client went away
            with metrics.lock:
                metrics.latency_sum += time.monotonic() - start
                metrics.latency_n += 1
            usage.update(prompt_tokens=len(req.prompt), completion_tokens=len(ids),
                         total_tokens=len(req.prompt) + len(ids))

    def sse(obj) -> str:
        import json

        return f"data: {json.dumps(obj)}\n\n"

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": served.name, "backend": served.backend.name}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(served.engine), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: HttpRequest):
        auth(request)
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": 0, "owned_by": "keel",
                                            "max_model_len": served.context}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest):
        body = await parse(request, ChatCompletionRequest)
        text = _render_chat(tok, body.messages)
        req = make_request(body, tok.encode(text, add_special_tokens=False))
        stream = TextStream(tok, body.stop_list(), in_think=text.rstrip().endswith(THINK_OPEN))
        ticket = submit(req)
        rid, created, usage = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), {}

        def chunk(delta, finish=None):
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": served.name,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            async def events():
                yield sse(chunk({"role": "assistant", "content": ""}))
                async for d_r, d_c, finish in run(request, req, ticket, stream, usage):
                    delta = {}
                    if d_r:
                        delta["reasoning_content"] = d_r
                    if d_c:
                        delta["content"] = d_c
                    if delta:
                        yield sse(chunk(delta))
                    if finish:
                        yield sse(chunk({}, finish))
                if include_usage:
                    yield sse({**chunk({}), "choices": [], "usage": usage})
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

        finish = None
        async for _, _, f in run(request, req, ticket, stream, usage):
            finish = f or finish
        message = {"role": "assistant", "content": stream.sent_content}
        if stream.sent_reasoning:
            message["reasoning_content"] = stream.sent_reasoning
        return {"id": rid, "object": "chat.completion", "created": created, "model": served.name,
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
                "usage": usage}

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        body = await parse(request, CompletionRequest)
        prompt = body.prompt
        if isinstance(prompt, list) and isinstance(prompt[0], str):
            prompt = prompt[0]
        ids = tok.encode(prompt, add_special_tokens=False) if isinstance(prompt, str) else list(prompt)
        req = make_request(body, ids)
        stream = TextStream(tok, body.stop_list(), reasoning=False)
        ticket = submit(req)
        rid, created, usage = f"cmpl-{uuid.uuid4().hex}", int(time.time()), {}

        def choice(text, finish=None):
            return {"id": rid, "object": "text_completion", "created": created, "model": served.name,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            async def events():
                async for _, d_c, finish in run(request, req, ticket, stream, usage):
                    yield sse(choice(d_c, finish))
                if include_usage:
                    yield sse({**choice(""), "choices": [], "usage": usage})
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

        finish = None
        async for _, _, f in run(request, req, ticket, stream, usage):
            finish = f or finish
        return {**choice(stream.sent_content, finish), "usage": usage}

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
