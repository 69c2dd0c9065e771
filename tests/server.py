"""Run the real server (``python -m service``) on a free loopback port for tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

STARTUP_TIMEOUT_S = 180.0
#: Every process a test server starts (the server, its parser process, multiprocessing's
#: resource tracker) inherits this variable, so the suite can find any that outlive it.
MARK_VARIABLE = "PYTEST_TAPEFIT_SESSION"
SESSION_MARK = f"{os.getpid()}-{time.time_ns()}"


def marked_processes(mark: str = SESSION_MARK) -> list[int]:
    """PIDs of live processes whose environment carries ``mark`` (this session's by default)."""
    needle = f"{MARK_VARIABLE}={mark}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if state != "Z" and any(v.startswith(needle) for v in environ.split(b"\0")):
            found.append(int(entry.name))
    return found


def named_processes(mark: str, name: str) -> list[int]:
    """The processes carrying ``mark`` that call themselves ``name`` (the server's helper
    processes: ``tapefit-parser``, ``tapefit-fit``)."""
    found = []
    for pid in marked_processes(mark):
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        if comm == name:
            found.append(pid)
    return found


def kill_marked(mark: str = SESSION_MARK) -> list[int]:
    """SIGKILL every process carrying ``mark``; returns the PIDs that were still there."""
    pids = marked_processes(mark)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_warm(url: str, timeout_s: float = 120.0) -> None:
    """Wait until the tapefit server at ``url`` has finished the background warm-up that
    follows readiness (its ``tapefit_warm_up_complete`` metric is 1)."""
    deadline = time.monotonic() + timeout_s
    while "tapefit_warm_up_complete 1.0" not in httpx.get(f"{url}/metrics").text:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server at {url} never finished warming up")
        time.sleep(0.1)


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    mark: str = ""

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_warm(self, timeout_s: float = 120.0) -> None:
        """Wait for the background warm-up that follows readiness (every compiled path, the
        batch loops, the parser process), so measurements do not count it."""
        wait_warm(self.url, timeout_s)

    def stop(self, timeout: float = 60.0) -> bool:
        """SIGTERM, then wait; True if the server shut down gracefully.

        uvicorn re-raises the signal after its graceful shutdown, so a clean stop exits by
        SIGTERM (143 in a shell) after logging the lifespan shutdown.
        """
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=timeout)
        log = self.log()
        return code in (0, -signal.SIGTERM) and "Application shutdown complete" in log


@contextmanager
def serve(**env: str) -> Iterator[Server]:
    """Start ``python -m service`` with ``TAPEFIT_*`` overrides; wait until /readyz is 200.

    On the way out (whatever the test did) the server is stopped: SIGTERM and its graceful
    drain first, SIGKILL only if that hangs; then nothing it started may be left."""
    port = free_port()
    mark = f"{SESSION_MARK}-{port}"
    environment = {
        **os.environ,
        "TAPEFIT_HOST": "127.0.0.1",
        "TAPEFIT_PORT": str(port),
        MARK_VARIABLE: mark,
        **env,
    }
    with tempfile.NamedTemporaryFile(prefix="tapefit-", suffix=".log", delete=False) as log:
        log_path = Path(log.name)
    with log_path.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "service"], env=environment, stdout=sink, stderr=sink
        )
    server = Server(f"http://127.0.0.1:{port}", process, log_path, mark)
    try:
        _wait_ready(server)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=30)
        log_path.unlink(missing_ok=True)
        left = _wait_gone(mark)
        if left:
            raise AssertionError(f"the server left processes behind: {left}")


#: A stopped server's children notice within their parent-watch poll (0.25 s).
STOP_TIMEOUT_S = 60.0
GONE_TIMEOUT_S = 5.0


def _wait_gone(mark: str) -> list[int]:
    """Wait for every process carrying ``mark`` to exit; kill and return any that did not."""
    deadline = time.monotonic() + GONE_TIMEOUT_S
    while marked_processes(mark) and time.monotonic() < deadline:
        time.sleep(0.05)
    return kill_marked(mark)


def _wait_ready(server: Server) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    with httpx.Client(base_url=server.url, timeout=5.0) as client:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                raise RuntimeError(f"server exited early:\n{server.log()}")
            try:
                if client.get("/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
    raise RuntimeError(f"server not ready after {STARTUP_TIMEOUT_S} s:\n{server.log()}")
