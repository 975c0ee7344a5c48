"""The embedded dataset of `--data shapes`: procedural 128x128 images (gradients, stripes, thick
lines, discs, rectangles, colour texture) whose content crosses the central hole, so that the
context predicts the centre (paper 3.3). Offline, deterministic, no download.

    python -c "from ce_utils import synthetic; print(synthetic.make_shapes(4, seed=0).shape)"
"""
import functools
import math

import numpy as np

# Images are drawn BATCH at a time with whole-array numpy operations on colour planes (B, 3, S, S):
# the background in float32, then shapes and noise on uint8 with bitwise operations. Image i's
# randomness comes from its own generator, seeded (seed, i), as a few numbers and length-S vectors
# (trigonometry and the texture's matrix products per image); the batch operations are exact
# elementwise arithmetic. So image i depends only on (seed, i, size): never on n, on its batch or
# on the process that drew it.
N_UNIFORM = 199    # draws per image; their order below is the data's format: a change changes all
MAX_SHAPES = 4     # 2-4 discs / rectangles / thick lines per image
TEX_MAX = 7        # the low-frequency texture: a k x k grid of colours, k in 3..7, upsampled
BATCH = 32         # images per whole-array pass: a (32, 128, 128) float32 plane is 2 MB
LO, HI = 0.03, 0.97  # colours inside [LO, HI] * 255, so that +-6 grey levels of noise never clip
# noise: a random byte -> the sum of its four 2-bit fields, 0..12 (mean 6, std 2.2, about Gaussian)
_NOISE_LUT = sum((np.arange(256) >> k) & 3 for k in (0, 2, 4, 6)).astype(np.uint8)


def _colour(u):
    """Uniform draws -> colours in [LO, HI]."""
    return LO + (HI - LO) * u


def _texture(u, s):
    """3. The low-frequency colour texture of one image: a k x k grid of colours (k in 3..7)
    upsampled bilinearly to (3, s, s) float32 by two small matrix products."""
    k = 3 + int(5 * u[16])
    grid = _colour(u[17:17 + TEX_MAX * TEX_MAX * 3]).reshape(TEX_MAX, TEX_MAX, 3)
    grid = grid[:k, :k].astype(np.float32)
    t = np.linspace(0, k - 1, s)
    i = np.minimum(t.astype(np.int64), k - 2)
    w = np.zeros((s, k), np.float32)          # row r: weight 1-f on grid point i, f on i+1
    w[np.arange(s), i], w[np.arange(s), i + 1] = 1 - (t - i), t - i
    rows = (w @ grid.reshape(k, 3 * k)).reshape(s, k, 3)                # (y, grid x, c)
    return (w @ rows.transpose(1, 0, 2).reshape(k, 3 * s)).reshape(s, s, 3).transpose(2, 1, 0)


def _draw(seed, i, s):
    """The random numbers of image i: uniforms (N_UNIFORM,), normals (8,), cos/sin of its angles
    (10,), stripe vectors (4, s) and its colour texture (3, s, s), or None when it has none."""
    rng = np.random.default_rng([seed, i])
    u = rng.random(N_UNIFORM)
    z = rng.standard_normal(2 * MAX_SHAPES)
    # stripes: sin(ax + by + phi) = sin(ax) cos(by + phi) + cos(ax) sin(by + phi):
    # two length-s vectors per axis
    ph, freq, phi = 2 * math.pi * u[8], (2 + 6 * u[9]) / s, 2 * math.pi * u[10]
    t = np.arange(s, dtype=np.float64)
    ax = 2 * math.pi * freq * math.cos(ph) * t
    by = 2 * math.pi * freq * math.sin(ph) * t + phi
    stripes = np.stack([np.sin(ax), np.cos(ax), np.cos(by), np.sin(by)]).astype(np.float32)
    # trig of the scalar angles with Python's math, per image (a vector sin may round differently
    # by position)
    angles = [2 * math.pi * u[0]] + [math.pi * u[169 + 8 * j] for j in range(MAX_SHAPES)]
    trig = np.array([f(x) for x in angles for f in (math.cos, math.sin)], np.float32)
    return u, z, trig, stripes, (_texture(u, s) if u[15] < 0.5 else None)


def _background(planes, u, trig, stripes, tex):
    """1. a linear gradient between two colours in a random direction; 2. (60 %) a sinusoidal
    grating in a third colour blended over it; 3. (50 %) 30 % of a colour texture. Written into
    uint8 planes (B, 3, s, s), scaled to grey levels, 6 below the final value (the noise adds
    0..12) and + 0.5 so that the cast rounds."""
    f32, s = np.float32, planes.shape[-1]
    c = (np.arange(s, dtype=f32) - f32(s / 2)) / f32(s)
    t = np.add((c * trig[:, 1, None] + f32(0.5))[:, :, None],
               (c * trig[:, 0, None])[:, None, :])                      # (B, s, s)
    np.clip(t, 0, 1, out=t)
    # grating weight w = amp (0.5 + 0.5 sin(ax + by + phi)), amp = 0 for the images without stripes
    half = (np.where(u[:, 7] < 0.6, 0.3 + 0.4 * u[:, 14], 0.0) / 2).astype(f32)[:, None]
    w = np.multiply((stripes[:, 0] * half)[:, None, :], stripes[:, 2, :, None])
    w += (stripes[:, 1] * half)[:, None, :] * stripes[:, 3, :, None]
    w += half[:, :, None]
    # (c1 + (c2 - c1) t)(1 - w) + col w  =  c1 + (c2 - c1) r + (col - c1) w,  with r = t (1 - w)
    r = np.subtract(1, w)
    r *= t
    c1, c2, col = _colour(u[:, 1:4]), _colour(u[:, 4:7]), _colour(u[:, 11:14])
    # 70 % when a texture is mixed in
    scale = np.where([x is None for x in tex], 255.0, 0.7 * 255)[:, None]
    alpha, beta, gamma = ((v * scale + off).astype(f32)[:, :, None, None]
                          for v, off in ((c1, 0.5 - 6), (c2 - c1, 0), (col - c1, 0)))
    for ch in range(3):
        plane = np.multiply(r, beta[:, ch], out=t)
        plane += w * gamma[:, ch]
        plane += alpha[:, ch]
        for j, x in enumerate(tex):
            if x is not None:
                plane[j] += f32(0.3 * 255) * x[ch]
        planes[:, ch] = plane     # float -> uint8: truncation of values > 0, i.e. rounding


SHAPE_CLASSES = ("disc", "rectangle", "line")   # shape kinds 0, 1, 2 of _shapes


def _kinds(u):
    """Kind (0 disc, 1 rectangle, 2 line; -1 none) of shapes 0..MAX_SHAPES-1 of each image, in
    painting order, from its uniforms u (B, N_UNIFORM)."""
    count = 2 + np.floor(3 * u[:, 164]).astype(np.int64)
    kind = np.floor(3 * u[:, 168:168 + 8 * MAX_SHAPES:8]).astype(np.int64)     # p[3] of shape j
    return np.where(np.arange(MAX_SHAPES) < count[:, None], kind, -1), count


def shape_labels(n, seed):
    """Labels of images 0..n-1 of the set `seed`: the kind of the shape painted last, on top of the
    others (SHAPE_CLASSES; about 1/3 each). Only each image's uniforms are drawn, so it is fast and
    the same at every size. The embedded data's classes for ce_probe.py (this project's task)."""
    u = np.stack([np.random.default_rng([seed, i]).random(N_UNIFORM) for i in range(n)])
    kinds, count = _kinds(u.reshape(n, N_UNIFORM))
    return kinds[np.arange(n), count - 1]


def _shapes(planes, u, z, trig):
    """4. 2-4 discs, rectangles or thick lines of one colour each, centred near the middle so that
    they cross the hole, painted into uint8 planes (B, 3, s, s) by bitwise selection
    (x ^ ((x ^ colour) & mask))."""
    f32, s = np.float32, planes.shape[-1]
    xs = np.arange(s, dtype=f32)
    kinds, _ = _kinds(u)
    inside = np.empty((len(u), s, s), bool)
    for j in range(MAX_SHAPES):
        p = u[:, 165 + 8 * j:173 + 8 * j]
        kind = kinds[:, j]                                               # -1: no shape j
        dx = xs - (s / 2 + z[:, 2 * j] * s / 6).astype(f32)[:, None]             # (B, s)
        dy = xs - (s / 2 + z[:, 2 * j + 1] * s / 6).astype(f32)[:, None]
        inside[:] = False
        d = kind == 0        # disc of radius s/10 .. s/3
        r = (s / 10 + (s / 3 - s / 10) * p[d, 4]).astype(f32)
        inside[d] = (np.add((dx[d] ** 2)[:, None, :], (dy[d] ** 2)[:, :, None])
                     < (r * r)[:, None, None])
        d = kind == 1        # rectangle of half sides s/12 .. s/3
        hw, hh = ((s / 12 + (s / 3 - s / 12) * p[d, 4:6]).astype(f32)).T
        inside[d] = ((np.abs(dx[d]) < hw[:, None])[:, None, :]
                     & (np.abs(dy[d]) < hh[:, None])[:, :, None])
        d = kind == 2        # thick line through the centre point, half width 1.5 .. s/16 px
        w = (1.5 + (s / 16 - 1.5) * p[d, 5]).astype(f32)
        cos_a, sin_a = trig[d, 2 + 2 * j, None, None], trig[d, 3 + 2 * j, None, None]
        inside[d] = np.abs(dx[d, None, :] * sin_a - dy[d, :, None] * cos_a) < w[:, None, None]
        mask = np.negative(inside.view(np.uint8))                         # 255 inside, 0 outside
        colour = (_colour(p[:, 0:3]) * 255 + (0.5 - 6)).astype(np.uint8)  # as in _background
        for ch in range(3):
            x = planes[:, ch] ^ colour[:, ch, None, None]
            x &= mask
            planes[:, ch] ^= x


@functools.lru_cache(maxsize=4)
def _noise_table(seed, s):
    """(3, 2s, 2s) uint8 noise 0..12 shared by the images of one set; image i adds the s x s window
    at its own random offset (3 s^2 random values per image would cost more than the image)."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(s,)))  # no image's stream
    return _NOISE_LUT[rng.integers(0, 256, (3, 2 * s, 2 * s), dtype=np.uint8)]


def make_block(job):
    """Images start..stop-1 of the set `seed`, uint8 (n, size, size, 3): a process pool's job."""
    seed, start, stop, size = job
    out = np.empty((stop - start, size, size, 3), np.uint8)
    noise = _noise_table(seed, size)
    for a in range(start, stop, BATCH):
        u, z, trig, stripes, tex = zip(*[_draw(seed, i, size)
                                         for i in range(a, min(a + BATCH, stop))])
        u, z, trig, stripes = (np.stack(v) for v in (u, z, trig, stripes))
        planes = np.empty((len(u), 3, size, size), np.uint8)
        _background(planes, u, trig, stripes, tex)
        _shapes(planes, u, z, trig)
        offsets = (u[:, 197:199] * size).astype(np.int64)
        for j, (oy, ox) in enumerate(offsets):          # 5. a little sensor noise
            planes[j] += noise[:, oy:oy + size, ox:ox + size]
        np.stack(list(planes.transpose(1, 0, 2, 3)), axis=-1,
                 out=out[a - start:a - start + len(u)])
    return out


def make_shapes(n, seed, size=128, map_fn=map, out=None):
    """n procedural RGB images, uint8 (n, size, size, 3). Image i depends only on (seed, i, size),
    so any `map_fn` (a process pool's map) gives the same array. `out`: an array to fill (e.g. a
    memory-mapped file) instead of a new one in memory."""
    if out is None:
        out = np.empty((n, size, size, 3), np.uint8)
    jobs = [(seed, a, min(a + 256, n), size) for a in range(0, n, 256)]
    for (_, a, b, _), block in zip(jobs, map_fn(make_block, jobs)):
        out[a:b] = block
    return out
