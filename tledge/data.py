"""ImageFolder scanning and validation, stratified splits, and the dataset that feeds training.

The scan decodes every image once before any work starts, so a bad file is reported up front and never
crashes a run half-way; it also records each file's content hash, which keys the feature cache.
"""
from __future__ import annotations

import hashlib
import os
import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from tledge.console import progress, warn
from tledge.errors import DataError
from tledge.preprocess import ImageLoadError, decode_image

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
              ".pbm", ".jfif"}
UNUSABLE = ("zero-byte", "truncated", "not-an-image", "unreadable")


@dataclass(frozen=True)
class Sample:
    path: str
    label: int
    sha256: str


@dataclass
class ScanReport:
    """What the scan found; ``summary()`` goes into the model card."""

    root: str
    layout: str                       # "train/val" or "split"
    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    problems: list[dict[str, str]] = field(default_factory=list)   # unusable files (excluded)
    ignored: list[dict[str, str]] = field(default_factory=list)    # hidden, non-image, empty folders
    converted: dict[str, int] = field(default_factory=dict)        # usable oddities and their counts
    val_fraction: float | None = None
    seed: int | None = None

    def counts(self, split: str) -> dict[str, int]:
        c = Counter(s.label for s in getattr(self, split))
        return {name: c.get(i, 0) for i, name in enumerate(self.classes)}

    def summary(self) -> dict[str, Any]:
        return {
            "root": self.root, "layout": self.layout, "classes": self.classes,
            "train_counts": self.counts("train"), "val_counts": self.counts("val"),
            "problems": self.problems, "ignored": self.ignored, "converted": self.converted,
            "val_fraction": self.val_fraction, "seed": self.seed,
        }

    def identity(self) -> str:
        """Hash of the file list and contents, labels and splits."""
        h = hashlib.sha256()
        for split in ("train", "val"):
            for s in getattr(self, split):
                h.update(f"{split}\0{s.label}\0{s.sha256}\n".encode())
        h.update("\0".join(self.classes).encode())
        return h.hexdigest()


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name == "Thumbs.db" or name == "desktop.ini"


def _probe(path: str) -> tuple[str, str | None, str | None, tuple[str, str] | None]:
    """(path, sha256, converted oddity, (problem kind, message) or None) for one file."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return path, None, None, ("unreadable", str(exc))
    try:
        _, kind = decode_image(data, path)
    except ImageLoadError as err:
        return path, None, None, (err.kind, err.message)
    return path, hashlib.sha256(data).hexdigest(), kind, None


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


class _Walker:
    """Lists class folders without being fooled by links: every real folder is listed once ((device,
    inode) of each visited folder), a link to a folder is followed only when it stays inside its class
    folder, and a link to a file only when it stays inside the dataset root. Anything else is a problem
    (``symlink-loop``, ``symlink-outside-class``, ``symlink-outside-root``), reported and not followed: a
    loop (``Bag/self -> .``) would list the same images many times, in train and val alike, and a link
    to another class (``Coat/up -> ..``) would relabel that class's images."""

    def __init__(self, root: Path, ignored: list[dict[str, str]], problems: list[dict[str, str]]) -> None:
        self.root_real = os.path.realpath(root)
        self.ignored, self.problems = ignored, problems
        self.visited: set[tuple[int, int]] = set()

    def _problem(self, path: str, kind: str, message: str) -> None:
        self.problems.append({"path": path, "kind": kind, "message": message})

    def _first_visit(self, path: str) -> bool:
        st = os.stat(path)
        key = (st.st_dev, st.st_ino)
        if key in self.visited:
            return False
        self.visited.add(key)
        return True

    def class_dir(self, folder: Path) -> list[str]:
        real = os.path.realpath(folder)
        if folder.is_symlink() and not _inside(real, self.root_real):
            self._problem(str(folder), "symlink-outside-root", f"links to {real}, outside the dataset root "
                          f"{self.root_real}; not followed (copy the images into the dataset instead)")
            return []
        files: list[str] = []
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
            if not self._first_visit(dirpath):
                self._problem(dirpath, "symlink-loop", f"is {os.path.realpath(dirpath)}, a folder already "
                              "scanned (through a link); its images are not listed twice")
                dirnames[:] = []
                continue
            keep = []
            for d in sorted(dirnames):
                if _is_hidden(d):
                    continue
                p = os.path.join(dirpath, d)
                if os.path.islink(p):
                    target = os.path.realpath(p)
                    if not _inside(target, real):
                        self._problem(p, "symlink-outside-class", f"links to {target}, outside its class folder "
                                      f"{folder}: its images would get this class's label; not followed")
                        continue
                    if _inside(real, target) or _inside(dirpath, target) or _inside(os.path.realpath(dirpath), target):
                        self._problem(p, "symlink-loop", f"links to {target}, which contains the link itself; "
                                      "not followed")
                        continue
                keep.append(d)
            dirnames[:] = keep
            for name in sorted(filenames):
                p = os.path.join(dirpath, name)
                if _is_hidden(name):
                    self.ignored.append({"path": p, "kind": "hidden"})
                elif Path(name).suffix.lower() not in IMAGE_EXTS:
                    self.ignored.append({"path": p, "kind": "non-image-extension"})
                elif os.path.islink(p) and not _inside(os.path.realpath(p), self.root_real):
                    self._problem(p, "symlink-outside-root", f"links to {os.path.realpath(p)}, outside the dataset "
                                  f"root {self.root_real}; not followed")
                else:
                    files.append(p)
        return files

    def split_dir(self, root: Path) -> dict[str, list[str]]:
        """{class name: files} of one split folder (``root/train``, ``root/val`` or the root itself)."""
        out: dict[str, list[str]] = {}
        entries = sorted(root.iterdir())
        # Real class folders first, so that a link to one of them is the one reported as the duplicate.
        for entry in sorted(entries, key=lambda e: (e.is_symlink(), e.name)):
            if _is_hidden(entry.name):
                self.ignored.append({"path": str(entry), "kind": "hidden"})
            elif entry.is_dir():
                files = self.class_dir(entry)
                if files:
                    out[entry.name] = files
                elif not any(p["path"] == str(entry) for p in self.problems):
                    self.ignored.append({"path": str(entry), "kind": "empty-class-folder"})
            else:
                self.ignored.append({"path": str(entry), "kind": "file-outside-class-folder"})
        return dict(sorted(out.items()))


def scan(root: str | os.PathLike, val_fraction: float = 0.2, seed: int = 0, workers: int | None = None,
         dist: Any = None) -> ScanReport:
    """Scan an ImageFolder (``root/train/<class>``, ``root/val/<class>``, or ``root/<class>`` split by a
    seeded stratified ``val_fraction``), decode every image, and stop on fatal problems."""
    root_p = Path(root)
    if not root_p.is_dir():
        raise DataError(f"dataset folder {root_p} does not exist or is not a folder.",
                        "pass a folder laid out as DIR/train/<class>/* and DIR/val/<class>/*, or DIR/<class>/*.")
    ignored: list[dict[str, str]] = []
    problems: list[dict[str, str]] = []
    walker = _Walker(root_p, ignored, problems)
    has_split = (root_p / "train").is_dir() and (root_p / "val").is_dir()
    if has_split:
        train_dirs = walker.split_dir(root_p / "train")
        val_dirs = walker.split_dir(root_p / "val")
        for other in sorted(root_p.iterdir()):
            if other.name not in ("train", "val"):
                ignored.append({"path": str(other), "kind": "outside-train-val"})
    else:
        train_dirs, val_dirs = walker.split_dir(root_p), {}
    classes = sorted(train_dirs)
    if len(classes) < 2:
        where = root_p / "train" if has_split else root_p
        raise DataError(f"{where} has {len(classes)} class folder(s) with images ({', '.join(classes) or 'none'}); "
                        "a classifier needs at least 2.",
                        f"put each class's images in its own sub-folder of {where}.")
    missing = sorted(set(val_dirs) - set(train_dirs))
    if missing:
        raise DataError(f"validation classes {missing} in {root_p / 'val'} have no training images in "
                        f"{root_p / 'train'}.", "add training images for them or remove them from val/.")

    all_files = [(p, "train", name) for name in classes for p in train_dirs[name]]
    all_files += [(p, "val", name) for name in sorted(val_dirs) for p in val_dirs[name]]
    converted: Counter[str] = Counter()
    ok: dict[str, str] = {}
    paths = [f[0] for f in all_files]
    mine = dist.shard(paths) if dist is not None else paths  # with torchrun, each rank decodes its share
    probed = []
    with progress() as prog, ThreadPoolExecutor(max_workers=workers or min(8, (os.cpu_count() or 2) * 2)) as ex:
        task = prog.add_task("scan", total=len(mine), info="")
        for res in ex.map(_probe, mine, chunksize=16):
            prog.advance(task)
            probed.append(res)
    if dist is not None:
        probed = dist.unshard(dist.all_gather(probed))
    for path, digest, kind, problem in probed:
        if problem:
            problems.append({"path": path, "kind": problem[0], "message": problem[1]})
        else:
            ok[path] = digest  # type: ignore[assignment]
            if kind:
                converted[kind] += 1
    index = {c: i for i, c in enumerate(classes)}
    train = [Sample(p, index[c], ok[p]) for p, split, c in all_files if split == "train" and p in ok]
    val = [Sample(p, index[c], ok[p]) for p, split, c in all_files if split == "val" and p in ok]
    report = ScanReport(os.path.abspath(root_p), "train/val" if has_split else "split", classes, train, val,
                        problems, ignored, dict(converted))
    if not has_split:
        report.train, report.val = stratified_split(train, val_fraction, seed)
        report.val_fraction, report.seed = val_fraction, seed
    empty = [c for c, n in report.counts("train").items() if n == 0]
    if empty:
        raise DataError(f"classes {empty} have no usable training images (see the problems listed above).",
                        "replace the broken files or remove those class folders.")
    if not report.val:
        raise DataError(f"{root_p} gives an empty validation split.",
                        "add images to val/ or raise --val-fraction.")
    for c, n in report.counts("val").items():
        if n == 0:
            warn(f"class '{c}' has no validation images; its accuracy cannot be measured.")
    return report


INDEX_FILE = "dataset_index.json"


def write_index(report: ScanReport, run_dir: str | os.PathLike) -> Path:
    """RUN/dataset_index.json: every image of the run (path relative to the dataset root, split, label,
    SHA-256), so a later step can say exactly what changed in the dataset."""
    from tledge.fsutil import write_json
    rows = [[os.path.relpath(s.path, report.root), split, report.classes[s.label], s.sha256]
            for split in ("train", "val") for s in getattr(report, split)]
    return write_json(Path(run_dir) / INDEX_FILE, {"root": report.root, "images": rows})


def scan_for_run(run_dir: str | os.PathLike, card: dict[str, Any]) -> ScanReport:
    """The run's dataset, scanned again and checked against what tune saw (the card's dataset hash):
    export and bench measure the very images the run was tuned and validated on, or stop and say what
    changed. The root is the absolute path the card records (old cards: relative to the working folder)."""
    ds = card["dataset"]
    root = ds["root"]
    if not Path(root).is_dir():
        raise DataError(f"the run's dataset {root} does not exist (any more).",
                        f"restore it at {root}, or tune again on the dataset you have.")
    rep = scan(root, ds.get("val_fraction") or 0.2, ds.get("seed") or 0)
    want = card.get("dataset_sha256")
    if want is None or rep.identity() == want:
        return rep
    changes = _changes(rep, Path(run_dir) / INDEX_FILE)
    raise DataError(f"the dataset at {root} changed since {run_dir} was tuned ({changes}): the figures would "
                    "be measured on other images than the run was tuned and validated on.",
                    "restore the dataset, or tune again on it with --overwrite.")


def _changes(rep: ScanReport, index_path: Path, limit: int = 5) -> str:
    if not index_path.is_file():
        return f"classes now {rep.classes}; no {INDEX_FILE} in the run to say more"
    from tledge.fsutil import read_json
    try:
        old = {r[0]: tuple(r[1:]) for r in read_json(index_path)["images"]}
    except (ValueError, KeyError, TypeError, IndexError):
        return f"{index_path} is unreadable"
    new = {os.path.relpath(s.path, rep.root): (split, rep.classes[s.label], s.sha256)
           for split in ("train", "val") for s in getattr(rep, split)}
    parts = []
    for title, names in (("added", sorted(set(new) - set(old))), ("removed", sorted(set(old) - set(new))),
                         ("changed", sorted(k for k in set(new) & set(old) if new[k] != old[k]))):
        if names:
            more = f" and {len(names) - limit} more" if len(names) > limit else ""
            parts.append(f"{len(names)} {title}: {', '.join(names[:limit])}{more}")
    return "; ".join(parts) or "the class list or split changed"


def stratified_split(samples: Iterable[Sample], val_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Per class, a seeded shuffle then ``round(n * val_fraction)`` images to val (at least one when the
    class has two or more)."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"--val-fraction {val_fraction} is outside (0, 1).", "pass e.g. --val-fraction 0.2.")
    by_class: dict[int, list[Sample]] = {}
    for s in samples:
        by_class.setdefault(s.label, []).append(s)
    train: list[Sample] = []
    val: list[Sample] = []
    for label in sorted(by_class):
        items = sorted(by_class[label], key=lambda s: s.path)
        random.Random(f"{seed}:{label}").shuffle(items)
        k = int(round(len(items) * val_fraction))
        k = max(1, k) if len(items) >= 2 else 0
        val += items[:k]
        train += items[k:]
    return train, val


def format_report(report: ScanReport, limit: int = 20) -> str:
    """Human-readable scan summary: per-class counts and every problem (up to ``limit`` lines each)."""
    lines = [f"dataset {report.root} ({report.layout}): {len(report.classes)} classes, "
             f"{len(report.train)} train / {len(report.val)} val images"]
    tc, vc = report.counts("train"), report.counts("val")
    width = max(len(c) for c in report.classes)
    for c in report.classes:
        lines.append(f"  {c:<{width}}  train {tc[c]:>6}  val {vc[c]:>6}")
    if report.converted:
        lines.append("  converted: " + ", ".join(f"{k} {v}" for k, v in sorted(report.converted.items())))
    for title, items in (("unusable files (skipped)", report.problems), ("ignored", report.ignored)):
        if items:
            lines.append(f"  {title}: {len(items)}")
            for it in items[:limit]:
                lines.append(f"    {it['kind']:<26} {it['path']}" + (f"  ({it['message']})" if it.get("message") else ""))
            if len(items) > limit:
                lines.append(f"    ... and {len(items) - limit} more (all listed in the model card)")
    return "\n".join(lines)
