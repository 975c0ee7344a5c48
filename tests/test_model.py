"""Networks of paper Fig. 2: shapes, no pooling, exact parameter counts, init, checkpoint
round trip."""
import pytest
import torch
import torch.nn as nn

import ce_model
from ce_utils import checkpoints


def expected_counts(w=64, b=4000, bottleneck_bn=True):
    def conv(cin, cout):
        return cin * cout * 16  # 4x4 kernels, no bias
    enc = (conv(3, w) + conv(w, w) + conv(w, 2 * w) + conv(2 * w, 4 * w) + conv(4 * w, 8 * w)
           + conv(8 * w, b))
    dec = conv(b, 8 * w) + conv(8 * w, 4 * w) + conv(4 * w, 2 * w) + conv(2 * w, w) + conv(w, 3)
    bn = (2 * (w + 2 * w + 4 * w + 8 * w) + 2 * (8 * w + 4 * w + 2 * w + w)
          + (2 * b if bottleneck_bn else 0))
    d = (conv(3, w) + conv(w, 2 * w) + conv(2 * w, 4 * w) + conv(4 * w, 8 * w) + conv(8 * w, 1)
         + 2 * (2 * w + 4 * w + 8 * w))
    return enc + dec + bn, d


def test_full_size_parameter_counts():
    G, D = ce_model.build_models()
    g, d = expected_counts()
    assert ce_model.count_params(G) == g and ce_model.count_params(D) == d
    assert 60e6 < g < 75e6 and 2.7e6 < d < 2.9e6
    # seed variant: biases on, no bottleneck BN
    G2, _ = ce_model.build_models(bottleneck_bn=False, bias=True)
    biases = (64 + 64 + 128 + 256 + 512 + 4000) + (512 + 256 + 128 + 64 + 3)
    assert ce_model.count_params(G2) == expected_counts(bottleneck_bn=False)[0] + biases


def test_shapes_no_pooling_bias_free():
    G, D = ce_model.build_models(width=8, bottleneck=16)
    x = torch.randn(2, 3, 128, 128)
    assert G.encoder(x).shape == (2, 16, 1, 1)
    y = G(x)
    assert y.shape == (2, 3, 64, 64) and y.abs().max() <= 1  # tanh output
    assert D(y).shape == (2,)
    mods = list(G.modules()) + list(D.modules())
    assert not any(isinstance(m, (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)) for m in mods)
    convs = [m for m in mods if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert len(convs) == 6 + 5 + 5
    assert all(m.bias is None and m.kernel_size == (4, 4) for m in convs)


def test_dcgan_init_statistics():
    G, _ = ce_model.build_models(width=32, bottleneck=256)
    w = G.encoder[2].weight  # second conv
    assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002
    bn = [m for m in G.modules() if isinstance(m, nn.BatchNorm2d)][0]
    assert abs(bn.weight.mean().item() - 1) < 0.02 and torch.all(bn.bias == 0)


def test_checkpoint_round_trip_and_errors(tmp_path):
    G, D = ce_model.build_models(width=8, bottleneck=16)
    args = {"width": 8, "bottleneck": 16, "bottleneck_bn": True, "bias": False}
    path = tmp_path / "c.pt"
    checkpoints.save_checkpoint(path, {"G": G.state_dict(), "D": D.state_dict(), "args": args,
                                       "step": 3})
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]   # temp file renamed away
    G2, D2, state = checkpoints.load_checkpoint(path)
    x = torch.randn(1, 3, 128, 128)
    G.eval(), G2.eval()
    assert torch.equal(G(x), G2(x)) and state["step"] == 3
    # truncated file, foreign file, missing file: one-line CheckpointError each
    data = path.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "foreign.pt").write_text("hello")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    for name, words in (("trunc.pt", "not a readable checkpoint"),
                        ("foreign.pt", "not a readable checkpoint"),
                        ("other.pt", "not a ce_train.py checkpoint"),
                        ("missing.pt", "no such checkpoint")):
        with pytest.raises(checkpoints.CheckpointError, match=words):
            checkpoints.load_checkpoint(tmp_path / name)


def test_input_size_from_a_runs_flags():
    """ce_model.input_size: the square a run's generator takes, from its flags (dict, namespace)."""
    from types import SimpleNamespace
    assert ce_model.input_size({"arch": "alexnet"}) == 227 == ce_model.input_size(
        SimpleNamespace(arch="alexnet"))
    assert ce_model.input_size({}) == ce_model.input_size(SimpleNamespace()) == 128
    assert ce_model.input_size() == ce_model.input_size({"arch": "dcgan"}) == 128
