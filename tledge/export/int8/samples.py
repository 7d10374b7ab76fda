"""Calibration images: where they come from (never the val split), and which of them judge."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tledge.data import IMAGE_EXTS, Sample, ScanReport, stratified_split
from tledge.errors import DataError
from tledge.export.config import CalibConfig

REPO_CALIBRATION = Path(__file__).resolve().parents[3] / "calibration"


def image_files(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."))


def calibration_samples(card: dict[str, Any], cfg: CalibConfig, rep: ScanReport) -> tuple[list[Sample], str]:
    """The calibration images and a description of where they came from (``rep``: the run's checked
    dataset); never the val split."""
    val: Sequence[Sample] = rep.val

    def from_folder(folder: Path) -> list[Sample]:
        files = image_files(folder)
        if not files:
            raise DataError(f"calibration folder {folder} holds no images.",
                            f"put images ({', '.join(sorted(IMAGE_EXTS))}) in {folder}, or pass --calib train.")
        return [Sample(f, -1, hashlib.sha256(Path(f).read_bytes()).hexdigest()) for f in files]

    src = cfg.source
    if src == "auto":
        shipped = REPO_CALIBRATION / Path(card["dataset"]["root"]).name
        src = str(shipped) if shipped.is_dir() else "train"
    if src == "train":
        frac = min(0.999, cfg.count / max(1, len(rep.train)))
        pool = rep.train if frac >= 0.999 else stratified_split(rep.train, frac, 1234)[1]
        samples, where = pool, f"stratified sample of the training split of {card['dataset']['root']}"
    else:
        folder = Path(src)
        if not folder.is_dir():
            raise DataError(f"--calib {folder} is not a folder.", "pass a folder of images, 'train' or 'auto'.")
        samples, where = from_folder(folder), str(folder)
    val_shas = {s.sha256 for s in val}
    overlap = [s.path for s in samples if s.sha256 in val_shas]
    if overlap:
        raise DataError(f"{len(overlap)} calibration images are validation images (e.g. {overlap[0]}); "
                        "calibrating on val would make the accuracy check meaningless.",
                        "remove them from the calibration folder or pass --calib train.")
    if len(samples) > cfg.count:
        rng = np.random.default_rng(0)
        samples = [samples[i] for i in sorted(rng.choice(len(samples), cfg.count, replace=False))]
    return samples, where


def judge_split(n: int, judge_images: int) -> tuple[np.ndarray, np.ndarray]:
    """(judge indices, fit indices) of ``n`` calibration images: a fixed, spread-out selection (every
    k-th image) judges, the rest are for fits. With fewer than 2 * judge_images images, half judge."""
    k = min(judge_images, n // 2) if n >= 2 else n
    judge = np.unique(np.linspace(0, n - 1, k).round().astype(int)) if k else np.zeros(0, int)
    fit = np.setdiff1d(np.arange(n), judge)
    return judge, (fit if len(fit) else judge)
