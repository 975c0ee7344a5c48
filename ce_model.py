"""Context Encoder networks (Pathak et al., CVPR 2016, Fig. 2, centre-region model) and the checkpoint format.

Generator = encoder (5 strided 4x4 convs, no pooling, paper 3.1) -> 4000-d bottleneck -> decoder (5 up-convs)
mapping a masked 3x128x128 image in [-1, 1] to the 3x64x64 centre through tanh. Discriminator = 4 strided
convs on the 64x64 region, returning one logit per image (paper 3.2, Eq. 2).

    python -c "import ce_model as m; G, D = m.build_models(); print(m.count_params(G), m.count_params(D))"
"""
import os

import torch
import torch.nn as nn


class CheckpointError(Exception):
    """A checkpoint file is missing, truncated, foreign or incompatible (one-line message for the user)."""


def _down(cin, cout, bn, bias):
    """4x4 stride-2 conv halving the resolution; LeakyReLU(0.2) as in DCGAN and official train.lua."""
    layers = [nn.Conv2d(cin, cout, 4, 2, 1, bias=bias)]
    if bn:
        layers.append(nn.BatchNorm2d(cout))
    layers.append(nn.LeakyReLU(0.2, inplace=True))
    return layers


def _up(cin, cout, bias):
    """4x4 stride-2 transposed conv doubling the resolution, BN + ReLU (DCGAN generator)."""
    return [nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=bias), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class Generator(nn.Module):
    """Encoder-decoder of paper Fig. 2: (B, 3, 128, 128) masked image -> (B, 3, 64, 64) predicted centre.

    full_image=True: the model for random block/region masks (official train_random.lua:148-152 with fineSize 128):
    one more up-convolution, so that it predicts the whole (B, 3, 128, 128) image.
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
            nn.Conv2d(8 * w, bottleneck, 4, 1, 0, bias=bias),           # (B, 4000, 1, 1): the bottleneck
            # official train.lua:125-126 normalises the bottleneck; the seed code has LeakyReLU only.
            *([nn.BatchNorm2d(bottleneck)] if bottleneck_bn else []),
            nn.LeakyReLU(0.2, inplace=True),
        )
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(bottleneck, 8 * w, 4, 1, 0, bias=bias),  # (B, 8w, 4, 4)
            nn.BatchNorm2d(8 * w), nn.ReLU(inplace=True),
            *_up(8 * w, 4 * w, bias),                                   # (B, 4w, 8, 8)
            *_up(4 * w, 2 * w, bias),                                   # (B, 2w, 16, 16)
            *_up(2 * w, w, bias),                                       # (B, w, 32, 32)
            *(_up(w, w, bias) if full_image else []),                   # (B, w, 64, 64)   whole-image model
            nn.ConvTranspose2d(w, 3, 4, 2, 1, bias=bias),               # (B, 3, 64, 64) or (B, 3, 128, 128)
            nn.Tanh(),
        )

    def forward(self, x):
        return self.decoder(self.encoder(x))


class Discriminator(nn.Module):
    """Adversarial discriminator of paper 3.2 on the 64x64 region: (B, 3, 64, 64) -> (B,) logits.
    full_image=True: on whole 128x128 images (official train_random.lua:194-198 adds one strided conv).

    DEVIATION: the official code ends in a sigmoid + BCE; this returns logits for BCE-with-logits, the same function
    but numerically safe under bf16 autocast.
    """

    def __init__(self, width=64, bias=False, full_image=False):
        super().__init__()
        w = width
        self.net = nn.Sequential(                                       # (B, 3, 64, 64)
            *_down(3, w, bn=False, bias=bias),                          # (B, w, 32, 32)
            *(_down(w, w, bn=True, bias=bias) if full_image else []),   # whole image: 128 -> 64 -> 32
            *_down(w, 2 * w, bn=True, bias=bias),                       # (B, 2w, 16, 16)
            *_down(2 * w, 4 * w, bn=True, bias=bias),                   # (B, 4w, 8, 8)
            *_down(4 * w, 8 * w, bn=True, bias=bias),                   # (B, 8w, 4, 4)
            nn.Conv2d(8 * w, 1, 4, 1, 0, bias=bias),                    # (B, 1, 1, 1)
        )

    def forward(self, x):
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


def build_models(width=64, bottleneck=4000, bottleneck_bn=True, bias=False, init="dcgan", full_image=False):
    """Build (G, D). Paper/official: bias-free convs, bottleneck BN, DCGAN init; seed: biases, no BN, torch init.
    full_image: the whole-image pair for random block/region masks (centre masks: the 64x64 region pair)."""
    G = Generator(width, bottleneck, bottleneck_bn, bias, full_image)
    D = Discriminator(width, bias, full_image)
    if init == "dcgan":
        dcgan_init(G)
        dcgan_init(D)
    return G, D


def count_params(module):
    return sum(p.numel() for p in module.parameters())


def save_checkpoint(path, state):
    """Write `state` atomically: a temp file in the same folder, flushed to disk, then renamed over `path`.

    A kill at any moment leaves either the previous complete file or the new complete file, never half of one.
    """
    path = os.fspath(path)
    tmp = f"{path}.ce-tmp{os.getpid()}"  # the temp-file pattern of ce_cli.atomic_write
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_checkpoint(path):
    """Load a checkpoint dict on the CPU, or raise CheckpointError saying what is wrong with the file."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file (give OUT/ckpt.pt or OUT/best.pt of a run)")
    try:
        # weights_only: a checkpoint holds tensors and plain types only, so nothing in it can run code.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad file; all mean the same to the user
        why = "holds Python objects besides tensors" if "weights_only" in str(e) else str(e).splitlines()[0][:100]
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {why}); "
                              "it may be truncated or not written by ce_train.py") from None
    if not isinstance(state, dict) or not {"G", "D", "args"} <= set(state):
        raise CheckpointError(f"{path}: not a ce_train.py checkpoint (expected keys G, D, args)")
    state["path"] = path
    return state


def load_checkpoint(path, device="cpu"):
    """Rebuild (G, D, state) from a checkpoint alone, using the architecture flags saved in it."""
    state = read_checkpoint(path)
    a = state["args"]
    G, D = build_models(**{k: a[k] for k in ARCH_KEYS}, init="none", full_image=a.get("mask", "center") != "center")
    try:
        G.load_state_dict(state["G"])
        D.load_state_dict(state["D"])
    except RuntimeError as e:
        raise CheckpointError(f"{state['path']}: weights do not match the saved flags ({str(e).splitlines()[0]})") from None
    return G.to(device), D.to(device), state
