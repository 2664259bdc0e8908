"""What a load balancer in front of several warmpool hosts is told about this one: the host's weight, from
its recent swap activity and queue depth, and whether it is draining. Pure: the samples come in, the
weight and HAProxy's agent-check line go out (admin/agent.py does the I/O).

HAProxy's agent-check protocol (its configuration manual, "agent-check"): the agent writes one line of
words separated by spaces, tabs or commas and ended by CR or LF. "75%" sets the server's weight to that
share of its configured weight; "ready" cancels a DRAIN or MAINT state the agent set before; "drain"
stops new requests reaching the server (running ones go on); "up" marks it up again where the health
check agrees. Only the agent can undo what it set, so every answer but "drain" says "ready".
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

# A host that spends less than this share of its recent time swapping, with a short queue, keeps its full
# weight; the weight then falls in steps of 25% to a floor of 25% (0% would be a drain: only shutdown
# does that, so a host that is merely busy still takes some of its models' requests).
WEIGHT_STEP = 25
WEIGHT_FLOOR = 25
# Mean queued requests at which a host counts as saturated (weight at the floor).
QUEUE_SATURATED = 8.0
SAMPLE_INTERVAL = 0.5  # seconds between samples
WINDOW = 60  # samples kept: 30 s, longer than a swap, so one swap does not move the weight


@dataclass(frozen=True, slots=True)
class Sample:
    """The host at one instant: whether any pool was swapping, and how many requests were queued."""

    swapping: bool
    queued: int


@dataclass(frozen=True, slots=True)
class HostLoad:
    """The recent window, summarised."""

    swap_share: float  # share of the samples taken during a swap, 0-1
    queue_mean: float  # mean queued requests


class LoadWindow:
    """The last WINDOW samples of the host's swap activity and queue depth."""

    def __init__(self, size: int = WINDOW) -> None:
        self.samples: deque[Sample] = deque(maxlen=size)

    def __repr__(self) -> str:
        load = self.load()
        return f"<LoadWindow n={len(self.samples)} swap_share={load.swap_share:.2f} queue_mean={load.queue_mean:.2f}>"

    def add(self, sample: Sample) -> None:
        self.samples.append(sample)

    def load(self) -> HostLoad:
        """Shares of the whole window: before the first samples the host was idle, so a swap in its first
        seconds does not make a new host look as if it swapped all the time."""
        size = self.samples.maxlen or 1
        return HostLoad(sum(s.swapping for s in self.samples) / size, sum(s.queued for s in self.samples) / size)


def weight_percent(load: HostLoad) -> int:
    """The host's weight as a share of its configured one: 100 when it rarely swaps and its queue is short,
    lower the more of its time goes to swapping or the longer its queue, in steps of WEIGHT_STEP (a
    consistent-hash balancer moves some of a host's models elsewhere whenever its weight changes, so the
    weight moves only when the load really did), never below WEIGHT_FLOOR."""
    busy = max(load.swap_share, min(1.0, load.queue_mean / QUEUE_SATURATED))
    share = 100 - (100 - WEIGHT_FLOOR) * busy
    steps = int(share / WEIGHT_STEP + 0.5)  # halves round up (Python's round() would round 2.5 to 2)
    return max(WEIGHT_FLOOR, min(100, WEIGHT_STEP * steps))


def agent_line(draining: bool, weight: int) -> bytes:
    """The agent-check answer: "drain" while shutting down, else up and ready at `weight` percent."""
    return b"drain\n" if draining else f"up ready {weight}%\n".encode()
