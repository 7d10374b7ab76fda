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
from dataclasses import asdict, dataclass, field, replace
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


# How an image is fitted to the network's square input (the deployment resize modes). The names are the
# contract stored in the model card; DeepStream's nvinfer settings for each are in tledge/deploy/deepstream.py.
#   shorter-side+center-crop  resize the shorter side to ``resize``, centre-crop ``crop`` (torchvision; default)
#   stretch                   resize the whole image to crop x crop, ignoring its aspect ratio
#                             (nvinfer maintain-aspect-ratio=0)
#   letterbox                 fit the whole image inside crop x crop keeping its aspect ratio, centred, the
#                             border black (nvinfer maintain-aspect-ratio=1 symmetric-padding=1)
#   letterbox-topleft         the same, the image at the top-left corner and the border right and bottom
#                             (nvinfer maintain-aspect-ratio=1 symmetric-padding=0, nvinfer's default)
# The stretch and letterbox modes follow nvinfer's rules (gstnvinfer.cpp, get_converted_buffer): the source
# is first cut to an even width and height, the scaled size is truncated to whole pixels, the border is 0.
RESIZE_MODES = ("shorter-side+center-crop", "stretch", "letterbox", "letterbox-topleft")
DEFAULT_RESIZE_MODE = RESIZE_MODES[0]
# What the graph's input tensor holds: "normalized" ((x/255 - mean)/std, float32, what the PyTorch model
# takes) or "raw" (the 0-255 RGB pixels, float32 or uint8; the graph normalises them itself, `--input raw`).
INPUT_KINDS = ("normalized", "raw")
INPUT_DTYPES = {"normalized": ("float32",), "raw": ("float32", "uint8")}


def letterbox_geometry(src_w: int, src_h: int, net: int) -> tuple[int, int]:
    """(width, height) of the scaled image inside a net x net letterbox, as nvinfer computes it."""
    src_w, src_h = src_w - src_w % 2, src_h - src_h % 2
    hdest = net * src_h / float(src_w)
    wdest = net * src_w / float(src_h)
    return (net, int(hdest)) if hdest <= net else (int(wdest), net)


@dataclass(frozen=True)
class Preprocess:
    """Fit the image to crop x crop (``resize_mode``), then scale to [0,1] and normalise (or, with
    ``input="raw"``, keep the 0-255 pixels for a graph that normalises itself); RGB, NCHW."""

    resize: int
    crop: int
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"
    channel_order: str = "RGB"
    layout: str = "NCHW"
    dtype: str = "float32"
    extra: dict[str, Any] = field(default_factory=dict)
    resize_mode: str = DEFAULT_RESIZE_MODE
    input: str = "normalized"

    def __post_init__(self) -> None:
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation '{self.interpolation}' not one of {sorted(_INTERPOLATIONS)}")
        if self.crop > self.resize:
            raise ValueError(f"crop {self.crop} larger than resize {self.resize}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize mode '{self.resize_mode}' not one of {', '.join(RESIZE_MODES)}")
        if self.input not in INPUT_KINDS:
            raise ValueError(f"input '{self.input}' not one of {', '.join(INPUT_KINDS)}")
        if self.dtype not in INPUT_DTYPES[self.input]:
            raise ValueError(f"a {self.input} input is {' or '.join(INPUT_DTYPES[self.input])}, not {self.dtype}")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (3, self.crop, self.crop)

    def scaled(self, crop: int) -> "Preprocess":
        """The same recipe at another input size, keeping the resize/crop ratio."""
        resize = int(round(crop * self.resize / self.crop))
        return replace(self, resize=resize, crop=crop)

    def with_resize_mode(self, mode: str) -> "Preprocess":
        return replace(self, resize_mode=mode)

    def with_input(self, kind: str, dtype: str = "float32") -> "Preprocess":
        """The recipe for a graph that takes ``kind`` input (see INPUT_KINDS)."""
        return replace(self, input=kind, dtype=dtype if kind == "raw" else "float32")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocess":
        return cls(resize=int(d["resize"]), crop=int(d["crop"]), mean=tuple(d["mean"]),
                   std=tuple(d["std"]), interpolation=d.get("interpolation", "bilinear"),
                   channel_order=d.get("channel_order", "RGB"), layout=d.get("layout", "NCHW"),
                   dtype=d.get("dtype", "float32"), extra=dict(d.get("extra", {})),
                   resize_mode=d.get("resize_mode", DEFAULT_RESIZE_MODE), input=d.get("input", "normalized"))

    def resize_crop(self, im: Image.Image) -> Image.Image:
        """The image fitted to crop x crop by ``resize_mode`` (an RGB PIL image)."""
        c = self.crop
        interp = _INTERPOLATIONS[self.interpolation]
        if self.resize_mode == "shorter-side+center-crop":
            return self._shorter_side_center_crop(im)
        w, h = im.size
        if w < 2 or h < 2:
            raise ValueError(f"image {w}x{h} too small for {self.resize_mode} (nvinfer needs at least 2x2)")
        even = im if (w % 2 == 0 and h % 2 == 0) else im.crop((0, 0, w - w % 2, h - h % 2))
        if self.resize_mode == "stretch":
            return even if even.size == (c, c) else even.resize((c, c), interp)
        dw, dh = letterbox_geometry(w, h, c)
        scaled = even if even.size == (dw, dh) else even.resize((dw, dh), interp)
        canvas = Image.new("RGB", (c, c), (0, 0, 0))
        left, top = ((c - dw) // 2, (c - dh) // 2) if self.resize_mode == "letterbox" else (0, 0)
        canvas.paste(scaled, (left, top))
        return canvas

    def _shorter_side_center_crop(self, im: Image.Image) -> Image.Image:
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

    def pixels(self, im: Image.Image) -> np.ndarray:
        """An RGB PIL image -> its fitted 0-255 pixels, uint8 (3, crop, crop)."""
        return np.ascontiguousarray(np.asarray(self.resize_crop(im), dtype=np.uint8).transpose(2, 0, 1))

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 pixels (..., 3, H, W) -> (x/255 - mean)/std, float32: the same float32 operations, in the
        same order, as torchvision's ToTensor + Normalize."""
        arr = np.asarray(pixels, dtype=np.float32) / 255.0
        return (arr - np.asarray(self.mean, np.float32)[:, None, None]) / np.asarray(self.std, np.float32)[:, None, None]

    def finish(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 pixels -> this recipe's input tensor (normalised, or raw in ``dtype``)."""
        if self.input == "raw":
            return np.ascontiguousarray(pixels.astype(self.dtype, copy=False))
        return np.ascontiguousarray(self.normalize(pixels))

    def to_array(self, im: Image.Image) -> np.ndarray:
        """An RGB PIL image -> the graph's input array (3, crop, crop)."""
        return self.finish(self.pixels(im))

    def __call__(self, path_or_image: str | os.PathLike | Image.Image) -> np.ndarray:
        im = path_or_image if isinstance(path_or_image, Image.Image) else load_image(path_or_image)
        return self.to_array(im)

    def batch(self, paths: list[str]) -> np.ndarray:
        return np.stack([self(p) for p in paths]) if paths else np.zeros((0, *self.input_shape), self.dtype)
