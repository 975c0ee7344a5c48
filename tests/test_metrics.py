"""SSIM and sharpness beside PSNR (ce_eval.ssim, ce_eval.sharpness), checked against values worked
out from their definitions: Wang et al. 2004's SSIM transcribed as plain loops, its luminance term
alone on constant images, a Laplacian worked out by hand; blur, sharpening and noise move the
sharpness the right way; both reach the table, evaluate's results and the sweep's CSV. PSNR, L1 %
and L2 % by hand: tests/test_paper_pins.py."""
import csv
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ce_data
import ce_eval
import ce_sweep
from ce_utils import baselines

C1, C2 = 0.01 ** 2, 0.03 ** 2         # Wang et al. 2004: K1 = 0.01, K2 = 0.03, L = 1


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors gain nothing from threads (as in test_paper_pins.py). Restored after each."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def stored(u):
    """Intensities u in [0, 1] as the network's [-1, 1] values."""
    return 2 * u - 1


def texture(seed, n=2, size=32):
    """Random test images in [0.1, 0.9]: white noise over a smooth gradient, (n, 3, size, size)."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0.2, 0.6, size).view(1, 1, 1, size)
    return (ramp + 0.3 * torch.rand(n, 3, size, size, generator=g)).clamp(0.1, 0.9).double()


# ------------------------------------------------------------------------------------------------
# SSIM


def ssim_by_loops(x, y, mask):
    """Wang et al. 2004 at every pixel by plain loops: the 11x11 Gaussian window (sigma 1.5)
    restricted to the pixels inside the image and renormalised to sum 1, the weighted means,
    variances and covariance, Eq. 13; averaged over channels and the pixels where mask is 1.
    x, y: (C, H, W) numpy arrays on [0, 1]; mask (H, W)."""
    c, h, w = x.shape
    total, count = 0.0, 0
    for i in range(h):
        for j in range(w):
            if not mask[i, j]:
                continue
            for ch in range(c):
                sw = sx = sy = sxx = syy = sxy = 0.0
                for di in range(-5, 6):
                    for dj in range(-5, 6):
                        a, b = i + di, j + dj
                        if 0 <= a < h and 0 <= b < w:
                            wt = math.exp(-(di * di + dj * dj) / (2 * 1.5 ** 2))
                            p, q = x[ch, a, b], y[ch, a, b]
                            sw, sx, sy = sw + wt, sx + wt * p, sy + wt * q
                            sxx, syy, sxy = sxx + wt * p * p, syy + wt * q * q, sxy + wt * p * q
                mx, my = sx / sw, sy / sw
                vx, vy, cov = sxx / sw - mx * mx, syy / sw - my * my, sxy / sw - mx * my
                total += ((2 * mx * my + C1) * (2 * cov + C2)
                          / ((mx * mx + my * my + C1) * (vx + vy + C2)))
            count += c
    return total / count


def test_ssim_matches_a_plain_loop_transcription_of_the_definition():
    """Two 3x14x16 image pairs with per-image masks that reach the border (where the window is cut
    and renormalised) and the middle (where it is the standard 11x11 window)."""
    x = texture(0, n=2, size=16)[..., :14, :]
    y = (0.6 * x + 0.4 * texture(1, n=2, size=16)[..., :14, :]).flip(-1)
    mask = torch.zeros(2, 1, 14, 16, dtype=torch.bool)
    mask[0, 0, :5, :] = True                   # the top rows: windows cut at the border
    mask[1, 0, 5:9, 6:12] = True               # windows wholly inside the image
    got = ce_eval.ssim(stored(x), stored(y), mask)
    want = [ssim_by_loops(x[i].numpy(), y[i].numpy(), mask[i, 0].numpy()) for i in range(2)]
    assert got.tolist() == pytest.approx(want, abs=1e-5)


def test_ssim_of_identical_images_is_one():
    x = stored(texture(2))
    assert ce_eval.ssim(x, x.clone(), torch.ones(1, 1, 32, 32)).tolist() == pytest.approx([1, 1])


def test_ssim_of_constant_images_is_the_luminance_term_alone_up_to_the_border():
    """No variance: the contrast-structure term is C2 / C2 = 1, leaving (2 mu_x mu_y + C1) /
    (mu_x^2 + mu_y^2 + C1) at every pixel. Zero-padding would lower the means at the border and
    change it there; the renormalised window does not."""
    mu_x, mu_y = 0.3, 0.3 + 0.2
    x = torch.full((1, 3, 20, 20), mu_x)
    y = torch.full((1, 3, 20, 20), mu_y)
    want = (2 * mu_x * mu_y + C1) / (mu_x ** 2 + mu_y ** 2 + C1)
    assert ce_eval.ssim(stored(x), stored(y), torch.ones(1, 1, 20, 20)).item() == pytest.approx(
        want, rel=1e-5)


def test_ssim_drops_with_noise_and_negates_with_inverted_contrast():
    """More noise, lower SSIM; the photographic negative about the mean intensity 0.5 has the
    covariance negated (the means are still near 0.5), so SSIM below zero."""
    x = texture(3)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(4), dtype=x.dtype)
    m = torch.ones(1, 1, 32, 32)
    small, large = (ce_eval.ssim(stored(x), stored((x + s * noise).clamp(0, 1)), m)
                    for s in (0.02, 0.1))
    assert (1 > small).all() and (small > large + 0.1).all()
    assert (ce_eval.ssim(stored(x), stored(1 - x), m) < 0).all()


# ------------------------------------------------------------------------------------------------
# Sharpness: the Laplacian energy of the prediction over the true image's


def test_sharpness_of_an_impulse_by_hand():
    """A 5x5 image whose centre is h brighter than the flat rest, against the flat image. The pixels
    with 4 neighbours in the image are the inner 3x3: the Laplacian is -4h at the centre, h at its
    4 neighbours, 0 at the corners, so the energy is (16 + 4) h^2 / 9 per channel; the flat truth
    has none, so the ratio is (20 h^2 / 9 + eps) / eps."""
    h, flat = 0.25, torch.full((1, 3, 5, 5), 0.5)
    peak = flat.clone()
    peak[..., 2, 2] += h
    eps = ce_eval.SHARPNESS_EPS
    got = ce_eval.sharpness(stored(peak), stored(flat), torch.ones(1, 1, 5, 5))
    assert got.item() == pytest.approx((20 * h * h / 9 + eps) / eps, rel=1e-4)


def test_sharpness_is_one_for_the_image_itself_below_for_blur_above_for_detail():
    x = texture(5)
    m = torch.ones(1, 1, 32, 32)
    box = torch.full((3, 1, 3, 3), 1 / 9, dtype=x.dtype)
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), box, groups=3)
    sharpened = (2 * x - blurred).clamp(0, 1)                           # unsharp masking
    noisy = (x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(6),
                                    dtype=x.dtype)).clamp(0, 1)
    assert ce_eval.sharpness(stored(x), stored(x), m).tolist() == pytest.approx([1, 1])
    assert (ce_eval.sharpness(stored(blurred), stored(x), m) < 0.3).all()
    assert (ce_eval.sharpness(stored(sharpened), stored(x), m) > 1.5).all()
    assert (ce_eval.sharpness(stored(noisy), stored(x), m) > 1.1).all()


def test_sharpness_sees_only_the_fills_own_detail_not_its_seam():
    """A flat fill scores the same whether or not it matches the context around the hole (the
    seam), and a hole too thin to have a pixel with 4 hidden neighbours scores 1."""
    x = texture(7, n=1)
    hole = torch.zeros(1, 1, 32, 32, dtype=torch.bool)
    hole[..., 8:24, 8:24] = True
    near, far = torch.where(hole, 0.5, x), torch.where(hole, 0.5, 1 - x)   # same flat fill
    a, b = (ce_eval.sharpness(stored(p), stored(x), hole) for p in (near, far))
    assert a.item() == b.item() < 0.01
    line = torch.zeros_like(hole)
    line[..., 16, :] = True
    assert ce_eval.sharpness(stored(near), stored(x), line).item() == 1.0


def test_psnr_prefers_the_blur_and_sharpness_the_wrong_detail():
    """Against a textured truth, its blurred copy beats an unrelated texture of the same kind in
    PSNR, and loses to it in sharpness (about 1: as much detail as the truth, all of it wrong)."""
    truth, other = texture(8, n=1), texture(9, n=1)
    box = torch.full((3, 1, 5, 5), 1 / 25, dtype=truth.dtype)
    blurred = F.conv2d(F.pad(truth, (2, 2, 2, 2), mode="replicate"), box, groups=3)
    m = torch.ones(1, 1, 32, 32)
    psnr = [ce_eval.image_metrics(stored(p), stored(truth), m)["psnr"].item()
            for p in (blurred, other)]
    sharp = [ce_eval.sharpness(stored(p), stored(truth), m).item() for p in (blurred, other)]
    assert psnr[0] > psnr[1] + 2
    assert sharp[0] < 0.2 and sharp[1] == pytest.approx(1, abs=0.2)


# ------------------------------------------------------------------------------------------------
# Where they appear: evaluate's results (the JSON and the training log), the table, the sweep's CSV


def test_evaluate_reports_ssim_and_sharpness_of_the_hole_for_every_method(capsys):
    """The centre hole of the paper variant: the constant fills have no detail of their own, nor
    has the harmonic fill (its discrete Laplacian is zero in the hole by construction). SSIM is
    that of the final picture: the pasted hole with the real ring around it."""
    images = np.random.default_rng(0).integers(0, 256, (4, 128, 128, 3), dtype=np.uint8)
    res = ce_eval.evaluate(None, images, methods=baselines.BASELINES, batch_size=2)
    x = ce_data.eval_batch(images)
    t = ce_eval.eval_task(x, ce_eval.mask_spec())
    final = t.compose(t.baseline("harmonic"))
    want = ce_eval.ssim(final, t.target, t.hole).double().mean().item()
    assert res["harmonic"]["ssim"] == pytest.approx(want, rel=1e-6)
    for m in baselines.BASELINES:
        assert -1 <= res[m]["ssim"] <= 1 and res[m]["sharpness"] < 0.01
    ce_eval.print_table(res, "title")
    header = capsys.readouterr().out.splitlines()[1]
    assert "SSIM" in header and "sharp" in header


def test_sweep_csv_has_the_new_columns(tmp_path, capsys):
    row = {"ratio": "x1", "lam_rec": 0.5, "lam_adv": 0.5, "data": "shapes", "steps": 2,
           "psnr": 15.0, "l1": 12.0, "l2": 3.0, "ssim": 0.5, "sharpness": 0.25,
           "psnr_region": 18.0, "n_images": 4, "wall_s": 1.0}
    ce_sweep.write_table([row], str(tmp_path))
    with open(tmp_path / "sweep.csv") as f:
        got = next(csv.DictReader(f))
    assert (float(got["ssim"]), float(got["sharpness"])) == (0.5, 0.25)
    assert "SSIM" in capsys.readouterr().out
