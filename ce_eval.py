"""Evaluate a Context Encoder (Pathak et al., CVPR 2016, section 5.1 / Table 1): PSNR, mean L1 %,
mean L2 % (with SSIM and sharpness) of the model against classical baselines
(ce_utils/baselines.py) on held-out images;
figures; inpainting your own photos. The drawing is in ce_utils/figures.py, your photos (inputs,
the square the model sees, your mask, pasting back, the files written) in ce_utils/photos.py.

    python ce_eval.py --ckpt runs/shapes/best.pt                 # table: model vs baselines
    python ce_eval.py --ckpt runs/shapes/best.pt --json          # one JSON line
    python ce_eval.py --ckpt runs/shapes/best.pt --image me.jpg --out filled/
    python ce_eval.py --ckpt runs/shapes/best.pt --figure --out figs/     # figs/figure.png
    python ce_eval.py --ckpt runs/a/best.pt runs/b/best.pt --figure --out figs/   # columns A, B
    python ce_eval.py --plot runs/a runs/b --out figs/                    # figs/curves.png

Metrics (all on [0, 1] intensities, per image then averaged over images):
  hole:   the pixels hidden from the model (inner square for --ring visible, whole 64x64 for
          --ring hidden; random masks: the hidden pixels)
  region: the whole 64x64 centre of the final image, the prediction pasted into the hole (random
          masks: the whole image)
  PSNR = 10 log10(1 / MSE);  L1 % = 100 * mean |pred - true|;  L2 % = 100 * mean (pred - true)^2.
  SSIM (hole): Wang et al. 2004 (11x11 Gaussian, sigma 1.5) at each hole pixel, averaged; 1 = same.
  sharp (hole): Laplacian energy of the prediction / of the true image, 1 = as sharp as the real
         image, < 1 blurrier. PSNR rewards the blurry mean, sharpness detail even where wrong.
"""
import json
import os
import time
from collections import namedtuple
from types import SimpleNamespace

import torch
import torch.nn.functional as F

import ce_data
import ce_masks
import ce_model
from ce_utils import baselines, checkpoints, cli, datasets, figures, photos
from ce_utils.progress import Progress

# -------------------------------------------------------------------------------------------------
# Metrics (the baselines: ce_utils/baselines.py)

def image_metrics(pred, target, mask):
    """Per-image PSNR (dB), L1 %, L2 % over the pixels where `mask` ((1 or B), 1, H, W) is 1, inputs
    in [-1, 1]: a dict of (B,) tensors. PSNR per image, then averaged: the paper's Table 1. Higher
    PSNR, lower L1 and L2 are closer to the truth, and reward blur (see sharpness)."""
    d = ce_data.unit(pred) - ce_data.unit(target)
    m = mask.to(d.device, d.dtype).expand_as(d)
    n = m.sum(dim=(1, 2, 3))
    mse = (d * d * m).sum(dim=(1, 2, 3)) / n
    l1 = (d.abs() * m).sum(dim=(1, 2, 3)) / n
    return {"psnr": 10 * torch.log10(1.0 / mse.clamp_min(1e-10)), "l1": 100 * l1, "l2": 100 * mse}


def _gaussian_rows(n, like):
    """SSIM's window along one axis of n pixels as an (n, n) matrix: row i holds the 11-tap Gaussian
    (sigma 1.5) around pixel i, cut at the border and renormalised to sum 1. The 2-D window is
    separable, so A @ x @ B.T is the 11x11 window cut to the image and renormalised."""
    d = torch.arange(n, device=like.device, dtype=like.dtype)
    d = d[:, None] - d[None, :]
    w = torch.exp(-d * d / (2 * 1.5 ** 2)) * (d.abs() <= 5)
    return w / w.sum(dim=1, keepdim=True)


def ssim(pred, target, mask):
    """Per-image SSIM (Wang et al. 2004, Eq. 13: 11x11 Gaussian window, sigma 1.5, C1 = (0.01 L)^2,
    C2 = (0.03 L)^2, L = 1 on [0, 1] intensities) of each RGB channel at every pixel, averaged over
    the channels and the pixels where `mask` is 1. 1 = identical, higher is better. At the border
    the window is cut to the image and renormalised (zero-padding would darken the local means,
    'valid' windows would drop hole pixels near the edge); where it fits, as at every pixel of the
    centre hole with its 7 px ring, it is the standard SSIM. Hand-written: torchvision has none."""
    # float64 on CUDA: TF32 matrix products (cli.Hardware) would swamp E[x^2] - mu^2 with noise
    dtype = torch.float64 if pred.device.type == "cuda" else torch.float32
    x, y = ce_data.unit(pred).to(dtype), ce_data.unit(target).to(dtype)
    a, b = _gaussian_rows(x.shape[-2], x), _gaussian_rows(x.shape[-1], x)
    mx, my, xx, yy, xy = (a @ t @ b.T for t in (x, y, x * x, y * y, x * y))  # weighted means
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mx * my + c1) * (2 * (xy - mx * my) + c2)
         / ((mx * mx + my * my + c1) * (xx - mx * mx + yy - my * my + c2)))
    m = mask.to(x.device, x.dtype).expand(len(x), 1, *x.shape[2:])
    return ((s.mean(dim=1, keepdim=True) * m).sum(dim=(1, 2, 3)) / m.sum(dim=(1, 2, 3))).float()


SHARPNESS_EPS = (1 / 255) ** 2   # the Laplacian energy of one 8-bit grey level


def sharpness(pred, target, mask):
    """Per-image high-frequency energy of the prediction over the truth's: the mean squared
    5-point Laplacian (a classic focus measure) of each RGB channel on [0, 1] intensities, at the
    pixels where `mask` is 1 and so are its 4 neighbours (the fill's own detail, not its seam with
    the context). 1 = as sharp as the true image, < 1 blurrier, > 1 more detail or noise: closer
    to 1 is better. It pulls against PSNR: the blurry mean of the plausible fills minimises the
    expected L2, while this rewards detail even where it is wrong (the adversarial term's aim,
    paper Fig. 5). SHARPNESS_EPS keeps a flat true hole from dividing by zero; a hole without such
    pixels scores 1."""
    x = torch.cat([ce_data.unit(pred), ce_data.unit(target)])        # (2B, 3, H, W)
    m = mask.to(x.device, x.dtype).expand(len(pred), 1, *x.shape[2:]).repeat(2, 1, 1, 1)
    xp, mp = F.pad(x, (1, 1, 1, 1)), F.pad(m, (1, 1, 1, 1))          # 0 outside the image
    lap = xp[..., :-2, 1:-1] + xp[..., 2:, 1:-1] + xp[..., 1:-1, :-2] + xp[..., 1:-1, 2:] - 4 * x
    inner = m * mp[..., :-2, 1:-1] * mp[..., 2:, 1:-1] * mp[..., 1:-1, :-2] * mp[..., 1:-1, 2:]
    energy = (lap * lap * inner).sum(dim=(1, 2, 3)) / (3 * inner.sum(dim=(1, 2, 3))).clamp_min(1)
    e_pred, e_true = energy.chunk(2)
    return (e_pred + SHARPNESS_EPS) / (e_true + SHARPNESS_EPS)


# What a method is scored on: the hole of a run (its flags' mask, overlap, ring, fill) on images of
# the network's size. Defaults: the paper variant's centre hole (7 px visible ring, official fill).
MaskSpec = namedtuple("MaskSpec", "mask overlap ring fill size",
                      defaults=("center", 7, "visible", "mean", 128))


def mask_spec(a=None):
    """The MaskSpec of run flags `a`: a checkpoint's args dict or ce_train's namespace (None: the
    defaults; a MaskSpec: itself)."""
    if a is None or isinstance(a, MaskSpec):
        return MaskSpec() if a is None else a
    a = a if isinstance(a, dict) else vars(a)
    return MaskSpec(a.get("mask", "center"), a["overlap"], a["ring"], a["fill"],
                    ce_model.input_size(a))


def eval_task(x, spec, start=0):
    """What every method sees and is scored on, for held-out images x (B, 3, S, S) from index
    `start` and the MaskSpec `spec`: the masked input, the target, the hole (scored by the hole
    metrics), compose(pred) -> the final picture scored by the region metrics (prediction pasted
    into the hole only), picture(pred) -> the image to show (random masks: hole outlines drawn), and
    baseline(name) -> a baseline's prediction."""
    overlap, ring, fill = spec.overlap, spec.ring, spec.fill
    if spec.mask == "center":
        masked, target = ce_data.mask_batch(x, overlap, ring, fill)
        lo, hi = ce_data.region_bounds(x.shape[-1])
        return SimpleNamespace(
            masked=masked, target=target, hole=ce_data.hole_mask(overlap, ring),
            compose=lambda p: ce_data.paste(masked, p, overlap, ring)[..., lo:hi, lo:hi],
            picture=lambda p: ce_data.paste(masked, p, overlap, ring),
            baseline=lambda name: baselines.baseline_region(name, masked, overlap, ring))
    mask = ce_masks.eval_masks(spec.mask, start, len(x), x.device, x.shape[-1])
    masked = ce_data.apply_mask(x, mask, fill)
    return SimpleNamespace(
        masked=masked, target=x, hole=mask,
        compose=lambda p: ce_data.paste_image(masked, p, mask),
        picture=lambda p: figures.outline(ce_data.paste_image(masked, p, mask), mask),
        baseline=lambda name: baselines.baseline_image(name, masked, mask))


@torch.no_grad()
def predict(G, masked, batch_size=256, dtype=None):
    """G(masked) in eval mode (BN running statistics), batched, float32 out."""
    was_training = G.training
    G.eval()
    dev = next(G.parameters()).device
    outs = []
    for i in range(0, len(masked), batch_size):
        x = masked[i:i + batch_size].to(dev)
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            outs.append(G(x).float())
    G.train(was_training)
    return torch.cat(outs)


PROGRESS_ABOVE = 1000     # evaluations of more images than this print progress on stderr,
PROGRESS_AFTER_S = 5.0    # any other once it has run this long (unless show_slow=False)
PROGRESS_EVERY_S = 10.0   # at most one progress line per this many seconds (and one at the end)


def evaluate(G, images_u8, spec=None, methods=("model",), batch_size=256, dtype=None,
             show_slow=True):
    """Mean metrics of each method over uint8 (N, S, S, 3) images (S >= size, centre-cropped to it)
    with the hole of `spec` (mask_spec: a run's flags): {method: {"psnr", "l1", "l2", "ssim",
    "sharpness", "psnr_region", "l1_region", "l2_region", "n_images"}}, all of the final picture
    (the prediction pasted into the hole): hole metrics over the hidden pixels (SSIM's windows see
    the real context around them), region metrics over the 64x64 centre (centre masks) or the
    whole image (random masks; ce_masks.eval_masks). No region SSIM or sharpness: twice the cost,
    and over the region they would mostly score the real ring and the seam. Progress on stderr,
    with the seconds spent on each method, above PROGRESS_ABOVE images or after PROGRESS_AFTER_S
    (show_slow=False: only above PROGRESS_ABOVE; training, whose result line follows)."""
    # run flags: images cached below their load size are upsampled to it (ce_data.eval_batch)
    load = (spec if isinstance(spec, dict) else getattr(spec, "__dict__", {})).get("load_size")
    spec = mask_spec(spec)
    dev = next(G.parameters()).device if G is not None else torch.device("cpu")
    sums = {m: {} for m in methods}
    n = len(images_u8)
    progress = Progress(n, "evaluating", every=PROGRESS_EVERY_S, above=PROGRESS_ABOVE,
                        after=PROGRESS_AFTER_S if show_slow else None)
    seconds = dict.fromkeys(methods, 0.0)
    for i in range(0, n, batch_size):
        x = ce_data.eval_batch(images_u8[i:i + batch_size], spec.size, load).to(dev)
        t = eval_task(x, spec, i)
        everywhere = torch.ones_like(t.hole[:1])
        for m in methods:
            start = time.perf_counter()
            pred = predict(G, t.masked, batch_size, dtype) if m == "model" else t.baseline(m)
            final = t.compose(pred)
            region = image_metrics(final, t.target, everywhere)
            scores = {**image_metrics(final, t.target, t.hole),
                      "ssim": ssim(final, t.target, t.hole),
                      "sharpness": sharpness(final, t.target, t.hole),
                      **{k + "_region": v for k, v in region.items()}}
            for k, v in scores.items():
                sums[m][k] = sums[m].get(k, 0.0) + float(v.double().sum())
            seconds[m] += time.perf_counter() - start   # float() above waited for the device
            per_method = ", ".join(f"{k} {v:.0f}s" for k, v in seconds.items())
            progress(i + len(x) if m == methods[-1] else i,   # a report after every method
                     f" | {per_method}" if len(methods) > 1 else "")
    return {m: {**{k: v / n for k, v in s.items()}, "n_images": n} for m, s in sums.items()}


# -------------------------------------------------------------------------------------------------
# Pictures of the model's predictions (the drawing: ce_utils/figures.py)

def inpaint(G, images, spec=None, dtype=None):
    """images (B, 3, S, S) in [-1, 1] -> (masked, filled) with the hole of `spec` (mask_spec), the
    prediction pasted into the hole only. Random masks: the held-out masks of images 0..B-1, with
    the hole's outline drawn."""
    t = eval_task(images, mask_spec(spec))
    return t.masked, t.picture(predict(G, t.masked, dtype=dtype).to(images.device))


def task_of(a):
    """What a model of run flags `a` is shown and scored on in a figure: its MaskSpec and the
    side of the stored images its input is centre-cropped from."""
    spec = mask_spec(a)
    return spec, (a.get("load_size", spec.size) if isinstance(a, dict) else spec.size)


def describe_task(task):
    """A task in a few words: 'region mask, 227 px (centre of 256 px), fill mean'."""
    spec, load = task
    hole = (f"centre hole, overlap {spec.overlap}, ring {spec.ring}" if spec.mask == "center"
            else f"{spec.mask} mask")
    crop = f" (centre of {load} px)" if load != spec.size else ""
    return f"{hole}, {spec.size} px{crop}, fill {spec.fill}"


def figure_blocks(models):
    """[(task, [(label, G, args), ...])]: the models grouped by task_of, in the order given."""
    blocks = {}
    for m in models:
        blocks.setdefault(task_of(m[2]), []).append(m)
    return list(blocks.items())


def block_notes(blocks):
    """One line per block of a figure whose blocks differ in task (none for a single block)."""
    if len(blocks) < 2:
        return []
    return [f"task of {', '.join(m[0] for m in members)}: {describe_task(task)}"
            for task, members in blocks]


def comparison_figure(models, images, path, dtype=None, notes=()):
    """masked | each model | each baseline | original for N held-out images, the hole's PSNR under
    each. models: [(short label, G, args)]; images: (N, 3, S, S) in [-1, 1] (all models' input),
    or images(args) -> a model's own held-out batch (its load size, cropped to its input size).
    Models whose tasks differ (mask, hole, input size: a dcgan beside an AlexNet, a centre beside a
    region model) get a block each: masked | its models | baselines | original, all on its task.
    notes: lines under the figure saying what each label is (figures.run_labels gives both)."""
    plt = figures.pyplot()
    blocks = figure_blocks(models)
    several = len(blocks) > 1
    cols = []          # (title, pictures, prediction or None, the block's task)
    for task, members in blocks:
        x = images(members[0][2]) if callable(images) else images
        t = eval_task(x, task[0])
        names = ", ".join(label for label, _, _ in members)
        cols.append((f"masked input\n{names}" if several else "masked input", t.masked, None, t))
        for label, G, _ in members:
            pred = predict(G, t.masked.to(next(G.parameters()).device), dtype=dtype).cpu()
            cols.append((label, t.picture(pred), pred, t))
        for m in baselines.BASELINES[1:]:
            pred = t.baseline(m)
            cols.append((m.replace("_", " "), t.picture(pred), pred, t))
        cols.append(("original", x, None, t))
    notes = [*notes, *block_notes(blocks)]
    n, k = len(cols[0][1]), len(cols)
    # Laid out in inches (tight_layout misplaces fixed-aspect images): 1.5 in pictures, their title
    # (two lines over blocks) above the first row, the PSNR under each row, the notes at the bottom.
    side, gap, title, label, margin = 1.5, 0.08, 0.4 if several else 0.25, 0.2, 0.05
    width = k * side + (k - 1) * gap + 2 * margin
    lines, foot = figures.note_lines(notes, width)
    height = title + n * (side + label) + (n - 1) * gap + margin + foot
    fig, axes = plt.subplots(n, k, figsize=(width, height), squeeze=False)
    fig.subplots_adjust(left=margin / width, right=1 - margin / width, top=1 - title / height,
                        bottom=(label + margin + foot) / height, wspace=gap / side,
                        hspace=(label + gap) / side)
    for j, (name, full, pred, t) in enumerate(cols):
        pics = figures.to_uint8(full)
        psnr = image_metrics(pred, t.target, t.hole)["psnr"] if pred is not None else None
        for i in range(n):
            ax = axes[i, j]
            ax.imshow(pics[i])
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_title(figures.drawable(name), fontsize=9)
            if psnr is not None:
                ax.set_xlabel(f"{psnr[i]:.1f} dB", fontsize=7, labelpad=2)
    return figures.finish_figure(fig, path, lines)


# -------------------------------------------------------------------------------------------------
# Command line

def parse_args(argv=None):
    p = cli.Parser(__doc__)
    p.add_argument("--ckpt", nargs="+", help="checkpoint(s) written by ce_train.py: OUT/best.pt, "
                   "OUT/ckpt.pt or the run folder OUT; with --figure, several side by side")
    p.add_argument("--data", choices=("shapes", "tiny", "imagenet", "folder"),
                   help="dataset (default: the checkpoint's)")
    p.add_argument("--data-root", help="dataset folder (default: the checkpoint's)")
    p.add_argument("--split", default="val", choices=("val", "test"),
                   help="held-out split to evaluate")
    p.add_argument("--max-images", type=cli.count, default=0,
                   help="evaluate at most this many images (0: all)")
    p.add_argument("--batch-size", type=cli.positive_int, default=256,
                   help="images per forward pass (lower it if memory runs out)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--baselines", default="all", choices=tuple(baselines.BASELINE_SETS),
                   help="classical fills scored beside the model (ce_utils/baselines.py): all "
                   "(fill, context_mean, harmonic), fast (no harmonic, which solves a linear "
                   "system per image), none (the model only)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON line per checkpoint instead of the table")
    p.add_argument("--image", nargs="+", metavar="PHOTO", help="inpaint these photos or folders of "
                   "photos: the centre square is scaled to 128 px; writes NAME_filled.png "
                   "(128 px), NAME_full.png (the photo at its own size, only the hole replaced) "
                   "and NAME_compare.png to --out")
    p.add_argument("--mask", metavar="MASK.png", help="with --image: your own hole (white = "
                   "hole, black = keep; a PNG with transparency: opaque = hole, transparent = "
                   "keep), scaled to the photo; every pixel of it in the photo's central square "
                   "is replaced, every other one kept; needs a model trained with --mask region "
                   "or block")
    p.add_argument("--mask-stats", choices=("block", "region"), help="print hole fraction, blobs "
                   "per mask and blob size of --stats-n training masks of this kind (region: "
                   "against the official recipe) and exit")
    p.add_argument("--stats-n", type=cli.positive_int, default=1000, metavar="N",
                   help="masks of each kind in --mask-stats")
    p.add_argument("--figure", action="store_true", help="write OUT/figure.png: --n held-out "
                   "images, masked | model(s) | baselines | original; several --ckpt are labelled "
                   "A, B, ... (or x1000, ... for a lambda sweep) with their differing flags in a "
                   "note under the figure")
    p.add_argument("--n", type=cli.positive_int, default=6,
                   help="held-out images (rows) in --figure")
    p.add_argument("--plot", nargs="+", metavar="RUN",
                   help="training curves of these run folders, overlaid")
    p.add_argument("--out", help="output: folder for --image and --figure (default: inpainted); "
                   "for --plot a .png file, or a folder that gets curves.png (default: "
                   "./curves.png); folders are created")
    a = p.parse_args(argv)
    if not a.ckpt and not a.plot and not a.mask_stats:
        p.error("give --ckpt CKPT (evaluate, --image, --figure) or --plot RUN [RUN ...]")
    if a.mask and not a.image:
        p.error("--mask MASK.png goes with --image PHOTO")
    ext = os.path.splitext(a.out or "")[1].lower()
    if a.plot and ext not in ("", ".png") and not os.path.isdir(a.out):
        p.error(f"--out {a.out}: with --plot, give a .png file or a folder")
    a.device = cli.resolve_device(a.device, p)
    return a


def plot_path(out):
    """--plot's output file: --out if it is a .png file, else OUT/curves.png (made on writing)."""
    if not out:
        return "curves.png"
    is_file = out.lower().endswith(".png") and not os.path.isdir(out)
    return out if is_file else os.path.join(out, "curves.png")


def print_table(results, title):
    """Hole metrics, then the region's: SSIM higher is better, sharp best at 1 (ce_eval.py -h)."""
    print(title)
    columns = f"{'PSNR dB':>9}{'L1 %':>8}{'L2 %':>8}"
    print(f"{'method':<14}{columns}{'SSIM':>7}{'sharp':>7}   | region:{columns}")
    for m, r in results.items():
        print(f"{m:<14}{r['psnr']:>9.2f}{r['l1']:>8.2f}{r['l2']:>8.2f}{r['ssim']:>7.3f}"
              f"{r['sharpness']:>7.2f}   |        "
              f"{r['psnr_region']:>9.2f}{r['l1_region']:>8.2f}{r['l2_region']:>8.2f}")


def held_out(args, a):
    """uint8 held-out images for checkpoint flags `a`, with --data, --data-root, --split and
    --max-images applied."""
    data, root = args.data or a["data"], args.data_root or a["data_root"]
    own = (data, os.path.abspath(root)) == (a["data"], a["data_root"])  # its own data: its subset
    subset = {k: a.get(k, 0) for k in datasets.SUBSET_FLAGS} if own else {}
    images = datasets.load_split(data, root, args.split, a["load_size"], a.get("shapes_n", 10000),
                                 **subset)
    return (images[:args.max_images] if args.max_images else images), data


def write_figure(args, loaded, dtype):
    """--figure: --n held-out images of the first checkpoint's data, each model shown them at its
    own load and input size, one block of columns per task (comparison_figure)."""
    a, stored = loaded[0][2]["args"], {}

    def images(b):      # the same images, decoded once per load size
        load = task_of(b)[1]
        if load not in stored:
            stored[load] = held_out(args, {**a, "load_size": load})
        return ce_data.eval_batch(stored[load][0][:args.n], ce_model.input_size(b), load)
    labels, notes = (figures.run_labels([s["path"] for _, _, s in loaded]) if len(loaded) > 1
                     else (["model"], []))
    models = [(lab, G, s["args"]) for lab, (G, _, s) in zip(labels, loaded)]
    path = comparison_figure(models, images, os.path.join(args.out or "inpainted", "figure.png"),
                             dtype, notes)
    blocks = figure_blocks(models)
    cols = ", then ".join(f"masked | {' | '.join(m[0] for m in members)} | baselines | original"
                          for _, members in blocks)
    images_u8, data = next(iter(stored.values()))
    print(f"wrote {path}: {cols}, {min(args.n, len(images_u8))} {data}/{args.split} images"
          + "".join(f"\n  {note}" for note in notes + block_notes(blocks)))


def main(argv=None):
    args = parse_args(argv)
    if args.plot:
        print(f"wrote {figures.plot_curves(args.plot, plot_path(args.out))}")
        return
    if args.mask_stats:
        return ce_masks.print_mask_stats(args.mask_stats, args.stats_n)
    hw = cli.Hardware(args.device).use_fast_kernels()
    dtype = hw.dtype
    loaded = [checkpoints.load_checkpoint(c, hw.device) for c in args.ckpt]
    a = loaded[0][2]["args"]  # the checkpoint's own flags decide the mask and the network
    if args.image:
        return photos.run_images(loaded[0][0], args.image, a, args.out or "inpainted", dtype,
                                 args.mask)
    if args.figure:
        return write_figure(args, loaded, dtype)
    for G, _, state in loaded:
        a = state["args"]
        images, data = held_out(args, a)
        methods = ("model",) + baselines.BASELINE_SETS[args.baselines]
        results = evaluate(G, images, a, methods, batch_size=args.batch_size, dtype=dtype)
        if args.json:
            rounded = {m: {k: round(v, 4) for k, v in r.items()} for m, r in results.items()}
            print(json.dumps({"ckpt": state["path"], "step": state.get("step"), "data": data,
                              "split": args.split, **rounded}))
        else:
            print_table(results, f"{state['path']} (step {state.get('step')}) on "
                                 f"{data}/{args.split}, {len(images)} images, "
                                 f"{a.get('mask', 'center')} mask, overlap {a['overlap']}, "
                                 f"ring {a['ring']}, fill {a['fill']}")


if __name__ == "__main__":
    cli.run(main)
