"""Reading one image file, the one decoding path of the project (the datasets, `ce_eval.py
--image`, the probe): regular files only (a FIFO named x.jpg is refused, never waited on),
Pillow's decompression-bomb limit, EXIF orientation applied, any mode to RGB; errors are one-line
DataErrors naming the file.

    python -c "from ce_utils import imagefiles; print(imagefiles.center_square(640, 480))"
"""
import os
import stat
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from ce_utils.cli import DataError

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated JPEG is an error (counted, skipped), not grey

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm",
              ".pbm"}



def _kind(mode):
    """What a non-regular file is, in words."""
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a device")):
        if test(mode):
            return name
    return "not a regular file"


def _open_regular(path):
    """Open `path` for reading if it is a regular file (or a link to one); DataError otherwise.
    Opening a FIFO blocks until someone writes to it, so the type is checked with stat first, and
    again on the open file (O_NONBLOCK: the check cannot block; a file swapped in is caught)."""
    not_image = "not an image file; only regular files are read"
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise DataError(f"{path}: {_kind(st.st_mode)}, {not_image}")
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        link = " (a symbolic link to a missing file)" if os.path.islink(path) else ""
        raise DataError(f"{path}: no such file{link}") from None
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise DataError(f"{path}: {_kind(st.st_mode)}, {not_image}")
    return os.fdopen(fd, "rb")


def _to_rgb(im, alpha=False):
    """Any Pillow mode -> RGB: 16/32-bit and float greyscale rescaled, alpha composited on white
    (alpha=True: RGBA kept as it is), CMYK converted."""
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        a = np.asarray(im, dtype=np.float32)
        top = a.max(initial=0)
        a = a * 255 if top <= 1 and im.mode == "F" else (a / 257 if top > 255 else a)
        im = Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        if alpha:
            return im
        im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im)
    return im.convert("RGB")


def read_rgb(path, draft=None, alpha=False):
    """One image file -> an RGB Pillow image (alpha=True: RGBA if it has an alpha channel), upright;
    any problem with the file is a DataError.

    Only regular files are opened. Images over 2 * Image.MAX_IMAGE_PIXELS are refused as possible
    decompression bombs; between 1x and 2x (large phone photos) Pillow's warning is silenced. The
    EXIF orientation is applied, so a phone photo is not read sideways. `draft`: a JPEG may be
    decoded at a reduced scale whose shorter side stays >= draft px (libjpeg DCT scaling: faster).
    """
    with _open_regular(path) as f:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(f) as im:
                    if draft and im.format == "JPEG" and im.mode in ("RGB", "L"):
                        im.draft(im.mode, (draft, draft))
                    upright = ImageOps.exif_transpose(im) if _orientation(im) != 1 else im
                    return _to_rgb(upright, alpha)
        except Image.DecompressionBombError as e:
            limit = 2 * Image.MAX_IMAGE_PIXELS
            raise DataError(f"{path}: refused as a possible decompression bomb ({e}); shrink it "
                            f"below {limit:,} pixels if it is a real image") from None
        except UnidentifiedImageError:
            raise DataError(f"{path}: not a readable image (empty, or not a format Pillow "
                            "knows)") from None
        except Exception as e:   # Pillow's decoders raise many types for a damaged file: all alike
            raise DataError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None


def _orientation(im):
    """The EXIF orientation tag (1: upright); a damaged EXIF block counts as upright (the pixels
    may be fine)."""
    try:
        return im.getexif().get(0x0112, 1)
    except Exception:    # malformed EXIF raises assorted types inside Pillow
        return 1


def center_square(w, h):
    """(left, top, side) of the central square of a w x h image."""
    side = min(w, h)
    return (w - side) // 2, (h - side) // 2, side


def decode_image(path, size, side=None):
    """Decode one file: shorter side resized to `size`, centre-cropped square.
    Returns (uint8 (S, S, 3), whether it was upsampled). side < size: the file is expected to be a
    side x side square and is returned as it is, to be upsampled later (ce_data.upsample: the same
    pixels); (None, False) if it is not that square."""
    im = read_rgb(path, draft=size)
    if side and side < size:
        return (np.array(im, dtype=np.uint8), True) if im.size == (side, side) else (None, False)
    w, h = im.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    im = im.crop((left, top, left + size, top + size))
    return np.array(im, dtype=np.uint8), scale > 1
