"""The data path's lock-free metrics expose exactly what prometheus_client's own classes would."""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from warmpool.metrics import REQUEST_BUCKETS, LoopCounter, LoopHistogram


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
