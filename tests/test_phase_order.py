"""The phase-order predictor alone: no I/O, no event loop, the clock passed in."""

from __future__ import annotations

from warmpool.scheduling.phase_order import PhaseOrder

LOOP = (("context", "planner"), ("execution", "coder"), ("verification", "reviewer"))


def agent_loop(order: PhaseOrder, session: str, rounds: int, start: float = 0.0, think: float = 1.0,
               work: float = 2.0) -> float:
    """`rounds` of context -> execution -> verification for `session`; returns the time it ends."""
    now = start
    for _ in range(rounds):
        for step, model in LOOP:
            order.arrived(session, step, model, now)
            now += work
            order.finished(session, now)
            now += think
    return now


def test_a_learned_loop_predicts_the_next_phase_model_and_when_it_comes() -> None:
    order = PhaseOrder(threshold=0.6)
    now = agent_loop(order, "agent-1", rounds=3)
    order.arrived("agent-1", "context", "planner", now)
    prediction = order.finished("agent-1", now + 2.0)
    assert prediction is not None
    assert (prediction.model, prediction.probability) == ("coder", 1.0)
    assert prediction.expected_at == now + 3.0  # the end plus the learned think time
    assert order.expected() == {"coder": now + 3.0}


def test_nothing_is_predicted_before_min_seen_transitions() -> None:
    order = PhaseOrder(threshold=0.5, min_seen=3)
    for i in range(2):
        order.arrived("s", "context", "planner", i * 2.0)
        order.arrived("s", "execution", "coder", i * 2.0 + 1)
    assert order.finished("s", 10.0) is None  # execution -> context seen once only
    assert order.likely_next("context") is None  # context -> execution seen twice


def test_an_order_below_the_threshold_predicts_nothing() -> None:
    order = PhaseOrder(threshold=0.6, min_seen=1)
    for successor in ("execution", "debugging", "execution", "debugging"):
        order.arrived("s", "context", "planner", 0.0)
        order.arrived("s", "s-" + successor, successor, 0.0)
    assert order.transitions["context"] == {"s-execution": 2, "s-debugging": 2}
    assert order.likely_next("context") is None  # 50% < 60%


def test_transitions_only_join_requests_of_one_session() -> None:
    # Two agents interleaved: across sessions the sequence looks random, within each it is a loop.
    order = PhaseOrder(threshold=0.9)
    now = 0.0
    for _ in range(3):
        for step, model in LOOP:
            order.arrived("a", step, model, now)
            order.arrived("b", LOOP[(LOOP.index((step, model)) + 1) % 3][0], "x", now)
            now += 1
    assert order.likely_next("context") == ("execution", 1.0)
    assert order.likely_next("execution") == ("verification", 1.0)


def test_the_next_request_settles_the_prediction_as_hit_or_miss() -> None:
    order = PhaseOrder(threshold=0.6)
    now = agent_loop(order, "s", rounds=3)
    order.arrived("s", "context", "planner", now)
    order.finished("s", now + 1)
    settled = order.arrived("s", "execution", "coder", now + 2)
    assert settled is not None and settled.hit and settled.prediction.model == "coder"
    order.finished("s", now + 3)  # predicts verification -> reviewer
    missed = order.arrived("s", "debugging", "coder", now + 4)
    assert missed is not None and not missed.hit and order.expected() == {}


def test_unsettled_predictions_expire_as_misses_after_the_horizon() -> None:
    order = PhaseOrder(threshold=0.6, horizon=10.0)
    now = agent_loop(order, "s", rounds=3)
    order.arrived("s", "context", "planner", now)
    prediction = order.finished("s", now + 1)
    assert prediction is not None
    assert order.expire(prediction.expected_at + 10.0) == []
    assert order.expire(prediction.expected_at + 10.5) == [prediction]
    assert order.expected() == {}


def test_sessions_are_bounded_and_the_oldest_is_forgotten() -> None:
    order = PhaseOrder(threshold=0.5, max_sessions=2)
    for session in ("a", "b", "c"):
        order.arrived(session, "context", "planner", 0.0)
    assert list(order.sessions) == ["b", "c"]


def test_a_changed_loop_is_learned_again() -> None:
    order = PhaseOrder(threshold=0.6, min_seen=1)
    for _ in range(300):
        order.arrived("s", "context", "planner", 0.0)
        order.arrived("s", "execution", "coder", 0.0)
    for _ in range(300):
        order.arrived("s", "context", "planner", 0.0)
        order.arrived("s", "debugging", "coder", 0.0)
    assert order.likely_next("context") is not None and order.likely_next("context")[0] == "debugging"  # type: ignore[index]
