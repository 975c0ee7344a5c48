"""The image side of `ce_eval.py --image` (no model): the photos given, each with a unique output
name; the central square the model sees; a user's mask (white = hole) cropped and scaled as the
photo; and the result pasted back at the photo's size, every pixel outside the hole kept exactly.

    python ce_eval.py --ckpt runs/shapes/best.pt --image photo.jpg   # inpainted/photo_full.png
"""
import collections
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
    return files, names, bad


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

def read_user_mask(path, photo, square, size):
    """A user's mask image (white = hole) -> (1, 1, size, size) bool, cropped and scaled exactly as
    the photo: a mask of another size is first scaled to the photo's size. One-line errors for an
    unreadable, empty or all-hole mask."""
    m = imagefiles.read_rgb(path).convert("L")
    if m.size != photo.size:
        m = m.resize(photo.size, Image.NEAREST)
    left, top, side = square
    m = m.crop((left, top, left + side, top + side)).resize((size, size), Image.BILINEAR)
    hole = torch.from_numpy(np.asarray(m) > 127)[None, None]
    if not hole.any():
        raise cli.DataError(f"{path}: no hole in the photo's central square (white = hole, "
                            "black = keep); draw the region to fill in white")
    if hole.all():
        raise cli.DataError(f"{path}: the whole central square is a hole; leave some context "
                            "(black) to fill from")
    return hole


def paste_full_mask(photo, filled, square, hole):
    """The photo at its own size with only the hidden pixels replaced: the size x size prediction
    and mask scaled back to the square (bicubic, nearest); every other pixel is kept bit for bit."""
    left, top, side = square
    big = np.asarray(Image.fromarray(filled).resize((side, side), Image.BICUBIC))
    small = Image.fromarray(hole[0, 0].cpu().numpy())
    keep = np.asarray(small.resize((side, side), Image.NEAREST))
    out = np.array(photo)
    region = out[top:top + side, left:left + side]
    region[keep] = big[keep]
    return Image.fromarray(out), int(keep.sum())
