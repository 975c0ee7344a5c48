"""Losses of Context Encoders (Pathak et al., CVPR 2016, section 3.2): Eq. (1) reconstruction, Eq. (2)
adversarial, Eq. (3) joint. One pure function per equation: tensors in, scalar tensor out.

    python -c "import ce_losses as L; print(L.overlap_weights(overlap=7)[0, 0, :9, 30])"
"""
import torch
import torch.nn.functional as F


def overlap_weights(size=64, overlap=7, ring_weight=10.0, reduction="all"):
    """The per-pixel weight map W of Eq. (1) for a size x size prediction, shape (1, 1, size, size).

    The outer `overlap`-px ring (the part of the prediction that overlaps the context) weighs `ring_weight`,
    the inner square weighs 1 (paper 3.2: "we weight the loss 10x in the overlapping region").

    reduction="all" (paper, official train.lua wtl2Matrix): mean(W * d^2) over every element, i.e.
        (ring_weight * sum_ring d^2 + sum_inner d^2) / size^2.
    reduction="split" (seed report): ring_weight * mean_ring(d^2) + mean_inner(d^2); expressed here by scaling
        each part of W by size^2 / (its own pixel count), so the same mean(W * d^2) gives it.
    """
    if not 0 <= 2 * overlap < size:
        raise ValueError(f"overlap {overlap} must be in [0, {(size - 1) // 2}] for a {size}px region")
    inner = torch.zeros(size, size, dtype=torch.bool)
    inner[overlap:size - overlap, overlap:size - overlap] = True
    w = torch.where(inner, 1.0, float(ring_weight))
    if reduction == "split" and overlap > 0:
        n_inner = int(inner.sum())
        w = torch.where(inner, w * size * size / n_inner, w * size * size / (size * size - n_inner))
    elif reduction not in ("all", "split"):
        raise ValueError(f"unknown reduction {reduction!r}")
    return w.view(1, 1, size, size)


def reconstruction_loss(pred, target, weight):
    """Eq. (1): L_rec = mean over (B, C, H, W) of W * (G(x) - y)^2, W from overlap_weights().

    Computed in float32 whatever the autocast dtype, because it is a small difference of close numbers.
    """
    d = pred.float() - target.float()
    return (weight * d * d).mean()


def discriminator_loss(logits_real, logits_fake, reduction="sum"):
    """Eq. (2), the discriminator's side: BCE(D(y), 1) + BCE(D(G(x)), 0), hard labels.

    reduction="sum" adds the two terms (official train.lua); "mean" averages them (seed report: half the sum).
    `logits_fake` must come from a detached G(x) so that this loss trains D only.
    """
    real = F.binary_cross_entropy_with_logits(logits_real.float(), torch.ones_like(logits_real, dtype=torch.float32))
    fake = F.binary_cross_entropy_with_logits(logits_fake.float(), torch.zeros_like(logits_fake, dtype=torch.float32))
    return (real + fake) if reduction == "sum" else 0.5 * (real + fake)


def generator_adversarial_loss(logits_fake):
    """Eq. (2), the generator's side, "generator-only BCE": BCE(D(G(x)), 1) (non-saturating, DCGAN form)."""
    return F.binary_cross_entropy_with_logits(logits_fake.float(), torch.ones_like(logits_fake, dtype=torch.float32))


def joint_loss(l_rec, l_adv, lam_rec=0.999, lam_adv=0.001):
    """Eq. (3): L = lambda_rec * L_rec + lambda_adv * L_adv (paper: 0.999 and 0.001; seed ratios x1..x1000)."""
    return lam_rec * l_rec + lam_adv * l_adv
