"""PyTorch runner: the baseline every artefact is compared with."""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from tledge.deps import has_module
from tledge.runtimes.base import Runner, register_runner


class TorchRunner(Runner):
    """The tuned network in PyTorch eager (optionally torch.compile; FP16 autocast on CUDA)."""

    name = "torch"

    def __init__(self, run_dir: str | os.PathLike, device: str = "cpu", compile: bool = False,
                 fp16: bool = False, threads: int | None = None) -> None:
        self.run_dir, self.device, self.compile, self.fp16, self.threads = run_dir, device, compile, fp16, threads
        if fp16 and device == "cpu":
            raise ValueError("FP16 autocast is only measured on CUDA")

    def activate(self) -> None:
        import torch

        from tledge.model import load_classifier
        if self.threads:
            torch.set_num_threads(self.threads)
        self.torch = torch
        model = load_classifier(self.run_dir).to(self.device)
        self.model = torch.compile(model) if self.compile else model

    def infer(self, x: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            t = torch.from_numpy(x).to(self.device, non_blocking=True)
            if self.fp16:
                with torch.autocast("cuda", dtype=torch.float16):
                    y = self.model(t)
            else:
                y = self.model(t)
            return y.float().cpu().numpy()

    def synchronize(self) -> None:
        if self.device.startswith("cuda"):
            self.torch.cuda.synchronize()

    def describe(self) -> dict[str, Any]:
        d = {"runner": self.name, "device": self.device, "compile": self.compile, "fp16_autocast": self.fp16,
             "threads": self.torch.get_num_threads() if hasattr(self, "torch") else self.threads}
        if self.device.startswith("cuda") and hasattr(self, "torch"):
            d["gpu_peak_allocated_mib"] = self.torch.cuda.max_memory_allocated() / 2**20
        return d


def _available() -> tuple[bool, str]:
    return (True, "") if has_module("torch") else (False, "torch is not installed")


register_runner("torch", TorchRunner, _available)
