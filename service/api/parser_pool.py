"""Parser processes that can die in any state without taking the server with them.

``ProcessPoolExecutor`` and ``multiprocessing.Pool`` share one result pipe between all their
processes: a process killed while writing its result (SIGKILL, an OOM kill) leaves half a
message in it, the reader thread waits for the rest forever, and so does every later parse
and the pool's own shutdown. Here each process has a pipe of its own, so its death is an EOF
on that pipe and nothing else; and every call has a deadline, enforced by killing the
process, so a hung one ends the same way. A failed process is replaced at once; the call
that was in it raises :class:`ParserFailed`.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import queue
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, TypeVar

from service.admission import release_memory, rss_bytes
from service.processes import become_helper

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Memory a parser process may keep between parses (17 MiB idle, ~105 MiB after a 38 MiB
#: body, its garbage handed back): the memory budget leaves this for each; one over it is replaced.
PARSER_RESERVE_BYTES = 128 * 1024 * 1024
START_TIMEOUT_S = 120.0


class ParserFailed(Exception):
    """The parser process died or missed its deadline: an infrastructure fault (503)."""


def _serve(conn: Connection, parent: int) -> None:
    """A parser process: run the calls that arrive, until the pipe or the parent is gone."""
    become_helper("tapefit-parser", parent)
    while True:
        try:
            fn, args = conn.recv()
        except (EOFError, OSError):
            return
        gc.disable()  # a parse makes millions of objects and frees them all: no cycles to find
        try:
            reply: tuple[bool, Any] = (True, fn(*args))
        except Exception as error:
            reply = (False, error)
        finally:
            gc.enable()
        del fn, args
        # The parse's garbage goes back to the system before the parent weighs this process:
        # kept by glibc, a 38 MiB body left ~160 MiB and got the process replaced each time
        # (a new one spends ~1 s of CPU importing).
        release_memory()
        conn.send(reply)
        del reply


class _Process:
    """One parser process and the parent's end of its own pipe."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        ours, theirs = context.Pipe()
        self.process: BaseProcess = context.Process(
            target=_serve, args=(theirs, os.getpid()), name="tapefit-parser", daemon=True
        )
        self.process.start()
        theirs.close()  # so that the process's death is an EOF here
        self.conn = ours

    def call(self, fn: Callable[..., T], args: tuple[Any, ...], deadline_s: float) -> T:
        timer = threading.Timer(deadline_s, self.kill)  # a hung call ends as a dead one
        timer.start()
        try:
            self.conn.send((fn, args))
            ok, value = self.conn.recv()
        except (EOFError, OSError) as error:
            raise ParserFailed("the parser process failed while reading this body") from error
        finally:
            timer.cancel()
        if not ok:
            raise value
        return value  # type: ignore[no-any-return]

    @property
    def pid(self) -> int:
        return self.process.pid or 0

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()

    def close(self) -> None:
        self.kill()
        self.process.join(timeout=10)
        self.conn.close()


class ParserPool:
    """``processes`` parser processes; :meth:`call` blocks (run it in a thread)."""

    def __init__(
        self,
        processes: int,
        on_restart: Callable[[], None] = lambda: None,
        max_rss_bytes: int | None = None,
    ) -> None:
        self.max_rss_bytes = max_rss_bytes
        self._idle: queue.Queue[_Process] = queue.Queue()
        self._all: list[_Process] = []
        self._lock = threading.Lock()
        self._closed = False
        self._on_restart = on_restart
        for _ in range(processes):
            self._add()

    def _add(self) -> None:
        process = _Process()
        process.call(_ready, (), START_TIMEOUT_S)  # imported and answering
        with self._lock:
            if self._closed:
                process.close()
                return
            self._all.append(process)
        self._idle.put(process)

    def call(self, fn: Callable[..., T], *args: Any, deadline_s: float) -> T:
        """``fn(*args)`` in a parser process, within ``deadline_s`` of starting there."""
        give_up = time.monotonic() + deadline_s
        while True:
            try:
                process = self._idle.get(timeout=max(0.0, give_up - time.monotonic()))
            except queue.Empty:
                raise ParserFailed("no parser process came free in time") from None
            if process.process.is_alive():
                break
            self._replace(process)  # died while idle: replaced, and the call waits on
        try:
            result = process.call(fn, args, deadline_s)
        except ParserFailed:
            self._replace(process)
            raise
        if self.max_rss_bytes and rss_bytes([process.pid]) > self.max_rss_bytes:
            self._replace(process, reason="it outgrew its memory reserve")  # not an error
        else:
            self._idle.put(process)
        return result

    def _replace(self, broken: _Process, reason: str = "it failed") -> None:
        log.warning("replacing a parser process: %s", reason)
        self._on_restart()
        with self._lock:
            if broken in self._all:
                self._all.remove(broken)
        broken.close()
        if not self._closed:  # in the background: the failed call answers at once
            threading.Thread(target=self._add, name="parser-restart", daemon=True).start()

    def close(self) -> None:
        """Kill every process now, whatever it is doing, and reap them."""
        with self._lock:
            self._closed = True
            processes, self._all = self._all, []
        for process in processes:
            process.close()


def _ready() -> bool:
    return True
