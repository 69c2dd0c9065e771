"""The install is reproducible: what runs is exactly what the locks pin."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).parents[1]
PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==([^\s;\\]+)")


def pins(lock: str) -> dict[str, str]:
    found = {}
    for line in (ROOT / "requirements" / lock).read_text().splitlines():
        if match := PIN.match(line):
            found[_canonical(match[1])] = match[2]
    return found


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_locked_package_is_installed_at_its_pinned_version() -> None:
    locked = pins("test.lock")
    assert len(locked) > 50
    wrong = {
        name: (version, metadata.version(name))
        for name, version in locked.items()
        if metadata.version(name) != version
    }
    assert wrong == {}


def test_every_line_is_hashed_and_the_locks_agree() -> None:
    for lock in ("run.lock", "test.lock", "mutate.lock"):
        text = (ROOT / "requirements" / lock).read_text()
        assert text.count("==") == len(pins(lock))
        assert text.count("--hash=sha256:") >= len(pins(lock))
    run, test, mutate = pins("run.lock"), pins("test.lock"), pins("mutate.lock")
    assert {name: test.get(name) for name in run} == run
    assert {name: mutate.get(name) for name in test} == test


def test_every_declared_dependency_is_locked() -> None:
    requires = [Requirement(r) for r in metadata.requires("tapefit") or []]

    def declared(*extras: str) -> set[str]:
        return {
            _canonical(r.name)
            for r in requires
            if r.marker is None or any(r.marker.evaluate({"extra": extra}) for extra in extras)
        }

    assert declared("server", "test", "numpy") <= set(pins("test.lock"))
    assert declared("server", "numpy") <= set(pins("run.lock"))
    assert {"tensorflow-cpu", "fastapi"} <= declared("server") - declared()  # not the client's
    assert declared() == {"httpx", "pydantic"}  # the light client
    assert {"mutmut"} <= set(pins("mutate.lock"))
    assert "setuptools" in pins("run.lock")  # the build backend, for --no-build-isolation
