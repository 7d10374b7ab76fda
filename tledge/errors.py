"""Errors that tledge reports to users: each says what went wrong, why, and how to fix it."""
from __future__ import annotations

import difflib
from typing import Iterable


class TledgeError(Exception):
    """Base of every error tledge reports as one clear line (traceback only with --debug)."""

    exit_code = 2

    def __init__(self, what: str, fix: str | None = None) -> None:
        self.what = what
        self.fix = fix
        super().__init__(f"{what} Fix: {fix}" if fix else what)


class UsageError(TledgeError):
    """The user asked for something that does not exist or does not fit together."""


class DataError(TledgeError):
    """The dataset cannot be used as it is."""


class WeightsError(TledgeError):
    """Pretrained weights are missing, corrupt or do not fit the backbone."""


class RunDirError(TledgeError):
    """A run directory is missing, incomplete or would be overwritten."""


class MissingDependency(TledgeError):
    """An optional package is needed for this step and is not installed."""


class NumericsError(TledgeError):
    """Training or a cached input produced non-finite numbers (NaN, inf): never saved as a model."""


class GpuError(TledgeError):
    """CUDA or TensorRT failed while loading or running an engine (the message names the file and why)."""


class EngineMismatch(GpuError):
    """An engine built for another TensorRT version or GPU."""


class EngineBuildError(GpuError):
    """Building a TensorRT engine failed (the message says why)."""


class AccuracyError(TledgeError):
    """An exported artefact does not keep the accuracy it promised."""


def unknown_choice(kind: str, name: str, choices: Iterable[str]) -> UsageError:
    """Error for an unknown name that lists the choices and the closest match."""
    choices = sorted(choices)
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    hint = f"did you mean {close[0]}? " if close else ""
    return UsageError(f"unknown {kind} '{name}'; {hint}choices: {', '.join(choices)}.",
                      f"pass one of the listed {kind} names.")
