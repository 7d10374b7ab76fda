"""Helpers shared by the benchmark scripts: child processes with their own peak memory, tables, JSON."""
from __future__ import annotations

import gzip
import json
import shutil
import struct
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def run_child(args: Sequence[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run a command; return wall seconds, exit code, and the peak RSS (MiB) of the process (or of its
    largest waited-for child, e.g. a DataLoader worker), read from wait4's rusage. Linux keeps ru_maxrss
    across fork+exec, so the figure is at least the calling process's own RSS: call it from a small
    process, or have the child report its VmHWM."""
    import tempfile
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(args), env={**os.environ, **(env or {})}, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return {"wall_s": wall, "rc": proc.returncode, "peak_rss_mib": usage.ru_maxrss / 1024,
                "stdout": out.read(), "stderr": err.read()}


def machine() -> dict[str, Any]:
    import torch
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def pass_times(manifest: dict[str, Any]) -> list[tuple[str, str, float]]:
    """(scope, pass, seconds) of every INT8 pass an export's manifest records, graph passes first, then each
    form's cheap and expensive recipes."""
    out = [(r["scope"], r["name"], r["seconds"]) for r in manifest["int8"]["graph"]]
    for form, rec in manifest["int8"]["forms"].items():
        for stage in ("cheap", "expensive"):
            out += [(f"{form}/{stage}", r["name"], r["seconds"]) for r in rec.get(stage, [])]
    return out


def table(rows: list[dict[str, Any]], cols: Sequence[str]) -> str:
    cells = [[str(c) for c in cols]] + [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ["  ".join(v.rjust(w) if j else v.ljust(w) for j, (v, w) in enumerate(zip(row, widths))) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:.0f}"
    return "" if v is None else str(v)


def save(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    p = RESULTS / f"{name}.json"
    p.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return p


PY = sys.executable

CLASSES = ["T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot"]


def read_idx(path: Path) -> np.ndarray:
    data = gzip.open(path, "rb").read()
    ndim = struct.unpack(">I", data[:4])[0] & 0xFF
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def make_testset(dest: Path) -> Path:
    """The 10,000 test images as an ImageFolder ``val`` split (``train`` is a copy of the embedded one, so
    the folder scans like any dataset; only its val split is used)."""
    from PIL import Image
    x = read_idx(ROOT / "benchmarks/data/t10k-images-idx3-ubyte.gz")
    y = read_idx(ROOT / "benchmarks/data/t10k-labels-idx1-ubyte.gz")
    shutil.copytree(ROOT / "data/fashion-mnist/train", dest / "train")
    for c, name in enumerate(CLASSES):
        (dest / "val" / name).mkdir(parents=True)
    for i in range(len(y)):
        Image.fromarray(x[i], "L").save(dest / "val" / CLASSES[y[i]] / f"test_{i:05d}.png")
    return dest


@contextmanager
def test_image_grid(sizes: str, backbones: str) -> Iterator[Iterator[tuple[Path, Path, int, str]]]:
    """A benchmark over the 10,000 test images: progress bars off in this process and its export children, the
    allocator tuned, the test images as an ImageFolder in a temporary folder; yields an iterator of
    (temporary folder, test folder, size, backbone) over ``sizes`` x ``backbones`` (comma lists), sizes outer."""
    import tempfile

    from tledge.perf import tune_allocator
    os.environ.setdefault("TLEDGE_PROGRESS", "0")
    tune_allocator()
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        test_dir = make_testset(tmp / "fashion-test10k")
        yield ((tmp, test_dir, int(size), name) for size in sizes.split(",") for name in backbones.split(","))


def tuned_reference(name: str, size: int, test_dir: Path, tmp: Path) -> tuple[Path, dict[str, Any], Any, np.ndarray]:
    """Tune the embedded default on backbone ``name`` at ``size`` px (feature cache under ``tmp``) and run the
    PyTorch model over the test images: (run dir, model card, test EvalSet, FP32 reference logits)."""
    import torch

    from tledge import card as card_mod
    from tledge.data import scan
    from tledge.evalset import EvalSet, run_logits
    from tledge.model import load_classifier
    from tledge.tune import TuneConfig, run_tune

    base = tmp / f"run-{name}-{size}"
    card = run_tune(ROOT / "data/fashion-mnist", base, TuneConfig(backbone=name, image_size=size, workers=2,
                                                                  cache_dir=str(tmp / "cache")))
    model = load_classifier(base, card)
    ev = EvalSet(scan(test_dir).val, card_mod.preprocess_of(card), label="test images")
    with torch.inference_mode():
        ref = run_logits(lambda b: model(torch.from_numpy(b)).numpy(), ev, 64)
    return base, card, ev, ref


def test_metrics(path: str | Path, ev: Any, ref: np.ndarray) -> dict[str, float]:
    """An ONNX graph's top-1, drop against PyTorch (points) and top-1 agreement with FP32 on ``ev``."""
    from tledge.evalset import compare, run_logits
    from tledge.runtimes.onnxruntime import OrtRunner
    with OrtRunner(path, "cpu", 2) as r:
        res = compare(run_logits(r.infer, ev, 64), ref, ev.labels)
    return {"top1": res["top1"], "drop_pt": res["drop_points"], "agreement": res["top1_agreement"]}
