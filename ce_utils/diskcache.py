"""The on-disk image cache of the datasets: DATA_ROOT/.ce_cache/NAME.npy holds the decoded images
as uint8 rows (N, S, S, 3) (S: the load size, or the images' own side if smaller: "side" in the
metadata), memory-mapped when loaded; NAME.json says what it holds and carries a
CRC32 per block of rows. Written under a temp name, metadata last; checked at every load, and a
stale or damaged cache is rebuilt, never used. ce_utils/datasets.py decides what goes in.

    python -c "import ce_utils.datasets as d; d.load_split('shapes', 'data', 'val')"
    ls data/.ce_cache
"""
import concurrent.futures
import contextlib
import errno
import hashlib
import json
import os
import struct
import sys
import time
import zlib

import numpy as np

from ce_utils import cli
from ce_utils.cli import DataError

CACHE_VERSION = 3          # 2: CRC32 checksums in the metadata; new embedded-data generator
#                            3: images below the load size stored at their own size ("side")
CRC_BLOCK_BYTES = 1 << 24  # one CRC32 per 16 MB of images: a damaged cache names the images it lost


# ------------------------------------------------------------------------------------------------
# The cache: DATA_ROOT/.ce_cache/NAME.npy (uint8 rows) + NAME.json (what it holds, CRC32 per block).

def _crc_rows(size):
    """Images per checksum block."""
    return max(1, CRC_BLOCK_BYTES // (size * size * 3))


class Rows:
    """Images appended into a preallocated (capacity, S, S, 3) uint8 array, with a CRC32 per block
    of rows computed as blocks fill (from memory just written: the cache is never read back whole).

    With a path, the array is a memory-mapped temp file PATH.ce-tmp<pid>, so the images go to disk
    as they are made. finish() shrinks it to the rows written (rows are dense: nothing moves),
    renames it to PATH and writes the metadata last. Without a path, or if the file cannot be
    made, a plain in-memory array.
    """

    def __init__(self, npy, capacity, size):
        self.npy, self.tmp, self.arr = npy, None, None
        self.n, self.crcs, self.rows = 0, [], _crc_rows(size)
        shape, nbytes = (capacity, size, size, 3), capacity * size * size * 3   # no overflow
        if nbytes > np.iinfo(np.intp).max // 2:      # numpy's "array is too big"
            raise DataError(f"{npy or 'the images'}: {capacity:,} images of {size} px would take "
                            f"{nbytes / 1e9:.3g} GB; lower the number of images")
        if npy is not None:
            try:
                os.makedirs(os.path.dirname(npy), exist_ok=True)
                self.tmp = f"{npy}{cli.TMP_SUFFIX}{os.getpid()}"
                self.arr = np.lib.format.open_memmap(self.tmp, "w+", np.uint8, shape)
                _reserve(self.tmp, self.arr.offset + self.arr.nbytes)
            except OSError as e:
                self.discard()
                _fallback_to_memory(npy, e, nbytes)
        if self.arr is None:
            self.arr = np.empty(shape, np.uint8)

    def add(self, rows):
        self.arr[self.n:self.n + len(rows)] = rows
        self.n += len(rows)
        while (len(self.crcs) + 1) * self.rows <= self.n:
            self._crc_block()

    def _crc_block(self):
        a = len(self.crcs) * self.rows
        self.crcs.append(zlib.crc32(self.arr[a:min(a + self.rows, self.n)]))

    def finish(self, meta=None):
        """The array of the rows written: the cache file, memory-mapped, or the in-memory array."""
        if self.tmp is None:
            return self.arr[:self.n]
        if self.n == 0:                                    # nothing decoded: no cache to keep
            self.discard()
            return np.zeros((0,) + self.arr.shape[1:], np.uint8)
        if self.n % self.rows:
            self._crc_block()
        offset, shape = self.arr.offset, (self.n,) + self.arr.shape[1:]
        self.arr.flush()
        self.arr = None                                    # unmap before shrinking the file
        with open(self.tmp, "r+b") as f:
            f.write(_npy_header(shape, offset))
            f.truncate(offset + int(np.prod(shape)))
            f.flush()
            os.fsync(f.fileno())
        os.replace(self.tmp, self.npy)
        self.tmp = None
        meta = {**(meta or {}), "n": self.n, "crc_rows": self.rows, "crc32": self.crcs}
        # last: a cache is used only once complete
        cli.atomic_write(self.npy[:-4] + ".json", json.dumps(meta))
        return np.load(self.npy, mmap_mode="c")

    def discard(self):
        """Remove the temp file (an interrupted or failed build)."""
        if self.tmp is not None:
            self.arr = None
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.tmp)
            self.tmp = None


def _fallback_to_memory(npy, e, nbytes):
    """A cache that cannot be written (read-only data folder, full disk): keep the images in
    memory this once, if they fit in half of it; else one clear error, not swapping or a kill."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):   # not POSIX: assume it fits
        ram = 2 * nbytes
    why = f"cannot write the cache {npy} ({e.strerror or e})"
    if nbytes > ram / 2:
        raise DataError(f"{why}, and its {nbytes / 1e9:.1f} GB of images do not fit in memory; "
                        f"free disk space there or make {os.path.dirname(npy)} writable")
    print(f"warning: {why}; keeping the images in memory ({nbytes / 1e9:.1f} GB) and making them "
          "again next run", file=sys.stderr)


def _reserve(path, nbytes):
    """Allocate the cache file's disk space now: a full disk is then one clear error up front, not a
    crash (SIGBUS) when a memory-mapped page cannot be written later. Without fallocate: sparse."""
    if hasattr(os, "posix_fallocate"):
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, nbytes)
        except OSError as e:
            # EINVAL, EOPNOTSUPP, ENOSYS: fallocate is not supported here
            if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
                raise OSError(e.errno, f"{e.strerror}: the cache needs {nbytes / 1e9:.1f} GB",
                              path) from None
        finally:
            os.close(fd)


def _npy_header(shape, length):
    """A .npy version 1.0 header for uint8 C-order `shape`, padded with spaces to exactly `length`
    bytes (the length of the header it replaces: the data stays where it is)."""
    text = repr({"descr": "|u1", "fortran_order": False, "shape": tuple(int(x) for x in shape)})
    text = text.ljust(length - 10 - 1) + "\n"
    if length > 65535 + 10 or len(text) != length - 10:
        raise ValueError(f"cannot rewrite a .npy header of {length} bytes")
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode("latin1")


def _damaged_blocks(arr, meta):
    """Indices of the blocks of rows whose CRC32 differs from the one stored with the cache.

    Reads the whole array once, on several threads (zlib releases the GIL while it checksums)."""
    rows, crcs = meta["crc_rows"], meta["crc32"]
    if not isinstance(rows, int) or rows < 1 or len(crcs) != -(-len(arr) // rows):
        return [0]
    big = arr.nbytes > 1 << 31
    if big:
        t0 = time.time()
        print(f"checking the cache ({arr.nbytes / 1e9:.1f} GB) against its checksums ...",
              file=sys.stderr)
    with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as ex:
        same = list(ex.map(lambda i: zlib.crc32(arr[i * rows:(i + 1) * rows]) == crcs[i],
                           range(len(crcs))))
    if big:
        print(f"checked in {time.time() - t0:.0f}s", file=sys.stderr)
    return [i for i, ok in enumerate(same) if not ok]


def read_cache(npy, meta_path, expect):
    """The cached array (memory-mapped) and its metadata if they match `expect` and the checksums,
    else (None, None) after one warning line (a stale or damaged cache is rebuilt, never used)."""
    if not (os.path.isfile(npy) and os.path.isfile(meta_path)):
        return None, None
    why = "stale or damaged"
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        arr = np.load(npy, mmap_mode="c")  # copy-on-write: writable for torch, never written back
        side = meta.get("side", expect["size"])        # images smaller than the load size
        ok = (all(meta.get(k) == v for k, v in expect.items()) and arr.dtype == np.uint8
              and type(side) is int and 0 < side <= expect["size"]
              and arr.shape == (meta["n"], side, side, 3))
        if ok:
            bad = _damaged_blocks(arr, meta)
            if bad:
                ok, r = False, meta["crc_rows"]
                why = (f"damaged: checksum mismatch in {len(bad)} block(s) of {r} images, "
                       f"first images {bad[0] * r}-{min((bad[0] + 1) * r, len(arr)) - 1}")
    except (OSError, ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        print(f"warning: cache {npy} is {why}; rebuilding it", file=sys.stderr)
        return None, None
    return arr, meta


def remove_dead_temps(cache_dir, prefix):
    """Delete `prefix`*.ce-tmp<pid> files left in the cache folder by killed builds (their
    process is gone): a half-built ImageNet cache is large. Callers pass the split's name without
    the load size, so a build of another size cleans up too. A live process's file is kept
    (another DDP rank's, or a build of another size running now)."""
    with contextlib.suppress(OSError):
        for name in os.listdir(cache_dir):
            pid = name.rpartition(cli.TMP_SUFFIX)[2]
            ours = name.startswith(prefix) and cli.TMP_SUFFIX in name
            if ours and pid.isdigit() and int(pid) != os.getpid():
                try:
                    os.kill(int(pid), 0)
                except ProcessLookupError:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(os.path.join(cache_dir, name))
                except OSError:        # PermissionError: the process exists (someone else's)
                    pass


def files_key(files, size, root):
    """A digest of the file list (relative paths, sizes, mtimes) and load size: a changed folder ->
    a new cache. Paths are hashed as the file system's bytes (os.fsencode), so any name works."""
    h = hashlib.sha1(f"v{CACHE_VERSION} size={size}\n".encode())
    for f in files:
        st = os.stat(f)
        line = f"\t{st.st_size}\t{st.st_mtime_ns}\n".encode()
        h.update(os.fsencode(os.path.relpath(f, root)) + line)
    return h.hexdigest()[:16]
