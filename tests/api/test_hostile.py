"""Hostile and clumsy clients, in process: every mistake is a 4xx naming its cause, every wait
has a deadline, and admission charges memory (the real-server versions are `make chaos`)."""

from __future__ import annotations

import asyncio
import io
import json
import math
from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np
import pytest

from service.admission import PACE_BOUNDS, Admission, Cost, Refused, body_cost, fit_cost
from tests.conftest import app_settings, running_app
from tests.mistakes import CLIENT_MISTAKES, GAUSSIAN, HUGE_EPOCHS, JSON, LINEAR, Mistake

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("mistake", CLIENT_MISTAKES, ids=lambda m: "-".join(map(str, m.loc)))
async def test_client_mistakes_are_422_naming_the_field(
    client: httpx.AsyncClient, mistake: Mistake
) -> None:
    r = await client.post(mistake.url, content=mistake.content, headers=mistake.headers)
    assert r.status_code == 422, r.text
    [error] = r.json()["detail"]
    assert (error["loc"], error["type"]) == (mistake.loc, mistake.kind)
    assert len(r.content) < 400  # nothing echoed at length


async def test_a_4300_digit_number_is_not_echoed(client: httpx.AsyncClient) -> None:
    r = await client.post(GAUSSIAN, content=HUGE_EPOCHS, headers=JSON)
    assert r.status_code == 422
    assert len(r.content) < 400 and "0000000000" not in r.text


async def test_bounded_counts_follow_the_epoch_limit() -> None:
    async with running_app(app_settings(max_epochs=50)) as c:
        for field in ("patience", "history_every", "progress_every"):
            r = await c.post(GAUSSIAN, json={"y": [1.0, 2.0], "epochs": 10, field: 51})
            assert r.status_code == 422
            assert r.json()["detail"][0]["loc"] == ["body", field]
            assert r.json()["detail"][0]["type"] == "too_many_epochs"


async def test_too_many_numbers_are_refused_before_parsing() -> None:
    """A body with more numbers than the arrays can hold never reaches the JSON parser."""
    async with running_app(app_settings(max_points=10)) as c:
        r = await c.post(GAUSSIAN, json={"y": list(range(200))})
        assert r.status_code == 422
        [error] = r.json()["detail"]
        assert (error["loc"], error["type"]) == (["body"], "too_many_points")
        assert "TAPEFIT_MAX_POINTS" in error["msg"]
        r = await c.post(GAUSSIAN, json={"y": list(range(11))})  # over, but parsed: named
        assert r.json()["detail"][0]["loc"] == ["body", "y"]


async def test_binary_size_is_checked_before_conversion() -> None:
    """An int8 .npy over the points limit is refused from its header's size, not after a
    float64 copy 8 times its size."""
    async with running_app(app_settings(max_points=1000)) as c:
        buffer = io.BytesIO()
        np.save(buffer, np.ones(5000, dtype=np.int8))
        r = await c.post(
            GAUSSIAN + "/binary",
            content=buffer.getvalue(),
            headers={"content-type": "application/x-npy"},
        )
        assert r.status_code == 422
        assert r.json()["detail"][0]["type"] == "too_many_points"


async def test_a_stalled_upload_gets_408_and_frees_everything() -> None:
    settings = app_settings(body_timeout_s=0.3, max_concurrent_fits=1, max_queued_fits=0)
    async with running_app(settings) as c:

        async def stall() -> AsyncIterator[bytes]:
            yield b'{"y": [1, 2'
            await asyncio.sleep(5)

        r = await c.post(GAUSSIAN, content=stall(), headers=JSON)
        assert r.status_code == 408
        assert r.headers["connection"] == "close"
        assert "TAPEFIT_BODY_TIMEOUT_S" in r.json()["detail"]
        # The one place (and the memory) came back: the next fit runs.
        r = await c.post(GAUSSIAN, json={"y": [1.0, 2.0, 4.0]})
        assert r.status_code == 200


async def test_uploads_do_not_hold_fit_places() -> None:
    """With one place in all, a fit still runs while another client is mid-upload."""
    settings = app_settings(body_timeout_s=5, max_concurrent_fits=1, max_queued_fits=0)
    async with running_app(settings) as c:
        release = asyncio.Event()

        async def slow() -> AsyncIterator[bytes]:
            yield b'{"y": [1, 2'
            await release.wait()
            yield b", 4]}"

        uploading = asyncio.create_task(c.post(GAUSSIAN, content=slow(), headers=JSON))
        await asyncio.sleep(0.2)
        r = await c.post(GAUSSIAN, json={"y": [1.0, 2.0, 4.0]})
        assert r.status_code == 200
        release.set()
        assert (await uploading).status_code == 200


async def test_memory_budget_refuses_with_413_or_429() -> None:
    """Alone over the budget: 413 (it can never fit). Over what others leave: 429."""
    body = {"x": list(np.linspace(0, 1, 20_000)), "y": list(np.linspace(1, 3, 20_000))}
    need = body_cost(len(json.dumps(body))).bytes
    async with running_app(app_settings(memory_budget_bytes=int(need // 2))) as c:
        r = await c.post(LINEAR, json=body)
        assert r.status_code == 413
        assert "TAPEFIT_MEMORY_BUDGET_BYTES" in r.json()["detail"]
        r = await c.post(LINEAR, json={"x": [0.0, 1.0, 2.0], "y": [1.0, 2.0, 2.0]})
        assert r.status_code == 200  # small fits still fit
        metrics = (await c.get("/metrics")).text
        assert 'tapefit_fit_rejections_total{reason="memory"} 1.0' in metrics
        assert "tapefit_memory_charged_bytes 0.0" in metrics


def test_admission_ledger() -> None:
    """The policy itself: places, memory and expected wait, and everything given back."""
    mib = 1 << 20
    admission = Admission(places=3, slots=1, memory_budget=10 * mib, max_queue_wait_s=2.0)
    first, second = admission.open(), admission.open()
    first.charge_bytes(6 * mib)
    with pytest.raises(Refused) as busy:
        second.charge_bytes(6 * mib)
    assert (busy.value.never, busy.value.retry_after) == (False, 1)  # no work admitted yet
    with pytest.raises(Refused) as never:
        second.charge_bytes(10 * mib + 1)
    assert never.value.never
    first.take_place(fit_cost(points=10, arrays=1, epochs=30_000_000, history=10))
    assert admission.fits == 1 and admission.expected_wait() > 2.0
    with pytest.raises(Refused) as wait:
        second.take_place(fit_cost(points=10, arrays=1, epochs=10, history=10))
    assert wait.value.reason == "queue_wait"
    assert wait.value.retry_after == math.ceil(admission.expected_wait()) >= 3
    # Saturated by time: refused before its body is read, too.
    with pytest.raises(Refused) as before_body:
        admission.check_place()
    assert before_body.value.reason == "queue_wait"
    first.close()
    second.close()
    assert (admission.fits, admission.bytes, admission.seconds) == (0, 0.0, 0.0)


def test_admission_is_by_time_not_by_count() -> None:
    """Many sub-millisecond fits are all admitted (a few ms of work queued), while long fits
    fill the wait bound: the count of fits in progress is not what refuses."""
    admission = Admission(places=10_000, slots=2, memory_budget=1 << 40, max_queue_wait_s=10.0)
    small = fit_cost(points=100, arrays=2, epochs=1000, history=1001)
    tickets = [admission.open() for _ in range(200)]
    for ticket in tickets:
        ticket.take_place(small)
    assert admission.expected_wait() < 0.1
    for ticket in tickets:
        ticket.close()
    # One epoch per compiled call: 20,000 epochs cost ~1 s each (their deadline caps them).
    long = fit_cost(points=100, arrays=2, epochs=20_000, history=20_001, epochs_per_call=1)
    assert 0.9 < long.seconds < 1.5
    admitted, refused = [], 0
    for _ in range(64):
        ticket = admission.open()
        try:
            ticket.take_place(long, limit_s=60.0)
            admitted.append(ticket)
        except Refused as refusal:
            refused += 1
            assert refusal.reason == "queue_wait"
            assert refusal.retry_after == math.ceil(admission.expected_wait()) > 10
    assert 15 <= len(admitted) <= 25 and refused == 64 - len(admitted)
    # A deadline caps what a fit is charged: 1 s fits asking 0.1 s are charged 0.1 s.
    for ticket in admitted:
        ticket.close()
    short = admission.open()
    short.take_place(long, limit_s=0.1)
    assert short.seconds == pytest.approx(0.1)
    short.close()
    assert (admission.fits, admission.seconds) == (0, 0.0)


def test_pace_follows_how_long_fits_really_take() -> None:
    """The estimate is scaled by the measured pace (a running geometric mean of measured /
    estimated seconds), within bounds, and admitted work is charged at the pace."""
    admission = Admission(places=100, slots=1, memory_budget=1 << 40, max_queue_wait_s=10.0)
    assert admission.pace == 1.0
    for _ in range(400):
        admission.observe(1e-3, 4e-3)  # fits take four times their estimate
    assert admission.pace == pytest.approx(4.0, rel=1e-6)
    ticket = admission.open()
    ticket.take_place(Cost(bytes=0.0, seconds=0.5))
    behind = admission.open()  # a request that would wait behind it
    assert admission.expected_wait() == pytest.approx(2.0, rel=1e-6)
    behind.close()
    assert ticket.estimate == 0.5
    ticket.observe(0.5)  # this one took its estimate: the pace moves towards 1
    assert 1.0 < admission.pace < 4.0
    ticket.close()
    for _ in range(1000):
        admission.observe(1e-3, 1e3)
    assert admission.pace == pytest.approx(PACE_BOUNDS[1])
    for _ in range(1000):
        admission.observe(1.0, 1e-9)
    assert admission.pace == pytest.approx(PACE_BOUNDS[0])
    admission.observe(0.0, 1.0)  # no estimate: nothing learned
    assert admission.pace == pytest.approx(PACE_BOUNDS[0])


async def test_both_framings_are_refused_and_the_connection_closed(
    client: httpx.AsyncClient,
) -> None:
    r = await client.post(
        LINEAR,
        content=b"0\r\n\r\n",
        headers={**JSON, "content-length": "5", "transfer-encoding": "chunked"},
    )
    assert r.status_code == 400
    assert r.headers["connection"] == "close"
    assert "Transfer-Encoding" in r.json()["detail"]


async def test_a_refused_body_is_drained_to_its_end_and_no_further() -> None:
    """What the drain reads of a refused upload (so the client reads the answer, not a
    reset): every chunk up to the last, nothing after it, and never past a disconnect."""
    from service.api.limits import _received, drain

    def receiving(messages: list[dict[str, Any]]) -> tuple[Any, list[dict[str, Any]]]:
        left = list(messages)

        async def receive() -> dict[str, Any]:
            return left.pop(0)

        return receive, left

    chunk = {"type": "http.request", "more_body": True}
    last = {"type": "http.request", "body": b"e"}
    after = {"type": "http.request", "body": b"never read"}
    receive, left = receiving([{**chunk, "body": b"ab"}, {**chunk, "body": b"cd"}, last, after])
    assert [c async for c in _received(receive)] == [b"ab", b"cd", b"e"]
    assert len(left) == 1  # the message after the last chunk is not consumed
    receive, left = receiving([{**chunk, "body": b"ab"}, {"type": "http.disconnect"}, chunk])
    await drain(_received(receive), seconds=1.0)
    assert left == [chunk]
    receive, _ = receiving([{"type": "http.request"}])  # a body-less last message
    assert [c async for c in _received(receive)] == [b""]

    async def stalled() -> dict[str, Any]:
        await asyncio.Event().wait()  # a client that stops sending mid-body
        return {}

    # The drain gives up by itself at its deadline, quietly (the outer bound only guards the
    # test; the drain's own 0.05 s is what ends it).
    await asyncio.wait_for(drain(_received(stalled), seconds=0.05), timeout=30)


async def test_a_refused_request_is_drained_unless_the_client_expects_100_continue() -> None:
    """The 429/503 answers drop the rest of the body first (so the client reads them), but a
    client that sent ``Expect: 100-continue`` is waiting, not uploading: nothing is read."""
    from types import SimpleNamespace

    from starlette.requests import Request

    from service.api.errors import _drain
    from service.settings import Settings

    app = SimpleNamespace(state=SimpleNamespace(settings=Settings()))

    async def drained(headers: dict[str, str], messages: list[dict[str, Any]]) -> int:
        left = list(messages)

        async def receive() -> dict[str, Any]:
            return left.pop(0)

        scope = {
            "type": "http",
            "method": "POST",
            "path": "/v1/fits/linear",
            "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
            "app": app,
        }
        await _drain(Request(scope, receive))
        return len(messages) - len(left)

    body: list[dict[str, Any]] = [
        {"type": "http.request", "body": b"ab", "more_body": True},
        {"type": "http.request", "body": b"cd"},
    ]
    assert await drained({"content-length": "4"}, body) == 2
    assert await drained({"content-length": "4", "expect": "100-Continue"}, body) == 0
    assert await drained({}, body) == 2  # no declared length: the body limit's deadline
    gone = [body[0], {"type": "http.disconnect"}]
    assert await drained({"content-length": "4"}, gone) == 2  # a disconnect ends it quietly


async def test_a_request_refused_after_its_body_was_read_still_gets_its_json_answer() -> None:
    """The fit's own cost is known only after parsing: a refusal then (here 413, its loss
    history alone over the memory budget) must still answer JSON, although the body that the
    refusal would otherwise drain has already been read."""
    async with running_app(app_settings(memory_budget_bytes=2_000_000)) as c:
        body = {"y": [1.0, 2.0, 3.0], "epochs": 100_000, "history_every": 1}
        r = await c.post("/v1/fits/gaussian", json=body)
        assert r.status_code == 413, r.text
        assert r.headers["content-type"] == "application/json"
        assert "memory" in r.json()["detail"]
