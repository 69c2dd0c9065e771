"""Functions for test processes to run: this module imports nothing, so a process that
unpickles them starts in milliseconds (the test modules import TensorFlow)."""

from __future__ import annotations

from typing import Any


class Unpicklable(Exception):
    """Its constructor takes other arguments than it keeps: it would not unpickle."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"{a} and {b}")


def fails_in_setup() -> None:
    raise RuntimeError("no engine today")


def echo(state: object, *args: Any) -> Any:
    return args


def raises(state: object) -> None:
    raise Unpicklable(1, 2)


def _refuse() -> None:
    raise AttributeError("Can't get attribute '_gone' on <module 'service.worker'>")


class Unreadable:
    """Pickles, but will not unpickle: as an answer from a process running other code."""

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return _refuse, ()


def answers_unreadably(state: object, readable: bool) -> Any:
    return "fine" if readable else Unreadable()


def busy_in_tensorflow() -> None:
    """A setup that leaves a daemon thread inside TensorFlow for good (as the fit process's
    background warm-up is for seconds): the process must still exit cleanly."""
    import threading

    import tensorflow as tf

    def spin() -> None:
        i = 0
        while True:  # trace and XLA-compile a new function, again and again
            i += 1
            compiled = tf.function(lambda v, i=i: tf.sin(v) * i, jit_compile=True)
            compiled(tf.ones([i % 97 + 1]))

    threading.Thread(target=spin, daemon=True).start()
