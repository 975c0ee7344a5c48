"""Flag resolution for ce_train.py, whose flag table (the paper's values as defaults) is
ce_train.build_parser: the --variant presets applied to the flags not typed, --arch alexnet's
defaults, a resumed or fine-tuned run's own flags, the CPU quick start, every nonsense setting
refused up front with the flag's name, and the run folder.

    python -c "import ce_train; print(vars(ce_train.parse_args(['--variant', 'official'])))"
"""
import os
import sys

import torch

import ce_model
from ce_utils import checkpoints, cli, datasets

# DEVIATION: on a CPU, `python ce_train.py --data shapes` trains a smaller network for fewer steps
# so that the quick start ends in minutes; each of these applies unless its flag is given (the
# paper's network: --width 64 --bottleneck 4000 --batch-size 64).
CPU_QUICK = dict(width=24, bottleneck=512, batch_size=32, steps=500, eval_every=250)
RUNTIME = ("device", "dtype", "channels_last", "compile", "cuda_graph", "resume")  # per machine


def given_flags(build_parser, argv):
    """The flags typed on the command line: parsed again with every default a sentinel."""
    sentinel = object()
    q = build_parser()
    q.set_defaults(**{k: sentinel for k in vars(q.parse_args([]))})
    return {k: v for k, v in vars(q.parse_args(argv)).items() if v is not sentinel}


def take_resumed_flags(args, given, p):
    """--resume: the checkpoint's flags, overridden only by what this command line says (never the
    network's). Returns the checkpoint, read once here and restored by runstate.resume."""
    state = checkpoints.read_checkpoint(args.resume, resume=True)
    if "note" in state:
        print(state["note"], file=sys.stderr)
    saved = state["args"]
    clash = [f"--{k.replace('_', '-')} {given[k]} (checkpoint: {saved.get(k, 'center')})"
             for k in ce_model.ARCH_KEYS + ("mask",)
             if k in given and given[k] != saved.get(k, "center")]
    if clash:
        p.error(f"{state['path']} was trained with other network flags: {', '.join(clash)}; drop "
                "them to resume")
    for k, v in saved.items():
        if k not in given and k not in RUNTIME and hasattr(args, k):
            setattr(args, k, v)
    if args.data != "tiny":         # fine-tuning on other data: no Tiny ImageNet subset
        for k in datasets.SUBSET_FLAGS:
            if k not in given:
                setattr(args, k, 0)
    if os.path.basename(state["path"]) != "ckpt.pt" and "out" not in given:
        p.error(f"resuming from {state['path']} would rewind that run's ckpt.pt and log; pass "
                "--out NEW_DIR to branch a new run from it")
    args.resume, args.out = state["path"], given.get("out", os.path.dirname(state["path"]))
    return state


def apply_variant(args, given, variants):
    """The --variant preset, for every flag not typed on the command line. The official preset
    with random masks: the official README's random-region setting, useOverlapPred=0 (no 10x
    weight on the context: --overlap 0)."""
    preset = dict(variants[args.variant])
    if args.variant == "official" and args.mask != "center":
        preset["overlap"] = 0
    for k, v in preset.items():
        if k not in given:
            setattr(args, k, v)


def apply_arch(args, given, p):
    """--arch alexnet (paper 5.2): random regions, L2 only and 227 px unless given otherwise."""
    if args.arch != "alexnet":
        return
    size = ce_model.input_size({"arch": "alexnet"})
    defaults = {"mask": "region", "lam_adv": 0.0, "load_size": size}
    for k, v in defaults.items():
        if k not in given:
            setattr(args, k, v)
    if args.mask == "center":
        p.error("--arch alexnet trains the whole-image model: use --mask region (paper 5.2) or "
                "block")
    if args.lam_adv > 0:
        print("warning: --arch alexnet with --lam-adv > 0: the paper could not make the "
              "adversarial loss converge with AlexNet (5.2); D sees the 227 px images resized "
              "to 128",
              file=sys.stderr)


def validate(args, p):
    """The rules between flags, refused here with the flags' names before any work is done (each
    flag's own range is its argparse type in ce_train.build_parser). A checkpoint's saved flags
    are held to the same rules (checkpoints.check_checkpoint)."""
    size, limit = ce_model.input_size(args), cli.lr_limit(args.beta1)
    checks = [
        # Adam's first step, lr / (1 - beta1), is computed in float32: beyond its range it is Inf
        (max(args.lr_g, args.lr_d) < limit,
         f"--lr-g/--lr-d must be below {cli.F32_MAX:.3g} x (1 - --beta1) = {limit:.3g} (float32: "
         "Adam's first step is lr / (1 - beta1))"),
        (args.lam_rec >= 0 and args.lam_adv >= 0, "--lam-rec/--lam-adv must be >= 0"),
        (args.lam_rec + args.lam_adv > 0, "--lam-rec and --lam-adv cannot both be 0"),
        (args.load_size >= size, f"--load-size must be >= {size} (the {args.arch} network sees "
                                  "square crops of that size)"),
        (args.data == "tiny" or not (args.train_per_class or args.val_images),
         "--train-per-class/--val-images select a subset of --data tiny only; pass "
         "--train-per-class 0 --val-images 0 (a resumed run takes them from its checkpoint)")]
    for ok, msg in checks:
        if not ok:
            p.error(msg)


RUN_FILES = ("ckpt.pt", "best.pt")   # a folder holding either of them holds a run


def own_folder(ckpt, out):
    """Whether run folder `out` is the folder of checkpoint `ckpt` (however either is spelled)."""
    return os.path.realpath(os.path.dirname(ckpt)) == os.path.realpath(out)


def choose_out(args, p):
    """The run folder: --out as given, else runs/<data>[-N]. A folder that holds a run is only
    ever continued by a resume of its own checkpoint: a new run there, or a branch (--resume
    A/best.pt --out B), would replace its checkpoints and args.json and mix its log."""
    if args.out:
        held = next((f for f in RUN_FILES if os.path.exists(os.path.join(args.out, f))), None)
        if held and not args.resume:
            p.error(f"{args.out} already holds a run; continue it with "
                    f"`{cli.command('ce_train.py', '--resume', args.out)}` or choose another --out")
        if held and not own_folder(args.resume, args.out):
            p.error(f"{args.out} already holds another run (its {held}); a run's folder is only "
                    f"continued by resuming its own checkpoint: to branch from {args.resume}, "
                    "pass an --out that is new or empty")
        return args.out
    base = out = os.path.join("runs", args.data)
    i = 2
    while any(os.path.exists(os.path.join(out, f)) for f in RUN_FILES):
        out, i = f"{base}-{i}", i + 1
    return out


def cpu_defaults(args, given):
    """The CPU quick start (CPU_QUICK), flag by flag: each size not typed. Only for a new
    `--data shapes` run on a CPU; --epochs typed means no step count on top. Returns what it set."""
    if args.resume or torch.device(args.device).type != "cpu" or args.data != "shapes":
        return {}
    applied = {k: v for k, v in CPU_QUICK.items()
               if k not in given and not (k == "steps" and "epochs" in given)}
    vars(args).update(applied)
    return applied


def cuda_graph(args, p):
    """--cuda-graph: on by default where it applies (one CUDA device, no torch.compile); asked for
    elsewhere, an error that says why."""
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    why = ("needs a CUDA device" if torch.device(args.device).type != "cuda"
           else "and --compile exclude each other" if args.compile
           else "is for one device; with several ranks (torchrun) leave it off" if ranks > 1
           else None)
    if args.cuda_graph and why:
        p.error(f"--cuda-graph {why}")
    return why is None if args.cuda_graph is None else args.cuda_graph


def resolve(build_parser, argv, variants, doc=None):
    """ce_train.py's flags, in order: parsed; a resumed run's own flags, or the --variant preset
    and --arch defaults; the device and precision; the CPU quick start; an absolute data root;
    validation; the run folder. Returns (args, the resumed checkpoint or None)."""
    p = build_parser(doc)
    args, given = p.parse_args(argv), given_flags(build_parser, argv)
    resumed = None
    if args.resume:
        resumed = take_resumed_flags(args, given, p)
    else:
        apply_arch(args, given, p)
        apply_variant(args, given, variants)
    args.device = cli.resolve_device(args.device, p)
    args.dtype, args.channels_last = cli.precision(args.device, args.dtype, args.channels_last)
    args.cuda_graph = cuda_graph(args, p)
    args.quick = set(cpu_defaults(args, given)) >= {"width", "bottleneck", "batch_size", "steps"}
    args.data_root = os.path.abspath(args.data_root)   # the same data from any directory
    validate(args, p)
    args.out = choose_out(args, p)
    return args, resumed
