"""A second process with a warm engine of its own, which the event loop awaits without a thread.

A fit expected to take a millisecond or two is not worth a thread handoff, so it used to run
on the event loop itself, and the loop did nothing else meanwhile: the fit was half of the
loop's time a request. Sent here, it runs on the other core while the loop parses and answers
the next requests.

- The process serves one call at a time, in order. Each call is a pickled frame over a socket
  pair: the loop writes without blocking, and an asyncio protocol hands each answer to its call
  as its bytes arrive.
- Its death (SIGKILL, an OOM kill, a crash) is an EOF on the socket: every call that was in it
  raises :class:`ProcessLost` at once, so the caller can run it itself, and a new process is
  started in the background, after a pause that doubles while starts keep failing. A process
  that hangs past a call's deadline, or answers what the server cannot unpickle, is killed.
- It exits on EOF, and when the server that started it is gone however it went
  (:func:`service.processes.watch_parent`): it never outlives the server.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import multiprocessing
import os
import pickle
import socket
import struct
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from typing import Any, cast

from service.processes import become_helper

log = logging.getLogger(__name__)

HEADER = struct.Struct("<Q")
#: How long a new process may take to import TensorFlow and warm its engine.
START_TIMEOUT_S = 180.0
#: Pauses before restarting a process that died: the first, and the longest.
RESTART_PAUSE_S = (1.0, 30.0)
#: A process that served this long before dying is restarted after the first pause again.
STABLE_S = 60.0
#: How long the process may take to finish its call and exit on shutdown before it is killed.
STOP_TIMEOUT_S = 5.0
READY = b"ready"


class ProcessLost(Exception):
    """The process died (or was stopped) with this call in it, or was not running."""


Setup = Callable[[], Any]
Call = Callable[..., Any]


def _serve(sock: socket.socket, parent: int, name: str, setup: Setup, call: Call) -> None:
    """The process: ``state = setup()``, then ``call(state, *args)`` for each frame, in order,
    answering ``(id, ok, value)``, until EOF."""
    become_helper(name, parent)  # Ctrl-C is for the server; EOF ends us
    state = setup()
    gc.collect()
    gc.freeze()  # what the warm-up made lives as long as the process
    _answer(sock, state, call)
    # Then exit at once: a daemon thread (the background warm-up) may be inside TensorFlow,
    # where the interpreter's finalization aborts the process ("terminate called after
    # throwing...", "FATAL: exception not rethrown"). There is nothing to flush or close.
    os._exit(0)


def _answer(sock: socket.socket, state: Any, call: Call) -> None:
    """Say READY, then answer each frame until EOF (or the socket fails)."""
    try:
        _send(sock, READY)
    except OSError:
        return  # stopped while starting
    while True:
        try:
            frame = _receive(sock)
        except (EOFError, OSError):
            return
        ident, args = pickle.loads(frame)
        try:
            reply: tuple[int, bool, Any] = (ident, True, call(state, *args))
        except Exception as error:
            reply = (ident, False, _portable(error))
        try:
            _send(sock, pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL))
        except OSError:
            return


def _portable(error: Exception) -> Exception:
    """``error``, if it comes back whole from pickling (an exception whose constructor takes
    other arguments than it keeps would not); else a RuntimeError saying what it was."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")
    return error


def _frame(payload: bytes) -> bytes:
    return HEADER.pack(len(payload)) + payload


def _send(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(_frame(payload))


def _receive(sock: socket.socket) -> bytearray:
    (size,) = HEADER.unpack(_exactly(sock, HEADER.size))
    return _exactly(sock, size)


def _exactly(sock: socket.socket, size: int) -> bytearray:
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:])
        if not n:
            raise EOFError
        got += n
    return buffer


class _Connection(asyncio.Protocol):
    """The loop's end of one process's socket: frames are cut from the bytes as they arrive
    and handed to their calls in the same callback (no reader task)."""

    def __init__(self, process: BaseProcess, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        self.process = process
        self.sock = sock  # owned here: closed by close(), never by the collector
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.ready: asyncio.Future[bool] = loop.create_future()  # whether it said "ready"
        self.closed: asyncio.Future[None] = loop.create_future()
        self.started = time.monotonic()
        self.killed = False
        self.transport: asyncio.WriteTransport | None = None
        self._buffer = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not asyncio.Transport subclasses: no isinstance here.)
        self.transport = cast(asyncio.WriteTransport, transport)

    def send(self, payload: bytes) -> None:
        assert self.transport is not None
        self.transport.write(_frame(payload))

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        while len(buffer) >= HEADER.size:
            (size,) = HEADER.unpack_from(buffer)
            end = HEADER.size + size
            if len(buffer) < end:
                return
            frame = bytes(buffer[HEADER.size : end])
            del buffer[:end]
            if not self.ready.done():
                self.ready.set_result(frame == READY)
                continue
            try:
                answer = pickle.loads(frame)
            except Exception:
                # Not the server's own code (its files were replaced under a running server,
                # and the process restarted from them): no answer from it can be trusted, nor
                # matched to its call. Killed, every call in it raises ProcessLost at once.
                log.exception("an answer from the %s process would not unpickle", self.process.name)
                self.kill()
                return
            self._answer(*answer)

    def kill(self) -> None:
        self.killed = True
        self.process.kill()

    def _answer(self, ident: int, ok: bool, value: Any) -> None:
        future = self.pending.get(ident)
        if future is None or future.done():
            return  # its caller stopped waiting
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def connection_lost(self, exc: Exception | None) -> None:
        """EOF: the process exited or died. Every call still in it fails at once."""
        for future in self.pending.values():
            if not future.done():
                future.set_exception(ProcessLost("the process died during the call"))
        if not self.closed.done():
            self.closed.set_result(None)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        else:
            self.sock.close()


class WarmProcess:
    """A process holding what ``setup()`` returns (a warm engine), serving ``call(state,
    *args)``. :meth:`start` in the event loop; :meth:`call` is usable once :attr:`ready`."""

    def __init__(
        self,
        setup: Setup,
        call: Call,
        name: str = "tapefit-fit",
        on_ready: Callable[[], None] = lambda: None,
        on_restart: Callable[[], None] = lambda: None,
    ) -> None:
        self._setup = setup
        self._call = call
        self._name = name
        self._on_ready = on_ready
        self._on_restart = on_restart
        self._running: _Connection | None = None
        self._next_id = 0
        self._closed = False
        self._pause = RESTART_PAUSE_S[0]
        self._task: asyncio.Task[None] | None = None
        self._served = False

    @property
    def ready(self) -> bool:
        return self._running is not None and not self._running.killed

    @property
    def replacing(self) -> bool:
        """The process was serving, and is now lost (dead, or killed as hung) until a new
        one is ready."""
        return self._served and not self.ready and not self._closed

    @property
    def pid(self) -> int | None:
        running = self._running
        return running.process.pid if running is not None else None

    def start(self) -> None:
        """Start the process in the background; :attr:`ready` once it has warmed up."""
        self._task = asyncio.create_task(self._keep_running(), name=f"{self._name}-process")

    async def wait_ready(self) -> None:
        """Until the process is ready (tests and benchmarks)."""
        while not self.ready:
            if self._closed:
                raise ProcessLost("the process is stopped")
            await asyncio.sleep(0.05)

    async def call(self, *args: Any, timeout_s: float) -> Any:
        """``call(state, *args)`` in the process; raises what it raised there, or
        :class:`ProcessLost`. Past ``timeout_s`` the process is taken for hung and killed."""
        running = self._running
        if running is None or running.killed:
            raise ProcessLost("the process is not running")
        ident = self._next_id
        self._next_id += 1
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        running.pending[ident] = future
        running.send(pickle.dumps((ident, args), protocol=pickle.HIGHEST_PROTOCOL))
        hung = loop.call_later(timeout_s, self._hung, running, future)
        try:
            return await future
        finally:
            hung.cancel()
            running.pending.pop(ident, None)

    def _hung(self, running: _Connection, future: asyncio.Future[Any]) -> None:
        if future.done():
            return
        log.error("the %s process missed a deadline by far: killing it", self._name)
        running.kill()
        future.set_exception(ProcessLost("the process hung"))

    async def stop(self) -> None:
        """No more calls; the process finishes the one it is in and exits (killed if it
        takes longer than :data:`STOP_TIMEOUT_S`)."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    # -- the process's life -------------------------------------------------------------------

    async def _keep_running(self) -> None:
        """Start the process, serve it until it dies, restart it; until stopped."""
        while not self._closed:
            running: _Connection | None = None
            try:
                running = await self._spawn()
                self._running = running
                self._served = True
                self._on_ready()
                await running.closed
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("the %s process failed to start", self._name)
            finally:
                self._running = None
                if running is not None:
                    running.close()  # the process finishes its call, reads EOF and exits
                    running.connection_lost(None)  # every call still in it fails now
                    await _end(running.process)
            if self._closed:
                break
            stable = running is not None and time.monotonic() - running.started > STABLE_S
            self._pause = RESTART_PAUSE_S[0] if stable else self._pause
            log.warning("the %s process died; restarting it in %.0f s", self._name, self._pause)
            self._on_restart()
            await asyncio.sleep(self._pause)
            self._pause = min(2 * self._pause, RESTART_PAUSE_S[1])

    async def _spawn(self) -> _Connection:
        """A new process, connected, once it has said it is ready."""
        context = multiprocessing.get_context("spawn")
        ours, theirs = socket.socketpair()
        process = context.Process(
            target=_serve,
            args=(theirs, os.getpid(), self._name, self._setup, self._call),
            name=self._name,
            daemon=True,
        )
        try:
            process.start()
        finally:
            theirs.close()  # so that the process's death is an EOF here
        loop = asyncio.get_running_loop()
        connection = _Connection(process, ours)
        try:
            await loop.create_unix_connection(lambda: connection, sock=ours)
            await asyncio.wait(
                (connection.ready, connection.closed),
                timeout=START_TIMEOUT_S,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if not (connection.ready.done() and connection.ready.result()):
                raise RuntimeError("the process died, hung or answered wrong while starting")
        except BaseException:
            connection.close()
            process.kill()  # it holds nothing yet
            await _end(process)
            raise
        log.info("%s process ready", self._name, extra={"pid": process.pid})
        return connection


async def _end(process: BaseProcess) -> None:
    """Let the process exit on the EOF it has been sent; kill it if it will not; reap it."""
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, process.join, STOP_TIMEOUT_S)
    if process.is_alive():
        process.kill()
        await loop.run_in_executor(None, process.join, STOP_TIMEOUT_S)
