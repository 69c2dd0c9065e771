"""Plain-data results and errors of the fitting engine."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from service.fitting.options import ModelName, StopReason

__all__ = ["ModelName", "StopReason"]  # re-exported; defined with the other plain names


@dataclass(frozen=True, slots=True)
class FitStats:
    """Statistics of a fit at the parameters it reached (None where undefined).

    ``covariance``/``correlation`` are 2x2 in ``names`` order. ``closed_form`` is the exact
    optimum (least squares; weighted mean and population std), ``closed_form_loss`` the loss
    there, and ``gap`` the fitted minus the closed-form parameters and loss; these three, and
    any other value that overflows float64, are None.
    """

    names: tuple[str, str]
    n: int
    n_used: int
    dof: int
    loss: float
    gradient_norm: float | None
    newton_step: float | None
    std_errors: tuple[float | None, float | None]
    covariance: tuple[tuple[float | None, float | None], tuple[float | None, float | None]]
    correlation: float | None
    log_likelihood: float | None
    aic: float | None
    bic: float | None
    closed_form: tuple[float, float] | None
    closed_form_loss: float | None
    gap: tuple[float, float, float] | None
    r_squared: float | None = None
    residual_std: float | None = None


@dataclass(frozen=True, slots=True)
class FitResult:
    """What a fit produced. ``loss_history[i]`` is the loss before update i (as in the post)."""

    model: ModelName
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

    def __init__(self, epoch: int, learning_rate: float, reason: str = NON_FINITE) -> None:
        self.epoch = epoch
        self.learning_rate = learning_rate
        self.reason = reason
        super().__init__(
            f"the fit diverged at epoch {epoch}: {reason}; "
            f"lower learning_rate (it was {learning_rate:g})"
        )


class DegenerateData(FitError):
    """The data do not determine the model's parameters (e.g. all x equal)."""


class FitCancelled(Exception):
    """The caller asked the fit to stop and wants no result (e.g. the client went away)."""
