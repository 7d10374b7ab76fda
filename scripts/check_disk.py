"""Refuse to start the set-up when the disk cannot hold it.

Usage: python scripts/check_disk.py VENV_DIR MIN_GIB

Exits 0 when the venv is already built (its stamp exists) or when the file system that will hold VENV_DIR has
at least MIN_GIB free; otherwise prints how much is free, where, and what to do, and exits 1. Standard library
only: it runs before the venv exists.
"""

from __future__ import annotations

import os
import shutil
import sys


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: check_disk.py VENV_DIR MIN_GIB", file=sys.stderr)
        return 2
    venv, need_gib = argv[0], float(argv[1])
    lib = os.path.join(venv, "lib")
    if os.path.isdir(lib) and any(
        os.path.isdir(os.path.join(lib, d, "site-packages", "torch")) for d in os.listdir(lib)
    ):
        return 0  # torch is already in the venv: the big part of the set-up is done
    probe = os.path.abspath(venv)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    free_gib = shutil.disk_usage(probe).free / 2**30
    if free_gib >= need_gib:
        return 0
    print(
        f"error: {free_gib:.1f} GiB free on the file system of {probe}; the set-up of {venv} needs about "
        f"{need_gib:g} GiB (torch's CUDA build is ~5.6 GB installed, plus its downloads and the tests' "
        f"temporary files). Free some space (pip's cache: `pip cache purge`; old run or /tmp folders) "
        f"or set VENV=/a/bigger/disk/.venv, then run make again.",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
