"""Fine-tuning (ce_finetune.py, paper Table 2's test) and the data-dependent initialisation
(Krähenbühl et al. 2016) that is its third start and the probe's."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import ce_model
import ce_finetune
import ce_probe
import ce_train
from ce_utils import checkpoints, labelled
from test_probe import COLOURS, _img, one_thread  # noqa: F401  (one_thread: an autouse fixture)


def _colour_folder(root, n_train=8, n_val=4):
    """DIR/train/<class>/ and DIR/val/<class>/ of noisy flat colours: separable, 3 classes."""
    for split, n in (("train", n_train), ("val", n_val)):
        for c, cls in enumerate(("red", "green", "blue")):
            for i in range(n):
                _img(root / split / cls / f"{i}.png", COLOURS[c], size=32, seed=97 * c + 13 * i
                     + (500 if split == "val" else 0))


def _trained_ckpt(path):
    """A checkpoint of the tiny dcgan whose G is not its run's random init (other weights)."""
    args = ce_train.default_args(width=8, bottleneck=16, seed=0)
    torch.manual_seed(1)
    G, D = ce_model.build_models(args.width, args.bottleneck, args.bottleneck_bn, args.bias)
    checkpoints.save_checkpoint(path, {"G": G.state_dict(), "D": D.state_dict(),
                                       "args": vars(args), "step": 0})
    return G


def test_finetune_starts_learn_from_the_same_batches(tmp_path, capsys, monkeypatch):
    """Three starts (random, ddi, checkpoint) on a separable folder: each beats chance by far, the
    encoder moves, and all three see the same augmented batches in the same order."""
    _colour_folder(tmp_path / "data")
    _trained_ckpt(tmp_path / "ckpt.pt")
    seen = []
    crop_flip = ce_finetune.crop_flip
    monkeypatch.setattr(ce_finetune, "crop_flip", lambda *a: seen.append(crop_flip(*a)) or seen[-1])
    capsys.readouterr()
    ce_probe.main(["--data", "folder", "--data-root", str(tmp_path / "data"), "--device", "cpu",
                   "--ckpt", str(tmp_path / "ckpt.pt"), "--random-init", "dcgan", "--ddi-init",
                   "dcgan", "--finetune", "--ft-epochs", "6", "--ft-batch", "6", "--json"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["start"] for r in rows] == ["random", "ddi", "checkpoint"]
    for r in rows:
        assert r["n_train"] == 24 and r["n_val"] == 12 and r["input_size"] == 128
        assert r["top1"] > 80 and r["chance"] == pytest.approx(100 / 3)
        p = r["top1"] / 100
        assert r["se"] == pytest.approx(100 * math.sqrt(p * (1 - p) / 12))
        assert r["weight_change"] > 1e-3 and r["head_dims"] == 16
    # 24 images, batches of 6, 6 epochs: 24 batches per start, the same ones in the same order
    assert len(seen) == 72 and all(b.shape == (6, 128, 128, 3) for b in seen)
    assert all(torch.equal(a, b) and torch.equal(a, c)
               for a, b, c in zip(seen[:24], seen[24:48], seen[48:]))
    assert not torch.equal(seen[0], seen[4])       # epoch 2 is another order and other crops
    # the random start is the network the checkpoint's run began from, not the checkpoint
    assert rows[0]["top1"] != rows[2]["top1"] or rows[0]["weight_change"] != rows[2][
        "weight_change"]


def test_finetune_trains_the_encoder_in_place(tmp_path):
    """finetune() changes every conv of the encoder (end to end, not a probe)."""
    G = ce_model.build_generator(dict(width=8, bottleneck=16, bottleneck_bn=True, bias=False))
    enc, head = G.encoder, nn.Linear(16, 3)
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    images = torch.randint(0, 256, (12, 136, 136, 3), dtype=torch.uint8)
    labels = torch.arange(12) % 3
    args = ce_probe.parse_args(["--random-init", "dcgan", "--device", "cpu", "--finetune",
                                "--ft-epochs", "2", "--ft-batch", "4"])
    ce_finetune.finetune(enc, head, images, labels, 128, args)
    convs = [k for k, v in before.items() if v.dim() == 4]
    assert len(convs) == 6 and all(not torch.equal(before[k], enc.state_dict()[k]) for k in convs)


def test_finetune_needs_one_batch(tmp_path, capsys):
    _colour_folder(tmp_path / "data", n_train=2, n_val=1)
    from ce_utils import cli
    with pytest.raises(SystemExit) as e:
        cli.run(ce_probe.main, ["--data", "folder", "--data-root", str(tmp_path / "data"),
                                "--device", "cpu", "--random-init", "dcgan", "--width", "8",
                                "--bottleneck", "16", "--finetune"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "--ft-batch" in err


def _pre_activations(encoder, x):
    """Inputs of every nonlinearity of the encoder, by a plain eval-mode forward."""
    got = []
    encoder.eval()
    with torch.no_grad():
        for m in encoder:
            if isinstance(m, (nn.ReLU, nn.LeakyReLU)):
                got.append(x.clone())             # before the in-place activation overwrites it
            x = m(x)
    return got


@pytest.mark.parametrize("net", ["paper", "seed", "alexnet"])
def test_data_dependent_init_standardises_every_layer(net):
    """After data_dependent_init on a batch, each layer's pre-activation outputs on that batch have
    per-channel mean 0 and std 1 (mean: only where a bias or a BatchNorm can carry it)."""
    a = {"paper": dict(width=8, bottleneck=16, bottleneck_bn=True, bias=False, init="dcgan"),
         "seed": dict(width=8, bottleneck=16, bottleneck_bn=False, bias=True, init="torch"),
         "alexnet": dict(arch="alexnet", alexnet_width=0.0625)}[net]
    torch.manual_seed(0)
    enc = ce_model.build_generator(a).encoder
    S = ce_model.input_size(a)
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(24, 3, S, S, generator=g) * 2 - 1).cumsum(-1).tanh()   # smooth, not white
    before = _pre_activations(enc, x)
    ce_finetune.data_dependent_init(enc, x)
    after = _pre_activations(enc, x)
    convs = [m for m in enc if isinstance(m, nn.Conv2d)]
    assert len(after) == len(convs) == (6 if net != "alexnet" else 5)
    for k, (z, conv) in enumerate(zip(after, convs)):
        mean, std = z.mean((0, 2, 3)), z.std((0, 2, 3), unbiased=False)
        assert torch.allclose(std, torch.ones_like(std), atol=1e-3), (net, k)
        nxt = list(enc)[list(enc).index(conv) + 1]
        if conv.bias is not None or isinstance(nxt, nn.BatchNorm2d):
            assert mean.abs().max() < 1e-3, (net, k)
    # it did something: the DCGAN init's N(0, 0.02) convs are far from unit outputs
    assert abs(before[0].std().item() - 1) > 0.1


def _top_shape_geometry(seed, i, s=64):
    """Classify image i's top shape by its pixels alone: paint the image with and without its last
    shape (before the noise); the pixels that change are the top shape. An axis-aligned box fills
    its bounding box; a disc away from the border fills pi/4 of it; a line crosses the image from
    border to border. None when the pixels fit no rule cleanly (a clipped disc, a level line)."""
    from ce_utils import synthetic
    u, z, trig, stripes, tex = synthetic._draw(seed, i, s)
    painted = []
    for drop in (0, 1):
        v = u.copy()
        count = 2 + math.floor(3 * u[164]) - drop
        v[164] = (count - 2 + 0.5) / 3                       # the same draws, one shape fewer
        planes = np.empty((1, 3, s, s), np.uint8)
        synthetic._background(planes, v[None], trig[None], stripes[None], (tex,))
        synthetic._shapes(planes, v[None], z[None], trig[None])
        painted.append(torch.from_numpy(planes[0]))
    top = (painted[0] != painted[1]).any(0)
    ys, xs = torch.nonzero(top, as_tuple=True)
    h, w = int(ys.max() - ys.min()) + 1, int(xs.max() - xs.min()) + 1
    fill = top.sum().item() / (h * w)
    border = ys.min() == 0 or xs.min() == 0 or ys.max() == s - 1 or xs.max() == s - 1
    if (h == s or w == s) and fill < 0.9:
        return "line"
    if fill > 0.97:
        return "rectangle"
    if not border and 0.7 < fill < 0.86:
        return "disc"
    return None


def test_shapes_labels_name_the_top_shape():
    """The embedded data's probe labels (synthetic.shape_labels) name the shape painted last, as
    its pixels show it, and the three classes are about equally common."""
    from ce_utils import synthetic
    labels = synthetic.shape_labels(60, seed=1)
    seen = [(_top_shape_geometry(1, i), synthetic.SHAPE_CLASSES[y]) for i, y in enumerate(labels)]
    told = [(g, y) for g, y in seen if g is not None]
    assert len(told) >= 45 and all(g == y for g, y in told), seen
    counts = torch.bincount(torch.from_numpy(synthetic.shape_labels(3000, seed=2)), minlength=3)
    assert counts.min() > 900 and counts.max() < 1100


def test_probe_and_finetune_run_on_the_embedded_shapes(capsys):
    """--data shapes needs no folder: images 0..N-1 of each set, labelled by their top shape."""
    from ce_utils import synthetic
    base = ["--data", "shapes", "--data-root", "/nonexistent", "--random-init", "dcgan", "--width",
            "8", "--bottleneck", "16", "--max-train", "24", "--max-val", "12", "--device", "cpu",
            "--json"]
    capsys.readouterr()
    ce_probe.main(base + ["--finetune", "--ft-epochs", "1", "--ft-batch", "8"])
    ce_probe.main(base + ["--epochs", "1", "--no-augment"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["mode"] for r in rows] == ["finetune", "probe"]
    assert all(r["classes"] == 3 and r["n_train"] == 24 and r["n_val"] == 12 for r in rows)
    images, labels = labelled.shapes_labelled("val", 12, 128)
    assert images.shape == (12, 128, 128, 3)
    assert torch.equal(labels, torch.from_numpy(synthetic.shape_labels(12, seed=2)))
    assert torch.equal(images, torch.from_numpy(synthetic.make_shapes(12, seed=2)))
