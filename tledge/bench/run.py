"""Bench orchestration: every artefact of a run through its own runner, accuracy on the val split and
latency over a batch sweep, against the PyTorch baseline. Missing backends are listed with the reason."""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

import tledge
from tledge import card as card_mod
from tledge.bench import latency
from tledge.bench.report import SCHEMA
from tledge.console import note, progress, warn
from tledge.data import scan_for_run
from tledge.errors import TledgeError
from tledge.evalset import EvalSet, compare, run_logits
from tledge.export.artefacts import FILES, Lineage, engine_file, lineage



@dataclass
class BenchConfig:
    batches: tuple[int, ...] = (1, 8, 32)
    budget_s: float = 1.5           # per (artefact, batch, mode)
    warmup: int = 5
    min_iters: int = 10
    threads: int | None = None      # None: all cores
    end_to_end: bool = True
    compile: bool = False           # also torch.compile
    cuda_graph: bool = False        # also TensorRT engines replayed as CUDA graphs
    providers: tuple[str, ...] = ("cpu", "cuda", "tensorrt")
    max_images: int | None = None   # cap on val images for accuracy (None: all)
    resize_mode: str | None = None  # fit images this way instead of the card's mode (the cost of a mismatch)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Candidate:
    name: str
    precision: str
    runtime: str
    device: str
    factory: Callable[[], Any]
    files: list[Path]
    skip: str | None = None
    graph_input: str = "normalized"  # what the artefact's input holds (the export manifest's ``input``)


def candidates(run: Path, cfg: BenchConfig, lin: Lineage | None = None) -> list[Candidate]:
    """Everything benchable in the run, with a skip reason for what this machine cannot run and for every
    artefact that does not descend from the run's current checkpoint (``lin``, artefacts.lineage)."""
    from tledge.runtimes.base import available_runners
    from tledge.runtimes.onnxruntime import OrtRunner
    from tledge.runtimes.tensorrt import TrtRunner
    from tledge.runtimes.torch import TorchRunner

    threads = cfg.threads or os.cpu_count() or 1
    avail = available_runners()
    out = [Candidate("pytorch", "fp32", "torch eager", "cpu", lambda: TorchRunner(run, "cpu", threads=threads),
                     [run / "checkpoint.safetensors"])]
    if cfg.compile:
        out.append(Candidate("pytorch-compile", "fp32", "torch.compile", "cpu",
                             lambda: TorchRunner(run, "cpu", compile=True, threads=threads), [run / "checkpoint.safetensors"]))
    cuda_ok, cuda_why = _torch_cuda()
    out.append(Candidate("pytorch-cuda", "fp32", "torch eager", "cuda", lambda: TorchRunner(run, "cuda"),
                         [run / "checkpoint.safetensors"], None if cuda_ok else cuda_why))
    out.append(Candidate("pytorch-cuda-fp16", "fp16", "torch autocast", "cuda", lambda: TorchRunner(run, "cuda", fp16=True),
                         [run / "checkpoint.safetensors"], None if cuda_ok else cuda_why))
    graph_input = ((lin.manifest or {}).get("input") or {}).get("kind", "normalized") if lin else "normalized"
    ort_ok, ort_why = avail["onnxruntime"]
    providers = _ort_providers() if ort_ok else {}
    for key, fname in FILES.items():
        path = run / fname
        if not path.is_file():
            continue
        prec = key.split("-")[0]
        if lin is not None and key not in lin.ok:
            out.append(Candidate(f"onnx-{key}", prec, "onnxruntime", "cpu", lambda: None, [path],
                                 f"{fname} refused: {lin.stale[fname]}; run `tledge export {run}` again"))
            continue
        # the CPU INT8 form is laid out for onnxruntime's CPU kernels only
        for prov in (("cpu",) if key == "int8-cpu" else cfg.providers):
            why = None if prov in providers else (ort_why or f"onnxruntime has no {prov} execution provider here")
            files = [path] + ([Path(str(path) + ".data")] if Path(str(path) + ".data").exists() else [])
            out.append(Candidate(f"onnx-{key}" + ("" if prov == "cpu" else f"-{prov}"), prec,
                                 f"onnxruntime {prov}", "cpu" if prov == "cpu" else "cuda",
                                 lambda p=path, pv=prov: OrtRunner(p, pv, threads, spinning=False), files, why,
                                 graph_input))
    trt_ok, trt_why = avail["tensorrt"]
    for prec in ("fp16", "int8"):
        eng = run / engine_file(prec)
        if eng.is_file() and lin is not None and f"engine-{prec}" not in lin.ok:
            out.append(Candidate(f"tensorrt-{prec}", prec, "tensorrt", "cuda", lambda: None, [eng],
                                 f"{eng.name} refused: {lin.stale[eng.name]}; run `tledge export {run}` again"))
        elif eng.is_file():
            out.append(Candidate(f"tensorrt-{prec}", prec, "tensorrt", "cuda", lambda e=eng: TrtRunner(e), [eng],
                                 None if trt_ok else trt_why, graph_input))
            if cfg.cuda_graph:
                out.append(Candidate(f"tensorrt-{prec}-cudagraph", prec, "tensorrt + CUDA graph", "cuda",
                                     lambda e=eng: TrtRunner(e, cuda_graph=True), [eng], None if trt_ok else trt_why,
                                     graph_input))
    return out


def _torch_cuda() -> tuple[bool, str]:
    try:
        import torch
    except ImportError:
        return False, "torch is not installed"
    return (True, "") if torch.cuda.is_available() else (False, "no CUDA GPU visible to torch")


def _ort_providers() -> dict[str, str]:
    import onnxruntime as ort
    have = set(ort.get_available_providers())
    names = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
    return {k: v for k, v in names.items() if v in have}


def _rss_mib() -> float:
    import psutil
    return psutil.Process().memory_info().rss / 2**20


def run_bench(run_dir: str | Path, cfg: BenchConfig) -> dict[str, Any]:
    from tledge.bench.machine import describe

    run = Path(run_dir)
    card = card_mod.read(run)
    pre = card_mod.preprocess_of(card)
    tuned_mode = pre.resize_mode
    if cfg.resize_mode and cfg.resize_mode != tuned_mode:
        warn(f"measuring accuracy with images fitted by '{cfg.resize_mode}'; the model was tuned with '{tuned_mode}' "
             "(the numbers show what a deployment that resizes this way costs)")
        pre = pre.with_resize_mode(cfg.resize_mode)
    rep = scan_for_run(run, card)
    samples = rep.val[: cfg.max_images] if cfg.max_images else rep.val
    t0 = time.perf_counter()
    evalset = EvalSet(samples, pre, label="val images")
    files = [s.path for s in samples]
    results: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    ref: np.ndarray | None = None
    base_p50: dict[int, float] = {}
    lin = lineage(run, card)
    graph_dtype = ((lin.manifest or {}).get("input") or {}).get("dtype", "float32")
    if lin.stale:
        warn("not benched, they do not descend from the current checkpoint: "
             + "; ".join(f"{n} ({why})" for n, why in sorted(lin.stale.items())))
    for cand in candidates(run, cfg, lin):
        if cand.skip:
            skipped.append({"artefact": cand.name, "runtime": cand.runtime, "reason": cand.skip})
            continue
        note(f"bench {cand.name} ({cand.runtime})")
        rss0 = _rss_mib()
        try:
            runner = cand.factory()
            gpre = pre.with_input(cand.graph_input, graph_dtype)  # the tensor this artefact's graph takes
            with runner:
                rss_loaded = _rss_mib()
                with progress() as prog:
                    task = prog.add_task(f"{cand.name}: accuracy (val)", total=len(evalset), info="")

                    def infer(x: np.ndarray, runner: Any = runner, task: Any = task, prog: Any = prog) -> Any:
                        out = runner.infer(x)
                        prog.advance(task, len(x))
                        return out
                    logits = run_logits(infer, evalset, 32, gpre)
                if ref is None:
                    ref = logits
                acc = compare(logits, ref, evalset.labels)
                from tledge.metrics import classification_summary
                summ = classification_summary(logits, evalset.labels, card["classes"])
                acc.update(top5=summ.get("top5"), per_class_accuracy=summ["per_class_accuracy"])
                lat = []
                # drawn between measurements only: no drawing thread shares the cores with the timed calls
                with progress(auto_refresh=False) as prog:
                    task = prog.add_task(f"{cand.name}: latency", info="",
                                         total=len(cfg.batches) * (2 if cfg.end_to_end else 1))
                    for b in cfg.batches:
                        prog.update(task, info=f"batch {b}")
                        prog.refresh()
                        x = evalset.first(b, gpre)
                        m = latency.measure_model(runner, x, warmup=cfg.warmup, budget_s=cfg.budget_s,
                                                  min_iters=cfg.min_iters)
                        lat.append({"mode": "model", **m})
                        prog.update(task, advance=1, info=f"batch {b}: p50 {m['p50_ms']:.2f} ms")
                        prog.refresh()
                        if cfg.end_to_end:
                            fb = (files * (-(-b // len(files))))[:b]
                            e = latency.measure_end_to_end(runner, fb, gpre, warmup=2, budget_s=cfg.budget_s / 2,
                                                           min_iters=max(3, cfg.min_iters // 2))
                            lat.append({"mode": "end_to_end", **e})
                            prog.update(task, advance=1, info=f"batch {b}: end to end p50 {e['p50_ms']:.2f} ms")
                            prog.refresh()
                desc = runner.describe()
        except TledgeError as exc:
            # a known, explained condition (e.g. an engine built for another GPU): listed, not hidden
            skipped.append({"artefact": cand.name, "runtime": cand.runtime, "reason": exc.what})
            continue
        if cand.name == "pytorch":
            base_p50 = {r["batch"]: r["p50_ms"] for r in lat if r["mode"] == "model"}
        for r in lat:
            if r["mode"] == "model" and r["batch"] in base_p50:
                r["speedup_vs_pytorch"] = base_p50[r["batch"]] / r["p50_ms"]
        results.append({
            "artefact": cand.name, "precision": cand.precision, "runtime": cand.runtime, "device": cand.device,
            "files": [p.name for p in cand.files if p.exists()], "input": cand.graph_input,
            "size_bytes": sum(p.stat().st_size for p in cand.files if p.exists()),
            "accuracy": acc, "latency": lat, "runner": desc,
            "memory": {"rss_before_mib": round(rss0, 1), "rss_loaded_mib": round(rss_loaded, 1),
                       "rss_after_mib": round(_rss_mib(), 1)},
        })
    evalset.close()
    return {"schema": SCHEMA, "tledge_version": tledge.__version__, "run": str(run),
            "checkpoint_sha256": lin.checkpoint_sha256, "export_files": (lin.manifest or {}).get("files"),
            "backbone": card["backbone"]["name"], "input": card["preprocess"]["crop"],
            "resize_mode": {"measured": pre.resize_mode, "tuned": tuned_mode},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": describe(),
            "settings": {**asdict(cfg), "threads": cfg.threads or os.cpu_count(), "val_images": len(samples)},
            "baseline": "pytorch", "results": results, "skipped": skipped,
            "seconds": round(time.perf_counter() - t0, 2)}
