"""scripts/check_disk.py, the set-up's first step: it refuses to start a venv build that the disk cannot hold
(the CI run of 2026-12-01 died of ENOSPC half-way through pip), and lets an already-built venv through."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "check_disk.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)


def test_too_little_free_space_is_refused_with_the_numbers_and_the_fix(tmp_path: Path) -> None:
    venv = tmp_path / "not-yet" / ".venv"
    r = _run(str(venv), "1000000")  # a million GiB: more than any disk here has
    assert r.returncode == 1
    assert f"GiB free on the file system of {tmp_path}" in r.stderr
    assert "needs about 1e+06 GiB" in r.stderr and "Free some space" in r.stderr and "VENV=" in r.stderr
    assert not venv.exists()  # it only looks


def test_enough_space_or_a_built_venv_passes(tmp_path: Path) -> None:
    venv = tmp_path / ".venv"
    assert _run(str(venv), "0.001").returncode == 0
    (venv / "lib" / "python3.11" / "site-packages" / "torch").mkdir(parents=True)
    assert _run(str(venv), "1000000").returncode == 0  # torch already installed: nothing big left to do


def test_wrong_usage_exits_2() -> None:
    assert _run().returncode == 2
