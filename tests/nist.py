"""NIST StRD nonlinear regression files (tests/data/nist/strd/): data, model text, both
starting points, certified values, and the LRE score (correct significant digits)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

DIRECTORY = Path(__file__).parent / "data" / "nist" / "strd"
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"


@dataclass(frozen=True)
class Problem:
    name: str
    expression: str  # NIST's model text, brackets as parentheses, arctan as atan
    variables: tuple[str, ...]
    starts: tuple[dict[str, float], dict[str, float]]
    certified: dict[str, float]
    certified_se: dict[str, float]
    rss: float
    x: dict[str, npt.NDArray[np.float64]]
    y: npt.NDArray[np.float64]  # log(y) for Nelson, whose model is of log(y)


def load(name: str) -> Problem:
    lines = (DIRECTORY / f"{name}.dat").read_text().splitlines()
    model_at = next(i for i, line in enumerate(lines) if line.startswith("Model:"))
    start_at = next(
        i
        for i, line in enumerate(lines)
        if i > model_at and re.match(r"\s+Starting [vV]alues", line)
    )
    text = " ".join(line.strip() for line in lines[model_at + 2 : start_at] if line.strip())
    text = text.split("=", 1)[1] if not text.startswith("pi") else text.split("y =")[1]
    text = text.rsplit("+  e", 1)[0].rsplit("+ e", 1)[0].strip()
    text = text.replace("[", "(").replace("]", ")").replace("arctan", "atan")
    params: dict[str, tuple[float, float, float, float]] = {}
    for line in lines[start_at:]:
        match = re.match(
            rf"\s+(b\d+)\s*=\s*({_NUMBER})\s+({_NUMBER})\s+({_NUMBER})\s+({_NUMBER})", line
        )
        if match:
            params[match.group(1)] = tuple(float(g) for g in match.groups()[1:])  # type: ignore[assignment]
    rss = float(
        next(re.findall(_NUMBER, line)[-1] for line in lines if "Residual Sum of Squares" in line)
    )
    data_at = max(i for i, line in enumerate(lines) if re.match(r"Data:\s+y\s", line))
    columns = lines[data_at].split()[1:]
    values = np.array(
        [[float(v) for v in line.split()] for line in lines[data_at + 1 :] if line.strip()]
    )
    y = values[:, 0]
    if name == "Nelson":
        y = np.log(y)
    variables = tuple(columns[1:])
    return Problem(
        name=name,
        expression=text,
        variables=variables,
        starts=(
            {b: v[0] for b, v in params.items()},
            {b: v[1] for b, v in params.items()},
        ),
        certified={b: v[2] for b, v in params.items()},
        certified_se={b: v[3] for b, v in params.items()},
        rss=rss,
        x={name: values[:, j + 1] for j, name in enumerate(variables)},
        y=y,
    )


def names() -> list[str]:
    return sorted(path.stem for path in DIRECTORY.glob("*.dat"))


def lre(value: float, certified: float, digits: float = 11.0) -> float:
    """Correct significant digits, capped at ``digits`` (NIST certifies 11)."""
    if value == certified:
        return digits
    if not math.isfinite(value):
        return 0.0
    error = abs(value - certified) / abs(certified)
    return min(digits, -math.log10(error)) if error > 0 else digits


def json_x(problem: Problem) -> Any:
    """The problem's predictors as a fit body's ``x``: a list, or named lists."""
    if problem.variables == ("x",):
        return problem.x["x"].tolist()
    return {name: values.tolist() for name, values in problem.x.items()}


def check_certified(fit: dict[str, Any], problem: Problem) -> None:
    """The bar an HTTP fit answer must meet: converged without warnings, 6 certified digits
    in every parameter, 4 in every standard error, 5.5 in the RSS (Lanczos1's, 1.4e-25,
    comes out with 5.9: the residuals are taken at the parameters rounded to float64), and
    NIST's degrees of freedom."""
    assert fit["converged"] and fit["warnings"] == [], fit["warnings"]
    digits = {b: lre(fit["params"][b], problem.certified[b]) for b in problem.certified}
    se = fit["stats"]["std_errors"]
    se_digits = {b: lre(se[b], problem.certified_se[b]) for b in problem.certified}
    assert min(digits.values()) >= 6, digits
    assert min(se_digits.values()) >= 4, se_digits
    assert lre(fit["stats"]["rss"], problem.rss) >= 5.5
    assert fit["stats"]["dof"] == problem.y.size - len(problem.certified)
