"""`tledge predict`: top-k classes from a tuned checkpoint, so a user can try the model at once.

Input expansion and formatting are the deploy runtime's (tledge_runtime.classify), so both print the same.
"""
from __future__ import annotations

import os
from typing import Any, Iterator

import numpy as np

from tledge.deploy.tledge_runtime.classify import InputError, classify_files, expand_inputs, format_row
from tledge.errors import DataError


def predict_files(run: str | os.PathLike, images: list[str], k: int = 3, batch: int = 32) -> Iterator[dict[str, Any]]:
    import torch

    from tledge import card as card_mod
    from tledge.model import load_classifier

    card = card_mod.read(run)
    model = load_classifier(run, card)
    pre = card_mod.preprocess_of(card)
    try:
        files = expand_inputs(images)
    except InputError as exc:
        raise DataError(str(exc), "check the paths.") from exc

    def infer(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()

    yield from classify_files(files, pre, infer, card["classes"], k, batch)


def format_prediction(res: dict[str, Any], as_json: bool) -> str:
    return format_row(res, as_json)
