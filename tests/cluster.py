"""`make cluster-check`: three replicas behind HAProxy on loopback (issue #16).

Three `python -m service` processes and Debian's haproxy with deploy/haproxy/haproxy.cfg, all
on 127.0.0.1. Under a steady mixed load (small fits, a few large ones, a few batches) sent
through HAProxy by clients that retry 429 and 503 after their Retry-After:

1. **throughput** of small fits with 1, 2 and 3 replicas in the pool (wrk, side by side; the
   2 CPUs of this machine bound it, and the report says so);
2. **rolling restart**: each replica in turn gets SIGTERM, drains and exits, starts again and
   is back in the pool before the next one; no request may fail;
3. **kill**: one replica gets SIGKILL mid-load; only the requests it held may fail, and every
   request sent after HAProxy noticed must succeed.

Every process carries a mark in its environment and none may be left behind. Bounded: the
whole check takes a few minutes. Exit status 0 only if every check holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from bench.load import load
from tests.otlp import Receiver, receiving
from tests.server import MARK_VARIABLE, free_port, kill_marked, marked_processes

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
MARK = f"cluster-{os.getpid()}-{time.time_ns()}"
#: Each replica as in deploy/compose.cluster.yaml, on a share of this machine's 2 CPUs.
REPLICA_ENV = {
    "TAPEFIT_HOST": "127.0.0.1",
    "TAPEFIT_LOG_LEVEL": "warning",
    "TAPEFIT_MAX_CONCURRENT_FITS": "1",
    "TAPEFIT_INTRA_OP_THREADS": "1",
    "TAPEFIT_INTER_OP_THREADS": "1",
    "TAPEFIT_SHUTDOWN_DRAIN_S": "2",
    "TAPEFIT_SHUTDOWN_GRACE_S": "20",
}
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
#: Clients of the mixed load: small fits, large fits, batches.
SMALL_CLIENTS, LARGE_CLIENTS, BATCH_CLIENTS = 8, 1, 1
MAX_RETRIES = 20


class Replica:
    """One `python -m service` on a fixed port (restarted on the same port)."""

    def __init__(
        self, name: str, port: int, log_dir: Path, extra_env: dict[str, str] | None = None
    ) -> None:
        #: More environment (the OTLP endpoint of this run's receiver).
        self.extra_env = extra_env or {}
        self.name, self.port = name, port
        self.log = log_dir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {**os.environ, **REPLICA_ENV, "TAPEFIT_PORT": str(self.port), MARK_VARIABLE: MARK}
        env |= self.extra_env
        with self.log.open("ab") as sink:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "service"], env=env, stdout=sink, stderr=sink, cwd=ROOT
            )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.process is not None and self.process.poll() is None, self.log.read_text()
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready after {START_TIMEOUT_S} s")

    def wait_warm(self) -> None:
        """Until the warm-up that follows readiness is done (it would take CPU from the
        measurements)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while "tapefit_warm_up_complete 1.0" not in httpx.get(self.url + "/metrics").text:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} never finished warming up")
            time.sleep(0.2)

    def stop(self) -> float:
        """SIGTERM; seconds until it exited (drain, then in-flight requests finish)."""
        assert self.process is not None
        start = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=STOP_TIMEOUT_S)
        return time.monotonic() - start

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=STOP_TIMEOUT_S)


class HAProxy:
    """haproxy -db with deploy/haproxy/haproxy.cfg, its admin socket for the pool."""

    def __init__(self, replicas: list[Replica], log_dir: Path) -> None:
        self.port = free_port()
        self.socket = log_dir / "haproxy.sock"
        self.log = log_dir / "haproxy.log"
        env = {
            **os.environ,
            "HAPROXY_BIND": f"127.0.0.1:{self.port}",
            "HAPROXY_STATS_SOCKET": str(self.socket),
            MARK_VARIABLE: MARK,
            **{f"TAPEFIT_REPLICA_{i + 1}": f"127.0.0.1:{r.port}" for i, r in enumerate(replicas)},
        }
        binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
        subprocess.run([binary, "-c", "-q", "-f", str(CONFIG)], env=env, check=True)
        with self.log.open("wb") as sink:
            self.process = subprocess.Popen(
                [binary, "-db", "-f", str(CONFIG)], env=env, stdout=sink, stderr=sink
            )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self, line: str) -> str:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(self.socket))
                    s.sendall(line.encode() + b"\n")
                    chunks = []
                    while chunk := s.recv(65536):
                        chunks.append(chunk)
                    return b"".join(chunks).decode()
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def up(self) -> set[str]:
        """Replicas HAProxy has in the pool (checked UP and not disabled)."""
        names = set()
        for line in self.command("show stat").splitlines():
            parts = line.split(",")
            server = parts[1] if len(parts) > 17 else "BACKEND"
            if (
                parts[0] == "replicas"
                and server not in ("BACKEND", "FRONTEND")
                and parts[17] == "UP"
            ):
                names.add(parts[1])
        return names

    def wait_up(self, names: set[str], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.up() != names:
            if time.monotonic() > deadline:
                raise RuntimeError(f"HAProxy has {self.up()} up, not {names}")
            time.sleep(0.1)

    def pool(self, names: set[str], all_names: list[str]) -> None:
        """Only these replicas in the pool (the others disabled, in maintenance)."""
        for name in all_names:
            verb = "enable" if name in names else "disable"
            self.command(f"{verb} server replicas/{name}")
        self.wait_up(names)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=STOP_TIMEOUT_S)


@dataclass
class Tally:
    """What the load's clients saw, by attempt."""

    sent: int = 0
    ok: int = 0
    retried: Counter[int] = field(default_factory=Counter)  # 429/503 with Retry-After
    failed: list[str] = field(default_factory=list)  # connection errors, other statuses
    failed_at: list[float] = field(default_factory=list)

    def line(self) -> str:
        retried = ", ".join(f"{code}: {n}" for code, n in sorted(self.retried.items())) or "none"
        return (
            f"{self.sent} sent, {self.ok} answered 200, 429/503 with Retry-After ({retried}), "
            f"{len(self.failed)} failed"
        )


def _bodies() -> dict[str, bytes]:
    rng = np.random.default_rng(16)
    x = 1000.0 + 100.0 * rng.random(100)
    small = {"x": x.tolist(), "y": (3.0 * x - 50.0 + rng.normal(0, 1, 100)).tolist(), "seed": 1}
    xl = rng.random(200_000)
    large = {"x": xl.tolist(), "y": (2.0 * xl + 1.0).tolist(), "epochs": 20_000, "seed": 1}
    sets = [{"y": rng.normal(1e7, 0.1, 100).tolist()} for _ in range(50)]
    return {
        "/v1/fits/linear": json.dumps(small).encode(),
        "/v1/fits/linear#large": json.dumps(large).encode(),
        "/v1/fits/gaussian/batch": json.dumps({"datasets": sets, "seed": 1}).encode(),
    }


async def _client(
    url: str, path: str, body: bytes, tally: Tally, stop: asyncio.Event, started: float
) -> None:
    """One client: a request at a time; 429/503 are retried after Retry-After."""
    path = path.split("#")[0]
    headers = {"content-type": "application/json"}
    async with httpx.AsyncClient(base_url=url, timeout=90) as client:
        while not stop.is_set():
            for _ in range(MAX_RETRIES):
                tally.sent += 1
                try:
                    r = await client.post(path, content=body, headers=headers)
                except httpx.TransportError as error:
                    tally.failed.append(f"{path}: {type(error).__name__}")
                    tally.failed_at.append(time.monotonic() - started)
                    break
                if r.status_code == 200:
                    tally.ok += 1
                    break
                if r.status_code in (429, 503) and "retry-after" in r.headers:
                    tally.retried[r.status_code] += 1
                    await asyncio.sleep(min(float(r.headers["retry-after"]), 1.0))
                    continue
                tally.failed.append(f"{path}: {r.status_code} {r.text[:120]}")
                tally.failed_at.append(time.monotonic() - started)
                break


class MixedLoad:
    """The steady mixed load, in a thread of its own event loop, until stopped."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.tally = Tally()
        self.started = time.monotonic()
        self._loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self._loop.run_until_complete(self._clients())

    async def _clients(self) -> None:
        bodies = _bodies()
        counts = {
            "/v1/fits/linear": SMALL_CLIENTS,
            "/v1/fits/linear#large": LARGE_CLIENTS,
            "/v1/fits/gaussian/batch": BATCH_CLIENTS,
        }
        clients = [
            _client(self.url, path, bodies[path], self.tally, self._stop, self.started)
            for path, n in counts.items()
            for _ in range(n)
        ]
        await asyncio.gather(*clients)

    def __enter__(self) -> MixedLoad:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=120)


def traces_through_haproxy(proxy: HAProxy, receiver: Receiver) -> tuple[list[str], list[str]]:
    """Three fits through HAProxy, each with a sampled traceparent and no request id: each
    arrives at the OTLP receiver as one trace, the replica's server span a child of the
    client's span and carrying the request id HAProxy gave it (echoed to the client), and
    the fit span in the same trace. Returns what was seen and what failed."""
    seen, failed = [], []
    body = json.dumps({"x": [1.0, 2.0, 3.0, 4.0], "y": [2.1, 3.9, 6.2, 7.8]}).encode()
    for i in range(3):
        trace_id, parent = f"{0xA1B2C3D4 + i:032x}", f"{0x1234 + i:016x}"
        r = httpx.post(
            f"{proxy.url}/v1/fits/linear",
            content=body,
            headers={
                "content-type": "application/json",
                "traceparent": f"00-{trace_id}-{parent}-01",
            },
            timeout=30,
        )
        request_id = r.headers.get("x-request-id", "")
        spans = receiver.wait_for(trace_id, {"POST /v1/fits/linear", "fit"}, timeout_s=20)
        names = {s.name: s for s in spans}
        server = names.get("POST /v1/fits/linear")
        ok = (
            r.status_code == 200
            and server is not None
            and server.parent_id == parent
            and server.attributes.get("tapefit.request_id") == request_id
            and "fit" in names
            and names["fit"].attributes.get("tapefit.request_id") == request_id
        )
        seen.append(f"{len(spans)} spans ({', '.join(sorted(names))}), request id {request_id}")
        if not ok:
            failed.append(f"trace {trace_id}: {r.status_code}, spans {sorted(names)}")
    return seen, failed


def throughput(proxy: HAProxy, names: list[str], seconds: int) -> dict[int, float]:
    """Small fits/s through HAProxy with 1, 2 and 3 replicas in the pool."""
    body = _bodies()["/v1/fits/linear"]
    rates = {}
    for count in (1, 2, 3):
        proxy.pool(set(names[:count]), names)
        load(proxy.url, "/v1/fits/linear", body, 2, 16)  # warm the connections
        result = load(proxy.url, "/v1/fits/linear", body, seconds, 16)
        if result.errors:
            r = httpx.post(proxy.url + "/v1/fits/linear", content=body, timeout=30)
            print("\n".join(proxy.log.read_text().splitlines()[-8:]))
            raise AssertionError(
                f"{result.errors} errors with {count} replicas; now: {r.status_code} {r.text[:300]}"
            )
        rates[count] = result.rps
    proxy.pool(set(names), names)
    return rates


def rolling_restart(proxy: HAProxy, replicas: list[Replica]) -> tuple[Tally, list[float]]:
    names = {r.name for r in replicas}
    drains = []
    with MixedLoad(proxy.url) as mixed:
        time.sleep(3)
        for replica in replicas:
            drains.append(replica.stop())
            proxy.wait_up(names - {replica.name})
            replica.start()
            replica.wait_ready()
            proxy.wait_up(names)
            time.sleep(1)
        time.sleep(2)
    return mixed.tally, drains


def kill_one(proxy: HAProxy, replicas: list[Replica]) -> tuple[Tally, float, float]:
    """SIGKILL the first replica mid-load; (what clients saw, when it died, when HAProxy
    had it out of the pool), in seconds since the load began."""
    names = {r.name for r in replicas}
    victim = replicas[0]
    with MixedLoad(proxy.url) as mixed:
        time.sleep(3)
        killed_at = time.monotonic() - mixed.started
        victim.kill()
        proxy.wait_up(names - {victim.name})
        out_at = time.monotonic() - mixed.started
        time.sleep(4)
    victim.start()
    victim.wait_ready()
    proxy.wait_up(names)
    return mixed.tally, killed_at, out_at


def main() -> int:
    if shutil.which("haproxy") is None and not Path("/usr/sbin/haproxy").exists():
        print("cluster-check: haproxy is not installed (apt-get install haproxy)")
        return 1
    failures: list[str] = []
    lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="tapefit-cluster-") as tmp, receiving() as receiver:
        log_dir = Path(tmp)
        # Traced as in deploy/compose.cluster.yaml, into this run's receiver; only requests
        # whose client sends a sampled traceparent, so the load below is not traced.
        traced = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        }
        replicas = [Replica(f"replica-{i}", free_port(), log_dir, traced) for i in (1, 2, 3)]
        proxy: HAProxy | None = None
        try:
            for replica in replicas:
                replica.start()
            for replica in replicas:
                replica.wait_ready()
                replica.wait_warm()
            proxy = HAProxy(replicas, log_dir)
            names = [r.name for r in replicas]
            proxy.wait_up(set(names))

            seen, failed = traces_through_haproxy(proxy, receiver)
            lines.append(
                "traces through HAProxy (OTLP/HTTP to a receiver here): " + "; ".join(seen)
            )
            failures.extend(failed)

            rates = throughput(proxy, names, seconds=5)
            lines.append(
                "throughput, small fits through HAProxy (wrk -c16, 5 s each): "
                + ", ".join(
                    f"{n} replica{'s' * (n > 1)} {rate:,.0f}/s" for n, rate in rates.items()
                )
                + f"; 2 over 1: {rates[2] / rates[1]:.2f}x. All replicas, HAProxy and wrk share "
                "this machine's 2 CPUs, so more replicas add no compute here: on real nodes "
                "each replica brings its own."
            )

            tally, drains = rolling_restart(proxy, replicas)
            lines.append(
                f"rolling restart of 3 replicas under load: {tally.line()}; SIGTERM to exit "
                + ", ".join(f"{d:.1f} s" for d in drains)
            )
            if tally.failed:
                failures.append(f"rolling restart: {tally.failed[:5]}")
            if tally.ok == 0:
                failures.append("rolling restart: no request succeeded")

            tally, killed_at, out_at = kill_one(proxy, replicas)
            late = [t for t in tally.failed_at if t > out_at + 0.5]
            lines.append(
                f"SIGKILL of replica-1 at {killed_at:.1f} s (out of HAProxy's pool at "
                f"{out_at:.1f} s): {tally.line()}; failures after it left the pool: {len(late)}"
            )
            held = SMALL_CLIENTS + LARGE_CLIENTS + BATCH_CLIENTS
            if len(tally.failed) > held:
                failures.append(f"kill: {len(tally.failed)} failed, more than {held} clients")
            if late:
                failures.append(f"kill: {len(late)} failed after the replica left the pool")
        finally:
            if proxy is not None:
                proxy.stop()
            for replica in replicas:
                if replica.process is not None and replica.process.poll() is None:
                    replica.stop()
            deadline = time.monotonic() + 10
            while marked_processes(MARK) and time.monotonic() < deadline:
                time.sleep(0.1)
            left = kill_marked(MARK)
    lines.append(f"processes left behind: {left or 'none'}")
    if left:
        failures.append(f"processes left behind: {left}")
    print("\n".join(f"- {line}" for line in lines))
    for failure in failures:
        print(f"FAIL {failure}")
    print("\ncluster-check:", "FAILED" if failures else "PASSED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
