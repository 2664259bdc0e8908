"""The host's word to a load balancer: samples the scheduler for the load window (admin/balancer.py), knows
whether warmpool is draining, and answers HAProxy's agent checks on `balancer.agent_port` when set.

An agent check is a TCP connection on which HAProxy reads one line (and may first send its `agent-send`
string, which is not needed here): the answer is written at once, the write side is closed, and the
connection is held until HAProxy closes it (closing with its bytes unread would reset the connection,
and a reset may reach HAProxy before the answer does).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from warmpool.admin.balancer import SAMPLE_INTERVAL, HostLoad, LoadWindow, Sample, agent_line, weight_percent
from warmpool.config import BalancerConfig
from warmpool.scheduling.pool import Scheduler

log = logging.getLogger("warmpool.agent")
HOLD_SECONDS = 2.0  # how long an answered connection waits for HAProxy to close it


class Agent:
    """What the balancer is told: weight and draining; `start` samples and listens, `close` stops both."""

    def __init__(self, cfg: BalancerConfig, scheduler: Scheduler) -> None:
        self.cfg = cfg
        self.scheduler = scheduler
        self.window = LoadWindow()
        self.draining = False
        self.address: tuple[str, int] | None = None  # where the responder listens, once it does
        self._server: asyncio.Server | None = None
        self._sampler: asyncio.Task[None] | None = None
        self._connections: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"<Agent {self.line().decode().strip()!r} {self.window!r} at {self.address}>"

    def sample(self) -> Sample:
        pools = self.scheduler.pools.values()
        return Sample(swapping=any(p.swap_task is not None for p in pools),
                      queued=sum(sum(p.queue_counts().values()) for p in pools))

    def load(self) -> HostLoad:
        return self.window.load()

    def weight(self) -> int:
        return weight_percent(self.window.load())

    def line(self) -> bytes:
        return agent_line(self.draining, self.weight())

    def drain(self) -> None:
        """SIGTERM: from now on the agent says drain and /readyz says 503."""
        if not self.draining:
            log.info("draining: the balancer is told to send no new requests")
        self.draining = True

    async def start(self) -> None:
        self._sampler = asyncio.create_task(self._sample_forever(), name="agent:sampler")
        if self.cfg.agent_port is None:
            return
        self._server = await asyncio.start_server(self._answer, self.cfg.agent_host, self.cfg.agent_port,
                                                  reuse_address=True)
        host, port = self._server.sockets[0].getsockname()[:2]
        self.address = (host, port)
        log.info("agent-check responder on %s:%d", host, port)

    async def close(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        if self._server is not None:
            await self._server.wait_closed()

    async def _sample_forever(self) -> None:
        while True:
            self.window.add(self.sample())
            await asyncio.sleep(SAMPLE_INTERVAL)

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        try:
            writer.write(self.line())
            if writer.can_write_eof():
                writer.write_eof()
            await writer.drain()
            async with asyncio.timeout(HOLD_SECONDS):
                while await reader.read(4096):
                    pass  # HAProxy's agent-send string, if configured: not needed
        except (OSError, TimeoutError):
            pass  # the balancer went away or lingered: it has its answer or will ask again
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            if task is not None:
                self._connections.discard(task)
