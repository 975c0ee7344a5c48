"""The lambda sweep (ce_sweep.py): each run is scored as `ce_eval.py --ckpt` scores it (the run's
own mask and input size), on the device and in the precision given to ce_train.py after `--`."""
import csv
import json
import os

import pytest
import torch

import ce_eval
import ce_sweep
import ce_train
from ce_utils import baselines, datasets

HELD_OUT = 16   # held-out images each sweep evaluates here (the embedded data has 512)


@pytest.fixture(autouse=True)
def quick_evaluation(monkeypatch):
    """Fast sweeps: every held-out split read is its first HELD_OUT images, and the one baseline is
    the cheap flat fill (the harmonic one solves a linear system per image)."""
    real = datasets.load_split

    def load_split(data, root, split, *args, **kw):
        images = real(data, root, split, *args, **kw)
        return images[:HELD_OUT] if split == "val" else images
    monkeypatch.setattr(datasets, "load_split", load_split)
    monkeypatch.setattr(baselines, "BASELINES", ("fill",))


def sweep(out, train_flags):
    """One ratio (x1000); returns the run folder and the sweep.csv row of its model."""
    ce_sweep.main(["--ratios", "1000", "--n", "2", "--out", str(out), "--", *train_flags])
    with open(os.path.join(out, "sweep.csv")) as f:
        rows = {r["ratio"]: r for r in csv.DictReader(f)}
    return os.path.join(out, "ratio1000"), rows["x1000"]


def ce_eval_scores(run, capsys):
    """What `ce_eval.py --ckpt RUN/ckpt.pt --json` reports for the model."""
    capsys.readouterr()
    ce_eval.main(["--ckpt", os.path.join(run, "ckpt.pt"), "--device", "cpu", "--json"])
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["model"]


@pytest.mark.parametrize("flags", [["--mask", "region"],
                                   ["--arch", "alexnet", "--alexnet-width", "0.125",
                                    "--batch-size", "4", "--shapes-n", "16"]],
                         ids=["region-mask", "alexnet-227px"])
def test_each_run_is_scored_with_its_own_mask_and_input_size(tmp_path, tiny_flags, capsys, flags):
    """A --mask region run is scored on the held-out region masks, an AlexNet run at 227 px (its
    default mask is region too): the sweep once scored both as centre-mask runs at 128 px."""
    run, row = sweep(tmp_path / "sweep", tiny_flags + ["--steps", "2"] + flags)
    want = ce_eval_scores(run, capsys)
    assert int(row["n_images"]) == want["n_images"] == HELD_OUT
    for k in ("psnr", "l1", "l2", "psnr_region", "ssim", "sharpness"):
        assert float(row[k]) == pytest.approx(want[k], abs=1e-4)
    assert os.path.isfile(tmp_path / "sweep" / "figure.png")


def test_device_and_precision_after_the_dashes_are_used(tmp_path, tiny_flags, monkeypatch):
    """`-- --device cpu` where CUDA is (said to be) available: the sweep loads and scores the run on
    the CPU in float32, as ce_train.py ran it, not on the GPU it would pick by default."""
    really_available, train = torch.cuda.is_available, ce_train.main

    def train_main(argv):                     # training itself sees the machine as it is
        with monkeypatch.context() as m:
            m.setattr(torch.cuda, "is_available", really_available)
            return train(argv)
    monkeypatch.setattr(ce_train, "main", train_main)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    seen, real = [], ce_eval.evaluate

    def evaluate(G, *args, **kw):
        seen.append((next(G.parameters()).device.type, kw.get("dtype")))
        return real(G, *args, **kw)
    monkeypatch.setattr(ce_eval, "evaluate", evaluate)
    assert "--device" in tiny_flags and tiny_flags[tiny_flags.index("--device") + 1] == "cpu"
    sweep(tmp_path / "sweep", tiny_flags + ["--steps", "2"])
    assert seen[-1] == ("cpu", None)          # the sweep's own evaluation: CPU, no autocast
    monkeypatch.undo()
    hw = ce_sweep.train_hardware(["--device", "cpu", "--dtype", "bf16"])
    assert hw.device.type == "cpu" and hw.dtype == torch.bfloat16    # ce_train.py's autocast
