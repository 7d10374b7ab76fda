"""Bench output: the terminal table, bench.json (schema tledge.bench/1, see docs/bench_schema.md),
bench.csv, bench.png (latency against accuracy), and side-by-side comparison of two results."""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

from rich.table import Table

from tledge.console import out, warn
from tledge.errors import UsageError
from tledge.fsutil import atomic_path, read_json, write_json, write_text

SCHEMA = "tledge.bench/1"

CSV_COLUMNS = ["artefact", "precision", "runtime", "device", "mode", "batch", "iters", "p50_ms", "p90_ms", "p99_ms",
               "mean_ms", "std_ms", "min_ms", "max_ms", "throughput_ips", "speedup_vs_pytorch", "top1", "top5",
               "drop_points", "top1_agreement", "max_abs_logit_diff", "size_bytes"]


def rows(result: dict[str, Any], mode: str | None = "model") -> list[dict[str, Any]]:
    out_rows = []
    for r in result["results"]:
        for lat in r["latency"]:
            if mode and lat["mode"] != mode:
                continue
            out_rows.append({"artefact": r["artefact"], "precision": r["precision"], "runtime": r["runtime"],
                             "device": r["device"], "size_bytes": r["size_bytes"], **lat,
                             **{k: r["accuracy"].get(k) for k in ("top1", "top5", "drop_points", "top1_agreement",
                                                                    "max_abs_logit_diff")}})
    return out_rows


def table(result: dict[str, Any]) -> Table:
    t = Table(title=f"tledge bench: {result['backbone']} @ {result['input']} px, {result['settings']['val_images']} val "
                    f"images, {result['machine']['cpu']} ({result['settings']['threads']} threads)")
    for col in ("artefact", "precision", "runtime", "batch", "p50 ms", "p99 ms", "img/s", "speed-up", "e2e p50 ms",
                "top-1", "drop pt", "agree"):
        t.add_column(col, justify="left" if col in ("artefact", "precision", "runtime") else "right")
    e2e = {(r["artefact"], r["batch"]): r for r in rows(result, "end_to_end")}
    for r in rows(result, "model"):
        e = e2e.get((r["artefact"], r["batch"]))
        t.add_row(r["artefact"], r["precision"], r["runtime"], str(r["batch"]), f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}",
                  f"{r['throughput_ips']:.0f}", f"{r.get('speedup_vs_pytorch', float('nan')):.2f}x",
                  f"{e['p50_ms']:.2f}" if e else "-", f"{r['top1']:.4f}", f"{r['drop_points']:+.2f}",
                  f"{r['top1_agreement']:.1%}")
    return t


def print_report(result: dict[str, Any]) -> None:
    out.print(table(result))
    by_reason: dict[str, list[str]] = {}
    for s in result["skipped"]:
        by_reason.setdefault(s["reason"], []).append(s["artefact"])
    for reason, names in by_reason.items():
        out.print(f"skipped ({reason}): {', '.join(names)}")
    rm = result.get("resize_mode") or {}
    if rm.get("measured") and rm.get("measured") != rm.get("tuned"):
        out.print(f"accuracy measured with images fitted by '{rm['measured']}'; the model was tuned with "
                  f"'{rm['tuned']}': top-1 here is what a deployment that resizes this way gets")
    power = result["machine"].get("power")
    if power and not power.get("max_mode"):
        warn(f"the Jetson is in power mode {power.get('nvpmodel')!r}, not MAXN: latencies are not its best "
             "(sudo nvpmodel -m 0 && sudo jetson_clocks).")


def write_all(result: dict[str, Any], run_dir: str | os.PathLike) -> list[Path]:
    run = Path(run_dir)
    paths = [write_json(run / "bench.json", result)]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows(result, None):
        w.writerow(r)
    paths.append(write_text(run / "bench.csv", buf.getvalue()))
    paths.append(plot(result, run / "bench.png"))
    return paths


def plot(result: dict[str, Any], dest: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    model_rows = rows(result, "model")
    for b in sorted({r["batch"] for r in model_rows}):
        pts = [r for r in model_rows if r["batch"] == b]
        ax.scatter([r["p50_ms"] / b for r in pts], [r["top1"] * 100 for r in pts], label=f"batch {b}")
        for r in pts:
            ax.annotate(r["artefact"], (r["p50_ms"] / b, r["top1"] * 100), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("p50 latency per image (ms, log scale)")
    ax.set_ylabel("val top-1 (%)")
    ax.set_title(f"{result['backbone']}: latency against accuracy ({result['machine']['cpu']})", fontsize=9)
    ax.legend()
    fig.tight_layout()
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return dest


def compare_table(a: dict[str, Any], b: dict[str, Any], a_name: str = "this", b_name: str = "other") -> Table:
    """Rows matched by (artefact, batch): p50 on each side, their ratio, and top-1 on each side."""
    for r in (a, b):
        if r.get("schema") != "tledge.bench/1":
            raise UsageError(f"not a tledge bench result (schema {r.get('schema')!r}).", "pass a bench.json written by tledge bench.")
    t = Table(title=f"{a_name}: {a['machine']['cpu']}  vs  {b_name}: {b['machine']['cpu']}")
    for col in ("artefact", "batch", f"{a_name} p50 ms", f"{b_name} p50 ms", f"{b_name}/{a_name}", f"{a_name} top-1",
                f"{b_name} top-1"):
        t.add_column(col, justify="left" if col == "artefact" else "right")
    bmap = {(r["artefact"], r["batch"]): r for r in rows(b)}
    for r in rows(a):
        o = bmap.get((r["artefact"], r["batch"]))
        t.add_row(r["artefact"], str(r["batch"]), f"{r['p50_ms']:.2f}", f"{o['p50_ms']:.2f}" if o else "-",
                  f"{o['p50_ms'] / r['p50_ms']:.2f}" if o else "-", f"{r['top1']:.4f}", f"{o['top1']:.4f}" if o else "-")
    only_b = sorted({k[0] for k in bmap} - {r["artefact"] for r in rows(a)})
    if only_b:
        t.caption = f"only in {b_name}: {', '.join(only_b)}"
    return t


def load(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{p} does not exist.", "pass the bench.json of another run (e.g. copied from a Jetson).")
    fix = "pass a bench.json written by `tledge bench`, unedited."
    try:
        result = read_json(p)
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"{p} is not valid JSON ({exc}).", fix) from None
    if not isinstance(result, dict) or result.get("schema") != SCHEMA:
        got = result.get("schema") if isinstance(result, dict) else type(result).__name__
        raise UsageError(f"{p} is not a {SCHEMA} result (schema {got!r}).", fix)
    missing = [k for k in ("machine", "results", "settings", "backbone", "input") if k not in result]
    bad = [i for i, r in enumerate(result.get("results") or []) if not isinstance(r, dict)
           or not {"artefact", "precision", "runtime", "device", "size_bytes", "latency", "accuracy"} <= set(r)
           or not all(isinstance(x, dict) and {"mode", "batch", "p50_ms"} <= set(x) for x in r["latency"])]
    if missing or not isinstance(result.get("results"), list) or bad:
        raise UsageError(f"{p} is incomplete: " + (f"missing {', '.join(missing)}" if missing else
                         f"results {bad[:5]} lack artefact, latency or accuracy fields"), fix)
    return result
