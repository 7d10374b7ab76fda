"""`torchrun -m tledge tune` with 2 gloo processes on CPU: same run as one process, cache shared across
world sizes, DDP fine-tuning, and a failing rank ends the job with a clear error instead of a hang."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tledge.features import FeatureCache
from tests.conftest import make_subset, tledge_env

pytestmark = pytest.mark.slow
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
ARGS = ["--image-size", "64", "--workers", "0", "--epochs", "30", "--patience", "30"]


def _torchrun(data: Path, out: Path, cache: Path, *extra: str, env: dict | None = None,
              timeout: int = 300) -> subprocess.CompletedProcess:
    e = {**tledge_env(), "OMP_NUM_THREADS": "1", "TLEDGE_DIST_TIMEOUT": "60", **(env or {})}
    return subprocess.run([TORCHRUN, "--nproc-per-node", "2", "--master-port", str(29500 + os.getpid() % 1000),
                           "-m", "tledge", "tune", str(data), "--out", str(out), "--cache-dir", str(cache), *ARGS,
                           *extra], capture_output=True, text=True, env=e, timeout=timeout)


def _single(data: Path, out: Path, cache: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tledge", "tune", str(data), "--out", str(out), "--cache-dir",
                           str(cache), *ARGS, *extra], capture_output=True, text=True, env=tledge_env(), timeout=300)


def _features(card: dict, cache_root: Path) -> dict[str, np.ndarray]:
    key = {"backbone": card["backbone"]["name"], "weights": card["backbone"]["weights"]["sha256"],
           "preprocess": card["preprocess"], "dtype": "float32"}
    cache = FeatureCache(cache_root, key)
    index = cache.load_index()
    shas = sorted(index)
    return dict(zip(shas, cache.get(shas, index)))


def test_two_ranks_match_one_and_share_the_cache(tmp_path: Path) -> None:
    data = make_subset(tmp_path / "data", classes=3, train=14, val=5)  # odd shares: 21 + 21 of 42+15
    r2 = _torchrun(data, tmp_path / "two", tmp_path / "cache2")
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "world size 2, backend gloo" in r2.stderr
    assert "rank 0/2:" in r2.stderr and "rank 1/2:" in r2.stderr
    r1 = _single(data, tmp_path / "one", tmp_path / "cache1")
    assert r1.returncode == 0, r1.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "model_card.json").read_text())
    one = json.loads((tmp_path / "one" / "model_card.json").read_text())
    assert two["classes"] == one["classes"] and two["training"]["world_size"] == 2
    assert two["feature_cache"]["computed"] == 57 and two["feature_cache"]["world_size"] == 2
    f2, f1 = _features(two, tmp_path / "cache2"), _features(one, tmp_path / "cache1")
    assert f2.keys() == f1.keys() and len(f1) == 57
    for k in f1:
        np.testing.assert_allclose(f2[k], f1[k], rtol=1e-4, atol=1e-4)
    n = two["metrics"]["val"]["n"]
    assert abs(two["metrics"]["val"]["top1"] - one["metrics"]["val"]["top1"]) * n <= 1.0
    # only rank 0 wrote: one set of artefacts, no stray temporary files
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["checkpoint.safetensors", "dataset_index.json",
                                                                      "metrics.csv", "model_card.json",
                                                                      "training_curve.png"]
    # the cache written by 2 ranks is read back by 1
    r = _single(data, tmp_path / "reuse", tmp_path / "cache2")
    assert r.returncode == 0, r.stderr[-2000:]
    reuse = json.loads((tmp_path / "reuse" / "model_card.json").read_text())
    assert reuse["feature_cache"]["computed"] == 0 and reuse["feature_cache"]["cached"] == 57


def test_ddp_fine_tuning(tmp_path: Path) -> None:
    data = make_subset(tmp_path / "data", classes=3, train=8, val=4)
    r = _torchrun(data, tmp_path / "ft", tmp_path / "cache", "--unfreeze", "1", "--ft-epochs", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    card = json.loads((tmp_path / "ft" / "model_card.json").read_text())
    assert card["training"]["finetune"]["stages"] == 19 and card["training"]["world_size"] == 2
    lines = (tmp_path / "ft" / "metrics.csv").read_text().splitlines()
    assert sum(line.startswith("finetune,") for line in lines) == 2


def test_a_failing_rank_ends_the_job(tmp_path: Path) -> None:
    data = make_subset(tmp_path / "data", classes=3, train=8, val=4)
    t0 = time.monotonic()
    r = _torchrun(data, tmp_path / "bad", tmp_path / "cache", env={"TLEDGE_FAULT_INJECT": "1:features"}, timeout=240)
    assert r.returncode != 0
    assert time.monotonic() - t0 < 200, "the job must end, not wait for the collective timeout"
    assert "rank 1/2 failed" in r.stderr and "fault injected at 'features'" in r.stderr
    assert not (tmp_path / "bad" / "model_card.json").exists()


def test_interrupted_distributed_run_resumes(tmp_path: Path) -> None:
    import signal

    import torch

    data = make_subset(tmp_path / "data", classes=3, train=30, val=6)
    out = tmp_path / "run"
    extra = ["--unfreeze", "2", "--ft-epochs", "6"]
    e = {**tledge_env(), "OMP_NUM_THREADS": "1", "TLEDGE_DIST_TIMEOUT": "60"}
    cmd = [TORCHRUN, "--nproc-per-node", "2", "--master-port", str(30500 + os.getpid() % 1000), "-m", "tledge", "tune",
           str(data), "--out", str(out), "--cache-dir", str(tmp_path / "cache"), *ARGS, *extra]
    proc = subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    state_file = out / ".resume" / "state.pt"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        try:
            if state_file.is_file() and torch.load(state_file, weights_only=True).get("phase") == "finetune":
                break
        except Exception:  # noqa: BLE001 - replaced atomically; read again
            pass
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)
    proc.communicate(timeout=120)
    assert proc.returncode != 0 and not (out / "model_card.json").exists()
    epoch = torch.load(state_file, weights_only=True)["epoch"]
    assert epoch < 5
    cmd[cmd.index("--master-port") + 1] = str(31500 + os.getpid() % 1000)
    r = subprocess.run(cmd + ["--resume"], env=e, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming fine-tuning at epoch {epoch + 2}/6" in r.stderr
    card = json.loads((out / "model_card.json").read_text())
    lines = (out / "metrics.csv").read_text().splitlines()
    assert sum(line.startswith("finetune,") for line in lines) == 6 and card["training"]["world_size"] == 2
