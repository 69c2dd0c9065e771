"""Admission: one policy for every request that does heavy work.

A request is charged what it is expected to cost, in the two resources that can run out:

- **memory**: its estimated peak bytes (the body while it is read and parsed, then the arrays,
  the fit's working set, the history and the answer), against a budget derived from the
  container's memory limit (cgroup) or ``TAPEFIT_MEMORY_BUDGET_BYTES``;
- **time**: its expected compute seconds, against the fit slots. A request is refused when
  the work already admitted would keep it waiting longer than ``TAPEFIT_MAX_QUEUE_WAIT_S``;
  Retry-After is that expected wait. The estimate is a cost model (per fit, per compiled
  call, per epoch, per point) times the *pace*: how long recent fits really took for their
  estimate (a running geometric mean), so the wait follows this machine and its load.

The number of fits in progress is not the limit: 16 clients of sub-millisecond fits queue a
few milliseconds of work and are all admitted, while 64 one-second fits fill the wait bound
and the rest are refused. ``max_concurrent_fits + max_queued_fits`` places remain only as a
backstop. A request that does not fit now is answered 429 with Retry-After; one that could
never fit (it alone needs more memory than the budget) is answered 413. Nothing is charged
twice and every charge is released when the request ends, however it ends.

Costs are estimated in two steps: before the body is read, from its declared (or received)
length; after it is parsed, from the points, epochs and history it asks for. The body read
holds memory only, never a fit place, so clients that upload slowly cannot lock fits out.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
from dataclasses import dataclass
from pathlib import Path

#: Peak bytes of a JSON fit, per body byte: the body and its copy to the parser process,
#: pydantic's Python floats there (~32 B per ~18 B number), the float64 arrays and their way
#: back. Measured: a 38 MiB body of 1e6 (x, y) pairs peaks 251 MiB over the warm server (6.6).
JSON_BYTES_PER_BODY_BYTE = 7.0
#: A binary body is decoded in place, then converted to float64 (at most 8/1 for int8).
BINARY_BYTES_PER_BODY_BYTE = 2.0
#: Working set of a fit per data point and array: the float64 array, its tensor copy and the
#: centred temporaries of the summary.
FIT_BYTES_PER_POINT = 48.0
#: Per loss-history value: float64 in the engine, a Python float and its JSON text.
BYTES_PER_HISTORY_VALUE = 64.0
#: Per batch data set: its summary, statistics and response objects.
BYTES_PER_SET = 4096.0
#: Per data set of an expression batch, beyond its points: its prepared data and padded
#: summary, its run's state, its result and statistics (kept until the answer has streamed),
#: and the engine's per-row working set. Measured: a 10,000-set x 100-point JSON batch
#: peaked 430-530 MiB over the warm server (PSS, three runs; 142-456 MiB as .npy) against
#: 230-313 MiB charged without this, and one 10,000-set batch keeps ~15-19 KB a set from the
#: end of its fit until its answer has streamed.
BYTES_PER_EXPRESSION_SET = 24 * 1024
#: Fixed overhead of any fit request (objects, response, statistics).
REQUEST_BYTES = 256 * 1024

#: Expected compute time (before the pace): a fixed cost, per call of the compiled loop (a
#: fit makes ceil(epochs / TAPEFIT_EPOCHS_PER_CALL) calls), per epoch (O(1) in n), per point
#: (one pass for the summary), and per set-epoch of a batch. Measured on the line and the
#: Gaussian, n = 100: ~300 µs a fit, ~50 µs a call, 0.02 µs (SGD) to 0.1 µs (Adam with the
#: stopping rules) an epoch.
SECONDS_PER_FIT = 3e-4
SECONDS_PER_CALL = 5e-5
SECONDS_PER_EPOCH = 1e-7
SECONDS_PER_POINT = 2e-8
SECONDS_PER_SET_EPOCH = 2e-8
#: Expression fits: each Levenberg-Marquardt iteration builds the Jacobian (points x
#: parameters) and a few copies of it (the QR of the augmented system), and costs about
#: this much per entry.
JACOBIAN_COPIES = 4
SECONDS_PER_JACOBIAN_ENTRY = 2e-8


@dataclass(frozen=True, slots=True)
class Cost:
    """What a request is expected to take: peak bytes and compute seconds."""

    bytes: float
    seconds: float = 0.0


def body_cost(length: int, binary: bool = False) -> Cost:
    """The cost of reading and parsing a body of ``length`` bytes."""
    factor = BINARY_BYTES_PER_BODY_BYTE if binary else JSON_BYTES_PER_BODY_BYTE
    return Cost(bytes=REQUEST_BYTES + factor * length)


def fit_cost(
    points: int, arrays: int, epochs: int, history: int, sets: int = 0, epochs_per_call: int = 4096
) -> Cost:
    """The cost of a fit (``sets`` > 0: a batch of that many sets) once its data are parsed."""
    memory = (
        REQUEST_BYTES
        + FIT_BYTES_PER_POINT * points * arrays
        + BYTES_PER_HISTORY_VALUE * history
        + BYTES_PER_SET * sets
    )
    calls = -(-epochs // epochs_per_call)
    seconds = (
        SECONDS_PER_FIT
        + SECONDS_PER_CALL * calls
        + SECONDS_PER_EPOCH * epochs
        + SECONDS_PER_POINT * points
    )
    if sets:
        seconds += SECONDS_PER_SET_EPOCH * sets * epochs
    return Cost(bytes=memory, seconds=seconds)


def expression_cost(
    points: int, variables: int, parameters: int, epochs: int, history: int, sets: int = 0
) -> Cost:
    """The cost of an expression fit (``sets`` > 0: a batch of that many sets, or rows):
    its arrays, its Jacobians, its iterations."""
    entries = points * parameters
    memory = (
        REQUEST_BYTES
        + FIT_BYTES_PER_POINT * points * (variables + 2)
        + 8.0 * JACOBIAN_COPIES * entries
        + BYTES_PER_HISTORY_VALUE * history
        + BYTES_PER_EXPRESSION_SET * sets
    )
    seconds = SECONDS_PER_FIT + epochs * (SECONDS_PER_EPOCH + SECONDS_PER_JACOBIAN_ENTRY * entries)
    return Cost(bytes=memory, seconds=seconds)


class Refused(Exception):
    """Not now (``retry_after`` seconds) or, with ``never``, not with these limits at all."""

    def __init__(self, reason: str, retry_after: int, message: str, never: bool = False) -> None:
        self.reason = reason
        self.retry_after = retry_after
        self.never = never
        super().__init__(message)


#: The pace: each finished fit moves log(pace) this share of the way to log(its measured
#: seconds / its estimate); the pace stays within these bounds (one odd fit, or a burst of
#: them, cannot make the service refuse everything or admit without limit).
PACE_WEIGHT = 0.05
PACE_BOUNDS = (0.1, 20.0)


class Admission:
    """The ledger of what admitted requests hold. Not thread-safe: the event loop owns it."""

    def __init__(
        self, places: int, slots: int, memory_budget: int, max_queue_wait_s: float
    ) -> None:
        self.places = places
        self.slots = slots
        self.memory_budget = memory_budget
        self.max_queue_wait_s = max_queue_wait_s
        self.tickets = 0  # requests in progress (reading, parsing or holding a place)
        self.fits = 0  # requests holding a place
        self.bytes = 0.0  # charged memory
        self.seconds = 0.0  # expected compute of the admitted fits (estimates x pace)
        self._log_pace = 0.0

    @property
    def pace(self) -> float:
        """Measured seconds per estimated second of recent fits (1 until fits are seen)."""
        return math.exp(self._log_pace)

    def observe(self, estimate: float, seconds: float) -> None:
        """A fit estimated at ``estimate`` seconds (before the pace) took ``seconds``."""
        if estimate > 0.0 and seconds > 0.0:
            target = math.log(seconds / estimate)
            log_pace = self._log_pace + PACE_WEIGHT * (target - self._log_pace)
            low, high = (math.log(bound) for bound in PACE_BOUNDS)
            self._log_pace = min(max(log_pace, low), high)

    def expected_wait(self) -> float:
        """Seconds a request admitted now would wait for a slot, by the work ahead of it:
        none while every request in progress, this one included, has a slot of its own (one
        long fit's expected time, however large, holds one slot, not all of them)."""
        if self.tickets <= self.slots:
            return 0.0
        return self.seconds / self.slots

    def check_place(self) -> None:
        """Before a body is read: refuse at once if the work admitted already exceeds the
        wait bound, or every place is taken."""
        self._check_wait()
        if self.fits >= self.places:
            raise Refused(
                "overloaded",
                self._retry_after(),
                f"too many fits in progress; retry after {self._retry_after()} s",
            )

    def _check_wait(self) -> None:
        wait = self.expected_wait()
        if wait > self.max_queue_wait_s:
            retry = math.ceil(wait)
            raise Refused(
                "queue_wait",
                retry,
                f"the work queued ahead would keep this fit waiting about {retry} s "
                f"(TAPEFIT_MAX_QUEUE_WAIT_S is {self.max_queue_wait_s:g}); retry after {retry} s",
            )

    def open(self) -> Ticket:
        self.tickets += 1
        return Ticket(self)

    def _charge_bytes(self, delta: float, total: float) -> None:
        if total > self.memory_budget:
            raise Refused(
                "memory",
                0,
                f"this request needs about {_mib(total)} MiB, more than the memory budget of "
                f"{_mib(self.memory_budget)} MiB (TAPEFIT_MEMORY_BUDGET_BYTES); send fewer "
                "points, fewer epochs or a larger history_every",
                never=True,
            )
        if delta > 0 and self.bytes + delta > self.memory_budget:
            retry = max(1, self._retry_after())
            raise Refused(
                "memory",
                retry,
                f"the memory budget is in use by other requests; retry after {retry} s",
            )
        self.bytes += delta

    def _retry_after(self) -> int:
        return max(1, math.ceil(self.expected_wait()))


class Ticket:
    """What one request holds; :meth:`close` gives it all back."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self.bytes = 0.0
        self.seconds = 0.0
        #: The fit's estimated seconds before the pace (what :meth:`Admission.observe` takes).
        self.estimate = 0.0
        self.place = False
        self.closed = False

    def charge_bytes(self, total: float) -> None:
        """Hold ``total`` bytes in all (more or less than before)."""
        self.admission._charge_bytes(total - self.bytes, total)
        self.bytes = total

    def take_place(self, cost: Cost, limit_s: float = math.inf) -> None:
        """After parsing: a fit place, its memory and its expected time (at most ``limit_s``,
        the fit's deadline), or :class:`Refused`."""
        a = self.admission
        if not self.place:
            a.check_place()
        self.charge_bytes(cost.bytes)
        if not self.place:
            a.fits += 1
            self.place = True
        seconds = min(cost.seconds * a.pace, limit_s)
        a.seconds += seconds - self.seconds
        self.seconds, self.estimate = seconds, cost.seconds

    def observe(self, seconds: float) -> None:
        """The fit this ticket was charged for took ``seconds`` (sets the pace)."""
        self.admission.observe(self.estimate, seconds)

    def close(self) -> None:
        a = self.admission
        if not self.closed:
            a.tickets -= 1
            self.closed = True
        a.bytes -= self.bytes
        a.seconds -= self.seconds
        if self.place:
            a.fits -= 1
            if a.fits == 0:
                a.seconds = 0.0  # no drift from rounding over millions of requests
        self.bytes = self.seconds = 0.0
        self.place = False


def _mib(value: float) -> int:
    return math.ceil(value / (1 << 20))


#: Where the container's memory limit is: cgroup v2, then v1.
CGROUP_LIMITS = (
    Path("/sys/fs/cgroup/memory.max"),
    Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"),
)
MEMINFO = Path("/proc/meminfo")


def memory_limit() -> int:
    """The memory this process may use: the cgroup limit if there is one, else the RAM."""
    ram = _ram()
    for path in CGROUP_LIMITS:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < ram:
            return int(text)
    return ram


def _ram() -> int:
    for line in MEMINFO.read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def rss_bytes(pids: list[int]) -> int:
    """Resident memory of these processes (those that still exist)."""
    total = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total


def release_memory() -> None:
    """Hand freed heap memory back to the system (glibc keeps it for reuse otherwise, and a
    container's limit counts it); a no-op where there is no glibc."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
