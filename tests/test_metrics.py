"""The data path's lock-free metrics expose exactly what prometheus_client's own classes would."""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from warmpool.metrics import REQUEST_BUCKETS, LoopCounter, LoopHistogram, Metrics


def test_loop_metrics_expose_what_prometheus_client_would() -> None:
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    reference = Histogram("t_seconds", "doc", ["model"], buckets=REQUEST_BUCKETS, registry=theirs)
    histogram = LoopHistogram("t_seconds", "doc", ["model"], REQUEST_BUCKETS, registry=ours)
    reference_count = Counter("t_requests", "doc", ["status"], registry=theirs)
    count = LoopCounter("t_requests", "doc", ["status"], registry=ours)
    rng = random.Random(7)
    # Values on and beside the bucket bounds, zero, beyond the last bound, and a spread in between.
    values = [*REQUEST_BUCKETS, *(b * 1.0001 for b in REQUEST_BUCKETS), 0.0, 1e6,
              *(rng.expovariate(2.0) for _ in range(500))]
    for index, value in enumerate(values):
        model = ("a", "b")[index % 2]
        reference.labels(model).observe(value)
        histogram.labels(model).observe(value)
        reference_count.labels(str(200 + index % 3)).inc()
        count.labels(str(200 + index % 3)).inc()
    assert generate_latest(ours) == generate_latest(theirs)


def test_loop_metrics_refuse_the_wrong_number_of_labels() -> None:
    histogram = LoopHistogram("u_seconds", "doc", ["pool", "model"], REQUEST_BUCKETS, registry=CollectorRegistry())
    with pytest.raises(ValueError, match="expected labels"):
        histogram.labels("only-one")


def test_request_meters_record_into_their_labels() -> None:
    metrics = Metrics(CollectorRegistry())
    meters = metrics.meters("coder", "gpu", "execution", "openai")
    assert metrics.meters("coder", "gpu", "execution", "openai") is meters
    assert metrics.meters("coder", "gpu", "", "openai") is not meters  # no phase: another series
    assert metrics.meters("coder", "gpu", "execution", "openai", "batch") is not meters  # by class
    meters.answered(200).inc()
    meters.answered(200).inc()
    meters.answered(502).inc()
    meters.first_byte.observe(0.002)
    meters.duration.observe(0.3)
    meters.queue_wait.observe(0.0)
    text = generate_latest(metrics.registry).decode()
    labels = 'dialect="openai",model="coder",phase="execution",priority="interactive"'
    assert f'warmpool_requests_total{{{labels},status="200"}} 2.0' in text
    assert f'warmpool_requests_total{{{labels},status="502"}} 1.0' in text
    assert 'warmpool_time_to_first_byte_seconds_bucket{le="0.005",model="coder"} 1.0' in text
    assert 'warmpool_request_duration_seconds_bucket{le="0.25",model="coder"} 0.0' in text
    assert 'warmpool_request_duration_seconds_count{model="coder"} 1.0' in text
    assert 'warmpool_queue_wait_seconds_count{model="coder",pool="gpu",priority="interactive"} 1.0' in text
