"""Optimizers, early stopping, weights and history thinning of the compiled loop."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import tensorflow as tf

from service.fitting import DegenerateData, FitEngine
from service.fitting.options import NO_STOPPING, Optimizer, OptimizerName, Stopping
from tests.conftest import seed_gaussian_data, seed_linear_data
from tests.reference import (
    gaussian_closed_form,
    linear_closed_form,
    reference_gaussian,
    reference_linear,
)

#: The reference loop runs in float64 here, so only summation order differs.
RTOL = 1e-9


def _as_keras_stores(learning_rate: float) -> float:
    """Keras keeps its hyperparameters in float32 whatever the model's dtype."""
    return float(np.float32(learning_rate))


def _keras(name: OptimizerName, learning_rate: float) -> tf.keras.optimizers.Optimizer:
    if name == "momentum":
        return tf.keras.optimizers.SGD(learning_rate, momentum=0.9)
    return tf.keras.optimizers.Adam(learning_rate)


def _our(name: OptimizerName) -> Optimizer:
    f32 = _as_keras_stores
    return Optimizer(name, momentum=f32(0.9), beta_1=f32(0.9), beta_2=f32(0.999), epsilon=f32(1e-7))


#: Keras's Adam agrees to ~1e-5 only: it rounds some of its constants to float32 inside
#: (seen: its first step differs from the textbook formula by 7e-6 relative, in float64 too).
#: Adam is checked exactly against the textbook formula below.
KERAS_RTOL = {"momentum": RTOL, "adam": 1e-4}


@pytest.mark.parametrize("name", ["momentum", "adam"])
def test_linear_optimizers_match_keras(engine: FitEngine, name: OptimizerName) -> None:
    x, y = seed_linear_data(3)
    m, b, history = reference_linear(
        x, y, epochs=40, initial=(0.3, -0.2), optimizer=_keras(name, 0.05), dtype="float64"
    )

    result = engine.fit(
        "linear",
        x,
        y,
        learning_rate=_as_keras_stores(0.05),
        epochs=40,
        initial=(0.3, -0.2),
        optimizer=_our(name),
        scaling="none",  # the reference trajectory is in raw units
    )

    np.testing.assert_allclose(result.loss_history, history, rtol=KERAS_RTOL[name])
    assert result.params["slope"] == pytest.approx(m, rel=KERAS_RTOL[name])
    assert result.params["intercept"] == pytest.approx(b, rel=KERAS_RTOL[name])


@pytest.mark.parametrize("name", ["momentum", "adam"])
def test_gaussian_optimizers_match_keras(engine: FitEngine, name: OptimizerName) -> None:
    y = seed_gaussian_data(3, n=200)
    lr = 0.0005 if name == "momentum" else 0.05
    mean, std, history = reference_gaussian(
        y, epochs=40, initial=(1.0, 2.0), optimizer=_keras(name, lr), dtype="float64"
    )

    result = engine.fit(
        "gaussian",
        y,
        learning_rate=_as_keras_stores(lr),
        epochs=40,
        initial=(1.0, 2.0),
        options={"reduction": "sum"},
        optimizer=_our(name),
        scaling="none",
    )

    np.testing.assert_allclose(result.loss_history, history, rtol=KERAS_RTOL[name])
    assert result.params["mean"] == pytest.approx(mean, rel=KERAS_RTOL[name])
    assert result.params["std"] == pytest.approx(std, rel=KERAS_RTOL[name])


def test_adam_matches_the_textbook_formula(engine: FitEngine) -> None:
    """Kingma & Ba's Adam with bias correction folded into the step, in numpy."""
    x, y = seed_linear_data(3)
    lr, beta_1, beta_2, epsilon = 0.05, 0.8, 0.99, 1e-6
    p, m, v = np.array([0.3, -0.2]), np.zeros(2), np.zeros(2)
    losses = []
    for t in range(1, 41):
        r = p[0] * x + p[1] - y
        losses.append(np.mean(r * r))
        g = np.array([2.0 * np.mean(r * x), 2.0 * np.mean(r)])
        m = beta_1 * m + (1 - beta_1) * g
        v = beta_2 * v + (1 - beta_2) * g * g
        alpha = lr * np.sqrt(1 - beta_2**t) / (1 - beta_1**t)
        p = p - alpha * m / (np.sqrt(v) + epsilon)

    result = engine.fit(
        "linear",
        x,
        y,
        learning_rate=lr,
        epochs=40,
        initial=(0.3, -0.2),
        optimizer=Optimizer("adam", beta_1=beta_1, beta_2=beta_2, epsilon=epsilon),
        scaling="none",
    )

    np.testing.assert_allclose(result.loss_history, losses, rtol=RTOL)
    np.testing.assert_allclose([result.params["slope"], result.params["intercept"]], p, rtol=RTOL)


@pytest.mark.parametrize("name", ["sgd", "momentum", "adam"])
def test_every_optimizer_reaches_the_closed_form(engine: FitEngine, name: OptimizerName) -> None:
    x, y = seed_linear_data(5)
    lr = 0.01 if name == "adam" else 0.1
    result = engine.fit(
        "linear", x, y, learning_rate=lr, epochs=20_000, seed=1, optimizer=Optimizer(name)
    )
    slope, intercept = linear_closed_form(x, y)
    assert result.params["slope"] == pytest.approx(slope, abs=1e-4)
    assert result.params["intercept"] == pytest.approx(intercept, abs=1e-4)


def test_loss_tolerance_stops_early_and_says_so(engine: FitEngine) -> None:
    x, y = seed_linear_data(0)
    full = engine.fit("linear", x, y, learning_rate=0.1, epochs=5000, seed=1)
    result = engine.fit(
        "linear",
        x,
        y,
        learning_rate=0.1,
        epochs=5000,
        seed=1,
        stopping=Stopping(tolerance=1e-9, patience=5),
    )
    assert full.stop_reason == "max_epochs"
    assert full.converged
    assert result.stop_reason == "loss_tolerance"
    assert 10 < result.epochs_run < 5000
    assert len(result.loss_history) == result.epochs_run
    # The same trajectory, cut short where the rule holds: the last 5 losses evaluated (4 in
    # the history, then the final one, at which the fit stopped) did not improve on the best
    # before them by more than 1e-9 relative.
    np.testing.assert_array_equal(result.loss_history, full.loss_history[: result.epochs_run])
    best = float(np.min(result.loss_history[:-4]))
    for loss in [*result.loss_history[-4:], result.final_loss]:
        assert best - loss <= 1e-9 * max(abs(loss), 1.0)
        best = min(best, loss)
    earlier = full.loss_history[: result.epochs_run - 4]
    assert np.min(earlier[:-1]) - earlier[-1] > 1e-9 * abs(earlier[-1])  # stall began there
    assert result.params["slope"] == pytest.approx(linear_closed_form(x, y)[0], abs=1e-3)


def test_gradient_tolerance_stops_at_a_small_gradient(engine: FitEngine) -> None:
    y = seed_gaussian_data(1)
    result = engine.fit(
        "gaussian", y, learning_rate=0.1, epochs=50_000, stopping=Stopping(gradient_tolerance=1e-8)
    )
    assert result.stop_reason == "gradient_tolerance"
    assert result.epochs_run < 1000
    assert result.stats is not None and result.stats.gradient_norm is not None
    assert result.stats.gradient_norm <= 1e-8
    mean, std = gaussian_closed_form(y)
    assert result.params["mean"] == pytest.approx(mean, abs=1e-7)
    assert result.params["std"] == pytest.approx(std, abs=1e-7)


def test_early_stopping_carries_across_chunks() -> None:
    """With one epoch per compiled call, the best loss and the stall count cross chunks."""
    x, y = seed_linear_data(0)
    chunked = FitEngine(epochs_per_call=7)
    whole = FitEngine(epochs_per_call=4096)
    stopping = Stopping(tolerance=1e-9, patience=5)
    for optimizer in (Optimizer("sgd"), Optimizer("adam")):
        a = chunked.fit(
            "linear",
            x,
            y,
            learning_rate=0.05,
            epochs=3000,
            seed=2,
            stopping=stopping,
            optimizer=optimizer,
        )
        b = whole.fit(
            "linear",
            x,
            y,
            learning_rate=0.05,
            epochs=3000,
            seed=2,
            stopping=stopping,
            optimizer=optimizer,
        )
        assert a.epochs_run == b.epochs_run
        np.testing.assert_allclose(a.loss_history, b.loss_history, rtol=1e-13)
        assert a.params == pytest.approx(b.params, rel=1e-12)


def test_converged_is_false_for_a_short_fit(engine: FitEngine) -> None:
    x, y = seed_linear_data(0)
    result = engine.fit("linear", x, y, learning_rate=0.05, epochs=30, seed=1)
    assert result.stop_reason == "max_epochs"
    assert not result.converged
    long = engine.fit("linear", x, y, learning_rate=0.5, epochs=5000, seed=1)
    assert long.converged


def test_a_loss_tolerance_stall_far_from_the_optimum_is_not_converged(engine: FitEngine) -> None:
    """Adam with a large step oscillates; a short patience stops it mid-swing."""
    x, y = seed_linear_data(0)
    result = engine.fit(
        "linear",
        x,
        y,
        learning_rate=0.1,
        epochs=5000,
        seed=1,
        optimizer=Optimizer("adam"),
        stopping=Stopping(tolerance=1e-12, patience=20),
    )
    assert result.stop_reason == "loss_tolerance"  # the rule fired...
    assert not result.converged  # ...but the optimum is still far
    assert result.stats is not None and result.stats.newton_step is not None
    slope, intercept = linear_closed_form(x, y)
    distance = np.hypot(result.params["slope"] - slope, result.params["intercept"] - intercept)
    assert result.stats.newton_step == pytest.approx(distance, rel=1e-6)  # exact for the MSE


def test_zero_weights_drop_their_points(engine: FitEngine) -> None:
    x, y = seed_linear_data(2, n=60)
    weights = np.ones(60)
    weights[::3] = 0.0
    kept = weights > 0
    weighted = engine.fit("linear", x, y, learning_rate=0.5, epochs=3000, seed=1, weights=weights)
    dropped = engine.fit("linear", x[kept], y[kept], learning_rate=0.5, epochs=3000, seed=1)
    assert weighted.params == pytest.approx(dropped.params, rel=1e-10)
    np.testing.assert_allclose(weighted.loss_history, dropped.loss_history, rtol=1e-10)
    assert weighted.n == 60
    assert weighted.stats is not None and dropped.stats is not None
    assert weighted.stats.n_used == 40
    assert weighted.stats.std_errors == pytest.approx(dropped.stats.std_errors, rel=1e-8)


def test_integer_weights_repeat_points_in_the_gaussian_nll(engine: FitEngine) -> None:
    y = seed_gaussian_data(4, n=50)
    counts = np.arange(50) % 3 + 1
    weighted = engine.fit(
        "gaussian",
        y,
        learning_rate=0.0005,
        epochs=200,
        options={"reduction": "sum"},
        initial=(1.0, 1.5),
        weights=counts,
    )
    repeated = engine.fit(
        "gaussian",
        np.repeat(y, counts),
        learning_rate=0.0005,
        epochs=200,
        options={"reduction": "sum"},
        initial=(1.0, 1.5),
    )
    np.testing.assert_allclose(weighted.loss_history, repeated.loss_history, rtol=1e-10)
    assert weighted.params == pytest.approx(repeated.params, rel=1e-10)


def test_weights_apply_to_large_data_too(engine: FitEngine) -> None:
    x, y = seed_linear_data(6, n=engine.graph_min_points + 10)
    w = np.random.default_rng(0).random(x.size)
    result = engine.fit("linear", x, y, learning_rate=0.5, epochs=3000, seed=0, weights=w)
    xm, ym = np.average(x, weights=w), np.average(y, weights=w)
    slope = np.sum(w * (x - xm) * (y - ym)) / np.sum(w * (x - xm) ** 2)
    assert result.params["slope"] == pytest.approx(slope, abs=1e-6)


def test_unusable_weights_are_refused(engine: FitEngine) -> None:
    x, y = seed_linear_data(0, n=5)
    with pytest.raises(DegenerateData, match="positive weight"):
        engine.fit("linear", x, y, learning_rate=0.1, epochs=5, weights=[0, 0, 0, 1.0, 0])
    with pytest.raises(ValueError, match="weights"):
        engine.fit("linear", x, y, learning_rate=0.1, epochs=5, weights=[1.0, -1.0, 1, 1, 1])
    with pytest.raises(ValueError, match="4 weights for 5 points"):
        engine.fit("linear", x, y, learning_rate=0.1, epochs=5, weights=[1.0] * 4)


def test_history_every_thins_from_epoch_zero(engine: FitEngine) -> None:
    y = seed_gaussian_data(0)
    full = engine.fit("gaussian", y, learning_rate=0.1, epochs=1001)
    thin = engine.fit("gaussian", y, learning_rate=0.1, epochs=1001, history_every=100)
    assert thin.history_every == 100
    np.testing.assert_array_equal(thin.loss_history, full.loss_history[::100])
    assert len(thin.loss_history) == 11
    assert thin.final_loss == full.final_loss


def test_trace_counts_stay_at_one_across_options() -> None:
    """After warm-up every loop variant is traced exactly once, and no option value (rates,
    betas, tolerances, weights, data sizes, large or small data) traces again."""
    engine = FitEngine(epochs_per_call=64, graph_min_points=1000)
    engine.warm_up()
    before = engine.trace_counts()
    assert len(before) == 2 + 2 * 8  # two summaries, 8 variants of 2 models
    assert set(before.values()) == {1}
    names: tuple[OptimizerName, ...] = ("sgd", "momentum", "adam", "newton")
    for n in (50, 2000):
        x, y = seed_linear_data(0, n=n)
        for name in names:
            for stopping in (NO_STOPPING, Stopping(tolerance=1e-6, patience=3)):
                engine.fit(
                    "linear",
                    x,
                    y,
                    learning_rate=0.01,
                    epochs=100,
                    seed=0,
                    optimizer=Optimizer(name, momentum=0.5, beta_1=0.8),
                    stopping=stopping,
                    weights=np.linspace(0.5, 1.5, n) if n == 50 else None,
                )
                engine.fit(
                    "gaussian",
                    y,
                    learning_rate=0.01,
                    epochs=70,
                    optimizer=Optimizer(name),
                    stopping=stopping,
                )
    assert engine.trace_counts() == before


def test_large_data_gives_the_small_data_answer_for_every_variant() -> None:
    """Above graph_min_points the start function computes the summary (and, for the default
    loop, the first chunk); the other variants then run from its state: same fits."""
    small = FitEngine(graph_min_points=10**9)
    large = FitEngine(graph_min_points=100)
    x, y = seed_linear_data(7, n=5000)
    for name in ("sgd", "momentum", "adam"):
        for stopping in (NO_STOPPING, Stopping(gradient_tolerance=1e-9)):
            options: dict[str, Any] = {
                "learning_rate": 0.01,
                "epochs": 300,
                "optimizer": Optimizer(name),
                "stopping": stopping,
            }
            a = small.fit("linear", x, y, seed=3, **options)
            b = large.fit("linear", x, y, seed=3, **options)
            np.testing.assert_allclose(a.loss_history, b.loss_history, rtol=1e-10)
            g_small = small.fit("gaussian", y, **options)
            g_large = large.fit("gaussian", y, **options)
            np.testing.assert_allclose(g_small.loss_history, g_large.loss_history, rtol=1e-10)
            assert g_small.params == pytest.approx(g_large.params, rel=1e-10)


def test_progress_is_reported_on_multiples_of_progress_every() -> None:
    """Chunks of 7 epochs still report at 10, 20, ... and at the end, with unchanged results."""
    x, y = seed_linear_data(0)
    engine = FitEngine(epochs_per_call=7)
    seen: list[tuple[int, float]] = []
    reported = engine.fit(
        "linear",
        x,
        y,
        learning_rate=0.1,
        epochs=95,
        seed=1,
        on_progress=lambda epoch, loss: seen.append((epoch, loss)),
        progress_every=10,
    )
    plain = engine.fit("linear", x, y, learning_rate=0.1, epochs=95, seed=1)
    assert [epoch for epoch, _ in seen] == [*range(10, 100, 10), 95]
    np.testing.assert_array_equal(reported.loss_history, plain.loss_history)
    assert [loss for _, loss in seen[:-1]] == list(plain.loss_history[10::10])
    assert seen[-1][1] == plain.final_loss
