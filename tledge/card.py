"""The model card: the single contract between tune, export, bench and the deploy bundle.

Fields are documented in docs/model_card.md. The card is written last and atomically by `tledge tune`,
so its presence means the run finished.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tledge.errors import RunDirError
from tledge.fsutil import read_json, write_json
from tledge.preprocess import Preprocess

SCHEMA = "tledge.model_card/1"
FILENAME = "model_card.json"
REQUIRED = ("schema", "backbone", "classes", "preprocess", "head", "checkpoint")


def path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / FILENAME


def read(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and check a run's model card; a clear error when the run is missing or unfinished."""
    p = path(run_dir)
    if not Path(run_dir).is_dir():
        raise RunDirError(f"run directory {run_dir} does not exist.", "run `tledge tune DATA --out RUN` first.")
    if not p.is_file():
        raise RunDirError(f"{p} is missing: {run_dir} is not a finished tune run.",
                          f"finish it with `tledge tune DATA --out {run_dir} --resume`, or tune again.")
    try:
        card = read_json(p)
    except ValueError as exc:
        raise RunDirError(f"{p} is not valid JSON ({exc}).", "tune again; do not edit the card by hand.") from exc
    missing = [k for k in REQUIRED if k not in card]
    if missing or card.get("schema") != SCHEMA:
        raise RunDirError(f"{p} is not a {SCHEMA} card (missing {missing}, schema {card.get('schema')!r}).",
                          "tune again with this version of tledge.")
    return card


def write(run_dir: str | os.PathLike, card: dict[str, Any]) -> Path:
    card = {"schema": SCHEMA, **{k: v for k, v in card.items() if k != "schema"}}
    return write_json(path(run_dir), card)


def preprocess_of(card: dict[str, Any]) -> Preprocess:
    return Preprocess.from_dict(card["preprocess"])
