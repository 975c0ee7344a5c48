"""Classical fills a Context Encoder is measured against (paper 5.1 compares hand-designed fills):
fill (the masked input as it is), context mean (each image's mean visible colour) and harmonic
(Laplace's equation in the hole, the visible pixels as boundary values: the central square by the
discrete sine transform, any other hole by multigrid-preconditioned conjugate gradients). No
learning; ce_eval.py scores them with the same metrics and masks as the model.

    python ce_eval.py --ckpt runs/shapes/best.pt    # the model and these baselines, one table
"""
import math

import torch

import ce_data

BASELINES = ("fill", "context_mean", "harmonic")
# ce_eval.py --baselines: which of them to score; harmonic solves a linear system per image
BASELINE_SETS = {"all": BASELINES, "fast": ("fill", "context_mean"), "none": ()}


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


CG_CHUNK_ELEMENTS = 1 << 20   # CPU: at most this many values (4 MB in float32) per solve


def harmonic_fill_mask(images, mask, tol=1e-5, max_iter=200):
    """Diffusion inpainting of an arbitrary hole: in every hidden pixel, the 5-point Laplace
    equation deg(p) u_p = sum of its neighbours (deg = neighbours inside the image), the visible
    pixels as boundary values; solved per image and channel by conjugate gradients preconditioned
    with a multigrid V-cycle (_vcycle), until ||residual|| <= tol ||rhs||: a dozen or two
    iterations from 32 to 256 px, where plain conjugate gradients need about as many as the hole
    is wide. In float32 (float64 inputs in float64): tol 1e-5 leaves errors far below the 1/255
    steps of an 8-bit image. images (B, C, H, W), mask (B, 1, H, W) bool -> images, hole filled.
    On the centre square it equals harmonic_fill (tested). On a CPU, a few images at a time: the
    allocator reuses small tensors instead of mapping fresh memory for large ones, and each chunk
    stops at its own convergence."""
    mask = mask.expand(len(images), *mask.shape[1:])
    if images.device.type != "cpu" or len(images) == 0:
        return _harmonic_pcg(images, mask, tol, max_iter)
    n = max(1, CG_CHUNK_ELEMENTS // images[0].numel())
    return torch.cat([_harmonic_pcg(images[i:i + n], mask[i:i + n], tol, max_iter)
                      for i in range(0, len(images), n)])


def _stencil(hole):
    """The hole's Laplace operator A as 5-point weights (d, wx, wy): (A v)_p = d_p v_p - the sum
    of w_pq v_q over p's 4 neighbours q, with wx (B, 1, H, W-1) between horizontal and wy
    (B, 1, H-1, W) between vertical neighbours. Hidden p: d_p = its neighbours inside the image,
    w_pq = 1 to a hidden q (a visible q is a boundary value, on the right-hand side); every other
    weight 0, so A ignores whatever a vector holds on visible pixels."""
    deg = _neighbour_sum(torch.ones_like(hole[:1, :1]))
    return hole * deg, hole[..., :, :-1] * hole[..., :, 1:], hole[..., :-1, :] * hole[..., 1:, :]


def _apply(op, v, r=None):
    """A v for the 5-point weights op = (d, wx, wy) of _stencil or _coarser; with r, the
    residual r - A v (fused: fewer passes over memory, which bounds the solve's speed)."""
    d, wx, wy = op
    s = 1.0 if r is None else -1.0
    out = d * v if r is None else torch.addcmul(r, d, v, value=-1)
    out[..., :, :-1].addcmul_(wx, v[..., :, 1:], value=-s)
    out[..., :, 1:].addcmul_(wx, v[..., :, :-1], value=-s)
    out[..., :-1, :].addcmul_(wy, v[..., 1:, :], value=-s)
    out[..., 1:, :].addcmul_(wy, v[..., :-1, :], value=-s)
    return out


def _sum_2x2(t):
    """The sum over each 2x2 block, (..., H, W) -> (..., ceil(H/2), ceil(W/2)); odd sizes padded
    with 0. As the restriction R of _coarser it is P^T."""
    if t.shape[-1] % 2 or t.shape[-2] % 2:
        t = torch.nn.functional.pad(t, (0, t.shape[-1] % 2, 0, t.shape[-2] % 2))
    return t[..., 0::2, 0::2] + t[..., 1::2, 0::2] + t[..., 0::2, 1::2] + t[..., 1::2, 1::2]


def _coarser(op):
    """The Galerkin operator R A P on the grid of 2x2 blocks, P copying a block's value to its 4
    pixels and R = P^T summing them: again 5-point weights. A block couples to its neighbour by
    the sum of the weights crossing between them; its diagonal is its pixels' diagonals minus twice
    the weights inside the block. Odd sizes: padded with pixels of zero weight."""
    h, w = op[0].shape[-2:]
    d, wx, wy = (torch.nn.functional.pad(t, (0, w % 2, 0, h % 2)) for t in op)
    inside = wx[..., 0::2, 0::2] + wx[..., 1::2, 0::2] + wy[..., 0::2, 0::2] + wy[..., 0::2, 1::2]
    return (_sum_2x2(d) - 2 * inside, wx[..., 0::2, 1::2] + wx[..., 1::2, 1::2],
            wy[..., 1::2, 0::2] + wy[..., 1::2, 1::2])


# Damped Jacobi's weight: 4/5 damps the high frequencies of the 5-point Laplacian best
# (Trottenberg, Oosterlee and Schuller, Multigrid, 2001, section 2.1).
JACOBI_WEIGHT = 0.8


def _vcycle(levels, r, k=0):
    """An approximate solution of A_k v = r on level k of `levels` [(op, w/d), ...] (finest first,
    the last one pixel): a damped Jacobi sweep from v = 0, the next level's V-cycle on the
    residual (summed over 2x2 blocks, its correction copied back), a second sweep; on the last
    level the sweep alone. The same sweep before and after and R = P^T make it a symmetric
    positive definite preconditioner, as conjugate gradients require. Values it leaves on visible
    pixels meet only zero weights."""
    op, jacobi = levels[k]                       # jacobi: JACOBI_WEIGHT / d
    v = jacobi * r
    if k == len(levels) - 1:
        return v
    coarse = _vcycle(levels, _sum_2x2(_apply(op, v, r)), k + 1)
    h, w = r.shape[-2:]
    v += torch.nn.functional.interpolate(coarse, scale_factor=2.0)[..., :h, :w]  # nearest: P
    return v.addcmul_(jacobi, _apply(op, v, r))


def _levels(hole):
    """_vcycle's levels of the hole (B, 1, H, W) float: [(op, JACOBI_WEIGHT / d), ...], from the
    pixels' _stencil to a single block, each _coarser than the last; 0 where d is 0 (no unknown)."""
    ops = [_stencil(hole)]
    while max(ops[-1][0].shape[-2:]) > 1:
        ops.append(_coarser(ops[-1]))
    return [(op, torch.where(op[0] > 0, JACOBI_WEIGHT / op[0].clamp_min(1), 0)) for op in ops]


def _harmonic_pcg(images, mask, tol, max_iter):
    """harmonic_fill_mask on one chunk of images: preconditioned conjugate gradients, every
    image and channel with its own step sizes."""
    dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
    x = images.to(dtype)
    hole = mask.to(x.device, dtype)
    levels = _levels(hole)

    def dot(a, b):                                      # per image and channel, (B, C, 1, 1)
        return torch.linalg.vecdot(a.flatten(2), b.flatten(2))[..., None, None]

    r = hole * _neighbour_sum(x * (1 - hole))           # b: the visible neighbours' values
    u, stop = torch.zeros_like(x), (tol ** 2) * dot(r, r).clamp_min(1e-30)
    p = z = _vcycle(levels, r)
    rz = dot(r, z)
    for _ in range(max_iter):
        Ap = _apply(levels[0][0], p)
        alpha = rz / dot(p, Ap).clamp_min(1e-30)
        u.addcmul_(alpha, p)
        r.addcmul_(alpha, Ap, value=-1)
        if bool((dot(r, r) <= stop).all()):            # a host sync per iteration: a few dozen
            break
        z = _vcycle(levels, r)
        rz_new = dot(r, z)
        p, rz = z.addcmul_(rz_new / rz.clamp_min(1e-30), p), rz_new
    return torch.where(mask.to(x.device).expand_as(x), u, x).to(images.dtype)


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
