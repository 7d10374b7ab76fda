"""Issue 4 benchmark: the harness costs almost nothing. In one process, alternating rounds, compare the
p50 that tledge's timing loop (tledge.bench.latency via OrtRunner) reports for an onnxruntime session at
batch 1 with a minimal hand-written `session.run` loop on the same model file and threads.

Usage: python benchmarks/bench_overhead.py RUN [--model model.onnx] [--threads 2] [--rounds 5]
(RUN: a run directory with an exported model, e.g. runs/demo after `make demo`.)
Writes benchmarks/results/bench_overhead.json. Target: |difference| within 5%.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, save, table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--model", default="model.onnx")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=300)
    args = ap.parse_args()

    from tledge.perf import tune_allocator
    tune_allocator()
    import onnxruntime as ort

    from tledge import card as card_mod
    from tledge.bench.latency import measure_model
    from tledge.runtimes.onnxruntime import OrtRunner, session_options

    run = Path(args.run)
    pre = card_mod.preprocess_of(card_mod.read(run))
    img = next((Path(card_mod.read(run)["dataset"]["root"]) / "val").rglob("*.png"))
    x = pre(img)[None]
    path = str(run / args.model)

    # the hand-written loop: a plain session and perf_counter_ns around session.run
    sess = ort.InferenceSession(path, session_options(args.threads), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name

    def hand() -> float:
        for _ in range(5):
            sess.run(None, {name: x})
        ts = []
        for _ in range(args.iters):
            t0 = time.perf_counter_ns()
            sess.run(None, {name: x})
            ts.append(time.perf_counter_ns() - t0)
        return float(np.percentile(np.array(ts) / 1e6, 50))

    runner = OrtRunner(path, "cpu", args.threads)
    runner.activate()
    hand_p50, tl_p50 = [], []
    for _ in range(args.rounds):  # alternate, so drift on this noisy machine hits both alike
        hand_p50.append(hand())
        tl_p50.append(measure_model(runner, x, warmup=5, iters=args.iters)["p50_ms"])
    runner.deactivate()
    h, t = float(np.median(hand_p50)), float(np.median(tl_p50))
    diff = (t - h) / h
    rows = [{"loop": "hand-written session.run", "p50_ms (median of rounds)": h, "rounds": str([round(v, 4) for v in hand_p50])},
            {"loop": "tledge bench (OrtRunner + latency.measure_model)", "p50_ms (median of rounds)": t,
             "rounds": str([round(v, 4) for v in tl_p50])}]
    print(f"{args.model}, batch 1, {args.threads} threads, {args.iters} timed calls x {args.rounds} alternating rounds")
    print(table(rows, ["loop", "p50_ms (median of rounds)", "rounds"]))
    print(f"tledge - hand-written = {diff:+.2%} (target within +-5%)")
    print(f"wrote {save('bench_overhead', {'machine': machine(), 'hand_p50_ms': hand_p50, 'tledge_p50_ms': tl_p50, 'difference': diff, 'model': args.model, 'threads': args.threads})}")


if __name__ == "__main__":
    main()
