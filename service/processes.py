"""What every helper process of the server shares: it goes when the server goes."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path

# setproctitle must not overwrite the environment block to make room for a longer title:
# /proc/PID/environ is how operators (and the test suite) tell whose process it is. Titles
# then fit in the original command line's length (any of ours does).
os.environ.setdefault("SPT_NOENV", "1")
import setproctitle

#: How often a helper process checks that the server that started it is still alive.
PARENT_POLL_S = 0.25


def watch_parent(parent: int) -> None:
    """Exit as soon as the server that started this process is gone (SIGKILL, OOM kill),
    instead of living on under PID 1. (PR_SET_PDEATHSIG would fire when the *thread* that
    spawned the process exits, and processes are spawned from worker threads.)"""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def name_process(name: str) -> None:
    """Show this process as ``name`` in ps and top: its command line (``ps aux``, ``ps -f``;
    helpers spawned by multiprocessing otherwise show ``python -c from multiprocessing.spawn
    import spawn_main...``) and its short name (``ps -e``, top; Linux keeps 15 characters)."""
    setproctitle.setproctitle(name)
    with contextlib.suppress(OSError):
        Path("/proc/self/comm").write_text(name[:15])


def become_helper(name: str, parent: int) -> None:
    """What every helper process does first: take its name, leave Ctrl-C to the server (a
    terminal sends SIGINT to the whole process group), end quietly on SIGTERM (no
    traceback: the server stops it, or it stops with the server), and watch the server."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    name_process(name)
    watch_parent(parent)
