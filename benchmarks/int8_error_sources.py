"""Where an INT8 graph's error comes from: weights or activations, and which activations.

For each form, the graph of the cheap recipe's first step (calibrated ranges, nearest rounding, no bias
correction or head refit, so nothing has been fitted to compensate) is measured on held-out test images
against the FP32 graph, then again with one source of error taken away:
  - weights only: every activation quantizer removed (the weights stay INT8);
  - activations only: every weight and bias replaced by its FP32 value (the activations stay INT8);
  - per producer kind: the activation quantizers on the outputs of one kind of node removed (input, Clip =
    the ReLU6 outputs, Conv, Add, Flatten ...).
"Activations only" is measured with onnxruntime's graph optimizations off (next to the full graph measured the
same way): with them on, onnxruntime's WeightBiasQuantization transformer (level 1 and up) finds each Conv with
float weights between a DequantizeLinear and a QuantizeLinear and quantizes those weights itself, symmetric INT8
*per tensor*, before fusing it into QLinearConv. The first run of this script (mobilenet_v2 224 px) measured
exactly that and read it as "activations only" (85.9 vs 92.9% agreement for full INT8, TensorRT form); its
float weights were moreover the dequantized INT8 ones, so the row could not have isolated anything. tledge's
own graphs quantize every Conv/Gemm weight, so the transformer never touches them.
The other rows remove quantizers through quantize_model's own ``exclude_tensors``, as the accuracy gate does,
and are measured with optimizations on, as tledge measures its graphs.
A source whose removal brings agreement with FP32 close to 100% is what limits the form; the TensorRT form's
symmetric INT8 leaves 7 useful bits to a ReLU6 output, which is what issue 14 (QAT) is for.

Usage: python benchmarks/int8_error_sources.py [--backbone mobilenet_v2] [--size 224] [--images 1000]
Writes benchmarks/results/int8_error_sources.json.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, machine, make_testset, save, table  # noqa: E402


def float_weights(q: Any, base: Any) -> Any:
    """``q`` with every weight and bias DequantizeLinear replaced by the FP32 tensor it quantizes, taken from
    ``base`` (the FP32 graph ``q`` was quantized from, node names shared): weights free of quantization error,
    activations still quantized."""
    import onnx
    from onnx import numpy_helper
    m = onnx.ModelProto()
    m.CopyFrom(q)
    inits = {i.name for i in m.graph.initializer}
    base_inits = {i.name: i for i in base.graph.initializer}
    base_nodes = {n.name: n for n in base.graph.node}
    float_of: dict[str, Any] = {}       # weight/bias DQ output -> the FP32 initializer it stands for
    for n in m.graph.node:
        bn = base_nodes.get(n.name)
        if bn is None or n.op_type not in ("Conv", "Gemm"):
            continue
        for k in (1, 2):
            if k < len(n.input) and k < len(bn.input) and bn.input[k] in base_inits:
                float_of[n.input[k]] = base_inits[bn.input[k]]
    keep = []
    for n in m.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and n.output[0] in float_of:
            m.graph.initializer.append(numpy_helper.from_array(
                numpy_helper.to_array(float_of[n.output[0]]).astype(np.float32), n.output[0]))
        else:
            keep.append(n)
    if len(keep) == len(m.graph.node):
        raise SystemExit("float_weights: no weight DequantizeLinear matched a node of the FP32 graph")
    del m.graph.node[:]
    m.graph.node.extend(keep)
    used = {i for n in keep for i in n.input}
    live = [i for i in m.graph.initializer if i.name in used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(live)
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="mobilenet_v2")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--images", type=int, default=1000, help="test images measured (of the 10,000)")
    args = ap.parse_args()
    import onnx

    from tledge import card as card_mod
    from tledge.data import scan_for_run
    from tledge.evalset import EvalSet
    from tledge.export import onnx as onnx_io
    from tledge.export import ort
    from tledge.export.config import ExportConfig
    from tledge.export.int8.context import FormState, Int8Context
    from tledge.export.int8.plan import Plan
    from tledge.export.int8.quantize import activation_quantizers
    from tledge.export.int8.samples import calibration_samples, judge_split
    from tledge.model import load_classifier
    from tledge.perf import tune_allocator
    tune_allocator()

    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        from tledge.tune import TuneConfig, run_tune
        run = tmp / f"run-{args.backbone}-{args.size}"
        card = run_tune(ROOT / "data/fashion-mnist", run, TuneConfig(backbone=args.backbone, image_size=args.size,
                                                                     workers=2, cache_dir=str(tmp / "cache")))
        pre = card_mod.preprocess_of(card)
        fp32_path = run / "model.onnx"
        onnx_io.export(load_classifier(run, card), card, fp32_path)
        fp32 = onnx.load(str(fp32_path))
        test = EvalSet(test_samples(make_testset(tmp / "test"), args.images), pre, label="test images")
        rep = scan_for_run(run, card)
        cfg = ExportConfig(int8=True, threads=2)
        samples, _ = calibration_samples(card, cfg.calib, rep)
        with EvalSet(samples, pre, label="calibration images") as calib:
            x = calib.pre.finish(np.asarray(calib.x))
        ji, fi = judge_split(len(x), cfg.calib.judge_images)
        ctx = Int8Context(cfg, base=fp32, judge=x[ji], fit=x[fi], calib_batches=[x[i:i + 32] for i in range(0, len(x), 32)],
                          card=card, train_samples=list(rep.train), run=run, calib_ids=[s.sha256 for s in samples])
        ctx.set_reference()
        Plan.default().run_graph(ctx)
        ref = ort.logits(ctx.base, test.batches(50), 2)
        labels = test.labels

        def measure(label: str, form: str, m: Any, optimize: bool = True) -> dict[str, Any]:
            t0 = time.perf_counter()
            z = ort.logits(m, test.batches(50), 2, optimize=optimize)
            row = {"form": form, "variant": label, "agreement": float((z.argmax(1) == ref.argmax(1)).mean()),
                   "drop_pt": round(float((ref.argmax(1) == labels).mean() - (z.argmax(1) == labels).mean()) * 100, 2),
                   "logit_mse": float(((z - ref) ** 2).mean()), "seconds": round(time.perf_counter() - t0, 1),
                   "ort_optimizations": optimize}
            print(f"  {form:9s} {label:38s} agreement {row['agreement']:.2%}, drop {row['drop_pt']:.2f} pt", flush=True)
            return row

        rows = []
        for form in ("tensorrt", "cpu"):
            state = FormState(form, ctx.base, method="percentile")
            q = ctx.quantize(state)
            sites = [n.input[0] for n in activation_quantizers(q)]
            producer = {o: n.op_type for n in q.graph.node for o in n.output}
            rows.append(measure("full INT8", form, q))
            rows.append(measure("weights only (activations float)", form, ctx.quantize(state, float_tensors=tuple(sites))))
            rows.append(measure("full INT8, ORT optimizations off", form, q, optimize=False))
            rows.append(measure("activations only (weights float), ORT opt. off", form, float_weights(q, state.model), optimize=False))
            rows.append(measure("activations only, ORT opt. on (per-tensor weights)", form, float_weights(q, state.model)))
            groups: dict[str, list[str]] = {}
            for s in sites:
                groups.setdefault(producer.get(s, "input"), []).append(s)
            for kind, ts in groups.items():
                rows.append(measure(f"without the {len(ts)} on {kind} outputs", form,
                                    ctx.quantize(state, float_tensors=tuple(ts))))
        test.close()
    print(table(rows, ["form", "variant", "agreement", "drop_pt", "logit_mse"]))
    p = save("int8_error_sources", {"machine": machine(), "backbone": args.backbone, "size": args.size,
                                    "test_images": args.images, "method": "percentile (99.99), nearest rounding, "
                                    "no bias correction or head refit", "rows": rows})
    print(f"wrote {p}")


def test_samples(folder: Path, n: int) -> list[Any]:
    """``n`` of the test images, spread over the classes (every k-th of the sorted list)."""
    from tledge.data import scan
    val = scan(folder).val
    idx = np.linspace(0, len(val) - 1, min(n, len(val))).round().astype(int)
    return [val[i] for i in idx]


if __name__ == "__main__":
    main()
