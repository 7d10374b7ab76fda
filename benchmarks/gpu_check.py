"""One prepared check of tledge's GPU and TensorRT half, for a lent GPU machine (issue 16). What runs depends
on what is present, and the output says so: every check is run, or skipped with the reason.

Checks (each bounded; the whole run is planned for well under 8 minutes):
  environment      python, torch/CUDA, onnxruntime providers, tensorrt, cupy, nvidia-smi (always)
  cuda_layer       tledge_runtime's ctypes CUDA layer: device info (SM count), device + pinned buffers,
                   stream copies round trip, CUDA events, graph capture and replay of a copy
  event_timing     the same copy timed by CUDA events and by the host clock (what each figure means)
  torch_cuda       torch CUDA and FP16 autocast forward of mobilenet_v2 (random weights) vs CPU
  pytest_markers   the tests marked gpu or tensorrt (they skip themselves where a piece is missing)
  bench_cuda       a small run (64 px, random weights: no download) tuned, exported (--fp16) and benched
                   with the CUDA rows (torch CUDA, FP16 autocast, onnxruntime CUDA/TensorRT where present)
  tensorrt_engine  `tledge export --fp16 --int8` with TensorRT present (both engines, build time in the
                   sidecars), then bench of the engines, with CUDA-graph replay
Writes benchmarks/results/gpu_check.json (or --out): every figure and every skip with its reason.

Usage: benchmarks/gpu_check.sh [--dry-run] [--out FILE]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
LIMIT_S = {"pytest_markers": 150, "bench_cuda": 120, "tensorrt_engine": 150}
TOTAL_S = 450  # the whole run stays under 8 minutes: a check is skipped, with that reason, once time is short


def has(mod: str) -> bool:
    return importlib.util.find_spec(mod) is not None


def torch_cuda() -> tuple[bool, str]:
    if not has("torch"):
        return False, "torch is not installed"
    import torch
    return (True, "") if torch.cuda.is_available() else (False, "torch sees no CUDA GPU")


def cudart() -> tuple[bool, str]:
    sys.path.insert(0, str(ROOT))
    from tledge.deploy.tledge_runtime import cuda
    return cuda.available()


def tensorrt() -> tuple[bool, str]:
    if not has("tensorrt"):
        return False, "the tensorrt Python package is not installed (not in the lent image; no registry there)"
    ok, why = cudart()
    return (ok, why)


def ort_gpu() -> tuple[bool, str]:
    if not has("onnxruntime"):
        return False, "onnxruntime is not installed"
    import onnxruntime as ort
    have = ort.get_available_providers()
    gpu = [p for p in have if p in ("CUDAExecutionProvider", "TensorrtExecutionProvider")]
    return (True, ", ".join(gpu)) if gpu else (False, f"onnxruntime has only {', '.join(have)} (CPU build)")


PLAN: list[tuple[str, Callable[[], tuple[bool, str]]]] = [
    ("environment", lambda: (True, "")),
    ("cuda_layer", cudart),
    ("event_timing", cudart),
    ("torch_cuda", torch_cuda),
    ("pytest_markers", lambda: (True, "") if has("pytest") else (False, "pytest is not installed")),
    ("bench_cuda", torch_cuda),
    ("tensorrt_engine", tensorrt),
]


def check_environment(_: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"python": platform.python_version(), "machine": platform.machine()}
    for mod in ("torch", "torchvision", "onnx", "onnxruntime", "tensorrt", "cupy", "cuda"):
        if has(mod):
            try:
                m = __import__(mod)
                out[mod] = getattr(m, "__version__", "present")
            except Exception as exc:  # noqa: BLE001 - report what is broken, do not stop the check
                out[mod] = f"import failed: {exc}"
        else:
            out[mod] = None
    if has("torch"):
        import torch
        out["torch_cuda"] = torch.version.cuda
        out["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    out["onnxruntime_gpu"] = ort_gpu()
    if shutil.which("nvidia-smi"):
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
        out["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
    return out


def check_cuda_layer(_: Path) -> dict[str, Any]:
    import numpy as np

    from tledge.deploy.tledge_runtime import cuda
    info = cuda.device_info()
    n = 1 << 22  # 16 MiB of float32
    host = cuda.HostBuffer((n,), np.float32)
    host.array[:] = np.arange(n, dtype=np.float32)
    back = np.zeros(n, np.float32)
    d = cuda.DeviceBuffer(n * 4)
    s = cuda.Stream()
    s.copy_in(d, host.array)
    s.copy_out(back, d)
    s.synchronize()
    roundtrip_ok = bool(np.array_equal(back, host.array))
    # graph capture of H2D (pinned) + D2H into pinned, replayed with new host data
    out_pinned = cuda.HostBuffer((n,), np.float32)
    g = cuda.Graph(s)
    g.begin()
    s.copy_in(d, host.array)
    s.copy_out(out_pinned.array, d)
    g.end()
    host.array[:] = 7.0
    g.launch()
    s.synchronize()
    graph_ok = bool(np.all(out_pinned.array == 7.0))
    # a failed capture must leave the stream usable (abort path)
    g2 = cuda.Graph(s)
    g2.begin()
    g2.abort()
    s.copy_in(d, host.array)
    s.synchronize()
    for obj in (g, host, out_pinned, d, s):
        obj.close()
    return {"device": info, "roundtrip_ok": roundtrip_ok, "graph_replay_ok": graph_ok, "abort_then_copy_ok": True,
            "ok": roundtrip_ok and graph_ok}


def check_event_timing(_: Path) -> dict[str, Any]:
    import numpy as np

    from tledge.deploy.tledge_runtime import cuda
    n = 1 << 26  # 256 MiB
    host = cuda.HostBuffer((n,), np.float32)
    d = cuda.DeviceBuffer(n * 4)
    s = cuda.Stream()
    e0, e1 = cuda.Event(), cuda.Event()
    rows = []
    for _ in range(10):
        t0 = time.perf_counter_ns()
        e0.record(s)
        s.copy_in(d, host.array)
        e1.record(s)
        s.synchronize()
        host_ms = (time.perf_counter_ns() - t0) / 1e6
        rows.append((cuda.Event.elapsed_ms(e0, e1), host_ms))
    for obj in (e0, e1, host, d, s):
        obj.close()
    dev = sorted(r[0] for r in rows)[len(rows) // 2]
    hst = sorted(r[1] for r in rows)[len(rows) // 2]
    return {"bytes": n * 4, "device_ms_p50": dev, "host_ms_p50": hst, "h2d_gbps_device": n * 4 / dev / 1e6,
            "note": "device time (CUDA events around the copy) vs host time (perf_counter around enqueue + sync)"}


def check_torch_cuda(_: Path) -> dict[str, Any]:
    import torch
    import torchvision

    net = torchvision.models.mobilenet_v2(weights=None).eval()
    x = torch.randn(32, 3, 224, 224)
    res: dict[str, Any] = {}
    with torch.inference_mode():
        ref = net(x[:4])
        g = net.cuda()
        xg = x.cuda()
        for label, ctx in (("fp32", torch.autocast("cuda", enabled=False)),
                           ("fp16_autocast", torch.autocast("cuda", dtype=torch.float16))):
            with ctx:
                for _ in range(5):
                    g(xg)
                torch.cuda.synchronize()
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                times = []
                for _ in range(20):
                    s.record()
                    y = g(xg)
                    e.record()
                    torch.cuda.synchronize()
                    times.append(s.elapsed_time(e))
            res[label] = {"batch": 32, "device_ms_p50": sorted(times)[10],
                          "max_abs_diff_vs_cpu": float((y[:4].float().cpu() - ref).abs().max())}
    return res


def run_child(args: list[str], limit: int, tmp: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "TLEDGE_PROGRESS": "0", "TLEDGE_OFFLINE": "1", "TLEDGE_CACHE_DIR": str(tmp / "cache"),
           "TLEDGE_TMP_DIR": str(tmp / "scratch")}
    t0 = time.perf_counter()
    try:
        p = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=limit)
        rc, out, err = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as exc:
        rc, out, err = "timeout", exc.stdout or "", exc.stderr or ""
        out, err = (out.decode() if isinstance(out, bytes) else out), (err.decode() if isinstance(err, bytes) else err)
    return {"cmd": " ".join(args[2:] if args[:2] == [sys.executable, "-m"] else args), "rc": rc,
            "seconds": round(time.perf_counter() - t0, 1), "stdout_tail": out[-3000:], "stderr_tail": err[-3000:]}


def check_pytest_markers(tmp: Path) -> dict[str, Any]:
    return run_child([sys.executable, "-m", "pytest", "-q", "-m", "gpu or tensorrt", "-p", "no:cacheprovider",
                      "tests"], LIMIT_S["pytest_markers"], tmp)


def _small_run(tmp: Path) -> tuple[Path, list[dict[str, Any]]]:
    sys.path.insert(0, str(ROOT))
    from tests.conftest import make_subset
    data = make_subset(tmp / "data", classes=3, train=20, val=10)
    run = tmp / "run"
    steps = [run_child([sys.executable, "-m", "tledge", "tune", str(data), "--out", str(run), "--image-size", "64",
                        "--weights", "none", "--epochs", "5", "--workers", "0"], 90, tmp)]
    return run, steps


def check_bench_cuda(tmp: Path) -> dict[str, Any]:
    run, steps = _small_run(tmp)
    steps.append(run_child([sys.executable, "-m", "tledge", "export", str(run), "--fp16", "--int8", "--escalate", "off",
                            "--max-drop", "100"], 120, tmp))
    steps.append(run_child([sys.executable, "-m", "tledge", "bench", str(run), "--batch", "1,8", "--budget", "0.5",
                            "--max-images", "30"], LIMIT_S["bench_cuda"], tmp))
    bench = json.loads((run / "bench.json").read_text()) if (run / "bench.json").is_file() else None
    return {"steps": steps, "bench": bench and {
        "results": [{"artefact": r["artefact"], "runtime": r["runtime"], "device": r["device"],
                     "latency": r["latency"], "top1_agreement": r["accuracy"]["top1_agreement"],
                     "runner": r["runner"]} for r in bench["results"]], "skipped": bench["skipped"]}}


def check_tensorrt_engine(tmp: Path) -> dict[str, Any]:
    run = tmp / "run"
    steps: list[dict[str, Any]] = []
    if not (run / "model_card.json").is_file():
        run, steps = _small_run(tmp)
    # one export builds both engines (TensorRT present: --fp16 --int8 end in engines); a second export would
    # replace the first one's artefacts, all or nothing
    steps.append(run_child([sys.executable, "-m", "tledge", "export", str(run), "--fp16", "--int8", "--escalate", "off",
                            "--max-drop", "100", "--batch", "1,8,32"], LIMIT_S["tensorrt_engine"], tmp))
    for prec in ("fp16", "int8"):
        side = run / f"model.{prec}.engine.json"
        steps[-1][f"sidecar_{prec}"] = json.loads(side.read_text()) if side.is_file() else None
    steps.append(run_child([sys.executable, "-m", "tledge", "bench", str(run), "--batch", "1,8", "--budget", "0.5",
                            "--max-images", "30", "--cuda-graph"], 90, tmp))
    return {"steps": steps}


CHECKS = {"environment": check_environment, "cuda_layer": check_cuda_layer, "event_timing": check_event_timing,
          "torch_cuda": check_torch_cuda, "pytest_markers": check_pytest_markers, "bench_cuda": check_bench_cuda,
          "tensorrt_engine": check_tensorrt_engine}


def plan() -> list[dict[str, Any]]:
    out = []
    for name, probe in PLAN:
        try:
            ok, why = probe()
        except Exception as exc:  # noqa: BLE001 - a probe that breaks is a reason to skip, said as such
            ok, why = False, f"probe failed: {type(exc).__name__}: {exc}"
        out.append({"check": name, "run": ok, "reason": "" if ok else why})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="print the plan (what would run, what is skipped) only")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_check.json"))
    args = ap.parse_args()
    steps = plan()
    for s in steps:
        print(f"{'run ' if s['run'] else 'skip'}  {s['check']:<16} {s['reason']}", flush=True)
    if args.dry_run:
        print("dry run: nothing executed")
        return 0
    results: dict[str, Any] = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "plan": steps,
                               "results": {}, "skipped": {}}
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tledge-gpu-check-") as t:
        tmp = Path(t)
        for s in steps:
            left = TOTAL_S - (time.perf_counter() - t_all)
            if s["run"] and left < 60:
                s["run"], s["reason"] = False, f"only {left:.0f} s of the {TOTAL_S} s budget left"
            if not s["run"]:
                results["skipped"][s["check"]] = s["reason"]
                continue
            t0 = time.perf_counter()
            try:
                res = CHECKS[s["check"]](tmp)
                status = "ok"
            except Exception as exc:  # noqa: BLE001 - one failing check must not hide the others' results
                res, status = {"error": f"{type(exc).__name__}: {exc}"}, "failed"
            res["status"], res["seconds"] = status, round(time.perf_counter() - t0, 1)
            results["results"][s["check"]] = res
            print(f"{s['check']}: {status} in {res['seconds']} s: {json.dumps(res, default=str)[:600]}", flush=True)
    results["seconds"] = round(time.perf_counter() - t_all, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"wrote {args.out} ({results['seconds']} s)")
    failed = [k for k, v in results["results"].items() if v["status"] != "ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
