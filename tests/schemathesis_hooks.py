"""schemathesis hooks (loaded by ``SCHEMATHESIS_HOOKS`` in tests/test_resilience.py): how to
draw an ``application/x-npy`` body, which it cannot serialize by itself.

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
