"""A model is one :class:`ModelSpec`: everything the engine needs to fit it, in one place.

The engine (:mod:`service.fitting.loop`, :mod:`service.fitting.batch`) drives any spec; it
knows no model by name. A spec states:

- its parameter names (the loop's order) and the arrays it is fitted to;
- how data become the loop's input: a summary vector of sufficient statistics with a
  named :class:`~service.fitting.layout.Layout`, computed in numpy (small or weighted data),
  in a graph (large data) and for many ragged sets at once (batches);
- its loss on that summary, written once for one set (parameters ``[k]``, summary ``[S]``)
  and for a batch (``[B, k]``, ``[B, S]``) alike: read columns with ``[..., i]``;
- its default start, whether that start is random (then a seed is reported), and its
  degenerate-data check;
- its standardization (:mod:`service.fitting.scaling`), and its statistics, with its closed
  form where it has one (:mod:`service.fitting.stats`).

The built-in models are :mod:`.linear` and :mod:`.gaussian`, the reference post's two.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from service.fitting.layout import Layout
from service.fitting.options import Scaling
from service.fitting.results import DegenerateData, FitStats
from service.fitting.scaling import Standardize, StandardizeSets
from service.fitting.small import Vector
from service.fitting.stats import AtFit, SetsAtFit, SetStats, WeightSummary
from service.fitting.summary import Ragged

Array = npt.NDArray[np.float64]
#: A loss on loop-carried parameters and the summary (TensorFlow ops, traced once).
Loss = Callable[[Any, Any], Any]


@dataclass(frozen=True, slots=True)
class ResidualSum:
    """For least squares whose loss is a moment form, which cancels on data the model fits
    almost exactly: ``cancels`` says which summaries ([..., S] -> booleans) have lost digits
    that way, and ``rss`` takes Σw·r² for one of them from a pass over its data (summary,
    fitted parameters in the caller's units, the data arrays, weights or None). The
    statistics take it as the model option ``rss``, and it is the final loss."""

    cancels: Callable[[Array], Any]
    rss: Callable[[Array, Vector, Sequence[Array], Array | None], float]


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One model, as the engine fits it (see the module's docstring)."""

    #: The model's name (its URL path, its metrics label, its results' ``model``).
    name: str
    #: Parameter names, in the loop's order.
    params: tuple[str, ...]
    #: The arrays a fit takes, in call order (all of one length, the point count).
    data: tuple[str, ...]
    #: The loop's input: the summary, named field by field (all scalars).
    summary: Layout
    #: numpy: (arrays..., weights or None) -> the moments (a prefix of the summary).
    moments: Callable[..., Array]
    #: The same as a graph function of float64 vectors, for large unweighted data (None: numpy
    #: always).
    moments_graph: Any
    #: Batches: (Ragged arrays...) -> [B, moments] for every set at once.
    moments_of_sets: Callable[..., Array]
    #: (moments [..., M], Σw or n [...], model options) -> the summary [..., S].
    complete: Callable[[Array, Array, Mapping[str, Any]], Array]
    loss: Loss
    #: The summary field that must be positive for the parameters to be determined, and
    #: what to say when it is not.
    spread: str
    constant: str
    standardize: Standardize
    #: Default starts in fit coordinates ([B, k]) from the caller's summaries ([B, S]), the
    #: scaling and one seed per row (a random start draws row i from ``seeds[i]``).
    start: Callable[[Array, Scaling, Sequence[int | None]], Array]
    random_start: bool
    #: Statistics where the fit ended (the summary in the caller's units, the model options).
    stats: Callable[[AtFit, Array, WeightSummary, Mapping[str, Any]], FitStats]
    #: A summary row any start fits harmlessly (pads a batch to its compiled size), and a
    #: start for it.
    dummy: tuple[float, ...]
    dummy_start: tuple[float, ...]
    #: Batches: ``standardize`` of every row of [B, S] at once (None: the model is not
    #: offered in batches).
    standardize_sets: StandardizeSets | None = None
    #: Batches: ``stats`` of every (unweighted) set at once, as arrays.
    stats_of_sets: Callable[[SetsAtFit, Array, Mapping[str, Any]], SetStats] | None = None
    #: ``stats`` of many fits at once (where each ended, the summaries [B, S], their
    #: weight summaries and model options), each as ``stats`` gives it (None: one by one).
    stats_of_rows: (
        Callable[
            [Sequence[AtFit], Array, Sequence[WeightSummary], Sequence[Mapping[str, Any]]],
            list[FitStats],
        ]
        | None
    ) = None
    #: Parameters in the caller's units -> as reported (e.g. a std's sign dropped).
    report: Callable[[Vector], Vector] = lambda p: p
    #: Options the model takes beyond the training options (e.g. the Gaussian's reduction),
    #: with their defaults.
    options: Mapping[str, Any] = ()  # type: ignore[assignment]
    #: Least squares: the (weighted) residuals whose sum of squares over Σw (the ``spread``
    #: field) is the loss, on the same parameters and summary. With them the loop offers
    #: Levenberg-Marquardt (whose batched loop reads the loss from its own residuals).
    residuals: Loss | None = None
    #: The residuals and their exact Jacobian ([..., n, k]) in one pass, where the model
    #: has them so (None: one forward-mode accumulator per parameter).
    residuals_jacobian: Callable[[Any, Any], tuple[Any, Any]] | None = None
    #: Parameters -> the nearest allowed ones (bounds, by projection after every update).
    project: Loss | None = None
    #: The same residuals in numpy, for parameters given as numbers or as jets
    #: (:mod:`service.fitting.jets`: with their exact derivatives), of one set ([S]) or of
    #: rows ([B, S], parameters [B, 1] each): the statistics' Jacobian, and a loop with
    #: nothing to compile (:mod:`service.fitting.numpy_loop`). Bounds are the summary's
    #: ``lower`` and ``upper`` fields.
    numpy_residuals: Callable[[Sequence[Any], Array], Any] | None = None
    #: How many leading summary fields must be finite (None: all; bounds may be infinite).
    finite_fields: int | None = None
    #: Least squares whose loss is a moment form: where it cancels, the residual sum of
    #: squares from the data instead (:class:`ResidualSum`).
    residual_sum: ResidualSum | None = None
    #: Whether the loops are XLA-compiled (fastest per call; XLA keeps what it compiled for
    #: the life of the process) or run as plain graphs (compile faster, in less memory, and
    #: give it back when dropped): see :class:`~service.fitting.expression.CompileCost`.
    xla: bool = True

    def __post_init__(self) -> None:
        if len(self.dummy) != self.summary.size or len(self.dummy_start) != self.k:
            raise ValueError(f"model {self.name!r}: dummy row or start of the wrong size")
        if self.spread not in dict(self.summary.fields):
            raise ValueError(f"model {self.name!r}: spread {self.spread!r} is not a summary field")
        object.__setattr__(self, "options", dict(self.options))

    @property
    def k(self) -> int:
        return len(self.params)

    def model_options(self, given: Mapping[str, Any] | None) -> dict[str, Any]:
        """The model's options: its defaults, overridden by ``given`` (names checked)."""
        given = dict(given or {})
        unknown = sorted(set(given) - set(self.options))
        if unknown:
            raise ValueError(f"model {self.name!r} takes no option {', '.join(unknown)}")
        return {**self.options, **given}

    def unusable(self, summary: Array, initial: npt.ArrayLike = ()) -> DegenerateData | None:
        """Why data with this summary (caller's units) cannot be fitted from ``initial``
        (fit coordinates), or None. Single and batch fits share it."""
        checked = summary[..., : self.finite_fields]
        if not (np.isfinite(checked).all() and np.isfinite(initial).all()):
            return DegenerateData(
                "the data are too large in magnitude: their mean or variance overflows "
                "float64; rescale them"
            )
        if not self.summary.read(summary, self.spread) > 0.0:
            return DegenerateData(self.constant)
        return None


def all_equal(name: str, consequence: str) -> str:
    """The degenerate-data message for an array whose values are all equal."""
    return (
        f"all {name} values are equal (or so close that their variance underflows float64): "
        f"{consequence}"
    )


def _registry() -> dict[str, ModelSpec]:
    from service.fitting.models.gaussian import GAUSSIAN
    from service.fitting.models.linear import LINEAR

    return {spec.name: spec for spec in (LINEAR, GAUSSIAN)}


#: The built-in models by name.
BUILT_IN: Mapping[str, ModelSpec] = _registry()

__all__ = ["BUILT_IN", "Loss", "ModelSpec", "Ragged", "ResidualSum", "all_equal"]
