"""Image loading and preprocessing: one definition used by tuning, calibration, benchmarking and the
deploy runtime.

This module needs only numpy and Pillow (no torch), so the deploy bundle ships it verbatim and a Jetson
computes exactly the input tensor that training used. It reproduces torchvision's
``ImageClassification`` transform on PIL images (resize of the shorter side with Pillow, centre crop
with torchvision's rounding, scale to [0, 1], normalise), which is what the pretrained weights expect.
"""
from __future__ import annotations

import io
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps

# Fixed background for images with transparency: white, the usual catalogue-photo background.
ALPHA_BACKGROUND = (255, 255, 255)

# Image.Resampling is Pillow >= 9.1; JetPack 5's Ubuntu 20.04 ships an older Pillow with the same constants
# on Image itself.
_R = getattr(Image, "Resampling", Image)
_INTERPOLATIONS = {
    "nearest": _R.NEAREST,
    "bilinear": _R.BILINEAR,
    "bicubic": _R.BICUBIC,
    "lanczos": _R.LANCZOS,
    "box": _R.BOX,
    "hamming": _R.HAMMING,
}

# Refuse truncated files rather than silently padding them with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageLoadError(Exception):
    """An image file cannot be decoded; ``kind`` is one of the scan's problem kinds."""

    def __init__(self, path: str, kind: str, message: str) -> None:
        super().__init__(f"{path}: {kind}: {message}")
        self.path, self.kind, self.message = path, kind, message


def load_image(path: str | os.PathLike) -> Image.Image:
    """Decode ``path`` into an 8-bit RGB image, converting the usable oddities.

    EXIF orientation is applied; grayscale, palette, CMYK and 16-bit images are converted; images
    with transparency are composited on ``ALPHA_BACKGROUND``. Raises ImageLoadError for files that
    cannot be used (zero bytes, truncated, not an image, unreadable).
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ImageLoadError(path, "unreadable", str(exc)) from exc
    return decode_image(data, path)[0]


def decode_image(data: bytes, path: str = "<bytes>") -> tuple[Image.Image, str | None]:
    """Decode encoded image bytes to RGB; also return the oddity that was converted (or None)."""
    if not data:
        raise ImageLoadError(path, "zero-byte", "the file is empty")
    try:
        with Image.open(io.BytesIO(data)) as im:
            kind = oddity(im)
            im.load()
            return to_rgb(im), kind
    except OSError as exc:
        msg = str(exc)
        low = msg.lower()
        if "cannot identify image file" in low:
            raise ImageLoadError(path, "not-an-image", msg) from exc
        if "truncated" in low or "broken data stream" in low or "unexpected end" in low:
            raise ImageLoadError(path, "truncated", msg) from exc
        raise ImageLoadError(path, "unreadable", msg) from exc
    except (ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        raise ImageLoadError(path, "unreadable", f"{type(exc).__name__}: {exc}") from exc


def oddity(im: Image.Image) -> str | None:
    """The usable oddity of a freshly opened image that ``to_rgb`` converts, if any."""
    try:
        orientation = im.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block is ignored, as Pillow itself does
        orientation = 1
    if orientation not in (1, None):
        return "exif-rotated"
    return {"L": "grayscale", "1": "grayscale", "P": "palette", "PA": "palette", "RGBA": "alpha",
            "LA": "alpha", "CMYK": "cmyk", "I;16": "16-bit", "I;16B": "16-bit", "I;16L": "16-bit",
            "I": "32-bit", "F": "float"}.get(im.mode)


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert a decoded image of any mode to 8-bit RGB (see load_image)."""
    im = ImageOps.exif_transpose(im)
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit integer grayscale: scale the full range to 8 bits rather than clipping at 255.
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        top = 1.0 if arr.max() <= 1.0 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if im.mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
    if im.mode in ("LA", "La", "PA"):
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "RGBa"):
        bg = Image.new("RGB", im.size, ALPHA_BACKGROUND)
        bg.paste(im, mask=im.getchannel("A"))
        return bg
    if im.mode != "RGB":
        im = im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV
    return im


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side, centre-crop, scale to [0,1], normalise; RGB, NCHW float32."""

    resize: int
    crop: int
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"
    channel_order: str = "RGB"
    layout: str = "NCHW"
    dtype: str = "float32"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation '{self.interpolation}' not one of {sorted(_INTERPOLATIONS)}")
        if self.crop > self.resize:
            raise ValueError(f"crop {self.crop} larger than resize {self.resize}")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (3, self.crop, self.crop)

    def scaled(self, crop: int) -> "Preprocess":
        """The same recipe at another input size, keeping the resize/crop ratio."""
        resize = int(round(crop * self.resize / self.crop))
        return Preprocess(resize, crop, self.mean, self.std, self.interpolation)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocess":
        return cls(resize=int(d["resize"]), crop=int(d["crop"]), mean=tuple(d["mean"]),
                   std=tuple(d["std"]), interpolation=d.get("interpolation", "bilinear"),
                   channel_order=d.get("channel_order", "RGB"), layout=d.get("layout", "NCHW"),
                   dtype=d.get("dtype", "float32"), extra=dict(d.get("extra", {})))

    def resize_crop(self, im: Image.Image) -> Image.Image:
        """Pillow resize of the shorter side to ``resize`` and centre crop to ``crop`` (torchvision's
        size and rounding rules)."""
        w, h = im.size
        short, long = (w, h) if w <= h else (h, w)
        if short != self.resize:
            new_short, new_long = self.resize, int(self.resize * long / short)
            size = (new_short, new_long) if w <= h else (new_long, new_short)
            im = im.resize(size, _INTERPOLATIONS[self.interpolation])
        w, h = im.size
        c = self.crop
        if w < c or h < c:  # torchvision pads; with crop <= resize this cannot happen
            raise ValueError(f"image {w}x{h} smaller than crop {c}")
        top = int(round((h - c) / 2.0))
        left = int(round((w - c) / 2.0))
        return im.crop((left, top, left + c, top + c))

    def to_array(self, im: Image.Image) -> np.ndarray:
        """An RGB PIL image -> normalised float32 array (3, crop, crop)."""
        arr = np.asarray(self.resize_crop(im), dtype=np.float32) / 255.0
        arr = (arr - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(arr.transpose(2, 0, 1))

    def __call__(self, path_or_image: str | os.PathLike | Image.Image) -> np.ndarray:
        im = path_or_image if isinstance(path_or_image, Image.Image) else load_image(path_or_image)
        return self.to_array(im)

    def batch(self, paths: list[str]) -> np.ndarray:
        return np.stack([self(p) for p in paths]) if paths else np.zeros((0, *self.input_shape), np.float32)
