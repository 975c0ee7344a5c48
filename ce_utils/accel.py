"""Speed and scale around the training step, none of it from the paper: several processes (DDP),
the whole step replayed as one CUDA graph, the next step's mask numbers and streamed batches
prepared in a worker thread while the GPU trains. ce_train.py's train_step is the same computation
with or without these: main() wraps it here, and the eager step stays the reference
(tests/test_cuda_graph.py compares them).

    python -c "from ce_utils import accel; print(accel.setup_distributed('cpu'))"
"""
import contextlib
import os
import re
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import ce_data
import ce_masks
from ce_utils import cli

# ------------------------------------------------------------------------------------------------
# Several processes (torchrun): DDP


def setup_distributed(device):
    """(rank, world, device): torchrun sets WORLD_SIZE, RANK, LOCAL_RANK; one process per GPU
    (NCCL) or per CPU worker (gloo). One process: (0, 1, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), world, device


def place(G, D, hw, world):
    """G and D on hw's device in its memory format; several CUDA ranks: BatchNorm over the global
    batch (SyncBatchNorm)."""
    if world > 1 and hw.device.type == "cuda":
        G, D = (nn.SyncBatchNorm.convert_sync_batchnorm(m) for m in (G, D))
    return (m.to(hw.device, memory_format=hw.mem_fmt) for m in (G, D))


def forward_fns(G, D, device, world, compile_=False):
    """What the step calls to run G, D (D's update) and D frozen (the G step): the modules
    themselves, or DDP-wrapped (gradients averaged across ranks) and/or torch.compile'd. The G
    step's pass through D uses the plain module: D is frozen there, and DDP would wait for
    gradients that never come. broadcast_buffers=False: BatchNorm statistics are rank 0's own,
    and broadcasting them between D's two forwards broke autograd (torch 2.11, CPU)."""
    ids = [device.index] if device.type == "cuda" else None
    wrap = (lambda m: DDP(m, device_ids=ids, broadcast_buffers=False)) if world > 1 else (
        lambda m: m)
    comp = torch.compile if compile_ else (lambda m: m)
    return comp(wrap(G)), comp(wrap(D)), comp(D)


def same_weights_check(G, world, master):
    """DDP's promise, checked once at the end of a run: every rank holds rank 0's weights."""
    flat = torch.cat([p.detach().float().flatten() for p in G.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, 0)
    diff = (flat - ref).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    if master:
        print(f"DDP: {world} ranks, max |weight - rank 0 weight| = {diff.item():.3g}")
    dist.barrier()                    # no rank tears gloo down while another still talks to it
    dist.destroy_process_group()


@contextlib.contextmanager
def peers_watched(out, rank, world):
    """Several ranks (torchrun): when one stops or is killed, the next collective of the others
    (DDP's gradient all-reduce, the log step's agreement) raises a RuntimeError (gloo: "Connection
    closed by peer"). Each survivor then ends with one line naming the checkpoint to resume from,
    not a traceback. What the ranks hold mid-step is not saved: it may be half an update."""
    try:
        yield
    except RuntimeError as e:
        lost = re.search(r"connection|peer|socket|timed out|gloo|nccl", str(e), re.IGNORECASE)
        if world == 1 or isinstance(e, torch.cuda.OutOfMemoryError) or not lost:
            raise                                # a bug or a capture failure: its own traceback
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        why = re.sub(r"^\[[^\]]*\]\s*", "", first).split(". ")[0][:160]   # gloo: [file:line] ...
        resume = cli.command("ce_train.py", "--resume", out)
        then = (f"Resume from its last checkpoint with: {resume}"
                if os.path.exists(os.path.join(out, "ckpt.pt"))
                else f"{out} holds no checkpoint yet: start the run again")
        raise cli.UserError(f"rank {rank} of {world}: a collective operation failed ({why}); "
                            f"another rank has probably stopped or been killed. {then}") from None


def any_rank(flag, bad_step):
    """(flag on any rank, the largest bad_step): ranks agree on stopping at a log step."""
    flags = torch.stack([torch.tensor(int(flag), device=bad_step.device), bad_step])
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return bool(flags[0]), flags[1]


# ------------------------------------------------------------------------------------------------
# Adam for a graphed step

def adam_options(device, graph, fused=None):
    """How the Adam updates run (not what they compute). Graphed: the step count on the device
    (capturable) and one fused kernel per update; fused=False: the multi-tensor version, as
    without a graph on CUDA; on a CPU the plain loop. Stated in full: torch's defaults changed
    between versions."""
    fused = graph if fused is None else fused
    return dict(capturable=graph, fused=fused, foreach=device.type == "cuda" and not fused)


def match_grad_strides(params):
    """The fused Adam refuses a gradient whose strides differ from its parameter's, and autograd
    may return one that differs along a dimension of size 1 (PyTorch issue 106951; D's last conv,
    (1, C, 4, 4), with some cuDNN kernels). Such a stride never moves in memory, so after each
    accumulation the gradient is viewed with the parameter's strides: no copy, no kernel."""
    def view_as_param(p):
        g = p.grad
        same = all(a == b or n == 1 for a, b, n in zip(g.stride(), p.stride(), p.shape))
        if g.stride() != p.stride() and same:
            p.grad = g.as_strided(p.shape, p.stride())

    for p in params:
        if 1 in p.shape:
            p.register_post_accumulate_grad_hook(view_as_param)


# ------------------------------------------------------------------------------------------------
# The whole step as one CUDA graph

GRAPH_WARMUP = 3   # eager steps before the capture: cuDNN autotuning, cuBLAS workspace, Adam state


def cuda_graphed(step_fn, warmup=GRAPH_WARMUP):
    """step_fn(*tensors), captured whole in one CUDA graph and replayed: one launch per step
    instead of hundreds, which bounds the paper's batch of 64 on a fast GPU. Every call is one
    real step: the first `warmup` run eagerly on a side stream (as capture requires), the next is
    captured with its inputs copied into static ones, and later calls copy theirs in and replay.
    The result is one tensor that the next replay overwrites: use it or clone it first. Inputs
    must keep their shapes; the optimisers need Adam(capturable=True) and autocast no cast cache
    (cli.Hardware(cuda_graph=True))."""
    side, graph, static, out, calls = torch.cuda.Stream(), None, None, None, 0

    def step(*batch):
        nonlocal graph, static, out, calls
        calls += 1
        if calls <= warmup:
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                result = step_fn(*batch)
            torch.cuda.current_stream().wait_stream(side)
            return result
        if graph is None:
            static = [b.clone() for b in batch]          # clone keeps the memory format
            graph = torch.cuda.CUDAGraph()
            # thread_local: the worker threads (mask numbers, streamed batches, each on its own
            # stream) may go on during the capture; only this thread's calls are restricted
            try:
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    out = step_fn(*static)               # recorded, not run: replayed below
            except RuntimeError as e:                    # a bug, ours or torch's
                raise RuntimeError(f"capturing the training step as a CUDA graph failed "
                                   f"({str(e).splitlines()[0]}); --no-cuda-graph trains with "
                                   "the same step launched kernel by kernel") from e
        else:
            if [b.shape for b in batch] != [s.shape for s in static]:
                raise RuntimeError(f"cuda_graphed: batch shapes {[tuple(b.shape) for b in batch]}"
                                   f" differ from the captured {[tuple(s.shape) for s in static]}")
            for s, b in zip(static, batch):
                s.copy_(b)
        graph.replay()
        return out

    return step


# ------------------------------------------------------------------------------------------------
# Work prepared one step ahead in a worker thread

def one_step_ahead(fn):
    """fn(step, *rest), with fn(step + 1, *rest) started at once in a worker thread, so that it is
    ready when asked for while the GPU trains on this step. Any other step (the first, a resumed
    run's first) is computed on the spot; the result is always fn's."""
    pool, pending = ThreadPoolExecutor(1, thread_name_prefix="one-step-ahead"), {}

    def get(step, *rest):
        job = pending.pop((step, *rest), None)
        result = job.result() if job else fn(step, *rest)
        pending.clear()
        pending[(step + 1, *rest)] = pool.submit(fn, step + 1, *rest)
        return result

    get.pending = pending                  # {(step, *rest): future} of the work under way
    return get


def copy_ahead(stream, *tensors):
    """In the worker thread: CPU tensors -> `stream`'s GPU through pinned memory, on that side
    stream so that the copy overlaps the step. Returns (GPU tensors, the event marking the copy's
    end) for arrived; with stream None (no GPU), (tensors, None)."""
    if stream is None:
        return tensors, None
    with torch.cuda.stream(stream):
        moved = ce_data.to_device(stream.device, *tensors)
        done = torch.cuda.Event()
        done.record(stream)
    return moved, done


def arrived(tensors, done):
    """In the training thread: copy_ahead's tensors, once the current stream has waited for their
    copy (on the device: the host does not block), marked as used on that stream (so that their
    memory is not reused before it has)."""
    if done is not None:
        current = torch.cuda.current_stream(tensors[0].device)
        current.wait_event(done)
        for t in tensors:
            t.record_stream(current)
    return tensors


def mask_numbers_ahead(args, rank=0, world=1):
    """draw(real, step) -> the step's random mask numbers (ce_masks.mask_numbers) on real's device,
    for ce_train.cut_hole; () for the centre mask. Drawn from (--seed, step), so a resumed run
    repeats them; each rank takes its slice of the global batch's. Drawn on the CPU and copied to
    the GPU one step ahead, in a worker thread on a side stream."""
    if args.mask == "center":
        return lambda real, step: ()
    streams = {}                                  # the side stream per GPU

    def numbers(step, B, size, device):
        mine = slice(rank * B, (rank + 1) * B)
        drawn = ce_masks.mask_numbers(args.mask, B * world, (args.seed, "mask", step), size,
                                      args.mask_per_batch, mine)
        if device.type == "cuda":                 # setdefault: one stream even if threads race
            streams.setdefault(device, torch.cuda.Stream(device))
        return copy_ahead(streams.get(device), *drawn)

    ahead = one_step_ahead(numbers)
    return lambda real, step: arrived(*ahead(step, len(real), real.shape[-1], real.device))


# ------------------------------------------------------------------------------------------------
# Data too large for the device

class StreamedBatches(ce_data.Batches):
    """ce_data.Batches for data too large for the device (ImageNet at 128 px is 63 GB): the uint8
    images stay in host memory (a memory-mapped cache); a worker thread gathers, upsamples (images
    cached below the load size: ce_data.upsample) and augments batch k + 1 into pinned memory
    and copies it on a side stream while batch k trains. The same batches as Batches, step for
    step."""
    streaming = True

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self._prepared = one_step_ahead(self._prepare)
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def _place(self, images):
        return images                                   # stays in host memory

    def _prepare(self, step):
        return copy_ahead(self._copy_stream, self.augmented(step))

    def get(self, step):
        x, = arrived(*self._prepared(step))
        return ce_data.to_float(x, self.dtype, self.channels_last)


def make_batches(images, batch_size, device, *args, resident=None, **kw):
    """Batches, resident on the device when the data fits in 40 % of its free memory (always on a
    CPU); StreamedBatches otherwise."""
    device = torch.device(device)
    if resident is None:    # resident images below the load size are upsampled once there
        side = max(images.shape[1], kw.get("load_size") or 0)
        need = images.nbytes * (side / images.shape[1]) ** 2
        resident = device.type == "cpu" or need < 0.4 * torch.cuda.mem_get_info(device)[0]
    kind = ce_data.Batches if resident else StreamedBatches
    return kind(images, batch_size, device, *args, **kw)
