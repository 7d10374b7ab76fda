"""Shared fixtures: small real-image datasets, isolated caches, and automatic gpu/tensorrt skips."""
from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest

from tledge.export.config import CalibConfig, ExportConfig, GateConfig, Int8Config

ROOT = Path(__file__).resolve().parents[1]
FASHION = ROOT / "data" / "fashion-mnist"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    has_trt = importlib.util.find_spec("tensorrt") is not None
    has_gpu = False
    try:
        import torch
        has_gpu = torch.cuda.is_available()
    except ImportError:
        pass
    for item in items:
        if "tensorrt" in item.keywords and not has_trt:
            item.add_marker(pytest.mark.skip(reason="TensorRT is not installed"))
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="no CUDA GPU"))


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test gets its own feature cache and no progress bars; downloads are off."""
    monkeypatch.setenv("TLEDGE_CACHE_DIR", str(tmp_path_factory.mktemp("featcache")))
    monkeypatch.setenv("TLEDGE_PROGRESS", "0")
    monkeypatch.setenv("TLEDGE_OFFLINE", "1")


def make_subset(dest: Path, classes: int = 3, train: int = 12, val: int = 4) -> Path:
    """A small ImageFolder of real Fashion-MNIST images copied from the embedded default."""
    names = sorted(p.name for p in (FASHION / "train").iterdir() if p.is_dir())[:classes]
    for split, n in (("train", train), ("val", val)):
        for c in names:
            out = dest / split / c
            out.mkdir(parents=True)
            for f in sorted((FASHION / split / c).iterdir())[:n]:
                shutil.copy(f, out / f.name)
    return dest


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    return make_subset(tmp_path / "tiny")


@pytest.fixture(scope="session")
def mobilenet_weights_available() -> bool:
    import torch
    return (Path(torch.hub.get_dir()) / "checkpoints" / "mobilenet_v2-b0353104.pth").is_file()


def tledge_env() -> dict[str, str]:
    env = dict(os.environ)
    env["TLEDGE_PROGRESS"] = "0"
    return env


@pytest.fixture(scope="session")
def default_run_64(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded default (2,000 train / 1,000 val real images) tuned on mobilenet_v2 at 64 px: a real
    run for the export, bench and bundle tests. Reused read-only; copy it before changing it."""
    from tledge.tune import TuneConfig, run_tune
    os.environ.setdefault("TLEDGE_PROGRESS", "0")
    out = tmp_path_factory.mktemp("runs") / "default64"
    run_tune(FASHION, out, TuneConfig(backbone="mobilenet_v2", image_size=64, workers=0,
                                      cache_dir=str(tmp_path_factory.mktemp("cache64"))))
    return out


def copy_run(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def export_cfg(max_drop: float = 100.0, fallback: bool = True, calib: dict | None = None, threads: int = 2,
               **quant: object) -> ExportConfig:
    """An INT8 export config for tests: no val gate by default (max_drop 100) and no expensive passes
    (escalate off) unless a test asks; ``quant`` sets Int8Config fields."""
    quant.setdefault("escalate", "off")
    flags = {k: quant.pop(k) for k in ("int8", "fp16") if k in quant}
    return ExportConfig(int8=flags.get("int8", True), fp16=flags.get("fp16", False), threads=threads,
                        calib=CalibConfig(**(calib or {})), quant=Int8Config(**quant),
                        gate=GateConfig(max_drop=max_drop, fallback=fallback))
