"""The flags of ce_train.py (Pathak et al., CVPR 2016): the paper's values as defaults, with their sources; the
three --variant presets (paper text, official Lua code, seed report; docs/variants.md); --arch alexnet's defaults;
the CPU quick start; a resumed or fine-tuned run's own flags; and every nonsense setting refused up front, with the
flag's name, before any work is done. ce_train.py reads the result; ce_bench.py builds from default_args().

    python -c "from ce_utils import config; print(vars(config.parse_args(['--variant', 'official'])))"
"""
import argparse
import os
import sys

import torch

import ce_masks
import ce_model
from ce_utils import checkpoints, cli

# The three variants (README "Variants"): --variant sets these defaults; any flag given explicitly wins.
VARIANTS = {
    "paper": dict(overlap=7, ring="visible", fill="mean", beta2=0.999, bottleneck_bn=True, bias=False,
                  init="dcgan", rec_reduction="all", d_reduction="sum", flip=True, rec_loss="hole"),
    "official": dict(overlap=4, ring="visible", fill="mean", beta2=0.999, bottleneck_bn=True, bias=False,
                     init="dcgan", rec_reduction="all", d_reduction="sum", flip=True, rec_loss="image"),
    "seed": dict(overlap=7, ring="hidden", fill="zero", beta2=0.9, bottleneck_bn=False, bias=True,
                 init="torch", rec_reduction="split", d_reduction="mean", flip=False, rec_loss="hole"),
}
# DEVIATION: on a CPU, `python ce_train.py --data shapes` trains a smaller network for fewer steps so that the quick
# start ends in minutes; each of these applies unless its flag is given (the paper's network: --width 64
# --bottleneck 4000 --batch-size 64).
CPU_QUICK = dict(width=24, bottleneck=512, batch_size=32, steps=500, eval_every=250)
RUNTIME = ("device", "dtype", "channels_last", "compile", "cuda_graph", "resume")  # decided afresh on each machine


# ----------------------------------------------------------------------------------------------------------------
# Flags: paper values are the defaults; --variant presets; a resumed run's own flags; nonsense refused up front

def build_parser(doc=None):
    """Every flag of ce_train.py; doc: the --help text above the flags (ce_train.py's docstring)."""
    p = cli.Parser(doc)
    add = p.add_argument
    real = cli.finite_float   # 'inf' and 'nan' parse as floats but mean nothing as a setting
    add("--variant", default="paper", choices=tuple(VARIANTS),
        help="preset of the flags below: paper text, official Lua code, or seed report (README 'Variants')")
    # data
    add("--data", default="shapes", choices=("shapes", "tiny", "imagenet", "folder"),
        help="shapes: embedded offline data; tiny: Tiny ImageNet (downloads); imagenet/folder: your images")
    add("--data-root", default="data", help="dataset folder; caches go in DATA_ROOT/.ce_cache (saved as an "
                                            "absolute path: a resumed run finds it from any directory)")
    add("--load-size", type=int, default=128,
        help="shorter side after decoding; 350 gives the official random-crop augmentation (train.lua loadSize)")
    add("--shapes-n", type=int, default=10000, help="training images of the embedded shapes data")
    add("--flip", action=argparse.BooleanOptionalAction, help="random horizontal flip (official: on; seed: off)")
    # masks, paper 3.3
    add("--mask", default="center", choices=ce_masks.MASKS,
        help="center: the central 64x64 square (Fig. 2); block: random rectangles covering <= 1/4; region: random "
             "smooth regions, 20-30 %% of the image (official train_random.lua). block/region train the whole-image "
             "model")
    add("--mask-per-batch", action="store_true",
        help="block/region: one mask shared by the whole batch (official train_random.lua:330); default: one mask "
             "per image (paper 3.3)")
    add("--rec-loss", choices=("hole", "image"),
        help="block/region: hole = the paper's masked Eq. (1) over hidden pixels, --overlap-weight on the hidden rim "
             "within --overlap px of the context (paper preset); image = official whole-image MSE, "
             "--overlap-weight on visible pixels when --overlap > 0 (useOverlapPred) (official preset)")
    # optimisation
    add("--batch-size", type=int, default=64, help="per process; paper/official 64")
    add("--epochs", type=int, default=25, help="official train.lua niter=25")
    add("--steps", type=int, default=0, help="training steps in total, counted from the start of the run (also "
                                             "when resuming or fine-tuning); overrides --epochs when > 0")
    add("--lr-g", type=real, default=0.002, help="generator Adam lr (official: 10x base lr 0.0002, train.lua:215)")
    add("--lr-d", type=real, default=0.0002, help="discriminator Adam lr (official base lr)")
    add("--beta1", type=real, default=0.5, help="Adam beta1 (official, seed)")
    add("--beta2", type=real, help="Adam beta2 (official 0.999, seed code 0.9)")
    # losses, Eq. (1)-(3)
    add("--lam-rec", type=real, default=0.999, help="lambda_rec of Eq. (3) (paper 4: 0.999)")
    add("--lam-adv", type=real, default=0.001, help="lambda_adv of Eq. (3) (paper 4: 0.001); 0 = L2 only, no D")
    add("--overlap", type=int, help="overlap ring width in px (paper text 7, official overlapPred 4, seed 7)")
    add("--overlap-weight", type=real, default=10.0, help="L2 weight on the ring (paper 3.2, official: 10)")
    add("--ring", choices=("visible", "hidden"), help="visible: ring is real context (paper, official); "
                                                     "hidden: whole 64x64 filled (seed)")
    add("--fill", choices=("mean", "zero"), help="hole fill: official per-channel mean, or 0 (seed)")
    add("--rec-reduction", choices=("all", "split"),
        help="Eq. (1) normalisation: mean(W d^2) over all pixels (official) or 10 mean_ring + mean_inner (seed)")
    add("--d-reduction", choices=("sum", "mean"), help="D loss: BCE_real + BCE_fake (official) or their mean (seed)")
    # networks
    add("--arch", default="dcgan", choices=("dcgan", "alexnet"),
        help="dcgan: the inpainting networks of Fig. 2; alexnet: the feature-learning context encoder of paper 5.2 "
             "(AlexNet conv1-pool5, channel-wise FC, Fig. 9b decoder; 227 px, L2 only, random regions by default)")
    add("--alexnet-width", type=float, default=1.0, help="alexnet: channel multiplier (1.0 = AlexNet's 96-256-384-384-256)")
    add("--cfc-dropout", type=float, default=0.5, help="alexnet: dropout on the channel-wise FC layer (paper 5.2)")
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
    add("--cuda-graph", action=argparse.BooleanOptionalAction,
        help="replay the whole training step (D and G updates) as one CUDA graph instead of hundreds of kernel "
             "launches (default: on for a single CUDA device without --compile)")
    add("--out", help="run folder (default: runs/<data>, or runs/<data>-N if that is taken)")
    add("--resume", help="continue from a checkpoint (OUT/ckpt.pt) or a run folder; its flags are reused. With "
                         "--out NEW and --data/--data-root: fine-tune its weights on other data (README)")
    add("--log-every", type=int, default=50, help="steps between log lines (the only host syncs); steps 1 and 10 "
                                                  "are logged too")
    add("--eval-every", type=int, default=1000, help="steps between evaluation + samples + checkpoint")
    add("--eval-images", type=int, default=512, help="held-out images used at each evaluation")
    return p


def given_flags(argv):
    """The dests given on the command line (parsing again with every default replaced by a sentinel)."""
    sentinel = object()
    q = build_parser()
    q.set_defaults(**{k: sentinel for k in vars(q.parse_args([]))})
    return {k: v for k, v in vars(q.parse_args(argv)).items() if v is not sentinel}


def take_resumed_flags(args, given, p):
    """--resume: the checkpoint's flags, overridden only by what this command line says (never the network's)."""
    state = checkpoints.read_checkpoint(args.resume, resume=True)
    if "note" in state:
        print(state["note"], file=sys.stderr)
    saved = state["args"]
    clash = [f"--{k.replace('_', '-')} {given[k]} (checkpoint: {saved.get(k, 'center')})"
             for k in ce_model.ARCH_KEYS + ("mask",) if k in given and given[k] != saved.get(k, "center")]
    if clash:
        p.error(f"{state['path']} was trained with other network flags: {', '.join(clash)}; drop them to resume")
    for k, v in saved.items():
        if k not in given and k not in RUNTIME and hasattr(args, k):
            setattr(args, k, v)
    if os.path.basename(state["path"]) != "ckpt.pt" and "out" not in given:
        p.error(f"resuming from {state['path']} would rewind that run's ckpt.pt and log; pass --out NEW_DIR "
                "to branch a new run from it")
    args.resume, args.out = state["path"], given.get("out", os.path.dirname(state["path"]))


def apply_variant(args):
    """Fill the flags left unset (None) from the --variant preset."""
    for k, v in VARIANTS[args.variant].items():
        if getattr(args, k) is None:
            setattr(args, k, v)


def apply_arch(args, given, p):
    """--arch alexnet (paper 5.2): random-region masks, L2 only and 227 px images unless given otherwise."""
    if args.arch != "alexnet":
        return
    defaults = {"mask": "region", "lam_adv": 0.0, "load_size": ce_model.INPUT_SIZE["alexnet"]}
    for k, v in defaults.items():
        if k not in given:
            setattr(args, k, v)
    if args.mask == "center":
        p.error("--arch alexnet trains the whole-image model: use --mask region (paper 5.2) or block")
    if args.lam_adv > 0:
        print("warning: --arch alexnet with --lam-adv > 0: the paper could not make the adversarial loss converge "
              "with AlexNet (5.2); D sees the 227 px images resized to 128", file=sys.stderr)


def validate(args, p):
    """Nonsense is rejected here, with the flag's name, before any work is done."""
    checks = [
        (args.batch_size >= 2, "--batch-size must be >= 2 (BatchNorm needs two images per batch and rank)"),
        (args.epochs > 0, "--epochs must be > 0"), (args.steps >= 0, "--steps must be >= 0"),
        (args.lr_g > 0 and args.lr_d > 0, "learning rates must be > 0"),
        # Adam's step is computed in float32: a rate beyond its range is Inf, and the first update NaN
        (max(args.lr_g, args.lr_d) < torch.finfo(torch.float32).max,
         f"--lr-g/--lr-d must be below {torch.finfo(torch.float32).max:.3g} (float32: Adam would step by Inf)"),
        (0 <= args.beta1 < 1 and 0 <= args.beta2 < 1, "--beta1/--beta2 must be in [0, 1)"),
        (args.lam_rec >= 0 and args.lam_adv >= 0, "--lam-rec/--lam-adv must be >= 0"),
        (args.lam_rec + args.lam_adv > 0, "--lam-rec and --lam-adv cannot both be 0"),
        (0 <= args.overlap < 32, "--overlap must be in [0, 31]: the ring must leave a hole inside the 64px region"),
        (args.overlap_weight > 0, "--overlap-weight must be > 0"),
        (args.width > 0 and args.bottleneck > 0, "--width/--bottleneck must be > 0"),
        (args.load_size >= ce_model.INPUT_SIZE[args.arch],
         f"--load-size must be >= {ce_model.INPUT_SIZE[args.arch]} (the {args.arch} network sees square crops of that size)"),
        (args.alexnet_width > 0 and 0 <= args.cfc_dropout < 1, "--alexnet-width must be > 0, --cfc-dropout in [0, 1)"),
        (args.shapes_n > 0, "--shapes-n must be > 0"),
        (args.log_every > 0 and args.eval_every > 0 and args.eval_images > 0,
         "--log-every/--eval-every/--eval-images must be > 0")]
    for ok, msg in checks:
        if not ok:
            p.error(msg)


def choose_out(args, p):
    """The run folder: --out as given (never an existing run unless resuming), else runs/<data>[-N]."""
    if args.out:
        if not args.resume and os.path.exists(os.path.join(args.out, "ckpt.pt")):
            p.error(f"{args.out} already holds a run; pass --resume {args.out} to continue it or choose another --out")
        return args.out
    base = out = os.path.join("runs", args.data)
    i = 2
    while os.path.exists(os.path.join(out, "ckpt.pt")):
        out, i = f"{base}-{i}", i + 1
    return out


def cpu_defaults(args, given):
    """The CPU quick start (CPU_QUICK), flag by flag: each size not given on the command line. Only for a new
    `--data shapes` run on a CPU; --epochs given means no step count on top. Returns the flags set."""
    if args.resume or torch.device(args.device).type != "cpu" or args.data != "shapes":
        return {}
    applied = {k: v for k, v in CPU_QUICK.items() if k not in given and not (k == "steps" and "epochs" in given)}
    vars(args).update(applied)
    return applied


def parse_args(argv=None, doc=None):
    """ce_train.py's flags, in order: parsed; a resumed run's own flags, or the --variant preset and --arch
    defaults; the device; the CPU quick start; an absolute data root; validation; the run folder."""
    p = build_parser(doc)
    args, given = p.parse_args(argv), given_flags(argv)
    if args.resume:
        take_resumed_flags(args, given, p)
    else:
        apply_variant(args)
        apply_arch(args, given, p)
    args.device = cli.resolve_device(args.device, p)
    hw = cli.Hardware(args.device, args.dtype, args.channels_last)
    args.dtype, args.channels_last = hw.dtype_name, hw.channels_last
    args.cuda_graph = cuda_graph(args, hw, p)
    args.quick = set(cpu_defaults(args, given)) >= {"width", "bottleneck", "batch_size", "steps"}
    args.data_root = os.path.abspath(args.data_root)   # the same data from any working directory (resume, eval)
    validate(args, p)
    args.out = choose_out(args, p)
    return args


def cuda_graph(args, hw, p):
    """--cuda-graph: on by default where it applies (one CUDA device, no torch.compile); asked for elsewhere, an
    error that says why."""
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    why = ("needs a CUDA device" if hw.device.type != "cuda" else "and --compile exclude each other" if args.compile
           else "is for one device; with several ranks (torchrun) leave it off" if ranks > 1 else None)
    if args.cuda_graph and why:
        p.error(f"--cuda-graph {why}")
    return why is None if args.cuda_graph is None else args.cuda_graph


def default_args(**flags):
    """The flags of `--variant paper` with `flags` changed: what ce_bench.py builds its networks from."""
    args = build_parser().parse_args([])
    apply_variant(args)
    vars(args).update(flags)
    return args
