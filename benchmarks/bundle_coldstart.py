"""Issue 5 benchmark: bundle size and the runtime's cold start (process start, and module import to first
prediction) in a fresh virtual environment holding only numpy, Pillow and onnxruntime.

Usage: python benchmarks/bundle_coldstart.py RUN   (a run with `tledge export --fp16 --int8` done, e.g. runs/demo)
Writes benchmarks/results/bundle_coldstart.json.
"""
from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, machine, save, table  # noqa: E402


def main() -> None:
    run = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "runs" / "demo")
    from tledge.deploy.bundle import make_bundle
    res = make_bundle(run)
    bundle = Path(res["folder"])
    img = next((ROOT / "data/fashion-mnist/val").rglob("*.png"))
    rows = []
    with tempfile.TemporaryDirectory() as t:
        venv = Path(t) / "rt"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin/pip"), "install", "-q", "numpy", "pillow", "onnxruntime"], check=True,
                       capture_output=True)
        for prec in ("fp32", "int8"):
            for i in range(5):
                t0 = time.perf_counter()
                r = subprocess.run([str(venv / "bin/python"), "-m", "tledge_runtime", "predict", str(img), "--precision",
                                    prec], cwd=bundle, capture_output=True, text=True, env={"TLEDGE_RUNTIME_CPU": "1"})
                wall = time.perf_counter() - t0
                assert r.returncode == 0, r.stderr
                m = re.search(r"cold start to first prediction: ([0-9.]+)s", r.stderr)
                rows.append({"precision": prec, "try": i, "process_wall_s": wall, "import_to_first_prediction_s": float(m.group(1))})
    print(f"bundle {bundle}: {res['files']} files, {res['bytes'] / 1e6:.1f} MB; archive {res['archive_bytes'] / 1e6:.1f} MB")
    print(table(rows, ["precision", "try", "process_wall_s", "import_to_first_prediction_s"]))
    for prec in ("fp32", "int8"):
        v = sorted(r["import_to_first_prediction_s"] for r in rows if r["precision"] == prec)
        w = sorted(r["process_wall_s"] for r in rows if r["precision"] == prec)
        print(f"{prec}: median import-to-first-prediction {v[len(v) // 2]:.3f}s, median process wall {w[len(w) // 2]:.3f}s")
    print(f"wrote {save('bundle_coldstart', {'machine': machine(), 'bundle': res, 'rows': rows})}")


if __name__ == "__main__":
    main()
