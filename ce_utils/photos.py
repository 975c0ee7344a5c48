"""The image side of `ce_eval.py --image` (no model): the photos given, each with a unique output
name that fits the file-name limit; the central square the model sees; a user's mask (white = hole,
or its alpha) at the photo's size and at the model's; and the result pasted back at the photo's
size, every pixel outside the hole kept exactly, every pixel of the hole replaced.

    python ce_eval.py --ckpt runs/shapes/best.pt --image photo.jpg   # inpainted/photo_full.png
"""
import collections
import hashlib
import os
import sys

import numpy as np
import torch
from PIL import Image

from ce_utils import cli, datasets, imagefiles

# ------------------------------------------------------------------------------------------------
# Inputs, the square the model sees, the result pasted back at full size.

def photo_inputs(paths):
    """Files and folders given to --image -> (image files, a unique output name for each, problems).

    A folder contributes its image files (recursively, as datasets.list_images); a folder without
    any is a problem. Two inputs with one stem (a/x.jpg, b/x.png) get names x-1, x-2 (one note
    line), never one file over another.
    """
    files, bad = [], []
    for p in paths:
        if os.path.isdir(p):
            skipped = {}
            found, other = datasets.list_images(p, skipped)
            datasets.listing_note(p, other, skipped)
            files += found
            if not found:
                bad.append(f"{p}: no image files in this folder (looked for "
                           f"{', '.join(sorted(imagefiles.IMAGE_EXTS))})")
        else:
            files.append(p)
    stems = [os.path.splitext(os.path.basename(os.path.normpath(f)))[0] or "image" for f in files]
    count = collections.Counter(stems)
    names, taken, clashes = [], set(stems), {}
    for stem in stems:
        if count[stem] == 1:
            names.append(stem)
            continue
        k = clashes.get(stem, 0) + 1
        while f"{stem}-{k}" in taken:
            k += 1
        clashes[stem] = k
        taken.add(f"{stem}-{k}")
        names.append(f"{stem}-{k}")
    if clashes:
        print(f"note: {sum(count[s] for s in clashes)} inputs share a name "
              f"({', '.join(sorted(clashes))}); their outputs are numbered in the order given: "
              "NAME-1_*, NAME-2_*, ...", file=sys.stderr)
    short = [fit_name(name) for name in names]
    cut = [s for s, name in zip(short, names) if s != name]
    if cut:
        print(f"note: {len(cut)} output name(s) shortened to fit the {NAME_MAX}-byte file-name "
              f"limit, e.g. {shown(cut[0])}_full.png", file=sys.stderr)
    return files, short, bad


NAME_MAX = 255   # bytes in one file name on the common file systems (ext4, XFS, Btrfs, APFS)
# the longest tail an output name gets: NAME_compare.png, written through NAME_compare.png.ce-tmpPID
NAME_TAIL = len("_compare.png") + len(cli.TMP_SUFFIX) + 7


def fit_name(name, limit=NAME_MAX - NAME_TAIL):
    """`name` if its bytes fit `limit`; else its start and a hash of the whole ("~1a2b3c4d"), so
    that two long names that start alike stay two."""
    raw = os.fsencode(name)
    if len(raw) <= limit:
        return name
    tag = "~" + hashlib.sha1(raw).hexdigest()[:8]
    k = limit - len(tag)          # characters: never fewer bytes than characters
    while len(os.fsencode(name[:k])) > limit - len(tag):
        k -= 1
    return name[:k] + tag


def photo_square(im, size=128):
    """The model's view of a photo: its central square, scaled to size x size. Returns
    (uint8 (size, size, 3), (left, top, side) of that square in the photo)."""
    left, top, side = imagefiles.center_square(*im.size)
    crop = im.crop((left, top, left + side, top + side))
    if side != size:
        crop = crop.resize((size, size), Image.BICUBIC)
    return np.asarray(crop), (left, top, side)


def paste_full(im, filled, square, hole):
    """The photo at its own size with only the hole replaced: the hole [a, b)^2 of the filled
    size x size image (uint8), scaled back to the square's scale and pasted; every other pixel of
    `im` is kept bit for bit. Returns (image, (x, y, side) of the replaced square in the photo)."""
    left, top, side = square
    scale = side / filled.shape[0]
    a, b = round(hole[0] * scale), round(hole[1] * scale)
    b = max(b, a + 1)     # a photo of a few pixels: the hole rounds to 0 px; it keeps one
    # the destination pixels a..b-1 of the square cover exactly [a / scale, b / scale) of `filled`
    box = (a / scale, a / scale, b / scale, b / scale)
    patch = Image.fromarray(filled).resize((b - a, b - a), Image.BICUBIC, box=box)
    out = im.copy()
    out.paste(patch, (left + a, top + a))
    return out, (left + a, top + a, b - a)


def shown(path):
    """A path as printable text: bytes that are not UTF-8 (Python's surrogates) shown as U+FFFD."""
    return os.fsencode(path).decode("utf-8", "replace")


# ------------------------------------------------------------------------------------------------
# A user's own hole (--mask MASK.png), for models trained with random masks.

def cover(mask, shape):
    """bool (h, w) -> bool `shape` (H, W), both spanning the same square: True where a pixel
    overlaps a True pixel of `mask` (not nearest: a thin stroke is never lost, either way)."""
    for axis, n_out in enumerate(shape):
        n_in, j = mask.shape[axis], np.arange(n_out)
        lo, hi = j * n_in // n_out, -(-(j + 1) * n_in // n_out)   # the pixels under pixel j
        c = np.cumsum(mask, axis=axis, dtype=np.int64)
        c = np.concatenate([np.zeros_like(c.take([0], axis)), c], axis)
        mask = c.take(hi, axis) - c.take(lo, axis) > 0
    return mask


def read_user_mask(path, photo, square, size):
    """A user's mask image -> (the hole the model sees, (1, 1, size, size) bool; the hole at the
    photo's own size, (H, W) bool). White = hole; a mask with transparency (alpha not all opaque)
    is its alpha: opaque = hole, as a hole painted on an empty layer. A mask of another size is
    first scaled to the photo's. A model pixel is a hole where any photo pixel under it is, so the
    model never sees a pixel it replaces. One-line errors for an unreadable, empty or all-hole
    mask."""
    m = imagefiles.read_rgb(path, alpha=True)
    alpha = m.getchannel("A") if m.mode == "RGBA" else None
    m = alpha if alpha is not None and alpha.getextrema()[0] < 255 else m.convert("L")
    if m.size != photo.size:
        m = m.resize(photo.size, Image.NEAREST)
    full = np.asarray(m) > 127
    left, top, side = square
    if not full[top:top + side, left:left + side].any():
        raise cli.DataError(f"{path}: no hole in the photo's central square (white = hole, "
                            "black = keep; with transparency, opaque = hole); draw the region to "
                            "fill in white")
    hole = torch.from_numpy(cover(full[top:top + side, left:left + side], (size, size)))
    if hole.all():
        raise cli.DataError(f"{path}: the whole central square is a hole; leave some context "
                            "(black) to fill from")
    return hole[None, None], full


def paste_full_mask(photo, filled, square, hole, full=None):
    """The photo at its own size with only the hole replaced, by the size x size prediction scaled
    back to the square (bicubic); every other pixel is kept bit for bit. The hole: `full` (the
    user's mask at the photo's size) inside the square, else the photo pixels under `hole`.
    Returns (image, pixels replaced)."""
    left, top, side = square
    big = np.asarray(Image.fromarray(filled).resize((side, side), Image.BICUBIC))
    keep = (full[top:top + side, left:left + side] if full is not None
            else cover(hole[0, 0].cpu().numpy(), (side, side)))
    out = np.array(photo)
    out[top:top + side, left:left + side][keep] = big[keep]
    return Image.fromarray(out), int(keep.sum())
