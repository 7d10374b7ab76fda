"""`tledge predict`: top-k classes from a tuned checkpoint, so a user can try the model at once."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from tledge.data import IMAGE_EXTS
from tledge.errors import DataError
from tledge.preprocess import ImageLoadError


def expand_inputs(items: list[str]) -> list[str]:
    """Files as given; folders expanded to their image files (sorted, recursive)."""
    out: list[str] = []
    for it in items:
        p = Path(it)
        if p.is_dir():
            out += sorted(str(f) for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTS and not f.name.startswith("."))
        elif p.exists():
            out.append(str(p))
        else:
            raise DataError(f"{p} does not exist.", "pass image files or folders of images.")
    return out


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def topk(logits: np.ndarray, classes: list[str], k: int) -> list[list[dict[str, Any]]]:
    probs = softmax(logits)
    k = min(k, len(classes))
    order = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return [[{"class": classes[j], "index": int(j), "prob": float(probs[i, j])} for j in row]
            for i, row in enumerate(order)]


def predict_files(run: str | os.PathLike, images: list[str], k: int = 3, batch: int = 32) -> Iterator[dict[str, Any]]:
    import torch

    from tledge import card as card_mod
    from tledge.model import load_classifier

    card = card_mod.read(run)
    model = load_classifier(run, card)
    pre = card_mod.preprocess_of(card)
    files = expand_inputs(images)
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
    if as_json:
        return json.dumps(res)
    if "error" in res:
        return f"{res['image']}: cannot read ({res['error']})"
    return f"{res['image']}: " + ", ".join(f"{t['class']} {t['prob']:.3f}" for t in res["top"])
