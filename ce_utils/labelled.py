"""Labelled images for ce_probe.py (the probe and fine-tuning): the files of each split exactly as
ce_train.py reads them, with the class of each (its folder, or Tiny ImageNet's val annotations),
decoded at the size a probe needs; and the embedded shapes data labelled by its top shape.

    python -c "from ce_utils import labelled; print(labelled.shapes_labelled('val', 3, 64)[1])"
"""
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import torch
from PIL import Image

from ce_utils import cli, datasets, imagefiles, synthetic, tinyimagenet
from ce_utils.cli import DataError
from ce_utils.progress import Progress

def _by_class(files, folder):
    """{first subfolder of `folder`: [its files]}, and the number of files directly in `folder`."""
    classes, loose = {}, 0
    for f in files:
        parts = os.path.relpath(f, folder).split(os.sep)
        if len(parts) < 2:
            loose += 1
        else:
            classes.setdefault(parts[0], []).append(f)
    return classes, loose


def _tiny_val(base, files, index):
    """Tiny ImageNet's held-out files labelled by val/val_annotations.txt (file <tab> wnid ...)."""
    path = os.path.join(base, "val", "val_annotations.txt")
    if not os.path.isfile(path):
        raise DataError(f"{path}: missing; the Tiny ImageNet validation labels are needed here")
    ann, bad = {}, 0
    with open(path) as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 2:
                ann[fields[0]] = fields[1]
            elif line.strip():
                bad += 1
    if not ann:
        raise DataError(f"{path}: no 'file<TAB>wnid' lines; the Tiny ImageNet validation labels "
                        "are missing")
    val = [(f, index[ann[os.path.basename(f)]]) for f in files
           if ann.get(os.path.basename(f)) in index]
    if len(val) < len(files) or bad:
        print(f"note: {base}/val: skipped {len(files) - len(val)} image(s) with no annotation or a "
              f"class absent from train/, and {bad} malformed annotation line(s)", file=sys.stderr)
    return val


def labelled_files(data, root, val_fraction=datasets.VAL_FRACTION, **subset):
    """(train, val, class names) for the linear probe: the files of each split as split_files gives
    them to training, as lists of (path, class index); a class is a file's first folder below its
    split (train/ and val/, or a plain DIR), Tiny ImageNet's val is labelled by its annotations.
    subset: train_per_class, val_images (split_files)."""
    given = root                               # a zip given as the root: extracted beside it
    if data == "tiny":
        root = tinyimagenet.data_dir(root)
    if not os.path.isdir(root):
        raise DataError(f"{root}: data root does not exist or is not a folder; pass --data-root "
                        "DIR")
    zipped = os.path.isfile(given) or os.path.isfile(os.path.join(root, "tiny-imagenet-200.zip"))
    if data == "tiny" and not zipped and tinyimagenet.find_tiny(root) is None:   # no download
        raise DataError(f"{root}: no Tiny ImageNet here (expected {root}/tiny-imagenet-200/train/ "
                        "and val/val_annotations.txt, or tiny-imagenet-200.zip); run `python "
                        f"ce_train.py --data tiny --data-root {root}` once to download it, or "
                        "pass --data-root the zip or the extracted folder")
    root = given if zipped else root
    files, folder = datasets.split_files(data, root, "train", val_fraction, **subset)
    train_c, loose = _by_class(files, folder)
    names = sorted(train_c)
    index = {c: i for i, c in enumerate(names)}
    files, folder = datasets.split_files(data, root, "val", val_fraction, **subset)
    if folder is None:
        val = _tiny_val(tinyimagenet.find_tiny(tinyimagenet.data_dir(root)), files, index)
    else:
        val_c, val_loose = _by_class(files, folder)
        if val_loose and folder != root:
            raise DataError(f"{folder}: {val_loose} image(s) directly in val/, not in class "
                            "folders (ImageNet's flat validation layout); sort them into "
                            "val/<class>/ first")
        loose += val_loose
        extra = sorted(set(val_c) - set(index))
        if extra:
            print(f"note: {folder}: skipped class folder(s) absent from train/: "
                  f"{', '.join(extra[:5])}", file=sys.stderr)
        val = [(f, index[c]) for c in names for f in val_c.get(c, [])]
    if loose:
        print(f"note: {root}: ignored {loose} image(s) outside class subfolders", file=sys.stderr)
    return [(f, index[c]) for c in names for f in train_c[c]], val, names


SHAPES_TRAIN = 10000   # --data shapes --max-train 0: ce_train.py's --shapes-n default

def _check_classes(train, val, names, root):
    if len(names) < 2 or not val:
        raise DataError(f"{root}: a probe needs labelled images of at least 2 classes in both "
                        f"splits (found {len(names)} class(es), {len(train)} train and {len(val)} "
                        "held-out images)")


def balanced_subset(items, n):
    """At most n items, the same number from each class (round robin over classes, hash order
    within a class): a short CPU run still sees every class. n <= 0: all."""
    if n <= 0 or n >= len(items):
        return items
    per = {}
    for f, y in items:
        per.setdefault(y, []).append(f)
    queues = [datasets.hash_order(per[y]) for y in sorted(per)]
    out = []
    for k in range(max(len(q) for q in queues)):
        out += [(q[k], y) for q, y in zip(queues, sorted(per)) if k < len(q)]
    return out[:n]


def _decode_one(job):
    path, size = job
    try:
        arr, up = imagefiles.decode_image(path, size)
        return arr, up, None
    except cli.DataError as e:        # read_rgb's one-line reason (unreadable, special file, bomb)
        return None, False, str(e)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return None, False, f"{path} ({type(e).__name__}: {e})"


def decode_labelled(items, size, desc):
    """Decode (path, label) items at `size` px (threads): uint8 (N, S, S, 3) tensor, int64 labels;
    unreadable files are skipped and counted."""
    show, bad, up = Progress(len(items), f"decoding {desc} at {size}px", every=1.0), [], 0
    images = torch.empty((len(items), size, size, 3), dtype=torch.uint8)   # filled in place
    keep = torch.zeros(len(items), dtype=torch.bool)
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        jobs = [(f, size) for f, _ in items]
        for k, (arr, u, err) in enumerate(pool.map(_decode_one, jobs, chunksize=16)):
            if arr is None:
                bad.append(err)
            else:
                images[k], keep[k] = torch.from_numpy(arr), True
                up += u
            show(k + 1)
    if bad:
        print(f"warning: {desc}: skipped {len(bad)} unreadable image file(s), e.g. {bad[0]}",
              file=sys.stderr)
    if up:
        print(f"note: {desc}: {up} image(s) smaller than {size}px were upsampled", file=sys.stderr)
    if not keep.any():
        raise DataError(f"{desc}: none of the {len(items)} image files could be decoded")
    labels = torch.tensor([y for _, y in items], dtype=torch.long)
    return (images, labels) if keep.all() else (images[keep], labels[keep])


def shapes_labelled(split, n, size):
    """Images 0..n-1 of the embedded data's `split` drawn at `size` px, uint8 (n, S, S, 3), and
    their labels (synthetic.shape_labels: the kind of the top shape)."""
    seed = datasets.SHAPES_SEEDS[split]
    images = datasets.generate_shapes(n, seed, size, workers=os.cpu_count() or 1)
    return torch.from_numpy(images), torch.from_numpy(synthetic.shape_labels(n, seed))


def labelled_data(args):
    """(class names, training images used, read(size) -> ((train u8, labels), (val u8, labels)))
    for --data: files are listed now (a bad folder fails before any model), decoded by read."""
    if args.data == "shapes":
        n_tr, n_va = args.max_train or SHAPES_TRAIN, args.max_val or datasets.SHAPES_VAL
        return list(synthetic.SHAPE_CLASSES), n_tr, lambda size: (
            shapes_labelled("train", n_tr, size), shapes_labelled("val", n_va, size))
    subset = {k: getattr(args, k) for k in datasets.SUBSET_FLAGS}
    train, val, names = labelled_files(args.data, args.data_root, args.val_fraction,
                                                **subset)
    _check_classes(train, val, names, args.data_root)
    train, val = balanced_subset(train, args.max_train), balanced_subset(val, args.max_val)
    return names, len(train), lambda size: (decode_labelled(train, size, f"{args.data} train"),
                                            decode_labelled(val, size, f"{args.data} held-out"))
