"""Classical fills a Context Encoder is measured against (paper 5.1 compares hand-designed fills):
fill (the masked input as it is), context mean (each image's mean visible colour) and harmonic
(Laplace's equation in the hole, the visible pixels as boundary values: the central square by the
discrete sine transform, any other hole by conjugate gradients). No learning; ce_eval.py scores
them with the same metrics and masks as the model.

    python ce_eval.py --ckpt runs/shapes/best.pt    # the model and these baselines, one table
"""
import math

import torch

import ce_data

BASELINES = ("fill", "context_mean", "harmonic")


def _dst_basis(h, device):
    """Orthonormal DST-I matrix S (S @ S = I) and the eigenvalues of the 1-D Dirichlet Laplacian
    tridiag(-1, 2, -1)."""
    k = torch.arange(1, h + 1, dtype=torch.float64, device=device)
    S = math.sqrt(2.0 / (h + 1)) * torch.sin(math.pi * k[:, None] * k[None, :] / (h + 1))
    lam = 2 - 2 * torch.cos(math.pi * k / (h + 1))
    return S, lam


def harmonic_fill(images, a, b):
    """Classical diffusion inpainting: the solution of Laplace's equation in the square [a, b)^2
    whose boundary values are the surrounding context pixels. images (B, C, S, S) -> the filled
    (B, C, h, h) square. Solved exactly in one step with the discrete sine transform (the 5-point
    Laplacian of a square is diagonal in that basis); torchvision has no Laplace solver."""
    x = images.double()
    h = b - a
    rhs = torch.zeros(x.shape[0], x.shape[1], h, h, dtype=torch.float64, device=x.device)
    rhs[..., 0, :] += x[..., a - 1, a:b]
    rhs[..., -1, :] += x[..., b, a:b]
    rhs[..., :, 0] += x[..., a:b, a - 1]
    rhs[..., :, -1] += x[..., a:b, b]
    S, lam = _dst_basis(h, x.device)
    u = S @ ((S @ rhs @ S) / (lam[:, None] + lam[None, :])) @ S
    return u.to(images.dtype)


def baseline_region(name, masked, overlap, ring):
    """The 64x64 region a classical baseline makes from the masked input alone (no learning)."""
    lo, hi = ce_data.region_bounds(masked.shape[-1])
    a, b = ce_data.hole_bounds(masked.shape[-1], overlap, ring)
    out = masked.clone()
    if name == "context_mean":   # mean colour of every visible pixel of the image
        vis = torch.ones_like(masked[:1, :1])
        vis[..., a:b, a:b] = 0
        mean = (masked * vis).sum(dim=(2, 3), keepdim=True) / vis.sum()
        out[..., a:b, a:b] = mean
    elif name == "harmonic":
        out[..., a:b, a:b] = harmonic_fill(masked, a, b)
    elif name != "fill":         # "fill": the masked input as it is (the fill value in the hole)
        raise ValueError(name)
    return out[..., lo:hi, lo:hi]


def _neighbour_sum(u):
    """Sum of the 4 neighbours of every pixel, (B, C, H, W); pixels outside the image count as 0."""
    p = torch.nn.functional.pad(u, (1, 1, 1, 1))
    return p[..., :-2, 1:-1] + p[..., 2:, 1:-1] + p[..., 1:-1, :-2] + p[..., 1:-1, 2:]


CG_CHUNK_ELEMENTS = 1 << 20   # CPU: at most this many values (8 MB in float64) per CG solve


def harmonic_fill_mask(images, mask, tol=1e-6, max_iter=5000):
    """Diffusion inpainting of an arbitrary hole: in every hidden pixel, the 5-point Laplace
    equation deg(p) u_p = sum of its neighbours (deg = neighbours inside the image), the visible
    pixels as boundary values; solved per image and channel by conjugate gradients in float64 until
    ||residual|| <= tol ||rhs||. images (B, C, H, W), mask (B, 1, H, W) bool -> images, hole filled.
    On the centre square it equals harmonic_fill (tested). On a CPU, a few images at a time: the
    allocator reuses small tensors instead of mapping fresh memory for large ones, and each chunk
    stops at its own convergence."""
    mask = mask.expand(len(images), *mask.shape[1:])
    if images.device.type != "cpu" or len(images) == 0:
        return _harmonic_cg(images, mask, tol, max_iter)
    n = max(1, CG_CHUNK_ELEMENTS // images[0].numel())
    return torch.cat([_harmonic_cg(images[i:i + n], mask[i:i + n], tol, max_iter)
                      for i in range(0, len(images), n)])


def _harmonic_cg(images, mask, tol, max_iter):
    """harmonic_fill_mask on one chunk of images."""
    x = images.double()
    hole = mask.to(x.device).double().expand_as(x)
    deg = _neighbour_sum(torch.ones_like(x[:1, :1]))

    def A(v):                                    # v is zero outside the hole
        return hole * (deg * v - _neighbour_sum(v))

    b = hole * _neighbour_sum(x * (1 - hole))
    u, r = torch.zeros_like(x), b.clone()
    p, rr = r.clone(), (r * r).sum(dim=(2, 3), keepdim=True)
    stop = (tol ** 2) * rr.clamp_min(1e-300)
    for i in range(max_iter):
        Ap = A(p)
        alpha = rr / (p * Ap).sum(dim=(2, 3), keepdim=True).clamp_min(1e-300)
        u, r = u + alpha * p, r - alpha * Ap
        rr_new = (r * r).sum(dim=(2, 3), keepdim=True)
        if i % 16 == 15 and bool((rr_new <= stop).all()):   # a host sync every 16 iterations
            break
        p, rr = r + (rr_new / rr.clamp_min(1e-300)) * p, rr_new
    return torch.where(hole.bool(), u, x).to(images.dtype)


def baseline_image(name, masked, mask):
    """The whole image a classical baseline makes from a masked input with any hole `mask`
    (B, 1, H, W)."""
    if name == "fill":
        return masked
    if name == "context_mean":   # each image's mean visible colour in every hidden pixel
        vis = (~mask).to(masked.dtype)
        seen = vis.sum(dim=(2, 3), keepdim=True).clamp_min(1)
        mean = (masked * vis).sum(dim=(2, 3), keepdim=True) / seen
        return torch.where(mask, mean, masked)
    if name == "harmonic":
        return harmonic_fill_mask(masked, mask)
    raise ValueError(name)
