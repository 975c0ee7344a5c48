import os
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Flags for a network small enough that a training step takes milliseconds on a CPU.
TINY = ["--width", "8", "--bottleneck", "16", "--device", "cpu", "--shapes-n", "64",
        "--eval-images", "16"]


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory):
    """A data folder whose embedded-data cache (64 train images, the 512 held-out ones) is made
    once per test session: most tests only need some data to train on. Tests that are about making
    or reading the cache use folders of their own."""
    from ce_utils import datasets
    root = str(tmp_path_factory.getbasetemp() / "tiny-shapes-data")
    for split in ("train", "val"):
        datasets.load_split("shapes", root, split, 128, 64)
    return root


@pytest.fixture
def tiny_flags(shapes_root):
    """Tiny-model flags with the session's data cache (runs go to each test's own temp dir via
    --out)."""
    return TINY + ["--data-root", shapes_root]


def pytest_configure(config):
    config.addinivalue_line("markers",
                            "pictures: let training runs draw curves.png and evolution.gif")


@pytest.fixture(autouse=True)
def _no_run_pictures(request, monkeypatch):
    """A training run redraws OUT/curves.png and OUT/evolution.gif when it ends, with matplotlib,
    which slows a suite of many short runs. Tests that do not look at them skip that drawing; a
    test marked @pytest.mark.pictures keeps it (runs in subprocesses always draw)."""
    if "pictures" not in request.keywords:
        import ce_train
        monkeypatch.setattr(ce_train, "draw_pictures",
                            lambda run, args: setattr(run, "t_pictures", time.time()))


@pytest.fixture
def one_thread():
    """Networks and tensors this small gain nothing from threads, and on a loaded 2-core machine
    two OpenMP threads made such tests many times slower. Restored after each test."""
    import torch
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
