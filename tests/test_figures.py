"""Issue 5 tooling on tiny CPU runs: curves of several runs, bounded GIF, comparison figure, the
lambda sweep."""
import csv
import json
import os

import pytest
import torch
from PIL import Image

import ce_eval
import ce_sweep
from ce_utils import figures


def test_sweep_writes_rows_curves_and_figure(tmp_path, tiny_flags, capsys):
    out = tmp_path / "sweep"
    train = tiny_flags + ["--steps", "4", "--batch-size", "4", "--log-every", "2",
                          "--eval-every", "2"]
    ce_sweep.main(["--ratios", "1", "1000", "--out", str(out), "--n", "2", "--"] + train)
    with open(out / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["ratio"] for r in rows] == ["fill", "context_mean", "harmonic", "x1", "x1000"]
    x1, x1000 = rows[3], rows[4]
    assert float(x1["lam_adv"]) == pytest.approx(0.5)
    assert float(x1000["lam_rec"]) == pytest.approx(1000 / 1001, rel=1e-5)
    assert x1["steps"] == "4" and int(x1["n_images"]) == 512 and float(x1["wall_s"]) > 0
    # the CSV holds what ce_eval computes for that checkpoint
    capsys.readouterr()
    ce_eval.main(["--ckpt", str(out / "ratio1000" / "ckpt.pt"), "--device", "cpu", "--json"])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["model"]["psnr"] == pytest.approx(float(x1000["psnr"]), abs=1e-3)
    assert res["harmonic"]["psnr"] == pytest.approx(float(rows[2]["psnr"]), abs=1e-3)
    assert Image.open(out / "curves.png").size[0] > 400
    assert Image.open(out / "figure.png").size[0] > Image.open(out / "figure.png").size[1]
    # a second call resumes (nothing left to train) and gives the same numbers
    ce_sweep.main(["--ratios", "1000", "--out", str(out), "--n", "2", "--"] + train)
    with open(out / "sweep.csv") as f:
        again = list(csv.DictReader(f))
    assert again[-1]["psnr"] == x1000["psnr"]


def test_run_labels_name_the_differing_flags(tmp_path):
    for name, lam in (("a", 0.001), ("b", 0.01)):
        os.makedirs(tmp_path / name)
        with open(tmp_path / name / "args.json", "w") as f:
            json.dump({"lam_adv": lam, "width": 64, "out": str(tmp_path / name)}, f)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert figures.run_labels([a, b]) == (["A", "B"], [f"A = {a}: lam_adv=0.001",
                                                       f"B = {b}: lam_adv=0.01"])
    assert figures.run_labels([a]) == (["a"], [])


def test_gif_frame_count_and_size_are_bounded(tmp_path):
    os.makedirs(tmp_path / "samples")
    for s in range(1, 31):
        frame = Image.new("RGB", (1548, 524), (8 * s, 0, 0))
        frame.save(tmp_path / "samples" / f"step_{s * 100:07d}.png")
    gif = Image.open(figures.make_gif(str(tmp_path), max_frames=12))
    # + the strip naming the step
    assert gif.n_frames == 12 and gif.size == (774, figures.GIF_STRIP_H + 130)
    gif.seek(11)
    # the last frame: last sample
    assert gif.convert("RGB").getpixel((600, figures.GIF_STRIP_H + 100))[0] == 240


def test_comparison_figure_psnr_labels(tmp_path):
    import ce_model
    G, _ = ce_model.build_models(8, 16)
    args = {"overlap": 7, "ring": "visible", "fill": "mean"}
    x = torch.rand(2, 3, 128, 128) * 2 - 1
    path = ce_eval.comparison_figure([("a", G, args), ("b", G, args)], x, str(tmp_path / "f.png"))
    w, h = Image.open(path).size
    assert w > h  # 2 rows x 6 columns
    with pytest.raises(ce_eval.cli.DataError, match="no training log"):
        figures.plot_curves([str(tmp_path)], str(tmp_path / "c.png"))


def test_plot_cli_overlays_runs(tmp_path, tiny_flags, capsys):
    import ce_train
    runs = []
    for lam in ("0.001", "0.01"):
        runs.append(str(tmp_path / f"run{lam}"))
        ce_train.main(tiny_flags + ["--steps", "2", "--batch-size", "4", "--log-every", "1",
                                    "--lam-adv", lam, "--out", runs[-1]])
    capsys.readouterr()
    ce_eval.main(["--plot", *runs, "--out", str(tmp_path / "both.png")])
    assert "both.png" in capsys.readouterr().out and Image.open(tmp_path / "both.png").size[0] > 400
    # only lam_adv differs: labelled by lam_rec / lam_adv
    assert figures.run_labels(runs)[0] == ["x999", "x99.9"]
    with pytest.raises(SystemExit) as e:     # neither --ckpt nor --plot: one-line usage error
        ce_eval.main([])
    assert e.value.code == 2 and "--plot RUN" in capsys.readouterr().err
    with pytest.raises(ce_eval.cli.DataError, match="--split val"):
        ce_eval.main(["--ckpt", runs[0], "--device", "cpu", "--split", "test"])
