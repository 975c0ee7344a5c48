"""`ce_eval.py --image`: the photos given, each with a unique output name that fits the file-name
limit; the central square the model sees; a user's mask (white = hole, or its alpha) at the photo's
size and at the model's; the result pasted back at the photo's size, every pixel outside the hole
kept exactly, every pixel of the hole replaced; and each photo run through the model, its files
written (inpaint_photo, write_photo, run_images; the model's prediction itself: ce_eval.py).

    python ce_eval.py --ckpt runs/shapes/best.pt --image photo.jpg   # inpainted/photo_full.png
"""
import collections
import hashlib
import os
import sys

import numpy as np
import torch
from PIL import Image

import ce_data
import ce_masks
import ce_model
from ce_utils import cli, datasets, figures, imagefiles
from ce_utils.progress import Progress

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


# ------------------------------------------------------------------------------------------------
# `ce_eval.py --image`: each photo through the model, its files written.

def inpaint_photo(G, photo, a, dtype, mask_path=None):
    """One photo through G: (masked, filled, input) batches of one and the full-size result with a
    description. Centre models fill the central square; random-mask models the user's mask, or
    held-out mask 0 without one."""
    import ce_eval    # here, not at the top: ce_eval imports this module (no import cycle)
    size, kind = ce_model.input_size(a), a.get("mask", "center")
    arr, square = photo_square(photo, size)
    x = ce_data.to_float(torch.from_numpy(arr[None].copy())).to(next(G.parameters()).device)
    if kind == "center":
        masked, filled = ce_eval.inpaint(G, x, ce_eval.mask_spec(a), dtype=dtype)
        full, (hx, hy, hs) = paste_full(photo, figures.to_uint8(filled)[0], square,
                                        ce_data.hole_bounds(size, a["overlap"], a["ring"]))
        return masked, filled, x, full, f"only the {hs}x{hs} hole at ({hx}, {hy}) replaced"
    hole, mine = (read_user_mask(mask_path, photo, square, size) if mask_path
                  else (ce_masks.eval_masks(kind, 0, 1, size=size), None))
    hole = hole.to(x.device)
    masked = ce_data.apply_mask(x, hole, a["fill"])
    pred = ce_eval.predict(G, masked, dtype=dtype).to(x.device)
    filled = ce_data.paste_image(masked, pred, hole)
    full, n = paste_full_mask(photo, figures.to_uint8(filled)[0], square, hole, mine)
    what = ("your mask" if mask_path
            else f"held-out {kind} mask 0 (give --mask MASK.png for your own)")
    out = int(mine.sum()) - n if mask_path else 0    # mask pixels beside the square: not seen
    kept = (f"; its {out} px outside the central {square[2]}x{square[2]} square the model sees "
            "are kept" if out else "")
    return (masked, figures.outline(filled, hole), x, full,
            f"only the {n} px of {what} replaced{kept}")


def write_photo(G, photo, path, stem, a, dtype, mask_path):
    """Inpaint one photo (read from `path`) and write STEM_filled.png, STEM_full.png and
    STEM_compare.png; one line on stdout says what was done."""
    masked, filled, x, full, what = inpaint_photo(G, photo, a, dtype, mask_path)
    small, name, size = figures.to_uint8(filled)[0], shown(stem), ce_model.input_size(a)
    cli.atomic_write(f"{stem}_filled.png", lambda f: Image.fromarray(small).save(f, format="PNG"))
    cli.atomic_write(f"{stem}_full.png", lambda f: full.save(f, format="PNG"))
    figures.save_grid(f"{stem}_compare.png", [masked, filled, x])
    (w, h), side = photo.size, min(photo.size)
    print(f"{shown(path)}: {w}x{h}, centre {side}x{side} crop scaled to {size} px -> "
          f"{name}_filled.png ({size} px), {name}_full.png ({w}x{h}, {what}), "
          f"{name}_compare.png (masked | filled | original)")


PHOTOS_PROGRESS_ABOVE = 20   # --image on more photos than this prints k/N progress on stderr


def run_images(G, paths, a, out, dtype, mask_path=None):
    """Inpaint photos (files, or folders of them) with G and the checkpoint's flags `a`. Each
    photo's central square is scaled to the network's size; writes OUT/NAME_filled.png (the filled
    square), OUT/NAME_full.png (the photo at its own size, only the hole replaced by the prediction
    scaled up) and OUT/NAME_compare.png (masked | filled | original). Unreadable files are skipped
    and counted in one line; the exit is an error only if no photo could be inpainted."""
    import ce_eval    # here, not at the top: ce_eval imports this module (no import cycle)
    if mask_path and a.get("mask", "center") == "center":
        raise cli.DataError(f"--mask {mask_path}: this checkpoint was trained with the central "
                            "square (--mask center) and cannot fill other holes; use a model "
                            "trained with --mask region or --mask block")
    files, names, bad = photo_inputs(paths)
    done = 0
    show = Progress(len(files), "inpainting", "photos", "photos/s", every=ce_eval.PROGRESS_EVERY_S,
                    above=PHOTOS_PROGRESS_ABOVE)
    show.tty = False    # whole lines, not one redrawn in place: the photos' lines share it
    for k, (path, name) in enumerate(zip(files, names)):
        try:
            photo = imagefiles.read_rgb(path)
        except cli.DataError as e:
            bad.append(str(e))
        else:
            os.makedirs(out, exist_ok=True)     # once there is something to write: no empty folder
            write_photo(G, photo, path, os.path.join(out, name), a, dtype, mask_path)
            done += 1
        show(k + 1)
    if done == 0:
        raise cli.DataError(bad[0] if len(bad) == 1 else f"none of the {len(bad)} inputs could "
                            f"be inpainted: {'; '.join(bad[:3])}")
    if bad:
        print(f"warning: inpainted {done} photo(s); skipped {len(bad)} input(s) that could not be "
              f"read, e.g. {'; '.join(bad[:3])}", file=sys.stderr)
