import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Flags for a network small enough that a training step takes milliseconds on a CPU.
TINY = ["--width", "8", "--bottleneck", "16", "--device", "cpu", "--shapes-n", "64", "--eval-images", "16"]


@pytest.fixture
def tiny_flags(tmp_path):
    """Tiny-model flags with the data cache and run folder inside the test's own temp dir."""
    return TINY + ["--data-root", str(tmp_path / "data")]
