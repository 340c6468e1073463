"""`keel serve` on vLLM: `VllmEngine` drives vLLM's own continuous-batching engine (the V1
`LLMEngine` of a `vllm.LLM`, in this process) behind what the server uses of
`keel.engine.batching.Engine` and of a backend.

The server's side is unchanged: it builds `batching.Request`s, submits them (`submit_all`: all or
none, the same validation, `QueueFull` past `max_waiting`), reads tokens through `on_token` /
`on_done`, cancels them, and reads `running`, `waiting` and `stats` for /metrics. One engine thread
(`start`/`stop`) owns the vLLM engine: it admits waiting requests while fewer than `max_batch` run
(`add_request`; vLLM's `max_num_seqs` is `max_batch`, so every admitted request is scheduled), calls
vLLM's `step`, hands each new token to its request, and aborts cancelled requests (`abort_request`:
a client that disconnects frees its slot on the next step).

Each Request maps to vLLM's `SamplingParams`: temperature (greedy below keel's GREEDY_BELOW: 0 for
vLLM), top_p, max_new_tokens, presence and frequency penalties (OpenAI's definition in both: over
the tokens generated so far), EOS and stop ids as `stop_token_ids` with `ignore_eos` (so only
keel's EOS counts), and a seed drawn from the request's generator, so a seeded request samples the
same tokens again (vLLM's own per-request generator; not keel's sampler, so the tokens sampled at
temperature > 0 differ from the torch backend's; greedy ones are equal in fp32). A request vLLM
cannot run (a parity `top_k` record, a sampling parameter vLLM's validation refuses) is refused at
`submit_all` with a one-line KeelError, which the server answers with a 400; other requests are
untouched.

Log-probs. OpenAI's `logprobs` are the model's raw log-softmax, before temperature, penalties and
top-p: what keel's torch path records in `Request.raw_logprobs` / `raw_top` / `prompt_scores`.
vLLM's `logprobs_mode="raw_logprobs"` is that same quantity (log_softmax of the model's logits, for
sampled and prompt tokens alike), so this engine runs in that mode (`VllmSampler`, for RL, runs in
processed_logprobs mode: the sampler's definition). What differs from the torch path:
`Request.logprobs` (the sampler's log-prob of each token, which the server never sends) stays
empty; `EngineStats.shared_prefills` stays 0 (vLLM's prefix cache shares prompts instead, which
keel does not see); `decode_steps` counts vLLM engine steps (a step may prefill as well as decode).
Echo with max_tokens 0 (`score_only`) runs one token that is dropped (vLLM generates at least one).
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch

from keel.errors import KeelError
from keel.engine.batching import EngineLoop, Request, check_requests
from keel.engine.sampler import GREEDY_BELOW
from keel.engine.vllm_backend import open_llm

log = logging.getLogger("keel.engine")


@dataclass(eq=False)
class _Running:
    """A request on vLLM under its request id."""

    req: Request
    scored: bool = False  # its prompt log-probs (if asked for) are recorded


class VllmEngine(EngineLoop):
    """vLLM's engine over an HF model directory, as the server's engine and backend."""

    thread_name = "keel-vllm-engine"

    def __init__(self, model_dir: str | Path, *, eos_id: int, device: str = "auto", dtype: str = "fp32",
                 max_batch: int = 16, max_waiting: int = 0, max_context: int | None = None, seed: int = 0,
                 kv_cache_bytes: int | None = None):
        super().__init__(eos_id=eos_id, max_batch=max_batch, max_waiting=max_waiting)
        # raw log-probs: what OpenAI's logprobs are (the module docstring)
        self.llm, self.max_context, self.vocab_size, self.name = open_llm(
            model_dir, device, dtype, seed, max_batch, max_context, kv_cache_bytes, "raw_logprobs")
        self.device = torch.device("cpu")  # where the server's per-request generators draw the seeds
        self._engine = self.llm.llm_engine
        self._ids = itertools.count()
        self._rows: dict[str, _Running] = {}  # touched by the engine thread only

    # ------------------------------------------------------------------ submission

    def _admissible(self, reqs: list[Request]) -> list[tuple[Request, object]]:
        """The waiting queue holds (request, its vLLM SamplingParams): checked here, on the
        submitting thread, so a refusal is that client's 400."""
        check_requests(reqs, self.vocab_size, self.max_context)
        return [(req, self._sampling_params(req)) for req in reqs]

    def _sampling_params(self, req: Request):
        """vLLM's SamplingParams for `req`, checked as vLLM checks them when it adds a request
        (here, on the submitting thread, so a refusal is the client's 400 and nobody else's)."""
        from vllm import SamplingParams as VllmParams
        from vllm.exceptions import VLLMClientError
        from vllm.sampling_params import RequestOutputKind

        if req.top_k:
            raise KeelError("the vllm backend does not record top-k token ids (a parity check's top_k); "
                            "use the torch or onnxruntime backend for that", field="backend")
        greedy = req.params.temperature < GREEDY_BELOW
        # vLLM seeds its own per-request generator; drawing the seed from the request's generator
        # makes a seeded request reproducible and an unseeded one follow the server's seed.
        seed = None if greedy or req.generator is None else int(
            torch.randint(0, 2**62, (1,), generator=req.generator, device=req.generator.device))
        try:
            params = VllmParams(temperature=0.0 if greedy else req.params.temperature, top_p=req.params.top_p,
                                max_tokens=req.params.max_new_tokens, seed=seed, ignore_eos=True,
                                stop_token_ids=sorted({i for i in (self.eos_id, *req.stop_ids) if i >= 0}),
                                presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                                logprobs=req.top_logprobs if req.top_logprobs >= 0 else None,
                                prompt_logprobs=max(req.top_logprobs, 0) if req.prompt_logprobs else None,
                                detokenize=False, skip_special_tokens=False, output_kind=RequestOutputKind.DELTA)
            config = self._engine.vllm_config
            params.verify(config.model_config, config.speculative_config, config.structured_outputs_config, None)
        except (ValueError, VLLMClientError) as e:  # vLLM's validation errors (the older ones are ValueErrors)
            first = (str(e).strip().splitlines() or [""])[0]
            raise KeelError(f"the vllm backend cannot run this request: {first}") from None
        return params

    # ------------------------------------------------------------------ the step

    def step(self) -> bool:
        """Abort cancelled requests, admit waiting ones, run one vLLM step and hand its tokens
        out. Returns True while requests are running or waiting."""
        gone = [rid for rid, row in self._rows.items() if row.req.cancelled]
        if gone:
            self._engine.abort_request(gone)
            for rid in gone:
                self._finish(self._rows.pop(rid).req, "cancelled")
        with self._cv:  # cancelled waiting requests leave at once: they must not hold queue places
            dropped = [req for req, _ in self._waiting if req.cancelled]
            if dropped:
                self._waiting = deque(pair for pair in self._waiting if not pair[0].cancelled)
        for req in dropped:
            self._finish(req, "cancelled")
        while len(self._rows) < self.max_batch:
            with self._cv:
                pair = self._waiting.popleft() if self._waiting else None
            if pair is None:
                break
            self._add(*pair)
        if self._rows:
            B = len(self._rows)
            outputs = self._engine.step()
            self.stats.decode_steps += 1
            self.stats.decode_rows += B
            self.stats.max_batch_seen = max(self.stats.max_batch_seen, B)
            for out in outputs:
                row = self._rows.get(out.request_id)
                if row is not None:
                    try:
                        self._take(out.request_id, row, out)
                    except Exception as e:  # a failing callback or output ends its own request only
                        self._fail(out.request_id, e)
        return bool(self._rows or self._waiting)

    def _add(self, req: Request, params) -> None:
        from vllm.inputs import TokensPrompt

        if req.cancelled:
            self._finish(req, "cancelled")
            return
        rid = f"keel-{next(self._ids)}"
        try:
            self._engine.add_request(rid, TokensPrompt(prompt_token_ids=list(req.prompt)), params)
        except Exception as e:
            log.error("request failed: %s: %s", type(e).__name__, e, exc_info=e)
            self._finish(req, "error", f"{type(e).__name__}: {e}")
            return
        self._rows[rid] = _Running(req)
        self.stats.admitted += 1
        self.stats.prompt_tokens += len(req.prompt)

    def _take(self, rid: str, row: _Running, out) -> None:
        """Record what one vLLM output brings for `row`'s request, and retire it when it ended."""
        req = row.req
        if req.prompt_logprobs and not row.scored and out.prompt_logprobs is not None:
            req.prompt_scores = [(None, [])] + [(float(step[t].logprob), _top(step, max(req.top_logprobs, 0)))
                                                for t, step in zip(req.prompt[1:], out.prompt_logprobs[1:])]
            row.scored = True
        if req.score_only:  # its one generated token is not the client's
            if not out.finished:
                self._engine.abort_request([rid])
            self._retire(rid, "length")
            return
        sample = out.outputs[0] if out.outputs else None
        for i, token in enumerate(sample.token_ids if sample is not None else ()):
            req.tokens.append(token)
            if req.top_logprobs >= 0:
                step = sample.logprobs[i]
                req.raw_logprobs.append(float(step[token].logprob))
                req.raw_top.append(_top(step, req.top_logprobs))
            self.stats.generated_tokens += 1
            if req.on_token is not None:
                req.on_token(req, token)
        if out.finished:
            if req.tokens and (req.tokens[-1] == self.eos_id or req.tokens[-1] in req.stop_ids):
                self._retire(rid, "stop")
            elif sample is not None and sample.finish_reason == "length":
                self._retire(rid, "length")
            else:
                self._retire(rid, "error", f"vLLM ended the request: {sample.finish_reason if sample else 'no output'}")

    def _retire(self, rid: str, reason: str, error: str | None = None) -> None:
        self._finish(self._rows.pop(rid).req, reason, error)

    def _fail(self, rid: str, e: Exception) -> None:
        log.error("request failed: %s: %s", type(e).__name__, e, exc_info=e)
        row = self._rows.pop(rid, None)
        if row is None:  # it had ended already (its on_done raised)
            return
        self._engine.abort_request([rid])
        if not row.req.done:
            self._finish(row.req, "error", f"{type(e).__name__}: {e}")

    def _finish(self, req: Request, reason: str, error: str | None = None) -> None:
        req.finish_reason, req.error = reason, error
        self.stats.finished += 1
        self.stats.cancelled += reason == "cancelled"
        self.stats.failed += reason == "error"
        if req.on_done is not None:
            req.on_done(req)

    def fail_all(self, message: str) -> None:
        """Finish every running and waiting request with an error (the engine broke or stops)."""
        with self._cv:
            waiting, self._waiting = [req for req, _ in self._waiting], deque()
        rows, self._rows = self._rows, {}
        if rows:
            try:
                self._engine.abort_request(list(rows))
            except Exception as e:  # the engine is already broken: the requests still end
                log.error("could not abort the requests on vLLM: %s: %s", type(e).__name__, e)
        for req in [row.req for row in rows.values()] + waiting:
            if not req.done:
                self._finish(req, "error", message)


def _top(step: dict, k: int) -> list[tuple[int, float]]:
    """The `k` most likely tokens of one position of vLLM's logprobs ({id: Logprob}: the top k by
    rank, and the chosen token, which may rank lower), as keel's (id, logprob) list."""
    ranked = sorted(step.items(), key=lambda item: (item[1].rank, -item[1].logprob))
    return [(int(t), float(lp.logprob)) for t, lp in ranked[:k] if lp.rank is not None and lp.rank <= k]
