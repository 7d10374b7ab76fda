"""Classification metrics and the training-history artefacts (CSV and PNG)."""
from __future__ import annotations

import csv
import io
import os
from typing import Any, Sequence

import numpy as np

from tledge.fsutil import atomic_path, write_text


def confusion(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> np.ndarray:
    cm = np.zeros((k, k), np.int64)
    np.add.at(cm, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return cm


def classification_summary(logits: np.ndarray, y: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """top-1, top-5 (when >= 5 classes), per-class accuracy and the confusion matrix (rows = truth)."""
    y = np.asarray(y)
    pred = logits.argmax(1)
    k = len(classes)
    cm = confusion(y, pred, k)
    per_class = {c: (float(cm[i, i] / cm[i].sum()) if cm[i].sum() else None) for i, c in enumerate(classes)}
    out: dict[str, Any] = {"n": int(len(y)), "top1": float((pred == y).mean()) if len(y) else None}
    if k >= 5 and len(y):
        top5 = np.argsort(-logits, axis=1)[:, :5]
        out["top5"] = float((top5 == y[:, None]).any(1).mean())
    out["per_class_accuracy"] = per_class
    out["confusion_matrix"] = cm.tolist()
    return out


def write_history_csv(path: str | os.PathLike, history: list[dict[str, Any]]) -> None:
    cols = ["phase", "epoch", "train_loss", "val_loss", "val_acc", "lr"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for row in history:
        w.writerow(row)
    write_text(path, buf.getvalue())


def plot_history(path: str | os.PathLike, history: list[dict[str, Any]], title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    x = np.arange(1, len(history) + 1)
    a1.plot(x, [h["train_loss"] for h in history], label="train loss")
    a1.plot(x, [h["val_loss"] for h in history], label="val loss")
    a1.set_xlabel("epoch (all phases)")
    a1.legend()
    a2.plot(x, [h["val_acc"] for h in history], color="tab:green", label="val top-1")
    ft = [i + 1 for i, h in enumerate(history) if h["phase"] == "finetune"]
    if ft:
        a2.axvline(ft[0] - 0.5, color="grey", ls="--", lw=1, label="fine-tuning starts")
    a2.set_xlabel("epoch (all phases)")
    a2.set_ylabel("top-1")
    a2.legend()
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
