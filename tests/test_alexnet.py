"""AlexNet context encoder of paper 5.2 / Fig. 9b: sizes, exact parameter counts, taps, seeding."""
import os

import pytest
import torch
import torch.nn as nn

import ce_model
import ce_train
from ce_utils import checkpoints, runstate


def expected_alexnet_counts(c=(96, 256, 384, 384, 256), d=(128, 64, 64, 32)):
    c1, c2, c3, c4, c5 = c
    enc = ((3 * c1 * 121 + c1) + c1 * c2 * 25 + c2 * c3 * 9 + c3 * c4 * 9 + c4 * c5 * 9
           + 2 * (c2 + c3 + c4 + c5))
    cfc = (c5 * 6 ** 4 + c5 * 36) + (c5 * c5 + c5)
    ch = (c5,) + d
    dec = sum(ch[i] * ch[i + 1] * 25 + 2 * ch[i + 1] for i in range(4)) + ch[4] * 3 * 25 + 3
    return enc, cfc, dec


def test_full_size_parameter_counts():
    G = ce_model.build_alexnet()
    enc, cfc, dec = expected_alexnet_counts()
    got = tuple(ce_model.count_params(m) for m in (G.encoder, G.fc, G.decoder))
    print(f"alexnet G: encoder {got[0]:,} + channel-wise FC {got[1]:,} + decoder {got[2]:,} = "
          f"{ce_model.count_params(G):,}")
    assert got == (enc, cfc, dec) == (3_748_480, 406_784, 1_180_579)
    assert ce_model.count_params(G) == 5_335_843
    assert not any(isinstance(m, nn.LocalResponseNorm) for m in G.modules())


def test_full_size_tap_shapes():
    G = ce_model.build_alexnet().eval()
    taps = ce_model.encoder_taps(G)
    assert [n for n, _ in taps] == ["conv1", "conv2", "conv3", "conv4", "conv5", "pool5"]
    x = torch.randn(1, 3, 227, 227)
    shapes = {}
    with torch.no_grad():
        for i, m in enumerate(G.encoder):
            x = m(x)
            shapes[i] = tuple(x.shape[1:])
    assert [shapes[i] for _, i in taps] == [(96, 55, 55), (256, 27, 27), (384, 13, 13),
                                            (384, 13, 13), (256, 13, 13), (256, 6, 6)]


def test_tiny_forward_and_decoder_sizes():
    torch.manual_seed(0)
    G = ce_model.build_alexnet(width=0.125).eval()
    sizes = []
    for m in G.decoder:
        if isinstance(m, nn.ConvTranspose2d):
            m.register_forward_hook(lambda mod, inp, out: sizes.append(tuple(out.shape[1:])))
    x = torch.rand(2, 3, 227, 227) * 2 - 1
    with torch.no_grad():
        y = G(x)
        assert G.encoder(x).shape == (2, 32, 6, 6)                      # 256 * 0.125
    assert y.shape == (2, 3, 227, 227) and y.abs().max() <= 1
    assert [s[1] for s in sizes] == [11, 21, 41, 81, 161]
    # 128, 64, 64, 32 * 0.125, then RGB
    assert [s[0] for s in sizes] == [16, 8, 8, 4, 3]


def test_same_seed_same_weights_and_build_generator():
    def make(seed):
        torch.manual_seed(seed)
        return ce_model.build_alexnet(width=0.125).state_dict()
    a, b, c = make(3), make(3), make(4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["encoder.0.weight"], c["encoder.0.weight"])
    torch.manual_seed(3)
    g = ce_model.build_generator({"arch": "alexnet", "alexnet_width": 0.125, "cfc_dropout": 0.5,
                                  "init": "dcgan"})
    assert isinstance(g, ce_model.AlexNetGenerator)
    assert all(torch.equal(a[k], v) for k, v in g.state_dict().items())
    with pytest.raises(ValueError, match="unknown arch"):  # ce_model imports no project module
        ce_model.build_generator({"arch": "vgg"})


def test_dcgan_taps_without_changing_the_generator():
    w, b = 8, 16
    G, _ = ce_model.build_models(width=w, bottleneck=b)
    taps = ce_model.encoder_taps(G)
    assert [n for n, _ in taps] == ["conv1", "conv2", "conv3", "conv4", "conv5", "bottleneck"]
    assert all(isinstance(G.encoder[i], nn.LeakyReLU) for _, i in taps)
    assert taps[-1][1] == len(G.encoder) - 1
    x, shapes = torch.randn(1, 3, 128, 128), {}
    G.eval()
    with torch.no_grad():
        for i, m in enumerate(G.encoder):
            x = m(x)
            shapes[i] = tuple(x.shape[1:])
    assert [shapes[i] for _, i in taps] == [(w, 64, 64), (w, 32, 32), (2 * w, 16, 16),
                                            (4 * w, 8, 8), (8 * w, 4, 4), (b, 1, 1)]


def test_tiny_alexnet_run_trains_resumes_exactly_inpaints_and_is_probed(tmp_path, tiny_flags,
                                                                        capsys):
    """--arch alexnet end to end on the embedded data: region masks and L2 only by default, 227 px,
    checkpoint with arch, exact resume, held-out evaluation against the baselines, and the probe
    reads the checkpoint."""
    import json

    import ce_eval
    import ce_probe
    import ce_train
    flags = tiny_flags + ["--arch", "alexnet", "--alexnet-width", "0.125", "--batch-size", "4",
                          "--log-every", "2", "--eval-every", "4", "--eval-images", "4",
                          "--shapes-n", "16"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    ce_train.main(flags + ["--steps", "4", "--out", a])
    ce_train.main(flags + ["--steps", "2", "--out", b])
    ce_train.main(["--resume", b, "--steps", "4", "--device", "cpu"])
    sa, sb = checkpoints.read_checkpoint(a), checkpoints.read_checkpoint(b)
    run = sa["args"]
    assert run["arch"] == "alexnet" and run["mask"] == "region" and run["lam_adv"] == 0
    assert all(torch.equal(sa["G"][k], sb["G"][k]) for k in sa["G"])
    G, _, _ = checkpoints.load_checkpoint(a)
    assert isinstance(G, ce_model.AlexNetGenerator)
    capsys.readouterr()
    ce_eval.main(["--ckpt", a, "--device", "cpu", "--json", "--max-images", "4"])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["model"]["n_images"] == 4 and res["harmonic"]["psnr"] > res["fill"]["psnr"]
    # the probe reads the trained encoder; its random-init row is the network this run started from
    from test_probe import _tiny_fixture
    _tiny_fixture(tmp_path / "labelled")
    ce_probe.main(["--data", "tiny", "--data-root", str(tmp_path / "labelled"), "--device", "cpu",
                   "--ckpt", os.path.join(a, "ckpt.pt"), "--random-init", "alexnet",
                   "--epochs", "2", "--json"])
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert len(rows) == 2 and all(len(r["top1"]) == 6 for r in rows)
    assert rows[1]["arch"] == "alexnet"


def test_alexnet_on_a_cpu_gets_a_step_time_estimate_at_227_px(tmp_path, capsys):
    """The estimate times the networks on the run's own input: 227 px images, D on whole images."""
    args = ce_train.parse_args(["--device", "cpu", "--arch", "alexnet", "--out", str(tmp_path)])
    G, D = ce_model.build_pair({**vars(args), "alexnet_width": 0.125, "width": 8})
    runstate.announce(args, 1, 64, 16, G, D, 1000)
    out = capsys.readouterr().out.splitlines()
    note = [ln for ln in out if ln.startswith("note: this network on a CPU")]
    assert len(note) == 1 and "--alexnet-width 0.25" in note[0]
    # the network's input size, not --load-size (images are decoded larger, then cropped to 227)
    args = ce_train.parse_args(["--device", "cpu", "--arch", "alexnet", "--load-size", "350",
                                "--out", str(tmp_path)])
    runstate.announce(args, 1, 64, 16, G, D, 1000)
    assert "note: this network on a CPU" in capsys.readouterr().out
