"""Datasets on disk -> uint8 arrays (N, S, S, 3), decoded once and cached: the file side of the data, with nothing
from the paper in it (ce_data.py makes the masked batches from these arrays).

    python -c "import ce_datasets as d; print(d.load_split('shapes', 'data', 'val').shape)"

--data shapes: embedded, offline, procedurally generated (ce_shapes.py); tiny: Tiny ImageNet, downloaded on first
use; imagenet: DIR/train/<class>/*, DIR/val/...; folder: any folder of images, searched recursively.
"""
import contextlib
import hashlib
import http.client
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
import zipfile
import zlib

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

import ce_cli
import ce_shapes
from ce_cli import DataError

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated JPEG is an error (counted and skipped), not grey pixels

TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
CACHE_VERSION = 1
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




def generate_shapes(n, seed, size=128, workers=1):
    """The embedded dataset (ce_shapes.make_shapes): n images, uint8 (n, size, size, 3), on `workers` processes."""
    if workers > 1 and n > 256:
        with _pool(workers) as pool:
            return ce_shapes.make_shapes(n, seed, size, pool.map)
    return ce_shapes.make_shapes(n, seed, size)


# ----------------------------------------------------------------------------------------------------------------
# Decoding any image file into a centre-cropped uint8 square.

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


def decode_image(path, size):
    """Decode one file: shorter side resized to `size`, centre-cropped square. Returns (uint8 (S, S, 3), upsampled)."""
    with Image.open(path) as im:
        if im.format == "JPEG" and im.mode in ("RGB", "L"):
            im.draft(im.mode, (size, size))  # let libjpeg decode at a reduced scale that stays >= size
        im = _to_rgb(im)
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
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return None, False, f"{type(e).__name__}: {e}"


def list_images(root):
    """Image files below `root` (recursive, sorted) and the number of other files ignored."""
    files, other = [], 0
    for d, dirs, names in os.walk(root):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))   # skip .ce_cache and hidden folders
        for name in sorted(names):
            if name.startswith("."):
                continue
            if os.path.splitext(name)[1].lower() in IMAGE_EXTS:
                files.append(os.path.join(d, name))
            else:
                other += 1
    return files, other


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


def _files_key(files, size, root):
    """A digest of the file list (relative paths, sizes, mtimes) and load size: a changed folder -> a new cache."""
    h = hashlib.sha1(f"v{CACHE_VERSION} size={size}\n".encode())
    for f in files:
        st = os.stat(f)
        h.update(f"{os.path.relpath(f, root)}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _read_cache(npy, meta_path, expect):
    """The cached array (memory-mapped) if its metadata and shape match `expect`, else None (stale or foreign)."""
    if not (os.path.isfile(npy) and os.path.isfile(meta_path)):
        return None, None
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        arr = np.load(npy, mmap_mode="c")  # copy-on-write: writable for torch, never written back
        ok = (all(meta.get(k) == v for k, v in expect.items()) and arr.dtype == np.uint8
              and arr.shape == (meta["n"], expect["size"], expect["size"], 3))
    except (OSError, ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        print(f"warning: cache {npy} is stale or damaged; rebuilding it", file=sys.stderr)
        return None, None
    return arr, meta


def decode_files(files, size, desc, workers=None):
    """Decode `files` in parallel (all cores) into uint8 (N, size, size, 3); unreadable files are skipped.

    Returns (array, stats) where stats counts skipped and upsampled files and names a few skipped ones.
    """
    n = len(files)
    out = np.empty((n, size, size, 3), np.uint8)
    keep = np.zeros(n, bool)
    skipped, upsampled = [], 0
    progress = _Progress(n, desc)
    workers = workers or min(os.cpu_count() or 1, 32)
    jobs = [(f, size) for f in files]
    if n < 64 or workers == 1:
        results = map(_decode_worker, jobs)
        pool = None
    else:
        pool = _pool(workers)
        results = pool.imap(_decode_worker, jobs, chunksize=32)
    try:
        for i, (arr, up, err) in enumerate(results):
            if arr is None:
                skipped.append(f"{files[i]} ({err})")
            else:
                out[i], keep[i] = arr, True
                upsampled += up
            progress(i + 1)
        progress(n, final=True)
    finally:
        if pool is not None:
            pool.terminate()
    return out[keep] if not keep.all() else out, {"skipped": len(skipped), "skipped_examples": skipped[:3],
                                                   "upsampled": int(upsampled)}


def cached_images(files, size, cache_dir, name, root):
    """Decode `files` once into DIR/.ce_cache/NAME-SIZE-KEY.npy and memory-map it on later runs.

    The key hashes the file list, sizes, mtimes and load size, so a changed folder never reuses a stale cache;
    a cache whose shape disagrees with its metadata is rebuilt. Writes are atomic (temp file + rename).
    """
    key = _files_key(files, size, root)
    npy = os.path.join(cache_dir, f"{name}-{size}-{key}.npy")
    meta_path = npy[:-4] + ".json"
    arr, meta = _read_cache(npy, meta_path, {"version": CACHE_VERSION, "size": size, "key": key})
    if arr is not None:
        return arr, meta
    arr, stats = decode_files(files, size, f"decoding {name} ({len(files)} files) into a {size}px uint8 cache")
    meta = {"version": CACHE_VERSION, "size": size, "key": key, "n": len(arr), "n_files": len(files), **stats}
    if os.path.isdir(cache_dir):
        for old in os.listdir(cache_dir):  # drop caches of an earlier state of the same split and size
            if old.startswith(f"{name}-{size}-") and not old.startswith(f"{name}-{size}-{key}"):
                with contextlib.suppress(FileNotFoundError):   # another process (a DDP rank) got there first
                    os.remove(os.path.join(cache_dir, old))
    _write_cache(npy, arr, meta)
    return arr, meta


def _write_cache(npy, arr, meta):
    """Save array + metadata, each atomically; the metadata goes last, so a cache is only used once complete."""
    try:
        os.makedirs(os.path.dirname(npy), exist_ok=True)
        ce_cli.atomic_write(npy, lambda f: np.save(f, arr))
        ce_cli.atomic_write(npy[:-4] + ".json", json.dumps(meta))
    except OSError as e:
        print(f"warning: could not write the cache {npy} ({e}); images will be made again next run", file=sys.stderr)


def _report(meta, what):
    """One warning line for skipped or upsampled images (a documented, counted skip)."""
    if meta.get("skipped"):
        ex = "; ".join(meta.get("skipped_examples", []))
        print(f"warning: {what}: skipped {meta['skipped']} unreadable image file(s), e.g. {ex}", file=sys.stderr)
    if meta.get("upsampled"):
        print(f"note: {what}: {meta['upsampled']} image(s) smaller than {meta['size']}px were upsampled",
              file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------------
# Tiny ImageNet: find, or download + check + extract.

def download(url, dest):
    """Download `url` to `dest` via `dest.part` with a progress display; rename only when complete.

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
        if e.code != 416:   # 416: nothing left to fetch, the .part is whole; the zip check will tell
            raise
        os.replace(part, dest)
        return
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
    print(file=sys.stderr)
    if total and done != total:
        raise DataError(f"{url}: download stopped at {done} of {total} bytes; run again to resume")
    os.replace(part, dest)


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
        try:
            download(url, archive)
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
# Datasets -> uint8 arrays (N, S, S, 3).

def _split_files(files, val_fraction=0.05):
    """Deterministic train/val split of one folder: by a hash of each relative path (stable when files are added)."""
    order = sorted(files, key=lambda f: (zlib.crc32(os.path.basename(f).encode()), f))
    n_val = min(max(1, int(len(files) * val_fraction)), 1000) if len(files) > 1 else 0
    val = set(order[:n_val])
    return [f for f in files if f not in val], sorted(val)


def dataset_files(data, root, split):
    """The image files of one split of --data tiny|imagenet|folder, and the folder to key the cache on."""
    if data != "tiny" and not os.path.isdir(root):
        raise DataError(f"{root}: data root does not exist or is not a folder; pass --data-root DIR pointing at "
                        "your images")
    if data == "tiny":
        base = ensure_tiny(root, os.environ.get("CE_TINY_URL"))
        sub = {"train": "train", "val": os.path.join("val", "images"), "test": os.path.join("test", "images")}[split]
        files, _ = list_images(os.path.join(base, sub))
    elif data in ("imagenet", "folder"):
        has_splits = os.path.isdir(os.path.join(root, "train")) and os.path.isdir(os.path.join(root, "val"))
        if data == "imagenet" and not has_splits:
            raise DataError(f"{root}: --data imagenet needs {root}/train/<class>/* and {root}/val/; "
                            "use --data folder for a plain folder of images")
        if has_splits:
            if split == "test" and not os.path.isdir(os.path.join(root, "test")):
                raise DataError(f"{root}: no test/ folder; use --split val")
            files, other = list_images(os.path.join(root, split))
        else:
            files, other = list_images(root)
            files = _split_files(files)[0 if split == "train" else 1]
        if other:
            print(f"note: {root}: ignored {other} file(s) that are not images (by extension)", file=sys.stderr)
    else:
        raise DataError(f"unknown dataset {data!r}")
    if not files:
        raise DataError(f"{root}: no image files found for split '{split}' of --data {data} "
                        f"(looked for {', '.join(sorted(IMAGE_EXTS))})")
    return files


def load_split(data, root, split, size=128, shapes_n=10000):
    """uint8 (N, S, S, 3) images of one split, decoded once and cached under the data root."""
    if data == "shapes":
        if split == "test":
            raise DataError("the embedded shapes data has a train and a held-out (val) split only; use --split val")
        n, seed = (shapes_n, 1) if split == "train" else (SHAPES_VAL, 2)   # fixed held-out split
        npy = os.path.join(root, ".ce_cache", f"shapes-{split}-{size}-n{n}-v{CACHE_VERSION}.npy")
        arr, _ = _read_cache(npy, npy[:-4] + ".json", {"version": CACHE_VERSION, "size": size, "n": n})
        if arr is None:
            t0 = time.time()
            arr = generate_shapes(n, seed, size, workers=os.cpu_count() or 1)
            print(f"generated {n} {split} images of the embedded 'shapes' data in {time.time() - t0:.1f}s",
                  file=sys.stderr)
            _write_cache(npy, arr, {"version": CACHE_VERSION, "size": size, "n": n})
        return arr
    files = dataset_files(data, root, split)
    arr, meta = cached_images(files, size, os.path.join(root, ".ce_cache"), f"{data}-{split}", root)
    _report(meta, f"{data}/{split}")
    if len(arr) == 0:
        raise DataError(f"{root}: none of the {len(files)} image files of split '{split}' could be decoded")
    return arr

