"""What a new user hits (issue 26): --data-root as the Tiny ImageNet folder or its zip, the README's
subset rebuilt from the official layout, a config line that pastes back, L2-only logs and curves,
the first progress line, the CPU note."""
import json
import os
import shlex
import zipfile

import pytest
import torch
from conftest import TINY
from test_data import make_tiny_zip

import ce_model
import ce_train
from ce_utils import checkpoints, cli, datasets, figures, labelled, progress, runstate

OFFLINE = "http://127.0.0.1:9/tiny-imagenet-200.zip"   # nothing listens on port 9


@pytest.fixture
def offline(monkeypatch):
    """No download can succeed: whatever is used must come from the folder or zip given."""
    monkeypatch.setenv("CE_TINY_URL", OFFLINE)


def train_tiny(root, out, *flags):
    """One step on Tiny ImageNet at `root` with the tiny network; returns the checkpoint's flags."""
    ce_train.main(TINY + ["--data", "tiny", "--data-root", str(root), "--steps", "1",
                          "--batch-size", "2", "--eval-every", "1", "--out", str(out), *flags])
    return checkpoints.read_checkpoint(out, resume=True)["args"]


# ------------------------------------------------------------------------------------------------
# 1. --data-root: the extracted folder itself, the zip itself, a zip of another name, "resume"

def test_the_extracted_folder_itself_trains_without_a_download(tmp_path, offline, capsys):
    with zipfile.ZipFile(make_tiny_zip(tmp_path / "t.zip")) as z:
        z.extractall(tmp_path)
    folder = tmp_path / "tiny-imagenet-200"
    flags = train_tiny(folder, tmp_path / "run")
    assert "(6 train / 4 held-out images)" in capsys.readouterr().out
    assert flags["data_root"] == str(folder)
    assert not (folder / "tiny-imagenet-200.zip").exists()
    assert not (folder / "tiny-imagenet-200").exists()


@pytest.mark.parametrize("name", ["tiny-imagenet-200.zip", "my-copy.zip"])
def test_a_zip_given_as_data_root_is_extracted_next_to_it(tmp_path, offline, name):
    (tmp_path / "dl").mkdir()
    archive = make_tiny_zip(tmp_path / "dl" / name)
    train = datasets.load_split("tiny", str(archive), "train")
    assert train.shape == (6, 64, 64, 3)     # 64 px images are cached at their own size
    assert (tmp_path / "dl" / "tiny-imagenet-200" / "train").is_dir()
    assert any(f.startswith("tiny-train-128-") for f in os.listdir(tmp_path / "dl" / ".ce_cache"))
    # the folder holding the zip is the same data, and the same cache
    assert datasets.load_split("tiny", str(tmp_path / "dl"), "train").shape == train.shape
    listed = labelled.labelled_files("tiny", str(archive))
    assert len(listed[0]) == 6 and len(listed[1]) == 4 and len(listed[2]) == 2


def test_a_file_that_is_not_a_zip_is_named(tmp_path, offline):
    (tmp_path / "notes.zip").write_text("not a zip")
    with pytest.raises(cli.DataError, match=r"notes.zip: a file but not a zip archive; pass "):
        datasets.load_split("tiny", str(tmp_path / "notes.zip"), "train")


def test_a_tiny_zip_of_another_name_is_named_with_the_flag_to_pass(tmp_path, offline):
    archive = make_tiny_zip(tmp_path / "tiny-imagenet-200-subset.zip")
    with pytest.raises(cli.DataError) as e:
        datasets.load_split("tiny", str(tmp_path), "train")
    msg = str(e.value)
    assert "tiny-imagenet-200-subset.zip holds Tiny ImageNet" in msg
    assert f"pass --data-root {archive}" in msg and "could not download" not in msg
    assert not (tmp_path / "tiny-imagenet-200.zip.part").exists()   # no download was tried


def test_the_offline_error_says_resume_only_when_a_part_file_exists(tmp_path, offline):
    (tmp_path / "other.zip").write_bytes(b"a half download of something")
    with pytest.raises(cli.DataError) as e:
        datasets.load_split("tiny", str(tmp_path), "train")
    assert "run again to retry" in str(e.value) and "resume" not in str(e.value)
    assert "other.zip there: not a Tiny ImageNet zip" in str(e.value)
    (tmp_path / "tiny-imagenet-200.zip.part").write_bytes(b"the first bytes")
    with pytest.raises(cli.DataError, match="run again to resume"):
        datasets.load_split("tiny", str(tmp_path), "train")


# ------------------------------------------------------------------------------------------------
# 3. --train-per-class N --val-images N: the README's subset from the official layout

def test_the_subset_takes_the_first_files_as_the_readme_subset_was_cut(tmp_path, offline):
    archive = make_tiny_zip(tmp_path / "tiny-imagenet-200.zip", per_class=12, n_val=12)
    train = datasets.dataset_files("tiny", str(archive), "train", train_per_class=3)
    names = sorted(os.path.basename(f) for f in train)
    # sorted names: _0, _1, _10 (the subset in docs has n01443537_0, _1, _10, _100, ...)
    assert names == sorted(f"n{c:08d}_{i}.JPEG" for c in (0, 1) for i in (0, 1, 10))
    val = datasets.dataset_files("tiny", str(archive), "val", val_images=3)
    assert sorted(os.path.basename(f) for f in val) == ["val_0.JPEG", "val_1.JPEG", "val_2.JPEG"]
    # in the listing's order, as the same files in a folder of their own would be listed
    assert val == [f for f in datasets.dataset_files("tiny", str(archive), "val") if f in val]
    # a subset and the full set are cached side by side, under names that say which
    full = datasets.load_split("tiny", str(archive), "val")
    sub = datasets.load_split("tiny", str(archive), "val", val_images=3)
    assert len(full) == 12 and len(sub) == 3
    cached = os.listdir(tmp_path / ".ce_cache")
    assert {n.split("-128-")[0] for n in cached if n.endswith(".npy")} == {"tiny-val",
                                                                          "tiny-val-first3"}


def test_the_subset_flags_are_saved_resumed_and_refused_elsewhere(tmp_path, offline, capsys):
    archive = make_tiny_zip(tmp_path / "tiny-imagenet-200.zip", per_class=4, n_val=5)
    flags = train_tiny(archive, tmp_path / "run", "--train-per-class", "2", "--val-images", "3")
    assert "(4 train / 3 held-out images)" in capsys.readouterr().out
    assert (flags["train_per_class"], flags["val_images"]) == (2, 3)
    resumed = ce_train.parse_args(["--resume", str(tmp_path / "run"), "--device", "cpu"])
    assert (resumed.train_per_class, resumed.val_images) == (2, 3)
    for bad, words in ((["--val-images", "-1"], "must be >= 0"),
                       (["--data", "folder", "--train-per-class", "5"], "--data tiny only")):
        with pytest.raises(SystemExit) as e:
            ce_train.parse_args(["--device", "cpu", "--out", str(tmp_path / "x"), *bad])
        assert e.value.code == 2 and words in capsys.readouterr().err


def test_a_checkpoint_from_before_the_subset_flags_resumes_with_the_whole_set(tmp_path,
                                                                             tiny_flags):
    ce_train.main(tiny_flags + ["--steps", "1", "--batch-size", "4", "--out", str(tmp_path / "r")])
    state = torch.load(tmp_path / "r" / "ckpt.pt", weights_only=True)
    del state["args"]["train_per_class"], state["args"]["val_images"]
    torch.save(state, tmp_path / "r" / "ckpt.pt")
    flags = checkpoints.read_checkpoint(tmp_path / "r", resume=True)["args"]
    assert (flags["train_per_class"], flags["val_images"]) == (0, 0)


# ------------------------------------------------------------------------------------------------
# 6. and 8. The start-up lines: a config line that pastes back; the CPU note names the network

def announced(args, capsys):
    G, D = ce_model.build_models(8, 16)   # the estimate times what it is given: tiny here
    runstate.announce(args, 1, 64, 16, G, D, 10)
    return capsys.readouterr().out.splitlines()


@pytest.mark.parametrize("flags", [[], ["--variant", "seed", "--lam-adv", "0", "--mask-per-batch",
                                        "--no-flip", "--data", "tiny", "--val-images", "7"]])
def test_the_config_line_parses_back_to_the_same_flags(tmp_path, capsys, flags):
    args = ce_train.parse_args(["--device", "cpu", "--out", str(tmp_path / "a b"), *flags])
    os.makedirs(args.out)
    line = next(ln for ln in announced(args, capsys) if ln.startswith("config: "))
    words = shlex.split(line[len("config: "):])
    assert not {"True", "False", "None", "--quick", "--resume"} & set(words)
    again = ce_train.parse_args(words)
    assert {**vars(again), "quick": None} == {**vars(args), "quick": None}
    assert ("--no-bias" in words) == (not args.bias)


def test_the_cpu_note_names_the_width_given(tmp_path, capsys):
    args = ce_train.parse_args(["--device", "cpu", "--data", "tiny", "--width", "32",
                                "--bottleneck", "512", "--out", str(tmp_path)])
    note = [ln for ln in announced(args, capsys) if ln.startswith("note: this network on a CPU")]
    assert len(note) == 1
    assert "(--width 32 --bottleneck 512 --batch-size 64)" in note[0]


def test_the_first_progress_lines_show_no_eta_until_enough_is_done(monkeypatch, capsys):
    clock = iter([0.0, 1.0, 2.0, 3.0])
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    show = progress.Progress(1000, "decoding")
    show(3)                                    # the pool's start-up: 3 images in the first second
    show(1000 // progress.ETA_AFTER)
    show(500)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3 and "ETA" not in lines[0]
    assert "ETA" in lines[1] and "ETA 3s" in lines[2]


# ------------------------------------------------------------------------------------------------
# 7. L2-only runs: no D statistics in the log or the curves; "no evaluation yet"

def plotted(monkeypatch, runs):
    """plot_curves of `runs`; returns the figure's panels as (title, its texts)."""
    seen = []
    real = figures.finish_figure
    monkeypatch.setattr(figures, "finish_figure",
                        lambda fig, path, *a, **k: (seen.append(fig), real(fig, path, *a, **k))[1])
    figures.plot_curves([str(r) for r in runs], str(runs[0] / "curves.png"))
    return [(ax.get_title(), [t.get_text() for t in ax.texts]) for ax in seen[0].axes]


@pytest.mark.pictures
def test_an_l2_only_run_logs_and_draws_no_discriminator(tmp_path, tiny_flags, monkeypatch):
    out = tmp_path / "l2"
    ce_train.main(tiny_flags + ["--steps", "2", "--batch-size", "4", "--lam-adv", "0",
                                "--log-every", "1", "--eval-every", "2", "--out", str(out)])
    with open(out / "log.jsonl") as f:
        train = [r for r in map(json.loads, f) if "loss_rec" in r]
    assert len(train) == 2 and all(set(r) == {"step", "epoch", "loss_rec", "img_per_s", "time"}
                                   for r in train)
    assert (out / "curves.png").exists()
    panels = plotted(monkeypatch, [out])
    assert [t for t, _ in panels] == ["loss_rec (Eq. 1)", "held-out PSNR, hole (dB)"]


def write_log(folder, records, lam_adv):
    os.makedirs(folder)
    with open(folder / "log.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    with open(folder / "args.json", "w") as f:
        json.dump({"lam_adv": lam_adv}, f)


def test_curves_before_any_evaluation_say_so(tmp_path, monkeypatch):
    gan = {"loss_D": 1.3, "loss_adv": 0.7, "D_x": 0.5, "D_G_x": 0.5}
    write_log(tmp_path / "g", [{"step": s, "loss_rec": 0.1, **gan} for s in (1, 2)], 0.001)
    panels = plotted(monkeypatch, [tmp_path / "g"])
    assert len(panels) == 6 and panels[-1] == ("held-out PSNR, hole (dB)", ["no evaluation yet"])
    # an older L2-only log recorded D's placeholders: its flags say D never ran
    write_log(tmp_path / "old", [{"step": 1, "loss_rec": 0.1, **gan},
                                 {"step": 1, "eval": {"psnr": 12.0}}], 0.0)
    panels = plotted(monkeypatch, [tmp_path / "old"])
    assert panels == [("loss_rec (Eq. 1)", []), ("held-out PSNR, hole (dB)", [])]


def test_a_subset_runs_own_evaluation_keeps_its_subset_and_fine_tuning_elsewhere_drops_it(
        tmp_path, tiny_flags, monkeypatch):
    """ce_eval on a subset run's own data (its --data-root typed relative, saved absolute) loads
    the run's subset; fine-tuning that run on a folder takes no Tiny ImageNet subset with it."""
    import argparse

    import ce_eval
    root = tmp_path / "subset-root"
    a = {"data": "tiny", "data_root": str(root), "load_size": 128, "train_per_class": 3,
         "val_images": 5}
    seen = {}
    monkeypatch.setattr(datasets, "load_split",
                        lambda *args, **kw: seen.update(kw) or torch.zeros(0, 128, 128, 3))
    monkeypatch.chdir(tmp_path)
    args = argparse.Namespace(data=None, data_root="subset-root", split="val", max_images=0)
    ce_eval.held_out(args, a)
    assert seen == {"train_per_class": 3, "val_images": 5}
    monkeypatch.undo()
    run = tmp_path / "run"
    ce_train.main(tiny_flags + ["--steps", "1", "--batch-size", "4", "--out", str(run)])
    state = torch.load(run / "ckpt.pt", weights_only=True)
    state["args"].update(data="tiny", train_per_class=3, val_images=5)
    torch.save(state, run / "ckpt.pt")
    tuned = ce_train.parse_args(["--resume", str(run / "ckpt.pt"), "--out", str(tmp_path / "mine"),
                                 "--data", "folder", "--data-root", str(tmp_path), "--device",
                                 "cpu"])
    assert (tuned.train_per_class, tuned.val_images) == (0, 0)
    kept = ce_train.parse_args(["--resume", str(run / "ckpt.pt"), "--out", str(tmp_path / "more"),
                                "--device", "cpu"])
    assert (kept.train_per_class, kept.val_images) == (3, 5)


def test_the_probe_takes_the_subset_flags_as_training_does(tmp_path, offline, capsys):
    """ce_probe.py --train-per-class/--val-images pick the same files as ce_train.py's flags."""
    import ce_probe
    archive = make_tiny_zip(tmp_path / "tiny-imagenet-200.zip", per_class=4, n_val=6)
    capsys.readouterr()
    ce_probe.main(["--data", "tiny", "--data-root", str(archive), "--random-init", "dcgan",
                   "--width", "8", "--bottleneck", "16", "--epochs", "1", "--no-augment",
                   "--train-per-class", "2", "--val-images", "5", "--device", "cpu", "--json"])
    row = json.loads(capsys.readouterr().out.splitlines()[-1])
    train = datasets.dataset_files("tiny", str(archive), "train", train_per_class=2)
    assert (row["n_train"], row["n_val"]) == (len(train), 5) == (4, 5)
