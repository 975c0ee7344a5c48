"""Checkpoints of other layouts: a format version, one schema check on load, older files filled in
where their version is certain (with a note), everything else refused in one line naming the
missing or broken piece."""
import json

import pytest
import torch
from conftest import TINY

import ce_eval
import ce_model
import ce_train
from ce_utils import checkpoints, cli, config


@pytest.fixture(scope="module")
def run(tmp_path_factory, shapes_root):
    """One tiny run (2 steps, checkpointed at step 2) for the whole module; tests copy its file."""
    out = tmp_path_factory.mktemp("compat") / "run"
    ce_train.main(TINY + ["--data-root", shapes_root, "--steps", "2", "--batch-size", "4",
                          "--eval-every", "2", "--out", str(out)])
    return out


def damaged(run, tmp_path, change):
    """The path of a copy of the run's checkpoint, changed by change(state), in its own folder."""
    state = torch.load(run / "ckpt.pt", weights_only=True)
    change(state)
    (tmp_path / "old").mkdir()
    path = tmp_path / "old" / "ckpt.pt"
    torch.save(state, path)
    return path


def test_a_new_checkpoint_has_the_format_and_every_training_flag(run):
    state = checkpoints.read_checkpoint(run, resume=True)
    assert state["format"] == checkpoints.FORMAT == 2
    flags = set(vars(ce_train.parse_args(["--device", "cpu", "--out", str(run.parent / "x")])))
    saved = flags - set(config.RUNTIME) - {"out", "quick"}
    # the schema knows every flag
    assert saved == set(checkpoints.EVAL_ARGS) | set(checkpoints.RESUME_ARGS)


def test_a_format_1_checkpoint_without_log_window_resumes_with_a_note(run, tmp_path, capsys):
    def to_format_1(state):
        del state["format"], state["log_window"]
    path = damaged(run, tmp_path, to_format_1)
    ce_train.main(["--resume", str(path), "--steps", "3", "--device", "cpu"])
    err = capsys.readouterr().err
    assert f"note: {path} is a format-1 checkpoint without log_window" in err
    assert checkpoints.read_checkpoint(path, resume=True)["step"] == 3


@pytest.mark.parametrize("change,words", [
    (lambda s: s.pop("rng"), "'rng' (the random number state) is missing"),
    (lambda s: s.pop("optG"), "'optG' (the optimiser state) is missing"),
    (lambda s: s.pop("optD"), "'optD' (the optimiser state) is missing"),
    (lambda s: s.pop("step"), "'step' is missing"),
    (lambda s: s["args"].pop("lr_g"), "its flags (args) lack lr_g"),
])
def test_what_only_a_resume_needs_is_refused_for_resume_and_fine_for_eval(run, tmp_path, capsys,
                                                                          change, words):
    path = damaged(run, tmp_path, change)
    with pytest.raises(SystemExit) as e:
        cli.run(ce_train.main, ["--resume", str(path), "--steps", "3", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"error: {path}: cannot resume from it: {words}")
    # ce_eval --ckpt needs only G, D and the network and mask flags
    G, _, _ = checkpoints.load_checkpoint(path)
    assert ce_model.count_params(G) > 0


@pytest.mark.parametrize("change,words", [
    (lambda s: s["G"].__setitem__("extra.weight", torch.zeros(3)), "G does not fit the network"),
    (lambda s: s["D"].pop("net.0.weight"), "D does not fit the network"),
    (lambda s: s.__setitem__("G", [1, 2]), "'G' is not a dict of named tensors"),
    (lambda s: s.pop("D"), "not a ce_train.py checkpoint: 'D' is missing"),
    (lambda s: s["args"].pop("overlap"), "its flags (args) lack overlap"),
    (lambda s: s["args"].pop("load_size"), "its flags (args) lack load_size"),
    (lambda s: s["args"].pop("ring"), "its flags (args) lack ring"),
    (lambda s: s["args"].pop("width"), "its flags (args) lack width"),
    (lambda s: s["args"].__setitem__("ring", None), "flag ring is None, not a valid value"),
    (lambda s: s.__setitem__("args", "x"), "'args' (the run's flags) is missing or not a dict"),
    (lambda s: s.__setitem__("format", 99), "checkpoint format 99"),
    (lambda s: s["G"]["encoder.0.weight"].view(-1).__setitem__(0, float("nan")),
     "G.encoder.0.weight holds NaN"),
])
def test_broken_layouts_are_refused_in_one_line_by_eval_and_resume(run, tmp_path, capsys, change,
                                                                   words):
    path = damaged(run, tmp_path, change)
    for main, argv in ((ce_eval.main, ["--ckpt", str(path), "--device", "cpu",
                                       "--max-images", "4"]),
                       (ce_train.main, ["--resume", str(path), "--steps", "3", "--device", "cpu"])):
        with pytest.raises(SystemExit) as e:
            cli.run(main, argv)
        err = capsys.readouterr().err.strip()
        assert (e.value.code == 2 and len(err.splitlines()) == 1
                and err.startswith(f"error: {path}: ")), err
        assert words in err
    # the original run is untouched
    assert json.loads((run / "args.json").read_text())["ring"] == "visible"
