"""The parser processes: one that parsed a large body is kept (its garbage goes back to the
system before the pool weighs it against its reserve); one that keeps memory is replaced."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from service.admission import rss_bytes
from service.api.models import BUILT_IN
from service.api.parser_pool import PARSER_RESERVE_BYTES, ParserFailed, ParserPool
from service.api.parsing import Parsed
from service.api.schemas import limits_context

_KEPT: list[list[float]] = []


def make_and_keep(count: int) -> int:
    _KEPT.append([float(i) for i in range(count)])
    return len(_KEPT[-1])


def hang(seconds: float) -> None:
    """A parse that never ends in time (a wedged parser)."""
    time.sleep(seconds)


def test_a_hung_parser_is_killed_at_its_deadline_and_replaced() -> None:
    """A parse that hangs ends at its deadline as a dead process would: ParserFailed (503 to
    the client), the process killed, a new one started; the next parse is answered."""
    restarts: list[int] = []
    pool = ParserPool(1, on_restart=lambda: restarts.append(1))
    try:
        (hung,) = pool._all
        with pytest.raises(ParserFailed):
            pool.call(hang, 600.0, deadline_s=0.5)
        assert not hung.process.is_alive() and restarts == [1]
        body = json.dumps({"x": [1.0, 2.0, 3.0], "y": [2.0, 4.1, 5.9]}).encode()
        context = limits_context(10**8, 100_000, 10**13)
        parsed = pool.call(BUILT_IN["linear"].parse_json, body, context, deadline_s=120)
        assert isinstance(parsed, Parsed) and parsed.arrays["y"].tolist() == [2.0, 4.1, 5.9]
        assert hung not in pool._all and len(pool._all) == 1
    finally:
        pool.close()


def test_a_process_is_kept_after_large_parses_and_replaced_when_it_keeps_memory() -> None:
    rng = np.random.default_rng(0)
    x = rng.random((10_000, 100))
    sets = [{"x": a.tolist(), "y": (2.0 * a).tolist()} for a in x]
    body = json.dumps({"datasets": sets}).encode()  # 40 MB, as the batch bench sends
    context = limits_context(10**8, 100_000, 10**13)
    pool = ParserPool(1, max_rss_bytes=PARSER_RESERVE_BYTES)  # as the server's
    try:
        (first,) = pool._all  # which process serves is the point
        idle = rss_bytes([first.pid])
        for _ in range(2):
            parsed = pool.call(BUILT_IN["linear"].parse_batch, body, context, deadline_s=60)
            assert isinstance(parsed, Parsed) and parsed.arrays["x"].size == 1_000_000
            assert pool._all == [first], rss_bytes([first.pid]) - idle
        assert pool.call(make_and_keep, 10_000_000, deadline_s=60) == 10_000_000
        assert first not in pool._all  # replaced (the new one starts in the background)
    finally:
        pool.close()
