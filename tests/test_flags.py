"""ce_train.py's flag table: the paper's values are the real defaults (shown by --help), --variant
changes only the flags not typed, the official preset trains random regions as the official README
does; a resumed run reads its checkpoint once; device and precision are decided once, with no
global side effect when the decision is built."""
import pytest
import torch

import ce_train
from ce_utils import checkpoints, cli

# The paper's values (paper 3.2, section 4, Fig. 2; the official train.lua where the text is
# silent), written out here independently of ce_train.VARIANTS.
PAPER = dict(overlap=7, ring="visible", fill="mean", beta2=0.999, bottleneck_bn=True, bias=False,
             init="dcgan", rec_reduction="all", d_reduction="sum", flip=True, rec_loss="hole",
             lam_rec=0.999, lam_adv=0.001, lr_g=0.002, lr_d=0.0002, beta1=0.5, batch_size=64,
             width=64, bottleneck=4000, overlap_weight=10.0)


def test_the_paper_values_are_the_parsers_own_defaults_and_help_shows_them():
    args = vars(ce_train.build_parser().parse_args([]))
    assert {k: args[k] for k in PAPER} == PAPER
    text = ce_train.build_parser().format_help()
    for flag, shown in (("--overlap", "(default: 7)"), ("--ring", "(default: visible)"),
                        ("--beta2", "(default: 0.999)"), ("--rec-loss", "(default: hole)"),
                        ("--init", "(default: dcgan)"), ("--d-reduction", "(default: sum)")):
        after = text[text.index("\n  " + flag + " "):]
        assert shown in " ".join(after[:after.index("\n  --", 1)].split()), flag


def test_a_variant_changes_only_the_flags_not_typed(tmp_path):
    def parse(*flags):
        return ce_train.parse_args(["--device", "cpu", "--out", str(tmp_path / "x"), *flags])
    seed = parse("--variant", "seed")
    assert (seed.ring, seed.fill, seed.beta2, seed.bias, seed.flip) == ("hidden", "zero", 0.9, True,
                                                                       False)
    typed = parse("--variant", "seed", "--ring", "visible", "--beta2", "0.999", "--flip")
    assert (typed.ring, typed.beta2, typed.flip, typed.fill) == ("visible", 0.999, True, "zero")
    # a typed value equal to the paper's default still wins over the preset
    assert parse("--variant", "seed", "--overlap", "7", "--ring", "visible").ring == "visible"


def test_the_official_preset_trains_random_regions_without_overlap_weight(tmp_path):
    """official README: random regions are trained with useOverlapPred=0 (every pixel weighs the
    same in train_random.lua's MSE); the centre model keeps overlapPred=4."""
    def parse(*flags):
        return ce_train.parse_args(["--device", "cpu", "--variant", "official",
                                    "--out", str(tmp_path / "x"), *flags])
    assert parse().overlap == 4
    region = parse("--mask", "region")
    assert region.overlap == 0 and region.rec_loss == "image"
    W = ce_train.cut_hole(torch.zeros(2, 3, 32, 32),
                          (torch.ones(2, 1, 32, 32, dtype=torch.bool).tril(),), region, None)[2]
    assert torch.equal(W, torch.ones(2, 1, 32, 32))                 # useOverlapPred=0: all alike
    assert parse("--mask", "region", "--overlap", "4").overlap == 4   # typed: kept


def test_a_resumed_run_reads_its_checkpoint_once(tmp_path, tiny_flags, monkeypatch):
    out = tmp_path / "run"
    ce_train.main(tiny_flags + ["--steps", "2", "--batch-size", "4", "--out", str(out)])
    reads, real_read = [], checkpoints.read_checkpoint

    def counted(*a, **k):
        reads.append(a[0])
        return real_read(*a, **k)
    monkeypatch.setattr(checkpoints, "read_checkpoint", counted)
    ce_train.main(["--resume", str(out), "--steps", "3"])
    assert len(reads) == 1


def test_device_and_precision_are_decided_once_without_global_side_effects(tmp_path, tiny_flags,
                                                                           monkeypatch):
    b = torch.backends
    saved = b.cudnn.benchmark, b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32
    try:
        b.cudnn.benchmark, b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32 = False, False, False
        hw = cli.Hardware("cuda", "fp32")              # built, not used: nothing global changes
        assert (b.cudnn.benchmark, b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32) == (False,) * 3
        hw.use_fast_kernels()                          # the explicit switch does
        assert (b.cudnn.benchmark, b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32) == (True,) * 3
    finally:
        b.cudnn.benchmark, b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32 = saved
    assert cli.precision("cuda") == ("bf16", True) and cli.precision("cpu") == ("fp32", False)
    built = []

    class Counted(cli.Hardware):
        def __init__(self, *a, **k):
            built.append(a)
            super().__init__(*a, **k)
    monkeypatch.setattr(cli, "Hardware", Counted)
    ce_train.main(tiny_flags + ["--steps", "1", "--batch-size", "4", "--out", str(tmp_path / "r")])
    assert len(built) == 1


@pytest.mark.parametrize("flag", ["--overlap", "--ring", "--fill", "--beta2", "--rec-loss",
                                  "--rec-reduction", "--d-reduction", "--init"])
def test_no_paper_flag_defaults_to_none(flag):
    action = next(a for a in ce_train.build_parser()._actions if flag in a.option_strings)
    assert action.default is not None
