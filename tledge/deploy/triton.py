"""`tledge bundle --target triton`: a Triton Inference Server model repository.

    triton/
      NAME_onnx/      onnxruntime backend, the FP32 graph (runs as soon as the repository is served)
      NAME_trt/       TensorRT backend; 1/model.plan is built on the device (`python3 -m tledge_runtime
                      triton-plan`): engines are tied to the TensorRT version and GPU
      NAME_preprocess/  Python backend: encoded image bytes -> the graph's input tensor, with tledge's own
                      preprocessing (the bundle's preprocess.py, Pillow + numpy), so clients send files
      NAME/           ensemble: IMAGE (bytes) -> NAME_preprocess -> NAME_trt -> logits
Every config has dynamic batching and ``max_batch_size`` = the engine profile's maximum; the logits output
names the labels file, so Triton's classification extension returns class names.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from tledge.preprocess import Preprocess

DTYPES = {"float32": "TYPE_FP32", "uint8": "TYPE_UINT8"}
IMAGE = "IMAGE"


def _io(name: str, dtype: str, dims: list[int], label: bool = False) -> str:
    lab = ' label_filename: "labels.txt"' if label else ""
    return f'  {{ name: "{name}" data_type: {dtype} dims: [ {", ".join(map(str, dims))} ]{lab} }}'


def _batching(max_batch: int) -> str:
    return f"max_batch_size: {max_batch}\ndynamic_batching {{ max_queue_delay_microseconds: 100 }}\n"


def model_config(name: str, platform: str, pre: Preprocess, classes: int, max_batch: int) -> str:
    return (f'name: "{name}"\nplatform: "{platform}"\n' + _batching(max_batch)
            + "input [\n" + _io("input", DTYPES[pre.dtype], list(pre.input_shape)) + "\n]\n"
            + "output [\n" + _io("logits", "TYPE_FP32", [classes], label=True) + "\n]\n")


def preprocess_config(name: str, pre: Preprocess, max_batch: int) -> str:
    return (f'name: "{name}"\nbackend: "python"\n' + _batching(max_batch)
            + "input [\n" + _io(IMAGE, "TYPE_STRING", [1]) + "\n]\n"
            + "output [\n" + _io("input", DTYPES[pre.dtype], list(pre.input_shape)) + "\n]\n")


def ensemble_config(name: str, pre_model: str, model: str, classes: int, max_batch: int) -> str:
    return (f'name: "{name}"\nplatform: "ensemble"\nmax_batch_size: {max_batch}\n'
            + "input [\n" + _io(IMAGE, "TYPE_STRING", [1]) + "\n]\n"
            + "output [\n" + _io("logits", "TYPE_FP32", [classes], label=True) + "\n]\n"
            + "ensemble_scheduling {\n  step [\n"
            + f'    {{ model_name: "{pre_model}" model_version: -1 input_map {{ key: "{IMAGE}" value: "{IMAGE}" }} '
              'output_map { key: "input" value: "preprocessed" } },\n'
            + f'    {{ model_name: "{model}" model_version: -1 input_map {{ key: "input" value: "preprocessed" }} '
              'output_map { key: "logits" value: "logits" } }\n'
            + "  ]\n}\n")


MODEL_PY = '''"""Triton Python backend: encoded image bytes -> the tledge graph's input tensor (written by tledge bundle).

Uses tledge_preprocess.py beside this file (tledge's own preprocessing: Pillow + numpy), with the recipe in
preprocess.json, so the tensor is the one tledge computed at export and bench.
"""
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tledge_preprocess import Preprocess, decode_image  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def load_recipe():
    with open(os.path.join(HERE, "preprocess.json")) as f:
        return Preprocess.from_dict(json.load(f))


def preprocess_batch(pre, images):
    """images: encoded image bytes (a sequence, or Triton's (N, 1) object array) -> (N, 3, H, W)."""
    flat = [im[0] if isinstance(im, np.ndarray) else im for im in images]
    return np.stack([pre.to_array(decode_image(bytes(b))[0]) for b in flat])


class TritonPythonModel:
    def initialize(self, args):
        self.pre = load_recipe()

    def execute(self, requests):
        import triton_python_backend_utils as pb_utils
        responses = []
        for request in requests:
            try:
                images = pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy()
                x = preprocess_batch(self.pre, images)
                responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("input", x)]))
            except Exception as exc:  # a bad image fails its own request, not the batch
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"preprocess: {exc}")))
        return responses
'''

README = """# Triton model repository for {name}

    tritonserver --model-repository=$PWD      # from this folder

- `{name}_onnx`: onnxruntime backend, FP32 graph. Serves at once.
- `{name}_trt`: TensorRT backend, {precision}. Build its plan on this device first (engines are tied to the
  TensorRT version and GPU): `python3 -m tledge_runtime triton-plan` from the bundle folder writes
  `{name}_trt/1/model.plan` with the bundle's batch profile (max {max_batch}).
- `{name}_preprocess` + `{name}` (ensemble): send encoded image files as `IMAGE` (TYPE_STRING, one per batch
  row) and get logits; the preprocessing is tledge's own ({mode}, input {input}). The Python backend needs
  numpy and Pillow (`pip install pillow` in the Triton image).
- Without a plan yet: `tritonserver --model-repository=$PWD --model-control-mode=explicit --load-model {name}_onnx`.
  The ensemble points at `{name}_trt`; edit its second step's `model_name` to use `{name}_onnx` instead.

Ask for class names with the classification extension (`class_count` in the request's output parameters).
"""


def write(dest: Path, fp32_path: Path, name: str, classes: list[str], pre: Preprocess, precision: str,
          batch: tuple[int, int, int], preprocess_src: Path) -> None:
    """Write ``dest`` (the triton/ folder of a bundle) from the bundle's graphs."""
    max_batch = batch[2]
    n = len(classes)
    labels = "\n".join(classes) + "\n"
    dest.mkdir(parents=True)
    onnx_dir = dest / f"{name}_onnx"
    (onnx_dir / "1").mkdir(parents=True)
    shutil.copy2(fp32_path, onnx_dir / "1" / "model.onnx")
    if Path(str(fp32_path) + ".data").is_file():
        shutil.copy2(str(fp32_path) + ".data", onnx_dir / "1" / (Path(fp32_path).name + ".data"))
    (onnx_dir / "config.pbtxt").write_text(model_config(onnx_dir.name, "onnxruntime_onnx", pre, n, max_batch))
    (onnx_dir / "labels.txt").write_text(labels)
    trt_dir = dest / f"{name}_trt"
    (trt_dir / "1").mkdir(parents=True)
    (trt_dir / "config.pbtxt").write_text(model_config(trt_dir.name, "tensorrt_plan", pre, n, max_batch))
    (trt_dir / "labels.txt").write_text(labels)
    pp_dir = dest / f"{name}_preprocess"
    (pp_dir / "1").mkdir(parents=True)
    (pp_dir / "config.pbtxt").write_text(preprocess_config(pp_dir.name, pre, max_batch))
    (pp_dir / "1" / "model.py").write_text(MODEL_PY)
    shutil.copy2(preprocess_src, pp_dir / "1" / "tledge_preprocess.py")
    (pp_dir / "1" / "preprocess.json").write_text(json.dumps(pre.to_dict(), indent=2, sort_keys=True) + "\n")
    ens = dest / name
    (ens / "1").mkdir(parents=True)  # Triton wants a version folder for ensembles too
    (ens / "config.pbtxt").write_text(ensemble_config(name, pp_dir.name, trt_dir.name, n, max_batch))
    (ens / "labels.txt").write_text(labels)
    (dest / "README.md").write_text(README.format(name=name, precision=precision, max_batch=max_batch,
                                                  mode=pre.resize_mode, input=pre.input))


def model_name(backbone: str) -> str:
    """A Triton model name: letters, digits, '_' and '-'."""
    return "".join(ch if ch.isalnum() or ch in "_-" else "_" for ch in f"tledge_{backbone}")

