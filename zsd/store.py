"""The embedding store: a Zarr v3 group of teacher (or student) image embeddings, format 1.

    STORE.zarr/
      zarr.json   group attrs under "zsd": format_version, zsd_version, teacher (fingerprint),
                  teacher_id, dim, views, view_seed, crop_scale, chunk_rows, classnames,
                  sources (descriptions that find each row's image again), created
      emb     (N, V, D) float16  L2-normalised embeddings of V views per image (0 where not written)
      key     (N,)      str      source key: path relative to the source root, or DataComp uid
      label   (N,)      int32    class index into classnames, -1 when unlabelled
      loc     (N, 4)    int64    (source, part, offset, size): where the row's bytes live
      view    (N, V, 5) int32    (top, left, height, width, flip) per view; view 0 is the
                                 evaluation transform (its box is recorded for reference)
      error   (N,)      str      why a row failed ("" otherwise)
      status  (N,)      uint8    0 pending, 1 written, 2 failed: the commit mark

Every array is chunked by the same `chunk_rows` rows, and rows are written one whole chunk
at a time (a partial-chunk write rewrites the chunk): emb, view and error first, status last.
Zarr's local store writes each chunk file atomically (temp file + rename), so a chunk counts
as done exactly when its status chunk exists, a SIGKILL loses at most the chunks in flight,
and processes that own disjoint chunks never touch each other's files. Chunks are not
compressed: embeddings compress ~1.1x for a 30-50 % speed cost.
"""

from __future__ import annotations

import datetime
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import zarr

from zsd import __version__
from zsd.defaults import DEFAULT_CHUNK_ROWS
from zsd.errors import ZsdError

FORMAT_VERSION = 1
PENDING, WRITTEN, FAILED = 0, 1, 2


def cache_dir() -> Path:
    return Path(os.environ.get("ZSD_CACHE", "cache"))


def resolve_store(name: str | os.PathLike) -> Path:
    """`real_pets` -> cache/real_pets.zarr; anything with a path separator or suffix is a path."""
    s = str(name)
    if os.sep in s or "/" in s or s.endswith(".zarr"):
        return Path(s)
    return cache_dir() / f"{s}.zarr"


class Store:
    """Read access plus chunk-aligned writes; open with `open_store` or `create_store`."""

    def __init__(self, path: Path, group: zarr.Group):
        self.path, self.group = Path(path), group
        self.attrs = dict(group.attrs["zsd"])

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

    # --- per-row arrays (small: loaded whole)
    def keys(self) -> np.ndarray:
        return np.asarray(self.group["key"][:], dtype=object)

    def labels(self) -> np.ndarray:
        return self.group["label"][:]

    def locs(self) -> np.ndarray:
        return self.group["loc"][:]

    def view_params(self) -> np.ndarray:
        return self.group["view"][:]

    def errors(self) -> np.ndarray:
        return np.asarray(self.group["error"][:], dtype=object)

    def status(self) -> np.ndarray:
        return self.group["status"][:]

    def written(self) -> np.ndarray:
        """Boolean mask of rows whose embeddings are written (not pending, not failed)."""
        return self.status() == WRITTEN

    def complete(self) -> bool:
        return bool((self.status() != PENDING).all())

    def pending_chunks(self) -> list[int]:
        st = self.status()
        return [c for c in range(self.n_chunks) if (st[self.chunk_slice(c)] == PENDING).any()]

    # --- embeddings
    def embeddings(self, view: int | None = None) -> np.ndarray:
        """All embeddings in RAM, fp16: (N, V, D), or (N, D) for one view."""
        emb = self.group["emb"]
        return emb[:] if view is None else emb[:, view, :]

    def iter_blocks(self, view: int = 0, block_rows: int | None = None):
        """Stream (start, fp16 block of shape (n, D)) in chunk-aligned blocks; memory stays bounded."""
        emb = self.group["emb"]
        step = max(self.chunk_rows, (block_rows or self.chunk_rows) // self.chunk_rows * self.chunk_rows)
        for start in range(0, self.rows, step):
            yield start, emb[start:start + step, view, :]

    def bytes_on_disk(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())

    # --- writes
    def write_chunk(self, c: int, emb: np.ndarray, view: np.ndarray, error: list[str], status: np.ndarray):
        """Write one whole row chunk; the status chunk last, as the commit mark."""
        sl = self.chunk_slice(c)
        n = sl.stop - sl.start
        assert emb.shape == (n, self.views, self.dim) and len(error) == n == len(status)
        self.group["emb"][sl] = emb.astype(np.float16, copy=False)
        self.group["view"][sl] = view
        self.group["error"][sl] = np.asarray(error, dtype=str)
        self.group["status"][sl] = np.asarray(status, dtype=np.uint8)

    def append_rows(self, keys, labels, locs, descs: list[dict], classnames: list[str]):
        """Add rows (and their sources) after the existing ones.

        The last chunk, if partial, becomes pending again so that it is rewritten whole; the
        teacher recomputes its old rows to the same values (same views, same batches).
        """
        old = self.rows
        new = old + len(keys)
        for name in ("emb", "key", "label", "loc", "view", "error", "status"):
            arr = self.group[name]
            arr.resize((new, *arr.shape[1:]))
        self.group["key"][old:] = np.asarray(keys, dtype=str)
        self.group["label"][old:] = np.asarray(labels, dtype=np.int32)
        self.group["loc"][old:] = np.asarray(locs, dtype=np.int64).reshape(-1, 4)
        if old % self.chunk_rows:
            self.group["status"][old - old % self.chunk_rows:old] = PENDING
        self.attrs.update(sources=descs, classnames=classnames)
        self.group.attrs["zsd"] = self.attrs

    def info(self) -> dict:
        st = self.status()
        written = st == WRITTEN
        norms = []
        for start, block in self.iter_blocks(0):
            ok = written[start:start + len(block)]
            norms.append(np.linalg.norm(block[ok].astype(np.float32), axis=-1))
        norms = np.concatenate(norms) if norms else np.zeros(0)
        errors = self.errors()
        failed = np.flatnonzero(st == FAILED)
        keys = self.keys()
        return {
            "path": str(self.path),
            "format_version": self.attrs["format_version"],
            "rows": self.rows,
            "written": int(written.sum()),
            "failed": int(len(failed)),
            "pending": int((st == PENDING).sum()),
            "complete": bool((st != PENDING).all()),
            "views": self.views,
            "dim": self.dim,
            "teacher": self.teacher,
            "teacher_id": self.teacher_id,
            "classnames": self.classnames,
            "labelled": int((self.labels() >= 0).sum()),
            "sources": self.sources,
            "bytes": self.bytes_on_disk(),
            "norm_view0": ({"mean": float(norms.mean()), "min": float(norms.min()), "max": float(norms.max())}
                           if len(norms) else None),
            "failures": [{"key": str(keys[i]), "reason": str(errors[i])} for i in failed[:100]],
            "zsd_version": self.attrs.get("zsd_version"),
        }


def open_store(name: str | os.PathLike, mode: str = "r") -> Store:
    path = resolve_store(name)
    if not path.exists():
        raise ZsdError(f"no store at {path}")
    try:
        group = zarr.open_group(str(path), mode=mode)
        attrs = group.attrs["zsd"]
    except Exception:
        raise ZsdError(f"{path} is not a zsd store") from None
    if attrs.get("format_version") != FORMAT_VERSION:
        raise ZsdError(f"{path} has store format {attrs.get('format_version')}; this zsd reads format {FORMAT_VERSION}")
    return Store(path, group)


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
        if n:
            g["key"][:] = np.asarray(keys, dtype=str)
            g["label"][:] = np.asarray(labels, dtype=np.int32)
            g["loc"][:] = np.asarray(locs, dtype=np.int64).reshape(-1, 4)
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
        try:
            os.rename(tmp, path)
        except OSError:  # lost a creation race: the other process's store stands
            if not path.exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return open_store(path, mode="r+")
