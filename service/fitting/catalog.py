"""Named models: common curves by name, with automatic starting values (like lmfit's
``guess()``). Plain data here (no numpy: the schemas list the names); the guesses are in
:mod:`service.fitting.guesses`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class NamedModel:
    name: str
    expression: str
    parameters: tuple[str, ...]
    description: str
    #: What each parameter means.
    meaning: tuple[tuple[str, str], ...]


def _polynomial(degree: int) -> NamedModel:
    names = tuple(f"c{i}" for i in range(degree + 1))
    terms = ["c0"] + [f"c{i}*x" + (f"**{i}" if i > 1 else "") for i in range(1, degree + 1)]
    return NamedModel(
        name=f"polynomial{degree}",
        expression=" + ".join(terms),
        parameters=names,
        description=f"Polynomial of degree {degree} (linear least squares: the guess is the "
        "exact fit).",
        meaning=tuple((n, f"coefficient of x**{i}") for i, n in enumerate(names)),
    )


NAMED_MODELS: tuple[NamedModel, ...] = (
    NamedModel(
        "exponential_decay",
        "a*exp(-k*x) + c",
        ("a", "k", "c"),
        "Exponential decay (or growth, k < 0) towards a baseline.",
        (("a", "amplitude at x = 0, above the baseline"), ("k", "rate"), ("c", "baseline")),
    ),
    NamedModel(
        "logistic",
        "L/(1 + exp(-k*(x - x0)))",
        ("L", "k", "x0"),
        "Logistic (sigmoid) growth curve.",
        (("L", "plateau"), ("k", "steepness"), ("x0", "midpoint")),
    ),
    NamedModel(
        "power_law",
        "a*x**b",
        ("a", "b"),
        "Power law (x > 0).",
        (("a", "value at x = 1"), ("b", "exponent")),
    ),
    NamedModel(
        "michaelis_menten",
        "vmax*x/(km + x)",
        ("vmax", "km"),
        "Michaelis-Menten saturation (enzyme kinetics, dose-response).",
        (("vmax", "maximum rate"), ("km", "x at half the maximum rate")),
    ),
    NamedModel(
        "gaussian_peak",
        "a*exp(-(x - mu)**2/(2*sigma**2))",
        ("a", "mu", "sigma"),
        "Gaussian peak.",
        (("a", "height"), ("mu", "centre"), ("sigma", "width (standard deviation)")),
    ),
    NamedModel(
        "lorentzian_peak",
        "a*gamma**2/((x - x0)**2 + gamma**2)",
        ("a", "x0", "gamma"),
        "Lorentzian (Cauchy) peak.",
        (("a", "height"), ("x0", "centre"), ("gamma", "half width at half maximum")),
    ),
    NamedModel(
        "sinusoid",
        "a*sin(2*pi*f*x + phi) + c",
        ("a", "f", "phi", "c"),
        "Sinusoid with an offset.",
        (
            ("a", "amplitude"),
            ("f", "frequency (cycles per unit x)"),
            ("phi", "phase"),
            ("c", "offset"),
        ),
    ),
    *(_polynomial(degree) for degree in range(1, 7)),
)
BY_NAME = {model.name: model for model in NAMED_MODELS}
NAMES = tuple(BY_NAME)
