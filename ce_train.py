"""Train a Context Encoder (Pathak et al., CVPR 2016): the GAN loop of paper 3.2, Eq. (3).

    python ce_train.py                               # embedded offline data; a CPU quick start
    python ce_train.py --data tiny --lam-adv 0.005   # Tiny ImageNet (downloaded on first use)
    python ce_train.py --variant official            # the official Lua code's choices
    python ce_train.py --mask region                 # random regions, the whole-image model (3.3)
    python ce_train.py --resume runs/shapes          # continue a run exactly
    python ce_train.py --resume runs/shapes/best.pt --out runs/mine --data folder --data-root DIR \\
        --steps 3000                                 # fine-tune on your images (--steps: in total)

Each step cuts the hole, runs G once, updates D on (real, detached G(x)) (Eq. 2), then G with the
joint loss (Eq. 3) on the same G(x). Read top to bottom: the flags, the networks, train_step, the
logging around it, main(). Plumbing that is not from the paper (flag resolution, run folders,
checkpoints, CUDA graphs, DDP) is in ce_utils/.
"""
import argparse
import math
import os
import signal
import sys
import time
from types import SimpleNamespace

import torch

import ce_data
import ce_eval
import ce_losses
import ce_masks
import ce_model
from ce_utils import accel, cli, config, datasets, figures, runstate

# ------------------------------------------------------------------------------------------------
# Flags: the paper's values are the defaults; --variant presets change only the flags not typed

# The three variants (README "Variants"; docs/variants.md): the paper's text, the official Lua
# code (train.lua, train_random.lua), and the seed report's PyTorch code.
VARIANTS = {
    "paper": dict(overlap=7, ring="visible", fill="mean", beta2=0.999, bottleneck_bn=True,
                  bias=False, init="dcgan", rec_reduction="all", d_reduction="sum", flip=True,
                  rec_loss="hole"),
    "official": dict(overlap=4, ring="visible", fill="mean", beta2=0.999, bottleneck_bn=True,
                     bias=False, init="dcgan", rec_reduction="all", d_reduction="sum", flip=True,
                     rec_loss="image"),
    "seed": dict(overlap=7, ring="hidden", fill="zero", beta2=0.9, bottleneck_bn=False, bias=True,
                 init="torch", rec_reduction="split", d_reduction="mean", flip=False,
                 rec_loss="hole"),
}
PAPER = VARIANTS["paper"]
BOOL = argparse.BooleanOptionalAction
OVERLAP = cli.int_range(0, 31, why=": the ring must leave a hole inside the 64px region")


def build_parser(doc=None):
    """Every flag of ce_train.py, its default the paper's value, its source in the help text."""
    p = cli.Parser(doc)
    add, real = p.add_argument, cli.finite_float   # real: 'inf' and 'nan' mean nothing here
    # each flag's range is its type (ce_utils/cli.py); rules between flags: config.validate
    add("--variant", default="paper", choices=tuple(VARIANTS),
        help="preset for the flags not typed: paper text, official Lua code, or seed report")
    # data
    add("--data", default="shapes", choices=("shapes", "tiny", "imagenet", "folder"),
        help="shapes: embedded offline data; tiny: Tiny ImageNet (downloads); imagenet/folder: "
             "your images")
    add("--data-root", default="data", help="dataset folder; caches go in DATA_ROOT/.ce_cache. "
        "tiny: also the extracted tiny-imagenet-200/ folder itself, or a zip of it (extracted "
        "next to it, caches there)")
    datasets.add_subset_flags(add)     # --train-per-class, --val-images
    add("--load-size", type=cli.positive_int, default=128,
        help="side of the stored centre square; 350: the official crop size (train.lua "
             "loadSize), crops within the square (DEVIATION)")
    add("--shapes-n", type=cli.positive_int, default=10000,
        help="training images of the embedded shapes data")
    add("--flip", action=BOOL, default=PAPER["flip"],
        help="random horizontal flip (official donkey_folder.lua; seed: off)")
    # masks, paper 3.3
    add("--mask", default="center", choices=ce_masks.MASKS,
        help="center: the central 64x64 square (Fig. 2); block: random rectangles covering <= "
             "1/4; region: random smooth regions, 20-30 %% of the image (official "
             "train_random.lua). block/region train the whole-image model")
    add("--mask-per-batch", action="store_true", help="block/region: one mask for the whole "
        "batch (official train_random.lua:330); default: one per image (paper 3.3)")
    add("--rec-loss", choices=("hole", "image"), default=PAPER["rec_loss"],
        help="block/region: hole = the paper's masked Eq. (1), --overlap-weight on the hidden "
             "rim within --overlap px of the context; image = official whole-image MSE, "
             "--overlap-weight on visible pixels when --overlap > 0 (useOverlapPred)")
    # optimisation, paper 4
    add("--batch-size", type=cli.train_batch, default=64, help="per process; paper/official 64")
    add("--epochs", type=cli.positive_int, default=25, help="official train.lua niter=25")
    add("--steps", type=cli.count, default=0,
        help="training steps in total, counted from the start of the run (also when resuming or "
             "fine-tuning); overrides --epochs when > 0")
    add("--lr-g", type=cli.positive, default=0.002,
        help="generator Adam lr (official: 10x the base lr 0.0002, train.lua:215)")
    add("--lr-d", type=cli.positive, default=0.0002,
        help="discriminator Adam lr (official base lr)")
    add("--beta1", type=cli.fraction, default=0.5, help="Adam beta1 (official, seed)")
    add("--beta2", type=cli.fraction, default=PAPER["beta2"],
        help="Adam beta2 (official; seed code 0.9)")
    # losses, Eq. (1)-(3)
    add("--lam-rec", type=real, default=0.999, help="lambda_rec of Eq. (3) (paper 4)")
    add("--lam-adv", type=real, default=0.001,
        help="lambda_adv of Eq. (3) (paper 4); 0 = L2 only, no D")
    add("--overlap", type=OVERLAP, default=PAPER["overlap"],
        help="overlap ring width in px (paper text 7, official overlapPred 4, seed 7)")
    add("--overlap-weight", type=cli.positive, default=10.0,
        help="L2 weight on the ring (paper 3.2, official: 10)")
    add("--ring", choices=("visible", "hidden"), default=PAPER["ring"],
        help="visible: the ring is real context (paper, official); hidden: the whole 64x64 is "
             "filled (seed)")
    add("--fill", choices=("mean", "zero"), default=PAPER["fill"],
        help="hole fill: official per-channel mean, or 0 (seed)")
    add("--rec-reduction", choices=("all", "split"), default=PAPER["rec_reduction"],
        help="Eq. (1) normalisation: mean(W d^2) over all pixels (official wtl2Matrix) or "
             "10 mean_ring + mean_inner (seed)")
    add("--d-reduction", choices=("sum", "mean"), default=PAPER["d_reduction"],
        help="D loss: BCE_real + BCE_fake (official) or their mean (seed)")
    # networks, Fig. 2 and 5.2
    add("--arch", default="dcgan", choices=("dcgan", "alexnet"),
        help="dcgan: the inpainting networks of Fig. 2; alexnet: the feature-learning context "
             "encoder of 5.2 (227 px, L2 only, random regions by default)")
    add("--alexnet-width", type=cli.positive, default=1.0,
        help="alexnet: channel multiplier (1.0 = AlexNet's 96-256-384-384-256)")
    add("--cfc-dropout", type=cli.fraction, default=0.5,
        help="alexnet: dropout on the channel-wise FC layer (paper 5.2)")
    add("--width", type=cli.positive_int, default=64, help="channels of the first conv (Fig. 2)")
    add("--bottleneck", type=cli.positive_int, default=4000, help="bottleneck channels (Fig. 2)")
    add("--bottleneck-bn", action=BOOL, default=PAPER["bottleneck_bn"],
        help="BatchNorm on the bottleneck (official train.lua:125; seed: off)")
    add("--bias", action=BOOL, default=PAPER["bias"],
        help="conv biases (paper/official: off; seed: on)")
    add("--init", choices=("dcgan", "torch"), default=PAPER["init"],
        help="dcgan: N(0, 0.02) (official); torch: PyTorch's default (seed)")
    # run
    add("--seed", type=cli.seed, default=0, help="seeds weights, data order and augmentation")
    add("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    add("--dtype", default="auto", choices=("auto", "bf16", "fp32"),
        help="autocast dtype; auto: bf16 on CUDA")
    add("--channels-last", action=BOOL, help="NHWC tensors (default: on for CUDA)")
    add("--compile", action="store_true", help="torch.compile G and D (not always faster)")
    add("--cuda-graph", action=BOOL, help="replay the whole step as one CUDA graph (default: on "
        "for a single CUDA device without --compile)")
    add("--out", help="run folder (default: runs/<data>, or runs/<data>-N if that is taken)")
    add("--resume", help="continue from a checkpoint (OUT/ckpt.pt) or a run folder, with its "
        "flags. With --out NEW and --data/--data-root: fine-tune its weights on other data")
    add("--log-every", type=cli.positive_int, default=50,
        help="steps between log lines (the only host syncs); steps 1 and 10 are logged too")
    add("--eval-every", type=cli.positive_int, default=1000,
        help="steps between evaluation + samples + checkpoint")
    add("--eval-images", type=cli.positive_int, default=512,
        help="held-out images at each evaluation")
    return p


def parse_args(argv=None):
    """The flags of a run, resolved (ce_utils/config.py: variant, resume, validation, folder)."""
    return config.resolve(build_parser, argv, VARIANTS, __doc__)[0]


def default_args(**flags):
    """The paper's flags with `flags` changed, unvalidated (tests and ce_bench.py build from it)."""
    args = build_parser().parse_args([])
    vars(args).update(flags)
    return args


# ------------------------------------------------------------------------------------------------
# Networks and optimisers (paper Fig. 2, section 4)

def build_training(args, hw, world=1, fused=None):
    """G and D of Fig. 2 (or the AlexNet model of 5.2), their Adam optimisers (paper 4: beta1 0.5,
    lr 0.002 / 0.0002), the centre's weight map W of Eq. (1) and the autocast context, as one
    namespace. forward_G/forward_D/forward_D_frozen are what the step calls: the modules
    themselves, or wrapped for DDP or torch.compile (ce_utils/accel.py)."""
    G, D = accel.place(*ce_model.build_pair(vars(args), args.init), hw, world)
    how = accel.adam_options(hw.device, bool(args.cuda_graph), fused)
    betas = (args.beta1, args.beta2)
    optG = torch.optim.Adam(G.parameters(), lr=args.lr_g, betas=betas, **how)
    optD = torch.optim.Adam(D.parameters(), lr=args.lr_d, betas=betas, **how)
    if how["fused"]:
        accel.match_grad_strides([*G.parameters(), *D.parameters()])
    W = ce_losses.overlap_weights(64, args.overlap, args.overlap_weight, args.rec_reduction)
    fG, fD, fD_frozen = accel.forward_fns(G, D, hw.device, world, args.compile)
    return SimpleNamespace(G=G, D=D, optG=optG, optD=optD, W=W.to(hw.device), ctx=hw.ctx,
                           forward_G=fG, forward_D=fD, forward_D_frozen=fD_frozen)


# ------------------------------------------------------------------------------------------------
# One training step: the hole (3.3), one G forward, the D update (Eq. 2), the G update (Eq. 3)

def cut_hole(real, numbers, args, W):
    """(masked input x, target y, weight map W of Eq. 1) for real images (B, 3, S, S) in [-1, 1].
    centre: the square hole; y the 64x64 centre; W the overlap map. block/region: the step's
    masks, built from `numbers` (ce_masks.mask_numbers; or a ready (B, 1, S, S) bool mask, to time
    the step without making masks); y the whole image; W from the mask, by --rec-loss."""
    if args.mask == "center":
        return (*ce_data.mask_batch(real, args.overlap, args.ring, args.fill), W)
    if numbers[0].dtype == torch.bool:
        hole = numbers[0]
    else:
        hole = ce_masks.random_masks(args.mask, len(real), None, real.shape[-1], real.device,
                                     args.mask_per_batch, numbers=numbers)        # (B, 1, S, S)
    if args.rec_loss == "hole":        # the paper's masked Eq. (1), 10x on the hidden rim
        weight = ce_losses.hole_weights(hole, args.overlap, args.overlap_weight)
    else:                              # official train_random.lua:412-437, whole-image MSE
        weight = ce_losses.context_weights(hole, args.overlap_weight if args.overlap > 0 else 1.0)
    return ce_data.apply_mask(real, hole, args.fill), real, weight


def train_step(real, numbers, m, args):
    """One iteration of paper 3.2 on a batch of real images; m: build_training's namespace.
    Returns (5,) statistics on the device (no host sync): loss_D, loss_rec, loss_adv, D(y),
    D(G(x)). With lambda_adv = 0, D is never run."""
    masked, target, weight = cut_hole(real, numbers, args, m.W)
    with m.ctx:
        fake = m.forward_G(masked)      # G(x): (B, 3, 64, 64) centre or (B, 3, S, S) image
    use_d = args.lam_adv > 0
    loss_d = loss_adv = logit_real = logit_fake = torch.zeros((), device=real.device)

    # ---- D step, Eq. (2): max_D  log D(y) + log(1 - D(G(x))), on the detached G(x)
    if use_d:
        m.D.requires_grad_(True)
        with m.ctx:
            logit_real, logit_fake = m.forward_D(target), m.forward_D(fake.detach())
        loss_d = ce_losses.discriminator_loss(logit_real, logit_fake, args.d_reduction)
        m.optD.zero_grad(set_to_none=True)
        loss_d.backward()
        m.optD.step()

    # ---- G step, Eq. (3): min_G  lambda_rec L_rec (Eq. 1) + lambda_adv L_adv, the same G(x)
    if use_d:
        m.D.requires_grad_(False)       # gradients flow through D to G, none for D's weights
        # DEVIATION: D is run again on G(x) after its update (PyTorch's DCGAN); official
        # train.lua reuses the D output computed before the update. D stays in train mode, so
        # its BatchNorm uses this batch's statistics and its running statistics (which nothing
        # reads: D is never run in eval mode) move a third time this step.
        with m.ctx:
            loss_adv = ce_losses.generator_adversarial_loss(m.forward_D_frozen(fake))
    loss_rec = ce_losses.reconstruction_loss(fake, target, weight)
    loss_g = ce_losses.joint_loss(loss_rec, loss_adv, args.lam_rec, args.lam_adv)
    m.optG.zero_grad(set_to_none=True)
    loss_g.backward()
    m.optG.step()
    with torch.no_grad():
        d_real, d_fake = torch.sigmoid(logit_real.float()), torch.sigmoid(logit_fake.float())
        return torch.stack([loss_d.float(), loss_rec.float(), loss_adv.float(),
                            d_real.mean(), d_fake.mean()])


# ------------------------------------------------------------------------------------------------
# Logging, evaluation, the end of a run

def is_log_step(step, args, total):
    """Every --log-every steps and the last; also steps 1 and 10 when the interval is longer, so a
    run shows life (and an ETA) within seconds. A function of the step: a resume logs the same."""
    return step % args.log_every == 0 or step == total or (args.log_every > 10 and step in (1, 10))


def log_window(run, stop, args, total, epoch, world, master):
    """A log line with the window's mean statistics (the only CPU-GPU sync of a normal step).
    Several ranks agree on stopping (a signal or a NaN on any rank). Returns: stop now?"""
    halt = bool(stop)
    if world > 1:
        halt, run.bad_step = accel.any_rank(halt, run.bad_step)
    rec = dict(zip(runstate.STATS, (run.acc / run.n_acc).tolist()))   # CPU-GPU sync point
    run.check_finite()
    dt = time.time() - run.t_log
    ips = run.n_acc * args.batch_size * world / dt
    use_d = args.lam_adv > 0
    run.d_wins = run.d_wins + 1 if use_d and rec["D_G_x"] < 0.01 else 0
    # Common with the paper's small lambda_adv, where L2 does most of G's training: worth a look
    # at the samples, not a stop.
    warn = (f" | warning: D has won outright for {run.d_wins} log windows (D(G(x)) ~ 0; usual "
            "with a small --lam-adv such as the paper's 0.001); if samples stop improving, a "
            "lower --lam-adv or --lr-d usually helps") if run.d_wins >= 3 else ""
    gan = (f"loss_D {rec['loss_D']:.3f} | rec {rec['loss_rec']:.4f} | adv {rec['loss_adv']:.3f}"
           f" | D(x) {rec['D_x']:.2f} | D(G(x)) {rec['D_G_x']:.2f}") if use_d \
        else f"rec {rec['loss_rec']:.4f}"
    if master:   # the ETA: the window's pace (step 1's includes the warm-up)
        eta = runstate.fmt_time((total - run.step) * dt / run.n_acc)
        print(f"step {run.step}/{total} | epoch {epoch} | {gan} | {ips:,.0f} img/s | ETA {eta}"
              f"{warn}")
        if not use_d:   # L2 only: D never ran, its statistics are placeholders, not measurements
            rec = {"loss_rec": rec["loss_rec"]}
        cli.append_log(os.path.join(args.out, "log.jsonl"), {
            "step": run.step, "epoch": epoch, **{k: round(v, 6) for k, v in rec.items()},
            "img_per_s": round(ips, 1), "time": round(time.time(), 2),
            **({"warning": "D wins"} if warn else {})})
    run.acc.zero_()
    run.n_acc, run.t_log = 0, time.time()
    return halt


def evaluate_and_save(run, nets, args, val_u8, fixed, hw, epoch, total):
    """Held-out metrics (ce_eval), a sample grid, the log record, best.pt, ckpt.pt, and now and
    then the curves and the GIF; none of it when a loss, a weight or the evaluation is NaN/Inf
    (the run stops, naming the last good checkpoint)."""
    run.check_finite(nets)
    G = nets["G"]
    r = ce_eval.evaluate(G, val_u8, args, methods=("model",), dtype=hw.dtype,
                         show_slow=False)["model"]    # quiet: the "eval @" line follows
    run.check_finite(evaluation=r)
    masked, filled = ce_eval.inpaint(G, fixed, args, dtype=hw.dtype)
    os.makedirs(os.path.join(args.out, "samples"), exist_ok=True)
    figures.save_grid(os.path.join(args.out, "samples", f"step_{run.step:07d}.png"),
                      [masked, filled, fixed])
    is_best = r["psnr"] > run.best
    run.best = max(run.best, r["psnr"])
    # the order matters for a kill at any moment: the log record, best.pt, then ckpt.pt (resumes)
    cli.append_log(os.path.join(args.out, "log.jsonl"),
                   {"step": run.step, "eval": {k: round(v, 4) for k, v in r.items()}})
    if is_best:
        runstate.save(os.path.join(args.out, "best.pt"), nets, args, run, epoch)
    runstate.save(os.path.join(args.out, "ckpt.pt"), nets, args, run, epoch)
    run.last_good = os.path.join(args.out, "ckpt.pt")
    if run.step == total or time.time() - run.t_pictures >= PICTURES_EVERY_S:
        draw_pictures(run, args)
    print(f"eval @ {run.step}: held-out PSNR {r['psnr']:.2f} dB, L1 {r['l1']:.2f} %, "
          f"L2 {r['l2']:.2f} %, SSIM {r['ssim']:.3f}, sharpness {r['sharpness']:.2f} "
          f"(hole, {r['n_images']} images){' *best*' if is_best else ''}")
    run.t_log = time.time()  # evaluation is not training time


PICTURES_EVERY_S = 60   # curves.png and evolution.gif: redrawn at most this often, and at the end


def draw_pictures(run, args):
    """OUT/curves.png and OUT/evolution.gif from the log and the sample grids so far (about a
    second of matplotlib: so at most every PICTURES_EVERY_S, and when the run ends or stops).
    They are a convenience drawn after the checkpoint is saved: failing to write them (a full
    disk) is a warning, never the end of the run or of its last lines."""
    try:
        figures.plot_curves([args.out], os.path.join(args.out, "curves.png"))
        figures.make_gif(args.out)
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"warning: curves/GIF not redrawn ({where}{e.strerror or e}); the checkpoint is "
              "saved", file=sys.stderr)
    run.t_pictures = time.time()


def finish(run, nets, args, stop, halt, world, total, epoch, master):
    """Ranks check that they hold the same weights; a signal saves ckpt.pt and says how to
    resume; otherwise the last line names the best checkpoint."""
    if world > 1:
        accel.same_weights_check(nets["G"], world, master)
    if halt:   # a signal (on any rank): save where we are and say how to go on
        run.check_finite(nets)
        sig = stop[0] if stop else signal.SIGTERM
        names = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}
        name = names.get(sig, signal.Signals(sig).name)
        if master:
            runstate.save(os.path.join(args.out, "ckpt.pt"), nets, args, run, epoch)
            print(f"\n{name}: saved {os.path.join(args.out, 'ckpt.pt')} at step "
                  f"{run.step}/{total}. Resume with: "
                  f"{cli.command('ce_train.py', '--resume', args.out)}")
            if os.path.exists(os.path.join(args.out, "log.jsonl")):
                draw_pictures(run, args)
        sys.exit(128 + sig)
    if master:
        best = next((p for p in ("best.pt", "ckpt.pt")
                     if os.path.exists(os.path.join(args.out, p))), None)
        result = (f"best held-out PSNR {run.best:.2f} dB" if math.isfinite(run.best)
                  else "no evaluation in this run")
        evaluate = best and cli.command("ce_eval.py", "--ckpt", os.path.join(args.out, best))
        print(f"done: {run.step} steps, {result}"
              + (f". Evaluate with: {evaluate}" if best else "; no checkpoint written"))


# ------------------------------------------------------------------------------------------------

def main(argv=None):
    args, resumed = config.resolve(build_parser, argv, VARIANTS, __doc__)
    if hasattr(sys.stdout, "reconfigure"):            # (a notebook's stdout has none)
        sys.stdout.reconfigure(line_buffering=True)   # progress shows at once, also in a pipe
    rank, world, args.device = accel.setup_distributed(args.device)
    master = rank == 0                        # only rank 0 prints, logs, samples and checkpoints
    hw = cli.Hardware(args.device, args.dtype, args.channels_last, args.cuda_graph)
    hw.use_fast_kernels()
    torch.manual_seed(args.seed)              # the same initial weights on every rank
    with runstate.run_folder(args, master):   # OUT is this run's until it ends
        # ---- data: decoded once into uint8 (ce_utils/datasets.py), batches made on the device
        load = (args.data, args.data_root)
        subset = {k: getattr(args, k) for k in datasets.SUBSET_FLAGS}   # a Tiny ImageNet subset
        subset["listed"] = listed = []        # the files' names: a resume can tell a changed folder
        train_u8 = datasets.load_split(*load, "train", args.load_size, args.shapes_n, **subset)
        val_u8 = datasets.load_split(*load, "val", args.load_size, args.shapes_n, **subset)
        val_u8 = val_u8[:args.eval_images]
        size = ce_model.input_size(args)       # 128 px crops (Fig. 2), 227 for AlexNet (5.2)
        batches = accel.make_batches(train_u8, args.batch_size, hw.device, args.seed, args.flip,
                                     size, hw.channels_last, torch.float32, rank, world,
                                     load_size=args.load_size)
        total = args.steps or args.epochs * batches.steps_per_epoch
        fixed = ce_data.eval_batch(val_u8[:16], size, args.load_size).to(hw.device)  # same 16

        # ---- networks and optimisers (paper 4); a resumed run takes up all of its state
        m = build_training(args, hw, world)
        nets = dict(G=m.G, D=m.D, optG=m.optG, optD=m.optD)
        run = runstate.RunState(hw.device)
        run.data_files = runstate.files_fingerprint(listed)
        if resumed:
            runstate.resume(args, resumed, nets, run, hw.device, master, total)
        draw_numbers = accel.mask_numbers_ahead(args, rank, world)  # () for the centre

        def step(real, *numbers):
            return train_step(real, numbers, m, args)
        if args.cuda_graph:                   # one CUDA device: the same step as one graph
            step = accel.cuda_graphed(step)
        if master:
            runstate.announce(args, world, len(train_u8), len(val_u8), m.G, m.D, total)

        # ---- train: batch -> hole -> D step (Eq. 2) -> G step (Eq. 3) -> log -> evaluate, save
        m.G.train(), m.D.train()
        halt = False
        # SIGINT/SIGTERM/SIGHUP: finish the step, save; a lost rank: say which checkpoint resumes
        with cli.signals_caught() as stop, accel.peers_watched(args.out, rank, world):
            run.t_log = time.time()
            while run.step < total and not halt:
                real = batches.get(run.step)                         # (B, 3, 128, 128) in [-1, 1]
                run.add(step(real, *draw_numbers(real, run.step)))  # (5,) stats, on the device
                halt = bool(stop) and world == 1   # several ranks agree at the next log step
                if is_log_step(run.step, args, total):
                    epoch = batches.epoch_of(run.step - 1)
                    halt = log_window(run, stop, args, total, epoch, world, master)
                if master and (run.step % args.eval_every == 0 or run.step == total):
                    epoch = batches.epoch_of(run.step)
                    evaluate_and_save(run, nets, args, val_u8, fixed, hw, epoch, total)
            finish(run, nets, args, stop, halt, world, total, batches.epoch_of(run.step), master)


if __name__ == "__main__":
    cli.run(main)
