"""The scan reports every bad-file kind before any work, converts usable oddities, and stops on fatal
problems with a clear error."""
from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tledge.data import scan, stratified_split
from tledge.errors import DataError
from tests.conftest import make_subset


def _jpeg(seed: int = 0, mode: str = "RGB") -> bytes:
    im = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    im.save(buf, "JPEG" if mode in ("RGB", "L", "CMYK") else "PNG")
    return buf.getvalue()


def test_every_bad_kind_reported_and_oddities_converted(tmp_path: Path) -> None:
    root = make_subset(tmp_path / "d", classes=2, train=5, val=2)
    cls = root / "train" / sorted(p.name for p in (root / "train").iterdir())[0]
    (cls / "zero.jpg").write_bytes(b"")
    (cls / "text.png").write_bytes(b"this is not an image")
    full = _jpeg(3)
    (cls / "trunc.jpg").write_bytes(full[: len(full) // 2])
    (cls / ".DS_Store").write_bytes(b"\0\0")
    (cls / "notes.txt").write_text("hello")
    (cls / "cmyk.jpg").write_bytes(_jpeg(4, "CMYK"))
    rgba = Image.new("RGBA", (16, 16), (0, 0, 255, 128))
    rgba.save(cls / "alpha.png")
    Image.new("P", (16, 16), 1).save(cls / "pal.gif")
    (root / "train" / "empty_class").mkdir()
    unreadable = cls / "noperm.jpg"
    unreadable.write_bytes(_jpeg(5))
    unreadable.chmod(0)
    rep = scan(root)
    kinds = {(Path(p["path"]).name, p["kind"]) for p in rep.problems}
    assert ("zero.jpg", "zero-byte") in kinds
    assert ("text.png", "not-an-image") in kinds
    assert ("trunc.jpg", "truncated") in kinds
    ignored = {(Path(p["path"]).name, p["kind"]) for p in rep.ignored}
    assert (".DS_Store", "hidden") in ignored
    assert ("notes.txt", "non-image-extension") in ignored
    assert ("empty_class", "empty-class-folder") in ignored
    assert rep.converted.get("cmyk") == 1 and rep.converted.get("alpha") == 1 and rep.converted.get("palette") == 1
    assert rep.converted.get("grayscale") == 14
    # usable files kept (5 + cmyk + alpha + palette [+ noperm when running as root, who can read it])
    n_first = rep.counts("train")[cls.name]
    assert n_first in (8, 9)
    assert len(rep.classes) == 2 and len(rep.val) == 4
    unreadable.chmod(0o644)


def test_fewer_than_two_classes_is_fatal(tmp_path: Path) -> None:
    root = make_subset(tmp_path / "d", classes=1)
    with pytest.raises(DataError, match="at least 2"):
        scan(root)


def test_val_class_missing_from_train_is_fatal(tmp_path: Path) -> None:
    root = make_subset(tmp_path / "d", classes=3)
    victim = sorted((root / "train").iterdir())[0]
    shutil.rmtree(victim)
    (root / "train" / victim.name).mkdir()  # empty: reported, not a class
    with pytest.raises(DataError, match="no training images"):
        scan(root)


def test_missing_folder_names_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=str(tmp_path / "nope")):
        scan(tmp_path / "nope")


def test_single_folder_layout_is_split_stratified_and_seeded(tmp_path: Path) -> None:
    src = make_subset(tmp_path / "d", classes=3, train=10, val=0)
    flat = src / "train"
    a = scan(flat, val_fraction=0.3, seed=1)
    b = scan(flat, val_fraction=0.3, seed=1)
    c = scan(flat, val_fraction=0.3, seed=2)
    assert a.layout == "split"
    assert [s.path for s in a.val] == [s.path for s in b.val]
    assert [s.path for s in a.val] != [s.path for s in c.val]
    assert a.counts("val") == {k: 3 for k in a.classes}
    assert not {s.path for s in a.val} & {s.path for s in a.train}


def test_split_rejects_bad_fraction() -> None:
    with pytest.raises(DataError, match="val-fraction"):
        stratified_split([], 1.5, 0)
