"""The compiled engine against the seed's eager loop and closed forms."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import tensorflow as tf

from service.fitting import (
    DegenerateData,
    FitCancelled,
    FitDiverged,
    FitEngine,
    FitResult,
    Reduction,
    StopReason,
)
from service.fitting.batch import BatchEngine, Ragged
from service.fitting.loop import _direct_call, _eager_vector, _fast_call
from service.fitting.models.gaussian import moments_graph as gaussian_summary
from service.fitting.models.linear import moments_graph as linear_summary
from service.fitting.options import Optimizer, Stopping
from tests.conftest import seed_gaussian_data, seed_linear_data
from tests.optimum import assert_same_optimum, resolution_se
from tests.reference import (
    gaussian_closed_form,
    linear_closed_form,
    reference_gaussian,
    reference_linear,
)

# float32 (the seed's dtype) against our float64 loop.
RTOL = 2e-5


@pytest.mark.parametrize("data_seed", [0, 1, 2])
def test_linear_matches_seed_loop_with_seed_hyperparameters(
    engine: FitEngine, data_seed: int
) -> None:
    x, y = seed_linear_data(data_seed)
    m0 = 0.05 * np.random.default_rng(100 + data_seed).standard_normal()
    m, b, history = reference_linear(x, y, learning_rate=0.05, epochs=30, initial=(m0, 0.0))

    result = engine.fit(
        "linear", x, y, learning_rate=0.05, epochs=30, initial=(m0, 0.0), scaling="none"
    )

    assert result.epochs_run == 30
    assert len(result.loss_history) == 30
    np.testing.assert_allclose(result.loss_history, history, rtol=RTOL)
    assert result.params["slope"] == pytest.approx(m, rel=RTOL, abs=1e-6)
    assert result.params["intercept"] == pytest.approx(b, rel=RTOL, abs=1e-6)
    # The seed's initial MSE is ~6.3 and its 30 epochs end near m=1.05, b=1.91.
    assert 4.0 < result.loss_history[0] < 9.0
    assert abs(result.params["slope"] - 1.0) < 0.2
    assert abs(result.params["intercept"] - 2.0) < 0.2


@pytest.mark.parametrize("data_seed", [0, 1, 2])
def test_gaussian_matches_seed_loop_with_seed_hyperparameters(
    engine: FitEngine, data_seed: int
) -> None:
    y = seed_gaussian_data(data_seed)
    m, s, history = reference_gaussian(y, learning_rate=0.0005, epochs=50)

    result = engine.fit(
        "gaussian", y, learning_rate=0.0005, epochs=50, options={"reduction": "sum"}, scaling="none"
    )

    np.testing.assert_allclose(result.loss_history, history, rtol=RTOL)
    assert result.params["mean"] == pytest.approx(m, rel=RTOL)
    assert result.params["std"] == pytest.approx(s, rel=RTOL)
    # The seed reports m = 2.02, s = 1.02 for its draw of N(2, 1).
    assert abs(result.params["mean"] - 2.0) < 0.1
    assert abs(result.params["std"] - 1.0) < 0.1


def test_final_loss_is_loss_at_returned_parameters(engine: FitEngine) -> None:
    x, y = seed_linear_data(3)
    result = engine.fit("linear", x, y, learning_rate=0.1, epochs=200, initial=(0.0, 0.0))
    slope, intercept = result.params["slope"], result.params["intercept"]
    assert result.final_loss == pytest.approx(np.mean((slope * x + intercept - y) ** 2), rel=1e-10)
    assert result.final_loss <= result.loss_history[-1]

    yg = seed_gaussian_data(3)
    g = engine.fit("gaussian", yg, learning_rate=0.1, epochs=200)
    mean, std = g.params["mean"], g.params["std"]
    expected = 0.5 * np.log(2 * np.pi * std**2) + np.mean((yg - mean) ** 2) / (2 * std**2)
    assert g.final_loss == pytest.approx(expected, rel=1e-10)


def test_mean_reduction_is_sum_divided_by_n(engine: FitEngine) -> None:
    y = seed_gaussian_data(4, n=500)
    total = engine.fit("gaussian", y, learning_rate=0.0001, epochs=20, options={"reduction": "sum"})
    mean = engine.fit(
        "gaussian", y, learning_rate=0.0001 * 500, epochs=20, options={"reduction": "mean"}
    )
    np.testing.assert_allclose(total.loss_history / 500, mean.loss_history, rtol=1e-10)


@pytest.mark.parametrize("data_seed", [0, 5])
def test_converges_to_closed_form(engine: FitEngine, data_seed: int) -> None:
    x, y = seed_linear_data(data_seed)
    slope, intercept = linear_closed_form(x, y)
    fit = engine.fit("linear", x, y, learning_rate=0.1, epochs=1000, seed=data_seed)
    assert fit.params["slope"] == pytest.approx(slope, abs=1e-3)
    assert fit.params["intercept"] == pytest.approx(intercept, abs=1e-3)

    yg = seed_gaussian_data(data_seed)
    mean, std = gaussian_closed_form(yg)
    g = engine.fit("gaussian", yg, learning_rate=0.1, epochs=1000)
    assert g.params["mean"] == pytest.approx(mean, abs=1e-6)
    assert g.params["std"] == pytest.approx(std, abs=1e-6)


def test_one_trace_serves_every_n_epochs_and_learning_rate(engine: FitEngine) -> None:
    engine.warm_up()
    before = engine.trace_counts()
    rng = np.random.default_rng(9)
    for n, epochs, lr in [(2, 1, 0.5), (37, 10, 0.01), (5000, 300, 0.2), (100, 9000, 0.05)]:
        x = rng.random(n)
        engine.fit("linear", x, 3 * x - 1 + rng.normal(0, 0.1, n), learning_rate=lr, epochs=epochs)
        engine.fit(
            "gaussian",
            rng.normal(0, 2, n),
            learning_rate=lr / n,
            epochs=epochs,
            options={"reduction": "sum"},
        )
    assert engine.trace_counts() == before
    built_in = {name: count for name, count in before.items() if not name.startswith("expr")}
    assert set(built_in.values()) == {1}  # (an expression's loops trace on first use)
    # No recompilation either: XLA compiles per input shape, and the loops' shapes are fixed.
    assert all(spec.shape.is_fully_defined() for spec in engine.xla_input_signatures())


def test_batch_loops_compile_once_per_size_bucket() -> None:
    batch = BatchEngine()
    rng = np.random.default_rng(13)
    for sets in (3, 5, 8, 2, 9, 16):
        data = [rng.random(int(n)) for n in rng.integers(2, 40, sets)]
        y = Ragged.of([2 * d + 1 for d in data])
        batch.fit("linear", Ragged.of(data), y, learning_rate=0.1, epochs=int(sets) * 7, seed=1)
        batch.fit("gaussian", y, learning_rate=0.05, epochs=20)
    assert batch.compiled_buckets() == [
        ("gaussian", 8),
        ("gaussian", 16),
        ("linear", 8),
        ("linear", 16),
    ]


def test_chunked_loop_equals_one_call() -> None:
    """Chunks of 7 epochs carry the whole state: the same bits as one call, in both scalings;
    and the raw loop still follows the reference post's."""
    x, y = seed_linear_data(6)
    small, whole = FitEngine(epochs_per_call=7), FitEngine(epochs_per_call=4096)
    for scaling in ("none", "standardize"):
        options: dict[str, Any] = {
            "learning_rate": 0.1,
            "epochs": 50,
            "initial": (0.3, -0.2),
            "scaling": scaling,
        }
        chunked, one = small.fit("linear", x, y, **options), whole.fit("linear", x, y, **options)
        assert chunked.epochs_run == one.epochs_run == 50
        np.testing.assert_array_equal(chunked.loss_history, one.loss_history)
        assert chunked.params == one.params
    reference = reference_linear(x, y, learning_rate=0.1, epochs=50, initial=(0.3, -0.2))
    chunked = small.fit(
        "linear", x, y, learning_rate=0.1, epochs=50, initial=(0.3, -0.2), scaling="none"
    )
    np.testing.assert_allclose(chunked.loss_history, reference[2], rtol=RTOL)  # float32 there


def test_divergence_is_reported_with_epoch_and_advice(engine: FitEngine) -> None:
    x, y = seed_linear_data(0)
    with pytest.raises(FitDiverged) as info:
        engine.fit("linear", x, y, learning_rate=100.0, epochs=1000, seed=1)
    assert 1 <= info.value.epoch <= 1000
    message = str(info.value)
    assert "diverged" in message
    assert f"epoch {info.value.epoch}" in message
    assert "lower learning_rate" in message


def test_gaussian_std_is_positive_even_from_a_negative_start(engine: FitEngine) -> None:
    y = seed_gaussian_data(7)
    fit = engine.fit("gaussian", y, learning_rate=0.1, epochs=1000, initial=(0.0, -3.0))
    assert fit.params["std"] > 0
    assert fit.params["std"] == pytest.approx(float(np.std(y)), abs=1e-6)


def test_degenerate_data_is_refused(engine: FitEngine) -> None:
    with pytest.raises(DegenerateData, match="x"):
        engine.fit("linear", [1.0, 1.0, 1.0], [1.0, 2.0, 3.0], learning_rate=0.1, epochs=5)
    with pytest.raises(DegenerateData, match="y"):
        engine.fit("gaussian", [2.0, 2.0], learning_rate=0.1, epochs=5)


def test_seed_makes_random_start_reproducible(engine: FitEngine) -> None:
    x, y = seed_linear_data(8)
    a = engine.fit("linear", x, y, learning_rate=0.05, epochs=30, seed=123)
    b = engine.fit("linear", x, y, learning_rate=0.05, epochs=30, seed=123)
    c = engine.fit("linear", x, y, learning_rate=0.05, epochs=30, seed=124)
    assert a.params == b.params
    np.testing.assert_array_equal(a.loss_history, b.loss_history)
    assert a.loss_history[0] != c.loss_history[0]
    unseeded = engine.fit("linear", x, y, learning_rate=0.05, epochs=30)
    assert unseeded.seed is not None
    replay = engine.fit("linear", x, y, learning_rate=0.05, epochs=30, seed=unseeded.seed)
    np.testing.assert_array_equal(unseeded.loss_history, replay.loss_history)


def test_stop_check_times_out_between_chunks() -> None:
    small = FitEngine(epochs_per_call=10)
    calls = []

    def stop_after_three_chunks() -> StopReason | None:
        calls.append(1)
        return "timeout" if len(calls) >= 3 else None

    x, y = seed_linear_data(0)
    fit = small.fit(
        "linear", x, y, learning_rate=0.1, epochs=1000, seed=0, should_stop=stop_after_three_chunks
    )
    assert fit.stop_reason == "timeout"
    assert fit.epochs_run == 30
    assert len(fit.loss_history) == 30


def test_stop_check_can_cancel() -> None:
    small = FitEngine(epochs_per_call=5)

    def cancel() -> None:
        raise FitCancelled

    yg = seed_gaussian_data(0)
    with pytest.raises(FitCancelled):
        small.fit("gaussian", yg, learning_rate=0.1, epochs=100, should_stop=cancel)


def test_summaries_survive_large_offsets() -> None:
    rng = np.random.default_rng(11)
    x = 1e7 + rng.random(10_000)
    y = -3e6 + 0.5 * x + rng.normal(0, 0.01, 10_000)
    s = linear_summary(_vector(x), _vector(y)).numpy()
    dx, dy = x - x.mean(), y - y.mean()
    np.testing.assert_allclose(
        s[3:], [np.mean(dx * dx), np.mean(dx * dy), np.mean(dy * dy)], rtol=1e-9
    )
    g = gaussian_summary(_vector(y)).numpy()
    assert g[2] == pytest.approx(np.var(y), rel=1e-9)


def test_gaussian_overshoot_that_stays_finite_is_divergence(engine: FitEngine) -> None:
    y = seed_gaussian_data(0)
    with pytest.raises(FitDiverged, match="rose above its starting value") as info:
        engine.fit("gaussian", y, learning_rate=50.0, epochs=1000)
    assert info.value.epoch == 2  # the first update already overshot


def test_data_whose_moments_overflow_are_refused(engine: FitEngine) -> None:
    huge = [-1.7976931348623157e308, 1.0, 1e300]
    with pytest.raises(DegenerateData, match="overflows"):
        engine.fit("gaussian", huge, learning_rate=0.1, epochs=5)
    with pytest.raises(DegenerateData, match="overflows"):
        engine.fit("linear", huge, [1.0, 2.0, 3.0], learning_rate=0.1, epochs=5)


@pytest.mark.parametrize("n", [50, 5000])
def test_numpy_and_graph_summaries_give_the_same_fit(n: int) -> None:
    """Small data take numpy moments, large data the compiled start function: same answer."""
    x, y = seed_linear_data(12, n=n)
    graph = FitEngine(graph_min_points=1)
    eager_moments = FitEngine(graph_min_points=10**9)
    a = graph.fit("linear", x, y, learning_rate=0.1, epochs=300, seed=3)
    b = eager_moments.fit("linear", x, y, learning_rate=0.1, epochs=300, seed=3)
    np.testing.assert_allclose(a.loss_history, b.loss_history, rtol=1e-12)
    assert a.params == pytest.approx(b.params, rel=1e-12)
    cases: list[tuple[Reduction, float]] = [("sum", 0.1 / n), ("mean", 0.1)]
    for reduction, lr in cases:
        for initial in (None, (1.0, 2.0)):
            g = graph.fit(
                "gaussian",
                y,
                learning_rate=lr,
                epochs=40,
                options={"reduction": reduction},
                initial=initial,
            )
            h = eager_moments.fit(
                "gaussian",
                y,
                learning_rate=lr,
                epochs=40,
                options={"reduction": reduction},
                initial=initial,
            )
            np.testing.assert_allclose(g.loss_history, h.loss_history, rtol=1e-12)
            assert g.params == pytest.approx(h.params, rel=1e-12)


def test_the_fast_call_still_has_its_private_entry_points() -> None:
    """The engine calls compiled loops by TensorFlow's ``execute.quick_execute`` with the
    function's name, below ``ConcreteFunction._call_flat`` (both private; the public call
    costs ~0.3 ms, more than a small fit, and ``_call_flat`` ~33 µs more than the direct
    execute). If a TensorFlow upgrade removes either, the engine still works, slower, and
    this test says so. The direct call answers as the public one."""
    function = tf.function(
        lambda v: v * 2.0, input_signature=[tf.TensorSpec([2], tf.float64)], jit_compile=True
    )
    concrete = function.get_concrete_function()
    call = _fast_call(function)
    assert call is not concrete, "TensorFlow lost _call_flat"
    assert _direct_call(concrete) is not None, "TensorFlow lost execute.quick_execute"
    assert getattr(call, "__qualname__", "").startswith("_direct_call"), "not the direct call"
    values = tf.constant([1.0, 2.5], tf.float64)
    assert call(values).numpy().tolist() == concrete(values).numpy().tolist() == [2.0, 5.0]


def test_the_direct_call_passes_captured_tensors() -> None:
    """A function that captures a tensor gets it after the caller's arguments."""
    offset = tf.constant([10.0, 20.0], tf.float64)
    function = tf.function(
        lambda v: v + offset, input_signature=[tf.TensorSpec([2], tf.float64)], jit_compile=True
    )
    call = _direct_call(function.get_concrete_function())
    assert call is not None
    assert call(tf.constant([1.0, 2.0], tf.float64)).numpy().tolist() == [11.0, 22.0]


def test_the_direct_call_answers_real_fits_as_call_flat(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fits far from unit scale (x in the thousands, a Gaussian of mean 1e7 and spread 0.1),
    standardized and raw, with the optimizers and stopping that have loops of their own:
    an engine calling through ``execute.quick_execute`` and one through ``_call_flat`` give
    the same bytes."""
    rng = np.random.default_rng(11)
    x = 1000.0 + 100.0 * rng.random(200)
    y = 3.0 * x - 50.0 + rng.normal(0.0, 1.0, 200)
    g = rng.normal(1e7, 0.1, 200)
    runs: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = [
        ("linear", (x, y), {"seed": 3}),
        ("linear", (x, y), {"seed": 3, "scaling": "none", "learning_rate": 1e-7}),
        ("linear", (x, y), {"seed": 3, "optimizer": Optimizer("adam")}),
        ("gaussian", (g,), {"stopping": Stopping(tolerance=1e-12)}),
        ("gaussian", (g,), {"optimizer": Optimizer("momentum")}),
    ]

    def fits() -> list[FitResult]:
        engine = FitEngine()  # its callers are made on first use, after the patch below
        return [
            engine.fit(model, *data, **{"learning_rate": 0.01, "epochs": 500, **options})
            for model, data, options in runs
        ]

    direct = fits()
    monkeypatch.setattr("service.fitting.loop._direct_call", lambda concrete: None)
    flat = fits()
    for a, b in zip(direct, flat, strict=True):
        assert a.params == b.params and a.final_loss == b.final_loss
        assert a.loss_history.tobytes() == b.loss_history.tobytes()
        assert a.stats == b.stats


def test_the_fast_tensor_still_has_its_private_constructor() -> None:
    """The engine makes its input tensors with ``EagerTensor`` (private; ``tf.constant``
    costs ~45 µs a fit more). If a TensorFlow upgrade removes it, the engine still works,
    slower, and this test says so. The tensor is the one ``tf.constant`` makes."""
    make = _eager_vector()
    assert make is not tf.constant, "TensorFlow lost EagerTensor"
    values = np.array([1.0, -2.5, 1e300, 5e-324])
    made, reference = make(values), tf.constant(values)
    assert made.dtype == reference.dtype == tf.float64
    assert made.device == reference.device
    assert made.numpy().tobytes() == values.tobytes()
    for _ in range(20):  # never the caller's memory (shared when aligned), which it may reuse
        made = make(values)
        values[0] += 1.0
        assert made.numpy()[0] == values[0] - 1.0


def _vector(values: Any) -> Any:
    """A float64 tensor of shape [n], as the engine's summaries take."""
    return tf.convert_to_tensor(np.asarray(values, dtype=np.float64).reshape(-1))


def test_a_compiled_caller_outlives_the_eviction_of_its_expression() -> None:
    """What a fit under way holds (its loop's caller) keeps working when another fit's new
    spec evicts its expression (a cache of one): dropping the last reference to a
    TensorFlow function unregisters it, and a call by its name then failed (NotFoundError),
    seen once compiles ran behind first fits while evictions happened."""
    import gc

    from service.fitting.expression import parse
    from service.fitting.loop import Controls, _Chunk, initial_state, loop_controls

    engine = FitEngine(expression_cache_size=1)
    x = np.linspace(1e3, 5e3, 40)
    y = 2.0 * np.exp(-x / 2e3) + 1e7
    lm = Optimizer("levenberg_marquardt")

    def fit(text: str) -> Any:
        return engine.fit(
            "expression",
            x,
            y,
            learning_rate=1.0,
            epochs=200,
            initial=[1.0, 1e3, 9e6],
            options={"expression": parse(text, ("x",), ("a", "k", "c"))},
            optimizer=lm,
            scaling="none",
        )

    first = parse("a*exp(-x/k) + c", ("x",), ("a", "k", "c"))
    expected = fit("a*exp(-x/k) + c")
    spec = engine.expressions.peek(first, x.size)
    assert spec is not None
    caller = engine._loop(spec, ("levenberg_marquardt", False))
    summary = spec.complete(spec.moments(x, y, None), np.asarray(float(x.size)), {"bounds": None})
    fit("a*exp(-x/k) + c + 0.5")  # a new spec: the first is evicted, its loops dropped
    assert engine.expressions.peek(first, x.size) is None
    del spec
    gc.collect()
    controls = np.array(loop_controls(1.0, 200, lm, Stopping()))
    assert controls.size == len(Controls._fields)
    start = initial_state((1.0, 1e3, 9e6))
    chunk = _Chunk(caller(tf.constant(np.concatenate([summary, start, controls]))), 3)
    assert chunk.params.tolist() == pytest.approx(
        [expected.params[name] for name in ("a", "k", "c")], rel=1e-9
    )


def test_an_expression_evicted_while_its_loop_traces_is_not_left_compiled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another fit's new spec evicts an expression while its loop is being traced (a
    compile behind a first fit, on its own thread): the finished caller serves the fit
    that traced it but is not kept, so the model reads as not compiled, and its next
    first fit answers from the numpy loop. (A kept caller said "compiled" for a model
    whose loops were gone, and that fit failed with a KeyError: a 500 seen in CI.)"""
    from service.fitting import loop as loop_module
    from service.fitting.expression import parse

    engine = FitEngine(expression_cache_size=4)
    x, y = _decay()
    lm = Optimizer("levenberg_marquardt")
    expression = parse("a*exp(-x/k) + c", ("x",), ("a", "k", "c"))
    fast_call = loop_module._fast_call

    def evicting(fn: Any) -> Any:  # the trace ends after an eviction
        caller = fast_call(fn)
        spec = engine.expressions.peek(expression, x.size)
        assert spec is not None
        engine._forget(spec.name)
        return caller

    def fit(uncompiled: bool) -> Any:
        return engine.fit(
            "expression", x, y, learning_rate=1.0, epochs=200, initial=START,
            options={"expression": expression}, optimizer=lm, scaling="none",
            uncompiled=uncompiled,
        )  # fmt: skip

    with monkeypatch.context() as patched:
        patched.setattr(loop_module, "_fast_call", evicting)
        traced = fit(uncompiled=False)  # the fit that traced it is answered
    assert not engine.expression_compiled(expression, x.size, "levenberg_marquardt", False)
    first = fit(uncompiled=True)  # from the numpy loop: no KeyError
    assert first.converged and traced.converged and first.stats.rss is not None
    tolerance = resolution_se(y, first.stats.rss, first.stats.dof)
    assert_same_optimum(traced.params, first.params, first.stats.std_errors, tolerance)


def test_an_expression_evicted_after_its_fit_resolved_it_still_fits() -> None:
    """The eviction comes between a fit resolving its spec and taking its loop: the fit
    compiles a loop of its own (kept by no cache) and answers."""
    from service.fitting.expression import parse

    engine = FitEngine(expression_cache_size=4)
    x, y = _decay()
    expression = parse("a*exp(-x/k) + c", ("x",), ("a", "k", "c"))
    resolve = engine.resolve

    def resolved_then_evicted(*args: Any, **kwargs: Any) -> Any:
        spec, *rest = resolve(*args, **kwargs)
        engine._forget(spec.name)
        return (spec, *rest)

    engine.resolve = resolved_then_evicted  # type: ignore[method-assign]
    fit = engine.fit(
        "expression", x, y, learning_rate=1.0, epochs=200, initial=START,
        options={"expression": expression}, optimizer=Optimizer("levenberg_marquardt"),
        scaling="none",
    )  # fmt: skip
    assert fit.converged
    assert not engine.expression_compiled(expression, x.size, "levenberg_marquardt", False)


#: A decay in callers' units (t to 5e3 s on a background of 1e7, noise 0.1) and its start.
START = [10.0, 500.0, 9.9e6]


def _decay() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(21)
    x = np.sort(rng.uniform(0.0, 5e3, 60))
    return x, 1e7 + 40.0 * np.exp(-x / 1.3e3) + rng.normal(0.0, 0.1, x.size)
