"""--qat-augment's image shifts and flips (passes.qat.augment): seeded, shape-keeping, each output image a shifted
(and possibly mirrored) window of its input with the edge pixels repeated into the gap."""
from __future__ import annotations

import numpy as np
import torch

from tledge.export.int8.passes.qat import augment, seeded


def _batch() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(16, 3, 24, 32, generator=g)


def test_augment_is_seeded_and_keeps_the_shape() -> None:
    x = _batch()
    a, b = augment(x, np.random.default_rng(5)), augment(x, np.random.default_rng(5))
    assert a.shape == x.shape and torch.equal(a, b)
    assert not torch.equal(a, augment(x, np.random.default_rng(6)))


def test_each_image_is_a_shifted_window_of_its_edge_padded_input() -> None:
    x = _batch()
    y = augment(x, np.random.default_rng(11))
    h, w = x.shape[2:]
    mh, mw = h // 8, w // 8
    padded = torch.nn.functional.pad(x, (mw, mw, mh, mh), mode="replicate")
    flipped = moved = 0
    for i in range(len(x)):
        found = None
        for dy in range(2 * mh + 1):
            for dx in range(2 * mw + 1):
                win = padded[i, :, dy:dy + h, dx:dx + w]
                for f in (False, True):
                    if torch.equal(y[i], win.flip(-1) if f else win):
                        found = (dy, dx, f)
        assert found is not None, f"image {i} is not a shifted window of its input"
        flipped += found[2]
        moved += (found[0], found[1]) != (mh, mw)
    assert 0 < flipped < len(x) and moved > 0  # both flips and shifts drawn (16 images, seed 11)


def test_a_plain_background_stays_plain() -> None:
    x = torch.full((4, 1, 16, 16), -0.5)
    x[:, :, 6:10, 6:10] = 1.0
    y = augment(x, np.random.default_rng(1))
    assert set(torch.unique(y).tolist()) == {-0.5, 1.0}  # no zeros or other values padded in
    assert torch.all((y == 1.0).sum(dim=(1, 2, 3)) == 16)  # the object whole, moved, never cut by the window


def test_qat_seed_0_keeps_the_earlier_draws_and_other_seeds_draw_anew() -> None:
    """--qat-seed: seed 0 is each generator's base seed alone (the draws of exports before the option), any other
    seed a reproducible stream of its own."""
    base = 8642
    assert np.array_equal(seeded(base, 0).permutation(100), np.random.default_rng(base).permutation(100))
    one = seeded(base, 1).permutation(100)
    assert np.array_equal(one, seeded(base, 1).permutation(100))
    assert not np.array_equal(one, seeded(base, 0).permutation(100))
    assert not np.array_equal(one, seeded(base, 2).permutation(100))
