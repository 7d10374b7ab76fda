"""`tledge predict`: top-k classes from a tuned checkpoint, so a user can try the model at once.

Input expansion and formatting are the deploy runtime's (tledge_runtime.classify), so both print the same.
"""
from __future__ import annotations

import os
from typing import Any, Iterator

import numpy as np

from tledge.deploy.tledge_runtime.classify import InputError, expand_inputs, format_row, topk
from tledge.errors import DataError
from tledge.preprocess import ImageLoadError


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
    for i in range(0, len(files), batch):
        chunk = files[i:i + batch]
        arrays, good, errors = [], [], {}
        for f in chunk:
            try:
                arrays.append(pre(f))
                good.append(f)
            except ImageLoadError as e:
                errors[f] = f"{e.kind}: {e.message}"
        logits = np.zeros((0, len(card["classes"])), np.float32)
        if arrays:
            with torch.inference_mode():
                logits = model(torch.from_numpy(np.stack(arrays))).numpy()
        ranked = dict(zip(good, topk(logits, card["classes"], k)))
        for f in chunk:
            yield {"image": f, "top": ranked[f]} if f in ranked else {"image": f, "error": errors[f]}


def format_prediction(res: dict[str, Any], as_json: bool) -> str:
    return format_row(res, as_json)
