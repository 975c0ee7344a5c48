"""Linear probe (paper 5.2's question: did inpainting teach the encoder anything?): freeze an encoder, read its
features at every conv layer and at the bottleneck / pool5, and train one linear softmax classifier per layer on
labelled images. Higher held-out top-1 than the same network at its random initialisation = useful features.

    python ce_probe.py --data tiny --data-root data --ckpt runs/tiny/ckpt.pt --random-init dcgan
    python ce_probe.py --data tiny --data-root data --random-init dcgan --width 32 --bottleneck 512 \\
        --max-train 4000 --max-val 1000                      # random-init baseline alone, CPU-sized
    python ce_probe.py --data imagenet --data-root DIR --ckpt A/ckpt.pt B/ckpt.pt --json

Protocol (after the linear probes of Zhang et al. ECCV'16 / Split-Brain CVPR'17, scaled down). DEVIATION: Tiny
ImageNet or your labelled folders instead of ImageNet, each layer average-pooled to <= 9,600 dims, and this
classifier schedule; the published numbers are ImageNet probes of full-size AlexNets trained for days.
  input    the whole image, no hole, centre-cropped square at the encoder's input size (128 dcgan, 227 alexnet;
           Tiny ImageNet's 64 px images are upsampled bicubically, so they hold no detail finer than 64 px),
           [-1, 1] as in training; encoder in eval mode (BatchNorm running statistics), no gradients.
  features each tap (ce_model.encoder_taps) is average-pooled (adaptive) to the largest s x s with C*s*s <=
           --max-dims (9,600: 10x10x96, 6x6x256 and 5x5x384 for AlexNet, the probe sizes of Split-Brain), or kept
           whole if smaller; extracted once per model and kept on the device.
  classifier one linear layer + softmax per tap, features standardised with training-split statistics (features
           constant on it are dropped), zero init, Adam (learning rate --lr / D for D features) on mini-batches
           in a seeded order, fixed --epochs, L2 --weight-decay on the weights; top-1 % on the held-out split.
  random init torch.manual_seed(seed) + the checkpoint's own builder and flags (ce_model.build_generator): the
           exact network the run started from (from the first --ckpt of that arch, else from --width etc.).
Labels: tiny = Tiny ImageNet (train/<wnid>/images/*, val/images/* named by val/val_annotations.txt); imagenet =
DIR/train/<class>/* and DIR/val/<class>/*; folder = DIR/<class>/*, a fixed per-class held-out share (--val-fraction).
"""
import json
import math
import os
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from PIL import Image

import ce_data
import ce_model
from ce_utils import checkpoints, cli, datasets
from ce_utils.cli import DataError

# ----------------------------------------------------------------------------------------------------------------
# Labelled files: [(path, class index)] for the train and held-out splits


def _progress(desc):
    """A rate-limited one-line progress display on stderr: call p(done, total), then p(done, total, final=True)."""
    t0, last = time.time(), [0.0]

    def show(done, total, final=False, extra=""):
        now = time.time()
        if final or now - last[0] > 1.0:
            last[0] = now
            end = "\n" if final else ""
            print(f"\r{desc}: {done}/{total} ({now - t0:.0f}s){extra}   ", end=end, file=sys.stderr, flush=True)
    return show


def _by_class(split_dir):
    """{class folder name: [files]} of DIR/<class>/... (recursive inside each class), and the loose files count."""
    files, _ = datasets.list_images(split_dir)
    classes, loose = {}, 0
    for f in files:
        parts = os.path.relpath(f, split_dir).split(os.sep)
        if len(parts) < 2:
            loose += 1
        else:
            classes.setdefault(parts[0], []).append(f)
    return classes, loose


def _tiny_base(root):
    for base in (os.path.join(root, "tiny-imagenet-200"), root):
        ann = os.path.join(base, "val", "val_annotations.txt")
        if os.path.isdir(os.path.join(base, "train")) and os.path.isfile(ann):
            return base
    raise DataError(f"{root}: no Tiny ImageNet here (expected {root}/tiny-imagenet-200/train/ and "
                    "val/val_annotations.txt); run `python ce_train.py --data tiny --data-root "
                    f"{root}` once to download it, or extract tiny-imagenet-200.zip into {root}")


def _tiny_val(base, names):
    """Held-out Tiny ImageNet images labelled by val/val_annotations.txt (file <tab> wnid ...)."""
    ann, bad = {}, 0
    path = os.path.join(base, "val", "val_annotations.txt")
    with open(path) as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 2:
                ann[fields[0]] = fields[1]
            elif line.strip():
                bad += 1
    if not ann:
        raise DataError(f"{path}: no 'file<TAB>wnid' lines; the Tiny ImageNet validation labels are missing")
    index = {c: i for i, c in enumerate(names)}
    files, _ = datasets.list_images(os.path.join(base, "val", "images"))
    val = [(f, index[ann[os.path.basename(f)]]) for f in files if ann.get(os.path.basename(f)) in index]
    if len(val) < len(files) or bad:
        print(f"note: {base}/val: skipped {len(files) - len(val)} image(s) with no annotation or a class absent "
              f"from train/, and {bad} malformed annotation line(s)", file=sys.stderr)
    return val


def _hash_order(files):
    """A fixed order that does not depend on how files were named in sequence (crc32 of the name)."""
    return sorted(files, key=lambda f: (zlib.crc32(os.path.basename(f).encode()), f))


def labelled_files(data, root, val_fraction=0.2):
    """(train, val, class names): train/val are lists of (path, class index) for --data tiny|imagenet|folder."""
    if not os.path.isdir(root):
        raise DataError(f"{root}: data root does not exist or is not a folder; pass --data-root DIR")
    if data == "tiny":
        base = _tiny_base(root)
        train_c, _ = _by_class(os.path.join(base, "train"))
        names = sorted(train_c)
        return [(f, i) for i, c in enumerate(names) for f in train_c[c]], _tiny_val(base, names), names
    has_splits = all(os.path.isdir(os.path.join(root, s)) for s in ("train", "val"))
    if data == "imagenet":
        if not has_splits:
            raise DataError(f"{root}: --data imagenet needs {root}/train/<class>/* and {root}/val/<class>/*")
        train_c, _ = _by_class(os.path.join(root, "train"))
        val_c, loose = _by_class(os.path.join(root, "val"))
        if loose:
            raise DataError(f"{root}/val: {loose} image(s) directly in val/, not in class folders (ImageNet's flat "
                            "validation layout); sort them into val/<class>/ first")
        names = sorted(train_c)
        index = {c: i for i, c in enumerate(names)}
        extra = sorted(set(val_c) - set(index))
        if extra:
            print(f"note: {root}/val: skipped class folder(s) absent from train/: {', '.join(extra[:5])}",
                  file=sys.stderr)
        val = [(f, index[c]) for c in names for f in val_c.get(c, [])]
        return [(f, i) for i, c in enumerate(names) for f in train_c[c]], val, names
    if has_splits:
        raise DataError(f"{root}: has train/ and val/ folders; use --data imagenet (--data folder takes DIR/<class>/*)")
    by_class, loose = _by_class(root)
    if loose:
        print(f"note: {root}: ignored {loose} image(s) outside class subfolders", file=sys.stderr)
    names = sorted(by_class)
    train, val = [], []
    for i, c in enumerate(names):   # per class: a fixed share held out, chosen by a hash of the file name
        order = _hash_order(by_class[c])
        n_val = max(1, int(len(order) * val_fraction)) if len(order) >= 2 else 0
        val += [(f, i) for f in sorted(order[:n_val])]
        train += [(f, i) for f in sorted(order[n_val:])]
    return train, val, names


def _check_classes(train, val, names, root):
    if len(names) < 2 or not val:
        raise DataError(f"{root}: a probe needs labelled images of at least 2 classes in both splits "
                        f"(found {len(names)} class(es), {len(train)} train and {len(val)} held-out images)")


def balanced_subset(items, n):
    """At most n items, the same number from each class (round robin over classes, hash order within a class):
    a short CPU run still sees every class. n <= 0: all."""
    if n <= 0 or n >= len(items):
        return items
    per = {}
    for f, y in items:
        per.setdefault(y, []).append(f)
    queues = [_hash_order(per[y]) for y in sorted(per)]
    out = []
    for k in range(max(len(q) for q in queues)):
        out += [(q[k], y) for q, y in zip(queues, sorted(per)) if k < len(q)]
    return out[:n]


def _decode_one(job):
    path, size = job
    try:
        arr, up = datasets.decode_image(path, size)
        return arr, up, None
    except cli.DataError as e:        # read_rgb's one-line reason (unreadable, special file, bomb)
        return None, False, str(e)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return None, False, f"{path} ({type(e).__name__}: {e})"


def decode_labelled(items, size, desc):
    """Decode (path, label) items at `size` px (threads): uint8 (N, S, S, 3) tensor, int64 labels; unreadable
    files are skipped and counted."""
    show, bad, up = _progress(f"decoding {desc} at {size}px"), [], 0
    images = torch.empty((len(items), size, size, 3), dtype=torch.uint8)   # filled in place: no second copy
    keep = torch.zeros(len(items), dtype=torch.bool)
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        for k, (arr, u, err) in enumerate(pool.map(_decode_one, [(f, size) for f, _ in items], chunksize=16)):
            if arr is None:
                bad.append(err)
            else:
                images[k], keep[k] = torch.from_numpy(arr), True
                up += u
            show(k + 1, len(items))
    show(len(items), len(items), final=True)
    if bad:
        print(f"warning: {desc}: skipped {len(bad)} unreadable image file(s), e.g. {bad[0]}", file=sys.stderr)
    if up:
        print(f"note: {desc}: {up} image(s) smaller than {size}px were upsampled", file=sys.stderr)
    if not keep.any():
        raise DataError(f"{desc}: none of the {len(items)} image files could be decoded")
    labels = torch.tensor([y for _, y in items], dtype=torch.long)
    return (images, labels) if keep.all() else (images[keep], labels[keep])


# ----------------------------------------------------------------------------------------------------------------
# Encoders and their features


def random_init_generator(a):
    """The generator a run with args `a` started from: the global seed, then the run's own builder."""
    torch.manual_seed(a.get("seed", 0))
    return ce_model.build_generator(a)


def load_encoder(spec):
    """(frozen encoder in eval mode, taps) of a model spec: a checkpoint's G, or its random initialisation."""
    if spec["weights"] is None:
        G = random_init_generator(spec["a"])
    else:
        G = ce_model.build_generator(spec["a"], init="none")
        try:
            G.load_state_dict(spec["weights"])
        except RuntimeError as e:
            raise checkpoints.CheckpointError(f"{spec['ckpt']}: weights do not match the saved flags "
                                           f"({str(e).splitlines()[0]})") from None
    for p in G.parameters():
        p.requires_grad_(False)
    return G.encoder.eval(), ce_model.encoder_taps(G)


def pool_side(channels, side, max_dims):
    """Side s of the pooled map: the largest with channels * s * s <= max_dims, at most the map's own side."""
    return max(1, min(side, math.isqrt(max_dims // channels)))


@torch.inference_mode()
def extract(encoder, taps, images, device, batch_size=64, max_dims=9600, desc="features"):
    """{tap name: (N, D) float32 features on `device`} for uint8 images (N, S, S, 3), one encoder pass per batch."""
    names = {i: name for name, i in taps}
    last = max(names)
    feats, n, show = {}, len(images), _progress(desc)
    for s in range(0, n, batch_size):
        x = ce_data.to_float(images[s:s + batch_size].to(device))
        for i, module in enumerate(encoder):
            x = module(x)
            if i in names:
                side = pool_side(x.shape[1], x.shape[-1], max_dims)
                f = (F.adaptive_avg_pool2d(x, side) if side < x.shape[-1] else x).flatten(1).float()
                if names[i] not in feats:
                    feats[names[i]] = torch.empty(n, f.shape[1], device=device)
                feats[names[i]][s:s + len(f)] = f
            if i == last:
                break
        show(min(s + batch_size, n), n)
    show(n, n, final=True)
    return feats


# ----------------------------------------------------------------------------------------------------------------
# The linear classifier


def _standardiser(x):
    """Per-feature mean and std of the training features; a feature (near-)constant on them gets std = inf (-> 0)."""
    mean, std = x.mean(0), x.std(0)
    return mean, torch.where(std > 1e-4 * std.mean(), std, torch.full_like(std, math.inf))


def _top1(xs, ys, mean, std, W, b, chunk=4096):
    correct = 0
    for s in range(0, len(xs), chunk):
        logits = ((xs[s:s + chunk] - mean) / std) @ W + b
        correct += (logits.argmax(1) == ys[s:s + chunk]).sum().item()
    return 100.0 * correct / max(len(xs), 1)


def fit_linear(xtr, ytr, xva, yva, n_classes, epochs=10, lr=1.0, weight_decay=0.0, batch_size=256, seed=0,
               show=None):
    """Train a linear softmax classifier on (xtr, ytr), standardised with xtr's statistics; return
    (held-out top-1 %, training top-1 %). Zero init, Adam, a seeded order of mini-batches, fixed epochs.

    Adam's learning rate is lr / D for D features: Adam moves every weight by about its lr per step, so every
    logit by about lr whatever D is; one `lr` then suits layers of 512 and of 9,600 features alike."""
    dev, n = xtr.device, len(xtr)
    ytr, yva = ytr.to(dev), yva.to(dev)
    mean, std = _standardiser(xtr)
    W = torch.zeros(xtr.shape[1], n_classes, device=dev, requires_grad=True)
    b = torch.zeros(n_classes, device=dev, requires_grad=True)
    opt = torch.optim.Adam([{"params": [W], "weight_decay": weight_decay}, {"params": [b], "weight_decay": 0.0}],
                           lr=lr / xtr.shape[1])
    g = torch.Generator().manual_seed(seed)   # CPU generator: the same order on any device
    for ep in range(epochs):
        perm = torch.randperm(n, generator=g).to(dev)
        total = torch.zeros((), device=dev)
        for s in range(0, n, batch_size):
            i = perm[s:s + batch_size]
            loss = F.cross_entropy(((xtr[i] - mean) / std) @ W + b, ytr[i])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach() * len(i)
        if show:
            show(ep + 1, epochs, final=ep + 1 == epochs, extra=f" loss {total.item() / n:.3f}")
    with torch.no_grad():
        return _top1(xva, yva, mean, std, W, b), _top1(xtr, ytr, mean, std, W, b)


# ----------------------------------------------------------------------------------------------------------------
# Command line


def build_parser():
    p = cli.Parser(__doc__)
    add = p.add_argument
    add("--data", default="tiny", choices=("tiny", "imagenet", "folder"), help="labelled data layout (see above)")
    add("--data-root", default="data", help="folder holding the data (tiny: DIR/tiny-imagenet-200/)")
    add("--ckpt", nargs="+", default=[], help="checkpoints (OUT/ckpt.pt or a run folder) whose encoders to probe")
    add("--random-init", action="append", default=[], choices=("dcgan", "alexnet"),
        help="also probe this arch at its random initialisation (repeatable)")
    add("--width", type=int, default=64, help="random init without a dcgan --ckpt: first conv channels")
    add("--bottleneck", type=int, default=4000, help="random init without a dcgan --ckpt: bottleneck channels")
    add("--alexnet-width", type=float, default=1.0, help="random init without an alexnet --ckpt: channel multiplier")
    add("--seed", type=int, default=0, help="random init without a --ckpt of its arch: weight seed")
    add("--max-train", type=int, default=0, help="labelled training images used (balanced over classes; 0 = all)")
    add("--max-val", type=int, default=0, help="held-out images used (balanced over classes; 0 = all)")
    add("--val-fraction", type=float, default=0.2, help="--data folder: share of each class held out")
    add("--max-dims", type=int, default=9600, help="features per layer after average pooling (Split-Brain ~9,600)")
    add("--epochs", type=int, default=10, help="classifier epochs (fixed)")
    add("--lr", type=float, default=1.0, help="classifier Adam learning rate x features (a layer of D uses lr/D)")
    add("--weight-decay", type=float, default=0.0, help="classifier L2 weight decay")
    add("--batch-size", type=int, default=256, help="classifier mini-batch size")
    add("--extract-batch", type=int, default=64, help="images per encoder forward pass")
    add("--probe-seed", type=int, default=0, help="seed of the classifiers' mini-batch order")
    add("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    add("--json", action="store_true", help="print one JSON line per model instead of the table")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    args.device = cli.resolve_device(args.device, p)
    if not args.ckpt and not args.random_init:
        p.error("nothing to probe: give --ckpt and/or --random-init dcgan|alexnet")
    for k in ("epochs", "batch_size", "extract_batch", "max_dims", "width", "bottleneck"):
        if getattr(args, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1")
    if not 0 < args.val_fraction < 1 or args.alexnet_width <= 0 or args.lr <= 0 or args.weight_decay < 0:
        p.error("--val-fraction must be in (0, 1), --alexnet-width and --lr > 0, --weight-decay >= 0")
    return args


def model_specs(args):
    """What to probe: [{label, arch, a (the run's args), weights (None: random init), ckpt, step}], random
    inits first; each copies the flags and seed of the first checkpoint of its arch, if any."""
    ckpts = []
    for path in args.ckpt:
        st = checkpoints.read_checkpoint(path)
        a = dict(st["args"])
        ckpts.append(dict(label=path, arch=a.get("arch", "dcgan"), a=a, weights=st["G"], ckpt=st["path"],
                          step=st.get("step")))
    randoms = []
    for arch in dict.fromkeys(args.random_init):
        like = next((s for s in ckpts if s["arch"] == arch), None)
        if like:
            print(f"note: random-init {arch} is built with the flags and seed of {like['ckpt']}", file=sys.stderr)
        a = dict(like["a"]) if like else dict(
            arch=arch, width=args.width, bottleneck=args.bottleneck, bottleneck_bn=True, bias=False, init="dcgan",
            alexnet_width=args.alexnet_width, cfc_dropout=0.5, seed=args.seed)
        randoms.append(dict(label=f"random-init {arch} s{a.get('seed', 0)}", arch=arch, a=a, weights=None,
                            ckpt=None, step=0))
    return randoms + ckpts


def probe_model(spec, data, args, n_classes):
    """Top-1 per tap of one model: extract features once, then one classifier per tap."""
    (xtr_u8, ytr), (xva_u8, yva) = data
    encoder, taps = load_encoder(spec)
    encoder.to(args.device)
    feats = {}
    for split, imgs in (("train", xtr_u8), ("val", xva_u8)):
        feats[split] = extract(encoder, taps, imgs, args.device, args.extract_batch, args.max_dims,
                               f"{spec['label']}: {split} features")
    res = {"top1": {}, "train_top1": {}, "dims": {}}
    for name, _ in taps:
        xtr, xva = feats["train"].pop(name), feats["val"].pop(name)
        show = _progress(f"{spec['label']}: {name} classifier ({xtr.shape[1]} dims), epoch")
        top1, train_top1 = fit_linear(xtr, ytr, xva, yva, n_classes, args.epochs, args.lr, args.weight_decay,
                                      args.batch_size, args.probe_seed, show)
        print(f"{spec['label']}: {name}: top-1 {top1:.2f} % held-out, {train_top1:.2f} % train", file=sys.stderr)
        res["top1"][name], res["train_top1"][name], res["dims"][name] = top1, train_top1, xtr.shape[1]
        del xtr, xva
    return res


def print_table(results, n_train, n_val, names):
    """Rows: layers; columns: models; cells: held-out top-1 %."""
    layers = list(dict.fromkeys(k for r in results for k in r["top1"]))
    cols = [r["model"] for r in results]
    w = [max(8, len(c)) for c in cols]
    print(f"linear probe: top-1 % on {n_val} held-out images, {len(names)} classes (chance "
          f"{100 / len(names):.2f} %), classifiers trained on {n_train} images")
    print(f"{'layer':<11}" + "  ".join(f"{c:>{k}}" for c, k in zip(cols, w)))
    for layer in layers:
        cells = [f"{r['top1'][layer]:.2f}" if layer in r["top1"] else "-" for r in results]
        print(f"{layer:<11}" + "  ".join(f"{c:>{k}}" for c, k in zip(cells, w)))
    for r in results:
        print(f"  {r['model']}: features per layer " + ", ".join(f"{k} {d}" for k, d in r["dims"].items()))


def main(argv=None):
    args = parse_args(argv)
    specs = model_specs(args)                        # checkpoints read first: a bad file fails before decoding
    train, val, names = labelled_files(args.data, args.data_root, args.val_fraction)
    _check_classes(train, val, names, args.data_root)
    train, val = balanced_subset(train, args.max_train), balanced_subset(val, args.max_val)
    decoded, results = {}, []
    for spec in specs:
        size = ce_model.INPUT_SIZE[spec["arch"]]
        if size not in decoded:                      # each input size decoded once, shared by the models
            decoded[size] = (decode_labelled(train, size, f"{args.data} train"),
                             decode_labelled(val, size, f"{args.data} held-out"))
        try:
            res = probe_model(spec, decoded[size], args, len(names))
        except torch.cuda.OutOfMemoryError:
            raise cli.UserError("out of GPU memory for the features (about N x 6 x --max-dims floats per model); "
                                   "lower --max-train or --max-dims") from None
        n_train, n_val = len(decoded[size][0][1]), len(decoded[size][1][1])
        results.append({"model": spec["label"], "arch": spec["arch"], "ckpt": spec["ckpt"], "step": spec["step"],
                        "seed": spec["a"].get("seed"), "input_size": size, "data": args.data,
                        "n_train": n_train, "n_val": n_val, "classes": len(names), "chance": 100 / len(names),
                        "epochs": args.epochs, "lr": args.lr, "weight_decay": args.weight_decay,
                        "max_dims": args.max_dims, **res})
        if args.json:
            print(json.dumps(results[-1]), flush=True)
    if not args.json:
        print_table(results, n_train, n_val, names)
    return results


if __name__ == "__main__":
    cli.run(main)
