"""Losses of Context Encoders (Pathak et al., CVPR 2016, section 3.2): Eq. (1) reconstruction,
Eq. (2) adversarial, Eq. (3) joint. One pure function per equation: tensors in, scalar tensor out.

    python -c "import ce_losses as L; print(L.overlap_weights(overlap=7)[0, 0, :9, 30])"
"""
import torch
import torch.nn.functional as F


def overlap_weights(size=64, overlap=7, ring_weight=10.0, reduction="all"):
    """The per-pixel weight map W (1, 1, size, size) of Eq. (1) for a size x size prediction: the
    outer `overlap`-px ring (where the prediction overlaps the context) weighs `ring_weight`, the
    inner square 1 (paper 3.2: "we weight the loss 10x in the overlapping region").
    reduction="all" (paper, official train.lua wtl2Matrix): mean(W * d^2) over every element, i.e.
    (ring_weight * sum_ring d^2 + sum_inner d^2) / size^2. reduction="split" (seed report):
    ring_weight * mean_ring(d^2) + mean_inner(d^2), by scaling each part of W by size^2 / (its own
    pixel count), so that the same mean(W * d^2) gives it."""
    if not 0 <= 2 * overlap < size:
        raise ValueError(f"overlap {overlap} must be in [0, {(size - 1) // 2}] for a {size}px "
                         "region")
    inner = torch.zeros(size, size, dtype=torch.bool)
    inner[overlap:size - overlap, overlap:size - overlap] = True
    w = torch.where(inner, 1.0, float(ring_weight))
    if reduction == "split" and overlap > 0:
        n_inner = int(inner.sum())
        n_ring = size * size - n_inner
        w = torch.where(inner, w * size * size / n_inner, w * size * size / n_ring)
    elif reduction not in ("all", "split"):
        raise ValueError(f"unknown reduction {reduction!r}")
    return w.view(1, 1, size, size)


def hole_weights(mask, overlap=7, overlap_weight=10.0):
    """W of the paper's masked Eq. (1), ||M (x - F((1 - M) x))||^2, for a hole M (B, 1, H, W) bool:
    0 on visible pixels, 1 on hidden ones, `overlap_weight` on the hidden pixels within `overlap` px
    of the visible context (chessboard distance; outside the image is not context). With mean() in
    reconstruction_loss this is the "all" normalisation of overlap_weights().
    DEVIATION: the paper states the overlap weighting for the centre region only; for random masks
    this puts the 10x on the hidden rim (the pixels that must agree with the context)."""
    hole = mask.float()
    if overlap > 0:
        k = 2 * overlap + 1       # a (k, k) max-pool as a row pass then a column pass: 2k, not k^2
        visible = F.max_pool2d(1 - hole, (1, k), stride=1, padding=(0, overlap))
        near = F.max_pool2d(visible, (k, 1), stride=1, padding=(overlap, 0)) > 0   # context is near
        return hole * torch.where(near, float(overlap_weight), 1.0)
    return hole


def context_weights(mask, context_weight=10.0):
    """W of the official whole-image loss for random masks (train_random.lua:412-437), mask
    (B, 1, H, W): an MSE over every pixel, `context_weight` on the visible pixels and 1 on the
    hidden ones when useOverlapPred=1 ("10x more L2 weight on unmasked region"); 1 is
    useOverlapPred=0."""
    return torch.where(mask, 1.0, float(context_weight))


def reconstruction_loss(pred, target, weight):
    """Eq. (1): L_rec = mean over (B, C, H, W) of W * (G(x) - y)^2, W from overlap_weights() (centre
    region, (1, 1, 64, 64)) or hole_weights() / context_weights() (whole image, (B, 1, 128, 128)).
    In float32 whatever the autocast dtype: it is a small difference of close numbers."""
    d = pred.float() - target.float()
    return (weight * d * d).mean()


def discriminator_loss(logits_real, logits_fake, reduction="sum"):
    """Eq. (2), the discriminator's side: BCE(D(y), 1) + BCE(D(G(x)), 0), hard labels.
    reduction="sum" adds the two terms (official train.lua); "mean" averages them (seed report).
    `logits_fake` must come from a detached G(x) so that this loss trains D only."""
    ones = torch.ones_like(logits_real, dtype=torch.float32)
    zeros = torch.zeros_like(logits_fake, dtype=torch.float32)
    real = F.binary_cross_entropy_with_logits(logits_real.float(), ones)
    fake = F.binary_cross_entropy_with_logits(logits_fake.float(), zeros)
    return (real + fake) if reduction == "sum" else 0.5 * (real + fake)


def generator_adversarial_loss(logits_fake):
    """Eq. (2), the generator's side, "generator-only BCE": BCE(D(G(x)), 1) (non-saturating)."""
    ones = torch.ones_like(logits_fake, dtype=torch.float32)
    return F.binary_cross_entropy_with_logits(logits_fake.float(), ones)


def joint_loss(l_rec, l_adv, lam_rec=0.999, lam_adv=0.001):
    """Eq. (3): L = lambda_rec * L_rec + lambda_adv * L_adv (paper: 0.999 and 0.001; seed report:
    ratios x1 to x1000)."""
    return lam_rec * l_rec + lam_adv * l_adv
