"""What --centre padded's Pad nodes cost in latency where it can be measured here: onnxruntime on this CPU.

--centre padded (issue 12) turns the padding of every convolution that reads a ReLU6 output into a Pad node in
front of that input's quantizer (passes/pads.py: Clip -> Pad -> Q/DQ -> Conv, EfficientNet-Lite's own shape),
so that the quantizer can be centred. Both INT8 forms are quantized from that graph; the CPU form (not centred)
gets the padding back in its convolutions (quantize._fold_zero_pads: with the Pads it had run 1.25-1.36x slower
here), the TensorRT form keeps them. On a Jetson its Pads may fuse with the quantizer or cost a pass over the
padded tensor; that is not measurable here, and onnxruntime's CPU timing of the TensorRT form is no guide to it.
This script measures, interleaved in one process (machine noise hits all alike), batch-1 and batch-8 latency of:
the FP32 graph, the FP32 graph with the explicit Pads, and both INT8 forms quantized with --centre exact and
--centre padded (onnxruntime CPU, 1 thread). The INT8 graphs are quantized from statistics of random images:
their latency does not depend on the calibration.

Usage: python benchmarks/centre_pads_latency.py [--backbone mobilenet_v2] [--size 224] [--rounds 7]
Writes benchmarks/results/centre_pads_latency.json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, save, table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="mobilenet_v2")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds (the median is reported)")
    ap.add_argument("--out", default="centre_pads_latency")
    args = ap.parse_args()
    import onnx
    import torch

    from tledge.export import onnx as onnx_io
    from tledge.export import ort
    from tledge.export.int8 import calibrate as cal
    from tledge.export.int8.passes.pads import pad_explicitly
    from tledge.export.int8.quantize import quantize_model, quantized_tensors
    from tledge import backbones
    from tledge.model import build_classifier

    spec = backbones.get(args.backbone)  # a 10-class head, untrained: latency does not depend on the weights
    card = {"backbone": {"name": args.backbone}, "head": {"kind": "linear", "in_features": spec.feature_dim},
            "classes": [f"c{i}" for i in range(10)], "preprocess": spec.preprocess.scaled(args.size).to_dict(),
            "tledge_version": "benchmark"}
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_io.export(build_classifier(card).eval(), card, Path(tmp) / "m.onnx")
        fp32 = onnx_io.fold_shapes(onnx.load(str(Path(tmp) / "m.onnx")))
    padded, convs = pad_explicitly(fp32)
    rng = np.random.default_rng(0)
    calib = [rng.standard_normal((16, 3, args.size, args.size)).astype(np.float32)]
    graphs = {"fp32": fp32, "fp32 + pads": padded}
    for name, g in (("exact", fp32), ("padded", padded)):
        names = sorted({t for f in ("tensorrt", "cpu") for t in quantized_tensors(g, f)})
        stats = cal.collect(g, names, calib)
        for form in ("tensorrt", "cpu"):
            graphs[f"int8 {form} {name}"] = quantize_model(g, stats, form, "percentile", centre=name)
    sessions = {k: ort.session(g, threads=1) for k, g in graphs.items()}
    inp = {k: s.get_inputs()[0].name for k, s in sessions.items()}
    x = {b: rng.standard_normal((b, 3, args.size, args.size)).astype(np.float32) for b in (1, 8)}
    times: dict[tuple[str, int], list[float]] = {(k, b): [] for k in sessions for b in x}
    for k, s in sessions.items():  # warm-up
        for b in x:
            s.run(None, {inp[k]: x[b]})
    for _ in range(args.rounds):
        for b in x:
            reps = 20 if b == 1 else 4
            for k, s in sessions.items():
                t0 = time.perf_counter()
                for _ in range(reps):
                    s.run(None, {inp[k]: x[b]})
                times[(k, b)].append((time.perf_counter() - t0) / reps * 1000)
    rows = []
    for k, g in graphs.items():
        row = {"graph": k, "pad_nodes": sum(n.op_type == "Pad" for n in g.graph.node)}
        for b in x:
            row[f"b{b} ms"] = round(statistics.median(times[(k, b)]), 2)
        rows.append(row)
    by = {r["graph"]: r for r in rows}
    for r in rows:
        ref = by[r["graph"].replace("padded", "exact").replace(" + pads", "")]
        r["x exact"] = round(r["b1 ms"] / ref["b1 ms"], 3)
        r["x exact b8"] = round(r["b8 ms"] / ref["b8 ms"], 3)
    print(table(rows, ["graph", "pad_nodes", "b1 ms", "b8 ms", "x exact", "x exact b8"]))
    path = save(args.out, {"machine": machine(), "backbone": args.backbone, "size": args.size, "rounds": args.rounds,
                           "threads": 1, "explicit_pads": len(convs), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
