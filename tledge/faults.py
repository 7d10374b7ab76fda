"""Testing aids for the interrupt and crash paths, driven by the environment so that a test does not race
a fast run: ``TLEDGE_INTERRUPT_AT=STAGE`` sends this process SIGINT at STAGE (as a user's Ctrl-C would),
``TLEDGE_KILL_AT=STAGE`` sends it SIGKILL (as ``kill -9`` or a power cut would: no clean-up runs)."""
from __future__ import annotations

import os
import signal


def maybe_interrupt(stage: str) -> None:
    """Stop here if the environment asks for it at ``stage`` (e.g. ``finetune:2``, ``export:commit``)."""
    if os.environ.get("TLEDGE_INTERRUPT_AT") == stage:
        os.kill(os.getpid(), signal.SIGINT)
    if os.environ.get("TLEDGE_KILL_AT") == stage:
        os.kill(os.getpid(), signal.SIGKILL)
