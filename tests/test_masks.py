"""Mask geometry of every variant (paper 3.3 central region; official code; seed report)."""
import pytest
import torch

import ce_data

VARIANTS = {  # name: (overlap, ring, fill, expected filled square [a, b))
    "paper": (7, "visible", "mean", (39, 89)),
    "official": (4, "visible", "mean", (36, 92)),
    "seed": (7, "hidden", "zero", (32, 96)),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_mask_fills_exactly_the_hole(name):
    overlap, ring, fill, (a, b) = VARIANTS[name]
    x = torch.rand(2, 3, 128, 128) * 2 - 1
    masked, target = ce_data.mask_batch(x, overlap, ring, fill)
    assert masked.shape == x.shape and target.shape == (2, 3, 64, 64)
    assert torch.equal(target, x[:, :, 32:96, 32:96])          # the true centre, untouched
    inside = torch.zeros(128, 128, dtype=torch.bool)
    inside[a:b, a:b] = True
    assert torch.equal(masked[:, :, ~inside], x[:, :, ~inside])  # context (and a visible ring) kept
    expect = ce_data.MEAN_FILL if fill == "mean" else (0.0, 0.0, 0.0)
    for c in range(3):
        assert torch.all(masked[:, c, a:b, a:b] == torch.tensor(expect[c]))
    assert ce_data.hole_bounds(128, overlap, ring) == (a, b)


def test_official_fill_constants():
    # official train.lua: 2*117/255-1, 2*104/255-1, 2*123/255-1
    assert ce_data.MEAN_FILL == pytest.approx((-0.0823529, -0.1843137, -0.0352941), abs=1e-6)


@pytest.mark.parametrize("name", VARIANTS)
def test_hole_mask_and_paste_only_touch_hidden_pixels(name):
    overlap, ring, fill, (a, b) = VARIANTS[name]
    m = ce_data.hole_mask(overlap, ring)
    assert m.shape == (1, 1, 64, 64) and int(m.sum()) == (b - a) ** 2
    x = torch.zeros(1, 3, 128, 128)
    out = ce_data.paste(x, torch.ones(1, 3, 64, 64), overlap, ring)
    assert int(out.sum()) == 3 * (b - a) ** 2 and torch.all(out[:, :, a:b, a:b] == 1)


def test_mask_keeps_channels_last():
    x = torch.rand(2, 3, 128, 128).contiguous(memory_format=torch.channels_last)
    masked, _ = ce_data.mask_batch(x)
    assert masked.is_contiguous(memory_format=torch.channels_last)
