"""Tiny ImageNet for --data tiny (200 classes, 64x64 px; 100,000 train, 10,000 val images): found
under DATA_ROOT/tiny-imagenet-200 (or DATA_ROOT itself; a zip given as DATA_ROOT is extracted next
to it), or downloaded on first use with a progress line (resumed after an interruption; size and
MD5 checked against the published archive; CE_TINY_URL to fetch it from elsewhere), its zip checked
(CRCs) and extracted atomically.
ce_utils/datasets.py lists and decodes the images from there.

    python -c "from ce_utils import tinyimagenet as t; print(t.ensure_tiny('data'))"  # 248 MB once
"""
import hashlib
import http.client
import os
import shutil
import sys
import urllib.error
import urllib.request
import zipfile

from ce_utils import progress
from ce_utils.cli import DataError

TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_MD5, TINY_SIZE = "90528d7ca1a48142e341f4ef8d21d0de", 248_100_043   # published with the archive


# ------------------------------------------------------------------------------------------------
# Tiny ImageNet: find, or download + check + extract.

def download(url, dest, check=None):
    """Download `url` to `dest` via `dest.part` with a progress line; rename it only when complete
    (and when `check(part)`, if given, has not raised). A `.part` left by an interrupted run is
    resumed with an HTTP Range request where the server allows it, otherwise started again."""
    part = dest + ".part"
    have = os.path.getsize(part) if os.path.exists(part) else 0
    req = urllib.request.Request(url, headers={"User-Agent": "context-encoder"})
    if have and url.startswith(("http://", "https://")):
        req.add_header("Range", f"bytes={have}-")
    try:
        r = urllib.request.urlopen(req, timeout=60)
    except urllib.error.HTTPError as e:
        if e.code != 416:   # 416: nothing left to fetch, the .part is whole; the checks will tell
            raise
        total = done = have
    else:
        total, done = _fetch(r, url, part, have)
    if total and done != total:
        raise DataError(f"{url}: download stopped at {done} of {total} bytes; run again to resume")
    if check is not None:
        check(part)
    os.replace(part, dest)


def _fetch(r, url, part, have):
    """Write the response `r` to `part` (appended if the server resumed at byte `have`);
    returns (expected, got) bytes."""
    with r:
        resumed = have and getattr(r, "status", 200) == 206
        total = int(r.headers.get("Content-Length") or 0) + (have if resumed else 0)
        done = have if resumed else 0
        show = progress.Progress(total or None, f"downloading {url}", "MB", "MB/s", scale=1e6,
                                 start=done)
        with open(part, "ab" if resumed else "wb") as f:
            while True:
                chunk = r.read(1 << 20)
                if not chunk:
                    break
                f.write(chunk)
                done += len(chunk)
                show(done)
        show(done, final=True)
    return total, done


def _check_published(part):
    """The default URL's download must be the published archive: TINY_SIZE bytes with MD5 TINY_MD5
    (zip CRCs alone would pass a re-packed archive). A short file is kept to resume; a wrong one
    deleted."""
    size = os.path.getsize(part)
    if size < TINY_SIZE:
        raise DataError(f"{part}: {size:,} bytes of the {TINY_SIZE:,} of {TINY_URL}; run again to "
                        "resume")
    h = hashlib.md5(usedforsecurity=False)   # a checksum, not security
    with open(part, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    if size != TINY_SIZE or h.hexdigest() != TINY_MD5:
        os.remove(part)
        raise DataError(f"{part}: not the published Tiny ImageNet archive ({size:,} bytes, MD5 "
                        f"{h.hexdigest()}; expected {TINY_SIZE:,} bytes, MD5 {TINY_MD5}); deleted "
                        f"it: run again to download it again, or fetch {TINY_URL} by hand, check "
                        f"its MD5 and put it in {os.path.dirname(part)}")


def _check_zip(path):
    """Raise DataError unless `path` is a complete zip holding tiny-imagenet-200/train/ (CRCs)."""
    hint = ("delete it and run again to download it, or place tiny-imagenet-200.zip (from "
            f"{TINY_URL}) in that folder by hand")
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            if not any(n.startswith("tiny-imagenet-200/train/") for n in names):
                raise DataError(f"{path}: not a Tiny ImageNet archive (no tiny-imagenet-200/train/ "
                                f"in it); {hint}")
            bad = z.testzip()
            if bad is not None:
                raise DataError(f"{path}: archive is corrupt (bad CRC in {bad}); {hint}")
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise DataError(f"{path}: not a readable zip archive ({e}); it may be truncated; "
                        f"{hint}") from None


def find_tiny(root):
    """The extracted Tiny ImageNet folder: DIR/tiny-imagenet-200, or DIR itself when it holds
    train/ and val/val_annotations.txt; None when neither is there."""
    target = os.path.join(root, "tiny-imagenet-200")
    if os.path.isdir(os.path.join(target, "train")):
        return target
    if (os.path.isdir(os.path.join(root, "train"))
            and os.path.isfile(os.path.join(root, "val", "val_annotations.txt"))):
        return root
    return None


def data_dir(root):
    """The folder a --data-root names: itself, or the folder holding it when it is a zip file (the
    zip is extracted there, and the caches go there)."""
    return os.path.dirname(os.path.abspath(root)) if os.path.isfile(root) else root


def _refuse_other_zips(root):
    """Before a download: a Tiny ImageNet zip of another name in `root` is named, with the flag
    that uses it (a download would ignore it)."""
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if not name.lower().endswith(".zip") or not zipfile.is_zipfile(path):
            continue
        try:
            with zipfile.ZipFile(path) as z:
                tiny = any(n.startswith("tiny-imagenet-200/train/") for n in z.namelist())
        except (zipfile.BadZipFile, OSError):
            continue
        if tiny:
            raise DataError(f"{root}: no tiny-imagenet-200/ or tiny-imagenet-200.zip here, but "
                            f"{name} holds Tiny ImageNet; pass --data-root {path} to use it "
                            "(extracted into that folder), or rename it tiny-imagenet-200.zip")


def ensure_tiny(root, url=None):
    """find_tiny(root), extracting DIR/tiny-imagenet-200.zip, or downloading it first, if needed.
    `root` may also be a zip itself (of any name): extracted next to it, into
    DIR/tiny-imagenet-200, as a downloaded zip is."""
    url = url or os.environ.get("CE_TINY_URL") or TINY_URL
    archive = None
    if os.path.isfile(root):
        if not zipfile.is_zipfile(root):
            raise DataError(f"{root}: a file but not a zip archive; pass --data-root the folder "
                            "holding tiny-imagenet-200/ (or tiny-imagenet-200.zip itself)")
        archive, root = root, data_dir(root)
    found = find_tiny(root) if os.path.isdir(root) else None
    if found:
        if archive and os.path.basename(archive) != "tiny-imagenet-200.zip":
            print(f"note: using {found}, extracted before; delete it to extract {archive} "
                  "again", file=sys.stderr)
        return found
    target = os.path.join(root, "tiny-imagenet-200")
    os.makedirs(root, exist_ok=True)
    archive = archive or os.path.join(root, "tiny-imagenet-200.zip")
    if not os.path.isfile(archive):
        _refuse_other_zips(root)
        try:   # the published checksum applies to the published URL (CE_TINY_URL may serve any zip)
            download(url, archive, _check_published if url == TINY_URL else None)
        except (OSError, ValueError, http.client.HTTPException) as e:  # URLError, timeouts, cuts
            again = "resume" if os.path.exists(archive + ".part") else "retry"
            seen = sorted(n for n in os.listdir(root) if n.lower().endswith(".zip"))
            seen = f" ({', '.join(seen)} there: not a Tiny ImageNet zip)" if seen else ""
            raise DataError(f"could not download Tiny ImageNet from {url} ({type(e).__name__}: "
                            f"{e}); run again to {again}, or download it by hand and put "
                            "tiny-imagenet-200.zip (or its extracted tiny-imagenet-200/ folder) in "
                            f"{root}{seen}, or pass --data-root the zip or that folder") from None
    _check_zip(archive)
    tmp = os.path.join(root, ".tiny-imagenet-200.extracting")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"extracting {archive} ...", file=sys.stderr)
    with zipfile.ZipFile(archive) as z:
        z.extractall(tmp)   # zipfile drops absolute paths and '..' parts: nothing lands outside tmp
    os.replace(os.path.join(tmp, "tiny-imagenet-200"), target)  # atomic: never half extracted
    shutil.rmtree(tmp, ignore_errors=True)
    return target
