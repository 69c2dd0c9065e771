"""Any model written down: y = f(x; parameters) from an expression, by least squares.

An expression (:mod:`service.fitting.expression`) becomes one more :class:`ModelSpec`, made
per (canonical expression, number of variables, size bucket). The data are the summary
itself, padded to a power of two with weight-0 copies of the first point, so a new length
never recompiles: one compiled loop serves every n in a bucket. The loss is the weighted
mean squared residual Σw·r²/Σw; the residuals make the loop's Levenberg-Marquardt
available (the default for expressions), with the Jacobian by forward-mode autodiff.

Statistics follow NIST's and scipy ``curve_fit``'s convention: Cov = s²·(JᵀWJ)⁻¹ with
s² = RSS/(n - p), J the Jacobian at the optimum (from the tape, inverted through a QR
factorization). The residuals and their sum of squares are computed again in numpy's
extended precision (``longdouble``): on a fit as close as NIST's Lanczos1 (RSS 1.4e-25,
residuals ~1e-13 against values ~1) float64's rounding of each residual would leave the
standard errors with ~3 correct digits.

:class:`ExpressionModels` keeps the specs of recent expressions (a bounded LRU cache) and
tells the engine to drop the compiled loops of those it evicts.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import numpy.typing as npt
import tensorflow as tf

from service.fitting.expression import (
    CACHE_BYTES,
    CompileCost,
    Expression,
    Operations,
    evaluate,
)
from service.fitting.jets import JETS
from service.fitting.layout import Layout
from service.fitting.losses import LOG_2PI
from service.fitting.models import ModelSpec
from service.fitting.numpy_loop import jacobian_rows
from service.fitting.operations import LONG
from service.fitting.options import Scaling
from service.fitting.results import FitResult, FitStats
from service.fitting.scaling import IDENTITY, Coordinates
from service.fitting.stats import AtFit, WeightSummary
from service.fitting.tangents import DUALS, Dual

Array = np.ndarray[Any, np.dtype[Any]]

#: The smallest padded length; lengths go up in powers of two from there.
MIN_BUCKET = 32
#: Compiled expressions kept, at most (and within their memory: :class:`ExpressionModels`).
CACHE_SIZE = 64


TENSORFLOW = Operations(
    number=lambda text: tf.constant(float(text), tf.float64),
    functions={
        "exp": tf.exp,
        "log": tf.math.log,
        "sqrt": tf.sqrt,
        "sin": tf.sin,
        "cos": tf.cos,
        "tan": tf.tan,
        "atan": tf.atan,
        "tanh": tf.tanh,
        "abs": tf.abs,
    },
    pow=tf.pow,
)


def positional(expression: Expression) -> Expression:
    """The same model with its parameters named p0, p1, ... and its variables x0, x1, ... (as
    in its canonical form): what a shared, cached spec is made of, so that no caller's names
    (or their order) reach another caller's answer."""
    return Expression(
        expression.canonical,
        expression.tree,
        tuple(f"p{i}" for i in range(len(expression.parameters))),
        tuple(f"x{j}" for j in range(len(expression.variables))),
    )


def by_position(
    expression: Expression, bounds: Mapping[str, tuple[float | None, float | None]] | None
) -> dict[str, tuple[float | None, float | None]]:
    """``bounds`` keyed by the caller's parameter names -> keyed by positional names."""
    index = {name: i for i, name in enumerate(expression.parameters)}
    return {f"p{index[name]}": bound for name, bound in (bounds or {}).items()}


def named(expression: Expression, result: FitResult) -> FitResult:
    """A result of the positional spec with the caller's parameter names (values in order)."""
    names = expression.parameters
    return replace(
        result,
        params=dict(zip(names, result.params.values(), strict=True)),
        stats=replace(result.stats, names=names),
    )


#: A set's data read from its decimal text: the variables and y, or a callable reading them.
Exact = Sequence[Array] | Callable[[], Sequence[Array]]


def bucket(n: int) -> int:
    """The padded length of n points: the next power of two, at least MIN_BUCKET."""
    return max(MIN_BUCKET, 1 << max(0, n - 1).bit_length())


def expression_spec(expression: Expression, size: int, xla: bool = True) -> ModelSpec:
    """The spec of ``expression`` for data padded to ``size`` points (its loops XLA-compiled,
    or plain graphs)."""
    v, k = len(expression.variables), len(expression.parameters)
    layout = Layout.of(x=v * size, y=size, w=size, total=None, lower=k, upper=k)
    tree = expression.tree

    # Written for one set (parameters [k], summary [S]) and for a batch ([B, k], [B, S]).
    def weighted_residuals(
        params: Sequence[Any], summary: Any, ops: Operations, sqrt: Callable[[Any], Any]
    ) -> Any:
        """√w·(y - model), the model evaluated with ``ops`` (a constant model broadcasts
        against y)."""
        columns = layout.columns(summary)
        x = columns["x"]
        xs = [x[..., j * size : (j + 1) * size] for j in range(v)]
        return sqrt(columns["w"]) * (columns["y"] - evaluate(tree, params, xs, ops))

    def residuals(p: Any, summary: Any) -> Any:
        return weighted_residuals(
            [p[..., i : i + 1] for i in range(k)], summary, TENSORFLOW, tf.sqrt
        )

    def residuals_jacobian(p: Any, summary: Any) -> tuple[Any, Any]:
        r = weighted_residuals(
            Dual.parameters([p[..., i : i + 1] for i in range(k)]), summary, DUALS, tf.sqrt
        )
        if not isinstance(r, Dual):  # no parameter reaches the model
            return r, tf.zeros([*r.shape, k], r.dtype)
        return r.value, r.jacobian()

    def numpy_residuals(p: Sequence[Any], summary: Array) -> Any:  # numbers or jets
        return weighted_residuals(list(p), summary, JETS, np.sqrt)

    def loss(p: Any, summary: Any) -> Any:
        r = residuals(p, summary)
        return tf.reduce_sum(r * r, axis=-1) / layout.columns(summary)["total"]

    def moments(*data: Any) -> Array:
        *arrays, weights = data
        n = arrays[0].size
        padded = np.zeros(layout.size - 1 - 2 * k)
        for j, values in enumerate(arrays[:-1]):  # the variables, padded with the first point
            padded[j * size : j * size + n] = values
            padded[j * size + n : (j + 1) * size] = values[0]
        y0 = v * size
        padded[y0 : y0 + n] = arrays[-1]
        padded[y0 + size : y0 + size + n] = 1.0 if weights is None else weights
        return padded

    def complete(moments: Array, total: Array, options: Mapping[str, Any]) -> Array:
        """Append Σw and the bounds (±inf where a side is open)."""
        lower, upper = np.full(k, -np.inf), np.full(k, np.inf)
        for name, (low, high) in (options.get("bounds") or {}).items():
            i = expression.parameters.index(name)
            lower[i] = -np.inf if low is None else low
            upper[i] = np.inf if high is None else high
        return np.concatenate([moments, [total], lower, upper])

    def project(p: Any, summary: Any) -> Any:
        columns = layout.columns(summary)
        return tf.minimum(tf.maximum(p, columns["lower"]), columns["upper"])

    def start(summaries: Array, scaling: Scaling, seeds: Sequence[int | None]) -> Array:
        return np.zeros((len(summaries), k))  # expressions always come with a start

    def stats_rows(
        fits: Sequence[AtFit],
        summaries: Array,
        weights: Sequence[WeightSummary],
        options: Sequence[Mapping[str, Any]],
    ) -> list[FitStats]:
        params = np.array([fit.params for fit in fits])
        jacobians = jacobian_rows(numpy_residuals, params, summaries)
        exact = [given.get("exact") for given in options]
        known = np.array([bool(given.get("absolute_sigma")) for given in options])
        return stats_of_rows(
            expression, layout, size, fits, summaries, weights, exact, jacobians, known
        )

    def stats(
        fit: AtFit, summary: Array, weights: WeightSummary, options: Mapping[str, Any]
    ) -> FitStats:
        return stats_rows([fit], summary[None], [weights], [options])[0]

    return ModelSpec(
        name=_key(expression, size),
        params=expression.parameters,
        data=(*expression.variables, "y"),
        summary=layout,
        moments=moments,
        moments_graph=None,
        moments_of_sets=_no_batches,
        complete=complete,
        loss=loss,
        spread="total",
        constant="the weights sum to zero",
        standardize=_unscaled,
        start=start,
        random_start=False,
        stats=stats,
        stats_of_rows=stats_rows,
        dummy=(0.0,) * (layout.size - 2 * k - 1) + (1.0,) + (-math.inf,) * k + (math.inf,) * k,
        dummy_start=(0.0,) * k,
        residuals=residuals,
        residuals_jacobian=residuals_jacobian,
        project=project,
        numpy_residuals=numpy_residuals,
        options={"bounds": None, "exact": None, "absolute_sigma": False},
        finite_fields=layout.size - 2 * k,
        xla=xla,
    )


def _unscaled(summary: Array) -> tuple[Array, Coordinates]:
    """Expressions fit in the caller's units (Levenberg-Marquardt scales itself)."""
    return summary, IDENTITY


def _no_batches(*data: Any) -> Array:
    raise ValueError("expressions are fitted one data set at a time")


def stats_of_rows(
    expression: Expression,
    layout: Layout,
    size: int,
    fits: Sequence[AtFit],
    summaries: Array,
    weights: Sequence[WeightSummary],
    exact: Sequence[Exact | None],
    jacobians: Array,
    known_sigma: npt.NDArray[np.bool_] | None = None,
) -> list[FitStats]:
    """The statistics of B fits of one spec at once ([B, S] summaries, [B, size, k]
    Jacobians at the fits), each as its single fit reports them, in NIST's convention.
    ``exact``: per fit, the variables and y read from the request's decimal text in
    extended precision, or a callable reading them, or None: float64 data round each
    value by up to 1.1e-16 relatively, and on a fit as close as Lanczos1's that alone moves
    the residual sum of squares in its third digit. Decimals given are used; a callable is
    called only for the rows where that rounding could move a sum of squares by more than
    ``EXACT_RTOL`` (a batch's decimals are read after its fits, and mostly not at all)."""
    names = expression.parameters
    k, v, rows = len(names), len(expression.variables), len(fits)
    columns = layout.columns(summaries)
    x = np.asarray(columns["x"], dtype=np.longdouble).reshape(rows, v, size)
    y = np.asarray(columns["y"], dtype=np.longdouble)
    w = np.asarray(columns["w"], dtype=np.longdouble)
    at = np.array([fit.params for fit in fits], dtype=np.longdouble).reshape(rows, k)
    params = [at[:, j : j + 1] for j in range(k)]
    used = np.array([ws.count for ws in weights])
    dof = used - k

    def sums(x: Any, y: Any) -> tuple[Any, Any, Any]:
        """The model at x, the rss and the total sum of squares (extended precision)."""
        predicted = evaluate(expression.tree, params, [x[:, j] for j in range(v)], LONG)
        r = np.sqrt(w) * (y - predicted)  # 0 at the weight-0 padding
        mean = np.sum(w * y, axis=-1) / np.sum(w, axis=-1)
        return predicted, np.sum(r * r, axis=-1), np.sum(w * (y - mean[:, None]) ** 2, axis=-1)

    def read(indices: Sequence[int]) -> None:
        """The decimals of these rows in place of their float64 data."""
        for i in indices:
            given = exact[i]
            values = given() if callable(given) else given
            assert values is not None
            n = weights[i].points
            x[i, :, :n] = np.array(values[:-1], dtype=np.longdouble).reshape(v, n)
            y[i, :n] = np.asarray(values[-1], dtype=np.longdouble)

    with np.errstate(all="ignore"):
        # Decimals given are used; those still to be read, only for the rows where float64's
        # rounding of the data could move the sums.
        read([i for i, given in enumerate(exact) if given is not None and not callable(given)])
        predicted, rss_long, tss_long = sums(x, y)
        if lazy := [i for i, given in enumerate(exact) if callable(given)]:
            moved = _rounding_moves(expression, params, x, y, w, predicted, rss_long, tss_long)
            if wanted := [i for i in lazy if moved[i]]:
                read(wanted)
                _, rss_long, tss_long = sums(x, y)
        tss = tss_long.astype(np.float64)
        sigma2 = np.where(dof > 0, (rss_long / np.maximum(dof, 1)).astype(np.float64), np.nan)
    rss = rss_long.astype(np.float64)
    # s²·(JᵀWJ)⁻¹, or (JᵀWJ)⁻¹ where the weights are 1/sigma² of the true sigma (absolute_sigma).
    scale = sigma2 if known_sigma is None else np.where(known_sigma, 1.0, sigma2)
    covariance, usable = _covariances(jacobians, scale)
    # Every row's numbers as arrays at once, then as lists (non-finite values None).
    with np.errstate(all="ignore"):
        se = np.sqrt(np.diagonal(covariance, axis1=1, axis2=2))
        corr = covariance / (se[:, :, None] * se[:, None, :])
        corr[:, np.arange(k), np.arange(k)] = 1.0
        count = used.astype(np.float64)
        fitted = (rss > 0.0) & np.isfinite(rss)
        loglik = np.where(
            fitted,
            -0.5 * count * (LOG_2PI + np.log(rss / count) + 1.0)
            + 0.5 * np.array([ws.log_sum for ws in weights]),
            np.nan,
        )
        r_squared = np.where(tss > 0.0, 1.0 - rss / tss, np.nan)
        residual_std = np.where((dof > 0) & (sigma2 >= 0.0), np.sqrt(sigma2), np.nan)
    unusable = ~usable[:, None]
    se_rows = _listed(np.where(unusable, np.nan, se))
    cov_rows = _listed(np.where(unusable[:, :, None], np.nan, covariance))
    corr_rows = _listed(np.where(unusable[:, :, None], np.nan, corr))
    logliks, r2s, stds, rsses = (
        _listed(values) for values in (loglik, r_squared, residual_std, rss)
    )
    out = []
    for i, fit in enumerate(fits):
        ws, rss_i, count_i, ll = weights[i], float(rss[i]), int(used[i]), logliks[i]
        step = fit.point.newton_vector()
        out.append(
            FitStats(
                names=names,
                n=ws.points,
                n_used=count_i,
                dof=int(dof[i]),
                loss=rss_i / ws.total,
                gradient_norm=_finite(fit.point.gradient_norm),
                newton_step=None if step is None else _finite(float(np.linalg.norm(step))),
                std_errors=tuple(se_rows[i]),
                covariance=tuple(map(tuple, cov_rows[i])),
                correlation=tuple(map(tuple, corr_rows[i])),
                log_likelihood=ll,
                aic=None if ll is None else 2.0 * k - 2.0 * ll,
                bic=None if ll is None else k * math.log(count_i) - 2.0 * ll,
                closed_form=None,
                closed_form_loss=None,
                gap=None,
                r_squared=r2s[i],
                residual_std=stds[i],
                rss=rsses[i],
            )
        )
    return out


#: A set's statistics are computed from its decimal text (``exact``) where float64's rounding
#: of its data could move its residual or total sum of squares by more than this,
#: relatively: a fit as close as NIST's Lanczos1 (moved in its third digit), or one on a
#: background of 1e7 with a noise of 0.1 (~1e-8); not noisy data at its own scale (~1e-13).
EXACT_RTOL = 1e-12
#: float64's unit roundoff: a decimal is read within this of its value, relatively.
ROUNDOFF = 2.0**-53


def _rounding_moves(
    expression: Expression,
    params: list[Any],
    x: Any,
    y: Any,
    w: Any,
    predicted: Any,
    rss: Any,
    tss: Any,
) -> npt.NDArray[np.bool_]:
    """Whether each row's sums of squares could move by more than ``EXACT_RTOL`` of
    themselves between its float64 data and the decimals they were read from: a first-order
    bound (each y within ``ROUNDOFF``·|y|; each variable's rounding through the model,
    evaluated by moving it by as much, in extended precision where that move is exact)."""
    v = len(expression.variables)
    shift = ROUNDOFF * np.abs(y)
    for j in range(v):
        moved = x.copy()
        moved[:, j] = x[:, j] * (1 + np.longdouble(ROUNDOFF))
        at = evaluate(expression.tree, params, [moved[:, i] for i in range(v)], LONG)
        shift = shift + np.abs(at - predicted)
    root = np.sqrt(w)
    r = root * (y - predicted)
    rss_bound = np.sum(2.0 * np.abs(r) * root * shift + w * shift * shift, axis=-1)
    mean = np.sum(w * y, axis=-1) / np.sum(w, axis=-1)
    y_shift = ROUNDOFF * np.abs(y)
    tss_bound = np.sum(w * (2.0 * np.abs(y - mean[:, None]) * y_shift + y_shift**2), axis=-1)
    within = (rss_bound <= EXACT_RTOL * rss) & (tss_bound <= EXACT_RTOL * tss)
    return np.asarray(~within)


def _covariances(jacobians: Array, sigma2: Array) -> tuple[Array, npt.NDArray[np.bool_]]:
    """s²·(JᵀJ)⁻¹ of each row through J = QR, so (JᵀJ)⁻¹ = R⁻¹R⁻ᵀ (the weight-0 padding's
    zero rows change nothing), and which rows have one: not where J is rank-deficient or s²
    is undefined (their rows hold NaN)."""
    rows, k = jacobians.shape[0], jacobians.shape[-1]
    usable = np.isfinite(sigma2) & np.all(np.isfinite(jacobians), axis=(1, 2))
    covariance = np.full((rows, k, k), np.nan)
    if k == 0 or not usable.any():
        return covariance, usable & (k > 0)
    _, upper = np.linalg.qr(np.where(usable[:, None, None], jacobians, 0.0))
    diagonal = np.abs(np.diagonal(upper, axis1=1, axis2=2))
    usable &= diagonal.min(axis=1) > 1e-14 * diagonal.max(axis=1)
    eye = np.broadcast_to(np.eye(k), upper.shape)
    safe = np.where(usable[:, None, None], upper, eye)
    inverse = np.linalg.solve(safe, eye)
    with np.errstate(all="ignore"):
        product = sigma2[:, None, None] * (inverse @ np.swapaxes(inverse, 1, 2))
    covariance[usable] = product[usable]
    return covariance, usable


def _listed(values: Array) -> Any:
    """``values.tolist()`` with every non-finite number None (what the answers say)."""
    listed = values.astype(object)
    listed[~np.isfinite(values)] = None
    return listed.tolist()


def _finite(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


class ExpressionModels:
    """The specs of recent expressions: at most ``size``, and within ``max_bytes`` of
    compiled memory (estimated by :class:`CompileCost`), the least recently used going
    first; ``on_evict(name)`` is told of each spec dropped, so its compiled loops go too.

    XLA keeps what it compiles for the life of the process, so an XLA-compiled spec's memory
    stays counted after it is dropped (:attr:`xla_bytes`); new specs are XLA-compiled while
    that stays within half of ``max_bytes``, and are plain graphs after (slower per
    iteration, and given back when dropped). :attr:`bytes` is what compiled expressions
    hold: at most ``max_bytes``, but for the newest spec alone if that is larger."""

    def __init__(
        self,
        on_evict: Callable[[str], None],
        size: int = CACHE_SIZE,
        max_bytes: float = CACHE_BYTES,
    ) -> None:
        self._specs: OrderedDict[str, ModelSpec] = OrderedDict()
        self._kept: dict[str, float] = {}  # plain-graph specs' memory, while cached
        self._lock = threading.Lock()
        self._on_evict = on_evict
        self._size = size
        self.max_bytes = max_bytes
        #: Estimated memory kept by every XLA-compiled spec made so far.
        self.xla_bytes = 0.0

    @property
    def bytes(self) -> float:
        return self.xla_bytes + sum(self._kept.values())

    def peek(self, expression: Expression, n: int) -> ModelSpec | None:
        """The cached spec for ``n`` points, or None; changes nothing (an admission check
        that may end in a refusal must neither add a spec nor evict one)."""
        with self._lock:
            return self._specs.get(_key(expression, bucket(n)))

    def spec(self, expression: Expression, n: int) -> ModelSpec:
        """The spec for ``n`` points (made on first use, evicting the least recent). Its
        names are positional (:func:`positional`): one spec serves every caller who writes
        the same model under other names."""
        size = bucket(n)
        key = _key(expression, size)
        with self._lock:
            spec = self._specs.get(key)
            if spec is not None:
                self._specs.move_to_end(key)
                return spec
            xla, kept, evicted = self._plan(expression, size)
            spec = expression_spec(positional(expression), size, xla=xla)
            if xla:
                self.xla_bytes += kept
            else:
                self._kept[key] = kept
            self._specs[key] = spec
            for name in evicted:
                del self._specs[name]
                self._kept.pop(name, None)
        for name in evicted:
            self._on_evict(name)
        return spec

    def transient(self, expression: Expression, n: int) -> ModelSpec:
        """The cached spec for ``n`` points, or else one made for one call and not kept: it
        is not cached and charges nothing (what the numpy loop fits with, compiling
        nothing; a new spec in the cache would count as compiled memory)."""
        size = bucket(n)
        with self._lock:
            spec = self._specs.get(_key(expression, size))
        return spec or expression_spec(positional(expression), size, xla=False)

    def freed_by(self, expression: Expression, n: int, busy: Collection[str] = ()) -> float:
        """Memory that adding the spec for ``n`` points would give back: the plain graphs
        it would evict (a compile's charge is its peak less this; changes nothing), except
        those ``busy`` (still compiling: evicted, they are not given back until done)."""
        with self._lock:
            if _key(expression, bucket(n)) in self._specs:
                return 0.0
            evicted = self._plan(expression, bucket(n))[2]
            return sum(self._kept.get(name, 0.0) for name in evicted if name not in busy)

    def _plan(self, expression: Expression, size: int) -> tuple[bool, float, list[str]]:
        """For a new spec (under the lock): whether it is XLA-compiled, what it keeps, and
        the specs it evicts (the least recent first) to stay within the size and bytes."""
        xla_kept = CompileCost.kept_bytes(expression, size, xla=True)
        xla = self.xla_bytes + xla_kept <= self.max_bytes / 2
        kept = xla_kept if xla else CompileCost.kept_bytes(expression, size, xla=False)
        count = len(self._specs) + 1
        total = self.bytes + (0.0 if xla else kept)
        evicted: list[str] = []
        for name in self._specs:  # the least recent first; the new spec always stays
            if count <= self._size and total <= self.max_bytes:
                break
            evicted.append(name)
            count -= 1
            total -= self._kept.get(name, 0.0)
        return xla, kept, evicted


def compile_key(expression: Expression, n: int) -> str:
    """The spec ``n`` points of ``expression`` are fitted with: one compile per key."""
    return _key(expression, bucket(n))


def _key(expression: Expression, size: int) -> str:
    """A cached spec's key, and its name (as :func:`expression_spec` names it)."""
    return f"expression[{len(expression.variables)},{size}]:{expression.canonical}"
