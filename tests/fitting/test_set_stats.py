"""The batch statistics (:func:`fit_stats_of_sets`) where float64 runs out: each set's entry
is what :func:`fit_stats` says of it alone, None (NaN, not reported) where that has None."""

from __future__ import annotations

import math

import numpy as np

from service.fitting.stats import AtFit, SetsAtFit, fit_stats, fit_stats_of_sets, weight_summary

NAMES = ("slope", "intercept")
BIG = 1.5e308
#: Curvature rows (loss, gradient, Hessian) of a well-posed two-parameter fit.
CURVATURE = [0.5, 0.0, 0.0, 2.0, 0.0, 0.0, 2.0]


def test_a_gap_past_float64_is_not_reported_while_the_closed_form_is() -> None:
    """Set 0: fitted and closed form both finite, their difference not (BIG - (-BIG)); set 1:
    an ordinary gap. The single fit reports the closed form and no gap; so must the batch."""
    params = np.array([[BIG, 1.0], [2.0, 1.0]])
    closed = (np.array([-BIG, 1.5]), np.array([1.0, 0.5]))
    closed_loss = np.array([0.25, 0.25])
    n = np.array([10.0, 10.0])
    sets = fit_stats_of_sets(
        NAMES,
        SetsAtFit.of(np.array([CURVATURE, CURVATURE]), params),
        n,
        covariance_factor=np.array([1.0, 1.0]),
        loglik=np.array([-3.0, -3.0]),
        closed=closed,
        closed_loss=closed_loss,
    )
    for i in range(2):
        single = fit_stats(
            NAMES,
            AtFit.of(np.array(CURVATURE), params[i]),
            weight_summary(None, 10),
            covariance_factor=1.0,
            loglik=-3.0,
            closed=[float(c[i]) for c in closed],
            closed_loss=float(closed_loss[i]),
        )
        row = sets.row(i)
        assert row.closed_form == single.closed_form is not None
        assert row.gap == single.gap
    assert sets.row(0).gap is None and not math.isfinite(BIG - (-BIG))
    assert sets.row(1).gap == ((0.5, 0.5), 0.25)
