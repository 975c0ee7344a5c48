"""What the paper and the published tables fix, each checked against numbers worked out here: the
metrics of Table 1, the labels of Eq. (2), the generator's tanh range, the official horizontal
flip, and AlexNet's layer table (Krizhevsky et al. 2012) under the encoder of paper 5.2."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import ce_data
import ce_eval
import ce_losses
import ce_model


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: tiny tensors, one thread

# ------------------------------------------------------------------------------------------------
# Metrics (paper 5.1, Table 1): on [0, 1] intensities, PSNR = 10 log10(1 / MSE), per image


def test_metrics_by_hand_on_unit_intensities():
    """Two 3x2x2 images, the top row counted. Intensities u in [0, 1] are stored as 2u - 1.
    Image 0: every counted pixel off by 0.1 -> MSE 0.01, PSNR 20 dB, L1 10 %, L2 1 %.
    Image 1: off by +0.2 and -0.4 -> MSE 0.1, PSNR 10 dB, L1 30 %, L2 10 %.
    The bottom row is off by a lot and must not count. On [-1, 1] values instead, the errors
    would double: PSNR 20 log10(1/0.2) = 14.0 dB and 7.0 dB, L1 20 % and 60 %."""
    true_u = torch.full((2, 3, 2, 2), 0.5)
    pred_u = true_u.clone()
    pred_u[0, :, 0, :] = 0.6
    pred_u[1, :, 0, 0], pred_u[1, :, 0, 1] = 0.7, 0.1
    pred_u[:, :, 1, :] = 1.0                                   # outside the mask
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]]).view(1, 1, 2, 2)
    r = ce_eval.image_metrics(2 * pred_u - 1, 2 * true_u - 1, mask)
    assert r["psnr"].tolist() == pytest.approx([20.0, 10.0], rel=1e-5)
    assert r["l1"].tolist() == pytest.approx([10.0, 30.0], rel=1e-5)
    assert r["l2"].tolist() == pytest.approx([1.0, 10.0], rel=1e-5)
    # a per-image mask (B, 1, H, W) works the same; values past [-1, 1] count as 0 or 1
    per_image = mask.expand(2, 1, 2, 2)
    far = (2 * pred_u - 1) * torch.tensor([10.0, 1.0]).view(2, 1, 1, 1)  # image 0: 0.2 -> 2.0
    r = ce_eval.image_metrics(far, 2 * true_u - 1, per_image)
    assert r["l1"].tolist() == pytest.approx([50.0, 30.0], rel=1e-5)      # 2.0 is intensity 1.0
    assert r["psnr"][0].item() == pytest.approx(10 * math.log10(1 / 0.25), rel=1e-5)


def test_psnr_is_10_log10_of_one_over_mse():
    """MSE 1e-3 on [0, 1] is 30 dB (20 log10(255 / ...) or a 255 constant would not give it)."""
    true = torch.zeros(1, 3, 4, 4)                                 # intensity 0.5
    pred = true + 2 * math.sqrt(1e-3)                              # intensity 0.5 + sqrt(1e-3)
    r = ce_eval.image_metrics(pred, true, torch.ones(1, 1, 4, 4))
    assert r["psnr"].item() == pytest.approx(30.0, abs=1e-3)
    assert r["l2"].item() == pytest.approx(0.1, rel=1e-4)
    assert r["l1"].item() == pytest.approx(100 * math.sqrt(1e-3), rel=1e-4)


# ------------------------------------------------------------------------------------------------
# The labels of Eq. (2), with different logits for real and fake so that a swap shows


def softplus(x):
    return math.log1p(math.exp(x))


def test_discriminator_labels_real_one_fake_zero():
    """BCE(D(y), 1) + BCE(D(G(x)), 0): -log sigmoid(l) = softplus(-l) for the real side and
    -log(1 - sigmoid(l)) = softplus(l) for the fake. Real logits 2, 0.5; fake -1, 1.5."""
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-1.0, 1.5])
    want = (softplus(-2.0) + softplus(-0.5)) / 2 + (softplus(-1.0) + softplus(1.5)) / 2
    swapped = (softplus(2.0) + softplus(0.5)) / 2 + (softplus(1.0) + softplus(-1.5)) / 2
    assert abs(want - swapped) > 1
    assert ce_losses.discriminator_loss(real, fake).item() == pytest.approx(want, rel=1e-6)
    assert ce_losses.discriminator_loss(real, fake, "mean").item() == pytest.approx(want / 2,
                                                                                    rel=1e-6)
    # training D raises its real logits and lowers its fake ones
    real.requires_grad_(True), fake.requires_grad_(True)
    ce_losses.discriminator_loss(real, fake).backward()
    assert (real.grad < 0).all() and (fake.grad > 0).all()


def test_generator_adversarial_label_is_real():
    """The generator's side (non-saturating): BCE(D(G(x)), 1) = softplus(-l); G pushes l up."""
    fake = torch.tensor([-1.0, 1.5], requires_grad=True)
    loss = ce_losses.generator_adversarial_loss(fake)
    assert loss.item() == pytest.approx((softplus(1.0) + softplus(-1.5)) / 2, rel=1e-6)
    loss.backward()
    assert (fake.grad < 0).all()


# ------------------------------------------------------------------------------------------------
# The generator's output: tanh, values in [-1, 1] (the range of the images and of ce_data.unit)


def generators():
    torch.manual_seed(0)
    return {"centre": ce_model.build_models(width=8, bottleneck=16)[0],
            "whole image": ce_model.build_models(width=8, bottleneck=16, full_image=True)[0]}


@pytest.mark.parametrize("name", ["centre", "whole image"])
def test_generator_ends_in_tanh_and_saturates_at_plus_minus_one(name):
    """The last module is tanh itself (G(x) = tanh of what comes before it); huge pre-activations
    give exactly -1 and 1, never beyond (the existing model test only asserts |G(x)| <= 1).
    Train mode: BatchNorm keeps the activations O(1) from a DCGAN init."""
    G = generators()[name].train()
    last = G.decoder[-1]
    assert isinstance(last, nn.Tanh)
    x = torch.rand(2, 3, 128, 128) * 2 - 1
    with torch.no_grad():
        y = G(x)
        pre = G.decoder[:-1](G.encoder(x))
        assert torch.equal(y, torch.tanh(pre))          # tanh itself, not a clamp or a sigmoid
        assert y.abs().max() <= 1 and y.min() < 0 < y.max()
        G.decoder[-2].weight.mul_(1e4)                  # huge pre-activations
        y = G(x)
    assert y.min() == -1 and y.max() == 1 and y.abs().max() <= 1
    assert (y.abs() == 1).float().mean() > 0.5


def test_alexnet_generator_output_is_tanh_resized_bilinearly():
    """Fig. 9b: five up-convolutions, the last through tanh, then the resize to 227 (bilinear, a
    documented choice that cannot leave [-1, 1])."""
    G = ce_model.build_alexnet(width=0.125).train()
    assert isinstance(G.decoder[-2], nn.Tanh) and isinstance(G.decoder[-1], nn.Upsample)
    with torch.no_grad():
        G.decoder[-3].weight.mul_(1e4)
        y = G(torch.rand(2, 3, 227, 227) * 2 - 1)
    assert y.shape == (2, 3, 227, 227) and y.abs().max() <= 1 and y.min() == -1 and y.max() == 1


# ------------------------------------------------------------------------------------------------
# Augmentation (official donkey_folder.lua): a horizontal flip with probability 1/2


def as_u8(x):
    """(B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3), the stored pixels."""
    return ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)


def images(n, size, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def flips(b, step):
    """Which images of batch `step` are mirrored left-right; fails on anything else."""
    out, src = as_u8(b.get(step)), torch.from_numpy(b.images.numpy())[b.indices(step)]
    same = [torch.equal(o, s) for o, s in zip(out, src)]
    mirrored = [torch.equal(o, s.flip(1)) for o, s in zip(out, src)]   # (H, W, 3): W is dim 1
    assert all(a != m for a, m in zip(same, mirrored)), "each image: as stored or mirrored"
    return torch.tensor(mirrored)


def test_flip_is_horizontal_at_rate_one_half_and_repeats_per_seed_and_step():
    imgs = images(16, 8)
    drawn = []
    for seed in range(10):
        b = ce_data.Batches(imgs, 8, "cpu", seed=seed, flip=True, crop=8)
        drawn += [flips(b, step) for step in range(10)]
    rate = torch.cat(drawn).float().mean().item()
    assert 0.4 < rate < 0.6, rate          # 800 draws: 1/2 +- 0.018 (one sd)
    # a resumed run (a fresh object at step 7) flips the same images as the run that got there
    run = ce_data.Batches(imgs, 8, "cpu", seed=3, flip=True, crop=8)
    seen = [flips(run, step) for step in range(8)]
    resumed = ce_data.Batches(imgs, 8, "cpu", seed=3, flip=True, crop=8)
    assert torch.equal(flips(resumed, 7), seen[7])
    assert torch.equal(resumed.get(7), run.get(7))
    off = ce_data.Batches(imgs, 8, "cpu", seed=3, flip=False, crop=8)
    assert not any(flips(off, step).any() for step in range(4))


def test_crop_with_flips_on_is_a_window_of_the_image_or_of_its_mirror():
    """--load-size above 128: a random crop, then the flip (the existing batch test checks crops
    with flips off only)."""
    imgs = images(8, 12, seed=1)
    b = ce_data.Batches(imgs, 8, "cpu", seed=5, flip=True, crop=8)
    kinds = []
    for step in range(3):
        out, src = as_u8(b.get(step)), torch.from_numpy(imgs)[b.indices(step)]
        for o, s in zip(out, src):
            windows = [(flip, i, j) for flip in (False, True) for i in range(5) for j in range(5)
                       if torch.equal((s.flip(1) if flip else s)[i:i + 8, j:j + 8], o)]
            assert len(windows) == 1, "a window of the image or of its left-right mirror"
            kinds.append(windows[0][0])
    assert 0 < sum(kinds) < len(kinds)              # both happen


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_flips_and_crops_are_the_same_on_a_gpu():
    imgs = images(16, 12, seed=2)
    for step in range(4):
        cpu = ce_data.Batches(imgs, 8, "cpu", seed=4, flip=True, crop=8).get(step)
        gpu = ce_data.Batches(imgs, 8, "cuda", seed=4, flip=True, crop=8).get(step)
        assert torch.equal(cpu, gpu.cpu())


# ------------------------------------------------------------------------------------------------
# AlexNet (Krizhevsky et al. 2012, 227x227 input) under the encoder of paper 5.2


# conv: (in, out, kernel, stride, padding); DEVIATIONs documented in ce_model.AlexNetEncoder and
# not asserted against: one tower (no groups), no LRN, BatchNorm after conv2-conv5.
ALEXNET_CONVS = [(3, 96, 11, 4, 0), (96, 256, 5, 1, 2), (256, 384, 3, 1, 1),
                 (384, 384, 3, 1, 1), (384, 256, 3, 1, 1)]
ALEXNET_ORDER = "C P C P C C C P"          # max-pooling 3x3 stride 2 after conv1, conv2, conv5
ALEXNET_SIZES = [55, 27, 27, 13, 13, 13, 13, 6]


def test_alexnet_encoder_layer_table():
    enc = ce_model.AlexNetEncoder(1.0)
    layers = [m for m in enc if isinstance(m, (nn.Conv2d, nn.MaxPool2d))]
    assert " ".join("C" if isinstance(m, nn.Conv2d) else "P" for m in layers) == ALEXNET_ORDER
    convs = [m for m in layers if isinstance(m, nn.Conv2d)]
    got = [(c.in_channels, c.out_channels, *c.kernel_size, *c.stride, *c.padding) for c in convs]
    assert got == [(i, o, k, k, s, s, p, p) for i, o, k, s, p in ALEXNET_CONVS]
    assert all(c.dilation == (1, 1) and c.groups == 1 for c in convs)
    for pool in (m for m in layers if isinstance(m, nn.MaxPool2d)):
        assert (pool.kernel_size, pool.stride, pool.padding, pool.dilation) == (3, 2, 0, 1)
        assert not pool.ceil_mode
    # every conv is followed (after its BatchNorm, if any) by a ReLU before the next conv or pool
    kinds = [type(m) for m in enc]
    for i, k in enumerate(kinds):
        if k is nn.Conv2d:
            after = kinds[i + 1:i + 3]
            assert nn.ReLU in after, f"conv at {i}: {after}"
    # the sizes of the published table follow from these numbers, on 227 px
    side, sizes = 227, []
    for m in layers:
        k, s, p = (m.kernel_size[0], m.stride[0], m.padding[0]) if isinstance(m, nn.Conv2d) else (
            m.kernel_size, m.stride, m.padding)
        side = (side + 2 * p - k) // s + 1
        sizes.append(side)
    assert sizes == ALEXNET_SIZES
    assert enc.out_channels == 256
