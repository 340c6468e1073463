"""OpenAI request/response building for `keel serve`: from a validated body to an engine request,
and from the engine's tokens to the OpenAI objects a client reads.

Owns: `ApiError` (a refusal with its status and OpenAI error fields), reading a body under the size
limit, rendering chat messages, `RequestBuilder` (context and vocabulary checks, sampling
parameters, the per-request seed), `Generation` (one request on the engine and the async stream
of its text deltas), `Reply` and the chat-chunk / completion-choice builders, the OpenAI
`logprobs` objects (chat's `content[]` and the legacy completions one), and the one SSE
response both routes stream through. The routes themselves live in `keel.serve.app`.

Every admitted request ends with a response: its tokens, or an error object (500 when the engine
failed it, logged; 408 past the server's `request_timeout_s`), streamed as a last SSE event when the
200 already went out. A client that disconnects (streaming or not) or runs past the timeout has its
choices abandoned: cancelled on the engine, which frees their batch slots on its next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass

import torch
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import ClientDisconnect

from keel.errors import KeelError
from keel.engine.sampler import SamplingParams
from keel.engine.batching import Engine, QueueFull, Request
from keel.serve.metrics import ServeMetrics
from keel.serve.schemas import ChatCompletionRequest, CompletionRequest, error_body
from keel.serve.text import TextStream, render_chat

log = logging.getLogger("keel.serve")
RETRY_AFTER_S = 1  # what a 429 (queue full) tells the client to wait
Delta = tuple[str, str, str | None]  # (reasoning delta, content delta, finish_reason or None)
ToChunks = Callable[["Reply", str, str, str | None], list[dict]]  # how one delta becomes streamed chunks


class ApiError(Exception):
    """A request the server refuses, with its HTTP status and OpenAI error fields."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 type_: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.type = status, message, code, param, type_
        self.headers = {"WWW-Authenticate": "Bearer"} if status == 401 else headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), self.status, headers=self.headers)


# ----------------------------------------------------------------------------- requests


async def read_body(request: HttpRequest, limit: int) -> bytes:
    """The body, refused with 413 once it passes `limit` bytes. The declared length is checked
    first, and the stream is counted too, since a client may send no length or a false one."""
    too_big = ApiError(413, f"the request body is over the server's limit of {limit} bytes", "request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_big
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_big
    except ClientDisconnect:  # the client hung up mid-upload: nobody reads this answer, no traceback
        raise ApiError(400, "the client closed the connection before the body ended", "client_disconnected") from None
    return bytes(body)


def render_messages(tokenizer, messages) -> str:
    """The prompt text for chat `messages`; a template that rejects them is the client's 400."""
    try:
        return render_chat(tokenizer, [{"role": m.role, "content": m.text()} for m in messages])
    except KeelError as e:
        raise ApiError(400, str(e), "invalid_messages", "messages") from None


def completion_prompt_ids(tokenizer, prompt: str | list[int]) -> list[int]:
    """Token ids of one completions prompt: a string, or ids as given."""
    return tokenizer.encode(prompt, add_special_tokens=False) if isinstance(prompt, str) else list(prompt)


class RequestBuilder:
    """Turns a validated body and its prompt ids into an engine `Request` that fits the model.

    Requests that bring no seed draw one from a generator seeded by the server's seed, so a
    restarted server replays the same sequence; the lock keeps concurrent draws from sharing one."""

    def __init__(self, context: int, vocab_size: int, device, default_max_tokens: int, seed: int):
        self.context, self.vocab_size, self.device = context, vocab_size, device
        self.default_max_tokens = default_max_tokens
        self._seeds = random.Random(seed)
        self._seeds_lock = threading.Lock()

    def build(self, body: ChatCompletionRequest | CompletionRequest, prompt: list[int], choice: int = 0) -> Request:
        """The engine request of one choice; `choice` (prompt index * n + sample index) offsets a
        client's seed, so the n samples of a seeded request differ and choice 0 matches n=1."""
        max_tokens = self._max_tokens(body, prompt)
        if min(prompt) < 0 or max(prompt) >= self.vocab_size:
            raise ApiError(400, f"the prompt has a token id outside [0, {self.vocab_size})", "invalid_value", "prompt")
        temperature = 1.0 if body.temperature is None else body.temperature
        params = SamplingParams(temperature, 1.0 if body.top_p is None else body.top_p, max(max_tokens, 1))
        seed = None if body.seed is None else body.seed + choice
        req = Request(prompt, params, self._generator(seed) if temperature > 0 else None,
                      presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0)
        if isinstance(body, CompletionRequest):
            req.top_logprobs = -1 if body.logprobs is None else body.logprobs
            req.prompt_logprobs = body.echo and body.logprobs is not None
            req.score_only = max_tokens == 0
        elif body.logprobs:
            req.top_logprobs = body.top_logprobs or 0
        return req

    def _max_tokens(self, body: ChatCompletionRequest | CompletionRequest, prompt: list[int]) -> int:
        """The completion budget: the body's, or the default capped by what the context leaves."""
        P, C = len(prompt), self.context
        if P == 0:
            raise ApiError(400, "the prompt is empty", "invalid_value", "prompt")
        if P >= C:
            raise ApiError(400, f"the prompt has {P} tokens but the model's context is {C} tokens",
                           "context_length_exceeded", "messages")
        max_tokens = body.max_tokens if body.max_tokens is not None else min(self.default_max_tokens, C - P)
        if P + max_tokens > C:
            raise ApiError(400, f"prompt ({P} tokens) + max_tokens ({max_tokens}) exceeds the model's context of "
                           f"{C} tokens; lower max_tokens", "context_length_exceeded", "max_tokens")
        return max_tokens

    def _generator(self, seed: int | None) -> torch.Generator:
        if seed is None:
            with self._seeds_lock:
                seed = self._seeds.getrandbits(63)
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed % 2**63)
        return generator


# ----------------------------------------------------------------------------- generation


class Generation:
    """One request on the engine, from submission to its last token. Its tokens (then None) come
    from the engine's thread onto an asyncio queue; `stream_deltas` turns them into text."""

    def __init__(self, req: Request, text: TextStream, metrics: ServeMetrics, timeout_s: float = 0.0):
        self.req, self.text, self.metrics, self.timeout_s = req, text, metrics, timeout_s
        self.usage: dict = {}   # OpenAI's usage object, filled in when the stream ends
        self.abandoned: str | None = None  # "disconnected" | "timeout": the answer is no longer wanted
        self._queue: asyncio.Queue = asyncio.Queue()
        self._start = time.monotonic()   # for latency and TTFT
        loop = asyncio.get_running_loop()

        def put(item):
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening
                loop.call_soon_threadsafe(self._queue.put_nowait, item)

        req.on_token = lambda r, t: put(t)
        req.on_done = lambda r: put(None)

    @staticmethod
    def submit_all(engine: Engine, gens: list[Generation]) -> None:
        """Queue every choice on the engine, all or none. Done before any response starts, so a
        refusal is still a clean 4xx: 429 with Retry-After when the waiting queue is full."""
        try:
            engine.submit_all([g.req for g in gens])
        except QueueFull as e:
            raise ApiError(429, f"the server is busy: {e}", "queue_full", None, "rate_limit_error",
                           {"Retry-After": str(RETRY_AFTER_S)}) from None
        except KeelError as e:
            raise ApiError(400, str(e), "invalid_value") from None

    def abandon(self, why: str) -> None:
        """Stop waiting for this choice (the client left, or time ran out) and free its slot."""
        if self.abandoned is None and not self.req.done:
            self.abandoned = why
            self.req.cancel()
            self._queue.put_nowait(None)

    async def stream_deltas(self) -> AsyncIterator[Delta]:
        """Yield (reasoning delta, content delta, finish_reason or None) until the request ends.
        Raises ApiError when the engine failed it (500) or it was abandoned for its timeout (408)."""
        req, ids = self.req, []
        try:
            while True:
                item = await self._queue.get()
                if item is None:
                    if self.abandoned == "timeout":
                        raise ApiError(408, f"the request ran past the server's limit of {self.timeout_s:g} s "
                                            "(request_timeout_s); ask for fewer tokens", "timeout")
                    if self.abandoned:
                        return
                    if req.finish_reason == "error":
                        log.error("generation failed: %s", req.error)
                        raise ApiError(500, f"generation failed: {req.error}", "generation_failed", None,
                                       "server_error")
                    if req.finish_reason == "cancelled":
                        return
                    d_r, d_c, _ = self.text.push(ids, final=True)
                    yield d_r, d_c, req.finish_reason
                    break
                ids.append(item)
                if len(ids) == 1:
                    self.metrics.observe_first_token(time.monotonic() - self._start)
                d_r, d_c, stopped = self.text.push(ids)
                if stopped:  # a stop string: end here, the engine drops the row
                    req.cancel()
                    yield d_r, d_c, "stop"
                    break
                if d_r or d_c:
                    yield d_r, d_c, None
        finally:
            req.cancel()  # no-op when finished; frees the slot when the client went away
            self.metrics.observe_request(time.monotonic() - self._start)
            self.usage.update(prompt_tokens=len(req.prompt), completion_tokens=len(ids),
                              total_tokens=len(req.prompt) + len(ids))

    async def finish_reason(self) -> str | None:
        """Run the request to its end without streaming; its text is then in `self.text`."""
        finish = None
        async for _, _, f in self.stream_deltas():
            finish = f or finish
        return finish


async def _client_gone(request: HttpRequest) -> None:
    """Return once the client disconnects. The body has been read, so the next ASGI message is
    the disconnect (or, once the response is complete, one saying so)."""
    while (await request.receive())["type"] != "http.disconnect":
        await asyncio.sleep(0.05)  # not expected after the body; never spin on it


@contextlib.asynccontextmanager
async def abandon_when_gone(request: HttpRequest, gens: list[Generation], timeout_s: float):
    """While inside: a client that disconnects, or time past `timeout_s` (0: none), abandons
    every choice of `gens`, which frees their batch slots and ends their streams."""

    async def watch():
        try:
            await asyncio.wait_for(_client_gone(request), timeout_s or None)
            why = "disconnected"
        except asyncio.TimeoutError:
            why = "timeout"
        for g in gens:
            g.abandon(why)

    watcher = asyncio.create_task(watch())
    try:
        yield
    finally:
        watcher.cancel()


# ----------------------------------------------------------------------------- responses


@dataclass(frozen=True)
class Reply:
    """What every object of one response carries: its id, creation time and model, and the
    "object" name of its streamed chunks."""

    id: str
    created: int
    model: str
    chunk_object: str

    @classmethod
    def start(cls, id_prefix: str, chunk_object: str, model: str) -> Reply:
        return cls(f"{id_prefix}-{uuid.uuid4().hex}", int(time.time()), model, chunk_object)

    def chunk(self, part: dict, finish: str | None = None, object_: str | None = None) -> dict:
        """An object with one choice; `part` is the choice's payload (delta, message or text)."""
        return {**self._envelope(object_),
                "choices": [{"index": 0, **part, "logprobs": None, "finish_reason": finish}]}

    def usage_chunk(self, usage: dict) -> dict:
        """The last streamed chunk when the client asked for usage: no choices, only the counts."""
        return {**self._envelope(), "choices": [], "usage": usage}

    def choice(self, index: int, part: dict, finish: str | None, logprobs: dict | None = None) -> dict:
        return {"index": index, **part, "logprobs": logprobs, "finish_reason": finish}

    def _envelope(self, object_: str | None = None) -> dict:
        return {"id": self.id, "object": object_ or self.chunk_object, "created": self.created, "model": self.model}


def chat_reply(model: str) -> Reply:
    return Reply.start("chatcmpl", "chat.completion.chunk", model)


def completion_reply(model: str) -> Reply:
    return Reply.start("cmpl", "text_completion", model)


def chat_opening(reply: Reply) -> dict:
    """The first chat chunk: the assistant's role, before any text."""
    return reply.chunk({"delta": {"role": "assistant", "content": ""}})


def chat_chunks(reply: Reply, d_reasoning: str, d_content: str, finish: str | None) -> list[dict]:
    """A delta as chat chunks: one with its text (if any), then one with the finish reason."""
    delta = {}
    if d_reasoning:
        delta["reasoning_content"] = d_reasoning
    if d_content:
        delta["content"] = d_content
    chunks = [reply.chunk({"delta": delta})] if delta else []
    if finish:
        chunks.append(reply.chunk({"delta": {}}, finish))
    return chunks


def completion_chunks(reply: Reply, d_reasoning: str, d_content: str, finish: str | None) -> list[dict]:
    """A delta as one completion choice; completions have no reasoning split."""
    return [reply.chunk({"text": d_content}, finish)]


def _token_text(tokenizer, token: int) -> str:
    return tokenizer.decode([token], skip_special_tokens=False)


def _generated(gen: Generation, eos_id: int) -> list[int]:
    """The indices of the generated tokens a client is told about: all but a final EOS."""
    n = len(gen.req.tokens)
    return list(range(n - 1 if n and gen.req.tokens[-1] == eos_id else n))


def chat_logprobs(tokenizer, gen: Generation, eos_id: int) -> dict | None:
    """OpenAI's chat `logprobs` object: the raw model log-prob of each generated token, with its
    `top_logprobs` alternatives."""
    req = gen.req
    if req.top_logprobs < 0:
        return None

    def entry(token: int, logprob: float) -> dict:
        text = _token_text(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(req.tokens[i], req.raw_logprobs[i]),
                         "top_logprobs": [entry(t, lp) for t, lp in req.raw_top[i]]}
                        for i in _generated(gen, eos_id)]}


def completion_logprobs(tokenizer, gen: Generation, eos_id: int, echo: bool) -> dict | None:
    """The legacy completions `logprobs` object {tokens, token_logprobs, top_logprobs, text_offset}:
    with echo, the prompt's tokens first (the first one has no log-prob: null)."""
    req = gen.req
    if req.top_logprobs < 0:
        return None
    ids: list[int] = []
    chosen: list[float | None] = []
    tops: list[dict | None] = []
    if echo:
        for token, (lp, top) in zip(req.prompt, req.prompt_scores):
            ids.append(token)
            chosen.append(lp)
            tops.append(None if lp is None else {_token_text(tokenizer, t): v for t, v in top})
    for i in _generated(gen, eos_id):
        ids.append(req.tokens[i])
        chosen.append(req.raw_logprobs[i])
        tops.append({_token_text(tokenizer, t): v for t, v in req.raw_top[i]})
    texts = [_token_text(tokenizer, t) for t in ids]
    offsets, at = [], 0
    for t in texts:
        offsets.append(at)
        at += len(t)
    return {"tokens": texts, "token_logprobs": chosen, "top_logprobs": tops, "text_offset": offsets}


async def run_all(request: HttpRequest, gens: list[Generation], timeout_s: float) -> list[str | None]:
    """Run every choice of a request to its end, together on the engine; a client that leaves
    cancels them (its answer is then never sent)."""
    try:
        async with abandon_when_gone(request, gens, timeout_s):
            return list(await asyncio.gather(*(g.finish_reason() for g in gens)))
    finally:
        for g in gens:
            g.req.cancel()


def merge_usage(gens: list[Generation], prompts: int) -> dict:
    """One usage object for all choices: each prompt's tokens counted once."""
    n = len(gens) // max(prompts, 1)
    prompt = sum(g.usage.get("prompt_tokens", 0) for g in gens[::n]) if n else 0
    completion = sum(g.usage.get("completion_tokens", 0) for g in gens)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sse(obj) -> str:
    """One server-sent event carrying `obj` as JSON."""
    return f"data: {json.dumps(obj)}\n\n"


SSE_DONE = "data: [DONE]\n\n"  # OpenAI's end-of-stream marker


def streaming_response(request: HttpRequest, gens: list[Generation], reply: Reply, to_chunks: ToChunks, *,
                       include_usage: bool, timeout_s: float, prompts: int = 1,
                       opening: Iterable[dict] = ()) -> StreamingResponse:
    """The SSE response of both routes: `opening` (once per choice), then the chunks `to_chunks`
    makes of each choice's deltas as they come, each carrying its choice's index, then the usage
    chunk if asked for (usage is known only once generation ended), then [DONE]. A choice that
    fails ends the stream with an OpenAI error object (what the openai client raises on)."""

    async def events():
        for i in range(len(gens)):
            for obj in opening:
                yield sse(_indexed(obj, i))
        merged: asyncio.Queue = asyncio.Queue()
        failed: list[BaseException] = []

        async def pump(i: int, gen: Generation):
            try:
                async for delta in gen.stream_deltas():
                    await merged.put((i, delta))
            except ApiError as e:  # sent below, once every choice has stopped
                failed.append(e)
            except Exception as e:  # a bug: still an answer, never a stream cut without a word
                log.exception("internal error in a stream")
                failed.append(ApiError(500, f"internal error: {type(e).__name__}", None, None, "server_error"))
            finally:
                await merged.put((i, None))

        tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
        try:
            async with abandon_when_gone(request, gens, timeout_s):
                running = len(gens)
                while running:
                    i, delta = await merged.get()
                    if delta is None:
                        running -= 1
                        continue
                    for obj in to_chunks(reply, *delta):
                        yield sse(_indexed(obj, i))
            if failed:  # the 200 went out already: the error travels as the last event
                gens[0].metrics.count_stream_error(request.url.path, failed[0].status)
                yield sse(failed[0].body())
                yield SSE_DONE
                return
        finally:
            for t in tasks:
                t.cancel()
            for g in gens:
                g.req.cancel()
        if include_usage:
            yield sse(reply.usage_chunk(merge_usage(gens, prompts)))
        yield SSE_DONE

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _indexed(obj: dict, index: int) -> dict:
    obj["choices"][0]["index"] = index
    return obj
