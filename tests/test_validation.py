"""Values are checked, not only their keys and types (issue 25): a run's folder is continued only by
a resume of its own checkpoint; a checkpoint's every piece is checked against the rules and the
networks before any of it is used; a run folder's JSON of the wrong shape is a broken line; every
script takes a flag under the same rules, none of which lets a value reach torch as a traceback."""
import argparse
import json
import math
import os
import shutil

import pytest
import torch
from conftest import TINY
from test_checkpoint_compat import damaged as damaged_copy

import ce_bench
import ce_eval
import ce_probe
import ce_sweep
import ce_train
from ce_utils import checkpoints, cli, config, figures


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shapes_root):
    """Run folders A and B, each holding a tiny run evaluated and checkpointed at step 2 (B: a
    copy of A's files)."""
    base = tmp_path_factory.mktemp("validation")
    ce_train.main(TINY + ["--data-root", shapes_root, "--steps", "2", "--batch-size", "4",
                          "--eval-every", "2", "--out", str(base / "A")])
    shutil.copytree(base / "A", base / "B")
    return base


def one_line_error(capsys, main, argv):
    """Run main(argv) as its script runs it; return its one-line error (exit code 2, no
    traceback)."""
    with pytest.raises(SystemExit) as e:
        cli.run(main, argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def files(folder):
    return {n: (folder / n).read_bytes() for n in sorted(os.listdir(folder))
            if (folder / n).is_file()}


# ------------------------------------------------------------------------------------------------
# Data loss: a branch never goes into another run's folder

def test_a_branch_into_another_runs_folder_is_refused_and_the_run_there_untouched(runs, tmp_path,
                                                                                  capsys):
    """Rule: --resume A/best.pt --out B, where B holds another run, changes nothing in B (its
    checkpoints, flags and log are B's own, byte for byte); into a new folder it branches."""
    before = files(runs / "B")
    for ckpt in ("best.pt", "ckpt.pt"):
        err = one_line_error(capsys, ce_train.main, ["--resume", str(runs / "A" / ckpt),
                                                     "--out", str(runs / "B"), "--steps", "3"])
        assert f"{runs / 'B'} already holds another run" in err
    assert files(runs / "B") == before
    # a new folder holding only a killed run's log (no checkpoint): the branch, with a fresh log
    new = tmp_path / "branch"
    new.mkdir()
    (new / "log.jsonl").write_text(json.dumps({"step": 1, "loss_rec": 9.0}) + "\n")
    ce_train.main(["--resume", str(runs / "A" / "best.pt"), "--out", str(new), "--steps", "3",
                   "--log-every", "1", "--device", "cpu"])
    log = cli.read_log(new / "log.jsonl")        # the branch's step 3 and its evaluation only
    assert [(r["step"], "eval" in r) for r in log] == [(3, False), (3, True)]
    assert checkpoints.read_checkpoint(new, resume=True)["step"] == 3


def test_a_run_may_still_be_resumed_into_its_own_folder_however_it_is_spelled(runs, capsys):
    """Rule: --out naming the checkpoint's own folder (another spelling of it) is no branch."""
    own = str(runs / "A") + os.sep + "."
    assert config.own_folder(str(runs / "A" / "ckpt.pt"), own)
    assert not config.own_folder(str(runs / "A" / "ckpt.pt"), str(runs / "B"))
    args = ce_train.parse_args(["--resume", str(runs / "A" / "best.pt"), "--out", own,
                                "--device", "cpu"])
    assert os.path.realpath(args.out) == os.path.realpath(runs / "A")


# ------------------------------------------------------------------------------------------------
# Checkpoints: every piece checked before any is used

def damaged(runs, tmp_path, change):
    """A copy of run A's ckpt.pt, changed by change(state), in a folder of its own."""
    return damaged_copy(runs / "A", tmp_path, change)


def refused_by_eval_and_resume(capsys, path):
    """The one-line errors of ce_eval.py --ckpt PATH and ce_train.py --resume PATH."""
    errs = [one_line_error(capsys, main, argv + ["--device", "cpu"]) for main, argv in (
        (ce_eval.main, ["--ckpt", str(path), "--max-images", "4"]),
        (ce_train.main, ["--resume", str(path), "--steps", "3"]))]
    assert all(e.startswith(f"error: {path}: ") for e in errs), errs
    return errs


def set_flag(k, v):
    return lambda s: s["args"].__setitem__(k, v)


@pytest.mark.parametrize("flag,value", [
    ("width", 0), ("bottleneck", -8), ("overlap", 40), ("batch_size", 1), ("beta1", 1.0),
    ("cfc_dropout", 1.5), ("seed", -1), ("steps", 2 ** 64), ("lr_g", math.nan),
    ("lr_d", 2e38),             # under float32's range, over Adam's first step's (beta1 0.5)
    ("load_size", 64),          # under the input size
    ("lam_adv", -0.1), ("ring", "inside")])
def test_a_checkpoints_flags_obey_the_command_lines_rules(runs, tmp_path, capsys, flag, value):
    """Rule: a flag value that ce_train.py's command line refuses is refused in a checkpoint too,
    naming the file and the flag, for evaluation and resume alike."""
    typed = repr(value) if isinstance(value, float) else str(value)
    one_line_error(capsys, ce_train.main, [f"--{flag.replace('_', '-')}", typed,
                                           "--device", "cpu", "--out", str(tmp_path / "x")])
    path = damaged(runs, tmp_path, set_flag(flag, value))
    for err in refused_by_eval_and_resume(capsys, path):
        assert flag in err or flag.replace("_", "-") in err


@pytest.mark.parametrize("change,words", [
    # an integer weight would be cast to the float network, truncated to 0 without a word
    (lambda s: s["G"].__setitem__("encoder.0.weight", s["G"]["encoder.0.weight"].to(torch.int32)),
     "G does not fit the network of the checkpoint's own flags (encoder.0.weight is torch.int32"),
    (lambda s: s["D"].__setitem__("net.0.weight", s["D"]["net.0.weight"][:, :2]),
     "D does not fit the network of the checkpoint's own flags (net.0.weight is (8, 2, 4, 4)"),
])
def test_weights_of_another_dtype_or_shape_are_refused(runs, tmp_path, capsys, change, words):
    """Rule: G and D hold floating-point tensors of the shapes the file's flags build."""
    path = damaged(runs, tmp_path, change)
    for err in refused_by_eval_and_resume(capsys, path):
        assert words in err


def moment(k, i, name, value):
    return lambda s: s[k]["state"][i].__setitem__(name, value)


@pytest.mark.parametrize("change,words", [
    (moment("optG", 0, "exp_avg", torch.zeros(3)), "'optG' (the optimiser state) is malformed "
                                                   "(parameter 0: exp_avg of shape (3,)"),
    (lambda s: s["optD"]["state"][0]["exp_avg_sq"].fill_(-1.0), "exp_avg_sq < 0"),
    (moment("optG", 0, "step", torch.tensor(0.0)), "step 0.0"),
    (lambda s: s["optG"]["param_groups"][0].__setitem__("lr", 2e38), "hyperparameters lr 2e+38"),
    (lambda s: s["optD"]["param_groups"][0]["params"].pop(), "not the network's"),
    (lambda s: s["rng"].__setitem__("torch", s["rng"]["torch"][:100]), "'rng'"),
    (lambda s: s["rng"].__setitem__("torch", s["rng"]["torch"].to(torch.int32)), "'rng'"),
    (lambda s: s["rng"].__setitem__("cuda", [torch.zeros(3, dtype=torch.uint8)]), "'rng'"),
    (lambda s: s["log_window"].__setitem__("acc", torch.zeros(3)), "'log_window' is malformed"),
    (lambda s: s["log_window"].__setitem__("n_acc", -1), "'log_window' is malformed"),
    (lambda s: s.__setitem__("best_psnr", math.nan), "'best_psnr' is nan"),
    (lambda s: s.__setitem__("best_psnr", math.inf), "'best_psnr' is inf"),
    (lambda s: s.__setitem__("step", 2 ** 63), "'step' is"),
])
def test_every_piece_a_resume_restores_is_checked_before_use(runs, tmp_path, capsys, change,
                                                             words):
    """Rule: what only a resume restores (optimiser moments and hyperparameters, RNG states, the
    log window, best PSNR, step) is refused for a resume, naming the file and the piece, and
    ignored by evaluation."""
    path = damaged(runs, tmp_path, change)
    err = one_line_error(capsys, ce_train.main, ["--resume", str(path), "--steps", "3",
                                                 "--device", "cpu"])
    assert err.startswith(f"error: {path}: cannot resume from it: ") and words in err, err
    checkpoints.load_checkpoint(path)                     # evaluation needs none of it


def test_a_checkpoint_saved_before_any_evaluation_still_resumes(runs, tmp_path):
    """best_psnr -inf is what a run writes before its first evaluation (RunState.best)."""
    path = damaged(runs, tmp_path, lambda s: s.__setitem__("best_psnr", -math.inf))
    assert checkpoints.read_checkpoint(path, resume=True)["best_psnr"] == -math.inf


# ------------------------------------------------------------------------------------------------
# Run-folder JSON: a record of the wrong shape is a broken line

GOOD = [{"step": 1, "epoch": 0, "loss_rec": 0.5, "img_per_s": 10.0, "time": 1.0},
        {"step": 2, "epoch": 0, "loss_D": 1.2, "loss_rec": 0.4, "loss_adv": 0.7, "D_x": 0.5,
         "D_G_x": 0.4, "img_per_s": 10.0, "time": 2.0},
        {"step": 2, "eval": {"psnr": 12.5, "l1": 20.0, "n_images": 16}}]
BAD = ['[1, 2]', '"step"', '{"step": "3", "loss_rec": 0.1}', '{"step": true}',
       '{"step": -1, "loss_rec": 0.1}', '{"step": 3, "loss_rec": "x"}', '{"step": 3, "epoch": 0.5}',
       '{"step": 3, "eval": [1]}', '{"step": 3, "eval": {"l1": 1.0}}',
       '{"step": 3, "eval": {"psnr": "12"}}', '{"step": 3, "loss_rec": 0.1, "D_x": 0.5}',
       '{"step": 3, "loss_rec": 0.1, "loss_D": null, "loss_adv": 1, "D_x": 1, "D_G_x": 1}']


def write_log(path, good, bad):
    """A log.jsonl with the good records and the bad lines interleaved, one not even UTF-8."""
    lines = [json.dumps(r).encode() for r in good] + [b.encode() for b in bad] + [b"\xff\xfe{"]
    order = sorted(range(len(lines)), key=lambda i: (i * 7) % len(lines))
    path.write_bytes(b"\n".join(lines[i] for i in order) + b"\n")
    return [json.loads(lines[i]) for i in order if i < len(good)]


def test_log_records_of_the_wrong_shape_are_skipped_as_broken_lines(tmp_path):
    """Rule: read_log returns exactly the well-formed records, in file order."""
    expect = write_log(tmp_path / "log.jsonl", GOOD, BAD)
    assert cli.read_log(tmp_path / "log.jsonl") == expect
    assert all(cli.log_record(json.loads(b)) is None for b in BAD)


def test_plot_reads_around_malformed_logs_and_args(tmp_path):
    """Rule: --plot draws the well-formed records of a run whatever else its folder holds; an
    args.json that is not a dict of flags of their types reads as none."""
    run = tmp_path / "run"
    run.mkdir()
    write_log(run / "log.jsonl", GOOD, BAD)
    for args_json in ('{"width": 8.5}', '{"lam_adv": "0"}', '"x"', '[' * 100_000, '[1, 2]'):
        (run / "args.json").write_text(args_json)
        assert figures.run_args(str(run)) == {}, args_json
    ce_eval.main(["--plot", str(run), "--out", str(tmp_path / "c.png")])
    assert (tmp_path / "c.png").stat().st_size > 0


def test_resume_rewinds_a_log_with_malformed_records(runs, tmp_path):
    """Rule: --resume keeps the well-formed records up to its step and drops every broken one."""
    folder = tmp_path / "A"
    folder.mkdir()
    for name in ("ckpt.pt", "log.jsonl"):
        (folder / name).write_bytes((runs / "A" / name).read_bytes())
    own = cli.read_log(folder / "log.jsonl")
    with open(folder / "log.jsonl", "ab") as f:
        f.write("\n".join(BAD).encode() + b"\n")
    ce_train.main(["--resume", str(folder), "--steps", "3", "--log-every", "1",
                   "--device", "cpu"])
    steps = [r["step"] for r in cli.read_log(folder / "log.jsonl")]
    assert steps == [r["step"] for r in own if r["step"] <= 2] + [3, 3]     # step 3, its eval
    assert len((folder / "log.jsonl").read_bytes().splitlines()) == len(steps)   # none broken


# ------------------------------------------------------------------------------------------------
# Flags: one set of rules, shared by every script that takes the flag

def flag_type(parser, flag):
    return next(a.type for a in parser._actions if flag in a.option_strings)


def test_a_flag_several_scripts_take_has_one_rule():
    """Rule: --width, --bottleneck, --seed, --alexnet-width and a training batch are the same type
    object in each script's parser, so that no script can be looser than another."""
    train, probe = ce_train.build_parser(), ce_probe.build_parser()
    for flag in ("--width", "--bottleneck", "--seed", "--alexnet-width"):
        assert flag_type(train, flag) is flag_type(probe, flag), flag
    assert flag_type(train, "--batch-size") is cli.train_batch
    assert flag_type(probe, "--ft-batch") is cli.train_batch


@pytest.mark.parametrize("main,argv,words", [
    (ce_train.main, ["--seed", str(10 ** 23)], "--seed must be in [0, 9223372036854775807]"),
    (ce_train.main, ["--steps", str(2 ** 63)], "--steps must be in [0, "),
    (ce_train.main, ["--width", "0"], "--width must be >= 1, not 0"),
    (ce_train.main, ["--eval-every", "1e3"], "--eval-every must be an integer, not '1e3'"),
    (ce_train.main, ["--alexnet-width", "inf"], "'inf' is not a finite number"),
    (ce_train.main, ["--cfc-dropout", "1"], "--cfc-dropout must be in [0, 1)"),
    (ce_eval.main, ["--batch-size", str(10 ** 30), "--ckpt", "x"], "--batch-size must be in [1, "),
    (ce_eval.main, ["--max-images", "-1", "--ckpt", "x"], "--max-images must be >= 0"),
    (ce_probe.main, ["--lr", "nan", "--random-init", "dcgan"], "'nan' is not a finite number"),
    (ce_probe.main, ["--lr", "inf", "--random-init", "dcgan"], "'inf' is not a finite number"),
    (ce_probe.main, ["--ft-lr", "nan", "--random-init", "dcgan"], "'nan' is not a finite number"),
    (ce_probe.main, ["--lr", "1e38", "--random-init", "dcgan"], "--lr must be below"),
    (ce_probe.main, ["--seed", "-1", "--random-init", "dcgan"], "--seed must be >= 0"),
    (ce_probe.main, ["--data", "shapes", "--train-per-class", "3", "--random-init", "dcgan"],
     "select a subset of --data tiny only, not of --data shapes"),
    (ce_bench.main, ["--batch-size", "1"], "BatchNorm needs two images"),
    (ce_bench.main, ["--steps", str(10 ** 20)], "--steps must be in [1, "),
    (ce_sweep.main, ["--ratios", "inf"], "'inf' is not a finite number"),
])
def test_out_of_range_flags_are_one_line_errors_in_every_script(capsys, main, argv, words):
    err = one_line_error(capsys, main, argv + ["--device", "cpu"] * (main is not ce_sweep.main))
    assert words in err, err


def adam_first_step(lr, beta1):
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.Adam([p], lr=lr, betas=(beta1, 0.999), foreach=False)
    p.grad = torch.tensor([1.0, -1.0])
    opt.step()


@pytest.mark.parametrize("beta1", [0.5, 0.9])
def test_the_learning_rate_limit_is_adams_first_step_in_float32(tmp_path, capsys, beta1):
    """Rule: an lr that torch's Adam cannot take a first step with (lr / (1 - beta1) past float32,
    a RuntimeError inside torch) is refused by ce_train.py; one just under it is taken."""
    limit = cli.lr_limit(beta1)
    with pytest.raises(RuntimeError):
        adam_first_step(limit * 1.01, beta1)
    adam_first_step(limit * 0.99, beta1)
    flags = ["--beta1", str(beta1), "--device", "cpu", "--out", str(tmp_path / "x")]
    err = one_line_error(capsys, ce_train.main, ["--lr-g", repr(limit * 1.01)] + flags)
    assert "--lr-g/--lr-d must be below" in err
    assert ce_train.parse_args(["--lr-g", repr(limit * 0.99)] + flags).lr_g == limit * 0.99


def test_the_cpus_allocator_failing_is_one_line(capsys):
    """Rule: a size flag beyond the machine's memory (torch's CPU allocator fails) is one line."""
    def main(argv):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: "
                           "can't allocate memory: you tried to allocate 19199999999808 bytes.")
    assert "out of memory" in one_line_error(capsys, main, [])
    with pytest.raises(RuntimeError, match="other"):   # any other RuntimeError stays a bug
        cli.run(lambda argv: (_ for _ in ()).throw(RuntimeError("other")), [])


def test_range_types_read_as_maths():
    """The interval notation of cli.real: brackets closed, parentheses open."""
    half_open = cli.real("[0, 1)")
    assert half_open("0") == 0.0 and half_open("0.999") == 0.999
    for bad in ("1", "-0.001", "nan"):
        with pytest.raises((argparse.ArgumentTypeError, ValueError)):
            half_open(bad)
    assert cli.real("(0, inf)")("1e300") == 1e300
    with pytest.raises(argparse.ArgumentTypeError):
        cli.real("(0, inf)")("0")


def test_an_image_count_beyond_any_memory_is_one_line(tmp_path):
    """--shapes-n 1e18: 128 px images of 49,152 bytes each would need 4.9e22 bytes, more than a
    64-bit address space holds; refused before numpy is asked (it raised 'array is too big')."""
    from ce_utils import diskcache
    for npy in (None, str(tmp_path / "c.npy")):
        with pytest.raises(cli.DataError, match="would take 4.92e\\+13 GB; lower the number"):
            diskcache.Rows(npy, 10**18, 128)
    assert os.listdir(tmp_path) == []
