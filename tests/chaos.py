"""`make chaos`: hostile and heavy load against the real server, with the deployment's limits.

Each attack of issue #17 runs against one server started with deploy/k8s's settings (2 fits
running, small fits in a fit process, admission by expected time, 30 s fit timeout) and its
2560 MiB memory limit, on loopback only. The limit is enforced by measurement: the memory of
the server and every process it started is sampled every 20 ms and must stay under it (podman's
--memory would kill the pod; here the harness fails instead). It is their proportional set
sizes (PSS) summed, as a cgroup counts pages: summed RSS counts shared pages once per process,
and a parser process caught between its fork and its exec shares all of the server's. (CI once
saw a 2,114 MiB "peak", about twice the server's ~1,100 MiB, in the attack that kills and
restarts parsers; two full runs since gave 1,215 MiB by RSS and, by PSS, 1,139 MiB.) For each
attack the report gives the peak memory, the worst and p99 /healthz latency while it ran, the
status codes, and whether a normal fit succeeded within 5 s of it ending. Exit status 0 only if
every check holds.

Bounded: every attack has its own time limit, and the whole run takes a few minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from tests.mistakes import CLIENT_MISTAKES
from tests.server import Server, marked_processes, named_processes, serve

LIMIT_BYTES = 2560 * 1024 * 1024
DEPLOYMENT = {
    "TAPEFIT_MAX_CONCURRENT_FITS": "2",
    "TAPEFIT_FIT_PROCESSES": "1",
    "TAPEFIT_INTRA_OP_THREADS": "2",
    "TAPEFIT_INTER_OP_THREADS": "2",
    "TAPEFIT_FIT_TIMEOUT_S": "30",
    "TAPEFIT_SHUTDOWN_DRAIN_S": "1",
    "TAPEFIT_SHUTDOWN_GRACE_S": "10",
    "TAPEFIT_MEMORY_LIMIT_BYTES": str(LIMIT_BYTES),
    "TAPEFIT_BODY_TIMEOUT_S": "5",
}
HEALTH_P99_S = 0.1
#: What a finished progress stream may leave behind (issue #36 measured +47 to +174 MiB).
STREAM_KEPT_BYTES = 24 * 1024 * 1024
RECOVERY_S = 5.0
SMALL_FIT = {"x": [0.0, 1.0, 2.0, 3.0], "y": [1.0, 3.1, 4.9, 7.2]}


@dataclass
class Outcome:
    name: str
    statuses: Counter[str] = field(default_factory=Counter)
    peak_bytes: int = 0
    health_worst_s: float = 0.0
    health_p99_s: float = 0.0
    recovered_s: float | None = None
    failures: list[str] = field(default_factory=list)
    #: Figures worth reading beside the verdict (answer times, memory before and after).
    notes: list[str] = field(default_factory=list)

    def check(self, condition: bool, what: str) -> None:
        if not condition:
            self.failures.append(what)

    @property
    def passed(self) -> bool:
        return not self.failures


#: The /healthz prober runs in a process of its own: in this one, building a 40 MB body
#: would hold the GIL and show up as server latency.
PROBE = """
import sys, time, httpx
with httpx.Client(base_url=sys.argv[1], timeout=10) as client:
    while True:
        start = time.perf_counter()
        try:
            client.get("/healthz")
        except httpx.HTTPError:
            pass
        print(time.perf_counter() - start, flush=True)
        time.sleep(0.05)
"""


class Monitor:
    """Samples the memory of the server's processes (a thread) and probes /healthz (a
    separate process) while an attack runs."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.peak = 0
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self._memory_thread = threading.Thread(target=self._memory, daemon=True)
        self._probe: subprocess.Popen[str] | None = None

    def __enter__(self) -> Monitor:
        self._memory_thread.start()
        self._probe = subprocess.Popen(
            [sys.executable, "-c", PROBE, self.server.url], stdout=subprocess.PIPE, text=True
        )
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._memory_thread.join(timeout=10)
        assert self._probe is not None
        self._probe.terminate()
        output = self._probe.communicate(timeout=10)[0]
        self.latencies = [float(line) for line in output.split()]

    def _memory(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, pss_bytes(marked_processes(self.server.mark)))
            time.sleep(0.02)


def pss_bytes(pids: list[int]) -> int:
    """The proportional set sizes of these processes, summed: shared pages divided among
    the processes sharing them (``/proc/<pid>/smaps_rollup``)."""
    return _rollup(pids, ("Pss:",))


def private_bytes(pids: list[int]) -> int:
    """The pages only these processes map, summed (USS): what a leak grows. Unlike PSS it
    does not move when another process on the machine maps the same libraries (a second
    TensorFlow process starting or ending moved the service's PSS by ~70 MiB)."""
    return _rollup(pids, ("Private_Clean:", "Private_Dirty:"))


def _rollup(pids: list[int], fields: tuple[str, ...]) -> int:
    total = 0
    for pid in pids:
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:  # gone meanwhile
            continue
        for line in rollup.splitlines():
            if line.startswith(fields):
                total += int(line.split()[1]) * 1024
    return total


async def settled(
    server: Server, measure: Callable[[list[int]], int], timeout_s: float = 30.0
) -> int:
    """The summed ``measure`` once it has stopped moving (within 2 MiB over 2 s): the fit
    process goes on compiling its other loops in the background for a while after it is
    ready, and the server trims freed memory once requests pause."""
    last = measure(marked_processes(server.mark))
    for _ in range(int(timeout_s / 2)):
        await asyncio.sleep(2.0)
        now = measure(marked_processes(server.mark))
        if abs(now - last) < 2 * 1024 * 1024:
            return now
        last = now
    return last


async def normal_fit_works(server: Server) -> float | None:
    """Seconds until a small fit succeeds (None if not within RECOVERY_S)."""
    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=server.url, timeout=RECOVERY_S) as client:
        while (elapsed := time.perf_counter() - start) < RECOVERY_S:
            try:
                r = await client.post("/v1/fits/linear", json=SMALL_FIT)
                if r.status_code == 200:
                    return elapsed
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
    return None


async def run_attack(
    server: Server, name: str, attack: Callable[[Server, Outcome], Awaitable[None]]
) -> Outcome:
    outcome = Outcome(name)
    with Monitor(server) as monitor:
        try:
            await asyncio.wait_for(attack(server, outcome), timeout=120)
        except TimeoutError:
            outcome.failures.append("the attack did not finish within 120 s")
    outcome.recovered_s = await normal_fit_works(server)
    outcome.peak_bytes = monitor.peak
    latencies = sorted(monitor.latencies) or [0.0]
    outcome.health_worst_s = latencies[-1]
    outcome.health_p99_s = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    outcome.check(outcome.peak_bytes < LIMIT_BYTES, "peak memory over the limit")
    outcome.check(outcome.health_p99_s < HEALTH_P99_S, "/healthz p99 over 100 ms")
    outcome.check(outcome.recovered_s is not None, "no normal fit within 5 s after")
    outcome.check(server.process.poll() is None, "the server died")
    return outcome


def record(outcome: Outcome, r: httpx.Response, client_mistake: bool = False) -> None:
    outcome.statuses[str(r.status_code)] += 1
    if r.status_code == 500 or (r.status_code >= 500 and client_mistake):
        outcome.failures.append(f"{r.status_code}: {r.text[:200]}")
    if r.status_code in (429, 503) and "retry-after" not in r.headers:
        outcome.failures.append(f"{r.status_code} without Retry-After")


# -- the attacks ---------------------------------------------------------------------------------


async def stream_every_epoch(server: Server, outcome: Outcome) -> None:
    """1. A Gaussian fit streaming a progress event every epoch must not hold its buffers."""
    body = {"y": list(np.random.default_rng(0).normal(2, 1, 200)), "epochs": 20_000}
    body["progress_every"] = 1
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:  # warm the path
        await client.post(
            "/v1/fits/gaussian",
            json={**body, "epochs": 500},
            headers={"accept": "text/event-stream"},
        )
    before = await settled(server, private_bytes)
    async with (
        httpx.AsyncClient(base_url=server.url, timeout=120) as client,
        client.stream(
            "POST", "/v1/fits/gaussian", json=body, headers={"accept": "text/event-stream"}
        ) as r,
    ):
        events = 0
        async for line in r.aiter_lines():
            events += line.startswith("event: progress")
        outcome.statuses[str(r.status_code)] += 1
    outcome.check(events == 20_000, f"{events} progress events, not 20000")
    grown = await settled(server, private_bytes) - before
    outcome.notes.append(
        f"after 20,000 events the service kept {grown / 2**20:+.0f} MiB (private, USS)"
    )
    outcome.check(grown < STREAM_KEPT_BYTES, f"private memory grew by {grown >> 20} MiB and stayed")


async def stalled_uploads(server: Server, outcome: Outcome) -> None:
    """2. Ten uploads that stall after 10 bytes must not lock fits out, and end with 408."""
    host, port = server.url.removeprefix("http://").split(":")
    sockets = []
    for _ in range(10):
        s = socket.create_connection((host, int(port)))
        s.sendall(
            b"POST /v1/fits/linear HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n" + b'{"x": [1, 2'
        )
        sockets.append(s)
    await asyncio.sleep(0.5)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        for _ in range(5):
            r = await client.post("/v1/fits/linear", json=SMALL_FIT)
            record(outcome, r)
            outcome.check(r.status_code == 200, f"a fit during stalled uploads got {r.status_code}")
    loop = asyncio.get_running_loop()
    for s in sockets:
        s.settimeout(15)
        answer = await loop.run_in_executor(None, s.recv, 4096)
        status = answer.split(b" ", 2)[1].decode() if answer else "closed"
        outcome.statuses[f"stalled:{status}"] += 1
        outcome.check(status == "408", f"a stalled upload ended with {status}, not 408")
        s.close()


def _parser_pid(server: Server) -> int | None:
    return next(iter(named_processes(server.mark, "tapefit-parser")), None)


async def parser_killed(server: Server, outcome: Outcome) -> None:
    """3. SIGKILL the parser process at several points of large parses (mid-parse,
    mid-write): each request gets an answer (503 + Retry-After when its parser died), the
    pool comes back, no place leaks."""
    y = np.random.default_rng(1).normal(0, 1, 1_000_000)
    body = json.dumps({"y": y.tolist(), "epochs": 10}).encode()
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        for delay in (0.05, 0.15, 0.25, 0.35, 0.45, 0.6, 0.8):
            post = asyncio.create_task(
                client.post(
                    "/v1/fits/gaussian", content=body, headers={"content-type": "application/json"}
                )
            )
            await asyncio.sleep(delay)
            if (pid := _parser_pid(server)) is not None:
                os.kill(pid, signal.SIGKILL)
            r = await post
            record(outcome, r)
            outcome.check(r.status_code in (200, 503), f"status {r.status_code} after the kill")
            await asyncio.sleep(1.0)  # the pool is rebuilt meanwhile
        for _ in range(12):  # more than every place: none may have leaked
            r = await client.post(
                "/v1/fits/gaussian", content=body, headers={"content-type": "application/json"}
            )
            record(outcome, r)
            outcome.check(r.status_code == 200, f"a large fit after the kills got {r.status_code}")
    ready = httpx.get(f"{server.url}/readyz", timeout=5)
    outcome.check(ready.status_code == 200, "not ready after the kills")


async def memory_pressure(server: Server, outcome: Outcome) -> None:
    """4. Eight concurrent 1e6-point JSON fits, a 5e6-point body, a 60 MiB int8 .npy: the
    memory limit holds (429 or 413 beyond the budget, never an OOM)."""
    rng = np.random.default_rng(2)
    x = rng.random(1_000_000)
    big = json.dumps({"x": x.tolist(), "y": (2 * x + 1).tolist(), "epochs": 100}).encode()
    headers = {"content-type": "application/json"}
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
        answers = await asyncio.gather(
            *(client.post("/v1/fits/linear", content=big, headers=headers) for _ in range(8)),
            return_exceptions=True,
        )
        for r in answers:
            if isinstance(r, BaseException):
                outcome.failures.append(f"a large fit failed with {type(r).__name__}")
                continue
            record(outcome, r)
        outcome.check("200" in outcome.statuses, "no large fit succeeded")
        huge = json.dumps({"y": rng.integers(0, 9, 5_000_000).tolist()}).encode()  # 30 MB
        r = await client.post("/v1/fits/gaussian", content=huge, headers=headers)
        record(outcome, r, client_mistake=True)
        outcome.check(r.status_code == 422, f"5e6 points got {r.status_code}, not 422")
        buffer = io.BytesIO()
        np.save(buffer, np.ones(60 * 1024 * 1024, dtype=np.int8))
        r = await client.post(
            "/v1/fits/gaussian/binary",
            content=buffer.getvalue(),
            headers={"content-type": "application/x-npy"},
        )
        record(outcome, r, client_mistake=True)
        outcome.check(r.status_code == 422, f"a 60 MiB int8 .npy got {r.status_code}, not 422")


async def batch_answers(server: Server, outcome: Outcome) -> None:
    """5. Large batch answers (10,000 sets, full history) from 8 clients looping must not
    stall the probes."""
    rng = np.random.default_rng(3)
    sets = [{"x": [0.0, 1.0, 2.0], "y": list(rng.normal(0, 1, 3))} for _ in range(10_000)]
    body = json.dumps({"datasets": sets, "epochs": 100, "history_every": 1}).encode()
    headers = {"content-type": "application/json"}
    deadline = time.monotonic() + 20

    async def client_loop() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            while time.monotonic() < deadline:
                r = await client.post("/v1/fits/linear/batch", content=body, headers=headers)
                record(outcome, r)
                if r.status_code != 200:
                    await asyncio.sleep(float(r.headers.get("retry-after", "1")))

    await asyncio.gather(*(client_loop() for _ in range(8)))
    outcome.check(outcome.statuses["200"] > 0, "no batch succeeded")


async def one_big_batch_answer(server: Server, outcome: Outcome) -> None:
    """8. One batch whose answer is ~50 MB (10,000 sets x 30 points, 199 epochs, the whole
    history): /healthz must stay under 100 ms at p100 while it is fitted and sent (issue
    #36 measured 512 ms)."""
    rng = np.random.default_rng(8)
    x = list(range(30))
    sets = [{"x": x, "y": list(rng.normal(0, 1, 30))} for _ in range(10_000)]
    body = json.dumps({"datasets": sets, "epochs": 199, "history_every": 1}).encode()
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
        start = time.perf_counter()
        r = await client.post(
            "/v1/fits/linear/batch", content=body, headers={"content-type": "application/json"}
        )
        seconds = time.perf_counter() - start
    record(outcome, r)
    outcome.check(r.status_code == 200, f"the batch got {r.status_code}")
    outcome.notes.append(f"a {len(r.content) / 1e6:.0f} MB answer in {seconds:.1f} s")


async def client_mistakes(server: Server, outcome: Outcome) -> None:
    """6 and 7. Client mistakes are 4xx, never echoed at length; ambiguous framing is refused
    and its connection closed; a client gone mid-body costs nothing."""
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        for mistake in CLIENT_MISTAKES:
            r = await client.post(mistake.url, content=mistake.content, headers=mistake.headers)
            record(outcome, r, client_mistake=True)
            name = "/".join(map(str, mistake.loc))
            outcome.check(r.status_code == 422, f"{name}: {r.status_code}")
            outcome.check(len(r.content) < 1024, f"{name}: a {len(r.content)}-byte answer")
            if r.status_code == 422:
                outcome.check(r.json()["detail"][0]["type"] == mistake.kind, f"{name}: type")
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(
            b"POST /v1/fits/linear HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    outcome.statuses["cl+te:" + answer.split(b" ", 2)[1].decode()] += 1
    outcome.check(answer.startswith(b"HTTP/1.1 400"), "CL+TE was not refused with 400")
    outcome.check(answer.count(b"HTTP/1.1") == 1, "a smuggled second request was answered")
    for _ in range(20):  # gone mid-body: no error logged, nothing held
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(
                b"POST /v1/fits/linear HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 1000\r\n\r\n" + b'{"x": [1'
            )
    await asyncio.sleep(0.5)
    outcome.check('"status": 500' not in server.log(), "a 500 was logged")
    outcome.check("Traceback" not in server.log(), "a traceback was logged")


ATTACKS: list[tuple[str, Callable[[Server, Outcome], Awaitable[None]]]] = [
    ("1 stream every epoch", stream_every_epoch),
    ("2 stalled uploads", stalled_uploads),
    ("3 parser killed", parser_killed),
    ("4 memory pressure", memory_pressure),
    ("5 batch answers", batch_answers),
    ("6-7 client mistakes", client_mistakes),
    ("8 one big batch answer", one_big_batch_answer),
]
#: Attacks held to /healthz under 100 ms at p100, not only p99.
HEALTH_WORST_S = 0.1
EVERY_PROBE = ("8 one big batch answer",)


def report(title: str, outcomes: list[Outcome], shutdown_s: float | None, left: list[int]) -> str:
    lines = [
        f"# make {title}: deployment settings, {LIMIT_BYTES >> 20} MiB limit",
        "",
        "| attack | peak MiB | /healthz worst / p99 ms | statuses | normal fit after | result |",
        "|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(o.statuses.items()))
        after = "no" if o.recovered_s is None else f"yes ({o.recovered_s:.2f} s)"
        result = "pass" if o.passed else "FAIL: " + "; ".join(o.failures[:3])
        lines.append(
            f"| {o.name} | {o.peak_bytes >> 20} | {1000 * o.health_worst_s:.0f} / "
            f"{1000 * o.health_p99_s:.0f} | {statuses} | {after} | {result} |"
        )
    for o in outcomes:
        lines.extend(f"- {o.name}: {note}" for note in o.notes)
    lines.append("")
    lines.append(f"SIGTERM to exit: {'no exit' if shutdown_s is None else f'{shutdown_s:.1f} s'}")
    lines.append(f"processes left behind: {left or 'none'}")
    return "\n".join(lines)


async def run_all(
    title: str,
    attacks: list[tuple[str, Callable[[Server, Outcome], Awaitable[None]]]],
    only: str | None,
    every_probe: Callable[[str], bool],
) -> int:
    """Run ``attacks`` (those whose name contains ``only``) against one server with the
    deployment's settings, each held to /healthz under 100 ms at p100 where ``every_probe``
    says so; then SIGTERM, and no process may be left. Prints the report; the exit status."""
    outcomes = []
    shutdown_s: float | None = None
    with serve(**DEPLOYMENT) as server:
        server.wait_warm()
        for name, attack in attacks:
            if only and only not in name:
                continue
            outcome = await run_attack(server, name, attack)
            if every_probe(name):
                outcome.check(
                    outcome.health_worst_s < HEALTH_WORST_S,
                    f"/healthz took {1000 * outcome.health_worst_s:.0f} ms",
                )
            outcomes.append(outcome)
            verdict = "pass" if outcome.passed else f"FAIL {outcome.failures}"
            print(f"{name}: {verdict}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(timeout=20)
            shutdown_s = time.perf_counter() - start
        except Exception:
            shutdown_s = None
        mark = server.mark
    left = marked_processes(mark)
    print(report(title, outcomes, shutdown_s, left))
    ok = all(o.passed for o in outcomes) and shutdown_s is not None and not left
    print(f"\n{title}:", "PASSED" if ok else "FAILED")
    return 0 if ok else 1


def cli(
    title: str,
    attacks: list[tuple[str, Callable[[Server, Outcome], Awaitable[None]]]],
    every_probe: Callable[[str], bool],
    description: str | None,
) -> None:
    """``python -m tests.<module> [--only NAME]``."""
    parser = argparse.ArgumentParser(prog=f"make {title}", description=description)
    parser.add_argument("--only", help="run the attacks whose name contains this")
    only = parser.parse_args().only
    sys.exit(asyncio.run(run_all(title, attacks, only, every_probe)))


if __name__ == "__main__":
    cli("chaos", ATTACKS, lambda name: name in EVERY_PROBE, __doc__)
