"""Issue 14 analysis: how much of an INT8 graph's disagreement with FP32 is noise that no training can remove.

On the 10,000 Fashion-MNIST test images no step sees, per backbone and size: tune the embedded default, export
the FP16 graph and the default PTQ INT8 graph (`tledge export RUN --fp16 --int8 --form F`), then the QAT one
(`--int8 --qat --form F`), each export in its own process. For every graph:
- agreement with FP32 (top-1) in onnxruntime's optimised CPU session (what tledge bench runs) and in its reference
  execution of the same graph (optimisations off: every Q/DQ computed in float, no fused INT8 kernels);
- ``unstable``: the share of test images whose top-1 differs between those two correct executions of one graph
  (float summation order alone decides them), and how many of the graph's disagreements with FP32 are among them;
- logit MSE against FP32 (also of logits centred per image, which is what softmax sees, and the KL from FP32's
  class distribution), the centred logit MSE between the two executions, and agreement per bucket of FP32's
  top-1 logit margin (top-1 minus runner-up), with the share of test images in each bucket; agreement between
  the PTQ and the QAT graph.

Reading: a disagreement with FP32 that flips with summation order is noise at FP32's decision boundary; training
moves where the noise falls, not whether there is some.

Usage: python benchmarks/int8_noise_floor.py [--backbones mobilenet_v2] [--sizes 112] [--form tensorrt]
        [--out int8_noise_floor]
Writes benchmarks/results/<out>.json.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PY, machine, run_child, save, table, test_image_grid, tuned_reference  # noqa: E402

BUCKETS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, float("inf"))   # FP32 top-1 logit margin


def margins(z: np.ndarray) -> np.ndarray:
    """Top-1 logit minus runner-up, per row."""
    s = np.sort(z, 1)
    return s[:, -1] - s[:, -2]


def graph_logits(path: Path, ev, optimize: bool) -> np.ndarray:
    import onnx

    from tledge.export import ort
    return ort.logits(onnx.load(str(path)), ev.batches(100), threads=2, optimize=optimize)


def centred(v: np.ndarray) -> np.ndarray:
    """Each row minus its mean: what softmax and top-1 see of the logits (a shift of all of them changes neither)."""
    return v - v.mean(1, keepdims=True)


def kl(t: np.ndarray, z: np.ndarray) -> float:
    """Mean KL(softmax(t) || softmax(z)) over rows."""
    def log_softmax(v: np.ndarray) -> np.ndarray:
        v = v.astype(np.float64) - v.max(1, keepdims=True)
        return v - np.log(np.exp(v).sum(1, keepdims=True))
    lt, lz = log_softmax(t), log_softmax(z)
    return float((np.exp(lt) * (lt - lz)).sum(1).mean())


def analyse(label: str, z: np.ndarray, z0: np.ndarray, ref: np.ndarray) -> dict:
    top, top0, want = z.argmax(1), z0.argmax(1), ref.argmax(1)
    unstable = top != top0
    disagree = top != want
    m = margins(ref)
    per_bucket = []
    for lo, hi in zip(BUCKETS[:-1], BUCKETS[1:]):
        sel = (m >= lo) & (m < hi)
        per_bucket.append({"margin": f"{lo:g}..{hi:g}", "share": round(float(sel.mean()), 4),
                           "agreement": round(float((~disagree[sel]).mean()), 4) if sel.any() else None,
                           "disagreements": int(disagree[sel].sum())})
    return {"graph": label, "agreement": round(float((~disagree).mean()), 4),
            "agreement_reference_exec": round(float((top0 == want).mean()), 4),
            "unstable": round(float(unstable.mean()), 4),
            "disagreements": int(disagree.sum()), "disagreements_unstable": int((disagree & unstable).sum()),
            "logit_mse": round(float(((z - ref) ** 2).mean()), 5),
            "centred_logit_mse": round(float(((centred(z) - centred(ref)) ** 2).mean()), 5),
            "kl_fp32_to_graph": round(float(kl(ref, z)), 5),
            "centred_mse_optimised_vs_reference": round(float(((centred(z) - centred(z0)) ** 2).mean()), 5),
            "median_margin_of_disagreements": round(float(np.median(m[disagree])), 3) if disagree.any() else None,
            "per_margin": per_bucket}


def export(base: Path, tmp: Path, name: str, extra: list[str]) -> tuple[Path, float]:
    run = tmp / f"{base.name}-{name}"
    shutil.copytree(base, run)
    child = run_child([PY, "-m", "tledge", "export", str(run), "--threads", "2", *extra], env={"TLEDGE_PROGRESS": "0"})
    if child["rc"] != 0:
        raise SystemExit(f"{name}: export failed\n{child['stderr'][-3000:]}")
    return run, round(child["wall_s"], 1)


def bench(name: str, size: int, form: str, test_dir: Path, tmp: Path) -> dict:
    base, _, ev, ref = tuned_reference(name, size, test_dir, tmp)
    f = "trt" if form == "tensorrt" else "cpu"
    ptq_run, ptq_s = export(base, tmp, "ptq", ["--fp16", "--int8", "--form", form])
    qat_run, qat_s = export(base, tmp, "qat", ["--int8", "--qat", "--form", form])
    graphs = {"fp16": ptq_run / "model.fp16.onnx", f"int8 {form} PTQ": ptq_run / f"model.int8.{f}.onnx",
              f"int8 {form} QAT": qat_run / f"model.int8.{f}.onnx"}
    rows, tops = [], {}
    for label, path in graphs.items():
        z, z0 = graph_logits(path, ev, True), graph_logits(path, ev, False)
        rows.append(analyse(label, z, z0, ref))
        tops[label] = z.argmax(1)
    ev.close()
    m = margins(ref)
    labels = list(graphs)
    return {"backbone": name, "size": size, "form": form, "test_images": len(ref),
            "torch_top1": float((ref.argmax(1) == ev.labels).mean()), "export_s": {"ptq": ptq_s, "qat": qat_s},
            "fp32_margin_share": {f"<{t:g}": round(float((m < t).mean()), 4) for t in BUCKETS[1:-1]},
            "ptq_vs_qat_agreement": round(float((tops[labels[1]] == tops[labels[2]]).mean()), 4), "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", default="mobilenet_v2")
    ap.add_argument("--sizes", default="112")
    ap.add_argument("--form", default="tensorrt", choices=["tensorrt", "cpu"])
    ap.add_argument("--out", default="int8_noise_floor", help="results file name under benchmarks/results (no .json)")
    args = ap.parse_args()
    results = []
    t0 = time.perf_counter()
    with test_image_grid(args.sizes, args.backbones) as grid:
        for tmp, test_dir, size, name in grid:
            r = bench(name, size, args.form, test_dir, tmp)
            results.append(r)
            print(f"\n== {name} @ {size}px, {r['test_images']} test images, {args.form} form: PyTorch FP32 top-1 "
                  f"{r['torch_top1']:.4f}; FP32 top-1 logit margin below 0.25 / 0.5 / 1: "
                  + " / ".join(f"{v:.1%}" for v in list(r["fp32_margin_share"].values())[:3])
                  + f"; PTQ and QAT graphs agree on {r['ptq_vs_qat_agreement']:.2%}")
            print(table(r["rows"], ["graph", "agreement", "agreement_reference_exec", "unstable", "disagreements",
                                    "disagreements_unstable", "logit_mse", "centred_logit_mse", "kl_fp32_to_graph",
                                    "centred_mse_optimised_vs_reference", "median_margin_of_disagreements"]))
            for row in r["rows"]:
                print(f"  {row['graph']}: agreement by FP32 margin: " + ", ".join(
                    f"{b['margin']} ({b['share']:.1%} of images) {b['agreement']:.1%}" for b in row["per_margin"]
                    if b["agreement"] is not None))
            save(args.out, {"machine": machine(), "results": results, "seconds": round(time.perf_counter() - t0)})
    print(f"\nwrote {save(args.out, {'machine': machine(), 'results': results, 'seconds': round(time.perf_counter() - t0)})}")


if __name__ == "__main__":
    main()
