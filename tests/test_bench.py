"""ce_bench.py on CPU with a tiny network: both loops run, the ratio is the ratio, FLOPs match a
hand count."""
import json

import pytest

import ce_bench


def conv_flops(w, b):
    """Hand count of one training step's conv FLOPs per image (2 * MACs), as ce_train runs it:
    G forward + backward (no input gradient for the first conv); D forward on real and fake +
    backward with weight gradients (no input gradient for the first conv); D forward on fake +
    backward for input gradients only."""
    def conv(cin, cout, hout):
        return 2 * cin * cout * 16 * hout * hout
    enc = [conv(3, w, 64), conv(w, w, 32), conv(w, 2 * w, 16), conv(2 * w, 4 * w, 8),
           conv(4 * w, 8 * w, 4), conv(8 * w, b, 1)]
    dec = [conv(b, 8 * w, 1), conv(8 * w, 4 * w, 4), conv(4 * w, 2 * w, 8), conv(2 * w, w, 16),
           conv(w, 3, 32)]
    d = [conv(3, w, 32), conv(w, 2 * w, 16), conv(2 * w, 4 * w, 8), conv(4 * w, 8 * w, 4),
         conv(8 * w, 1, 1)]
    fg, fd = sum(enc) + sum(dec), sum(d)
    return (3 * fg - enc[0]) + (6 * fd - 2 * d[0]) + 2 * fd


def test_bench_cpu_mode(tmp_path, capsys):
    ce_bench.main(["--device", "cpu", "--width", "8", "--bottleneck", "16", "--batch-size", "4",
                   "--steps", "2", "--warmup", "1", "--repeats", "2", "--workers", "1",
                   "--shapes-n", "32", "--data-root", str(tmp_path), "--json"])
    rows = {r["config"]: r for r in map(json.loads, capsys.readouterr().out.strip().splitlines())}
    assert set(rows) == {"ours", "reference"}
    ours, ref = rows["ours"], rows["reference"]
    for r in rows.values():
        assert r["img_per_s"] > 0
        assert r["ms_per_step"] == pytest.approx(1000 * 4 / r["img_per_s"], rel=1e-3)
        assert r["gflop_per_img"] == pytest.approx(conv_flops(8, 16) / 1e9, rel=1e-3)
        assert r["tflops"] == pytest.approx(r["gflop_per_img"] * r["img_per_s"] / 1e3, rel=1e-2)
    assert ref["vs_reference"] == 1
    assert ours["vs_reference"] == pytest.approx(ours["img_per_s"] / ref["img_per_s"], rel=1e-3)


def test_full_size_step_flops_counted_equal_hand_count():
    """The paper network's step, counted by ce_bench on one real step: 3.72 GFLOP per image, equal
    to the hand count (which leaves out D's weight gradients in the G step: ce_train freezes D
    there)."""
    import torch

    import ce_train
    a = ce_bench.parse_args(["--device", "cpu"])
    m, t = ce_bench.build(a, torch.device("cpu"), False)
    batch = (torch.rand(2, 3, 128, 128) * 2 - 1,)
    flops = ce_bench.step_flops(lambda real: ce_train.train_step(real, (), m, t), batch)
    assert flops == conv_flops(64, 4000) * 2
    assert flops / 2 / 1e9 == pytest.approx(3.7215, abs=1e-4)


def test_speed_switches_do_not_change_the_numbers():
    """channels_last and bf16 autocast (the CPU-available switches) give the first step's losses
    (G's after D's update) of plain fp32 NCHW: up to float rounding for channels_last, within bf16
    tolerance for autocast. Later steps are not compared: Adam turns rounding-level differences of
    near-zero gradients into full-size updates, so the second step's losses can differ beyond
    these tolerances (the networks are seeded: an unseeded test failed now and then)."""
    import contextlib

    import torch

    import ce_train
    a = ce_bench.parse_args(["--device", "cpu", "--width", "8", "--bottleneck", "16"])
    images = torch.rand(4, 3, 128, 128, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def first_losses(channels_last, dtype):
        with torch.random.fork_rng():           # the same initial networks for every variant
            torch.manual_seed(0)
            m, t = ce_bench.build(a, torch.device("cpu"), channels_last)
        m.ctx = torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext()
        x = images.contiguous(memory_format=torch.channels_last) if channels_last else images
        return ce_train.train_step(x, (), m, t).clone()

    plain = first_losses(False, None)
    assert torch.allclose(first_losses(True, None), plain, rtol=1e-4, atol=1e-5)
    assert torch.allclose(first_losses(False, torch.bfloat16), plain, rtol=5e-2, atol=1e-2)


def test_bench_times_random_masks_beside_the_centre_model(tmp_path, capsys):
    ce_bench.main(["--device", "cpu", "--width", "8", "--bottleneck", "16", "--batch-size", "4",
                   "--steps", "2", "--warmup", "1", "--repeats", "1", "--shapes-n", "32",
                   "--data-root", str(tmp_path), "--json", "--skip-reference", "--mask", "region"])
    rows = {r["config"]: r for r in map(json.loads, capsys.readouterr().out.strip().splitlines())}
    assert set(rows) == {"ours", "ours-region", "ours-region-fixed", "region-masks-only"}
    assert rows["ours-region-fixed"]["gflop_per_img"] == rows["ours-region"]["gflop_per_img"]
    # the whole-image model does more work per image than the centre model (one more up-conv, D
    # on 128 px)
    assert rows["ours-region"]["gflop_per_img"] > rows["ours"]["gflop_per_img"]
    assert rows["region-masks-only"]["ms_per_step"] > 0


def test_profile_report_names_the_masks_own_kernels(capsys):
    """With --profile and --mask, the report subtracts the fixed-mask step's GPU time per kernel
    from the random-mask step's: what is left is the masks' own kernels, longest first (the
    profile itself needs CUDA; its results are made up here)."""
    import torch
    a = ce_bench.parse_args(["--device", "cpu", "--batch-size", "512"])

    def row(config, by_kernel):
        return {"config": config, "img_per_s": 512.0, "ms_per_step": 1000.0, "tflops": 0.0,
                "gflop_per_img": 1.0, "peak_gib": None, "kernel_ms": sum(by_kernel.values()),
                "kernels": 3, "top_kernels": [], "_by_kernel": by_kernel}
    ce_bench.report([row("ours-region", {"conv": 20.0, "bmm": 0.4, "lt": 0.25, "adam": 1.0}),
                     row("ours-region-fixed", {"conv": 20.1, "adam": 1.0})], a, torch.device("cpu"))
    line = [s for s in capsys.readouterr().out.splitlines() if "more than" in s]
    assert line == ["ours-region: 0.550 GPU ms per step more than ours-region-fixed; the kernels "
                    "with the most more: 0.400 bmm; 0.250 lt"]


def test_mask_work_counts_the_device_operations_of_a_batch():
    """ce_bench.mask_work counts, on the meta device, what building masks the GPU's way does: the
    same operations whatever the batch size, and inputs and outputs about in proportion to it (the
    last 8 region candidates are for the first n/4 + 32 images left, so a little less than in
    proportion)."""
    for kind in ("block", "region"):
        ops, gb = ce_bench.mask_work(kind, 512)
        ops2, gb2 = ce_bench.mask_work(kind, 1024)
        assert ops == ops2 > 10 and 1.9 < gb2 / gb < 2.1
