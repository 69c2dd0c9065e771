"""schemathesis hooks (loaded by ``SCHEMATHESIS_HOOKS`` in tests/test_resilience.py): how to
draw an ``application/x-npy`` body, which it cannot serialize by itself, and extreme
magnitudes in JSON bodies (see :func:`flatmap_body`).

Mostly real .npy arrays (any shape up to three dimensions, real and other dtypes, non-finite
values among them), sometimes cut short or followed by stray bytes, sometimes bytes that only
start like one: every check of the header and payload gets exercised."""

from __future__ import annotations

import io

import numpy as np
import schemathesis
from hypothesis import strategies as st

_DTYPES = ("<f8", "<f4", ">f8", "<i4", "|u1", "|b1", "<c16", "<U3")
_VALUES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.floats(-1e3, 1e3),
    st.integers(-100, 100).map(float),
)


@st.composite
def _npy(draw: st.DrawFn) -> bytes:
    shape = tuple(draw(st.lists(st.integers(0, 12), min_size=1, max_size=3)))
    values = draw(st.lists(_VALUES, min_size=int(np.prod(shape)), max_size=int(np.prod(shape))))
    array = np.array(values, dtype=np.float64).reshape(shape)
    dtype = draw(st.sampled_from(_DTYPES))
    with np.errstate(all="ignore"):
        out = io.BytesIO()
        np.save(out, array.astype(dtype), allow_pickle=False)
    body = out.getvalue()
    damage = draw(st.sampled_from(("none", "none", "none", "cut", "extra", "header")))
    if damage == "cut":
        return body[: draw(st.integers(0, len(body)))]
    if damage == "extra":
        return body + draw(st.binary(min_size=1, max_size=16))
    if damage == "header":
        return body[:10] + draw(st.binary(max_size=64))
    return body


schemathesis.openapi.media_type("application/x-npy", _npy())


#: Magnitudes at float64's edges: huge, tiny, denormal, and ordinary ones to mix with them.
_EXTREMES = st.sampled_from(
    [1e300, -1e300, 1.7e249, 1e-300, -1e-300, 5e-324, 1e-320, 0.0, 1.0, -2.5, 1e150]
)


def _numbers(values: object) -> bool:
    return (
        isinstance(values, list)
        and len(values) > 0
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    )


@st.composite
def _at_the_edges(draw: st.DrawFn, body: dict[str, object]) -> dict[str, object]:
    """``body`` with its x (list or named lists) and y drawn from :data:`_EXTREMES` (same
    lengths): a named model's guess, the statistics and the plots all meet them."""
    out = dict(body)
    for key in ("x", "y"):
        value = out.get(key)
        if _numbers(value):
            assert isinstance(value, list)
            out[key] = draw(st.lists(_EXTREMES, min_size=len(value), max_size=len(value)))
        elif isinstance(value, dict):
            out[key] = {
                name: draw(st.lists(_EXTREMES, min_size=len(v), max_size=len(v)))
                if _numbers(v)
                else v
                for name, v in value.items()
            }
    return out


@schemathesis.hook
def flatmap_body(context: object, body: object) -> st.SearchStrategy[object]:
    """Half of the JSON bodies with data arrays (or batches of them) get extreme magnitudes
    instead (the fixed seed never reached the 500 that x up to 1.7e249 gave a named model's
    guess)."""
    timeout = body.get("timeout_s") if isinstance(body, dict) else None
    if isinstance(timeout, int | float) and not isinstance(timeout, bool):
        # A deadline shorter than a new expression's compile is a documented 503 (the compile
        # goes on, for the retry): give the compile time, so that any 5xx is a fault.
        assert isinstance(body, dict)
        if "expression" in body or "model" in body:
            body = body | {"timeout_s": max(timeout, COMPILE_DEADLINE_S)}
    if isinstance(body, dict) and _numbers(body.get("y")):
        return st.one_of(st.just(body), _at_the_edges(body))
    sets = body.get("datasets") if isinstance(body, dict) else None
    if isinstance(body, dict) and isinstance(sets, list) and sets:
        edged = st.tuples(*(_at_the_edges(s) if isinstance(s, dict) else st.just(s) for s in sets))
        return st.one_of(st.just(body), edged.map(lambda drawn: body | {"datasets": list(drawn)}))
    return st.just(body)


#: The shortest deadline an expression body is sent with (a compile takes up to ~8 s).
COMPILE_DEADLINE_S = 30.0
