"""The deployment resize modes against references written here, independently of tledge's code: torchvision's
transforms for the geometry, integer arithmetic and numpy slicing for nvinfer's letterbox (its rules as in
DeepStream's gstnvinfer.cpp: even source size, truncated scaled size, black border, right/bottom or centred)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from torchvision.transforms import functional as TF

from tledge import cli
from tledge.preprocess import RESIZE_MODES, Preprocess


def _image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def _reference(im: Image.Image, mode: str, resize: int, crop: int) -> np.ndarray:
    """HWC uint8 pixels, computed without tledge."""
    if mode == "shorter-side+center-crop":
        out = TF.center_crop(TF.resize(im, resize, interpolation=TF.InterpolationMode.BILINEAR), crop)
        return np.asarray(out)
    w, h = im.size
    ew, eh = w // 2 * 2, h // 2 * 2                        # nvinfer: GST_ROUND_DOWN_2 of the source width/height
    src = TF.crop(im, 0, 0, eh, ew)
    if mode == "stretch":
        return np.asarray(TF.resize(src, [crop, crop], interpolation=TF.InterpolationMode.BILINEAR))
    # hdest = net_w * src_h / src_w; fits in height -> full width, else full height (truncated to whole pixels)
    if crop * eh <= crop * ew:
        dw, dh = crop, (crop * eh) // ew
    else:
        dw, dh = (crop * ew) // eh, crop
    scaled = np.asarray(TF.resize(src, [dh, dw], interpolation=TF.InterpolationMode.BILINEAR))
    canvas = np.zeros((crop, crop, 3), np.uint8)
    top, left = ((crop - dh) // 2, (crop - dw) // 2) if mode == "letterbox" else (0, 0)
    canvas[top:top + dh, left:left + dw] = scaled
    return canvas


SIZES = [(28, 28), (64, 64), (101, 51), (51, 101), (333, 250), (1920, 1080), (7, 200)]


@pytest.mark.parametrize("mode", RESIZE_MODES)
@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_each_resize_mode_matches_an_independent_reference(mode: str, size: tuple[int, int]) -> None:
    im = _image(*size, seed=size[0] * 7 + size[1])
    pre = Preprocess(resize=73, crop=64, resize_mode=mode)
    got = pre.pixels(im)
    assert got.dtype == np.uint8 and got.shape == (3, 64, 64)
    np.testing.assert_array_equal(got.transpose(1, 2, 0), _reference(im, mode, 73, 64))


def test_letterbox_follows_nvinfer_geometry() -> None:
    """A 1920x1080 frame into 224: 224x126 scaled, 49 rows of black above (symmetric) or 98 below (top-left)."""
    white = Image.new("RGB", (1920, 1080), (255, 255, 255))
    sym = Preprocess(256, 224, resize_mode="letterbox").pixels(white)[0]
    corner = Preprocess(256, 224, resize_mode="letterbox-topleft").pixels(white)[0]
    rows_sym = np.flatnonzero(sym.max(axis=1) > 0)
    rows_corner = np.flatnonzero(corner.max(axis=1) > 0)
    assert (rows_sym.min(), rows_sym.max()) == (49, 49 + 126 - 1)
    assert (rows_corner.min(), rows_corner.max()) == (0, 125)
    assert sym[:49].max() == 0 and corner[126:].max() == 0


def test_raw_input_keeps_pixels_and_normalized_is_torchvision() -> None:
    im = _image(90, 70)
    pre = Preprocess(73, 64)
    raw = pre.with_input("raw").to_array(im)
    raw8 = pre.with_input("raw", "uint8").to_array(im)
    assert raw.dtype == np.float32 and raw8.dtype == np.uint8
    np.testing.assert_array_equal(raw, raw8.astype(np.float32))
    ref = TF.normalize(TF.to_tensor(TF.center_crop(TF.resize(im, 73), 64)), pre.mean, pre.std).numpy()
    np.testing.assert_array_equal(pre.to_array(im), ref)
    np.testing.assert_array_equal(pre.normalize(raw8), ref)


def test_bad_recipes_are_refused() -> None:
    with pytest.raises(ValueError, match="resize mode"):
        Preprocess(73, 64, resize_mode="crop")
    with pytest.raises(ValueError, match="raw input is float32 or uint8"):
        Preprocess(73, 64, input="raw", dtype="float16")
    with pytest.raises(ValueError, match="normalized input is float32"):
        Preprocess(73, 64, dtype="uint8")


def test_cli_spells_the_same_modes() -> None:
    from tledge.export.config import CENTRE_MODES
    assert tuple(cli.RESIZE_MODES) == RESIZE_MODES
    assert tuple(cli.CENTRE_MODES) == CENTRE_MODES


def test_card_without_a_mode_reads_as_the_old_default() -> None:
    d = Preprocess(256, 224).to_dict()
    del d["resize_mode"], d["input"]
    p = Preprocess.from_dict(d)
    assert p.resize_mode == "shorter-side+center-crop" and p.input == "normalized"
    assert Preprocess.from_dict(Preprocess(256, 224, resize_mode="stretch").scaled(64).to_dict()).resize_mode == "stretch"
