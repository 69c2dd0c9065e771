"""Plain options and names of the engine: no TensorFlow and no numpy, so the schemas, the
parser process and the client import them. Training options beyond the post's plain gradient
descent: the optimizer and when to stop."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

OptimizerName = Literal["sgd", "momentum", "adam", "newton"]
#: Least squares models (expressions) also take Levenberg-Marquardt, their default.
ExpressionOptimizer = Literal["levenberg_marquardt", "sgd", "momentum", "adam", "newton"]

#: The Gaussian loss: "sum" is the reference post's NLL, "mean" divides it by N.
Reduction = Literal["sum", "mean"]
#: Where the loop runs: standardized coordinates, or the raw ones (the reference post's).
Scaling = Literal["standardize", "none"]
ModelName = Literal["linear", "gaussian"]
#: Why the loop stopped, named after the rule that stopped it: all epochs ran; the loss
#: stalled (``tolerance``); the gradient fell within ``gradient_tolerance``; Newton's full step
#: fell within the convergence threshold (so the fit converged); the deadline.
StopReason = Literal[
    "max_epochs", "loss_tolerance", "gradient_tolerance", "step_tolerance", "timeout"
]

#: The losses of a robust fit, as scipy least_squares' ``loss`` ("linear": least squares).
LossName = Literal["linear", "soft_l1", "huber", "cauchy", "arctan"]
#: Multi-start runs whose rss agree to this, relatively, reached the same minimum.
SAME_MINIMUM_RTOL = 1e-6
#: The confidence level of the parameter tables' intervals when a request gives none.
DEFAULT_CONFIDENCE = 0.95

OPTIMIZERS: tuple[OptimizerName, ...] = ("sgd", "momentum", "adam", "newton")
LEVENBERG_MARQUARDT: Literal["levenberg_marquardt"] = "levenberg_marquardt"
#: Every update rule of the loop (Levenberg-Marquardt needs a model's residuals).
LOOP_OPTIMIZERS: tuple[ExpressionOptimizer, ...] = (LEVENBERG_MARQUARDT, *OPTIMIZERS)


@dataclass(frozen=True, slots=True)
class Optimizer:
    """The update rule, with Keras's defaults and formulas.

    - ``sgd``: p ← p - lr·g (the reference post's ``assign_sub``).
    - ``momentum``: v ← momentum·v - lr·g; p ← p + v (``keras.optimizers.SGD(momentum=…)``).
    - ``adam``: bias-corrected first and second moments (``keras.optimizers.Adam``).
    - ``newton``: damped Newton on the exact Hessian (nested tapes): the step solves
      (H + μI)·d = g, with μ = 0 where H is positive definite and μ = 2·|λmin| + ε otherwise,
      then halves until the loss decreases (Armijo backtracking). It needs no learning rate,
      and stops by itself once a full step is within ``CONVERGED_RTOL`` (after taking it).
    """

    name: ExpressionOptimizer = "sgd"
    momentum: float = 0.9
    beta_1: float = 0.9
    beta_2: float = 0.999
    epsilon: float = 1e-7

    def __post_init__(self) -> None:
        if self.name not in LOOP_OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.name!r}")
        for name in ("momentum", "beta_1", "beta_2"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1)")
        if not (math.isfinite(self.epsilon) and self.epsilon > 0.0):
            raise ValueError("epsilon must be a positive finite number")

    @property
    def first_rate(self) -> float:
        """The decay of the first slot: ``momentum`` for momentum, ``beta_1`` for Adam."""
        return self.momentum if self.name == "momentum" else self.beta_1


@dataclass(frozen=True, slots=True)
class Stopping:
    """Early stopping; None disables a criterion.

    - ``tolerance``: stop once the loss has failed, ``patience`` epochs in a row, to improve on
      the best loss so far by more than ``tolerance·max(|loss|, 1)`` (relative, like scipy's
      ``ftol``).
    - ``gradient_tolerance``: stop once the gradient's Euclidean norm is at most this.
    """

    tolerance: float | None = None
    patience: int = 10
    gradient_tolerance: float | None = None

    def __post_init__(self) -> None:
        for name in ("tolerance", "gradient_tolerance"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0.0):
                raise ValueError(f"{name} must be a finite number >= 0")
        if self.patience < 1:
            raise ValueError("patience must be >= 1")

    @property
    def enabled(self) -> bool:
        return self.tolerance is not None or self.gradient_tolerance is not None


SGD = Optimizer()
NO_STOPPING = Stopping()

#: A fit counts as converged when the Newton step to the optimum is at most this, relative
#: to max(1, |parameters|).
CONVERGED_RTOL = 1e-6
