"""`tledge bench` on a real tuned and exported run: every runner, skipped backends, written files,
--compare."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from tledge.bench.report import compare_table, write_all
from tledge.bench.run import BenchConfig, run_bench
from tledge.cli import main
from tledge.export.pipeline import run_export
from tledge.runtimes import available_runners, get_runner
from tests.conftest import export_cfg, copy_run


@pytest.fixture(scope="module")
def exported(default_run_64: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = copy_run(default_run_64, tmp_path_factory.mktemp("bench") / "run")
    run_export(run, export_cfg(fp16=True))
    return run


def test_every_runner_on_the_tiny_model(exported: Path) -> None:
    from tledge.runtimes.onnxruntime import OrtRunner
    from tledge.runtimes.torch import TorchRunner
    from tledge import card as card_mod
    from tests.conftest import FASHION
    pre = card_mod.preprocess_of(card_mod.read(exported))
    x = np.stack([pre(f) for f in sorted((FASHION / "val").rglob("*.png"))[::100]])  # 10 real images
    with TorchRunner(exported) as t:
        ref = t.infer(x)
    assert ref.shape == (10, 10)
    for f in ("model.onnx", "model.fp16.onnx", "model.int8.trt.onnx", "model.int8.cpu.onnx"):
        with OrtRunner(exported / f, threads=1) as r:
            y = r.infer(x)
        assert y.shape == (10, 10) and y.dtype == np.float32
        assert np.corrcoef(y.ravel(), ref.ravel())[0, 1] > 0.9, f
    avail = available_runners()
    assert avail["torch"][0] and avail["onnxruntime"][0]
    if not avail["tensorrt"][0]:
        assert avail["tensorrt"][1]  # a reason is given
        with pytest.raises(Exception, match="TensorRT"):
            with get_runner("tensorrt", exported / "missing.engine"):
                pass


def test_bench_measures_everything_and_reports_skips(exported: Path, tmp_path: Path) -> None:
    (exported / "model.int8.engine").write_bytes(b"not a real engine")  # an engine this machine cannot run
    try:
        res = run_bench(exported, BenchConfig(batches=(1, 4), budget_s=0.05, warmup=1, min_iters=3, threads=2,
                                              max_images=200))
    finally:
        (exported / "model.int8.engine").unlink()
    names = [r["artefact"] for r in res["results"]]
    assert names == ["pytorch", "onnx-fp32", "onnx-fp16", "onnx-int8-tensorrt", "onnx-int8-cpu"]
    skipped = {s["artefact"]: s["reason"] for s in res["skipped"]}
    assert "tensorrt-int8" in skipped and "pytorch-cuda" in skipped
    base = res["results"][0]
    assert base["accuracy"]["top1_agreement"] == 1.0 and base["accuracy"]["drop_points"] == 0.0
    for r in res["results"]:
        assert {(l["mode"], l["batch"]) for l in r["latency"]} == {("model", 1), ("model", 4), ("end_to_end", 1),
                                                                    ("end_to_end", 4)}
        assert all(l["p50_ms"] > 0 and l["p99_ms"] >= l["p50_ms"] for l in r["latency"])
        assert r["accuracy"]["n"] == 200 and r["size_bytes"] > 0
        assert len(r["accuracy"]["per_class_accuracy"]) == 10 and r["accuracy"]["top5"] >= r["accuracy"]["top1"]
    fp32 = res["results"][1]
    assert fp32["accuracy"]["top1_agreement"] >= 0.995 and fp32["accuracy"]["max_abs_logit_diff"] < 1e-3
    out = tmp_path / "out"
    out.mkdir()
    paths = write_all(res, out)
    data = json.loads((out / "bench.json").read_text())
    assert data["schema"] == "tledge.bench/1" and len(data["results"]) == 5
    rows = list(csv.DictReader((out / "bench.csv").open()))
    assert len(rows) == 5 * 4 and float(rows[0]["p50_ms"]) > 0
    with Image.open(out / "bench.png") as im:
        assert im.size[0] > 300
    assert {p.name for p in paths} == {"bench.json", "bench.csv", "bench.png"}


def test_cli_bench_and_compare(exported: Path, tmp_path: Path) -> None:
    args = ["bench", str(exported), "--batch", "1", "--budget", "0.05", "--warmup", "1", "--no-e2e",
            "--max-images", "50", "--threads", "2"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "onnx-int8-cpu" in r.output and "skipped" in r.output
    other = tmp_path / "jetson" / "bench.json"
    other.parent.mkdir()
    data = json.loads((exported / "bench.json").read_text())
    data["machine"]["cpu"] = "Jetson Orin (fake)"
    for res in data["results"]:
        for lat in res["latency"]:
            lat["p50_ms"] *= 2
    other.write_text(json.dumps(data))
    r = CliRunner().invoke(main, ["compare", str(exported / "bench.json"), str(other)])
    assert r.exit_code == 0, r.output
    assert "Jetson Orin (fake)" in r.output and "2.00" in r.output
    r = CliRunner().invoke(main, args + ["--compare", str(other)])
    assert r.exit_code == 0 and "Jetson Orin (fake)" in r.output
    r = CliRunner().invoke(main, ["compare", str(exported / "bench.json"), str(tmp_path / "none.json")])
    assert r.exit_code != 0 and "does not exist" in r.output


def test_compare_rejects_other_json() -> None:
    with pytest.raises(Exception, match="not a tledge bench result"):
        compare_table({"schema": "x"}, {"schema": "tledge.bench/1"})
