"""Prometheus metrics of the server: one registry per app, an ASGI middleware that counts requests.

Engine counters (batches, tokens, tokens saved by prefix sharing) are read from
the engine's ``stats`` dicts at scrape time rather than copied on every call.
"""
import time
from typing import Callable, Dict

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TOKEN_BUCKETS = (16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576)


class _EngineCollector:
    """Engine figures from ``stats()``: batches, tokens_computed, tokens_saved, forward_s, peak_batch_tokens."""

    def __init__(self, stats: Callable[[], Dict[str, float]]):
        self.stats = stats

    def collect(self):
        s = self.stats()
        batches = float(s.get("batches", 0))
        tokens = float(s.get("tokens_computed", s.get("tokens", 0)))
        yield CounterMetricFamily("rerank_engine_batches", "Packed batches run by the model", value=batches)
        yield CounterMetricFamily("rerank_engine_tokens", "Tokens computed by the model", value=tokens)
        yield CounterMetricFamily("rerank_engine_tokens_saved", "Tokens not recomputed thanks to prefix sharing",
                                  value=float(s.get("tokens_saved", 0)))
        yield CounterMetricFamily("rerank_engine_forward_seconds", "Time spent in model batches",
                                  value=float(s.get("forward_s", 0.0)))
        yield GaugeMetricFamily("rerank_engine_mean_batch_tokens", "Mean tokens per packed batch so far",
                                value=tokens / batches if batches else 0.0)
        yield GaugeMetricFamily("rerank_engine_peak_batch_tokens", "Largest packed batch so far, in tokens",
                                value=float(s.get("peak_batch_tokens", 0)))
        yield CounterMetricFamily("rerank_engine_truncated_inputs", "Inputs cut to the model's max_length tokens",
                                  value=float(s.get("truncated_inputs", 0)))
        yield GaugeMetricFamily("rerank_engine_scheduler_active", "Requests the engine's scheduler is working on",
                                value=float(s.get("active_requests", 0)))
        for cache in ("prefix", "passage"):  # prefix K/V of LLM rerankers; KaLM-Reranker's passage encodings
            if f"{cache}_cache_hits" not in s:
                continue
            for what in ("hits", "misses", "evictions"):
                yield CounterMetricFamily(f"rerank_engine_{cache}_cache_{what}", f"{cache.capitalize()} cache {what}",
                                          value=float(s[f"{cache}_cache_{what}"]))
            yield GaugeMetricFamily(f"rerank_engine_{cache}_cache_bytes", f"Bytes held by the {cache} cache",
                                    value=float(s.get(f"{cache}_cache_bytes", 0)))


class Metrics:
    def __init__(self, engine_stats: Callable[[], Dict[str, float]]):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("rerank_engine_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("rerank_engine_request_duration_seconds", "HTTP request latency by endpoint",
                                 ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("rerank_engine_queue_depth", "Requests admitted to the model and not finished",
                                 registry=r)
        self.request_tokens = Histogram("rerank_engine_request_tokens", "Tokens per model request (batch tokens)",
                                        ["endpoint"], buckets=_TOKEN_BUCKETS, registry=r)
        self.rejected = Counter("rerank_engine_rejected", "Requests refused because the queue was full", registry=r)
        self.cancelled = Counter("rerank_engine_cancelled", "Requests whose client went away mid-work", registry=r)
        r.register(_EngineCollector(engine_stats))

    def render(self):
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """Counts every HTTP request by route template (never the raw path) and status, and times it."""

    def __init__(self, app, metrics: Metrics, paths=()):
        self.app, self.metrics, self.paths = app, metrics, frozenset(paths)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]
        t0 = time.perf_counter()

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or (scope["path"] if scope["path"] in self.paths else "other")
            self.metrics.requests.labels(endpoint, str(status[0])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
