"""Merge, export and check: the tuned network as one ONNX graph with a dynamic batch axis.

The graph's output is the logits (no softmax), the same everywhere in tledge. Class names and the
preprocessing are stored in the ONNX metadata so the file alone is enough to use it.
"""
from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from tledge.deps import optional_import
from tledge.errors import AccuracyError
from tledge.fsutil import sha256_file

INPUT, OUTPUT = "input", "logits"
EXTERNAL_DATA_LIMIT = 1_800_000_000  # protobuf's hard limit is 2 GiB; leave headroom for the graph


def metadata(card: dict[str, Any]) -> dict[str, str]:
    return {
        "tledge.classes": json.dumps(card["classes"]),
        "tledge.preprocess": json.dumps(card["preprocess"], sort_keys=True),
        "tledge.output": "logits",
        "tledge.backbone": card["backbone"]["name"],
        "tledge.version": card.get("tledge_version", ""),
    }


def set_metadata(model: Any, meta: dict[str, str]) -> None:
    onnx = optional_import("onnx")
    keep = [p for p in model.metadata_props if p.key not in meta]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for k, v in meta.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    onnx = optional_import("onnx")
    m = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in m.metadata_props}
    return {"classes": json.loads(props["tledge.classes"]), "preprocess": json.loads(props["tledge.preprocess"]),
            "output": props.get("tledge.output"), "backbone": props.get("tledge.backbone")}


def save_model(model: Any, dest: str | os.PathLike) -> list[Path]:
    """Save atomically; graphs over ~1.8 GB keep their weights in ``<name>.data`` beside the file (one
    file, so the two always travel together). Returns the files written."""
    onnx = optional_import("onnx")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    data_name = dest.name + ".data"
    big = model.ByteSize() > EXTERNAL_DATA_LIMIT
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}.") as tmp:
        tmp_model = Path(tmp) / dest.name
        if big:
            onnx.save_model(model, str(tmp_model), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
            os.replace(Path(tmp) / data_name, dest.parent / data_name)  # data first: the .onnx marks completion
        else:
            onnx.save_model(model, str(tmp_model))
            if (dest.parent / data_name).exists():
                (dest.parent / data_name).unlink()
        os.replace(tmp_model, dest)
    return [dest, dest.parent / data_name] if big else [dest]


def load_model(path: str | os.PathLike) -> Any:
    return optional_import("onnx").load(str(path))  # external data is read from beside the file


def fold_constants(model: Any) -> Any:
    """Turn Constant nodes into initializers (the TorchScript exporter emits Clip bounds as Constants),
    so every later pass sees weights and bounds in one place."""
    onnx = optional_import("onnx")
    g = model.graph
    keep = []
    for n in g.node:
        if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value":
            t = onnx.TensorProto()
            t.CopyFrom(n.attribute[0].t)
            t.name = n.output[0]
            g.initializer.append(t)
        else:
            keep.append(n)
    del g.node[:]
    g.node.extend(keep)
    return model


def export(model: Any, card: dict[str, Any], dest: str | os.PathLike, opset: int = 17) -> list[Path]:
    """Export the merged torch network with a dynamic batch axis; returns the files written."""
    torch = optional_import("torch")
    onnx = optional_import("onnx")
    size = card["preprocess"]["crop"]
    x = torch.zeros(2, 3, size, size)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.onnx"
        with warnings.catch_warnings():
            # The TorchScript exporter is deprecated in favour of torch.export (dynamo), which needs
            # onnxscript and does not fold BatchNorm into convolutions; this one does, and is stable
            # for these CNNs. Use the dynamo exporter where the legacy one is gone.
            warnings.simplefilter("ignore")
            try:
                torch.onnx.export(model.eval(), (x,), str(raw), input_names=[INPUT], output_names=[OUTPUT],
                                  dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}}, opset_version=opset,
                                  do_constant_folding=True, dynamo=False)
            except TypeError:  # a torch without the legacy exporter
                torch.onnx.export(model.eval(), (x,), str(raw), input_names=[INPUT], output_names=[OUTPUT],
                                  dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=4096)}},
                                  opset_version=opset, dynamo=True)
        m = onnx.load(str(raw))
    m = fold_constants(m)
    m.producer_name, m.producer_version = "tledge", card.get("tledge_version", "")
    m.doc_string = f"{card['backbone']['name']} + {card['head']['kind']} head; output: logits (no softmax)"
    set_metadata(m, metadata(card))
    onnx.checker.check_model(m, full_check=True)
    return save_model(m, dest)


def check(onnx_path: str | os.PathLike, ref_logits: np.ndarray, evalset: Any, labels: np.ndarray,
          max_abs_tol: float, min_agreement: float = 0.999, threads: int | None = None,
          what: str = "ONNX FP32") -> dict[str, Any]:
    """onnxruntime against the reference logits on real validation images; AccuracyError past tolerance."""
    from tledge.console import progress
    from tledge.evalset import compare, run_logits
    from tledge.runtimes.onnxruntime import OrtRunner

    onnx = optional_import("onnx")
    onnx.checker.check_model(str(onnx_path))
    with OrtRunner(onnx_path, "cpu", threads) as r, progress() as prog:
        task = prog.add_task(f"{what} check (val)", total=len(evalset), info="")

        def infer(x: np.ndarray) -> np.ndarray:
            out = r.infer(x)
            prog.advance(task, len(x))
            return out
        logits = run_logits(infer, evalset)
    res = compare(logits, ref_logits, labels)
    res["tolerance"] = {"max_abs_logit_diff": max_abs_tol, "min_top1_agreement": min_agreement}
    if res["max_abs_logit_diff"] > max_abs_tol or res["top1_agreement"] < min_agreement:
        raise AccuracyError(
            f"{what} ({onnx_path}) does not match PyTorch on {res['n']} validation images: max |logit diff| "
            f"{res['max_abs_logit_diff']:.3g} (tolerance {max_abs_tol}), top-1 agreement "
            f"{res['top1_agreement']:.4f} (minimum {min_agreement}).",
            "report this with the model card; try --opset 13 or --no-simplify.")
    return {**res, "logits": logits}


def file_info(paths: list[Path]) -> dict[str, Any]:
    return {"files": [p.name for p in paths], "bytes": sum(p.stat().st_size for p in paths),
            "sha256": sha256_file(paths[0])}


def fold_shapes(model: Any) -> Any:
    """The graph after onnxruntime's basic-level optimizations (constant folding, redundant nodes), which
    is what onnxruntime's ``quant_pre_process`` does before quantizing: shape arithmetic such as the
    run-time "same" padding of TF-ported networks (EfficientNet-Lite: Shape/Cast/Concat chains before
    every depthwise Pad) is computed once here instead of on every inference. Standard ONNX ops only
    (basic level adds no contributed ops); opset imports the graph does not use are dropped."""
    import tempfile

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = str(Path(tmp) / "basic.onnx")
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        out = onnx.load(so.optimized_model_filepath)
    used = {n.domain for n in out.graph.node}
    keep = [o for o in out.opset_import if o.domain in ("", "ai.onnx") or o.domain in used]
    del out.opset_import[:]
    out.opset_import.extend(keep)
    del out.metadata_props[:]
    out.metadata_props.extend(model.metadata_props)
    return out


def simplify(src: Path, dest: Path) -> bool:
    """onnxslim where installed; returns False (and writes nothing) when it is not."""
    try:
        import onnxslim
    except ImportError:
        return False
    m = onnxslim.slim(load_model(src))
    save_model(m, dest)
    return True


__all__ = ["export", "check", "save_model", "load_model", "metadata", "read_metadata", "simplify", "fold_shapes",
           "file_info", "INPUT", "OUTPUT"]
