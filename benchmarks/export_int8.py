"""Issue 3 benchmark: `tledge export` on mobilenet_v2 (real ImageNet weights, tuned on the embedded
default: 2,000 train / 1,000 val images) and resnet50 (real weights are not available offline here:
random init, so its accuracy numbers only measure INT8 fidelity to its own FP32 model), in one run:

  - FP32 / FP16 / INT8 (both forms) val top-1 against PyTorch, INT8 for each calibration method (all
    techniques on, no layer fallback: the drop the method itself gives)
  - calibration wall time and peak memory with 512 images (child process per backbone; target < 4 GB
    for resnet50)
  - CPU latency of the INT8 CPU form against PyTorch eager FP32 at batch 1 and 32 (target >= 3x)

Usage: python benchmarks/export_int8.py [--backbones mobilenet_v2,resnet50] [--size 224]
Writes benchmarks/results/export_int8.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PY, ROOT, machine, run_child, save, table  # noqa: E402

CALIB_CHILD = r"""
import json, sys, time


def hwm_mib():
    # VmHWM: peak RSS of this process image. (ru_maxrss would carry the forking parent's peak across exec.)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
from tledge.perf import tune_allocator; tune_allocator()
import onnx
from pathlib import Path
from tledge import card as card_mod
from tledge.data import scan
from tledge.evalset import EvalSet
from tledge.export.pipeline import ExportConfig, calibration_samples, calibration_stats
run = Path(sys.argv[1]); card = card_mod.read(run); pre = card_mod.preprocess_of(card)
rep = scan(card["dataset"]["root"])
samples, where = calibration_samples(card, ExportConfig(calib="train", calib_count=512), rep.val)
fp32 = onnx.load(str(run / "model.onnx"))
rss0 = hwm_mib()
t0 = time.perf_counter()
ev = EvalSet(samples, pre, label="calib")
stats, info = calibration_stats(fp32, samples, pre, run / "calib-bench", None, ev)
print(json.dumps({"images": len(samples), "seconds": time.perf_counter() - t0, "tensors": len(stats),
                  "rss_before_mib": rss0, "peak_rss_mib": hwm_mib(), "cache": info["cache"]}))
"""


def bench(name: str, size: int, tmp: Path, methods: tuple[str, ...]) -> dict:
    import numpy as np
    import onnx
    import torch

    from tledge import card as card_mod
    from tledge.bench.latency import measure_model
    from tledge.data import scan
    from tledge.evalset import EvalSet, compare, run_logits
    from tledge.export import onnx as onnx_io
    from tledge.export.fp16 import to_fp16
    from tledge.export.pipeline import ExportConfig, _ort_logits, int8_graphs
    from tledge.model import load_classifier
    from tledge.runtimes.onnxruntime import OrtRunner
    from tledge.runtimes.torch import TorchRunner
    from tledge.tune import TuneConfig, run_tune

    weights = "imagenet" if name == "mobilenet_v2" else "none"
    run = tmp / f"run-{name}"
    card = run_tune(ROOT / "data/fashion-mnist", run, TuneConfig(backbone=name, weights=weights,
                                                                image_size=size if size != 224 else None,
                                                                workers=2, cache_dir=str(tmp / "cache")))
    pre = card_mod.preprocess_of(card)
    model = load_classifier(run, card)
    onnx_io.export(model, card, run / "model.onnx")
    fp32 = onnx.load(str(run / "model.onnx"))
    rep = scan(card["dataset"]["root"])
    ev = EvalSet(rep.val, pre, label="val")
    with torch.inference_mode():
        ref = run_logits(lambda b: model(torch.from_numpy(b)).numpy(), ev, 32)
    rows = [{"artefact": "pytorch fp32", **compare(ref, ref, ev.labels)}]
    rows.append({"artefact": "onnx fp32", **compare(_ort_logits(fp32, list(ev.batches(32)), 2), ref, ev.labels)})
    half, _ = to_fp16(fp32)
    rows.append({"artefact": "onnx fp16", **compare(_ort_logits(half, list(ev.batches(32)), 2), ref, ev.labels)})
    for method in methods:
        manifest: dict = {"artefacts": {}, "checks": {}}
        int8_graphs(run, card, ExportConfig(int8=True, method=method, max_drop=100.0, fallback=False, threads=2),
                    fp32, rep, ev, ref, manifest)
        for form in ("tensorrt", "cpu"):
            f = manifest["checks"][f"int8-{form}"]["final"]
            rows.append({"artefact": f"int8 {form} form, {method}", **f})
    child = run_child([PY, "-c", CALIB_CHILD, str(run)], {"TLEDGE_PROGRESS": "0"})
    assert child["rc"] == 0, child["stderr"][-2000:]
    calib = json.loads(child["stdout"].strip().splitlines()[-1])
    calib["rusage_maxrss_mib"] = child["peak_rss_mib"]  # includes the parent's peak (kept across fork+exec)
    x1, x32 = np.ascontiguousarray(ev.x[:1]), np.ascontiguousarray(ev.x[:32])
    lat = {}
    with TorchRunner(run, threads=2) as t, OrtRunner(run / "model.int8.cpu.onnx", "cpu", 2) as q:
        for b, x in ((1, x1), (32, x32)):
            for _ in range(2):  # alternate: drift on this noisy machine hits both alike
                lat.setdefault(f"pytorch b{b}", []).append(measure_model(t, x, budget_s=2.0)["p50_ms"])
                lat.setdefault(f"int8-cpu b{b}", []).append(measure_model(q, x, budget_s=2.0)["p50_ms"])
    lat = {k: float(np.median(v)) for k, v in lat.items()}
    ev.close()
    return {"backbone": name, "weights": weights, "input": pre.crop, "val_images": len(rep.val), "rows": rows,
            "calibration_512": calib, "latency_p50_ms": lat,
            "speedup_b1": lat["pytorch b1"] / lat["int8-cpu b1"], "speedup_b32": lat["pytorch b32"] / lat["int8-cpu b32"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", default="mobilenet_v2,resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--methods", default="minmax,percentile,entropy,mse",
                    help="calibration methods to evaluate (each costs two INT8 val evaluations)")
    args = ap.parse_args()
    from tledge.perf import tune_allocator
    tune_allocator()
    results = []
    with tempfile.TemporaryDirectory() as t:
        for name in args.backbones.split(","):
            r = bench(name, args.size, Path(t), tuple(args.methods.split(",")))
            results.append(r)
            print(f"\n== {name} ({r['weights']} weights) @ {r['input']} px, {r['val_images']} val images")
            print(table(r["rows"], ["artefact", "top1", "drop_points", "top1_agreement", "max_abs_logit_diff"]))
            c = r["calibration_512"]
            print(f"calibration, {c['images']} images: {c['seconds']:.1f}s, peak RSS {c['peak_rss_mib']:.0f} MiB "
                  f"(process before calibration: {c['rss_before_mib']:.0f} MiB), {c['tensors']} tensors")
            lat = r["latency_p50_ms"]
            print(f"CPU p50: PyTorch eager FP32 {lat['pytorch b1']:.2f} ms (b1) / {lat['pytorch b32']:.1f} ms (b32); "
                  f"INT8 CPU form {lat['int8-cpu b1']:.2f} / {lat['int8-cpu b32']:.1f} ms -> "
                  f"{r['speedup_b1']:.2f}x / {r['speedup_b32']:.2f}x (target >= 3x)")
    print(f"\nwrote {save('export_int8', {'machine': machine(), 'results': results})}")


if __name__ == "__main__":
    main()
