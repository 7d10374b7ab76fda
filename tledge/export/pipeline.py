"""`tledge export RUN`: FP32 ONNX (checked against PyTorch), FP16 and INT8 graphs (both forms, gated on
accuracy), and TensorRT engines where TensorRT is present. Writes RUN/export_manifest.json.

Artefacts (all in the run directory, each written atomically):
  model.onnx              FP32, dynamic batch, class names and preprocessing in its metadata
  model.fp16.onnx         FP16 weights and compute, FP32 input/output
  model.int8.trt.onnx     INT8 Q/DQ, TensorRT explicit-quantization form
  model.int8.cpu.onnx     INT8 Q/DQ, onnxruntime CPU form
  calib/                  calibration statistics cache (keyed) and calibration.json (the ranges)
  model.<precision>.engine + .engine.json   TensorRT engine and its sidecar manifest
"""
from __future__ import annotations

import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

import tledge
from tledge import card as card_mod
from tledge.console import note, progress, warn
from tledge.data import IMAGE_EXTS, Sample, scan, stratified_split
from tledge.errors import AccuracyError, DataError, UsageError
from tledge.evalset import EvalSet, compare, run_logits
from tledge.export import calibrate as cal
from tledge.export import onnx as onnx_io
from tledge.export.quantize import FORMS, activation_tensors, check_tensorrt_qdq, quantizable_nodes, quantize_model
from tledge.fsutil import read_json, sha256_json, write_json

REPO_CALIBRATION = Path(__file__).resolve().parents[2] / "calibration"
FILES = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8-tensorrt": "model.int8.trt.onnx",
         "int8-cpu": "model.int8.cpu.onnx"}
MANIFEST = "export_manifest.json"
BIAS_CORRECTION_MODES = ("auto", "empirical", "analytic")


@dataclass
class ExportConfig:
    fp16: bool = False
    int8: bool = False
    forms: tuple[str, ...] = ("tensorrt", "cpu")
    method: str = "auto"                  # auto | minmax | percentile | entropy | mse
    percentile: float = 99.99
    calib: str = "auto"                   # auto | train | a folder of images
    calib_count: int = 512
    max_drop: float = 1.0                 # top-1 points on val against PyTorch
    fallback: bool = True                 # keep sensitive layers in float to meet max_drop
    max_fallback_fraction: float = 0.25
    cle: bool = True                      # cross-layer equalization (exact pairs only)
    bias_correction: bool = True
    bias_correction_mode: str = "auto"    # auto (the better on held-out calibration images) | empirical | analytic
    bias_correction_images: int = 64
    head_refit: bool = True               # re-fit the linear head on INT8 features of training images
    adaround: bool = True                 # learned weight rounding where nearest rounding costs (README, INT8)
    adaround_budget_s: float = 60.0       # wall seconds for learned rounding in all, worst layers first
    adaround_images: int = 32
    refit_count: int = 4000               # training images used for the head refit (stratified)
    refit_distill: float = 0.0            # weight of distillation from FP32 logits (1 - it: labels)
    engine: str | None = None             # None | fp16 | int8 (explicit: fail without TensorRT)
    auto_engine: bool = True              # build engines for the asked precisions when TensorRT is here
    batch: tuple[int, int, int] = (1, 8, 32)
    workspace_mib: int = 1024
    dla_core: int | None = None
    timing_cache: str | None = None
    opset: int = 17
    simplify: bool = False
    threads: int | None = None
    fp32_tol: float = 1e-3
    extra: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------ calibration

def _image_files(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."))


def calibration_samples(card: dict[str, Any], cfg: ExportConfig, val: Sequence[Sample]) -> tuple[list[Sample], str]:
    """The calibration images and a description of where they came from; never the val split."""
    import hashlib

    def from_folder(folder: Path) -> list[Sample]:
        files = _image_files(folder)
        if not files:
            raise DataError(f"calibration folder {folder} holds no images.",
                            f"put images ({', '.join(sorted(IMAGE_EXTS))}) in {folder}, or pass --calib train.")
        return [Sample(f, -1, hashlib.sha256(Path(f).read_bytes()).hexdigest()) for f in files]

    src = cfg.calib
    if src == "auto":
        shipped = REPO_CALIBRATION / Path(card["dataset"]["root"]).name
        src = str(shipped) if shipped.is_dir() else "train"
    if src == "train":
        rep = scan(card["dataset"]["root"], card["dataset"].get("val_fraction") or 0.2,
                   card["dataset"].get("seed") or 0)
        frac = min(0.999, cfg.calib_count / max(1, len(rep.train)))
        pool = rep.train if frac >= 0.999 else stratified_split(rep.train, frac, 1234)[1]
        samples, where = pool, f"stratified sample of the training split of {card['dataset']['root']}"
    else:
        folder = Path(src)
        if not folder.is_dir():
            raise DataError(f"--calib {folder} is not a folder.", "pass a folder of images, 'train' or 'auto'.")
        samples, where = from_folder(folder), str(folder)
    val_shas = {s.sha256 for s in val}
    overlap = [s.path for s in samples if s.sha256 in val_shas]
    if overlap:
        raise DataError(f"{len(overlap)} calibration images are validation images (e.g. {overlap[0]}); "
                        "calibrating on val would make the accuracy check meaningless.",
                        "remove them from the calibration folder or pass --calib train.")
    if len(samples) > cfg.calib_count:
        rng = np.random.default_rng(0)
        samples = [samples[i] for i in sorted(rng.choice(len(samples), cfg.calib_count, replace=False))]
    return samples, where


def calibration_stats(fp32: Any, samples: list[Sample], pre: Any, out_dir: Path, threads: int | None,
                      evalset: EvalSet) -> tuple[dict[str, cal.TensorStats], dict[str, Any]]:
    """Statistics for every activation, from the cache when graph, images, preprocessing and count match."""
    import hashlib
    graph_hash = hashlib.sha256(fp32.SerializeToString(deterministic=True)).hexdigest()
    key = sha256_json({"graph": graph_hash, "images": [s.sha256 for s in samples],
                       "preprocess": pre.to_dict(), "count": len(samples), "bins": cal.BINS})
    path = out_dir / f"stats-{key[:16]}.npz"
    stats = cal.load_stats(path, key)
    info: dict[str, Any] = {"key": key, "file": str(path.relative_to(out_dir.parent)), "images": len(samples)}
    if stats is not None:
        info.update(cache="hit", seconds=0.0)
        note(f"calibration: statistics reused from {path} (graph, images, preprocessing and count unchanged)")
        return stats, info
    t0 = time.perf_counter()
    names = activation_tensors(fp32)
    with progress() as prog:
        task = prog.add_task("calibrate", total=len(samples), info="")
        stats = cal.collect(fp32, names, evalset.batches(8), threads, lambda n: prog.advance(task, n))
    cal.save_stats(path, stats, key)
    for old in out_dir.glob("stats-*.npz"):
        if old != path:
            old.unlink()
    info.update(cache="miss", seconds=round(time.perf_counter() - t0, 3),
                peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
    return stats, info


# ------------------------------------------------------------------------------------ INT8 + gate

def _ort_logits(model: Any, batches: list[np.ndarray], threads: int | None) -> np.ndarray:
    import onnxruntime as ort

    from tledge.runtimes.onnxruntime import session_options
    sess = ort.InferenceSession(model.SerializeToString(), session_options(threads), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: b})[0] for b in batches])


def _probe_mse(model: Any, probe: list[np.ndarray], probe_ref: np.ndarray, threads: int | None) -> float:
    """Mean squared difference of ``model``'s logits from the FP32 ones on the probe calibration images."""
    return float(np.mean((_ort_logits(model, probe, threads) - probe_ref) ** 2))


def choose_method(fp32: Any, stats: dict[str, cal.TensorStats], form: str, cfg: ExportConfig,
                  probe: list[np.ndarray], probe_ref: np.ndarray, overrides: dict[str, np.ndarray] | None = None,
                  ) -> tuple[str, dict[str, float]]:
    """With --method auto, the method whose INT8 logits are closest (MSE) to FP32 on calibration images
    (never on val: the val split only judges the result)."""
    methods = cal.METHODS if cfg.method == "auto" else (cfg.method,)
    scores = {}
    for m in methods:
        q = quantize_model(fp32, stats, form, m, cfg.percentile, weight_overrides=overrides)
        scores[m] = _probe_mse(q, probe, probe_ref, cfg.threads)
    return min(scores, key=scores.get), scores


def sensitivity(fp32: Any, stats: dict[str, cal.TensorStats], form: str, method: str, cfg: ExportConfig,
                probe: list[np.ndarray], probe_ref: np.ndarray, overrides: dict[str, np.ndarray] | None = None,
                ) -> list[tuple[str, float]]:
    """Per quantized layer: the logit MSE (vs FP32, calibration images) when that layer alone stays in
    float. Sorted, most helpful first."""
    nodes = quantizable_nodes(fp32, FORMS[form])
    out = []
    with progress() as prog:
        task = prog.add_task(f"sensitivity ({form})", total=len(nodes), info="")
        for n in nodes:
            q = quantize_model(fp32, stats, form, method, cfg.percentile, exclude={n}, weight_overrides=overrides)
            out.append((n, _probe_mse(q, probe, probe_ref, cfg.threads)))
            prog.advance(task)
    return sorted(out, key=lambda t: t[1])


def gate_int8(fp32: Any, stats: dict[str, cal.TensorStats], form: str, method: str, cfg: ExportConfig,
              evalset: EvalSet, ref: np.ndarray, probe: list[np.ndarray], probe_ref: np.ndarray,
              overrides: dict[str, np.ndarray] | None = None) -> tuple[Any, dict[str, Any]]:
    """Quantize, measure the val drop, and keep the most sensitive layers in float until the drop is
    within --max-drop. Raises AccuracyError (saying how far it got) when it cannot."""
    from tledge.export.quantize import ensure_node_names

    ensure_node_names(fp32)
    q = quantize_model(fp32, stats, form, method, cfg.percentile, weight_overrides=overrides)
    with progress() as prog:
        prog.add_task(f"val INT8 ({form})", total=None, info="")
        res = compare(_ort_logits(q, list(evalset.batches(32)), cfg.threads), ref, evalset.labels)
    report: dict[str, Any] = {"method": method, "initial": res, "kept_float": [], "steps": []}
    note(f"INT8 {form} ({method}): val top-1 {res['top1']:.4f}, drop {res['drop_points']:.2f} pt "
         f"(limit {cfg.max_drop})")
    if res["drop_points"] <= cfg.max_drop:
        report["final"] = res
        return q, report
    if not cfg.fallback:
        raise AccuracyError(f"INT8 {form} loses {res['drop_points']:.2f} points of top-1 (limit --max-drop "
                            f"{cfg.max_drop}) and --no-fallback forbids keeping layers in float.",
                            "allow the fallback, raise --max-drop, or use --fp16.")
    ranked = sensitivity(fp32, stats, form, method, cfg, probe, probe_ref, overrides)
    limit = max(1, int(len(ranked) * cfg.max_fallback_fraction))
    k, best = 1, res
    while True:
        keep = {n for n, _ in ranked[:k]}
        q = quantize_model(fp32, stats, form, method, cfg.percentile, exclude=keep, weight_overrides=overrides)
        r = compare(_ort_logits(q, list(evalset.batches(32)), cfg.threads), ref, evalset.labels)
        report["steps"].append({"kept_float": k, "drop_points": r["drop_points"]})
        note(f"  keeping {k} most sensitive layer(s) in float: drop {r['drop_points']:.2f} pt")
        if r["drop_points"] < best["drop_points"]:
            best = r
        if r["drop_points"] <= cfg.max_drop:
            report.update(kept_float=sorted(keep), final=r)
            warn(f"INT8 {form}: kept {k} of {len(ranked)} quantizable layers in float to stay within "
                 f"{cfg.max_drop} pt: {', '.join(sorted(keep))}")
            return q, report
        if k >= limit:
            break
        k = min(limit, k * 2)
    raise AccuracyError(
        f"INT8 {form} cannot stay within --max-drop {cfg.max_drop}: {res['drop_points']:.2f} pt fully quantized, "
        f"best {best['drop_points']:.2f} pt with up to {limit} of {len(ranked)} layers in float.",
        "raise --max-drop, try another --method, calibrate on more or better images (--calib), or use --fp16.")


# ------------------------------------------------------------------------------------------- run

def run_export(run_dir: str | Path, cfg: ExportConfig) -> dict[str, Any]:
    import torch

    from tledge.export import tensorrt as trt_build
    from tledge.export.fp16 import to_fp16
    from tledge.model import load_classifier

    run = Path(run_dir)
    card = card_mod.read(run)
    pre = card_mod.preprocess_of(card)
    for f in cfg.forms:
        if f not in FORMS:
            raise UsageError(f"unknown INT8 form '{f}'; choices: {', '.join(FORMS)}.", "pass --form tensorrt or cpu.")
    if cfg.method != "auto" and cfg.method not in cal.METHODS:
        raise UsageError(f"unknown calibration method '{cfg.method}'; choices: auto, {', '.join(cal.METHODS)}.",
                         "pass one of them to --method.")
    if cfg.bias_correction_mode not in BIAS_CORRECTION_MODES:
        raise UsageError(f"unknown bias correction mode '{cfg.bias_correction_mode}'; choices: "
                         f"{', '.join(BIAS_CORRECTION_MODES)}.", "pass one of them to --bias-correction.")
    if not 0.0 <= cfg.refit_distill <= 1.0:
        raise UsageError(f"--refit-distill {cfg.refit_distill} is not a weight between 0 and 1.",
                         "pass 0 (labels only) to 1 (FP32 logits only).")
    if cfg.adaround and not cfg.adaround_budget_s > 0:
        raise UsageError(f"--adaround-budget {cfg.adaround_budget_s} is not a positive number of seconds.",
                         "pass a budget such as 60, or --no-adaround to keep nearest rounding.")
    want_engine = cfg.engine
    if want_engine and not trt_build.tensorrt_available()[0]:
        # explicit --engine: say why and stop before any work
        trt_build.require_tensorrt()
    t0 = time.perf_counter()
    manifest_path = run / MANIFEST
    old = read_json(manifest_path) if manifest_path.is_file() else {}
    manifest: dict[str, Any] = {"tledge_version": tledge.__version__, "config": asdict(cfg), "artefacts": {},
                                "checks": {}, "versions": _versions()}

    model = load_classifier(run, card)
    fp32_path = run / FILES["fp32"]
    files = onnx_io.export(model, card, fp32_path, cfg.opset)
    manifest["artefacts"]["fp32"] = onnx_io.file_info(files)

    rep = scan(card["dataset"]["root"], card["dataset"].get("val_fraction") or 0.2, card["dataset"].get("seed") or 0)
    if rep.classes != card["classes"]:
        raise DataError(f"the dataset at {card['dataset']['root']} now has classes {rep.classes}, not the run's "
                        f"{card['classes']}.", "restore the dataset or tune again.")
    evalset = EvalSet(rep.val, pre, label="val images")
    with torch.inference_mode():
        ref = run_logits(lambda x: model(torch.from_numpy(x)).numpy(), evalset)
    torch_top1 = float((ref.argmax(1) == evalset.labels).mean())
    manifest["checks"]["torch"] = {"top1": torch_top1, "n": len(evalset)}
    chk = onnx_io.check(fp32_path, ref, evalset, evalset.labels, cfg.fp32_tol, threads=cfg.threads)
    chk.pop("logits")
    manifest["checks"]["fp32"] = chk
    note(f"ONNX FP32 matches PyTorch: max |logit diff| {chk['max_abs_logit_diff']:.2e}, top-1 agreement "
         f"{chk['top1_agreement']:.4f} on {chk['n']} val images")
    fp32 = onnx_io.load_model(fp32_path)

    if cfg.simplify:
        slim_path = run / "model.slim.onnx"
        if onnx_io.simplify(fp32_path, slim_path):
            try:
                c2 = onnx_io.check(slim_path, ref, evalset, evalset.labels, cfg.fp32_tol, threads=cfg.threads)
                c2.pop("logits")
                slim_path.replace(fp32_path)
                fp32 = onnx_io.load_model(fp32_path)
                manifest["artefacts"]["fp32"] = onnx_io.file_info([fp32_path])
                manifest["checks"]["fp32_simplified"] = c2
            except AccuracyError:
                warn("onnxslim changed the outputs; keeping the unsimplified graph")
                slim_path.unlink(missing_ok=True)
        else:
            warn("--simplify needs onnxslim (pip install onnxslim); the graph was not simplified")

    if cfg.fp16 or want_engine == "fp16":
        half, info = to_fp16(fp32)
        onnx_io.set_metadata(half, {**onnx_io.metadata(card), "tledge.precision": "fp16"})
        p = run / FILES["fp16"]
        onnx_io.save_model(half, p)
        c = compare(_ort_logits(half, list(evalset.batches(32)), cfg.threads), ref, evalset.labels)
        manifest["artefacts"]["fp16"] = onnx_io.file_info([p])
        manifest["checks"]["fp16"] = {**c, **info}
        note(f"FP16: val top-1 {c['top1']:.4f} (drop {c['drop_points']:.2f} pt), max |logit diff| "
             f"{c['max_abs_logit_diff']:.3g}")

    if cfg.int8 or want_engine == "int8":
        manifest["int8"] = int8_graphs(run, card, cfg, fp32, rep, evalset, ref, manifest)
    evalset.close()

    engines = []
    if want_engine:
        engines = [want_engine]
    elif cfg.auto_engine:
        engines = [p for p, asked in (("fp16", cfg.fp16), ("int8", cfg.int8)) if asked]
    ok, why = trt_build.tensorrt_available()
    if engines and not ok:
        note(f"TensorRT is not available here ({why}): wrote the ONNX graphs; the {' and '.join(engines)} engine "
             "is built on the device (`python3 -m tledge_runtime build` in the deploy bundle).")
    for prec in engines:
        if not ok:
            manifest.setdefault("engines", {})[prec] = {"built": False, "reason": why}
            continue
        src = run / (FILES["fp16"] if prec == "fp16" else FILES["int8-tensorrt"])
        eng = trt_build.build_engine(src, run / f"model.{prec}.engine", trt_build.EngineConfig(
            precision=prec, batch=cfg.batch, workspace_mib=cfg.workspace_mib, dla_core=cfg.dla_core,
            timing_cache=cfg.timing_cache or str(run / "timing.cache")))
        manifest.setdefault("engines", {})[prec] = {"built": True, **eng}
    manifest["seconds"] = round(time.perf_counter() - t0, 3)
    if old.get("engines") and "engines" not in manifest:
        manifest["engines"] = old["engines"]
    write_json(manifest_path, manifest)
    return manifest


def int8_graphs(run: Path, card: dict[str, Any], cfg: ExportConfig, fp32: Any, rep: Any, evalset: EvalSet,
                ref: np.ndarray, manifest: dict[str, Any]) -> dict[str, Any]:
    """Equalize, calibrate, bias-correct, pick ranges, re-fit the head, quantize both forms and gate them."""
    from tledge.export import improve

    pre = card_mod.preprocess_of(card)
    techniques: dict[str, Any] = {}
    samples, where = calibration_samples(card, cfg, rep.val)
    note(f"calibration: {len(samples)} images from {where}")
    calib = EvalSet(samples, pre, label="calibration images")
    probe = [calib.x[i:i + 32].copy() for i in range(0, min(64, len(calib)), 32)]
    probe_ref = _ort_logits(fp32, probe, cfg.threads)

    def fp32_diff(model: Any) -> tuple[float, bool]:
        """Max |logit diff| of a transformed FP32 graph against the exported one, and whether it is within
        float tolerance."""
        d = float(np.abs(_ort_logits(model, probe, cfg.threads) - probe_ref).max())
        return d, d <= 1e-4 * max(1.0, float(np.abs(probe_ref).max()))

    base = onnx_io.fold_shapes(fp32)
    diff, same = fp32_diff(base)
    if not same:
        warn(f"onnxruntime's constant folding changed the FP32 outputs (max |logit diff| {diff:.3g}); "
             "quantizing the graph as exported")
        base = fp32
    folded = {"applied": base is not fp32, "nodes_before": len(fp32.graph.node), "nodes_after": len(base.graph.node)}
    if cfg.cle:
        base, info = improve.equalize(base)
        diff, same = fp32_diff(base)
        if not same:
            raise AccuracyError(f"internal error: cross-layer equalization changed the FP32 outputs by {diff:.3g}.",
                                "export with --no-cle and report this bug.")
        techniques["cle"] = {**info, "fp32_max_abs_logit_diff": diff}
        note(f"cross-layer equalization: {info['pairs']} conv pairs (FP32 unchanged: max |logit diff| {diff:.1e}); "
             f"{info['skipped_relu6_pairs']} pairs joined by ReLU6 left alone")
    stats, cinfo = calibration_stats(base, samples, pre, run / "calib", cfg.threads, calib)
    cinfo["source"] = where
    manifest["calibration"] = cinfo
    # fits (learned rounding, empirical bias correction) use images after the probe ones when there are
    # enough, so the probe judges them on images they did not see
    first = len(probe) * 32 if len(calib) >= 64 + 32 else 0
    overrides: dict[str, np.ndarray] = {}
    if cfg.adaround:
        fit = calib.x[first:first + cfg.adaround_images]
        overrides, info = improve.adaround(base, [fit[i:i + 8].copy() for i in range(0, len(fit), 8)],
                                           cfg.adaround_budget_s, threads=cfg.threads)
        techniques["adaround"] = {**info, "probe_held_out": first > 0}
        note(f"learned weight rounding: {info['costly']}/{info['layers']} layers lose more than "
             f"{info['min_rel_error']:.0e} of their output to nearest rounding; {info['learned']} learned within "
             f"the {info['budget_s']:.0f} s budget ({info['not_reached']} not reached), {info['improved']} improved "
             f"(reconstruction error {info['recon_error_nearest']:.3g} -> {info['recon_error_learned']:.3g}) "
             f"in {info['seconds']:.0f} s")
    bc_modes = (() if not cfg.bias_correction else
                ("analytic", "empirical") if cfg.bias_correction_mode == "auto" else (cfg.bias_correction_mode,))
    means = improve.channel_means(base, calib.batches(16), cfg.threads) if "analytic" in bc_modes else None
    analytic_by_rounding: dict[bool, Any] = {}  # analytic correction, for learned (True) or nearest rounding
    bc_batches = [calib.x[i:i + 32].copy()
                  for i in range(first, min(first + cfg.bias_correction_images, len(calib)), 32)]
    if bc_modes:
        techniques["bias_correction"] = {"mode": cfg.bias_correction_mode, "probe_held_out": first > 0}
    calib.close()
    gemm = improve.head_gemm(base)
    train_ev, train_logits = None, None
    if cfg.head_refit:
        if gemm is None or card["head"]["kind"] != "linear":
            techniques["head_refit"] = {"applied": False, "reason": "only linear heads are re-fitted"}
        else:
            pool = rep.train
            if len(pool) > cfg.refit_count:
                pool = stratified_split(pool, cfg.refit_count / len(pool), 4321)[1]
            train_ev = EvalSet(pool, pre, label="train images (head refit)")
    ranges: dict[str, Any] = {}
    out: dict[str, Any] = {"techniques": techniques, "fold_shapes": folded}
    for form in cfg.forms:
        method, scores = choose_method(base, stats, form, cfg, probe, probe_ref, overrides)
        if cfg.method == "auto":
            note(f"INT8 {form}: method {method} chosen (logit MSE on calibration images: "
                 + ", ".join(f"{m} {v:.4g}" for m, v in scores.items()) + ")")
        rounding = overrides
        if overrides:  # learned rounding is kept for this form only if it brings the logits closer to FP32
            rounding = learned_or_nearest(base, stats, form, method, cfg, probe, probe_ref, overrides,
                                          scores[method], techniques["adaround"])
        analytic = None
        if means is not None:
            learned = bool(rounding)
            if learned not in analytic_by_rounding:
                analytic_by_rounding[learned] = improve.bias_correct(base, means, rounding)
                techniques["bias_correction"].setdefault("analytic", analytic_by_rounding[learned][1])
            analytic = analytic_by_rounding[learned][0]
        model, form_overrides = bias_corrected(base, analytic, bc_modes, stats, form, method, cfg, bc_batches,
                                               probe, probe_ref, rounding, techniques), rounding
        if train_ev is not None and gemm is not None:
            q = quantize_model(model, stats, form, method, cfg.percentile, weight_overrides=rounding)
            feats = improve.features_through(q, gemm.input[0], train_ev.batches(32), cfg.threads)
            w0, b0 = improve.head_weights(model, gemm)
            teacher = None
            if cfg.refit_distill > 0:
                if train_logits is None:
                    train_logits = _ort_logits(base, list(train_ev.batches(32)), cfg.threads)
                teacher = train_logits
            tr = card["training"]["config"]
            epochs = max(10, int(card["training"]["head"].get("best_epoch") or 30))
            w, b = improve.refit_head(feats, train_ev.labels, w0, b0, epochs, tr.get("weight_decay", 1e-4),
                                      tr.get("label_smoothing", 0.1), card["head"].get("dropout", 0.2),
                                      lr=tr.get("lr", 1e-3), seed=tr.get("seed", 0), teacher=teacher,
                                      distill=cfg.refit_distill)
            model = improve.with_head(model, gemm, w, b)
            # the re-fitted head is new weights: nearest rounding for them, not the rounding learned for the old
            form_overrides = {k: v for k, v in rounding.items() if k != gemm.input[1]}
            techniques.setdefault("head_refit", {"applied": True, "images": len(train_ev), "epochs": epochs,
                                                 "source": "training split"})
        q, report = gate_int8(model, stats, form, method, cfg, evalset, ref, probe, probe_ref, form_overrides)
        report["method_scores"] = scores
        if form == "tensorrt":
            problems = check_tensorrt_qdq(q)
            if problems:
                raise AccuracyError(f"internal error: the TensorRT-form graph is not valid explicit "
                                    f"quantization: {problems[:3]}", "report this bug.")
        onnx_io.set_metadata(q, {**onnx_io.metadata(card), "tledge.precision": f"int8-{form}",
                                 "tledge.calibration": cinfo["key"]})
        p = run / FILES[f"int8-{form}"]
        onnx_io.save_model(q, p)
        manifest["artefacts"][f"int8-{form}"] = onnx_io.file_info([p])
        manifest["checks"][f"int8-{form}"] = report
        ranges[form] = _ranges(q)
    if train_ev is not None:
        train_ev.close()
    write_json(run / "calib" / "calibration.json", {"key": cinfo["key"], "source": where, "images": len(samples),
                                                    "percentile": cfg.percentile, "forms": ranges})
    return out


def learned_or_nearest(base: Any, stats: dict[str, cal.TensorStats], form: str, method: str, cfg: ExportConfig,
                       probe: list[np.ndarray], probe_ref: np.ndarray, learned: dict[str, np.ndarray],
                       learned_score: float, report: dict[str, Any]) -> dict[str, np.ndarray]:
    """The weight rounding for this form: the learned one if its INT8 logits are closer (MSE) to FP32 than
    nearest rounding's on the probe calibration images (which the rounding was not learned on), else
    nearest ({}). ``learned_score`` is that MSE with the learned rounding, as choose_method measured it.
    Learned rounding reconstructs each layer from FP32 inputs, so where activation quantization dominates
    it need not help the network."""
    nearest = quantize_model(base, stats, form, method, cfg.percentile)
    scores = {"nearest": _probe_mse(nearest, probe, probe_ref, cfg.threads), "learned": learned_score}
    keep = scores["learned"] < scores["nearest"]
    report[f"kept_{form}"], report[f"scores_{form}"] = keep, scores
    note(f"learned weight rounding ({form}): {'kept' if keep else 'not kept'} (logit MSE on held-out calibration "
         f"images: nearest {scores['nearest']:.4g}, learned {scores['learned']:.4g})")
    return learned if keep else {}


def bias_corrected(base: Any, analytic: Any, modes: tuple[str, ...], stats: dict[str, cal.TensorStats], form: str,
                   method: str, cfg: ExportConfig, batches: list[np.ndarray], probe: list[np.ndarray],
                   probe_ref: np.ndarray, overrides: dict[str, np.ndarray], techniques: dict[str, Any]) -> Any:
    """The network with bias correction for this form: analytic, empirical, or (mode auto) whichever gives
    INT8 logits closer to FP32 on the probe calibration images, which the empirical fit did not see."""
    from tledge.export import improve

    if not modes:
        return base
    bc = techniques.setdefault("bias_correction", {"mode": cfg.bias_correction_mode})

    def quantize(m: Any) -> Any:
        return quantize_model(m, stats, form, method, cfg.percentile, weight_overrides=overrides)

    cands = {"analytic": analytic} if analytic is not None else {}
    if "empirical" in modes:
        cands["empirical"], bc[f"empirical_{form}"] = improve.empirical_bias_correct(base, quantize, batches,
                                                                                     cfg.threads)
    if len(cands) == 1:
        (mode, model), = cands.items()
        bc[f"chosen_{form}"] = mode
        note(f"bias correction ({form}): {mode}")
        return model
    scores = {m: _probe_mse(quantize(c), probe, probe_ref, cfg.threads)
              for m, c in cands.items()}
    mode = min(scores, key=scores.get)
    bc[f"chosen_{form}"], bc[f"scores_{form}"] = mode, scores
    note(f"bias correction ({form}): {mode} chosen (logit MSE on held-out calibration images: "
         + ", ".join(f"{m} {v:.4g}" for m, v in scores.items()) + ")")
    return cands[mode]


def _ranges(q: Any) -> dict[str, dict[str, float]]:
    from onnx import numpy_helper
    inits = {i.name: i for i in q.graph.initializer}
    out = {}
    for n in q.graph.node:
        if n.op_type == "QuantizeLinear":
            s = float(numpy_helper.to_array(inits[n.input[1]]))
            z = int(numpy_helper.to_array(inits[n.input[2]]))
            out[n.input[0]] = {"scale": s, "zero_point": z}
    return out


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch
    return {"tledge": tledge.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}
