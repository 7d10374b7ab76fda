"""The INT8 head refit gives the same head on every x86 CPU: torch's kernels made to compute as a CPU with narrower
vectors (AVX2) or none would, in a child process, must give the same bytes as this machine's. In float32 they did
not (heads 1e-7 apart: torch's exp/log and matmul kernels round differently per vector width), so INT8 head
weights depended on the CPU the export ran on (benchmarks/cpu_repro.py)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

CODE = """
import hashlib, numpy as np
from tledge.export.int8.passes.head_refit import refit_head
rng = np.random.default_rng(0)
f = rng.standard_normal((600, 256)).astype(np.float32).clip(0, 6)
y = rng.integers(0, 10, 600)
w0 = (rng.standard_normal((10, 256)) * 0.05).astype(np.float32)
b0 = np.zeros(10, np.float32)
t = rng.standard_normal((600, 10)).astype(np.float32) * 3
w, b = refit_head(f, y, w0, b0, 12, 1e-4, 0.1, 0.1, teacher=t, distill=0.7)
assert w.dtype == np.float32 and b.dtype == np.float32
print(hashlib.sha256(w.tobytes() + b.tobytes()).hexdigest())
"""

# how torch computes on other x86 CPUs: ATen's vector width, oneDNN's and MKL's instruction sets
CPUS = {
    "this machine": {},
    "AVX2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "no vectors": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41",
                   "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
}


def _head_sha(env: dict[str, str]) -> str:
    r = subprocess.run([sys.executable, "-c", CODE], env={**os.environ, **env}, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip().splitlines()[-1]


@pytest.mark.slow
def test_the_refit_head_is_the_same_on_every_x86_cpu() -> None:
    shas = {name: _head_sha(env) for name, env in CPUS.items()}
    assert len(set(shas.values())) == 1, shas
