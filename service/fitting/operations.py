"""numpy's namespaces for :func:`~service.fitting.expression.evaluate`: extended precision
(the statistics' residuals) and float64 (drawing a fitted curve). Apart from the expression
module, which the schemas and the client import without numpy."""

from __future__ import annotations

import numpy as np

from service.fitting.expression import Operations

#: numpy in extended precision (80-bit x87 long double here: 64-bit significand).
LONG = Operations(
    number=np.longdouble,
    functions={
        "exp": np.exp,
        "log": np.log,
        "sqrt": np.sqrt,
        "sin": np.sin,
        "cos": np.cos,
        "tan": np.tan,
        "atan": np.arctan,
        "tanh": np.tanh,
        "abs": np.abs,
    },
    pow=np.power,
)


#: numpy in float64 (drawing a fitted curve).
NUMPY = Operations(number=float, functions=LONG.functions, pow=np.power)

__all__ = ["LONG", "NUMPY"]
