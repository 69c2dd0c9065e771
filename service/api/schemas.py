"""Request and response models of the HTTP API (pydantic v2; no TensorFlow here).

Numbers are strict: JSON numbers only (no strings, no booleans), finite (no NaN, ±Infinity
or 1e999). Limits that depend on settings (points, epochs) are checked with the limits passed
as validation context, so the error names the field and the setting.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError
from typing_extensions import TypeAliasType

from service.fitting import catalog, options
from service.fitting import expression as expression_rules

FiniteFloat = Annotated[float, Field(strict=True, allow_inf_nan=False)]
PositiveFloat = Annotated[float, Field(strict=True, allow_inf_nan=False, gt=0)]
#: A seed for the random parts of a request (63 bits, so it round-trips through any client).
Seed = Annotated[int, Field(strict=True, ge=0, lt=2**63)]

DEFAULT_LEARNING_RATE = 0.1
DEFAULT_EPOCHS = 1000

LINEAR_EXAMPLE: dict[str, Any] = {
    "x": [0.625, 0.897, 0.776, 0.225, 0.3, 0.874, 0.005, 0.821, 0.797, 0.468, 0.303, 0.278],
    "y": [2.641, 2.757, 2.772, 2.329, 2.098, 2.805, 1.72, 2.628, 2.521, 2.433, 2.113, 2.319],
    "learning_rate": 0.1,
    "epochs": 1000,
    "seed": 42,
}
LINEAR_ADAM_EXAMPLE: dict[str, Any] = {
    "x": LINEAR_EXAMPLE["x"],
    "y": LINEAR_EXAMPLE["y"],
    "weights": [1.0, 1.0, 1.0, 0.5, 0.5, 1.0, 2.0, 1.0, 1.0, 1.0, 0.5, 0.5],
    "optimizer": "adam",
    "learning_rate": 0.05,
    "epochs": 20000,
    "gradient_tolerance": 1e-8,
    "seed": 7,
}
GAUSSIAN_EXAMPLE: dict[str, Any] = {
    "y": [
        *(2.157, 1.813, -0.517, 1.461, 1.951, 2.113, 0.47, 1.522),
        *(1.021, 1.191, 3.061, 1.192, 1.967, 2.884, 1.416, 1.888),
    ],
    "learning_rate": 0.1,
    "epochs": 1000,
    "reduction": "mean",
}


def limits_context(
    max_points: int,
    max_epochs: int,
    max_work: int,
    max_batch: int | None = None,
    max_batch_history: int | None = None,
    max_dataset_points: int | None = None,
    max_expression_work: int | None = None,
    max_expression_complexity: int | None = None,
    max_starts: int | None = None,
) -> dict[str, Any]:
    """Validation context carrying the settings-dependent limits."""
    return {
        "max_expression_work": max_expression_work,
        "max_expression_complexity": max_expression_complexity,
        "max_starts": max_starts,
        "max_points": max_points,
        "max_epochs": max_epochs,
        "max_work": max_work,
        "max_batch": max_batch,
        "max_batch_history": max_batch_history,
        "max_dataset_points": max_dataset_points,
    }


def context_limit(context: dict[str, Any] | None, name: str) -> int | None:
    value = (context or {}).get(name)
    return int(value) if value is not None else None


def points_error(
    count: int, epochs: object, context: dict[str, Any] | None
) -> PydanticCustomError | None:
    """The points limit and the points x epochs work cap (shared by JSON and binary bodies)."""
    limit = context_limit(context, "max_points")
    if limit is not None and count > limit:
        return PydanticCustomError(
            "too_many_points",
            "at most {limit} points are allowed (TAPEFIT_MAX_POINTS), got {count}",
            {"limit": limit, "count": count},
        )
    work_limit = context_limit(context, "max_work")
    if work_limit is not None and isinstance(epochs, int) and count * epochs > work_limit:
        return PydanticCustomError(
            "too_much_work",
            "points x epochs = {work} exceeds {limit} (TAPEFIT_MAX_WORK); "
            "send fewer points or ask for fewer epochs",
            {"limit": work_limit, "work": count * epochs},
        )
    return None


def constant_error(all_equal: bool, what: str) -> PydanticCustomError | None:
    if not all_equal:
        return None
    return PydanticCustomError(
        "constant_data",
        "all {what} values are equal; at least two distinct values are needed",
        {"what": what},
    )


def length_error(
    nx: int, ny: int, first: str = "x", second: str = "y"
) -> PydanticCustomError | None:
    if nx == ny:
        return None
    return PydanticCustomError(
        "length_mismatch",
        "{second} has {ny} values but {first} has {nx}; they must pair up",
        {"nx": nx, "ny": ny, "first": first, "second": second},
    )


def _raise(error: PydanticCustomError | None) -> None:
    if error is not None:
        raise error


def _usable(values: list[float], info: ValidationInfo, what: str) -> list[float]:
    _raise(points_error(len(values), info.data.get("epochs"), info.context))
    first = values[0]
    _raise(constant_error(all(v == first for v in values), what))
    return values


Points = Annotated[
    list[FiniteFloat],
    Field(min_length=2, description="Finite numbers; at least 2, at most TAPEFIT_MAX_POINTS."),
]


#: Anything counted in epochs (epochs, patience, history and progress steps): at least 1, and
#: never beyond any epoch limit a server could have, so no absurd integer reaches arithmetic
#: (the configured TAPEFIT_MAX_EPOCHS is checked as well, where it applies).
MAX_EPOCH_COUNT = 10**9


# Runs at import, where mutmut cannot select a mutant; tests/api/test_defaults.py checks the limits.
# pragma: no mutate start
def _at_most(
    setting: str, kind: str, message: str, absolute: int | None = None
) -> Callable[[int, ValidationInfo], int]:
    """A validator refusing a count over the settings-dependent limit ``setting`` (from the
    validation context; ``absolute`` without one, and never above it) with ``kind`` and
    ``message`` ({limit}, {count}): one message however far over the count is."""

    def validate(value: int, info: ValidationInfo) -> int:
        limit = context_limit(info.context, setting)
        if absolute is not None:
            limit = absolute if limit is None else min(limit, absolute)
        if limit is not None and value > limit:
            # (a count of hundreds of digits is not echoed back)
            count = value if value <= 10**15 else f"a number of {len(str(value))} digits"
            raise PydanticCustomError(kind, message, {"limit": limit, "count": count})
        return value

    return validate


# pragma: no mutate end


_within_epoch_limit = _at_most(
    "max_epochs",
    "too_many_epochs",
    "at most {limit} epochs are allowed (TAPEFIT_MAX_EPOCHS), got {count}",
    MAX_EPOCH_COUNT,
)


#: The document's maximum is the server's TAPEFIT_MAX_EPOCHS (service.api.openapi).
EpochCount = Annotated[
    int,
    Field(strict=True, ge=1, json_schema_extra={"maximum": MAX_EPOCH_COUNT}),
    AfterValidator(_within_epoch_limit),
]


# Named choices: each is one component of the OpenAPI document (one enum in a generated
# client), not a copy inlined in every schema that uses it.
# The choices and defaults come from the (TensorFlow-free) fitting options: one source.
Scaling = TypeAliasType("Scaling", options.Scaling)
Optimizer = TypeAliasType("Optimizer", options.OptimizerName)
Reduction = TypeAliasType("Reduction", options.Reduction)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


Confidence = Annotated[float, Field(strict=True, allow_inf_nan=False, gt=0, lt=1)]
CONFIDENCE_DESCRIPTION = (
    "Confidence level of the intervals in `stats.inference` (between 0 and 1, exclusive)."
)


class _Reporting(_Strict):
    """What an answer reports beyond the fit itself."""

    confidence: Confidence = Field(
        options.DEFAULT_CONFIDENCE, description=CONFIDENCE_DESCRIPTION, examples=[0.95]
    )


class _TrainingOptions(_Reporting):
    learning_rate: PositiveFloat = Field(
        DEFAULT_LEARNING_RATE,
        description="Gradient-descent step size (> 0). With the default scaling it is the "
        "step in standardized units, so one value suits data of any scale (0.1 converges on "
        'x in the thousands or a mean of 1e7 alike); with `"scaling": "none"` it is the raw '
        "step of the reference post's loop. Too large a step makes the fit diverge (422). "
        '"newton" chooses its own steps and ignores it.',
        examples=[DEFAULT_LEARNING_RATE],
    )
    scaling: Scaling = Field(
        "standardize",
        description='"standardize": fit in standardized coordinates (x and y centred and '
        "divided by their standard deviations) and report params, loss_history, final_loss "
        "and stats exactly in your units; gradient descent then converges on data of any "
        'scale. `initial` is in your units either way. "none": the reference post\'s raw '
        "loop, bit for bit (slow or divergent on data far from unit scale).",
        examples=["standardize"],
    )
    epochs: EpochCount = Field(
        DEFAULT_EPOCHS,
        description="Gradient-descent steps (>= 1, at most TAPEFIT_MAX_EPOCHS).",
        examples=[DEFAULT_EPOCHS],
    )
    timeout_s: PositiveFloat | None = Field(
        None,
        description="Wall-clock budget of this fit in seconds, capped by TAPEFIT_FIT_TIMEOUT_S. "
        'When it runs out the fit stops and answers 200 with `"stop_reason": "timeout"` and '
        "the parameters reached.",
        examples=[10.0],
    )
    seed: Seed | None = Field(
        None,
        description="Seeds the random initial values (the linear fit's slope when `initial` "
        "is omitted): the same request with the same seed gives the same response. Omitted: "
        "a fresh seed is drawn and returned. A start that is not random (`initial` given, or "
        "any Gaussian fit) needs no seed, and the response's `seed` is null.",
        examples=[42],
    )


Fraction = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0, lt=1)]
Tolerance = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0)]
#: With history_every omitted, the history is thinned to at most this many values.
DEFAULT_MAX_HISTORY = 1000


class _SingleFitOptions(_TrainingOptions):
    """Options of a single fit beyond the reference post: update rule, early stopping, history."""

    optimizer: Optimizer = Field(
        "sgd",
        description='"sgd": the reference post\'s update p -= learning_rate·gradient; '
        '"momentum": v = momentum·v - learning_rate·gradient, p += v; "adam": Adam with '
        'beta_1, beta_2, epsilon (Keras\'s formulas and defaults); "newton": damped Newton '
        "on the exact Hessian (nested GradientTapes) with a backtracking line search, which "
        "converges in a handful of epochs from any start with a finite loss and stops by "
        'itself (`"stop_reason": "step_tolerance"`); it needs no learning_rate.',
        examples=["newton"],
    )
    momentum: Fraction = Field(
        options.SGD.momentum, description='Velocity decay of "momentum", in [0, 1).'
    )
    beta_1: Fraction = Field(
        options.SGD.beta_1, description="Adam's first-moment decay, in [0, 1)."
    )
    beta_2: Fraction = Field(
        options.SGD.beta_2, description="Adam's second-moment decay, in [0, 1)."
    )
    epsilon: PositiveFloat = Field(
        options.SGD.epsilon, description="Adam's denominator guard (> 0)."
    )
    tolerance: Tolerance | None = Field(
        None,
        description='Early stopping on the loss: stop (`"stop_reason": "loss_tolerance"`) '
        "once the loss has failed `patience` epochs in a row to improve on its best value by more "
        "than tolerance·max(|loss|, 1) (relative, like scipy's ftol). Omitted: off.",
        examples=[1e-10],
    )
    patience: EpochCount = Field(
        options.NO_STOPPING.patience,
        description="Epochs without enough improvement before `tolerance` stops the fit.",
    )
    gradient_tolerance: Tolerance | None = Field(
        None,
        description='Early stopping on the gradient: stop (`"stop_reason": '
        '"gradient_tolerance"`) once its Euclidean norm, in the coordinates the fit runs in '
        "(standardized by default), is at most this. Omitted: off.",
        examples=[1e-8],
    )
    history_every: EpochCount | None = Field(
        None,
        description="Return the loss every this many epochs (epoch 0 included). Omitted: 1 up "
        f"to {DEFAULT_MAX_HISTORY} epochs, else the smallest step that keeps the history "
        f"within {DEFAULT_MAX_HISTORY} values.",
        examples=[1],
    )

    progress_every: EpochCount | None = Field(
        None,
        description="With `Accept: text/event-stream`: epochs between progress events. "
        "Omitted: about 100 events per fit.",
        examples=[100],
    )

    def history_step(self) -> int:
        if self.history_every is not None:
            return self.history_every
        return max(1, -(-self.epochs // DEFAULT_MAX_HISTORY))


Weight = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0)]


def _weights_usable(weights: list[float] | None, info: ValidationInfo, of: str) -> Any:
    if weights is None:
        return None
    values = info.data.get(of)
    if values is not None:
        _raise(length_error(len(values), len(weights), first=of, second="weights"))
    if sum(1 for w in weights if w > 0) < 2:
        raise PydanticCustomError("too_few_weights", "at least 2 points need a positive weight", {})
    if not math.isfinite(sum(weights)):
        raise PydanticCustomError(
            "weights_overflow",
            "the sum of the weights overflows float64; rescale them (only their ratios and "
            "their sum matter)",
            {},
        )
    return weights


Sigma = Annotated[float, Field(strict=True, allow_inf_nan=False, gt=0)]
#: 1/sigma² stays a normal float64 (neither overflows nor underflows) in this range.
SIGMA_RANGE = (1e-150, 1e150)


def _sigma_usable(sigma: list[float] | None, info: ValidationInfo, of: str) -> Any:
    """curve_fit's ``sigma``: checked here, and turned into weights 1/σ² by
    :class:`_SigmaAsWeights` (everything downstream sees weights)."""
    if sigma is None:
        return None
    if info.data.get("weights") is not None:
        raise PydanticCustomError(
            "sigma_and_weights", "give `weights` or `sigma` (weights = 1/sigma²), not both", {}
        )
    values = info.data.get(of)
    if values is not None:
        _raise(length_error(len(values), len(sigma), first=of, second="sigma"))
    low, high = SIGMA_RANGE
    if not all(low <= s <= high for s in sigma):
        raise PydanticCustomError(
            "sigma_range",
            "every sigma must lie in [{low}, {high}] (1/sigma² must be a float64); "
            "rescale y and sigma together",
            {"low": low, "high": high},
        )
    if not math.isfinite(sum(1.0 / (s * s) for s in sigma)):
        raise PydanticCustomError(
            "weights_overflow", "the sum of 1/sigma² overflows float64; rescale y and sigma", {}
        )
    return sigma


SIGMA_DESCRIPTION = (
    "Optional standard deviations of y, one per point (finite, > 0), as curve_fit's `sigma`: "
    "the same fit as weights = 1/sigma² (give one or the other). Without `absolute_sigma` "
    "only their ratios matter (the covariance is scaled by the reduced chi-square)."
)
ABSOLUTE_SIGMA_DESCRIPTION = (
    "As curve_fit's `absolute_sigma`: true takes `sigma` (or weights = 1/sigma², or unit "
    "noise without either) as the noise's true standard deviations, so the covariance is "
    "(JᵀWJ)⁻¹, not rescaled by the reduced chi-square rss/dof; the parameter table then uses "
    "the normal distribution (the noise variance is known), and `stats.chi2` and "
    "`stats.chi2_p_value` test the fit against it."
)


class _SigmaAsWeights(_Strict):
    """A body's ``sigma``, once validated, becomes its ``weights`` (1/σ²)."""

    @model_validator(mode="after")
    def _sigma_as_weights(self) -> Any:
        sigma = getattr(self, "sigma", None)
        if sigma is None:
            return self
        return self.model_copy(update={"weights": [1.0 / (s * s) for s in sigma], "sigma": None})


class _LeastSquaresReporting(_Strict):
    absolute_sigma: bool = Field(False, strict=True, description=ABSOLUTE_SIGMA_DESCRIPTION)


WEIGHTS_DESCRIPTION = (
    "Optional weights, one per point (finite, >= 0, at least 2 positive). Linear: weighted "
    "least squares, loss Σw·(y - m·x - b)²/Σw (weights are inverse noise variances, as in "
    "statsmodels' WLS). Gaussian: the NLL becomes Σw·nll(y). A zero weight drops its point."
)


class LinearInitial(_Strict):
    """Starting point of the linear fit."""

    slope: FiniteFloat = Field(description="Initial slope m.", examples=[0.0])
    intercept: FiniteFloat = Field(description="Initial intercept b.", examples=[0.0])


class GaussianInitial(_Strict):
    """Starting point of the Gaussian fit."""

    mean: FiniteFloat = Field(description="Initial mean m.", examples=[1.0])
    std: PositiveFloat = Field(description="Initial standard deviation s (> 0).", examples=[1.0])


class LinearOptions(_SingleFitOptions, _LeastSquaresReporting):
    """Everything of a linear fit but the data."""

    initial: LinearInitial | None = Field(
        None,
        description="Initial parameters. Omitted: slope ~ N(0, 0.05²) drawn from `seed` and "
        "intercept 0, like the reference post's Keras `random_normal` / `zeros` initializers.",
    )


#: Where a model is evaluated: at least one point.
NewPoints = Annotated[
    list[FiniteFloat],
    Field(min_length=1, description="Finite numbers; at least 1, at most TAPEFIT_MAX_POINTS."),
]


def _points_within(x: Any, info: ValidationInfo) -> Any:
    columns = [x] if isinstance(x, list) else list(x.values())
    if not columns:
        raise PydanticCustomError(
            "no_variables", "x names no variable: give a list, or named lists", {}
        )
    count = sum(len(c) for c in columns)
    limit = context_limit(info.context, "max_points")
    if limit is not None and count > limit:
        raise PydanticCustomError(
            "too_many_points",
            "at most {limit} points are allowed (TAPEFIT_MAX_POINTS), got {count}",
            {"limit": limit, "count": count},
        )
    if len({len(c) for c in columns}) > 1:
        raise PydanticCustomError(
            "length_mismatch", "the variables of x must have the same length", {}
        )
    return x


PREDICT_X_DESCRIPTION = (
    "Where to evaluate the model: a list (the variable x), or an object of named "
    'equal-length lists for several predictors, e.g. {"x1": [...], "x2": [...]}.'
)


class Predict(_Strict):
    """New points at which to evaluate the fitted model, with its bands."""

    x: NewPoints | dict[str, NewPoints] = Field(description=PREDICT_X_DESCRIPTION)

    @field_validator("x")
    @classmethod
    def _x_within(cls, x: Any, info: ValidationInfo) -> Any:
        return _points_within(x, info)

    def variables(self) -> tuple[str, ...]:
        return ("x",) if isinstance(self.x, list) else tuple(self.x)

    def columns(self) -> list[list[float]]:
        return [self.x] if isinstance(self.x, list) else list(self.x.values())


PREDICT_DESCRIPTION = (
    "Evaluate the fitted model at these x: the answer's `prediction` holds the fitted values "
    "with the confidence band of the mean and the prediction band of a new observation at "
    "`confidence`. (For the Gaussian: its fitted density at x, with the band of the density; "
    "there is no observation band.)"
)


class _Predicting(_Strict):
    predict: Predict | None = Field(None, description=PREDICT_DESCRIPTION)


class _PredictingX(_Predicting):
    """``predict`` of a built-in model: its one variable, x."""

    @field_validator("predict")
    @classmethod
    def _one_variable(cls, predict: Predict | None) -> Predict | None:
        if predict is not None and predict.variables() != ("x",):
            raise PydanticCustomError(
                "predict_variables",
                "this model has one variable, x: give predict's x as a list",
                {},
            )
        return predict


class LinearFitRequest(LinearOptions, _SigmaAsWeights, _PredictingX):
    """Fit y = slope·x + intercept by gradient descent on the mean squared error."""

    model_config = ConfigDict(json_schema_extra={"examples": [LINEAR_EXAMPLE]})

    x: Points = Field(description="Inputs x (finite numbers, >= 2, not all equal).")
    y: Points = Field(description="Targets y, one per x.")

    @field_validator("x")
    @classmethod
    def _x_usable(cls, x: list[float], info: ValidationInfo) -> list[float]:
        return _usable(x, info, "x")

    @field_validator("y")
    @classmethod
    def _y_matches_x(cls, y: list[float], info: ValidationInfo) -> list[float]:
        _raise(points_error(len(y), info.data.get("epochs"), info.context))
        x = info.data.get("x")
        if x is not None:
            _raise(length_error(len(x), len(y)))
        return y

    weights: list[Weight] | None = Field(None, description=WEIGHTS_DESCRIPTION)

    @field_validator("weights")
    @classmethod
    def _weights_match(cls, weights: list[float] | None, info: ValidationInfo) -> Any:
        return _weights_usable(weights, info, "y")

    sigma: list[Sigma] | None = Field(None, description=SIGMA_DESCRIPTION)

    @field_validator("sigma")
    @classmethod
    def _sigma_match(cls, sigma: list[float] | None, info: ValidationInfo) -> Any:
        return _sigma_usable(sigma, info, "y")


class GaussianOptions(_SingleFitOptions):
    """Everything of a Gaussian fit but the data."""

    initial: GaussianInitial | None = Field(
        None,
        description="Initial parameters. Omitted: mean 0.7·mean(y), std 1.3·std(y), as in the "
        "seed.",
    )
    reduction: Reduction = Field(
        "mean",
        description='"sum": the post\'s NLL, (N/2)·log(2π s²) + Σ(y-m)²/(2 s²); "mean": the '
        "same divided by N, so the learning rate does not depend on N.",
    )


class GaussianFitRequest(GaussianOptions, _PredictingX):
    """Fit a normal distribution N(mean, std²) by maximum likelihood (gradient descent on the
    negative log-likelihood)."""

    model_config = ConfigDict(json_schema_extra={"examples": [GAUSSIAN_EXAMPLE]})

    y: Points = Field(description="Samples (finite numbers, >= 2, not all equal).")
    weights: list[Weight] | None = Field(None, description=WEIGHTS_DESCRIPTION)

    @field_validator("y")
    @classmethod
    def _y_usable(cls, y: list[float], info: ValidationInfo) -> list[float]:
        return _usable(y, info, "y")

    @field_validator("weights")
    @classmethod
    def _weights_match(cls, weights: list[float] | None, info: ValidationInfo) -> Any:
        return _weights_usable(weights, info, "y")


# -- batches ------------------------------------------------------------------------------------

LINEAR_BATCH_EXAMPLE: dict[str, Any] = {
    "datasets": [
        {"x": LINEAR_EXAMPLE["x"], "y": LINEAR_EXAMPLE["y"]},
        {"x": [0.0, 1.0, 2.0, 3.0], "y": [1.1, 2.9, 5.2, 6.8]},
        {"x": [1.0, 1.0, 1.0], "y": [1.0, 2.0, 3.0]},
    ],
    "learning_rate": 0.1,
    "epochs": 1000,
    "seed": 42,
    "history_every": 100,
}
GAUSSIAN_BATCH_EXAMPLE: dict[str, Any] = {
    "datasets": [{"y": GAUSSIAN_EXAMPLE["y"]}, {"y": [10.2, 8.7, 11.4, 10.1, 9.3, 11.0]}],
    "learning_rate": 0.1,
    "epochs": 1000,
    "history_every": 100,
}


class LinearDataset(_Strict):
    """One data set of a linear batch. Constant x is not a request error here: that entry
    alone answers with an error."""

    x: Points = Field(description="Inputs x (finite numbers, >= 2).")
    y: Points = Field(description="Targets y, one per x.")
    initial: LinearInitial | None = Field(
        None, description="Initial parameters of this set; omitted: as for a single fit."
    )

    @field_validator("y")
    @classmethod
    def _y_matches_x(cls, y: list[float], info: ValidationInfo) -> list[float]:
        x = info.data.get("x")
        if x is not None:
            _raise(length_error(len(x), len(y)))
        return y


class GaussianDataset(_Strict):
    """One data set of a Gaussian batch."""

    y: Points = Field(description="Samples (finite numbers, >= 2).")
    initial: GaussianInitial | None = Field(
        None, description="Initial parameters of this set; omitted: as for a single fit."
    )


class BatchOptions(_TrainingOptions):
    history_every: EpochCount = Field(
        1,
        description="Record the loss every this many epochs (epoch 0 included), so large "
        "batches stay small: data sets x recorded epochs must stay within "
        "TAPEFIT_MAX_BATCH_HISTORY.",
        examples=[100],
    )


def _check_batch(datasets: list[Any], fields: tuple[str, ...], info: ValidationInfo) -> None:
    points = sum(len(getattr(d, fields[0])) for d in datasets)
    epochs, every = info.data.get("epochs"), info.data.get("history_every")
    check_batch(len(datasets), points, epochs, every, info.context)


def check_batch(
    sets: int, points: int, epochs: object, every: object, context: dict[str, Any] | None
) -> None:
    """A batch's limits (sets, points, work, history values); raises the first broken."""
    limit = context_limit(context, "max_batch")
    if limit is not None and sets > limit:
        raise PydanticCustomError(
            "too_many_datasets",
            "at most {limit} data sets per batch (TAPEFIT_MAX_BATCH), got {count}",
            {"limit": limit, "count": sets},
        )
    _raise(points_error(points, epochs, context))
    history_limit = context_limit(context, "max_batch_history")
    if history_limit is not None and isinstance(epochs, int) and isinstance(every, int):
        values = sets * -(-epochs // every)
        if values > history_limit:
            raise PydanticCustomError(
                "too_much_history",
                "{values} loss-history values exceed {limit} (TAPEFIT_MAX_BATCH_HISTORY); "
                "raise history_every",
                {"values": values, "limit": history_limit},
            )


def check_batch_starts(sets: int, points: int, starts: int, context: dict[str, Any] | None) -> None:
    """A multi-start batch's runs (each set's starts are rows of one loop, each holding its
    set's data) within the batch limits: sets x starts at most TAPEFIT_MAX_BATCH, and all
    points x starts at most TAPEFIT_MAX_POINTS."""
    if starts <= 1:
        return
    for key, setting, amount, what, total in (
        ("max_batch", "TAPEFIT_MAX_BATCH", sets, "data sets", "runs"),
        ("max_points", "TAPEFIT_MAX_POINTS", points, "points", "points"),
    ):
        limit = context_limit(context, key)
        if limit is not None and amount * starts > limit:
            raise PydanticCustomError(
                "too_many_runs",
                "{amount} {what} x {starts} starts = {product} {total} exceed {limit} "
                "({setting}); ask for fewer starts or send fewer {what}",
                {
                    "amount": amount,
                    "what": what,
                    "starts": starts,
                    "product": amount * starts,
                    "total": total,
                    "limit": limit,
                    "setting": setting,
                },
            )


class LinearBatchRequest(BatchOptions):
    """Fit y = slope·x + intercept to many data sets at once, in one vectorized loop. Set i
    without `initial` starts like a single fit with seed `seed + i`."""

    model_config = ConfigDict(json_schema_extra={"examples": [LINEAR_BATCH_EXAMPLE]})

    datasets: list[LinearDataset] = Field(
        min_length=1,
        description="The data sets (each its own x and y, lengths may differ); at most "
        "TAPEFIT_MAX_BATCH, all points together at most TAPEFIT_MAX_POINTS.",
    )

    @field_validator("datasets")
    @classmethod
    def _within_limits(cls, datasets: list[LinearDataset], info: ValidationInfo) -> Any:
        _check_batch(datasets, ("x",), info)
        return datasets


class GaussianBatchOptions(BatchOptions):
    reduction: Reduction = Field("mean", description="As for a single Gaussian fit, for every set.")


class GaussianBatchRequest(GaussianBatchOptions):
    """Fit N(mean, std²) to many data sets at once, in one vectorized loop."""

    model_config = ConfigDict(json_schema_extra={"examples": [GAUSSIAN_BATCH_EXAMPLE]})

    datasets: list[GaussianDataset] = Field(
        min_length=1,
        description="The data sets (lengths may differ); at most TAPEFIT_MAX_BATCH, all points "
        "together at most TAPEFIT_MAX_POINTS.",
    )

    @field_validator("datasets")
    @classmethod
    def _within_limits(cls, datasets: list[GaussianDataset], info: ValidationInfo) -> Any:
        _check_batch(datasets, ("y",), info)
        return datasets


class _Answer(BaseModel):
    """A response model: every field is always present, so the schema says so (a generated
    client then types them as required, not as optional)."""

    model_config = ConfigDict(json_schema_serialization_defaults_required=True)


class LinearParams(_Answer):
    slope: float = Field(description="Fitted slope m.")
    intercept: float = Field(description="Fitted intercept b.")


class GaussianParams(_Answer):
    mean: float = Field(description="Fitted mean m.")
    std: float = Field(description="Fitted standard deviation s (always > 0).")


StopReason = TypeAliasType("StopReason", options.StopReason)


ParamsT = TypeVar("ParamsT", bound=BaseModel)
ErrorsT = TypeVar("ErrorsT", bound=BaseModel)


class LinearStdErrors(_Answer):
    slope: float | None = Field(description="Standard error of the slope.")
    intercept: float | None = Field(description="Standard error of the intercept.")


class GaussianStdErrors(_Answer):
    mean: float | None = Field(description="Standard error of the mean.")
    std: float | None = Field(description="Standard error of the standard deviation.")


class Prediction(_Answer):
    """A model at new x, with its bands (null where undefined: no covariance, no residual
    degrees of freedom, or overflow)."""

    x: list[float] | dict[str, list[float]] = Field(description="The x asked for, as sent.")
    y: list[float | None] = Field(description="The model's value f(x) at the parameters.")
    mean_lower: list[float | None] = Field(
        description="Lower end of the confidence band of the mean: f - q·sqrt(J·C·Jᵀ), J the "
        "exact Jacobian ∂f/∂p at x, C the parameters' covariance, q Student's t quantile at "
        "`dof` (the normal one without dof) for `confidence`."
    )
    mean_upper: list[float | None] = Field(description="f + q·sqrt(J·C·Jᵀ).")
    obs_lower: list[float | None] = Field(
        description="Lower end of the prediction band of a new observation of unit weight: "
        "f - q·sqrt(J·C·Jᵀ + s²), s² the residual variance rss/dof (1 with `absolute_sigma`)."
    )
    obs_upper: list[float | None] = Field(description="f + q·sqrt(J·C·Jᵀ + s²).")


class ParameterInference(_Answer):
    """One parameter's row of the parameter table (null where undefined)."""

    estimate: float = Field(description="The fitted value, in the caller's units.")
    std_error: float | None = Field(description="Its standard error (as in `std_errors`).")
    statistic: float | None = Field(
        description="estimate / std_error: Student's t (method t) or z (method normal)."
    )
    p_value: float | None = Field(
        description="Two-sided p-value of the hypothesis that the parameter is 0: "
        "P(|T| >= |statistic|), T Student's t with `dof` degrees of freedom, or normal."
    )
    lower: float | None = Field(
        description="Lower end of the confidence interval at `confidence`: estimate - "
        "q·std_error, q the t (or normal) quantile; with method profile, where the profile "
        "crosses the F-test threshold."
    )
    upper: float | None = Field(description="Upper end of the confidence interval.")
    lower_found: bool | None = Field(
        None,
        description="Method profile only (else null): whether the profile crossed its "
        "threshold below the estimate (false: the profile is too flat to bound it, and "
        "`lower` is null).",
    )
    upper_found: bool | None = Field(
        None, description="Method profile only: the same above the estimate."
    )


class Inference(_Answer):
    """The parameter table: estimates with standard errors, test statistics, p-values and
    confidence intervals."""

    confidence: float = Field(description="The confidence level of the intervals (0 to 1).")
    method: Literal["t", "normal", "profile"] = Field(
        description='"t": Wald intervals and tests with Student\'s t at `dof` degrees of '
        'freedom (least squares, as statsmodels\' OLS/WLS); "normal": with the normal '
        "distribution (the Gaussian's maximum likelihood, or least squares with "
        '`absolute_sigma`, whose noise variance is known); "profile": profile-likelihood '
        "intervals (see `intervals`), the tests as for t."
    )
    dof: int | None = Field(description="Degrees of freedom n_used - p of t; null for normal.")
    parameters: dict[str, ParameterInference] = Field(description="The table, by parameter.")


class _Reference(_Answer, Generic[ParamsT]):
    """Parameters with their loss: the closed-form optimum, or the gap to it."""

    params: ParamsT
    loss: float


# Named subclasses, so the OpenAPI components (and generated classes) are LinearReference, not
# _Reference_LinearParams_.
class LinearReference(_Reference[LinearParams]):
    pass


class GaussianReference(_Reference[GaussianParams]):
    pass


ReferenceT = TypeVar("ReferenceT", bound=BaseModel)


class _Stats(_Answer, Generic[ErrorsT, ReferenceT]):
    """Statistics at the returned parameters. Values that do not exist there (e.g. standard
    errors away from a minimum, where the Hessian is not positive definite) are null."""

    parameters: list[str] = Field(description="Order of the rows and columns of the matrices.")
    n_used: int = Field(description="Points with positive weight (all points without weights).")
    dof: int = Field(description="Residual degrees of freedom: n_used - 2.")
    gradient_norm: float | None = Field(
        description="Euclidean norm of the loss gradient (null if it overflows float64)."
    )
    newton_step: float | None = Field(
        description="Length of the Newton step H⁻¹·gradient: how far the optimum still is "
        "(exact for least squares); null away from a minimum."
    )
    std_errors: ErrorsT = Field(
        description="Square roots of the covariance diagonal: from the Hessian of the loss "
        "(nested GradientTapes) scaled by the residual variance (linear), or the inverse "
        "observed information (Gaussian)."
    )
    covariance: list[list[float | None]] = Field(description="Covariance of the parameters.")
    correlation: list[list[float | None]] = Field(description="Correlation of the parameters.")
    log_likelihood: float | None = Field(description="Log-likelihood at the parameters.")
    aic: float | None = Field(description="2k - 2·log_likelihood, k = 2.")
    bic: float | None = Field(description="k·ln(n_used) - 2·log_likelihood, k = 2.")
    closed_form: ReferenceT | None = Field(
        description="The exact optimum (least squares; sample mean and population std) and "
        "the loss there (null only if it overflows float64)."
    )
    gap: ReferenceT | None = Field(
        description="Returned minus closed-form parameters, and final_loss minus the "
        "closed-form loss: near zero when gradient descent converged."
    )
    inference: Inference


class _ChiSquare(_Answer):
    chi2: float | None = Field(
        description="With `absolute_sigma`: the chi-square Σ(r/sigma)² = Σw·r² (null without it)."
    )
    chi2_p_value: float | None = Field(
        description="With `absolute_sigma`: its upper-tail p-value at `dof` degrees of "
        "freedom, P(χ² >= chi2): small when the residuals are larger than sigma says."
    )


class LinearStats(_Stats[LinearStdErrors, LinearReference], _ChiSquare):
    r_squared: float | None = Field(description="1 - residual variance / variance of y.")
    residual_std: float | None = Field(
        description="sqrt(Σw·r² / (n_used - 2)): the noise standard deviation."
    )


class GaussianStats(_Stats[GaussianStdErrors, GaussianReference]):
    pass


StatsT = TypeVar("StatsT", bound=BaseModel)


class _FitResponse(_Answer, Generic[ParamsT, StatsT]):
    model: str = Field(description="Which model was fitted.")
    params: ParamsT = Field(description="The fitted parameters.")
    loss_history: list[float] = Field(
        description="Loss before the updates: entry k is the loss at the parameters before "
        "update k·history_every."
    )
    history_every: int = Field(1, description="Epochs between loss_history entries.")
    final_loss: float = Field(description="Loss at the returned parameters.")
    epochs_run: int = Field(description="Updates applied (< epochs when stopped early).")
    n: int = Field(description="Number of data points.")
    stop_reason: StopReason = Field(
        description='The rule that stopped the fit: "max_epochs" (all epochs ran), '
        '"loss_tolerance" (`tolerance`), "gradient_tolerance", "step_tolerance" (Newton\'s '
        'full step fell within the convergence threshold: the fit converged) or "timeout" '
        "(the deadline; the response carries what was reached). Whether the answer is at the "
        "optimum is `converged`, not the stop. (A diverged fit answers 422 with "
        '`"stop_reason": "diverged"`.)'
    )
    converged: bool = Field(
        False,
        description="True when the returned parameters are at the optimum, judged in the "
        "coordinates the fit ran in (standardized by default, so the test means the same at "
        f"any scale): the Newton step H⁻¹·gradient is within {options.CONVERGED_RTOL:g} of "
        "max(1, |parameters|), "
        "or the gradient norm is within gradient_tolerance. A `tolerance` stop alone does not "
        "make a fit converged: an oscillating optimizer can stall far from the optimum.",
    )
    warnings: list[str] = Field(
        default_factory=list,
        description="Empty when converged. Otherwise plain-words reasons not to trust the "
        "parameters as they are: the gradient norm and Newton step left, the exact optimum "
        "and the gap to it, and what to change.",
    )
    seed: int | None = Field(
        description="The seed that drew the random initial values; null when the start was "
        "not random (`initial` given, or a Gaussian fit)."
    )
    stats: StatsT = Field(description="Uncertainties, fit quality and the closed-form check.")
    prediction: Prediction | None = Field(
        description="The model at `predict`'s x with its bands; null without `predict`."
    )


class LinearFitResponse(_FitResponse[LinearParams, LinearStats]):
    model: Literal["linear"] = "linear"


class GaussianFitResponse(_FitResponse[GaussianParams, GaussianStats]):
    model: Literal["gaussian"] = "gaussian"


FitT = TypeVar("FitT", bound=BaseModel)


class _BatchItem(_Answer, Generic[FitT]):
    index: int = Field(description="Position of the data set in the request.")
    result: FitT | None = Field(description="The fit, or null on error.")
    error: str | None = Field(description="Why this set has no fit (diverged, constant data...).")


class LinearBatchItem(_BatchItem[LinearFitResponse]):
    pass


class GaussianBatchItem(_BatchItem[GaussianFitResponse]):
    pass


ItemT = TypeVar("ItemT", bound=BaseModel)


class _BatchResponse(_Answer, Generic[ItemT]):
    model: str = Field(description="Which model was fitted.")
    succeeded: int = Field(description="Data sets fitted.")
    failed: int = Field(description="Data sets that answer with an error.")
    results: list[ItemT] = Field(description="One entry per data set, in order.")


class LinearBatchResponse(_BatchResponse[LinearBatchItem]):
    model: Literal["linear"] = "linear"


class GaussianBatchResponse(_BatchResponse[GaussianBatchItem]):
    model: Literal["gaussian"] = "gaussian"


# -- synthetic data ------------------------------------------------------------------------------


_dataset_size = _at_most(
    "max_dataset_points",
    "too_many_points",
    "at most {limit} points per data set (TAPEFIT_MAX_DATASET_POINTS), got {count}",
)


class _DatasetRequest(_Strict):
    n: Annotated[int, Field(strict=True, ge=2)] = Field(
        description="Number of points (>= 2, at most TAPEFIT_MAX_DATASET_POINTS)."
    )
    seed: Seed | None = Field(
        None,
        description="Seeds the draws: the same request with the same seed gives the same data "
        "on every replica. Omitted: a fresh seed is drawn and returned.",
    )

    @field_validator("n")
    @classmethod
    def _within_limit(cls, n: int, info: ValidationInfo) -> int:
        return _dataset_size(n, info)


LINEAR_DATASET_EXAMPLE: dict[str, Any] = {
    "n": 100,
    "slope": 1.0,
    "intercept": 2.0,
    "noise_std": 0.15,
    "seed": 1,
}
GAUSSIAN_DATASET_EXAMPLE: dict[str, Any] = {"n": 1000, "mean": 2.0, "std": 1.0, "seed": 1}


class LinearDatasetRequest(_DatasetRequest):
    """The post's `generate_noisy_data`: x ~ U(0, 1), y = slope·x + intercept + N(0, noise_std²)."""

    model_config = ConfigDict(json_schema_extra={"examples": [LINEAR_DATASET_EXAMPLE]})

    slope: FiniteFloat = Field(1.0, description="True slope m (the reference post's 1).")
    intercept: FiniteFloat = Field(2.0, description="True intercept b (the reference post's 2).")
    noise_std: Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0)] = Field(
        0.15,
        description="Standard deviation of the Gaussian noise on y (the reference post's 0.15).",
    )


class GaussianDatasetRequest(_DatasetRequest):
    """The post's `generate_gaussian_data`: y ~ N(mean, std²), and x ~ U(0, 1) to plot against."""

    model_config = ConfigDict(json_schema_extra={"examples": [GAUSSIAN_DATASET_EXAMPLE]})

    mean: FiniteFloat = Field(2.0, description="True mean (the reference post's 2).")
    std: PositiveFloat = Field(
        1.0, description="True standard deviation (> 0; the reference post's 1)."
    )


class Dataset(_Answer):
    """Synthetic data: POST `{"x": ..., "y": ...}` (linear) or `{"y": ...}` (Gaussian) to the
    fit of the same model."""

    x: list[float] = Field(description="x ~ U(0, 1).")
    y: list[float] = Field(description="The targets (linear) or the samples (Gaussian).")
    seed: int = Field(description="The seed used (replays the same data).")


class Health(_Answer):
    status: Literal["ok", "ready", "starting", "stopping", "degraded"]


# Error bodies are written by the handlers, not through a response model: their optional
# fields (ctx, epoch...) stay optional.
class ErrorDetail(BaseModel):
    """An error whose cause is one sentence (divergence, overload, readiness, size)."""

    detail: str


class FitFailure(ErrorDetail):
    """A fit that cannot answer (422): degenerate data, or divergence, which also says where."""

    stop_reason: Literal["diverged"] | None = Field(
        None, description='"diverged" when the loss or parameters blew up.'
    )
    epoch: int | None = Field(None, description="The epoch at which the fit diverged.")


class ValidationErrorItem(BaseModel):
    loc: list[str | int] = Field(description='Where: ["body", field, index...].')
    msg: str
    type: str
    ctx: dict[str, Any] | None = None


class ValidationErrorBody(BaseModel):
    """FastAPI's usual 422 shape (the offending input is never echoed back)."""

    detail: list[ValidationErrorItem]


# -- expressions: any model written down --------------------------------------------------

ExpressionOptimizer = TypeAliasType("ExpressionOptimizer", options.ExpressionOptimizer)
NamedModelName = TypeAliasType(
    "NamedModelName",
    Literal[  # type: ignore[valid-type]
        catalog.NAMES
    ],
)
Bound = tuple[FiniteFloat | None, FiniteFloat | None]
DEFAULT_EXPRESSION_EPOCHS = 1000

EXPRESSION_EXAMPLE: dict[str, Any] = {
    "expression": "b1*(1-exp(-b2*x))",
    "parameters": {"b1": 500.0, "b2": 0.0001},
    "x": [
        77.6,
        114.9,
        141.1,
        190.8,
        239.9,
        289.0,
        332.8,
        378.4,
        434.8,
        477.3,
        536.8,
        593.1,
        689.1,
        760.0,
    ],
    "y": [
        10.07,
        14.73,
        17.94,
        23.93,
        29.61,
        35.18,
        40.02,
        44.82,
        50.76,
        55.05,
        61.01,
        66.4,
        75.47,
        81.78,
    ],
}
NAMED_MODEL_EXAMPLE: dict[str, Any] = {
    "model": "michaelis_menten",
    "x": [0.02, 0.06, 0.11, 0.22, 0.56, 1.1],
    "y": [76.0, 97.0, 123.0, 159.0, 191.0, 207.0],
}


class _ExpressionModel(_Strict):
    """The model of an expression fit, single or batch: an expression or a named model,
    and the shared starting values."""

    expression: str | None = Field(
        None,
        description="y as a function of the variable(s) and the parameters, in Python syntax: "
        "numbers, + - * / **, unary minus, parentheses, the functions "
        f"{', '.join(expression_rules.FUNCTIONS)} and the constants pi and e. At most "
        f"{expression_rules.MAX_LENGTH} characters, nesting at most "
        f"{expression_rules.MAX_DEPTH} deep. Give this or `model`.",
        examples=["b1*(1-exp(-b2*x))"],
    )
    model: NamedModelName | None = Field(
        None,
        description="A named model instead of an expression (GET /v1/models lists them); its "
        "starting values are then optional (guessed from the data).",
        examples=["michaelis_menten"],
    )
    parameters: dict[str, FiniteFloat] | None = Field(
        None,
        description="Starting value of every parameter, by name (at most "
        f"{expression_rules.MAX_PARAMETERS}): every name of the expression that is not a "
        "variable, function or constant, and each must appear in it. With `model`: optional, "
        "any of its parameters (the others are guessed).",
        examples=[{"b1": 500.0, "b2": 0.0001}],
    )


X_DESCRIPTION = (
    "The independent variable: a list (named x), or an object of named equal-length lists "
    'for several predictors, e.g. {"x1": [...], "x2": [...]}.'
)


class ExpressionData(_SigmaAsWeights):
    """One data set of an expression fit."""

    x: Points | dict[str, Points] = Field(description=X_DESCRIPTION)
    y: Points = Field(description="The observations, one per point.")
    weights: list[Weight] | None = Field(None, description=WEIGHTS_DESCRIPTION)
    sigma: list[Sigma] | None = Field(None, description=SIGMA_DESCRIPTION)

    @field_validator("sigma")
    @classmethod
    def _sigma_match(cls, sigma: list[float] | None, info: ValidationInfo) -> Any:
        return _sigma_usable(sigma, info, "y")

    def variables(self) -> tuple[str, ...]:
        return ("x",) if isinstance(self.x, list) else tuple(self.x)


class _Starts(_Strict):
    """Multi-start options (expression and global fits)."""

    starts: Annotated[int, Field(strict=True, ge=1)] = Field(
        1,
        description="Multi-start: fit from this many starts at once (one batched, compiled "
        "call) and answer the lowest-rss converged run. The first start is the given (or "
        "guessed) one; the others are drawn with `seed`: by Latin hypercube inside `bounds` "
        "where both sides are given, elsewhere spread log-uniformly over a decade either way "
        "around the first start's magnitude (a quarter with its sign flipped). "
        "`stats.starts` says how many runs reached the answer's minimum. (A global fit runs "
        "each start as a global fit.) At most "
        "TAPEFIT_MAX_STARTS; points x parameters x starts count against "
        "TAPEFIT_MAX_EXPRESSION_WORK.",
        examples=[8],
    )
    seed: Seed = Field(
        0,
        description="Seeds the draw of the extra `starts`: the same seed, "
        "the same starts and the same answer.",
    )

    @field_validator("starts")
    @classmethod
    def _starts_within(cls, starts: int, info: ValidationInfo) -> int:
        limit = context_limit(info.context, "max_starts")
        if limit is not None and starts > limit:
            raise PydanticCustomError(
                "too_many_starts",
                "at most {limit} starts are allowed (TAPEFIT_MAX_STARTS), got {count}",
                {"limit": limit, "count": starts},
            )
        return starts


class _ExpressionOptions(_Reporting, _LeastSquaresReporting, _Starts):
    """How an expression fit trains, single or batch."""

    bounds: dict[str, Bound] | None = Field(
        None,
        description="Bounds by parameter name, [low, high] with null for an open side. "
        "Enforced by projection: after every step each parameter is clipped into its "
        "interval. A parameter that ends on a bound gets a warning: its standard error "
        "assumes it is free.",
        examples=[{"b2": [0.0, None]}],
    )
    optimizer: ExpressionOptimizer = Field(
        "levenberg_marquardt",
        description='"levenberg_marquardt" (default): damped Gauss-Newton with Marquardt\'s '
        "scaling, the step solved by QR, inside the compiled loop; each epoch is one "
        'iteration, and it stops by itself at the optimum (`"stop_reason": '
        '"step_tolerance"`). "newton", "adam", "momentum", "sgd" as for the other fits '
        "(gradient descent runs in your units here: no standardization).",
    )
    learning_rate: PositiveFloat = Field(
        0.01, description='Step size of "sgd", "momentum" and "adam".'
    )
    epochs: EpochCount = Field(DEFAULT_EXPRESSION_EPOCHS, description="Most iterations (epochs).")
    tolerance: Tolerance | None = Field(
        None, description="As for the other fits: a relative loss tolerance with `patience`."
    )
    patience: EpochCount = Field(options.NO_STOPPING.patience, description="See `tolerance`.")
    gradient_tolerance: Tolerance | None = Field(
        None, description="Stop once the gradient norm of the loss is at most this."
    )
    timeout_s: PositiveFloat | None = Field(
        None, description="Wall-clock budget in seconds, as for the other fits."
    )
    history_every: EpochCount | None = Field(
        None, description="Return the loss every this many epochs, as for the other fits."
    )

    intervals: Literal["wald", "profile"] = Field(
        "wald",
        description='The confidence intervals of `stats.inference`: "wald" (estimate ± '
        'q·std_error) or "profile": profile-likelihood intervals, where the residual sum of '
        "squares with the parameter held (the others re-optimized) reaches rss·(1 + "
        "F⁻¹(confidence; 1, dof)/dof), lmfit conf_interval's criterion. They follow the "
        "model's curvature (asymmetric, or open on a side the data do not bound: then "
        "`lower_found`/`upper_found` is false, the end null, and a warning says so). All "
        "parameters' ends are searched together, in batched re-optimizations.",
    )

    def history_step(self) -> int:
        if self.history_every is not None:
            return self.history_every
        return max(1, -(-self.epochs // DEFAULT_MAX_HISTORY))


class ExpressionFitRequest(_ExpressionModel, ExpressionData, _ExpressionOptions, _Predicting):
    """Fit y = f(x; parameters) for an expression you write, or a named model, by least
    squares (Levenberg-Marquardt by default, with the exact Jacobian by forward-mode autodiff)."""

    model_config = ConfigDict(json_schema_extra={"examples": [EXPRESSION_EXAMPLE]})

    progress_every: EpochCount | None = Field(
        None, description="With `Accept: text/event-stream`: epochs between progress events."
    )
    loss: options.LossName = Field(
        "linear",
        description="The loss of the residuals r, as scipy least_squares' `loss`: minimize "
        "½·f_scale²·Σrho((r/f_scale)²) with rho(z) = z (linear: least squares), 2(√(1+z) - 1) "
        "(soft_l1), z or 2√z - 1 (huber), ln(1 + z) (cauchy), arctan z (arctan). The robust "
        "ones limit the pull of outliers; they are fitted by iteratively reweighted "
        "Levenberg-Marquardt, and the answer is the weighted least-squares fit at the final "
        "weights rho'(z) (its rss, loss history and R² are of that problem), with the covariance "
        "in scipy's convention for robust losses (curve_fit's: approximate), "
        "`stats.robust_cost` and `stats.downweighted`.",
    )
    f_scale: PositiveFloat = Field(
        1.0,
        description="The residual scale of a robust `loss` (in y's units): residuals well "
        "below it count as in least squares, those above are down-weighted.",
    )


class ExpressionDataset(ExpressionData):
    """One data set of an expression batch: its own x, y, weights and (optionally) starting
    values."""

    parameters: dict[str, FiniteFloat] | None = Field(
        None,
        description="This set's own starting values by name, over the shared `parameters` "
        "(with a named model, the ones given by neither are guessed from this set's data).",
    )


EXPRESSION_BATCH_EXAMPLE: dict[str, Any] = {
    "expression": "a*exp(-k*t) + c",
    "parameters": {"a": 1000.0, "k": 0.001, "c": 0.0},
    "datasets": [
        {
            "x": {"t": [0.0, 600.0, 1200.0, 1800.0, 2400.0, 3000.0]},
            "y": [1203.1, 662.4, 368.9, 204.2, 113.0, 63.5],
        },
        {
            "x": {"t": [0.0, 500.0, 1000.0, 2000.0, 4000.0]},
            "y": [2500.4, 1841.1, 1356.0, 736.9, 217.3],
            "parameters": {"a": 2500.0},
        },
    ],
}


class ExpressionBatchOptions(_ExpressionModel, _ExpressionOptions):
    """An expression batch's options: ``POST /v1/fits/expression/batch/binary`` takes them
    in the query string (`parameters` and `bounds` as JSON), the data as one .npy array."""

    variables: list[str] = Field(
        ["x"],
        min_length=1,
        description="The binary batch's variable names, in the order of the .npy array's rows "
        '(JSON in the query string, e.g. ["x1","x2"]); y is the last row.',
    )


class ExpressionBatchRequest(_ExpressionModel, _ExpressionOptions):
    """Fit one expression (or named model) to many data sets at once: the data sets are a
    leading dimension of one compiled loop, each set with its own status and stopping, and
    each answered as its single fit would be."""

    model_config = ConfigDict(json_schema_extra={"examples": [EXPRESSION_BATCH_EXAMPLE]})

    datasets: list[ExpressionDataset] = Field(
        min_length=1,
        description="The data sets, each with the same variables (lengths may differ); at most "
        "TAPEFIT_MAX_BATCH, all points together at most TAPEFIT_MAX_POINTS.",
    )


class Starts(_Answer):
    """What a multi-start fit found: how far to trust that its answer is the best minimum."""

    runs: int = Field(description="The starts run (`starts`).")
    at_best: int = Field(
        description="Runs that converged to the answer's minimum: their rss within "
        f"{options.SAME_MINIMUM_RTOL:g} (relative) of the best. 1 of many: the answer was hard "
        "to find, and a better minimum may exist."
    )
    next_rss: float | None = Field(
        description="The rss of the best other minimum a run converged to (above the best by "
        f"more than {options.SAME_MINIMUM_RTOL:g} relatively); null when every converged run "
        "reached the best."
    )


class ExpressionStats(_ChiSquare):
    """Statistics at the returned parameters (null where they do not exist)."""

    parameters: list[str] = Field(description="Order of the rows and columns of the matrices.")
    n_used: int = Field(description="Points with positive weight.")
    dof: int = Field(description="Residual degrees of freedom: n_used - number of parameters.")
    std_errors: dict[str, float | None] = Field(
        description="sqrt of the covariance diagonal: s²·(JᵀWJ)⁻¹ with s² = rss/dof and J the "
        "Jacobian at the parameters (NIST's convention, and curve_fit's)."
    )
    covariance: list[list[float | None]] = Field(description="s²·(JᵀWJ)⁻¹.")
    correlation: list[list[float | None]] = Field(description="Correlation of the parameters.")
    rss: float | None = Field(
        description="Residual sum of squares Σw·r², computed in extended precision."
    )
    residual_std: float | None = Field(description="sqrt(rss / dof).")
    r_squared: float | None = Field(description="1 - rss / Σw·(y - ȳ)².")
    log_likelihood: float | None = Field(
        description="Gaussian log-likelihood at the maximum-likelihood noise variance."
    )
    aic: float | None = Field(description="2k - 2·log_likelihood, k parameters.")
    bic: float | None = Field(description="k·ln(n_used) - 2·log_likelihood.")
    gradient_norm: float | None = Field(description="Norm of the loss gradient.")
    newton_step: float | None = Field(
        description="Length of the Newton step to the optimum; null away from a minimum."
    )
    inference: Inference
    starts: Starts | None = Field(None, description="Multi-start fits only (`starts` > 1).")
    downweighted: int | None = Field(
        None,
        description="Robust losses only: the points whose weight rho'(z) the loss brought below "
        "1/2 (the outliers it discounted).",
    )
    robust_cost: float | None = Field(
        None, description="Robust losses only: ½·f_scale²·Σrho((r/f_scale)²) at the parameters."
    )


#: The answer to EXPRESSION_EXAMPLE (NIST's Misra1a from its first start), as the server gives
#: it (the loss history shortened); tests/api/test_new_user.py checks it against a real fit.
EXPRESSION_ANSWER_EXAMPLE: dict[str, Any] = {
    "model": "expression",
    "expression": "b1*(1-exp(-b2*x))",
    "named_model": None,
    "params": {"b1": 238.94212917886165, "b2": 0.0005501564318059137},
    "start": {"b1": 500.0, "b2": 0.0001},
    "loss_history": [770.0135831364089, 41.88517909965083, 41.88517909965083],
    "history_every": 1,
    "final_loss": 0.008896527781742589,
    "epochs_run": 24,
    "n": 14,
    "stop_reason": "step_tolerance",
    "converged": True,
    "warnings": [],
    "stats": {
        "parameters": ["b1", "b2"],
        "n_used": 14,
        "dof": 12,
        "std_errors": {"b1": 2.7070075241394496, "b2": 7.266868843619049e-06},
        "covariance": [
            [7.3278897357475925, -1.9647394535206385e-05],
            [-1.9647394535206385e-05, 5.2807382790361256e-11],
        ],
        "correlation": [[1.0, -0.998776191963618], [-0.998776191963618, 1.0]],
        "rss": 0.12455138894440551,
        "residual_std": 0.10187876330243606,
        "r_squared": 0.9999815801100362,
        "log_likelihood": 13.189520041884702,
        "aic": -22.379040083769404,
        "bic": -21.100925424538886,
        "gradient_norm": 2.6352608983946975e-10,
        "newton_step": 3.5729448045931136e-13,
        "chi2": None,
        "chi2_p_value": None,
        "starts": None,
        "downweighted": None,
        "robust_cost": None,
        "inference": {
            "confidence": 0.95,
            "method": "t",
            "dof": 12,
            "parameters": {
                "b1": {
                    "estimate": 238.94212917917807,
                    "std_error": 2.7070075241475173,
                    "statistic": 88.26799595040838,
                    "p_value": 2.9856330804900395e-18,
                    "lower": 233.04406645555974,
                    "upper": 244.8401919027964,
                    "lower_found": None,
                    "upper_found": None,
                },
                "b2": {
                    "estimate": 0.0005501564318050633,
                    "std_error": 7.2668688436181515e-06,
                    "statistic": 75.70749433412674,
                    "p_value": 1.8778997380264272e-17,
                    "lower": 0.000534323284737079,
                    "upper": 0.0005659895788730475,
                    "lower_found": None,
                    "upper_found": None,
                },
            },
        },
    },
    "prediction": None,
}


class ExpressionFitResponse(_Answer):
    model_config = ConfigDict(json_schema_extra={"examples": [EXPRESSION_ANSWER_EXAMPLE]})

    model: Literal["expression"] = "expression"
    expression: str = Field(description="The expression fitted (a named model's, if named).")
    named_model: str | None = Field(description="The named model, if one was asked for.")
    params: dict[str, float] = Field(description="The fitted parameters, by name.")
    start: dict[str, float] = Field(
        description="The starting values used (given, or guessed for a named model)."
    )
    loss_history: list[float] = Field(
        description="Mean squared residual Σw·r²/Σw before each iteration (every history_every)."
    )
    history_every: int = Field(description="Epochs between loss_history entries.")
    final_loss: float = Field(description="Mean squared residual at the returned parameters.")
    epochs_run: int = Field(description="Iterations run.")
    n: int = Field(description="Number of data points.")
    stop_reason: StopReason = Field(description="As for the other fits.")
    converged: bool = Field(description="At the optimum (as for the other fits).")
    warnings: list[str] = Field(description="Empty when converged and no bound is active.")
    stats: ExpressionStats
    prediction: Prediction | None = Field(
        None, description="The model at `predict`'s x with its bands; null without `predict`."
    )


class ExpressionBatchItem(_BatchItem[ExpressionFitResponse]):
    pass


class ExpressionBatchResponse(_BatchResponse[ExpressionBatchItem]):
    model: Literal["expression"] = "expression"
    expression: str = Field(description="The expression fitted (a named model's, if named).")
    named_model: str | None = Field(description="The named model, if one was asked for.")


class ModelDescription(_Answer):
    name: str
    expression: str
    parameters: dict[str, str] = Field(description="Each parameter and its meaning.")
    description: str


class ModelList(_Answer):
    models: list[ModelDescription]


# -- evaluation ---------------------------------------------------------------------------------

#: What ``POST /v1/evaluate`` evaluates beside expressions and named models.
BUILT_IN_MODELS = ("linear", "gaussian")
EVALUATE_EXAMPLE: dict[str, Any] = {
    "expression": "b1*(1-exp(-b2*x))",
    "params": {"b1": 238.94212917917807, "b2": 0.0005501564318050633},
    "covariance": [
        [7.3278897357475925, -1.9647394535206385e-05],
        [-1.9647394535206385e-05, 5.2807382790361256e-11],
    ],
    "residual_variance": 0.010379282412033793,
    "dof": 12,
    "x": [100.0, 500.0, 1000.0],
    "confidence": 0.95,
}


class EvaluateRequest(_Strict):
    """A model at new x from a stored fit (no refitting): its value, and with a covariance
    its confidence and prediction bands."""

    model_config = ConfigDict(json_schema_extra={"examples": [EVALUATE_EXAMPLE]})

    expression: str | None = Field(
        None,
        description="y as a function of x and the parameters, as in a fit. Give this or `model`.",
    )
    model: str | None = Field(
        None,
        description='A named model (GET /v1/models), or "linear" (slope, intercept) or '
        '"gaussian" (mean, std: its density at x).',
        examples=["michaelis_menten"],
    )
    parameters: list[str] | None = Field(
        None,
        description="The order of the parameters (the rows and columns of `covariance`). "
        "Omitted: the order of `params`' keys.",
    )
    params: dict[str, FiniteFloat] = Field(
        description="The parameter values, by name (every parameter of the model)."
    )
    covariance: list[list[FiniteFloat]] | None = Field(
        None,
        description="The parameters' covariance (k x k, in the order of `parameters`), as a "
        "fit answers it in `stats.covariance`. Omitted: the bounds are null.",
    )
    residual_variance: Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0)] | None = (
        Field(
            None,
            description="s², the residual variance of the fit (its `stats.residual_std`²; 1 "
            "with absolute_sigma), for the prediction band. Omitted: obs bounds are null.",
        )
    )
    dof: Annotated[int, Field(strict=True, ge=1, le=10**12)] | None = Field(
        None,
        description="The fit's residual degrees of freedom (`stats.dof`): Student's t "
        "quantiles. Omitted: the normal quantile.",
    )
    x: NewPoints | dict[str, NewPoints] = Field(description=PREDICT_X_DESCRIPTION)
    confidence: Confidence = Field(
        options.DEFAULT_CONFIDENCE, description="Confidence level of the bands."
    )

    @field_validator("x")
    @classmethod
    def _x_within(cls, x: Any, info: ValidationInfo) -> Any:
        return _points_within(x, info)

    @field_validator("covariance")
    @classmethod
    def _square(cls, covariance: list[list[float]] | None) -> Any:
        if covariance is not None and any(len(row) != len(covariance) for row in covariance):
            raise PydanticCustomError("not_square", "the covariance must be a square matrix", {})
        return covariance


class EvaluateResponse(_Answer):
    model: str | None = Field(description="The named or built-in model, or null (expression).")
    expression: str | None = Field(description="The expression evaluated (a named model's).")
    parameters: list[str] = Field(description="The parameters, in the covariance's order.")
    prediction: Prediction


# -- model comparison ---------------------------------------------------------------------------

COMPARE_EXAMPLE: dict[str, Any] = {
    "x": [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0],
    "y": [1.02, 2.95, 7.1, 12.8, 21.2, 30.9, 43.1, 57.2, 72.8, 91.1],
    "models": [
        {"model": "linear"},
        {"expression": "a + b*x + c*x**2", "parameters": {"a": 0.0, "b": 1.0, "c": 0.0}},
        {
            "expression": "a + b*x + c*x**2 + d*x**3",
            "parameters": {"a": 0.0, "b": 1.0, "c": 0.0, "d": 0.0},
        },
    ],
    "nested": [[0, 1], [1, 2]],
}
#: At most this many models in one comparison.
MAX_COMPARED = 16
NonNegativeIndex = Annotated[int, Field(strict=True, ge=0, lt=MAX_COMPARED)]


class CompareModel(_Strict):
    """One model of a comparison: an expression with its starting values, a named model, or
    the built-in line."""

    expression: str | None = Field(None, description="As in `POST /v1/fits/expression`.")
    model: str | None = Field(
        None,
        description='A named model (GET /v1/models), or "linear" (slope, intercept, fitted '
        "exactly by Newton's method).",
    )
    parameters: dict[str, FiniteFloat] | None = Field(
        None, description="Starting values, as in `POST /v1/fits/expression`."
    )
    bounds: dict[str, Bound] | None = Field(
        None, description="Bounds, as in `POST /v1/fits/expression`."
    )


class CompareRequest(_Reporting, _LeastSquaresReporting, _SigmaAsWeights):
    """Fit several models to one data set, and rank them."""

    model_config = ConfigDict(json_schema_extra={"examples": [COMPARE_EXAMPLE]})

    x: Points | dict[str, Points] = Field(description=X_DESCRIPTION)
    y: Points = Field(description="The observations, one per point.")
    weights: list[Weight] | None = Field(None, description=WEIGHTS_DESCRIPTION)
    sigma: list[Sigma] | None = Field(None, description=SIGMA_DESCRIPTION)
    models: list[CompareModel] = Field(
        min_length=1,
        max_length=MAX_COMPARED,
        description=f"The models (at most {MAX_COMPARED}), each fitted to the data by least "
        "squares, in this order.",
    )
    nested: list[tuple[NonNegativeIndex, NonNegativeIndex]] | None = Field(
        None,
        description="Pairs [restricted, full] of indices into `models` where the restricted "
        "model is the full one with some parameters fixed: each gets an F-test.",
    )
    epochs: EpochCount = Field(
        DEFAULT_EXPRESSION_EPOCHS, description="Most iterations of each model's fit."
    )
    timeout_s: PositiveFloat | None = Field(
        None, description="Wall-clock budget of each model's fit, as for the other fits."
    )

    @field_validator("sigma")
    @classmethod
    def _sigma_match(cls, sigma: list[float] | None, info: ValidationInfo) -> Any:
        return _sigma_usable(sigma, info, "y")


class Ranked(_Answer):
    index: int = Field(description="The model's position in `models` (and `fits`).")
    aicc: float | None = Field(
        description="AICc = AIC + 2k(k+1)/(n - k - 1), k the model's parameters and n the "
        "points with positive weight (null when n - k - 1 <= 0 or the fit is exact)."
    )
    bic: float | None = Field(description="The fit's BIC, as in its `stats.bic`.")
    delta_aicc: float | None = Field(description="aicc minus the smallest aicc.")
    akaike_weight: float | None = Field(
        description="exp(-delta_aicc/2) / Σ exp(-delta_aicc/2): the weight of evidence for "
        "this model among those compared (they sum to 1)."
    )


class FTest(_Answer):
    restricted: int = Field(description="Index of the restricted (smaller) model.")
    full: int = Field(description="Index of the full model.")
    f: float | None = Field(
        description="((rss_r - rss_f)/(k_f - k_r)) / (rss_f/dof_f): the F statistic, as "
        "statsmodels' compare_f_test."
    )
    p_value: float | None = Field(
        description="P(F >= f) with (k_f - k_r, dof_f) degrees of freedom: small when the "
        "full model's extra parameters fit significantly better."
    )


class CompareResponse(_Answer):
    ranking: list[Ranked] = Field(description="The models, best (smallest AICc) first.")
    f_tests: list[FTest] = Field(description="One per `nested` pair, in its order.")
    fits: list[ExpressionFitResponse | LinearFitResponse] = Field(
        description="Each model's full fit answer, in request order."
    )


# -- global fits ----------------------------------------------------------------------------

#: Most parameters of one global fit (shared + sets x locals): its normal matrix is that
#: square, inverted once for the covariance.
MAX_GLOBAL_PARAMETERS = 2000
GLOBAL_EXAMPLE: dict[str, Any] = {
    "expression": "a*exp(-k*t) + c",
    "parameters": {"a": 1000.0, "k": 0.001, "c": 0.0},
    "shared": ["k"],
    "datasets": [
        {
            "x": {"t": [0.0, 600.0, 1200.0, 1800.0, 2400.0, 3000.0]},
            "y": [1203.1, 662.4, 368.9, 204.2, 113.0, 63.5],
        },
        {
            "x": {"t": [0.0, 500.0, 1000.0, 2000.0, 4000.0]},
            "y": [2500.4, 1841.1, 1356.0, 736.9, 217.3],
        },
    ],
}


class GlobalFitRequest(_ExpressionModel, _Reporting, _Starts):
    """One expression fitted to several data sets at once, some parameters shared by all of
    them and the others each set's own: one least-squares problem."""

    model_config = ConfigDict(json_schema_extra={"examples": [GLOBAL_EXAMPLE]})

    shared: list[str] = Field(
        description="The parameters common to every set; each other parameter is fitted per "
        "set (reported as name[i] for set i).",
        examples=[["k"]],
    )
    datasets: list[ExpressionData] = Field(
        min_length=1,
        description="The data sets, each its own x (the same variables), y and optional "
        "weights or sigma. Their points x parameters count against "
        "TAPEFIT_MAX_EXPRESSION_WORK, and shared + sets x locals may be at most "
        f"{MAX_GLOBAL_PARAMETERS}.",
    )
    bounds: dict[str, Bound] | None = Field(
        None, description="Bounds by parameter name, as for an expression fit (every set's)."
    )
    epochs: EpochCount = Field(DEFAULT_EXPRESSION_EPOCHS, description="Most iterations.")
    timeout_s: PositiveFloat | None = Field(
        None, description="Wall-clock budget in seconds, as for the other fits."
    )


class GlobalDatasetParams(_Answer):
    params: dict[str, float] = Field(description="This set's own (local) parameters.")


class GlobalStats(_Answer):
    parameters: list[str] = Field(
        description="The order of the covariance: the shared parameters by name, then each "
        "set's locals as name[i]."
    )
    n_used: int = Field(description="Points with positive weight, all sets together.")
    dof: int = Field(description="n_used - shared - sets x locals.")
    rss: float | None = Field(description="Σw·r² over every set.")
    residual_std: float | None = Field(description="sqrt(rss / dof).")
    std_errors: dict[str, float | None] = Field(
        description="sqrt of the covariance diagonal, keyed as `parameters`."
    )
    covariance: list[list[float | None]] = Field(
        description="s²·(JᵀJ)⁻¹ of the whole stacked problem (shared-local blocks included), "
        "s² = rss/dof."
    )
    correlation: list[list[float | None]] = Field(description="Correlation of the parameters.")
    inference: Inference
    starts: Starts | None = Field(None, description="With `starts` > 1.")


class GlobalFitResponse(_Answer):
    model_config = ConfigDict(extra="forbid")

    expression: str = Field(description="The expression fitted (a named model's, if named).")
    named_model: str | None = Field(description="The named model, if one was asked for.")
    shared: dict[str, float] = Field(description="The shared parameters' values.")
    datasets: list[GlobalDatasetParams] = Field(description="Each set's local parameters.")
    loss_history: list[float] = Field(description="rss / Σw before each iteration.")
    epochs_run: int = Field(description="Iterations run.")
    stop_reason: StopReason = Field(description="As for the other fits.")
    converged: bool = Field(description="At the optimum of the stacked problem.")
    warnings: list[str] = Field(description="Why not to trust the answer as it is, if so.")
    stats: GlobalStats
