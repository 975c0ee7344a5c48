"""The masked 128x128 tensors of Context Encoders (Pathak et al., CVPR 2016, paper 3.3): the
central hole with its overlap ring (Fig. 2, Fig. 3a), holes of any shape filled and pasted back, and
training batches sliced, flipped and normalised on the device from uint8 images (N, S, S, 3).
Imports no other file of this project: copy it alone.

  python -c "import torch, ce_data as d; print(d.mask_batch(torch.ones(2, 3, 128, 128))[1].shape)"
"""
import functools
import hashlib

import numpy as np
import torch


class DataError(Exception):
    """Bad or missing data: the message says which file, what is wrong and what to do."""


# official train.lua: the hole is filled with the ImageNet mean, 2*{117,104,123}/255 - 1 in [-1, 1]
MEAN_FILL = (2 * 117.0 / 255 - 1, 2 * 104.0 / 255 - 1, 2 * 123.0 / 255 - 1)


# ------------------------------------------------------------------------------------------------
# The central hole (paper 3.3, Fig. 2): the central 64x64 of a 128x128 image, with an overlap ring

def region_bounds(size=128):
    """(lo, hi) of the central region the generator predicts: [32, 96) for 128 px."""
    return size // 4, size // 4 + size // 2


def hole_bounds(size=128, overlap=7, ring="visible"):
    """(lo, hi) of the square filled in the input: the pixels the model must invent.
    ring="visible" (paper, official code): only the inner square is filled, the `overlap`-px ring
    of the predicted region stays real context; ring="hidden" (seed report): the whole region."""
    lo, hi = region_bounds(size)
    return (lo + overlap, hi - overlap) if ring == "visible" else (lo, hi)


def mask_batch(images, overlap=7, ring="visible", fill="mean"):
    """Cut the central hole: images (B, 3, S, S) in [-1, 1] -> (masked input (B, 3, S, S), true
    centre (B, 3, S/2, S/2)). fill="mean": official per-channel MEAN_FILL; "zero": the seed
    report's 0. Scalar fills: nothing is copied to the device, no host sync."""
    lo, hi = region_bounds(images.shape[-1])
    a, b = hole_bounds(images.shape[-1], overlap, ring)
    masked = images.clone()
    for c in range(3):
        masked[:, c, a:b, a:b] = MEAN_FILL[c] if fill == "mean" else 0.0
    return masked, images[:, :, lo:hi, lo:hi]


def hole_mask(overlap=7, ring="visible", size=64):
    """(1, 1, size, size) float mask of the predicted region: 1 where the model saw no pixel."""
    m = torch.zeros(1, 1, size, size)
    o = overlap if ring == "visible" else 0
    m[..., o:size - o, o:size - o] = 1.0
    return m


def paste(images, pred, overlap=7, ring="visible"):
    """Put the predicted centre back into the image: only the hidden pixels (the real ring stays,
    as in the official code)."""
    lo, _ = region_bounds(images.shape[-1])
    m = hole_mask(overlap, ring, pred.shape[-1]).to(pred.device, pred.dtype)
    out = images.clone()
    region = out[:, :, lo:lo + pred.shape[-2], lo:lo + pred.shape[-1]]
    region.copy_(m * pred + (1 - m) * region)
    return out


# ------------------------------------------------------------------------------------------------
# Holes of any shape (random blocks and regions, made by ce_masks.py)

def apply_mask(images, mask, fill="mean"):
    """Fill the hidden pixels: images (B, 3, S, S) in [-1, 1], mask (B, 1, S, S) bool (True =
    hidden) -> the masked input. Scalar fills: nothing is copied to the device."""
    masked = images.clone()
    for c in range(3):
        masked[:, c].masked_fill_(mask[:, 0], MEAN_FILL[c] if fill == "mean" else 0.0)
    return masked


def paste_image(images, pred, mask):
    """Whole-image model: the prediction replaces only the hidden pixels (official
    test_random.lua:126-128)."""
    return torch.where(mask, pred.to(images.dtype), images)


def seeded(*key):
    """A CPU generator seeded from a tuple such as (seed, "perm", epoch): stateless randomness, so
    a resumed run repeats exactly, the same on any device (CPU and CUDA generators differ)."""
    g = torch.Generator()
    g.manual_seed(int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:7], "little"))
    return g


# ------------------------------------------------------------------------------------------------
# Pixels: uint8 (B, S, S, 3) in [0, 255] <-> float (B, 3, S, S) in [-1, 1], the range of G's tanh

def to_float(images_u8, dtype=torch.float32, channels_last=False):
    """uint8 (B, S, S, 3) -> (B, 3, S, S) in [-1, 1]. NHWC storage is channels_last: no copy."""
    x = images_u8.permute(0, 3, 1, 2).to(dtype)
    if not channels_last:
        x = x.contiguous()
    return x.mul_(2.0 / 255).sub_(1.0)


def unit(x):
    """[-1, 1] -> [0, 1], clamped, float32 (the range the metrics are computed on)."""
    return ((x.float() + 1) / 2).clamp_(0, 1)


@functools.lru_cache(maxsize=16)
def _bicubic_matrix(n_in, n_out, device):
    """(n_out, n_in) float64 weights of Pillow's bicubic upsampling (libImaging/Resample.c: a =
    -0.5, taps where the kernel reaches, normalised, then rounded to 22-bit fixed point), as
    integers times 2**22."""
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    scale = n_in / n_out
    for xx in range(n_out):
        center = (xx + 0.5) * scale
        lo, hi = max(int(center - 2.0 + 0.5), 0), min(int(center + 2.0 + 0.5), n_in)
        w = []
        for x in range(lo, hi):
            t = abs(x - center + 0.5)
            w.append(((1.5 * t - 2.5) * t * t + 1) if t < 1 else
                     ((((t - 5) * t + 8) * t - 4) * -0.5) if t < 2 else 0.0)
        total = 0.0
        for v in w:               # summed in Pillow's order: the same doubles
            total += v
        for x, v in zip(range(lo, hi), w):
            k = v / total * (1 << 22)
            m[xx, x] = int(k - 0.5) if k < 0 else int(k + 0.5)
    return m.to(device)


def upsample(images_u8, size):
    """uint8 images (B, s, s, 3) -> (B, size, size, 3), bit for bit Pillow's
    Image.resize((size, size), BICUBIC) of each: what a cache at the load size would hold, so a
    cache may keep small images (Tiny ImageNet's 64 px) at their own size, a fraction of the
    bytes, and batches upsample them here. Pillow's fixed-point weights as matrices, along rows
    then columns, each pass rounded and clipped to uint8 as Pillow does (every sum is exact in
    float64, on any device). s == size: as is."""
    B, s = images_u8.shape[:2]
    if s == size:
        return images_u8
    m = _bicubic_matrix(s, size, images_u8.device) / (1 << 22)     # exact: a power of two
    # Pillow rounds each pass as (sum + 2**21) >> 22, clipped to [0, 255]: floor(x + 0.5)
    x = images_u8.permute(0, 1, 3, 2).reshape(-1, s).to(torch.float64)       # (B*s*3, s)
    x = (x @ m.T).add_(0.5).floor_().clamp_(0, 255)                          # rows first
    x = x.view(B, s, 3, size).transpose(2, 3).reshape(B, s, size * 3)        # (B, s, size*3)
    x = torch.matmul(m, x).add_(0.5).clamp_(0, 255)                          # then columns
    return x.to(torch.uint8).view(B, size, size, 3)    # uint8 truncates: the floor, as x >= 0


def center_crop(x, size=128):
    """uint8 (B, S, S, 3) -> (B, size, size, 3), the centre (evaluation uses no random crop)."""
    o = (x.shape[1] - size) // 2
    return x[:, o:o + size, o:o + size] if x.shape[1] != size else x


def eval_batch(images_u8, size=128, load_size=None):
    """Held-out uint8 images (N, S, S, 3) (numpy, e.g. a memory-mapped cache) -> (N, 3, size,
    size) float32 in [-1, 1]: upsampled to `load_size` (default: `size`) if smaller, as when
    training, then centre-cropped."""
    x = torch.from_numpy(np.array(images_u8))
    return to_float(center_crop(upsample(x, max(x.shape[1], load_size or size)), size))


# ------------------------------------------------------------------------------------------------
# Training batches: slices of a per-epoch permutation, augmented and normalised on the device

def to_device(device, *tensors):
    """Small CPU tensors (random numbers, indices: drawn on the CPU, the same on every device) to
    `device`. On CUDA through pinned memory without waiting, so the CPU is not stalled once per
    step behind the queued kernels; tensors on a GPU already move with .to (a capture forbids the
    pinned copy)."""
    if torch.device(device).type != "cuda":
        return tuple(t.to(device) for t in tensors)
    if torch.cuda.is_current_stream_capturing() and not all(t.is_cuda for t in tensors):
        raise RuntimeError("CPU tensors to copy during a CUDA graph capture: copy them to the GPU "
                           "first, ahead of the step")
    return tuple(t.to(device) if t.is_cuda else t.pin_memory().to(device, non_blocking=True)
                 for t in tensors)


class Batches:
    """Training batches from uint8 images (N, S, S, 3): upsampled to `load_size` (default: the
    crop) if smaller, random crop (if larger than the crop), horizontal flip, [-1, 1]. The images
    live on `device`; each batch is a slice of a per-epoch permutation, augmented there: no
    DataLoader, no host sync (airbench's way). Batch `step` depends only on
    (seed, step), so a resumed run sees the same data. With world > 1 (DDP), rank r takes the r-th
    slice of each global batch of world * batch_size images. (Data too large for the device:
    ce_utils.accel.StreamedBatches.)"""
    streaming = False

    def __init__(self, images, batch_size, device, seed=0, flip=True, crop=128,
                 channels_last=False, dtype=torch.float32, rank=0, world=1, load_size=None,
                 upsample_once=None):
        # images smaller than the load size: upsampled once where they are placed (default: on a
        # GPU, where they take the memory they took before), or per batch (a CPU reads them from
        # the memory-mapped cache: upsampling them all would copy the split into RAM)
        self.n, self.size = len(images), max(images.shape[1], load_size or crop)
        self.upsample_once = (torch.device(device).type != "cpu" if upsample_once is None
                              else upsample_once)
        self.batch_size, self.world, self.rank = batch_size, world, rank
        self.steps_per_epoch = self.n // (batch_size * world)
        if self.steps_per_epoch == 0:
            raise DataError(f"the training split has {self.n} images, fewer than one batch of "
                            f"{batch_size * world}; lower --batch-size or add images")
        self.device, self.seed, self.flip, self.crop = torch.device(device), seed, flip, crop
        self.channels_last, self.dtype = channels_last, dtype
        self.images = self._place(torch.from_numpy(np.ascontiguousarray(images)))
        self._perm_epoch, self._perm = None, None

    def _place(self, images):
        x = images.to(self.device)
        if self.upsample_once and x.shape[1] != self.size:   # in chunks: float64 temporaries
            x = torch.cat([upsample(c, self.size) for c in x.split(256)])
        return x

    def epoch_of(self, step):
        return step // self.steps_per_epoch

    def _to_data(self, t):
        """A small CPU tensor (indices, random draws) to where the images are."""
        return to_device(self.images.device, t)[0]

    def indices(self, step):
        epoch, i = divmod(step, self.steps_per_epoch)
        if self._perm_epoch != epoch:
            perm = torch.randperm(self.n, generator=seeded(self.seed, "perm", epoch))
            self._perm, self._perm_epoch = self._to_data(perm), epoch
        start = (i * self.world + self.rank) * self.batch_size
        return self._perm[start:start + self.batch_size]

    def augmented(self, step):
        """uint8 (B, crop, crop, 3) batch for `step`, where the images are."""
        idx = self.indices(step)
        x = upsample(self.images[idx], self.size)      # (B, S, S, 3) uint8; as is if placed so
        # numbers are drawn for the whole global batch and sliced: a rank's images are augmented
        # exactly as in a one-process run of world * B images
        g = seeded(self.seed, "aug", step)
        B, c, mine = len(idx), self.crop, slice(self.rank * len(idx), (self.rank + 1) * len(idx))
        # DEVIATION: the images were stored as centre squares (ce_utils/datasets.py), so the random
        # crop stays inside that square; the official donkey_folder.lua crops anywhere in the
        # aspect-preserved image
        if self.size > c:  # official train.lua: a random 128 crop of the loaded image
            off = torch.randint(0, self.size - c + 1, (2, B * self.world, 1), generator=g)
            off = self._to_data(off[:, mine])
            ar = torch.arange(c, device=x.device)
            rows, cols = off[0] + ar, off[1] + ar                          # (B, c)
            batch = torch.arange(B, device=x.device)[:, None, None]
            x = x[batch, rows[:, :, None], cols[:, None, :]]
        if self.flip:   # official donkey_folder.lua: horizontal flip with probability 1/2
            f = self._to_data(torch.rand(B * self.world, generator=g)[mine] < 0.5)
            x = torch.where(f[:, None, None, None], x.flip(2), x)
        return x

    def get(self, step):
        """(B, 3, crop, crop) batch in [-1, 1] on the device (channels_last storage if asked)."""
        return to_float(self.augmented(step), self.dtype, self.channels_last)
