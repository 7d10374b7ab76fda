"""`tledge export RUN`: FP32 ONNX (checked against PyTorch) -> FP16 -> INT8 (a recorded plan of passes,
both forms, gated on accuracy) -> TensorRT engines where TensorRT is present. Writes the artefacts named
in artefacts.py and RUN/export_manifest.json. Sequencing only: each stage lives in its own module."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

import tledge
from tledge import card as card_mod
from tledge.console import note, progress, status, warn
from tledge.data import scan_for_run
from tledge.errors import AccuracyError, DataError
from tledge.evalset import EvalSet, compare, run_logits
from tledge.export import artefacts, ort
from tledge.export import onnx as onnx_io
from tledge.export.config import ExportConfig
from tledge.fsutil import write_json


def run_export(run_dir: str | Path, cfg: ExportConfig) -> dict[str, Any]:
    from tledge.export import tensorrt as trt_build

    cfg.validate()
    run = Path(run_dir)
    card = card_mod.read(run)
    pre = card_mod.preprocess_of(card)
    want_engine = cfg.engine.engine
    if want_engine and not trt_build.tensorrt_available()[0]:
        trt_build.require_tensorrt()  # explicit --engine: say why and stop before any work
    t0 = time.perf_counter()
    ckpt_sha = artefacts.checkpoint_sha256(run, card)
    replay = None
    if cfg.quant.replay is not None and (cfg.int8 or want_engine == "int8"):
        from tledge.export.int8 import replay as int8_replay
        replay = int8_replay.load(cfg.quant.replay, ckpt_sha, cfg)  # refused before any work when it cannot apply
    # Everything is written into a staging folder and swapped in at the end (artefacts.commit_export), so an
    # interrupted export leaves the previous one whole, and no artefact of two exports is ever mixed.
    stage = run / artefacts.STAGING
    artefacts.remove([stage])
    stage.mkdir()
    try:
        manifest = _export(run, stage, card, pre, cfg, want_engine, ckpt_sha, replay)
    except BaseException:
        artefacts.remove([stage])
        raise
    manifest["seconds"] = round(time.perf_counter() - t0, 3)
    write_json(stage / artefacts.MANIFEST, manifest)
    gone = artefacts.commit_export(stage, run)
    if gone:
        note(f"removed {', '.join(gone)}: made from the previous export (run `tledge bench` / `tledge bundle` again)")
    return manifest


def _export(run: Path, stage: Path, card: dict[str, Any], pre: Any, cfg: ExportConfig, want_engine: str | None,
            ckpt_sha: str, replay: Any = None) -> dict[str, Any]:
    with status(f"loading PyTorch and the {card['backbone']['name']} checkpoint"):  # ~3 s that said nothing
        import torch

        from tledge.model import load_classifier
        model = load_classifier(run, card)
    from tledge.export import tensorrt as trt_build

    manifest: dict[str, Any] = {"tledge_version": tledge.__version__, "checkpoint_sha256": ckpt_sha,
                                "config": cfg.to_dict(), "artefacts": {}, "checks": {}, "versions": _versions(),
                                "seconds_per_stage": {}}
    stage_t = time.perf_counter()

    def stage_done(name: str) -> None:
        nonlocal stage_t
        now = time.perf_counter()
        manifest["seconds_per_stage"][name] = round(now - stage_t, 3)
        stage_t = now

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    note(f"exporting {card['backbone']['name']} at {card['preprocess']['crop']} px to ONNX (opset {cfg.opset}, "
         "dynamic batch)")
    fp32_path = artefacts.path(stage, "fp32")
    manifest["artefacts"]["fp32"] = onnx_io.file_info(onnx_io.export(model, card, fp32_path, cfg.opset))
    rep = scan_for_run(run, card)
    if rep.classes != card["classes"]:
        raise DataError(f"the dataset at {card['dataset']['root']} now has classes {rep.classes}, not the run's "
                        f"{card['classes']}.", "restore the dataset or tune again.")
    evalset = EvalSet(rep.val, pre, label="val images")
    with torch.inference_mode(), progress() as prog:
        task = prog.add_task("PyTorch reference (val)", total=len(evalset), info="")

        def infer(x: np.ndarray) -> np.ndarray:
            prog.advance(task, len(x))
            return model(torch.from_numpy(x)).numpy()
        ref = run_logits(infer, evalset)
    manifest["checks"]["torch"] = {"top1": float((ref.argmax(1) == evalset.labels).mean()), "n": len(evalset)}
    chk = onnx_io.check(fp32_path, ref, evalset, evalset.labels, cfg.fp32_tol, threads=cfg.threads)
    chk.pop("logits")
    manifest["checks"]["fp32"] = chk
    note(f"ONNX FP32 matches PyTorch: max |logit diff| {chk['max_abs_logit_diff']:.2e}, top-1 agreement "
         f"{chk['top1_agreement']:.4f} on {chk['n']} val images")
    fp32 = onnx_io.load_model(fp32_path)
    if cfg.simplify:
        fp32 = _simplified(stage, fp32, fp32_path, ref, evalset, cfg, manifest)
    stage_done("fp32")

    if cfg.fp16 or want_engine == "fp16":
        from tledge.export.fp16 import to_fp16
        half, info = to_fp16(fp32)
        onnx_io.set_metadata(half, {**onnx_io.metadata(card), "tledge.precision": "fp16"})
        p = artefacts.path(stage, "fp16")
        onnx_io.save_model(half, p)
        with progress() as prog:
            task = prog.add_task("FP16 check (val)", total=len(evalset), info="")
            c = compare(ort.logits(half, evalset.batches(32), cfg.threads, advance=lambda n: prog.advance(task, n)),
                        ref, evalset.labels)
        manifest["artefacts"]["fp16"] = onnx_io.file_info([p])
        manifest["checks"]["fp16"] = {**c, **info}
        note(f"FP16: val top-1 {c['top1']:.4f} (drop {c['drop_points']:.2f} pt), max |logit diff| "
             f"{c['max_abs_logit_diff']:.3g}")
        stage_done("fp16")

    if cfg.int8 or want_engine == "int8":
        from tledge.export.int8 import build_int8
        section = build_int8(run, card, cfg, fp32, rep, evalset, ref, dest=stage, replay=replay)
        for form, info in section.pop("files").items():
            manifest["artefacts"][f"int8-{form}"] = info
            manifest["checks"][f"int8-{form}"] = section["gate"][form]
        manifest["calibration"] = section["calibration"]
        manifest["int8"] = section
        stage_done("int8")
    if cfg.input == "raw":
        from tledge.export.raw_input import wrap_staged
        manifest["input"] = wrap_staged(stage, card, manifest, evalset, cfg.input_dtype, cfg.threads)
        worst = max(c["max_abs_logit_diff"] for c in manifest["input"]["checks"].values())
        note(f"--input raw: every graph takes 0-255 RGB ({cfg.input_dtype}) and normalises it itself; against the "
             f"normalised graphs on {next(iter(manifest['input']['checks'].values()))['n']} val images, max |logit "
             f"diff| {worst:.2e}")
        stage_done("raw_input")
    else:
        manifest["input"] = {"kind": "normalized", "dtype": "float32", "preprocess": pre.to_dict()}
    evalset.close()

    engines = [want_engine] if want_engine else \
        [p for p, asked in (("fp16", cfg.fp16), ("int8", cfg.int8)) if asked] if cfg.engine.auto_engine else []
    ok, why = trt_build.tensorrt_available()
    if engines and not ok:
        note(f"TensorRT is not available here ({why}): wrote the ONNX graphs; the {' and '.join(engines)} engine "
             "is built on the device (`python3 -m tledge_runtime build` in the deploy bundle).")
    for prec in engines:
        if not ok:
            manifest.setdefault("engines", {})[prec] = {"built": False, "reason": why}
            continue
        src = artefacts.path(stage, "fp16" if prec == "fp16" else "int8-tensorrt")
        e = cfg.engine
        eng = trt_build.build_engine(src, stage / artefacts.engine_file(prec), trt_build.EngineConfig(
            precision=prec, batch=e.batch, workspace_mib=e.workspace_mib, dla_core=e.dla_core,
            timing_cache=e.timing_cache or str(run / artefacts.timing_cache_file(trt_build.fingerprint_key()))))
        manifest.setdefault("engines", {})[prec] = {"built": True, **eng}
    if engines:
        stage_done("engines")
    manifest["files"] = artefacts.staged_files(stage)
    return manifest


def _simplified(run: Path, fp32: Any, fp32_path: Path, ref: np.ndarray, evalset: EvalSet, cfg: ExportConfig,
                manifest: dict[str, Any]) -> Any:
    """The graph simplified by onnxslim when installed and when the check stays green; else unchanged."""
    slim_path = run / "model.slim.onnx"
    if not onnx_io.simplify(fp32_path, slim_path):
        warn("--simplify needs onnxslim (pip install onnxslim); the graph was not simplified")
        return fp32
    try:
        c2 = onnx_io.check(slim_path, ref, evalset, evalset.labels, cfg.fp32_tol, threads=cfg.threads)
    except AccuracyError:
        warn("onnxslim changed the outputs; keeping the unsimplified graph")
        slim_path.unlink(missing_ok=True)
        return fp32
    c2.pop("logits")
    slim_path.replace(fp32_path)
    manifest["artefacts"]["fp32"] = onnx_io.file_info([fp32_path])
    manifest["checks"]["fp32_simplified"] = c2
    return onnx_io.load_model(fp32_path)


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch
    return {"tledge": tledge.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}
