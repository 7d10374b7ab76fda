"""Issue 7 benchmark: feature-extraction throughput of `tledge tune` with 1 and 2 processes (torchrun,
gloo, one thread each, no loader workers) on the same images, and the scaling efficiency.

Usage: python benchmarks/dist_scaling.py [--image-size 112] [--data data/fashion-mnist]
Each configuration starts from an empty feature cache. Writes benchmarks/results/dist_scaling.json.
Note: on a 2-core machine 2 processes x 1 thread use both cores; efficiency = (throughput with 2) /
(2 x throughput with 1).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PY, ROOT, machine, run_child, save, table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image-size", type=int, default=112)
    ap.add_argument("--data", default=str(ROOT / "data" / "fashion-mnist"))
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    env = {"TLEDGE_PROGRESS": "0", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    common = ["tune", args.data, "--image-size", str(args.image_size), "--workers", "0", "--epochs", "5"]
    torchrun = str(Path(PY).with_name("torchrun"))
    rows = []
    with tempfile.TemporaryDirectory() as t:
        for rnd in range(args.rounds):  # alternate 1 and 2 processes, so machine drift hits both
            for procs in (1, 2):
                out, cache = f"{t}/r{rnd}p{procs}", f"{t}/c{rnd}p{procs}"
                launcher = [PY, "-m", "tledge"] if procs == 1 else [torchrun, "--nproc-per-node", "2", "-m", "tledge"]
                res = run_child(launcher + common + ["--out", out, "--cache-dir", cache], env)
                assert res["rc"] == 0, res["stderr"][-3000:]
                card = json.loads(Path(out, "model_card.json").read_text())
                n = card["feature_cache"]["computed"]
                secs = card["timing_s"]["features"]
                rows.append({"round": rnd, "processes": procs, "images": n, "extract_s": secs, "img_per_s": n / secs,
                             "wall_s": res["wall_s"]})
    best = {p: max(r["img_per_s"] for r in rows if r["processes"] == p) for p in (1, 2)}
    eff = best[2] / (2 * best[1])
    print(f"feature extraction, mobilenet_v2 @ {args.image_size} px, gloo, 1 thread per process")
    print(table(rows, ["round", "processes", "images", "extract_s", "img_per_s", "wall_s"]))
    print(f"best throughput: 1 process {best[1]:.1f} img/s, 2 processes {best[2]:.1f} img/s; "
          f"speed-up {best[2] / best[1]:.2f}x, scaling efficiency {eff:.1%}")
    print(f"wrote {save('dist_scaling', {'machine': machine(), 'rows': rows, 'efficiency': eff})}")


if __name__ == "__main__":
    main()
