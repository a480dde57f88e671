"""The embedding store: a Zarr v3 group of teacher (or student) image embeddings, format 1.

    STORE.zarr/
      zarr.json   group attrs under "zsd": format_version, zsd_version, teacher (fingerprint),
                  teacher_id, dim, views, view_seed, crop_scale, chunk_rows, classnames,
                  sources (descriptions that find each row's image again), created
      emb     (N, V, D) float16  L2-normalised embeddings of V views per image (0 where not written)
      key     (N,)      str      source key: path relative to the source root, or DataComp uid;
                                 a byte of a file name that is not UTF-8 is stored as NUL + two
                                 hex digits (zsd.sources.encode_key), UTF-8 names as they are
      label   (N,)      int32    class index into classnames, -1 when unlabelled
      loc     (N, 4)    int64    (source, part, offset, size): where the row's bytes live
      view    (N, V, 5) int32    (top, left, height, width, flip) per view; view 0 is the
                                 evaluation transform (its box is recorded for reference)
      error   (N,)      str      why a row failed ("" otherwise)
      status  (N,)      uint8    0 pending, 1 written, 2 failed: the commit mark
      stat    (N, 2)    int64    (bytes, mtime_ns) of the file a written row was read from when it was
                                 cached (its image, or its shard), -1 where not recorded; a row whose
                                 file differs now was replaced and is recomputed. Optional: stores made
                                 before it have none, and their rows are not checked
      shard-index.npz            webdataset sources: each shard's member offsets with its size and
                                 mtime (zsd.sources.ShardIndex), so a resume reads no tar header
                                 again; a cache, rebuilt for any shard that changed

Every array is chunked by the same `chunk_rows` rows, and rows are written one whole chunk
at a time (a partial-chunk write rewrites the chunk): emb, view and error first, status last.
Zarr's local store writes each chunk file atomically (temp file + rename), so a chunk counts
as done exactly when its status chunk exists, a SIGKILL loses at most the chunks in flight,
and processes that own disjoint chunks never touch each other's files. Chunks are not
compressed: embeddings compress ~1.1x for a 30-50 % speed cost.

Damage (a copy or sync cut short, a deleted file) is found, not read as zeros: zarr reads a
missing chunk file as its fill value, so every read first checks the files of the chunks it
touches (`chunk_problem`): a fixed-size chunk must have exactly its uncompressed size, and a
chunk that status says holds written rows must exist. A damaged chunk ends the command with one
error naming the store, the array and the rows; `zsd cache-teacher` recomputes such chunks.

Several writers (`--num-shards/--shard-index` processes, started and killed in any order) share
one store through `STORE/zsd.lock`, an exclusive fcntl.flock that the kernel drops when its
holder dies. Held for: the check of the stored sources against a run's and the append of new
sources (resize, keys/labels/locs, status of the appended and partial chunks PENDING, then attrs
last as the append's commit mark: rows beyond what the recorded sources account for are a killed
append and are replaced), and every chunk write (a chunk that an append made partial is read,
modified and rewritten by zarr, which must not interleave). Embedding a chunk happens outside
it. A writer that planned a chunk before another appended rows to it writes only its own rows;
the new ones stay pending, so every key ends up written exactly once, by some later pass.
The lock needs a file system with working flock (local disks; NFS v4 and Lustre with flock).
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import shutil
import uuid
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import zarr

from zsd import DEFAULT_CHUNK_ROWS, __version__
from zsd.errors import ZsdError, is_run_folder, write_atomic
from zsd.sources import PackedKeys

FORMAT_VERSION = 1
PENDING, WRITTEN, FAILED = 0, 1, 2
BLOCK_ROWS = 1 << 20  # rows of a per-row array read at once where a store is read whole (1-10 MB)
ARRAYS = ("emb", "key", "label", "loc", "view", "error", "status")
OPTIONAL = ("stat",)  # arrays of the stores made since they exist (zsd.sources.file_stat per row)
CHUNK_WRITES = ("emb", "view", "error", "stat", "status")  # rewritten by every chunk write; the rest at creation
# A stored embedding is unit-norm up to fp16 rounding (~5e-4 of the norm); a damaged one is far off.
NORM_TOLERANCE = 1e-2
LOCK = "zsd.lock"  # the writers' lock file inside the store (see "Several writers")
SHARD_INDEX = "shard-index.npz"  # webdataset member offsets of the store's shards (zsd.sources.ShardIndex)


def cache_dir() -> Path:
    return Path(os.environ.get("ZSD_CACHE", "cache"))


def cache_folder(*parts: str) -> Path:
    """The folder `parts` in the cache dir, made; one line if the cache dir cannot hold it (a file, read-only)."""
    folder = cache_dir().joinpath(*parts)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ZsdError(f"the cache dir {cache_dir()} cannot hold {folder} ({e.strerror}): set ZSD_CACHE to a "
                       "writable folder") from None
    return folder


def resolve_store(name: str | os.PathLike) -> Path:
    """`real_pets` -> cache/real_pets.zarr; anything with a path separator or suffix is a path, and so is a
    Path (one resolved before: Path("./mystore") is Path("mystore"), which must not become a bare name)."""
    if isinstance(name, os.PathLike):
        return Path(name)
    s = str(name)
    if os.sep in s or "/" in s or s.endswith(".zarr"):
        return Path(s)
    return cache_dir() / f"{s}.zarr"


_held: dict[str, int] = {}  # lock file -> depth, for the locks this process holds


@contextmanager
def folder_lock(folder: str | os.PathLike, *, wait: bool = True, holder: str | None = None):
    """An exclusive flock on FOLDER/zsd.lock, re-entrant within a process. The kernel releases it
    when the holding process dies, so a killed holder never blocks the others.

    Stores wait for it (`wait`: writers take turns); a run folder does not: a second `zsd train`
    is refused in one line naming the holder, the `holder` text the first one wrote into the file.
    """
    lock = os.path.abspath(Path(folder) / LOCK)
    if lock in _held:
        _held[lock] += 1
        try:
            yield
        finally:
            _held[lock] -= 1
        return
    with open(lock, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            f.seek(0)
            who = f.read().strip() or "another process"
            raise ZsdError(f"{folder} is in use by {who}: wait until it ends, or choose another folder") from None
        if holder:  # a killed holder's text stays in the file; the next holder replaces it
            try:
                f.truncate(0)
                f.write(holder + "\n")
                f.flush()
            except OSError:  # a full disk: the lock holds without its note
                pass
        _held[lock] = 0
        try:
            yield
        finally:
            del _held[lock]
            fcntl.flock(f, fcntl.LOCK_UN)


def lock_holder(folder: str | os.PathLike) -> str | None:
    """Who holds FOLDER/zsd.lock now (the text its holder wrote, or "another process"); None when no one
    does. Only looks: a folder without a lock file, or a read-only one, is left as it is."""
    try:
        f = open(Path(folder) / LOCK)
    except OSError:
        return None
    with f:
        try:  # held for microseconds: a trainer starting just then is refused as if two had started
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # a new open file conflicts with the holder's also within one process
            return f.read().strip() or "another process"
        fcntl.flock(f, fcntl.LOCK_UN)
        return None


def store_lock(path: Path):
    """The writers' lock of the store at `path` (see "Several writers")."""
    return folder_lock(path)


class Store:
    """Read access plus chunk-aligned writes; open with `open_store` or `create_store`."""

    def __init__(self, path: Path, group: zarr.Group):
        self.path, self.group = Path(path), group
        self.attrs = dict(group.attrs["zsd"])
        self._layout = {}  # array -> (chunk key encoding, dimensions, bytes of a chunk file | None if variable)
        self.arrays = ARRAYS + tuple(name for name in OPTIONAL if _member(group, name))
        for name in self.arrays:
            arr = group[name]
            fixed = arr.dtype.kind in "biuf"
            self._layout[name] = (arr.metadata.chunk_key_encoding, arr.ndim,
                                  int(np.prod(arr.chunks)) * arr.dtype.itemsize if fixed else None)
        self._maps: OrderedDict[int, np.memmap] = OrderedDict()  # emb chunk -> its file, mapped (read_rows)

    # --- metadata
    @property
    def rows(self) -> int:
        return self.group["key"].shape[0]

    @property
    def views(self) -> int:
        return int(self.attrs["views"])

    @property
    def dim(self) -> int:
        return int(self.attrs["dim"])

    @property
    def chunk_rows(self) -> int:
        return int(self.attrs["chunk_rows"])

    @property
    def classnames(self) -> list[str]:
        return list(self.attrs["classnames"])

    @property
    def teacher(self) -> dict:
        return self.attrs["teacher"]

    @property
    def teacher_id(self) -> str:
        return self.attrs["teacher_id"]

    @property
    def sources(self) -> list[dict]:
        return self.attrs["sources"]

    @property
    def n_chunks(self) -> int:
        return -(-self.rows // self.chunk_rows)

    def chunk_slice(self, c: int) -> slice:
        return slice(c * self.chunk_rows, min((c + 1) * self.chunk_rows, self.rows))

    # --- checked reads
    def chunk_file(self, name: str, c: int) -> Path:
        encoding, ndim, _ = self._layout[name]
        return self.path / name / encoding.encode_chunk_key((c,) + (0,) * (ndim - 1))

    def chunk_problem(self, name: str, c: int, status: np.ndarray | None = None) -> str | None:
        """Why chunk `c` of array `name` cannot be trusted, or None.

        `status`: the status of (some of) the chunk's rows, for the arrays whose files exist only
        when rows are written or failed (zarr writes no file for a chunk that equals the fill value).
        """
        f = self.chunk_file(name, c)
        size = self._layout[name][2]
        try:
            actual = f.stat().st_size
        except FileNotFoundError:
            st = np.zeros(0) if status is None else status
            needed = {"emb": (st == WRITTEN).any(), "view": (st == WRITTEN).any(), "error": (st == FAILED).any(),
                      "key": True, "loc": True, "label": bool(self.attrs["classnames"])}.get(name, False)
            why = {"emb": "status says rows are written", "view": "status says rows are written",
                   "error": "status says rows failed",
                   "label": "the store has classes, and every chunk of labels is written"}.get(name, "every row has one")
            return f"chunk file {f.relative_to(self.path)} is missing ({why})" if needed else None
        if size is not None and actual != size:
            return f"chunk file {f.relative_to(self.path)} is {actual} bytes, not {size} (truncated or damaged)"
        if size is None:  # vlen-utf8 opens with its item count; a garbled one makes zarr allocate for minutes
            with open(f, "rb") as fh:
                count = int.from_bytes(fh.read(4), "little")
            if count != self.chunk_rows:
                return f"chunk file {f.relative_to(self.path)} says it holds {count} strings, not {self.chunk_rows}"
        return None

    def damage(self, chunks=None, arrays=None, values: bool = False) -> list[tuple[str, int, str]]:
        """(array, chunk, problem) of every damaged chunk (of `chunks`, default all) of `arrays` (default all
        the store has; ones it lacks are left out): stat calls and
        the status (its values too), and with `values` a read of the labels, locations and view
        boxes of every chunk (`value_problem`). The status is read BLOCK_ROWS rows at a time: a read
        per chunk costs minutes at DataComp scale, and all rows at once a GB."""
        chunks = range(self.n_chunks) if chunks is None else chunks
        arrays = self.arrays if arrays is None else [a for a in arrays if a in self.arrays]
        cr = self.chunk_rows
        step = max(1, BLOCK_ROWS // cr)  # chunks per status block
        block, status = None, None
        found = []
        for c in chunks:
            if c // step != block:
                block = c // step
                try:
                    status = self._read_files("status", slice(block * step * cr, (block + 1) * step * cr))
                except ZsdError:
                    status = None
            first = c * cr - block * step * cr  # the chunk's first row in the block
            status_problem = self.chunk_problem("status", c)
            st = None if status_problem else status[first:first + cr] if status is not None \
                else self._read_files("status", slice(c * cr, (c + 1) * cr))  # not chunk_slice: `rows` reads metadata
            status_problem = status_problem or self.value_problem("status", st)
            if status_problem:
                st = None
                if "status" in arrays:
                    found.append(("status", c, status_problem))
            for name in arrays:
                if name == "status":
                    continue
                p = self.chunk_problem(name, c, st)
                if not p and values and name in ("label", "loc", "view", "stat"):
                    try:
                        p = self.value_problem(name, self.group[name][self.chunk_slice(c)], st)
                    except Exception as e:
                        p = f"cannot decode ({type(e).__name__}: {e})"
                if p:
                    found.append((name, c, p))
        return found

    def damaged_chunks(self, values: bool = True) -> list[dict]:
        """`damage()` as {"array", "rows": [first, last], "problem"} per damaged chunk file (reports)."""
        return [{"array": a, "rows": [self.chunk_slice(c).start, self.chunk_slice(c).stop - 1], "problem": p}
                for a, c, p in self.damage(values=values)]

    def value_problem(self, name: str, data: np.ndarray, status: np.ndarray | None = None) -> str | None:
        """Why the values `data` of one chunk of `name` cannot be a store's (garbled bytes of the right
        size), or None. `status`: the chunk's status, for the view boxes of written rows."""
        if name == "status":
            bad = data > FAILED
            what = "statuses other than 0 (pending), 1 (written) and 2 (failed)"
        elif name == "label":
            bad = (data < -1) | ((data >= len(self.classnames)) if self.classnames else False)
            what = f"labels outside -1..{len(self.classnames) - 1}"
        elif name == "loc":
            bad = (data[:, :2] < 0).any(axis=1) | (data[:, 2:] < -1).any(axis=1)
            what = "negative source indices, parts or offsets"
        elif name == "stat":
            bad = (data < -1).any(axis=1)
            what = "file sizes or times below -1"
        elif name == "view" and status is not None:
            box = data[: len(status)][status == WRITTEN]
            bad = ((box[..., :2] < 0) | (box[..., 2:4] < 1)).any(axis=(1, 2)) | ~np.isin(box[..., 4], (0, 1)).all(axis=1)
            what = "written rows with a crop box that is no box (negative place, empty size or a flip not 0/1)"
        else:
            return None
        n = int(np.count_nonzero(bad))
        return f"{n} value(s) are impossible: {what} (garbled)" if n else None

    def damaged_error(self, name: str, c: int, problem: str) -> ZsdError:
        sl = self.chunk_slice(c)
        return ZsdError(f"{self.path} is damaged: {name} rows {sl.start}..{sl.stop - 1}: {problem}; "
                        "rerun `zsd cache-teacher` on it to recompute them (`zsd verify` lists all damage)")

    def _read(self, name: str, rows: slice = slice(None), *index) -> np.ndarray:
        """array[rows, *index] after checking the chunk files of those rows and the values read
        (`value_problem`); damage is one ZsdError."""
        data = self._read_files(name, rows, *index)
        start, stop, _ = rows.indices(self.rows)
        cr = self.chunk_rows
        if not index and name in ("status", "label", "loc", "view"):
            status = self._read_files("status", rows) if name == "view" else None
            for c in range(start // cr, -(-stop // cr)):
                a, b = max(c * cr, start) - start, min((c + 1) * cr, stop) - start
                problem = self.value_problem(name, data[a:b], None if status is None else status[a:b])
                if problem:
                    raise self.damaged_error(name, c, problem)
        return data

    def _read_files(self, name: str, rows: slice = slice(None), *index) -> np.ndarray:
        """array[rows, *index] after checking the chunk files of those rows (not the values: reports that
        list garbled values read them so)."""
        start, stop, _ = rows.indices(self.rows)
        status = self._read("status", slice(start, stop)) if name in ("emb", "view", "error") else None
        cr = self.chunk_rows
        for c in range(start // cr, -(-stop // cr)):
            mine = None if status is None else status[max(c * cr, start) - start:min((c + 1) * cr, stop) - start]
            problem = self.chunk_problem(name, c, mine)
            if problem:
                raise self.damaged_error(name, c, problem)
        try:
            return self.group[name][(slice(start, stop), *index)]
        except Exception:  # a chunk of the right size that does not decode: find and name it
            for c in range(start // self.chunk_rows, -(-stop // self.chunk_rows)):
                try:
                    self.group[name][self.chunk_slice(c)]
                except Exception as e:
                    raise self.damaged_error(name, c, f"cannot decode ({type(e).__name__}: {e})") from None
            raise

    # --- per-row arrays (small: loaded whole)
    def _scattered(self, name: str, rows: np.ndarray) -> list:
        """array[rows] for a few scattered rows: checked reads of only the chunks that hold them."""
        out = []
        for c in np.unique(rows // self.chunk_rows):
            block = self._read(name, self.chunk_slice(int(c)))
            out.extend(block[rows[rows // self.chunk_rows == c] - c * self.chunk_rows])
        return out

    def keys(self, rows: slice = slice(None)) -> np.ndarray:
        return np.asarray(self._read("key", rows), dtype=object)

    def packed_keys(self, rows: slice = slice(None)) -> PackedKeys:
        # at DataComp scale the whole key array as Python strings is GBs: a block of them at a time
        return PackedKeys.from_blocks(keys for _, keys in self.blocks("key", rows, PackedKeys.BLOCK))

    def labels(self, rows: slice = slice(None)) -> np.ndarray:
        return self._read("label", rows)

    def locs(self, rows: slice = slice(None)) -> np.ndarray:
        return self._read("loc", rows)

    def view_params(self, rows: slice = slice(None)) -> np.ndarray:
        return self._read("view", rows)

    def stats(self, rows: slice = slice(None)) -> np.ndarray | None:
        """(n, 2) `file_stat` of the rows' files when they were cached (-1: not recorded); None for a store
        made before the array existed."""
        return self._read("stat", rows) if "stat" in self.arrays else None

    def errors(self) -> np.ndarray:
        return np.asarray(self._read("error"), dtype=object)

    def status(self, rows: slice = slice(None), checked: bool = True) -> np.ndarray:
        return self._read("status", rows) if checked else self._read_files("status", rows)

    def blocks(self, name: str, rows: slice = slice(None), block_rows: int | None = None, checked: bool = True):
        """(first row, array[a:b]) over `rows` (default all), whole chunks of about `block_rows`
        (default BLOCK_ROWS) at a time: per-row arrays of a DataComp-scale store are read without
        holding them whole. `checked=False`: garbled values are returned, for reports that list them."""
        start, stop, _ = rows.indices(self.rows)
        step = max(1, (block_rows or BLOCK_ROWS) // self.chunk_rows) * self.chunk_rows
        for a in range(start, stop, step):
            yield a, (self._read if checked else self._read_files)(name, slice(a, min(a + step, stop)))

    def status_per_chunk(self, status: np.ndarray | None = None) -> np.ndarray:
        """(n_chunks, 3) int64: each chunk's count of pending, written and failed rows, from the status
        read block by block (or from `status`, every row's, when the caller holds it already)."""
        counts = np.zeros((self.n_chunks, 3), np.int64)
        cr = self.chunk_rows
        for a, st in self.blocks("status") if status is None else [(0, status)]:  # blocks of whole chunks
            starts = np.arange(0, len(st), cr)
            for j, value in enumerate((PENDING, WRITTEN, FAILED)):
                counts[a // cr:a // cr + len(starts), j] = np.add.reduceat(st == value, starts, dtype=np.int64)
        return counts

    def written(self) -> np.ndarray:
        """Boolean mask of rows whose embeddings are written (not pending, not failed)."""
        return self.status() == WRITTEN

    def complete(self) -> bool:
        return not self.status_per_chunk()[:, 0].any()

    def pending_chunks(self) -> list[int]:
        return np.flatnonzero(self.status_per_chunk()[:, 0]).tolist()

    # --- embeddings
    def embeddings(self, view: int | None = None, rows: slice = slice(None)) -> np.ndarray:
        """Embeddings of `rows` (default all) in RAM, fp16: (n, V, D), or (n, D) for one view."""
        return self._read("emb", rows) if view is None else self._read("emb", rows, view, slice(None))

    def read_rows(self, rows: np.ndarray, views: np.ndarray) -> np.ndarray:
        """Embeddings (n, D) fp16 of written (row, view) pairs, read from the memory-mapped chunk files
        (raw little-endian fp16: chunks are not compressed). Only these rows' pages are touched, and
        they live in the page cache, shared: every DDP rank and process of a node reads its own rows
        from one copy, where a load per process held the whole array once per rank."""
        out = np.empty((len(rows), self.dim), np.float16)
        chunk = rows // self.chunk_rows
        for c in np.unique(chunk):
            mine = chunk == c
            out[mine] = self._mapped(int(c))[rows[mine] - c * self.chunk_rows, views[mine]]
        return out

    def _mapped(self, c: int) -> np.memmap:
        m = self._maps.pop(c, None)
        if m is None:
            problem = self.chunk_problem("emb", c, np.array([WRITTEN]))  # the caller asks for written rows only
            if problem:
                raise self.damaged_error("emb", c, problem)
            while len(self._maps) >= 256:  # each mapping is one of the process's (~65,000) memory maps
                self._maps.popitem(last=False)
            m = np.memmap(self.chunk_file("emb", c), dtype="<f2", mode="r",
                          shape=(self.chunk_rows, self.views, self.dim))
        self._maps[c] = m  # most recently used last
        return m

    def iter_blocks(self, view: int | None = 0, block_rows: int | None = None):
        """Stream (start, fp16 block of shape (n, D), or (n, V, D) for view None) in chunk-aligned
        blocks; memory stays bounded."""
        step = max(self.chunk_rows, (block_rows or self.chunk_rows) // self.chunk_rows * self.chunk_rows)
        for start in range(0, self.rows, step):
            yield start, self.embeddings(view, slice(start, start + step))

    def embedding_health(self, chunks=None) -> dict:
        """One streaming pass over the written rows' embeddings (all views), of `chunks` (default all).

        Returns the rows whose embeddings are not finite (NaN or inf: the trainer drops them), the
        finite rows with a view whose norm is off 1 by more than NORM_TOLERANCE, view 0's norms, and
        the failed rows without a reason: what `zsd verify` rejects beyond the chunk files, and
        `zsd cache-teacher` recomputes.
        """
        status = self.status()
        written = status == WRITTEN
        nonfinite, off_norm, norms, unexplained = [], [], [], []
        blocks = self.iter_blocks(view=None) if chunks is None else \
            ((self.chunk_slice(c).start, self.embeddings(rows=self.chunk_slice(c))) for c in chunks)
        for start, block in blocks:
            rows = start + np.flatnonzero(written[start:start + len(block)])
            emb = block[rows - start].astype(np.float32)
            finite = np.isfinite(emb).all(axis=(1, 2))
            n = np.linalg.norm(emb[finite], axis=-1)
            nonfinite.append(rows[~finite])
            off_norm.append(rows[finite][(np.abs(n - 1) > NORM_TOLERANCE).any(axis=1)])
            norms.append(n[:, 0])
        for c in range(self.n_chunks) if chunks is None else chunks:
            sl = self.chunk_slice(c)
            if (status[sl] == FAILED).any():
                errors = np.asarray(self._read("error", sl), dtype=object)
                unexplained.append(sl.start + np.flatnonzero((status[sl] == FAILED) & (errors == "")))
        join = lambda parts: np.concatenate(parts) if parts else np.zeros(0, np.int64)  # noqa: E731
        norms = join(norms)
        return {"nonfinite": join(nonfinite), "off_norm": join(off_norm), "unexplained": join(unexplained),
                "norm_view0": ({"mean": float(norms.mean()), "min": float(norms.min()), "max": float(norms.max())}
                               if len(norms) else None)}

    def bytes_on_disk(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())

    # --- writes (any number of processes; see "Several writers" above)
    def locked(self):
        """The store's lock (see "Several writers"), as a context manager."""
        return store_lock(self.path)

    def write_chunk(self, c: int, emb: np.ndarray, view: np.ndarray, error: list[str], status: np.ndarray,
                    stat: np.ndarray | None = None):
        """Write the rows of chunk `c` that this writer planned: all of them, unless another process
        appended rows to the chunk since (those stay pending); the status chunk last, as the commit mark.
        `stat`: (n, 2) `file_stat` of each row's file as it was read (-1: none), where the store has the array.
        Under the lock: a chunk that is not whole on disk is read, modified and rewritten by zarr."""
        n = len(status)
        start = c * self.chunk_rows
        assert emb.shape == (n, self.views, self.dim) and len(error) == n == len(view)
        with self.locked():
            assert start + n <= self.rows
            sl = slice(start, start + n)
            try:
                self.group["emb"][sl] = emb.astype(np.float16, copy=False)
                self.group["view"][sl] = view
                self.group["error"][sl] = np.asarray(error, dtype=str)
                if "stat" in self.arrays:  # without one given, rows of unknown files (never checked)
                    self.group["stat"][sl] = np.full((n, 2), -1, np.int64) if stat is None else stat
                self.group["status"][sl] = np.asarray(status, dtype=np.uint8)
            except OSError as e:  # Zarr removes its temporary file; without the status chunk the rows stay pending
                raise ZsdError(f"cannot write rows {sl.start}..{sl.stop - 1} of {self.path} ({e.strerror}): they "
                               "stay pending and the rows written before are kept; make room and rerun the same "
                               "command to continue") from None

    def write_index(self, rows: slice, keys, labels, locs):
        """Rewrite key, label and loc of `rows` (written at creation; this repairs a damaged chunk of them)."""
        with self.locked():
            write_index_rows(self.group, rows.start, keys, labels, locs)

    def append_rows(self, start: int, keys, labels, locs, descs: list[dict], classnames: list[str]):
        """Set the rows from `start` on (the first row of the new sources) and record the sources.

        Rows after `start` can only be those of an append that was killed before its attrs were
        written: they are replaced. The last old chunk, if partial, becomes pending again so that it
        is rewritten whole; the teacher recomputes its old rows to the same values.
        """
        try:
            with self.locked():
                new = start + len(keys)
                for name in self.arrays:
                    arr = self.group[name]
                    arr.resize((new, *arr.shape[1:]))
                write_index_rows(self.group, start, keys, labels, locs)
                first = start - start % self.chunk_rows
                write_rows(self.group["status"], first, np.full(new - first, PENDING, np.uint8))
                attrs = {**self.group.attrs["zsd"], "sources": descs, "classnames": classnames}
                self.group.attrs["zsd"] = attrs  # the commit mark of the append
                self.group["emb"].attrs["zsd"] = attrs  # the copy `restore_metadata` reads
        except OSError as e:
            raise ZsdError(f"cannot add the new sources' rows to {self.path} ({e.strerror}); "
                           "make room and rerun the same command") from None
        self.attrs = attrs

    def uncommit(self, chunks) -> None:
        """Make chunks pending again by deleting their commit marks, so that they are recomputed."""
        for c in chunks:
            self.chunk_file("status", c).unlink(missing_ok=True)

    def info(self, full: bool = False) -> dict:
        """Counts and attributes from the per-row status, labels and the failed rows' keys; the
        embeddings (view-0 norm statistics) are read only with `full` (a DataComp store: ~130 GB)."""
        damaged = self.damaged_chunks()  # every array: stat calls, the status and the other per-row values
        counts, shown = np.zeros(3, np.int64), []  # pending, written, failed; the first 100 failed rows
        for a, st in self.blocks("status", checked=not damaged):  # garbled values are not counted
            counts += np.bincount(st, minlength=3)[:3]
            shown.extend((a + np.flatnonzero(st == FAILED)[:100 - len(shown)]).tolist())
        pending, written, failed = counts.tolist()
        shown = np.array(shown, np.int64)
        health = self.embedding_health() if full and not damaged else None
        # failed rows of chunks whose status, error or key is damaged are listed once it is repaired
        hurt = [d["rows"][0] // self.chunk_rows for d in damaged if d["array"] in ("status", "error", "key")]
        shown = shown[~np.isin(shown // self.chunk_rows, hurt)]
        keys, errors = self._scattered("key", shown), self._scattered("error", shown)
        return {
            "path": str(self.path),
            "format_version": self.attrs["format_version"],
            "rows": self.rows,
            "written": written,
            "failed": failed,
            "pending": pending,
            "complete": pending == 0 and not damaged,
            "damaged_chunks": damaged,
            "views": self.views,
            "dim": self.dim,
            "teacher": self.teacher,
            "teacher_id": self.teacher_id,
            "classnames": self.classnames,
            "labelled": sum(int((lab >= 0).sum()) for _, lab in self.blocks("label", checked=not damaged)),
            "sources": self.sources,
            "bytes": self.bytes_on_disk(),
            "norm_view0": health["norm_view0"] if health else None,
            # rows with NaN/inf embeddings (the trainer drops them); None: not read (without `full`)
            "nonfinite": [str(k) for k in self._scattered("key", health["nonfinite"])] if health else None,
            "failures": [{"key": str(k), "reason": str(e)} for k, e in zip(keys, errors)],
            "zsd_version": self.attrs.get("zsd_version"),
        }


def write_rows(arr: zarr.Array, start: int, values: np.ndarray) -> None:
    """arr[start:start + len(values)] = values, one chunk at a time: a failed write (a full disk) then
    leaves no other write of zarr's running on, into a folder being removed, and no asyncio pages
    ("Task exception was never retrieved") printed at exit."""
    cr = arr.chunks[0]
    a = 0
    while a < len(values):
        b = min(len(values), (start + a) // cr * cr + cr - start)  # to the end of this chunk
        arr[start + a:start + b] = values[a:b]
        a = b


def write_index_rows(group: zarr.Group, start: int, keys, labels, locs) -> None:
    """key, label and loc of the rows from `start` on. Every chunk of labels becomes a file, an
    unlabelled one (all -1, the fill value) too: a missing one is then damage (`chunk_problem`),
    never read as "unlabelled"."""
    write_rows(group["key"], start, np.asarray(keys, dtype=str))
    with zarr.config.set({"array.write_empty_chunks": True}):
        write_rows(group["label"], start, np.asarray(labels, dtype=np.int32))
    write_rows(group["loc"], start, np.asarray(locs, dtype=np.int64).reshape(-1, 4))


def damage_text(damaged: list[dict]) -> str:
    """One sentence on `Store.damaged_chunks()`: how many, the first, and the repair."""
    a, rows, p = damaged[0].values()
    return (f"{len(damaged)} damaged chunk file(s) (first: {a} rows {rows[0]}..{rows[1]}: {p}); "
            "rerun `zsd cache-teacher` on the store to recompute them")


def open_store(name: str | os.PathLike, mode: str = "r") -> Store:
    path = resolve_store(name)
    if not path.exists():
        here = Path(name)  # a bare name that is also a folder here: say which was looked at
        raise ZsdError(f"no store at {path}" + ("" if here == path or not here.exists() else
                                                f" (a bare name is a store in the cache dir); ./{here} here is "
                                                + ("a `zsd train` run folder, not a store" if is_run_folder(here)
                                                   else f"a store: pass ./{here}" if (here / "zarr.json").exists()
                                                   else "no store (`zsd cache-teacher IMAGES --out STORE` makes one)")))
    if is_run_folder(path):
        raise ZsdError(f"{path} is a `zsd train` run folder, not a store of embeddings: pass a store "
                       "(`zsd cache-teacher` makes one), or the run as --student")
    try:
        group = zarr.open_group(str(path), mode=mode)
        attrs = group.attrs["zsd"]
    except Exception:
        if metadata_copy(path):
            raise ZsdError(f"{path} is not a zsd store as it stands: its zarr.json is damaged or overwritten, and "
                           "the copy in emb/zarr.json is whole: rerun `zsd cache-teacher` with the store's sources "
                           "and settings to restore it") from None
        raise ZsdError(f"{path} is not a zsd store") from None
    if attrs.get("format_version") != FORMAT_VERSION:
        raise ZsdError(f"{path} has store format {attrs.get('format_version')}; this zsd reads format {FORMAT_VERSION}")
    problem = _structure_problem(group, attrs)
    if problem:
        raise ZsdError(f"{path} is damaged: {problem}")
    return Store(path, group)


def metadata_copy(path: Path) -> dict | None:
    """The copy of a store's attributes that emb/zarr.json keeps (None where there is none): a
    zarr.json written over (a report, a copy cut short) is restored from it (`restore_metadata`)."""
    try:
        copy = json.loads((Path(path) / "emb" / "zarr.json").read_text())["attributes"]["zsd"]
        return copy if copy.get("format_version") == FORMAT_VERSION else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def restore_metadata(path: Path, log=print) -> None:
    """Rewrite the zarr.json of the store at `path` from its copy when it is no zsd store's (the
    arrays are intact; the caller then checks the copy against its own teacher and sources)."""
    try:
        zarr.open_group(str(path), mode="r").attrs["zsd"]
        return
    except Exception:
        copy = metadata_copy(path)
    if copy is None:
        return
    log(f"warning: {path}/zarr.json is damaged or overwritten: restoring it from the copy in emb/zarr.json")
    write_atomic(Path(path) / "zarr.json", json.dumps({"attributes": {"zsd": copy}, "zarr_format": 3,
                                                       "node_type": "group"}, indent=2), flag="--out")


def _member(group: zarr.Group, name: str) -> bool:
    """Whether the group holds `name` (an optional array): its metadata file is there."""
    return (Path(group.store.root) / name / "zarr.json").exists()


def _structure_problem(group: zarr.Group, attrs: dict) -> str | None:
    """What is wrong with the arrays' metadata (missing, unreadable, shapes or chunks that disagree), or None."""
    try:
        views, dim, chunk_rows = int(attrs["views"]), int(attrs["dim"]), int(attrs["chunk_rows"])
    except (KeyError, TypeError, ValueError):
        return "its attributes lack views, dim or chunk_rows"
    want = {"emb": ((views, dim), "f"), "key": ((), "TUO"), "label": ((), "i"), "loc": ((4,), "i"),
            "view": ((views, 5), "i"), "error": ((), "TUO"), "status": ((), "u")}
    if _member(group, "stat"):
        want["stat"] = ((2,), "i")
    rows = None
    for name, (tail, kind) in want.items():
        try:
            arr = group[name]
            shape, chunks, dtype = arr.shape, arr.chunks, arr.dtype
        except Exception as e:
            return f"array {name} is missing or its metadata {name}/zarr.json is unreadable ({type(e).__name__})"
        rows = shape[0] if rows is None else rows
        if (not isinstance(arr, zarr.Array) or tuple(shape) != (rows, *tail) or chunks[0] != chunk_rows
                or tuple(chunks[1:]) != tail or dtype.kind not in kind):
            return (f"array {name} has shape {tuple(shape)}, chunks {tuple(chunks)}, dtype {dtype}; expected "
                    f"{(rows, *tail)} in chunks of {chunk_rows} rows")
    return None


def create_store(name: str | os.PathLike, *, keys, labels, locs, views: int, dim: int, teacher: dict,
                 teacher_id: str, classnames: list[str], sources: list[dict], view_seed: int = 0,
                 crop_scale=(0.9, 1.0), chunk_rows: int = DEFAULT_CHUNK_ROWS, extra: dict | None = None) -> Store:
    """Create a store atomically: it is built in a temporary folder and renamed into place.

    If another process created the same store first, that one is opened instead, and the
    caller checks that it is compatible.
    """
    path = resolve_store(name)
    if path.exists():
        return open_store(path, mode="r+")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    if len(os.fsencode(tmp.name)) > 255:  # a legal name plus the suffix may pass the file system's limit
        tmp = path.with_name(f".zsd-store-{uuid.uuid4().hex[:8]}.tmp")
    n = len(keys)
    c = max(1, int(chunk_rows))
    try:
        g = zarr.open_group(str(tmp), mode="w")
        g.create_array("emb", shape=(n, views, dim), chunks=(c, views, dim), dtype="float16",
                       fill_value=0, compressors=None)
        g.create_array("key", shape=(n,), chunks=(c,), dtype=str, compressors=None)
        g.create_array("label", shape=(n,), chunks=(c,), dtype="int32", fill_value=-1, compressors=None)
        g.create_array("loc", shape=(n, 4), chunks=(c, 4), dtype="int64", fill_value=-1, compressors=None)
        g.create_array("view", shape=(n, views, 5), chunks=(c, views, 5), dtype="int32", fill_value=0,
                       compressors=None)
        g.create_array("error", shape=(n,), chunks=(c,), dtype=str, compressors=None)
        g.create_array("status", shape=(n,), chunks=(c,), dtype="uint8", fill_value=PENDING, compressors=None)
        g.create_array("stat", shape=(n, 2), chunks=(c, 2), dtype="int64", fill_value=-1, compressors=None)
        if n:
            write_index_rows(g, 0, keys, labels, locs)
        g.attrs["zsd"] = {
            "format_version": FORMAT_VERSION,
            "zsd_version": __version__,
            "teacher": teacher,
            "teacher_id": teacher_id,
            "dim": int(dim),
            "views": int(views),
            "view_seed": int(view_seed),
            "crop_scale": list(crop_scale),
            "chunk_rows": c,
            "classnames": list(classnames),
            "sources": sources,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **(extra or {}),
        }
        g["emb"].attrs["zsd"] = g.attrs["zsd"]  # the copy `restore_metadata` reads
        try:
            os.rename(tmp, path)
        except OSError:  # lost a creation race: the other process's store stands
            if not path.exists():
                raise
    except OSError as e:
        raise ZsdError(f"cannot create {path} ({e.strerror}); nothing was written") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return open_store(path, mode="r+")
