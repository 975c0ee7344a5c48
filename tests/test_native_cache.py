"""Images smaller than the load size are cached at their own size and upsampled per batch (issue
26, item 4), with the same pixels as the old cache of Pillow-resized images; killed builds' temp
files of any size are cleaned up (issue 25)."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import ce_data
from ce_utils import accel, cli, datasets, diskcache
from ce_utils.imagefiles import decode_image


def smooth_and_noisy(n, side, seed=0):
    """n uint8 images (n, side, side, 3): half smooth gradients, half uniform noise (the noise
    drives bicubic's overshoot into the clipping on every pass)."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, side)
    smooth = [np.stack([np.add.outer(ramp, ramp) / 2, np.outer(ramp, ramp) / 255,
                        np.broadcast_to(ramp, (side, side))], -1).astype(np.uint8)] * (n // 2)
    noise = [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(n - n // 2)]
    return np.stack(smooth + noise)


def write_images(folder, images, ext="jpg"):
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, im in enumerate(images):
        paths.append(os.path.join(folder, f"{i:03d}.{ext}"))
        Image.fromarray(im).save(paths[-1])
    return paths


@pytest.mark.parametrize("side,size", [(64, 128), (64, 227), (13, 40), (30, 31)])
def test_upsample_is_pillows_bicubic_resize_bit_for_bit(side, size):
    """Rule: ce_data.upsample(x, size) == Pillow's Image.resize((size, size), BICUBIC) of each
    image, the resize the old cache stored (imagefiles.decode_image)."""
    x = smooth_and_noisy(4, side)
    want = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC))
                     for im in x])
    got = ce_data.upsample(torch.from_numpy(x), size)
    assert got.dtype == torch.uint8 and got.shape == (4, size, size, 3)
    assert np.array_equal(got.numpy(), want)


def test_small_images_are_cached_at_their_own_size_and_batches_are_unchanged(tmp_path):
    """Rule: 64 px images at load size 128 are stored (N, 64, 64, 3) (a quarter of the bytes on
    disk), and the training batches and held-out tensors made from them equal those made from
    the old cache, the images decoded and resized at the load size (decode_image(f, 128))."""
    files = write_images(str(tmp_path / "d"), smooth_and_noisy(8, 64))
    arr, meta = datasets.cached_images(files, 128, str(tmp_path / "d" / ".ce_cache"), "t",
                                       str(tmp_path / "d"), workers=1)
    assert arr.shape == (8, 64, 64, 3) and meta["side"] == 64 and meta["size"] == 128
    npy = tmp_path / "d" / ".ce_cache" / os.path.basename(arr.filename)
    assert npy.stat().st_size == arr.offset + 8 * 64 * 64 * 3
    for load, crop in ((128, 128), (160, 128)):        # 160: random crops of the upsampled image
        old = np.stack([decode_image(f, load)[0] for f in files])    # what the cache held before
        assert old.shape == (8, load, load, 3)
        old_b = ce_data.Batches(old, 4, "cpu", seed=3, crop=crop, load_size=load)
        # resident, upsampled per batch or once when placed (a GPU's default), and streamed
        for resident, once in ((True, False), (True, True), (False, False)):
            new_b = accel.make_batches(arr, 4, "cpu", 3, crop=crop, load_size=load,
                                       resident=resident, upsample_once=once)
            assert new_b.images.shape[1] == (load if once else 64)
            for step in (0, 1, 2):
                assert torch.equal(new_b.get(step), old_b.get(step))
        assert torch.equal(ce_data.eval_batch(arr, crop, load), ce_data.eval_batch(old, crop))


def test_images_of_several_sizes_are_cached_at_the_load_size(tmp_path):
    """Rule: one image size per cache file: a split whose images are not all one square size
    below the load size is stored as before, every image resized at decode."""
    folder = str(tmp_path / "m")
    files = write_images(folder, smooth_and_noisy(3, 64), "png")
    Image.fromarray(smooth_and_noisy(2, 90)[1][:70]).save(os.path.join(folder, "zz.png"))
    files.append(os.path.join(folder, "zz.png"))                # 90x70: another size
    arr, meta = datasets.cached_images(files, 128, os.path.join(folder, ".ce_cache"), "m",
                                       folder, workers=1)
    assert arr.shape == (4, 128, 128, 3) and meta["side"] == 128
    assert np.array_equal(arr, np.stack([decode_image(f, 128)[0] for f in files]))


def test_a_cache_of_the_old_layout_is_never_read(tmp_path, monkeypatch):
    """Rule: a cache written before images were kept at their own size (CACHE_VERSION 2: the
    same files, upsampled at decode) is not reused under the new key: the split is decoded again
    at its own size, and the old file is removed."""
    folder = str(tmp_path / "o")
    files = write_images(folder, smooth_and_noisy(4, 64), "png")
    cache = os.path.join(folder, ".ce_cache")
    with monkeypatch.context() as m:                        # the old code: v2, stored at 128 px
        m.setattr(diskcache, "CACHE_VERSION", 2)
        m.setattr(datasets, "_own_side", lambda files, size: size)
        old, _ = datasets.cached_images(files, 128, cache, "o", folder, workers=1)
    assert old.shape == (4, 128, 128, 3)
    old_name = os.path.basename(old.filename)
    del old
    arr, meta = datasets.cached_images(files, 128, cache, "o", folder, workers=1)
    assert arr.shape == (4, 64, 64, 3) and meta["version"] == diskcache.CACHE_VERSION != 2
    assert os.path.basename(arr.filename) != old_name
    assert not os.path.exists(os.path.join(cache, old_name))


def dead_pid():
    """The id of a process that has ended."""
    p = subprocess.Popen([sys.executable, "-c", ""])
    p.wait()
    return p.pid


@pytest.mark.parametrize("kind", ["folder", "shapes"])
def test_killed_builds_temps_of_any_size_go_live_ones_stay(tmp_path, kind):
    """Rule: a build removes the temp files that killed builds of the same split left at any
    load size (their process is gone), and keeps those of a live process."""
    folder = str(tmp_path / "k")
    files = write_images(folder, smooth_and_noisy(2, 64), "png")
    cache = os.path.join(folder, ".ce_cache")
    os.makedirs(cache)
    stem = "k-" if kind == "folder" else "shapes-val-"
    dead = os.path.join(cache, f"{stem}227-0123456789abcdef.npy{cli.TMP_SUFFIX}{dead_pid()}")
    live = os.path.join(cache, f"{stem}350-0123456789abcdef.npy{cli.TMP_SUFFIX}{os.getppid()}")
    other = os.path.join(cache, f"elsewhere-227-0.npy{cli.TMP_SUFFIX}{dead_pid()}")
    for p in (dead, live, other):
        with open(p, "wb") as f:
            f.write(b"half a cache")
    if kind == "folder":
        datasets.cached_images(files, 128, cache, "k", folder, workers=1)
    else:
        datasets._shapes_split(folder, "val", 32, 4)
    assert not os.path.exists(dead)
    assert os.path.exists(live) and os.path.exists(other)    # alive; not this split's
