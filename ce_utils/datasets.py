"""Datasets on disk -> uint8 arrays (N, S, S, 3), decoded once and cached: the file side of the
data, nothing from the paper (ce_data.py makes the masked batches from these arrays).

    python -c "from ce_utils import datasets; print(datasets.load_split('shapes', 'data', 'val'))"

--data shapes: embedded, offline, generated (ce_utils/synthetic.py); tiny: Tiny ImageNet, downloaded
on first use (ce_utils/tinyimagenet.py); imagenet: DIR/train/<class>/*, DIR/val/...; folder: the
same, or any folder of images (searched recursively, a share held out by name hash). split_files
reads these layouts for training and evaluation, ce_utils/labelled.py (with classes) for the
linear probe (ce_probe.py).

Every image file is opened by ce_utils/imagefiles.py (one decoding path). Each split is decoded
into a checksummed cache on disk (ce_utils/diskcache.py).
"""
import contextlib
import errno
import multiprocessing as mp
import os
import re
import sys
import time
import zlib


from ce_utils import cli, diskcache, progress, synthetic, tinyimagenet
from ce_utils.imagefiles import IMAGE_EXTS, decode_image, read_rgb  # one decoding path
from ce_utils.cli import DataError

SHAPES_VAL = 512  # fixed held-out split of the embedded data, generated from its own seed
SHAPES_SEEDS = {"train": 1, "val": 2}   # the embedded data's two sets (synthetic.make_shapes)
VAL_FRACTION, VAL_MAX = 0.05, 1000   # a plain folder's held-out split: this share, at most this

# ------------------------------------------------------------------------------------------------
# Processes for decoding and for generating the embedded data (ce_utils/synthetic.py).

def _pool(workers):
    """A process pool for decoding. Not fork: forking a process whose torch threads hold locks
    can deadlock the children; forkserver forks workers from a clean process that imported this
    module."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
    else:
        ctx = mp.get_context("spawn")
    return ctx.Pool(workers)


def generate_shapes(n, seed, size=128, workers=1, out=None):
    """The embedded dataset (synthetic.make_shapes): n images, uint8 (n, size, size, 3), on
    `workers` processes. out: a diskcache.Rows to stream them into (the cache file); default: a
    new array."""
    rows = out if out is not None else diskcache.Rows(None, n, size)
    show = progress.Progress(n, f"generating {n} images of the embedded 'shapes' data", above=2048)
    jobs = [(seed, a, min(a + 256, n), size) for a in range(0, n, 256)]
    with contextlib.ExitStack() as stack:
        # a pool pays off only for many images on many cores: each worker first imports this module
        # and torch
        mapper = stack.enter_context(_pool(workers)).imap if workers >= 4 and n >= 20000 else map
        for block in mapper(synthetic.make_block, jobs):
            rows.add(block)
            show(rows.n)
    return rows if out is not None else rows.finish()


def _decode_worker(job):
    path, size, side = job
    try:
        arr, up = decode_image(path, size, side)
        return arr, up, None
    except DataError as e:
        return None, False, str(e)


# ------------------------------------------------------------------------------------------------
# Listing a folder: images used, everything else counted.

def list_images(root, skipped=None):
    """Image files below `root` (recursive, sorted, hidden names skipped, symbolic links followed
    once) and the number of other regular files ignored. `skipped`, if given, is a dict that gets
    the counts of entries that cannot be used: "special" files (FIFOs, sockets, devices),
    "dangling" links, "looping" links (a link to itself, or links to each other), "unreadable"
    folders, "unreachable" entries (whose type cannot be read: a link into a folder we may not
    enter), and a few "examples"."""
    files, other = [], 0
    skipped = {} if skipped is None else skipped
    seen, stack = set(), [root]
    while stack:                  # depth first, in name order: the order os.walk gives
        folder = stack.pop()
        try:
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in seen:     # a link loop, or a folder linked twice: once
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
                what = "looping" if err.errno == errno.ELOOP else "unreachable"
                _count(skipped, what, f"{e.path} ({err.strerror or err})")
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


def listing_note(root, other, skipped):
    """One line about the entries of a data folder that are not used (a counted skip)."""
    parts = [f"ignored {other} file(s) that are not images (by extension)"] if other else []
    for key, words in (("special", "special file(s) (FIFO, socket, device)"),
                       ("dangling", "symbolic link(s) to missing files"),
                       ("looping", "symbolic link(s) that loop (to themselves or each other)"),
                       ("unreadable", "unreadable folder(s)"),
                       ("unreachable", "entries that cannot be examined (e.g. a link into "
                                       "a folder without permission)")):
        if skipped.get(key):
            parts.append(f"skipped {skipped[key]} {words}")
    if parts:
        level = "warning" if len(parts) > (1 if other else 0) else "note"
        ex = f", e.g. {'; '.join(skipped['examples'])}" if skipped.get("examples") else ""
        print(f"{level}: {root}: {'; '.join(parts)}{ex}", file=sys.stderr)


# ------------------------------------------------------------------------------------------------
# Decoding a split into the cache (ce_utils/diskcache.py: the files on disk and their checksums).

class OtherSize(Exception):
    """A split kept at its images' own side holds an image of another size."""


def decode_files(files, size, desc, workers=None, out=None, side=None):
    """Decode `files` in parallel (all cores) into uint8 (N, size, size, 3); unreadable files are
    skipped. side < size: every file must be a side x side square, kept as it is (N, side, side,
    3), else OtherSize. out: a diskcache.Rows to stream the images into (the cache file);
    default: a new array. Returns (the array or `out`, stats): skipped and upsampled counts, a
    few skipped."""
    n = len(files)
    rows = out if out is not None else diskcache.Rows(None, n, side or size)
    skipped, upsampled = [], 0
    show = progress.Progress(n, desc)
    workers = workers or min(os.cpu_count() or 1, 32)
    jobs = [(f, size, side) for f in files]
    pool = _pool(workers) if n >= 64 and workers > 1 else None
    try:
        results = (pool.imap(_decode_worker, jobs, chunksize=32) if pool
                   else map(_decode_worker, jobs))
        for i, (arr, up, err) in enumerate(results):
            if arr is None and err is None:
                raise OtherSize(f"{files[i]} is not {side}x{side} px like the first image")
            if arr is None:
                skipped.append(err)
            else:
                rows.add(arr[None])
                upsampled += up
            show(i + 1)
    finally:
        if pool is not None:
            pool.terminate()
    stats = {"skipped": len(skipped), "skipped_examples": skipped[:3], "upsampled": int(upsampled)}
    return (rows if out is not None else rows.finish()), stats


def cached_images(files, size, cache_dir, name, root, workers=None):
    """Decode `files` once into DIR/.ce_cache/NAME-SIZE-KEY.npy and memory-map it on later runs.

    The key hashes the file list, sizes, mtimes and load size: a changed folder never reuses a
    stale cache; one whose shape or checksums disagree with its metadata is rebuilt. The file is
    written as the images are decoded (never the whole split in memory) under a temp name, and
    renamed when complete. Images smaller than the load size, all of one square size (Tiny
    ImageNet's 64 px), are kept at that size ("side" in the metadata): batches upsample them
    (ce_data.upsample, the same pixels), and the cache holds (size / side)**2 times fewer bytes.
    """
    key = diskcache.files_key(files, size, root)
    npy = os.path.join(cache_dir, f"{name}-{size}-{key}.npy")
    want = {"version": diskcache.CACHE_VERSION, "size": size, "key": key}
    arr, meta = diskcache.read_cache(npy, npy[:-4] + ".json", want)
    if arr is not None:
        return arr, meta
    diskcache.remove_dead_temps(cache_dir, f"{name}-")   # a killed build's, of any load size
    side = _own_side(files, size)
    try:
        arr, meta = _decode_into(npy, files, size, side, name, workers, want)
    except OtherSize as e:           # images of several sizes: all at the load size
        print(f"note: {e}; caching {name} at {size}px", file=sys.stderr)
        arr, meta = _decode_into(npy, files, size, size, name, workers, want)
    return arr, {**meta, "n": len(arr)}


def _own_side(files, size):
    """The side a split is cached at: its first readable image's if that is a square smaller than
    `size` (decode_files checks every other image against it), else `size`."""
    for f in files[:8]:
        with contextlib.suppress(DataError):
            w, h = read_rgb(f, draft=size).size
            return w if w == h and w < size else size
    return size


def _decode_into(npy, files, size, side, name, workers, want):
    """decode_files into the cache file `npy` at `side` px; caches of an earlier state of the split
    and load size are removed. Returns (the memory-mapped array, its metadata)."""
    cache_dir, key = os.path.dirname(npy), want["key"]
    rows = diskcache.Rows(npy, len(files), side)
    try:
        at = f"{size}px" if side == size else f"{side}px (upsampled to {size}px per batch)"
        desc = f"decoding {name} ({len(files)} files) into a {at} uint8 cache"
        _, stats = decode_files(files, size, desc, workers, out=rows, side=side)
        meta = {**want, "side": side, "n_files": len(files), **stats}
        if os.path.isdir(cache_dir):
            for old in os.listdir(cache_dir):  # caches of an earlier state of this split and size
                if (old.startswith(f"{name}-{size}-") and not old.startswith(f"{name}-{size}-{key}")
                        and cli.TMP_SUFFIX not in old):
                    # another process (a DDP rank) may have removed it first
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(os.path.join(cache_dir, old))
        arr = rows.finish(meta)
    finally:
        rows.discard()     # an error or Ctrl-C before finish(): the temp file goes (after: no-op)
    return arr, meta


def _report(meta, what):
    """One warning line for skipped or upsampled images (a documented, counted skip)."""
    if meta.get("skipped"):
        ex = "; ".join(meta.get("skipped_examples", []))
        print(f"warning: {what}: skipped {meta['skipped']} unreadable image file(s), e.g. {ex}",
              file=sys.stderr)
    if meta.get("upsampled"):
        print(f"note: {what}: {meta['upsampled']} image(s) smaller than {meta['size']}px were "
              "upsampled", file=sys.stderr)


def _shapes_split(root, split, size, n):
    """The embedded data's split, from its cache or generated into it (ce_utils/synthetic.py)."""
    seed = SHAPES_SEEDS[split]            # the held-out split has its own seed
    cache_dir = os.path.join(root, ".ce_cache")
    stem = f"shapes-{split}-{size}-n{n}-v"
    npy = os.path.join(cache_dir, f"{stem}{diskcache.CACHE_VERSION}.npy")
    want = {"version": diskcache.CACHE_VERSION, "size": size, "n": n}
    arr, _ = diskcache.read_cache(npy, npy[:-4] + ".json", want)
    if arr is not None:
        return arr
    diskcache.remove_dead_temps(cache_dir, f"shapes-{split}-")   # a killed build's, any size
    with contextlib.suppress(OSError):   # caches of earlier versions of the generator
        for old in os.listdir(cache_dir):
            if old.startswith(stem) and not old.startswith(f"{stem}{diskcache.CACHE_VERSION}."):
                os.remove(os.path.join(cache_dir, old))
    t0 = time.time()
    rows = diskcache.Rows(npy, n, size)
    try:
        generate_shapes(n, seed, size, workers=os.cpu_count() or 1, out=rows)
        arr = rows.finish({"version": diskcache.CACHE_VERSION, "size": size})
    finally:
        rows.discard()
    print(f"generated {n} {split} images of the embedded 'shapes' data in {time.time() - t0:.1f}s",
          file=sys.stderr)
    return arr


# ------------------------------------------------------------------------------------------------
# The layouts on disk: the files of each split and their classes (one reader: train, eval, probe).

def hash_order(files):
    """Files in an order unrelated to their numbering: by the crc32 of each name's bytes as the file
    system holds them (os.fsencode: a name that is not valid UTF-8 hashes too)."""
    return sorted(files, key=lambda f: (zlib.crc32(os.fsencode(os.path.basename(f))), f))


def _split_files(files, val_fraction=VAL_FRACTION):
    """(train, val) of one plain folder: the first files in hash order are held out, so the split
    stays put when files are added."""
    order = hash_order(files)
    n_val = min(max(1, int(len(files) * val_fraction)), VAL_MAX) if len(files) > 1 else 0
    val = set(order[:n_val])
    return [f for f in files if f not in val], sorted(val)


def _folder_files(data, root, split, val_fraction):
    """One split of --data imagenet|folder: (files, the folder whose subfolders are the classes,
    other files, skipped entries). DIR/train, DIR/val, DIR/test if there, else DIR split by hash."""
    has_splits = all(os.path.isdir(os.path.join(root, s)) for s in ("train", "val"))
    if data == "imagenet" and not has_splits:
        raise DataError(f"{root}: --data imagenet needs {root}/train/<class>/* and {root}/val/; "
                        "use --data folder for a plain folder of images")
    skipped = {}
    if has_splits:
        if split == "test" and not os.path.isdir(os.path.join(root, "test")):
            raise DataError(f"{root}: no test/ folder; use --split val")
        files, other = list_images(os.path.join(root, split), skipped)
        return files, os.path.join(root, split), other, skipped
    if split == "test":   # a plain folder is split into train and val only: never val as "test"
        raise DataError(f"{root}: a plain folder of images has a train and a held-out (val) split "
                        "only (no train/, val/, test/ folders); use --split val")
    files, other = list_images(root, skipped)
    return _split_files(files, val_fraction)[0 if split == "train" else 1], root, other, skipped


def _natural(path):
    """Sort key of a file name with its numbers compared as numbers: val_2 before val_10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", os.path.basename(path))]


def tiny_subset(files, split, train_per_class=0, val_images=0):
    """--train-per-class N / --val-images N of --data tiny (0: all), in the listing's order: the
    first N files of each class in sorted name order (n01443537_0, _1, _10, _100, ...: how the
    README's subset was cut), and val_0 ... val_N-1, the first N as the official annotations
    list them (a name sort would give val_0, val_1, val_10, ...)."""
    if split == "train" and train_per_class:
        by_class = {}
        for f in sorted(files):
            by_class.setdefault(os.path.dirname(f), []).append(f)   # train/<wnid>/images
        keep = {f for fs in by_class.values() for f in fs[:train_per_class]}
    elif split == "val" and val_images:
        keep = set(sorted(files, key=_natural)[:val_images])
    else:
        return files
    return [f for f in files if f in keep]


def split_files(data, root, split, val_fraction=VAL_FRACTION, train_per_class=0, val_images=0):
    """The image files of one split of --data tiny|imagenet|folder, and the folder whose
    subfolders name their classes (None for Tiny ImageNet's val and test: see
    labelled.labelled_files).
    train_per_class, val_images: a subset of Tiny ImageNet (tiny_subset)."""
    if data != "tiny" and (train_per_class or val_images):
        raise DataError(f"{root}: --train-per-class/--val-images select a subset of --data tiny "
                        f"only, not of --data {data}; drop them")
    if data != "tiny" and not os.path.isdir(root):
        raise DataError(f"{root}: data root does not exist or is not a folder; pass --data-root "
                        "DIR pointing at your images")
    if data == "tiny":
        base = tinyimagenet.ensure_tiny(root, os.environ.get("CE_TINY_URL"))
        sub = {"train": "train", "val": os.path.join("val", "images"),
               "test": os.path.join("test", "images")}[split]
        skipped = {}
        files, _ = list_images(os.path.join(base, sub), skipped)
        files = tiny_subset(files, split, train_per_class, val_images)
        other = 0   # Tiny ImageNet's own annotation files are expected there
        classes = os.path.join(base, "train") if split == "train" else None
    elif data in ("imagenet", "folder"):
        files, classes, other, skipped = _folder_files(data, root, split, val_fraction)
    else:
        raise DataError(f"unknown dataset {data!r}")
    listing_note(root, other, skipped)
    if not files:
        raise DataError(f"{root}: no image files found for split '{split}' of --data {data} "
                        f"(looked for {', '.join(sorted(IMAGE_EXTS))})")
    return files, classes


def dataset_files(data, root, split, **subset):
    """The image files of one split of --data tiny|imagenet|folder (what train and eval decode);
    subset: train_per_class, val_images (split_files)."""
    return split_files(data, root, split, **subset)[0]


SUBSET_FLAGS = ("train_per_class", "val_images")   # ce_train flags of a Tiny ImageNet subset


def add_subset_flags(add):
    """The flags of SUBSET_FLAGS, for every script that reads Tiny ImageNet's splits (ce_train.py,
    ce_probe.py): one definition, one rule."""
    add("--train-per-class", type=cli.count, default=0,
        help="tiny: only the first N training images of each class, in sorted name order (0: all "
             "500)")
    add("--val-images", type=cli.count, default=0,
        help="tiny: only the first N validation images, val_0 ... val_N-1 (0: all 10,000). With "
             "--train-per-class 100: the README's subset")


def load_split(data, root, split, size=128, shapes_n=10000, train_per_class=0, val_images=0,
               listed=None):
    """uint8 (N, S, S, 3) images of one split, decoded once and cached under the data root (the
    folder holding it for a zip). S is `size`, or less for images smaller than it (kept at their
    own size: ce_data.Batches and ce_data.eval_batch upsample them to `size`). train_per_class,
    val_images: a Tiny ImageNet subset, cached under its own name (a full-set cache and a
    subset's do not replace each other). listed: a list that gets the split's file names,
    relative to the data root (none for shapes)."""
    if data == "shapes":
        if split == "test":
            raise DataError("the embedded shapes data has a train and a held-out (val) split only; "
                            "use --split val")
        return _shapes_split(root, split, size, shapes_n if split == "train" else SHAPES_VAL)
    files = dataset_files(data, root, split, train_per_class=train_per_class,
                          val_images=val_images)
    name = f"{data}-{split}" + (f"-{train_per_class}-per-class" if split == "train"
                                and train_per_class else f"-first{val_images}"
                                if split == "val" and val_images else "")
    root = tinyimagenet.data_dir(root) if data == "tiny" else root
    if listed is not None:
        listed += [os.path.relpath(f, root) for f in files]
    arr, meta = cached_images(files, size, os.path.join(root, ".ce_cache"), name, root)
    _report(meta, f"{data}/{split}")
    if len(arr) == 0:
        raise DataError(f"{root}: none of the {len(files)} image files of split '{split}' could be "
                        "decoded")
    return arr
