"""Client mistakes that once got a 500 or an echo (issue #17), shared by the in-process tests
(tests/api/test_hostile.py) and the real-server chaos run (tests/chaos.py). Each must be a
422 naming ``loc`` with error type ``kind``, and short."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

GAUSSIAN = "/v1/fits/gaussian"
LINEAR = "/v1/fits/linear"
JSON = {"content-type": "application/json"}
RAW = {"content-type": "application/octet-stream"}
NPY = {"content-type": "application/x-npy"}


def npy_claiming(shape: tuple[int, ...], payload: bytes) -> bytes:
    """A .npy file whose header claims ``shape`` whatever ``payload`` holds."""
    header = f"{{'descr': '<f8', 'fortran_order': False, 'shape': {shape}, }}"
    header += " " * (64 - (10 + len(header) + 1) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + payload


class Mistake(NamedTuple):
    url: str
    content: bytes
    headers: dict[str, str]
    loc: list[str]
    kind: str


HUGE_EPOCHS = b'{"y":[1,2,3],"epochs":1' + b"0" * 4300 + b"}"

CLIENT_MISTAKES = [
    Mistake(GAUSSIAN + "/binary", npy_claiming((10**12,), bytes(16)), NPY, ["body"], "npy_length"),
    Mistake(GAUSSIAN, b'{"y":[1,2,3],"tolerance":0.1,"patience":1' + b"0" * 400 + b"}", JSON,
            ["body", "patience"], "too_many_epochs"),
    Mistake(GAUSSIAN + "/binary?tolerance=0.1&patience=1" + "0" * 400, np.ones(3).tobytes(), RAW,
            ["query", "patience"], "too_many_epochs"),
    Mistake(LINEAR + "/binary?initial=" + "[" * 10_000 + "]" * 10_000, np.ones(6).tobytes(), RAW,
            ["query", "initial"], "model_type"),
    Mistake(GAUSSIAN, HUGE_EPOCHS, JSON, ["body"], "json_invalid"),
    Mistake(GAUSSIAN, b'{"y":[1,2,3],"history_every":1' + b"0" * 400 + b"}", JSON,
            ["body", "history_every"], "too_many_epochs"),
    Mistake(GAUSSIAN, b'{"y":[1,2,3],"progress_every":1' + b"0" * 400 + b"}", JSON,
            ["body", "progress_every"], "too_many_epochs"),
    Mistake(GAUSSIAN, b'{"y":[1,2,3],"weights":[1e308,1e308,1e308]}', JSON,
            ["body", "weights"], "weights_overflow"),
]  # fmt: skip
