"""The fit report: any single fit's answer as plain text (``Accept: text/plain``), laid out
like statsmodels' ``summary()`` and lmfit's ``fit_report()``.

Every number is the JSON answer's, written with Python's ``repr`` (the shortest text that
reads back as the same float64), so the report and the JSON never disagree by a digit.
"""

from __future__ import annotations

from typing import Any

from service.api.schemas import EXPRESSION_ANSWER_EXAMPLE

TEXT = "text/plain"
WIDTH = 78


def wants_text(accept: str) -> bool:
    """The caller asked for the report: text/plain before (or without) application/json."""
    accept = accept.lower()
    if TEXT not in accept:
        return False
    json_at = accept.find("application/json")
    return json_at < 0 or accept.find(TEXT) < json_at


def _number(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def report(answer: dict[str, Any]) -> str:
    """The report of a fit answer (the JSON of any single fit, as a dict)."""
    stats = answer["stats"]
    inference = stats["inference"]
    model = answer.get("expression") or answer["model"]
    rule = "=" * WIDTH
    lines = [rule, f"tapefit fit report: {model}".center(WIDTH).rstrip(), rule]
    facts = [
        ("points", answer["n"]),
        ("points used", stats["n_used"]),
        ("parameters", len(stats["parameters"])),
        ("residual dof", stats["dof"]),
        ("epochs run", answer["epochs_run"]),
        ("stop reason", answer["stop_reason"]),
        ("converged", answer["converged"]),
        ("final loss", answer["final_loss"]),
    ]
    for name in ("rss", "residual_std", "r_squared", "chi2", "chi2_p_value"):
        if name in stats:
            facts.append((name, stats[name]))
    facts += [
        ("log-likelihood", stats["log_likelihood"]),
        ("AIC", stats["aic"]),
        ("BIC", stats["bic"]),
    ]
    lines += [f"{name + ':':<16}{_number(value)}" for name, value in facts]
    method = inference["method"]
    distribution = {"t": f"Student's t, {inference['dof']} dof", "normal": "normal"}.get(
        method, f"profile likelihood; tests: Student's t, {inference['dof']} dof"
    )
    lines += [
        "-" * WIDTH,
        f"Parameters ({distribution}; intervals at confidence {_number(inference['confidence'])})",
        "-" * WIDTH,
    ]
    columns = ("estimate", "std_error", "statistic", "p_value", "lower", "upper")
    for name, row in inference["parameters"].items():
        lines.append(f"{name}:")
        for column in columns:
            value = _number(row[column])
            if column in ("lower", "upper") and row.get(f"{column}_found") is False:
                value += "  (not found: the profile is too flat)"
            lines.append(f"    {column + ':':<12}{value}")
    names = stats["parameters"]
    correlation = stats["correlation"]
    pairs = [
        f"    C({names[i]}, {names[j]}) = {_number(correlation[i][j])}"
        for i in range(len(names))
        for j in range(i + 1, len(names))
    ]
    if pairs:
        lines += ["-" * WIDTH, "Correlations", "-" * WIDTH, *pairs]
    if answer["warnings"]:
        lines += ["-" * WIDTH, "Warnings", "-" * WIDTH]
        lines += [f"[{i}] {warning}" for i, warning in enumerate(answer["warnings"], 1)]
    lines.append(rule)
    return "\n".join(lines) + "\n"


#: The report of the documented expression answer (NIST's Misra1a), shown in /docs.
EXAMPLE = report(EXPRESSION_ANSWER_EXAMPLE)
