"""Run the real server (``python -m service``) on a free loopback port for tests."""

from __future__ import annotations

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

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
    """Start ``python -m service`` with ``TAPEFIT_*`` overrides; wait until /readyz is 200."""
    port = free_port()
    environment = {
        **os.environ,
        "TAPEFIT_HOST": "127.0.0.1",
        "TAPEFIT_PORT": str(port),
        "TF_CPP_MIN_LOG_LEVEL": "2",
        **env,
    }
    with tempfile.NamedTemporaryFile(prefix="tapefit-", suffix=".log", delete=False) as log:
        log_path = Path(log.name)
    with log_path.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "service"], env=environment, stdout=sink, stderr=sink
        )
    server = Server(f"http://127.0.0.1:{port}", process, log_path)
    try:
        _wait_ready(server)
        yield server
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
        log_path.unlink(missing_ok=True)


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
