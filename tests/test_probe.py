"""Linear probe (ce_probe.py): the classifier, label reading for every layout (the files training
reads), the random-init baseline, the CLI."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import ce_model
import ce_finetune
import ce_probe
import ce_train
from ce_utils import checkpoints, cli, datasets, labelled

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors gain nothing from threads, and on a busy shared CPU two threads spin-wait for
    each other."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _img(path, colour=(128, 128, 128), size=64, seed=0):
    """A noisy flat-colour image: one colour per class makes the classes linearly separable from
    conv features."""
    path.parent.mkdir(parents=True, exist_ok=True)
    noise = np.random.default_rng(seed).integers(-25, 26, (size, size, 3))
    Image.fromarray(np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)).save(path)


def _tiny_fixture(root, n_train=6, n_val=3):
    """Tiny ImageNet layout: 3 wnids, val annotations, one unannotated val file, one of an unknown
    wnid."""
    base = root / "tiny-imagenet-200"
    wnids = ["n003", "n001", "n002"]
    for c, w in enumerate(wnids):
        for i in range(n_train):
            _img(base / "train" / w / "images" / f"{w}_{i}.JPEG", COLOURS[c], seed=100 * c + i)
    lines, k = [], 0
    for c, w in enumerate(wnids):
        for i in range(n_val):
            _img(base / "val" / "images" / f"val_{k}.JPEG", COLOURS[c], seed=1000 + k)
            lines.append(f"val_{k}.JPEG\t{w}\t0\t0\t10\t10")
            k += 1
    _img(base / "val" / "images" / "val_extra.JPEG")                      # no annotation: skipped
    _img(base / "val" / "images" / f"val_{k}.JPEG")                         # unknown class: skipped
    lines.append(f"val_{k}.JPEG\tn999\t0\t0\t1\t1")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return wnids


def test_separable_toy_set_is_learned():
    g = torch.Generator().manual_seed(0)
    n, d, c = 1200, 30, 5
    x = torch.randn(n, d, generator=g)
    y = (x @ torch.randn(d, c, generator=g)).argmax(1)        # a linear function of x: separable
    top1, train_top1 = ce_probe.fit_linear(x[:600], y[:600], x[600:], y[600:], c, epochs=40)
    assert top1 > 90 and train_top1 > 90


def test_shuffled_labels_stay_at_chance():
    g = torch.Generator().manual_seed(1)
    n, d, c = 4000, 40, 10
    x = torch.randn(n, d, generator=g)
    y = torch.randint(0, c, (n,), generator=g)                # labels independent of x
    top1, _ = ce_probe.fit_linear(x[:2000], y[:2000], x[2000:], y[2000:], c, epochs=10)
    assert abs(top1 - 100 / c) < 5                  # 2,000 held-out: chance +- 0.7 (one s.d.)


def test_tiny_layout_labels(tmp_path, capsys):
    wnids = _tiny_fixture(tmp_path, n_train=2, n_val=2)
    train, val, names = labelled.labelled_files("tiny", str(tmp_path))
    assert names == sorted(wnids)
    # train/<wnid>/images/<wnid>_i.JPEG
    assert len(train) == 6 and all(names[y] in f for f, y in train)
    ann_file = tmp_path / "tiny-imagenet-200/val/val_annotations.txt"
    ann = dict(line.split("\t")[:2] for line in ann_file.read_text().splitlines())
    assert len(val) == 6 and all(names[y] == ann[f.rsplit("/", 1)[1]] for f, y in val)
    assert "skipped 2 image(s)" in capsys.readouterr().err


def test_class_folder_layouts(tmp_path):
    for split, n in (("train", 3), ("val", 2)):
        for cls in ("dog", "cat"):
            for i in range(n):
                _img(tmp_path / "in" / split / cls / f"{i}.png", size=8)
    train, val, names = labelled.labelled_files("imagenet", str(tmp_path / "in"))
    assert names == ["cat", "dog"] and len(train) == 6 and len(val) == 4
    assert all(f"/{names[y]}/" in f and "/train/" in f for f, y in train)
    assert all(f"/{names[y]}/" in f and "/val/" in f for f, y in val)
    for cls in ("a", "b"):
        for i in range(10):
            _img(tmp_path / "f" / cls / "sub" / f"{i}.png", size=8)
    train, val, names = labelled.labelled_files("folder", str(tmp_path / "f"), val_fraction=0.2)
    assert names == ["a", "b"] and len(val) == 4 and len(train) == 16
    assert not {f for f, _ in train} & {f for f, _ in val}
    assert all(f"/{names[y]}/" in f for f, y in train + val)
    # deterministic
    assert labelled.labelled_files("folder", str(tmp_path / "f"), 0.2) == (train, val, names)
    sub = labelled.balanced_subset(train, 6)
    assert sorted(y for _, y in sub) == [0, 0, 0, 1, 1, 1]
    # --data folder reads DIR/train + DIR/val as training does (it was refused: issue 20)
    listed = labelled.labelled_files("folder", str(tmp_path / "in"))
    assert listed == labelled.labelled_files("imagenet", str(tmp_path / "in"))


@pytest.mark.parametrize("variant", ["paper", "seed"])
def test_random_init_is_the_network_training_started_from(variant):
    args = ce_train.default_args(width=8, bottleneck=16, seed=7)
    vars(args).update(ce_train.VARIANTS[variant])    # seed variant: PyTorch init, biases, no BN
    torch.manual_seed(args.seed)                            # what ce_train.main does, in its order
    G = ce_train.build_training(args, cli.Hardware("cpu")).G
    R = ce_finetune.random_init_generator(vars(args))
    assert all(torch.equal(v, R.state_dict()[k]) for k, v in G.state_dict().items())


def _save_ckpt(path, seed=0, **flags):
    """A checkpoint as runstate.save writes it, holding a run's initial weights."""
    args = ce_train.default_args(width=8, bottleneck=16, seed=seed, **flags)
    torch.manual_seed(seed)
    G, D = ce_model.build_models(args.width, args.bottleneck, args.bottleneck_bn, args.bias,
                                 args.init)
    checkpoints.save_checkpoint(path, {"G": G.state_dict(), "D": D.state_dict(), "args": vars(args),
                                       "step": 0})


def test_probe_end_to_end_dcgan(tmp_path, capsys):
    _tiny_fixture(tmp_path / "data")
    _save_ckpt(tmp_path / "ckpt.pt", seed=0)
    flags = ["--data", "tiny", "--data-root", str(tmp_path / "data"), "--device", "cpu", "--epochs",
             "20"]
    ce_probe.main(flags + ["--ckpt", str(tmp_path / "ckpt.pt"), "--random-init", "dcgan", "--json"])
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["ckpt"] is None for r in rows] == [True, False]   # random init first, then the ckpt
    layers = ["conv1", "conv2", "conv3", "conv4", "conv5", "bottleneck"]
    assert list(rows[0]["top1"]) == layers and rows[0]["n_train"] == 18 and rows[0]["n_val"] == 9
    assert rows[0]["dims"] == {"conv1": 8 * 34 * 34, "conv2": 8 * 32 * 32, "conv3": 16 * 16 * 16,
                               "conv4": 32 * 8 * 8, "conv5": 64 * 4 * 4, "bottleneck": 16}
    # the checkpoint holds the weights its run started from: it must probe like the random init
    assert rows[0]["top1"] == rows[1]["top1"]
    assert rows[0]["top1"]["conv1"] > 80                              # colour classes, chance 33 %
    ce_probe.main(flags + ["--random-init", "dcgan", "--width", "8", "--bottleneck", "16"])
    out = capsys.readouterr().out.splitlines()
    assert "3 classes" in out[0] and [line.split()[0] for line in out[2:8]] == layers


def test_probe_alexnet_random_init_and_errors(tmp_path, capsys):
    _tiny_fixture(tmp_path / "data", n_train=3, n_val=1)
    flags = ["--data", "tiny", "--data-root", str(tmp_path / "data"), "--device", "cpu", "--epochs",
             "2"]
    ce_probe.main(flags + ["--random-init", "alexnet", "--alexnet-width", "0.0625", "--json"])
    row = json.loads(capsys.readouterr().out)
    assert row["input_size"] == 227
    assert list(row["top1"]) == ["conv1", "conv2", "conv3", "conv4", "conv5", "pool5"]
    assert row["dims"]["conv1"] == 6 * 40 * 40 and row["dims"]["pool5"] == 16 * 6 * 6
    with pytest.raises(SystemExit) as e:
        cli.run(ce_probe.main, flags[:2] + ["--data-root", str(tmp_path / "nowhere"),
                                            "--random-init", "dcgan"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "nowhere" in err
    with pytest.raises(SystemExit):
        ce_probe.main(flags)                                 # nothing to probe: a usage error
    assert "nothing to probe" in capsys.readouterr().err


def test_unreadable_image_is_skipped_and_counted(tmp_path, capsys):
    items = [(str(tmp_path / "a" / "0.png"), 0), (str(tmp_path / "b" / "1.png"), 1),
             (str(tmp_path / "bad.png"), 1)]
    _img(tmp_path / "a" / "0.png", COLOURS[0], size=8)
    _img(tmp_path / "b" / "1.png", COLOURS[1], size=8)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    x, y = labelled.decode_labelled(items, 16, "fixture")
    assert x.shape == (2, 16, 16, 3) and y.tolist() == [0, 1]
    assert x[0, 8, 8, 0] > x[1, 8, 8, 0]                      # red image first, green second
    err = capsys.readouterr().err
    assert "skipped 1 unreadable" in err and "bad.png" in err
    assert "2 image(s) smaller than 16px" in err


def _probe_json(root, capsys, *flags):
    """ce_probe.main on --data folder with a tiny random-init dcgan; its one JSON row."""
    capsys.readouterr()
    ce_probe.main(["--data", "folder", "--data-root", str(root), "--device", "cpu", "--epochs",
                   "2", "--random-init", "dcgan", "--width", "8", "--bottleneck", "16", "--json",
                   *flags])
    return json.loads(capsys.readouterr().out)


def test_probe_folder_reads_the_train_and_val_folders_training_reads(tmp_path, capsys):
    """`--data folder` with DIR/train + DIR/val: ce_train.py reads it, so must the probe (issue
    20)."""
    for split, n in (("train", 4), ("val", 2)):
        for c, cls in enumerate(("cat", "dog")):
            for i in range(n):
                _img(tmp_path / split / cls / f"{i}.png", COLOURS[c], size=8, seed=10 * c + i)
    row = _probe_json(tmp_path, capsys)
    assert row["classes"] == 2 and row["n_train"] == 8 and row["n_val"] == 4
    assert [len(datasets.dataset_files("folder", str(tmp_path), s)) for s in ("train", "val")] \
        == [8, 4]


def test_probe_holds_out_the_files_training_holds_out(tmp_path, capsys):
    """A plain folder of class folders: the probe's held-out images are training's (5 % by name
    hash over the folder), not a share of each class of its own (issue 20)."""
    for c, cls in enumerate(("a", "b")):
        for i in range(20):
            _img(tmp_path / cls / f"{i}.png", COLOURS[c], size=8, seed=10 * c + i)
    held_out = datasets.dataset_files("folder", str(tmp_path), "val")
    assert len(held_out) == 2
    row = _probe_json(tmp_path, capsys)
    assert row["n_train"] == 38 and row["n_val"] == 2
    _, val, _ = labelled.labelled_files("folder", str(tmp_path))
    assert sorted(f for f, _ in val) == sorted(held_out)


def test_probe_reads_a_file_name_that_is_not_utf8(tmp_path, capsys):
    """Training reads a file whose name is not valid UTF-8 (Latin-1 bytes); so must the probe, whose
    name hash once raised UnicodeEncodeError on it (issue 20)."""
    for c, cls in enumerate(("a", "b")):
        for i in range(3):
            _img(tmp_path / cls / f"{i}.png", COLOURS[c], size=8, seed=10 * c + i)
    latin1 = os.path.join(os.fsencode(tmp_path / "a"), b"caf\xe9.png")   # not valid UTF-8
    Image.new("RGB", (8, 8), COLOURS[0]).save(latin1, format="PNG")
    everything = {f for split in ("train", "val")
                  for f in datasets.dataset_files("folder", str(tmp_path), split)}
    assert len(everything) == 7 and os.fsdecode(latin1) in everything
    row = _probe_json(tmp_path, capsys, "--max-train", "6")
    assert row["n_train"] + row["n_val"] == 7


def test_crop_flip_cuts_and_mirrors_each_image():
    """The probe's and fine-tuning's augmentation against plain slicing; the draws are seeded per
    epoch and stay inside the image."""
    x = torch.randint(0, 256, (3, 10, 10, 3), dtype=torch.uint8)
    off, flip = torch.tensor([[0, 0], [2, 1], [3, 3]]), torch.tensor([False, True, True])
    out = ce_finetune.crop_flip(x, off, flip, 7)
    for k, ((r, c), f) in enumerate(zip(off.tolist(), flip.tolist())):
        want = x[k, r:r + 7, c:c + 7]
        assert torch.equal(out[k], want.flip(1) if f else want)
    a, b = ce_finetune.aug_draws(500, 144, 128, 0, 0), ce_finetune.aug_draws(500, 144, 128, 0, 0)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], ce_finetune.aug_draws(500, 144, 128, 0, 1)[0])
    assert a[0].min() == 0 and a[0].max() == 16 and 0.4 < a[1].float().mean() < 0.6


def _noise_folder(root):
    """3 classes of the same grey noise: labels a probe cannot predict, so its top-1 values are
    not all 100 and any change in the classifiers' arithmetic shows."""
    for c, cls in enumerate("abc"):
        for i in range(10):
            _img(root / cls / f"{i}.png", size=16, seed=10 * c + i)


def test_probe_without_augmentation_is_the_probe_before_it(tmp_path, capsys):
    """--no-augment: whole images, features extracted once, one fit_linear per tap: the same
    numbers as that recomputation, with the seeded order unchanged."""
    _noise_folder(tmp_path)
    flags = ["--val-fraction", "0.3", "--batch-size", "7", "--epochs", "3", "--probe-seed", "5"]
    row = _probe_json(tmp_path, capsys, "--no-augment", *flags)
    assert row["augment"] is False and row["load_size"] == row["input_size"] == 128
    train, val, names = labelled.labelled_files("folder", str(tmp_path), 0.3)
    (xtr, ytr), (xva, yva) = (labelled.decode_labelled(s, 128, "x") for s in (train, val))
    spec = dict(arch="dcgan", weights=None, a=dict(width=8, bottleneck=16, bottleneck_bn=True,
                                                   bias=False, init="dcgan", seed=0))
    enc, taps = ce_probe.load_encoder(spec)
    ftr, fva = (ce_probe.extract(enc, taps, x, "cpu") for x in (xtr, xva))
    want = {name: ce_probe.fit_linear(ftr[name], ytr, fva[name], yva, 3, 3, batch_size=7,
                                      seed=5) for name, _ in taps}
    assert row["top1"] == {k: v[0] for k, v in want.items()}
    assert row["train_top1"] == {k: v[1] for k, v in want.items()}
    assert len(set(row["train_top1"].values())) > 1      # not a saturated toy
    aug = _probe_json(tmp_path, capsys, *flags)
    assert aug["augment"] is True and aug["load_size"] == 144 and aug["dims"] == row["dims"]
    assert aug["train_top1"] != row["train_top1"]        # trained on crops, not whole images


def test_probe_leaves_the_encoders_as_they_were(tmp_path, capsys, monkeypatch):
    """The frozen probe (augmented, all three starts) never changes an encoder: after it, the
    checkpoint's encoder equals the checkpoint, BatchNorm statistics included; and a fine-tuning
    run in between leaves the probe's results as they were."""
    _tiny_fixture(tmp_path / "data", n_train=3, n_val=1)
    _save_ckpt(tmp_path / "ckpt.pt", seed=0)
    used = []
    load = ce_probe.load_encoder
    monkeypatch.setattr(ce_probe, "load_encoder", lambda *a: used.append(load(*a)) or used[-1])
    flags = ["--data", "tiny", "--data-root", str(tmp_path / "data"), "--device", "cpu",
             "--epochs", "2", "--ckpt", str(tmp_path / "ckpt.pt"), "--random-init", "dcgan",
             "--ddi-init", "dcgan", "--json"]
    capsys.readouterr()
    first = ce_probe.main(flags)
    assert [r["start"] for r in first] == ["random", "ddi", "checkpoint"]
    saved = checkpoints.read_checkpoint(str(tmp_path / "ckpt.pt"))["G"]
    enc = used[-1][0].state_dict()
    assert enc and all(torch.equal(v, saved[f"encoder.{k}"]) for k, v in enc.items())
    assert any(not torch.equal(v, saved[f"encoder.{k}"])                     # ddi rescaled it
               for k, v in used[1][0].state_dict().items())
    ce_probe.main(flags + ["--finetune", "--ft-epochs", "1", "--ft-batch", "3"])
    again = ce_probe.main(flags)
    assert [r["top1"] for r in again] == [r["top1"] for r in first]
    assert [r["train_top1"] for r in again] == [r["train_top1"] for r in first]
