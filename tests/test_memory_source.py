"""Where the memory budget comes from: the container's cgroup limit (v2, then v1), else the
machine's RAM. This machine has no cgroup memory limit, so the files are simulated: a limit
as a number, v2's "max" (no limit), v1's "no limit" (a huge number), none at all."""

from __future__ import annotations

from pathlib import Path

import pytest

from service import admission, worker
from service.admission import memory_limit
from service.worker import (
    BUDGET_SHARE,
    FIT_PROCESS_RESERVE_BYTES,
    MIN_BUDGET_BYTES,
    auto_memory_budget,
)

GIB = 1 << 30
RAM = 24 * GIB


@pytest.fixture
def machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A /proc/meminfo of 24 GiB, and empty cgroup v2 and v1 places under ``tmp_path``."""
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(f"MemTotal:       {RAM // 1024} kB\nMemFree:        1000 kB\n")
    monkeypatch.setattr(admission, "MEMINFO", meminfo)
    (tmp_path / "v1").mkdir()
    monkeypatch.setattr(
        admission,
        "CGROUP_LIMITS",
        (tmp_path / "memory.max", tmp_path / "v1" / "memory.limit_in_bytes"),
    )
    return tmp_path


@pytest.mark.parametrize(
    ("v2", "v1", "expected"),
    [
        (str(2560 << 20), None, 2560 << 20),  # v2, the deployment's 2,560 MiB
        ("max", None, RAM),  # v2 without a limit
        ("max", str(3 * GIB), 3 * GIB),  # v2 says nothing: v1 is read
        (None, str(1792 << 20), 1792 << 20),  # v1 only
        (None, "9223372036854771712", RAM),  # v1 without a limit: its huge number
        (str(64 * GIB), None, RAM),  # a limit above the RAM: the RAM binds
        (None, None, RAM),  # no cgroup files at all
        ("garbage\n", None, RAM),
    ],
)
def test_the_limit_is_the_cgroups_else_the_ram(
    machine: Path, v2: str | None, v1: str | None, expected: int
) -> None:
    if v2 is not None:
        (machine / "memory.max").write_text(v2 + "\n")
    if v1 is not None:
        (machine / "v1" / "memory.limit_in_bytes").write_text(v1 + "\n")
    assert memory_limit() == expected


def test_the_budget_follows_the_limit(machine: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """95% of the limit less what the server holds, its parser processes' and its fit
    process's reserves; never below the floor."""
    (machine / "memory.max").write_text(f"{2560 << 20}\n")
    held = 900 << 20
    monkeypatch.setattr(worker, "rss_bytes", lambda pids: held)
    limit = memory_limit()
    budget = auto_memory_budget(limit, parse_processes=1, fit_processes=1)
    parser = worker.PARSER_RESERVE_BYTES
    assert budget == int(BUDGET_SHARE * (2560 << 20)) - held - parser - FIT_PROCESS_RESERVE_BYTES
    assert budget < limit - held
    assert auto_memory_budget(300 << 20, 1, 1) == MIN_BUDGET_BYTES
