"""Datasets on disk -> uint8 arrays (N, S, S, 3), decoded once and cached: the file side of the data, with nothing
from the paper in it (ce_data.py makes the masked batches from these arrays).

    python -c "import ce_datasets as d; print(d.load_split('shapes', 'data', 'val').shape)"

--data shapes: embedded, offline, procedurally generated (ce_shapes.py); tiny: Tiny ImageNet, downloaded on first
use; imagenet: DIR/train/<class>/*, DIR/val/...; folder: any folder of images, searched recursively.

Every image file, for a dataset or for `ce_eval.py --image`, is opened by read_rgb: regular files only (a FIFO
named x.jpg is refused, never waited on), Pillow's decompression-bomb limit, EXIF orientation applied, any mode
to RGB. A cache is written to disk as it is made and carries CRC32 checksums that are checked when it is loaded.
"""
import collections
import concurrent.futures
import contextlib
import errno
import hashlib
import http.client
import json
import multiprocessing as mp
import os
import shutil
import stat
import struct
import sys
import time
import urllib.error
import urllib.request
import warnings
import zipfile
import zlib

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

import ce_cli
import ce_shapes
from ce_cli import DataError

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated JPEG is an error (counted and skipped), not grey pixels

TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_MD5, TINY_SIZE = "90528d7ca1a48142e341f4ef8d21d0de", 248_100_043   # published with the archive
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
CACHE_VERSION = 2          # 2: CRC32 checksums in the metadata; new embedded-data generator
CRC_BLOCK_BYTES = 1 << 24  # one CRC32 per 16 MB of images: a damaged cache names the images it lost
SHAPES_VAL = 512  # fixed held-out split of the embedded data, generated from its own seed

# ----------------------------------------------------------------------------------------------------------------
# Processes for decoding and for generating the embedded data (ce_shapes.py).

def _pool(workers):
    """A process pool for decoding. Not fork: forking a process whose torch threads hold locks can deadlock the
    children. forkserver forks workers from a clean server process that has imported this module once."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
    else:
        ctx = mp.get_context("spawn")
    return ctx.Pool(workers)


def generate_shapes(n, seed, size=128, workers=1, out=None):
    """The embedded dataset (ce_shapes.make_shapes): n images, uint8 (n, size, size, 3), on `workers` processes.
    out: a _Rows to stream them into (e.g. the cache file); by default a new in-memory array is returned."""
    rows = out if out is not None else _Rows(None, n, size)
    progress = _Progress(n, f"generating {n} images of the embedded 'shapes' data") if n > 2048 else None
    jobs = [(seed, a, min(a + 256, n), size) for a in range(0, n, 256)]
    with contextlib.ExitStack() as stack:
        # a pool pays off only for many images on many cores: starting it imports this module and torch (on a
        # loaded 2-core machine, 10,000 images took 22 s in this process and 43 s with a 2-process pool)
        mapper = stack.enter_context(_pool(workers)).imap if workers >= 4 and n >= 20000 else map
        for block in mapper(ce_shapes.make_block, jobs):
            rows.add(block)
            if progress:
                progress(rows.n, final=rows.n == n)
    return rows if out is not None else rows.finish()


# ----------------------------------------------------------------------------------------------------------------
# Reading one image file: the one decoding path, used by the datasets and by `ce_eval.py --image`.

def _kind(mode):
    """What a non-regular file is, in words."""
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device")):
        if test(mode):
            return name
    return "not a regular file"


def _open_regular(path):
    """Open `path` for reading if it is a regular file (or a link to one); DataError otherwise. Opening a FIFO
    blocks until someone writes to it, so the type is checked first with stat, and again on the open file
    (O_NONBLOCK: the check itself cannot block, and a file swapped in between is caught)."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise DataError(f"{path}: {_kind(st.st_mode)}, not an image file; only regular files are read")
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        link = " (a symbolic link to a missing file)" if os.path.islink(path) else ""
        raise DataError(f"{path}: no such file{link}") from None
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise DataError(f"{path}: {_kind(st.st_mode)}, not an image file; only regular files are read")
    return os.fdopen(fd, "rb")


def _to_rgb(im):
    """Any Pillow mode -> RGB: 16/32-bit and float greyscale rescaled, alpha composited on white, CMYK converted."""
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        a = np.asarray(im, dtype=np.float32)
        a = a * 255 if a.max(initial=0) <= 1 and im.mode == "F" else (a / 257 if a.max(initial=0) > 255 else a)
        im = Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im)
    return im.convert("RGB")


def read_rgb(path, draft=None):
    """One image file -> an RGB Pillow image, upright. Any problem with the file is a DataError naming it.

    Only regular files are opened. Pillow's decompression-bomb check refuses images of more than
    2 * Image.MAX_IMAGE_PIXELS pixels (179 M by default); between 1x and 2x Pillow only warns, and these images
    (e.g. 108 MP phone photos) are decoded without the warning. The EXIF orientation tag is applied
    (ImageOps.exif_transpose), so a phone photo is not read sideways. `draft`: a JPEG may be decoded at a reduced
    scale whose shorter side stays >= draft pixels (libjpeg DCT scaling: faster for small targets).
    """
    with _open_regular(path) as f:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(f) as im:
                    if draft and im.format == "JPEG" and im.mode in ("RGB", "L"):
                        im.draft(im.mode, (draft, draft))
                    return _to_rgb(ImageOps.exif_transpose(im) if _orientation(im) != 1 else im)
        except Image.DecompressionBombError as e:
            raise DataError(f"{path}: refused as a possible decompression bomb ({e}); shrink it below "
                            f"{2 * Image.MAX_IMAGE_PIXELS:,} pixels if it is a real image") from None
        except UnidentifiedImageError:
            raise DataError(f"{path}: not a readable image (empty, or not a format Pillow knows)") from None
        except Exception as e:   # Pillow's decoders raise many types for a damaged file; all mean the same here
            raise DataError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None


def _orientation(im):
    """The EXIF orientation tag (1: upright); a damaged EXIF block counts as upright, the pixels may be fine."""
    try:
        return im.getexif().get(0x0112, 1)
    except Exception:    # malformed EXIF raises assorted types inside Pillow
        return 1


def center_square(w, h):
    """(left, top, side) of the central square of a w x h image."""
    side = min(w, h)
    return (w - side) // 2, (h - side) // 2, side


def decode_image(path, size):
    """Decode one file: shorter side resized to `size`, centre-cropped square. Returns (uint8 (S, S, 3), upsampled)."""
    im = read_rgb(path, draft=size)
    w, h = im.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    im = im.crop((left, top, left + size, top + size))
    return np.array(im, dtype=np.uint8), scale > 1


def _decode_worker(job):
    path, size = job
    try:
        arr, up = decode_image(path, size)
        return arr, up, None
    except DataError as e:
        return None, False, str(e)


# ----------------------------------------------------------------------------------------------------------------
# Listing a folder: images used, everything else counted.

def list_images(root, skipped=None):
    """Image files below `root` (recursive, sorted, hidden names skipped, symbolic links followed once) and the
    number of other regular files ignored. `skipped`, if given, is a dict that receives the counts of entries that
    cannot be used: "special" files (FIFOs, sockets, devices), "dangling" links, "unreadable" folders, with a few
    "examples"."""
    files, other = [], 0
    skipped = {} if skipped is None else skipped
    seen, stack = set(), [root]
    while stack:                  # depth first, in name order: the order os.walk gives
        folder = stack.pop()
        try:
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in seen:     # a link loop, or one folder linked twice: listed once
                continue
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            _count(skipped, "unreadable", f"{folder} ({e.strerror or e})")
            continue
        subfolders = []
        for e in entries:
            if e.name.startswith("."):             # .ce_cache and hidden files
                continue
            try:                                   # is_dir/is_file follow links
                kind = "dir" if e.is_dir() else "file" if e.is_file() else "dangling" if (
                    e.is_symlink() and not os.path.exists(e.path)) else "special"
            except OSError as err:                 # e.g. a link into a folder we may not enter
                _count(skipped, "unreadable", f"{e.path} ({err.strerror or err})")
                continue
            if kind == "dir":
                subfolders.append(e.path)
            elif kind == "file" and os.path.splitext(e.name)[1].lower() in IMAGE_EXTS:
                files.append(e.path)
            elif kind == "file":
                other += 1
            else:
                _count(skipped, kind, e.path)
        stack.extend(reversed(subfolders))
    return files, other


def _count(skipped, what, example):
    skipped[what] = skipped.get(what, 0) + 1
    if len(skipped.setdefault("examples", [])) < 2:
        skipped["examples"].append(example)


def _listing_note(root, other, skipped):
    """One line about the entries of a data folder that are not used (a documented, counted skip)."""
    parts = [f"ignored {other} file(s) that are not images (by extension)"] if other else []
    for key, words in (("special", "special file(s) (FIFO, socket, device)"),
                       ("dangling", "symbolic link(s) to missing files"), ("unreadable", "unreadable folder(s)")):
        if skipped.get(key):
            parts.append(f"skipped {skipped[key]} {words}")
    if parts:
        level = "warning" if len(parts) > (1 if other else 0) else "note"
        ex = f", e.g. {'; '.join(skipped['examples'])}" if skipped.get("examples") else ""
        print(f"{level}: {root}: {'; '.join(parts)}{ex}", file=sys.stderr)


class _Progress:
    """A one-line progress display on stderr (rate-limited), like the ones people expect from tqdm."""

    def __init__(self, total, desc):
        self.total, self.desc, self.t0, self.last = total, desc, time.time(), 0.0

    def __call__(self, done, final=False):
        now = time.time()
        if not final and now - self.last < 0.5:
            return
        self.last = now
        rate = done / max(now - self.t0, 1e-9)
        eta = (self.total - done) / max(rate, 1e-9)
        end = "\n" if final else ""
        print(f"\r{self.desc}: {done}/{self.total} ({rate:,.0f} img/s, ETA {eta:.0f}s)   ", end=end,
              file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# The cache: DATA_ROOT/.ce_cache/NAME.npy (uint8 rows) + NAME.json (what it holds, CRC32 per block of rows).

def _crc_rows(size):
    """Images per checksum block."""
    return max(1, CRC_BLOCK_BYTES // (size * size * 3))


class _Rows:
    """Images appended one block after another into a preallocated (capacity, S, S, 3) uint8 array, with a CRC32
    per block of rows computed as blocks fill (from memory just written, so the cache is never read back whole).

    With a path, the array is a memory-mapped temp file PATH.ce-tmp<pid> (numpy open_memmap): the images go to
    disk as they are made and the process holds only a few of them. finish() shrinks the file to the rows
    written (skipped files leave no gap: rows are written densely, so nothing is moved), renames it to PATH and
    writes the metadata last. Without a path, or if the file cannot be made, a plain in-memory array.
    """

    def __init__(self, npy, capacity, size):
        self.npy, self.tmp, self.arr, self.n, self.crcs, self.rows = npy, None, None, 0, [], _crc_rows(size)
        shape = (capacity, size, size, 3)
        if npy is not None:
            try:
                os.makedirs(os.path.dirname(npy), exist_ok=True)
                self.tmp = f"{npy}{ce_cli.TMP_SUFFIX}{os.getpid()}"
                self.arr = np.lib.format.open_memmap(self.tmp, "w+", np.uint8, shape)
                _reserve(self.tmp, self.arr.offset + self.arr.nbytes)
            except OSError as e:
                self.discard()
                _fallback_to_memory(npy, e, np.prod(shape))
        if self.arr is None:
            self.arr = np.empty(shape, np.uint8)

    def add(self, rows):
        self.arr[self.n:self.n + len(rows)] = rows
        self.n += len(rows)
        while (len(self.crcs) + 1) * self.rows <= self.n:
            self._crc_block()

    def _crc_block(self):
        a = len(self.crcs) * self.rows
        self.crcs.append(zlib.crc32(self.arr[a:min(a + self.rows, self.n)]))

    def finish(self, meta=None):
        """The array of the rows written: the cache file, memory-mapped, or the in-memory array."""
        if self.tmp is None:
            return self.arr[:self.n]
        if self.n == 0:                                    # nothing decoded: no cache to keep
            self.discard()
            return np.zeros((0,) + self.arr.shape[1:], np.uint8)
        if self.n % self.rows:
            self._crc_block()
        offset, shape = self.arr.offset, (self.n,) + self.arr.shape[1:]
        self.arr.flush()
        self.arr = None                                    # unmap before shrinking the file
        with open(self.tmp, "r+b") as f:
            f.write(_npy_header(shape, offset))
            f.truncate(offset + int(np.prod(shape)))
            f.flush()
            os.fsync(f.fileno())
        os.replace(self.tmp, self.npy)
        self.tmp = None
        meta = {**(meta or {}), "n": self.n, "crc_rows": self.rows, "crc32": self.crcs}
        ce_cli.atomic_write(self.npy[:-4] + ".json", json.dumps(meta))   # last: a cache is used only once complete
        return np.load(self.npy, mmap_mode="c")

    def discard(self):
        """Remove the temp file (an interrupted or failed build)."""
        if self.tmp is not None:
            self.arr = None
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.tmp)
            self.tmp = None


def _fallback_to_memory(npy, e, nbytes):
    """A cache that cannot be written (read-only data folder, full disk): keep the images in memory this once,
    if they fit in half of it; otherwise one clear error rather than swapping or being killed."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):   # not POSIX: assume it fits
        ram = 2 * nbytes
    why = f"cannot write the cache {npy} ({e.strerror or e})"
    if nbytes > ram / 2:
        raise DataError(f"{why}, and its {nbytes / 1e9:.1f} GB of images do not fit in memory; free disk space "
                        f"there or make {os.path.dirname(npy)} writable")
    print(f"warning: {why}; keeping the images in memory ({nbytes / 1e9:.1f} GB) and making them again next run",
          file=sys.stderr)


def _reserve(path, nbytes):
    """Allocate the cache file's disk space now: a full disk is then one clear error up front, not a crash
    (SIGBUS) when a memory-mapped page cannot be written later. Filesystems without fallocate are left sparse."""
    if hasattr(os, "posix_fallocate"):
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, nbytes)
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):   # these: not supported here
                raise OSError(e.errno, f"{e.strerror}: the cache needs {nbytes / 1e9:.1f} GB", path) from None
        finally:
            os.close(fd)


def _npy_header(shape, length):
    """A .npy version 1.0 header for uint8 C-order `shape`, padded with spaces to exactly `length` bytes (the
    length of the header it replaces: the data stays where it is)."""
    text = repr({"descr": "|u1", "fortran_order": False, "shape": tuple(int(x) for x in shape)})
    text = text.ljust(length - 10 - 1) + "\n"
    if length > 65535 + 10 or len(text) != length - 10:
        raise ValueError(f"cannot rewrite a .npy header of {length} bytes")
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode("latin1")


def _damaged_blocks(arr, meta):
    """Indices of the blocks of rows whose CRC32 differs from the one stored when the cache was written.

    Reads the whole array once (CRC32 runs at about 1 GB/s per core and zlib releases the GIL, so the blocks are
    checked on several threads: disk speed is the limit for large caches)."""
    rows, crcs = meta["crc_rows"], meta["crc32"]
    if not isinstance(rows, int) or rows < 1 or len(crcs) != -(-len(arr) // rows):
        return [0]
    big = arr.nbytes > 1 << 31
    if big:
        t0 = time.time()
        print(f"checking the cache ({arr.nbytes / 1e9:.1f} GB) against its checksums ...", file=sys.stderr)
    with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as ex:
        same = list(ex.map(lambda i: zlib.crc32(arr[i * rows:(i + 1) * rows]) == crcs[i], range(len(crcs))))
    if big:
        print(f"checked in {time.time() - t0:.0f}s", file=sys.stderr)
    return [i for i, ok in enumerate(same) if not ok]


def _read_cache(npy, meta_path, expect):
    """The cached array (memory-mapped) if its metadata matches `expect` and its checksums match its bytes, else
    (None, None) after one warning line (a stale, truncated or damaged cache is rebuilt, never used)."""
    if not (os.path.isfile(npy) and os.path.isfile(meta_path)):
        return None, None
    why = "stale or damaged"
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        arr = np.load(npy, mmap_mode="c")  # copy-on-write: writable for torch, never written back
        ok = (all(meta.get(k) == v for k, v in expect.items()) and arr.dtype == np.uint8
              and arr.shape == (meta["n"], expect["size"], expect["size"], 3))
        if ok:
            bad = _damaged_blocks(arr, meta)
            if bad:
                ok, r = False, meta["crc_rows"]
                why = (f"damaged: checksum mismatch in {len(bad)} block(s) of {r} images, first images "
                       f"{bad[0] * r}-{min((bad[0] + 1) * r, len(arr)) - 1}")
    except (OSError, ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        print(f"warning: cache {npy} is {why}; rebuilding it", file=sys.stderr)
        return None, None
    return arr, meta


def _remove_dead_temps(cache_dir, prefix):
    """Delete `prefix`*.ce-tmp<pid> files in the cache folder left by builds that were killed (their process is
    gone): a half-built ImageNet cache is tens of GB. A live process's temp file (another DDP rank) is kept."""
    with contextlib.suppress(OSError):
        for name in os.listdir(cache_dir):
            pid = name.rpartition(ce_cli.TMP_SUFFIX)[2]
            if name.startswith(prefix) and ce_cli.TMP_SUFFIX in name and pid.isdigit() and int(pid) != os.getpid():
                try:
                    os.kill(int(pid), 0)
                except ProcessLookupError:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(os.path.join(cache_dir, name))
                except OSError:        # PermissionError: the process exists (someone else's)
                    pass


def decode_files(files, size, desc, workers=None, out=None):
    """Decode `files` in parallel (all cores) into uint8 (N, size, size, 3); unreadable files are skipped.

    out: a _Rows to stream the images into (the cache file); by default a new in-memory array.
    Returns (array, or `out` when given, stats) where stats counts skipped and upsampled files and names a few
    skipped ones.
    """
    n = len(files)
    rows = out if out is not None else _Rows(None, n, size)
    skipped, upsampled = [], 0
    progress = _Progress(n, desc)
    workers = workers or min(os.cpu_count() or 1, 32)
    jobs = [(f, size) for f in files]
    pool = _pool(workers) if n >= 64 and workers > 1 else None
    try:
        results = pool.imap(_decode_worker, jobs, chunksize=32) if pool else map(_decode_worker, jobs)
        for i, (arr, up, err) in enumerate(results):
            if arr is None:
                skipped.append(err)
            else:
                rows.add(arr[None])
                upsampled += up
            progress(i + 1)
        progress(n, final=True)
    finally:
        if pool is not None:
            pool.terminate()
    stats = {"skipped": len(skipped), "skipped_examples": skipped[:3], "upsampled": int(upsampled)}
    return (rows if out is not None else rows.finish()), stats


def cached_images(files, size, cache_dir, name, root, workers=None):
    """Decode `files` once into DIR/.ce_cache/NAME-SIZE-KEY.npy and memory-map it on later runs.

    The key hashes the file list, sizes, mtimes and load size, so a changed folder never reuses a stale cache;
    a cache whose shape or checksums disagree with its metadata is rebuilt. The file is written as the images
    are decoded (never the whole split in memory) under a temp name, and renamed when complete.
    """
    key = _files_key(files, size, root)
    npy = os.path.join(cache_dir, f"{name}-{size}-{key}.npy")
    meta_path = npy[:-4] + ".json"
    arr, meta = _read_cache(npy, meta_path, {"version": CACHE_VERSION, "size": size, "key": key})
    if arr is not None:
        return arr, meta
    _remove_dead_temps(cache_dir, f"{name}-{size}-")
    rows = _Rows(npy, len(files), size)
    try:
        _, stats = decode_files(files, size, f"decoding {name} ({len(files)} files) into a {size}px uint8 cache",
                                workers, out=rows)
        meta = {"version": CACHE_VERSION, "size": size, "key": key, "n_files": len(files), **stats}
        if os.path.isdir(cache_dir):
            for old in os.listdir(cache_dir):  # drop caches of an earlier state of the same split and size
                if (old.startswith(f"{name}-{size}-") and not old.startswith(f"{name}-{size}-{key}")
                        and ce_cli.TMP_SUFFIX not in old):
                    with contextlib.suppress(FileNotFoundError):   # another process (a DDP rank) got there first
                        os.remove(os.path.join(cache_dir, old))
        arr = rows.finish(meta)
    finally:
        rows.discard()             # an error or Ctrl-C before finish(): the temp file goes (after it: a no-op)
    return arr, {**meta, "n": len(arr)}


def _files_key(files, size, root):
    """A digest of the file list (relative paths, sizes, mtimes) and load size: a changed folder -> a new cache.
    Paths are hashed as the file system's bytes (os.fsencode): names that are not valid UTF-8 are fine."""
    h = hashlib.sha1(f"v{CACHE_VERSION} size={size}\n".encode())
    for f in files:
        st = os.stat(f)
        h.update(os.fsencode(os.path.relpath(f, root)) + f"\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _report(meta, what):
    """One warning line for skipped or upsampled images (a documented, counted skip)."""
    if meta.get("skipped"):
        ex = "; ".join(meta.get("skipped_examples", []))
        print(f"warning: {what}: skipped {meta['skipped']} unreadable image file(s), e.g. {ex}", file=sys.stderr)
    if meta.get("upsampled"):
        print(f"note: {what}: {meta['upsampled']} image(s) smaller than {meta['size']}px were upsampled",
              file=sys.stderr)


def _shapes_split(root, split, size, n):
    """The embedded data's split, from its cache or generated into it (ce_shapes.py; no files to decode)."""
    seed = 1 if split == "train" else 2   # the held-out split has its own seed
    cache_dir = os.path.join(root, ".ce_cache")
    stem = f"shapes-{split}-{size}-n{n}-v"
    npy = os.path.join(cache_dir, f"{stem}{CACHE_VERSION}.npy")
    arr, _ = _read_cache(npy, npy[:-4] + ".json", {"version": CACHE_VERSION, "size": size, "n": n})
    if arr is not None:
        return arr
    _remove_dead_temps(cache_dir, stem)
    with contextlib.suppress(OSError):   # caches of earlier versions of the generator
        for old in os.listdir(cache_dir):
            if old.startswith(stem) and not old.startswith(f"{stem}{CACHE_VERSION}."):
                os.remove(os.path.join(cache_dir, old))
    t0 = time.time()
    rows = _Rows(npy, n, size)
    try:
        generate_shapes(n, seed, size, workers=os.cpu_count() or 1, out=rows)
        arr = rows.finish({"version": CACHE_VERSION, "size": size})
    finally:
        rows.discard()
    print(f"generated {n} {split} images of the embedded 'shapes' data in {time.time() - t0:.1f}s", file=sys.stderr)
    return arr


# ----------------------------------------------------------------------------------------------------------------
# Tiny ImageNet: find, or download + check + extract.

def download(url, dest, check=None):
    """Download `url` to `dest` via `dest.part` with a progress display; rename only when complete (and when
    `check(part)`, if given, has not raised).

    A `.part` left by an interrupted run is resumed with an HTTP Range request where the server allows it,
    otherwise started again. A finished archive is never confused with a partial one.
    """
    part = dest + ".part"
    have = os.path.getsize(part) if os.path.exists(part) else 0
    req = urllib.request.Request(url, headers={"User-Agent": "context-encoder"})
    if have and url.startswith(("http://", "https://")):
        req.add_header("Range", f"bytes={have}-")
    try:
        r = urllib.request.urlopen(req, timeout=60)
    except urllib.error.HTTPError as e:
        if e.code != 416:   # 416: nothing left to fetch, the .part is whole; the checks will tell
            raise
        total = done = have
    else:
        total, done = _fetch(r, url, part, have)
    print(file=sys.stderr)
    if total and done != total:
        raise DataError(f"{url}: download stopped at {done} of {total} bytes; run again to resume")
    if check is not None:
        check(part)
    os.replace(part, dest)


def _fetch(r, url, part, have):
    """Write the response `r` to `part` (appended if the server resumed at byte `have`); (expected, got) bytes."""
    with r:
        resumed = have and getattr(r, "status", 200) == 206
        total = int(r.headers.get("Content-Length") or 0) + (have if resumed else 0)
        done = have if resumed else 0
        t0, last = time.time(), 0.0
        with open(part, "ab" if resumed else "wb") as f:
            while True:
                chunk = r.read(1 << 20)
                if not chunk:
                    break
                f.write(chunk)
                done += len(chunk)
                if time.time() - last > 0.5:
                    last = time.time()
                    pct = f"{100 * done / total:.0f}% of {total / 1e6:.0f} MB" if total else f"{done / 1e6:.0f} MB"
                    rate = (done - (have if resumed else 0)) / max(last - t0, 1e-9) / 1e6
                    print(f"\rdownloading {url}: {pct} ({rate:.1f} MB/s)   ", end="", file=sys.stderr, flush=True)
    return total, done


def _check_published(part):
    """The default URL's download must be the published archive: TINY_SIZE bytes with MD5 TINY_MD5 (zip CRCs
    alone would pass a re-packed or different archive). A short file is kept to resume; a wrong one deleted."""
    size = os.path.getsize(part)
    if size < TINY_SIZE:
        raise DataError(f"{part}: {size:,} bytes of the {TINY_SIZE:,} of {TINY_URL}; run again to resume")
    h = hashlib.md5(usedforsecurity=False)   # a checksum, not security
    with open(part, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    if size != TINY_SIZE or h.hexdigest() != TINY_MD5:
        os.remove(part)
        raise DataError(f"{part}: not the published Tiny ImageNet archive ({size:,} bytes, MD5 {h.hexdigest()}; "
                        f"expected {TINY_SIZE:,} bytes, MD5 {TINY_MD5}); deleted it: run again to download it "
                        f"again, or fetch {TINY_URL} by hand, check its MD5 and put it in {os.path.dirname(part)}")


def _check_zip(path):
    """Raise DataError unless `path` is a complete zip holding tiny-imagenet-200/train/ (CRCs checked)."""
    hint = ("delete it and run again to download it, or place tiny-imagenet-200.zip (from "
            f"{TINY_URL}) in that folder by hand")
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            if not any(n.startswith("tiny-imagenet-200/train/") for n in names):
                raise DataError(f"{path}: not a Tiny ImageNet archive (no tiny-imagenet-200/train/ in it); {hint}")
            bad = z.testzip()
            if bad is not None:
                raise DataError(f"{path}: archive is corrupt (bad CRC in {bad}); {hint}")
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise DataError(f"{path}: not a readable zip archive ({e}); it may be truncated; {hint}") from None


def ensure_tiny(root, url=None):
    """Return DIR/tiny-imagenet-200, extracting DIR/tiny-imagenet-200.zip or downloading it first if needed."""
    url = url or os.environ.get("CE_TINY_URL") or TINY_URL
    target = os.path.join(root, "tiny-imagenet-200")
    if os.path.isdir(os.path.join(target, "train")):
        return target
    os.makedirs(root, exist_ok=True)
    archive = os.path.join(root, "tiny-imagenet-200.zip")
    if not os.path.isfile(archive):
        try:   # the published checksum applies to the published URL (CE_TINY_URL may serve any archive)
            download(url, archive, _check_published if url == TINY_URL else None)
        except (OSError, ValueError, http.client.HTTPException) as e:  # URLError, timeouts, cut connections
            raise DataError(f"could not download Tiny ImageNet from {url} ({type(e).__name__}: {e}); run again to "
                            f"resume, or download it by hand and put tiny-imagenet-200.zip (or its extracted "
                            f"tiny-imagenet-200/ folder) in {root}") from None
    _check_zip(archive)
    tmp = os.path.join(root, ".tiny-imagenet-200.extracting")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"extracting {archive} ...", file=sys.stderr)
    with zipfile.ZipFile(archive) as z:
        z.extractall(tmp)   # zipfile drops absolute paths and '..' parts, so nothing lands outside tmp
    os.replace(os.path.join(tmp, "tiny-imagenet-200"), target)  # atomic: a half extraction is never used
    shutil.rmtree(tmp, ignore_errors=True)
    return target


# ----------------------------------------------------------------------------------------------------------------
# Photos for `ce_eval.py --image`: inputs, the square the model sees, the result pasted back at full size.

def photo_inputs(paths):
    """Files and folders given to --image -> (image files, a unique output name for each, problems).

    A folder contributes its image files (recursively, as list_images); a folder without any is a problem.
    Two inputs with one stem (a/x.jpg, b/x.png) get names x-1, x-2 (one note line), never one file over another.
    """
    files, bad = [], []
    for p in paths:
        if os.path.isdir(p):
            skipped = {}
            found, other = list_images(p, skipped)
            _listing_note(p, other, skipped)
            files += found
            if not found:
                bad.append(f"{p}: no image files in this folder (looked for {', '.join(sorted(IMAGE_EXTS))})")
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
        print(f"note: {sum(count[s] for s in clashes)} inputs share a name ({', '.join(sorted(clashes))}); "
              "their outputs are numbered in the order given: NAME-1_*, NAME-2_*, ...", file=sys.stderr)
    return files, names, bad


def photo_square(im, size=128):
    """The model's view of a photo: its central square, scaled to size x size. Returns (uint8 (size, size, 3),
    (left, top, side) of that square in the photo)."""
    left, top, side = center_square(*im.size)
    crop = im.crop((left, top, left + side, top + side))
    return np.asarray(crop.resize((size, size), Image.BICUBIC) if side != size else crop), (left, top, side)


def paste_full(im, filled, square, hole):
    """The photo at its own size with only the hole replaced: the hole [a, b)^2 of the filled size x size image
    (uint8), scaled back to the square's scale and pasted; every other pixel of `im` is kept bit for bit.
    Returns (image, (x, y, side) of the replaced square in the photo)."""
    left, top, side = square
    scale = side / filled.shape[0]
    a, b = round(hole[0] * scale), round(hole[1] * scale)
    # the destination pixels a..b-1 of the square cover exactly [a / scale, b / scale) of the small image
    patch = Image.fromarray(filled).resize((b - a, b - a), Image.BICUBIC, box=(a / scale, a / scale,
                                                                              b / scale, b / scale))
    out = im.copy()
    out.paste(patch, (left + a, top + a))
    return out, (left + a, top + a, b - a)


def shown(path):
    """A path as printable text: bytes that are not UTF-8 (kept by Python as surrogates) shown as U+FFFD."""
    return os.fsencode(path).decode("utf-8", "replace")


# ----------------------------------------------------------------------------------------------------------------
# Datasets -> uint8 arrays (N, S, S, 3).

def _split_files(files, val_fraction=0.05):
    """Deterministic train/val split of one folder: by a hash of each file name (stable when files are added).
    Names are hashed as the file system's bytes (os.fsencode), so a name that is not valid UTF-8 is fine."""
    order = sorted(files, key=lambda f: (zlib.crc32(os.fsencode(os.path.basename(f))), f))
    n_val = min(max(1, int(len(files) * val_fraction)), 1000) if len(files) > 1 else 0
    val = set(order[:n_val])
    return [f for f in files if f not in val], sorted(val)


def _folder_files(data, root, split):
    """The files of one split of --data imagenet|folder, and (other files, skipped-entry counts) of the listing."""
    has_splits = os.path.isdir(os.path.join(root, "train")) and os.path.isdir(os.path.join(root, "val"))
    if data == "imagenet" and not has_splits:
        raise DataError(f"{root}: --data imagenet needs {root}/train/<class>/* and {root}/val/; "
                        "use --data folder for a plain folder of images")
    skipped = {}
    if has_splits:
        if split == "test" and not os.path.isdir(os.path.join(root, "test")):
            raise DataError(f"{root}: no test/ folder; use --split val")
        files, other = list_images(os.path.join(root, split), skipped)
    elif split == "test":   # a plain folder is split into train and val only: never evaluate val as "test"
        raise DataError(f"{root}: a plain folder of images has a train and a held-out (val) split only (no "
                        "train/, val/, test/ folders); use --split val")
    else:
        files, other = list_images(root, skipped)
        files = _split_files(files)[0 if split == "train" else 1]
    return files, other, skipped


def dataset_files(data, root, split):
    """The image files of one split of --data tiny|imagenet|folder, and the folder to key the cache on."""
    if data != "tiny" and not os.path.isdir(root):
        raise DataError(f"{root}: data root does not exist or is not a folder; pass --data-root DIR pointing at "
                        "your images")
    if data == "tiny":
        base = ensure_tiny(root, os.environ.get("CE_TINY_URL"))
        sub = {"train": "train", "val": os.path.join("val", "images"), "test": os.path.join("test", "images")}[split]
        skipped = {}
        files, other = list_images(os.path.join(base, sub), skipped)
        other = 0   # Tiny ImageNet's own annotation files are expected there
    elif data in ("imagenet", "folder"):
        files, other, skipped = _folder_files(data, root, split)
    else:
        raise DataError(f"unknown dataset {data!r}")
    _listing_note(root, other, skipped)
    if not files:
        raise DataError(f"{root}: no image files found for split '{split}' of --data {data} "
                        f"(looked for {', '.join(sorted(IMAGE_EXTS))})")
    return files


def load_split(data, root, split, size=128, shapes_n=10000):
    """uint8 (N, S, S, 3) images of one split, decoded once and cached under the data root."""
    if data == "shapes":
        if split == "test":
            raise DataError("the embedded shapes data has a train and a held-out (val) split only; use --split val")
        return _shapes_split(root, split, size, shapes_n if split == "train" else SHAPES_VAL)
    files = dataset_files(data, root, split)
    arr, meta = cached_images(files, size, os.path.join(root, ".ce_cache"), f"{data}-{split}", root)
    _report(meta, f"{data}/{split}")
    if len(arr) == 0:
        raise DataError(f"{root}: none of the {len(files)} image files of split '{split}' could be decoded")
    return arr
