"""`tledge bundle RUN`: a self-contained folder (and .tar.gz) to copy to a Jetson.

Contents: the ONNX graphs (FP32, FP16, INT8 TensorRT form, and the INT8 CPU form for onnxruntime hosts),
the calibration ranges, class names and preprocessing, bundle.json (tledge version, every file's SHA-256,
the accuracy and latency measured at export/bench), and the tledge_runtime package, which imports
neither torch nor tledge. On the device: `python3 -m tledge_runtime build|predict|bench`.
"""
from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import tledge
from tledge import card as card_mod
from tledge.deploy import deepstream, tledge_runtime, triton
from tledge.deploy.tledge_runtime import bundle_io
from tledge.deploy.tledge_runtime.engine import DEFAULT_PROFILE
from tledge.console import warn
from tledge.errors import RunDirError, UsageError
from tledge.export import artefacts
from tledge.export import onnx as onnx_io
from tledge.export.artefacts import FILES, MANIFEST as EXPORT_MANIFEST
from tledge.faults import maybe_interrupt
from tledge.preprocess import Preprocess
from tledge.fsutil import atomic_path, read_json, sha256_file, write_json

RUNTIME_FILES = ("__init__.py", "__main__.py", "bundle_io.py", "classify.py", "cuda.py", "engine.py", "preprocess.py",
                 "timing.py")
README = """# tledge bundle: {backbone}, {n} classes

Runs with Python 3.8+, numpy and Pillow, plus TensorRT (JetPack) or onnxruntime. No PyTorch.

    python3 -m tledge_runtime verify                # every file against bundle.json
    python3 -m tledge_runtime build                 # the {precision} engine for this device (minutes)
    python3 -m tledge_runtime predict IMAGE_OR_DIR  # top-k per image (--json for JSON lines)
    python3 -m tledge_runtime bench                 # latency (p50/p90/p99); records the power mode

Engines are tied to the TensorRT version and GPU: `build` keys them by this device's fingerprint
(TensorRT version, GPU, compute capability, L4T release) under engines/, so a foreign or stale engine is
rebuilt, never loaded. Without TensorRT, predict and bench run the ONNX graphs in onnxruntime.
On a Jetson in a virtual environment, create it with --system-site-packages to see JetPack's TensorRT.
"""


TARGETS = ("python", "deepstream", "triton")


def make_bundle(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, precision: str = "int8",
                batch: tuple[int, int, int] = DEFAULT_PROFILE, archive: bool = True,
                sign: str | os.PathLike | None = None, targets: tuple[str, ...] = ("python",),
                deepstream_resize: str | None = None) -> dict[str, Any]:
    """Write the bundle folder atomically (built aside, then renamed) and optionally its .tar.gz; with
    ``sign`` (an ed25519 private key, PEM), also bundle.json.sig. Every bundle holds the graphs and
    tledge_runtime (python); ``targets`` may add deepstream/ (nvinfer configs) and triton/ (a model
    repository), which use the same graphs and the same preprocessing contract."""
    bad = [t for t in targets if t not in TARGETS]
    if bad:
        raise UsageError(f"unknown bundle target {bad[0]!r}; choices: {', '.join(TARGETS)}.", "pass --target python, "
                         "deepstream or triton (repeat it for several).")
    targets = tuple(dict.fromkeys(("python", *targets)))
    signer = load_private_key(sign) if sign else None
    run = Path(run_dir)
    card = card_mod.read(run)
    exp_path = run / EXPORT_MANIFEST
    lin = artefacts.lineage(run, card)
    lin.require()  # every graph, engine and the calibration must descend from this checkpoint: say which not
    if lin.manifest is None or "fp32" not in lin.ok:
        raise RunDirError(f"{run} has no finished export ({exp_path} or {run / FILES['fp32']} is missing).",
                          f"run `tledge export {run} --fp16 --int8` first.")
    export = lin.manifest
    graph_key = {"int8": "int8-tensorrt", "fp16": "fp16"}.get(precision, "fp32")  # the graph the engine comes from
    if graph_key not in lin.ok:
        raise RunDirError(f"the bundle's default precision is {precision} but {run / FILES[graph_key]} does not exist.",
                          f"run `tledge export {run} --{precision}` first, or pass --precision.")
    # the graphs' own input contract: the card's preprocessing, raw pixels if exported with --input raw
    graph_pre = Preprocess.from_dict(export.get("input", {}).get("preprocess") or card["preprocess"])
    name = triton.model_name(card["backbone"]["name"])
    if "deepstream" in targets:  # refuse a configuration nvinfer cannot reproduce before writing anything
        deepstream.scale_and_offsets(graph_pre)
        deepstream.resolve_resize_mode(graph_pre, deepstream_resize)
    out = Path(out_dir) if out_dir else run / artefacts.BUNDLE_NAME
    out.parent.mkdir(parents=True, exist_ok=True)
    tar_path = out.parent / f"{out.name}.tar.gz"
    # A bundle killed half-way leaves its hidden staging folder or archive: clean them up first.
    artefacts.remove(sorted(out.parent.glob(f".{out.name}.*")) + sorted(out.parent.glob(f".{tar_path.name}.*")))
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        stage = Path(tmp) / out.name
        (stage / "tledge_runtime").mkdir(parents=True)
        src_pkg = Path(tledge_runtime.__file__).parent
        for f in RUNTIME_FILES:
            shutil.copy2(src_pkg / f, stage / "tledge_runtime" / f)
        for key in ("fp32", "fp16", "int8-tensorrt", "int8-cpu"):
            p = lin.ok.get(key)
            if p is not None:
                shutil.copy2(p, stage / p.name)
                if Path(str(p) + ".data").is_file():
                    shutil.copy2(str(p) + ".data", stage / (p.name + ".data"))
        if "calibration" in lin.ok:
            shutil.copy2(lin.ok["calibration"], stage / "calibration.json")
        (stage / "README.md").write_text(README.format(backbone=card["backbone"]["name"], n=len(card["classes"]),
                                                       precision=precision))
        target_info: dict[str, Any] = {"python": {"runtime": "tledge_runtime"}}
        if "deepstream" in targets:
            src = lin.ok[graph_key]
            ds_file = src.name.replace(".onnx", ".probs.onnx")
            for w in deepstream.write(stage / "deepstream", onnx_io.load_model(src), ds_file, card["classes"],
                                      graph_pre, precision, batch, name, deepstream_resize):
                warn(w)
            target_info["deepstream"] = {"folder": "deepstream", "onnx": ds_file, "configs": [deepstream.PRIMARY,
                                                                                             deepstream.SECONDARY]}
        if "triton" in targets:
            triton.write(stage / "triton", lin.ok["fp32"], name, card["classes"], graph_pre, precision, batch,
                         src_pkg / "preprocess.py")
            target_info["triton"] = {"folder": "triton", "model": name, "plan": f"triton/{name}_trt/1/model.plan",
                                     "plan_source": Path(FILES[graph_key]).name, "plan_precision": precision}
        files = {str(p.relative_to(stage)): sha256_file(p) for p in sorted(stage.rglob("*")) if p.is_file()}
        manifest = {
            "schema": bundle_io.SCHEMA, "tledge_version": tledge.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "backbone": card["backbone"]["name"], "classes": card["classes"], "preprocess": graph_pre.to_dict(),
            "input": {k: v for k, v in export.get("input", {"kind": "normalized"}).items() if k != "preprocess"},
            "targets": target_info,
            "output": "logits", "engine_defaults": {"precision": precision, "batch": list(batch)},
            "export": {k: _brief(v) for k, v in export.get("checks", {}).items()},
            "calibration": export.get("calibration", {}).get("key"),
            "checkpoint_sha256": lin.checkpoint_sha256, "export_manifest_sha256": sha256_file(exp_path),
            "bench": _bench(run, lin), "files": files,
        }
        write_json(stage / bundle_io.MANIFEST, manifest)
        if signer is not None:
            (stage / bundle_io.SIGNATURE).write_bytes(signer.sign((stage / bundle_io.MANIFEST).read_bytes()))
        # The old archive goes before the new folder comes in: a crash in between leaves the new folder
        # alone, never beside an archive of another bundle.
        artefacts.remove([tar_path])
        if out.exists():
            shutil.rmtree(out)
        os.replace(stage, out)
        maybe_interrupt("bundle:archive")
    result = {"folder": str(out), "files": len(files) + 1, "signed": signer is not None, "targets": list(targets),
              "bytes": sum(p.stat().st_size for p in out.rglob("*") if p.is_file())}
    if archive:
        with atomic_path(tar_path) as tmp_tar, tarfile.open(tmp_tar, "w:gz") as tar:
            for p in sorted(out.rglob("*")):
                if "__pycache__" in p.parts:
                    continue
                tar.add(p, arcname=str(Path(out.name) / p.relative_to(out)), recursive=False)
        result.update(archive=str(tar_path), archive_bytes=tar_path.stat().st_size)
    return result


def _crypto() -> tuple[Any, Any]:
    """cryptography's serialization and ed25519 modules, or MissingDependency naming the `sign` extra."""
    from tledge.deps import optional_import
    return (optional_import("cryptography.hazmat.primitives.serialization", "pip install 'tledge[sign]'"),
            optional_import("cryptography.hazmat.primitives.asymmetric.ed25519", "pip install 'tledge[sign]'"))


def load_private_key(path: str | os.PathLike) -> Any:
    """An ed25519 private key from a PEM file (`tledge bundle-keygen`, or `openssl genpkey -algorithm ed25519`)."""
    serialization, ed25519 = _crypto()
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise UsageError(f"--sign {path}: cannot read an unencrypted PEM private key ({exc}).",
                         "pass the NAME.key that `tledge bundle-keygen NAME` wrote.") from exc
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise UsageError(f"--sign {path} is not an ed25519 private key.", "make one with `tledge bundle-keygen NAME`.")
    return key


def keygen(name: str | os.PathLike) -> tuple[Path, Path]:
    """NAME.key (private, mode 0600) and NAME.pub (public, for `tledge_runtime --key`), ed25519 PEM."""
    serialization, ed25519 = _crypto()
    priv, pub = Path(f"{name}.key"), Path(f"{name}.pub")
    for p in (priv, pub):
        if p.exists():
            raise UsageError(f"{p} already exists; refusing to overwrite a key.", "choose another NAME.")
    key = ed25519.Ed25519PrivateKey.generate()
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    fd = os.open(priv, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # a private key is the one file kept 0600
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


def _brief(check: dict[str, Any]) -> dict[str, Any]:
    res = check.get("final", check)
    return {k: res.get(k) for k in ("n", "top1", "ref_top1", "drop_points", "top1_agreement", "max_abs_logit_diff")
            if k in res} | ({"kept_float": check["kept_float"]} if check.get("kept_float") else {})


def _bench(run: Path, lin: artefacts.Lineage) -> dict[str, Any] | None:
    """The bench figures, when bench.json measured these very artefacts (a bench of earlier graphs is not
    shipped: export removes it, and a copied-in one names other files or hashes)."""
    p = run / "bench.json"
    if not p.is_file():
        return None
    b = read_json(p)
    if b.get("checkpoint_sha256") != lin.checkpoint_sha256 or b.get("export_files") != (lin.manifest or {}).get("files"):
        warn(f"{p} was not measured on these artefacts; the bundle ships no bench figures (run `tledge bench` again)")
        return None
    return {"machine": b["machine"].get("cpu"), "p50_ms": {f"{r['artefact']}@{lat['batch']}": lat["p50_ms"]
                                                         for r in b["results"] for lat in r["latency"]
                                                         if lat["mode"] == "model"}}
