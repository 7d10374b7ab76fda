"""Issue 14 benchmark: quantization-aware fine-tuning against the default post-training INT8 export, on the
10,000 Fashion-MNIST test images no step sees.

Per backbone and size, in one run: tune the embedded default, then `tledge export RUN --int8` (the default PTQ
plan) and `--int8 --qat --qat-scales S` for each S of --scales (fixed: the calibrated scales; learned), each export in its
own process (its wall time and peak memory measured from outside); for every INT8 graph, both forms, the
top-1 drop against PyTorch and the top-1 agreement with FP32 on the test images, and the QAT pass's own
seconds per form. For every INT8 graph also how closely onnxruntime (the session bench uses) computes what the
torch fake-quant network computes (torch_match): end to end on the first 2,000 test images, against the
agreement of onnxruntime's optimised and reference sessions of the same graph (ort_floor), and node by node.

Usage: python benchmarks/qat.py [--backbones mobilenet_v2,efficientnet_lite0] [--sizes 112] [--steps 300]
        [--scales fixed,learned] [--lrs 1e-5,3e-5] [--form both|tensorrt|cpu] [--centre exact|off|padded]
        [--no-ptq] [--augment off|on|off,on] [--ema 0,0.98] [--seeds 0,1,2] [--no-torch-match] [--out qat]
Writes benchmarks/results/<out>.json (qat.json by default), after every export.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (PY, machine, run_child, save, table, test_image_grid, test_metrics,  # noqa: E402
                     tuned_reference)

from tledge.export.config import CENTRE_MODES  # noqa: E402
from tledge.perf import release_memory  # noqa: E402


def torch_match(path: Path, ev, n: int = 2000) -> dict:
    """The torch fake-quant network of the exported Q/DQ graph (the network QAT trained, weights exactly: see
    tests/integration/test_qat.py) against onnxruntime on ``n`` test images, end to end and node by node:
    - torch_agreement / torch_max_diff / torch_mean_diff: top-1 agreement and |logit diff| against onnxruntime's
      optimised CPU session (what tledge bench runs);
    - ort_floor: onnxruntime's optimised session against its own reference execution (optimisations off) of the
      same graph, the agreement two correct executions of one INT8 graph reach;
    - node_differing: node by node (qat.node_check, 32 images), the fraction of quantized values that differ."""
    import numpy as np
    import onnx
    import torch

    from tledge.export import ort
    from tledge.export.int8.context import torch_threads
    from tledge.export.int8.passes.qat import build, node_check
    x = ev.first(n)
    q = onnx.load(str(path))
    batches = [x[i:i + 100] for i in range(0, len(x), 100)]
    with torch_threads(), torch.no_grad():
        net = build(q)
        z = np.concatenate([net(torch.from_numpy(b)).numpy() for b in batches])
        nodes = node_check(q, x[:32], net)
    r = ort.logits(q, batches)
    r0 = ort.logits(q, batches, optimize=False)
    return {"torch_agreement": float((z.argmax(1) == r.argmax(1)).mean()),
            "torch_max_diff": float(np.abs(z - r).max()), "torch_mean_diff": float(np.abs(z - r).mean()),
            "torch_ref_agreement": float((z.argmax(1) == r0.argmax(1)).mean()),
            "ort_floor": float((r.argmax(1) == r0.argmax(1)).mean()),
            "node_differing": nodes["differing"] / max(1, nodes["elements"]), "node_max_steps": nodes["max_steps"]}


def bench(name: str, size: int, steps: int, scales: list[str], test_dir: Path, tmp: Path, done: list,
          out: str, lrs: list[str] | None = None, forms: tuple[str, ...] = ("tensorrt", "cpu"), ptq: bool = True,
          centre: str = "", augments: tuple[bool, ...] = (False,), emas: tuple[str, ...] = ("",),
          seeds: tuple[int, ...] = (0,), torch_check: bool = True) -> dict:
    base, _, ev, ref = tuned_reference(name, size, test_dir, tmp)
    rows, detail = [], {}
    only = ([] if len(forms) == 2 else ["--form", forms[0]]) + (["--centre", centre] if centre else [])
    configs = ([("PTQ default", only)] if ptq else []) + [
        (f"QAT {s} scales" + (f" lr {lr}" if lr else "") + (" augmented" if aug else "")
         + (f" ema {ema}" if ema else "") + (f" seed {seed}" if len(seeds) > 1 or seed else ""),
         ["--qat", "--qat-steps", str(steps), "--qat-scales", s, *(["--qat-lr", lr] if lr else []),
          *(["--qat-augment"] if aug else []), *(["--qat-ema", ema] if ema else []), "--qat-seed", str(seed), *only])
        for s in scales for lr in (lrs or [""]) for aug in augments for ema in emas for seed in seeds]
    for label, extra in configs:
        run = tmp / f"{base.name}-{len(detail)}"
        shutil.copytree(base, run)
        child = run_child([PY, "-m", "tledge", "export", str(run), "--int8", "--threads", "2", *extra],
                          env={"TLEDGE_PROGRESS": "0"})
        if child["rc"] != 0:
            raise SystemExit(f"{label}: export failed\n{child['stderr'][-3000:]}")
        m = json.loads((run / "export_manifest.json").read_text())
        qat_s = {f: rec["qat"]["seconds"] for f, rec in m["int8"]["forms"].items() if "qat" in rec}
        detail[label] = {"export_wall_s": round(child["wall_s"], 1), "peak_rss_mib": round(child["peak_rss_mib"]),
                         "qat_s": qat_s, "qat_records": {f: {k: rec["qat"][k] for k in ("decision", "details")}
                                                         for f, rec in m["int8"]["forms"].items() if "qat" in rec},
                         "kept_float": {f: g["kept_float"] for f, g in m["int8"]["gate"].items()}}
        for form in forms:
            f = run / f"model.int8.{'trt' if form == 'tensorrt' else 'cpu'}.onnx"
            match = torch_match(f, ev) if torch_check else {}
            release_memory()  # its ~10 GB at 224 px would otherwise stay resident beside the next export child
            rows.append({"config": label, "form": form, **test_metrics(f, ev, ref), **match,
                         "val_drop_pt": m["checks"][f"int8-{form}"]["final"]["drop_points"],
                         "qat_s": qat_s.get(form), "export_s": round(child["wall_s"], 1),
                         "peak_mib": round(child["peak_rss_mib"])})
        shutil.rmtree(run)
        # saved after every export: a run cut short by its time limit keeps what it measured
        save(out, {"machine": machine(), "results": done + [{"backbone": name, "size": size, "rows": rows,
                                                              "detail": detail, "partial": True}]})
    ev.close()
    return {"backbone": name, "size": size, "test_images": len(ref),
            "torch_top1": float((ref.argmax(1) == ev.labels).mean()), "steps": steps, "rows": rows, "detail": detail}


def over_seeds(rows: list[dict]) -> list[dict]:
    """The rows of one config run with several --qat-seed values, summarised per config and form: the mean and
    the range of the drop, the agreement and the QAT seconds (rows whose config has no seed are left out)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if " seed " in r["config"]:
            groups.setdefault((r["config"].rsplit(" seed ", 1)[0], r["form"]), []).append(r)
    out = []
    for (config, form), rs in groups.items():
        d, a = [r["drop_pt"] for r in rs], [r["agreement"] for r in rs]
        q = [r["qat_s"] for r in rs if r["qat_s"] is not None]
        out.append({"config": config, "form": form, "n": len(rs), "drop_pt": round(sum(d) / len(d), 3),
                    "drop_range": f"{min(d):.2f}..{max(d):.2f}", "agreement": round(sum(a) / len(a), 4),
                    "agreement_range": f"{min(a):.4f}..{max(a):.4f}",
                    "qat_s": round(sum(q) / len(q), 1) if q else None})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", default="mobilenet_v2,efficientnet_lite0")
    ap.add_argument("--sizes", default="112")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--scales", default="fixed,learned")
    ap.add_argument("--lrs", default="", help="QAT learning rates to try (comma list; default: tledge's --qat-lr)")
    ap.add_argument("--form", default="both", choices=["both", "tensorrt", "cpu"], help="INT8 forms to export")
    ap.add_argument("--centre", default="", choices=["", *CENTRE_MODES],
                    help="tledge export --centre for every export (default: tledge's)")
    ap.add_argument("--no-ptq", action="store_true", help="skip the PTQ default export (QAT rows only)")
    ap.add_argument("--augment", default="off", help="QAT with --qat-augment off, on, or both (off,on)")
    ap.add_argument("--ema", default="", help="QAT --qat-ema decays to try (comma list; default: tledge's)")
    ap.add_argument("--seeds", default="0", help="QAT --qat-seed values, each config run once per seed (comma list)")
    ap.add_argument("--no-torch-match", action="store_true",
                    help="skip the torch fake-quant vs onnxruntime comparison of every graph (accuracy rows only)")
    ap.add_argument("--out", default="qat", help="results file name under benchmarks/results (no .json)")
    args = ap.parse_args()
    if not set(args.augment.split(",")) <= {"off", "on"}:
        ap.error(f"--augment {args.augment}: off, on or off,on")
    results = []
    t0 = time.perf_counter()
    with test_image_grid(args.sizes, args.backbones) as grid:
        for tmp, test_dir, size, name in grid:
            r = bench(name, size, args.steps, args.scales.split(","), test_dir, tmp, results, args.out,
                      [x for x in args.lrs.split(",") if x],
                      ("tensorrt", "cpu") if args.form == "both" else (args.form,), not args.no_ptq,
                      args.centre, tuple(a == "on" for a in args.augment.split(",")),
                      tuple(args.ema.split(",")), tuple(int(x) for x in args.seeds.split(",")),
                      not args.no_torch_match)
            results.append(r)
            r["centre"] = args.centre or "default"
            print(f"\n== {name} @ {size}px, {r['test_images']} test images: "
                  f"PyTorch FP32 top-1 {r['torch_top1']:.4f}, --centre {r['centre']}")
            print(table(r["rows"], ["config", "form", "top1", "drop_pt", "agreement", "val_drop_pt", "qat_s",
                                    "export_s", "peak_mib", "torch_agreement", "torch_max_diff", "ort_floor",
                                    "node_differing"]))
            if "," in args.seeds:
                r["over_seeds"] = over_seeds(r["rows"])
                print(f"\nover seeds {args.seeds} (mean, min..max):")
                print(table(r["over_seeds"], ["config", "form", "n", "drop_pt", "drop_range", "agreement",
                                              "agreement_range", "qat_s"]))
            save(args.out, {"machine": machine(), "results": results, "seconds": round(time.perf_counter() - t0)})
    print(f"\nwrote {save(args.out, {'machine': machine(), 'results': results, 'seconds': round(time.perf_counter() - t0)})}")


if __name__ == "__main__":
    main()
