"""Issue 13 benchmark: what a train/deploy resize mismatch costs, and what the in-graph normalisation of
`--input raw` costs.

1. The embedded default (Fashion-MNIST, data/fashion-mnist) tuned with each of --tune-modes (default: the
   weights' shorter-side + centre crop, and stretch, which is what DeepStream's nvinfer does without
   maintain-aspect-ratio); each model's val top-1 (PyTorch, FP32) measured under every resize mode. The
   off-diagonal cells are the points lost by deploying with another resize than training used.
2. The FP32 ONNX graph and its --input raw form (Div/Sub/Div prefix), latency at batch 1 and 32 in
   onnxruntime (CPU), measured in alternating rounds in one process so machine noise hits both alike.

Usage: python benchmarks/resize_modes.py [--image-size 224] [--tune-modes shorter-side+center-crop,stretch]
Writes benchmarks/results/resize_modes.json.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, machine, save, table  # noqa: E402


def evaluate(run: Path, modes: list[str]) -> dict[str, float]:
    import torch

    from tledge import card as card_mod
    from tledge.data import scan_for_run
    from tledge.evalset import EvalSet, run_logits
    from tledge.model import load_classifier

    card = card_mod.read(run)
    pre = card_mod.preprocess_of(card)
    rep = scan_for_run(run, card)
    model = load_classifier(run, card).eval()
    out = {}
    for m in modes:
        with EvalSet(rep.val, pre.with_resize_mode(m), label=f"val images ({m})") as ev, torch.inference_mode():
            logits = run_logits(lambda x: model(torch.from_numpy(x)).numpy(), ev)
            out[m] = float((logits.argmax(1) == ev.labels).mean())
    return out


def latency_pair(run: Path, rounds: int = 7, iters: int = 20) -> list[dict]:
    import onnx
    import onnxruntime as ort

    from tledge import card as card_mod
    from tledge.export import raw_input
    from tledge.runtimes.onnxruntime import session_options

    pre = card_mod.preprocess_of(card_mod.read(run))
    normal = onnx.load(str(run / "model.onnx"))
    raw = raw_input.wrap(normal, pre.mean, pre.std, "float32")
    sess = {k: ort.InferenceSession(m.SerializeToString(), session_options(None), providers=["CPUExecutionProvider"])
            for k, m in (("normalized", normal), ("raw", raw))}
    rows = []
    rng = np.random.default_rng(0)
    for b in (1, 32):
        x = {"normalized": rng.standard_normal((b, 3, pre.crop, pre.crop)).astype(np.float32),
             "raw": rng.integers(0, 256, (b, 3, pre.crop, pre.crop)).astype(np.float32)}
        times: dict[str, list[float]] = {"normalized": [], "raw": []}
        for k in sess:
            for _ in range(3):
                sess[k].run(None, {"input": x[k]})  # warm-up
        for _ in range(rounds):
            for k in sess:  # alternate: both see the same machine state
                for _ in range(iters):
                    t0 = time.perf_counter_ns()
                    sess[k].run(None, {"input": x[k]})
                    times[k].append((time.perf_counter_ns() - t0) / 1e6)
        p50 = {k: float(np.percentile(v, 50)) for k, v in times.items()}
        rows.append({"batch": b, "normalized_p50_ms": round(p50["normalized"], 3), "raw_p50_ms": round(p50["raw"], 3),
                     "raw_over_normalized": round(p50["raw"] / p50["normalized"], 3)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--backbone", default="mobilenet_v2")
    ap.add_argument("--tune-modes", default="shorter-side+center-crop,stretch")
    args = ap.parse_args()
    os.environ.setdefault("TLEDGE_PROGRESS", "0")
    from tledge.export import onnx as onnx_io
    from tledge.model import load_classifier
    from tledge.preprocess import RESIZE_MODES
    from tledge.tune import TuneConfig, run_tune
    from tledge import card as card_mod

    tune_modes = args.tune_modes.split(",")
    rows, t_start = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for tm in tune_modes:
            run = Path(tmp) / tm.replace("+", "_")
            t0 = time.perf_counter()
            card = run_tune(ROOT / "data" / "fashion-mnist", run, TuneConfig(
                backbone=args.backbone, image_size=args.image_size, resize_mode=tm, workers=2,
                cache_dir=str(Path(tmp) / "cache")))
            runs[tm] = run
            acc = evaluate(run, list(RESIZE_MODES))
            row = {"tuned_with": tm, "tune_s": round(time.perf_counter() - t0, 1), "val_images": card["metrics"]["val"]["n"]}
            for m in RESIZE_MODES:
                row[m] = round(acc[m], 4)
                row[f"{m} vs tuned (pt)"] = round((acc[m] - acc[tm]) * 100, 2)
            rows.append(row)
        first = runs[tune_modes[0]]
        card = card_mod.read(first)
        onnx_io.export(load_classifier(first, card), card, first / "model.onnx")
        lat = latency_pair(first)
    cols = ["tuned_with", *RESIZE_MODES]
    print(f"val top-1 (PyTorch FP32) of {args.backbone} @ {args.image_size}px, by resize mode at evaluation")
    print(table(rows, cols))
    print("\npoints against the mode the model was tuned with")
    print(table([{"tuned_with": r["tuned_with"], **{m: r[f"{m} vs tuned (pt)"] for m in RESIZE_MODES}} for r in rows],
                cols))
    print("\n--input raw: FP32 graph latency, onnxruntime CPU, p50 of alternating rounds")
    print(table(lat, ["batch", "normalized_p50_ms", "raw_p50_ms", "raw_over_normalized"]))
    save("resize_modes", {"machine": machine(), "backbone": args.backbone, "image_size": args.image_size,
                          "dataset": "data/fashion-mnist (28x28 images: square, so letterbox = stretch exactly)",
                          "accuracy": rows, "raw_input_latency": lat,
                          "seconds": round(time.perf_counter() - t_start, 1)})


if __name__ == "__main__":
    main()
