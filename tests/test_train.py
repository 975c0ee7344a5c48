"""End to end on a tiny model: train, log, samples, checkpoints, exact resume, evaluation, clear
CLI errors."""
import argparse
import json
import os
import shutil
import signal

import numpy as np
import pytest
import torch
from conftest import TINY
from PIL import Image

import ce_eval
import ce_losses
import ce_model
import ce_train
from ce_utils import checkpoints, cli, figures, runstate


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.pictures
def test_train_resume_evaluate(tmp_path, tiny_flags, capsys):
    out = str(tmp_path / "run")
    ce_train.main(tiny_flags + ["--steps", "4", "--batch-size", "4", "--log-every", "2",
                                "--eval-every", "2", "--out", out])
    printed = capsys.readouterr().out
    assert "step 4/4" in printed and "held-out PSNR" in printed and "config:" in printed
    log = read_log(out)
    train_lines = [r for r in log if "loss_rec" in r]
    assert [r["step"] for r in train_lines] == [2, 4]
    for r in train_lines:
        assert set(r) >= {"step", "epoch", "loss_D", "loss_rec", "loss_adv", "D_x", "D_G_x",
                          "img_per_s"}
        assert r["loss_rec"] > 0 and 0 < r["D_x"] < 1 and 0 < r["D_G_x"] < 1
    evals = [r["eval"] for r in log if "eval" in r]
    assert len(evals) == 2 and all(5 < e["psnr"] < 60 and e["n_images"] == 16 for e in evals)
    png = Image.open(os.path.join(out, "samples", "step_0000004.png"))
    # 16 images, 4 per row, titled
    assert png.size == (4 * 3 * 128 + 3 * 4, figures.TITLE_H + 4 * 128 + 3 * 4)
    state = checkpoints.read_checkpoint(os.path.join(out, "ckpt.pt"))
    assert state["step"] == 4 and state["args"]["width"] == 8
    assert {"optG", "optD", "rng"} <= set(state)
    assert os.path.exists(os.path.join(out, "best.pt"))

    # resume: only --steps changes; the network flags come from the checkpoint
    ce_train.main(["--resume", out, "--steps", "6", "--log-every", "2", "--eval-every", "2",
                   "--device", "cpu"])
    assert "resumed" in capsys.readouterr().out
    assert checkpoints.read_checkpoint(os.path.join(out, "ckpt.pt"))["step"] == 6
    assert [r["step"] for r in read_log(out) if "loss_rec" in r] == [2, 4, 6]

    # evaluation: model and every baseline, as one JSON line
    ce_eval.main(["--ckpt", os.path.join(out, "ckpt.pt"), "--device", "cpu", "--json",
                  "--max-images", "16"])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for m in ("model", "fill", "context_mean", "harmonic"):
        assert {"psnr", "l1", "l2", "n_images", "psnr_region"} <= set(res[m])
        assert res[m]["n_images"] == 16
    # diffusion beats a constant fill on smooth content
    assert res["harmonic"]["psnr"] > res["fill"]["psnr"]

    # inpaint a user's photo, and a figure
    Image.new("RGB", (300, 200), (10, 120, 200)).save(tmp_path / "photo.jpg")
    ce_eval.main(["--ckpt", out, "--device", "cpu", "--image", str(tmp_path / "photo.jpg"),
                  "--out", str(tmp_path / "f")])
    filled = np.asarray(Image.open(tmp_path / "f" / "photo_filled.png"))
    assert filled.shape == (128, 128, 3)
    assert np.abs(filled[5, 5].astype(int) - (10, 120, 200)).max() <= 3
    ce_eval.main(["--ckpt", out, "--device", "cpu", "--figure", "--n", "3",
                  "--out", str(tmp_path / "f")])
    w, h = Image.open(tmp_path / "f" / "figure.png").size
    assert w > h > 200   # 3 rows x 6 columns: masked | model | context mean | harmonic | original
    # what the run draws at its end: curves and the samples of each evaluation
    assert Image.open(os.path.join(out, "curves.png")).size[0] > 400
    assert Image.open(os.path.join(out, "evolution.gif")).n_frames == 3   # steps 2, 4, 6


def test_resume_is_exact(tmp_path, tiny_flags, monkeypatch):
    """A run stopped by SIGTERM after step 3 (in the middle of a log window) and resumed gives the
    same log lines and the same weights as one uninterrupted run."""
    common = tiny_flags + ["--batch-size", "4", "--log-every", "2", "--eval-every", "1000",
                           "--steps", "6"]
    ce_train.main(common + ["--out", str(tmp_path / "a")])
    real, calls = ce_losses.reconstruction_loss, []

    def interrupt_at_step_3(*args):
        calls.append(1)
        if len(calls) == 3:
            # handled by ce_train: finish the step, save, exit 143
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args)

    monkeypatch.setattr(ce_losses, "reconstruction_loss", interrupt_at_step_3)
    with pytest.raises(SystemExit) as e:
        ce_train.main(common + ["--out", str(tmp_path / "b")])
    assert e.value.code == 143 and checkpoints.read_checkpoint(tmp_path / "b")["step"] == 3
    monkeypatch.setattr(ce_losses, "reconstruction_loss", real)
    ce_train.main(["--resume", str(tmp_path / "b"), "--device", "cpu"])
    keys = ("step", "loss_D", "loss_rec", "loss_adv", "D_x", "D_G_x")
    a = [[r[k] for k in keys] for r in read_log(tmp_path / "a") if "loss_rec" in r]
    b = [[r[k] for k in keys] for r in read_log(tmp_path / "b") if "loss_rec" in r]
    assert [r[0] for r in a] == [2, 4, 6]
    assert a == b
    wa = checkpoints.read_checkpoint(tmp_path / "a")["G"]
    wb = checkpoints.read_checkpoint(tmp_path / "b")["G"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_l2_only_trains_without_discriminator(tmp_path, tiny_flags):
    out = tmp_path / "l2"
    ce_train.main(tiny_flags + ["--steps", "2", "--batch-size", "4", "--lam-adv", "0",
                                "--log-every", "1", "--out", str(out)])
    log = [r for r in read_log(out) if "loss_rec" in r]
    assert log and not any({"loss_D", "loss_adv", "D_x", "D_G_x"} & set(r) for r in log)
    torch.manual_seed(0)  # ce_train seeds with --seed 0 before building the networks
    d0 = ce_model.build_models(8, 16)[1].state_dict()
    d1 = checkpoints.read_checkpoint(out)["D"]
    assert all(torch.equal(d0[k], d1[k]) for k in d0 if "num_batches" not in k)  # D never updated


@pytest.mark.parametrize("variant,expect", [
    ("paper", dict(overlap=7, ring="visible", fill="mean", beta2=0.999, bottleneck_bn=True,
                   bias=False)),
    ("official", dict(overlap=4, ring="visible", fill="mean", beta2=0.999)),
    ("seed", dict(overlap=7, ring="hidden", fill="zero", beta2=0.9, bottleneck_bn=False, bias=True,
                  rec_reduction="split", d_reduction="mean", flip=False)),
])
def test_variant_presets_and_explicit_flags_win(variant, expect, tmp_path):
    a = ce_train.parse_args(["--variant", variant, "--device", "cpu", "--out", str(tmp_path / "x")])
    assert {k: getattr(a, k) for k in expect} == expect
    b = ce_train.parse_args(["--variant", variant, "--overlap", "5", "--device", "cpu",
                             "--out", str(tmp_path / "x")])
    assert b.overlap == 5


def test_defaults_are_paper_values_and_cpu_quick_start(tmp_path):
    a = ce_train.parse_args(["--device", "cpu", "--data", "tiny", "--out", str(tmp_path)])
    assert (a.batch_size, a.lr_g, a.lr_d, a.beta1, a.lam_rec, a.lam_adv, a.width, a.bottleneck) == \
        (64, 0.002, 0.0002, 0.5, 0.999, 0.001, 64, 4000)
    q = ce_train.parse_args(["--device", "cpu", "--out", str(tmp_path)])
    assert q.quick and q.width == 24 and q.steps > 0
    assert not ce_train.parse_args(["--device", "cpu", "--width", "64",
                                    "--out", str(tmp_path)]).quick


@pytest.mark.parametrize("flags,words", [
    (["--batch-size", "-1"], "--batch-size must be >= 2"),
    (["--batch-size", "1"], "BatchNorm needs two images"),
    (["--device", "tpu9"], "--device tpu9"),
    (["--device", "cuda:7"], "no such CUDA device"),
    (["--overlap", "40"], "--overlap must be in"),
    (["--lam-adv", "-0.1"], "--lam-rec/--lam-adv must be >= 0"),
    (["--load-size", "64"], "--load-size must be >= 128"),
    (["--resume", "nowhere/ckpt.pt"], "no such checkpoint"),
    (["--lr-g", "inf"], "'inf' is not a finite number"),
    (["--lam-adv", "nan"], "'nan' is not a finite number"),
    (["--lr-d", "1e39"], "--lr-g/--lr-d must be below 3.4e+38"),
])
def test_nonsense_flags_rejected(flags, words, capsys):
    with pytest.raises(SystemExit) as e:
        cli.run(ce_train.main, flags + ([] if "--device" in flags else ["--device", "cpu"]))
    assert e.value.code == 2 and words in capsys.readouterr().err


def test_resume_with_other_architecture_is_refused(tmp_path, tiny_flags, capsys):
    out = str(tmp_path / "r")
    ce_train.main(tiny_flags + ["--steps", "1", "--batch-size", "4", "--out", out])
    with pytest.raises(SystemExit) as e:
        ce_train.main(["--resume", out, "--width", "16", "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--width 16 (checkpoint: 8)" in err
    with pytest.raises(SystemExit):  # an existing run is never overwritten silently
        ce_train.main(tiny_flags + ["--steps", "1", "--out", out])
    assert "already holds a run" in capsys.readouterr().err


def test_eval_image_errors(tmp_path, tiny_flags, capsys, monkeypatch):
    out = str(tmp_path / "r")
    ce_train.main(tiny_flags + ["--steps", "1", "--batch-size", "4", "--out", out])
    (tmp_path / "bad.jpg").write_text("not an image")
    monkeypatch.chdir(tmp_path)          # where the default output folder, inpainted/, would go
    for photo, words in ((tmp_path / "missing.jpg", "no such file"),
                         (tmp_path / "bad.jpg", "not a readable image")):
        with pytest.raises(SystemExit) as e:
            cli.run(ce_eval.main, ["--ckpt", out, "--device", "cpu", "--image", str(photo)])
        assert e.value.code == 2 and words in capsys.readouterr().err
    assert not (tmp_path / "inpainted").exists()         # nothing written, not even an empty folder


def test_resume_targets_the_checkpoint_folder_and_refuses_to_rewind(tmp_path, tiny_flags,
                                                                    monkeypatch, capsys):
    out = tmp_path / "r"
    ce_train.main(tiny_flags + ["--steps", "2", "--batch-size", "4", "--out", str(out)])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)    # resumed from another working directory: the run stays put
    ce_train.main(["--resume", str(out / "ckpt.pt"), "--steps", "3", "--device", "cpu"])
    assert checkpoints.read_checkpoint(out)["step"] == 3 and not (elsewhere / "runs").exists()
    with pytest.raises(SystemExit) as e:  # best.pt would rewind ckpt.pt: only into a new folder
        ce_train.main(["--resume", str(out / "best.pt"), "--steps", "4", "--device", "cpu"])
    assert e.value.code == 2 and "--out NEW_DIR" in capsys.readouterr().err
    ce_train.main(["--resume", str(out / "best.pt"), "--steps", "4", "--device", "cpu",
                   "--out", str(tmp_path / "branch")])
    assert checkpoints.read_checkpoint(tmp_path / "branch")["step"] == 4
    assert checkpoints.read_checkpoint(out)["step"] == 3


def test_eval_rejects_a_missing_device(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        ce_eval.main(["--ckpt", str(tmp_path), "--device", "cuda:7"])
    assert e.value.code == 2 and "no such CUDA device" in capsys.readouterr().err


@pytest.fixture(scope="module")
def shared_flags(shapes_root):
    """Tiny-model flags with the session's data cache."""
    return TINY + ["--data-root", shapes_root]


def make_photo_folder(root, n_train=8, n_val=4):
    """A --data folder data root with train/ and val/ splits of small random photos."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        (root / split).mkdir(parents=True)
        for i in range(n):
            pixels = rng.integers(0, 256, (140, 150, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / split / f"{i}.png")


def test_fine_tuning_on_other_data_starts_best_afresh_and_steps_count_in_total(
        tmp_path, shared_flags, capsys):
    base = tmp_path / "base"
    ce_train.main(shared_flags + ["--steps", "2", "--batch-size", "4", "--eval-every", "2",
                                  "--out", str(base)])
    make_photo_folder(tmp_path / "photos")
    new = tmp_path / "new"
    capsys.readouterr()
    ce_train.main(["--resume", str(base / "best.pt"), "--out", str(new), "--data", "folder",
                   "--data-root", str(tmp_path / "photos"), "--steps", "4", "--eval-every", "2",
                   "--device", "cpu"])
    out = capsys.readouterr().out
    assert "on other data" in out and f"start afresh in {new}" in out
    assert (new / "best.pt").exists()
    assert f"Evaluate with: python ce_eval.py --ckpt {new}/best.pt" in out
    assert checkpoints.read_checkpoint(new)["args"]["data"] == "folder"
    assert checkpoints.read_checkpoint(new)["step"] == 4
    assert checkpoints.read_checkpoint(base)["step"] == 2      # the source run is untouched
    with pytest.raises(SystemExit) as e:     # --steps is a total: 3 < 4 would train nothing
        cli.run(ce_train.main, ["--resume", str(new), "--steps", "3", "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "counts in total" in err
    assert "pass --steps 7 to train 3 more" in err


def test_cpu_quick_start_defaults_apply_flag_by_flag(tmp_path):
    def parsed(*flags):
        return ce_train.parse_args(["--device", "cpu", "--out", str(tmp_path), *flags])
    a = parsed("--steps", "100")
    assert (a.width, a.bottleneck, a.batch_size, a.steps, a.eval_every) == (24, 512, 32, 100, 250)
    b = parsed("--batch-size", "8")
    assert (b.width, b.bottleneck, b.batch_size, b.steps) == (24, 512, 8, 500)
    c = parsed("--width", "64", "--bottleneck", "4000")
    assert (c.width, c.bottleneck, c.batch_size) == (64, 4000, 32)
    d = parsed("--epochs", "2")                     # epochs asked: no step count on top
    assert (d.width, d.steps, d.epochs) == (24, 0, 2)
    e = parsed("--data", "tiny")                    # only the embedded data gets them
    assert (e.width, e.bottleneck, e.batch_size) == (64, 4000, 64)


def test_a_big_network_on_a_cpu_says_how_long_a_step_takes(tmp_path, capsys):
    args = ce_train.parse_args(["--device", "cpu", "--width", "64", "--bottleneck", "4000",
                                "--out", str(tmp_path)])
    G, D = ce_model.build_models(8, 16)   # the estimate is timed on whatever it is given: tiny here
    before = {k: v.clone() for k, v in G.state_dict().items()}
    runstate.announce(args, 1, 64, 16, G, D, 1000)
    out = capsys.readouterr().out
    note = [ln for ln in out.splitlines() if ln.startswith("note: this network on a CPU")]
    assert len(note) == 1 and " s per step" in note[0]
    assert "--width 24 --bottleneck 512 --batch-size 32" in note[0]
    # BN statistics untouched
    assert all(torch.equal(before[k], v) for k, v in G.state_dict().items())
    assert runstate.cpu_step_seconds(G, D, 64) > 0


def test_data_root_is_absolute_so_resuming_elsewhere_uses_the_same_data(tmp_path, shared_flags,
                                                                        monkeypatch, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(shared_flags[-1], a / "data")          # the data cache, as if generated in a/
    b.mkdir()
    monkeypatch.chdir(a)
    ce_train.main(TINY + ["--data-root", "data", "--steps", "1", "--batch-size", "4",
                          "--out", "run"])
    assert checkpoints.read_checkpoint(a / "run")["args"]["data_root"] == str(a / "data")
    assert f"data: {a / 'data'}" in capsys.readouterr().out
    monkeypatch.chdir(b)
    ce_train.main(["--resume", str(a / "run"), "--steps", "2", "--device", "cpu"])
    assert checkpoints.read_checkpoint(a / "run")["step"] == 2 and not (b / "data").exists()


def test_first_log_lines_at_steps_1_and_10(tmp_path, shared_flags, capsys):
    out = tmp_path / "run"
    # the default --log-every 50
    ce_train.main(shared_flags + ["--steps", "12", "--batch-size", "4", "--out", str(out)])
    assert [r["step"] for r in read_log(out) if "loss_rec" in r] == [1, 10, 12]
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("step ")]
    assert lines[0].startswith("step 1/12") and "ETA" in lines[0]
    every_5 = argparse.Namespace(log_every=5)      # short intervals: no extra lines
    assert [ce_train.is_log_step(s, every_5, 100) for s in (1, 5, 10, 100)] == \
        [False, True, True, True]


def test_runs_from_a_notebook_whose_stdout_cannot_be_reconfigured(tmp_path, tiny_flags):
    """Jupyter's stdout is no TextIOWrapper: ce_train.main() called from a notebook cell must
    still run."""
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        ce_train.main(tiny_flags + ["--steps", "1", "--batch-size", "4",
                                    "--out", str(tmp_path / "run")])
    assert "done: 1 steps" in buf.getvalue()
