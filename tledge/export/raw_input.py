"""`tledge export --input raw`: graphs that take the 0-255 RGB pixels and normalise them as their first ops.

DeepStream's nvinfer can only express one scale factor for all channels (``y = net-scale-factor * (x -
offsets[c])``), so ImageNet's per-channel std cannot be given to it; Triton clients would otherwise have to
reimplement the normalisation. With the normalisation inside the graph both feed plain pixels and the
answer is tledge's own.

The prefix is ``Cast`` (uint8 input only), ``Div 255``, ``Sub mean``, ``Div std``: the same float32
operations in the same order as Preprocess.normalize (torchvision's ToTensor + Normalize), so the tensor
the original graph reads is the one it read before, bit for bit, and every INT8 graph's first quantizer
sees the normalised tensor it was calibrated on. TensorRT can fuse the three constant element-wise
operations into one pointwise layer ahead of the first convolution (not measured here: no TensorRT on the
build machines; `benchmarks/resize_modes.py` measures the onnxruntime cost).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from tledge.deps import optional_import
from tledge.export.onnx import INPUT

NORMALIZED = f"{INPUT}_normalized"


def wrap(model: Any, mean: tuple[float, ...], std: tuple[float, ...], dtype: str = "float32") -> Any:
    """A copy of ``model`` whose input ``input`` takes raw pixels of ``dtype`` (float32 or uint8, NCHW)."""
    onnx = optional_import("onnx")
    from onnx import TensorProto, helper, numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    old = next(i for i in g.input if i.name == INPUT)
    if old.type.tensor_type.elem_type != TensorProto.FLOAT:
        raise ValueError(f"the graph's input is {TensorProto.DataType.Name(old.type.tensor_type.elem_type)}, "
                         "not float: it is already wrapped")
    for n in g.node:
        for k, name in enumerate(n.input):
            if name == INPUT:
                n.input[k] = NORMALIZED
    c = np.float32
    g.initializer.extend([
        numpy_helper.from_array(np.array(255.0, c), "raw_input_255"),
        numpy_helper.from_array(np.asarray(mean, c).reshape(1, 3, 1, 1), "raw_input_mean"),
        numpy_helper.from_array(np.asarray(std, c).reshape(1, 3, 1, 1), "raw_input_std"),
    ])
    prefix = []
    src = INPUT
    if dtype == "uint8":
        prefix.append(helper.make_node("Cast", [INPUT], ["raw_input_f32"], name="raw_input_cast", to=TensorProto.FLOAT))
        src = "raw_input_f32"
    elif dtype != "float32":
        raise ValueError(f"raw input dtype {dtype!r}: float32 or uint8")
    prefix += [helper.make_node("Div", [src, "raw_input_255"], ["raw_input_scaled"], name="raw_input_div255"),
               helper.make_node("Sub", ["raw_input_scaled", "raw_input_mean"], ["raw_input_centred"],
                                name="raw_input_sub_mean"),
               helper.make_node("Div", ["raw_input_centred", "raw_input_std"], [NORMALIZED], name="raw_input_div_std")]
    nodes = prefix + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    old.type.tensor_type.elem_type = TensorProto.UINT8 if dtype == "uint8" else TensorProto.FLOAT
    onnx.checker.check_model(m)
    return m


CHECK_IMAGES = 512          # val images the wrapped graphs are compared on
MAX_ABS = 1e-4              # FP32/FP16: largest |logit difference| allowed against the normalised-input graph
MAX_INT8_DROP_DELTA = 0.1   # INT8: top-1 points the raw-input graph may differ by from the normalised one


def wrap_staged(stage: Any, card: dict[str, Any], manifest: dict[str, Any], evalset: Any, dtype: str,
                threads: int | None) -> dict[str, Any]:
    """Wrap every graph staged by this export, check each against its normalised-input self on val images
    (AccuracyError past tolerance), and rewrite it in place. Returns the manifest's ``input`` section."""
    from tledge.card import preprocess_of
    from tledge.console import progress
    from tledge.errors import AccuracyError
    from tledge.evalset import compare
    from tledge.export import artefacts, ort
    from tledge.export import onnx as onnx_io

    pre = preprocess_of(card)
    raw_pre = pre.with_input("raw", dtype)
    n = min(CHECK_IMAGES, len(evalset))
    labels = evalset.labels[:n]

    def head(p: Any):
        for i, b in enumerate(evalset.batches(32, p)):
            if i * 32 >= n:
                return
            yield b[: n - i * 32]

    checks = {}
    keys = [k for k in ("fp32", "fp16", "int8-tensorrt", "int8-cpu") if k in manifest["artefacts"]]
    with progress() as prog:
        task = prog.add_task("--input raw: wrapped graphs against the normal ones", total=2 * n * len(keys), info="")

        def advance(k: int) -> None:
            prog.advance(task, k)
        for key in keys:
            path = artefacts.path(stage, key)
            model = onnx_io.load_model(path)
            wrapped = wrap(model, pre.mean, pre.std, dtype)
            props = {p.key: p.value for p in model.metadata_props}
            onnx_io.set_metadata(wrapped, {**props, **raw_metadata(raw_pre)})
            normal = ort.logits(model, head(pre), threads, advance)
            raw = ort.logits(wrapped, head(raw_pre), threads, advance)
            c = compare(raw, normal, labels)
            checks[key] = {k: c[k] for k in ("n", "max_abs_logit_diff", "top1_agreement", "drop_points")}
            exact = not key.startswith("int8")
            bad = c["max_abs_logit_diff"] > MAX_ABS if exact else abs(c["drop_points"]) > MAX_INT8_DROP_DELTA
            if bad:
                raise AccuracyError(
                    f"the raw-input {key} graph does not match the normalised one on {n} val images: max |logit "
                    f"diff| {c['max_abs_logit_diff']:.3g}, top-1 {c['drop_points']:+.2f} pt (tolerance "
                    f"{MAX_ABS if exact else MAX_INT8_DROP_DELTA}).", "report this bug; export without --input raw.")
            onnx_io.save_model(wrapped, path)
            manifest["artefacts"][key] = onnx_io.file_info([path])
    return {"kind": "raw", "dtype": dtype, "layout": "NCHW", "channel_order": "RGB", "range": [0, 255],
            "checks": checks, "preprocess": raw_pre.to_dict()}


def raw_metadata(raw_pre: Any) -> dict[str, str]:
    import json
    return {"tledge.preprocess": json.dumps(raw_pre.to_dict(), sort_keys=True),
            "tledge.input": f"raw-{raw_pre.dtype}"}
