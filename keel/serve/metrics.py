"""The server's Prometheus metrics: what it counts (responses by route and status, request latency,
time to first token), the ASGI middleware that counts responses, and the /metrics text.

Every status class is counted, 5xx included: an exception that escapes the app (answered with a
500 by Starlette's outermost error middleware, outside this one) counts as a 500, and a streamed
response that fails after its 200 went out counts under keel_http_stream_errors_total with the
status it would have had.

Engine-side numbers (admitted, finished, tokens, decode steps) are the engine's own `stats`, read
when /metrics is rendered, so nothing here duplicates the engine's bookkeeping.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Collection

from keel.engine.batching import Engine

_ENGINE_COUNTERS = {  # Prometheus name -> attribute of engine.stats
    "keel_requests_admitted_total": "admitted",
    "keel_requests_finished_total": "finished",
    "keel_requests_cancelled_total": "cancelled",
    "keel_requests_failed_total": "failed",
    "keel_requests_refused_total": "refused",
    "keel_prompt_tokens_total": "prompt_tokens",
    "keel_generation_tokens_total": "generated_tokens",
    "keel_decode_steps_total": "decode_steps",
    "keel_decode_rows_total": "decode_rows",
}


class ServeMetrics:
    """Counters the HTTP side keeps. Responses finish on the event loop while /metrics may be
    read at any time, so every update takes the lock."""

    def __init__(self):
        self.status: Counter = Counter()   # (path, status) -> responses
        self.stream_errors: Counter = Counter()  # (path, status) -> streams that failed after their 200
        self.latency_sum, self.latency_n = 0.0, 0
        self.ttft_sum, self.ttft_n = 0.0, 0
        self._lock = threading.Lock()

    def count_response(self, path: str, status: int) -> None:
        with self._lock:
            self.status[(path, status)] += 1

    def count_stream_error(self, path: str, status: int) -> None:
        with self._lock:
            self.stream_errors[(path, status)] += 1

    def observe_first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft_sum += seconds
            self.ttft_n += 1

    def observe_request(self, seconds: float) -> None:
        with self._lock:
            self.latency_sum += seconds
            self.latency_n += 1

    def render(self, engine: Engine) -> str:
        """The Prometheus text exposition of these counters and the engine's."""
        s = engine.stats
        lines = ["# TYPE keel_http_responses_total counter"]
        with self._lock:
            status, stream_errors = sorted(self.status.items()), sorted(self.stream_errors.items())
        lines += [f'keel_http_responses_total{{path="{p}",status="{c}"}} {n}' for (p, c), n in status]
        lines += ["# TYPE keel_http_stream_errors_total counter"]
        lines += [f'keel_http_stream_errors_total{{path="{p}",status="{c}"}} {n}' for (p, c), n in stream_errors]
        gauges = {"keel_requests_running": engine.running, "keel_requests_waiting": engine.waiting}
        for name, v in gauges.items():
            lines += [f"# TYPE {name} gauge", f"{name} {v}"]
        for name, attr in _ENGINE_COUNTERS.items():
            lines += [f"# TYPE {name} counter", f"{name} {getattr(s, attr)}"]
        for name, total, n in (("keel_request_seconds", self.latency_sum, self.latency_n),
                               ("keel_time_to_first_token_seconds", self.ttft_sum, self.ttft_n)):
            lines += [f"# TYPE {name} summary", f"{name}_sum {total:.6f}", f"{name}_count {n}"]
        return "\n".join(lines) + "\n"


class CountStatus:
    """ASGI middleware counting responses by route and status. Paths outside `routes` count as
    "other", so a client probing random URLs cannot grow the label set without bound."""

    def __init__(self, app, metrics: ServeMetrics, routes: Collection[str]):
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in self.routes else "other"
        started = False

        async def counting_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.metrics.count_response(path, message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except Exception:
            if not started:  # Starlette's outermost middleware turns it into a 500
                self.metrics.count_response(path, 500)
            raise
