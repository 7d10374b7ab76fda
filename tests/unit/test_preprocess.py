"""The numpy/Pillow preprocessing equals torchvision's transforms, and odd images are converted."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tledge import backbones
from tledge.preprocess import ImageLoadError, Preprocess, load_image
from tests.conftest import FASHION


def _tv_transform(p: Preprocess):
    from torchvision import transforms as T
    return T.Compose([T.Resize(p.resize, interpolation=T.InterpolationMode(p.interpolation)),
                      T.CenterCrop(p.crop), T.ToTensor(), T.Normalize(p.mean, p.std)])


@pytest.mark.parametrize("name", backbones.names())
def test_matches_torchvision_on_real_and_odd_sized_images(name: str, tmp_path: Path) -> None:
    pre = backbones.get(name).preprocess
    tv = _tv_transform(pre)
    rng = np.random.default_rng(0)
    images = [load_image(next((FASHION / "val" / "Bag").iterdir()))]
    for w, h in ((640, 480), (333, 517), (224, 224), (97, 301)):
        images.append(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
    for im in images:
        ours = pre(im)
        ref = tv(im).numpy()
        assert ours.shape == ref.shape == (3, pre.crop, pre.crop)
        np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_scaled_keeps_ratio_and_roundtrips() -> None:
    p = backbones.get("inception_v3").preprocess.scaled(112)
    assert (p.resize, p.crop) == (128, 112)
    assert Preprocess.from_dict(p.to_dict()) == p


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def test_conversions(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red -> background white
    (tmp_path / "a.png").write_bytes(_save(rgba, "PNG"))
    assert load_image(tmp_path / "a.png").getpixel((0, 0)) == (255, 255, 255)
    g16 = Image.fromarray(np.full((4, 4), 65535, np.uint16))
    (tmp_path / "b.png").write_bytes(_save(g16, "PNG"))
    assert load_image(tmp_path / "b.png").getpixel((0, 0)) == (255, 255, 255)
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))
    (tmp_path / "c.jpg").write_bytes(_save(cmyk, "JPEG"))
    r, g, b = load_image(tmp_path / "c.jpg").getpixel((0, 0))
    assert r > 200 and g < 60 and b < 60
    pal = Image.new("P", (4, 4), 3)
    pal.putpalette([0, 0, 0, 10, 20, 30, 40, 50, 60, 1, 2, 3] + [0] * 756)
    (tmp_path / "d.gif").write_bytes(_save(pal, "GIF"))
    assert load_image(tmp_path / "d.gif").getpixel((0, 0)) == (1, 2, 3)
    # EXIF orientation 6 (rotate 90 cw): a 4x2 image becomes 2x4
    exif = Image.Exif()
    exif[0x0112] = 6
    (tmp_path / "e.jpg").write_bytes(_save(Image.new("RGB", (4, 2)), "JPEG", exif=exif))
    assert load_image(tmp_path / "e.jpg").size == (2, 4)


@pytest.mark.parametrize("content,kind", [(b"", "zero-byte"), (b"hello, not an image", "not-an-image")])
def test_unusable(tmp_path: Path, content: bytes, kind: str) -> None:
    (tmp_path / "x.jpg").write_bytes(content)
    with pytest.raises(ImageLoadError) as e:
        load_image(tmp_path / "x.jpg")
    assert e.value.kind == kind


def test_truncated(tmp_path: Path) -> None:
    data = _save(Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)), "JPEG")
    (tmp_path / "t.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError) as e:
        load_image(tmp_path / "t.jpg")
    assert e.value.kind == "truncated"
