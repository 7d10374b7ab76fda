"""Issue 12's speed target alone: the default `tledge export RUN --int8` (both forms, gate included) against
plain onnxruntime `quantize_static` of both forms (MinMax, its default) on the same calibration images,
interleaved in one process so that machine noise hits both alike. No test-set evaluation (see
int8_plan.py for accuracy): this is the quick, quiet timing.

Each repeat exports a fresh copy of RUN (no calibration cache) and then runs quantize_static on that
export's FP32 graph; the ratio is the median export wall time over the median quantize_static wall time.
quantize_static is given the calibration images already decoded and preprocessed (tledge's export decodes
them itself), so the ratio is, if anything, unfavourable to tledge.

Usage: python benchmarks/int8_speed.py [--run RUN] [--size 224] [--repeats 2] [--out int8_speed]
Without --run, the embedded default is tuned on mobilenet_v2 at --size px first (not timed).
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, machine, pass_times, save, table  # noqa: E402
from int8_plan import quantize_static_both  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="a tuned run directory (copied, never changed); default: tune the demo")
    ap.add_argument("--size", type=int, default=224, help="image size when tuning the demo")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="int8_speed", help="results file name under benchmarks/results (no .json)")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    from tledge import card as card_mod
    from tledge.export.config import ExportConfig
    from tledge.export.pipeline import run_export
    from tledge.perf import tune_allocator
    tune_allocator()
    rows, passes = [], []
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        if args.run:
            base = Path(args.run)
        else:
            from tledge.tune import TuneConfig, run_tune
            base = tmp / "demo"
            run_tune(ROOT / "data/fashion-mnist", base, TuneConfig(backbone="mobilenet_v2", image_size=args.size,
                                                                      cache_dir=str(tmp / "cache")))
        card = card_mod.read(base)
        pre = card_mod.preprocess_of(card)
        calib_x = np.stack([pre(f) for f in sorted((ROOT / "calibration/fashion-mnist").rglob("*.png"))])
        for i in range(args.repeats):
            run = tmp / f"run{i}"
            shutil.rmtree(run, ignore_errors=True)
            shutil.copytree(base, run, ignore=shutil.ignore_patterns("calib", ".export-staging", "model*.onnx*"))
            t0 = time.perf_counter()
            m = run_export(run, ExportConfig(int8=True))
            export_s = time.perf_counter() - t0
            qs = quantize_static_both(run / "model.onnx", calib_x, tmp, "MinMax")
            stages = {f"stage_{k}": v for k, v in m["seconds_per_stage"].items()}
            rows.append({"repeat": i, "export_s": export_s, "quantize_static_s": qs["seconds"],
                         "ratio": export_s / qs["seconds"], **stages})
            passes.append(pass_times(m))
            print(table([rows[-1]], list(rows[-1])), flush=True)
    med = {k: statistics.median(r[k] for r in rows) for k in ("export_s", "quantize_static_s")}
    summary = {"export_s": med["export_s"], "quantize_static_s": med["quantize_static_s"],
               "ratio_of_medians": med["export_s"] / med["quantize_static_s"], "target_ratio": 3.0,
               "image_size": card["preprocess"]["crop"], "backbone": card["backbone"]["name"]}
    print("\n" + table(rows, list(rows[0])))
    print("passes (last repeat): " + ", ".join(f"{s}/{n} {sec:.1f}" for s, n, sec in passes[-1]))
    print(f"median export {med['export_s']:.1f} s, median quantize_static MinMax (both forms) "
          f"{med['quantize_static_s']:.1f} s: {summary['ratio_of_medians']:.2f}x (target 3x)")
    print(f"wrote {save(args.out, {'machine': machine(), 'summary': summary, 'rows': rows, 'passes': passes})}")


if __name__ == "__main__":
    main()
