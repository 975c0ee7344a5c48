"""Train a Context Encoder (Pathak et al., CVPR 2016): the hand-rolled GAN loop of paper section 3.2 / Eq. (3).

    python ce_train.py                                   # embedded 'shapes' data; CPU: a 3-5 minute quick start
    python ce_train.py --data tiny --lam-adv 0.005       # Tiny ImageNet (downloaded on first use)
    python ce_train.py --variant official                # the official Lua code's choices (see README)
    python ce_train.py --resume runs/shapes              # continue a run exactly
    python ce_train.py --resume runs/shapes/best.pt --out runs/mine --data folder --data-root DIR --steps 3000
                                                         # fine-tune on your images (--steps counts in total)

Each step: one D update on (real centre, detached G(x)), then one G update with the joint loss on the same
batch, reusing that G(x). Logs to OUT/log.jsonl; evaluates, samples and checkpoints every --eval-every steps.
Read main() first: it is the whole algorithm; the helpers above it are defined in the order main uses them.
The flags, their paper values and the variant presets are in ce_utils/config.py; the run's bookkeeping (its state,
saving and resuming it exactly, its folder, the lines it prints at the start) in ce_utils/runstate.py.
"""
import contextlib
import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import ce_data
import ce_eval
import ce_losses
import ce_masks
import ce_model
from ce_utils import cli, config, datasets, figures, runstate

# ----------------------------------------------------------------------------------------------------------------
# Networks, optimisers and the training step

def setup_distributed(args):
    """torchrun sets WORLD_SIZE, RANK, LOCAL_RANK: one process per GPU (NCCL) or per CPU worker (gloo)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if args.device.startswith("cuda"):
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(args.device)
    dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    return dist.get_rank(), world


def ddp_wrapper(device, world):
    """module -> DistributedDataParallel(module) with several ranks; None with one. broadcast_buffers=False:
    BatchNorm's running statistics are already the global batch's on CUDA (SyncBatchNorm) and are rank 0's own on
    a CPU, and rank 0 is the one that evaluates and saves; broadcasting them at every forward changed them in
    place between D's two forwards of a step (real, then fake), which autograd refused in the backward with torch
    2.11 on a CPU ("modified by an inplace operation")."""
    if world == 1:
        return None
    ids = [device.index] if device.type == "cuda" else None
    return lambda module: DDP(module, device_ids=ids, broadcast_buffers=False)


def match_grad_strides(params):
    """The fused Adam refuses a gradient whose strides differ from its parameter's, and autograd may return one
    that differs along a dimension of size 1 (PyTorch issue 106951; here D's last conv weight, (1, C, 4, 4), with
    some cuDNN kernels). Such a stride never moves in memory, so after each accumulation the gradient is viewed with
    the parameter's strides: the same memory, no copy, no kernel."""
    def view_as_param(p):
        g = p.grad
        if g.stride() != p.stride() and all(a == b or n == 1 for a, b, n in zip(g.stride(), p.stride(), p.shape)):
            p.grad = g.as_strided(p.shape, p.stride())

    for p in params:
        if 1 in p.shape:
            p.register_post_accumulate_grad_hook(view_as_param)


def build_training(args, hw, world=1, fused=None):
    """G and D of paper Fig. 2 (or the AlexNet model of 5.2), their Adam optimisers (paper 4: beta1 0.5, lr 0.002 /
    0.0002) and the weight map W of Eq. (1) for the centre mask (random masks get theirs per batch, make_masker), on
    hw's device in hw's memory format. Several CUDA ranks: BatchNorm over the global batch. --cuda-graph: Adam
    keeps its step count on the device (capturable), so that its update can be replayed in a graph, and is fused
    (one kernel per update instead of a few dozen; fused=False: the multi-tensor version, as without a graph on
    CUDA; on a CPU the plain loop)."""
    G, D = ce_model.build_pair(vars(args), args.init)
    if world > 1 and hw.device.type == "cuda":
        G, D = nn.SyncBatchNorm.convert_sync_batchnorm(G), nn.SyncBatchNorm.convert_sync_batchnorm(D)
    G, D = G.to(hw.device, memory_format=hw.mem_fmt), D.to(hw.device, memory_format=hw.mem_fmt)
    graph, cuda = bool(args.cuda_graph), hw.device.type == "cuda"
    fused = graph if fused is None else fused      # stated in full: torch's default has changed between versions
    how = dict(capturable=graph, fused=fused, foreach=cuda and not fused)
    optG = torch.optim.Adam(G.parameters(), lr=args.lr_g, betas=(args.beta1, args.beta2), **how)
    optD = torch.optim.Adam(D.parameters(), lr=args.lr_d, betas=(args.beta1, args.beta2), **how)
    if fused:
        match_grad_strides([*G.parameters(), *D.parameters()])
    W = ce_losses.overlap_weights(64, args.overlap, args.overlap_weight, args.rec_reduction).to(hw.device)
    return G, D, optG, optD, W


def make_masker(args, W, rank=0, world=1, fixed=None):
    """The masks of paper 3.3, as two functions. draw_numbers(real, step) -> the step's random numbers, a tuple of
    tensors on real's device (empty for the centre). cut_holes(real, *numbers) -> (masked input, target, weight map
    W of Eq. 1): device work only (no host sync, nothing random), so that cuda_graphed can capture it with the
    training step. centre: the square hole, the 64x64 target and the constant W. block/region: fresh masks at every
    step, from (--seed, step) (so a resumed run repeats them; with several ranks, each takes its slice of the global
    batch's masks), the whole image as target, and W from the mask (ce_losses.hole_weights or context_weights, by
    --rec-loss). The numbers are drawn on the CPU one step ahead in a worker thread (ce_data.one_step_ahead), which
    also copies them to the device (ce_data.copy_ahead). fixed: one (B, 1, S, S) mask for every step instead
    (ce_bench times the step with it, to see what making masks costs)."""
    if args.mask == "center":
        def cut_centre(real):
            return (*ce_data.mask_batch(real, args.overlap, args.ring, args.fill), W)
        return (lambda real, step: ()), cut_centre

    streams = {}                                 # the side stream per GPU that the numbers are copied on

    def ahead_of_time(step, B, size, device):   # every random number of the step, then its copy to the device
        numbers = ce_masks.mask_numbers(args.mask, B * world, (args.seed, "mask", step), size, args.mask_per_batch,
                                        slice(rank * B, (rank + 1) * B))
        if device.type == "cuda" and device not in streams:   # (setdefault: one stream even if two threads race)
            streams.setdefault(device, torch.cuda.Stream(device))
        return ce_data.copy_ahead(streams.get(device), *numbers)
    # In the worker thread, the copy too, on its own stream: it overlaps the step instead of queueing behind it
    # (thread_local capture lets it go on during cuda_graphed's capture, which would forbid it in this thread).
    ahead = ce_data.one_step_ahead(ahead_of_time) if fixed is None else None

    def draw_numbers(real, step):
        if fixed is not None:
            return ()
        return ce_data.arrived(*ahead(step, len(real), real.shape[-1], real.device))

    def cut_holes(real, *numbers):
        B, size = len(real), real.shape[-1]
        hole = fixed if fixed is not None else ce_masks.random_masks(
            args.mask, B * world, None, size, real.device, args.mask_per_batch, slice(rank * B, (rank + 1) * B),
            numbers)                                                                              # (B, 1, S, S)
        if args.rec_loss == "hole":
            weight = ce_losses.hole_weights(hole, args.overlap, args.overlap_weight)
        else:
            weight = ce_losses.context_weights(hole, args.overlap_weight if args.overlap > 0 else 1.0)
        return ce_data.apply_mask(real, hole, args.fill), real, weight

    return draw_numbers, cut_holes


def masked_step(train_step, cut_holes):
    """(real batch, its mask numbers) -> train_step(*cut_holes(real, *numbers)): the masking (paper 3.3) and the
    training step as one function, which cuda_graphed captures whole, the masks' kernels included."""
    return lambda real, *numbers: train_step(*cut_holes(real, *numbers))


def make_train_step(G, D, optG, optD, W, args, ctx=contextlib.nullcontext(), ddp=None):
    """The iteration of paper 3.2 as a function of one masked batch: a D step on (real centre, detached G(x)),
    then a G step with the joint loss of Eq. (3) reusing that same G(x) (whole images instead of centres for the
    random-mask model; its W comes with each batch). Returns a (5,) tensor: loss_D, loss_rec,
    loss_adv, D(x), D(G(x)), left on the device (no host sync). With lambda_adv = 0, D is never run.

    ctx is the autocast context (cli.Hardware.ctx; none by default). ddp wraps G and D for
    DistributedDataParallel (gradients averaged across ranks in backward). The G step's pass through D uses the
    plain module: D is frozen there, and DDP would wait for gradients that never come.
    """
    wrap = ddp or (lambda m: m)
    maybe_compile = torch.compile if args.compile else (lambda m: m)
    fG, fD, fD_frozen = maybe_compile(wrap(G)), maybe_compile(wrap(D)), maybe_compile(D)
    use_d = args.lam_adv > 0

    def train_step(masked, target, weight=W):
        with ctx:
            fake = fG(masked)                    # (B, 3, 64, 64) centre or (B, 3, 128, 128) image: the only G forward
        # ---- D step, Eq. (2): max log D(y) + log(1 - D(G(x))), on the detached fake
        if use_d:
            D.requires_grad_(True)
            with ctx:
                logit_real, logit_fake = fD(target), fD(fake.detach())
            loss_d = ce_losses.discriminator_loss(logit_real, logit_fake, args.d_reduction)
            optD.zero_grad(set_to_none=True)
            loss_d.backward()
            optD.step()
            D.requires_grad_(False)   # the G step needs gradients through D, not for D's weights
            # DEVIATION: D is run again on the fake after its update (PyTorch's DCGAN); official train.lua reuses
            # the D output computed before the update.
            with ctx:
                loss_adv = ce_losses.generator_adversarial_loss(fD_frozen(fake))
        else:
            loss_d = loss_adv = logit_real = logit_fake = torch.zeros((), device=masked.device)
        # ---- G step, Eq. (3): lambda_rec * L_rec (Eq. 1) + lambda_adv * L_adv, same batch, same G(x)
        loss_rec = ce_losses.reconstruction_loss(fake, target, weight)
        loss_g = ce_losses.joint_loss(loss_rec, loss_adv, args.lam_rec, args.lam_adv)
        optG.zero_grad(set_to_none=True)
        loss_g.backward()
        optG.step()
        with torch.no_grad():
            return torch.stack([loss_d.float(), loss_rec.float(), loss_adv.float(),
                                torch.sigmoid(logit_real.float()).mean(), torch.sigmoid(logit_fake.float()).mean()])

    return train_step


GRAPH_WARMUP = 3   # ordinary steps before the capture: cudnn's autotuning, cuBLAS's workspace, Adam's state


def cuda_graphed(train_step, warmup=GRAPH_WARMUP):
    """train_step, captured whole (the masks (masked_step), G forward, the D update, the G update, both Adam steps)
    in one CUDA graph and replayed: one launch per step instead of hundreds, which is what bounds the paper's batch
    of 64 on a fast GPU. Same arguments and result, except that the result is one tensor that the next replay
    overwrites: use it (as RunState.add does) or clone it before the next call. Every call is one real training
    step: the first `warmup` run eagerly on a side stream (as capture requires); the next one is captured with its
    batch copied into the graph's static inputs, then replayed; after that each call copies its batch (the real
    images and the masks' random numbers) into those inputs and replays. The batch must keep its shapes (Batches
    drops the last partial batch). Needs Adam(capturable=True) (build_training) and, under autocast, no cast cache
    (cli.Hardware(cuda_graph=True)). Other threads' CUDA calls (the copies of Batches' streaming thread and of
    make_masker's worker, on their own streams) do not disturb the capture. The eager make_train_step stays the
    reference the graph is tested against (tests/test_cuda_graph.py)."""
    side, graph, static, out, calls = torch.cuda.Stream(), None, None, None, 0

    def step(*batch):
        nonlocal graph, static, out, calls
        calls += 1
        if calls <= warmup:
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                result = train_step(*batch)
            torch.cuda.current_stream().wait_stream(side)
            return result
        if graph is None:
            static = [b.clone() for b in batch]          # clone keeps the memory format (channels_last)
            graph = torch.cuda.CUDAGraph()
            # thread_local: the threads that prepare the next step (the masks' numbers, a streamed batch's pinned
            # copy on its own stream) may go on during the capture; only this thread's calls are restricted
            try:
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    out = train_step(*static)            # recorded, not run: the replay below runs it
            except RuntimeError as e:                    # a bug, ours or torch's: say how to train meanwhile
                raise RuntimeError(f"capturing the training step as a CUDA graph failed ({str(e).splitlines()[0]}); "
                                   "--no-cuda-graph trains with the same step launched kernel by kernel") from e
        else:
            if [b.shape for b in batch] != [s.shape for s in static]:
                raise RuntimeError(f"cuda_graphed: batch shapes {[tuple(b.shape) for b in batch]} differ from the "
                                   f"captured {[tuple(s.shape) for s in static]}")
            for s, b in zip(static, batch):
                s.copy_(b)
        graph.replay()
        return out

    return step


# ----------------------------------------------------------------------------------------------------------------
# Logging, evaluation, the end of a run

def is_log_step(step, args, total):
    """Every --log-every steps and the last; also steps 1 and 10 when the interval is longer, so that a run shows
    life (and an ETA) within seconds. A function of the step alone: a resumed run writes the same lines."""
    return step % args.log_every == 0 or step == total or (args.log_every > 10 and step in (1, 10))


def log_window(run, stop, args, total, epoch, world, master):
    """A log line with the window's mean statistics (the only CPU-GPU sync of a normal step). With several ranks,
    one all-reduce makes them agree on stopping (a signal or a NaN on any rank). Returns: stop now?"""
    halt = bool(stop)
    if world > 1:
        flags = torch.stack([torch.tensor(int(halt), device=run.acc.device), run.bad_step])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        halt, run.bad_step = bool(flags[0]), flags[1]
    rec = dict(zip(runstate.STATS, (run.acc / run.n_acc).tolist()))   # CPU-GPU sync point
    run.check_finite()
    dt = time.time() - run.t_log
    ips = run.n_acc * args.batch_size * world / dt
    use_d = args.lam_adv > 0
    run.d_wins = run.d_wins + 1 if use_d and rec["D_G_x"] < 0.01 else 0
    # Common with the paper's small lambda_adv (0.001), where the L2 term does most of G's training: worth a look
    # at the samples, not a stop.
    warn = (f" | warning: D has won outright for {run.d_wins} log windows (D(G(x)) ~ 0; usual with a small "
            "--lam-adv such as the paper's 0.001); if samples stop improving, a lower --lam-adv or --lr-d usually "
            "helps") if run.d_wins >= 3 else ""
    gan = (f"loss_D {rec['loss_D']:.3f} | rec {rec['loss_rec']:.4f} | adv {rec['loss_adv']:.3f} | "
           f"D(x) {rec['D_x']:.2f} | D(G(x)) {rec['D_G_x']:.2f}") if use_d else f"rec {rec['loss_rec']:.4f}"
    if master:   # the ETA: the window's pace (step 1's includes the warm-up)
        print(f"step {run.step}/{total} | epoch {epoch} | {gan} | {ips:,.0f} img/s | "
              f"ETA {runstate.fmt_time((total - run.step) * dt / run.n_acc)}{warn}")
        cli.append_log(os.path.join(args.out, "log.jsonl"), {
            "step": run.step, "epoch": epoch, **{k: round(v, 6) for k, v in rec.items()}, "img_per_s": round(ips, 1),
            "time": round(time.time(), 2), **({"warning": "D wins"} if warn else {})})
    run.acc.zero_()
    run.n_acc, run.t_log = 0, time.time()
    return halt


def evaluate_and_save(run, nets, args, val_u8, fixed, hw, epoch, total):
    """Held-out metrics (ce_eval), a sample grid, the log record, best.pt, ckpt.pt, and now and then the curves
    and the GIF; none of it when a loss, a weight or the evaluation is NaN/Inf (the run stops, naming the last good
    checkpoint)."""
    run.check_finite(nets)
    G = nets["G"]
    r = ce_eval.evaluate(G, val_u8, args.overlap, args.ring, args.fill, ("model",), dtype=hw.dtype,
                         mask=args.mask, size=ce_model.INPUT_SIZE[args.arch])["model"]
    run.check_finite(evaluation=r)
    masked, filled = ce_eval.inpaint(G, fixed, args.overlap, args.ring, args.fill, hw.dtype, args.mask)
    os.makedirs(os.path.join(args.out, "samples"), exist_ok=True)
    figures.save_grid(os.path.join(args.out, "samples", f"step_{run.step:07d}.png"), [masked, filled, fixed])
    is_best = r["psnr"] > run.best
    run.best = max(run.best, r["psnr"])
    # order matters for a kill at any moment: the log record, then best.pt, then ckpt.pt (which resumes)
    cli.append_log(os.path.join(args.out, "log.jsonl"),
                      {"step": run.step, "eval": {k: round(v, 4) for k, v in r.items()}})
    if is_best:
        runstate.save(os.path.join(args.out, "best.pt"), nets, args, run, epoch)
    runstate.save(os.path.join(args.out, "ckpt.pt"), nets, args, run, epoch)
    run.last_good = os.path.join(args.out, "ckpt.pt")
    if run.step == total or time.time() - run.t_pictures >= PICTURES_EVERY_S:
        draw_pictures(run, args)
    print(f"eval @ {run.step}: held-out PSNR {r['psnr']:.2f} dB, L1 {r['l1']:.2f} %, L2 {r['l2']:.2f} % "
          f"(hole, {r['n_images']} images){' *best*' if is_best else ''}")
    run.t_log = time.time()  # evaluation is not training time


PICTURES_EVERY_S = 60   # curves.png and evolution.gif: redrawn at an evaluation at most this often, and at the end


def draw_pictures(run, args):
    """OUT/curves.png and OUT/evolution.gif from the log and the sample grids so far. About a second each time
    (matplotlib's text layout), so at an evaluation at most every PICTURES_EVERY_S seconds, and when the run ends
    or is stopped by a signal."""
    figures.plot_curves([args.out], os.path.join(args.out, "curves.png"))
    figures.make_gif(args.out)
    run.t_pictures = time.time()


def finish(run, nets, args, stop, halt, world, total, epoch, master):
    """Ranks check that they hold the same weights; a signal saves ckpt.pt and says how to resume."""
    if world > 1:  # DDP's promise, checked once at the end
        flat = torch.cat([p.detach().float().flatten() for p in nets["G"].parameters()])
        ref = flat.clone()
        dist.broadcast(ref, 0)
        diff = (flat - ref).abs().max()
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
        if master:
            print(f"DDP: {world} ranks, max |weight - rank 0 weight| = {diff.item():.3g}")
        dist.destroy_process_group()
    if halt:   # a signal (on any rank): save where we are and say how to go on
        run.check_finite(nets)
        sig = stop[0] if stop else signal.SIGTERM
        name = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}.get(sig, signal.Signals(sig).name)
        if master:
            runstate.save(os.path.join(args.out, "ckpt.pt"), nets, args, run, epoch)
            print(f"\n{name}: saved {args.out}/ckpt.pt at step {run.step}/{total}. "
                  f"Resume with: python ce_train.py --resume {args.out}")
            try:       # the pictures are a convenience: failing to draw them must not change how the run ends
                if os.path.exists(os.path.join(args.out, "log.jsonl")):
                    draw_pictures(run, args)
            except OSError as e:
                print(f"warning: curves/GIF not redrawn ({e})", file=sys.stderr)
        sys.exit(128 + sig)
    if master:
        best = next((p for p in ("best.pt", "ckpt.pt") if os.path.exists(os.path.join(args.out, p))), None)
        result = f"best held-out PSNR {run.best:.2f} dB" if math.isfinite(run.best) else "no evaluation in this run"
        print(f"done: {run.step} steps, {result}" + (
            f". Evaluate with: python ce_eval.py --ckpt {args.out}/{best}" if best else "; no checkpoint written"))


# ----------------------------------------------------------------------------------------------------------------

def main(argv=None):
    args = config.parse_args(argv, __doc__)
    if hasattr(sys.stdout, "reconfigure"):       # (a notebook's stdout has none)
        sys.stdout.reconfigure(line_buffering=True)  # progress shows up at once, also when piped to a file
    rank, world = setup_distributed(args)
    master = rank == 0                            # only rank 0 prints, logs, samples and checkpoints
    hw = cli.Hardware(args.device, args.dtype, args.channels_last, args.cuda_graph)
    torch.manual_seed(args.seed)                  # same initial weights on every rank
    with runstate.run_folder(args, master):         # OUT is this run's until it ends: a second run is refused
        # ---- data: decoded once into uint8 (ce_datasets), batches cut, augmented and masked on the device (ce_data)
        train_u8 = datasets.load_split(args.data, args.data_root, "train", args.load_size, args.shapes_n)
        val_u8 = datasets.load_split(args.data, args.data_root, "val", args.load_size,
                                        args.shapes_n)[:args.eval_images]
        size = ce_model.INPUT_SIZE[args.arch]                 # 128 px crops (Fig. 2), 227 for AlexNet (5.2)
        batches = ce_data.Batches(train_u8, args.batch_size, hw.device, args.seed, args.flip, size,
                                  hw.channels_last, torch.float32, rank, world)
        total = args.steps or args.epochs * batches.steps_per_epoch
        fixed = ce_data.eval_batch(val_u8[:16], size).to(hw.device)   # the same 16 held-out images in every grid

        # ---- networks and optimisers (paper 4); a resumed run takes up all of its state
        G, D, optG, optD, W = build_training(args, hw, world)
        nets = dict(G=G, D=D, optG=optG, optD=optD)
        run = runstate.RunState(hw.device)
        if args.resume:
            runstate.resume(args, nets, run, hw.device, master, total)
        draw_numbers, cut_holes = make_masker(args, W, rank, world)
        train_step = masked_step(make_train_step(G, D, optG, optD, W, args, hw.ctx, ddp_wrapper(hw.device, world)),
                                 cut_holes)
        if args.cuda_graph:                       # CUDA, one device: the same step, masking included, as one graph
            train_step = cuda_graphed(train_step)
        if master:
            runstate.announce(args, world, len(train_u8), len(val_u8), G, D, total)

        # ---- train: batch -> D step (Eq. 2) -> G step (Eq. 3) -> log -> evaluate, sample, checkpoint
        G.train(), D.train()
        halt = False
        with cli.signals_caught() as stop:    # SIGINT/SIGTERM/SIGHUP: finish the step, save, say how to resume
            run.t_log = time.time()
            while run.step < total and not halt:
                real = batches.get(run.step)                                    # (B, 3, 128, 128) in [-1, 1]
                numbers = draw_numbers(real, run.step)        # the step's random mask numbers (none for the centre)
                run.add(train_step(real, *numbers))  # hole (3.3) + W of Eq. (1), D and G steps; (5,) on the device
                halt = bool(stop) and world == 1  # several ranks agree on stopping at the next log step
                if is_log_step(run.step, args, total):
                    halt = log_window(run, stop, args, total, batches.epoch_of(run.step - 1), world, master)
                if master and (run.step % args.eval_every == 0 or run.step == total):
                    evaluate_and_save(run, nets, args, val_u8, fixed, hw, batches.epoch_of(run.step), total)
            finish(run, nets, args, stop, halt, world, total, batches.epoch_of(run.step), master)


if __name__ == "__main__":
    cli.run(main)
