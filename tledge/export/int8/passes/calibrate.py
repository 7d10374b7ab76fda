"""Graph pass: activation statistics of every tensor a form quantizes, over all calibration images,
cached under RUN/calib keyed by graph, images, preprocessing and histogram layout."""
from __future__ import annotations

import hashlib
import resource

from tledge.console import note, progress
from tledge.export.config import ExportConfig
from tledge.export.int8 import calibrate as cal
from tledge.export.int8.context import Int8Context
from tledge.export.int8.plan import PassRecord
from tledge.export.int8.quantize import quantized_tensors
from tledge.fsutil import sha256_json

HISTOGRAM_VERSION = 3  # bump when TensorStats' binning changes: old caches then miss


class Calibrate:
    name = "calibrate"

    def enabled(self, cfg: ExportConfig) -> tuple[bool, str]:
        return True, "always"

    def run(self, ctx: Int8Context) -> PassRecord:
        names = sorted({t for f in ctx.cfg.quant.forms for t in quantized_tensors(ctx.base, f)})
        graph_hash = hashlib.sha256(ctx.base.SerializeToString(deterministic=True)).hexdigest()
        key = sha256_json({"graph": graph_hash, "images": ctx.calib_ids, "preprocess": ctx.card["preprocess"],
                           "count": len(ctx.calib_ids), "bins": cal.BINS, "histogram": HISTOGRAM_VERSION,
                           "tensors": names})
        out_dir = ctx.run / "calib"
        path = out_dir / f"stats-{key[:16]}.npz"
        info = {"key": key, "file": str(path.relative_to(ctx.run)), "images": len(ctx.calib_ids),
                "tensors": len(names)}
        stats = cal.load_stats(path, key)
        if stats is not None:
            ctx.stats = stats
            note(f"calibration: statistics reused from {path} (graph, images, preprocessing and count unchanged)")
            return PassRecord(self.name, "graph", "statistics reused", "cache hit", details={**info, "cache": "hit"})
        with progress() as prog:
            task = prog.add_task("calibrate", total=len(ctx.calib_ids), info="")
            stats = cal.collect(ctx.base, names, ctx.calib_batches, ctx.threads, lambda n: prog.advance(task, n))
        cal.save_stats(path, stats, key)
        for old in out_dir.glob("stats-*.npz"):
            if old != path:
                old.unlink()
        ctx.stats = stats
        info.update(cache="miss", peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
        return PassRecord(self.name, "graph", f"statistics of {len(names)} tensors over {len(ctx.calib_ids)} images",
                          "cache miss", details=info)
