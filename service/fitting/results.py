"""Plain-data results and errors of the fitting engine."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from service.fitting.options import ModelName, StopReason

# ModelName and StopReason are re-exported; they are defined with the other plain names.
__all__ = ["Matrix", "ModelName", "Optional", "StopReason"]


#: One value per parameter, None where undefined.
Optional = tuple[float | None, ...]
#: A k x k matrix in parameter order, None where undefined.
Matrix = tuple[Optional, ...]


@dataclass(frozen=True, slots=True)
class FitStats:
    """Statistics of a fit at the parameters it reached (None where undefined).

    Every per-parameter value is in ``names`` order; ``covariance`` and ``correlation`` are
    k x k. ``closed_form`` is the exact optimum where the model has one (least squares;
    weighted mean and population std), ``closed_form_loss`` the loss there, and ``gap`` the
    fitted minus the closed-form parameters, and the loss's; these three, and any other value
    that overflows float64, are None.
    """

    names: tuple[str, ...]
    n: int
    n_used: int
    dof: int
    loss: float
    gradient_norm: float | None
    newton_step: float | None
    std_errors: Optional
    covariance: Matrix
    correlation: Matrix
    log_likelihood: float | None
    aic: float | None
    bic: float | None
    closed_form: tuple[float, ...] | None
    closed_form_loss: float | None
    gap: tuple[tuple[float, ...], float] | None
    r_squared: float | None = None
    residual_std: float | None = None
    #: Least squares models: the (weighted) residual sum of squares.
    rss: float | None = None


@dataclass(frozen=True, slots=True)
class FitResult:
    """What a fit produced. ``loss_history[i]`` is the loss before update i (as in the post)."""

    model: str
    params: dict[str, float]
    loss_history: npt.NDArray[np.float64]
    final_loss: float
    epochs_run: int
    n: int
    stop_reason: StopReason
    stats: FitStats
    converged: bool = False
    history_every: int = 1
    seed: int | None = None
    #: Plain-words reasons to distrust the parameters (empty when converged).
    warnings: tuple[str, ...] = ()


class FitError(ValueError):
    """A fit that cannot produce an answer for this data and these hyperparameters."""


class FitDiverged(FitError):
    """Training blew up: the loss or the parameters became non-finite, or the loss ended
    above where it started."""

    NON_FINITE = "the loss or the parameters became non-finite"

    #: What to change, for update rules that choose their own steps (no learning rate).
    SELF_STEPPING = (
        "the model's values overflow float64 or are undefined (a log or square root of a "
        "negative, 0/0) at the start or along the way: check the expression, the starting "
        "values and the bounds"
    )

    def __init__(
        self,
        epoch: int,
        learning_rate: float,
        reason: str = NON_FINITE,
        advice: str | None = None,
    ) -> None:
        self.epoch = epoch
        self.learning_rate = learning_rate
        self.reason = reason
        self.advice = advice
        advice = advice or f"lower learning_rate (it was {learning_rate:g})"
        super().__init__(f"the fit diverged at epoch {epoch}: {reason}; {advice}")

    def __reduce__(self) -> tuple[type[FitDiverged], tuple[int, float, str, str | None]]:
        """Pickled by its own arguments (it comes back from the fit process whole)."""
        return type(self), (self.epoch, self.learning_rate, self.reason, self.advice)


class DegenerateData(FitError):
    """The data do not determine the model's parameters (e.g. all x equal)."""


class FitCancelled(Exception):
    """The caller asked the fit to stop and wants no result (e.g. the client went away)."""
