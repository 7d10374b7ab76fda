"""Issue 12 comparison with the previous default export (commit 5c14cbb: learned rounding for 60 s of wall
time and auto bias correction always on), side by side in one run on the same tuned run directory.

Runs `tledge export RUN --int8` of the previous version (a git worktree of that commit, in a child process
with its own PYTHONPATH) and of this checkout on two copies of RUN, timing each, then scores both versions'
INT8 graphs on the 10,000 Fashion-MNIST test images against PyTorch.

Usage: python benchmarks/int8_previous.py RUN OLD_TREE   (OLD_TREE: `git worktree add DIR 5c14cbb`)
Writes benchmarks/results/int8_previous.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, machine, make_testset, save, table  # noqa: E402


def export(tree: Path, run: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree), "TLEDGE_PROGRESS": "0"}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "tledge", "export", str(run), "--int8", "--threads", "2"], env=env,
                   check=True, cwd=tree)
    return time.perf_counter() - t0


def main() -> None:
    import torch

    from tledge import card as card_mod
    from tledge.data import scan
    from tledge.evalset import EvalSet, compare, run_logits
    from tledge.model import load_classifier
    from tledge.runtimes.onnxruntime import OrtRunner

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("old_tree", type=Path)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        runs = {"previous default (5c14cbb)": (args.old_tree, tmp / "old"), "this version, default": (ROOT, tmp / "new")}
        secs = {}
        for label, (tree, run) in runs.items():
            shutil.copytree(args.run, run)
            for f in list(run.glob("model.*onnx")) + [run / "export_manifest.json"]:
                f.unlink(missing_ok=True)
            shutil.rmtree(run / "calib", ignore_errors=True)
            secs[label] = export(tree, run)
        card = card_mod.read(args.run)
        ev = EvalSet(scan(make_testset(tmp / "test")).val, card_mod.preprocess_of(card), label="test images")
        model = load_classifier(args.run, card)
        with torch.inference_mode():
            ref = run_logits(lambda b: model(torch.from_numpy(b)).numpy(), ev, 64)
        for label, (_, run) in runs.items():
            m = json.loads((run / "export_manifest.json").read_text())
            for form, f in (("tensorrt", "model.int8.trt.onnx"), ("cpu", "model.int8.cpu.onnx")):
                with OrtRunner(run / f, "cpu", 2) as r:
                    res = compare(run_logits(r.infer, ev, 64), ref, ev.labels)
                rows.append({"version": label, "form": form, "export_s": secs[label], "top1": res["top1"],
                             "drop_pt": res["drop_points"], "agreement": res["top1_agreement"],
                             "val_drop_pt": m["checks"][f"int8-{form}"]["final"]["drop_points"]})
        ev.close()
    print(table(rows, ["version", "form", "export_s", "top1", "drop_pt", "agreement", "val_drop_pt"]))
    print(f"wrote {save('int8_previous', {'machine': machine(), 'run': str(args.run), 'rows': rows})}")


if __name__ == "__main__":
    main()
