"""A run's folder and files: nothing of the user's is deleted, one run per folder, a fresh log for
a new run, a log tail cut short is repaired, a full disk names its file, and neither SIGHUP nor a
closed stdout loses the run."""
import errno
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY

import ce_model
import ce_train
from ce_utils import checkpoints, cli


@pytest.fixture(scope="module")
def flags(shapes_root):
    """Tiny-model flags with the session's data cache."""
    return TINY + ["--data-root", shapes_root, "--batch-size", "4"]


def log_steps(out):
    return [r["step"] for r in cli.read_log(os.path.join(out, "log.jsonl")) if "loss_rec" in r]


def test_only_this_programs_temp_files_are_removed(tmp_path, flags):
    out = tmp_path / "run"
    (out / "x.tmp").mkdir(parents=True)                  # a folder named like a temp file
    (out / "y.ce-tmp7").mkdir()          # even one with our own pattern: not a regular file
    (out / "thesis.tmp.tex").write_text("chapter 1")
    (out / "ckpt.pt.ce-tmp4242").write_bytes(b"half a checkpoint of a killed run")
    ce_train.main(flags + ["--steps", "1", "--out", str(out)])
    assert (out / "thesis.tmp.tex").read_text() == "chapter 1"
    assert (out / "x.tmp").is_dir() and (out / "y.ce-tmp7").is_dir()
    assert not (out / "ckpt.pt.ce-tmp4242").exists()
    assert checkpoints.read_checkpoint(out)["step"] == 1 and not (out / ".lock").exists()


def test_a_second_run_in_the_same_folder_is_refused_and_a_dead_holder_is_not(tmp_path, flags,
                                                                             capsys):
    out = tmp_path / "run"
    out.mkdir()
    # another process holding OUT/.lock the way cli.folder_lock does (flock, its pid inside),
    # without torch
    code = (f"import fcntl, os, time\nf = open({str(out / '.lock')!r}, 'a+')\n"
            "fcntl.flock(f, fcntl.LOCK_EX)\nf.write(str(os.getpid()))\nf.flush()\n"
            "print('held', flush=True)\ntime.sleep(120)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SystemExit) as e:
            cli.run(ce_train.main, flags + ["--steps", "1", "--out", str(out)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"{out} is in use by another run (pid {holder.pid})" in err
        assert len(err.strip().splitlines()) == 1 and not (out / "log.jsonl").exists()
    finally:
        holder.kill()     # dies holding the lock: its .lock file stays, the kernel drops the lock
        holder.wait()
    assert (out / ".lock").read_text() == str(holder.pid)
    ce_train.main(flags + ["--steps", "1", "--out", str(out)])
    assert checkpoints.read_checkpoint(out)["step"] == 1


def test_lock_in_process_and_an_unused_folder_is_removed_again(tmp_path):
    out = tmp_path / "new"
    with cli.folder_lock(out):
        assert (out / ".lock").read_text() == str(os.getpid())
        with pytest.raises(cli.UserError, match=f"pid {os.getpid()}"):
            with cli.folder_lock(out):
                pass
    assert not out.exists()   # created by the lock, nothing written: removed (a run failed early)
    with cli.folder_lock(out):    # free again
        (out / "kept").write_text("x")
    assert (out / "kept").exists() and not (out / ".lock").exists()


def test_a_new_run_over_a_killed_one_starts_a_fresh_log(tmp_path, flags):
    out = tmp_path / "run"
    out.mkdir()
    old = [{"step": s, "epoch": 0, "loss_D": 1.0, "loss_rec": 1.0, "loss_adv": 1.0, "D_x": 0.5,
            "D_G_x": 0.5}
           for s in range(1, 6)]           # steps 1-5 of a run killed before its first checkpoint
    (out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    ce_train.main(flags + ["--steps", "2", "--log-every", "1", "--out", str(out)])
    assert log_steps(out) == [1, 2]


def test_a_log_line_cut_short_is_dropped_before_appending(tmp_path):
    path = str(tmp_path / "log.jsonl")
    with open(path, "w") as f:
        f.write('{"step": 1}\n{"step": 2, "loss_r')   # killed (or disk full) in mid-record
    cli.append_log(path, {"step": 3})
    with open(path) as f:
        assert f.read() == '{"step": 1}\n{"step": 3}\n'
    with open(path, "w") as f:
        f.write('{"st')                                     # nothing but a fragment
    cli.append_log(path, {"step": 4})
    assert cli.read_log(path) == [{"step": 4}]
    with open(path, "w") as f:                        # --resume rewinds, dropping broken lines too
        f.write('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n{"step": 9}\n{"ste')
    cli.rewind_log(path, 3)
    with open(path) as f:
        assert f.read() == '{"step": 1}\n{"step": 3}\n'


class FullDisk:
    """A file object that accepts `room` bytes, then fails as a full disk does."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, b):
        if len(b) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(b)
        return self.f.write(b)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def full_disk_open(room):
    return lambda path, mode="r", *a, **k: FullDisk(open(path, mode, *a, **k), room)


def test_a_full_disk_names_the_file_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch,
                                                                      capsys):
    G, D = ce_model.build_models(8, 16)
    path = str(tmp_path / "ckpt.pt")
    checkpoints.save_checkpoint(path, {"G": G.state_dict(), "D": D.state_dict(), "args": {},
                                       "step": 1})
    monkeypatch.setattr(cli, "open", full_disk_open(10_000), raising=False)
    with pytest.raises(checkpoints.CheckpointError) as e:
        checkpoints.save_checkpoint(path, {"G": G.state_dict(), "D": D.state_dict(), "args": {},
                                           "step": 2})
    assert str(e.value).startswith(path) and "No space left on device" in str(e.value)
    assert torch.load(path, weights_only=True)["step"] == 1 and os.listdir(tmp_path) == ["ckpt.pt"]

    log = str(tmp_path / "log.jsonl")
    monkeypatch.setattr(cli, "open", full_disk_open(0), raising=False)
    for write in (lambda: cli.append_log(log, {"step": 1}), lambda: cli.atomic_write(log, "{}\n")):
        with pytest.raises(SystemExit) as e:
            cli.run(lambda argv: write())
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith(f"error: {log}: ")
        assert "No space left on device" in err


def start(flags, out, extra, stdout=subprocess.PIPE):
    cmd = [sys.executable, os.path.join(ROOT, "ce_train.py"), *flags, "--out", str(out), *extra]
    return subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.PIPE, text=True, cwd=out.parent)


def test_a_closed_stdout_does_not_stop_training(tmp_path, flags):
    """`ce_train.py | head -1`: the reader goes away after one line; the run goes on quietly and
    finishes."""
    out = tmp_path / "run"
    proc = start(flags, out, ["--steps", "20", "--log-every", "1"])
    try:
        assert proc.stdout.readline().startswith("Context Encoder")
        proc.stdout.close()
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr
    assert checkpoints.read_checkpoint(out)["step"] == 20 and log_steps(out) == list(range(1, 21))
