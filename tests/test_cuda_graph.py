"""--cuda-graph: the whole training step replayed as one CUDA graph (accel.cuda_graphed,
ce_train.py's default on one GPU). On CUDA: the graphed step gives the eager step's losses over 20
steps from the same state, and a short run trains, evaluates and resumes with it. Everywhere: where
the flag is refused, and that a graphed run's checkpoint (its optimisers saved as `capturable`)
resumes on a CPU."""
import json

import pytest
import torch
from conftest import TINY

import ce_train
from ce_utils import accel, cli

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_flag_is_off_on_a_cpu_and_refused_when_asked_for(tmp_path, capsys):
    a = ce_train.parse_args(["--device", "cpu", "--out", str(tmp_path / "a")])
    assert a.cuda_graph is False
    with pytest.raises(SystemExit) as e:
        ce_train.parse_args(["--device", "cpu", "--cuda-graph", "--out", str(tmp_path / "b")])
    assert e.value.code == 2 and "--cuda-graph needs a CUDA device" in capsys.readouterr().err


def test_a_graphed_runs_checkpoint_resumes_on_a_cpu(tmp_path, tiny_flags, shapes_root, capsys):
    """A graphed run saves Adam with capturable=True (and its step counts on the GPU);
    load_state_dict would carry that flag over, and a capturable Adam on a CPU fails an assertion
    at its first step."""
    out = tmp_path / "run"
    ce_train.main(tiny_flags + ["--steps", "2", "--eval-every", "2", "--out", str(out)])
    state = torch.load(out / "ckpt.pt", weights_only=False)
    for k in ("optG", "optD"):
        for group in state[k]["param_groups"]:
            group["capturable"] = True
    torch.save(state, out / "ckpt.pt")
    ce_train.main(["--resume", str(out), "--steps", "4", "--data-root", shapes_root,
                   "--device", "cpu"])
    assert "done: 4 steps" in capsys.readouterr().out


def test_resumed_optimiser_state_takes_its_parameters_layout():
    """A CPU run's Adam moments are NCHW; on a GPU the parameters are channels_last, and the fused
    Adam of a graphed run refuses moments whose strides differ from their parameter's
    (checkpoints.load_weights gives them their parameter's layout)."""
    from ce_utils import checkpoints

    def adam(channels_last):
        torch.manual_seed(0)
        conv = torch.nn.Conv2d(3, 8, 4).to(memory_format=torch.channels_last if channels_last else
                                           torch.contiguous_format)
        return conv, torch.optim.Adam(conv.parameters(), fused=channels_last)

    conv, opt = adam(False)
    conv(torch.rand(2, 3, 8, 8)).sum().backward()
    opt.step()
    conv2, opt2 = adam(True)
    checkpoints.load_weights({"opt": opt2}, {"opt": opt.state_dict(), "path": "x.pt"})
    w = conv2.weight
    assert opt2.state[w]["exp_avg"].stride() == w.stride()
    assert w.stride() != opt.state[conv.weight]["exp_avg"].stride()
    assert torch.equal(opt2.state[w]["exp_avg"], opt.state[conv.weight]["exp_avg"])
    conv2(torch.rand(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)).sum().backward()
    opt2.step()                                        # the fused step accepts it


def test_gradients_take_their_parameters_strides_along_size_one_dimensions():
    """PyTorch issue 106951's example (on a CPU too): a (2, 1, 100) weight whose gradient comes
    back with strides (100, 1, 1) instead of (100, 100, 1), which the fused Adam refuses;
    accel.match_grad_strides views it with the weight's."""
    def grad_strides(hook):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.zeros(2, 1, 100))
        if hook:
            accel.match_grad_strides([w])
        torch.bmm(torch.rand(10, 2, 100).transpose(0, 1), w.transpose(1, 2)).sum().backward()
        return w.stride(), w.grad.stride(), w.grad
    stride, before, g0 = grad_strides(False)
    assert before != stride                            # the mismatch exists ...
    stride, after, g1 = grad_strides(True)
    assert after == stride and torch.equal(g0, g1)     # ... and is gone, with the same values


def test_a_failed_capture_says_how_to_train_without_the_graph(monkeypatch):
    """If capturing fails (a bug, ours or a torch version's), the error says so and names
    --no-cuda-graph. The CUDA calls around the capture are replaced here by stand-ins, so that
    this runs on a CPU."""
    import contextlib

    class Stream:
        def wait_stream(self, other):
            pass

    def capture(graph, **kwargs):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\n"
                           "more lines")
    for name, value in (("Stream", Stream), ("current_stream", Stream), ("CUDAGraph", object),
                        ("graph", capture), ("stream", lambda s: contextlib.nullcontext())):
        monkeypatch.setattr(torch.cuda, name, value)
    step = accel.cuda_graphed(lambda x: x + 1, warmup=1)
    assert step(torch.zeros(2)).tolist() == [1.0, 1.0]     # the warm-up step runs as usual
    with pytest.raises(RuntimeError) as e:
        step(torch.zeros(2))
    assert ("operation not permitted when stream is capturing); --no-cuda-graph trains"
            in str(e.value))


def losses(graph, mask, eager_like_graph=True, steps=20):
    """(steps, 5) statistics of `steps` training steps from one seeded state on fixed random
    batches. graph: captured and replayed; else eager, with the graph's optimiser and autocast
    settings (eager_like_graph) or with those of an ungraphed run. cudnn is made deterministic, so
    that only the graph can make a difference."""
    torch.manual_seed(0)
    like = graph or eager_like_graph
    t = ce_train.default_args(device="cuda", width=16, bottleneck=64, mask=mask, cuda_graph=like)
    hw = cli.Hardware("cuda", "auto", None, like).use_fast_kernels()   # TF32, as in a run
    torch.backends.cudnn.benchmark = False   # use_fast_kernels turns it on; the fixture restores it
    m = ce_train.build_training(t, hw)
    G, draw_numbers = m.G, accel.mask_numbers_ahead(t)

    def step(real, *numbers):
        return ce_train.train_step(real, numbers, m, t)
    if graph:
        step = accel.cuda_graphed(step)                   # the masks are built in the graph too
    gen, rows = torch.Generator(device="cuda").manual_seed(1), []
    for k in range(steps):
        real = (torch.rand(16, 3, 128, 128, generator=gen, device="cuda") * 2 - 1).contiguous(
            memory_format=torch.channels_last)
        # clone: the next replay overwrites a graph's output
        rows.append(step(real, *draw_numbers(real, k)).clone())
    weights = torch.cat([p.detach().float().flatten() for p in G.parameters()])
    return torch.stack(rows), weights


@pytest.fixture
def deterministic_cudnn():
    """cuDNN deterministic for the comparison; it and TF32 (which use_fast_kernels turns on)
    restored after."""
    b = torch.backends
    saved = b.cudnn.deterministic, b.cudnn.benchmark, b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32
    b.cudnn.deterministic, b.cudnn.benchmark = True, False
    yield
    b.cudnn.deterministic, b.cudnn.benchmark, b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32 = saved


@cuda
@pytest.mark.parametrize("mask", ["center", "block", "region"])
def test_graphed_step_gives_the_eager_losses(mask, deterministic_cudnn):
    graphed, w_graphed = losses(True, mask)
    eager, w_eager = losses(False, mask)        # the same kernels, launched one by one
    # Adam's host-side step count, autocast's cache
    plain, w_plain = losses(False, mask, eager_like_graph=False)
    print(f"\n{mask}: max |graph - eager| {(graphed - eager).abs().max():.3g} (weights "
          f"{(w_graphed - w_eager).abs().max():.3g}); max |graph - ungraphed run| "
          f"{(graphed - plain).abs().max():.3g} (weights {(w_graphed - w_plain).abs().max():.3g});"
          f" losses at step 20: {graphed[-1].tolist()}")
    # it trained, on changing batches
    assert torch.isfinite(graphed).all() and graphed[:, 1].std() > 0
    assert torch.allclose(graphed, eager, rtol=1e-3, atol=1e-4)
    assert torch.allclose(w_graphed, w_eager, rtol=1e-3, atol=1e-4)
    # an ungraphed run's Adam does its arithmetic differently (multi-tensor, step count on the
    # host): the first steps agree within bf16 tolerance; over 20 steps the GAN's dynamics amplify
    # the difference (printed above)
    assert torch.allclose(graphed[:3], plain[:3], rtol=5e-2, atol=1e-2)


@cuda
def test_a_graphed_run_trains_evaluates_and_resumes(tmp_path, shapes_root, capsys):
    flags = [f for f in TINY if f not in ("--device", "cpu")]
    flags += ["--device", "cuda", "--data-root", shapes_root]
    out = tmp_path / "run"
    ce_train.main(flags + ["--steps", "12", "--eval-every", "6", "--log-every", "6",
                           "--out", str(out)])
    assert json.loads((out / "args.json").read_text())["cuda_graph"] is True
    ce_train.main(["--resume", str(out), "--steps", "18", "--data-root", shapes_root])
    text = capsys.readouterr().out
    assert "resumed" in text and "done: 18 steps" in text
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss_rec" in r] == [6, 12, 18]
    assert all(torch.isfinite(torch.tensor(r["loss_rec"])) for r in log if "loss_rec" in r)


@cuda
@pytest.mark.parametrize("kind", ["block", "region"])
def test_masks_are_the_same_on_the_gpu_as_on_a_cpu(kind, deterministic_cudnn):
    """Random masks are drawn on the CPU and built on the device. Blocks are integer work: the
    same exactly. A region is a smooth field thresholded: the last bit of float rounding may put a
    rare pixel on the other side."""
    import ce_masks
    cli.Hardware("cuda").use_fast_kernels()    # as in a run: TF32 allowed for matrix products
    gpu = ce_masks.random_masks(kind, 512, (0, "mask", 7), 128, "cuda").cpu()
    cpu = ce_masks.random_masks(kind, 512, (0, "mask", 7), 128, "cpu")
    differ = (gpu != cpu).flatten(1).any(1)
    print(f"\n{kind}: {int(differ.sum())} of 512 masks differ, "
          f"{(gpu != cpu).float().mean():.2e} of pixels")
    if kind == "block":
        assert torch.equal(gpu, cpu)
    assert (gpu != cpu).float().mean() < 1e-4 and differ.float().mean() < 0.01


@cuda
def test_a_cpu_runs_checkpoint_resumes_graphed_on_the_gpu(tmp_path, tiny_flags, shapes_root,
                                                          capsys):
    """NCHW moments and host step counts from a CPU run, taken up by the GPU's fused, capturable
    Adam (checkpoints.keep_implementation gives the moments their parameters' layout)."""
    out = tmp_path / "run"
    ce_train.main(tiny_flags + ["--steps", "2", "--eval-every", "2", "--batch-size", "4",
                                "--out", str(out)])
    ce_train.main(["--resume", str(out), "--steps", "8", "--data-root", shapes_root,
                   "--device", "cuda"])
    assert "done: 8 steps" in capsys.readouterr().out
    assert json.loads((out / "args.json").read_text())["cuda_graph"] is True


@cuda
def test_streamed_batches_reach_the_gpu_and_feed_a_captured_step():
    """On a GPU a streamed batch is copied by the worker thread on its own stream
    (accel.copy_ahead), also while cuda_graphed captures: the batches equal the resident ones, and
    a graphed function of them its eager result."""
    import ce_data
    from ce_utils import synthetic
    imgs = synthetic.make_shapes(24, seed=4, size=144)
    res = ce_data.Batches(imgs, 4, "cuda", seed=1)
    st = accel.StreamedBatches(imgs, 4, "cuda", seed=1)
    assert st.streaming

    def energy(x):
        return x.square().mean(dim=(1, 2, 3))
    graphed = accel.cuda_graphed(energy)
    for step in range(accel.GRAPH_WARMUP + 4):               # eager, captured, then replayed
        x = st.get(step)
        assert torch.equal(x, res.get(step))
        assert torch.equal(graphed(x), energy(x))
