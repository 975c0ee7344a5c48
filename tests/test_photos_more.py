"""Photos and figures that used to end in a traceback or a wrong file (issues 25 and 26): models of
different tasks side by side, names a stream or a font cannot hold, photos of a few pixels, a
user's mask exact at full size (and its alpha), over-long names, k/N progress, and ce_bench's
reference loop on a folder with a file that does not decode."""
import io
import math
import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import ce_bench
import ce_data
import ce_eval
import ce_masks
import ce_model
import ce_train
from ce_utils import checkpoints, cli, figures, photos

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A tiny centre model and a tiny region model, untrained (where their output goes matters
    here, not what it is), saved as ce_train.py saves them."""
    tmp, paths = tmp_path_factory.mktemp("more"), {}
    for kind in ("center", "region"):
        args = ce_train.default_args(width=8, bottleneck=16, mask=kind, device="cpu")
        torch.manual_seed(0)
        G, D = ce_model.build_pair(vars(args))
        paths[kind] = str(tmp / f"{kind}.pt")
        checkpoints.save_checkpoint(paths[kind], {"G": G.state_dict(), "D": D.state_dict(),
                                                  "args": vars(args), "step": 0})
    return paths


def noise_photo(path, w, h, seed=0):
    """A w x h photo of RGB noise, saved losslessly; returns its pixels."""
    px = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(px).save(path)
    return px


def inpaint(ckpt, inputs, out, *more):
    return cli.run(ce_eval.main, ["--ckpt", ckpt, "--device", "cpu", "--image",
                                  *map(str, inputs), "--out", str(out), *map(str, more)])


# ------------------------------------------------------------------------------------------------
# Figures of several checkpoints: each block of columns on its own task

class Grey(torch.nn.Module):
    """A generator that predicts mid-grey (0 in [-1, 1]) at `side` px: its PSNR is known."""

    def __init__(self, side):
        super().__init__()
        self.side, self.p = side, torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return torch.zeros(len(x), 3, self.side, self.side) + 0 * self.p


@pytest.fixture
def quick_baselines(monkeypatch):
    """The baselines' columns hold the masked input: the harmonic solve on 227 px region masks
    takes seconds, and these tests are about the models' columns."""
    monkeypatch.setattr(ce_eval.baselines, "baseline_image", lambda name, masked, mask: masked)


def grey_psnr(x, rows, cols, hole=None):
    """PSNR (dB) of a mid-grey prediction of x's pixels [rows, cols] (on [0, 1]), per image."""
    d = (ce_data.unit(x)[..., rows, cols] - 0.5) ** 2
    if hole is None:
        return [10 * math.log10(1 / float(e.mean())) for e in d]
    m = hole.expand_as(d)
    return [10 * math.log10(1 / float((e * k).sum() / k.sum())) for e, k in zip(d, m)]


def test_figure_gives_each_model_its_own_task(tmp_path, monkeypatch, quick_baselines):
    """A centre dcgan (128 px) beside a region AlexNet (227 px): one block per task, each model
    scored on its own images and hole (before: a traceback from the first model's input size)."""
    centre = {"overlap": 7, "ring": "visible", "fill": "mean", "load_size": 128}
    alex = {"overlap": 7, "ring": "visible", "fill": "mean", "mask": "region", "arch": "alexnet",
            "load_size": 227}

    def images(a):
        s = ce_model.input_size(a)
        return torch.rand(2, 3, s, s, generator=torch.Generator().manual_seed(s)) * 2 - 1
    seen, real = {}, figures.finish_figure

    def spy(fig, path, lines=(), **kw):
        axes = fig.axes[:len(fig.axes) // 2]              # the first row
        seen.update(titles=[ax.get_title() for ax in axes], psnr=[ax.get_xlabel() for ax in axes],
                    lines=list(lines))
        return real(fig, path, lines, **kw)
    monkeypatch.setattr(figures, "finish_figure", spy)
    models = [("A", Grey(64), centre), ("B", Grey(227), alex), ("C", Grey(64), centre)]
    ce_eval.comparison_figure(models, images, str(tmp_path / "f.png"))
    t = seen["titles"]
    assert t == ["masked input\nA, C", "A", "C", "context mean", "harmonic", "original",
                 "masked input\nB", "B", "context mean", "harmonic", "original"]
    # A: the 50 x 50 hole inside the 7 px visible ring of the centre 64 x 64, at 128 px
    x128, x227 = images(centre), images(alex)
    assert seen["psnr"][1] == f"{grey_psnr(x128, slice(39, 89), slice(39, 89))[0]:.1f} dB"
    # B: held-out region mask 0 of 227 px images
    hole = ce_masks.eval_masks("region", 0, 2, size=227)
    assert seen["psnr"][7] == f"{grey_psnr(x227, slice(None), slice(None), hole)[0]:.1f} dB"
    assert seen["lines"][-2:] == ["task of A, C: centre hole, overlap 7, ring visible, 128 px, "
                                  "fill mean", "task of B: region mask, 227 px, fill mean"]


def test_figure_cli_decodes_the_images_at_each_models_load_size(tmp_path, monkeypatch, capsys,
                                                                quick_baselines):
    """ce_eval --figure: the first checkpoint's held-out images, decoded once per load size (an
    AlexNet's 227 px beside a dcgan's 128 px), --n of them for every model."""
    calls = []

    def held_out(args, a):
        calls.append(a["load_size"])
        s = a["load_size"]
        return np.random.default_rng(s).integers(0, 256, (5, s, s, 3), dtype=np.uint8), "shapes"
    monkeypatch.setattr(ce_eval, "held_out", held_out)
    base = {"overlap": 7, "ring": "visible", "fill": "mean", "data": "shapes"}
    loaded = [(Grey(64), None, {"args": {**base, "load_size": 128}, "path": "a/best.pt"}),
              (Grey(227), None, {"args": {**base, "mask": "region", "arch": "alexnet",
                                          "load_size": 227}, "path": "b/best.pt"}),
              (Grey(64), None, {"args": {**base, "load_size": 128}, "path": "c/best.pt"})]
    args = SimpleNamespace(n=3, out=str(tmp_path), split="val")
    ce_eval.write_figure(args, loaded, None)
    assert sorted(calls) == [128, 227] and os.path.isfile(tmp_path / "figure.png")
    said = capsys.readouterr().out
    assert ("masked | A | C | baselines | original, then masked | B | baselines | original, "
            "3 shapes/val images") in said and "task of B: region mask, 227 px" in said


# ------------------------------------------------------------------------------------------------
# Names that a stream or a font cannot hold

def test_curves_draw_any_run_name(tmp_path, monkeypatch):
    """A run folder whose name is not valid text in the locale (bytes that are not UTF-8) or reads
    as mathtext ("$\\frac$") is drawn as it is named, U+FFFD for the bad byte (before: a TypeError
    from FreeType, a ParseException from mathtext)."""
    from test_eval_figures import write_run
    runs = [os.fsdecode(os.fsencode(str(tmp_path)) + b"/run\xff"), str(tmp_path / "a$\\frac$b")]
    for r in runs:
        write_run(r, {"lam_adv": 0.001}, [1, 2])
    seen, real = {}, figures.finish_figure

    def spy(fig, path, lines=(), **kw):
        seen["legend"] = [t.get_text() for t in fig.axes[-1].get_legend().get_texts()]
        out = real(fig, path, lines, **kw)
        seen["notes"] = [t.get_text() for t in fig.texts]
        return out
    monkeypatch.setattr(figures, "finish_figure", spy)
    assert os.path.isfile(figures.plot_curves(runs[:1], str(tmp_path / "c.png")))  # as ce_train
    assert seen["legend"] == ["run\ufffd"]
    figures.plot_curves(runs, str(tmp_path / "both.png"), labels=["$x", "B"])
    assert seen["legend"] == ["\\$x", "B"]
    assert seen["notes"] == [f"\\$x = {tmp_path}/run\ufffd\nB = {tmp_path}/a\\$\\frac\\$b"]


def test_stdout_that_cannot_encode_a_name_does_not_stop_the_photos(tmp_path, ckpts, monkeypatch):
    """stdout in ASCII: café.png's line is printed escaped and the next photo is done too (before:
    a UnicodeEncodeError after the first photo)."""
    for name in ("café.png", "zz.png"):
        noise_photo(tmp_path / name, 40, 30)
    out = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    monkeypatch.setattr(sys, "stdout", out)
    inpaint(ckpts["center"], [tmp_path / "café.png", tmp_path / "zz.png"], tmp_path / "o")
    out.flush()
    said = out.buffer.getvalue().decode("ascii")
    assert "caf\\xe9.png: 40x30" in said and "zz.png: 40x30" in said
    assert {"café_full.png", "zz_full.png"} <= set(os.listdir(tmp_path / "o"))


# ------------------------------------------------------------------------------------------------
# Photos of a few pixels

@pytest.mark.parametrize("size,overlap,ring", [(128, 7, "visible"), (227, 7, "visible")])
def test_centre_hole_of_a_photo_of_any_size_is_at_least_one_pixel(size, overlap, ring):
    """paste_full at every photo side from 1 to 200 px: the hole scaled back to the photo keeps at
    least one pixel, inside the square, within a pixel of its exact scaled size; every pixel
    outside it is the photo's (before: a 0 px hole at side 2, a ValueError from Pillow)."""
    a, b = ce_data.hole_bounds(size, overlap, ring)
    filled = np.full((size, size, 3), 7, np.uint8)       # a colour no pixel of the photo has
    for side in range(1, 201):
        im = Image.new("RGB", (side + 3, side), (200, 100, 50))
        out, (x, y, s) = photos.paste_full(im, filled, (1, 0, side), (a, b))
        exact = (b - a) * side / size
        assert 1 <= s and abs(s - exact) <= 1 and 0 <= y and y + s <= side and x >= 1
        changed = (np.asarray(out) != np.asarray(im)).any(axis=2)
        want = np.zeros_like(changed)
        want[y:y + s, x:x + s] = True
        assert np.array_equal(changed, want), side


def test_photos_of_one_pixel_and_up_are_inpainted_or_refused_in_one_line(tmp_path, ckpts,
                                                                         capsys):
    for w, h in ((1, 1), (2, 2), (3, 1)):
        noise_photo(tmp_path / f"p{w}x{h}.png", w, h)
    inpaint(ckpts["center"], [tmp_path / "p2x2.png", tmp_path / "p3x1.png"], tmp_path / "o")
    said = capsys.readouterr().out
    assert "only the 1x1 hole at (1, 1) replaced" in said and "p3x1.png: 3x1" in said
    inpaint(ckpts["region"], [tmp_path / "p1x1.png"], tmp_path / "o")
    assert "p1x1.png: 1x1" in capsys.readouterr().out
    Image.new("L", (2, 2), 255).save(tmp_path / "all.png")
    with pytest.raises(SystemExit) as e:
        inpaint(ckpts["region"], [tmp_path / "p2x2.png"], tmp_path / "o", "--mask",
                tmp_path / "all.png")
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "whole central square" in err


# ------------------------------------------------------------------------------------------------
# A user's mask, exact at full size; its alpha

def irregular_mask(w, h):
    """An ellipse reaching past the central square, and thin diagonal strokes."""
    y, x = np.mgrid[:h, :w]
    return (((x - 45) / 30) ** 2 + ((y - 50) / 12) ** 2 < 1) | (((x - 2 * y) % 37 == 0) & (y > 20))


def test_user_mask_is_exact_at_full_size(tmp_path, ckpts, capsys):
    """--image --mask on a 150 x 110 photo: outside the mask the written PNG is the photo bit for
    bit; every mask pixel in the central 110 x 110 square is replaced, those beside it are kept,
    and the message counts both (before: pixels outside the mask changed, mask pixels kept)."""
    photo = noise_photo(tmp_path / "p.png", 150, 110)
    m = irregular_mask(150, 110)
    Image.fromarray(np.where(m, 255, 0).astype(np.uint8)).save(tmp_path / "m.png")
    inpaint(ckpts["region"], [tmp_path / "p.png"], tmp_path / "o", "--mask", tmp_path / "m.png")
    full = np.asarray(Image.open(tmp_path / "o" / "p_full.png"))
    changed = (full != photo).any(axis=2)
    square = np.zeros_like(m)
    square[:, 20:130] = True
    assert not changed[~m].any()
    assert changed[m & square].all() and not changed[m & ~square].any()
    n_in, n_out = int((m & square).sum()), int((m & ~square).sum())
    said = capsys.readouterr().out
    assert n_out > 0 and (f"only the {n_in} px of your mask replaced; its {n_out} px outside the "
                          "central 110x110 square the model sees are kept") in said


def test_rgba_mask_alpha_marks_the_hole(tmp_path, ckpts):
    """A mask with transparency is its alpha: dark strokes painted opaque on a transparent layer
    are the hole, as the same strokes in white on black (before: composited on white, inverted)."""
    photo = noise_photo(tmp_path / "p.png", 150, 110)
    m = irregular_mask(150, 110)
    Image.fromarray(np.where(m, 255, 0).astype(np.uint8)).save(tmp_path / "white.png")
    rgba = np.zeros((110, 150, 4), np.uint8)
    rgba[m] = (20, 20, 20, 255)
    Image.fromarray(rgba).save(tmp_path / "layer.png")
    opaque = np.dstack([np.where(m, 255, 0)] * 3 + [np.full(m.shape, 255)]).astype(np.uint8)
    Image.fromarray(opaque).save(tmp_path / "opaque.png")     # all opaque: its colour decides
    fulls = []
    for mask in ("white.png", "layer.png", "opaque.png"):
        inpaint(ckpts["region"], [tmp_path / "p.png"], tmp_path / mask[:-4], "--mask",
                tmp_path / mask)
        fulls.append(np.asarray(Image.open(tmp_path / mask[:-4] / "p_full.png")))
    assert np.array_equal(fulls[0], fulls[1]) and np.array_equal(fulls[0], fulls[2])
    assert not (fulls[1] != photo).any(axis=2)[~m].any()


# ------------------------------------------------------------------------------------------------
# Over-long names, many photos

def test_output_names_fit_the_file_name_limit_and_stay_distinct(tmp_path, ckpts, capsys):
    """Names too long for NAME_compare.png's temp file are cut to fit in bytes (é is 2), with a
    hash of the whole: two long names that start alike stay two; a short name is untouched."""
    long1, long2 = "é" * 150 + "1", "é" * 150 + "2"
    _, names, _ = photos.photo_inputs([f"{long1}.png", f"{long2}.png", "short.png"])
    tail = len(f"_compare.png{cli.TMP_SUFFIX}{2 ** 22}")     # pid_max on Linux: 2^22
    assert all(len(os.fsencode(n)) + tail <= 255 for n in names)
    assert len(set(names)) == 3 and names[2] == "short" and names[0].startswith("é" * 100)
    assert "2 output name(s) shortened" in capsys.readouterr().err
    # end to end: a 240-character name (244 bytes with .png) is inpainted with its neighbour
    name = "x" * 240
    noise_photo(tmp_path / f"{name}.png", 30, 20)
    noise_photo(tmp_path / "y.png", 30, 20)
    inpaint(ckpts["center"], [tmp_path / f"{name}.png", tmp_path / "y.png"], tmp_path / "o")
    written = os.listdir(tmp_path / "o")
    assert len(written) == 6 and "y_full.png" in written
    assert sum(w.startswith("x" * 200) for w in written) == 3


def test_many_photos_show_k_of_n(tmp_path, ckpts, monkeypatch, capsys):
    monkeypatch.setattr(photos, "PHOTOS_PROGRESS_ABOVE", 2)   # 20 in use
    monkeypatch.setattr(ce_eval, "PROGRESS_EVERY_S", 0.0)     # a line after every photo
    os.makedirs(tmp_path / "d")
    for i in range(3):
        noise_photo(tmp_path / "d" / f"{i}.png", 20, 20, i)
    (tmp_path / "d" / "3.png").write_text("not a PNG")
    inpaint(ckpts["center"], [tmp_path / "d"], tmp_path / "o")
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("inpainting")]
    assert [ln.split()[1] for ln in lines] == ["1/4", "2/4", "3/4", "4/4"]


# ------------------------------------------------------------------------------------------------
# ce_bench's reference loop reads only the files that decode

def test_bench_reference_loop_skips_files_that_do_not_decode(tmp_path):
    """A folder of 2 images and 2 broken files: every image the reference loop yields is one of
    the 2 (flipped or not), and the timed loop runs through whole epochs (before: the DataLoader
    raised UnidentifiedImageError on the first broken file)."""
    colours = ((255, 0, 0), (0, 0, 255))
    for split in ("train", "val"):
        os.makedirs(tmp_path / split)
        for i, c in enumerate(colours):
            Image.new("RGB", (128, 128), c).save(tmp_path / split / f"g{i}.png")
    for i in range(2):
        (tmp_path / "train" / f"b{i}.jpg").write_text("not a JPEG")
    files = sorted(str(tmp_path / "train" / f) for f in os.listdir(tmp_path / "train"))
    ds = ce_bench.ReferenceDataset(files)
    want = [torch.tensor(c).float().view(3, 1, 1) / 127.5 - 1 for c in colours]
    for i in range(len(ds)):
        assert any(torch.equal(ds[i], w.expand(3, 128, 128)) for w in want)
    a = ce_bench.parse_args(["--device", "cpu", "--width", "8", "--bottleneck", "16",
                             "--batch-size", "2", "--steps", "1", "--warmup", "0", "--repeats",
                             "2", "--workers", "0", "--data", "folder", "--data-root",
                             str(tmp_path)])
    r = ce_bench.measure_reference(a, torch.device("cpu"), None, None)
    assert r["config"] == "reference" and r["img_per_s"] > 0
