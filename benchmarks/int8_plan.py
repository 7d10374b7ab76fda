"""Issue 12 benchmark: the INT8 export as a plan of passes, at the demo's 224 px and at 112 px, on
mobilenet_v2 and efficientnet_lite0, judged on the 10,000 Fashion-MNIST test images no step sees.

Per backbone and size, in one process and one run (side by side, so machine noise hits all alike):
  - plain onnxruntime `quantize_static` of both forms on the same 260 shipped calibration images
    (quant_pre_process + QDQ per-channel; MinMax, its default, and Percentile), wall time per form;
  - `run_export(--int8)` for each of --configs (CONFIGS), wall time, time per stage and per pass, the
    decisions: `default` is the default plan (cheap recipe; expensive passes only when a form misses the
    target agreement on the judge images); the others are other recipes: --escalate on (learned rounding and auto
    bias correction always on: the previous default's techniques), --refit-distill 1 (the head refit
    distilled from the FP32 logits instead of trained on the labels), --escalate off, without the head refit,
    with empirical bias correction in the cheap recipe; `floor` turns every technique off (what any tledge
    INT8 export costs beyond quantize_static: the FP32 check, calibration statistics, the val measurement);
  - every INT8 graph's top-1 drop against PyTorch and top-1 agreement with FP32 on the 10,000 test images.
The run's own val split (the embedded 1,000 images) drives the gate, as in `tledge export`.

Usage: python benchmarks/int8_plan.py [--backbones mobilenet_v2,efficientnet_lite0] [--sizes 224,112]
       [--configs default,escalate,distill] [--qs MinMax,Percentile] [--out int8_plan]
Writes benchmarks/results/int8_plan.json.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, machine, make_testset, pass_times, save, table, test_metrics, tuned_reference  # noqa: E402


def quantize_static_both(fp32_path: Path, calib_x: np.ndarray, tmp: Path, method: str) -> dict:
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([calib_x[i:i + 20] for i in range(0, len(calib_x) - len(calib_x) % 20, 20)])

        def get_next(self):  # noqa: ANN201
            b = next(self.it, None)
            return None if b is None else {"input": b}

    t0 = time.perf_counter()
    pre = tmp / "pre.onnx"
    quant_pre_process(str(fp32_path), str(pre))
    out = {"pre_process_s": time.perf_counter() - t0, "forms": {}}
    forms = {"tensorrt": dict(activation_type=QuantType.QInt8, extra_options={
        "ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False}),
             "cpu": dict(activation_type=QuantType.QUInt8, extra_options={})}
    for form, kw in forms.items():
        p = tmp / f"qs_{method}_{form}.onnx"
        t1 = time.perf_counter()
        quantize_static(str(pre), str(p), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        weight_type=QuantType.QInt8, calibrate_method=getattr(CalibrationMethod, method), **kw)
        out["forms"][form] = {"seconds": time.perf_counter() - t1, "path": str(p)}
    out["seconds"] = time.perf_counter() - t0
    return out


# key -> (label, Int8Config overrides), run as --configs lists them.
CONFIGS: dict[str, tuple[str, dict]] = {
    "default": ("tledge default plan", {}),
    "escalate": ("all passes on (--escalate on)", {"escalate": "on"}),
    "distill": ("refit distilled (--refit-distill 1)", {"refit_distill": 1.0}),
    "labels": ("refit on labels (--refit-distill 0)", {"refit_distill": 0.0}),
    # the default of 939ae2c: analytic correction in the cheap recipe (empirical only when escalating, and kept
    # when judged closer), the head refit on labels
    "previous": ("previous default (analytic, refit on labels)", {"bias_correction": "analytic", "refit_distill": 0.0,
                                                              "centre": "off"}),
    "cheap": ("cheap recipe only (--escalate off)", {"escalate": "off"}),
    "cheap-nodrop": ("cheap recipe, refit without dropout (--escalate off --refit-dropout 0)",
                     {"escalate": "off", "refit_dropout": 0.0}),
    "norefit": ("no head refit (--no-head-refit)", {"head_refit": False}),
    "norefit-cheap": ("no head refit, --escalate off", {"head_refit": False, "escalate": "off"}),
    "norefit-empirical": ("no head refit, --bias-correction empirical, --escalate off",
                          {"head_refit": False, "bias_correction": "empirical", "escalate": "off"}),
    "refit-empirical": ("head refit, --bias-correction empirical, --escalate off",
                        {"bias_correction": "empirical", "escalate": "off"}),
    # centring of the TensorRT form's ReLU6 quantizers (--centre; the default is exact)
    "centre-off": ("no centring (--centre off)", {"centre": "off"}),
    "centre-padded": ("centring with Pad nodes (--centre padded)", {"centre": "padded"}),
    # the fixed cost of a tledge INT8 export, every technique off: ONNX export and its check against PyTorch on
    # val, calibration statistics, MinMax ranges, quantizing and the val measurement of both forms (no fallback:
    # --max-drop 100), i.e. what quantize_static does plus the checks every tledge export makes
    "floor": ("floor: every technique off (minmax, no correction, no refit, --escalate off, no fallback)",
              {"calib_method": "minmax", "bias_correction": "off", "head_refit": False, "escalate": "off",
               "cle": False, "centre": "off", "max_drop": 100.0}),
}


def bench(name: str, size: int, test_dir: Path, tmp: Path, configs: list[str], qs_methods: list[str]) -> dict:
    from tledge import card as card_mod
    from tledge.errors import AccuracyError
    from tledge.export.config import CalibConfig, ExportConfig, GateConfig, Int8Config
    from tledge.export.pipeline import run_export

    base, card, ev, ref = tuned_reference(name, size, test_dir, tmp)
    pre = card_mod.preprocess_of(card)
    torch_top1 = float((ref.argmax(1) == ev.labels).mean())
    rows, detail = [], {}
    fp32_path = None
    for key in configs:
        label, overrides = CONFIGS[key]
        run = tmp / f"{base.name}-{key}"
        shutil.copytree(base, run)
        quant = dict(overrides)
        calib = CalibConfig(method=quant.pop("calib_method")) if "calib_method" in quant else CalibConfig()
        gate = GateConfig(max_drop=quant.pop("max_drop", 1.0))
        cfg = ExportConfig(int8=True, threads=2, calib=calib, gate=gate, quant=Int8Config(**quant))
        t0 = time.perf_counter()
        try:
            m = run_export(run, cfg)
        except AccuracyError as e:  # the gate refused this recipe: a result, not the end of the run
            detail[label] = {"wall_s": time.perf_counter() - t0, "failed": e.what}
            rows.append({"config": label, "form": "both", "export_s": detail[label]["wall_s"], "failed": e.what[:80]})
            print(f"{label}: export failed: {e.what}", flush=True)
            continue
        wall = time.perf_counter() - t0
        detail[label] = {"wall_s": wall, "stages_s": m["seconds_per_stage"], "passes_s": pass_times(m),
                         "forms": {f: {"check": r["check"], "kept": r["kept"]} for f, r in m["int8"]["forms"].items()},
                         "gate": {f: {k: g[k] for k in ("method", "rounding", "kept_float")}
                                  for f, g in m["int8"]["gate"].items()}}
        fp32_path = fp32_path or run / "model.onnx"
        for form in ("tensorrt", "cpu"):
            rows.append({"config": label, "form": form, "export_s": wall,
                         **test_metrics(str(run / f"model.int8.{'trt' if form == 'tensorrt' else 'cpu'}.onnx"), ev, ref),
                         "val_drop_pt": m["checks"][f"int8-{form}"]["final"]["drop_points"],
                         "escalated": m["int8"]["forms"][form]["check"]["escalate"],
                         "kept": m["int8"]["forms"][form]["kept"]})
    calib_files = sorted((ROOT / "calibration/fashion-mnist").rglob("*.png"))
    calib_x = np.stack([pre(f) for f in calib_files])
    qs = {}
    for method in qs_methods:
        qs[method] = quantize_static_both(fp32_path, calib_x, tmp, method)
        for form, f in qs[method]["forms"].items():
            rows.append({"config": f"quantize_static {method}", "form": form, "export_s": qs[method]["seconds"],
                         **test_metrics(f["path"], ev, ref)})
    ev.close()
    ratios = {f"{CONFIGS[k][0]} / quantize_static {m}": detail[CONFIGS[k][0]]["wall_s"] / qs[m]["seconds"]
              for k in configs for m in qs if "failed" not in detail[CONFIGS[k][0]]}
    return {"backbone": name, "size": size, "test_images": len(ref), "torch_top1": torch_top1, "rows": rows,
            "detail": detail, "quantize_static": qs, "ratios": ratios}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", default="mobilenet_v2,efficientnet_lite0")
    ap.add_argument("--sizes", default="224,112")
    ap.add_argument("--qs", default="MinMax,Percentile", help="quantize_static calibrators to run beside tledge")
    ap.add_argument("--configs", default="default,escalate,previous",
                    help="tledge configurations to run, of: " + ", ".join(CONFIGS))
    ap.add_argument("--out", default="int8_plan", help="results file name under benchmarks/results (no .json)")
    args = ap.parse_args()
    unknown = [k for k in args.configs.split(",") if k not in CONFIGS]
    if unknown:
        ap.error(f"unknown --configs {', '.join(unknown)}; choices: {', '.join(CONFIGS)}")
    from tledge.perf import tune_allocator
    tune_allocator()
    results = []
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        test_dir = make_testset(tmp / "fashion-test10k")
        for size in (int(s) for s in args.sizes.split(",")):
            for name in args.backbones.split(","):
                r = bench(name, size, test_dir, tmp, args.configs.split(","), args.qs.split(","))
                results.append(r)
                print(f"\n== {name} @ {size}px, {r['test_images']} test images: PyTorch FP32 top-1 {r['torch_top1']:.4f}")
                print(table(r["rows"], ["config", "form", "export_s", "top1", "drop_pt", "agreement", "val_drop_pt",
                                        "escalated", "kept"]))
                for label, d in r["detail"].items():
                    if "failed" in d:
                        print(f"{label}: failed after {d['wall_s']:.1f} s: {d['failed']}")
                        continue
                    print(f"{label}: wall {d['wall_s']:.1f} s; stages " + ", ".join(
                        f"{k} {v:.1f} s" for k, v in d["stages_s"].items()))
                    print("  passes: " + ", ".join(f"{s}/{n} {sec:.1f}" for s, n, sec in d["passes_s"]))
                    for f, c in d["forms"].items():
                        print(f"  {f}: judge agreement of the cheap recipe {c['check']['agreement']:.3f}, "
                              f"escalated {c['check']['escalate']}, kept {c['kept']}")
                print("ratios: " + ", ".join(f"{k} {v:.2f}x" for k, v in r["ratios"].items()))
                save(args.out, {"machine": machine(), "results": results})
    print(f"\nwrote {save(args.out, {'machine': machine(), 'results': results})}")


if __name__ == "__main__":
    main()
