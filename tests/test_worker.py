"""The worker in a fresh process: TensorFlow's thread pools come from settings."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

PROGRAM = """
import asyncio
import gc
import tensorflow as tf
from service.settings import Settings
from service.worker import FitWorker

async def main():
    worker = FitWorker(
        Settings(intra_op_threads=1, inter_op_threads=3, parse_processes=0, fit_processes=0)
    )
    await worker.start()
    await worker.wait_warm()
    await asyncio.sleep(0.1)  # the warm-up's done callback
    print(*gc.get_threshold(), gc.get_freeze_count() > 100_000)
    await worker.stop()

asyncio.run(main())
threading = tf.config.threading
print(threading.get_intra_op_parallelism_threads(), threading.get_inter_op_parallelism_threads())
"""


def test_thread_pools_are_set_from_settings_before_the_first_op() -> None:
    """And once warm, TensorFlow's objects are frozen out of the collector's way and its
    thresholds raised (service.worker.GC_THRESHOLDS)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    run = subprocess.run(
        [sys.executable, "-c", PROGRAM], capture_output=True, text=True, env=env, timeout=300
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["50000", "20", "20", "True", "1", "3"]
    assert "not applied" not in run.stderr  # configure_threads' warning when TF had started


def test_schemas_and_options_import_no_tensorflow_nor_numpy() -> None:
    """The parser process, the client and the schemas need the fitting options, not the
    engine: importing them must not cost TensorFlow's seconds and half a gigabyte, nor need
    numpy (the light client has none; tests/test_client.py installs it so)."""
    code = (
        "import sys, service.api.schemas, service.fitting.options; "
        "print(sorted(m for m in ('tensorflow', 'keras', 'fastapi', 'numpy') if m in sys.modules))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
