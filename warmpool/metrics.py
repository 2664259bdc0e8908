"""Prometheus metrics: the metric objects, built on a given registry, and the scrape-time state collector.

A leaf module: it imports nothing from warmpool. Names follow Prometheus conventions (prefix `warmpool_`,
base units, `_total` on counters); label values are bounded (configured model, pool and phase names).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

Child = TypeVar("Child")

# `*_created` series double the series count and no dashboard reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]

# Swaps range from a 50 ms load out of RAM to minutes for a large model from a slow disk.
SWAP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Metrics:
    """Every metric warmpool records on the data path and in the scheduler."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._meters: dict[tuple[str, str, str, str, str], RequestMeters] = {}
        # Recorded on every proxied request: the lock-free kind (see LoopCounter).
        self.requests = LoopCounter(
            "warmpool_requests", "Proxied requests by model, phase, dialect, priority class and HTTP status.",
            ["model", "phase", "dialect", "priority", "status"], registry=registry)
        self.request_duration = LoopHistogram(
            "warmpool_request_duration_seconds", "Time from request arrival to the end of the response.",
            ["model"], buckets=REQUEST_BUCKETS, registry=registry)
        self.first_byte = LoopHistogram(
            "warmpool_time_to_first_byte_seconds", "Time from request arrival to the first response byte.",
            ["model"], buckets=REQUEST_BUCKETS, registry=registry)
        self.queue_wait = LoopHistogram(
            "warmpool_queue_wait_seconds", "Time a request waited for its model to be resident.",
            ["pool", "model", "priority"], buckets=REQUEST_BUCKETS, registry=registry)
        self.swap_duration = Histogram(
            "warmpool_swap_duration_seconds",
            "Time from a swap's start (evictions included) until the new model produced a token.",
            ["pool", "model", "source"], buckets=SWAP_BUCKETS, registry=registry)
        self.load_duration = Histogram(
            "warmpool_load_duration_seconds", "Time to load one model, until it produced a token.",
            ["pool", "model", "source"], buckets=SWAP_BUCKETS, registry=registry)
        self.unload_duration = Histogram(
            "warmpool_unload_duration_seconds", "Time to unload one model, until the backend confirmed it.",
            ["pool", "model"], buckets=SWAP_BUCKETS, registry=registry)
        self.swaps = Counter(
            "warmpool_swaps", "Model loads started by the scheduler, by reason.",
            ["pool", "model", "reason", "result"], registry=registry)
        self.evictions = Counter(
            "warmpool_evictions", "Models unloaded by the scheduler, by reason.",
            ["pool", "model", "reason"], registry=registry)
        self.refreshes = Counter(
            "warmpool_keepalive_refreshes", "Re-arms of an Ollama model's keep_alive before it expired.",
            ["pool", "model", "result"], registry=registry)
        self.preloads = Counter(
            "warmpool_preloads", "Preload attempts at start, by result.", ["model", "result"], registry=registry)
        self.predictions = Counter(
            "warmpool_predictions", "Likely next models predicted from a session's learned phase order.",
            ["model"], registry=registry)
        self.prediction_hits = Counter(
            "warmpool_prediction_hits", "Predictions the session's next request confirmed.", ["model"],
            registry=registry)
        self.prefetch_warmed = Counter(
            "warmpool_prefetch_warmed_bytes", "Weight bytes read into RAM ahead of an expected swap.", ["model"],
            registry=registry)
        self.prefetch_wasted = Counter(
            "warmpool_prefetch_wasted_bytes", "Weight bytes warmed for a prediction that missed.", ["model"],
            registry=registry)
        self.lost = Counter(
            "warmpool_models_lost", "Models that left a backend without warmpool unloading them.",
            ["pool", "model"], registry=registry)
        ProcessCollector(namespace="warmpool", registry=registry)  # warmpool_process_resident_memory_bytes, ...

    def meters(self, model: str, pool: str, phase: str, dialect: str, priority: str = "interactive") -> RequestMeters:
        """What requests for `model`, chosen by `phase` (or "") in `dialect`, of class `priority`, record;
        built once per such combination (they are bounded: configured names), so a request pays no label
        lookups."""
        key = (model, pool, phase, dialect, priority)
        found = self._meters.get(key)
        if found is None:
            found = self._meters[key] = RequestMeters(self, *key)
        return found

    def add_state(self, sources: list[GaugeSource]) -> None:
        """Register gauges read at scrape time from live state."""
        self.registry.register(StateCollector(sources))


class RequestMeters:
    """The metric children one kind of request records into, bound once (see Metrics.meters)."""

    __slots__ = ("_by_status", "_labels", "_requests", "duration", "first_byte", "queue_wait")

    def __init__(self, metrics: Metrics, model: str, pool: str, phase: str, dialect: str, priority: str) -> None:
        self.first_byte = metrics.first_byte.labels(model)
        self.duration = metrics.request_duration.labels(model)
        self.queue_wait = metrics.queue_wait.labels(pool, model, priority)
        self._requests, self._labels = metrics.requests, (model, phase, dialect, priority)
        self._by_status: dict[int, CounterChild] = {}

    def answered(self, status: int) -> CounterChild:
        """The request counter of answers with `status`."""
        found = self._by_status.get(status)
        if found is None:
            found = self._by_status[status] = self._requests.labels(*self._labels, str(status))
        return found


class LoopFamily(Collector, Generic[Child]):
    """A labelled metric for the event loop's thread only: plain numbers, no lock. prometheus_client's
    take a lock per increment (and a histogram one per bucket), which the data path paid four times per
    request; here every update and every scrape runs on the loop, so none is needed. Subclasses expose
    their children exactly as prometheus_client would."""

    def __init__(self, name: str, doc: str, labelnames: list[str], registry: CollectorRegistry,
                 new_child: Callable[[], Child]) -> None:
        self.name, self.doc, self.labelnames = name, doc, labelnames
        self.children: dict[tuple[str, ...], Child] = {}
        self._new_child = new_child
        registry.register(self)

    def labels(self, *values: str) -> Child:
        child = self.children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {values}")
            child = self.children[values] = self._new_child()
        return child


class LoopCounter(LoopFamily["CounterChild"]):
    """A LoopFamily of counters (`<name>_total`)."""

    def __init__(self, name: str, doc: str, labelnames: list[str], registry: CollectorRegistry) -> None:
        super().__init__(name, doc, labelnames, registry, CounterChild)

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(self.name, self.doc, labels=self.labelnames)
        for values, child in self.children.items():
            family.add_metric(list(values), child.value)
        yield family


class CounterChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class LoopHistogram(LoopFamily["HistogramChild"]):
    """A LoopFamily of histograms (`_bucket`, `_count`, `_sum`)."""

    def __init__(self, name: str, doc: str, labelnames: list[str], buckets: tuple[float, ...],
                 registry: CollectorRegistry) -> None:
        self.bounds = (*buckets, float("inf"))
        super().__init__(name, doc, labelnames, registry, lambda: HistogramChild(self.bounds))

    def collect(self) -> Iterable[Metric]:
        family = HistogramMetricFamily(self.name, self.doc, labels=self.labelnames)
        names = [floatToGoString(bound) for bound in self.bounds]  # type: ignore[no-untyped-call]
        for values, child in self.children.items():
            cumulative, buckets = 0, []
            for name, count in zip(names, child.counts, strict=True):
                cumulative += count
                buckets.append((name, cumulative))
            family.add_metric(list(values), buckets, child.sum)
        yield family


class HistogramChild:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # buckets are `le`: the first bound >= value
        self.sum += value


Sample = tuple[str, str, list[str], list[tuple[list[str], float]]]  # name, help, labels, [(values, value)]
GaugeSource = Callable[[], Iterable[Sample]]


class StateCollector(Collector):
    """Metrics read at scrape time from the live state: each source yields
    (name, help, label names, [(label values, value), ...]); a name ending in `_total` is a counter."""

    def __init__(self, sources: list[GaugeSource]) -> None:
        self.sources = sources

    def collect(self) -> Iterable[Metric]:
        for source in self.sources:
            for name, doc, labels, samples in source():
                family: GaugeMetricFamily | CounterMetricFamily
                if name.endswith("_total"):
                    family = CounterMetricFamily(name[: -len("_total")], doc, labels=labels)
                else:
                    family = GaugeMetricFamily(name, doc, labels=labels)
                for values, value in samples:
                    family.add_metric(values, value)
                yield family

    def describe(self) -> Iterable[Metric]:
        return []
