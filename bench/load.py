"""Closed-loop HTTP load on loopback: wrk (2 threads) where installed, else httpx."""

from __future__ import annotations

import asyncio
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx


@dataclass
class Load:
    name: str
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


_WRK_LUA = """
wrk.method = "{method}"
wrk.headers["Content-Type"] = "application/json"
{body}
done = function(summary, latency, requests)
  io.write(string.format("RESULT %d %d %d %f %f\\n", summary.requests,
    summary.errors.status + summary.errors.connect + summary.errors.read
    + summary.errors.write + summary.errors.timeout,
    summary.duration, latency:percentile(50), latency:percentile(99)))
end
"""


def wrk_load(url: str, path: str, body: bytes | None, seconds: int, connections: int) -> Load:
    """Closed-loop load with wrk (2 threads); latency percentiles from wrk's histogram."""
    wrk = shutil.which("wrk")
    assert wrk
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "load.lua"
        lua_body = ""
        if body is not None:
            (Path(tmp) / "body.json").write_bytes(body)
            lua_body = (
                f'local f = io.open("{tmp}/body.json", "rb"); wrk.body = f:read("*a"); f:close()'
            )
        script.write_text(_WRK_LUA.format(method="POST" if body else "GET", body=lua_body))
        out = subprocess.run(
            [wrk, "-t2", f"-c{connections}", f"-d{seconds}s", "-s", str(script), url + path],
            capture_output=True,
            text=True,
            check=True,
            timeout=seconds + 60,
        ).stdout
    match = re.search(r"RESULT (\d+) (\d+) (\d+) ([\d.]+) ([\d.]+)", out)
    assert match, out
    requests, errors, duration_us = (int(match.group(i)) for i in (1, 2, 3))
    return Load(
        path,
        requests,
        requests / (duration_us / 1e6),
        float(match.group(4)) / 1e3,
        float(match.group(5)) / 1e3,
        errors,
    )


async def _httpx_load_async(
    url: str, path: str, body: bytes | None, seconds: float, connections: int
) -> Load:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=connections)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:

        async def user() -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                if body is None:
                    r = await client.get(path)
                else:
                    headers = {"content-type": "application/json"}
                    r = await client.post(path, content=body, headers=headers)
                latencies.append(time.perf_counter() - t0)
                errors += r.status_code != 200

        start = time.perf_counter()
        await asyncio.gather(*(user() for _ in range(connections)))
        elapsed = time.perf_counter() - start
    q = statistics.quantiles(latencies, n=100)
    return Load(path, len(latencies), len(latencies) / elapsed, q[49] * 1e3, q[98] * 1e3, errors)


def load(url: str, path: str, body: bytes | None, seconds: int, connections: int = 16) -> Load:
    if shutil.which("wrk"):
        return wrk_load(url, path, body, seconds, connections)
    return asyncio.run(_httpx_load_async(url, path, body, seconds, connections))
