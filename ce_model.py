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
        if x.shape[-1] not in (64, 128):   # the AlexNet model's 227 px images (only with --lam-adv > 0)
            x = nn.functional.interpolate(x, size=(128, 128), mode="bilinear", align_corners=False, antialias=True)
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


# ----------------------------------------------------------------------------------------------------------------
# Feature learning (paper 3.1 channel-wise fully connected layer; 5.2 and Fig. 9b, the AlexNet context encoder),
# and the encoder layers ("taps") that a linear probe reads (ce_probe.py).

class ChannelwiseFC(nn.Module):
    """Paper 3.1: m maps of n x n -> m maps of n x n, output map g fully connected to input map g only (m*n^4
    weights instead of m^2*n^4), then a stride-1 convolution that propagates information across channels.

    The FC part is one grouped convolution (maintainer's recipe, official repo issue #18): kernel n = the whole map,
    m*n^2 outputs, m groups; output channel g*n^2 + k is position k of map g, so a reshape gives (B, m, n, n).
    Bias: one per output unit (m*n^2), as Caffe's convolution has by default: 331,776 + 9,216 = 340,992 parameters
    for 256 x 6 x 6 (bias=False gives the paper's 331,776). Order: FC -> ReLU -> dropout -> mixing conv -> ReLU,
    the fc6 -> relu6 -> drop6 order of AlexNet (dropout on the FC's output, paper 5.2: 0.5 on this layer).
    """

    def __init__(self, channels, size, dropout=0.0, mix_kernel=1, bias=True):
        super().__init__()
        self.channels, self.size = channels, size
        self.fc = nn.Conv2d(channels, channels * size * size, size, groups=channels, bias=bias)
        self.drop = nn.Dropout(dropout)
        # DEVIATION (choice; the paper gives no kernel, width or activation): a 1x1 convolution, m -> m channels.
        # The paper's stated purpose is to mix channels; positions are already mixed within each map by the FC,
        # and 1x1 keeps the two jobs apart (FC: positions, 1x1: channels, together a factorised full FC) with
        # m^2 weights (65,536) instead of 9 m^2 (589,824, more than the FC) for 3x3. mix_kernel=3 is the
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
    """AlexNet conv1-conv5 + pool5 (paper 5.2: the feature encoder, randomly initialised, trained from scratch):
    (B, 3, 227, 227) -> (B, 256, 6, 6); channels 96-256-384-384-256 times `width`.

    DEVIATION (choice; no source gives LRN, groups or normalisation): no LRN and no two-tower groups (the
    one-tower AlexNet); BatchNorm after conv2-conv5 instead of LRN (not after conv1, as in the DCGAN encoders of
    this file), which lets it train from scratch with Adam; a conv followed by BN has no bias (BN has one).
    """

    def __init__(self, width=1.0):
        c1, c2, c3, c4, c5 = (_scaled(c, width) for c in (96, 256, 384, 384, 256))
        relu = lambda: nn.ReLU(inplace=True)
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
    DEVIATION (choice): BN + ReLU after each (as the DCGAN decoder of Fig. 2); the last has a bias and tanh."""
    if last:
        return [nn.ConvTranspose2d(cin, cout, 5, 2, 2), nn.Tanh()]
    return [nn.ConvTranspose2d(cin, cout, 5, 2, 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class AlexNetGenerator(nn.Module):
    """Feature-learning context encoder of paper 5.2 / Fig. 9b: (B, 3, 227, 227) image with a hole ->
    AlexNet encoder (B, 256, 6, 6) -> channel-wise FC -> five up-convolutions (B, 3, 161, 161) -> resize ->
    (B, 3, 227, 227), the whole image (the loss and the paste take the hole from it)."""

    def __init__(self, width=1.0, dropout=0.5):
        super().__init__()
        self.encoder = AlexNetEncoder(width)
        c = self.encoder.out_channels
        d1, d2, d3, d4 = (_scaled(k, width) for k in (128, 64, 64, 32))
        self.fc = ChannelwiseFC(c, 6, dropout)
        self.decoder = nn.Sequential(
            *_up5(c, d1), *_up5(d1, d2), *_up5(d2, d3), *_up5(d3, d4),   # 11, 21, 41, 81
            *_up5(d4, 3, last=True),                                      # (B, 3, 161, 161) in [-1, 1]
            # DEVIATION (choice; the paper only says "resize"): bilinear, which unlike bicubic cannot overshoot
            # tanh's [-1, 1]. The L2 loss is taken at 227, on the image the user sees.
            nn.Upsample(size=(227, 227), mode="bilinear", align_corners=False),
        )

    def forward(self, x):
        return self.decoder(self.fc(self.encoder(x)))


# The checkpoint `args` keys that rebuild a generator: "arch" ("dcgan" when absent: checkpoints written before
# the AlexNet model), ARCH_KEYS for dcgan, ALEXNET_KEYS for alexnet (alexnet_width: the channel multiplier,
# 1.0 = paper; cfc_dropout: dropout of the channel-wise FC, no effect on the weights).
ALEXNET_KEYS = ("alexnet_width", "cfc_dropout")
INPUT_SIZE = {"dcgan": 128, "alexnet": 227}


def build_alexnet(width=1.0, dropout=0.5, init="dcgan"):
    """The AlexNet context encoder G (no pretrained weights anywhere). init="dcgan": N(0, 0.02) convs, BN weight
    N(1, 0.02), zero biases, as the DCGAN model here (DEVIATION, choice: the paper gives no init); "torch": PyTorch
    defaults. Torch's global RNG decides the weights: torch.manual_seed(s) first gives the same G every time."""
    G = AlexNetGenerator(width, dropout)
    if init == "dcgan":
        dcgan_init(G)
    return G


def build_pair(a, init=None):
    """(G, D) from a run's flags (a checkpoint's args dict): either arch, the centre or the whole-image model.
    init=None: the run's own init (a["init"]); "none" skips initialisation (weights about to be loaded).
    torch.manual_seed(a["seed"]) + this is the pair a ce_train.py run started from (the same calls, same order).
    AlexNet G is L2-only in the paper; its D (used only with --lam-adv > 0) is the whole-image DCGAN discriminator,
    which resizes the 227 px images to 128 (DEVIATION, choice: the paper trained no D for it)."""
    init = init or a.get("init", "dcgan")
    arch = a.get("arch", "dcgan")
    if arch == "alexnet":
        G = build_alexnet(a.get("alexnet_width", 1.0), a.get("cfc_dropout", 0.5), init)
        D = Discriminator(a.get("width", 64), a.get("bias", False), full_image=True)
        if init == "dcgan":
            dcgan_init(D)
        return G, D
    if arch != "dcgan":
        raise CheckpointError(f"unknown arch {arch!r} in the checkpoint's args (expected dcgan or alexnet)")
    return build_models(**{k: a[k] for k in ARCH_KEYS}, init=init, full_image=a.get("mask", "center") != "center")


def build_generator(a, init=None):
    """G alone, as build_pair builds it (the random-init baseline of ce_probe.py)."""
    return build_pair(a, init)[0]


def encoder_taps(G):
    """The layers a linear probe reads, as [(name, index into G.encoder)]: the output of module `index` (after
    its activation). AlexNet: conv1-conv5 after their ReLU, and pool5. DCGAN (Fig. 2): each of the 5 conv blocks
    after its LeakyReLU, and the bottleneck after its LeakyReLU."""
    if isinstance(G, AlexNetGenerator):
        idx = [i for i, m in enumerate(G.encoder) if isinstance(m, nn.ReLU)]
        return [(f"conv{k + 1}", i) for k, i in enumerate(idx)] + [("pool5", len(G.encoder) - 1)]
    idx = [i for i, m in enumerate(G.encoder) if isinstance(m, nn.LeakyReLU)]
    return [(f"conv{k + 1}", i) for k, i in enumerate(idx[:-1])] + [("bottleneck", idx[-1])]


def save_checkpoint(path, state):
    """Write `state` atomically: a temp file in the same folder, flushed to disk, then renamed over `path`.

    A kill at any moment leaves either the previous complete file or the new complete file, never half of one.
    The file is stamped with FORMAT. Nothing is written for a state holding a NaN/Inf tensor (CheckpointError), and
    a failed write (a full disk) is a CheckpointError naming the file; the previous file is left intact either way.
    """
    path = os.fspath(path)
    bad = first_nonfinite(state)
    if bad:
        raise CheckpointError(f"{path}: not written: {bad} holds NaN/Inf")
    tmp = f"{path}.ce-tmp{os.getpid()}"  # the temp-file pattern of ce_cli.atomic_write
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch's serializer turns a failed write into a RuntimeError
        cause = e if isinstance(e, OSError) else (e.__context__ or e)
        why = cause.strerror if getattr(cause, "strerror", None) else str(cause).splitlines()[0][:120]
        raise CheckpointError(f"{path}: could not be written ({why}); the previous {os.path.basename(path)}, if "
                              "any, is intact") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_checkpoint(path, resume=False):
    """Load a checkpoint dict on the CPU, checked by check_checkpoint for evaluation (or, with `resume`, for a
    resumed run), or raise CheckpointError saying what is wrong with the file."""
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
    state = check_checkpoint(state, path, resume)
    state["path"] = path
    return state


def load_checkpoint(path, device="cpu"):
    """Rebuild (G, D, state) from a checkpoint alone, using the architecture flags saved in it."""
    state = read_checkpoint(path)
    a = state["args"]
    G, D = build_pair(a, init="none")
    load_weights({"G": G, "D": D}, state)
    return G.to(device), D.to(device), state


def load_weights(modules, state):
    """Load state[k] into each module or optimiser of {k: m}; a mismatch (a missing, extra or reshaped tensor) is
    a CheckpointError naming the file and the part."""
    for k, m in modules.items():
        try:
            m.load_state_dict(state[k])
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
            why = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise CheckpointError(f"{state['path']}: {k} does not fit the network of the checkpoint's own flags "
                                  f"({why})") from None


# ----------------------------------------------------------------------------------------------------------------
# The checkpoint format: what a file holds, checked in one place (check_checkpoint) whenever one is read

# 1: files written before the format had a number (no "format" key); 2: the "format" key, the schema checked on
# load. Every flag below has been saved since the first version (git log -S on each flag), so a file of either
# format that lacks one is damaged or foreign, not old: it is refused. Only the open log window, added to format 1
# late, is filled in.
FORMAT = 2
# The flags that rebuild the networks and their input (the mask), with their types: enough to evaluate or inpaint.
EVAL_ARGS = {"width": int, "bottleneck": int, "bottleneck_bn": bool, "bias": bool, "overlap": int, "ring": str,
             "fill": str, "load_size": int, "data": str, "data_root": str, "mask": str, "arch": str,
             "alexnet_width": float}
# The other flags of ce_train.py that a resumed run takes over (tests/test_checkpoint_compat.py keeps this list
# complete: a new training flag needs a line here and, for older files, a default in FILLED).
RESUME_ARGS = {"variant": str, "shapes_n": int, "flip": bool, "batch_size": int, "epochs": int, "steps": int,
               "lr_g": float, "lr_d": float, "beta1": float, "beta2": float, "lam_rec": float, "lam_adv": float,
               "overlap_weight": float, "rec_reduction": str, "d_reduction": str, "init": str, "seed": int,
               "log_every": int, "eval_every": int, "eval_images": int, "mask_per_batch": bool, "rec_loss": str,
               "cfc_dropout": float}
CHOICES = {"ring": ("visible", "hidden"), "fill": ("mean", "zero"), "rec_reduction": ("all", "split"),
           "d_reduction": ("sum", "mean"), "init": ("dcgan", "torch"), "variant": ("paper", "official", "seed"),
           "mask": ("center", "block", "region"), "rec_loss": ("hole", "image"), "arch": ("dcgan", "alexnet")}
# Flags added with random masks and the AlexNet model: a file without them was written before they existed, when
# the only behaviour was this one, so they are filled in (for any format).
NEW_FLAGS = {"mask": "center", "mask_per_batch": False, "rec_loss": "hole", "arch": "dcgan", "alexnet_width": 1.0,
             "cfc_dropout": 0.5}
# Keys an older file may lack, with the value its version certainly had: {key: (newest format lacking it, value)}.
FILLED = {"log_window": (1, None)}   # None: an empty window; the first log line after resuming averages fewer steps


def check_checkpoint(state, path, resume=False):
    """The one check of a checkpoint's layout. Always: G and D as dicts of tensors and the flags that rebuild them
    (ARCH_KEYS); the other EVAL_ARGS flags are checked if present, and one that is absent raises a CheckpointError
    naming it when it is first asked for (state["args"] is a _Flags), so that a weights-only file still loads.
    With `resume`: everything a resumed run needs (every flag, optimisers, step, RNG). What an older format
    certainly held is filled in (state["note"] says so); anything else missing or malformed is refused with a
    CheckpointError naming it, and so is a NaN/Inf weight."""
    def refuse(what):
        raise CheckpointError(f"{path}: {what}")

    if not isinstance(state, dict):
        refuse("not a ce_train.py checkpoint (it holds no dict of named parts)")
    fmt = state.get("format", 1)
    if type(fmt) is not int or not 1 <= fmt <= FORMAT:
        refuse(f"checkpoint format {fmt!r}; this code reads formats 1 to {FORMAT} (written by a newer version?)")
    if isinstance(state.get("args"), dict):
        state["args"] = {**NEW_FLAGS, **state["args"]}
    _check_part(state, ("G", "D"), EVAL_ARGS, ARCH_KEYS + (tuple(EVAL_ARGS) if resume else ()), refuse)
    if resume:
        _check_resume(state, lambda what: refuse(f"cannot resume from it: {what} (evaluating it still works: "
                                                 f"ce_eval.py --ckpt {path})"))
        filled = [k for k, (newest, value) in FILLED.items() if fmt <= newest and k not in state]
        for k in filled:
            state[k] = FILLED[k][1]
        if filled:  # the caller prints it (ce_model.py prints nothing)
            state["note"] = (f"note: {path} is a format-{fmt} checkpoint without {', '.join(filled)}; resuming with "
                             "an empty log window (the first log line after it averages fewer steps)")
    bad = first_nonfinite({k: state[k] for k in ("G", "D", "optG", "optD") if k in state})
    if bad:
        refuse(f"{bad} holds NaN/Inf (saved after a diverging update by an older version); use an earlier "
               "checkpoint")
    state["args"] = _Flags(state["args"], path)
    return state


class _Flags(dict):
    """A checkpoint's flags (args): asking for an absent one raises a CheckpointError naming it and the file (one
    line for the user, not a KeyError traceback). Only for reading: torch.save it as a plain dict."""

    def __init__(self, flags, path):
        super().__init__(flags)
        self.path = path

    def __missing__(self, k):
        raise CheckpointError(f"{self.path}: its flags (args) lack {k}, which this needs; it was not written by "
                              "ce_train.py, or by a version without that flag")


def _check_part(state, weights, flags, required, refuse):
    """`weights`: dicts of named tensors. state["args"]: a dict holding the `required` flags; each flag k of
    `flags` that it holds is of type flags[k] and one of CHOICES[k]."""
    for k in weights:
        w = state.get(k)
        if w is None:
            refuse(f"not a ce_train.py checkpoint: '{k}' is missing")
        if not isinstance(w, dict) or not all(isinstance(n, str) and isinstance(t, torch.Tensor) for n, t in w.items()):
            refuse(f"'{k}' is not a dict of named tensors")
    a = state.get("args")
    if not isinstance(a, dict):
        refuse("'args' (the run's flags) is missing or not a dict")
    missing = [k for k in required if k not in a]
    if missing:
        refuse(f"its flags (args) lack {', '.join(missing)}")
    for k, typ in flags.items():
        v = a.get(k)
        ok = (isinstance(v, (int, float)) and not isinstance(v, bool)) if typ is float else type(v) is typ
        if k in a and (not ok or v not in CHOICES.get(k, (v,))):
            refuse(f"flag {k} is {v!r}, not a valid value")


def _check_resume(state, refuse):
    """What a resumed run needs besides the weights: optimiser states, step, RNG state, best PSNR, every flag."""
    for k in ("optG", "optD"):
        o = state.get(k)
        if not isinstance(o, dict) or not {"state", "param_groups"} <= set(o):
            refuse(f"'{k}' (the optimiser state) is {'missing' if o is None else 'malformed'}")
    _check_part(state, (), RESUME_ARGS, tuple(RESUME_ARGS), refuse)
    if type(state.get("step")) is not int or state["step"] < 0:
        refuse(f"'step' is {'missing' if 'step' not in state else repr(state['step'])}")
    rng = state.get("rng")
    if not isinstance(rng, dict) or not isinstance(rng.get("torch"), torch.Tensor) or rng["torch"].dtype != torch.uint8:
        refuse(f"'rng' (the random number state) is {'missing' if rng is None else 'malformed'}")
    best = state.get("best_psnr")
    if isinstance(best, bool) or not isinstance(best, (int, float)):
        refuse(f"'best_psnr' is {'missing' if best is None else repr(best)}")
    window = state.get("log_window")
    if window is not None and not (isinstance(window, dict) and isinstance(window.get("acc"), torch.Tensor)
                                   and type(window.get("n_acc")) is int and type(window.get("d_wins")) is int):
        refuse("'log_window' is malformed")


def first_nonfinite(state, name=""):
    """The name of the first floating-point tensor in `state` (nested dicts, lists) holding NaN or Inf, or None."""
    if isinstance(state, torch.Tensor):
        return name if state.is_floating_point() and not bool(torch.isfinite(state).all()) else None
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, (list, tuple)) else ()
    for k, v in items:
        bad = first_nonfinite(v, f"{name}.{k}" if name else str(k))
        if bad:
            return bad
    return None
