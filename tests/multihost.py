"""Several warmpool hosts on one machine, each in its own network namespace, behind a real HAProxy: the
harness of tests/test_multihost.py and benchmarks/multihost.py.

A `Fabric` makes a bridge in the root namespace and, per host, a network namespace joined to it by a veth
pair, with its own address on a private /24 picked so it collides with no route here. In each namespace
run the host's own Ollama emulator (on the namespace's loopback, as Ollama listens by default) and its own
warmpool (`max_resident: 1`, listening on the host's address, with the agent-check responder), both with
`ip netns exec`. HAProxy runs in the root namespace with deploy/haproxy/haproxy.cfg as shipped (its
"${NAME-default}" values set from the environment) plus a second file that adds a round-robin frontend
over the same hosts, so both routings go through one HAProxy. Everything made is undone by `close()`,
which the users call in a `finally`: processes (by their ids), veths, the bridge, the namespaces.

Clients stream OpenAI chat completions through HAProxy and classify each answer (`Outcome`): complete
(it ended with `data: [DONE]`), failed in a way the client sees (an HTTP error, an error event, a cut
connection), or hung (no end within `hang_after`).
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import ctypes
import io
import ipaddress
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
HAPROXY_CFG = REPO / "deploy" / "haproxy" / "haproxy.cfg"
WARMPOOL_PORT = 11435
AGENT_PORT = 9100
OLLAMA_PORT = 11434
CHECK_INTER = "500ms"  # HAProxy's health and agent check interval here (2 s in the shipped config)
DRAIN_DELAY = 1.5  # warmpool's balancer.drain_delay here: three agent checks
PHASE_HEADER = "X-Warmpool-Phase"
HOST_HEADER = "X-Warmpool-Host"  # which server HAProxy chose (set by deploy/haproxy/haproxy.cfg)

# The models every host serves (client name -> Ollama name) and the phases that pick them.
UPSTREAM = {"planner": "qwen2.5:7b", "coder": "qwen2.5-coder:7b", "reviewer": "llama3.2:3b",
            "debugger": "phi3:mini"}
# `debugger` is served by every host but picked by no phase: tests name it in the body.
PHASES = {"context": "planner", "execution": "coder", "verification": "reviewer", "debugging": "coder"}


def namespaces_unavailable() -> str | None:
    """Why network namespaces cannot be made here, or None when they can (made and removed to know)."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is missing"
    if os.geteuid() != 0:
        return "making network namespaces needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN)"
    probe = f"wpprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def run_ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- processes ------------------------------------------------------------------------------------------

class Child:
    """A process this harness started (in its own process group), its output in a log file."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str]) -> None:
        self.name, self.log_path = name, log_path
        with log_path.open("ab") as log:
            self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         preexec_fn=_die_with_parent)

    def __repr__(self) -> str:
        return f"<Child {self.name} pid={self.proc.pid} rc={self.proc.poll()}>"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        if self.alive():
            os.kill(self.proc.pid, sig)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM, then SIGKILL to its process group after `grace` seconds."""
        if self.alive():
            self.signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(grace)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def _die_with_parent() -> None:
    """preexec_fn: the child gets SIGKILL if this process dies without stopping it (PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))


def child_env() -> dict[str, str]:
    """Our environment, with this checkout first on the path and no WARMPOOL_* settings leaking in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WARMPOOL_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


# -- the hosts ------------------------------------------------------------------------------------------

@dataclass
class Host:
    """One GPU host: a network namespace with an address, its emulator and its warmpool."""

    name: str  # gpu1, gpu2, ... (HAProxy's server names)
    netns: str
    veth: str  # the root-side end of its veth pair
    address: str
    workdir: Path
    children: dict[str, Child] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{self.address}:{WARMPOOL_PORT}"

    @property
    def warmpool(self) -> Child:
        return self.children["warmpool"]

    def config(self) -> dict[str, Any]:
        return {
            "listen": f"0.0.0.0:{WARMPOOL_PORT}", "log": {"level": "info"},
            "backends": {"ollama": {"kind": "ollama", "url": f"http://127.0.0.1:{OLLAMA_PORT}", "max_resident": 1}},
            "models": {name: {"backend": "ollama", "upstream_name": up} for name, up in UPSTREAM.items()},
            "phases": dict(PHASES),
            "ram_tier": {"enabled": False},  # the emulator has no weight files to keep warm
            "balancer": {"agent_port": AGENT_PORT, "agent_host": "0.0.0.0", "drain_delay": DRAIN_DELAY},
        }


@dataclass(frozen=True)
class Emulation:
    """How each host's Ollama emulator behaves: load seconds = size in GB × load_seconds_per_gb."""

    model_size: str = "1GB"
    load_seconds_per_gb: float = 0.5
    token_delay: float = 0.01


class Fabric:
    """The bridge, the hosts' namespaces and veths, their processes, and HAProxy in front."""

    def __init__(self, workdir: Path, count: int = 3) -> None:
        self.workdir = workdir
        self.tag = f"{random.randrange(16**4):04x}"
        self.bridge = f"wp{self.tag}br"
        self.subnet = pick_subnet()
        addresses = list(self.subnet.hosts())
        self.gateway = str(addresses[0])
        self.hosts = [Host(f"gpu{i}", f"wp{self.tag}h{i}", f"wp{self.tag}v{i}", str(addresses[10 + i]),
                           workdir / f"gpu{i}") for i in range(1, count + 1)]
        self.haproxy: HAProxy | None = None  # the one running
        self._haproxies: list[HAProxy] = []
        self._made: list[tuple[str, ...]] = []  # undo commands, in the order made

    def __repr__(self) -> str:
        return f"<Fabric {self.subnet} hosts={[h.name for h in self.hosts]} haproxy={self.haproxy}>"

    def create(self) -> None:
        run_ip("link", "add", self.bridge, "type", "bridge")
        self._made.append(("link", "del", self.bridge))
        run_ip("addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", self.bridge)
        run_ip("link", "set", self.bridge, "up")
        for host in self.hosts:
            self._create_host(host)

    def _create_host(self, host: Host) -> None:
        host.workdir.mkdir(parents=True, exist_ok=True)
        run_ip("netns", "add", host.netns)
        self._made.append(("netns", "del", host.netns))
        run_ip("link", "add", host.veth, "type", "veth", "peer", "name", "eth0", "netns", host.netns)
        self._made.append(("link", "del", host.veth))
        run_ip("link", "set", host.veth, "master", self.bridge)
        run_ip("link", "set", host.veth, "up")
        run_ip("-n", host.netns, "addr", "add", f"{host.address}/{self.subnet.prefixlen}", "dev", "eth0")
        run_ip("-n", host.netns, "link", "set", "eth0", "up")
        run_ip("-n", host.netns, "link", "set", "lo", "up")

    def spawn(self, host: Host, name: str, argv: list[str]) -> Child:
        child = Child(f"{host.name}/{name}", ["ip", "netns", "exec", host.netns, *argv],
                      host.workdir / f"{name}.log", child_env())
        host.children[name] = child
        return child

    def start_host(self, host: Host, emulation: Emulation) -> None:
        """Its emulator and its warmpool, in its namespace (wait for them with `wait_ready`)."""
        models = [f"--model={up}={emulation.model_size}" for up in UPSTREAM.values()]
        self.spawn(host, "emulator", [sys.executable, "-m", "tests.ollama_emulator", "--host", "127.0.0.1",
                                      "--port", str(OLLAMA_PORT), *models, "--max-loaded", "4",
                                      f"--load-seconds-per-gb={emulation.load_seconds_per_gb}",
                                      f"--token-delay={emulation.token_delay}"])
        path = host.workdir / "warmpool.yaml"
        path.write_text(yaml.safe_dump(host.config()))
        self.spawn(host, "warmpool", [sys.executable, "-m", "warmpool", "serve", "--config", str(path)])

    def start_haproxy(self, models_map: dict[str, str], balance_factor: int | None = None) -> HAProxy:
        """HAProxy in front of the hosts (stopping the one started before, if any); `balance_factor` replaces
        the shipped hash-balance-factor (0: no bound)."""
        if self.haproxy is not None:
            self.haproxy.child.stop()
        self.haproxy = HAProxy(self.workdir / f"haproxy{len(self._haproxies)}", self.hosts, models_map,
                               balance_factor)
        self._haproxies.append(self.haproxy)
        return self.haproxy

    def close(self) -> None:
        """Undo everything, whatever state it is in: processes first, then links and namespaces."""
        children = [c for h in self.hosts for c in h.children.values()] + [p.child for p in self._haproxies]
        for child in children:
            with contextlib.suppress(Exception):
                child.stop(grace=5.0)
        for host in self.hosts:
            self._kill_leftovers(host)
        for undo in reversed(self._made):
            subprocess.run(["ip", *undo], capture_output=True)
        self._made.clear()

    @staticmethod
    def _kill_leftovers(host: Host) -> None:
        """Processes still in the host's namespace (children of ours): the namespace goes only with them."""
        found = subprocess.run(["ip", "netns", "pids", host.netns], capture_output=True, text=True)
        for pid in found.stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)

    def leftovers(self) -> list[str]:
        """What of ours is still there (for the tests' own check of the teardown)."""
        names = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        spaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        return [w for w in (self.bridge, *(h.veth for h in self.hosts)) if w in names] + \
               [h.netns for h in self.hosts if h.netns in spaces]


def pick_subnet() -> ipaddress.IPv4Network:
    """A private /24 that no route on this machine covers or overlaps."""
    routes = subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True).stdout
    taken = [ipaddress.ip_network(word, strict=False) for line in routes.splitlines()
             for word in line.split()[:2] if _is_network(word)]
    for _ in range(100):
        candidate = ipaddress.ip_network(f"10.{random.randrange(200, 250)}.{random.randrange(256)}.0/24")
        if not any(candidate.overlaps(net) for net in taken):
            return candidate
    raise RuntimeError("no free 10.x.y.0/24 for the test hosts")


def _is_network(word: str) -> bool:
    try:
        ipaddress.ip_network(word, strict=False)
    except ValueError:
        return False
    return "." in word


@contextlib.contextmanager
def fabric(workdir: Path, count: int = 3) -> Iterator[Fabric]:
    """A Fabric made, and undone on the way out even when the body failed."""
    made = Fabric(workdir, count)
    try:
        made.create()
        yield made
    finally:
        made.close()


# -- HAProxy --------------------------------------------------------------------------------------------

ROUND_ROBIN_CFG = """
# The same hosts through the same HAProxy, spread round robin: the routing affinity is compared with.
frontend warmpool_rr
    bind "${WARMPOOL_RR_BIND}"
    default_backend warmpool_rr

backend warmpool_rr
    balance roundrobin
    option http-no-delay
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response 503
    option httpchk GET /readyz
    http-check expect status 200
    http-response set-header X-Warmpool-Host %[srv_name]
    default-server check inter "${WARMPOOL_CHECK_INTER}" fall 2 rise 2 weight 100
    default-server agent-check agent-port "${WARMPOOL_AGENT_PORT}" agent-inter "${WARMPOOL_CHECK_INTER}"
"""


class HAProxy:
    """Debian's haproxy with the shipped configuration, in the foreground, its admin socket kept at hand."""

    def __init__(self, workdir: Path, hosts: list[Host], models_map: dict[str, str],
                 balance_factor: int | None = None) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.socket = workdir / "admin.sock"
        models = workdir / "warmpool-models.map"
        models.write_text("".join(f"{key} {value}\n" for key, value in models_map.items()))
        rr = workdir / "roundrobin.cfg"
        rr.write_text(ROUND_ROBIN_CFG + "".join(
            f'    server {h.name} "{h.address}:{WARMPOOL_PORT}"\n' for h in hosts))
        self.port, self.rr_port, stats = free_port(), free_port(), free_port()
        env = {**child_env(), "WARMPOOL_BIND": f"127.0.0.1:{self.port}",
               "WARMPOOL_RR_BIND": f"127.0.0.1:{self.rr_port}",
               "WARMPOOL_HAPROXY_SOCKET": str(self.socket), "WARMPOOL_MODELS_MAP": str(models),
               "WARMPOOL_HAPROXY_STATS": f"127.0.0.1:{stats}", "WARMPOOL_CHECK_INTER": CHECK_INTER,
               "WARMPOOL_AGENT_PORT": str(AGENT_PORT),
               **{f"WARMPOOL_{h.name.upper()}": f"{h.address}:{WARMPOOL_PORT}" for h in hosts}}
        if balance_factor is not None:
            env["WARMPOOL_HASH_BALANCE_FACTOR"] = str(balance_factor)
        self.balance_factor = 150 if balance_factor is None else balance_factor
        self.child = Child("haproxy", ["haproxy", "-db", "-f", str(HAPROXY_CFG), "-f", str(rr)],
                           workdir / "haproxy.log", env)

    def __repr__(self) -> str:
        return f"<HAProxy :{self.port} rr :{self.rr_port} {self.child!r}>"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def rr_url(self) -> str:
        return f"http://127.0.0.1:{self.rr_port}"

    def command(self, line: str) -> str:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(self.socket))
            s.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def servers(self, backend: str = "warmpool_hosts") -> dict[str, dict[str, str]]:
        """`show stat` for the backend's servers, by name: status (UP, DOWN, DRAIN, ...), weight, stot
        (requests sent), wretr and wredis (retries and redispatches), and the rest of HAProxy's columns."""
        text = self.command("show stat").lstrip("# ")
        rows = csv.DictReader(io.StringIO(text))
        return {row["svname"]: row for row in rows
                if row["pxname"] == backend and row["svname"] not in ("FRONTEND", "BACKEND")}

    def backend(self, backend: str = "warmpool_hosts") -> dict[str, str]:
        text = self.command("show stat").lstrip("# ")
        return next(row for row in csv.DictReader(io.StringIO(text))
                    if row["pxname"] == backend and row["svname"] == "BACKEND")


# -- waiting and reading state ----------------------------------------------------------------------------

async def get_json(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    try:
        async with http.get(url, timeout=aiohttp.ClientTimeout(total=5)) as r:
            return r.status, await r.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return 0, None


async def until(what: str, probe: Any, timeout: float = 60.0, interval: float = 0.1,
                children: list[Child] | None = None) -> None:
    """Wait for `await probe()` to be true; on timeout (or a child that died) fail with its log."""
    deadline = time.monotonic() + timeout
    while not await probe():
        dead = [c for c in children or [] if not c.alive()]
        if dead or time.monotonic() > deadline:
            logs = "\n".join(f"--- {c.name}\n{c.tail()}" for c in children or [])
            raise AssertionError(f"{what}: {'died' if dead else f'not within {timeout:g} s'}\n{logs}")
        await asyncio.sleep(interval)


async def wait_hosts_ready(http: aiohttp.ClientSession, hosts: list[Host]) -> None:
    for host in hosts:
        async def ready(host: Host = host) -> bool:
            return (await get_json(http, host.url + "/readyz"))[0] == 200
        await until(f"{host.name} ready", ready, children=list(host.children.values()))


async def wait_haproxy_sees(haproxy: HAProxy, status: dict[str, str], backend: str = "warmpool_hosts",
                            timeout: float = 30.0) -> None:
    """Until HAProxy shows each named server in the given status ("UP", "DRAIN", "DOWN"...)."""
    async def seen() -> bool:
        try:
            servers = haproxy.servers(backend)
        except OSError:
            return False
        return all(servers.get(name, {}).get("status", "").startswith(want) for name, want in status.items())
    await until(f"HAProxy {backend} {status}", seen, timeout=timeout, children=[haproxy.child])


async def residency(http: aiohttp.ClientSession, host: Host) -> dict[str, Any]:
    status, body = await get_json(http, host.url + "/warmpool/residency")
    assert status == 200, (host.name, status, body)
    return dict(body)


async def loads(http: aiohttp.ClientSession, host: Host) -> int:
    """Loads this host's warmpool made (warmpool_swaps_total, result ok)."""
    async with http.get(host.url + "/metrics") as r:
        text = await r.text()
    return int(sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
                   if sample.name == "warmpool_swaps_total" and sample.labels.get("result") == "ok"))


# -- the client -----------------------------------------------------------------------------------------

@dataclass
class Outcome:
    """One streamed chat through HAProxy, as the client saw it."""

    phase: str | None
    host: str | None  # the server HAProxy finally used (its header), None if no answer came
    status: int | None
    ttft: float | None  # seconds to the first content
    seconds: float
    complete: bool  # ended with data: [DONE]
    error: str | None  # what the client saw go wrong
    hung: bool = False
    started: float = 0.0  # time.monotonic() when it was sent

    @property
    def answered(self) -> bool:
        """Complete, or failed in a way the client sees: anything but a hang or a silent cut."""
        return not self.hung and (self.complete or self.error is not None)


async def stream_chat(http: aiohttp.ClientSession, base: str, phase: str | None, prompt: str, max_tokens: int,
                      *, model: str | None = None, hang_after: float = 60.0) -> Outcome:
    """One streamed chat for `phase` (sent as X-Warmpool-Phase), or for `model` named only in the body."""
    model = model or PHASES[phase or ""]
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "stream": True}
    headers = {PHASE_HEADER: phase} if phase else {}
    started, sent = time.perf_counter(), time.monotonic()
    host: str | None = None
    status: int | None = None
    ttft: float | None = None
    complete = False
    error: str | None = None
    try:
        async with asyncio.timeout(hang_after):
            async with http.post(base + "/v1/chat/completions", json=body, headers=headers) as r:
                host, status = r.headers.get(HOST_HEADER), r.status
                if r.status != 200:
                    error = f"HTTP {r.status}: {(await r.text())[:200]}"
                async for line in r.content:
                    if ttft is None and _has_content(line):
                        ttft = time.perf_counter() - started
                    if line.startswith(b"data: [DONE]"):
                        complete = True
                    elif line.startswith(b'data: {"error"'):
                        error = line.decode(errors="replace").strip()
    except TimeoutError:
        return Outcome(phase or model, host, status, ttft, time.perf_counter() - started, False, "hung", hung=True,
                       started=sent)
    except aiohttp.ClientError as exc:
        error = f"{type(exc).__name__}: {exc}"
    # A 200 stream that stopped without [DONE] and without an error is neither: `answered` is then false.
    return Outcome(phase or model, host, status, ttft, time.perf_counter() - started, complete and error is None,
                   error, started=sent)


def _has_content(line: bytes) -> bool:
    if not line.startswith(b"data: {"):
        return False
    try:
        choices = json.loads(line[6:]).get("choices") or [{}]
    except ValueError:
        return False
    return bool((choices[0].get("delta") or {}).get("content"))


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) by nearest rank; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered), max(1, math.ceil(q / 100 * len(ordered)))) - 1]
