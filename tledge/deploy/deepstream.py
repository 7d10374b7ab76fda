"""`tledge bundle --target deepstream`: the graph and the Gst-nvinfer configs for a classifier in DeepStream.

nvinfer fits each frame (primary) or object crop (secondary) to the network size itself and then computes
``y = net-scale-factor * (x - offsets[c])`` on the 0-255 pixels, one scale for all channels. So:
- the preprocessing is exact when the graph normalises itself (`tledge export --input raw`: scale 1, offsets
  0), or when the model's std is the same for all channels (scale 1/(255 std), offsets 255 mean); otherwise
  the bundle is refused with that fix;
- nvinfer can stretch or letterbox but not centre-crop: the model card's resize mode must be one of those,
  or the user names the mode to deploy with (``resize_mode``) and is told what it costs to measure;
- nvinfer's classifier parser compares ``classifier-threshold`` with the output values, so the graph shipped
  here ends in a softmax: its only output ``probs`` is a probability.
Keys written are those of DeepStream's gstnvinfer_property_parser.h (a test checks them against that list).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tledge.errors import UsageError
from tledge.export import onnx as onnx_io
from tledge.preprocess import Preprocess

# resize mode -> (maintain-aspect-ratio, symmetric-padding); shorter-side+center-crop has no nvinfer equivalent
RESIZE_KEYS = {"stretch": (0, 0), "letterbox": (1, 1), "letterbox-topleft": (1, 0)}
# Pillow interpolation -> nvinfer scaling-filter (NvBufSurfTransform_Inter: 0 nearest, 1 bilinear, 2 cubic on GPU)
SCALING_FILTER = {"nearest": 0, "bilinear": 1, "bicubic": 2}
NETWORK_MODE = {"fp32": 0, "int8": 1, "fp16": 2}
OUTPUT = "probs"
PRIMARY, SECONDARY = "config_infer_primary.txt", "config_infer_secondary.txt"


def scale_and_offsets(pre: Preprocess) -> tuple[float, list[float]]:
    """nvinfer's (net-scale-factor, offsets) that reproduce ``pre``'s input tensor from 0-255 pixels."""
    if pre.input == "raw":
        return 1.0, [0.0, 0.0, 0.0]
    if len(set(pre.std)) == 1:
        s = float(pre.std[0])
        return 1.0 / (255.0 * s), [255.0 * float(m) for m in pre.mean]
    raise UsageError(
        f"nvinfer cannot reproduce this model's normalisation: its std {list(pre.std)} differs per channel and "
        "nvinfer has one net-scale-factor for all channels.",
        "export the graphs with the normalisation inside: `tledge export RUN --int8 --input raw`, then bundle again.")


def resolve_resize_mode(pre: Preprocess, asked: str | None) -> tuple[str, str | None]:
    """(mode nvinfer is configured with, warning or None)."""
    tuned = pre.resize_mode
    mode = asked or tuned
    if mode not in RESIZE_KEYS:
        raise UsageError(
            f"the model was tuned with resize mode '{tuned}', which nvinfer cannot do (it stretches or letterboxes "
            "the frame or crop to the network size).",
            "tune with `--resize-mode stretch` (or letterbox) so training sees what the device does; or measure the "
            "cost with `tledge bench RUN --resize-mode stretch` and accept it with `--deepstream-resize stretch`.")
    warning = None
    if mode != tuned:
        warning = (f"DeepStream will fit images by '{mode}' but the model was tuned with '{tuned}': accuracy on the "
                   f"device differs from tledge's figures; `tledge bench RUN --resize-mode {mode}` measures it")
    return mode, warning


def with_softmax(model: Any) -> Any:
    """A copy of ``model`` whose only output is ``probs`` = softmax(logits) over the classes."""
    import onnx
    from onnx import helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    logits = g.output[0]
    g.node.append(helper.make_node("Softmax", [logits.name], [OUTPUT], name="probs_softmax", axis=1))
    out = onnx.ValueInfoProto()
    out.CopyFrom(logits)
    out.name = OUTPUT
    del g.output[:]
    g.output.append(out)
    props = {p.key: p.value for p in m.metadata_props}
    props["tledge.output"] = "probabilities (softmax)"
    onnx_io.set_metadata(m, props)
    onnx.checker.check_model(m)
    return m


def engine_name(onnx_file: str, batch: int, precision: str) -> str:
    """The engine file name nvinfer gives the engine it builds from ``onnx_file`` (so it is found next time)."""
    return f"{onnx_file}_b{batch}_gpu0_{precision}.engine"


def config_text(*, primary: bool, onnx_file: str, precision: str, batch: int, pre: Preprocess, mode: str,
                name: str, threshold: float) -> str:
    scale, offsets = scale_and_offsets(pre)
    keep_ratio, symmetric = RESIZE_KEYS[mode]
    lines = [
        f"# tledge: {name}, {'primary (full frames)' if primary else 'secondary (object crops)'} classifier.",
        "# Preprocessing: " + ("the graph normalises raw 0-255 RGB itself, so nvinfer passes the pixels unchanged."
                               if pre.input == "raw" else "(x - 255 mean) / (255 std), one std for all channels."),
        f"# Resize: {mode} (maintain-aspect-ratio / symmetric-padding below); the model card's mode is "
        f"{pre.resize_mode}.",
        "[property]",
        "gpu-id=0",
        f"net-scale-factor={scale!r}",
        "offsets=" + ";".join(repr(o) for o in offsets),
        "model-color-format=0",
        f"onnx-file={onnx_file}",
        f"model-engine-file={engine_name(onnx_file, batch, precision)}",
        "labelfile-path=labels.txt",
        f"batch-size={batch}",
        f"network-mode={NETWORK_MODE[precision]}",
        "network-type=1",
        f"process-mode={1 if primary else 2}",
        f"gie-unique-id={1 if primary else 2}",
        f"infer-dims=3;{pre.crop};{pre.crop}",
        f"maintain-aspect-ratio={keep_ratio}",
        f"symmetric-padding={symmetric}",
        f"scaling-filter={SCALING_FILTER.get(pre.interpolation, 1)}",
        f"output-blob-names={OUTPUT}",
        f"classifier-threshold={threshold}",
        f"classifier-type={name}",
    ]
    if not primary:
        lines += ["operate-on-gie-id=1", "classifier-async-mode=1", "input-object-min-width=16",
                  "input-object-min-height=16"]
    return "\n".join(lines) + "\n"


def write(dest: Path, graph: Any, onnx_file: str, classes: list[str], pre: Preprocess, precision: str,
          batch: tuple[int, int, int], name: str, resize_mode: str | None = None, threshold: float = 0.5) -> list[str]:
    """Write ``dest`` (the deepstream/ folder of a bundle); returns the warnings to print."""
    mode, warning = resolve_resize_mode(pre, resize_mode)
    scale_and_offsets(pre)  # refuse before writing anything
    bad = [c for c in classes if ";" in c or "\n" in c]
    if bad:
        raise UsageError(f"class names {bad} contain ';', which separates labels in nvinfer's label file.",
                         "rename those class folders and tune again.")
    dest.mkdir(parents=True)
    onnx_io.save_model(with_softmax(graph), dest / onnx_file)
    (dest / "labels.txt").write_text(";".join(classes) + "\n")  # classifier labels: one line, ';'-separated
    (dest / PRIMARY).write_text(config_text(primary=True, onnx_file=onnx_file, precision=precision, batch=batch[1],
                                            pre=pre, mode=mode, name=name, threshold=threshold))
    (dest / SECONDARY).write_text(config_text(primary=False, onnx_file=onnx_file, precision=precision, batch=batch[2],
                                              pre=pre, mode=mode, name=name, threshold=threshold))
    (dest / "README.md").write_text(README.format(name=name, mode=mode, tuned=pre.resize_mode, precision=precision,
                                                  primary=PRIMARY, secondary=SECONDARY, threshold=threshold,
                                                  warning=f"\n**Warning:** {warning}.\n" if warning else ""))
    return [warning] if warning else []


README = """# DeepStream (Gst-nvinfer) configs for {name}

- `{primary}`: a primary classifier on full frames (`process-mode=1`).
- `{secondary}`: a secondary classifier on a detector's objects (`process-mode=2`, `operate-on-gie-id=1`: the
  detector's `gie-unique-id`; set `operate-on-class-ids` to the detector classes to classify).
- The graph's only output, `probs`, is a softmax, so `classifier-threshold={threshold}` is a probability: objects
  whose best class scores below it get no label.
- nvinfer builds the {precision} engine from the ONNX file on first start (minutes) and saves it under the
  `model-engine-file` name, which later starts load.
- Images are fitted by **{mode}** (the model was tuned with {tuned}). nvinfer scales on the GPU or VIC, so its
  interpolation is close to, not bit-identical with, Pillow's; the normalisation is exact.
{warning}
Primary, on a file (Jetson):

    gst-launch-1.0 filesrc location=sample.mp4 ! qtdemux ! h264parse ! nvv4l2decoder ! m.sink_0 \\
      nvstreammux name=m batch-size=1 width=1280 height=720 ! \\
      nvinfer config-file-path={primary} ! nvvideoconvert ! nvdsosd ! nv3dsink

Secondary, behind your detector (its config has `gie-unique-id=1`) and a tracker:

    ... ! nvinfer config-file-path=DETECTOR_CONFIG.txt ! \\
      nvtracker ll-lib-file=/opt/nvidia/deepstream/deepstream/lib/libnvds_nvmultiobjecttracker.so ! \\
      nvinfer config-file-path={secondary} ! nvvideoconvert ! nvdsosd ! nv3dsink

In a deepstream-app config: `[secondary-gie0]` with `enable=1`, `gie-unique-id=2`, `operate-on-gie-id=1`,
`config-file={secondary}`.
"""
