"""Issue 15 item 2: links cannot fool the scan. A loop (``Bag/self -> .``) used to list every Bag image
41 times, in train and val alike; a link to the parent (``Coat/up -> ..``) relabelled other classes'
images as Coat. Both exited 0."""
from __future__ import annotations

import os
from pathlib import Path

from tledge.data import scan
from tests.conftest import make_subset


def _counts(root: Path) -> tuple[dict[str, int], dict[str, int]]:
    rep = scan(root)
    return rep.counts("train"), rep.counts("val")


def test_loop_and_parent_links_are_problems_not_images(tmp_path: Path) -> None:
    root = make_subset(tmp_path / "d", classes=3, train=6, val=2)
    before = _counts(root)
    a, b = sorted(p.name for p in (root / "train").iterdir())[:2]
    os.symlink(".", root / "train" / a / "self")        # loop
    os.symlink("..", root / "train" / b / "up")         # every class, relabelled as b
    os.symlink("../..", root / "val" / a / "top")       # the dataset root from val
    rep = scan(root)
    assert (rep.counts("train"), rep.counts("val")) == before
    kinds = {Path(p["path"]).name: p["kind"] for p in rep.problems}
    assert kinds == {"self": "symlink-loop", "up": "symlink-outside-class", "top": "symlink-outside-class"}
    paths = [s.path for s in rep.train + rep.val]
    assert len(paths) == len(set(os.path.realpath(p) for p in paths))  # no image twice


def test_links_out_of_the_root_and_duplicate_folders_are_refused(tmp_path: Path) -> None:
    root = make_subset(tmp_path / "d", classes=3, train=6, val=2)
    outside = make_subset(tmp_path / "other", classes=1, train=4, val=1)
    before = _counts(root)
    a = sorted(p.name for p in (root / "train").iterdir())[0]
    other_cls = next((outside / "train").iterdir())
    os.symlink(other_cls, root / "train" / a / "more")                 # outside the class (and root)
    os.symlink(other_cls, root / "train" / "Zlinked")                  # a class folder outside the root
    img = next(other_cls.iterdir())
    os.symlink(img, root / "train" / a / "outside.png")                # a file outside the root
    os.symlink(f"../train/{a}", root / "val" / "Zcopy")                # val class = a train folder
    (root / "train" / a / "sub").mkdir()
    os.symlink("sub", root / "train" / a / "sub2")                     # the same folder twice
    rep = scan(root)
    assert rep.counts("train") == before[0] and rep.counts("val") == before[1]
    kinds = sorted((Path(p["path"]).name, p["kind"]) for p in rep.problems)
    assert kinds == [("Zcopy", "symlink-loop"), ("Zlinked", "symlink-outside-root"), ("more", "symlink-outside-class"),
                     ("outside.png", "symlink-outside-root"), ("sub2", "symlink-loop")]
