"""Cases that used to confuse a user (issue 25): a run under nohup stopped by SIGHUP, a data folder
changed between a run and its resume, a full disk at the last pictures ending a finished run with
exit 2, hints that a shell splits at a space, a looping link called a folder, a lost torchrun rank
with no word on which checkpoint resumes."""
import errno
import os
import shlex
import signal

import pytest
import torch
from conftest import TINY
from PIL import Image

import ce_train
from ce_utils import accel, checkpoints, cli, datasets, figures


def tiny_run(tiny_flags, out, *extra):
    """A 2-step run of the tiny network that evaluates and saves at its last step, through the
    same error-to-exit wrapper as the command line."""
    cli.run(ce_train.main, tiny_flags + ["--batch-size", "4", "--steps", "2", "--eval-every", "2",
                                         "--out", str(out), *extra])


def hint(text, label):
    """The command after `label` on its line, split as a POSIX shell splits it."""
    line = next(ln for ln in text.splitlines() if label in ln)
    return shlex.split(line.split(label, 1)[1])


def test_a_signal_ignored_at_start_never_stops_a_run(tiny_flags, tmp_path, monkeypatch, capsys,
                                                     one_thread):
    """nohup ignores SIGHUP: a SIGHUP during training leaves the run going to its end (`done:`),
    while a signal that is not ignored (SIGTERM) is still caught for the save-and-stop path."""
    real_step = ce_train.train_step

    def step_with_hangup(*a):
        os.kill(os.getpid(), signal.SIGHUP)           # the terminal closes during the step
        return real_step(*a)
    monkeypatch.setattr(ce_train, "train_step", step_with_hangup)
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)   # what `nohup` does
    try:
        tiny_run(tiny_flags, tmp_path / "run")
        with cli.signals_caught() as caught:
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_IGN, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
        assert caught == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before)
    assert "done: 2 steps" in capsys.readouterr().out
    assert checkpoints.read_checkpoint(tmp_path / "run" / "ckpt.pt")["step"] == 2


def make_folder(root, names):
    os.makedirs(root, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", (32, 32), (10 * i, 100, 200 - 5 * i)).save(root / name)


def test_a_data_folder_changed_before_a_resume_is_said(tmp_path, capsys, one_thread):
    """The held-out share of a plain folder is chosen by name hash among the files present, so
    adding files changes both splits: a resume says so in one warning line, naming both counts.
    An unchanged folder, and a checkpoint saved before the fingerprint existed, resume silently."""
    data, out = tmp_path / "photos", tmp_path / "run"
    make_folder(data, [f"a{i}.png" for i in range(20)])
    flags = TINY[:6] + ["--data", "folder", "--data-root", str(data), "--eval-images", "4"]
    cli.run(ce_train.main, flags + ["--batch-size", "4", "--steps", "2", "--eval-every", "2",
                                    "--out", str(out)])
    resume = ["--resume", str(out), "--device", "cpu", "--steps", "2"]   # nothing more to train
    capsys.readouterr()
    cli.run(ce_train.main, resume)
    assert "changed" not in capsys.readouterr().err

    make_folder(data, [f"b{i}.png" for i in range(3)])        # 20 -> 23 files
    before = datasets._split_files(sorted(str(data / f"a{i}.png") for i in range(20)))[1]
    after = datasets._split_files(datasets.list_images(str(data))[0])[1]
    assert before != after                  # the held-out images are indeed others now
    cli.run(ce_train.main, resume)
    err = capsys.readouterr().err
    warning = [ln for ln in err.splitlines() if "the folder changed" in ln]
    assert len(warning) == 1 and "20 image files then, 23 now" in warning[0]
    assert warning[0].startswith(f"warning: {data}:")

    state = torch.load(out / "ckpt.pt", weights_only=True)
    del state["data_files"]                                    # as an older version wrote it
    torch.save(state, out / "ckpt.pt")
    cli.run(ce_train.main, resume)
    out_err = capsys.readouterr()
    assert "changed" not in out_err.err and "done: 2 steps" in out_err.out


@pytest.mark.pictures
def test_final_pictures_on_a_full_disk_are_a_warning(tiny_flags, tmp_path, monkeypatch, capsys,
                                                     one_thread):
    """The checkpoint is saved before the curves and GIF are drawn, so failing to write them (a
    full disk) is a warning, as on the signal path: the `done:` line still comes and the exit
    status is 0."""
    def full_disk(runs, path, labels=None):
        raise OSError(errno.ENOSPC, "could not be written (No space left on device)", path)
    monkeypatch.setattr(figures, "plot_curves", full_disk)
    tiny_run(tiny_flags, tmp_path / "run")                     # no SystemExit: status 0
    out, err = capsys.readouterr()
    assert "done: 2 steps" in out
    assert "warning: curves/GIF not redrawn" in err and "No space left" in err
    assert checkpoints.read_checkpoint(tmp_path / "run" / "ckpt.pt")["step"] == 2


def test_hints_survive_a_shell(tiny_flags, tmp_path, monkeypatch, capsys, one_thread):
    """A run folder with a space and a quote in its name: "Evaluate with:" and "Resume with:" are
    commands a shell splits back into the script, the flag and that exact path."""
    out = tmp_path / "my run's folder"
    tiny_run(tiny_flags, out)
    ckpt = os.path.join(out, "best.pt")
    assert hint(capsys.readouterr().out, "Evaluate with: ") == [
        "python", "ce_eval.py", "--ckpt", ckpt]

    def step_then_stop(*a):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_step(*a)
    real_step = ce_train.train_step
    monkeypatch.setattr(ce_train, "train_step", step_then_stop)
    with pytest.raises(SystemExit) as stopped:
        tiny_run(tiny_flags, out, "--resume", str(out), "--steps", "4")
    assert stopped.value.code == 128 + signal.SIGTERM
    assert hint(capsys.readouterr().out, "Resume with: ") == [
        "python", "ce_train.py", "--resume", str(out)]
    # a new run into that folder is refused with the command that continues it, quoted
    with pytest.raises(SystemExit) as refused:
        tiny_run(tiny_flags, out)
    assert refused.value.code == 2
    err = capsys.readouterr().err
    assert shlex.split(err.split("continue it with `", 1)[1].split("`")[0]) == [
        "python", "ce_train.py", "--resume", str(out)]


def test_a_looping_link_is_called_a_looping_link(tmp_path, capsys):
    """A link to itself and two links to each other are links that loop (the OS says ELOOP), not
    unreadable folders; they are skipped and counted, the images beside them used."""
    make_folder(tmp_path, ["x.png", "y.png"])
    os.symlink("self.png", tmp_path / "self.png")
    os.symlink("b.png", tmp_path / "a.png")
    os.symlink("a.png", tmp_path / "b.png")
    with pytest.raises(OSError) as e:
        os.stat(tmp_path / "self.png")
    assert e.value.errno == errno.ELOOP
    skipped = {}
    files, _ = datasets.list_images(str(tmp_path), skipped)
    assert sorted(map(os.path.basename, files)) == ["x.png", "y.png"]
    assert skipped.get("looping") == 3 and "unreadable" not in skipped
    datasets.listing_note(str(tmp_path), 0, skipped)
    err = capsys.readouterr().err
    assert "skipped 3 symbolic link(s) that loop" in err and "folder" not in err


def test_a_lost_rank_ends_with_the_checkpoint_to_resume_from(tmp_path):
    """torchrun: when a rank dies, the survivors' next collective raises gloo's RuntimeError; each
    ends with one line (a UserError) naming the failure and a shell-safe command resuming from
    the run's last checkpoint, or saying there is none yet. One process: errors pass unchanged."""
    lost = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed "
                        "by peer [127.0.0.1]:4711. This is typically caused by a remote worker")
    out = tmp_path / "a run"
    os.makedirs(out)
    with pytest.raises(cli.UserError) as e, accel.peers_watched(str(out), 1, 2):
        raise lost
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("rank 1 of 2:") and "Connection closed by peer" in msg
    assert "holds no checkpoint yet" in msg

    (out / "ckpt.pt").write_bytes(b"")
    with pytest.raises(cli.UserError) as e, accel.peers_watched(str(out), 0, 2):
        raise lost
    assert hint(str(e.value), "with: ") == ["python", "ce_train.py", "--resume", str(out)]

    bug = RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x8 and 9x2)")  # not a peer
    for world, error in ((1, lost), (2, torch.cuda.OutOfMemoryError("CUDA out of memory")),
                         (2, bug)):
        with pytest.raises(type(error)), accel.peers_watched(str(out), 0, world):
            raise error
