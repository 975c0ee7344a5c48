"""Files as they come: EXIF-rotated photos, FIFOs, links, odd names, unreadable folders,
decompression bombs, a damaged cache, a cache larger than memory should be, the Tiny ImageNet
checksum, a folder with no test split."""
import contextlib
import hashlib
import os
import signal
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
from PIL import Image
from test_data import make_tiny_zip

from ce_utils import cli, datasets, imagefiles, tinyimagenet


class Hung(Exception):
    """Not an OSError: no error handler of the code under test can swallow it."""


@contextlib.contextmanager
def deadline(seconds):
    """Fail instead of hanging (a FIFO opened for reading blocks until a writer comes)."""
    def stop(signum, frame):
        raise Hung(f"still running after {seconds}s: something blocked")
    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def bomb_png(path, side=20000):
    """A PNG whose header says side x side RGB (400 M pixels for 20000): a few dozen bytes on
    disk."""
    def chunk(kind, data):
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


def rotated_jpeg(path):
    """A 64x48 JPEG stored sideways with EXIF orientation 6 (display: rotate 90 degrees
    clockwise), and the upright pixels it stands for."""
    stored = np.zeros((48, 64, 3), np.uint8)
    stored[:] = (0, 200, 0)
    stored[:16, :16] = (220, 0, 0)                       # red block at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(path, quality=95, exif=exif)
    return np.rot90(stored, -1)                  # clockwise: the red block ends at the top-right


def test_exif_orientation_is_applied(tmp_path):
    upright = rotated_jpeg(tmp_path / "phone.jpg")
    got = np.asarray(imagefiles.read_rgb(tmp_path / "phone.jpg"))
    assert got.shape == upright.shape == (64, 48, 3)
    assert np.abs(got.astype(int) - upright).mean() < 3          # JPEG error only
    assert got[4, 44, 0] > 180 and got[4, 4, 0] < 60             # red at top-right, not top-left
    arr, _ = imagefiles.decode_image(tmp_path / "phone.jpg", 32)  # the datasets' path: upright
    assert arr[2, 30, 0] > 180 and arr[2, 1, 0] < 60


def make_odd_folder(root):
    """8 good images plus a FIFO named *.jpg, a link to an image, a dangling link, a non-UTF-8
    name, a bomb."""
    os.makedirs(root / "sub")
    for i in range(8):
        Image.new("RGB", (130, 130), (30 * i, 10, 10)).save(root / f"img{i}.png")
    os.mkfifo(root / "pipe.jpg")
    os.symlink(root / "img0.png", root / "sub" / "link.png")          # a link to a file: used
    os.symlink(root / "missing.png", root / "gone.png")               # dangling: skipped, counted
    latin1 = os.path.join(os.fsencode(root), b"caf\xe9.png")             # a Latin-1 name
    Image.new("RGB", (130, 130), (1, 2, 3)).save(latin1)
    bomb_png(root / "bomb.png")


def test_odd_entries_are_used_or_counted_never_fatal(tmp_path, monkeypatch, capsys):
    root = tmp_path / "odd"
    make_odd_folder(root)
    os.makedirs(root / "locked")
    Image.new("RGB", (130, 130)).save(root / "locked" / "hidden.png")
    real_scandir = os.scandir

    def scandir(path):       # a folder we may not list (chmod 000 does not stop root, so simulated)
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)
    monkeypatch.setattr(os, "scandir", scandir)
    skipped = {}
    with deadline(30):
        files, other = datasets.list_images(str(root), skipped)
        names = sorted(os.path.basename(f) for f in files)
        assert len(files) == 11 and "link.png" in names
        assert "pipe.jpg" not in names and "gone.png" not in names
        assert skipped["special"] == 1 and skipped["dangling"] == 1 and skipped["unreadable"] == 1
        held_out = datasets._split_files(files)[1]   # the split hashes the names' bytes: no crash
        # the bomb is in train, where it is skipped
        assert len(held_out) == 1 and "bomb" not in held_out[0]
        train = datasets.load_split("folder", str(root), "train")
        val = datasets.load_split("folder", str(root), "val")
    err = capsys.readouterr().err
    assert "skipped 1 special file" in err and "skipped 1 symbolic link" in err
    assert "skipped 1 unreadable folder" in err
    # the bomb: a counted skip
    assert "skipped 1 unreadable image" in err and "decompression bomb" in err
    # 8 + link + Latin-1 name; FIFO, dangling link, bomb skipped
    assert len(train) == 9 and len(val) == 1


def test_special_files_and_bombs_are_refused_by_read_rgb(tmp_path):
    os.mkfifo(tmp_path / "pipe.jpg")
    with deadline(30), pytest.raises(cli.DataError, match="FIFO"):
        imagefiles.read_rgb(tmp_path / "pipe.jpg")
    with pytest.raises(cli.DataError, match="a folder"):
        imagefiles.read_rgb(tmp_path)
    with pytest.raises(cli.DataError, match="decompression bomb"):
        imagefiles.read_rgb(bomb_png(tmp_path / "bomb.png"))


@pytest.mark.parametrize("data", ["folder", "shapes"])
def test_damaged_cache_is_detected_and_rebuilt(tmp_path, capsys, data):
    root = tmp_path / "d"
    os.makedirs(root)
    for i in range(24):
        Image.new("RGB", (128, 128), (i, 5 * i, 255 - i)).save(root / f"{i:02d}.png")
    kw = {"shapes_n": 40} if data == "shapes" else {}
    first = np.array(datasets.load_split(data, str(root), "train", **kw))
    npy = [p for p in (root / ".ce_cache").iterdir() if p.suffix == ".npy" and "train" in p.name]
    assert len(npy) == 1
    raw = bytearray(npy[0].read_bytes())
    mid = len(raw) // 2
    raw[mid:mid + 16] = bytes(b ^ 0xFF for b in raw[mid:mid + 16])   # 16 flipped bytes, same size
    npy[0].write_bytes(bytes(raw))
    capsys.readouterr()
    again = datasets.load_split(data, str(root), "train", **kw)
    assert "checksum mismatch" in capsys.readouterr().err
    assert np.array_equal(again, first)                       # rebuilt: equal to a fresh decode
    # and clean now
    assert np.array_equal(datasets.load_split(data, str(root), "train", **kw), first)
    assert capsys.readouterr().err.count("checksum") == 0


def test_cache_is_written_to_disk_not_built_in_memory(tmp_path):
    """150 images (7.4 MB at 128 px) with 2 unreadable files among them: the process never holds
    the split."""
    root = tmp_path / "many"
    os.makedirs(root)
    for i in range(150):
        # above the load size: cached at 128 px (smaller images would be kept at their own size)
        Image.new("RGB", (130, 130), (i, 255 - i, 7)).save(root / f"{i:03d}.png")
    (root / "050x.png").write_text("not an image")
    (root / "100x.png").write_bytes(b"")
    files, _ = datasets.list_images(str(root))
    full_bytes = 150 * 128 * 128 * 3
    tracemalloc.start()
    try:
        arr, meta = datasets.cached_images(files, 128, str(root / ".ce_cache"), "t", str(root),
                                           workers=1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < full_bytes / 4, f"peak {peak} bytes: the split was held in memory"
    assert isinstance(arr, np.memmap) and arr.shape == (150, 128, 128, 3) and meta["skipped"] == 2
    expected, _ = datasets.decode_files(files, 128, "in memory", workers=1)
    assert np.array_equal(arr, expected)                       # skipped rows compacted, order kept
    npy = root / ".ce_cache" / os.path.basename(arr.filename)
    assert npy.stat().st_size == arr.offset + full_bytes       # shrunk to the rows kept, no gap
    assert not [p for p in (root / ".ce_cache").iterdir() if cli.TMP_SUFFIX in p.name]


def test_tiny_download_is_checked_against_the_published_md5(tmp_path, monkeypatch):
    src = make_tiny_zip(tmp_path / "served.zip")
    data = src.read_bytes()
    monkeypatch.delenv("CE_TINY_URL", raising=False)
    monkeypatch.setattr(tinyimagenet, "TINY_URL", src.as_uri())   # "the default URL", served here
    monkeypatch.setattr(tinyimagenet, "TINY_SIZE", len(data))
    monkeypatch.setattr(tinyimagenet, "TINY_MD5", "0" * 32)
    root = tmp_path / "data"
    wrong = r"tiny-imagenet-200.zip.part: not the published .* MD5"
    with pytest.raises(cli.DataError, match=wrong) as e:
        datasets.load_split("tiny", str(root), "train")
    assert hashlib.md5(data).hexdigest() in str(e.value) and "\n" not in str(e.value)
    assert not os.listdir(root)                                         # the wrong file is not kept
    monkeypatch.setattr(tinyimagenet, "TINY_SIZE", len(data) + 1)  # shorter than published: resume
    with pytest.raises(cli.DataError, match="run again to resume"):
        datasets.load_split("tiny", str(root), "train")
    assert (root / "tiny-imagenet-200.zip.part").stat().st_size == len(data)
    os.remove(root / "tiny-imagenet-200.zip.part")
    monkeypatch.setattr(tinyimagenet, "TINY_SIZE", len(data))
    monkeypatch.setattr(tinyimagenet, "TINY_MD5", hashlib.md5(data).hexdigest())
    assert datasets.load_split("tiny", str(root), "train").shape == (6, 64, 64, 3)  # own size


def test_folder_without_test_split_refuses_test(tmp_path):
    for i in range(4):
        Image.new("RGB", (128, 128), (i, i, i)).save(tmp_path / f"{i}.png")
    with pytest.raises(cli.DataError, match="train and a held-out .val. split only.*--split val"):
        datasets.load_split("folder", str(tmp_path), "test")
    assert len(datasets.load_split("folder", str(tmp_path), "val")) == 1
