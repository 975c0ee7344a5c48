"""Figures read from outside: sample grids laid out by torchvision (pixel-identical to the
hand-written layout) with a title strip, a legible GIF label, short labels with notes, curves,
--plot --out, evaluation progress, --help."""
import json
import math
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

import ce_eval
from ce_utils import figures


def hand_grid(columns, per_row, gap):
    """The sample-grid layout the project wrote by hand before using torchvision (the reference)."""
    cols = [figures.to_uint8(c) for c in columns]
    n, h, w = cols[0].shape[:3]
    tuple_w = w * len(cols)
    rows = math.ceil(n / per_row)
    per_row = min(per_row, n)
    canvas = np.full((rows * (h + gap) - gap, per_row * (tuple_w + gap) - gap, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, per_row)
        y, x = r * (h + gap), c * (tuple_w + gap)
        canvas[y:y + h, x:x + tuple_w] = np.concatenate([col[i] for col in cols], axis=1)
    return canvas


@pytest.mark.parametrize("n,k,per_row,gap", [(16, 3, 4, 4), (5, 3, 2, 3), (1, 3, 4, 4),
                                             (7, 2, 3, 0), (3, 4, 8, 2)])
def test_grid_body_is_the_hand_written_layout(n, k, per_row, gap):
    g = torch.Generator().manual_seed(n * 100 + k)
    # values beyond [-1, 1] too: both clamp; sizes not square; a partial last row; one image; no gap
    columns = [torch.rand(n, 3, 12, 10, generator=g) * 2.4 - 1.2 for _ in range(k)]
    assert np.array_equal(figures.grid_body(columns, per_row, gap),
                          hand_grid(columns, per_row, gap))


def test_save_grid_adds_a_strip_naming_the_columns(tmp_path):
    # black | grey | white images
    columns = [torch.full((5, 3, 16, 64), v) for v in (-1.0, 0.0, 1.0)]
    body = hand_grid(columns, 2, 4)
    path = figures.save_grid(str(tmp_path / "sub" / "g.png"), columns, per_row=2)   # folder created
    with Image.open(path) as im:
        assert im.info[figures.GRID_INFO] == str(figures.TITLE_H)
        assert im.info[figures.GRID_INFO_TITLES] == "masked | filled | original"
        png = np.asarray(im.convert("RGB"))
    top = figures.TITLE_H
    assert png.shape == (top + body.shape[0], body.shape[1], 3)
    assert np.array_equal(png[top:], body)                                  # the body is untouched
    strip = png[:top].min(axis=2)
    # both tuples of a row carry titles
    for x0 in (0, 3 * 64 + 4):
        for j in range(3):
            # dark text over every column
            assert strip[:, x0 + 64 * j:x0 + 64 * (j + 1)].min() < 100
    # nothing drawn over the gap
    assert strip[:, 3 * 64:3 * 64 + 4].min() == 255
    # titles=(): no strip, exactly the body; other titles are written as given
    figures.save_grid(str(tmp_path / "plain.png"), columns, per_row=2, titles=())
    assert np.array_equal(np.asarray(Image.open(tmp_path / "plain.png").convert("RGB")), body)
    figures.save_grid(str(tmp_path / "two.png"), columns[:2], per_row=2, titles=("input", "output"))
    assert Image.open(tmp_path / "two.png").info[figures.GRID_INFO_TITLES] == "input | output"


def test_gif_skips_the_title_strip_and_labels_the_step_on_a_dark_strip(tmp_path):
    red = torch.tensor([1.0, -1.0, -1.0]).view(1, 3, 1, 1).expand(16, 3, 128, 128)
    for step in (10, 20, 30):
        figures.save_grid(str(tmp_path / "samples" / f"step_{step:07d}.png"), [red, red, red])
    gif = Image.open(figures.make_gif(str(tmp_path)))
    s = figures.GIF_STRIP_H
    # 2 rows of 4 tuples, at half scale, under the strip
    assert gif.n_frames == 3 and gif.size == (774, s + 130)
    frame = np.asarray(gif.convert("RGB")).astype(int)
    # the body starts right under the strip: no titles
    assert np.abs(frame[s + 1, 1] - (255, 0, 0)).max() <= 8
    label = frame[:s, :150].max(axis=2)
    assert (label > 200).sum() > 50 and np.median(label) < 60  # bright text on a dark strip


def test_gif_keeps_whole_rows_of_227_px_grids(tmp_path):
    """AlexNet runs' grids hold 227 px images: the GIF's first 2 rows are 2 whole rows of them."""
    red = torch.tensor([1.0, -1.0, -1.0]).view(1, 3, 1, 1).expand(12, 3, 227, 227)
    figures.save_grid(str(tmp_path / "samples" / "step_0000010.png"), [red, red, red])
    gif = Image.open(figures.make_gif(str(tmp_path)))
    assert gif.size[1] == figures.GIF_STRIP_H + int((2 * (227 + 4) - 4) * 0.5)


def write_run(folder, args, steps):
    """A run folder as ce_train writes it (args.json, log.jsonl), without training."""
    os.makedirs(folder)
    with open(os.path.join(folder, "args.json"), "w") as f:
        json.dump(args, f)
    with open(os.path.join(folder, "log.jsonl"), "w") as f:
        for s in steps:
            # loss_rec varies in its 6th digit: matplotlib's default ticks would show "+5e-1"
            f.write(json.dumps({"step": s, "loss_D": 1.0, "loss_rec": 0.5 + (s % 1000) * 1e-8,
                                "loss_adv": 2.0, "D_x": 0.6, "D_G_x": 0.4}) + "\n")
            f.write(json.dumps({"step": s, "eval": {"psnr": 15.0 + (s % 1000) * 1e-3}}) + "\n")


def test_run_labels_short_with_notes(tmp_path):
    base = {"data": "tiny", "width": 64, "out": "x"}
    sweep = []
    for r in (1, 1000):   # the lambdas exactly as ce_sweep passes them (6 significant digits)
        sweep.append(str(tmp_path / f"ratio{r}"))
        lams = {"lam_rec": float(f"{r / (1 + r):.6g}"), "lam_adv": float(f"{1 / (1 + r):.6g}")}
        write_run(sweep[-1], {**base, **lams}, [1])
    labels, notes = figures.run_labels(sweep)
    assert labels == ["x1", "x1000"]
    assert notes[1] == f"x1000 = {sweep[1]}: lam_adv=0.000999001 lam_rec=0.999001"
    other = [str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "c")]
    for p, (w, lam) in zip(other, ((32, 0.001), (64, 0.001), (64, 0.01))):
        write_run(p, {**base, "width": w, "lam_rec": 0.999, "lam_adv": lam, "out": p}, [1])
    labels, notes = figures.run_labels(other)
    assert labels == ["A", "B", "C"]          # width differs too: not a sweep, letters
    assert notes[0] == f"A = {other[0]}: lam_adv=0.001 width=32"
    best = os.path.join(other[2], "best.pt")
    labels, notes = figures.run_labels([best, sweep[0]], ["mine", "theirs"])
    assert labels == ["mine", "theirs"] and notes[0].startswith(f"mine = {best}: ")
    assert figures.run_labels([other[0]]) == (["a"], [])


def test_curves_short_labels_markers_plain_ticks_and_out_folder(tmp_path, monkeypatch, capsys):
    runs = [str(tmp_path / "r1"), str(tmp_path / "r2")]
    # steps 1,000,000 + 0..99: the default step axis would read "+1e6" with ticks 0..100
    write_run(runs[0], {"lam_rec": 0.999, "lam_adv": 0.001}, [1000000, 1000050, 1000099])
    write_run(runs[1], {"lam_rec": 0.99, "lam_adv": 0.01}, range(1000000, 1000100))   # 100 points
    seen, real = {}, figures.finish_figure

    def spy(fig, path, lines=(), **kw):
        ax = fig.axes[1]       # loss_rec
        ax.figure.canvas.draw()
        seen.update(legend=[t.get_text() for t in fig.axes[5].get_legend().get_texts()],
                    notes=list(lines), markers=[ln.get_marker() for ln in ax.lines],
                    offset=ax.yaxis.get_offset_text().get_text(),
                    xoffset=ax.xaxis.get_offset_text().get_text())
        return real(fig, path, lines, **kw)

    monkeypatch.setattr(figures, "finish_figure", spy)
    # a folder that does not exist
    ce_eval.main(["--plot", *runs, "--out", str(tmp_path / "new" / "figs")])
    assert os.path.isfile(tmp_path / "new" / "figs" / "curves.png")
    assert "curves.png" in capsys.readouterr().out
    assert seen["legend"] == ["x999", "x99"] and seen["notes"][0].startswith("x999 = ")
    # the 3-point series has markers, the 100-point one does not
    assert seen["markers"] == ["o", "None"]
    assert seen["offset"] == "" and seen["xoffset"] == ""
    ce_eval.main(["--plot", runs[0], "--out", str(tmp_path / "deep" / "c.png")])
    assert Image.open(tmp_path / "deep" / "c.png").size[0] > 400
    with pytest.raises(SystemExit) as e:
        ce_eval.main(["--plot", runs[0], "--out", str(tmp_path / "c.svg")])
    assert e.value.code == 2 and "a .png file or a folder" in capsys.readouterr().err


def test_comparison_figure_short_titles_and_notes_under_it(tmp_path, monkeypatch):
    import ce_model
    G, _ = ce_model.build_models(8, 16)
    args = {"overlap": 7, "ring": "visible", "fill": "mean"}
    x = torch.rand(2, 3, 128, 128) * 2 - 1
    titles, real = [], figures.finish_figure

    def spy(fig, *a, **kw):
        titles.append([ax.get_title() for ax in fig.axes[:6]])
        return real(fig, *a, **kw)

    monkeypatch.setattr(figures, "finish_figure", spy)
    plain = ce_eval.comparison_figure([("A", G, args), ("B", G, args)], x, str(tmp_path / "a.png"))
    notes = ["A = runs/a: lam_adv=0.001 width=64", "B = runs/b: lam_adv=0.01 width=32 " + "x" * 300]
    noted = ce_eval.comparison_figure([("A", G, args), ("B", G, args)], x, str(tmp_path / "b.png"),
                                      notes=notes)
    assert titles[1] == ["masked input", "A", "B", "context mean", "harmonic", "original"]
    (w0, h0), (w1, h1) = Image.open(plain).size, Image.open(noted).size
    # 6 columns of 1.5 in + gaps = 9.5 in: 157 characters per line of 7 pt text, so the
    # 334-character note takes 3 lines; 4 lines of 7 * 1.35 pt plus a 0.15 in margin, at 80 dpi
    assert w0 == w1 and abs((h1 - h0) - (4 * 7 * 1.35 / 72 + 0.15) * 80) <= 1


def test_evaluate_progress_only_for_large_evaluations(monkeypatch, capsys):
    # 1000 in use; 10 here to keep the test small
    monkeypatch.setattr(ce_eval, "PROGRESS_ABOVE", 10)
    images = np.zeros((11, 128, 128, 3), np.uint8)
    monkeypatch.setattr(ce_eval, "PROGRESS_EVERY_S", 0.0)    # a line after every batch
    r = ce_eval.evaluate(None, images, methods=("fill",), batch_size=4)
    lines = capsys.readouterr().err.strip().splitlines()
    assert r["fill"]["n_images"] == 11 and len(lines) == 3    # ceil(11 / 4) batches
    assert "4/11 images" in lines[0] and "11/11 images" in lines[-1] and "img/s" in lines[-1]
    monkeypatch.setattr(ce_eval, "PROGRESS_EVERY_S", 1e9)     # rate-limited: only the final line
    ce_eval.evaluate(None, images, methods=("fill",), batch_size=4)
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    # not above the threshold: silent
    ce_eval.evaluate(None, images[:10], methods=("fill",), batch_size=4)
    assert capsys.readouterr().err == ""


def test_evaluate_and_inpaint_take_a_runs_flags_as_one_mask_spec():
    """evaluate(G, images, a) and inpaint(G, x, a), with a run's flags as a dict or a namespace,
    give what the explicit MaskSpec(mask, overlap, ring, fill, size) gives; arch sets the size."""
    from types import SimpleNamespace
    images = np.random.default_rng(0).integers(0, 256, (5, 140, 140, 3), dtype=np.uint8)
    methods = ("fill", "context_mean")
    for a in ({"mask": "block", "overlap": 4, "ring": "visible", "fill": "zero"},
              {"overlap": 4, "ring": "hidden", "fill": "zero", "arch": "dcgan"}):
        spec = ce_eval.MaskSpec(a.get("mask", "center"), a["overlap"], a["ring"], a["fill"], 128)
        old = ce_eval.evaluate(None, images, spec, methods=methods, batch_size=2)
        for flags in (a, SimpleNamespace(**a), ce_eval.mask_spec(a)):
            assert ce_eval.evaluate(None, images, flags, methods=methods, batch_size=2) == old
        assert old != ce_eval.evaluate(None, images, methods=methods, batch_size=2)  # not defaults
    assert ce_eval.mask_spec({**a, "arch": "alexnet"}).size == 227
    G = torch.nn.Conv2d(3, 3, 1)
    x = torch.rand(2, 3, 128, 128) * 2 - 1
    a = {"mask": "region", "overlap": 7, "ring": "visible", "fill": "mean"}
    old = ce_eval.inpaint(G, x, ce_eval.MaskSpec("region", 7, "visible", "mean", 128))
    assert all(torch.equal(u, v) for u, v in zip(old, ce_eval.inpaint(G, x, a)))


def help_of(main, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def flag_blocks(text):
    """{'--flag': its help text} from argparse's option list."""
    blocks, cur = {}, None
    # Python >= 3.10 | 3.9
    for line in re.split(r"\noptions:|\noptional arguments:", text)[1].splitlines():
        if line.startswith("  -"):
            cur = line.split()[0].rstrip(",")
            blocks[cur] = line
        elif cur:
            blocks[cur] += line
    return blocks


def test_help_shows_examples_defaults_and_every_flag(capsys):
    import ce_bench
    import ce_sweep
    text = help_of(ce_eval.main, capsys)
    assert "python ce_eval.py --ckpt runs/shapes/best.pt --json" in text
    assert "(default: None)" not in text
    blocks = flag_blocks(text)
    assert "(default: 256)" in blocks["--batch-size"] and "(default: val)" in blocks["--split"]
    text = help_of(ce_bench.main, capsys)
    blocks = flag_blocks(text)
    assert "python ce_bench.py --batch-size 512 --steps 50" in text and len(blocks) >= 15
    assert all(len(b.split()) > 3 for b in blocks.values())      # every flag has a help text ...
    # on/off switches
    flags_without_default = ("-h", "--compile", "--profile", "--skip-reference", "--json")
    # ... and each one but the switches its default
    assert all("(default:" in b for f, b in blocks.items() if f not in flags_without_default)
    text = help_of(ce_sweep.main, capsys)
    assert "-- CE_TRAIN_FLAGS" in text and "after `--`" in text
    assert "(default: runs/sweep)" in " ".join(text.split())
