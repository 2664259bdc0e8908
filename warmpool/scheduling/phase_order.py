"""Learning the phase order of client sessions, to predict the model a session asks for next.

Agents go context -> execution -> verification again and again. `PhaseOrder` follows each session (the
`X-Warmpool-Session` header, else the client's address) and counts the transitions between the steps of
its consecutive requests (a step is the request's phase, else its model). The counts are pooled over
sessions, since the agents of one framework share their loop, but a transition only ever joins two
requests of the same session, so interleaved agents do not blur each other's order. It also learns, per
transition, the gap between a request's end and the session's next request (an agent's think time).

When a session's request ends and one successor of its step has at least `threshold` of that step's
observed transitions (after at least `min_seen` of them), that is a prediction: the successor's model,
expected at the end plus the learned gap. The session's next request settles it, a hit when it asks for
the predicted model; one not settled within `horizon` seconds of its expected time expires as a miss.

Pure: no I/O, no clock but the `now` passed in. The scheduler acts on the predictions (scheduling/pool.py).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass

GAP_WEIGHT = 0.3  # weight of the newest gap in its running average
MAX_ROW = 200  # a step's transitions are halved past this many, so the order can change


@dataclass(slots=True)
class Prediction:
    session: str
    model: str
    probability: float
    expected_at: float
    warmed_bytes: int = 0  # what preparing for it read into RAM (the scheduler adds it), for misses


@dataclass(frozen=True, slots=True)
class Settled:
    prediction: Prediction
    hit: bool


@dataclass(slots=True)
class _Session:
    step: str | None = None  # the step of its latest request
    arrived_at: float = 0.0
    ended_at: float | None = None  # when its latest finished request ended


class PhaseOrder:
    """See the module docstring."""

    def __init__(self, threshold: float, *, min_seen: int = 3, max_sessions: int = 1024,
                 horizon: float = 60.0) -> None:
        self.threshold = threshold
        self.min_seen = min_seen
        self.max_sessions = max_sessions
        self.horizon = horizon
        self.transitions: dict[str, Counter[str]] = {}
        self.totals: Counter[str] = Counter()  # transitions counted from each step
        self.gaps: dict[tuple[str, str], float] = {}  # seconds from a step's end to the next step's start
        self.models: dict[str, str] = {}  # step -> the model it was last routed to
        self.sessions: OrderedDict[str, _Session] = OrderedDict()  # least recently seen first
        self.open: dict[str, Prediction] = {}  # session -> its unsettled prediction

    def __repr__(self) -> str:
        rows = {step: dict(counts) for step, counts in self.transitions.items()}
        return f"<PhaseOrder {rows} open={sorted(p.model for p in self.open.values())}>"

    def arrived(self, session: str, step: str, model: str, now: float) -> Settled | None:
        """A request of `session` for `step` (routed to `model`) arrived: count the transition from the
        session's previous step. Returns the session's prediction this settles, if there was one."""
        state = self._session(session)
        self.models[step] = model
        prediction = self.open.pop(session, None)
        if state.step is not None:
            self._count(state.step, step)
            if state.ended_at is not None and state.ended_at >= state.arrived_at:
                self._learn_gap((state.step, step), now - state.ended_at)
        state.step, state.arrived_at = step, now
        return None if prediction is None else Settled(prediction, prediction.model == model)

    def finished(self, session: str, now: float) -> Prediction | None:
        """A request of `session` ended: its prediction for the session's next request, if one is likely."""
        state = self.sessions.get(session)
        if state is None or state.step is None:
            return None
        state.ended_at = now
        likely = self.likely_next(state.step)
        if likely is None:
            self.open.pop(session, None)
            return None
        step, probability = likely
        gap = self.gaps.get((state.step, step), 0.0)
        prediction = Prediction(session, self.models[step], probability, now + gap)
        self.open[session] = prediction
        return prediction

    def likely_next(self, step: str) -> tuple[str, float] | None:
        """The successor of `step` with at least `threshold` of its observed transitions, and that share."""
        counts = self.transitions.get(step)
        total = self.totals[step]
        if not counts or total < self.min_seen:
            return None
        successor, seen = counts.most_common(1)[0]
        share = seen / total
        return (successor, share) if share >= self.threshold else None

    def expected(self) -> dict[str, float]:
        """Open predictions by model: the earliest time a request for it is expected."""
        soonest: dict[str, float] = {}
        for prediction in self.open.values():
            if prediction.expected_at < soonest.get(prediction.model, float("inf")):
                soonest[prediction.model] = prediction.expected_at
        return soonest

    def expire(self, now: float) -> list[Prediction]:
        """Drop the predictions not settled within `horizon` of their expected time; they were misses."""
        stale = [s for s, p in self.open.items() if now > p.expected_at + self.horizon]
        return [self.open.pop(session) for session in stale]

    def _session(self, session: str) -> _Session:
        state = self.sessions.pop(session, None) or _Session()
        self.sessions[session] = state  # now the most recently seen
        while len(self.sessions) > self.max_sessions:
            forgotten, _ = self.sessions.popitem(last=False)
            self.open.pop(forgotten, None)
        return state

    def _count(self, step: str, successor: str) -> None:
        row = self.transitions.setdefault(step, Counter())
        row[successor] += 1
        self.totals[step] += 1
        if self.totals[step] > MAX_ROW:
            for key in list(row):
                row[key] //= 2
                if not row[key]:
                    del row[key]
            self.totals[step] = sum(row.values())

    def _learn_gap(self, transition: tuple[str, str], gap: float) -> None:
        old = self.gaps.get(transition)
        self.gaps[transition] = gap if old is None else old + GAP_WEIGHT * (gap - old)
