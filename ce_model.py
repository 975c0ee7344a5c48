"""Context Encoder networks (Pathak et al., CVPR 2016): the centre-region model of Fig. 2, the
whole-image model of 3.3 and the AlexNet model of 5.2. Their checkpoint format is in
ce_utils/checkpoints.py.

Generator = encoder (5 strided 4x4 convs, no pooling, paper 3.1) -> 4000-d bottleneck -> decoder
(5 up-convs) mapping a masked 3x128x128 image in [-1, 1] to the 3x64x64 centre through tanh.
Discriminator = 4 strided convs on the 64x64 region, one logit per image (paper 3.2, Eq. 2).

    python -c "import ce_model as m; G, D = m.build_models(); print(m.count_params(G))"
"""

from functools import partial

import torch.nn as nn


def _down(cin, cout, bn, bias):
    """4x4 stride-2 conv halving the resolution; LeakyReLU(0.2) as DCGAN and official train.lua."""
    layers = [nn.Conv2d(cin, cout, 4, 2, 1, bias=bias)]
    if bn:
        layers.append(nn.BatchNorm2d(cout))
    layers.append(nn.LeakyReLU(0.2, inplace=True))
    return layers


def _up(cin, cout, bias):
    """4x4 stride-2 transposed conv doubling the resolution, BN + ReLU (DCGAN generator)."""
    return [nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=bias), nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True)]


class Generator(nn.Module):
    """Encoder-decoder of paper Fig. 2: (B, 3, 128, 128) masked image -> (B, 3, 64, 64) centre.

    full_image=True: the model for random block/region masks (official train_random.lua:148-152 with
    fineSize 128): one more up-convolution, so that it predicts the whole (B, 3, 128, 128) image.
    """

    def __init__(self, width=64, bottleneck=4000, bottleneck_bn=True, bias=False, full_image=False):
        super().__init__()
        w = width
        self.encoder = nn.Sequential(                                   # (B, 3, 128, 128)
            *_down(3, w, bn=False, bias=bias),                          # (B, w, 64, 64)
            *_down(w, w, bn=True, bias=bias),                           # (B, w, 32, 32)
            *_down(w, 2 * w, bn=True, bias=bias),                       # (B, 2w, 16, 16)
            *_down(2 * w, 4 * w, bn=True, bias=bias),                   # (B, 4w, 8, 8)
            *_down(4 * w, 8 * w, bn=True, bias=bias),                   # (B, 8w, 4, 4)
            nn.Conv2d(8 * w, bottleneck, 4, 1, 0, bias=bias),           # (B, 4000, 1, 1) bottleneck
            # official train.lua:125-126 normalises the bottleneck; the seed code has LeakyReLU only
            *([nn.BatchNorm2d(bottleneck)] if bottleneck_bn else []),
            nn.LeakyReLU(0.2, inplace=True),
        )
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(bottleneck, 8 * w, 4, 1, 0, bias=bias),  # (B, 8w, 4, 4)
            nn.BatchNorm2d(8 * w), nn.ReLU(inplace=True),
            *_up(8 * w, 4 * w, bias),                                   # (B, 4w, 8, 8)
            *_up(4 * w, 2 * w, bias),                                   # (B, 2w, 16, 16)
            *_up(2 * w, w, bias),                                       # (B, w, 32, 32)
            *(_up(w, w, bias) if full_image else []),                   # (B, w, 64, 64) whole image
            nn.ConvTranspose2d(w, 3, 4, 2, 1, bias=bias),               # (B, 3, 64, 64) or 128x128
            nn.Tanh(),
        )

    def forward(self, x):
        return self.decoder(self.encoder(x))


class Discriminator(nn.Module):
    """Adversarial discriminator of paper 3.2 on the 64x64 region: (B, 3, 64, 64) -> (B,) logits.
    full_image=True: on whole 128x128 images (official train_random.lua:194-198: one more conv).

    DEVIATION: the official code ends in a sigmoid + BCE; this returns logits for BCE-with-logits,
    the same function but numerically safe under bf16 autocast.
    """

    def __init__(self, width=64, bias=False, full_image=False):
        super().__init__()
        w = width
        self.net = nn.Sequential(                                       # (B, 3, 64, 64)
            *_down(3, w, bn=False, bias=bias),                          # (B, w, 32, 32)
            *(_down(w, w, bn=True, bias=bias) if full_image else []),   # whole image: 64 -> 32
            *_down(w, 2 * w, bn=True, bias=bias),                       # (B, 2w, 16, 16)
            *_down(2 * w, 4 * w, bn=True, bias=bias),                   # (B, 4w, 8, 8)
            *_down(4 * w, 8 * w, bn=True, bias=bias),                   # (B, 8w, 4, 4)
            nn.Conv2d(8 * w, 1, 4, 1, 0, bias=bias),                    # (B, 1, 1, 1)
        )

    def forward(self, x):
        if x.shape[-1] not in (64, 128):   # the AlexNet model's 227 px images (with --lam-adv > 0)
            x = nn.functional.interpolate(x, size=(128, 128), mode="bilinear", align_corners=False,
                                          antialias=True)
        return self.net(x).flatten()


def dcgan_init(module):
    """Official/DCGAN init: conv weights N(0, 0.02), BN weight N(1, 0.02), all biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


# The flags that decide the networks' shapes; a checkpoint's own values of these rebuild it.
ARCH_KEYS = ("width", "bottleneck", "bottleneck_bn", "bias")


def build_models(width=64, bottleneck=4000, bottleneck_bn=True, bias=False, init="dcgan",
                 full_image=False):
    """Build (G, D). Paper/official: bias-free convs, bottleneck BN, DCGAN init; seed: biases, no
    BN, torch init. full_image: the whole-image pair for random block/region masks (centre masks:
    the 64x64 region pair)."""
    G = Generator(width, bottleneck, bottleneck_bn, bias, full_image)
    D = Discriminator(width, bias, full_image)
    if init == "dcgan":
        dcgan_init(G)
        dcgan_init(D)
    return G, D


def count_params(module):
    return sum(p.numel() for p in module.parameters())


# -------------------------------------------------------------------------------------------------
# Feature learning (paper 3.1 channel-wise fully connected layer; 5.2 and Fig. 9b, the AlexNet
# context encoder), and the encoder layers ("taps") that a linear probe reads (ce_probe.py).

class ChannelwiseFC(nn.Module):
    """Paper 3.1: m maps of n x n -> m maps of n x n, output map g fully connected to input map g
    only (m*n^4 weights instead of m^2*n^4), then a stride-1 convolution that mixes the channels.
    The FC part is one grouped convolution (maintainer's recipe, official issue #18): kernel n = the
    whole map, m*n^2 outputs, m groups; output channel g*n^2 + k is position k of map g. Bias: one
    per output unit (m*n^2), as Caffe's convolution has by default (bias=False: the paper's m*n^4
    only). Order FC -> ReLU -> dropout -> mixing conv -> ReLU, as AlexNet's fc6 -> relu6 -> drop6
    (paper 5.2: dropout 0.5 on this layer)."""

    def __init__(self, channels, size, dropout=0.0, mix_kernel=1, bias=True):
        super().__init__()
        self.channels, self.size = channels, size
        self.fc = nn.Conv2d(channels, channels * size * size, size, groups=channels, bias=bias)
        self.drop = nn.Dropout(dropout)
        # DEVIATION (choice; the paper gives no kernel, width or activation): a 1x1 convolution,
        # m -> m channels. The paper's stated purpose is to mix channels; the FC already mixes the
        # positions within each map, and 1x1 keeps the two jobs apart (together a factorised full
        # FC) with m^2 weights instead of 9 m^2 for 3x3 (more than the FC). mix_kernel=3 is the
        # Lasagne port's choice.
        self.mix = nn.Conv2d(channels, channels, mix_kernel, 1, mix_kernel // 2, bias=bias)
        self.relu = nn.ReLU(inplace=True)

    def channelwise(self, x):
        """The FC part alone (linear): (B, m, n, n) -> (B, m, n, n), map g from map g only."""
        return self.fc(x).reshape(x.shape[0], self.channels, self.size, self.size)

    def forward(self, x):
        return self.relu(self.mix(self.drop(self.relu(self.channelwise(x)))))


def _scaled(c, width):
    """A channel count times the width multiplier (at least 1)."""
    return max(1, round(c * width))


class AlexNetEncoder(nn.Sequential):
    """AlexNet conv1-conv5 + pool5 (paper 5.2: the feature encoder, randomly initialised, trained
    from scratch): (B, 3, 227, 227) -> (B, 256, 6, 6); channels 96-256-384-384-256 times `width`.

    DEVIATION (choice; no source gives LRN, groups or normalisation): no LRN and no two-tower groups
    (the one-tower AlexNet); BatchNorm after conv2-conv5 instead of LRN (not after conv1, as in the
    DCGAN encoders of this file), which lets it train from scratch with Adam; a conv followed by BN
    has no bias (BN has one).
    """

    def __init__(self, width=1.0):
        c1, c2, c3, c4, c5 = (_scaled(c, width) for c in (96, 256, 384, 384, 256))
        relu = partial(nn.ReLU, inplace=True)
        bn = nn.BatchNorm2d
        super().__init__(                                                  # (B, 3, 227, 227)
            nn.Conv2d(3, c1, 11, 4, 0), relu(),                            # conv1 (B, 96, 55, 55)
            nn.MaxPool2d(3, 2),                                            # (B, 96, 27, 27)
            nn.Conv2d(c1, c2, 5, 1, 2, bias=False), bn(c2), relu(),        # conv2 (B, 256, 27, 27)
            nn.MaxPool2d(3, 2),                                            # (B, 256, 13, 13)
            nn.Conv2d(c2, c3, 3, 1, 1, bias=False), bn(c3), relu(),        # conv3 (B, 384, 13, 13)
            nn.Conv2d(c3, c4, 3, 1, 1, bias=False), bn(c4), relu(),        # conv4 (B, 384, 13, 13)
            nn.Conv2d(c4, c5, 3, 1, 1, bias=False), bn(c5), relu(),        # conv5 (B, 256, 13, 13)
            nn.MaxPool2d(3, 2),                                            # pool5 (B, 256, 6, 6)
        )
        self.out_channels = c5


def _up5(cin, cout, last=False):
    """5x5 stride-2 up-convolution, n -> 2n - 1 (6 -> 11 -> 21 -> 41 -> 81 -> 161, paper Fig. 9b).
    DEVIATION (choice): BN + ReLU after each (as the DCGAN decoder of Fig. 2); the last has a bias
    and tanh."""
    if last:
        return [nn.ConvTranspose2d(cin, cout, 5, 2, 2), nn.Tanh()]
    return [nn.ConvTranspose2d(cin, cout, 5, 2, 2, bias=False), nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True)]


class AlexNetGenerator(nn.Module):
    """Feature-learning context encoder of paper 5.2 / Fig. 9b: (B, 3, 227, 227) image with a hole
    -> AlexNet encoder (B, 256, 6, 6) -> channel-wise FC -> five up-convolutions (B, 3, 161, 161) ->
    resize -> (B, 3, 227, 227), the whole image (the loss and the paste take the hole from it)."""

    def __init__(self, width=1.0, dropout=0.5):
        super().__init__()
        self.encoder = AlexNetEncoder(width)
        c = self.encoder.out_channels
        d1, d2, d3, d4 = (_scaled(k, width) for k in (128, 64, 64, 32))
        self.fc = ChannelwiseFC(c, 6, dropout)
        self.decoder = nn.Sequential(
            *_up5(c, d1), *_up5(d1, d2), *_up5(d2, d3), *_up5(d3, d4),  # 11, 21, 41, 81
            *_up5(d4, 3, last=True),                                   # (B, 3, 161, 161) in [-1, 1]
            # DEVIATION (choice; the paper only says "resize"): bilinear, which unlike bicubic
            # cannot overshoot tanh's [-1, 1]. The L2 loss is taken at 227, on what the user sees.
            nn.Upsample(size=(227, 227), mode="bilinear", align_corners=False),
        )

    def forward(self, x):
        return self.decoder(self.fc(self.encoder(x)))


# The checkpoint `args` keys that rebuild a generator: "arch" ("dcgan" when absent: checkpoints
# written before the AlexNet model), ARCH_KEYS for dcgan, ALEXNET_KEYS for alexnet (alexnet_width:
# the channel multiplier, 1.0 = paper; cfc_dropout: dropout of the channel-wise FC, no weights).
ALEXNET_KEYS = ("alexnet_width", "cfc_dropout")
INPUT_SIZE = {"dcgan": 128, "alexnet": 227}   # the square each arch sees: Fig. 2, paper 5.2


def input_size(a=None):
    """The side of the square images the generator of run flags `a` takes: a checkpoint's args dict
    or an argparse namespace; no "arch" (or no `a`) is the DCGAN model."""
    arch = a.get("arch", "dcgan") if isinstance(a, dict) else getattr(a, "arch", "dcgan")
    return INPUT_SIZE[arch]


def build_alexnet(width=1.0, dropout=0.5, init="dcgan"):
    """The AlexNet context encoder G (no pretrained weights anywhere). init="dcgan": N(0, 0.02)
    convs, BN weight N(1, 0.02), zero biases, as the DCGAN model here (DEVIATION, choice: the paper
    gives no init); "torch": PyTorch defaults. Torch's global RNG decides the weights."""
    G = AlexNetGenerator(width, dropout)
    if init == "dcgan":
        dcgan_init(G)
    return G


def build_pair(a, init=None):
    """(G, D) from a run's flags (a checkpoint's args dict): either arch, centre or whole-image
    model. init=None: the run's own init (a["init"]); "none" skips it (weights about to be loaded).
    torch.manual_seed(a["seed"]) then this gives the pair a ce_train.py run started from. The
    AlexNet G is L2-only in the paper; its D (only with --lam-adv > 0) is the whole-image DCGAN
    discriminator on 227 px images resized to 128 (DEVIATION, choice: the paper trains none)."""
    init = init or a.get("init", "dcgan")
    arch = a.get("arch", "dcgan")
    if arch == "alexnet":
        G = build_alexnet(a.get("alexnet_width", 1.0), a.get("cfc_dropout", 0.5), init)
        D = Discriminator(a.get("width", 64), a.get("bias", False), full_image=True)
        if init == "dcgan":
            dcgan_init(D)
        return G, D
    if arch != "dcgan":
        raise ValueError(f"unknown arch {arch!r} in the run's flags (expected dcgan or alexnet)")
    full_image = a.get("mask", "center") != "center"
    return build_models(**{k: a[k] for k in ARCH_KEYS}, init=init, full_image=full_image)


def build_generator(a, init=None):
    """G alone, as build_pair builds it (the random-init baseline of ce_probe.py)."""
    return build_pair(a, init)[0]


def encoder_taps(G):
    """The layers a linear probe reads, as [(name, index into G.encoder)]: the output of module
    `index` (after its activation). AlexNet: conv1-conv5 after their ReLU, and pool5. DCGAN
    (Fig. 2): each of the 5 conv blocks and the bottleneck, after its LeakyReLU."""
    if isinstance(G, AlexNetGenerator):
        idx = [i for i, m in enumerate(G.encoder) if isinstance(m, nn.ReLU)]
        return [(f"conv{k + 1}", i) for k, i in enumerate(idx)] + [("pool5", len(G.encoder) - 1)]
    idx = [i for i, m in enumerate(G.encoder) if isinstance(m, nn.LeakyReLU)]
    return [(f"conv{k + 1}", i) for k, i in enumerate(idx[:-1])] + [("bottleneck", idx[-1])]
