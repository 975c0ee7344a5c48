"""Benchmark of the Context Encoder training step: images/s of ce_train.py's step against a loop
written the way typical implementations are, side by side in one run, with the same networks,
losses and optimisers (docs/speed.md: what it measures, and results).

    python ce_bench.py --batch-size 512 --steps 50           # GPU: the paper's network
    python ce_bench.py --batch-size 512 --mask region --skip-reference   # what masks cost
    python ce_bench.py --device cpu --width 16 --bottleneck 64 --batch-size 16 --steps 5

Configurations:
  ours          ce_train.train_step; uint8 data resident on the device, batches sliced, flipped,
                normalised and masked there; bf16 autocast + channels_last on CUDA
  ours-fp32     the same without autocast; ours-nchw: without channels_last (CUDA only: each
                speed switch off, one at a time)
  ours-graph    the same step captured whole in one CUDA graph and replayed, Adam fused
                (ce_train's default on one GPU); ours-graph-foreach: with the multi-tensor Adam
  ours-compile  the same with torch.compile (with --compile)
  ours-MASK     --mask block/region: the whole-image model with masks made at every step as
                ce_train.py makes them (numbers drawn a step ahead on the CPU, masks built on the
                device, in the CUDA graph on one GPU); ours-MASK-fixed: one mask made once and
                reused, so that the difference is what making masks costs the step;
                MASK-masks-only: drawing and building one batch of masks, one call after the
                other, without the step (an upper bound on what they add to it)
  reference     fp32, NCHW; a per-sample Dataset that decodes an image file with Pillow, resizes,
                flips and normalises on the CPU, batched by a DataLoader with --workers processes
                (the seed report's design), copied each step; the hole cut by the same train_step
Timing: --warmup steps first (cudnn autotuning, compilation), then --repeats windows of --steps
steps each, the device synchronised at the end of each window; the median window is reported.
FLOPs are counted on one real step with torch.utils.flop_counter (convolutions and matrix
products, forward and backward), not assumed. --profile (CUDA) adds, per configuration,
torch.profiler's account of 10 steps: GPU busy time against wall time (the rest is the GPU waiting
for launches) and GPU operations (kernels, copies, memsets) per step; with --mask, the GPU time by
kernel of ours-MASK minus that of ours-MASK-fixed (the masks' own kernels).
"""
import json
import os
import platform
import random
import statistics
import tempfile
import time

import numpy as np
import torch
from PIL import Image

import ce_data
import ce_masks
import ce_train
from ce_utils import accel, cli, datasets


class ReferenceDataset(torch.utils.data.Dataset):
    """One image file per __getitem__: decode, resize to 128, flip, scale to [-1, 1] on the CPU.
    A file that does not decode (training skips it, with a warning) is replaced by the next one
    that does: the loop reads only the images training reads."""

    def __init__(self, files):
        self.files = files

    def __len__(self):
        return len(self.files)

    def decode(self, i):
        """Image i, or the first one after it that decodes."""
        for k in range(len(self.files)):
            try:
                with Image.open(self.files[(i + k) % len(self.files)]) as im:
                    return im.convert("RGB").resize((128, 128), Image.BILINEAR)
            except Exception:     # Pillow's decoders raise many types for a damaged file: skip it
                continue
        raise cli.DataError(f"none of the {len(self.files)} image files could be decoded")

    def __getitem__(self, i):
        im = self.decode(i)
        x = torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 127.5 - 1
        if random.random() < 0.5:
            x = x.flip(2)
        return x


def parse_args(argv=None):
    p = cli.Parser(__doc__)
    p.add_argument("--data", default="shapes", choices=("shapes", "tiny", "imagenet", "folder"),
                   help="training images to benchmark on (shapes: the embedded data, generated on "
                        "first use)")
    p.add_argument("--data-root", default="data", help="dataset folder, as for ce_train.py")
    p.add_argument("--shapes-n", type=cli.positive_int, default=4096,
                   help="images of the embedded data to benchmark on")
    p.add_argument("--batch-size", type=cli.train_batch, default=64,
                   help="images per training step (paper: 64)")
    p.add_argument("--steps", type=cli.positive_int, default=30, help="steps per timed window")
    p.add_argument("--warmup", type=cli.count, default=10,
                   help="untimed steps first (cudnn autotuning, compilation)")
    p.add_argument("--repeats", type=cli.positive_int, default=3,
                   help="timed windows; the median is reported")
    p.add_argument("--width", type=cli.positive_int, default=64,
                   help="channels of G's first layer (paper: 64)")
    p.add_argument("--bottleneck", type=cli.positive_int, default=4000,
                   help="channels of G's bottleneck (paper: 4000)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--workers", type=cli.count, default=min(10, os.cpu_count() or 1),
                   help="DataLoader processes of the reference loop (the seed report used 10) "
                        "(default: min(10, CPU cores), here %(default)s)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile (ours-compile)")
    p.add_argument("--profile", action="store_true",
                   help="CUDA: GPU busy time vs wall time per step, per configuration")
    p.add_argument("--mask", default="center", choices=("center", "block", "region"),
                   help="block/region: also time the whole-image model with these masks "
                        "(ours-MASK) and the masks alone (MASK-masks-only), in the same run")
    p.add_argument("--skip-reference", action="store_true", help="do not time the reference loop")
    p.add_argument("--json", action="store_true",
                   help="one JSON line per configuration instead of the table")
    a = p.parse_args(argv)      # each flag's range is its type (ce_utils/cli.py)
    a.device = cli.resolve_device(a.device, p)
    return a


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(a, device, channels_last, dtype="fp32", mask="center", graph=False, fused=None):
    """(ce_train.build_training's namespace, the run's flags t): the networks, optimisers and loss
    weights at paper defaults and this benchmark's sizes; mask block/region: the whole-image
    model; graph: optimisers and autocast ready for CUDA-graph capture."""
    torch.manual_seed(0)
    hw = cli.Hardware(device, dtype, channels_last, graph)
    t = ce_train.default_args(device=str(device), width=a.width, bottleneck=a.bottleneck,
                              mask=mask, cuda_graph=graph)
    return ce_train.build_training(t, hw, fused=fused), t


def batch_maker(batches, t, fixed=False):
    """next_batch() -> (real batch, its mask numbers) on consecutive steps, as ce_train.py makes
    them for run flags t (accel.mask_numbers_ahead). fixed: the first step's mask as the numbers
    at every step (nothing drawn or built; ce_train.cut_hole takes a ready mask; W still is
    computed)."""
    k = iter(range(10**9))
    if fixed:
        once = ce_masks.random_masks(t.mask, batches.batch_size, (0, "mask", 0), 128,
                                     batches.device)

        def draw_numbers(real, step):
            return (once,)
    else:
        draw_numbers = accel.mask_numbers_ahead(t)

    def next_batch():
        step = next(k)
        real = batches.get(step)
        return (real, *draw_numbers(real, step))
    return next_batch


def measure_masks(a, device, kind):
    """The masks alone: median ms to draw and build one batch of `kind` masks on the device, in
    turn and launched kernel by kernel (a step draws the next numbers in a worker thread and, on
    one GPU, builds the masks in its CUDA graph: this is an upper bound on what they add to it)."""
    windows = []
    for r in range(a.repeats + 1):
        sync(device)
        t0 = time.perf_counter()
        for s in range(a.steps):
            ce_masks.random_masks(kind, a.batch_size, (0, "bench", r, s), 128, device)
        sync(device)
        windows.append((time.perf_counter() - t0) / a.steps)
    sec = statistics.median(windows[1:])                          # the first window warms up
    ops, gb = mask_work(kind, a.batch_size)
    return {"config": f"{kind}-masks-only", "img_per_s": a.batch_size / sec,
            "ms_per_step": 1000 * sec, "tflops": 0.0, "gflop_per_img": 0.0, "peak_gib": None,
            "mask_ops": ops, "mask_gb": gb}


def mask_work(kind, n, size=128):
    """(tensor operations, GB of their inputs and outputs) to build n `kind` masks the GPU's way,
    counted on the meta device (shapes without values: any machine counts what a GPU would do).
    Views and reshapes without a copy are not counted. The GB are the operands' sizes summed, a
    proxy for the memory traffic: an operation that reads part of an input (an index) counts all
    of it, one that reads its inputs several times (a matrix product, kthvalue's passes) once.
    python -c "import ce_bench; print(ce_bench.mask_work('region', 512))" """
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops, nbytes = 0, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not (func.is_view or "view" in func.__name__      # "view": also _unsafe_view
                    or func.__name__.startswith("empty")):
                tensors = [t for t in torch.utils._pytree.tree_flatten((args, kwargs, out))[0]
                           if isinstance(t, torch.Tensor)]
                self.ops, self.nbytes = self.ops + 1, self.nbytes + sum(t.nbytes for t in tensors)
            return out
    numbers = [t.to("meta") for t in ce_masks.mask_numbers(kind, n, (0, "work"), size)]
    with Count() as count:
        ce_masks.random_masks(kind, n, None, size, "meta", numbers=numbers)
    return count.ops, count.nbytes / 1e9


def step_flops(step, batch):
    """FLOPs of one real training step (convolutions and matrix products, forward and backward),
    counted."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc:
        step(*batch)
    return fc.get_total_flops()


def profile(step, next_batch, device, n=10):
    """torch.profiler (CUDA activity only, so that tracing the CPU side does not slow it) over n
    steps: per step, ms of GPU time (the union of the intervals of its operations: kernels, copies,
    memsets) and the number of those operations (graph replays' included where CUPTI reports
    them); the wall time it compares with is the timed windows' ms_per_step."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    sync(device)
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step(*next_batch())
        sync(device)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    spans = sorted((e.time_range.start, e.time_range.end) for e in kernels)
    by_name = {}
    for e in kernels:
        by_name[e.name] = by_name.get(e.name, 0.0) + e.time_range.elapsed_us()
    busy, end = 0.0, -float("inf")
    for s, e in spans:                                   # union of intervals, microseconds
        busy += max(0.0, e - max(s, end))
        end = max(end, e)
    by_name = {name: us / 1000 / n for name, us in by_name.items()}   # ms per step
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:5]
    return {"kernel_ms": busy / 1000 / n, "kernels": len(spans) / n,
            "top_kernels": [(name[:60], round(ms, 3)) for name, ms in top], "_by_kernel": by_name}


def measure(name, a, device, batch, dtype="fp32", channels_last=False, compile_=False,
            mask="center", graph=False, fused=None):
    """Median seconds per step over a.repeats windows, FLOPs of one step, peak device memory.
    batch(t) -> next_batch, as batch_maker's, for the run flags t that build gives."""
    m, t = build(a, device, channels_last, dtype, mask, graph, fused)
    next_batch = batch(t)

    def step(real, *numbers):
        return ce_train.train_step(real, numbers, m, t)
    real, *numbers = next_batch()
    if numbers and numbers[0].dtype != torch.bool:     # count the networks' FLOPs, not the masks'
        numbers = [ce_masks.random_masks(t.mask, len(real), None, 128, device, numbers=numbers)]
    flops = step_flops(step, (real, *numbers))
    if compile_:
        m.forward_G, m.forward_D, m.forward_D_frozen = accel.forward_fns(m.G, m.D, device, 1, True)
    if graph:
        step = accel.cuda_graphed(step)
    warmup = max(a.warmup, accel.GRAPH_WARMUP + 1) if graph else a.warmup   # graph: captured
    for _ in range(warmup):
        step(*next_batch())
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    windows = []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        for _ in range(a.steps):
            step(*next_batch())
        sync(device)
        windows.append((time.perf_counter() - t0) / a.steps)
    sec = statistics.median(windows)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    prof = profile(step, next_batch, device) if a.profile and device.type == "cuda" else {}
    return {"config": name, "img_per_s": a.batch_size / sec, "ms_per_step": 1000 * sec,
            "tflops": flops / sec / 1e12, "gflop_per_img": flops / a.batch_size / 1e9,
            "peak_gib": peak, **prof}


def reference_files(a, images, tmp):
    """The image files the reference loop decodes: the dataset's own, or the embedded images
    written as PNGs."""
    if a.data != "shapes":
        return datasets.dataset_files(a.data, a.data_root, "train")
    files = []
    for i, im in enumerate(images[: max(a.batch_size * 4, 256)]):
        files.append(os.path.join(tmp, f"{i:05d}.png"))
        Image.fromarray(np.asarray(im)).save(files[-1])
    return files


def measure_reference(a, device, train_u8, t):
    """The reference loop: image files decoded per sample by a DataLoader, copied each step."""
    with tempfile.TemporaryDirectory() as tmp:
        ds = ReferenceDataset(reference_files(a, train_u8, tmp))
        loader = torch.utils.data.DataLoader(ds, a.batch_size, shuffle=True, num_workers=a.workers,
                                             drop_last=True, pin_memory=device.type == "cuda",
                                             persistent_workers=a.workers > 0)
        it = iter(loader)

        def next_ref():
            nonlocal it
            try:
                x = next(it)
            except StopIteration:
                it = iter(loader)
                x = next(it)
            return (x.to(device, non_blocking=True),)

        return measure("reference", a, device, lambda t: next_ref)


def report(results, a, device):
    """The table (or one JSON line per configuration), each configuration against the reference
    of this run."""
    ref = next((r["img_per_s"] for r in results if r["config"] == "reference"), None)
    for r in results:
        r["vs_reference"] = r["img_per_s"] / ref if ref else None
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or platform.machine())
    if a.json:
        for r in results:
            print(json.dumps({"device": name, "torch": str(torch.__version__),
                              "batch_size": a.batch_size,
                              **{k: (float(f"{v:.6g}") if isinstance(v, float) else v)
                                 for k, v in r.items() if not k.startswith("_")}}))
        return
    print(f"{name} | torch {torch.__version__} | {a.data} | batch {a.batch_size} | G width "
          f"{a.width}, bottleneck {a.bottleneck} | {results[0]['gflop_per_img']:.2f} GFLOP per "
          f"image per step | median of {a.repeats} x {a.steps} steps")
    print(f"{'config':<18}{'img/s':>10}{'ms/step':>10}{'TFLOP/s':>9}{'peak GiB':>10}"
          f"{'vs reference':>14}")
    for r in results:
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        vs = f"{r['vs_reference']:.2f}x" if r["vs_reference"] else "-"
        print(f"{r['config']:<18}{r['img_per_s']:>10,.0f}{r['ms_per_step']:>10.2f}"
              f"{r['tflops']:>9.2f}{peak:>10}{vs:>14}")
    for r in (r for r in results if "mask_ops" in r):
        print(f"{r['config']}: built the GPU's way, {r['mask_ops']} tensor operations with "
              f"{r['mask_gb']:.2f} GB of inputs and outputs per batch (counted on the meta device: "
              f"ce_bench.mask_work)")
    profiled = [r for r in results if "kernel_ms" in r]
    if profiled:
        print(f"profile (torch.profiler, 10 steps)\n{'config':<18}{'ms/step':>10}{'kernel ms':>11}"
              f"{'GPU idle':>10}{'GPU ops/step':>14}")
    for r in profiled:
        idle = 1 - r["kernel_ms"] / r["ms_per_step"]
        print(f"{r['config']:<18}{r['ms_per_step']:>10.2f}{r['kernel_ms']:>11.2f}{idle:>10.0%}"
              f"{r['kernels']:>14.0f}")
    for r in (r for r in profiled if r["config"] == "ours-graph"):   # its longest kernels
        print(f"{r['config']}: " + "; ".join(f"{ms:.2f} {name}" for name, ms in r["top_kernels"]))
    by_config = {r["config"]: r for r in profiled}
    for r in profiled:    # ours-region against ours-region-fixed: what the masks' own kernels take
        fixed = by_config.get(r["config"] + "-fixed")
        if fixed:   # (kernels that cuDNN's autotuning chose differently would show up too)
            extra = {k: ms - fixed["_by_kernel"].get(k, 0.0) for k, ms in r["_by_kernel"].items()}
            top = [(k, ms) for k, ms in sorted(extra.items(), key=lambda kv: -kv[1])[:8] if ms > 0]
            print(f"{r['config']}: {r['kernel_ms'] - fixed['kernel_ms']:.3f} GPU ms per step more "
                  f"than {fixed['config']}; the kernels with the most more: "
                  + ("; ".join(f"{ms:.3f} {k[:90]}" for k, ms in top) or "none"))


def main(argv=None):
    a = parse_args(argv)
    device = torch.device(a.device)
    cli.Hardware(device).use_fast_kernels()        # as ce_train.py: cuDNN autotuning, TF32
    train_u8 = datasets.load_split(a.data, a.data_root, "train", 128, a.shapes_n)
    t = ce_train.default_args()
    cuda = device.type == "cuda"
    # (name, autocast dtype, channels_last, torch.compile, mask, CUDA graph, fused Adam, one fixed
    # mask): the eager step, the graphed one (ce_train.py's default on one GPU), then each speed
    # switch off alone
    C = dict(dtype="auto", channels_last=cuda, compile_=False, mask="center", graph=False,
             fused=None, fixed=False)
    configs = [("ours", C)]
    if cuda:
        configs += [("ours-graph", {**C, "graph": True}),
                    ("ours-graph-foreach", {**C, "graph": True, "fused": False}),
                    ("ours-fp32", {**C, "dtype": "fp32"}),
                    ("ours-nchw", {**C, "dtype": "bf16", "channels_last": False})]
    configs += [("ours-compile", {**C, "compile_": True})] * a.compile
    if a.mask != "center":                                               # the whole-image model
        m = {**C, "mask": a.mask, "graph": cuda}                         # as ce_train.py runs it
        configs += [(f"ours-{a.mask}", m), (f"ours-{a.mask}-fixed", {**m, "fixed": True})]
    results = []
    for name, c in configs:
        c = dict(c)
        fixed = c.pop("fixed")
        batches = ce_data.Batches(train_u8, a.batch_size, device, 0, True, 128, c["channels_last"])
        results.append(measure(name, a, device, lambda t: batch_maker(batches, t, fixed), **c))
    if a.mask != "center":
        results.append(measure_masks(a, device, a.mask))
    if not a.skip_reference:
        results.append(measure_reference(a, device, train_u8, t))
    report(results, a, device)
    return results


if __name__ == "__main__":
    cli.run(main)
