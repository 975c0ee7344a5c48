"""A training run's bookkeeping, apart from the GAN step itself (ce_train.py): what a run holds
besides weights and optimisers (RunState: step, best PSNR, the open log window, the D-wins streak,
the first non-finite step), saving it and resuming it exactly (RNG states included), owning its
folder while it runs, and the lines it prints when it starts (with a step-time estimate for a big
network on a CPU).

    python -c "from ce_utils import runstate; print(runstate.RunState('cpu').state_dict())"
"""
import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import shlex
import sys
import time

import torch

import ce_model
from ce_utils import checkpoints, cli, config

STATS = ("loss_D", "loss_rec", "loss_adv", "D_x", "D_G_x")   # what train_step returns, in order


class RunState:
    """Step, best held-out PSNR, the open log window (the step statistics summed since the last
    log line, so that a resumed run writes the same log lines as an uninterrupted one), the D-wins
    streak, the first step with a non-finite statistic (kept on the device: no sync), the last
    checkpoint known to be good, and the fingerprint of the data's files (files_fingerprint: saved,
    never restored, so that a resume can tell that the folder changed)."""

    def __init__(self, device):
        self.step, self.best, self.n_acc, self.d_wins, self.last_good = 0, -math.inf, 0, 0, None
        self.data_files = None
        self.acc = torch.zeros(len(STATS), device=device)
        self.bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self.t_log = time.time()   # wall-clock start of the log window (not saved)
        self.t_pictures = time.time()   # curves.png and evolution.gif last drawn (not saved)

    def add(self, stats):
        """Count one training step's (5,) statistics, on the device."""
        self.step, self.n_acc = self.step + 1, self.n_acc + 1
        with torch.no_grad():
            self.acc += stats
            first_bad = (self.bad_step < 0) & ~torch.isfinite(stats).all()
            self.bad_step = torch.where(first_bad, self.step, self.bad_step)

    def state_dict(self):
        return {"step": self.step, "best_psnr": self.best,
                "log_window": {"acc": self.acc.cpu(), "n_acc": self.n_acc, "d_wins": self.d_wins},
                "data_files": self.data_files}

    def load_state_dict(self, state):
        window = state["log_window"] or {"acc": torch.zeros(len(STATS)), "n_acc": 0,
                                         "d_wins": 0}                        # None: empty
        self.step, self.best = state["step"], state["best_psnr"]
        self.acc.copy_(window["acc"])
        self.n_acc, self.d_wins, self.last_good = window["n_acc"], window["d_wins"], state["path"]

    def check_finite(self, nets=None, evaluation=None):
        """Stop, naming the step, if a loss, a weight or optimiser state of `nets`, or the
        `evaluation` went NaN/Inf: nothing non-finite is ever written over a checkpoint
        (checkpoints.save_checkpoint refuses it as well)."""
        bad = int(self.bad_step)  # CPU-GPU sync point (log, eval and final steps only)
        what = f"a loss became NaN/Inf at step {bad}" if bad >= 0 else None
        if what is None and nets is not None:
            where = checkpoints.first_nonfinite({k: m.state_dict() for k, m in nets.items()})
            what = where and f"the weights became NaN/Inf at step {self.step} ({where})"
        if (what is None and evaluation is not None
                and not all(map(math.isfinite, evaluation.values()))):
            what = f"the held-out evaluation at step {self.step} is NaN/Inf"
        if what:
            good = (f"Last good checkpoint: {self.last_good} (left intact); resume from it with "
                    "another --seed" if self.last_good
                    else "Last good checkpoint: none (this run has written none)")
            raise cli.UserError(f"{what}; training stopped without saving. {good}. Try a lower "
                                "--lr-g/--lr-d or --lam-adv.")


def rng_state():
    s = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def save(path, nets, args, run, epoch):
    """One checkpoint: G, D, both optimisers, the run state, flags, RNG states and versions
    (the format of ce_utils/checkpoints.py)."""
    checkpoints.save_checkpoint(path, {
        **{k: m.state_dict() for k, m in nets.items()}, **run.state_dict(), "epoch": epoch,
        "args": vars(args), "rng": rng_state(),
        "versions": {"torch": str(torch.__version__), "python": platform.python_version()}})


def resume(args, state, nets, run, device, master, total):
    """Take up a run where its checkpoint left it: weights, optimisers, run state, RNG; the log
    rewound to it. --steps counts in total. Other data or another run folder (fine-tuning, a
    branch): best PSNR and the last good checkpoint start afresh there, so that NEW/best.pt is
    written and named."""
    checkpoints.load_weights(nets, state)
    run.load_state_dict(state)
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and device.type == "cuda":
        for i, st in enumerate(state["rng"]["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(st, i)
    if total < run.step:
        raise cli.UserError(f"{state['path']} is at step {run.step} and --steps counts in total, "
                            f"so {total} would train nothing: pass --steps {run.step + total} to "
                            f"train {total} more")
    other_data = data_of(state["args"]) != data_of(vars(args))
    other_folder = not config.own_folder(state["path"], args.out)
    if other_data or other_folder:
        run.best, run.last_good = -math.inf, None
        if other_data:    # the open log window averaged the old data: start a new one
            run.acc.zero_()
            run.n_acc = run.d_wins = 0
    if master:
        if not other_data:
            warn_if_files_changed(state.get("data_files"), run.data_files, args, state["path"])
        cli.rewind_log(os.path.join(args.out, "log.jsonl"), run.step)
        print(f"resumed {state['path']} at step {run.step}"
              + (" on other data" if other_data else "")
              + (f"; best PSNR and the last good checkpoint start afresh in {args.out}"
                 if not run.last_good else "")
              + (f"; training to step {total} in total ({total - run.step} more)"
                 if total > run.step else
                 f"; nothing to train: it is at the --steps {total} asked for (a total)"))


def files_fingerprint(names):
    """{"n", "sha256"} of a data folder's image files (names relative to the data root, both
    splits), or None for none (the embedded shapes data). Files added, removed or renamed give
    another one, and with it other training and held-out images (datasets.split_files holds out a
    share of a plain folder by name hash)."""
    if not names:
        return None
    digest = hashlib.sha256(b"\0".join(sorted(os.fsencode(n) for n in names))).hexdigest()
    return {"n": len(names), "sha256": digest[:16]}


def warn_if_files_changed(saved, now, args, path):
    """One warning line when the data folder's files differ from those the checkpoint was trained
    on. A checkpoint written before the fingerprint existed (or of the shapes data) has none: no
    comparison."""
    if not isinstance(saved, dict) or now is None or saved == now:
        return
    then = saved.get("n")
    counts = (f"{then} image files then, {now['n']} now" if then != now["n"]
              else f"{then} image files then and now, other names")
    print(f"warning: {args.data_root}: the folder changed since {path} was saved ({counts}): its "
          "training and held-out images are not the run's, so this is no exact continuation and "
          "the held-out PSNR is not comparable with earlier evaluations; restore the folder, or "
          "branch with --out NEW_DIR (best.pt starts afresh there)", file=sys.stderr)


def data_of(a):
    """What decides a run's training images: the dataset, its folder (shapes: its size instead),
    the load size, a Tiny ImageNet subset."""
    where = a["shapes_n"] if a["data"] == "shapes" else os.path.abspath(a["data_root"])
    return a["data"], where, a["load_size"], a.get("train_per_class", 0)


def announce(args, world, n_train, n_val, G, D, total):
    """The run's first lines (what, how big, where, how long on a CPU), and OUT/args.json."""
    print(f"Context Encoder | {args.data} ({n_train} train / {n_val} held-out images) | "
          f"G {ce_model.count_params(G) / 1e6:.2f}M D {ce_model.count_params(D) / 1e6:.2f}M "
          f"params | {total} steps x {args.batch_size}{f' x {world} ranks' if world > 1 else ''} "
          f"| {args.device} {args.dtype} | out {args.out}")
    print(f"data: {args.data_root}"
          + (" (the embedded shapes are cached there)" if args.data == "shapes" else ""))
    print(f"config: {flags_line(args)}")
    on_cpu = torch.device(args.device).type == "cpu"
    quick = [f"--{k.replace('_', '-')} {v}" for k, v in config.CPU_QUICK.items()
             if getattr(args, k) == v]
    if on_cpu and args.data == "shapes" and not args.resume and quick:
        print(f"CPU defaults (the flags not given): {' '.join(quick)}; the paper's network and "
              "batch: --width 64 --bottleneck 4000 --batch-size 64")
    q, alexnet = config.CPU_QUICK, args.arch == "alexnet"
    if on_cpu and (alexnet or args.width > q["width"] or args.bottleneck > q["bottleneck"]):
        given = (f"--arch alexnet --alexnet-width {args.alexnet_width:g}" if alexnet
                 else f"--width {args.width} --bottleneck {args.bottleneck}")
        sec = cpu_step_seconds(G, D if args.lam_adv > 0 else None, args.batch_size,
                               ce_model.input_size(args))
        if not alexnet:
            smaller = f"; the CPU quick-start network is --width {q['width']} --bottleneck " \
                      f"{q['bottleneck']} --batch-size {q['batch_size']}"
        else:
            smaller = ("; --alexnet-width 0.25 shrinks every layer" if args.alexnet_width > 0.25
                       else "")
        print(f"note: this network on a CPU ({given} --batch-size {args.batch_size}): about "
              f"{sec:.1f} s per step (estimated: a timed forward pass, x3 for the backward), "
              f"{fmt_time(sec * total)} for {total} steps{smaller}")
    cli.atomic_write(os.path.join(args.out, "args.json"), json.dumps(vars(args), indent=1))


def flags_line(args, parser=None):
    """The run's flags as a command line that ce_train.py parses back to the same flags: real
    flags (--no-bias, --compile only when on), None values and fields that are not flags (quick)
    left out. parser: ce_train.build_parser() by default."""
    if parser is None:
        import ce_train   # the flag table; imported here because ce_train imports this module
        parser = ce_train.build_parser()
    a, words = vars(args), []
    for act in parser._actions:
        if not act.option_strings or act.dest not in a or a[act.dest] is None:
            continue
        flag, v = act.option_strings[0], a[act.dest]
        if isinstance(act, argparse.BooleanOptionalAction):
            words.append(flag if v else f"--no-{flag[2:]}")
        elif isinstance(act, argparse._StoreTrueAction):
            words += [flag] if v else []
        else:
            words += [flag, shlex.quote(str(v))]
    return " ".join(words)


def cpu_step_seconds(G, D, batch_size, size=128):
    """Seconds per training step on this CPU, estimated from one timed forward pass at the run's
    batch size and image size: G once, D three times (real, fake, fake again for the G step;
    D=None for an L2-only run), x3 for the backward passes. (Timing a smaller batch and scaling
    would mislead: the bottleneck layers' 2 x 33 M weights cost the same for any batch.) D sees
    what it sees in training: the region G paints, or the whole image. Nothing changes: eval mode
    (BatchNorm statistics untouched), no gradients, no random numbers."""
    x = torch.zeros(batch_size, 3, size, size, device=next(G.parameters()).device)
    nets = [G] if D is None else [G, D]
    for net in nets:
        net.eval()
    with torch.no_grad():
        t0 = time.perf_counter()
        fake = G(x)
        o, h = (size - fake.shape[-1]) // 2, fake.shape[-1]
        if D is not None:
            D(x[:, :, o:o + h, o:o + h]), D(fake), D(fake)
        dt = time.perf_counter() - t0
    for net in nets:
        net.train()
    return 3 * dt


def fmt_time(s):
    if s >= 3600:
        return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"
    return f"{int(s // 60)}m{int(s % 60):02d}s"


@contextlib.contextmanager
def run_folder(args, master):
    """Rank 0 holds OUT for the whole run (cli.folder_lock: a second run there is refused, naming
    this one's pid), clears the temp files a killed run left there, and, for a new run or a branch
    (a resume into another folder), starts a fresh log.jsonl: the folder holds no run
    (config.choose_out), so an old log there is a killed run's that can never be resumed. Sample
    grids are named by step and rewritten as the new run reaches each step."""
    if not master:
        yield
        return
    with cli.folder_lock(args.out):
        cli.remove_temp_files(args.out)
        own = args.resume and config.own_folder(args.resume, args.out)
        if not own and os.path.exists(os.path.join(args.out, "log.jsonl")):
            cli.atomic_write(os.path.join(args.out, "log.jsonl"), "")
        yield
