"""Channel-wise fully connected layer of paper 3.1: m*n^4 weights, no link between channels,
the same as m Linears."""
import torch
import torch.nn as nn
from torch.autograd.functional import jacobian

import ce_model


def test_parameter_count_paper_size():
    m, n = 256, 6
    cfc = ce_model.ChannelwiseFC(m, n, dropout=0.5)
    # paper 3.1: m n^4, not m^2 n^4 = 84,934,656
    assert cfc.fc.weight.numel() == m * n ** 4 == 331_776
    # one bias per output unit (Caffe default)
    assert cfc.fc.bias.numel() == m * n * n == 9_216
    assert ce_model.count_params(cfc.fc) == 340_992
    assert ce_model.count_params(cfc.mix) == m * m + m == 65_792     # the 1x1 channel-mixing conv
    assert ce_model.count_params(cfc) == 406_784
    no_bias = ce_model.ChannelwiseFC(m, n, bias=False)
    assert ce_model.count_params(no_bias.fc) == 331_776
    x = torch.randn(2, m, n, n)
    assert cfc.eval()(x).shape == (2, m, n, n)


def test_jacobian_is_block_diagonal_over_channels():
    torch.manual_seed(0)
    m, n = 3, 3
    cfc = ce_model.ChannelwiseFC(m, n)
    x = torch.randn(1, m, n, n)
    J = jacobian(cfc.channelwise, x).reshape(m, n * n, m, n * n)   # d out[g, k] / d in[h, j]
    for g in range(m):
        for h in range(m):
            block = J[g, :, h, :]
            if g == h:
                # every position of map g sees every position of map g
                assert block.abs().min() > 0
            else:
                assert torch.all(block == 0)          # and nothing of any other map
    # the full layer (FC, then the 1x1 conv) does mix channels
    Jfull = jacobian(lambda t: cfc.eval()(t), x).reshape(m, n * n, m, n * n)
    off = Jfull.abs().sum((1, 3)) * (1 - torch.eye(m))
    assert off.sum() > 0


def test_equals_a_loop_of_per_channel_linear_layers():
    torch.manual_seed(1)
    m, n, B = 4, 5, 3
    cfc = ce_model.ChannelwiseFC(m, n)
    x = torch.randn(B, m, n, n)
    k = n * n
    outs = []
    for g in range(m):
        lin = nn.Linear(k, k)
        # conv weight (m*k, 1, n, n): rows g*k..g*k+k-1 are channel g's k x k matrix
        with torch.no_grad():
            lin.weight.copy_(cfc.fc.weight[g * k:(g + 1) * k].reshape(k, k))
            lin.bias.copy_(cfc.fc.bias[g * k:(g + 1) * k])
        outs.append(lin(x[:, g].reshape(B, k)).reshape(B, n, n))
    expected = torch.stack(outs, 1)
    assert torch.allclose(cfc.channelwise(x), expected, atol=1e-5, rtol=1e-5)
