"""The checkpoint format of ce_train.py: weights, optimisers, flags, step and RNG state, written
atomically and checked in one place (check_checkpoint) whenever read, so that a bad file is a
one-line CheckpointError. load_checkpoint rebuilds the networks from the flags saved in the file.

    python -c "import ce_utils.checkpoints as c; print(c.load_checkpoint('runs/shapes')[2]['step'])"
"""
import argparse
import math
import os

import torch

import ce_model
from ce_utils import cli
from ce_utils.cli import CheckpointError


def save_checkpoint(path, state):
    """Write `state`, stamped with FORMAT, by cli.atomic_write: a kill leaves the old or new file.

    A state holding a NaN/Inf tensor is not written, and a failed write (a full disk) is a
    CheckpointError naming the file; the previous file is left intact either way.
    """
    path = os.fspath(path)
    bad = first_nonfinite(state)
    if bad:
        raise CheckpointError(f"{path}: not written: {bad} holds NaN/Inf")

    def write(f):
        try:
            torch.save({"format": FORMAT, **state}, f)
        except RuntimeError as e:  # torch.save wraps a failed write (OSError) in a RuntimeError
            cause = e.__context__
            why = str(cause or e).splitlines()[0][:120]
            raise cause if isinstance(cause, OSError) else OSError(why) from None

    try:
        cli.atomic_write(path, write)
    except OSError as e:  # atomic_write's message: could not be written (why); previous one intact
        raise CheckpointError(f"{path}: {e.strerror}") from None


def read_checkpoint(path, resume=False):
    """Load a checkpoint dict on the CPU, checked by check_checkpoint for evaluation (or, with
    `resume`, for a resumed run), or raise CheckpointError saying what is wrong with the file."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file "
                              "(give OUT/ckpt.pt or OUT/best.pt of a run)")
    try:
        # weights_only: a checkpoint holds tensors and plain types only, so nothing in it runs code.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad file; all mean the same to the user
        why = ("holds Python objects besides tensors" if "weights_only" in str(e)
               else str(e).splitlines()[0][:100])
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {why}); "
                              "it may be truncated or not written by ce_train.py") from None
    state = check_checkpoint(state, path, resume)
    state["path"] = path
    return state


def load_checkpoint(path, device="cpu"):
    """Rebuild (G, D, state) from a checkpoint alone, using the architecture flags saved in it."""
    state = read_checkpoint(path)
    a = state["args"]
    G, D = ce_model.build_pair(a, init="none")
    load_weights({"G": G, "D": D}, state)
    return G.to(device), D.to(device), state


RUN_HOW = ("capturable", "fused", "foreach")   # an optimiser's implementation here, not its state


def load_weights(modules, state):
    """Load state[k] into each module or optimiser of {k: m}; a mismatch (a missing, extra or
    reshaped tensor) is a CheckpointError naming the file and the part."""
    for k, m in modules.items():
        try:
            own = ([{f: g.get(f) for f in RUN_HOW} for g in m.param_groups]
                   if hasattr(m, "param_groups") else None)
            m.load_state_dict(state[k])
            if own is not None:
                keep_implementation(m, own)
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
            why = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise CheckpointError(f"{state['path']}: {k} does not fit the network of the "
                                  f"checkpoint's own flags ({why})") from None


def keep_implementation(opt, own):
    """Put back the implementation flags `own` (one dict per group) that load_state_dict took from
    the file, with the step counts where they belong (the parameters' device for fused or
    capturable Adam, else the CPU) and the moments in their parameter's memory layout.

    Why: a graphed GPU run saves Adam fused and capturable, its steps on the GPU and its parameters
    channels_last; without this its checkpoint fails at the first step on a CPU, and a CPU run's
    cannot be resumed on a GPU (the fused Adam refuses mixed layouts).
    """
    for group, flags in zip(opt.param_groups, own):
        group.update(flags)
        on_device = bool(flags.get("capturable") or flags.get("fused"))
        for p in group["params"]:
            st = opt.state.get(p, {})
            for k, v in st.items():
                if k == "step" and isinstance(v, torch.Tensor):
                    st[k] = v.to(p.device if on_device else "cpu", torch.float32)
                elif (isinstance(v, torch.Tensor) and v.shape == p.shape
                      and v.stride() != p.stride()):
                    st[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)


# ------------------------------------------------------------------------------------------------
# The checkpoint format: what a file holds, checked in one place (check_checkpoint) on every read

# 1: files written before the format had a number (no "format" key); 2: the "format" key, the
# schema checked on load. Every flag below has been saved since the first version (git log -S on
# each flag), so a file of either format that lacks one is damaged or foreign, not old: it is
# refused. Only the open log window, added to format 1 late, is filled in.
FORMAT = 2
# The flags that rebuild the networks and their input (the mask), with their types: enough to
# evaluate or inpaint.
EVAL_ARGS = {"width": int, "bottleneck": int, "bottleneck_bn": bool, "bias": bool, "overlap": int,
             "ring": str, "fill": str, "load_size": int, "data": str, "data_root": str,
             "mask": str, "arch": str, "alexnet_width": float}
# The other flags of ce_train.py that a resumed run takes over (tests/test_checkpoint_compat.py
# keeps this list complete: a new training flag needs a line here and, for older files, a default
# in NEW_FLAGS).
RESUME_ARGS = {"variant": str, "shapes_n": int, "flip": bool, "batch_size": int, "epochs": int,
               "steps": int, "lr_g": float, "lr_d": float, "beta1": float, "beta2": float,
               "lam_rec": float, "lam_adv": float, "overlap_weight": float, "rec_reduction": str,
               "d_reduction": str, "init": str, "seed": int, "log_every": int,
               "eval_every": int, "eval_images": int, "mask_per_batch": bool, "rec_loss": str,
               "cfc_dropout": float, "train_per_class": int, "val_images": int}
FLAG_TYPES = {**EVAL_ARGS, **RESUME_ARGS}
# Their ranges and choices are not copied here: _check_flag_rules asks ce_train.py's parser and
# config.validate, the command line's own rules.
# Flags added with random masks, the AlexNet model and the Tiny ImageNet subset: a file without
# them was written before they existed, when the only behaviour was this one, so they are filled
# in (for any format).
NEW_FLAGS = {"mask": "center", "mask_per_batch": False, "rec_loss": "hole", "arch": "dcgan",
             "alexnet_width": 1.0, "cfc_dropout": 0.5, "train_per_class": 0, "val_images": 0}
# Keys an older file may lack, with the value its version certainly had:
# {key: (newest format lacking it, value)}. log_window None: an empty window, so the first log
# line after resuming averages fewer steps.
FILLED = {"log_window": (1, None)}


def check_checkpoint(state, path, resume=False):
    """The one check of a checkpoint, before any of it is used, raising a CheckpointError naming
    the file and the part that is wrong.

    Always: G and D as dicts of tensors and the flags that rebuild them (ce_model.ARCH_KEYS); every
    flag present of its type and within ce_train.py's own rules (_check_flag_rules); G and D
    exactly the tensors of the networks those flags build (_check_weights). Other EVAL_ARGS flags
    absent are refused only when asked for (state["args"] becomes a _Flags), so that a weights-only
    file still loads. With `resume`: everything a resumed run restores (every flag, optimisers and
    their moments, step, RNG, log window, best PSNR). What an older format certainly held is
    filled in (state["note"] says so); a NaN/Inf weight is refused.
    """
    def refuse(what):
        raise CheckpointError(f"{path}: {what}")

    if not isinstance(state, dict):
        refuse("not a ce_train.py checkpoint (it holds no dict of named parts)")
    fmt = state.get("format", 1)
    if type(fmt) is not int or not 1 <= fmt <= FORMAT:
        refuse(f"checkpoint format {fmt!r}; this code reads formats 1 to {FORMAT} "
               "(written by a newer version?)")
    if isinstance(state.get("args"), dict):
        state["args"] = {**NEW_FLAGS, **state["args"]}
    required = ce_model.ARCH_KEYS + (tuple(EVAL_ARGS) if resume else ())
    _check_part(state, ("G", "D"), FLAG_TYPES, required, refuse)
    bad = first_nonfinite({k: state[k] for k in ("G", "D", "optG", "optD", "log_window")
                           if k in state})
    if bad:
        refuse(f"{bad} holds NaN/Inf (saved after a diverging update by an older version); "
               "use an earlier checkpoint")
    _check_flag_rules(state["args"], refuse)
    nets = _check_weights(state, refuse)
    if resume:
        _check_resume(state, nets, lambda what: refuse(
            f"cannot resume from it: {what} (evaluating it still works: "
            f"{cli.command('ce_eval.py', '--ckpt', path)})"))
        filled = [k for k, (newest, value) in FILLED.items() if fmt <= newest and k not in state]
        for k in filled:
            state[k] = FILLED[k][1]
        if filled:  # the caller prints it (ce_model.py prints nothing)
            state["note"] = (f"note: {path} is a format-{fmt} checkpoint without "
                             f"{', '.join(filled)}; resuming with an empty log window "
                             "(the first log line after it averages fewer steps)")
    state["args"] = _Flags(state["args"], path)
    return state


class _Flags(dict):
    """A checkpoint's flags (args): asking for an absent one raises a CheckpointError naming it and
    the file (one line for the user, not a KeyError traceback). For reading: save a plain dict."""

    def __init__(self, flags, path):
        super().__init__(flags)
        self.path = path

    def __missing__(self, k):
        raise CheckpointError(f"{self.path}: its flags (args) lack {k}, which this needs; it was "
                              "not written by ce_train.py, or by a version without that flag")


def _check_part(state, weights, flags, required, refuse):
    """`weights`: dicts of named tensors. state["args"]: a dict holding the `required` flags; each
    flag k of `flags` that it holds is of type flags[k] (flag_type_ok)."""
    for k in weights:
        w = state.get(k)
        if w is None:
            refuse(f"not a ce_train.py checkpoint: '{k}' is missing")
        if not isinstance(w, dict) or not all(isinstance(n, str) and isinstance(t, torch.Tensor)
                                              for n, t in w.items()):
            refuse(f"'{k}' is not a dict of named tensors")
    a = state.get("args")
    if not isinstance(a, dict):
        refuse("'args' (the run's flags) is missing or not a dict")
    missing = [k for k in required if k not in a]
    if missing:
        refuse(f"its flags (args) lack {', '.join(missing)}")
    for k in flags:
        if k in a and not flag_type_ok(k, a[k]):
            refuse(f"flag {k} is {a[k]!r}, not a valid value")


def flag_type_ok(k, v):
    """Whether `v` is of the type of ce_train.py's flag k (FLAG_TYPES; a float flag may hold an
    int, no flag a bool unless it is one); flags of other names are not checked. Also used for a
    run folder's args.json (figures.run_args)."""
    typ = FLAG_TYPES.get(k)
    if typ is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    return typ is None or type(v) is typ


def _check_flag_rules(a, refuse):
    """The saved flags obey the command line's rules, not a copy of them: each flag the range
    (its argparse type) and choices of ce_train.py's parser, then config.validate's rules between
    flags. A flag that a weights-only file lacks takes its default there (load_size: the input
    size of the file's arch), so that only what the file holds is judged."""
    import ce_train                   # the flag table (imported here: ce_train imports this module)
    from ce_utils import config       # (likewise)
    p = ce_train.build_parser()
    for act in p._actions:
        k = act.dest
        if k not in FLAG_TYPES or k not in a:
            continue
        flag, v = act.option_strings[0], a[k]
        if act.choices is not None and v not in act.choices:
            refuse(f"flag {k} is {v!r}: {flag} is one of {', '.join(map(str, act.choices))}")
        try:
            if callable(act.type) and not isinstance(v, bool):
                act.type(repr(v))
        except (argparse.ArgumentTypeError, ValueError) as e:
            refuse(f"flag {k} is {v!r}: {flag} {e}")
    defaults = {**vars(p.parse_args([])), "load_size": ce_model.input_size(a)}
    rules = argparse.Namespace(error=lambda message: refuse(  # validate reports through error()
        f"its flags break ce_train.py's rules: {message}"))
    config.validate(argparse.Namespace(**{**defaults, **a}), rules)


def _check_weights(state, refuse):
    """G and D hold exactly the tensors of the networks that the file's flags build: the same
    names and shapes, floating point where the network's are (an integer weight would be cast to
    it, truncated, without a word). Returns those networks, built on the meta device (no memory,
    no init) for the optimiser check."""
    with torch.device("meta"):
        nets = dict(zip(("G", "D"), ce_model.build_pair(state["args"], init="none")))
    for k, net in nets.items():
        own, saved = net.state_dict(), state[k]
        missing, extra = sorted(own.keys() - saved.keys()), sorted(saved.keys() - own.keys())
        wrong = [f"{n} is {tuple(t.shape)}, not {tuple(own[n].shape)}" for n, t in saved.items()
                 if n in own and t.shape != own[n].shape]
        wrong += [f"{n} is {t.dtype}, not {own[n].dtype}" for n, t in saved.items()
                  if n in own and t.is_floating_point() != own[n].is_floating_point()]
        problems = [f"missing {n}" for n in missing] + [f"unexpected {n}" for n in extra] + wrong
        if problems:
            more = f", and {len(problems) - 1} more" if len(problems) > 1 else ""
            refuse(f"{k} does not fit the network of the checkpoint's own flags ({problems[0]}"
                   f"{more})")
    return nets


def _check_resume(state, nets, refuse):
    """What a resumed run restores besides the weights, each as this code restores it: all flags,
    both optimisers (_check_adam), the step, the RNG state, the log window, the best PSNR."""
    for k in ("optG", "optD"):
        _check_adam(state.get(k), nets[k[3:]], k, refuse)
    _check_part(state, (), RESUME_ARGS, tuple(RESUME_ARGS), refuse)
    step = state.get("step")
    if type(step) is not int or not 0 <= step <= cli.INT64_MAX:
        refuse(f"'step' is {'missing' if 'step' not in state else repr(step)}")
    rng = state.get("rng")
    cuda = rng.get("cuda", []) if isinstance(rng, dict) else None
    if (not isinstance(rng, dict) or not _bytes_of_size(rng.get("torch"), RNG_BYTES)
            or not isinstance(cuda, (list, tuple))
            or not all(_bytes_of_size(t, CUDA_RNG_BYTES) for t in cuda)):
        refuse(f"'rng' (the random number state) is {'missing' if rng is None else 'malformed'}"
               f" (torch: {RNG_BYTES} bytes, cuda: {CUDA_RNG_BYTES} bytes per device)")
    best = state.get("best_psnr")
    if (isinstance(best, bool) or not isinstance(best, (int, float)) or math.isnan(best)
            or best == math.inf):   # -inf: no evaluation yet
        refuse(f"'best_psnr' is {'missing' if 'best_psnr' not in state else repr(best)} (a "
               "number, or -inf before the first evaluation)")
    window = state.get("log_window")
    from ce_utils import runstate     # the log window's statistics (runstate imports this module)
    if window is not None and not (isinstance(window, dict)
                                   and isinstance(window.get("acc"), torch.Tensor)
                                   and window["acc"].is_floating_point()
                                   and window["acc"].shape == (len(runstate.STATS),)
                                   and type(window.get("n_acc")) is int and window["n_acc"] >= 0
                                   and type(window.get("d_wins")) is int
                                   and window["d_wins"] >= 0):
        refuse(f"'log_window' is malformed (acc: {len(runstate.STATS)} floats, n_acc and d_wins: "
               "integers >= 0)")


RNG_BYTES = torch.get_rng_state().numel()   # the CPU generator's state (torch.set_rng_state)
CUDA_RNG_BYTES = 16   # a CUDA generator's (CUDAGeneratorImpl::get_state): seed, Philox offset


def _bytes_of_size(t, n):
    return isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.shape == (n,)


def _check_adam(opt, net, k, refuse):
    """An Adam state_dict that fits `net` as load_state_dict maps it (the i-th saved parameter id
    to the network's i-th parameter): one id per parameter, each moment of its parameter's shape,
    exp_avg_sq >= 0 (its square root is taken), step >= 1, and hyperparameters within the rules of
    the learning-rate flags (cli.lr_limit)."""
    def bad(what):
        refuse(f"'{k}' (the optimiser state) is {what}")

    if opt is None:
        bad("missing")
    if (not isinstance(opt, dict) or not isinstance(opt.get("state"), dict)
            or not isinstance(opt.get("param_groups"), list)
            or not all(isinstance(g, dict) and isinstance(g.get("params"), list)
                       for g in opt["param_groups"])):
        bad("malformed")
    ids = [i for g in opt["param_groups"] for i in g["params"]]
    shapes = [p.shape for p in net.parameters()]
    if len(ids) != len(shapes) or len(set(ids)) != len(ids):
        bad(f"for {len(ids)} parameters, not the network's {len(shapes)}")
    shape_of = dict(zip(ids, shapes))
    for g in opt["param_groups"]:
        if not _adam_group_ok(g):
            bad(f"malformed: hyperparameters lr {g.get('lr')!r}, betas {g.get('betas')!r}, eps "
                f"{g.get('eps')!r}, weight_decay {g.get('weight_decay')!r}")
    for i, st in opt["state"].items():
        if i not in shape_of or not isinstance(st, dict) or set(st) != {"step", "exp_avg",
                                                                         "exp_avg_sq"}:
            bad(f"malformed (parameter {i!r}: not Adam's step, exp_avg, exp_avg_sq of a "
                "parameter)")
        step = st["step"]
        step = step.item() if isinstance(step, torch.Tensor) and step.numel() == 1 else step
        if isinstance(step, bool) or not isinstance(step, (int, float)) or not step >= 1:
            bad(f"malformed (parameter {i}: step {step!r})")
        for m in ("exp_avg", "exp_avg_sq"):
            t = st[m]
            if not (isinstance(t, torch.Tensor) and t.is_floating_point()
                    and t.shape == shape_of[i]):
                bad(f"malformed (parameter {i}: {m} of shape "
                    f"{tuple(getattr(t, 'shape', ()))}, not {tuple(shape_of[i])})")
        if bool((st["exp_avg_sq"] < 0).any()):
            bad(f"malformed (parameter {i}: exp_avg_sq < 0)")


def _adam_group_ok(g):
    """An Adam parameter group's lr, betas, eps and weight decay within the rules of the flags that
    set them (an lr past cli.lr_limit makes torch's first step raise); no AMSGrad or maximize, whose
    state this code never writes."""
    def real(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    lr, betas, eps, decay = g.get("lr"), g.get("betas"), g.get("eps"), g.get("weight_decay")
    return (isinstance(betas, (list, tuple)) and len(betas) == 2 and all(map(real, betas))
            and all(0 <= b < 1 for b in betas) and all(map(real, (lr, eps, decay)))
            and 0 < lr < cli.lr_limit(betas[0]) and eps > 0 and decay >= 0
            and not g.get("amsgrad") and not g.get("maximize"))


def first_nonfinite(state, name=""):
    """The name of the first floating-point tensor in `state` (nested dicts, lists) holding NaN or
    Inf, or None."""
    if isinstance(state, torch.Tensor):
        if state.is_floating_point() and not bool(torch.isfinite(state).all()):
            return name
        return None
    if isinstance(state, dict):
        items = state.items()
    else:
        items = enumerate(state) if isinstance(state, (list, tuple)) else ()
    for k, v in items:
        bad = first_nonfinite(v, f"{name}.{k}" if name else str(k))
        if bad:
            return bad
    return None
