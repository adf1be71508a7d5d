"""Prometheus metrics of ``hpipe serve``, named as vLLM names them under an ``hpipe:`` prefix,
so a vLLM dashboard ports with a rename (see shared/design/serving.md)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Buckets in seconds: a CPU pipeline's first token takes seconds, a GPU's milliseconds.
LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0,
                     160.0, 320.0)
TOKEN_GAP_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
                       2.5, 5.0, 10.0)


class ServeMetrics:
    """One registry per server (tests start several in one process)."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = {"model_name": model_name}
        r = self.registry

        def gauge(name, doc, extra=()):
            return Gauge(name, doc, ["model_name", *extra], registry=r)

        def counter(name, doc, extra=()):
            return Counter(name, doc, ["model_name", *extra], registry=r)

        def histogram(name, doc, buckets):
            return Histogram(name, doc, ["model_name"], buckets=buckets, registry=r)

        self.running = gauge("hpipe:num_requests_running", "Requests on the pipeline now.")
        self.waiting = gauge("hpipe:num_requests_waiting", "Requests waiting for the pipeline.")
        self.prompt_tokens = counter("hpipe:prompt_tokens", "Prompt tokens processed.")
        self.generation_tokens = counter("hpipe:generation_tokens", "Tokens generated.")
        self.ttft = histogram("hpipe:time_to_first_token_seconds",
                              "Time from arrival to the first token.", LATENCY_BUCKETS_S)
        self.itl = histogram("hpipe:inter_token_latency_seconds",
                             "Time between two tokens of one request.", TOKEN_GAP_BUCKETS_S)
        self.tpot = histogram("hpipe:time_per_output_token_seconds",
                              "Decode time per output token of a finished request (the "
                              "superseded vLLM name, kept for dashboards that use it).",
                              TOKEN_GAP_BUCKETS_S)
        self.e2e = histogram("hpipe:e2e_request_latency_seconds",
                             "Time from arrival to the last token.", LATENCY_BUCKETS_S)
        self.queue_time = histogram("hpipe:request_queue_time_seconds",
                                    "Time from arrival to the start of its prefill.",
                                    LATENCY_BUCKETS_S)
        self.success = counter("hpipe:request_success", "Finished requests, by reason.",
                               ("finished_reason",))
        self.cancelled = counter("hpipe:request_cancelled",
                                 "Requests cancelled (the client went away, or a stop string).")
        self.failed = counter("hpipe:request_failed",
                              "Requests ended by a failure of the pipeline.")
        self.busy = gauge("hpipe:stage_busy_fraction",
                          "Share of the time since the pipeline opened that each device computed.",
                          ("stage", "device"))
        self.busy_seconds = counter("hpipe:stage_busy_seconds",
                                    "Seconds each device computed.", ("stage", "device"))
        self.prefix_queries = counter("hpipe:prefix_cache_queries",
                                      "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = counter("hpipe:prefix_cache_hits",
                                   "Prompt tokens whose KV came from the prefix cache instead "
                                   "of a prefill.")
        self.prefix_held = gauge("hpipe:prefix_cache_held_tokens",
                                 "KV positions the stages keep for prefix reuse now.")
        self.restarts = counter("hpipe:pipeline_restarts",
                                "Times the pipeline was reopened after a failure.")
        self._labels = labels
        for g in (self.running, self.waiting):
            g.labels(**labels).set(0)

    def of(self, metric, **extra):
        return metric.labels(**self._labels, **extra)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
