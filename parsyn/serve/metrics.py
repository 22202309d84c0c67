"""Prometheus metrics of one server (its own registry): queue, batch, latencies, reuse, fork cache."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .completions import context_tokens

BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120)


class Metrics:
    def __init__(self, engine, store):
        self.registry = r = CollectorRegistry()
        Gauge("parsyn_queue_depth", "Requests waiting for the engine", registry=r).set_function(
            lambda: engine.queue_depth)
        Gauge("parsyn_batch_rows", "Rows in the decode batch", registry=r).set_function(lambda: engine.rows)
        Gauge("parsyn_fork_cache_bytes", "Bytes of K/V held by stored forks", registry=r).set_function(
            lambda: store.bytes)
        Gauge("parsyn_forks", "Stored forks", registry=r).set_function(lambda: len(store))
        self._ttft = Histogram("parsyn_ttft_seconds", "Time to first token by route", ["route"], buckets=BUCKETS,
                               registry=r)
        self._e2e = Histogram("parsyn_request_seconds", "End-to-end request time by endpoint", ["endpoint"],
                              buckets=BUCKETS, registry=r)
        self._requests = Counter("parsyn_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                 registry=r)
        self._tokens = Counter("parsyn_prompt_tokens", "Synthesis context tokens, read from K/V (reused) or run "
                               "through the model (prefilled)", ["kind"], registry=r)

    def request(self, path: str, status: int, seconds: float) -> None:
        endpoint = _endpoint(path)
        self._requests.labels(endpoint, str(status)).inc()
        self._e2e.labels(endpoint).observe(seconds)

    def ttft(self, route: str, seconds: float) -> None:
        self._ttft.labels(route).observe(seconds)

    def chat(self, seconds: float) -> None:
        self._e2e.labels("chat.engine").observe(seconds)

    def synthesized(self, answers: dict, fork) -> None:
        context = context_tokens(fork)
        for route, s in answers.items():
            self.ttft(route, s.ttft_s)
            reused = context if s.route == "cache" else 0  # route "auto" reads the branches' K/V when it chose cache
            self._tokens.labels("reused").inc(reused)
            self._tokens.labels("prefilled").inc(s.prefill_tokens)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _endpoint(path: str) -> str:
    """A bounded label: fork ids folded away."""
    parts = path.strip("/").split("/")
    if len(parts) >= 3 and parts[:2] == ["v1", "forks"]:
        parts[2] = "{id}"
    return "/" + "/".join(parts) if parts != [""] else "/"
