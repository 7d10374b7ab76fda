"""`python3 -m tledge_runtime`: build, predict and bench a tledge bundle on the device.

Needs Python 3.8+, numpy, Pillow, and TensorRT (JetPack) or onnxruntime. No torch, no tledge.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

T0 = time.perf_counter()  # cold-start reference: interpreter start to first prediction is reported

from . import __version__, bundle_io, engine, timing  # noqa: E402
from .classify import InputError, classify_files, expand_inputs, format_row  # noqa: E402
from .preprocess import Preprocess  # noqa: E402
ONNX = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.trt.onnx", "int8-cpu": "model.int8.cpu.onnx"}


def bundle_root(arg: str | None) -> Path:
    return Path(arg).resolve() if arg else Path(__file__).resolve().parent.parent


def engine_dir(root: Path, fp: dict[str, Any]) -> Path:
    """engines/<key>: one folder per device fingerprint (TensorRT, GPU, compute capability, SM count, L4T),
    with its own timing cache, so a foreign or stale engine or cache is never loaded."""
    return root / "engines" / engine.fingerprint_key(fp)


def engine_path(root: Path, precision: str, fp: dict[str, Any]) -> Path:
    return engine_dir(root, fp) / f"model.{precision}.engine"


def engine_status(dest: Path, manifest: dict[str, Any], precision: str, batch: Sequence[int], dla_core: int | None,
                  fp: dict[str, Any], recipe_sha: str | None = None) -> tuple[bool, str]:
    """(reusable, why): an engine is reused only when it was built here from this bundle's graph with these
    options (``recipe_sha``: engine.recipe_sha256 of the wanted build); anything else (missing, foreign
    device, other TensorRT, other graph, profile or build recipe) is rebuilt."""
    side = Path(str(dest) + ".json")
    if not dest.is_file() or not side.is_file():
        return False, "no engine for this device yet"
    try:
        sc = json.loads(side.read_text())
    except ValueError:
        return False, "its sidecar is unreadable"
    problems = engine.compatibility_problems(sc, fp)
    if problems:
        return False, "; ".join(problems)
    if sc.get("onnx_sha256") != manifest["files"].get(ONNX[precision]):
        return False, "it was built from another graph"
    prof = sc.get("profile", {})
    if [prof.get("min"), prof.get("opt"), prof.get("max")] != list(batch) or sc.get("dla_core") != dla_core:
        return False, "it was built with another batch profile or DLA setting"
    if recipe_sha is not None and sc.get("recipe_sha256") != recipe_sha:
        return False, "it was built with another build recipe (TensorRT, precision flags, workspace or profile)"
    if sc.get("engine_sha256") and sc["engine_sha256"] != bundle_io.sha256(dest):
        return False, "the engine file differs from the one its sidecar describes"
    return True, "built for this device from this graph"


def wanted_recipe(trt: Any, precision: str, batch: Sequence[int], workspace: int, dla_core: int | None) -> str:
    _, strongly = engine.network_flags(trt)
    return engine.recipe_sha256(engine.recipe(trt, precision, strongly, tuple(batch), workspace, dla_core))


def build(root: Path, manifest: dict[str, Any], precision: str, batch: tuple[int, int, int], dla_core: int | None,
          workspace: int, force: bool) -> Path:
    trt = engine.import_tensorrt()
    fp = engine.fingerprint(trt)
    dest = engine_path(root, precision, fp)
    ok, why = engine_status(dest, manifest, precision, batch, dla_core, fp,
                            wanted_recipe(trt, precision, batch, workspace, dla_core))
    if ok and not force:
        print(f"engine for this device already built: {dest}")
        return dest
    print(f"building the {precision} engine ({why}) for {fp.get('gpu')} (TensorRT {fp.get('tensorrt')}, "
          f"L4T {fp.get('l4t')}); this takes minutes on a Jetson")
    dest.parent.mkdir(parents=True, exist_ok=True)
    engine.build(root / ONNX[precision], dest, precision, batch, workspace, dla_core,
                 timing_cache=dest.parent / "timing.cache")
    print(f"wrote {dest}")
    return dest


class OrtModel:
    def __init__(self, path: Path, threads: int | None = None) -> None:
        import onnxruntime as ort
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # exact INT8 on x86 CPUs without VNNI (no saturating u8s8 kernels): the same answers as on the build
        # machine; a no-op on VNNI/AMX CPUs and on GPUs (tledge/runtimes/onnxruntime.py says why)
        so.add_session_config_entry("session.x64quantprecision", "1")
        avail = ort.get_available_providers()
        providers = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in avail and os.environ.get(
            "TLEDGE_RUNTIME_CPU") != "1"] + ["CPUExecutionProvider"]
        self.sess = ort.InferenceSession(str(path), so, providers=providers)
        self.name = self.sess.get_inputs()[0].name
        self.provider = self.sess.get_providers()[0]

    def infer(self, x: Any) -> Any:
        return self.sess.run(None, {self.name: x})[0]

    def synchronize(self) -> None:
        pass


def open_model(root: Path, manifest: dict[str, Any], backend: str, precision: str) -> tuple[Any, str]:
    """(model, description). auto: a TensorRT engine when TensorRT and a GPU are here, else onnxruntime."""
    trt_ok, why = engine.tensorrt_available()
    if backend == "tensorrt" or (backend == "auto" and trt_ok):
        if not trt_ok:
            raise engine.EngineError(f"--backend tensorrt: {why}. {engine.TRT_HINT}")
        prec = "int8" if precision in ("int8", "int8-cpu") else precision
        if prec == "fp32":
            raise engine.EngineError("tledge bundles build fp16 or int8 engines; use --precision fp16|int8, or "
                                     "--backend onnxruntime for fp32")
        # build() reuses the engine only when it matches this bundle's graph, the bundle's batch profile and
        # recipe and this device (a stale engine, e.g. from `build --batch 1,1,8`, is rebuilt, not loaded)
        b = manifest.get("engine_defaults", {}).get("batch", list(engine.DEFAULT_PROFILE))
        path = build(root, manifest, prec, tuple(b), None, 1024, False)
        return engine.TrtEngine(path), f"TensorRT {prec} engine {path.relative_to(root)}"
    prec = precision
    if prec == "int8":
        prec = "int8-cpu" if ONNX["int8-cpu"] in manifest["files"] else "int8"
    if ONNX[prec] not in manifest["files"]:
        raise bundle_io.BundleError(f"this bundle has no {precision} graph ({ONNX[prec]}); it has "
                                    f"{', '.join(k for k, v in ONNX.items() if v in manifest['files'])}.")
    m = OrtModel(root / ONNX[prec])
    note = f" (TensorRT not used: {why})" if backend == "auto" and not trt_ok else ""
    return m, f"onnxruntime {m.provider} {ONNX[prec]}{note}"


def triton_plan(root: Path, manifest: dict[str, Any], force: bool) -> Path:
    """The engine for this device (built or reused, with the bundle's profile) copied to the Triton
    repository's ``NAME_trt/1/model.plan``; Triton's max_batch_size is that profile's maximum."""
    import shutil
    t = manifest.get("targets", {}).get("triton")
    if not t:
        raise bundle_io.BundleError("this bundle has no Triton repository: make it with `tledge bundle RUN --target "
                                    "triton`.")
    d = manifest.get("engine_defaults", {})
    eng = build(root, manifest, t["plan_precision"], tuple(d.get("batch", engine.DEFAULT_PROFILE)), None, 1024, force)
    dest = root / t["plan"]
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.copyfile(eng, tmp)
    os.replace(tmp, dest)  # Triton may be polling the repository: never a half-copied plan
    print(f"wrote {dest} (from {eng.relative_to(root)})")
    return dest


def cmd_predict(args: argparse.Namespace, root: Path, manifest: dict[str, Any]) -> None:
    pre = Preprocess.from_dict(manifest["preprocess"])
    classes = manifest["classes"]
    model, desc = open_model(root, manifest, args.backend, args.precision)
    print(f"# {desc}", file=sys.stderr)
    first = True
    for row in classify_files(expand_inputs(args.images), pre, model.infer, classes, args.top_k, args.batch):
        print(format_row(row, args.json))
        if first:
            print(f"# cold start to first prediction: {time.perf_counter() - T0:.3f}s", file=sys.stderr)
            first = False


def cmd_bench(args: argparse.Namespace, root: Path, manifest: dict[str, Any]) -> None:
    import numpy as np
    model, desc = open_model(root, manifest, args.backend, args.precision)
    pre = Preprocess.from_dict(manifest["preprocess"])
    rng = np.random.default_rng(0)
    results = []
    for b in args.batches:
        # random input of the graph's own kind: normalised values, or 0-255 pixels for a raw-input bundle
        x = (rng.integers(0, 256, (b, *pre.input_shape)).astype(pre.dtype) if pre.input == "raw"
             else rng.standard_normal((b, *pre.input_shape)).astype(np.float32))
        results.append(timing.summarize(timing.time_calls(lambda: model.infer(x), model.synchronize,
                                                          budget_s=args.budget), b))
    out = {"runtime": desc, "fingerprint": engine.fingerprint(engine.import_tensorrt()) if engine.tensorrt_available()[0]
           else {"tensorrt": None}, "power": power_mode(), "latency": results}
    for r in results:
        print(f"batch {r['batch']:>3}: p50 {r['p50_ms']:.3f} ms  p90 {r['p90_ms']:.3f}  p99 {r['p99_ms']:.3f}  "
              f"{r['throughput_ips']:.0f} img/s")
    pm = out["power"]
    if pm and not pm.get("max_mode"):
        print(f"warning: power mode {pm.get('nvpmodel')!r} is not MAXN; run `sudo nvpmodel -m 0 && sudo jetson_clocks` "
              "for the device's best numbers", file=sys.stderr)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=2))


def power_mode() -> dict[str, Any] | None:
    import shutil
    import subprocess
    if not Path("/etc/nv_tegra_release").exists():
        return None
    mode = None
    if shutil.which("nvpmodel"):
        q = subprocess.run(["nvpmodel", "-q"], capture_output=True, text=True).stdout
        mode = next((ln.split(":", 1)[1].strip() for ln in q.splitlines() if "Power Mode" in ln), None)
    return {"nvpmodel": mode, "max_mode": bool(mode and "MAXN" in mode.upper())}


def parse_batch(text: str) -> tuple[int, int, int]:
    parts = [int(p) for p in text.split(",")]
    parts = parts * 3 if len(parts) == 1 else parts
    if len(parts) != 3 or not 1 <= parts[0] <= parts[1] <= parts[2]:
        raise argparse.ArgumentTypeError("batch must be min,opt,max with 1 <= min <= opt <= max")
    return parts[0], parts[1], parts[2]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m tledge_runtime", description=__doc__)
    ap.add_argument("--bundle", help="bundle folder (default: the folder holding this package)")
    ap.add_argument("--key", default=os.environ.get("TLEDGE_BUNDLE_KEY"),
                    help="ed25519 public key (PEM): refuse a bundle whose bundle.json is not signed by it "
                         "(default $TLEDGE_BUNDLE_KEY)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="manifest, device fingerprint and backends")
    sub.add_parser("verify", help="check every file against the manifest")
    b = sub.add_parser("build", help="build the TensorRT engine for this device")
    b.add_argument("--precision", choices=["int8", "fp16"], default=None)
    b.add_argument("--batch", type=parse_batch, default=None)
    b.add_argument("--dla-core", type=int, default=None)
    b.add_argument("--workspace", type=int, default=1024, help="MiB")
    b.add_argument("--force", action="store_true")
    p = sub.add_parser("predict", help="top-k classes for images or folders")
    p.add_argument("images", nargs="+")
    p.add_argument("--top-k", "-k", type=int, default=3)
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--backend", choices=["auto", "tensorrt", "onnxruntime"], default="auto")
    p.add_argument("--precision", choices=["fp32", "fp16", "int8"], default=None)
    be = sub.add_parser("bench", help="latency with the same statistics as `tledge bench`")
    be.add_argument("--batch", dest="batches", type=lambda s: [int(v) for v in s.split(",")], default=[1, 8, 32])
    be.add_argument("--budget", type=float, default=2.0)
    be.add_argument("--backend", choices=["auto", "tensorrt", "onnxruntime"], default="auto")
    be.add_argument("--precision", choices=["fp32", "fp16", "int8"], default=None)
    be.add_argument("--json-out", default=None)
    tp = sub.add_parser("triton-plan", help="build (or reuse) the engine and put it in the bundle's Triton repository")
    tp.add_argument("--force", action="store_true")
    ex = sub.add_parser("extract", help="safely extract a bundle .tar.gz")
    ex.add_argument("archive")
    ex.add_argument("dest", nargs="?", default=".")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "extract":
            print(bundle_io.safe_extract(args.archive, args.dest))
            return 0
        root = bundle_root(args.bundle)
        if args.key:
            bundle_io.verify_signature(root, args.key)
        manifest = bundle_io.verify(root)
        default_prec = manifest.get("engine_defaults", {}).get("precision", "int8")
        if args.cmd == "info":
            ok, why = engine.tensorrt_available()
            print(json.dumps({"bundle": str(root), "runtime": __version__, "tledge": manifest.get("tledge_version"),
                              "classes": manifest["classes"], "tensorrt": ok or why,
                              "export": manifest.get("export")}, indent=2))
        elif args.cmd == "verify":
            print(f"ok: {len(manifest['files'])} files match {bundle_io.MANIFEST}"
                  + (f", signed by {args.key}" if args.key else ""))
        elif args.cmd == "build":
            d = manifest.get("engine_defaults", {})
            build(root, manifest, args.precision or d.get("precision", "int8"), args.batch or tuple(d.get("batch", engine.DEFAULT_PROFILE)),
                  args.dla_core, args.workspace, args.force)
        elif args.cmd == "triton-plan":
            triton_plan(root, manifest, args.force)
        elif args.cmd == "predict":
            args.precision = args.precision or default_prec
            cmd_predict(args, root, manifest)
        elif args.cmd == "bench":
            args.precision = args.precision or default_prec
            cmd_bench(args, root, manifest)
    except (bundle_io.BundleError, engine.EngineError, engine.cuda.CudaError, InputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
