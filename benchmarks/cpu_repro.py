"""Does tledge give the same answer on another CPU? Issue 12: "a user who runs the export twice, or on the build
server and then on a laptop, must get the same graph and the same number".

On 2026-12-02 the same code and options gave different INT8 decisions on two machines: on an Intel Xeon the
CPU form's learned-rounding bound said "not learned", on an AMD EPYC (Zen 4) it learned 16 layers for 150 s;
the TensorRT form's judge MSE was 0.1032 there and 0.1074 here (benchmarks/results/int8_plan_intel_224_floor.json,
int8_plan_zen4.json). This script finds which step's result depends on the CPU, in one run on one machine,
by running each step as a child process whose torch is made to compute as another x86 CPU would:

  - native: the machine as it is;
  - avx2:   torch's own kernels at AVX2 width (ATEN_CPU_CAPABILITY=avx2), oneDNN (torch's convolutions) capped at
            AVX2 (ONEDNN_MAX_CPU_ISA=AVX2) and MKL at AVX2 (MKL_ENABLE_INSTRUCTIONS=AVX2): what an AVX2-only
            machine such as the project's Zen 3 computes. onnxruntime has no such switch (its MLAS kernels read
            cpuid), so only torch's half is emulated.

Steps, at 64 px on the embedded default (mobilenet_v2, real weights): `tledge tune` (own feature cache per
variant), `tledge export --int8` (both forms). Then `export` of the *native* tune's run directory under each
variant (same checkpoint, so only the export's own computation can differ), and once more with the native
export's decisions replayed (`--replay`). For every step it records the
SHA-256 of what it wrote (feature shards, checkpoint, FP32 graph, calibration statistics, INT8 graphs), the
export's decisions (range method, bias correction, escalation, kept recipe, refit epochs, quantizers kept in
float) and how far the numbers are apart (largest relative difference of checkpoint tensors and activation
scales; share of INT8 weights that differ).

It also writes the native fingerprint to benchmarks/results/cpu_repro_<cpu>.json and compares it with every
other cpu_repro_*.json there: the fingerprints of different machines, run in later sessions, say which step
differs between real CPUs (no second machine is reachable from one session).

Usage: python benchmarks/cpu_repro.py [--size 64] [--variants native,avx2]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from tledge.fsutil import sha256_file as sha

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PY, RESULTS, ROOT, machine, run_child, save  # noqa: E402

VARIANTS: dict[str, dict[str, str]] = {
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}
INT8 = {"tensorrt": "model.int8.trt.onnx", "cpu": "model.int8.cpu.onnx"}


def tree_sha(root: Path, pattern: str) -> str:
    """One hash over the contents of every file under ``root`` matching ``pattern``, by relative path."""
    h = hashlib.sha256()
    for p in sorted(root.rglob(pattern)):
        h.update(str(p.relative_to(root)).encode())
        h.update(sha(p).encode())
    return h.hexdigest()


def child(args: list[str], env: dict[str, str]) -> float:
    r = run_child([PY, "-m", "tledge", *args], env={"TLEDGE_PROGRESS": "0", **env})
    if r["rc"] != 0:
        raise SystemExit(f"tledge {' '.join(args)} failed ({env}):\n{r['stderr'][-3000:]}")
    return r["wall_s"]


def decisions(i8: dict[str, Any]) -> dict[str, Any]:
    """The export's decisions, without the scores and seconds that come with them."""
    out: dict[str, Any] = {}
    for form, rec in i8["forms"].items():
        d: dict[str, Any] = {}
        for stage in ("cheap", "expensive"):
            for r in rec.get(stage, []):
                # a decision's text without the scores in brackets ("method percentile", "empirical"); the
                # refit's whole text ("re-fitted on N images, E epochs")
                d[f"{stage}/{r['name']}"] = (r["decision"] if r["name"] == "head_refit"
                                             else re.sub(r"\(.*", "", r["decision"]).strip())
        d["escalated"] = rec["check"]["escalate"]
        d["kept"] = rec["kept"]
        d["kept_float"] = i8["gate"][form]["kept_float"]
        out[form] = d
    return out


def figures(i8: dict[str, Any]) -> dict[str, Any]:
    """What the export measured: each form's judge-image agreement and val drop."""
    return {form: {"judge_agreement": rec["check"]["agreement"], "judge_mse": rec["check"]["mse"],
                   "val_drop_points": i8["gate"][form]["final"]["drop_points"]} for form, rec in i8["forms"].items()}


def fingerprint(run: Path, cache: Path | None) -> dict[str, Any]:
    fp: dict[str, Any] = {}
    if cache is not None:
        fp["features"] = tree_sha(cache, "*.safetensors")
    fp["checkpoint"] = sha(run / "checkpoint.safetensors")
    if (run / "export_manifest.json").exists():
        fp["model.onnx"] = sha(run / "model.onnx")
        fp["calib_stats"] = tree_sha(run / "calib", "stats-*.npz")
        for form, f in INT8.items():
            fp[f] = sha(run / f)
        i8 = json.loads((run / "export_manifest.json").read_text())["int8"]
        fp["decisions"], fp["figures"] = decisions(i8), figures(i8)
    return fp


def tensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file
    return load_file(str(path))


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-30)) if a.size else 0.0


def graph_diff(pa: Path, pb: Path) -> dict[str, Any]:
    """How far two INT8 graphs of the same network are apart: activation scales (largest relative difference),
    INT8 weights (share of values that differ), float initializers (largest relative difference)."""
    import onnx
    from onnx import numpy_helper
    ga, gb = onnx.load(str(pa)).graph, onnx.load(str(pb)).graph
    ia = {i.name: numpy_helper.to_array(i) for i in ga.initializer}
    ib = {i.name: numpy_helper.to_array(i) for i in gb.initializer}
    if set(ia) != set(ib) or [n.op_type for n in ga.node] != [n.op_type for n in gb.node]:
        return {"same_structure": False, "nodes": [len(ga.node), len(gb.node)]}
    int8_diff = int8_total = 0
    scale_rel = float_rel = 0.0
    for k, a in ia.items():
        b = ib[k]
        if a.dtype in (np.int8, np.uint8):
            int8_diff += int(np.count_nonzero(a != b))
            int8_total += a.size
        elif a.size == 1 and "scale" in k:
            scale_rel = max(scale_rel, rel_diff(a, b))
        elif a.dtype.kind == "f":
            float_rel = max(float_rel, rel_diff(a, b))
    return {"same_structure": True, "int8_values_differing": int8_diff / max(1, int8_total),
            "scale_max_rel_diff": scale_rel, "float_max_rel_diff": float_rel}


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, str]:
    return {k: ("same" if a.get(k) == b.get(k) else "DIFFERENT") for k in a if k in b}


def cpu_tag() -> str:
    """vendor, family and model from /proc/cpuinfo (two AMD EPYC generations share their model name)."""
    info = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        k, _, v = line.partition(":")
        info.setdefault(k.strip(), v.strip())
    vendor = {"GenuineIntel": "intel", "AuthenticAMD": "amd"}.get(info.get("vendor_id", ""), "cpu")
    return f"{vendor}_f{info.get('cpu family', 'x')}_m{info.get('model', 'x')}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--variants", default="native,avx2")
    args = ap.parse_args()
    variants = args.variants.split(",")
    if variants[0] != "native":
        ap.error("--variants must start with native")
    t0 = time.perf_counter()
    out: dict[str, Any] = {"machine": {**machine(), "tag": cpu_tag()}, "size": args.size, "variants": {v: VARIANTS[v] for v in variants}}
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        runs, fps, secs = {}, {}, {}
        for v in variants:
            env = {**VARIANTS[v], "TLEDGE_CACHE_DIR": str(tmp / f"cache-{v}")}
            runs[v] = tmp / f"run-{v}"
            secs[f"tune/{v}"] = child(["tune", str(ROOT / "data/fashion-mnist"), "--out", str(runs[v]),
                                       "--image-size", str(args.size)], env)
            secs[f"export/{v}"] = child(["export", str(runs[v]), "--int8", "--threads", "2"], env)
            fps[v] = fingerprint(runs[v], tmp / f"cache-{v}")
            print(f"{v}: tune {secs[f'tune/{v}']:.0f} s, export {secs[f'export/{v}']:.0f} s")
        # the export alone: the native tune's run directory exported under each other variant
        cross = {}
        for v in variants[1:]:
            run = tmp / f"run-native-export-{v}"
            shutil.copytree(runs["native"], run)
            secs[f"export-native-run/{v}"] = child(["export", str(run), "--int8", "--threads", "2"], VARIANTS[v])
            cross[v] = {"fingerprint": fingerprint(run, None),
                        "graphs": {f: graph_diff(runs["native"] / n, run / n) for f, n in INT8.items()}}
            # and with the native export's decisions replayed (--replay): what a laptop gets from the build
            # server's manifest
            run = tmp / f"run-native-replay-{v}"
            shutil.copytree(runs["native"], run)
            secs[f"replay-native-run/{v}"] = child(["export", str(run), "--int8", "--threads", "2", "--replay",
                                                    str(runs["native"] / "export_manifest.json")], VARIANTS[v])
            cross[v]["replay"] = {"fingerprint": fingerprint(run, None),
                                  "graphs": {f: graph_diff(runs["native"] / n, run / n) for f, n in INT8.items()}}
        steps = {}
        for v in variants[1:]:
            ca, cb = tensors(runs["native"] / "checkpoint.safetensors"), tensors(runs[v] / "checkpoint.safetensors")
            steps[v] = {"tune_and_export": compare(fps["native"], fps[v]),
                        "checkpoint_max_rel_diff": max(rel_diff(ca[k], cb[k]) for k in ca),
                        "export_only": compare(fps["native"], cross[v]["fingerprint"]),
                        "export_only_graphs": cross[v]["graphs"],
                        "replay": compare(fps["native"], cross[v]["replay"]["fingerprint"]),
                        "replay_graphs": cross[v]["replay"]["graphs"]}
    out.update(fingerprints=fps, cross_exports={v: c["fingerprint"] for v, c in cross.items()}, steps=steps,
               seconds=secs, total_s=round(time.perf_counter() - t0))
    for v, s in steps.items():
        print(f"\n== native against {v} (torch as on an AVX2 CPU)")
        print("  tune + export:", json.dumps(s["tune_and_export"]))
        print(f"  checkpoint tensors: largest relative difference {s['checkpoint_max_rel_diff']:.3g}")
        print("  export of the same run directory:", json.dumps(s["export_only"]))
        for f, g in s["export_only_graphs"].items():
            print(f"    {f}: {json.dumps(g)}")
        for f in ("tensorrt", "cpu"):
            a, b = fps["native"].get("decisions", {}).get(f), cross[v]["fingerprint"].get("decisions", {}).get(f)
            if a != b:
                print(f"    decisions ({f}): native {json.dumps(a)}\n    {' ' * 15}{v} {json.dumps(b)}")
        print("  the same, replaying the native export's decisions (--replay):", json.dumps(s["replay"]))
        for f, g in s["replay_graphs"].items():
            print(f"    {f}: {json.dumps(g)}")
    tag = cpu_tag()
    others = {}
    for p in sorted(RESULTS.glob("cpu_repro_*.json")):
        if p.stem == f"cpu_repro_{tag}":
            continue
        o = json.loads(p.read_text())
        others[p.stem] = compare(fps["native"], o["fingerprints"]["native"])
        print(f"\n== against {p.name} ({o['machine']['cpu']}, {o['machine']['date']}): {json.dumps(others[p.stem])}")
    out["against_other_machines"] = others
    print(f"\nwrote {save(f'cpu_repro_{tag}', out)}")


if __name__ == "__main__":
    main()
