"""ce_eval.py --image: what was cropped is said, the photo comes back at its own size with only the
hole replaced, folders, same-name inputs, bad files counted, FIFOs and decompression bombs refused
in one line."""
import os

import numpy as np
import pytest
from conftest import TINY
from PIL import Image
from test_datasets_files import bomb_png, deadline, rotated_jpeg

import ce_data
import ce_eval
import ce_train
from ce_utils import checkpoints, cli


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny model trained for one step (its weights do not matter: only where its output goes)."""
    tmp = tmp_path_factory.mktemp("photos")
    out = str(tmp / "run")
    ce_train.main(TINY + ["--data-root", str(tmp / "data"), "--steps", "1", "--batch-size", "4",
                          "--out", out])
    return os.path.join(out, "ckpt.pt")


def photo(path, w, h, seed=0):
    """A smooth random w x h RGB photo saved losslessly; returns its pixels."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    px = np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))
    Image.fromarray(px).save(path)
    return px


def inpaint(ckpt, inputs, out, capsys):
    ce_eval.main(["--ckpt", ckpt, "--device", "cpu", "--image", *map(str, inputs),
                  "--out", str(out)])
    return capsys.readouterr()


def test_full_size_result_replaces_only_the_hole(tmp_path, ckpt, capsys):
    orig = photo(tmp_path / "wide.png", 300, 200)
    said = inpaint(ckpt, [tmp_path / "wide.png"], tmp_path / "f", capsys).out
    assert "wide.png: 300x200, centre 200x200 crop scaled to 128 px" in said
    assert np.asarray(Image.open(tmp_path / "f" / "wide_filled.png")).shape == (128, 128, 3)
    assert Image.open(tmp_path / "f" / "wide_compare.png").size[0] == 3 * 128
    full = np.asarray(Image.open(tmp_path / "f" / "wide_full.png"))
    assert full.shape == orig.shape
    # the hole of the 128-px input, [a, b)^2, at the scale of the 200-px square starting at x = 50
    args = checkpoints.read_checkpoint(ckpt)["args"]
    a, b = ce_data.hole_bounds(128, args["overlap"], args["ring"])
    lo, hi = round(a * 200 / 128), round(b * 200 / 128)
    outside = np.ones(orig.shape[:2], bool)
    outside[lo:hi, 50 + lo:50 + hi] = False
    assert np.array_equal(full[outside], orig[outside])                  # bit for bit
    assert f"only the {hi - lo}x{hi - lo} hole at ({50 + lo}, {lo}) replaced" in said
    # inside: the 128-px prediction scaled up (averaged back down, it matches the filled hole)
    filled = np.asarray(Image.open(tmp_path / "f" / "wide_filled.png")).astype(float)
    hole = Image.fromarray(full[lo:hi, 50 + lo:50 + hi])
    down = np.asarray(hole.resize((b - a, b - a), Image.BOX))
    assert np.abs(down - filled[a:b, a:b]).mean() < 6
    assert np.abs(full[lo:hi, 50 + lo:50 + hi].astype(int) - orig[lo:hi, 50 + lo:50 + hi]).max() > 0


def test_exif_rotated_photo_comes_back_upright(tmp_path, ckpt, capsys):
    upright = rotated_jpeg(tmp_path / "phone.jpg")
    said = inpaint(ckpt, [tmp_path / "phone.jpg"], tmp_path / "f", capsys).out
    full = np.asarray(Image.open(tmp_path / "f" / "phone_full.png"))
    assert "phone.jpg: 48x64" in said and full.shape == upright.shape == (64, 48, 3)
    # red at the top-right, as displayed
    assert full[4, 44, 0] > 180 and full[4, 4, 0] < 60


def test_folder_same_names_and_a_bad_file(tmp_path, ckpt, capsys):
    os.makedirs(tmp_path / "a")
    os.makedirs(tmp_path / "b")
    photo(tmp_path / "a" / "x.png", 150, 130, 1)
    photo(tmp_path / "b" / "x.png", 140, 170, 2)
    (tmp_path / "a" / "broken.jpg").write_text("not a JPEG")
    res = inpaint(ckpt, [tmp_path / "a", tmp_path / "b"], tmp_path / "f", capsys)
    # a/x.png, in the order given
    assert Image.open(tmp_path / "f" / "x-1_full.png").size == (150, 130)
    # b/x.png: not written over
    assert Image.open(tmp_path / "f" / "x-2_full.png").size == (140, 170)
    assert not (tmp_path / "f" / "x_full.png").exists()
    assert "2 inputs share a name (x)" in res.err
    lines = [line for line in res.err.splitlines() if "skipped" in line]
    assert len(lines) == 1 and "inpainted 2 photo(s); skipped 1 input" in lines[0]
    assert "broken.jpg" in lines[0]


def test_bomb_and_fifo_are_one_line_errors(tmp_path, ckpt, capsys):
    with pytest.raises(SystemExit) as e:
        cli.run(ce_eval.main, ["--ckpt", ckpt, "--device", "cpu",
                               "--image", str(bomb_png(tmp_path / "b.png"))])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert "decompression bomb" in err and "b.png" in err
    os.mkfifo(tmp_path / "x.jpg")
    # a hang fails here, not forever
    with deadline(60), pytest.raises(SystemExit) as e:
        cli.run(ce_eval.main, ["--ckpt", ckpt, "--device", "cpu",
                               "--image", str(tmp_path / "x.jpg")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert "x.jpg: a FIFO (named pipe), not an image file" in err
