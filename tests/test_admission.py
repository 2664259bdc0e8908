"""The admission gate (warmpool/http/admission.py): a burst of requests begins a few per event-loop turn, in
arrival order, so running streams' chunks go out between them; a client that leaves while waiting gives its
place up; every request is still served. Turns are counted with a callback that re-schedules itself, one run
per turn of the loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from warmpool.http import server
from warmpool.http.admission import Admission
from warmpool.http.exchange import Incoming, Reply


def turn_counter() -> tuple[list[int], Callable[[], None]]:
    """A list whose one number goes up once per turn of the running loop, and a function that stops it."""
    loop = asyncio.get_running_loop()
    count, running = [0], [True]

    def tick() -> None:
        if running[0]:
            count[0] += 1
            loop.call_soon(tick)

    loop.call_soon(tick)
    return count, lambda: running.__setitem__(0, False)


async def test_a_burst_begins_a_few_per_turn_in_arrival_order() -> None:
    gate = Admission(per_turn=2)
    turns, stop = turn_counter()
    await asyncio.sleep(0)
    began: list[tuple[int, int]] = []  # (request, turn)

    async def request(number: int) -> None:
        await begin(gate)
        began.append((number, turns[0]))

    await asyncio.gather(*(request(number) for number in range(9)))
    stop()
    assert [number for number, _ in began] == list(range(9))  # first come, first served
    per_turn: dict[int, int] = {}
    for _, turn in began:
        per_turn[turn] = per_turn.get(turn, 0) + 1
    assert max(per_turn.values()) <= 2
    assert len(per_turn) >= 5


async def begin(gate: Admission) -> None:
    if not gate.now():
        await gate.wait()


async def test_a_waiter_that_leaves_gives_its_place_up() -> None:
    gate = Admission(per_turn=1)
    assert gate.now()
    first = asyncio.create_task(gate.wait())
    second = asyncio.create_task(gate.wait())
    await asyncio.sleep(0)
    first.cancel()
    await asyncio.wait_for(second, 1)  # the place the cancelled waiter held went to the next one
    assert first.cancelled()
    await asyncio.wait_for(begin(gate), 1)  # and the gate goes on admitting


async def test_requests_arriving_together_begin_a_few_per_turn_and_all_are_answered() -> None:
    """Through the server: 60 connections send their requests in one go; without the gate all 60 handlers
    would begin in one turn."""
    turns, stop = turn_counter()
    began: list[int] = []

    async def answer(request: Incoming, reply: Reply) -> None:
        began.append(turns[0])
        await reply.whole(200, "", [], b"ok")

    lane = server.Lane(answer, server.Limits(max_body=100, starts_per_turn=4))
    listener = await asyncio.get_running_loop().create_server(lane.protocol, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    clients = [await asyncio.open_connection("127.0.0.1", port) for _ in range(60)]
    await asyncio.sleep(0.05)  # every connection accepted before any request is sent
    for _, writer in clients:
        writer.write(b"GET /x HTTP/1.1\r\nHost: w\r\n\r\n")
    answers = await asyncio.wait_for(asyncio.gather(*(reader.readuntil(b"ok") for reader, _ in clients)), 10)
    stop()
    assert all(answer.startswith(b"HTTP/1.1 200 ") for answer in answers)
    per_turn: dict[int, int] = {}
    for turn in began:
        per_turn[turn] = per_turn.get(turn, 0) + 1
    assert len(began) == 60
    # 4 a turn, at most twice that in one: waiters let in by one turn begin in the next, beside that
    # turn's own first comers
    assert max(per_turn.values()) <= 8
    for _, writer in clients:
        writer.close()
    listener.close()
