"""`make mutate`'s report: the survival rate and every mutant that no test killed, by function.

Reads what mutmut left in mutants/ (its CI/CD stats and `mutmut results`) and writes
mutants/report.md; tests/mutation.md keeps the last full run's report with the explanations.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

MUTANTS = Path("mutants")
# `mutmut results` prints "    service.api.schemas.x_name__mutmut_3: survived".
_LINE = re.compile(r"^\s*(?P<name>[\w.ǁ]+)__mutmut_(?P<n>\d+): (?P<status>.+)$")


def _function(name: str) -> str:
    module, _, mangled = name.rpartition(".")
    return f"{module}.{mangled.removeprefix('x_').removeprefix('xǁ').replace('ǁ', '.')}"


def report(stats: dict[str, int], results: str) -> str:
    by_status: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for line in results.splitlines():
        match = _LINE.match(line)
        if match and match["status"] != "killed":
            by_status[match["status"]][_function(match["name"])].append(match["n"])
    checked = stats["killed"] + stats["survived"] + stats["timeout"] + stats["suspicious"]
    unchecked = stats["total"] - checked - stats["no_tests"] - stats["skipped"]
    rate = stats["survived"] / checked if checked else float("nan")
    lines = [
        "# Mutation report",
        "",
        f"{stats['total']} mutants; {stats['killed']} killed, {stats['survived']} survived, "
        f"{stats['timeout']} timed out, {stats['no_tests']} reached by no selected test, "
        f"{stats['skipped']} skipped, {unchecked} not checked.",
        "",
        f"**Survival rate: {rate:.1%}** of the {checked} mutants that tests ran against.",
    ]
    for status in ("survived", "no tests", "timeout", "suspicious"):
        functions = by_status.get(status, {})
        if not functions:
            continue
        lines += ["", f"## {status.capitalize()}", "", "| function | mutants |", "|---|---|"]
        for function, numbers in sorted(functions.items()):
            lines.append(f"| `{function}` | {', '.join(numbers)} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    stats = json.loads((MUTANTS / "mutmut-cicd-stats.json").read_text())
    mutmut = Path(sys.executable).with_name("mutmut")
    results = subprocess.run(
        [str(mutmut), "results", "--all", "true"], capture_output=True, text=True, check=True
    ).stdout
    text = report(stats, results)
    (MUTANTS / "report.md").write_text(text)
    print(text.split("\n## ", 1)[0])
    print(f"Every surviving mutant, by function: {MUTANTS / 'report.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
