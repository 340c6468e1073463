"""Continuous batching: one decode batch that requests join and leave at every step.

Each `Engine.step()`:
1. drops cancelled rows (a client that went away frees its slot at once);
2. admits waiting requests while there is room, and prefills them together: one left-padded
   batch, position ids counting from each row's first real token, so a row gets what it would get
   alone (to float rounding); requests admitted in the same step with the same prompt (an RL
   group, `n` choices of one request) share one prefill row. Pad queries attend to pads only;
   their outputs are never used, and the attention masks keep them finite (a NaN there would
   reach the real rows through the cache: tests/unit/test_engine_contract.py checks). If the
   batched prefill raises, each prompt is prefilled alone, so only the prompt at fault fails;
3. runs ONE decode step for every running row together;
4. samples: rows that share their `SamplingParams` and their generator object and need nothing
   per row (no penalties, no top-k or log-prob records) are sampled in ONE `sample_next` call over
   their [n, V] logits, in row order, so a batch whose rows share one generator (`generate(...,
   generator=g)`: RL rollouts, eval, label) draws deterministically; requests with their own
   generators (`keel serve`, seeded per request) sample alone;
5. retires rows that produced a stop token or reached their token budget.

The batch's KV cache is left-padded: every row's newest token sits in the last column, so a decode
step appends one column for everyone. It is the backend's own (a torch backend writes it in place
in preallocated buffers); the engine changes its rows only through `backend.join` (newcomers, the
narrower side padded on the left with zeros) and `backend.keep` (retired rows dropped, columns no
row uses any more trimmed), so the cache is never wider than the longest running row.

Sampling and stop rules are the rollout engine's: `keel.engine.sampler.sample_next` with each
request's `SamplingParams` and generator, and a row ends at EOS or one of its stop ids (kept in its
tokens) or after `max_new_tokens`. `generate()` runs the same engine offline for a list of prompts
(`keel.completions` turns its requests into a `Rollout` for RL, eval and label).

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


def check_requests(reqs: list[Request], vocab_size: int, max_context: int) -> None:
    """The KeelError an engine refuses `reqs` with: an empty prompt, a token id outside the
    vocabulary, or a prompt and budget longer than the context."""
    for req in reqs:
        if not req.prompt:
            raise KeelError("the prompt is empty; send at least one token")
        if min(req.prompt) < 0 or max(req.prompt) >= vocab_size:
            raise KeelError(f"the prompt has a token id outside [0, {vocab_size})")
        if len(req.prompt) + req.params.max_new_tokens > max_context:
            raise KeelError(f"prompt ({len(req.prompt)} tokens) + max new tokens ({req.params.max_new_tokens}) "
                            f"exceeds the context of {max_context} tokens")


class EngineLoop:
    """What every engine shares: a waiting queue that requests join all or none (bounded by
    `max_waiting`), and the driving of `step()` (admit, run, retire; True while anything runs or
    waits) in a loop, in this thread or on a background one. A subclass has `step`, `fail_all`,
    `_rows` (empty when idle) and `_admissible` (what its queue holds for each request)."""

    thread_name = "keel-engine"

    def __init__(self, *, eos_id: int, max_batch: int, max_waiting: int):
        if max_batch < 1 or max_waiting < 0:
            raise KeelError(f"max_batch must be >= 1 and max_waiting >= 0 (0: unbounded), got {max_batch}, {max_waiting}")
        self.eos_id, self.max_batch, self.max_waiting = eos_id, max_batch, max_waiting
        self.stats = EngineStats()
        self._waiting: deque = deque()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False

    def submit(self, req: Request) -> Request:
        """Queue a request (thread-safe). Its prompt must be non-empty and in the vocabulary."""
        self.submit_all([req])
        return req

    def submit_all(self, reqs: list[Request]) -> None:
        """Queue requests together (thread-safe): all of them, or none (KeelError; QueueFull when
        they would take the waiting queue past `max_waiting`)."""
        items = self._admissible(reqs)
        with self._cv:
            if self.max_waiting and len(self._waiting) + len(reqs) > self.max_waiting:
                self.stats.refused += len(reqs)
                raise QueueFull(f"{len(self._waiting)} requests are waiting, the limit is {self.max_waiting} "
                                "(max_waiting); retry later", field="max_waiting")
            self._waiting.extend(items)
            self._cv.notify()

    @property
    def running(self) -> int:
        return len(self._rows)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def run_until_idle(self) -> None:
        """Step until nothing runs or waits (offline use: parity, chat, tests)."""
        while self.step():
            pass

    def start(self) -> None:
        """Run the engine on a background thread until `stop()`."""
        assert self._thread is None, "engine already started"
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name=self.thread_name, daemon=True)
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


class Engine(EngineLoop):
    """Continuous batching over a `keel.engine.backends.Backend`."""

    def __init__(self, backend, *, eos_id: int, max_batch: int = 16, max_waiting: int = 0):
        super().__init__(eos_id=eos_id, max_batch=max_batch, max_waiting=max_waiting)
        self.backend = backend
        # the running batch (touched by the engine thread only)
        self._rows: list[Request] = []
        self._cache = None                    # the backend's KV cache of the running rows
        self._mask_BT: Tensor | None = None   # int64 [B, T], 1 at real columns
        self._next_B: list[int] = []          # each row's last sampled token, not yet in the cache
        self._pos_B: list[int] = []           # the position that token will take

    def _admissible(self, reqs: list[Request]) -> list[Request]:
        check_requests(reqs, self.backend.vocab_size, self.backend.max_context)
        return reqs

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
        admitted = []
        while len(self._rows) + len(admitted) < self.max_batch:
            with self._cv:
                req = self._waiting.popleft() if self._waiting else None
            if req is None:
                break
            if req.cancelled:
                self._finish(req, "cancelled")
            else:
                admitted.append(req)
        if admitted:
            self._admit(admitted)
        if self._rows:
            self._decode()
        return bool(self._rows or self._waiting)

    def _fail(self, req: Request, e: Exception) -> None:
        log.error("request failed: %s: %s", type(e).__name__, e, exc_info=e)
        if not req.done:
            self._finish(req, "error", f"{type(e).__name__}: {e}")

    def _prefill(self, prompts: list[tuple[int, ...]], all_logits: bool) -> tuple[Tensor, Tensor, object]:
        """One left-padded prefill of `prompts`: (logits_BSV, mask_BS, cache); the logits of every
        column when `all_logits`, else of the last (every row's last prompt token) at least."""
        P = max(len(p) for p in prompts)
        ids_BP = torch.zeros(len(prompts), P, dtype=torch.long)
        mask_BP = torch.zeros(len(prompts), P, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids_BP[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
            mask_BP[i, P - len(p):] = 1
        pos_BP = (mask_BP.cumsum(-1) - 1).clamp(min=0)
        logits_BSV, cache = self.backend.forward(ids_BP, mask_BP, pos_BP, self.backend.empty_past(len(prompts)),
                                                 logits_to_keep=0 if all_logits else 1)
        return logits_BSV, mask_BP, cache

    def _admit(self, reqs: list[Request]) -> None:
        """Prefill `reqs` together (one row per distinct prompt), sample their first tokens, and
        join those still running to the batch. A request whose prefill or first sample fails
        fails alone; the batch changes only once everything about the newcomers is computed."""
        prompts = list(dict.fromkeys(tuple(r.prompt) for r in reqs))
        all_logits = any(r.prompt_logprobs for r in reqs)
        try:
            parts = [(prompts, *self._prefill(prompts, all_logits))]
        except Exception as e:
            if len(prompts) == 1:
                parts, errors = [], {prompts[0]: e}
            else:  # find the prompt at fault: each alone
                parts, errors = [], {}
                for p in prompts:
                    try:
                        parts.append(([p], *self._prefill([p], all_logits)))
                    except Exception as e1:
                        errors[p] = e1
        where = {p: (k, i) for k, (ps, *_) in enumerate(parts) for i, p in enumerate(ps)}
        live, last = [], []
        for req in reqs:
            key = tuple(req.prompt)
            if key not in where:
                self._fail(req, errors[key])
                continue
            k, i = where[key]
            logits_BSV, mask_BP = parts[k][1], parts[k][2]
            self.stats.admitted += 1
            self.stats.prompt_tokens += len(req.prompt)
            if req.prompt_logprobs:
                _score_prompt(req, logits_BSV[i, logits_BSV.shape[1] - len(req.prompt):])
            if req.score_only:
                self._finish(req, "length")
                continue
            live.append(req)
            last.append(logits_BSV[i, -1])
        self.stats.shared_prefills += len(reqs) - len(prompts)
        if not live:
            return
        done = self._sample(live, torch.stack(last))
        joining = [r for r, d in zip(live, done) if not d]
        capacity = max(len(r.prompt) + r.params.max_new_tokens for r in self._rows + joining) if joining else 0
        for k, (ps, _, mask_BP, cache) in enumerate(parts):
            mine = [r for r in joining if where[tuple(r.prompt)][0] == k]
            if not mine:
                continue
            rows = [where[tuple(r.prompt)][1] for r in mine]
            self._cache = self.backend.join(self._cache if self._rows else None, cache, rows, capacity)
            new_mask = mask_BP[rows]
            if self._rows:
                W = max(self._mask_BT.shape[1], new_mask.shape[1])
                self._mask_BT = torch.cat([_pad_left_2d(self._mask_BT, W - self._mask_BT.shape[1]),
                                           _pad_left_2d(new_mask, W - new_mask.shape[1])], 0)
            else:
                self._mask_BT = new_mask
            for r in mine:
                self._rows.append(r)
                self._next_B.append(r.tokens[-1])
                self._pos_B.append(len(r.prompt))

    def _decode(self) -> None:
        B = len(self._rows)
        ids_B1 = torch.tensor(self._next_B, dtype=torch.long).unsqueeze(1)
        pos_B1 = torch.tensor(self._pos_B, dtype=torch.long).unsqueeze(1)
        mask_BT = torch.cat([self._mask_BT, torch.ones(B, 1, dtype=torch.long)], 1)
        logits_B1V, self._cache = self.backend.forward(ids_B1, mask_BT, pos_B1, self._cache, logits_to_keep=1)
        self._mask_BT = mask_BT
        self.stats.decode_steps += 1
        self.stats.decode_rows += B
        self.stats.max_batch_seen = max(self.stats.max_batch_seen, B)
        done = self._sample(self._rows, logits_B1V[:, -1])
        for i, req in enumerate(self._rows):
            if not done[i]:
                self._next_B[i] = req.tokens[-1]
                self._pos_B[i] += 1
        self._retire([i for i, d in enumerate(done) if d])

    def _sample(self, reqs: list[Request], logits_BV: Tensor) -> list[bool]:
        """Sample one token for each of `reqs` (row i of `logits_BV` is req i's), record it, and
        say which requests are now finished (a request whose sampling fails ends alone)."""
        groups: dict[tuple, list[int]] = {}  # rows sampled in one call, in row order
        for i, req in enumerate(reqs):
            plain = not (req.presence_penalty or req.frequency_penalty or req.top_k or req.top_logprobs >= 0)
            groups.setdefault((req.params, id(req.generator)) if plain else ("alone", i), []).append(i)
        drawn: dict[int, tuple[int, float]] = {}
        for rows in groups.values():
            if len(rows) > 1:
                req = reqs[rows[0]]
                try:
                    tok_B, logp_B = sample_next(logits_BV[rows], req.params, req.generator)
                    drawn.update(zip(rows, zip(tok_B.tolist(), logp_B.tolist())))
                    continue
                except Exception:  # e.g. NaN logits in one row: sample each alone, so that only it fails
                    pass
            for i in rows:
                try:
                    drawn[i] = self._sample_alone(reqs[i], logits_BV[i:i + 1])
                except Exception as e:
                    self._fail(reqs[i], e)
        return [reqs[i].done if i not in drawn else self._record(reqs[i], *drawn[i], logits_BV[i])
                for i in range(len(reqs))]

    def _sample_alone(self, req: Request, logits_1V: Tensor) -> tuple[int, float]:
        """Sample `req`'s token with its penalties, and record its top-k ids."""
        if req.presence_penalty or req.frequency_penalty:
            if req.counts is None:
                req.counts = torch.zeros(logits_1V.shape[-1], device=logits_1V.device)
            logits_1V = (logits_1V.float() - req.counts * req.frequency_penalty
                         - (req.counts > 0).float() * req.presence_penalty)
        tok, logp = sample_next(logits_1V, req.params, req.generator)
        if req.top_k:
            req.topk.append(logits_1V[0].topk(min(req.top_k, logits_1V.shape[-1])).indices.tolist())
        return int(tok[0]), float(logp[0])

    def _record(self, req: Request, token: int, logp: float, raw_V: Tensor) -> bool:
        """Record `req`'s sampled token and say whether the request is now finished."""
        req.tokens.append(token)
        req.logprobs.append(logp)
        if req.counts is not None:
            req.counts[token] += 1
        if req.top_logprobs >= 0:
            lp_V = torch.log_softmax(raw_V.float(), -1)
            req.raw_logprobs.append(float(lp_V[token]))
            req.raw_top.append(_top(lp_V, req.top_logprobs))
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
        gone = set(rows)
        keep = [i for i in range(len(self._rows)) if i not in gone]
        self._rows = [self._rows[i] for i in keep]
        self._next_B = [self._next_B[i] for i in keep]
        self._pos_B = [self._pos_B[i] for i in keep]
        if not keep:
            self._cache, self._mask_BT = None, None
            return
        mask_BT = self._mask_BT[keep]
        first = int(mask_BT.any(0).long().argmax())  # first column some row still uses
        self._mask_BT = mask_BT[:, first:]
        self._cache = self.backend.keep(self._cache, keep, first)

    def fail_all(self, message: str) -> None:
        """Finish every running and waiting request with an error (the backend broke)."""
        with self._cv:
            waiting, self._waiting = list(self._waiting), deque()
        for req in self._rows + waiting:
            if not req.done:
                self._finish(req, "error", message)
        self._rows, self._next_B, self._pos_B, self._cache, self._mask_BT = [], [], [], None, None


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


def _pad_left_2d(m: Tensor, n: int) -> Tensor:
    return m if n == 0 else torch.cat([m.new_zeros(m.shape[0], n), m], 1)


def generate(backend, prompts: list[list[int]], params: SamplingParams, *, eos_id: int,
             stop_ids: Collection[int] = (), seed: int = 0, max_batch: int = 64, top_k: int = 0,
             generator: torch.Generator | None = None) -> list[Request]:
    """Complete every prompt with continuous batching; returns the finished requests in prompt
    order. With `generator` (on the backend's device) every row samples from it, the rows of a
    step in one call; without, prompt i samples from its own generator, seeded with `seed + i`."""
    if generator is not None and generator.device.type != backend.device.type:
        raise KeelError(f"generator is on {generator.device} but the {backend.name} backend samples on "
                        f"{backend.device}; create it with torch.Generator(device={str(backend.device)!r})")
    engine = Engine(backend, eos_id=eos_id, max_batch=max_batch)
    reqs = []
    for i, p in enumerate(prompts):
        gen = generator
        if generator is None and params.temperature > 0:
            gen = torch.Generator(device=backend.device)
            gen.manual_seed(seed + i)
        reqs.append(Request(p, params, gen, stop_ids=stop_ids, top_k=top_k))
    engine.submit_all(reqs)
    engine.run_until_idle()
    return reqs
