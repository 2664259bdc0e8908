"""How many requests start their work in one turn of the event loop.

A stream's chunk is relayed from the upstream connection's own callback, within the loop turn that
reads it; a new request's first step (parse its JSON, route it, take a lease, open its upstream
request) costs tens of microseconds more. When hundreds of requests arrive together, starting them all
in one turn makes that turn tens of milliseconds long and every running stream's next chunk waits for
it. The gate lets a few requests start per turn and the rest in the turns after, in arrival order, so
the chunks already produced go out between them; the work is the same, only its order changes.
"""

from __future__ import annotations

import asyncio
from collections import deque


class Admission:
    """At most `per_turn` requests begin per loop turn; the others wait, first come first served."""

    def __init__(self, per_turn: int) -> None:
        self.per_turn = per_turn
        self.started = 0  # requests begun in this turn
        self.waiting: deque[asyncio.Future[None]] = deque()
        self.turn_pending = False  # a callback to open the next turn is scheduled
        self.loop: asyncio.AbstractEventLoop | None = None

    def now(self) -> bool:
        """True when a request may begin at once (counted); False when it must `await wait()`."""
        if self.waiting or self.started >= self.per_turn:
            return False
        self.started += 1
        if not self.turn_pending:
            self._schedule_next_turn()
        return True

    async def wait(self) -> None:
        """Wait for this request's turn (after `now()` said False); a cancelled waiter gives its place up."""
        future: asyncio.Future[None] = self._loop().create_future()
        self.waiting.append(future)
        if not self.turn_pending:
            self._schedule_next_turn()
        await future

    def _loop(self) -> asyncio.AbstractEventLoop:
        # Taken once, when first needed (the gate is built before the loop runs); on Python 3.11 every
        # get_running_loop() is a getpid() system call.
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
        return self.loop

    def _schedule_next_turn(self) -> None:
        self.turn_pending = True
        self._loop().call_soon(self._next_turn)

    def _next_turn(self) -> None:
        """A new loop turn: the count starts again, and the longest waiters take its places."""
        self.turn_pending = False
        self.started = 0
        waiting = self.waiting
        while waiting and self.started < self.per_turn:
            future = waiting.popleft()
            if not future.done():  # a cancelled waiter (its client left) takes no place
                future.set_result(None)
                self.started += 1
        if waiting or self.started:
            self._schedule_next_turn()
