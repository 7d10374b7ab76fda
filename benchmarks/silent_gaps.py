"""Issue 12's "silent minutes are a defect", measured: run a tledge command in a pseudo-terminal (so its rich
progress bars draw, as they do for a user) and report every stretch longer than --gap seconds in which it wrote
nothing, with the last line before and the first line after it.

Usage: python benchmarks/silent_gaps.py [--gap 2.0] [--out silent_gaps] -- tledge export runs/demo --int8
Prints the gaps as a table and writes benchmarks/results/<out>.json. Exit status 1 when there is a gap.
"""
from __future__ import annotations

import argparse
import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in ANSI.sub("\n", text).splitlines() if ln.strip()]
    return lines[-1][:160] if lines else ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gap", type=float, default=2.0, help="seconds without output that count as silent")
    ap.add_argument("--out", default="silent_gaps")
    ap.add_argument("--log", type=Path, help="also write the command's output here (terminal codes removed)")
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    if not cmd:
        ap.error("give the command after --")
    master, slave = pty.openpty()
    env = {**os.environ, "COLUMNS": "160", "TERM": os.environ.get("TERM", "xterm")}
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    chunks: list[tuple[float, str]] = []
    while True:
        r, _, _ = select.select([master], [], [], 0.5)
        if r:
            try:
                data = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append((time.monotonic() - t0, data.decode("utf-8", "replace")))
        elif proc.poll() is not None:
            break
    rc = proc.wait()
    wall = time.monotonic() - t0
    if a.log:
        text = "".join(c for _, c in chunks).replace("\r\n", "\n")
        final = [ln.split("\r")[-1] for ln in re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text).split("\n")]
        a.log.write_text("\n".join(ln for ln in final if ln.strip()) + "\n")
    gaps = []
    prev_t, prev_text = 0.0, ""
    for i, (t, text) in enumerate(chunks + [(wall, "")]):
        if t - prev_t > a.gap:
            gaps.append({"start_s": round(prev_t, 1), "seconds": round(t - prev_t, 1),
                         "after": last_line(prev_text) or "(start)",
                         "before": last_line(text) or ("(end)" if i == len(chunks) else "(terminal codes only)")})
        prev_t, prev_text = t, (prev_text + text)[-4000:]
    print(f"{' '.join(cmd)}: exit {rc}, {wall:.0f} s, {len(gaps)} silent stretch(es) over {a.gap:g} s")
    for g in gaps:
        print(f"  at {g['start_s']:7.1f} s  {g['seconds']:6.1f} s silent after: {g['after']}")
        print(f"  {'':7}    {'':6}   until: {g['before']}")
    out = Path(__file__).resolve().parent / "results" / f"{a.out}.json"
    out.write_text(json.dumps({"machine": machine(), "cmd": cmd, "exit": rc, "wall_s": round(wall, 1),
                               "gap_s": a.gap, "gaps": gaps}, indent=2) + "\n")
    print(f"wrote {out}")
    return 1 if gaps or rc else 0


if __name__ == "__main__":
    sys.exit(main())
