"""Terminal output: one rich console (stderr for progress and notes, so stdout stays parseable)."""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

err = Console(stderr=True, highlight=False, soft_wrap=True)
# Not a terminal (CI logs, pipes): a wide fixed width, so tables are not squeezed into 80 columns.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 160)


def note(msg: str) -> None:
    err.print(msg)


def warn(msg: str) -> None:
    err.print(f"[bold yellow]warning:[/] {msg}")


def progress_enabled() -> bool:
    return os.environ.get("TLEDGE_PROGRESS", "1") != "0" and sys.stderr.isatty()


@contextmanager
def progress(auto_refresh: bool = True) -> Iterator[Progress]:
    """A progress display for scanning, feature extraction and epochs (silent when not a terminal).
    ``auto_refresh=False``: drawn only when the caller calls ``refresh()``, with no drawing thread beside the
    work (latency measurement)."""
    p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                 TaskProgressColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                 TextColumn("{task.fields[info]}"), console=err, transient=False,
                 auto_refresh=auto_refresh, disable=not progress_enabled())
    with p:
        yield p


@contextmanager
def status(msg: str) -> Iterator[None]:
    """``msg`` with a spinner while the block runs (a step of a few seconds that has no count to show, e.g.
    loading PyTorch and a checkpoint); not a terminal: ``msg`` as a note, once."""
    if not progress_enabled():
        note(msg)
        yield
        return
    with err.status(msg):
        yield
