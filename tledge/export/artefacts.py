"""The export's artefact files, in one registry: the pipeline writes them, bench and bundle read them.

Names are relative to the run directory. Lineage: the model card records the SHA-256 of the checkpoint
tune wrote; the export manifest records the checkpoint it was made from and the SHA-256 of every file it
wrote. ``lineage()`` is the one check bench and bundle use before they trust a file: an artefact counts
only when the manifest lists it with its hash and the manifest descends from the current checkpoint.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FILES = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8-tensorrt": "model.int8.trt.onnx",
         "int8-cpu": "model.int8.cpu.onnx"}
MANIFEST = "export_manifest.json"
CALIB_DIR = "calib"                                  # statistics cache (stats-<key>.npz) and the ranges
CALIBRATION = f"{CALIB_DIR}/calibration.json"        # the chosen scales and zero-points of every form
STAGING = ".export-staging"                          # export writes here, then swaps everything in at once
ENGINE_PRECISIONS = ("fp16", "int8")
BENCH_FILES = ("bench.json", "bench.csv", "bench.png")
BUNDLE_NAME = "deploy"
QAT_DIR = "qat"                                      # QAT weights per form (qat/<form>.safetensors)


def qat_file(form: str) -> str:
    """The quantization-aware fine-tuned weights of a form (float weights and biases, activation scales)."""
    return f"{QAT_DIR}/{form}.safetensors"


def timing_cache_file(fingerprint_key: str) -> str:
    """The export's TensorRT timing cache, one per device fingerprint (a cache from another TensorRT version or
    GPU is refused by TensorRT, or worse, misleads its tactic choice)."""
    return f"timing-{fingerprint_key}.cache"


def int8_file(form: str) -> str:
    """The INT8 graph of a form ('tensorrt' or 'cpu')."""
    return FILES[f"int8-{form}"]


def engine_file(precision: str) -> str:
    return f"model.{precision}.engine"


def path(run: str | Path, name: str) -> Path:
    """``run``/the file of artefact ``name`` (a FILES key)."""
    return Path(run) / FILES[name]


def export_outputs(run: str | Path) -> list[Path]:
    """Every file an export may have written into ``run`` (graphs, external data, engines and sidecars,
    the calibration ranges, the simplified graph), the manifest last."""
    run = Path(run)
    out = []
    for name in FILES.values():
        out += [run / name, run / f"{name}.data"]
    for prec in ENGINE_PRECISIONS:
        out += [run / engine_file(prec), run / f"{engine_file(prec)}.json"]
    out += [run / CALIBRATION, run / "model.slim.onnx", run / QAT_DIR, run / MANIFEST]
    return out


def downstream_of_export(run: str | Path) -> list[Path]:
    """What is made from the exported files: bench results and the deploy bundle."""
    run = Path(run)
    return [run / f for f in BENCH_FILES] + [run / BUNDLE_NAME, run / f"{BUNDLE_NAME}.tar.gz"]


def remove(paths: list[Path]) -> list[str]:
    """Delete files and folders that exist; returns the names removed."""
    gone = []
    for p in paths:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
        else:
            continue
        gone.append(p.name)
    return gone


def invalidate(run: str | Path) -> list[str]:
    """A new checkpoint is coming: remove everything made from the old one (export outputs, the export's
    staging folder, bench results, the bundle). The feature and statistics caches stay: they are keyed
    by content and cannot be mistaken for another model's."""
    run = Path(run)
    return remove(export_outputs(run) + downstream_of_export(run) + [run / STAGING])


@dataclass
class Lineage:
    """Which export artefacts of a run descend from its current checkpoint."""

    checkpoint_sha256: str
    manifest: dict[str, Any] | None
    ok: dict[str, Path] = field(default_factory=dict)       # FILES key or "engine-<prec>" -> file
    stale: dict[str, str] = field(default_factory=dict)     # file name -> why it is not trusted

    def require(self, keys: list[str] | None = None) -> None:
        """RunDirError naming every stale artefact (of ``keys``, default all) and the fix."""
        from tledge.errors import RunDirError
        bad = {n: why for n, why in self.stale.items() if keys is None or any(n == FILES.get(k) for k in keys)}
        if bad:
            lines = "; ".join(f"{n}: {why}" for n, why in sorted(bad.items()))
            raise RunDirError(f"refusing artefacts that do not descend from the current checkpoint ({lines}).",
                              "run `tledge export RUN` again (it replaces every artefact at once).")


def checkpoint_sha256(run: str | Path, card: dict[str, Any]) -> str:
    """The SHA-256 of the run's checkpoint, checked against the one tune recorded in the card."""
    from tledge.errors import RunDirError
    from tledge.fsutil import sha256_file
    ckpt = Path(run) / card.get("checkpoint", "checkpoint.safetensors")
    if not ckpt.is_file():
        raise RunDirError(f"{ckpt} is missing although {Path(run) / 'model_card.json'} exists.",
                          f"run `tledge tune` again with --out {run} --overwrite.")
    digest = sha256_file(ckpt)
    want = card.get("checkpoint_sha256")
    if want and digest != want:
        raise RunDirError(f"{ckpt} is not the checkpoint this run's model card describes (SHA-256 {digest[:12]}..., "
                          f"the card says {want[:12]}...): it was replaced or damaged after tune.",
                          f"restore it, or tune again with --out {run} --overwrite.")
    return digest


def lineage(run: str | Path, card: dict[str, Any]) -> Lineage:
    """Check every export artefact on disk against the manifest and the current checkpoint."""
    from tledge.fsutil import read_json, sha256_file
    run = Path(run)
    ckpt = checkpoint_sha256(run, card)
    mpath = run / MANIFEST
    manifest = None
    if mpath.is_file():
        try:
            manifest = read_json(mpath)
        except ValueError:
            manifest = None
    lin = Lineage(ckpt, manifest)
    candidates = {k: run / f for k, f in FILES.items()}
    candidates.update({f"engine-{p}": run / engine_file(p) for p in ENGINE_PRECISIONS})
    candidates["calibration"] = run / CALIBRATION
    for key, p in candidates.items():
        if not p.is_file():
            continue
        rel = str(p.relative_to(run))
        if manifest is None:
            lin.stale[p.name] = f"no valid {MANIFEST} lists it (an export did not finish, or it was copied in)"
        elif manifest.get("checkpoint_sha256") != ckpt:
            lin.stale[p.name] = f"{MANIFEST} was made from another checkpoint than {card.get('checkpoint')}"
        elif manifest.get("files", {}).get(rel) is None:
            lin.stale[p.name] = f"{MANIFEST} does not list it (left from an earlier export, or copied in)"
        elif manifest["files"][rel] != sha256_file(p):
            lin.stale[p.name] = "its SHA-256 differs from the one the export recorded (modified or replaced)"
        elif not _data_matches(p, manifest["files"]):
            lin.stale[p.name] = f"its external data {p.name}.data differs from the one the export recorded"
        else:
            lin.ok[key] = p
    return lin


def _data_matches(p: Path, files: dict[str, str]) -> bool:
    from tledge.fsutil import sha256_file
    data = p.with_name(f"{p.name}.data")
    want = files.get(data.name)
    if want is None:
        return not data.exists()
    return data.is_file() and sha256_file(data) == want


def commit_export(stage: Path, run: Path) -> list[str]:
    """Swap a finished export from ``stage`` into ``run``, all or nothing: the old manifest goes first (so
    from here until the new one lands, nothing in ``run`` counts as exported), then every old export output
    and everything made from them, then the new files, the new manifest last. A crash at any point leaves
    either the old export whole or no manifest at all, never a mix. Returns what was removed downstream."""
    import os

    from tledge.faults import maybe_interrupt
    remove([run / MANIFEST])
    remove(export_outputs(run))
    gone = remove(downstream_of_export(run))
    for f in sorted(stage.rglob("*")):
        if f.is_file() and f.name != MANIFEST:
            dest = run / f.relative_to(stage)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(f, dest)
            maybe_interrupt("export:commit")
    os.replace(stage / MANIFEST, run / MANIFEST)
    shutil.rmtree(stage, ignore_errors=True)
    return gone


def staged_files(stage: Path) -> dict[str, str]:
    """Relative name -> SHA-256 of every file written into the staging folder (the manifest's ``files``)."""
    from tledge.fsutil import sha256_file
    return {str(f.relative_to(stage)): sha256_file(f) for f in sorted(stage.rglob("*")) if f.is_file()}
