"""Rebuild the embedded default dataset from Debian's ``dataset-fashion-mnist`` package.

The repository ships the result (``data/fashion-mnist`` and ``calibration/fashion-mnist``), so nobody
needs to run this; it documents exactly how those files were made.

    apt-get download dataset-fashion-mnist && dpkg -x dataset-fashion-mnist_*.deb /tmp/fm
    python scripts/make_default_dataset.py /tmp/fm/usr/share/datasets/fashion-mnist .

Layout written (PNG, 28x28 grayscale, the original pixels):
  data/fashion-mnist/train/<class>/    first 200 images of each class from the official train set
  data/fashion-mnist/val/<class>/      first 100 images of each class from the official test set
  calibration/fashion-mnist/<class>/   the next 26 images of each class from the train set (disjoint)
"""
from __future__ import annotations

import gzip
import struct
import sys
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ["T-shirt_top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot"]


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic, = struct.unpack(">I", data[:4])
    ndim = magic & 0xFF
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def write_split(images, labels, out: Path, start: int, count: int, prefix: str) -> None:
    for cls, name in enumerate(CLASSES):
        idx = np.flatnonzero(labels == cls)[start:start + count]
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in idx:
            Image.fromarray(images[i], mode="L").save(folder / f"{prefix}{i:05d}.png", optimize=True)


def main(src: str, dst: str) -> None:
    src_p, dst_p = Path(src), Path(dst)
    tr_x = read_idx(src_p / "train-images-idx3-ubyte.gz")
    tr_y = read_idx(src_p / "train-labels-idx1-ubyte.gz")
    te_x = read_idx(src_p / "t10k-images-idx3-ubyte.gz")
    te_y = read_idx(src_p / "t10k-labels-idx1-ubyte.gz")
    write_split(tr_x, tr_y, dst_p / "data/fashion-mnist/train", 0, 200, "train_")
    write_split(te_x, te_y, dst_p / "data/fashion-mnist/val", 0, 100, "test_")
    write_split(tr_x, tr_y, dst_p / "calibration/fashion-mnist", 200, 26, "train_")


if __name__ == "__main__":
    main(*sys.argv[1:3])
