"""Continuous batching: one decode batch that requests join and leave at every step.

Each `Engine.step()`:
1. drops cancelled rows (a client that went away frees its slot at once);
2. admits waiting requests while there is room: each is prefilled alone (no padding inside a
   prefill, so no pad query ever attends to nothing) and samples its first token; requests
   admitted in the same step with the same prompt (an RL group, `n` choices of one request) share
   one prefill: a prompt prefilled alone gives the same logits and cache whoever sent it;
3. runs ONE decode step for every running row together and samples each row's next token;
4. retires rows that produced a stop token or reached their token budget.

The batch's KV cache is left-padded: every row's newest token sits in the last column, so a decode
step appends one column for everyone. A newly admitted row is padded on the left with zeros (or
the batch is, if the newcomer is longer), and columns that no row uses any more are trimmed when
rows retire, so the cache is never wider than the longest running row.

Sampling and stop rules are the rollout engine's: `keel.engine.sampler.sample_next` with each request's own
`SamplingParams` and seeded generator, and a row ends at EOS or one of its stop ids (kept in its
tokens) or after `max_new_tokens`. `generate()` runs the same engine offline for a list of prompts.

The engine is driven either synchronously (`run_until_idle`) or by a background thread
(`start`/`stop`) while other threads `submit` requests; per-token callbacks run on the engine's
thread.

Failures stay with the request that caused them: a request whose prefill or sampling raises (NaN
logits, a backend that rejects its prompt) finishes alone with finish_reason "error", logged,
while the rest of the batch goes on. Only a failed decode step of the whole batch fails every
running and waiting request. Either way every submitted request ends, with `on_done` called
once. The waiting queue may be bounded (`max_waiting`): `submit` then refuses with `QueueFull`
rather than queue without limit, and cancelled waiting requests give up their places at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import torch
from torch import Tensor

from keel.errors import KeelError
from keel.engine.sampler import SamplingParams, sample_next

log = logging.getLogger("keel.engine")


class QueueFull(KeelError):
    """The waiting queue is at `max_waiting`: retry later."""


@dataclass(eq=False)
class Request:
    """One completion to produce. The engine fills in the outputs."""

    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator | None = None   # seeded, on the backend's device; unused when greedy
    stop_ids: Collection[int] = ()              # end the row like EOS (the stop token is kept)
    top_k: int = 0                              # record each step's top-k token ids (parity checks)
    presence_penalty: float = 0.0               # OpenAI's: logits[j] -= c[j] * frequency + (c[j] > 0) * presence,
    frequency_penalty: float = 0.0              # c[j] = times token j was generated so far in this request
    top_logprobs: int = -1                      # >= 0: record raw log-probs (chosen token and top-N) per step
    prompt_logprobs: bool = False               # record the raw log-prob of each prompt token (the first: None)
    score_only: bool = False                    # prefill only (echo with max_tokens 0): no token is sampled
    on_token: Callable[["Request", int], None] | None = None  # called on the engine thread per token
    on_done: Callable[["Request"], None] | None = None        # called once when the request ends
    # outputs
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    topk: list[list[int]] = field(default_factory=list)
    raw_logprobs: list[float] = field(default_factory=list)     # log_softmax(model logits) of each token
    raw_top: list[list[tuple[int, float]]] = field(default_factory=list)  # per step: top_logprobs (id, logprob)
    prompt_scores: list[tuple[float | None, list[tuple[int, float]]]] = field(default_factory=list)
    counts: torch.Tensor | None = None  # [V] generated-token counts, kept only when a penalty is set
    finish_reason: str | None = None   # "stop" | "length" | "cancelled" | "error"
    error: str | None = None
    cancelled: bool = False            # set from any thread; the engine drops the row next step
    submitted: float = field(default_factory=time.monotonic)

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


@dataclass
class EngineStats:
    """Counters for /metrics and benchmarks."""

    admitted: int = 0
    finished: int = 0
    cancelled: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    decode_steps: int = 0
    decode_rows: int = 0      # sum of batch sizes over decode steps (decode_rows / decode_steps = mean batch)
    max_batch_seen: int = 0
    failed: int = 0           # requests finished with finish_reason "error"
    refused: int = 0          # requests refused because the waiting queue was full
    shared_prefills: int = 0  # admissions that reused the prefill of an identical prompt


class Engine:
    """Continuous batching over a `keel.engine.backends.Backend`."""

    def __init__(self, backend, *, eos_id: int, max_batch: int = 16, max_waiting: int = 0):
        if max_batch < 1 or max_waiting < 0:
            raise KeelError(f"max_batch must be >= 1 and max_waiting >= 0 (0: unbounded), got {max_batch}, {max_waiting}")
        self.backend, self.eos_id, self.max_batch, self.max_waiting = backend, eos_id, max_batch, max_waiting
        self.stats = EngineStats()
        self._waiting: deque[Request] = deque()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        # the running batch (touched by the engine thread only)
        self._rows: list[Request] = []
        self._cache: list[Tensor] = []
        self._mask_BT: Tensor | None = None   # int64 [B, T], 1 at real columns
        self._next_B: list[int] = []          # each row's last sampled token, not yet in the cache
        self._pos_B: list[int] = []           # the position that token will take

    # ------------------------------------------------------------------ submission

    def submit(self, req: Request) -> Request:
        """Queue a request (thread-safe). Its prompt must be non-empty and in the vocabulary."""
        self.submit_all([req])
        return req

    def submit_all(self, reqs: list[Request]) -> None:
        """Queue requests together (thread-safe): all of them, or none (KeelError; QueueFull when
        they would take the waiting queue past `max_waiting`)."""
        for req in reqs:
            if not req.prompt:
                raise KeelError("the prompt is empty; send at least one token")
            if min(req.prompt) < 0 or max(req.prompt) >= self.backend.vocab_size:
                raise KeelError(f"the prompt has a token id outside [0, {self.backend.vocab_size})")
            if len(req.prompt) + req.params.max_new_tokens > self.backend.max_context:
                raise KeelError(f"prompt ({len(req.prompt)} tokens) + max new tokens ({req.params.max_new_tokens}) "
                                f"exceeds the context of {self.backend.max_context} tokens")
        with self._cv:
            if self.max_waiting and len(self._waiting) + len(reqs) > self.max_waiting:
                self.stats.refused += len(reqs)
                raise QueueFull(f"{len(self._waiting)} requests are waiting, the limit is {self.max_waiting} "
                                "(max_waiting); retry later", field="max_waiting")
            self._waiting.extend(reqs)
            self._cv.notify()

    @property
    def running(self) -> int:
        return len(self._rows)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    # ------------------------------------------------------------------ the step

    def step(self) -> bool:
        """Admit, decode once, retire. Returns True while requests are running or waiting."""
        self._retire([i for i, r in enumerate(self._rows) if r.cancelled])
        with self._cv:  # cancelled waiting requests leave at once: they must not hold queue places
            gone = [r for r in self._waiting if r.cancelled]
            if gone:
                self._waiting = deque(r for r in self._waiting if not r.cancelled)
        for req in gone:
            self._finish(req, "cancelled")
        prefills: dict[tuple[int, ...], tuple] = {}  # this step's prompts -> (logits, present)
        while len(self._rows) < self.max_batch:
            with self._cv:
                req = self._waiting.popleft() if self._waiting else None
            if req is None:
                break
            if req.cancelled:
                self._finish(req, "cancelled")
            else:
                self._admit_alone(req, prefills)
        if self._rows:
            self._decode()
        return bool(self._rows or self._waiting)

    def _admit_alone(self, req: Request, prefills: dict) -> None:
        """Admit `req`; if its prefill or first sample fails, it fails alone (the batch is only
        changed once everything about the newcomer has been computed). Out of the queue and not
        yet a row, it would otherwise be in no list the failure path finishes."""
        try:
            self._admit(req, prefills)
        except Exception as e:
            self._fail(req, e)

    def _fail(self, req: Request, e: Exception) -> None:
        log.error("request failed: %s: %s", type(e).__name__, e, exc_info=e)
        if not req.done:
            self._finish(req, "error", f"{type(e).__name__}: {e}")

    def _admit(self, req: Request, prefills: dict) -> None:
        """Prefill `req` (or reuse `prefills`' run of the same prompt: nothing below changes a
        cache tensor in place), sample its first token, and join it to the batch."""
        P = len(req.prompt)
        key = tuple(req.prompt)
        if key in prefills:
            logits, present = prefills[key]
            self.stats.shared_prefills += 1
        else:
            ids = torch.tensor([req.prompt], dtype=torch.long)
            logits, present = self.backend.forward(ids, torch.ones(1, P, dtype=torch.long),
                                                   torch.arange(P).unsqueeze(0), self.backend.empty_past(1))
            prefills[key] = logits, present
        self.stats.admitted += 1
        self.stats.prompt_tokens += P
        if req.prompt_logprobs:
            _score_prompt(req, logits[0])
        if req.score_only:
            self._finish(req, "length")
            return
        if self._emit(req, logits[:, -1, :]):
            return
        T = self._mask_BT.shape[1] if self._rows else 0
        width = max(T, P)
        row_mask = torch.cat([torch.zeros(1, width - P, dtype=torch.long), torch.ones(1, P, dtype=torch.long)], 1)
        present = [_pad_left(t, width - P) for t in present]
        if self._rows:
            cache = [torch.cat([_pad_left(c, width - T), p], 0) for c, p in zip(self._cache, present)]
            self._cache, self._mask_BT = cache, torch.cat([_pad_left_2d(self._mask_BT, width - T), row_mask], 0)
        else:
            self._cache, self._mask_BT = present, row_mask
        self._rows.append(req)
        self._next_B.append(req.tokens[-1])
        self._pos_B.append(P)

    def _decode(self) -> None:
        B = len(self._rows)
        ids_B1 = torch.tensor(self._next_B, dtype=torch.long).unsqueeze(1)
        pos_B1 = torch.tensor(self._pos_B, dtype=torch.long).unsqueeze(1)
        mask_BT = torch.cat([self._mask_BT, torch.ones(B, 1, dtype=torch.long)], 1)
        logits_B1V, self._cache = self.backend.forward(ids_B1, mask_BT, pos_B1, self._cache)
        self._mask_BT = mask_BT
        self.stats.decode_steps += 1
        self.stats.decode_rows += B
        self.stats.max_batch_seen = max(self.stats.max_batch_seen, B)
        finished = []
        for i, req in enumerate(self._rows):
            try:
                done = self._emit(req, logits_B1V[i:i + 1, -1, :])
            except Exception as e:  # this row's sampling failed: it ends, the others go on
                self._fail(req, e)
                done = True
            if done:
                finished.append(i)
            else:
                self._next_B[i] = req.tokens[-1]
                self._pos_B[i] += 1
        self._retire(finished)

    def _emit(self, req: Request, logits_1V: Tensor) -> bool:
        """Sample one token for `req`, record it, and say whether the request is now finished."""
        raw_1V = logits_1V
        if req.presence_penalty or req.frequency_penalty:
            if req.counts is None:
                req.counts = torch.zeros(logits_1V.shape[-1], device=logits_1V.device)
            logits_1V = (logits_1V.float() - req.counts * req.frequency_penalty
                         - (req.counts > 0).float() * req.presence_penalty)
        tok, logp = sample_next(logits_1V, req.params, req.generator)
        token = int(tok[0])
        req.tokens.append(token)
        req.logprobs.append(float(logp[0]))
        if req.counts is not None:
            req.counts[token] += 1
        if req.top_logprobs >= 0:
            lp_V = torch.log_softmax(raw_1V[0].float(), -1)
            req.raw_logprobs.append(float(lp_V[token]))
            req.raw_top.append(_top(lp_V, req.top_logprobs))
        if req.top_k:
            req.topk.append(logits_1V[0].topk(min(req.top_k, logits_1V.shape[-1])).indices.tolist())
        self.stats.generated_tokens += 1
        if req.on_token is not None:
            req.on_token(req, token)
        if token == self.eos_id or token in req.stop_ids:
            self._finish(req, "stop")
        elif len(req.tokens) >= req.params.max_new_tokens:
            self._finish(req, "length")
        elif req.cancelled:
            self._finish(req, "cancelled")
        return req.done

    def _finish(self, req: Request, reason: str, error: str | None = None) -> None:
        req.finish_reason, req.error = reason, error
        self.stats.finished += 1
        self.stats.cancelled += reason == "cancelled"
        self.stats.failed += reason == "error"
        if req.on_done is not None:
            req.on_done(req)

    def _retire(self, rows: list[int]) -> None:
        """Drop finished rows (already marked done) and trim the cache columns nobody uses."""
        for i in rows:
            if not self._rows[i].done:
                self._finish(self._rows[i], "cancelled")
        if not rows:
            return
        keep = [i for i in range(len(self._rows)) if i not in set(rows)]
        self._rows = [self._rows[i] for i in keep]
        self._next_B = [self._next_B[i] for i in keep]
        self._pos_B = [self._pos_B[i] for i in keep]
        if not keep:
            self._cache, self._mask_BT = [], None
            return
        idx = torch.tensor(keep, dtype=torch.long)
        mask_BT = self._mask_BT[idx]
        first = int(mask_BT.any(0).long().argmax())  # first column some row still uses
        self._mask_BT = mask_BT[:, first:]
        self._cache = [c.index_select(0, idx.to(c.device))[:, :, first:] for c in self._cache]

    def fail_all(self, message: str) -> None:
        """Finish every running and waiting request with an error (the backend broke)."""
        with self._cv:
            waiting, self._waiting = list(self._waiting), deque()
        for req in self._rows + waiting:
            if not req.done:
                self._finish(req, "error", message)
        self._rows, self._next_B, self._pos_B, self._cache, self._mask_BT = [], [], [], [], None

    # ------------------------------------------------------------------ driving it

    def run_until_idle(self) -> None:
        """Step until nothing runs or waits (offline use: parity, chat, tests)."""
        while self.step():
            pass

    def start(self) -> None:
        """Run the engine on a background thread until `stop()`."""
        assert self._thread is None, "engine already started"
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="keel-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self._waiting and not self._rows:
                    self._cv.wait()
                if self._stop:
                    break
            try:
                self.step()
            except Exception as e:  # a broken backend must not hang every client forever
                log.error("engine step failed; failing every request: %s: %s", type(e).__name__, e, exc_info=e)
                self.fail_all(f"{type(e).__name__}: {e}")
        self.fail_all("the server is shutting down")


def _top(lp_V: Tensor, k: int) -> list[tuple[int, float]]:
    if k <= 0:
        return []
    values, ids = lp_V.topk(min(k, lp_V.shape[-1]))
    return list(zip(ids.tolist(), values.tolist()))


def _score_prompt(req: Request, logits_PV: Tensor) -> None:
    """The raw log-prob of each prompt token given the ones before it (None for the first), with
    the top `req.top_logprobs` alternatives at each position."""
    lp_PV = torch.log_softmax(logits_PV.float(), -1)
    ids = torch.tensor(req.prompt[1:], dtype=torch.long, device=lp_PV.device)
    chosen = lp_PV[:-1].gather(-1, ids.unsqueeze(-1)).squeeze(-1).tolist() if len(req.prompt) > 1 else []
    k = max(req.top_logprobs, 0)
    req.prompt_scores = [(None, [])] + [(c, _top(lp_PV[i], k)) for i, c in enumerate(chosen)]


def _pad_left(t: Tensor, n: int) -> Tensor:
    """Zero columns in front of dim 2 (time) of a [B, H, T, D] cache tensor."""
    if n == 0:
        return t
    shape = list(t.shape)
    shape[2] = n
    return torch.cat([t.new_zeros(shape), t], 2)


def _pad_left_2d(m: Tensor, n: int) -> Tensor:
    return m if n == 0 else torch.cat([m.new_zeros(m.shape[0], n), m], 1)


def generate(backend, prompts: list[list[int]], params: SamplingParams, *, eos_id: int,
             stop_ids: Collection[int] = (), seed: int = 0, max_batch: int = 64, top_k: int = 0) -> list[Request]:
    """Complete every prompt with continuous batching; returns the finished requests in prompt
    order. Each prompt samples from its own generator, seeded with `seed + index`."""
    engine = Engine(backend, eos_id=eos_id, max_batch=max_batch)
    reqs = []
    for i, p in enumerate(prompts):
        gen = None
        if params.temperature > 0:
            gen = torch.Generator(device=backend.device)
            gen.manual_seed(seed + i)
        reqs.append(engine.submit(Request(p, params, gen, stop_ids=stop_ids, top_k=top_k)))
    engine.run_until_idle()
    return reqs
