"""Issue 14 benchmark: quantization-aware fine-tuning against the default post-training INT8 export, on the
10,000 Fashion-MNIST test images no step sees.

Per backbone and size, in one run: tune the embedded default, then `tledge export RUN --int8` (the default PTQ
plan) and `--int8 --qat --qat-scales S` for each S of --scales (fixed: the calibrated scales; learned), each export in its
own process (its wall time and peak memory measured from outside); for every INT8 graph, both forms, the
top-1 drop against PyTorch and the top-1 agreement with FP32 on the test images, and the QAT pass's own
seconds per form. For the QAT graphs also how closely onnxruntime (the session bench uses) computes what the
torch fake-quant network trained: top-1 agreement and max |logit diff| on the first 2,000 test images.

Usage: python benchmarks/qat.py [--backbones mobilenet_v2,efficientnet_lite0] [--sizes 112] [--steps 300]
        [--scales fixed,learned] [--out qat]
Writes benchmarks/results/<out>.json (qat.json by default), after every export.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PY, machine, make_testset, run_child, save, table, test_metrics, tuned_reference  # noqa: E402


def torch_match(path: Path, ev, n: int = 2000) -> dict:
    """The torch fake-quant network of the exported Q/DQ graph (the network QAT trained, weights exactly: see
    tests/integration/test_qat.py) against onnxruntime's optimised CPU session on ``n`` test images."""
    import numpy as np
    import onnx
    import torch

    from tledge.export import ort
    from tledge.export.int8.context import torch_threads
    from tledge.export.int8.passes.qat import build
    x = ev.first(n)
    q = onnx.load(str(path))
    batches = [x[i:i + 100] for i in range(0, len(x), 100)]
    with torch_threads(), torch.no_grad():
        net = build(q)
        z = np.concatenate([net(torch.from_numpy(b)).numpy() for b in batches])
    r = ort.logits(q, batches)
    return {"torch_agreement": float((z.argmax(1) == r.argmax(1)).mean()),
            "torch_max_diff": float(np.abs(z - r).max()), "torch_mean_diff": float(np.abs(z - r).mean())}


def bench(name: str, size: int, steps: int, scales: list[str], test_dir: Path, tmp: Path, done: list,
          out: str) -> dict:
    base, _, ev, ref = tuned_reference(name, size, test_dir, tmp)
    rows, detail = [], {}
    configs = [("PTQ default", [])] + [(f"QAT {s} scales", ["--qat", "--qat-steps", str(steps), "--qat-scales", s])
                                       for s in scales]
    for label, extra in configs:
        run = tmp / f"{base.name}-{len(detail)}"
        shutil.copytree(base, run)
        child = run_child([PY, "-m", "tledge", "export", str(run), "--int8", "--threads", "2", *extra],
                          env={"TLEDGE_PROGRESS": "0"})
        if child["rc"] != 0:
            raise SystemExit(f"{label}: export failed\n{child['stderr'][-3000:]}")
        m = json.loads((run / "export_manifest.json").read_text())
        qat_s = {f: rec["qat"]["seconds"] for f, rec in m["int8"]["forms"].items() if "qat" in rec}
        detail[label] = {"export_wall_s": round(child["wall_s"], 1), "peak_rss_mib": round(child["peak_rss_mib"]),
                         "qat_s": qat_s, "qat_records": {f: {k: rec["qat"][k] for k in ("decision", "details")}
                                                         for f, rec in m["int8"]["forms"].items() if "qat" in rec},
                         "kept_float": {f: g["kept_float"] for f, g in m["int8"]["gate"].items()}}
        for form in ("tensorrt", "cpu"):
            f = run / f"model.int8.{'trt' if form == 'tensorrt' else 'cpu'}.onnx"
            match = torch_match(f, ev) if extra else {}
            rows.append({"config": label, "form": form, **test_metrics(f, ev, ref), **match,
                         "val_drop_pt": m["checks"][f"int8-{form}"]["final"]["drop_points"],
                         "qat_s": qat_s.get(form), "export_s": round(child["wall_s"], 1),
                         "peak_mib": round(child["peak_rss_mib"])})
        shutil.rmtree(run)
        # saved after every export: a run cut short by its time limit keeps what it measured
        save(out, {"machine": machine(), "results": done + [{"backbone": name, "size": size, "rows": rows,
                                                              "detail": detail, "partial": True}]})
    ev.close()
    return {"backbone": name, "size": size, "test_images": len(ref),
            "torch_top1": float((ref.argmax(1) == ev.labels).mean()), "steps": steps, "rows": rows, "detail": detail}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", default="mobilenet_v2,efficientnet_lite0")
    ap.add_argument("--sizes", default="112")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--scales", default="fixed,learned")
    ap.add_argument("--out", default="qat", help="results file name under benchmarks/results (no .json)")
    args = ap.parse_args()
    import os
    os.environ.setdefault("TLEDGE_PROGRESS", "0")
    from tledge.perf import tune_allocator
    tune_allocator()
    results = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        test_dir = make_testset(tmp / "fashion-test10k")
        for size in (int(s) for s in args.sizes.split(",")):
            for name in args.backbones.split(","):
                r = bench(name, size, args.steps, args.scales.split(","), test_dir, tmp, results, args.out)
                results.append(r)
                print(f"\n== {name} @ {size}px, {r['test_images']} test images: PyTorch FP32 top-1 {r['torch_top1']:.4f}")
                print(table(r["rows"], ["config", "form", "top1", "drop_pt", "agreement", "val_drop_pt", "qat_s",
                                        "export_s", "peak_mib", "torch_agreement", "torch_max_diff"]))
                save(args.out, {"machine": machine(), "results": results, "seconds": round(time.perf_counter() - t0)})
    print(f"\nwrote {save(args.out, {'machine': machine(), 'results': results, 'seconds': round(time.perf_counter() - t0)})}")


if __name__ == "__main__":
    main()
