"""Interruptions and diverging runs: kill -9 mid-write, SIGINT/SIGTERM/SIGHUP save and say how to
resume, NaN stops, and a NaN/Inf weight or evaluation is never written nor called good."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, TINY

import ce_losses
import ce_model
import ce_train
from ce_utils import checkpoints, cli


@pytest.fixture(scope="module")
def data_root(shapes_root):
    """The session's data cache (conftest), so that the runs below start training at once."""
    return shapes_root


def start(data_root, out, extra):
    cmd = [sys.executable, os.path.join(ROOT, "ce_train.py"), *TINY, "--data-root", data_root,
           "--batch-size", "4", "--out", str(out), *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=out.parent, preexec_fn=default_signals)


def default_signals():
    """The run starts as from a terminal, with no stop signal ignored: a suite run as a background
    job (SIGINT ignored) or under nohup (SIGHUP) would pass that on, and the run keeps an ignored
    signal ignored (cli.signals_caught)."""
    for s in cli.STOP_SIGNALS:
        signal.signal(s, signal.SIG_DFL)


def wait_for(path, proc, timeout=180):
    t0 = time.time()
    while not os.path.exists(path):
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.05)


def test_kill_9_while_checkpointing_leaves_a_loadable_checkpoint(tmp_path, data_root):
    out = tmp_path / "run"
    # a checkpoint every step, so the kills land during writes as well as between them
    proc = start(data_root, out, ["--steps", "100000", "--eval-every", "1", "--log-every", "1000"])
    try:
        wait_for(out / "ckpt.pt", proc)
        steps = []
        for delay in (0.0, 0.013, 0.029, 0.041):
            time.sleep(delay)
            # readable while being rewritten
            steps.append(checkpoints.read_checkpoint(out / "ckpt.pt")["step"])
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    state = checkpoints.read_checkpoint(out / "ckpt.pt")
    assert state["step"] >= max(steps) >= 1
    G, D, _ = checkpoints.load_checkpoint(out / "ckpt.pt")
    assert all(torch.isfinite(p).all() for p in G.parameters())


SIGNALS = [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)]


@pytest.fixture(scope="module")
def signalled(tmp_path_factory, data_root):
    """One run per signal, started together (each process spends seconds importing torch; side by
    side they share that wait): each trains until its first checkpoint, then gets its signal and is
    left to exit. Returns {signal: (run folder, exit code, stdout, stderr)}."""
    base = tmp_path_factory.mktemp("signals")
    runs = {sig: (base / f"run{int(sig)}", None) for sig, _ in SIGNALS}
    results = {}
    try:
        for sig, (out, _) in runs.items():
            runs[sig] = (out, start(data_root, out, ["--steps", "100000", "--eval-every", "5",
                                                     "--log-every", "5"]))
        waiting, t0 = dict(runs), time.time()
        while waiting:      # each gets its signal as soon as its own first checkpoint is there
            for sig, (out, proc) in list(waiting.items()):
                assert proc.poll() is None, proc.communicate()
                if os.path.exists(out / "ckpt.pt"):
                    proc.send_signal(sig)
                    del waiting[sig]
            assert time.time() - t0 < 180, f"no checkpoint from {sorted(waiting)}"
            time.sleep(0.05)
        for sig, (out, proc) in runs.items():
            stdout, stderr = proc.communicate(timeout=60)
            results[sig] = (out, proc.returncode, stdout, stderr)
    finally:
        for _, proc in runs.values():
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.communicate()      # reaped, its pipes closed
    return results


@pytest.mark.parametrize("sig,code", SIGNALS)
def test_signal_saves_and_says_how_to_resume(signalled, sig, code):
    out, returncode, stdout, stderr = signalled[sig]
    assert returncode == code, stderr
    assert "Traceback" not in stderr and f"Resume with: python ce_train.py --resume {out}" in stdout
    step = checkpoints.read_checkpoint(out / "ckpt.pt")["step"]
    assert step >= 5 and os.path.exists(out / "curves.png")
    # the resumed run continues from exactly there
    ce_train.main(["--resume", str(out), "--steps", str(step + 2), "--device", "cpu"])
    assert checkpoints.read_checkpoint(out / "ckpt.pt")["step"] == step + 2


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_flags, monkeypatch,
                                                           capsys):
    real = ce_losses.reconstruction_loss
    calls = []

    def poisoned(pred, target, weight):
        calls.append(1)
        loss = real(pred, target, weight)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(ce_losses, "reconstruction_loss", poisoned)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        cli.run(ce_train.main, tiny_flags + ["--steps", "6", "--batch-size", "4",
                                             "--eval-every", "2", "--log-every", "5",
                                             "--out", str(out)])
    msg = capsys.readouterr().err
    assert e.value.code == 2            # a user-facing error exits 2, as every other one does
    assert "NaN/Inf at step 3" in msg and f"{out}/ckpt.pt" in msg
    state = checkpoints.read_checkpoint(out / "ckpt.pt")
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["G"].values() if v.is_floating_point())


def test_discriminator_winning_is_reported(tmp_path, tiny_flags, monkeypatch, capsys):
    """A discriminator whose every answer is 'fake' (logit - 30: D(G(x)) ~ 1e-13) is flagged after
    3 log windows."""
    forward = ce_model.Discriminator.forward
    monkeypatch.setattr(ce_model.Discriminator, "forward", lambda self, x: forward(self, x) - 30)
    ce_train.main(tiny_flags + ["--steps", "8", "--batch-size", "4", "--log-every", "2",
                                "--eval-every", "1000", "--out", str(tmp_path / "run")])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("step ")]
    assert len(lines) == 4
    assert ["D has won outright" in ln for ln in lines] == [False, False, True, True]
    assert "--lam-adv" in lines[-1] and "--lr-d" in lines[-1]


def test_diverging_learning_rate_writes_no_checkpoint_and_names_none(tmp_path, data_root):
    """--lr-g 1e30: finite losses at step 1, then weights of size 1e30 whose evaluation overflows
    to NaN. Nothing is written, and the message does not call any file good."""
    out = tmp_path / "run"
    with pytest.raises(cli.UserError) as e:
        ce_train.main(TINY + ["--data-root", data_root, "--lr-g", "1e30", "--steps", "4",
                              "--batch-size", "4", "--eval-every", "1", "--log-every", "1",
                              "--out", str(out)])
    msg = str(e.value)
    assert "NaN/Inf" in msg and "Last good checkpoint: none" in msg
    assert not (out / "ckpt.pt").exists() and not (out / "best.pt").exists()


def test_nan_weights_after_a_finite_step_keep_the_last_good_checkpoint(tmp_path, data_root,
                                                                       monkeypatch):
    """The G update of step 3 makes a weight NaN while the step's losses (computed before it) are
    finite: the evaluation at step 3 is refused and ckpt.pt of step 2 is named and kept."""
    real_step, calls = torch.optim.Adam.step, []

    def poisoned_step(self, *args, **kw):
        result = real_step(self, *args, **kw)
        calls.append(1)
        if len(calls) == 6:        # D then G each step: the 6th call is G's update of step 3
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return result

    monkeypatch.setattr(torch.optim.Adam, "step", poisoned_step)
    out = tmp_path / "run"
    with pytest.raises(cli.UserError) as e:
        ce_train.main(TINY + ["--data-root", data_root, "--steps", "4", "--batch-size", "4",
                              "--eval-every", "1", "--log-every", "100", "--out", str(out)])
    msg = str(e.value)
    assert "weights became NaN/Inf at step 3" in msg
    assert f"Last good checkpoint: {out}/ckpt.pt" in msg
    state = checkpoints.read_checkpoint(out / "ckpt.pt", resume=True)
    assert state["step"] == 2
    assert checkpoints.first_nonfinite({k: state[k] for k in ("G", "D", "optG", "optD")}) is None
    # no record of the refused evaluation
    assert max(r["step"] for r in cli.read_log(out / "log.jsonl")) == 2
    # and save_checkpoint refuses on its own
    with pytest.raises(checkpoints.CheckpointError, match="holds NaN/Inf"):
        checkpoints.save_checkpoint(out / "x.pt", {"G": {"w": torch.tensor([1.0, float("nan")])}})
    assert not (out / "x.pt").exists()
