"""benchmarks/gpu_check.sh is ready for a lent GPU machine: its dry run lists every check with what would run
and why the rest is skipped; on a machine without a GPU a real run skips the GPU checks with reasons, still
runs what it can, and writes its JSON."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

CHECKS = ["environment", "cuda_layer", "event_timing", "torch_cuda", "pytest_markers", "bench_cuda", "tensorrt_engine"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable}, timeout=300)


def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path: Path) -> None:
    r = _run("--dry-run", "--out", str(tmp_path / "x.json"))
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith(("run ", "skip"))]
    assert [ln.split()[1] for ln in lines] == CHECKS
    assert all(ln.split(maxsplit=2)[2:] for ln in lines if ln.startswith("skip")), "every skip says why"
    assert "dry run: nothing executed" in r.stdout and not (tmp_path / "x.json").exists()


def test_without_a_gpu_it_skips_with_reasons_and_writes_json(tmp_path: Path) -> None:
    import torch
    if torch.cuda.is_available():
        import pytest
        pytest.skip("a GPU is here: the real run belongs to gpu_check.sh itself")
    out = tmp_path / "gpu_check.json"
    r = _run("--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())
    assert set(res["results"]) | set(res["skipped"]) == set(CHECKS)
    assert res["results"]["environment"]["status"] == "ok"
    assert "torch_cuda" in res["skipped"] and res["skipped"]["torch_cuda"]
