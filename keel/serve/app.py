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
the context; 401 for a wrong API key; 404 for an unknown model or route; 413 for a body over the
limit. Bodies are read and validated by hand (not by FastAPI's dependency injection) so that each
of these is decided here. A client that disconnects cancels its request, which frees its batch slot
on the engine's next step.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import threading
import time
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
    engine: Engine
    context: int

    @property
    def eos_id(self) -> int:
        return self.engine.eos_id


def load_served(model_dir: str | Path, cfg: ServeConfig) -> ServedModel:
    """Build the backend named by `cfg` over `model_dir` and an engine for it."""
    from keel.engine.backends import load_backend

    backend, tokenizer = load_backend(model_dir, cfg.backend, cfg.device, cfg.dtype, cfg.provider)
    return make_served(backend, tokenizer, cfg, cfg.model_name or Path(model_dir).resolve().name)


def make_served(backend, tokenizer, cfg: ServeConfig, name: str) -> ServedModel:
    from keel.models import special_ids

    if cfg.max_context > backend.max_context:
        raise KeelError(f"max_context {cfg.max_context} exceeds the model's {backend.max_context} positions: "
                        f"set it to at most {backend.max_context} (0 uses the model's)", field="max_context")
    eos, _ = special_ids(tokenizer)
    return ServedModel(name, backend, tokenizer, Engine(backend, eos_id=eos, max_batch=cfg.max_batch),
                       cfg.max_context or backend.max_context)


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


async def _parse(request: HttpRequest, schema, cfg: ServeConfig, model_name: str):
    """The authorised, size-checked, validated body, for the model this server serves."""
    _auth(request, cfg.api_key)
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

    @contextlib.asynccontextmanager
    async def lifespan(app):
        served.engine.start()
        try:
            yield
        finally:
            served.engine.stop()

    app = FastAPI(title="keel", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(CountStatus, metrics=metrics, routes=ROUTES)
    _add_error_handlers(app)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": served.name, "backend": served.backend.name}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(served.engine), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: HttpRequest):
        _auth(request, cfg.api_key)
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": 0, "owned_by": "keel",
                                            "max_model_len": served.context}]}

    def submit_all(reqs, streams) -> list[Generation]:
        """Queue every choice; if one is refused, the ones already queued are cancelled."""
        gens = []
        try:
            for req, stream in zip(reqs, streams):
                gens.append(Generation.submit(served.engine, req, stream, metrics))
        except ApiError:
            for g in gens:
                g.req.cancel()
            raise
        return gens

    def stream_checks(body) -> None:
        if body.stream and body.logprobs is not None and body.logprobs is not False:
            raise ApiError(400, "logprobs is not supported with stream: true", "invalid_value", "logprobs")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest):
        body = await _parse(request, ChatCompletionRequest, cfg, served.name)
        stream_checks(body)
        text = render_messages(tok, body.messages)
        ids = tok.encode(text, add_special_tokens=False)
        reqs = [requests.build(body, ids, i) for i in range(body.n)]
        # a template that opens the think block itself: the model's first tokens are reasoning
        streams = [TextStream(tok, body.stop_list(), in_think=text.rstrip().endswith(THINK_OPEN)) for _ in reqs]
        gens, reply = submit_all(reqs, streams), chat_reply(served.name)
        if body.stream:
            return streaming_response(request, gens, reply, chat_chunks, include_usage=body.include_usage(),
                                      opening=[chat_opening(reply)])
        finishes = await run_all(request, gens)
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
        ids = [completion_prompt_ids(tok, p) for p in prompts]
        reqs = [requests.build(body, p_ids, k * body.n + i) for k, p_ids in enumerate(ids) for i in range(body.n)]
        streams = [TextStream(tok, body.stop_list(), reasoning=False) for _ in reqs]
        gens, reply = submit_all(reqs, streams), completion_reply(served.name)
        if body.stream:
            return streaming_response(request, gens, reply, completion_chunks, include_usage=body.include_usage(),
                                      prompts=len(prompts))
        finishes = await run_all(request, gens)
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
