"""The harmonic baseline of arbitrary holes (ce_utils/baselines.py) against an independent dense
solve, its multigrid preconditioner's conditions, its speed in iterations; evaluation progress per
method and ce_eval.py --baselines."""
import json
import re
import time

import numpy as np
import pytest
import torch

import ce_data
import ce_eval
import ce_masks
from ce_utils import baselines, progress

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny tensors: threads only slow them down


def irregular_holes(n, h, w, seed):
    """n random holes (about 40 % of the pixels) that touch every side of the image and a corner."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n, 1, h, w, generator=g) < 0.4
    mask[:, :, 0, 2:6] = mask[:, :, 3:8, -1] = mask[:, :, -1, 0] = mask[:, :, 4:7, 0] = True
    mask[:, :, -1, 3:7] = True
    return mask


def dense_laplace(mask):
    """The 5-point Laplace equation of one hole written out pixel by pixel as a full-grid matrix A
    (H*W square; rows and columns of visible pixels 0) and the matrix B taking an image to the
    right-hand side: hidden p: deg(p) u_p - sum of hidden neighbours u_q = sum of visible
    neighbours x_q, deg = neighbours inside the image."""
    h, w = mask.shape
    A, B = torch.zeros(h * w, h * w, dtype=torch.float64), torch.zeros(h * w, h * w,
                                                                         dtype=torch.float64)
    for i in range(h):
        for j in range(w):
            if not mask[i, j]:
                continue
            for k, m in ((i - 1, j), (i + 1, j), (i, j - 1), (i, j + 1)):
                if 0 <= k < h and 0 <= m < w:
                    A[i * w + j, i * w + j] += 1
                    if mask[k, m]:
                        A[i * w + j, k * w + m] -= 1
                    else:
                        B[i * w + j, k * w + m] += 1
    return A, B


def dense_stencil(op):
    """The matrix of 5-point weights (d, wx, wy) of one image: (A v)_p = d_p v_p - sum w v_q."""
    d, wx, wy = (t[0, 0].double() for t in op)
    h, w = d.shape
    A = torch.diag(d.flatten())
    for i in range(h):
        for j in range(w):
            if j + 1 < w:
                A[i * w + j, i * w + j + 1] = A[i * w + j + 1, i * w + j] = -wx[i, j]
            if i + 1 < h:
                A[i * w + j, (i + 1) * w + j] = A[(i + 1) * w + j, i * w + j] = -wy[i, j]
    return A


@pytest.mark.parametrize("h, w", [(12, 12), (11, 13)])
def test_harmonic_fill_mask_is_the_dense_solution_of_the_laplace_equation(h, w):
    """On tiny images with irregular holes touching the border, the fill is torch.linalg.solve of
    the 5-point equations written out by hand: to 1e-9 in float64 with a tight tolerance, and with
    the default tolerance in float32 far below an 8-bit step (2/255 in [-1, 1]). Visible pixels
    stay as they were, bit for bit."""
    torch.manual_seed(0)
    mask = irregular_holes(2, h, w, seed=h)
    x = ce_data.apply_mask(torch.rand(2, 3, h, w, dtype=torch.float64) * 2 - 1, mask)
    want = x.clone()
    for n in range(2):
        hid = mask[n, 0].flatten()
        A, B = dense_laplace(mask[n, 0])
        rhs = B @ x[n].reshape(3, -1).T                                 # (H*W, 3)
        u = torch.linalg.solve(A[hid][:, hid], rhs[hid])
        want[n].reshape(3, -1)[:, hid] = u.T
    tight = baselines.harmonic_fill_mask(x, mask, tol=1e-12)
    assert (tight - want).abs().max().item() < 1e-9
    default = baselines.harmonic_fill_mask(x.float(), mask)
    assert default.dtype == torch.float32 and (default - want).abs().max().item() < 1e-4
    vis = ~mask.expand_as(x)
    assert torch.equal(default[vis], x.float()[vis])


@pytest.mark.parametrize("h, w", [(12, 12), (7, 9)])
def test_coarse_operators_are_galerkin_products_of_the_laplace_equation(h, w):
    """Level 0 is the hand-written Laplace matrix; each coarser level is P^T A P with P copying a
    2x2 block's value to its pixels (a block cut by an odd border keeps the pixels it has)."""
    mask = irregular_holes(1, h, w, seed=3)
    levels = baselines._levels(mask.double())
    A = dense_laplace(mask[0, 0])[0]
    assert torch.equal(dense_stencil(levels[0][0]), A)
    for op, _ in levels[1:]:
        hc, wc = (h + 1) // 2, (w + 1) // 2
        P = torch.zeros(h * w, hc * wc, dtype=torch.float64)
        for i in range(h):
            for j in range(w):
                P[i * w + j, (i // 2) * wc + j // 2] = 1
        A, h, w = P.T @ A @ P, hc, wc
        assert torch.allclose(dense_stencil(op), A, atol=1e-12)
    assert (h, w) == (1, 1)


def test_multigrid_preconditioner_is_symmetric_positive_definite():
    """Conjugate gradients need a symmetric positive definite preconditioner: the V-cycle's
    matrix on the hidden pixels (columns: the V-cycle of each unit vector) is both."""
    mask = irregular_holes(1, 11, 13, seed=5)
    hid = mask[0, 0].flatten()
    k = int(hid.sum())
    unit = torch.zeros(k, 1, 11 * 13, dtype=torch.float64)
    unit[torch.arange(k), 0, hid.nonzero()[:, 0]] = 1
    levels = baselines._levels(mask.double().expand(k, -1, -1, -1))
    M = baselines._vcycle(levels, unit.reshape(k, 1, 11, 13)).reshape(k, -1)[:, hid]
    assert torch.allclose(M, M.T, atol=1e-12)
    assert torch.linalg.eigvalsh(M).min().item() > 0


def test_harmonic_fill_mask_converges_in_a_few_dozen_iterations_at_128px():
    """Speed in iterations, free of the machine's load: with 30 iterations the 128 px fill meets
    the Laplace equation at every hidden pixel to the tolerance of the residual's norm (plain
    conjugate gradients need about 150 here)."""
    torch.manual_seed(1)
    mask = ce_masks.eval_masks("region", 0, 2)
    x = torch.rand(2, 3, 128, 128) * 2 - 1
    u = baselines.harmonic_fill_mask(ce_data.apply_mask(x, mask), mask, tol=1e-5, max_iter=30)
    u, m = u.double(), mask.expand_as(u)
    deg = baselines._neighbour_sum(torch.ones(1, 1, 128, 128, dtype=torch.float64))
    residual = ((deg * u - baselines._neighbour_sum(u)) * m).flatten(2).norm(dim=2)
    rhs = (baselines._neighbour_sum(x.double() * ~m) * m).flatten(2).norm(dim=2)
    assert (residual / rhs).max().item() < 2e-5


def test_progress_shows_a_slow_job_of_few_items(capsys):
    """`above` keeps a job of few items quiet; `after` lets it report once it has run that long,
    its first report at once, the next ones every `every` s, and the last one."""
    show = progress.Progress(10, "job", above=100, every=1e9)
    show(5), show(10)
    assert capsys.readouterr().err == ""
    show = progress.Progress(10, "job", above=100, every=1e9, after=0.0)
    show(5), show(6), show(10)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" images")[0] for line in lines] == ["job: 5/10", "job: 10/10"]
    show = progress.Progress(10, "job", above=100, every=0.0, after=1e9)
    show(5), show(10)
    assert capsys.readouterr().err == ""


def test_evaluate_reports_each_methods_seconds_when_slow(monkeypatch, capsys):
    """An evaluation of few images that runs longer than PROGRESS_AFTER_S reports after every
    method of every batch, with the seconds spent on each method (a baseline made 0.3 s slower per
    batch shows 1 s, rounded, after 2 batches); show_slow=False (training) keeps it quiet."""
    monkeypatch.setattr(ce_eval, "PROGRESS_AFTER_S", 0.0)
    monkeypatch.setattr(ce_eval, "PROGRESS_EVERY_S", 0.0)
    fast = baselines.baseline_image

    def slow(name, masked, mask):
        if name == "context_mean":
            time.sleep(0.3)
        return fast(name, masked, mask)

    monkeypatch.setattr(baselines, "baseline_image", slow)
    images = np.zeros((4, 32, 32, 3), np.uint8)
    spec = ce_eval.MaskSpec("block", 0, "visible", "mean", 32)
    ce_eval.evaluate(None, images, spec, methods=("fill", "context_mean"), batch_size=2)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" images")[0] for line in lines] == [
        "evaluating: 0/4", "evaluating: 2/4", "evaluating: 2/4", "evaluating: 4/4"]
    fill, mean = map(int, re.search(r"\| fill (\d+)s, context_mean (\d+)s$", lines[-1]).groups())
    assert fill == 0 and mean == 1
    monkeypatch.setattr(baselines, "baseline_image", fast)
    ce_eval.evaluate(None, images, spec, methods=("fill", "context_mean"), batch_size=2,
                     show_slow=False)
    assert capsys.readouterr().err == ""


def test_ce_eval_baselines_flag_picks_the_methods(tmp_path, tiny_flags, capsys, monkeypatch):
    """--baselines fast scores the model, fill and context mean, none the model alone, with the
    same model numbers as all, and the progress line names the methods run; a training run's
    evaluations stay quiet however slow."""
    import ce_train
    monkeypatch.setattr(ce_eval, "PROGRESS_AFTER_S", 0.0)
    run = str(tmp_path / "run")
    ce_train.main(tiny_flags + ["--steps", "1", "--out", run])
    assert "evaluating:" not in capsys.readouterr().err
    got = {}
    for which in ("all", "fast", "none"):
        ce_eval.main(["--ckpt", run, "--device", "cpu", "--json", "--max-images", "4",
                      "--baselines", which])
        out, err = capsys.readouterr()
        got[which] = json.loads(out.strip().splitlines()[-1])
        last = err.strip().splitlines()[-1]
        assert "4/4 images" in last and ("harmonic" in last) == (which == "all")
        assert ("context_mean" in last) == (which != "none")
    methods = {k for k in got["all"] if isinstance(got["all"][k], dict)}
    assert methods == {"model", "fill", "context_mean", "harmonic"}
    assert {k for k in got["fast"] if isinstance(got["fast"][k], dict)} == {
        "model", "fill", "context_mean"}
    assert {k for k in got["none"] if isinstance(got["none"][k], dict)} == {"model"}
    assert got["none"]["model"] == got["fast"]["model"] == got["all"]["model"]
