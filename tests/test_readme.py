"""The README runs: its curl examples, executed against a real server, print what it shows.

Every `curl` command in the shell blocks of the README and docs/api.md is run (against a real
server on a free loopback port, from the repository root, so `@docs/...` files resolve). The
output shown under it, in `# ...` comment lines, is elided with "..." where it is long; every
complete `"name":value` pair it shows (a number, string, true, false, null, or []) must appear
in the real output exactly.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server import Server, serve

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parents[1]
DOCUMENTS = ("README.md", "docs/api.md")
PAIR = re.compile(r'"\w+":(?:-?\d[\d.e+-]*|"(?:[^"\\]|\\.)*"|true|false|null|\[\])(?=[,}\]])')


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


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with serve() as running:
        yield running


EXAMPLES = examples()


def test_the_readme_has_its_examples() -> None:
    assert len(EXAMPLES) >= 8
    assert sum(len(PAIR.findall(shown)) for _, shown in EXAMPLES) >= 60


@pytest.mark.parametrize(("command", "shown"), EXAMPLES, ids=[c[:60] for c, _ in EXAMPLES])
def test_a_readme_example_prints_what_it_shows(server: Server, command: str, shown: str) -> None:
    run = subprocess.run(
        ["bash", "-c", command.replace("localhost:8000", server.url.removeprefix("http://"))],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    output = run.stdout
    missing = [pair for pair in PAIR.findall(shown) if pair not in output]
    assert missing == [], f"{command}\nshown but not printed: {missing}\nprinted: {output[:2000]}"
