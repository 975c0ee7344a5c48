"""Train a Context Encoder (Pathak et al., CVPR 2016): the hand-rolled GAN loop of paper section 3.2 / Eq. (3).

    python ce_train.py                                   # embedded 'shapes' data; CPU: a ~5 minute quick start
    python ce_train.py --data tiny --lam-adv 0.005       # Tiny ImageNet (downloaded on first use)
    python ce_train.py --variant official                # the official Lua code's choices (see README)
    python ce_train.py --resume runs/shapes              # continue a run exactly

Each step: one D update on (real centre, detached G(x)), then one G update with the joint loss on the same
batch, reusing that G(x). Logs to OUT/log.jsonl; evaluates, samples and checkpoints every --eval-every steps.
"""
import argparse
import contextlib
import json
import math
import os
import platform
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
import ce_model

# The three variants of paper-notes.md: --variant sets these defaults; any flag given explicitly wins.
VARIANTS = {
    "paper": dict(overlap=7, ring="visible", fill="mean", beta2=0.999, bottleneck_bn=True, bias=False,
                  init="dcgan", rec_reduction="all", d_reduction="sum", flip=True),
    "official": dict(overlap=4, ring="visible", fill="mean", beta2=0.999, bottleneck_bn=True, bias=False,
                     init="dcgan", rec_reduction="all", d_reduction="sum", flip=True),
    "seed": dict(overlap=7, ring="hidden", fill="zero", beta2=0.9, bottleneck_bn=False, bias=True,
                 init="torch", rec_reduction="split", d_reduction="mean", flip=False),
}
# DEVIATION: on a CPU, with no size flags, `python ce_train.py --data shapes` trains a smaller network for fewer
# steps so that the quick start ends in minutes; the paper's network is --width 64 --bottleneck 4000.
CPU_QUICK = dict(width=32, bottleneck=512, batch_size=32, steps=1000, eval_every=250)


def build_parser():
    p = ce_eval.Parser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--variant", default="paper", choices=tuple(VARIANTS),
        help="preset of the flags below: paper text, official Lua code, or seed report (README 'Variants')")
    # data
    add("--data", default="shapes", choices=("shapes", "tiny", "imagenet", "folder"),
        help="shapes: embedded offline data; tiny: Tiny ImageNet (downloads); imagenet/folder: your images")
    add("--data-root", default="data", help="dataset folder; caches go in DATA_ROOT/.ce_cache")
    add("--load-size", type=int, default=128,
        help="shorter side after decoding; 350 gives the official random-crop augmentation (train.lua loadSize)")
    add("--shapes-n", type=int, default=10000, help="training images of the embedded shapes data")
    add("--flip", action=argparse.BooleanOptionalAction, help="random horizontal flip (official: on; seed: off)")
    # optimisation
    add("--batch-size", type=int, default=64, help="per process; paper/official 64")
    add("--epochs", type=int, default=25, help="official train.lua niter=25")
    add("--steps", type=int, default=0, help="total training steps; overrides --epochs when > 0")
    add("--lr-g", type=float, default=0.002, help="generator Adam lr (official: 10x base lr 0.0002, train.lua:215)")
    add("--lr-d", type=float, default=0.0002, help="discriminator Adam lr (official base lr)")
    add("--beta1", type=float, default=0.5, help="Adam beta1 (official, seed)")
    add("--beta2", type=float, help="Adam beta2 (official 0.999, seed code 0.9)")
    # losses, Eq. (1)-(3)
    add("--lam-rec", type=float, default=0.999, help="lambda_rec of Eq. (3) (paper 4: 0.999)")
    add("--lam-adv", type=float, default=0.001, help="lambda_adv of Eq. (3) (paper 4: 0.001); 0 = L2 only, no D")
    add("--overlap", type=int, help="overlap ring width in px (paper text 7, official overlapPred 4, seed 7)")
    add("--overlap-weight", type=float, default=10.0, help="L2 weight on the ring (paper 3.2, official: 10)")
    add("--ring", choices=("visible", "hidden"), help="visible: ring is real context (paper, official); "
                                                     "hidden: whole 64x64 filled (seed)")
    add("--fill", choices=("mean", "zero"), help="hole fill: official per-channel mean, or 0 (seed)")
    add("--rec-reduction", choices=("all", "split"),
        help="Eq. (1) normalisation: mean(W d^2) over all pixels (official) or 10 mean_ring + mean_inner (seed)")
    add("--d-reduction", choices=("sum", "mean"), help="D loss: BCE_real + BCE_fake (official) or their mean (seed)")
    # networks
    add("--width", type=int, default=64, help="channels of the first conv (paper Fig. 2: 64)")
    add("--bottleneck", type=int, default=4000, help="bottleneck channels (paper Fig. 2: 4000)")
    add("--bottleneck-bn", action=argparse.BooleanOptionalAction, help="BN on the bottleneck (official on, seed off)")
    add("--bias", action=argparse.BooleanOptionalAction, help="conv biases (official: none; seed: on)")
    add("--init", choices=("dcgan", "torch"), help="dcgan: N(0, 0.02) (official); torch: PyTorch default (seed)")
    # run
    add("--seed", type=int, default=0, help="seeds weights, data order and augmentation")
    add("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    add("--dtype", default="auto", choices=("auto", "bf16", "fp32"), help="autocast dtype; auto: bf16 on CUDA")
    add("--channels-last", action=argparse.BooleanOptionalAction, help="NHWC tensors (default: on for CUDA)")
    add("--compile", action="store_true", help="torch.compile G and D (measure: not always faster)")
    add("--out", help="run folder (default: runs/<data>, or runs/<data>-N if that is taken)")
    add("--resume", help="continue from a checkpoint (OUT/ckpt.pt) or a run folder; its flags are reused")
    add("--log-every", type=int, default=50, help="steps between log lines (the only host syncs)")
    add("--eval-every", type=int, default=1000, help="steps between evaluation + samples + checkpoint")
    add("--eval-images", type=int, default=512, help="held-out images used at each evaluation")
    return p


ARCH = ce_model.ARCH_KEYS  # what a checkpoint's weights depend on
RUNTIME = ("device", "dtype", "channels_last", "compile", "resume")  # decided afresh on each machine


def explicit_flags(p, argv):
    """The dests given on the command line (parsing again with every default replaced by a sentinel)."""
    sentinel = object()
    q = build_parser()
    q.set_defaults(**{k: sentinel for k in vars(q.parse_args([]))})
    ns = q.parse_args(argv)
    return {k: v for k, v in vars(ns).items() if v is not sentinel}


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    given = explicit_flags(p, argv)
    if args.resume:  # the checkpoint's flags, overridden only by what this command line says
        state = ce_model.read_checkpoint(args.resume)
        saved = state["args"]
        clash = [f"--{k.replace('_', '-')} {given[k]} (checkpoint: {saved[k]})"
                 for k in ARCH if k in given and given[k] != saved.get(k)]
        if clash:
            p.error(f"{state['path']} was trained with other network flags: {', '.join(clash)}; drop them to resume")
        for k, v in saved.items():
            if k not in given and k not in RUNTIME and hasattr(args, k):
                setattr(args, k, v)
        if os.path.basename(state["path"]) != "ckpt.pt" and "out" not in given:
            p.error(f"resuming from {state['path']} would rewind that run's ckpt.pt and log; pass --out NEW_DIR "
                    "to branch a new run from it")
        args.resume, args.out = state["path"], given.get("out", os.path.dirname(state["path"]))
    else:
        for k, v in VARIANTS[args.variant].items():
            if getattr(args, k) is None:
                setattr(args, k, v)
    args.device = ce_eval.resolve_device(args.device, p)
    cuda = args.device.startswith("cuda")
    if args.dtype == "auto":
        args.dtype = "bf16" if cuda else "fp32"
    if args.channels_last is None:
        args.channels_last = cuda
    args.quick = (not args.resume and not cuda and args.data == "shapes"
                  and not set(given) & {"width", "bottleneck", "batch_size", "steps", "epochs"})
    if args.quick:
        for k, v in CPU_QUICK.items():
            if k not in given:
                setattr(args, k, v)
    # nonsense is rejected here, with the flag's name, before any work is done
    checks = [(args.batch_size >= 2, "--batch-size must be >= 2 (BatchNorm needs two images per batch and rank)"), (args.epochs > 0, "--epochs must be > 0"),
              (args.steps >= 0, "--steps must be >= 0"), (args.lr_g > 0 and args.lr_d > 0, "learning rates must be > 0"),
              (0 <= args.beta1 < 1 and 0 <= args.beta2 < 1, "--beta1/--beta2 must be in [0, 1)"),
              (args.lam_rec >= 0 and args.lam_adv >= 0, "--lam-rec/--lam-adv must be >= 0"),
              (args.lam_rec + args.lam_adv > 0, "--lam-rec and --lam-adv cannot both be 0"),
              (0 <= args.overlap < 32, "--overlap must be in [0, 31]: the ring must leave a hole inside the 64px region"),
              (args.overlap_weight > 0, "--overlap-weight must be > 0"),
              (args.width > 0 and args.bottleneck > 0, "--width/--bottleneck must be > 0"),
              (args.load_size >= 128, "--load-size must be >= 128 (the network sees 128x128 crops)"),
              (args.shapes_n > 0, "--shapes-n must be > 0"),
              (args.log_every > 0 and args.eval_every > 0 and args.eval_images > 0,
               "--log-every/--eval-every/--eval-images must be > 0")]
    for ok, msg in checks:
        if not ok:
            p.error(msg)
    if not args.out:
        base = os.path.join("runs", args.data)
        args.out, i = base, 2
        while os.path.exists(os.path.join(args.out, "ckpt.pt")):
            args.out, i = f"{base}-{i}", i + 1
    elif not args.resume and os.path.exists(os.path.join(args.out, "ckpt.pt")):
        p.error(f"{args.out} already holds a run; pass --resume {args.out} to continue it or choose another --out")
    return args


def rng_state():
    s = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def append_log(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _step_of(line):
    """The step of a log line, or None for a line cut short by a kill or a full disk (dropped on resume)."""
    try:
        return json.loads(line).get("step")
    except ValueError:
        return None


def truncate_log(path, step):
    """On resume, drop log lines written after the checkpoint's step (they will be written again)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [ln for ln in f if ln.strip() and (_step_of(ln) or 0) <= step]
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)


def fmt_time(s):
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m" if s >= 3600 else f"{int(s // 60)}m{int(s % 60):02d}s"


def make_train_step(G, D, optG, optD, W, args, ctx=contextlib.nullcontext(), ddp=None):
    """The iteration of paper 3.2 as a function of one masked batch: a D step on (real centre, detached G(x)),
    then a G step with the joint loss of Eq. (3) reusing that same G(x). Returns a (5,) tensor: loss_D, loss_rec,
    loss_adv, D(x), D(G(x)), left on the device (no host sync). With lambda_adv = 0, D is never run.

    ddp wraps G and D for DistributedDataParallel (gradients averaged across ranks in backward). The G step's
    pass through D uses the plain module: D is frozen there, and DDP would wait for gradients that never come.
    """
    wrap = ddp or (lambda m: m)
    maybe_compile = torch.compile if args.compile else (lambda m: m)
    fG, fD, fD_frozen = maybe_compile(wrap(G)), maybe_compile(wrap(D)), maybe_compile(D)
    use_d = args.lam_adv > 0

    def train_step(masked, target):
        with ctx:
            fake = fG(masked)                                               # (B, 3, 64, 64), the only G forward
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
        loss_rec = ce_losses.reconstruction_loss(fake, target, W)
        loss_g = ce_losses.joint_loss(loss_rec, loss_adv, args.lam_rec, args.lam_adv)
        optG.zero_grad(set_to_none=True)
        loss_g.backward()
        optG.step()
        with torch.no_grad():
            return torch.stack([loss_d.float(), loss_rec.float(), loss_adv.float(),
                                torch.sigmoid(logit_real.float()).mean(), torch.sigmoid(logit_fake.float()).mean()])

    return train_step


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


def main(argv=None):
    args = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # progress shows up at once, also when piped to a file
    rank, world = setup_distributed(args)
    master = rank == 0                            # only rank 0 prints, logs, samples and checkpoints
    say = print if master else (lambda *a, **k: None)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)                  # same initial weights on every rank
    # DEVIATION: on CUDA the step runs under bf16 autocast with channels_last tensors (speed; --dtype fp32 and
    # --no-channels-last turn them off); the losses are computed in float32 either way.
    dtype = torch.bfloat16 if args.dtype == "bf16" else None
    ctx = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    mem_fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # ---- data: decoded once into uint8, then batches are made on the device
    train_u8 = ce_data.load_split(args.data, args.data_root, "train", args.load_size, args.shapes_n)
    val_u8 = ce_data.load_split(args.data, args.data_root, "val", args.load_size, args.shapes_n)[:args.eval_images]
    batches = ce_data.Batches(train_u8, args.batch_size, device, args.seed, args.flip, 128, args.channels_last,
                              torch.float32, rank, world)
    total = args.steps or args.epochs * batches.steps_per_epoch

    # ---- networks, optimisers (paper 4: Adam, beta1 0.5), loss weights
    G, D = ce_model.build_models(args.width, args.bottleneck, args.bottleneck_bn, args.bias, args.init)
    if world > 1 and device.type == "cuda":  # BN statistics over the global batch, as in one process
        G, D = nn.SyncBatchNorm.convert_sync_batchnorm(G), nn.SyncBatchNorm.convert_sync_batchnorm(D)
    G, D = G.to(device, memory_format=mem_fmt), D.to(device, memory_format=mem_fmt)
    optG = torch.optim.Adam(G.parameters(), lr=args.lr_g, betas=(args.beta1, args.beta2))
    optD = torch.optim.Adam(D.parameters(), lr=args.lr_d, betas=(args.beta1, args.beta2))
    W = ce_losses.overlap_weights(64, args.overlap, args.overlap_weight, args.rec_reduction).to(device)
    step, best = 0, -math.inf
    log_path = os.path.join(args.out, "log.jsonl")
    if master:
        os.makedirs(os.path.join(args.out, "samples"), exist_ok=True)
        for f in os.listdir(args.out):  # temp files of a run killed while writing (the real files are intact)
            if ".tmp" in f:
                os.remove(os.path.join(args.out, f))
    if args.resume:
        state = ce_model.read_checkpoint(args.resume)
        G.load_state_dict(state["G"]), D.load_state_dict(state["D"])
        optG.load_state_dict(state["optG"]), optD.load_state_dict(state["optD"])
        step, best = state["step"], state.get("best_psnr", -math.inf)
        window = state.get("log_window", {"acc": torch.zeros(5), "n_acc": 0, "d_wins": 0})
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and device.type == "cuda":
            for i, st in enumerate(state["rng"]["cuda"][:torch.cuda.device_count()]):
                torch.cuda.set_rng_state(st, i)
        if master:
            truncate_log(log_path, step)
        say(f"resumed {state['path']} at step {step}")
    ddp = (lambda m: DDP(m, device_ids=[device.index] if device.type == "cuda" else None)) if world > 1 else None
    train_step = make_train_step(G, D, optG, optD, W, args, ctx, ddp)

    say(f"Context Encoder | {args.data} ({len(train_u8)} train / {len(val_u8)} held-out images) | "
        f"G {ce_model.count_params(G) / 1e6:.2f}M D {ce_model.count_params(D) / 1e6:.2f}M params | "
        f"{total} steps x {args.batch_size}{f' x {world} ranks' if world > 1 else ''} | {device} {args.dtype} | "
        f"out {args.out}")
    say("config: " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in sorted(vars(args).items())))
    if args.quick:
        say("CPU quick start: a smaller network (--width 32 --bottleneck 512) for 1000 steps; pass --width 64 "
            "--bottleneck 4000 --steps N for the paper's network")
    if master:
        ce_eval.atomic_write(os.path.join(args.out, "args.json"), json.dumps(vars(args), indent=1))

    # fixed held-out batch for the sample grids
    fixed = ce_data.to_float(ce_eval.center_crop(torch.from_numpy(val_u8[:16].copy()))).to(device)

    def checkpoint(path):
        ce_model.save_checkpoint(path, {
            "G": G.state_dict(), "D": D.state_dict(), "optG": optG.state_dict(), "optD": optD.state_dict(),
            "step": step, "epoch": batches.epoch_of(step), "best_psnr": best, "args": vars(args), "rng": rng_state(),
            "log_window": {"acc": acc.cpu(), "n_acc": n_acc, "d_wins": d_wins},
            "versions": {"torch": str(torch.__version__), "python": platform.python_version()}})

    def check_finite():
        """Stop, naming the step, if a loss went NaN/Inf: nothing non-finite is ever written over a checkpoint."""
        bad = int(bad_step)  # CPU-GPU sync point (log and eval steps only)
        if bad >= 0:
            sys.exit(f"error: a loss became NaN/Inf at step {bad}; training stopped without saving. Last good "
                     f"checkpoint: {last_good or 'none yet'} (left intact). Try a lower --lr-g/--lr-d or --lam-adv, "
                     f"or resume from it with another --seed.")

    def evaluate_and_save():
        nonlocal best
        check_finite()
        r = ce_eval.evaluate(G, val_u8, args.overlap, args.ring, args.fill, ("model",), dtype=dtype)["model"]
        masked, filled = ce_eval.inpaint(G, fixed, args.overlap, args.ring, args.fill, dtype)
        ce_eval.save_grid(os.path.join(args.out, "samples", f"step_{step:07d}.png"), [masked, filled, fixed])
        is_best = r["psnr"] > best
        best = max(best, r["psnr"])
        # order matters for a kill at any moment: the log record, then best.pt, then ckpt.pt (which resumes)
        append_log(log_path, {"step": step, "eval": {k: round(v, 4) for k, v in r.items()}})
        if is_best:
            checkpoint(os.path.join(args.out, "best.pt"))
        checkpoint(os.path.join(args.out, "ckpt.pt"))
        ce_eval.plot_curves([args.out], os.path.join(args.out, "curves.png"))
        ce_eval.make_gif(args.out)
        print(f"eval @ {step}: held-out PSNR {r['psnr']:.2f} dB, L1 {r['l1']:.2f} %, L2 {r['l2']:.2f} % "
              f"(hole, {r['n_images']} images){' *best*' if is_best else ''}")

    # SIGINT / SIGTERM: finish the current step, save, say how to resume. With several ranks they agree on
    # stopping at the next log step, so that all stop at the same step.
    stop = []
    previous = {sig: signal.signal(sig, lambda s, f: stop.append(s)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        # loss_D, loss_rec, loss_adv, D(x), D(G(x)) summed since the last log line (restored on resume, so that the
        # log lines of a resumed run are those of an uninterrupted one)
        acc = window["acc"].to(device) if args.resume else torch.zeros(5, device=device)
        bad_step = torch.full((), -1, dtype=torch.long, device=device)  # first step with a non-finite loss, on device
        n_acc, d_wins = (window["n_acc"], window["d_wins"]) if args.resume else (0, 0)
        t_log, halt = time.time(), False
        last_good = os.path.join(args.out, "ckpt.pt") if args.resume else None
        use_d = args.lam_adv > 0
        G.train(), D.train()
        while step < total and not halt:
            real = batches.get(step)                                            # (B, 3, 128, 128) in [-1, 1]
            masked, target = ce_data.mask_batch(real, args.overlap, args.ring, args.fill)
            s = train_step(masked, target)                                      # (5,) on the device, no sync
            step += 1
            with torch.no_grad():
                acc += s
                bad_step = torch.where((bad_step < 0) & ~torch.isfinite(s).all(), step, bad_step)
            n_acc += 1
            halt = bool(stop) and world == 1

            if step % args.log_every == 0 or step == total:
                if world > 1:   # all ranks stop together: if any was signalled, or any saw a NaN
                    flag = torch.tensor([float(bool(stop))], device=device)
                    dist.all_reduce(flag)
                    dist.all_reduce(bad_step, op=dist.ReduceOp.MAX)
                    halt = flag.item() > 0
                vals = (acc / n_acc).tolist()   # CPU-GPU sync point: the only one in a normal step
                check_finite()
                if world > 1:                   # all ranks stop together if any was signalled
                    flag = torch.tensor([float(bool(stop))], device=device)
                    dist.all_reduce(flag)
                    halt = flag.item() > 0
                dt = time.time() - t_log
                ips = n_acc * args.batch_size * world / dt
                rec = dict(zip(("loss_D", "loss_rec", "loss_adv", "D_x", "D_G_x"), vals))
                d_wins = d_wins + 1 if use_d and rec["D_G_x"] < 0.01 else 0
                warn = (f" | warning: D has won outright for {d_wins} log windows (D(G(x)) ~ 0); "
                        "a lower --lam-adv or --lr-d usually helps") if d_wins >= 3 else ""
                gan = (f"loss_D {rec['loss_D']:.3f} | rec {rec['loss_rec']:.4f} | adv {rec['loss_adv']:.3f} | "
                       f"D(x) {rec['D_x']:.2f} | D(G(x)) {rec['D_G_x']:.2f}") if use_d else f"rec {rec['loss_rec']:.4f}"
                say(f"step {step}/{total} | epoch {batches.epoch_of(step - 1)} | {gan} | {ips:,.0f} img/s | "
                    f"ETA {fmt_time((total - step) * dt / n_acc)}{warn}")
                if master:
                    append_log(log_path, {"step": step, "epoch": batches.epoch_of(step - 1),
                                          **{k: round(v, 6) for k, v in rec.items()}, "img_per_s": round(ips, 1),
                                          "time": round(time.time(), 2), **({"warning": "D wins"} if warn else {})})
                acc.zero_()
                n_acc, t_log = 0, time.time()
            if master and (step % args.eval_every == 0 or step == total):
                evaluate_and_save()
                last_good = os.path.join(args.out, "ckpt.pt")
                t_log = time.time()  # evaluation is not training time

        if world > 1:  # every rank must hold the same weights: DDP's promise, checked once at the end
            flat = torch.cat([p.detach().float().flatten() for p in G.parameters()])
            ref = flat.clone()
            dist.broadcast(ref, 0)
            diff = (flat - ref).abs().max()
            dist.all_reduce(diff, op=dist.ReduceOp.MAX)
            say(f"DDP: {world} ranks, max |weight - rank 0 weight| = {diff.item():.3g}")
            dist.destroy_process_group()
        if halt:   # a signal (on any rank): save where we are and say how to go on
            check_finite()
            if master:
                checkpoint(os.path.join(args.out, "ckpt.pt"))
            sig = stop[0] if stop else signal.SIGTERM
            name = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}.get(sig, "signal")
            say(f"\n{name}: saved {args.out}/ckpt.pt at step {step}/{total}. "
                f"Resume with: python ce_train.py --resume {args.out}")
            sys.exit(128 + sig)
        say(f"done: {step} steps, best held-out PSNR {best:.2f} dB. "
            f"Evaluate with: python ce_eval.py --ckpt {args.out}/best.pt")
    finally:   # leave the process as we found it (ce_sweep.py calls main() in a loop)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    ce_eval.cli(main)
