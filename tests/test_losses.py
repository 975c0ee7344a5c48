"""Eq. (1)-(3) on tiny tensors, by hand; and the official code's L2 weighting, transcribed,
checked with allclose."""
import math

import pytest
import torch

import ce_losses as L


def test_overlap_weights_ring_is_ten_times():
    w = L.overlap_weights(size=8, overlap=2, ring_weight=10.0)[0, 0]
    assert w.shape == (8, 8)
    assert torch.all(w[2:6, 2:6] == 1) and float(w.sum()) == 16 * 1 + 48 * 10
    assert w[0, 0] == 10 and w[1, 4] == 10 and w[4, 7] == 10 and w[2, 2] == 1


def test_reconstruction_loss_by_hand():
    # 4x4 region, overlap 1: 12 ring pixels weighted 10, 4 inner pixels weighted 1.
    pred = torch.zeros(1, 1, 4, 4)
    target = torch.zeros(1, 1, 4, 4)
    target[0, 0, 0, 0] = 1.0    # ring pixel, error 1 -> 10 * 1
    target[0, 0, 1, 1] = 2.0    # inner pixel, error 2 -> 1 * 4
    w = L.overlap_weights(4, 1, 10.0)
    assert L.reconstruction_loss(pred, target, w).item() == pytest.approx((10 + 4) / 16)
    # seed form: 10 * mean over the 12 ring pixels + mean over the 4 inner ones
    ws = L.overlap_weights(4, 1, 10.0, reduction="split")
    assert L.reconstruction_loss(pred, target, ws).item() == pytest.approx(10 * 1 / 12 + 4 / 4)


def test_official_weighting_transcribed():
    """official train.lua builds wtl2Matrix: overlapL2Weight*wtl2 everywhere, then wtl2 on the inner
    square [1+overlapPred, fineSize/2-overlapPred] (1-based, inclusive); the MSE gradient is
    multiplied by it, and the adversarial gradient by (1 - wtl2). Our joint loss must give the same
    gradient w.r.t. G(x)."""
    fine, overlap_pred, wtl2, overlap_w = 128, 4, 0.999, 10
    torch.manual_seed(0)
    fake = torch.randn(2, 3, fine // 2, fine // 2, requires_grad=True)
    real = torch.randn(2, 3, fine // 2, fine // 2)
    # --- transcription (Lua 1-based inclusive ranges become 0-based half-open ones)
    wtl2_matrix = torch.full_like(real, wtl2 * overlap_w)
    lo, hi = 1 + overlap_pred, fine // 2 - overlap_pred
    wtl2_matrix[:, :, lo - 1:hi, lo - 1:hi] = wtl2
    # nn.MSECriterion (sizeAverage) backward
    grad_mse = 2 * (fake.detach() - real) / real.numel()
    official = grad_mse * wtl2_matrix
    # --- ours
    w = L.overlap_weights(64, overlap_pred, overlap_w)
    loss = L.joint_loss(L.reconstruction_loss(fake, real, w), torch.zeros(()), lam_rec=wtl2,
                        lam_adv=1 - wtl2)
    loss.backward()
    assert torch.allclose(fake.grad, official, rtol=1e-5, atol=1e-10)


def test_discriminator_loss_by_hand():
    # logit 0 -> p = 0.5 -> BCE = ln 2 for either label; logit ln 3 -> p = 0.75
    zero = torch.zeros(4)
    assert L.discriminator_loss(zero, zero).item() == pytest.approx(2 * math.log(2))
    assert L.discriminator_loss(zero, zero, "mean").item() == pytest.approx(math.log(2))
    real, fake = torch.full((3,), math.log(3)), torch.full((3,), math.log(3))
    # BCE(0.75, 1) = -ln 0.75 ; BCE(0.75, 0) = -ln 0.25
    want = -math.log(0.75) - math.log(0.25)
    assert L.discriminator_loss(real, fake).item() == pytest.approx(want, rel=1e-6)


def test_generator_only_bce_and_joint():
    fake = torch.full((5,), math.log(3))          # D(G(x)) = 0.75
    assert L.generator_adversarial_loss(fake).item() == pytest.approx(-math.log(0.75), rel=1e-6)
    rec, adv = torch.tensor(2.0), torch.tensor(3.0)
    assert L.joint_loss(rec, adv).item() == pytest.approx(0.999 * 2 + 0.001 * 3)
    assert L.joint_loss(rec, adv, 0.5, 0.25).item() == pytest.approx(1.75)


def test_losses_are_float32_under_bf16_inputs():
    x = torch.randn(2, 3, 64, 64).bfloat16()
    w = L.overlap_weights()
    assert L.reconstruction_loss(x, torch.zeros_like(x), w).dtype == torch.float32
    half = torch.zeros(2).bfloat16()
    assert L.discriminator_loss(half, half).dtype == torch.float32


def test_bad_overlap_rejected():
    with pytest.raises(ValueError):
        L.overlap_weights(64, 32)


def test_hole_weights_rim_is_a_square_neighbourhood():
    """The rim of hole_weights (hidden pixels within --overlap px of a visible one, chessboard
    distance), computed as a row pass and a column pass, equals one square max-pool."""
    import torch.nn.functional as F

    import ce_masks
    mask = ce_masks.random_masks("region", 8, (0, "rim"))
    hole = mask.float()
    square = F.max_pool2d(1 - hole, 15, stride=1, padding=7) > 0
    assert torch.equal(L.hole_weights(mask, 7, 10.0), hole * torch.where(square, 10.0, 1.0))
