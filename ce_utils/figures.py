"""Pictures of the inpainting (paper Fig. 4-5 style) and of training, drawing only: sample grids
(masked | filled | original) and the evolution GIF of ce_train.py, training curves for ce_train.py,
`ce_eval.py --plot` and ce_sweep.py, and the hole outline of ce_eval.py's --figure and --image.

    python -c "import ce_utils.figures as f; f.plot_curves(['runs/shapes'], 'curves.png')"
"""
import io
import json
import os
import textwrap

import torch
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

import ce_data
from ce_utils import checkpoints, cli

GRID_TITLES = ("masked", "filled", "original")  # save_grid's column titles for 3 columns
TITLE_H = 20                 # px: the strip above a sample grid that names its columns
GRID_INFO = "ce_title_h"     # PNG text keys: that strip's height (make_gif skips it), its titles
GRID_INFO_TITLES = "ce_titles"
GRID_INFO_ROW = "ce_row_h"   # ... and one row of images with its gap (the GIF keeps whole rows)
GIF_STRIP_H = 22             # px: the dark strip above each GIF frame with the step number


# ------------------------------------------------------------------------------------------------
# Sample grids

def to_uint8(x):
    """(B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3), de-normalised (samples are not too dark)."""
    return (ce_data.unit(x) * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def font(size):
    """Pillow's built-in font at `size` px; Pillow < 10.1 has only a fixed ~11 px bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def draw_centred(draw, xy, text, fnt, fill):
    """Text centred on the point xy; every title on the same baseline (its height measured on "Ag").
    textbbox rather than anchor=: anchors need a FreeType font."""
    try:
        left, _, right, _ = draw.textbbox((0, 0), text, font=fnt)
        _, top, _, bottom = draw.textbbox((0, 0), "Ag", font=fnt)
    except (AttributeError, ValueError):  # Pillow < 9.2 measures only FreeType fonts: bitmap 6 x 11
        left, top, right, bottom = 0, 0, 6 * len(text), 11
    draw.text((xy[0] - (left + right) / 2, xy[1] - (top + bottom) / 2), text, font=fnt, fill=fill)


def grid_body(columns, per_row=4, gap=4):
    """uint8 (H, W, 3): each image's columns side by side, `per_row` images per row, white gaps."""
    from torchvision.utils import (
        make_grid,  # imported here: importing torchvision is slow; only grids need it
    )
    # (N, 3, H, k*W): one image's tuple
    tuples = torch.cat([ce_data.unit(c).cpu() for c in columns], dim=3)
    grid = make_grid(tuples, nrow=per_row, padding=gap, pad_value=1.0)
    if len(tuples) > 1:  # make_grid also pads the border (a lone image: unpadded): crop it
        grid = grid[:, gap:grid.shape[1] - gap, gap:grid.shape[2] - gap]
    # the rounding of torchvision's save_image: x * 255 + 0.5, truncated; here to add a title strip
    return grid.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def save_grid(path, columns, per_row=4, gap=4, titles=None):
    """Save a PNG of image tuples: columns = [masked, filled, original, ...], each (N, 3, H, W).

    Each image's tuple is laid out side by side; `per_row` tuples per row, white gaps between
    tuples. A strip on top names the columns over every tuple: `titles` (default: masked | filled |
    original for 3 columns; () for no strip).
    """
    body = grid_body(columns, per_row, gap)
    titles = (GRID_TITLES if len(columns) == 3 else ()) if titles is None else tuple(titles)
    top = TITLE_H if titles else 0
    im = Image.new("RGB", (body.shape[1], top + body.shape[0]), "white")
    im.paste(Image.fromarray(body), (0, top))
    info = PngImagePlugin.PngInfo()
    info.add_text(GRID_INFO_ROW, str(columns[0].shape[-2] + gap))
    if titles:
        draw, fnt, w = ImageDraw.Draw(im), font(13), columns[0].shape[-1]
        for x0 in range(0, im.width, len(columns) * w + gap):
            for j, title in enumerate(titles):
                draw_centred(draw, (x0 + (j + 0.5) * w, top / 2), title, fnt, (0, 0, 0))
        info.add_text(GRID_INFO, str(top))
        info.add_text(GRID_INFO_TITLES, " | ".join(titles))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    cli.atomic_write(path, lambda f: im.save(f, format="PNG", pnginfo=info))
    return path


def outline(images, mask, colour=(1.0, 1.0, -1.0)):
    """Draw the 1-px border of each hole (hidden pixels next to a visible one) in yellow."""
    hole = mask.float()
    edge = mask & (torch.nn.functional.max_pool2d(1 - hole, 3, stride=1, padding=1) > 0)
    out = images.clone()
    for c in range(3):
        out[:, c].masked_fill_(edge[:, 0], colour[c])
    return out


# ------------------------------------------------------------------------------------------------
# Figures with notes under them, training curves

def pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    return plt


FOOT_PT = 7  # font size of the notes under a figure


def drawable(text):
    """`text` as matplotlib draws it whatever it holds, so that a name never stops a figure: bytes
    not valid in the locale (Python's surrogates, e.g. from a run folder's name) as U+FFFD, which
    FreeType cannot be given, and "$" as itself, not the start of mathtext to parse."""
    text = "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in str(text))
    return text.replace("$", r"\$")


def note_lines(notes, width_in):
    """`notes` (one per model) wrapped to a figure `width_in` inches wide, and their height (in)."""
    # characters per line: an average glyph is ~0.6 of the font size
    chars = int(width_in * 72 / (FOOT_PT * 0.62))
    lines = [ln for note in notes for ln in textwrap.wrap(note, chars, subsequent_indent="    ")]
    return lines, (len(lines) * FOOT_PT * 1.35 / 72 + 0.15 if lines else 0.0)


def finish_figure(fig, path, lines=(), dpi=80):
    """Write the note `lines` in the strip left free at the bottom of the laid-out figure, and save
    it as a PNG (folders created, written atomically)."""
    if lines:
        fig.text(0.01, 0.06 / fig.get_size_inches()[1], drawable("\n".join(lines)), ha="left",
                 va="bottom", fontsize=FOOT_PT, linespacing=1.35, family="monospace")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    pyplot().close(fig)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    cli.atomic_write(path, buf.getvalue())
    return path


def read_log(run):
    """A run's log.jsonl as (training records, evaluation records)."""
    recs = cli.read_log(os.path.join(run, "log.jsonl"))
    return [r for r in recs if "loss_rec" in r], [r for r in recs if "eval" in r]


IGNORED_IN_LABELS = {"out", "resume", "device", "quick", "log_every", "eval_every", "compile",
                     "data_root"}


def run_args(path):
    """The flags (args.json) of a run folder or of checkpoint `path`'s folder; {} if unreadable or
    not a dict of flags each of its type (checkpoints.flag_type_ok): a broken file, treated as a
    broken log line is."""
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    try:
        with open(os.path.join(folder, "args.json"), "rb") as f:
            a = json.load(f)
    except (OSError, ValueError, RecursionError):
        return {}
    ok = isinstance(a, dict) and all(checkpoints.flag_type_ok(k, v) for k, v in a.items())
    return a if ok else {}


def ratio_label(a):
    """'x1000' for lambda_rec / lambda_adv = 1000 (the seed report's sweep labels); None without
    both weights."""
    rec, adv = a.get("lam_rec"), a.get("lam_adv")
    if not isinstance(rec, (int, float)) or not isinstance(adv, (int, float)):
        return None
    return "rec only" if adv == 0 else f"x{float(f'{rec / adv:.4g}'):g}"


def run_labels(paths, labels=None):
    """Short labels of several runs (or checkpoints) for titles and legends, and one note per run
    naming it and the flags in which the runs differ (args.json). Returns (labels, notes).

    Labels: `labels` if given; else the ratio "x1000" when only lambda_rec/lambda_adv differ (a
    lambda sweep); else "A", "B", ...  A single run is labelled by its folder name, with no note.
    Notes: "A = runs/a: lam_adv=0.01 width=32".
    """
    args = [run_args(p) for p in paths]
    if len(paths) == 1 and labels is None:
        return [os.path.basename(os.path.normpath(paths[0]))], []
    keys = sorted(k for k in set().union(*args) if k not in IGNORED_IN_LABELS
                  and len({json.dumps(a.get(k)) for a in args}) > 1)
    if labels is None:
        sweep = keys and set(keys) <= {"lam_rec", "lam_adv"}
        labels = [ratio_label(a) for a in args] if sweep else []
        if None in labels or len(set(labels)) < len(paths):  # not a clean sweep: letters
            labels = [chr(ord("A") + i) if i < 26 else str(i + 1) for i in range(len(paths))]
    notes = []
    for lab, p, a in zip(labels, paths, args):
        flags = " ".join(f"{k}={a.get(k)}" for k in keys)
        notes.append(f"{lab} = {os.path.normpath(p)}" + (f": {flags}" if flags else ""))
    return list(labels), notes


MARKERS_UP_TO = 40  # series with at most this many points are drawn with a marker on each point


GAN_PANELS = (("loss_D", "loss_D"), ("loss_adv", "loss_adv (G, Eq. 2)"), ("D_x", "D(x)"),
              ("D_G_x", "D(G(x))"))   # drawn only for runs whose D ran (--lam-adv > 0)


def with_d(run, train):
    """Whether a run trained D: its log has D's statistics and its flags do not say --lam-adv 0
    (older L2-only logs recorded D's placeholders)."""
    return any("D_x" in r for r in train) and run_args(run).get("lam_adv", 1) != 0


def plot_curves(runs, path, labels=None):
    """Training curves of one or several runs, overlaid: losses, D outputs (when some run trained
    D) and held-out PSNR against step ("no evaluation yet" before the first). Legend: short labels
    (see run_labels); several runs: a note per run under the plot names its differing flags."""
    plt = pyplot()
    logs = [read_log(run) for run in runs]
    gan = [with_d(run, train) for run, (train, _) in zip(runs, logs)]
    rec, psnr = ("loss_rec", "loss_rec (Eq. 1)"), ("psnr", "held-out PSNR, hole (dB)")
    panels = [GAN_PANELS[0], rec, *GAN_PANELS[1:], psnr] if any(gan) else [rec, psnr]
    cols, rows = (3, 2) if any(gan) else (2, 1)
    W, H = 4.0 * cols, 3.25 * rows          # inches, without the notes
    labels, notes = run_labels(runs, labels)
    lines, foot = note_lines(notes, W)
    fig, axes = plt.subplots(rows, cols, figsize=(W, H + foot), squeeze=False)
    for (train, evals), label, d in zip(logs, labels, gan):
        for ax, (key, title) in zip(axes.flat, panels):
            recs = evals if key == "psnr" else train if d or key == "loss_rec" else []
            recs = [r for r in recs if key == "psnr" or key in r]   # L2-only steps: no D
            ys = [r["eval"]["psnr"] if key == "psnr" else r[key] for r in recs]
            ax.plot([r["step"] for r in recs], ys,
                    marker="o" if len(recs) <= MARKERS_UP_TO else None, ms=3,
                    label=drawable(label))
    for ax, (key, title) in zip(axes.flat, panels):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.ticklabel_format(useOffset=False, style="plain")  # real values on ticks, no "+1e4"
        ax.grid(alpha=0.3)
    if not any(evals for _, evals in logs):   # stopped before the first evaluation
        ax = axes.flat[len(panels) - 1]
        ax.clear()
        ax.set_title(panels[-1][1], fontsize=10)
        ax.set_xticks([]), ax.set_yticks([])
        ax.text(0.5, 0.5, "no evaluation yet", ha="center", va="center", transform=ax.transAxes,
                fontsize=10, color="0.4")
        axes.flat[len(panels) - 2].legend(fontsize=8)
    else:
        axes.flat[len(panels) - 1].legend(fontsize=8)
    # A fixed layout in inches: tight_layout, which measures every tick label, is slow
    left, right, top, bottom, gap = 0.7, 0.15, 0.35, 0.5 + foot, 0.75
    w, h = (W - left - right - (cols - 1) * gap) / cols, (H - 0.35 - 0.5 - (rows - 1) * gap) / rows
    fig.subplots_adjust(left=left / W, right=1 - right / W, top=1 - top / (H + foot),
                        bottom=bottom / (H + foot), wspace=gap / w, hspace=gap / h)
    return finish_figure(fig, path, lines, dpi=72)


# ------------------------------------------------------------------------------------------------
# The evolution GIF

def gif_frame(path, rows, scale):
    """The first `rows` rows of one sample grid (its title strip skipped), scaled, with a dark strip
    on top that names the step (and the columns): drawn after scaling, so the text stays legible."""
    with Image.open(path) as src:
        top, titles = int(src.info.get(GRID_INFO, 0)), src.info.get(GRID_INFO_TITLES, "")
        row = int(src.info.get(GRID_INFO_ROW, 128 + 4))   # older grids: 128 px images, 4 px gaps
        im = src.convert("RGB")
    im = im.crop((0, top, im.width, min(im.height, top + rows * row - 4)))
    im = im.resize((int(im.width * scale), int(im.height * scale)), Image.BILINEAR)
    frame = Image.new("RGB", (im.width, GIF_STRIP_H + im.height), (32, 32, 32))
    frame.paste(im, (0, GIF_STRIP_H))
    step = int(os.path.basename(path)[5:12])
    text = f"step {step:,}" + (f"   ({titles})" if titles else "")
    ImageDraw.Draw(frame).text((4, 2), text, font=font(15), fill=(255, 255, 255))
    return frame


def make_gif(run, max_frames=20, rows=2, scale=0.5):
    """OUT/evolution.gif: the first `rows` rows of each sample grid over training, at most
    `max_frames` frames. None (nothing written) before the first sample grid."""
    folder = os.path.join(run, "samples")
    names = sorted(f for f in (os.listdir(folder) if os.path.isdir(folder) else ())
                   if f.startswith("step_") and f.endswith(".png"))
    if not names:
        return None
    k = min(max_frames, len(names))  # evenly spaced frames, first and last included
    pick = sorted({round(i * (len(names) - 1) / max(k - 1, 1)) for i in range(k)})
    frames = [gif_frame(os.path.join(run, "samples", names[i]), rows, scale).quantize(colors=128)
              for i in pick]
    path = os.path.join(run, "evolution.gif")
    cli.atomic_write(path, lambda f: frames[0].save(f, format="GIF", save_all=True,
                                                    append_images=frames[1:], duration=400, loop=0))
    return path
