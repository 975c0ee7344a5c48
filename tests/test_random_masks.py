"""Random block and random region masks (paper 3.3, official train_random.lua), the whole-image
networks and the losses for arbitrary holes."""
import math

import pytest
import torch
import torch.nn.functional as F

import ce_data
import ce_losses
import ce_masks
import ce_model
from ce_utils import baselines, checkpoints


@pytest.fixture(scope="module")
def region_1000():
    return ce_masks.random_masks("region", 1000, (0, "test-region"))


@pytest.fixture(scope="module")
def block_1000():
    return ce_masks.random_masks("block", 1000, (0, "test-block"))


def test_region_masks_hole_fraction_in_the_official_window(region_1000):
    frac = region_1000.float().mean(dim=(1, 2, 3))
    assert region_1000.shape == (1000, 1, 128, 128) and region_1000.dtype == torch.bool
    assert bool(((frac > 0.2) & (frac < 0.3)).all())
    # per image, not one per batch
    assert len({m.numpy().tobytes() for m in region_1000[:50]}) == 50


def test_block_masks_cover_at_most_a_quarter_and_at_least_one_block(block_1000):
    cover = block_1000.float().mean(dim=(1, 2, 3))
    assert bool((cover <= 0.25).all()) and bool((cover >= 16 * 16 / 128**2).all())
    # every hidden pixel lies in an all-hidden 16x16 window (a union of >= 16 px rectangles is its
    # own opening), and there is more than one rectangle in most masks (several smaller, possibly
    # overlapping blocks)
    m = block_1000[:50].float()
    # 1 where a whole 16x16 window is hidden
    eroded = -F.max_pool2d(-m, 16, stride=1)
    opened = F.max_pool2d(F.pad(eroded, (15, 15, 15, 15)), 16, stride=1)
    assert torch.equal(opened, m)
    # most cover more than one largest block
    assert (cover > 32 * 32 / 128**2).float().mean() > 0.5


def test_masks_depend_only_on_the_key():
    for kind in ("block", "region"):
        a = ce_masks.random_masks(kind, 8, (3, "mask", 17))
        assert torch.equal(a, ce_masks.random_masks(kind, 8, (3, "mask", 17)))
        assert not torch.equal(a, ce_masks.random_masks(kind, 8, (3, "mask", 18)))
        # a DDP rank's slice is what a one-process run of the global batch gives those images
        assert torch.equal(ce_masks.random_masks(kind, 8, (3, "mask", 17), rows=slice(4, 8)), a[4:])
        one = ce_masks.random_masks(kind, 8, (3, "mask", 17), per_batch=True)
        assert one.shape == (8, 1, 128, 128) and all(torch.equal(one[0], one[i]) for i in range(8))


def test_region_field_is_a_crop_of_a_bicubically_upsampled_noise_pattern():
    """The per-crop field is a crop of F.interpolate(noise, bicubic) of a big pattern (official)."""
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(1, 1, 30, 30, generator=g)
    scale = 500 / 30
    big = F.interpolate(noise, size=(500, 500), mode="bicubic", align_corners=False)[0, 0]
    for Y, X in ((100, 150), (37, 211), (250, 64)):
        c0, c1 = int(Y / scale) - 2, int(X / scale) - 2
        cells = 13
        start = torch.tensor([[Y / scale - c0], [X / scale - c1]])
        ours = ce_masks._fields(noise[0, :, c0:c0 + cells, c1:c1 + cells], start, 128, scale)[0]
        assert torch.allclose(ours, big[Y:Y + 128, X:X + 128], atol=1e-5)


def test_bicubic_weights_from_four_cells_equal_the_kernel_at_every_cell():
    """ce_masks evaluates the Keys kernel (a = -0.75) only at the 4 cells near each output row, each
    with its own piece; written out and evaluated at every cell, the kernel gives the same weights
    bit for bit, also at phases where a row falls on a cell boundary."""
    def keys(t, a=-0.75):
        t = t.abs()
        near, far = ((a + 2) * t - (a + 3)) * t * t + 1, ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
        return torch.where(t <= 1, near, torch.where(t < 2, far, 0.0))
    start = torch.cat([2 + torch.rand(20000, generator=torch.Generator().manual_seed(0)),
                       # 2 + rand can round to 3
                       torch.tensor([2.0, 2.5, 3 - 2**-22, 3.0, 2 + 0.5 / ce_masks.REGION_SCALE])])
    for size in (128, 227):
        cells = ce_masks._region_numbers(1, size, torch.Generator())[0].shape[-1]
        x = start[:, None] + (torch.arange(size) + 0.5) / ce_masks.REGION_SCALE - 0.5
        want = keys(x[..., None] - torch.arange(cells, dtype=torch.float32))
        assert torch.equal(ce_masks._upsample_rows(size, cells, ce_masks.REGION_SCALE, start), want)
        # the first cell is reached
        assert (want != 0).sum(dim=-1).max() == 4 and want[:, :, :1].abs().max() > 0


def test_apply_mask_and_paste_image_touch_only_hidden_pixels():
    x = torch.rand(2, 3, 128, 128) * 2 - 1
    mask = ce_masks.random_masks("block", 2, (0, "t"))
    masked = ce_data.apply_mask(x, mask)
    assert torch.equal(masked[~mask.expand_as(x)], x[~mask.expand_as(x)])
    for c in range(3):
        assert torch.all(masked[:, c][mask[:, 0]] == ce_data.MEAN_FILL[c])
    pred = torch.zeros_like(x)
    out = ce_data.paste_image(x, pred, mask)
    assert torch.equal(out[mask.expand_as(x)], pred[mask.expand_as(x)])
    assert torch.equal(out[~mask.expand_as(x)], x[~mask.expand_as(x)])


def test_masked_loss_equals_a_hand_computation():
    """5x5 image, hole = the 3x3 centre plus one pixel; overlap 1: the hidden pixels next to a
    visible pixel (chessboard) weigh 10, the hidden centre pixel (all 8 neighbours hidden) weighs 1,
    visible pixels 0."""
    mask = torch.zeros(1, 1, 5, 5, dtype=torch.bool)
    mask[..., 1:4, 1:4] = True
    W = ce_losses.hole_weights(mask, overlap=1, overlap_weight=10.0)
    expect = torch.zeros(5, 5)
    expect[1:4, 1:4] = 10.0
    expect[2, 2] = 1.0
    assert torch.equal(W[0, 0], expect)
    pred, target = torch.zeros(1, 3, 5, 5), torch.zeros(1, 3, 5, 5)
    pred[:, :, 2, 2] = 1.0      # error 1 at the inner hidden pixel: 3 channels x weight 1
    pred[:, 0, 1, 1] = 2.0      # error 2 at a rim pixel, one channel: weight 10 x 4
    pred[:, 1, 0, 0] = 5.0      # error at a visible pixel: weight 0
    loss = ce_losses.reconstruction_loss(pred, target, W).item()
    assert loss == pytest.approx((3 * 1 + 10 * 4) / 75)
    # no overlap: all hidden pixels weigh 1; the image border is not context
    edge = torch.zeros(1, 1, 5, 5, dtype=torch.bool)
    edge[..., :, :2] = True
    assert torch.equal(ce_losses.hole_weights(edge, 0)[0, 0], edge[0, 0].float())
    # column 0 touches no context
    assert ce_losses.hole_weights(edge, 1)[0, 0, :, 0].tolist() == [1.0] * 5
    assert ce_losses.hole_weights(edge, 1)[0, 0, :, 1].tolist() == [10.0] * 5


def test_official_whole_image_weighting_matches_train_random_lua():
    """train_random.lua:418-431 (useOverlapPred=1), transcribed: wtl2Matrix = 10*wtl2 everywhere,
    wtl2 on the mask; G's reconstruction gradient = wtl2Matrix * dMSE/dout, where MSECriterion
    averages over all elements."""
    torch.manual_seed(0)
    out, real = torch.rand(2, 3, 16, 16, requires_grad=True), torch.rand(2, 3, 16, 16)
    mask = torch.rand(2, 1, 16, 16) < 0.25
    wtl2 = 0.999
    df_dg_l2 = 2 * (out.detach() - real) / out.numel()                # nn.MSECriterion:backward
    wtl2_matrix = torch.full_like(df_dg_l2, 10 * wtl2)
    wtl2_matrix[mask.expand_as(out)] = wtl2
    lua_grad = wtl2_matrix * df_dg_l2
    loss = wtl2 * ce_losses.reconstruction_loss(out, real, ce_losses.context_weights(mask, 10.0))
    loss.backward()
    assert torch.allclose(out.grad, lua_grad, rtol=1e-5, atol=1e-9)
    # useOverlapPred=0: a plain MSE over the whole image
    plain = ce_losses.reconstruction_loss(out, real, ce_losses.context_weights(mask, 1.0))
    assert plain.item() == pytest.approx(F.mse_loss(out, real).item(), rel=1e-6)


def test_whole_image_networks():
    G, D = ce_model.build_models(8, 16, full_image=True)
    x = torch.rand(2, 3, 128, 128) * 2 - 1
    y = G(x)
    assert y.shape == (2, 3, 128, 128) and D(y).shape == (2,)
    G64, D64 = ce_model.build_models(8, 16)
    assert G64(x).shape == (2, 3, 64, 64)
    # exactly one extra up-conv (w -> w) + BN in G, one extra strided conv (w -> w) + BN in D:
    # 16 w^2 + 2 w each
    w = 8
    assert ce_model.count_params(G) - ce_model.count_params(G64) == 16 * w * w + 2 * w
    assert ce_model.count_params(D) - ce_model.count_params(D64) == 16 * w * w + 2 * w
    full = ce_model.build_models(full_image=True)
    assert tuple(map(ce_model.count_params, full)) == (71_190_208, 2_831_232)


def test_region_statistics_close_to_the_official_pattern():
    """Hole fraction of accepted crops: ours vs crops of one big pattern made the official way
    (reduced size, same scale), both through the 20-30 % window. Means agree within a point."""
    g = torch.Generator().manual_seed(1)
    scale = ce_masks.REGION_SCALE
    low = 120
    big = F.interpolate(torch.rand(1, 1, low, low, generator=g), scale_factor=scale, mode="bicubic",
                        align_corners=False)[0, 0] < ce_masks.REGION_DENSITY
    ys, xs = torch.randint(0, big.shape[0] - 128, (2, 4000), generator=g)
    crops = [big[y:y + 128, x:x + 128] for y, x in zip(ys.tolist(), xs.tolist())]
    crops = torch.stack(crops).float()
    frac = crops.mean(dim=(1, 2))
    official = frac[(frac > 0.2) & (frac < 0.3)]
    ours = ce_masks.random_masks("region", 400, (0, "stats")).float().mean(dim=(1, 2, 3))
    assert len(official) > 200
    assert abs(official.mean().item() - ours.mean().item()) < 0.01
    # the pattern itself is ~17 % holes
    assert math.isclose(big.float().mean().item(), 0.17, abs_tol=0.03)


def test_irregular_hole_harmonic_solver_equals_the_exact_dst_solution_on_the_square():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 128, 128) * 2 - 1
    a, b = ce_data.hole_bounds(128, 7, "visible")
    mask = torch.zeros(2, 1, 128, 128, dtype=torch.bool)
    mask[..., a:b, a:b] = True
    cg = baselines.harmonic_fill_mask(ce_data.apply_mask(x, mask), mask)
    exact = baselines.harmonic_fill(x, a, b)
    assert (cg[..., a:b, a:b] - exact).abs().max().item() < 1e-4
    assert torch.equal(cg[~mask.expand_as(x)], x[~mask.expand_as(x)])


def test_irregular_hole_harmonic_solution_is_harmonic_and_bounded():
    """In every hidden pixel the value is the mean of its in-image neighbours (discrete Laplace
    equation), and by the maximum principle it stays within the range of the visible values."""
    torch.manual_seed(1)
    x = torch.rand(1, 3, 128, 128) * 2 - 1
    mask = ce_masks.random_masks("region", 1, (0, "harmonic"))
    u = baselines.harmonic_fill_mask(ce_data.apply_mask(x, mask), mask).double()
    deg = baselines._neighbour_sum(torch.ones(1, 1, 128, 128, dtype=torch.float64))
    residual = (deg * u - baselines._neighbour_sum(u))[mask.expand_as(u)]
    assert residual.abs().max().item() < 1e-5
    vis = x[~mask.expand_as(x)]
    hidden = u[mask.expand_as(u)]
    assert hidden.min() >= vis.min() - 1e-6 and hidden.max() <= vis.max() + 1e-6


def test_harmonic_solver_in_chunks_equals_one_solve(monkeypatch):
    """On a CPU the solve runs a few images at a time: one image per chunk gives the one-solve
    result, also with one mask (batch 1) shared by every image."""
    torch.manual_seed(2)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    mask = ce_masks.random_masks("region", 1, (0, "chunks"), size=32)
    masked = ce_data.apply_mask(x, mask.expand(3, -1, -1, -1))
    monkeypatch.setattr(baselines, "CG_CHUNK_ELEMENTS", 1 << 30)
    whole = baselines.harmonic_fill_mask(masked, mask)
    monkeypatch.setattr(baselines, "CG_CHUNK_ELEMENTS", x[0].numel())
    chunked = baselines.harmonic_fill_mask(masked, mask)
    assert chunked.shape == x.shape and (chunked - whole).abs().max().item() < 1e-5
    assert not torch.equal(chunked[0], chunked[1])     # each image filled from its own context


def test_evaluation_masks_are_fixed_and_independent_of_batching():
    a = ce_masks.eval_masks("region", 0, 300)
    b = torch.cat([ce_masks.eval_masks("region", 0, 100), ce_masks.eval_masks("region", 100, 200)])
    assert torch.equal(a, b)
    assert torch.equal(ce_masks.eval_masks("block", 250, 10),
                       ce_masks.eval_masks("block", 0, 260)[250:])


@pytest.mark.parametrize("kind", ["block", "region"])
def test_tiny_random_mask_run_resumes_exactly_and_evaluates(kind, tmp_path, tiny_flags, capsys):
    import json

    import ce_eval
    import ce_train
    common = tiny_flags + ["--mask", kind, "--batch-size", "4", "--log-every", "2",
                           "--eval-every", "1000"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    ce_train.main(common + ["--steps", "4", "--out", a])
    ce_train.main(common + ["--steps", "2", "--out", b])
    ce_train.main(["--resume", b, "--steps", "4", "--device", "cpu"])
    wa, wb = checkpoints.read_checkpoint(a)["G"], checkpoints.read_checkpoint(b)["G"]
    # same masks at the same steps
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    state = checkpoints.read_checkpoint(a)
    # one more up-conv
    assert state["args"]["mask"] == kind and state["G"]["decoder.15.weight"].shape[1] == 3
    G, D, _ = checkpoints.load_checkpoint(a)
    assert G(torch.zeros(2, 3, 128, 128)).shape == (2, 3, 128, 128)
    capsys.readouterr()
    ce_eval.main(["--ckpt", a, "--device", "cpu", "--json", "--max-images", "8"])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"model", "fill", "context_mean", "harmonic"} <= set(res)
    assert res["model"]["n_images"] == 8
    assert res["harmonic"]["psnr"] > res["fill"]["psnr"]
    # the region metrics are over the whole composite image: much of it is real, so higher
    assert res["fill"]["psnr_region"] > res["fill"]["psnr"]


def test_user_mask_on_a_photo_and_its_errors(tmp_path, tiny_flags, capsys):
    """--image PHOTO --mask MASK.png: the mask is cropped/scaled as the photo; only its pixels
    change in the full-size result; unreadable, empty and all-hole masks and a centre-only
    checkpoint are one-line errors."""
    import numpy as np
    from PIL import Image

    import ce_eval
    import ce_train
    from ce_utils import cli
    region, center = str(tmp_path / "region"), str(tmp_path / "center")
    ce_train.main(tiny_flags + ["--mask", "region", "--steps", "1", "--batch-size", "4",
                                "--out", region])
    ce_train.main(tiny_flags + ["--steps", "1", "--batch-size", "4", "--out", center])
    photo = np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    Image.fromarray(photo).save(tmp_path / "p.png")
    m = np.zeros((200, 300), np.uint8)
    # a 40 x 30 hole inside the square
    m[80:120, 140:170] = 255
    Image.fromarray(m).save(tmp_path / "m.png")
    out = tmp_path / "out"
    ce_eval.main(["--ckpt", region, "--device", "cpu", "--image", str(tmp_path / "p.png"), "--mask",
                  str(tmp_path / "m.png"), "--out", str(out)])
    assert "your mask" in capsys.readouterr().out
    full = np.asarray(Image.open(out / "p_full.png"))
    changed = (full != photo).any(axis=2)
    assert full.shape == photo.shape and changed.any()
    # only the hole's pixels change
    assert not changed[m == 0].any()
    for mask, words in (("missing.png", "no such file"), ("black.png", "no hole"),
                        ("white.png", "whole central")):
        if mask != "missing.png":
            value = 0 if mask == "black.png" else 255
            Image.fromarray(np.full((200, 300), value, np.uint8)).save(tmp_path / mask)
        with pytest.raises(SystemExit) as e:
            cli.run(ce_eval.main, ["--ckpt", region, "--device", "cpu", "--image",
                                   str(tmp_path / "p.png"), "--mask", str(tmp_path / mask),
                                   "--out", str(out)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and words in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as e:
        cli.run(ce_eval.main, ["--ckpt", center, "--device", "cpu", "--image",
                               str(tmp_path / "p.png"), "--mask", str(tmp_path / "m.png"),
                               "--out", str(out)])
    assert e.value.code == 2 and "central square" in capsys.readouterr().err


def test_masks_drawn_a_step_ahead_are_the_masks_of_their_step():
    """accel.mask_numbers_ahead draws step s + 1's random numbers in a worker thread during step
    s: in order, after a jump (a resumed run) and with a DDP rank's slice, the masks that
    ce_train.cut_hole builds from them are exactly random_masks(step)."""
    import ce_train
    from ce_utils import accel
    for kind, rank, world in (("region", 0, 1), ("block", 1, 2)):
        args = ce_train.default_args(mask=kind, seed=3)
        draw_numbers = accel.mask_numbers_ahead(args, rank, world)
        real = torch.rand(4, 3, 32, 32) * 2 - 1
        for step in (0, 1, 2, 7, 8):
            masked, _, _ = ce_train.cut_hole(real, draw_numbers(real, step), args, None)
            want = ce_masks.random_masks(kind, 4 * world, (3, "mask", step), 32,
                                         rows=slice(4 * rank, 4 * rank + 4))
            assert torch.equal(masked, ce_data.apply_mask(real, want, args.fill))


def test_the_mask_builder_takes_all_its_randomness_from_its_arguments():
    """On one GPU ce_train captures its step, ce_train.cut_hole(real, numbers, args, W) included,
    in a CUDA graph (accel.cuda_graphed) and replays it with each step's numbers copied in: it
    must draw nothing itself (torch's generator untouched) and give the same masked batch and
    weights for the same numbers."""
    import ce_train
    from ce_utils import accel
    for kind in ("block", "region"):
        args = ce_train.default_args(mask=kind, seed=3)
        draw_numbers = accel.mask_numbers_ahead(args)

        def cut_holes(real, *numbers):
            return ce_train.cut_hole(real, numbers, args, None)
        real = torch.rand(4, 3, 32, 32) * 2 - 1
        numbers = draw_numbers(real, 5)
        state = torch.get_rng_state()
        once, again = cut_holes(real, *numbers), cut_holes(real, *numbers)
        assert torch.equal(torch.get_rng_state(), state)
        assert all(torch.equal(a, b) for a, b in zip(once, again))
        # another step, other masks
        assert not torch.equal(once[0], cut_holes(real, *draw_numbers(real, 6))[0])


@pytest.mark.parametrize("kind, rec_loss, per_batch", [("center", "hole", False),
                                                      ("block", "hole", False),
                                                      ("region", "hole", False),
                                                      ("region", "image", True)])
def test_the_mask_builder_needs_no_values_from_the_device(kind, rec_loss, per_batch):
    """What accel.cuda_graphed captures must not wait for the GPU (.item(), bool(tensor), nonzero,
    boolean indexing, shapes that depend on values). On the meta device tensors have shapes and no
    values, so every such operation raises: the masks are built there the GPU's way (every
    candidate at once, no host check), with the loss weights."""
    import ce_train
    from ce_utils import accel
    args = ce_train.default_args(mask=kind, rec_loss=rec_loss, mask_per_batch=per_batch)
    draw_numbers, W = accel.mask_numbers_ahead(args), torch.ones(1, 1, 64, 64, device="meta")
    real = torch.rand(4, 3, 32, 32)
    numbers = [t.to("meta") for t in draw_numbers(real, 0)]
    masked, target, weight = ce_train.cut_hole(real.to("meta"), numbers, args, W)
    assert masked.shape == real.shape and weight.device.type == "meta"
    assert target.shape[-1] == (16 if kind == "center" else 32) and len(weight) in (1, 4)


def test_region_masks_the_same_whether_rounds_compact_or_not():
    """A GPU evaluates every candidate of every image at once (no host sync); a CPU a few candidates
    at a time, only for the images still without a mask, and stops early: the masks must be the
    same, also for the images that fall back to their first candidate's own quantile (a narrow
    window makes those common)."""
    numbers = ce_masks.mask_numbers("region", 64, (0, "compact"))
    gpu_way = ce_masks.region_masks(None, numbers=numbers, compact=False)
    assert torch.equal(gpu_way, ce_masks.region_masks(None, numbers=numbers, compact=True))
    assert torch.equal(gpu_way, ce_masks.random_masks("region", 64, (0, "compact")))
    narrow = (0.245, 0.255)
    rule = (128, ce_masks.REGION_SCALE, ce_masks.REGION_DENSITY, narrow)
    *_, ok = ce_masks._region_candidates(*numbers, *rule)
    # 8+ of the 64 images fall back
    assert (~ok.any(dim=1)).sum() >= 8
    gpu_way = ce_masks.region_masks(None, numbers=numbers, window=narrow, compact=False)
    cpu_way = ce_masks.region_masks(None, numbers=numbers, window=narrow, compact=True)
    assert torch.equal(gpu_way, cpu_way)
    # 200 images: the last 8 candidates are for the first 200 // 4 + 32 = 82 images left after the
    # first 8, the fallback for the first 200 // 8 + 32 = 57 left after that (REGION_ROOM); the
    # narrow window overflows both: both ways still agree, and the images left beyond take the
    # central square
    numbers = ce_masks.mask_numbers("region", 200, (1, "compact"))
    *_, ok = ce_masks._region_candidates(*numbers, *rule)
    assert (~ok[:, :8].any(dim=1)).sum() > 82
    gpu_way = ce_masks.region_masks(None, numbers=numbers, window=narrow, compact=False)
    cpu_way = ce_masks.region_masks(None, numbers=numbers, window=narrow, compact=True)
    assert torch.equal(gpu_way, cpu_way)
    square = (gpu_way[:, 0] == ce_masks._square(128, "cpu")).all(dim=(1, 2))
    # rooms go to the first images left, in order
    assert square.sum() > 0 and not square[:57].any()
    frac = gpu_way.float().mean(dim=(1, 2, 3))
    assert ((frac > 0.2) & (frac < 0.3)).all()


@pytest.mark.parametrize("size, n, per_batch, rows", [(227, 96, False, None),
                                                      (32, 300, False, None),
                                                      (128, 1, False, None), (128, 8, True, None),
                                                      (227, 200, False, slice(40, 120))])
def test_region_masks_the_gpu_way_at_other_sizes_and_shapes(size, n, per_batch, rows):
    """The GPU's way and a CPU's agree at the AlexNet's 227 px and at 32 px (where many images are
    left after 8 candidates), for one image, one mask per batch and a DDP rank's rows."""
    numbers = ce_masks.mask_numbers("region", n, (2, "ways", size), size, per_batch, rows)
    gpu_way = ce_masks.region_masks(None, size, numbers=numbers, compact=False)
    assert torch.equal(gpu_way, ce_masks.region_masks(None, size, numbers=numbers, compact=True))
    frac = gpu_way.float().mean(dim=(1, 2, 3))
    assert ((frac > 0.2) & (frac < 0.3)).all()


def test_the_first_images_left_are_found_without_a_host_sync():
    """_first_left: the first k images not found, in order, padded with image 0 when fewer left."""
    found = torch.tensor([False, True, False, True, True, False, False])
    assert ce_masks._first_left(found, 3).tolist() == [0, 2, 5]
    assert ce_masks._first_left(found, 6).tolist() == [0, 2, 5, 6, 0, 0]
    assert ce_masks._first_left(~found, 2).tolist() == [1, 3]
    assert ce_masks._first_left(torch.ones(4, dtype=torch.bool), 2).tolist() == [0, 0]


def test_mask_stats_report_how_often_the_region_rule_falls_through(capsys):
    """--mask-stats region prints, for ours at 128 and 227 px, the share of crops rejected and of
    images with no crop accepted among the first 8 candidates and among all 16 (the fallback); more
    images fall through the first half than all of it."""
    import ce_eval
    ce_eval.main(["--mask-stats", "region", "--stats-n", "64"])
    lines = [s for s in capsys.readouterr().out.splitlines() if s.strip().startswith("ours at")]
    assert [s.split()[2] for s in lines] == ["128", "227"]
    rejected, after_half, fallback = ce_masks.region_acceptance(64, 128)
    assert f"{100 * rejected:.1f} % of crops rejected" in lines[0]
    assert 0.5 < rejected < 0.9 and 0 <= fallback <= after_half < 0.5


def test_mask_stats_count_is_its_own_flag(capsys):
    """--mask-stats draws --stats-n masks (default 1000); --n is --figure's rows and does not change
    it (it used to: --n 6, its default, meant 1000 masks, any other --n that many)."""
    import ce_eval
    for argv in (["--stats-n", "6"], ["--stats-n", "6", "--n", "7"]):
        ce_eval.main(["--mask-stats", "block", *argv])
        assert "block masks, 6 each" in capsys.readouterr().out
    assert ce_eval.parse_args(["--mask-stats", "block", "--n", "7"]).stats_n == 1000


def test_official_region_crops_sit_beside_region_masks():
    """ce_masks.official_region_crops, the reference region_masks reproduces: accepted crops of one
    pattern made the official way lie inside the window, and their hole fraction is ours."""
    crops, rate = ce_masks.official_region_crops(200, seed=0, pattern=1000)
    frac = crops.float().mean(dim=(1, 2))
    assert crops.shape == (200, 128, 128) and crops.dtype == torch.bool and 0 < rate < 1
    assert ((frac > 0.2) & (frac < 0.3)).all()
    ours = ce_masks.random_masks("region", 200, (0, "reference")).float().mean()
    assert abs(frac.mean().item() - ours.item()) < 0.01
