"""The seed report's lambda sweep (its Table 1) as one command: one training run per
lambda_rec/lambda_adv ratio, each evaluated on the held-out split with ce_eval's metrics, with the
run's own mask, input size, device and precision; a table on the terminal and in OUT/sweep.csv,
overlaid curves in OUT/curves.png and a side-by-side comparison in OUT/figure.png.

    python ce_sweep.py --ratios 1 100 200 1000 --out runs/sweep -- --data tiny --steps 5000
    python ce_sweep.py --ratios 1 1000 --out runs/sweep-cpu -- --width 32 --bottleneck 512 \\
        --steps 1000

Ratio r means lambda_rec = r / (1 + r), lambda_adv = 1 / (1 + r) (x1000 ~ the paper's 0.999 /
0.001). Flags for ce_train.py go after `--` and reach it unchanged (`python ce_train.py --help`
lists them). A run folder that already exists (OUT/ratio<r>) is resumed, so a stopped sweep
continues. Figures label each run by its ratio (x1, x1000, ...) and name its lambdas in a note.
"""
import csv
import io
import os
import time

import ce_data
import ce_eval
import ce_model
import ce_train
from ce_utils import baselines, checkpoints, cli, datasets, figures

COLUMNS = ("ratio", "lam_rec", "lam_adv", "data", "steps", "psnr", "l1", "l2", "ssim", "sharpness",
           "psnr_region", "n_images", "wall_s")


def parse_args(argv=None):
    usage = "%(prog)s [--ratios R [R ...]] [--out OUT] [--n N] [-- CE_TRAIN_FLAGS ...]"
    p = cli.Parser(__doc__, usage=usage)
    p.add_argument("--ratios", type=cli.positive, nargs="+", default=[1, 100, 200, 1000],
                   metavar="R",
                   help="lambda_rec / lambda_adv ratios, one run each (seed report: 1, 100, 200, "
                        "500, 1000)")
    p.add_argument("--out", default=os.path.join("runs", "sweep"),
                   help="folder for the runs (OUT/ratio<r>), sweep.csv, curves.png and figure.png")
    p.add_argument("--n", type=cli.positive_int, default=6,
                   help="held-out images (rows) in the comparison figure")
    p.add_argument("train", nargs="*", metavar="CE_TRAIN_FLAGS",
                   help="flags for ce_train.py, given after `--` (e.g. -- --data tiny --steps "
                        "5000); the sweep sets --lam-rec, --lam-adv and --out/--resume itself")
    return p.parse_args(argv)


def train_hardware(train_flags):
    """The device and precision ce_train.py runs on with these flags (its --device, --dtype): the
    sweep evaluates each run there, as ce_train.py's own evaluation does."""
    p = ce_train.build_parser()
    a = p.parse_args(train_flags)
    return cli.Hardware(cli.resolve_device(a.device, p), a.dtype).use_fast_kernels()


def train_and_evaluate(r, run, train_flags, hw, first):
    """Train (or resume) one ratio's run, then evaluate its final checkpoint once with its own mask
    and input size (with the baselines if first). Returns (the loaded generator, the run's flags,
    the held-out images, the metrics, the wall time)."""
    lam = ["--lam-rec", f"{r / (1 + r):.6g}", "--lam-adv", f"{1 / (1 + r):.6g}"]
    resume = os.path.exists(os.path.join(run, "ckpt.pt"))
    print(f"=== ratio x{r:g}: {'resuming' if resume else 'training'} {run}", flush=True)
    t0 = time.time()
    ce_train.main((["--resume", run] if resume else ["--out", run]) + lam + train_flags)
    wall = time.time() - t0
    G, _, state = checkpoints.load_checkpoint(os.path.join(run, "ckpt.pt"), hw.device)
    a = state["args"]
    subset = {k: a.get(k, 0) for k in datasets.SUBSET_FLAGS}
    images = datasets.load_split(a["data"], a["data_root"], "val", a["load_size"], a["shapes_n"],
                                 **subset)
    methods = ("model",) + (baselines.BASELINES if first else ())
    res = ce_eval.evaluate(G, images, a, methods=methods, dtype=hw.dtype)  # the run's own mask
    return G, state, images, res, wall


def write_table(rows, out):
    """OUT/sweep.csv (atomically) and the same table on the terminal."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows([{k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
                 for row in rows])
    cli.atomic_write(os.path.join(out, "sweep.csv"), buf.getvalue())
    print(f"\n{'ratio':<14}{'steps':>7}{'PSNR dB':>9}{'L1 %':>8}{'L2 %':>8}{'SSIM':>7}{'sharp':>7}"
          f"{'wall s':>9}   ({rows[-1]['data']}, held-out, hole; sharp: 1 = as sharp as the truth)")
    for row in rows:
        print(f"{row['ratio']:<14}{row.get('steps', ''):>7}{row['psnr']:>9.2f}{row['l1']:>8.2f}"
              f"{row['l2']:>8.2f}{row['ssim']:>7.3f}{row['sharpness']:>7.2f}"
              f"{row.get('wall_s', ''):>9}")


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    hw = train_hardware(args.train)
    rows, runs, models = [], [], []
    for r in args.ratios:
        run = os.path.join(args.out, f"ratio{r:g}")
        G, state, images, res, wall = train_and_evaluate(r, run, args.train, hw, first=not rows)
        a = state["args"]
        if not rows:  # the classical baselines do not depend on lambda: one row each, for reference
            rows += [{"ratio": m, "data": a["data"], **res[m]} for m in baselines.BASELINES]
        rows.append({"ratio": f"x{r:g}", "lam_rec": a["lam_rec"], "lam_adv": a["lam_adv"],
                     "data": a["data"], "steps": state["step"], **res["model"],
                     "wall_s": round(wall, 1)})
        runs.append(run)
        models.append((f"x{r:g}", G, a))
    write_table(rows, args.out)
    labels = [label for label, _, _ in models]
    figures.plot_curves(runs, os.path.join(args.out, "curves.png"), labels)
    x = ce_data.eval_batch(images[:args.n], ce_model.input_size(a), a["load_size"])
    # notes: e.g. "x1000 = runs/sweep/ratio1000: lam_adv=0.000999 lam_rec=0.999"
    notes = figures.run_labels(runs, labels)[1]
    ce_eval.comparison_figure(models, x, os.path.join(args.out, "figure.png"), hw.dtype, notes)
    print(f"wrote {args.out}/sweep.csv, {args.out}/curves.png, {args.out}/figure.png")


if __name__ == "__main__":
    cli.run(main)
