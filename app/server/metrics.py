"""Prometheus metrics for `GET /metrics`, in a registry owned by one app (so tests can run several apps)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS_S = (0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)
FAST_LATENCY_BUCKETS_S = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
LOOP_LAG_BUCKETS_S = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class Metrics:
    """Every metric Brook exports. Labels: endpoint, model, version (and stage/code where they apply)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.sessions = Gauge("brook_open_sessions", "Open WebSocket sessions", ["endpoint", "model", "version"],
                              registry=r)
        self.sessions_total = Counter("brook_sessions_opened", "WebSocket sessions opened",
                                      ["endpoint", "model", "version"], registry=r)
        self.rejected = Counter("brook_rejected_total", "Handshakes refused before accept",
                                ["endpoint", "reason"], registry=r)
        self.errors = Counter("brook_errors_total", "Errors sent to clients, by code", ["endpoint", "code"], registry=r)
        self.audio_seconds = Counter("brook_audio_seconds_total", "Seconds of audio received",
                                     ["model", "version"], registry=r)
        self.tokens_out = Counter("brook_tokens_generated_total", "Tokens generated", ["model", "version"], registry=r)
        self.draft_tokens = Counter("brook_draft_tokens_total",
                                    "Speculative draft tokens verified by the model (outcome: accepted or rejected)",
                                    ["model", "version", "outcome"], registry=r)
        self.prompt_tokens = Counter("brook_prompt_tokens_total", "Prompt tokens (prefilled plus cached)",
                                     ["model", "version", "kind"], registry=r)
        self.ttft = Histogram("brook_ttft_seconds", "Time to first token", ["model", "version"],
                              buckets=LATENCY_BUCKETS_S, registry=r)
        self.partial_latency = Histogram("brook_partial_latency_seconds", "Audio sent -> partial covering it",
                                         ["model", "version"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.final_latency = Histogram("brook_final_latency_seconds", "End of speech -> final transcript",
                                       ["model", "version"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.batch_size = Histogram("brook_batch_size", "Rows per engine call", ["model", "version", "stage"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.step_seconds = Histogram("brook_engine_call_seconds", "Duration of one engine call",
                                      ["model", "version", "stage"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.queue_depth = Gauge("brook_queue_depth", "Requests or streams waiting in an engine",
                                 ["model", "version"], registry=r)
        self.engine_active = Gauge("brook_engine_active", "Streams or generations an engine is serving now",
                                   ["model", "version"], registry=r)
        self.engine_slots = Gauge("brook_engine_kv_slots_in_use", "KV-cache slots held by conversations",
                                  ["model", "version"], registry=r)
        self.queue_seconds = Histogram("brook_queue_seconds", "Time a request waited in a dynamic batcher",
                                       ["model", "version"], buckets=FAST_LATENCY_BUCKETS_S, registry=r)
        self.infer_requests = Counter("brook_infer_requests", "Open Inference Protocol (v2) infer requests",
                                      ["model", "version", "outcome"], registry=r)
        self.infer_seconds = Histogram("brook_infer_seconds", "v2 infer request time, body read to response",
                                       ["model", "version"], buckets=FAST_LATENCY_BUCKETS_S, registry=r)
        self.event_loop_lag = Histogram("brook_event_loop_lag_seconds",
                                        "How late a periodic timer on the event loop woke up", [],
                                        buckets=LOOP_LAG_BUCKETS_S, registry=r)
        self.models_loaded = Gauge("brook_model_loaded", "1 when a model version is loaded and ready",
                                   ["model", "version"], registry=r)

    def render(self) -> bytes:
        data: bytes = generate_latest(self.registry)
        return data


class SpeechMetricsObserver:
    """Feeds a speech engine's hooks into the metrics of one model version."""

    def __init__(self, metrics: Metrics, model: str, version: int) -> None:
        self._metrics = metrics
        self._labels = (model, str(version))

    def on_batch(self, stage: str, size: int, seconds: float) -> None:
        self._metrics.batch_size.labels(*self._labels, stage).observe(size)
        self._metrics.step_seconds.labels(*self._labels, stage).observe(seconds)

    def on_partial_latency(self, seconds: float) -> None:
        self._metrics.partial_latency.labels(*self._labels).observe(seconds)

    def on_final_latency(self, seconds: float) -> None:
        self._metrics.final_latency.labels(*self._labels).observe(seconds)


class TextMetricsObserver:
    """Feeds a text engine's hooks into the metrics of one model version."""

    def __init__(self, metrics: Metrics, model: str, version: int) -> None:
        self._metrics = metrics
        self._labels = (model, str(version))

    def on_step(self, batch_size: int, prefill_tokens: int, decode_tokens: int, seconds: float) -> None:
        self._metrics.batch_size.labels(*self._labels, "step").observe(batch_size)
        self._metrics.step_seconds.labels(*self._labels, "step").observe(seconds)

    def on_ttft(self, seconds: float) -> None:
        self._metrics.ttft.labels(*self._labels).observe(seconds)

    def on_draft(self, drafted: int, accepted: int) -> None:
        self._metrics.draft_tokens.labels(*self._labels, "accepted").inc(accepted)
        self._metrics.draft_tokens.labels(*self._labels, "rejected").inc(drafted - accepted)


class BatchMetricsObserver:
    """Feeds a dynamic batcher's hooks (batch sizes, call time, queue time) into the metrics of one model version."""

    def __init__(self, metrics: Metrics, model: str, version: int) -> None:
        self._metrics = metrics
        self._labels = (model, str(version))

    def on_batch(self, rows: int, requests: int, seconds: float) -> None:
        self._metrics.batch_size.labels(*self._labels, "infer").observe(rows)
        self._metrics.step_seconds.labels(*self._labels, "infer").observe(seconds)

    def on_queue_time(self, seconds: float) -> None:
        self._metrics.queue_seconds.labels(*self._labels).observe(seconds)
