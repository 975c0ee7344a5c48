"""Datasets: Tiny ImageNet from a zip served by file://, messy folders, the uint8 cache, device
batches."""
import http.server
import io
import os
import threading
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import ce_data
from ce_utils import accel, cli, datasets, synthetic


def jpeg_bytes(color=(200, 30, 30), size=(64, 64), mode="RGB"):
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_tiny_zip(path, n_classes=2, per_class=3, n_val=4):
    """A zip in the official Tiny ImageNet layout (wnids, words, train/<wnid>/images, val
    annotations, test)."""
    wnids = [f"n{i:08d}" for i in range(n_classes)]
    with zipfile.ZipFile(path, "w") as z:
        r = "tiny-imagenet-200/"
        z.writestr(r + "wnids.txt", "\n".join(wnids) + "\n")
        z.writestr(r + "words.txt", "".join(f"{w}\tthing {w}\n" for w in wnids))
        for c, w in enumerate(wnids):
            z.writestr(f"{r}train/{w}/{w}_boxes.txt", "")
            for i in range(per_class):
                z.writestr(f"{r}train/{w}/images/{w}_{i}.JPEG", jpeg_bytes((40 * c, 10 * i, 100)))
        ann = []
        for i in range(n_val):
            z.writestr(f"{r}val/images/val_{i}.JPEG", jpeg_bytes((10, 20 * i, 30)))
            ann.append(f"val_{i}.JPEG\t{wnids[i % n_classes]}\t0\t0\t63\t63\n")
        z.writestr(r + "val/val_annotations.txt", "".join(ann))
        z.writestr(f"{r}test/images/test_0.JPEG", jpeg_bytes())
    return path


def test_tiny_download_check_extract_and_cache(tmp_path, monkeypatch):
    src = make_tiny_zip(tmp_path / "served.zip")
    monkeypatch.setenv("CE_TINY_URL", src.as_uri())          # file:// URL, no network needed
    root = tmp_path / "data"
    os.makedirs(root)
    (root / "tiny-imagenet-200.zip.part").write_bytes(b"half a download from an earlier run")
    train = datasets.load_split("tiny", str(root), "train")
    # 64 px images are cached at their own size (upsampled to 128 per batch: test_native_cache)
    assert train.shape == (6, 64, 64, 3) and train.dtype == np.uint8
    assert (root / "tiny-imagenet-200" / "train").is_dir()
    # the stale part was replaced, then renamed
    assert not (root / "tiny-imagenet-200.zip.part").exists()
    assert zipfile.is_zipfile(root / "tiny-imagenet-200.zip")
    val = datasets.load_split("tiny", str(root), "val")
    test = datasets.load_split("tiny", str(root), "test")
    assert len(val) == 4 and len(test) == 1
    # colour of val_2 survives decoding + 2x upsampling (JPEG tolerance)
    assert np.abs(val[2].reshape(-1, 3).mean(0) - (10, 40, 30)).max() < 4
    # second call: served from the cache, no decoding
    monkeypatch.setattr(datasets, "decode_files", lambda *a, **k: pytest.fail("decoded again"))
    assert np.array_equal(datasets.load_split("tiny", str(root), "train"), train)


class FlakyServer(http.server.BaseHTTPRequestHandler):
    """Serves one file; the first response is cut off half-way; honours Range requests (206)."""
    data, cut, ranges = b"", True, []

    def do_GET(self):
        rng = self.headers.get("Range")
        FlakyServer.ranges.append(rng)
        start = int(rng.split("=")[1].split("-")[0]) if rng else 0
        body = FlakyServer.data[start:]
        self.send_response(206 if rng else 200)
        self.send_header("Content-Length", str(len(body)))
        if rng:
            n = len(FlakyServer.data)
            self.send_header("Content-Range", f"bytes {start}-{n - 1}/{n}")
        self.end_headers()
        if FlakyServer.cut:
            FlakyServer.cut = False
            self.wfile.write(body[: len(body) // 2])
            return   # HTTP/1.0: the connection closes here, short of Content-Length
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_download_cut_half_way_then_resumed(tmp_path, monkeypatch):
    FlakyServer.data = make_tiny_zip(tmp_path / "src.zip").read_bytes()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FlakyServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/tiny-imagenet-200.zip"
        monkeypatch.setenv("CE_TINY_URL", url)
        root = tmp_path / "data"                  # does not exist yet: created for Tiny ImageNet
        with pytest.raises(cli.DataError, match="run again to resume"):
            datasets.load_split("tiny", str(root), "train")
        part = root / "tiny-imagenet-200.zip.part"
        half = len(FlakyServer.data) // 2
        assert part.stat().st_size == half and not (root / "tiny-imagenet-200.zip").exists()
        train = datasets.load_split("tiny", str(root), "train")   # the next run resumes at `half`
        assert FlakyServer.ranges == [None, f"bytes={half}-"]
        assert train.shape == (6, 64, 64, 3) and not part.exists()     # cached at its own size
        assert (root / "tiny-imagenet-200.zip").read_bytes() == FlakyServer.data
    finally:
        server.shutdown()


def test_tiny_offline_is_one_clear_error(tmp_path, monkeypatch):
    # nothing listens on port 9
    monkeypatch.setenv("CE_TINY_URL", "http://127.0.0.1:9/tiny-imagenet-200.zip")
    with pytest.raises(cli.DataError, match="could not download.*by hand"):
        datasets.load_split("tiny", str(tmp_path), "train")
    assert not (tmp_path / "tiny-imagenet-200.zip").exists()


@pytest.mark.parametrize("damage", ["garbage", "truncated", "not-tiny"])
def test_bad_tiny_archive(tmp_path, damage):
    good = make_tiny_zip(tmp_path / "good.zip").read_bytes()
    bad = {"garbage": b"<html>404</html>", "truncated": good[: len(good) // 2],
           "not-tiny": None}[damage]
    arc = tmp_path / "tiny-imagenet-200.zip"
    if bad is None:
        with zipfile.ZipFile(arc, "w") as z:
            z.writestr("something/else.txt", "x")
    else:
        arc.write_bytes(bad)
    with pytest.raises(cli.DataError, match="tiny-imagenet-200.zip"):
        datasets.load_split("tiny", str(tmp_path), "train")
    # nothing half-extracted is left to be mistaken for the data
    assert not (tmp_path / "tiny-imagenet-200").exists()


def make_messy_folder(root):
    """Good images in many modes, plus files that must be skipped or ignored."""
    os.makedirs(root / "sub", exist_ok=True)
    Image.new("RGB", (200, 150), (250, 0, 0)).save(root / "rgb.jpg")
    Image.new("L", (160, 160), 77).save(root / "gray.png")
    rgba = Image.new("RGBA", (130, 130), (0, 0, 255, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    rgba.save(root / "sub" / "rgba.png")
    palette = Image.new("RGB", (140, 140), (0, 200, 0)).convert("P", palette=Image.ADAPTIVE)
    palette.save(root / "sub" / "palette.gif")
    Image.fromarray(np.full((140, 140), 65535, np.uint16)).save(root / "deep16.png")
    Image.new("CMYK", (140, 140), (0, 255, 255, 0)).save(root / "cmyk.jpg")  # CMYK red
    Image.new("RGB", (40, 30), (9, 9, 9)).save(root / "small.png")            # upsampled, counted
    full = jpeg_bytes(size=(300, 300))
    (root / "truncated.jpg").write_bytes(full[: len(full) // 3])
    (root / "empty.png").write_bytes(b"")
    (root / "fake.jpg").write_text("this is text, not a JPEG")
    (root / "notes.txt").write_text("ignored by extension")


def test_messy_folder_converted_skipped_counted(tmp_path, capsys):
    root = tmp_path / "photos"
    make_messy_folder(root)
    files, other = datasets.list_images(str(root))
    assert len(files) == 10 and other == 1
    arr, stats = datasets.decode_files(files, 128, "test")
    capsys.readouterr()
    assert arr.shape == (7, 128, 128, 3)
    assert stats["skipped"] == 3 and stats["upsampled"] == 1
    kept = [f for f in files if not f.endswith(("truncated.jpg", "empty.png", "fake.jpg"))]
    got = {os.path.basename(f): arr[i] for i, f in enumerate(kept)}
    assert np.all(got["gray.png"] == 77)
    assert np.all(got["deep16.png"] == 255)                    # 16-bit white stays white
    assert tuple(got["rgba.png"][64, 64]) == (0, 0, 255)
    assert tuple(got["palette.gif"][64, 64]) == (0, 200, 0)
    r, g, b = got["cmyk.jpg"][64, 64].astype(int)
    assert r > 200 and g < 60 and b < 60
    assert got["rgb.jpg"][:, :, 0].mean() > 240


def test_folder_split_cache_and_stale_cache(tmp_path, capsys):
    root = tmp_path / "photos"
    make_messy_folder(root)
    for i in range(30):
        Image.new("RGB", (128, 128), (i, 2 * i, 3 * i)).save(root / f"img{i:02d}.png")
    train = datasets.load_split("folder", str(root), "train")
    val = datasets.load_split("folder", str(root), "val")
    err = capsys.readouterr().err
    assert "skipped 3 unreadable" in err and "upsampled" in err and "ignored 1 file" in err
    assert len(train) + len(val) == 37 and len(val) >= 1
    # deterministic split
    assert np.array_equal(datasets.load_split("folder", str(root), "val"), val)
    # a new file changes the file list: the cache is rebuilt, never silently reused
    Image.new("RGB", (128, 128), (1, 2, 3)).save(root / "new.png")
    sizes = [len(datasets.load_split("folder", str(root), s)) for s in ("train", "val")]
    assert sum(sizes) == 38
    # a damaged cache file (wrong size) is detected and rebuilt
    cache = [p for p in (root / ".ce_cache").iterdir()
             if p.name.startswith("folder-train") and p.suffix == ".npy"]
    assert len(cache) == 1                                        # the stale one was removed
    cache[0].write_bytes(cache[0].read_bytes()[:1000])
    again = datasets.load_split("folder", str(root), "train")
    assert "stale or damaged" in capsys.readouterr().err
    assert len(again) == len(train) + (len(again) - len(train))
    assert again.shape[1:] == (128, 128, 3) and len(again) >= len(train)


def test_imagenet_layout_and_errors(tmp_path):
    for split in ("train/n01", "train/n02", "val/n01"):
        os.makedirs(tmp_path / "inet" / split)
        Image.new("RGB", (150, 130), (5, 6, 7)).save(tmp_path / "inet" / split / "a.JPEG")
    inet = str(tmp_path / "inet")
    assert datasets.load_split("imagenet", inet, "train").shape == (2, 128, 128, 3)
    assert datasets.load_split("imagenet", inet, "val").shape == (1, 128, 128, 3)
    with pytest.raises(cli.DataError, match="does not exist"):
        datasets.load_split("folder", str(tmp_path / "nowhere"), "train")
    os.makedirs(tmp_path / "empty")
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(cli.DataError, match="no image files"):
        datasets.load_split("folder", str(tmp_path / "empty"), "train")
    with pytest.raises(cli.DataError, match="train/<class>"):
        datasets.load_split("imagenet", str(tmp_path / "empty"), "train")


def test_shapes_deterministic_and_cached(tmp_path):
    a = synthetic.make_shapes(5, seed=1)
    assert a.shape == (5, 128, 128, 3) and a.dtype == np.uint8
    assert np.array_equal(a, synthetic.make_shapes(5, seed=1))
    assert not np.array_equal(a, synthetic.make_shapes(5, seed=2))
    # independent of workers/chunks
    assert np.array_equal(datasets.generate_shapes(300, seed=1, workers=2)[:5], a)
    b = synthetic.make_shapes(40, seed=1)
    # independent of the batch it is drawn in
    assert np.array_equal(synthetic.make_block((1, 5, 40, 128)), b[5:])
    assert a.std() > 30  # not flat: real content crosses the hole
    # colours in [0.03, 0.97] * 255 - 5.5 (floor) plus noise 0..12: never clipped, so
    # 2 <= value <= 241 + 12
    assert b.min() >= 2 and b.max() <= 253
    train = datasets.load_split("shapes", str(tmp_path), "train", shapes_n=8)
    val = datasets.load_split("shapes", str(tmp_path), "val", shapes_n=8)
    assert len(train) == 8 and len(val) == datasets.SHAPES_VAL
    assert not np.array_equal(train[0], val[0])
    assert np.array_equal(datasets.load_split("shapes", str(tmp_path), "train", shapes_n=8), train)


def test_batches_deterministic_per_step_and_augmented():
    imgs = synthetic.make_shapes(10, seed=3, size=160)       # --load-size 160: random 128 crops
    b = ce_data.Batches(imgs, 4, "cpu", seed=7, flip=True)
    assert b.steps_per_epoch == 2
    x = b.get(0)
    assert x.shape == (4, 3, 128, 128) and x.dtype == torch.float32
    assert -1 <= x.min() and x.max() <= 1
    # same (seed, step) -> same batch
    assert torch.equal(x, ce_data.Batches(imgs, 4, "cpu", seed=7).get(0))
    assert not torch.equal(x, b.get(1))
    # one epoch visits distinct images; a crop is a real window of the source image
    idx = torch.cat([b.indices(0), b.indices(1)])
    assert len(set(idx.tolist())) == 8
    nb = ce_data.Batches(imgs, 4, "cpu", seed=7, flip=False)
    y = ((nb.get(0) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
    src = torch.from_numpy(imgs[int(nb.indices(0)[0])])
    found = any(torch.equal(src[i:i + 128, j:j + 128], y[0]) for i in range(33) for j in range(33))
    assert found
    # DDP sharding: rank r takes the r-th slice of each global batch
    r0, r1 = (ce_data.Batches(imgs, 2, "cpu", seed=7, rank=r, world=2) for r in (0, 1))
    g = ce_data.Batches(imgs, 4, "cpu", seed=7)
    assert torch.equal(torch.cat([r0.indices(0), r1.indices(0)]), g.indices(0))
    assert torch.equal(torch.cat([r0.get(1), r1.get(1)]), g.get(1))   # same crops and flips too
    with pytest.raises(cli.DataError, match="fewer than one batch"):
        ce_data.Batches(imgs, 64, "cpu")


def test_streaming_batches_equal_resident_and_prefetch_ahead():
    """Data that does not fit on the device streams from host memory with batch k+1 prepared
    while k trains."""
    imgs = synthetic.make_shapes(12, seed=4, size=144)
    res = accel.make_batches(imgs, 4, "cpu", seed=1, resident=True)
    st = accel.make_batches(imgs, 4, "cpu", seed=1, resident=False)
    assert st.streaming and not res.streaming
    for step in (0, 1, 2, 7, 3):   # in order, then a jump (as after --resume) and back
        assert torch.equal(st.get(step), res.get(step))
        # the next batch is already being prepared
        assert list(st._prepared.pending) == [(step + 1,)]
