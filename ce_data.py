"""Masked batches for Context Encoders (Pathak et al., CVPR 2016, paper 3.3): the central-square hole with its
overlap ring (Fig. 2 right, Fig. 3a), and 128x128 training batches sliced, augmented and normalised on the device
from a uint8 array (ce_utils/datasets.py turns files on disk into that array).

    python -c "import torch, ce_data as d; m, y = d.mask_batch(torch.zeros(2, 3, 128, 128)); print(m.shape, y.shape)"
"""
import hashlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch


class DataError(Exception):
    """Bad or missing data: the message says which file, what is wrong and what to do (one line, exit 2)."""


# official train.lua: the hole is filled with the ImageNet mean, 2*{117,104,123}/255 - 1 on the [-1, 1] scale
MEAN_FILL = (2 * 117.0 / 255 - 1, 2 * 104.0 / 255 - 1, 2 * 123.0 / 255 - 1)


# ----------------------------------------------------------------------------------------------------------------
# Masks (paper 3.3, Fig. 2 right): the central 64x64 of a 128x128 image, with an overlap ring.

def region_bounds(size=128):
    """(lo, hi) of the central region the generator predicts: [32, 96) for 128 px."""
    return size // 4, size // 4 + size // 2


def hole_bounds(size=128, overlap=7, ring="visible"):
    """(lo, hi) of the square that is filled in the input, i.e. the pixels the model must invent.

    ring="visible" (paper text, official code): only the inner square is filled; the `overlap`-px ring of the
    predicted region stays real context. ring="hidden" (seed report): the whole predicted region is filled.
    """
    lo, hi = region_bounds(size)
    return (lo + overlap, hi - overlap) if ring == "visible" else (lo, hi)


def mask_batch(images, overlap=7, ring="visible", fill="mean"):
    """Cut the hole: images (B, 3, S, S) in [-1, 1] -> (masked input (B, 3, S, S), true centre (B, 3, S/2, S/2)).

    fill="mean": official per-channel constants MEAN_FILL; fill="zero": the seed report's 0 (mid-grey).
    Scalar fills per channel: no tensor is copied to the device, so no host sync.
    """
    lo, hi = region_bounds(images.shape[-1])
    a, b = hole_bounds(images.shape[-1], overlap, ring)
    masked = images.clone()
    for c in range(3):
        masked[:, c, a:b, a:b] = MEAN_FILL[c] if fill == "mean" else 0.0
    return masked, images[:, :, lo:hi, lo:hi]


def hole_mask(overlap=7, ring="visible", size=64):
    """(1, 1, size, size) float mask of the predicted region: 1 where the pixel was hidden from the model."""
    m = torch.zeros(1, 1, size, size)
    o = overlap if ring == "visible" else 0
    m[..., o:size - o, o:size - o] = 1.0
    return m


def paste(images, pred, overlap=7, ring="visible"):
    """Put the prediction back into the image: only the hidden pixels (the real ring stays, as in official code)."""
    lo, _ = region_bounds(images.shape[-1])
    m = hole_mask(overlap, ring, pred.shape[-1]).to(pred.device, pred.dtype)
    out = images.clone()
    region = out[:, :, lo:lo + pred.shape[-2], lo:lo + pred.shape[-1]]
    region.copy_(m * pred + (1 - m) * region)
    return out


def to_float(images_u8, dtype=torch.float32, channels_last=False):
    """uint8 (B, S, S, 3) -> (B, 3, S, S) in [-1, 1]. NHWC storage is already channels_last: no copy needed."""
    x = images_u8.permute(0, 3, 1, 2).to(dtype)
    if not channels_last:
        x = x.contiguous()
    return x.mul_(2.0 / 255).sub_(1.0)


def unit(x):
    """[-1, 1] -> [0, 1], clamped, float32."""
    return ((x.float() + 1) / 2).clamp_(0, 1)


def center_crop(x, size=128):
    """uint8 (B, S, S, 3) -> (B, size, size, 3), the centre (evaluation uses no random crop)."""
    o = (x.shape[1] - size) // 2
    return x[:, o:o + size, o:o + size] if x.shape[1] != size else x


def eval_batch(images_u8, size=128):
    """Held-out uint8 images (N, S, S, 3) (numpy, e.g. a memory-mapped cache) -> (N, 3, size, size) float32 in
    [-1, 1], centre-cropped."""
    return to_float(center_crop(torch.from_numpy(np.array(images_u8)), size))


# ----------------------------------------------------------------------------------------------------------------
# Stateless randomness, and the holes of random masks (made by ce_masks.py) applied to a batch

def seeded(*key):
    """A CPU generator seeded from a tuple: stateless randomness, so a resumed run repeats exactly, and the same
    on any device (CPU and CUDA generators give different numbers; the data order must not depend on that)."""
    g = torch.Generator()
    g.manual_seed(int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:7], "little"))
    return g


def apply_mask(images, mask, fill="mean"):
    """Fill the hidden pixels: images (B, 3, S, S) in [-1, 1], mask (B, 1, S, S) bool -> the masked input.
    The fill values are Python scalars: nothing is copied to the device, no host sync."""
    masked = images.clone()
    for c in range(3):
        masked[:, c].masked_fill_(mask[:, 0], MEAN_FILL[c] if fill == "mean" else 0.0)
    return masked


def paste_image(images, pred, mask):
    """Whole-image model: the prediction replaces only the hidden pixels (official test_random.lua:126-128)."""
    return torch.where(mask, pred.to(images.dtype), images)


# ----------------------------------------------------------------------------------------------------------------
# Training batches: slices of a per-epoch permutation, augmented and normalised on the device.

def one_step_ahead(fn):
    """fn(step, *rest), with fn(step + 1, *rest) started at once in a worker thread, so that it is ready when
    asked for: the next streamed batch (Batches), the next step's mask numbers (ce_train.make_masker), prepared on
    the CPU while the GPU trains on this step. Any other step than the one prepared (the first, a resumed run's
    first) is computed on the spot. Only when the work is done changes: the result is fn's."""
    pool, pending = ThreadPoolExecutor(1, thread_name_prefix="one-step-ahead"), {}

    def get(step, *rest):
        job = pending.pop((step, *rest), None)
        result = job.result() if job else fn(step, *rest)
        pending.clear()
        pending[(step + 1, *rest)] = pool.submit(fn, step + 1, *rest)
        return result

    get.pending = pending                  # {(step, *rest): future} of the work under way (for the tests)
    return get


def to_device(device, *tensors):
    """Small CPU tensors (random numbers, indices: drawn on the CPU, the same on every device) to `device`. On CUDA
    through pinned memory and without waiting: a copy from ordinary memory waits for every kernel queued before it,
    which would stall the CPU once per step instead of letting it go on to the next step while the GPU trains.
    Tensors already on a GPU are moved with .to (a no-op on `device` itself): a CUDA graph's inputs are there
    already, and a capture forbids the pinned copy."""
    if torch.device(device).type != "cuda":
        return tuple(t.to(device) for t in tensors)
    if torch.cuda.is_current_stream_capturing() and not all(t.is_cuda for t in tensors):
        raise RuntimeError("CPU tensors to copy during a CUDA graph capture: copy them to the GPU first, ahead of "
                           "the step (as ce_train.make_masker does with the mask numbers)")
    return tuple(t.to(device) if t.is_cuda else t.pin_memory().to(device, non_blocking=True) for t in tensors)


def copy_ahead(stream, *tensors):
    """In a worker thread (one_step_ahead): CPU tensors -> `stream`'s GPU through pinned memory, queued on that side
    stream so that the copy overlaps the training step instead of waiting its turn behind it. Returns (the GPU
    tensors, the event that marks the copy's end) for arrived; with stream None (no GPU), (tensors, None)."""
    if stream is None:
        return tensors, None
    with torch.cuda.stream(stream):
        moved = to_device(stream.device, *tensors)
        done = torch.cuda.Event()
        done.record(stream)
    return moved, done


def arrived(tensors, done):
    """In the training thread: copy_ahead's tensors, once the current stream has waited for their copy (a device-side
    wait: the host does not block), and marked as used on it (so their memory is not reused before it has)."""
    if done is not None:
        current = torch.cuda.current_stream(tensors[0].device)
        current.wait_event(done)
        for t in tensors:
            t.record_stream(current)
    return tensors


class Batches:
    """Training batches from a uint8 (N, S, S, 3) array: random 128 crop (if S > 128), horizontal flip, [-1, 1].

    Resident (the default when the data fits in 40 % of free device memory): the uint8 data lives on `device`;
    each batch is a slice of a device-side permutation, augmented there: no DataLoader, no host sync.
    Streaming (data too large, e.g. ImageNet at 128 px = 63 GB, or resident=False): the data stays in host memory
    (a memory-mapped cache); a background thread gathers and augments batch k+1 into pinned memory and copies it
    on a side CUDA stream while batch k trains, so the step does not wait on the copy.
    Batch `step` depends only on (seed, step): data order and augmentation resume exactly.
    With world > 1 (DDP), rank r takes the r-th slice of each global batch of world * batch_size images.
    """

    def __init__(self, images, batch_size, device, seed=0, flip=True, crop=128, channels_last=False,
                 dtype=torch.float32, rank=0, world=1, resident=None):
        self.n, self.size = len(images), images.shape[1]
        self.batch_size, self.world, self.rank = batch_size, world, rank
        self.steps_per_epoch = self.n // (batch_size * world)
        if self.steps_per_epoch == 0:
            raise DataError(f"the training split has {self.n} images, fewer than one batch of "
                            f"{batch_size * world}; lower --batch-size or add images")
        self.device, self.seed, self.flip, self.crop = torch.device(device), seed, flip, crop
        self.channels_last, self.dtype = channels_last, dtype
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        if resident is None:
            resident = self.device.type == "cpu" or self.images.numel() < 0.4 * torch.cuda.mem_get_info(self.device)[0]
        self.streaming = not resident
        if resident:
            self.images = self.images.to(self.device)
        else:
            self._prepared = one_step_ahead(self._prepare)   # batch k + 1 made while batch k trains
            self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.data_device = self.images.device
        self._perm_epoch, self._perm = None, None

    def _to_data(self, t):
        """A small CPU tensor (indices, random draws) to where the data lives, without a host sync."""
        return to_device(self.data_device, t)[0]

    def epoch_of(self, step):
        return step // self.steps_per_epoch

    def indices(self, step):
        epoch, i = divmod(step, self.steps_per_epoch)
        if self._perm_epoch != epoch:
            self._perm = self._to_data(torch.randperm(self.n, generator=seeded(self.seed, "perm", epoch)))
            self._perm_epoch = epoch
        start = (i * self.world + self.rank) * self.batch_size
        return self._perm[start:start + self.batch_size]

    def augmented(self, step):
        """uint8 (B, 128, 128, 3) batch for `step`, on the device where the data lives."""
        idx = self.indices(step)
        x = self.images[idx]                                               # (B, S, S, 3) uint8
        # random numbers are drawn for the whole global batch and sliced, so a rank's images are augmented
        # exactly as the same images are in a one-process run with world * B per batch
        g = seeded(self.seed, "aug", step)
        B, c, mine = len(idx), self.crop, slice(self.rank * len(idx), (self.rank + 1) * len(idx))
        if self.size > c:  # official: random 128 crop of a 350px image (--load-size 350)
            off = self._to_data(torch.randint(0, self.size - c + 1, (2, B * self.world, 1), generator=g)[:, mine])
            ar = torch.arange(c, device=x.device)
            rows, cols = off[0] + ar, off[1] + ar                          # (B, c)
            x = x[torch.arange(B, device=x.device)[:, None, None], rows[:, :, None], cols[:, None, :]]
        if self.flip:
            f = self._to_data(torch.rand(B * self.world, generator=g)[mine] < 0.5)
            x = torch.where(f[:, None, None, None], x.flip(2), x)
        return x

    def _prepare(self, step):
        """Streaming, in the background thread: gather + augment in host memory, then copy on the side stream."""
        return copy_ahead(self._copy_stream, self.augmented(step))

    def get(self, step):
        """(B, 3, 128, 128) batch in [-1, 1] on the device (channels_last if asked: NHWC storage needs no copy)."""
        if not self.streaming:
            return to_float(self.augmented(step), self.dtype, self.channels_last)
        x, = arrived(*self._prepared(step))
        return to_float(x, self.dtype, self.channels_last)

