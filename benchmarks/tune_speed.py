"""Issue 2 benchmark: `tledge tune` on mobilenet_v2 (real ImageNet weights) with the embedded
Fashion-MNIST set (2,000 train / 1,000 val images), measured in one run:

  (a) cold tune wall time / one plain backbone forward pass over the same images (target <= 1.3)
  (b) the second tune's wall time with the warm feature cache
  (c) val top-1 of tledge's head against scikit-learn's LogisticRegression on the same features
  (d) peak memory of each process

Usage: python benchmarks/tune_speed.py [--image-size N]   (default: the weights' own 224)
Writes benchmarks/results/tune_speed.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PY, ROOT, machine, run_child, save, table  # noqa: E402

FLOOR = r"""
import json, sys, time
from tledge.perf import tune_allocator
tune_allocator()  # the same allocator settings as the tledge CLI, for a fair floor
import torch
from torch.utils.data import DataLoader
from tledge import backbones
from tledge.data import scan
from tledge.features import ImageDataset
data, size, workers, bs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
spec = backbones.get("mobilenet_v2")
pre = spec.preprocess if size == 0 else spec.preprocess.scaled(size)
model, _ = backbones.build_backbone(spec, "imagenet")
rep = scan(data)
samples = rep.train + rep.val
t0 = time.perf_counter()
with torch.inference_mode():
    for x, *_ in DataLoader(ImageDataset(samples, pre), batch_size=bs, num_workers=workers):
        model(x)
print(json.dumps({"forward_s": time.perf_counter() - t0, "images": len(samples)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image-size", type=int, default=0, help="0 = the weights' own input size (224)")
    ap.add_argument("--data", default=str(ROOT / "data" / "fashion-mnist"))
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    size_args = ["--image-size", str(args.image_size)] if args.image_size else []
    env = {"TLEDGE_PROGRESS": "0"}
    with tempfile.TemporaryDirectory() as tmp:
        floor = run_child([PY, "-c", FLOOR, args.data, str(args.image_size), str(args.workers), "64"], env)
        assert floor["rc"] == 0, floor["stderr"]
        fl = json.loads(floor["stdout"].strip().splitlines()[-1])
        cmd = [PY, "-m", "tledge", "tune", args.data, "--backbone", "mobilenet_v2", "--workers", str(args.workers),
               "--cache-dir", f"{tmp}/cache", *size_args]
        cold = run_child(cmd + ["--out", f"{tmp}/cold"], env)
        assert cold["rc"] == 0, cold["stderr"]
        warm = run_child(cmd + ["--out", f"{tmp}/warm"], env)
        assert warm["rc"] == 0, warm["stderr"]
        card = json.loads(Path(f"{tmp}/cold/model_card.json").read_text())
        warm_card = json.loads(Path(f"{tmp}/warm/model_card.json").read_text())
        sk = sklearn_baseline(card, f"{tmp}/cache")
    rows = [
        {"measure": "plain forward pass (floor), in-process loop", "seconds": fl["forward_s"], "peak_MiB": floor["peak_rss_mib"]},
        {"measure": "tledge tune, cold cache (whole CLI process)", "seconds": cold["wall_s"], "peak_MiB": cold["peak_rss_mib"],
         "val_top1": card["metrics"]["val"]["top1"]},
        {"measure": "tledge tune, warm cache (whole CLI process)", "seconds": warm["wall_s"], "peak_MiB": warm["peak_rss_mib"],
         "val_top1": warm_card["metrics"]["val"]["top1"]},
        {"measure": "sklearn LogisticRegression (C=1, default)", "val_top1": sk["default"]},
        {"measure": f"sklearn LogisticRegression (best C={sk['best_C']} on val)", "val_top1": sk["best"]},
    ]
    ratio = cold["wall_s"] / fl["forward_s"]
    print(f"mobilenet_v2, {fl['images']} images ({len(card['dataset']['train_counts'])} classes), input "
          f"{card['preprocess']['crop']} px, {args.workers} workers")
    print(table(rows, ["measure", "seconds", "peak_MiB", "val_top1"]))
    print(f"(a) cold tune / forward floor = {ratio:.3f} (target <= 1.3)")
    print(f"(b) warm tune = {warm['wall_s']:.2f}s ({warm['wall_s'] / cold['wall_s']:.1%} of cold)")
    print(f"(c) tledge {card['metrics']['val']['top1']:.4f} vs LogisticRegression {sk['default']:.4f} (default), "
          f"{sk['best']:.4f} (best C on val)")
    print(f"    cold tune breakdown: features {card['timing_s']['features']:.2f}s, head {card['timing_s']['head']:.2f}s, "
          f"in-process total {card['timing_s']['total']:.2f}s")
    path = save("tune_speed", {"machine": machine(), "rows": rows, "ratio_cold_over_floor": ratio,
                               "images": fl["images"], "input": card["preprocess"]["crop"], "sklearn": sk,
                               "timing": card["timing_s"]})
    print(f"wrote {path}")


def sklearn_baseline(card: dict, cache_root: str) -> dict:
    """LogisticRegression on exactly the cached features tledge trained on."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    from tledge.data import scan
    from tledge.features import FeatureCache, extract
    from tledge.preprocess import Preprocess

    key = {"backbone": "mobilenet_v2", "weights": card["backbone"]["weights"]["sha256"],
           "preprocess": card["preprocess"], "dtype": "float32"}
    cache = FeatureCache(cache_root, key)
    rep = scan(card["dataset"]["root"])
    pre = Preprocess.from_dict(card["preprocess"])
    xtr, st = extract(None, rep.train, pre, cache)  # type: ignore[arg-type]
    xva, sv = extract(None, rep.val, pre, cache)  # type: ignore[arg-type]
    assert st["computed"] == 0 and sv["computed"] == 0, "features must come from tledge's cache"
    ytr = np.array([s.label for s in rep.train])
    yva = np.array([s.label for s in rep.val])
    res = {}
    for c in (0.01, 0.1, 1.0, 10.0):
        clf = LogisticRegression(C=c, max_iter=3000).fit(xtr, ytr)
        res[c] = float((clf.predict(xva) == yva).mean())
    best_c = max(res, key=res.get)
    return {"default": res[1.0], "best": res[best_c], "best_C": best_c, "all": {str(k): v for k, v in res.items()}}


if __name__ == "__main__":
    main()
