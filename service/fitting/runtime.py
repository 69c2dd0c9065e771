"""Process-wide TensorFlow set-up; must run before the first TensorFlow op."""

from __future__ import annotations

import logging

import tensorflow as tf

log = logging.getLogger(__name__)


def configure_threads(intra_op: int, inter_op: int) -> bool:
    """Set TensorFlow's thread pools; returns False if TF had already started."""
    try:
        tf.config.threading.set_intra_op_parallelism_threads(intra_op)
        tf.config.threading.set_inter_op_parallelism_threads(inter_op)
    except RuntimeError:
        current = (
            tf.config.threading.get_intra_op_parallelism_threads(),
            tf.config.threading.get_inter_op_parallelism_threads(),
        )
        if current != (intra_op, inter_op):
            log.warning(
                "TensorFlow already initialised with intra/inter-op threads %s; "
                "requested (%d, %d) not applied",
                current,
                intra_op,
                inter_op,
            )
        return False
    return True
