"""The embedded dataset of `--data shapes`: procedural 128x128 images whose content (gradients, stripes, thick
lines, discs, rectangles, colour texture) crosses the central hole, so that the context really predicts the centre
(Context Encoders, paper 3.3: the model must understand the context). Offline, deterministic, no download.

    python -c "import ce_shapes; print(ce_shapes.make_shapes(4, seed=0).shape)"
"""
import numpy as np


def _upsample(grid, s):
    """Bilinear (k, k, 3) -> (s, s, 3)."""
    k = grid.shape[0]
    t = np.linspace(0, k - 1, s, dtype=np.float32)
    i = np.minimum(t.astype(np.int64), k - 2)
    f = (t - i)[:, None, None]
    rows = grid[i] * (1 - f) + grid[i + 1] * f                       # (s, k, 3)
    f = f.reshape(1, s, 1)
    return rows[:, i] * (1 - f) + rows[:, i + 1] * f                 # (s, s, 3)


def _shape_image(rng, s):
    f32 = np.float32
    y, x = np.mgrid[0:s, 0:s].astype(f32)
    c = s / 2
    # 1. background: a linear gradient between two colours in a random direction
    th = rng.uniform(0, 2 * np.pi)
    t = np.clip(((x - c) * f32(np.cos(th)) + (y - c) * f32(np.sin(th))) / s + 0.5, 0, 1)
    c1, c2 = rng.uniform(0, 1, 3).astype(f32), rng.uniform(0, 1, 3).astype(f32)
    img = c1 + (c2 - c1) * t[..., None]
    # 2. stripes: a sinusoidal grating in a third colour
    if rng.random() < 0.6:
        ph, freq = rng.uniform(0, 2 * np.pi), rng.uniform(2, 8) / s
        g = 0.5 + 0.5 * np.sin(f32(2 * np.pi * freq) * (x * f32(np.cos(ph)) + y * f32(np.sin(ph))) + f32(rng.uniform(0, 6.3)))
        img += (rng.uniform(0, 1, 3).astype(f32) - img) * (f32(rng.uniform(0.3, 0.7)) * g)[..., None]
    # 3. low-frequency colour texture
    if rng.random() < 0.5:
        img = 0.7 * img + 0.3 * _upsample(rng.uniform(0, 1, (rng.integers(3, 8),) * 2 + (3,)).astype(f32), s)
    # 4. shapes and thick lines placed so that they cross the central hole
    for _ in range(rng.integers(2, 5)):
        col = rng.uniform(0, 1, 3).astype(f32)
        cx, cy = c + rng.normal(0, s / 6, 2)
        kind = rng.integers(3)
        if kind == 0:    # disc
            inside = (x - cx) ** 2 + (y - cy) ** 2 < rng.uniform(s / 10, s / 3) ** 2
        elif kind == 1:  # rectangle
            hw, hh = rng.uniform(s / 12, s / 3, 2)
            inside = (np.abs(x - cx) < hw) & (np.abs(y - cy) < hh)
        else:            # thick line through (cx, cy)
            a = rng.uniform(0, np.pi)
            inside = np.abs((x - cx) * f32(np.sin(a)) - (y - cy) * f32(np.cos(a))) < rng.uniform(1.5, s / 16)
        img[inside] = col
    img += rng.normal(0, 0.01, img.shape).astype(f32)  # a little sensor noise
    return np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)


def make_block(job):
    """Images start..stop-1 of the set `seed` (a unit of work for a process pool)."""
    seed, start, stop, size = job
    return np.stack([_shape_image(np.random.default_rng([seed, i]), size) for i in range(start, stop)])


def make_shapes(n, seed, size=128, map_fn=map):
    """n procedural RGB images, uint8 (n, size, size, 3). Image i depends only on (seed, i, size), so any
    `map_fn` (a process pool's map) gives the same array."""
    if n == 0:
        return np.zeros((0, size, size, 3), np.uint8)
    return np.concatenate(list(map_fn(make_block, [(seed, a, min(a + 256, n), size) for a in range(0, n, 256)])))
