"""Plumbing shared by every ce_*.py script, none of it from the paper: the argument parser, the
error-to-exit wrapper (also keeping a closed stdout from stopping a run), the one place where
device, autocast dtype and memory format are decided, atomic writes, the run log, the lock by which
a run owns its folder, and signal handling. ce_model.py, ce_losses.py, ce_data.py and
ce_utils/synthetic.py do not import it (each can be copied alone).

    python -c "from ce_utils import cli; print(cli.Hardware('cpu').dtype_name)"
"""
import argparse
import contextlib
import errno
import json
import math
import os
import re
import shlex
import signal
import sys

import torch

from ce_data import DataError  # noqa: F401 (defined beside the data, raised by the plumbing too)

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt

# Temp files this project writes are named PATH.ce-tmp<pid>: a pattern nobody else uses, and the
# only files it ever deletes on its own (left-overs of a run killed while writing; the real files
# are intact).
TMP_SUFFIX = ".ce-tmp"
_TMP_RE = re.compile(re.escape(TMP_SUFFIX) + r"\d+$")


class UserError(Exception):
    """A problem the user can fix (bad data, a bad file): printed as one line, exit code 2, no
    traceback."""


class CheckpointError(UserError):
    """A checkpoint file is missing, truncated, foreign or incompatible (one-line message for the
    user)."""


# ------------------------------------------------------------------------------------------------
# Command line: one parser class, one error-to-exit wrapper

class _HelpFormat(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help shows the script's docstring as written (its examples) and every flag's default, but
    no "(default: None)" or "(default: False)" after flags that are off unless given: their help
    says what happens without them."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


# ------------------------------------------------------------------------------------------------
# Flag values: the argparse types that hold each flag's range, shared by every script that takes
# the flag, and by checkpoints.check_checkpoint for the flags a checkpoint holds (ce_train.py's)

INT64_MAX = 2 ** 63 - 1    # torch holds counts, sizes and seeds as int64: none may be larger
F32_MAX = torch.finfo(torch.float32).max


def finite_float(text):
    """argparse type for float flags: 'inf' and 'nan' parse as floats but are never a meaningful
    setting."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def int_range(lo, hi=INT64_MAX, why=""):
    """argparse type for an integer flag in [lo, hi] (hi: int64 by default, so that no value
    reaches torch as an overflow); `why` is said after the range when a value is refused."""
    def integer(text):
        try:
            value = int(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"must be an integer, not {text!r}") from None
        if not lo <= value <= hi:
            bound = f">= {lo}" if hi == INT64_MAX and value < lo else f"in [{lo}, {hi}]"
            raise argparse.ArgumentTypeError(f"must be {bound}{why}, not {value}")
        return value
    return integer


def real(interval, why=""):
    """argparse type for a float flag in `interval`, written as in maths: "(0, inf)", "[0, 1)".
    Always finite: 'inf' and 'nan' are never a meaningful setting."""
    lo, hi = (float(x) for x in interval[1:-1].split(","))
    open_lo, open_hi = interval[0] == "(", interval[-1] == ")"
    bound = f"in {interval}" if math.isfinite(hi) else f"{'>' if open_lo else '>='} {lo:g}"

    def number(text):
        value = finite_float(text)
        if value < lo or value > hi or (open_lo and value == lo) or (open_hi and value == hi):
            raise argparse.ArgumentTypeError(f"must be {bound}{why}, not {value:g}")
        return value
    return number


# The ranges that several scripts share (each script's own ranges are built where used)
positive_int = int_range(1)          # sizes, counts, intervals
count = int_range(0)                 # image counts where 0 means all (or none)
seed = int_range(0)
train_batch = int_range(2, why=" (BatchNorm needs two images per batch and rank to train)")
positive = real("(0, inf)")          # learning rates, widths, loss weights
nonnegative = real("[0, inf)")       # weight decays
fraction = real("[0, 1)")            # Adam's betas, dropout


def lr_limit(beta1=None):
    """The learning rates whose first step is finite in float32 lie below this: Adam's first step
    is lr / (1 - beta1) (its bias correction, applied before the moments' ratio), SGD's lr x the
    gradient (beta1=None)."""
    return F32_MAX if beta1 is None else F32_MAX * (1 - beta1)


class Parser(argparse.ArgumentParser):
    """argparse with the module docstring as --help text and one-line errors (no usage dump)."""

    def __init__(self, doc, **kw):
        super().__init__(description=doc, formatter_class=_HelpFormat, **kw)

    def error(self, message):
        # a range type's refusal reads as a sentence about the flag: "--width must be >= 1, not 0"
        message = re.sub(r"^argument (\S+): must ", r"\1 must ", message)
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class _PipeSafeStdout:
    """sys.stdout that goes quiet when it can no longer be written: its reader has gone
    (`ce_train.py | head -1`: Python ignores SIGPIPE, so the write raises BrokenPipeError) or its
    terminal has (EIO after SIGHUP). The progress lines are dropped from then on (stdout points at
    the null device); the work goes on and log.jsonl keeps the record."""

    def __init__(self, stream):
        self._stream = stream

    def _swallow(self, call, *args):
        try:
            return call(*args)
        except OSError:
            with contextlib.suppress(OSError, ValueError):
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, self._stream.fileno())
                os.close(null)
            return None

    def write(self, text):
        try:
            self._swallow(self._stream.write, text)
        except UnicodeEncodeError:   # a name its encoding cannot hold (café on ASCII): escaped
            enc = getattr(self._stream, "encoding", None) or "ascii"
            self._swallow(self._stream.write, text.encode(enc, "backslashreplace").decode(enc))
        return len(text)

    def flush(self):
        self._swallow(self._stream.flush)

    def __getattr__(self, name):   # reconfigure, fileno, isatty, ... of the real stream
        return getattr(self._stream, name)


def run(main, argv=None):
    """Run a script's main(argv); user-facing errors become one line on stderr and exit code 2,
    never a traceback. A closed stdout never stops the script (_PipeSafeStdout)."""
    stdout, sys.stdout = sys.stdout, _PipeSafeStdout(sys.stdout)
    try:
        return main(argv)
    except (UserError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except torch.cuda.OutOfMemoryError:
        print("error: out of GPU memory; lower --batch-size (or --width/--bottleneck)",
              file=sys.stderr)
        sys.exit(2)
    except RuntimeError as e:   # the CPU's allocator: a size flag beyond this machine's memory
        if "can't allocate memory" not in str(e):
            raise
        size = re.search(r"allocate (\d+) bytes", str(e))
        what = f" {int(size[1]) / 1e9:,.1f} GB" if size else " a tensor"
        print(f"error: out of memory: the CPU could not allocate{what}; lower the size flags "
              "(--batch-size, --width/--bottleneck, image counts)", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # a folder that cannot be written, a full disk: which file, no traceback
        print(f"error: {e.filename}: {e.strerror or e}" if e.filename else f"error: {e}",
              file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (which saves and exits itself)
        print("\ninterrupted; nothing was written over earlier results", file=sys.stderr)
        sys.exit(130)
    finally:
        sys.stdout = stdout


def command(script, *words):
    """A command for the user to paste into a shell (the "Resume with:" hints): `python SCRIPT
    WORDS...`, each word quoted where a shell needs it (a path with a space or a quote)."""
    return shlex.join(["python", script, *map(str, words)])


# ------------------------------------------------------------------------------------------------
# Device and precision: decided here, once, for train, eval, bench and sweep

def resolve_device(name, p):
    """'auto' -> cuda if available, else cpu; a device that does not exist is an error of parser
    p."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        p.error(f"--device {name}: not a device name (cpu, cuda, cuda:N)")
    n_cuda = torch.cuda.device_count()
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= n_cuda):
        p.error(f"--device {name}: no such CUDA device here ({n_cuda} visible); use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        p.error(f"--device {name}: only cpu and cuda are supported")
    return name


def precision(device, dtype="auto", channels_last=None):
    """(autocast dtype name, channels_last) for a device: "auto" is bf16 and NHWC on CUDA, fp32 and
    NCHW on a CPU.
    DEVIATION: on CUDA the networks run under bf16 autocast with channels_last tensors (--dtype
    fp32 and --no-channels-last turn them off); the losses are computed in float32 either way."""
    cuda = torch.device(device).type == "cuda"
    name = ("bf16" if cuda else "fp32") if dtype == "auto" else dtype
    return name, cuda if channels_last is None else bool(channels_last)


class Hardware:
    """Where and how the tensors run (precision() decides); building one changes nothing global.
    ctx: the autocast context (a null one for fp32); mem_fmt: the networks' memory format."""

    def __init__(self, device="cpu", dtype="auto", channels_last=None, cuda_graph=False):
        self.device = torch.device(device)
        self.dtype_name, self.channels_last = precision(self.device, dtype, channels_last)
        self.dtype = torch.bfloat16 if self.dtype_name == "bf16" else None       # None: no autocast
        self.mem_fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        # autocast's cache of cast weights must be off inside a CUDA graph capture (AMP notes)
        self.ctx = contextlib.nullcontext() if self.dtype is None else torch.autocast(
            self.device.type, dtype=self.dtype, cache_enabled=not cuda_graph)

    def use_fast_kernels(self):
        """On CUDA, process-wide: cuDNN autotuning and TF32 matrix products (called once by each
        script's main; ce_masks computes its fields in full float32 regardless)."""
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        return self


# ------------------------------------------------------------------------------------------------
# Files: atomic writes, temp-file clean-up, the run log

def atomic_write(path, data):
    """Write `data` (bytes, str, or a function that writes to a binary file object) to `path`
    through a temp file in the same folder, flushed to disk, then renamed: a kill at any moment
    leaves the old file or the new one. An OSError (a full disk, a read-only folder) names `path`.
    (checkpoints.save_checkpoint writes through it, and reports a failure as a CheckpointError.)"""
    path = os.fspath(path)
    tmp = f"{path}{TMP_SUFFIX}{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise OSError(e.errno, f"could not be written ({e.strerror or e}); the previous version, "
                      "if any, is intact", path) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def remove_temp_files(folder):
    """Delete the temp files this project left in `folder` (PATH.ce-tmp<pid>, regular files
    only); nothing else."""
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if _TMP_RE.search(name) and os.path.isfile(path) and not os.path.islink(path):
            os.remove(path)


def append_log(path, record):
    """Add one JSON record as a line of a run's log.jsonl. A last line without its newline (cut
    short by a kill or a full disk) is dropped first, so that a record is never glued onto it. An
    OSError names the log file."""
    line = (json.dumps(record) + "\n").encode()
    try:
        with open(path, "a+b") as f:       # "a": every write goes to the end, whatever the position
            end = f.seek(0, os.SEEK_END)
            f.seek(max(0, end - 65536))    # records are short: the last newline is in this tail
            tail = f.read()
            if tail and not tail.endswith(b"\n"):
                cut = tail.rfind(b"\n")
                if cut >= 0 or len(tail) == end:
                    f.truncate(end - len(tail) + cut + 1)
                else:                      # a broken tail over 64 KiB: end it; read_log skips it
                    line = b"\n" + line
            f.write(line)
    except OSError as e:
        raise OSError(e.errno, f"could not append to the run log ({e.strerror or e})",
                      path) from None


def read_log(path):
    """The well-formed records of a log.jsonl (log_record), in order; a broken line (cut short by
    a kill or a full disk, not text, or valid JSON of another shape) is skipped."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no training log here; give a run folder written by "
                        "ce_train.py")
    records = []
    with open(path, "rb") as f:       # bytes: a line that is not UTF-8 is one more broken line
        for line in f:
            with contextlib.suppress(ValueError, RecursionError):
                rec = log_record(json.loads(line))
                if rec is not None:
                    records.append(rec)
    return records


# The fields of a log.jsonl record (ce_train.py's log_window and evaluate_and_save write them):
# each step's statistics, or the held-out metrics under "eval" (psnr among them).
LOG_STATS = ("loss_rec", "loss_D", "loss_adv", "D_x", "D_G_x", "img_per_s", "time")
LOG_D_STATS = ("loss_D", "loss_adv", "D_x", "D_G_x")   # all or none (--lam-adv 0: none)


def log_record(rec):
    """`rec` if it is a well-formed log record, else None: a dict whose step (and epoch, if any)
    is an integer >= 0, every statistic present a number, D's statistics all or none, and "eval",
    if present, a dict of numbers holding psnr. Other fields are not read and not checked."""
    def is_number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    def is_count(v):
        return type(v) is int and v >= 0

    if not isinstance(rec, dict) or not is_count(rec.get("step")):
        return None
    ev = rec.get("eval", {"psnr": 0})
    ok = (is_count(rec.get("epoch", 0)) and all(is_number(rec[k]) for k in LOG_STATS if k in rec)
          and len({k in rec for k in LOG_D_STATS}) == 1
          and isinstance(ev, dict) and "psnr" in ev and all(map(is_number, ev.values())))
    return rec if ok else None


def rewind_log(path, step):
    """On resume: keep the records up to `step` (later ones will be written again), drop broken
    lines."""
    if os.path.exists(path):
        keep = [r for r in read_log(path) if r.get("step", 0) <= step]
        atomic_write(path, "".join(json.dumps(r) + "\n" for r in keep))


# ------------------------------------------------------------------------------------------------
# A run owns its folder

@contextlib.contextmanager
def folder_lock(folder):
    """Hold FOLDER/.lock for the block: a second process that asks for the same folder gets a
    UserError naming the pid that holds it. The lock is an OS file lock (flock), which the kernel
    drops when its process dies, however it dies: a .lock file left by a killed run is simply
    taken over. The folder is created if needed (and removed again if still empty at the end)."""
    created = not os.path.isdir(folder)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, ".lock")
    while True:
        f = open(path, "a+")
        if _try_lock(f):
            if os.path.exists(path) and os.path.samestat(os.fstat(f.fileno()), os.stat(path)):
                break
            f.close()   # a run that just ended removed this file: lock the one at `path` now
            continue
        f.seek(0)
        holder = f.read().strip()
        f.close()
        raise UserError(f"{folder} is in use by another run (pid {holder or 'unknown'}); wait for "
                        "it to end or choose another --out")
    try:
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
        yield
    finally:
        with contextlib.suppress(OSError):
            os.remove(path)   # still locked here: nobody else can hold this file
        f.close()
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(folder)   # only if empty: a run that failed before writing leaves nothing


def _try_lock(f):
    try:
        if fcntl is not None:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:  # Windows: lock one byte far past the pid, so that the pid stays readable
            f.seek(1 << 20)
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
        return True
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK, errno.EDEADLK):
            return False
        raise OSError(e.errno, f"cannot lock the run folder ({e.strerror})", f.name) from None


# ------------------------------------------------------------------------------------------------
# Signals

# SIGHUP: the terminal was closed (an ssh session lost); Windows has no SIGHUP.
STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP")
                     if hasattr(signal, n))


@contextlib.contextmanager
def signals_caught(signals=STOP_SIGNALS):
    """Within the block, the signals are recorded in the yielded list instead of killing the
    process (the training loop finishes its step, saves and exits); the previous handlers come
    back afterwards. A signal ignored when the block starts stays ignored: the user asked for that
    (`nohup` ignores SIGHUP so that a closed terminal does not stop the run)."""
    caught = []
    previous = {s: signal.signal(s, lambda sig, frame: caught.append(sig)) for s in signals
                if signal.getsignal(s) != signal.SIG_IGN}
    try:
        yield caught
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
