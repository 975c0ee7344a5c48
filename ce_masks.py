"""Random masks for the whole-image model (Pathak et al., CVPR 2016, paper 3.3): random blocks (this
project's rule) and random regions (official train_random.lua's recipe), drawn from a seed key and
built on the device for a whole batch at once; and the fixed held-out masks every evaluation uses.
ce_data.apply_mask cuts the holes.

    python -c "import ce_masks as m; print(m.random_masks('region', 4, (0, 'demo')).shape)"
"""
import math

import numpy as np
import torch

from ce_data import seeded, to_device

# A mask is a bool tensor (N, 1, S, S), True = hidden. The few random numbers come from a CPU
# generator seeded by a key such as (seed, "mask", step), so that a resumed run and every device
# draw the same ones; the masks are built from them on the device, for the whole batch at once.

MASKS = ("center", "block", "region")
# official train_random.lua:273-283: 600x600 uniform noise (res 0.06 x MAX_SIZE 10000) upsampled
# bicubically to 10000x10000, thresholded at density 0.25; a crop is used only if its hole fraction
# lies strictly inside (20 %, 30 %) (316-327).
# DEVIATION: the official upsampling is torch/image's bicubic (image.scale: Keys a = -0.5, samples
# aligned on the corners); region_masks and official_region_crops use PyTorch's (F.interpolate:
# a = -0.75, half-pixel centres), which shifts the masks' statistics a little (README, DEVIATIONS).
REGION_SCALE = 10000 / 600
REGION_DENSITY = 0.25
REGION_WINDOW = (0.20, 0.30)
REGION_CANDIDATES = 16
# How region_masks bounds its work: the first 8 candidates are tried for every image, the last 8
# only for the first m // 4 + 32 of the m images still without a mask, the fallback only for the
# first m // 8 + 32 left after that (REGION_ROOM: those divisors; every image tries all 16 when
# m <= 42, and may fall back when m <= 36). An image a room leaves out goes on to the fallback; one
# left out of the fallback's room takes the central square. At 128 and 227 px the rooms are far
# above the images that need them (`python ce_eval.py --mask-stats region` prints their shares);
# at 32 px the room of the last 8 can bind.
REGION_ROOM = (4, 8)


def block_masks(n, size=128, g=None, device="cpu", rows=None, blocks=8, side=None, max_cover=0.25,
                numbers=None):
    """Random blocks (paper 3.3: "a number of smaller possibly overlapping masks, covering up to 1/4
    of the image"). DEVIATION (choice): the paper gives no count or size and there is no official
    code, so the rule is this project's: `blocks` rectangles per image, each side uniform in `side`
    px (default size // 8 .. size // 4), corners uniform inside the image, added in turn unless the
    union would exceed `max_cover`. The first always fits, so the coverage is at least side[0]^2 px.
    rows: build only these of the n images; numbers: _block_numbers' draw, if drawn already."""
    hw, yx = _block_numbers(n, size, g, rows, blocks, side) if numbers is None else numbers
    n = hw.shape[1]
    hw, yx = to_device(device, hw, yx)
    ar = torch.arange(size, device=device)
    inside = (ar >= yx[..., None]) & (ar < (yx + hw)[..., None])  # (2, n, blocks, size): rows, cols
    rects = inside[0][..., :, None] & inside[1][..., None, :]      # (n, blocks, size, size)
    union = torch.zeros(n, size, size, dtype=torch.bool, device=device)
    for j in range(blocks):   # a loop over the few blocks, vectorised over images
        grown = union | rects[:, j]
        fits = grown.float().mean(dim=(1, 2)) <= max_cover
        union = torch.where(fits[:, None, None], grown, union)
    return union[:, None]


def _block_numbers(n, size, g, rows=None, blocks=8, side=None):
    """block_masks' random numbers, on the CPU: each block's height, width and top-left corner."""
    side = side or (size // 8, size // 4)
    hw = torch.randint(side[0], side[1] + 1, (2, n, blocks), generator=g)
    yx = (torch.rand(2, n, blocks, generator=g) * (size - hw + 1)).long()
    if rows is not None:           # all n images' numbers are drawn; only these images are built
        hw, yx = hw[:, rows], yx[:, rows]
    return hw, yx


def _keys_table(device, dtype=torch.float32, a=-0.75):
    """The bicubic convolution kernel of Keys as a 4x4 table for _tap_weights (a = -0.75: PyTorch's
    and OpenCV's; torch/image's is -0.5, see the DEVIATION at REGION_SCALE). Its near piece,
    ((a+2)t - (a+3))t^2 + 1, holds for t <= 1, its far piece, ((at - 5a)t + 8a)t - 4a, for
    1 <= t <= 2: of the 4 cells around a row the inner two take the near one, the outer two the far
    one. Each is written ((At + B)t + C)t + D: rows A, B, C, D, one column per cell."""
    near, far = (a + 2, -(a + 3), 0.0, 1.0), (a, -5 * a, 8 * a, -4 * a)    # (A, B, C, D) of each
    abcd = torch.empty(4, 4, dtype=dtype, device=device)
    # fills, not torch.tensor(...): no copy from the host (a CUDA graph forbids it)
    for row in range(4):
        abcd[row].fill_(far[row])
        abcd[row, 1:3].fill_(near[row])
    return abcd


def _tap_weights(t, abcd=None):
    """The bicubic kernel at the distances t (..., 4) of the 4 cells around a row, each cell with
    its own piece (_keys_table, built once per batch of masks): the pieces' values bit for bit."""
    A, B, C, D = _keys_table(t.device, t.dtype) if abcd is None else abcd
    return ((A * t + B) * t + C) * t + D


def _upsample_rows(size, cells, scale, start, abcd=None):
    """(..., size, cells) bicubic weights, for phases start (...): row i of an image upsampled by
    `scale` sits at x = start + (i + 0.5) / scale - 0.5 of a `cells`-long noise line
    (align_corners=False, as F.interpolate). Only the 4 cells floor(x) - 1 .. floor(x) + 2 can have
    a weight (the kernel is 0 from 2 away): it is evaluated at those and scattered into zeros, the
    same numbers for less work."""
    dev, dt = start.device, start.dtype
    x = start[..., None] + (torch.arange(size, device=dev, dtype=dt) + 0.5) / scale - 0.5
    taps = x.floor()[..., None] + torch.arange(-1, 3, device=dev, dtype=dt)     # (..., size, 4)
    weights = _tap_weights((x[..., None] - taps).abs(), abcd)      # exact differences, in [0, 2]
    return torch.zeros(*x.shape, cells, device=dev, dtype=dt).scatter_(-1, taps.long(), weights)


def _fields(noise, start, size, scale, abcd=None):
    """Smooth fields (M, size, size) from noise (M, cells, cells) and phases (2, M), abcd from
    _keys_table: separable bicubic, 2 matmuls, in full float32 also on CUDA (TF32's 10-bit mantissa
    would move many pixels across the threshold): a GPU's masks are the CPU's up to rounding."""
    cells = noise.shape[-1]
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        rows, columns = _upsample_rows(size, cells, scale, start, abcd)
        return rows @ noise @ columns.mT
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def _region_numbers(n, size, g, rows=None, scale=REGION_SCALE):
    """region_masks' random numbers, on the CPU: each candidate's low-res noise and its phase."""
    cells = int(math.floor((size - 0.5) / scale + 2.5)) + 3     # the low-res cells its taps reach
    noise = torch.rand(n, REGION_CANDIDATES, cells, cells, generator=g)
    start = 2 + torch.rand(2, n, REGION_CANDIDATES, generator=g)   # sub-cell phase; >= 2: taps >= 0
    if rows is not None:
        noise, start = noise[rows], start[:, rows]
    return noise, start


def region_masks(n, size=128, g=None, device="cpu", rows=None, scale=REGION_SCALE,
                 density=REGION_DENSITY, window=REGION_WINDOW, numbers=None, compact=None,
                 per_round=4):
    """Random regions: official_region_crops' recipe per crop, no 10000x10000 pattern (DEVIATION:
    the paper pastes PASCAL VOC shapes, not public). Each image gets REGION_CANDIDATES crops of
    noise upsampled by `scale` (a few low-res cells and a random sub-cell phase: what a crop of the
    big pattern sees), thresholded at `density`; the first with a hole fraction inside `window` is
    used (official train_random.lua:316-327 retries likewise). DEVIATION (bounded work): if none is,
    the first is thresholded at its own `density` quantile; REGION_ROOM bounds who tries the last.
    compact (default on a CPU): `per_round` candidates at a time, else two passes with no host sync
    (CUDA graphs); the same masks. rows, numbers: as block_masks."""
    noise, start = _region_numbers(n, size, g, rows, scale) if numbers is None else numbers
    noise, start = to_device(device, noise, start)
    if noise.shape[1] % (2 * per_round):
        raise ValueError(f"region_masks: {noise.shape[1]} candidates; need a multiple of "
                         f"2 * per_round = {2 * per_round}")
    rule = (size, scale, density, window)
    if noise.device.type != "cpu" if compact is None else not compact:
        return _regions_in_two_passes(noise, start, *rule)[:, None]
    return _regions_compact(noise, start, per_round, *rule)[:, None]


def official_region_crops(n, seed=0, pattern=2000, size=128):
    """The reference region_masks reproduces: official train_random.lua:273-283, 316-327 at reduced
    size. One pattern of (pattern / REGION_SCALE)^2 uniform noise upsampled bicubically to pattern^2
    (PyTorch's bicubic: the DEVIATION at REGION_SCALE) and thresholded at REGION_DENSITY, then
    random crops kept only inside REGION_WINDOW. Returns (n accepted crops (n, size, size) bool,
    share of crops accepted)."""
    g = torch.Generator().manual_seed(seed)
    low = round(pattern / REGION_SCALE)
    noise = torch.rand(1, 1, low, low, generator=g)
    field = torch.nn.functional.interpolate(noise, size=(pattern, pattern), mode="bicubic",
                                            align_corners=False)[0, 0]
    holes, kept, tried = field < REGION_DENSITY, [], 0
    lo, hi = REGION_WINDOW
    while len(kept) < n:
        y, x = torch.randint(0, pattern - size + 1, (2,), generator=g).tolist()
        crop, tried = holes[y:y + size, x:x + size], tried + 1
        if lo < crop.float().mean().item() < hi:
            kept.append(crop)
    return torch.stack(kept), n / tried


def _room(m, share):
    """How many of m images the last candidates (or the fallback) are for: m // share + 32."""
    return min(m, m // share + 32)


def _regions_in_two_passes(noise, start, size, scale, density, window):
    """region_masks the GPU's way: the first half of every image's candidates in one pass; the
    second half for the first images left in another, found on the device (no host sync); then the
    fallback for the first ones still left, and the central square for any left beyond."""
    m, half, device = len(noise), noise.shape[1] // 2, noise.device
    rule = (size, scale, density, window, _keys_table(device))
    _, below, ok = _region_candidates(noise[:, :half], start[:, :, :half], *rule)
    found = ok.any(dim=1)
    first = below[torch.arange(m, device=device), ok.float().argmax(dim=1)]       # first accepted
    chosen = torch.where(found[:, None, None], first, _square(size, device))
    del below, first                          # (the graph's memory pool holds the largest moment)
    idx = _first_left(found, _room(m, REGION_ROOM[0]))        # may repeat image 0: see _first_left
    _, below, ok = _region_candidates(noise[idx, half:], start[:, idx, half:], *rule)
    take = ok.any(dim=1) & ~found[idx]
    pick = below[torch.arange(len(idx), device=device), ok.float().argmax(dim=1)]
    # a repeated index writes the same value each time, so the order of the writes does not matter
    chosen[idx] = torch.where(take[:, None, None], pick, chosen[idx])
    found[idx] |= take
    idx = _first_left(found, _room(m, REGION_ROOM[1]))
    field = _fields(noise[idx, 0], start[:, idx, 0], size, scale, rule[-1])
    fallback = _region_fallback(field, density)
    chosen[idx] = torch.where(found[idx, None, None], chosen[idx], fallback)
    return chosen


def _regions_compact(noise, start, per_round, size, scale, density, window):
    """region_masks a CPU's way: `per_round` candidates at a time, only for the images still without
    a mask (the second half for the first of them, as on a GPU), until every image has one."""
    (m, k), half = noise.shape[:2], noise.shape[1] // 2
    chosen = torch.zeros(m, size, size, dtype=torch.bool, device=noise.device)
    todo = torch.arange(m, device=noise.device)          # the images still without a mask
    skipped = todo[:0]                                   # left out of the second half's room
    for r in range(0, k, per_round):
        if r == half:
            todo, skipped = todo[:_room(m, REGION_ROOM[0])], todo[_room(m, REGION_ROOM[0]):]
        part = slice(r, r + per_round)
        _, below, ok = _region_candidates(noise[todo, part], start[:, todo, part], size, scale,
                                          density, window)
        done = ok.any(dim=1)
        chosen[todo[done]] = below[done, ok[done].float().argmax(dim=1)]
        todo = todo[~done]
        if len(todo) == 0:
            break
    left = torch.cat([todo, skipped]).sort().values
    fall, rest = left[:_room(m, REGION_ROOM[1])], left[_room(m, REGION_ROOM[1]):]
    if len(fall):
        field = _fields(noise[fall, 0], start[:, fall, 0], size, scale)
        chosen[fall] = _region_fallback(field, density)
    chosen[rest] = _square(size, noise.device)
    return chosen


def _square(size, device):
    """The last resort of region_masks, for images left out of the fallback's room (REGION_ROOM):
    the central square of side size // 2, about a quarter of the image (inside the window)."""
    side, at = size // 2, (size - size // 2) // 2
    square = torch.zeros(size, size, dtype=torch.bool, device=device)
    square[at:at + side, at:at + side] = True
    return square


def region_acceptance(n, size=128, key=(0, "acceptance"), chunk=256):
    """How often the rule of region_masks falls through, on n images drawn from `key`: (share of
    candidate crops rejected, share of images with none accepted among the first half of the
    candidates, share with none among all of them, which take the fallback). Printed by
    `python ce_eval.py --mask-stats region`."""
    rule = (size, REGION_SCALE, REGION_DENSITY, REGION_WINDOW)
    draws = (_region_numbers(min(chunk, n - i), size, seeded(*key, i)) for i in range(0, n, chunk))
    ok = torch.cat([_region_candidates(*numbers, *rule)[2] for numbers in draws])

    def none_accepted(ok):
        return (~ok.any(1)).float().mean().item()
    return 1 - ok.float().mean().item(), none_accepted(ok[:, :ok.shape[1] // 2]), none_accepted(ok)


def _first_left(found, k):
    """Indices of the first k images not `found` (in order), found on the device with no host sync.
    Always k of them: padded with image 0 when fewer are left, which is then either done (its result
    is not taken) or listed already (it gets the same result twice)."""
    left = ~found
    # each image left goes to slot (its rank among the images left); the others, and the images left
    # from rank k on, to the extra slot k, which is dropped
    slot = torch.where(left, left.cumsum(0) - 1, k).clamp_(max=k)
    every = torch.arange(len(found), device=found.device)
    return torch.zeros(k + 1, dtype=torch.long, device=found.device).scatter_(0, slot, every)[:k]


def _region_candidates(noise, start, size, scale, density, window, abcd=None):
    """Each candidate's field and hole (n, k, size, size), and whether its hole fraction lies inside
    the window (n, k). abcd: _keys_table, if built already."""
    n, k = noise.shape[:2]
    fields = _fields(noise.flatten(0, 1), start.flatten(1, 2), size, scale, abcd)
    fields = fields.view(n, k, size, size)
    below = fields < density
    # the count of hidden pixels, as byte sums down columns (<= 255 px, so no overflow) then one sum
    # of those: a sum of the bool map itself would first copy it to a float or int64 map 4 or 8
    # times its size; down columns, not along rows: neighbouring threads read neighbouring bytes
    if size < 256:
        count = below.view(torch.uint8).sum(dim=2, dtype=torch.uint8).sum(dim=2)
    else:
        count = below.sum(dim=(2, 3))
    frac = count.float() / (size * size)                                # exact: counts < 2^24
    return fields, below, (frac > window[0]) & (frac < window[1])


def _region_fallback(first, density):
    """Each image's first candidate's field (n, size, size), cut at its own `density` quantile."""
    k = round(density * first.shape[-2] * first.shape[-1])
    own = first.flatten(1).kthvalue(k, dim=1).values
    return first < own[:, None, None]


def random_masks(kind, n, key, size=128, device="cpu", per_batch=False, rows=None, numbers=None):
    """n masks of `kind` (block or region) drawn from the seed `key`, e.g. (seed, "mask", step), on
    `device`. per_batch: one mask shared by the whole batch (official train_random.lua:330). rows:
    keep only these images (a DDP rank's slice of the global batch: what a one-process run gives
    them). numbers: mask_numbers(kind, n, key, size, per_batch, rows), if drawn already."""
    numbers = mask_numbers(kind, n, key, size, per_batch, rows) if numbers is None else numbers
    build = {"block": block_masks, "region": region_masks}[kind]
    masks = build(None, size, device=device, numbers=numbers)
    return masks.expand(len(range(n)[rows or slice(None)]), -1, -1, -1) if per_batch else masks


def mask_numbers(kind, n, key, size=128, per_batch=False, rows=None):
    """Every random number random_masks(kind, n, key, size, per_batch=, rows=) uses, drawn on the
    CPU (the same on every device); apart from the building, so that a training run can draw the
    next step's numbers in a worker thread while the GPU trains."""
    draw = {"block": _block_numbers, "region": _region_numbers}[kind]
    return draw(1, size, seeded(*key)) if per_batch else draw(n, size, seeded(*key), rows)


EVAL_CHUNK = 256


def eval_masks(kind, start, n, device="cpu", size=128):
    """The fixed held-out masks of images start .. start+n-1: chunk c of EVAL_CHUNK images always
    comes from the key ("eval-masks", kind, c), so every method, run and batch size sees the same
    mask on an image."""
    first, last = start // EVAL_CHUNK, (start + n - 1) // EVAL_CHUNK
    parts = []
    for c in range(first, last + 1):
        rows = slice(max(start - c * EVAL_CHUNK, 0), min(start + n - c * EVAL_CHUNK, EVAL_CHUNK))
        key = ("eval-masks", kind, c)
        parts.append(random_masks(kind, EVAL_CHUNK, key, size, device, rows=rows))
    return torch.cat(parts)


def blobs(mask):
    """Sizes of the 4-connected hidden regions of one (H, W) bool mask (row runs joined by
    union-find: plain Python is fast enough here, and it keeps scipy out of the dependencies)."""
    m = np.asarray(mask, dtype=bool)
    parent, size, prev = [], [], []
    for row in m:
        edges = np.flatnonzero(np.diff(np.concatenate(([0], row.view(np.int8), [0]))))
        runs = list(zip(edges[::2], edges[1::2]))                    # [start, stop) of each run
        ids = []
        for a, b in runs:
            ids.append(len(parent))
            parent.append(len(parent))
            size.append(b - a)
            for (pa, pb), pid in prev:
                if pa < b and a < pb:               # overlapping runs of adjacent rows touch
                    ra, rb = _root(parent, pid), _root(parent, ids[-1])
                    if ra != rb:
                        parent[rb] = ra
                        size[ra] += size[rb]
        prev = list(zip(runs, ids))
    return [int(size[i]) for i in range(len(parent)) if parent[i] == i]


def _root(parent, i):
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def mask_statistics(masks):
    """Hole fraction, blobs per mask and blob sizes of (N, H, W) or (N, 1, H, W) bool masks."""
    masks = masks.reshape(-1, masks.shape[-2], masks.shape[-1]).cpu()
    per = [blobs(m) for m in masks.numpy()]
    sizes = np.concatenate([np.asarray(p) for p in per]) if per else np.zeros(0)
    frac = masks.float().mean(dim=(1, 2)).numpy()
    counts = [len(p) for p in per]
    return {"n": len(masks), "hole_fraction_mean": float(frac.mean()),
            "hole_fraction_min": float(frac.min()), "hole_fraction_max": float(frac.max()),
            "blobs_mean": float(np.mean(counts)), "blobs_median": float(np.median(counts)),
            "blob_px_median": float(np.median(sizes)), "blob_px_mean": float(sizes.mean())}


def print_mask_stats(kind, n):
    """--mask-stats: n of ours (ce_masks.random_masks) against n crops of the official recipe
    (ce_masks.official_region_crops; region only), and how often ours falls through."""
    rows = [("ours", mask_statistics(random_masks(kind, n, (0, "mask-stats"))), None)]
    if kind == "region":
        crops, rate = official_region_crops(n, seed=0, pattern=4000)
        rows.append(("official recipe", mask_statistics(crops), rate))
    print(f"{kind} masks, {n} each, 128 px: hole fraction mean [min, max] | blobs per mask mean "
          "(median) | blob px median (mean)")
    for name, r, rate in rows:
        print(f"  {name:<16}{100 * r['hole_fraction_mean']:5.1f} % "
              f"[{100 * r['hole_fraction_min']:.1f}, {100 * r['hole_fraction_max']:.1f}] | "
              f"{r['blobs_mean']:.2f} ({r['blobs_median']:.0f}) | "
              f"{r['blob_px_median']:.0f} ({r['blob_px_mean']:.0f})"
              + (f" | {100 * rate:.0f} % of crops accepted" if rate else ""))
    if kind == "region":
        print("  official recipe: train_random.lua's pattern and window, but upsampled with "
              "PyTorch's bicubic, not torch/image's\n  (the DEVIATION in ce_masks.py), so its "
              "share of crops accepted is not the official code's")
    for size in (128, 227) if kind == "region" else ():   # 227 px: the AlexNet model's
        rejected, after_half, fallback = region_acceptance(n, size)
        print(f"  ours at {size} px: {100 * rejected:.1f} % of crops rejected; "
              f"{100 * after_half:.1f} % of images with none of the first 8 accepted, "
              f"{100 * fallback:.2f} % with none of 16 (fallback)")
