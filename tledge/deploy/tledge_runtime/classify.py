"""Input expansion and top-k formatting, shared by `tledge predict` and the runtime's `predict`."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .preprocess import ImageLoadError

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".jfif"}


class InputError(ValueError):
    """A path given on the command line does not exist."""


def expand_inputs(items: Sequence[str]) -> list[str]:
    """Files as given; folders expanded to their image files (sorted, recursive, hidden files skipped)."""
    out: list[str] = []
    for it in items:
        p = Path(it)
        if p.is_dir():
            out += sorted(str(f) for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTS and not f.name.startswith("."))
        elif p.exists():
            out.append(str(p))
        else:
            raise InputError(f"{p} does not exist: pass image files or folders of images.")
    if not out:
        raise InputError(f"no images in {', '.join(str(i) for i in items)}: pass image files or folders holding "
                         f"{', '.join(sorted(IMAGE_EXTS))} files.")
    return out


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def topk(logits: np.ndarray, classes: Sequence[str], k: int) -> list[list[dict[str, Any]]]:
    probs = softmax(logits)
    k = min(k, len(classes))
    order = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return [[{"class": classes[j], "index": int(j), "prob": float(probs[i, j])} for j in row]
            for i, row in enumerate(order)]


def format_row(res: dict[str, Any], as_json: bool) -> str:
    if as_json:
        return json.dumps(res)
    if "error" in res:
        return f"{res['image']}: cannot read ({res['error']})"
    return f"{res['image']}: " + ", ".join(f"{t['class']} {t['prob']:.3f}" for t in res["top"])


def classify_files(files: Sequence[str], pre: Callable[[str], np.ndarray], infer: Callable[[np.ndarray], np.ndarray],
                   classes: Sequence[str], k: int, batch: int = 32) -> Iterator[dict[str, Any]]:
    """Preprocess and classify ``files`` in batches, yielding one row per file in order: its top-k, or
    the reason it could not be read (a bad file never stops the others)."""
    for i in range(0, len(files), batch):
        chunk = files[i:i + batch]
        arrays, good, errors = [], [], {}
        for f in chunk:
            try:
                arrays.append(pre(f))
                good.append(f)
            except ImageLoadError as e:
                errors[f] = f"{e.kind}: {e.message}"
        logits = infer(np.stack(arrays)) if arrays else np.zeros((0, len(classes)), np.float32)
        ranked = dict(zip(good, topk(logits, classes, k)))
        for f in chunk:
            yield {"image": f, "top": ranked[f]} if f in ranked else {"image": f, "error": errors[f]}
