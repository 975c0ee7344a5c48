"""Linear probe and fine-tuning (paper 5.2's question: did inpainting teach the encoder anything?).
The probe freezes an encoder, reads its features at every conv layer and at the bottleneck / pool5,
and trains one linear softmax classifier per layer on labelled images; --finetune instead trains
the whole encoder plus one linear head end to end (the test of the paper's Table 2). Higher
held-out top-1 than the same network at its random (or data-dependent) initialisation = useful
features.

    python ce_probe.py --data tiny --data-root data --ckpt runs/tiny/ckpt.pt --random-init dcgan
    python ce_probe.py --data tiny --data-root data --random-init dcgan --width 32 \\
        --bottleneck 512 --max-train 4000 --max-val 1000     # random-init baseline alone, CPU-sized
    python ce_probe.py --data imagenet --data-root DIR --ckpt A/ckpt.pt B/ckpt.pt --json
    python ce_probe.py --data shapes --ckpt runs/shapes/best.pt --random-init dcgan \\
        --ddi-init dcgan --finetune --max-train 1000           # fine-tuning from three starts

Probe protocol (after the linear probes of Zhang et al. ECCV'16 / Split-Brain CVPR'17, scaled down).
DEVIATION: Tiny ImageNet or your labelled folders instead of ImageNet, each layer average-pooled to
<= 9,600 dims, and this classifier schedule; the published numbers are ImageNet probes of
full-size AlexNets trained for days.
  input    the whole image, no hole, at the encoder's input size S (128 dcgan, 227 alexnet; Tiny
           ImageNet's 64 px images are upsampled bicubically, so they hold no detail finer than
           64 px), [-1, 1] as in training. Training images are decoded at --crop-scale x S (1.128:
           AlexNet's 227 crops of 256 px images), randomly cropped to S and mirrored with
           probability 1/2, drawn afresh per image and epoch (Zhang et al.'s linear test);
           held-out images are the centre crop. --no-augment: the whole image at S, no mirror.
           Encoder in eval mode (BatchNorm running statistics), no gradients.
  features each tap (ce_model.encoder_taps) is average-pooled (adaptive) to the largest s x s
           with C*s*s <= --max-dims (9,600: 10x10x96, 6x6x256 and 5x5x384 for AlexNet, the probe
           sizes of Split-Brain), or kept whole if smaller; on the device. Augmented: the encoder
           runs again on each epoch's crops into one feature buffer (memory as without; K stored
           copies would cost K x the memory); --no-augment: extracted once per model.
  classifier one linear layer + softmax per tap, features standardised with training-split
           statistics (of the first epoch's crops when augmented; features constant on it are
           dropped), zero init, Adam (learning rate --lr / D for D features) on mini-batches in a
           seeded order, fixed --epochs, L2 --weight-decay on the weights; top-1 % held out.
  starts   random init: torch.manual_seed(seed) + the checkpoint's own builder and flags
           (ce_model.build_generator): the exact network the run started from (from the first
           --ckpt of that arch, else from --width etc.). ddi init: that network rescaled on
           --ddi-images training images (Krähenbühl et al. 2016; data_dependent_init).
Fine-tuning (--finetune; paper 5.2, Table 2): each start's encoder plus a zero-initialised linear
head on its last layer, trained end to end (train-mode BatchNorm) with cross-entropy, SGD momentum
0.9, --ft-lr on a cosine schedule, --ft-weight-decay, --ft-epochs of --ft-batch images (the last
partial batch dropped); the same seeded order and crop + mirror draws for every start. Held-out
top-1 on the centre crop, with its standard error sqrt(p(1 - p) / n), in eval mode with BatchNorm
statistics recomputed on the training images (recompute_bn_stats).
DEVIATION: the paper fine-tunes AlexNet (with its fc6-fc8 classifier) on PASCAL VOC 2007 and
reports mAP over 20 multi-label classes; here a linear head, single-label top-1 on Tiny ImageNet or
your folders, and this project's schedule.
Labels: the files of each split exactly as ce_train.py reads them (ce_utils/labelled.py), labelled
by their class folder. tiny = Tiny ImageNet (train/<wnid>/images/*, val/images/* named by
val/val_annotations.txt); imagenet = DIR/train/<class>/* and DIR/val/<class>/*; folder = the same,
or DIR/<class>/* with training's held-out share (--val-fraction) chosen by name hash. shapes = the
embedded data (offline, the quick start's), labelled by the kind of its top shape (disc, rectangle,
line; ce_utils/synthetic.py shape_labels, this project's task): images 0..N-1 of the training set
(N = --max-train, 0: ce_train.py's 10,000) and of the held-out set (--max-val, 0: its 512), drawn at
the size the probe needs.
"""
import json
import math
import sys

import torch
import torch.nn.functional as F

import ce_data
import ce_finetune
import ce_model
from ce_utils import checkpoints, cli, datasets, labelled
from ce_utils.progress import Progress

# ------------------------------------------------------------------------------------------------
# Encoders and their features: the three starts (random, data-dependent, a checkpoint's weights)


def load_encoder(spec, device="cpu", images=None):
    """(frozen encoder in eval mode, taps) of a model spec (build_encoder): for the probe."""
    encoder, taps = ce_finetune.build_encoder(spec, device, images)
    for p in encoder.parameters():
        p.requires_grad_(False)
    return encoder.eval(), taps


def pool_side(channels, side, max_dims):
    """Side s of the pooled map: the largest with channels * s * s <= max_dims, at most the map's
    own."""
    return max(1, min(side, math.isqrt(max_dims // channels)))


@torch.inference_mode()
def extract(encoder, taps, images, device, batch_size=64, max_dims=9600, desc="features",
            crops=None):
    """{tap name: (N, D) float32 features on `device`} for uint8 images (N, S, S, 3), one encoder
    pass per batch. crops = (offsets, flips, size): the images cropped and mirrored first."""
    names = {i: name for name, i in taps}
    last = max(names)
    feats, n = {}, len(images)
    show = Progress(n, desc, every=1.0)
    for s in range(0, n, batch_size):
        x = images[s:s + batch_size].to(device)
        if crops is not None:
            x = ce_finetune.crop_flip(x, crops[0][s:s + batch_size], crops[1][s:s + batch_size],
                                      crops[2])
        x = ce_data.to_float(x)
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
        show(min(s + batch_size, n))
    return feats


# ------------------------------------------------------------------------------------------------
# The linear classifier


def _standardiser(x):
    """Per-feature mean and std of the training features; a feature (near-)constant on them gets
    std = inf (-> 0)."""
    mean, std = x.mean(0), x.std(0)
    return mean, torch.where(std > 1e-4 * std.mean(), std, torch.full_like(std, math.inf))


def _top1(xs, ys, mean, std, W, b, chunk=4096):
    correct = 0
    for s in range(0, len(xs), chunk):
        logits = ((xs[s:s + chunk] - mean) / std) @ W + b
        correct += (logits.argmax(1) == ys[s:s + chunk]).sum().item()
    return 100.0 * correct / max(len(xs), 1)


class LinearClassifier:
    """One linear softmax layer on features standardised with `xtr`'s statistics: zero init, Adam
    at lr / D for D features (Adam moves every weight by about its lr per step, so every logit by
    about lr whatever D is, and one `lr` suits layers of 512 and of 9,600 features alike), L2
    weight decay on the weights only."""

    def __init__(self, xtr, n_classes, lr=1.0, weight_decay=0.0):
        self.mean, self.std = _standardiser(xtr)
        self.W = torch.zeros(xtr.shape[1], n_classes, device=xtr.device, requires_grad=True)
        self.b = torch.zeros(n_classes, device=xtr.device, requires_grad=True)
        self.opt = torch.optim.Adam([{"params": [self.W], "weight_decay": weight_decay},
                                     {"params": [self.b], "weight_decay": 0.0}],
                                    lr=lr / xtr.shape[1])

    def epoch(self, x, y, perm, batch_size):
        """One pass over (x, y) in the order `perm`; the summed loss (a device tensor: no sync)."""
        total = torch.zeros((), device=x.device)
        for s in range(0, len(perm), batch_size):
            i = perm[s:s + batch_size]
            loss = F.cross_entropy(((x[i] - self.mean) / self.std) @ self.W + self.b, y[i])
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            total += loss.detach() * len(i)
        return total

    @torch.no_grad()
    def top1(self, x, y):
        return _top1(x, y.to(x.device), self.mean, self.std, self.W, self.b)


def fit_linear(xtr, ytr, xva, yva, n_classes, epochs=10, lr=1.0, weight_decay=0.0, batch_size=256,
               seed=0, show=None):
    """Train a LinearClassifier on (xtr, ytr) for fixed `epochs` in a seeded mini-batch order;
    return (held-out top-1 %, training top-1 %). show(epoch, extra) reports progress."""
    dev, n = xtr.device, len(xtr)
    ytr = ytr.to(dev)
    clf = LinearClassifier(xtr, n_classes, lr, weight_decay)
    g = torch.Generator().manual_seed(seed)   # CPU generator: the same order on any device
    for ep in range(epochs):
        total = clf.epoch(xtr, ytr, torch.randperm(n, generator=g).to(dev), batch_size)
        if show:
            show(ep + 1, f" loss {total.item() / n:.3f}")
    return clf.top1(xva, yva), clf.top1(xtr, ytr)


# ------------------------------------------------------------------------------------------------
# The probe (frozen features), one model spec at a time


def probe_model(spec, data, args, n_classes):
    """Top-1 per tap of one model: one linear classifier per tap on the frozen encoder's features,
    of fresh crops each epoch (_probe_augmented) or, with --no-augment, extracted once."""
    (xtr_u8, ytr), (xva_u8, yva) = data
    size = ce_model.input_size(spec)
    ddi = ce_finetune._ddi_batch(spec, xtr_u8, size, args)
    encoder, taps = load_encoder(spec, args.device, ddi)
    if args.augment:
        return _probe_augmented(encoder, taps, data, args, n_classes, spec["label"], size)
    feats = {}
    for split, imgs in (("train", xtr_u8), ("val", xva_u8)):
        feats[split] = extract(encoder, taps, imgs, args.device, args.extract_batch, args.max_dims,
                               f"{spec['label']}: {split} features")
    res = {"top1": {}, "train_top1": {}, "dims": {}}
    for name, _ in taps:
        xtr, xva = feats["train"].pop(name), feats["val"].pop(name)
        desc = f"{spec['label']}: {name} classifier ({xtr.shape[1]} dims)"
        show = Progress(args.epochs, desc, "epochs", "epochs/s", every=1.0)
        top1, train_top1 = fit_linear(xtr, ytr, xva, yva, n_classes, args.epochs, args.lr,
                                      args.weight_decay, args.batch_size, args.probe_seed, show)
        print(f"{spec['label']}: {name}: top-1 {top1:.2f} % held-out, {train_top1:.2f} % train",
              file=sys.stderr)
        res["top1"][name], res["train_top1"][name] = top1, train_top1
        res["dims"][name] = xtr.shape[1]
        del xtr, xva
    return res


def _probe_augmented(encoder, taps, data, args, n_classes, label, size):
    """The probe with random crop + mirror: each epoch, the features of that epoch's crops (one
    buffer), then one epoch of every tap's classifier on them, in fit_linear's seeded order.
    Training top-1 is on the last epoch's crops; held-out top-1 on the centre crops."""
    (xtr_u8, ytr), (xva_u8, yva) = data
    dev, n, load = args.device, len(xtr_u8), xtr_u8.shape[1]
    ytr, xtr, clfs = ytr.to(dev), {}, {}
    xva = extract(encoder, taps, ce_data.center_crop(xva_u8, size), dev, args.extract_batch,
                  args.max_dims, f"{label}: val features")
    g = torch.Generator().manual_seed(args.probe_seed)   # CPU generator: the same on any device
    show = Progress(args.epochs, f"{label}: classifiers", "epochs", "epochs/s", every=1.0)
    for ep in range(args.epochs):
        xtr.clear()                                  # one buffer: free the last epoch's first
        xtr = extract(encoder, taps, xtr_u8, dev, args.extract_batch, args.max_dims,
                      f"{label}: epoch {ep + 1} features",
                      crops=(*ce_finetune.aug_draws(n, load, size, args.probe_seed, ep), size))
        perm = torch.randperm(n, generator=g).to(dev)
        for name, x in xtr.items():
            if name not in clfs:                     # standardised with the first epoch's crops
                clfs[name] = LinearClassifier(x, n_classes, args.lr, args.weight_decay)
            clfs[name].epoch(x, ytr, perm, args.batch_size)
        show(ep + 1)
    res = {"top1": {}, "train_top1": {}, "dims": {}}
    for name, clf in clfs.items():
        res["top1"][name] = clf.top1(xva[name], yva)
        res["train_top1"][name] = clf.top1(xtr[name], ytr)
        res["dims"][name] = xtr[name].shape[1]
        print(f"{label}: {name}: top-1 {res['top1'][name]:.2f} % held-out, "
              f"{res['train_top1'][name]:.2f} % train", file=sys.stderr)
    return res


# ------------------------------------------------------------------------------------------------
# Command line


def build_parser():
    p = cli.Parser(__doc__)
    add = p.add_argument
    add("--data", default="tiny", choices=("tiny", "imagenet", "folder", "shapes"),
        help="labelled data layout (see above)")
    add("--data-root", default="data",
        help="folder holding the data (tiny: DIR/tiny-imagenet-200/)")
    datasets.add_subset_flags(add)     # --train-per-class, --val-images, as ce_train.py
    add("--ckpt", nargs="+", default=[],
        help="checkpoints (OUT/ckpt.pt or a run folder) whose encoders to probe")
    add("--random-init", action="append", default=[], choices=("dcgan", "alexnet"),
        help="also probe this arch at its random initialisation (repeatable)")
    add("--ddi-init", action="append", default=[], choices=("dcgan", "alexnet"),
        help="also probe this arch at its random initialisation rescaled on real images "
             "(Krähenbühl et al. 2016's within-layer data-dependent init; repeatable)")
    add("--ddi-images", type=cli.int_range(2, why=" (the init takes statistics over them)"),
        default=256,
        help="training images the data-dependent init runs through the network (this "
             "project's choice)")
    add("--width", type=cli.positive_int, default=64,
        help="random init without a dcgan --ckpt: first conv channels")
    add("--bottleneck", type=cli.positive_int, default=4000,
        help="random init without a dcgan --ckpt: bottleneck channels")
    add("--alexnet-width", type=cli.positive, default=1.0,
        help="random init without an alexnet --ckpt: channel multiplier")
    add("--seed", type=cli.seed, default=0,
        help="random init without a --ckpt of its arch: weight seed")
    add("--max-train", type=cli.count, default=0,
        help="labelled training images used (balanced over classes; 0 = all)")
    add("--max-val", type=cli.count, default=0,
        help="held-out images used (balanced over classes; 0 = all)")
    add("--val-fraction", type=cli.real("(0, 1)"), default=datasets.VAL_FRACTION,
        help="--data folder without train/ and val/: share held out by name hash (at most "
             f"{datasets.VAL_MAX}); the default is ce_train.py's split")
    add("--no-augment", dest="augment", action="store_false",
        help="no random crop + mirror: whole images, features extracted once (the probe before "
             "augmentation)")
    add("--crop-scale", type=cli.real("[1, 2]"), default=1.128,
        help="augmentation: images decoded at this x the input size, then cropped (256/227: "
             "AlexNet's 227 crops of 256 px images)")
    add("--max-dims", type=cli.positive_int, default=9600,
        help="features per layer after average pooling (Split-Brain ~9,600)")
    add("--epochs", type=cli.positive_int, default=10, help="classifier epochs (fixed)")
    add("--lr", type=cli.positive, default=1.0,
        help="classifier Adam learning rate x features (a layer of D uses lr/D)")
    add("--weight-decay", type=cli.nonnegative, default=0.0, help="classifier L2 weight decay")
    add("--batch-size", type=cli.positive_int, default=256, help="classifier mini-batch size")
    add("--extract-batch", type=cli.positive_int, default=64,
        help="images per encoder forward pass")
    add("--probe-seed", type=cli.seed, default=0,
        help="seed of the mini-batch order, the crops and mirrors, and the ddi images")
    add("--finetune", action="store_true",
        help="fine-tune each encoder + a linear head end to end instead of the probe (Table 2)")
    add("--ft-epochs", type=cli.positive_int, default=10,
        help="fine-tuning epochs (this project's choice)")
    add("--ft-lr", type=cli.positive, default=0.01,
        help="fine-tuning SGD learning rate, cosine-annealed to 0 (this project's choice)")
    add("--ft-batch", type=cli.train_batch, default=64, help="fine-tuning mini-batch size")
    add("--ft-weight-decay", type=cli.nonnegative, default=5e-4,
        help="fine-tuning L2 weight decay (AlexNet's)")
    add("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    add("--json", action="store_true", help="print one JSON line per model instead of the table")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    args.device = cli.resolve_device(args.device, p)
    if not args.ckpt and not args.random_init and not args.ddi_init:
        p.error("nothing to probe: give --ckpt and/or --random-init / --ddi-init dcgan|alexnet")
    # each flag's range is its type (ce_utils/cli.py); the learning rates' limits depend on the
    # optimiser: the classifier's Adam (torch's default beta1 0.9), fine-tuning's SGD
    if args.lr >= cli.lr_limit(0.9) or args.ft_lr >= cli.lr_limit():
        p.error(f"--lr must be below {cli.lr_limit(0.9):.3g} and --ft-lr below "
                f"{cli.lr_limit():.3g} (float32: the first step would be Inf)")
    if args.data != "tiny" and (args.train_per_class or args.val_images):   # as ce_train.py
        p.error(f"--train-per-class/--val-images select a subset of --data tiny only, not of "
                f"--data {args.data}; drop them")
    return args


def model_specs(args):
    """What to probe: [{label, arch, a (the run's args), weights (None: random init), ddi, ckpt,
    step}], random then ddi inits first; each copies the flags and seed of the first checkpoint of
    its arch."""
    ckpts = []
    for path in args.ckpt:
        st = checkpoints.read_checkpoint(path)
        a = dict(st["args"])
        ckpts.append(dict(label=path, arch=a.get("arch", "dcgan"), a=a, weights=st["G"],
                          ddi=False, ckpt=st["path"], step=st.get("step")))
    inits = []
    for kind, archs in (("random-init", args.random_init), ("ddi-init", args.ddi_init)):
        for arch in dict.fromkeys(archs):
            like = next((s for s in ckpts if s["arch"] == arch), None)
            if like:
                print(f"note: {kind} {arch} is built with the flags and seed of {like['ckpt']}",
                      file=sys.stderr)
            a = dict(like["a"]) if like else dict(
                arch=arch, width=args.width, bottleneck=args.bottleneck, bottleneck_bn=True,
                bias=False, init="dcgan", alexnet_width=args.alexnet_width, cfc_dropout=0.5,
                seed=args.seed)
            inits.append(dict(label=f"{kind} {arch} s{a.get('seed', 0)}", arch=arch, a=a,
                              weights=None, ddi=kind == "ddi-init", ckpt=None, step=0))
    return inits + ckpts


def print_table(results, n_train, n_val, names):
    """Rows: layers; columns: models; cells: held-out top-1 %."""
    layers = list(dict.fromkeys(k for r in results for k in r["top1"]))
    cols = [r["model"] for r in results]
    w = [max(8, len(c)) for c in cols]
    aug = "random crop + mirror" if results[0]["augment"] else "no augmentation"
    print(f"linear probe: top-1 % on {n_val} held-out images, {len(names)} classes (chance "
          f"{100 / len(names):.2f} %), classifiers trained on {n_train} images ({aug})")
    print(f"{'layer':<11}" + "  ".join(f"{c:>{k}}" for c, k in zip(cols, w)))
    for layer in layers:
        cells = [f"{r['top1'][layer]:.2f}" if layer in r["top1"] else "-" for r in results]
        print(f"{layer:<11}" + "  ".join(f"{c:>{k}}" for c, k in zip(cells, w)))
    for r in results:
        dims = ", ".join(f"{k} {d}" for k, d in r["dims"].items())
        print(f"  {r['model']}: features per layer {dims}")


def _row(spec, args, res, size, load, n_train, n_val, names):
    """One model's JSON record: what was run on which data, and its results."""
    ft = args.finetune
    return {"model": spec["label"], "arch": spec["arch"], "ckpt": spec["ckpt"],
            "step": spec["step"], "seed": spec["a"].get("seed"),
            "start": "checkpoint" if spec["ckpt"] else "ddi" if spec["ddi"] else "random",
            "mode": "finetune" if ft else "probe", "input_size": size, "load_size": load,
            "augment": args.augment, "data": args.data, "n_train": n_train, "n_val": n_val,
            "classes": len(names), "chance": 100 / len(names),
            "epochs": args.ft_epochs if ft else args.epochs, "lr": args.ft_lr if ft else args.lr,
            "batch_size": args.ft_batch if ft else args.batch_size,
            "weight_decay": args.ft_weight_decay if ft else args.weight_decay,
            **({} if ft else {"max_dims": args.max_dims}), **res}


def main(argv=None):
    args = parse_args(argv)
    specs = model_specs(args)             # checkpoints read first: a bad file fails before decoding
    names, n_train, read = labelled.labelled_data(args)
    if args.finetune:
        ce_finetune._check_batch(n_train, args.ft_batch)   # before the decoding, as after it
    decoded, results = {}, []
    run_model = ce_finetune.finetune_model if args.finetune else probe_model
    for spec in specs:
        size = ce_model.input_size(spec)
        load = round(size * args.crop_scale) if args.augment else size   # crops are cut from it
        if load not in decoded:               # each size decoded once, shared by the models
            decoded[load] = read(load)
        try:
            res = run_model(spec, decoded[load], args, len(names))
        except torch.cuda.OutOfMemoryError:
            raise cli.UserError("out of GPU memory; lower --ft-batch" if args.finetune else
                                "out of GPU memory for the features (about N x 6 x --max-dims "
                                "floats per model); lower --max-train or --max-dims") from None
        n_train, n_val = len(decoded[load][0][1]), len(decoded[load][1][1])
        results.append(_row(spec, args, res, size, load, n_train, n_val, names))
        if args.json:
            print(json.dumps(results[-1]), flush=True)
    if not args.json:
        table = ce_finetune.print_finetune_table if args.finetune else print_table
        table(results, n_train, n_val, names)
    return results


if __name__ == "__main__":
    cli.run(main)
