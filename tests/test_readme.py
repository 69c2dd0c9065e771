"""The README runs: its curl examples, executed against a real server, print what it shows.

Every `curl` command in the shell blocks of the README and docs/api.md is run (against a real
server on a free loopback port, from the repository root, so `@docs/...` files resolve). The
output shown under it, in `# ...` comment lines, is elided with "..." where it is long. Every
`"name":value` pair it shows (a number, string, true, false, null, or a list of numbers, whose
shown elements may be elided in the middle or at the end) must be printed under that name, in
the order shown. Strings and literals must match exactly; numbers to a relative
:data:`TOLERANCE`, since the last digits of a float depend on the CPU's vector kernels (XLA and
oneDNN pick them per machine).
"""

from __future__ import annotations

import math
import re
import subprocess
from pathlib import Path

import pytest

from tests.server import Server

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parents[1]
DOCUMENTS = ("README.md", "docs/api.md")
#: Numbers shown and printed agree to this, relatively.
TOLERANCE = 1e-12
NUMBER = r"-?\d[\d.eE+-]*"
SCALAR = rf'{NUMBER}|"(?:[^"\\]|\\.)*"|true|false|null'
#: A pair: its name and a scalar, or a list of numbers (elided with ... or not).
PAIR = re.compile(rf'"(\w+)":(?:({SCALAR})(?=[,}}\]])|\[((?:(?:{NUMBER}|\.\.\.),?)*)(\]?))')


def pairs(text: str) -> list[tuple[str, str | None, list[str], bool]]:
    """(name, scalar or None, list elements, whether the list is shown whole) in order."""
    return [
        (m[1], m[2], [e for e in m[3].split(",") if e] if m[2] is None else [], m[4] == "]")
        for m in PAIR.finditer(text)
    ]


def _same(shown: str, printed: str) -> bool:
    if re.fullmatch(NUMBER, shown) and re.fullmatch(NUMBER, printed):
        a, b = float(shown), float(printed)
        return math.isclose(a, b, rel_tol=TOLERANCE)
    return shown == printed


def _same_list(shown: list[str], whole: bool, printed: list[str]) -> bool:
    head = shown[: shown.index("...")] if "..." in shown else shown
    tail = shown[shown.index("...") + 1 :] if "..." in shown else []
    if whole and "..." not in shown and len(shown) != len(printed):
        return False
    if len(head) + len(tail) > len(printed):
        return False
    ends = zip(tail, printed[len(printed) - len(tail) :], strict=True) if tail else iter(())
    return all(_same(a, b) for a, b in zip(head, printed, strict=False)) and all(
        _same(a, b) for a, b in ends
    )


def missing(shown: str, output: str) -> list[str]:
    """The pairs shown that the output does not print: each shown pair is compared with the
    next printed pair of its name after the previous match (numbers to TOLERANCE), so a
    value printed under the same name elsewhere in the answer does not stand in for it."""
    printed = pairs(output)
    at, absent = 0, []
    for name, scalar, elements, whole in pairs(shown):
        i = next((i for i in range(at, len(printed)) if printed[i][0] == name), None)
        if i is not None:
            _, other_scalar, other_elements, _ = printed[i]
            if scalar is not None and other_scalar is not None:
                same = _same(scalar, other_scalar)
            else:
                same = scalar is None and other_scalar is None
                same = same and _same_list(elements, whole, other_elements)
            if same:
                at = i + 1
                continue
        absent.append(f'"{name}":{scalar if scalar is not None else elements}')
    return absent


def examples() -> list[tuple[str, str]]:
    """(command, the output shown under it) for every curl command of the documents."""
    text = "\n".join((ROOT / name).read_text() for name in DOCUMENTS)
    found = []
    for block in re.findall(r"```sh\n(.*?)```", text, flags=re.S):
        lines = block.splitlines()
        i = 0
        while i < len(lines):
            if not lines[i].startswith("curl "):
                i += 1
                continue
            command = lines[i]
            while command.endswith("\\") or command.count("'") % 2:
                i += 1
                if command.endswith("\\"):  # a continued line
                    command = command[:-1] + " " + lines[i].strip()
                else:  # a line break inside a quoted body
                    command += "\n" + lines[i]
            command, _, shown = command.partition("   # ")
            i += 1
            while i < len(lines) and lines[i].startswith("#"):
                text = lines[i].lstrip("#").strip()
                # A wrapped line inside a JSON string stood for one space.
                shown += (" " if _unescaped_quotes(shown) % 2 else "") + text
                i += 1
            found.append((command, shown))
    return found


def _unescaped_quotes(text: str) -> int:
    return len(re.findall(r'(?<!\\)"', text))


EXAMPLES = examples()


def test_the_readme_has_its_examples() -> None:
    assert len(EXAMPLES) >= 8
    assert sum(len(pairs(shown)) for _, shown in EXAMPLES) >= 60
    assert sum(len(elements) for _, shown in EXAMPLES for *_, elements, _ in pairs(shown)) >= 6


def _perturbed(text: str, relative: float) -> str:
    """Every non-zero number of ``text`` moved by ``relative``."""

    def move(match: re.Match[str]) -> str:
        value = float(match[0])
        return repr(value * (1.0 + relative)) if value else match[0]

    return re.sub(rf"(?<=[:\[,]){NUMBER}(?=[,\]}}])", move, text)


OUTPUT = (
    '{"params":{"slope":1.0021168180204543,"intercept":-0.2623230737738709},'
    '"loss_history":[123034.4680694713,78742.32573844695,7.5,1.25],"n":36,"seed":null}'
)


@pytest.mark.parametrize(
    ("shown", "absent"),
    [
        ('{"params":{"slope":1.0021168180204543,"intercept":-0.2623230737738709},"n":36}', []),
        ('"loss_history":[123034.4680694713,78742.32573844695,...]', []),
        ('"loss_history":[123034.4680694713,...,1.25]', []),
        ('"loss_history":[123034.4680694713,78742.32573844695,7.5,1.25],"seed":null', []),
        # a different number, a list shown whole that is longer, the wrong order, a name
        ('"slope":1.00211681803}', ['"slope":1.00211681803']),
        (
            '"loss_history":[123034.4680694713,7.5]',
            ["\"loss_history\":['123034.4680694713', '7.5']"],
        ),
        ('"n":36,"slope":1.0021168180204543}', ['"slope":1.0021168180204543']),
        ('"seed":0}', ['"seed":0']),
    ],
)
def test_shown_output_is_compared_by_name_order_and_value(shown: str, absent: list[str]) -> None:
    assert missing(shown, OUTPUT) == absent


def test_the_comparison_ignores_the_last_digits_and_sees_the_tenth() -> None:
    """Every example's shown output, with its numbers moved in their last digits, still
    matches what it showed (as another CPU prints it); moved in the 9th digit, it does not."""
    for _, shown in EXAMPLES:
        assert missing(shown, _perturbed(shown, 4e-16 * 8)) == []
    moved = [shown for _, shown in EXAMPLES if pairs(_perturbed(shown, 1e-9)) != pairs(shown)]
    assert len(moved) >= 4
    assert all(missing(shown, _perturbed(shown, 1e-9)) for shown in moved)


@pytest.mark.parametrize(("command", "shown"), EXAMPLES, ids=[c[:60] for c, _ in EXAMPLES])
def test_a_readme_example_prints_what_it_shows(
    live_server: Server, command: str, shown: str
) -> None:
    run = subprocess.run(
        ["bash", "-c", command.replace("localhost:8000", live_server.url.removeprefix("http://"))],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    output = run.stdout
    absent = missing(shown, output)
    assert absent == [], f"{command}\nshown but not printed: {absent}\nprinted: {output[:2000]}"
