"""Child processes that never outlive warmpool: each runs in its own process group with a parent-death
signal (so neither a stop nor a SIGKILLed warmpool leaves one behind), its output drained so it never
blocks on a full pipe, the tail of its stderr kept for error messages, its exit noticed at once, and a
stop that is SIGTERM, then SIGKILL after a grace. Managed servers of every kind are built on `Child`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import Self

from warmpool.backends._llamacpp_worker import PARENT_PID_ENV, PR_SET_PDEATHSIG

HOST = "127.0.0.1"
TAIL_LINES = 50  # stderr lines kept per process
REPORT_LINES = 12  # of those, how many go into an error message

# Resolved now: the forked child should do as little as possible before exec (other threads held locks).
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None


def base_env() -> dict[str, str]:
    """warmpool's environment, plus its pid (a child can tell whether the parent died before prctl ran)."""
    return {**os.environ, PARENT_PID_ENV: str(os.getpid())}


def free_port() -> int:
    """A port nobody listens on now (bind to 0, read it, close); the child binds it a moment later."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    """A preexec_fn: SIGKILL the child when its parent thread dies, even if the parent is SIGKILLed."""

    def preexec() -> None:
        if _prctl is not None:
            _prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
        if os.getppid() != parent_pid:  # the parent died between fork and prctl
            os._exit(1)

    return preexec



class Child:
    """A spawned process in its own group: output drained, stderr tail kept, exit noticed, group killed."""

    def __init__(self, proc: asyncio.subprocess.Process, label: str) -> None:
        self.proc = proc
        self.label = label
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.exited = asyncio.Event()
        self.on_exit: list[Callable[[int], None]] = []
        self._tasks = [
            asyncio.create_task(self._drain(proc.stdout, self.on_stdout_line)),
            asyncio.create_task(self._drain(proc.stderr, self.tail.append)),
            asyncio.create_task(self._watch()),
        ]

    @classmethod
    async def spawn(cls, argv: list[str], label: str, env: dict[str, str]) -> Self:
        """Start `argv` in a new session (its own process group) that dies with us."""
        # Called on the event loop thread: PDEATHSIG fires when the *thread* that forked us ends.
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent(os.getpid()),
        )
        return cls(proc, label)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    @property
    def alive(self) -> bool:
        return not self.exited.is_set()

    async def _drain(self, stream: asyncio.StreamReader | None, sink: Callable[[str], None]) -> None:
        """Read until EOF so the child never blocks on a full pipe."""
        assert stream is not None
        while True:
            try:
                line = await stream.readline()
            except ValueError:  # a line over the reader's limit: its bytes are dropped, go on
                continue
            if not line:
                return
            sink(line.decode(errors="replace").rstrip())

    def on_stdout_line(self, line: str) -> None:
        """One line the child printed (subclasses read their protocol from it); dropped by default."""

    async def _watch(self) -> None:
        returncode = await self.proc.wait()
        self.exited.set()
        for callback in self.on_exit:
            callback(returncode)

    async def send_line(self, line: bytes) -> None:
        """Write one line to the child's stdin; a child that just died is noticed by its exit, not here."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(line + b"\n")
            await self.proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            pass  # it died just now: the caller's health check reports that, with its exit code and stderr

    def signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, sig)  # the group id is the pid: start_new_session made it a leader

    async def stop(self, grace: float) -> None:
        """SIGTERM the group, SIGKILL it after `grace`, reap; safe to call again."""
        if self.alive:
            self.signal_group(signal.SIGTERM)
            if not await wait_event(self.exited, grace):
                self.signal_group(signal.SIGKILL)
        await self.close()

    async def close(self) -> None:
        """SIGKILL whatever is left of the group and wait for the process and its pipes."""
        self.signal_group(signal.SIGKILL)
        await asyncio.wait(self._tasks, timeout=5.0)
        for task in self._tasks:
            task.cancel()

    def exit_reason(self) -> str:
        code = self.returncode
        if code is not None and code < 0:
            return f"killed by {signal.Signals(-code).name}"
        return f"exited with code {code}"

    def stderr_report(self) -> str:
        lines = list(self.tail)[-REPORT_LINES:]
        return "; stderr tail:\n  " + "\n  ".join(lines) if lines else "; no stderr output"


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Whether `event` was set within `timeout` seconds."""
    try:
        await asyncio.wait_for(event.wait(), max(timeout, 0.0))
    except TimeoutError:
        return False
    return True
