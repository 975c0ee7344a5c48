"""Plumbing shared by every ce_*.py script, none of it from the paper: the argument parser, the error-to-exit
wrapper, the one place where device, autocast dtype and memory format are decided, atomic writes, the run log,
and signal handling. ce_model.py, ce_losses.py and ce_shapes.py do not import it (each can be copied alone).

    python -c "import ce_cli; print(ce_cli.Hardware('cpu').dtype_name)"
"""
import argparse
import contextlib
import json
import os
import re
import signal
import sys

import torch

import ce_model

# Temp files this project writes are named PATH.ce-tmp<pid>: a pattern nobody else uses, and the only files it
# ever deletes on its own (left-overs of a run killed while writing; the real files are intact).
TMP_SUFFIX = ".ce-tmp"
_TMP_RE = re.compile(re.escape(TMP_SUFFIX) + r"\d+$")


class UserError(Exception):
    """A problem the user can fix (bad data, a bad file): printed as one line, exit code 2, no traceback."""


class DataError(UserError):
    """Bad or missing data: the message says which file, what is wrong and what to do."""


# ----------------------------------------------------------------------------------------------------------------
# Command line: one parser class, one error-to-exit wrapper

class _HelpFormat(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help shows the script's docstring as written (its examples) and every flag's default."""


class Parser(argparse.ArgumentParser):
    """argparse with the module docstring as --help text and one-line errors (no usage dump)."""

    def __init__(self, doc, **kw):
        super().__init__(description=doc, formatter_class=_HelpFormat, **kw)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def run(main, argv=None):
    """Run a script's main(argv); user-facing errors become one line on stderr and exit code 2, never a traceback."""
    try:
        return main(argv)
    except (UserError, ce_model.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except torch.cuda.OutOfMemoryError:
        print("error: out of GPU memory; lower --batch-size (or --width/--bottleneck)", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # a folder that cannot be written, a full disk: say which file, no traceback
        print(f"error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (which saves and exits on its own)
        print("\ninterrupted; nothing was written over earlier results", file=sys.stderr)
        sys.exit(130)


# ----------------------------------------------------------------------------------------------------------------
# Device and precision: decided here, once, for train, eval, bench and sweep

def resolve_device(name, p):
    """'auto' -> cuda if available, else cpu; a device that does not exist is a parse-time error of parser p."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        p.error(f"--device {name}: not a device name (cpu, cuda, cuda:N)")
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        p.error(f"--device {name}: no such CUDA device here ({torch.cuda.device_count()} visible); use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        p.error(f"--device {name}: only cpu and cuda are supported")
    return name


class Hardware:
    """Where and how the tensors run. Defaults: on CUDA bf16 autocast and channels_last (speed), on CPU fp32 NCHW.

    DEVIATION: on CUDA the networks run under bf16 autocast with channels_last tensors (--dtype fp32 and
    --no-channels-last turn them off); the losses are computed in float32 either way.
    """

    def __init__(self, device="cpu", dtype="auto", channels_last=None):
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self.dtype_name = ("bf16" if cuda else "fp32") if dtype == "auto" else dtype
        self.dtype = torch.bfloat16 if self.dtype_name == "bf16" else None       # None: no autocast
        self.channels_last = cuda if channels_last is None else bool(channels_last)
        self.mem_fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        self.ctx = torch.autocast(self.device.type, dtype=self.dtype) if self.dtype else contextlib.nullcontext()
        if cuda:
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True


# ----------------------------------------------------------------------------------------------------------------
# Files: atomic writes, temp-file clean-up, the run log

def atomic_write(path, data):
    """Write `data` (bytes, str, or a function that writes to a binary file object) to `path` through a temp file
    in the same folder, flushed to disk, then renamed: a kill at any moment leaves the old file or the new one.
    (ce_model.save_checkpoint has its own copy of these lines so that ce_model.py can be copied alone.)"""
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
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def remove_temp_files(folder):
    """Delete the temp files this project left in `folder` (PATH.ce-tmp<pid>, regular files only); nothing else."""
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if _TMP_RE.search(name) and os.path.isfile(path) and not os.path.islink(path):
            os.remove(path)


def append_log(path, record):
    """Add one JSON record as a line of a run's log.jsonl."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_log(path):
    """The records of a log.jsonl, in order; a line cut short by a kill or a full disk is skipped."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no training log here; give a run folder written by ce_train.py")
    records = []
    with open(path) as f:
        for line in f:
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if isinstance(rec, dict):
                    records.append(rec)
    return records


def rewind_log(path, step):
    """On resume: keep the records up to `step` (later ones will be written again), drop broken lines."""
    if os.path.exists(path):
        keep = [r for r in read_log(path) if r.get("step", 0) <= step]
        atomic_write(path, "".join(json.dumps(r) + "\n" for r in keep))


# ----------------------------------------------------------------------------------------------------------------
# Signals

@contextlib.contextmanager
def signals_caught(signals=(signal.SIGINT, signal.SIGTERM)):
    """Within the block, the signals are recorded in the yielded list instead of killing the process (the training
    loop finishes its step, saves and exits); the previous handlers come back afterwards."""
    caught = []
    previous = {s: signal.signal(s, lambda sig, frame: caught.append(sig)) for s in signals}
    try:
        yield caught
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
