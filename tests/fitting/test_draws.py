"""Random starts from seeds: a function of the seed alone, the same drawn one at a time or
all at once, and standard normal."""

from __future__ import annotations

import numpy as np
from scipy import stats

from service.fitting.draws import standard_normals
from service.fitting.models.linear import SLOPE_INIT_STDDEV, start


def test_each_draw_depends_on_its_seed_alone() -> None:
    seeds = [0, 1, 2, 41, 42, 2**62 - 1, 2**63 - 1, 2**64 - 1, 12345678901234567]
    together = standard_normals(seeds)
    one_by_one = [standard_normals([seed])[0] for seed in seeds]
    assert together.tolist() == one_by_one
    assert standard_normals(seeds[::-1]).tolist() == together[::-1].tolist()
    assert len(set(together.tolist())) == len(seeds)  # distinct seeds, distinct draws
    assert np.isfinite(together).all()


def test_the_draws_are_standard_normal() -> None:
    """100,000 consecutive seeds (a batch's): mean 0, variance 1, and normal by
    Kolmogorov-Smirnov (deterministic: the seeds are fixed)."""
    draws = standard_normals(range(7, 100_007))
    assert abs(draws.mean()) < 0.01
    assert abs(draws.std() - 1.0) < 0.01
    assert stats.kstest(draws, "norm").pvalue > 0.01
    # Neighbouring seeds are not correlated.
    assert abs(np.corrcoef(draws[:-1], draws[1:])[0, 1]) < 0.01


def test_a_batch_of_starts_is_its_single_starts() -> None:
    """The line's start: slope ~ N(0, 0.05²) from the seed, intercept 0; None: no draw."""
    seeds = [5, None, 6, 7]
    starts = start(np.zeros((4, 6)), "standardize", seeds)
    for row, seed in zip(starts, seeds, strict=True):
        expected = 0.0 if seed is None else SLOPE_INIT_STDDEV * standard_normals([seed])[0]
        assert row.tolist() == [expected, 0.0]
        if seed is not None:
            assert start(np.zeros((1, 6)), "none", [seed]).tolist() == [row.tolist()]
