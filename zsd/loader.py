"""Training data: teacher views rebuilt from a store's recorded sources, with their cached targets.

A sample is (store, row, view). Its pixels are rebuilt exactly as the teacher saw them
(`render_view` with the stored crop box + flip), then resized to the student's resolution and
normalised with the student's mean/std; its target is the cached embedding of that view.

Data order is a pure function of (seed, epoch), so a resumed run finds the batch of any step
again without replaying the ones before it:
- stores whose embeddings fit in RAM (the page cache) have their rows permuted freely;
- larger stores are streamed: their row chunks are visited in a random order and the rows of a
  window of `shuffle_chunks` consecutive chunks are shuffled together (a shuffle buffer), so
  every chunk is read from disk once per epoch (webdataset rows follow the shard order, so
  their images are read shard by shard too);
- with mixing weights, each block (a row in RAM, a chunk when streaming) is taken from a store
  drawn with probability proportional to its weight per row, cycling through that store's own
  permutation; an epoch has as many rows as all stores together.
The view of every sample is drawn uniformly from the stored views, also from (seed, epoch).

Nothing per row is held as Python objects or copied per process: targets are read row by row
from the memory-mapped store (each DDP rank its own rows), and the DataLoader workers find a row's
image through numpy arrays (`RowIndex`), whole for a store in RAM, a few chunks at a time when
streaming, so memory does not grow with the rows of a streamed store.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from zsd.cpu import shared_memory_batch
from zsd.errors import ZsdError, atomic_file, reserve
from zsd.sources import BadImage, ImageChanged, RowReader, load_rgb, merge_classnames, missing_images
from zsd.store import WRITTEN, Store, cache_dir, open_store
from zsd.teachers import same_teacher
from zsd.views import Preprocess, render_view, render_view_fast, resize_pixels


def parse_target(spec: str) -> tuple[str, float | None]:
    """`a.zarr=0.7` -> ("a.zarr", 0.7); `pets` -> ("pets", None)."""
    name, sep, weight = spec.rpartition("=")
    if sep:
        try:
            w = float(weight)
        except ValueError:
            return spec, None
        if not 0 < w < float("inf"):
            raise ZsdError(f"mixing weight in --targets {spec} must be a positive number")
        return name, w
    return spec, None


def ram_budget() -> int:
    """Bytes of embeddings we are willing to hold in RAM: a third of physical memory."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 3
    except (ValueError, OSError, AttributeError):
        return 4 << 30


@dataclass
class Source:
    """One target store as the trainer uses it.

    Per-row arrays are held only for a store in RAM, whose rows are permuted freely and whose size
    the RAM budget bounds. A streamed store keeps a count per chunk and reads a chunk's status and
    labels when a window or batch needs them, so the trainer's memory does not grow with its rows
    (DataComp medium: 128 M).
    """

    store: Store
    weight: float | None
    in_ram: bool
    chunk_written: np.ndarray  # per chunk: the number of its rows written, counted at start-up
    remap: np.ndarray  # store class -> merged class; the trailing -1 maps unlabelled (-1) rows
    label_chunks_cached: int  # streamed: label chunks kept (a batch spans at most two shuffle windows)
    rows: np.ndarray | None = None  # in RAM: the written rows, ascending
    labels: np.ndarray | None = None  # in RAM: per store row, remapped
    _label_chunks: OrderedDict = field(default_factory=OrderedDict, init=False, repr=False)

    @property
    def block_rows(self) -> int:
        """Rows per block of the data order: 1 in RAM, a chunk when streaming."""
        return 1 if self.in_ram else self.store.chunk_rows

    @property
    def n_written(self) -> int:
        return int(self.chunk_written.sum())

    def chunk_written_rows(self, c: int) -> np.ndarray:
        """The written rows of chunk `c`, ascending; a full chunk needs no read. Read again every
        epoch, so a chunk that another process changed since start-up is an error, not other rows."""
        sl = self.store.chunk_slice(c)
        if self.chunk_written[c] == sl.stop - sl.start:
            return np.arange(sl.start, sl.stop, dtype=np.int64)
        rows = sl.start + np.flatnonzero(self.store.status(sl) == WRITTEN)
        if len(rows) != self.chunk_written[c]:
            raise ZsdError(f"{self.store.path} changed while training (rows {sl.start}..{sl.stop - 1} now have "
                           f"{len(rows)} written, not {self.chunk_written[c]}): start the run again on the "
                           "finished store")
        return rows

    def written_rows(self) -> np.ndarray:
        """Every written row (a per-row array: for users bounded by RAM anyway, like the pixel cache)."""
        if self.rows is not None:
            return self.rows
        return np.concatenate([a + np.flatnonzero(st == WRITTEN) for a, st in self.store.blocks("status")])

    def labels_of(self, rows: np.ndarray) -> np.ndarray:
        """Remapped labels of store rows; a streamed store reads the label chunks of `rows`, keeping
        the last few (a batch draws its rows from one shuffle window of chunks)."""
        if self.labels is not None:
            return self.labels[rows]
        cr, out = self.store.chunk_rows, np.empty(len(rows), np.int32)
        chunk = rows // cr
        for c in np.unique(chunk).tolist():
            labels = self._label_chunks.pop(c, None)
            if labels is None:
                labels = self.remap[self.store.labels(self.store.chunk_slice(c))]
            self._label_chunks[c] = labels  # most recently used last
            mine = chunk == c
            out[mine] = labels[rows[mine] - c * cr]
        while len(self._label_chunks) > self.label_chunks_cached:
            self._label_chunks.popitem(last=False)
        return out

    def class_rows(self, n_classes: int) -> np.ndarray:
        """(n_classes + 1,) written rows per merged class, the unlabelled ones last (a streamed store's
        read block by block)."""
        blocks = [self.labels[self.rows]] if self.labels is not None else \
            (self.remap[lab][st == WRITTEN] for (_, st), (_, lab) in zip(self.store.blocks("status"),
                                                                          self.store.blocks("label")))
        return sum(np.bincount(np.where(labels < 0, n_classes, labels), minlength=n_classes + 1) for labels in blocks)

    def unlabelled_rows(self) -> int:
        """Written rows without a class."""
        return int(self.class_rows(int(self.remap.max()) + 1)[-1])


class TrainTargets:
    """The target stores of a run: checks, data order, and cached embeddings by (store, row, view)."""

    WEIGHTED_PIECE = 1 << 16  # store draws at a time in a weighted epoch (`_weighted_blocks`)

    def __init__(self, specs: list[str], *, in_ram: str = "auto", shuffle_chunks: int = 16, log=print):
        if not specs:
            raise ZsdError("pass at least one --targets STORE")
        parsed = [parse_target(s) for s in specs]
        weights = [w for _, w in parsed]
        if any(w is None for w in weights) and any(w is not None for w in weights):
            raise ZsdError("give a mixing weight to every --targets STORE=W or to none")
        stores = [open_store(name) for name, _ in parsed]
        seen = {}
        for (name, _), s in zip(parsed, stores):  # one store twice would silently double its share of an epoch
            if s.path.resolve() in seen:
                raise ZsdError(f"--targets {seen[s.path.resolve()]} and --targets {name} are the same store ({s.path}): "
                               "pass it once (to weight it, give every store a weight: --targets STORE=W)")
            seen[s.path.resolve()] = name
        kinds = {same_teacher(stores[0].teacher_id, stores[0].teacher, s.teacher_id, s.teacher) for s in stores}
        if "other" in kinds:
            raise ZsdError("the --targets stores come from different teachers ("
                           + ", ".join(f"{s.path.name}: {s.teacher['model']} id {s.teacher_id}" for s in stores)
                           + "); a student learns one teacher")
        if "precision" in kinds:  # one teacher, its embeddings rounded differently: still one target
            log("note: the --targets stores hold one teacher's embeddings at "
                + " and ".join(sorted({s.teacher.get("precision", "fp32") for s in stores})) + " precision")
        self.teacher, self.teacher_id = stores[0].teacher, stores[0].teacher_id
        self.dim = stores[0].dim
        self.shuffle_chunks = max(1, shuffle_chunks)

        # One class list for all stores: classes with the same name are the same class.
        self.classnames: list[str] = []
        remaps = [merge_classnames(self.classnames, s.classnames) for s in stores]

        budget = ram_budget()
        self.sources: list[Source] = []
        self.skipped_rows = 0
        for s, w, store_remap in zip(stores, weights, remaps):
            ram = {"auto": s.rows * s.views * s.dim * 2 <= budget, "yes": True, "no": False}[in_ram]
            status = s.status() if ram else None  # a streamed store's is counted block by block, never held
            counts = s.status_per_chunk(status)
            pending, written, failed = counts.sum(0).tolist()
            if written < s.rows:
                log(f"warning: {s.path}: skipping {s.rows - written} of {s.rows} rows not written "
                    f"({pending} pending, {failed} failed)")
                self.skipped_rows += s.rows - written
            if not written:
                raise ZsdError(f"{s.path} has no written rows: run `zsd cache-teacher` to fill it")
            gone = missing_images(s.sources)
            if gone:  # its samples are skipped as unreadable; a run that then sees no image fails at its end
                log(f"warning: {s.path} was cached from {gone}, which is no longer there (moved or deleted): the "
                    "trainer reads the images where they were cached from, so its samples are skipped: put them back")
            damaged = s.damage(arrays=("emb",))  # stat calls, no reads: a damaged chunk stops the run before step 1
            if damaged:
                raise s.damaged_error(*damaged[0])
            remap = np.array(store_remap + [-1], dtype=np.int32)
            src = Source(s, w, ram, counts[:, 1], remap, label_chunks_cached=2 * self.shuffle_chunks + 2)
            if ram:
                src.rows = np.flatnonzero(status == WRITTEN)
                src.labels = remap[s.labels()]  # label -1 picks the trailing -1
            self.sources.append(src)
        self.rows_per_epoch = sum(src.n_written for src in self.sources)
        self._named: set[tuple[int, int]] = set()  # (store, row) of the non-finite targets named so far

    # --- order
    def epoch_order(self, seed: int, epoch: int) -> np.ndarray:
        """(rows_per_epoch, 3) int64 array of (store, row, view): the samples of one epoch, in order."""
        return np.concatenate(list(self.epoch_samples(seed, epoch)))

    def epoch_samples(self, seed: int, epoch: int, start: int = 0):
        """The samples of `epoch_order(seed, epoch)` from sample `start` on, as (k, 3) arrays, one shuffle
        window at a time: a streamed DataComp-scale epoch is never laid out whole (its blocks are chunks).

        Random numbers come from one PCG64 stream in a fixed sequence: the block order, then one
        shuffle key per sample, then one view draw per sample. Each draw takes one 64-bit output,
        so the windows before `start` are skipped by advancing the stream, not by drawing them.
        """
        rng = np.random.Generator(np.random.PCG64([seed, epoch, 0x5eed]))
        # Per store: its blocks as (start, length) among its written rows, in a random order; a store
        # in RAM permutes its rows (`base`), a streamed one its chunks (their rows are found per window).
        base, edges, block_start, block_len = [], [], [], []
        for src in self.sources:
            if src.in_ram:
                base.append(rng.permutation(src.rows))
                edges.append(None)
                block_start.append(np.arange(len(src.rows)))
                block_len.append(np.ones(len(src.rows), np.int64))
            else:
                e = np.concatenate([[0], np.cumsum(src.chunk_written)])
                chunks = rng.permutation(np.flatnonzero(src.chunk_written))
                base.append(None)
                edges.append(e)
                block_start.append(e[chunks])
                block_len.append(src.chunk_written[chunks])
        n_blocks = np.array([len(b) for b in block_start])

        # The sequence of blocks of this epoch, as (store, block) pairs.
        if self.sources[0].weight is None:
            first_block = np.concatenate([[0], np.cumsum(n_blocks)])
            ids = rng.permutation(first_block[-1])
            store = np.searchsorted(first_block, ids, side="right") - 1
            block = ids - first_block[store]
        else:
            store, block = self._weighted_blocks(rng, n_blocks, block_len)
        starts, lengths = np.empty(len(store), np.int64), np.empty(len(store), np.int64)
        for i in range(len(self.sources)):
            mine = store == i
            starts[mine], lengths[mine] = block_start[i][block[mine]], block_len[i][block[mine]]
        keep = np.searchsorted(np.cumsum(lengths), self.rows_per_epoch) + 1
        store, starts, lengths = store[:keep], starts[:keep], lengths[:keep]

        # Samples, window by window of `shuffle_chunks` blocks, shuffled within their window.
        total = int(lengths.sum())
        keys = rng.bit_generator  # one shuffle key per sample of the `total`, then the view draws
        draws = np.random.PCG64()
        draws.state = keys.state
        draws.advance(total)
        keys, draws = np.random.Generator(keys), np.random.Generator(draws)
        views = np.array([src.store.views for src in self.sources])
        w = self.shuffle_chunks
        window_len = np.add.reduceat(lengths, np.arange(0, len(lengths), w))
        window_end = np.cumsum(window_len)
        first = int(np.searchsorted(window_end, start, side="right"))  # the window holding sample `start`
        done = int(window_end[first - 1]) if first else 0
        keys.bit_generator.advance(done)
        draws.bit_generator.advance(min(done, self.rows_per_epoch))
        k = first
        while k < len(window_len) and done < self.rows_per_epoch:
            # a group of whole windows of >= 8,192 samples: an in-RAM store's windows are 16 rows each
            k2 = min(len(window_len), int(np.searchsorted(window_end, window_end[k] + 8192)) + 1)
            b = slice(k * w, k2 * w)
            n = int(window_len[k:k2].sum())
            within = np.arange(n) - np.repeat(np.cumsum(lengths[b]) - lengths[b], lengths[b])
            sample_store = np.repeat(store[b], lengths[b])
            position = np.repeat(starts[b], lengths[b]) + within
            sample_row = np.empty(n, np.int64)
            for i in np.unique(sample_store):
                mine = sample_store == i
                if base[i] is not None:
                    sample_row[mine] = base[i][position[mine]]
                else:  # position among the written rows -> (chunk, offset) -> row
                    pos = position[mine]
                    chunk = np.searchsorted(edges[i], pos, side="right") - 1
                    rows = np.empty(len(chunk), np.int64)
                    for c in np.unique(chunk).tolist():
                        at = chunk == c
                        rows[at] = self.sources[i].chunk_written_rows(c)[pos[at] - edges[i][c]]
                    sample_row[mine] = rows
            window = np.repeat(np.arange(k2 - k), window_len[k:k2])
            shuffled = np.lexsort((keys.random(n), window))[:self.rows_per_epoch - done]
            sample_store, sample_row = sample_store[shuffled], sample_row[shuffled]
            sample_view = (draws.random(len(shuffled)) * views[sample_store]).astype(np.int64)
            out = np.stack([sample_store, sample_row, sample_view], 1).astype(np.int64)
            yield out[max(0, start - done):]
            done += len(shuffled)
            k = k2

    def _weighted_blocks(self, rng, n_blocks, block_len):
        """(store, block) of the blocks of a weighted epoch: stores drawn with probability proportional
        to weight per row, each cycling through its own block permutation.

        Draws as `rng.choice(len(sources), rows_per_epoch, p)` would (one uniform each, looked up in
        the weights' cdf; each block >= 1 row, so rows_per_epoch draws always fill the epoch), but
        piece by piece, stopping once the blocks drawn fill the epoch and skipping the rest of the
        draws by advancing the stream: a streamed store needs one draw per chunk, not per row."""
        p = np.array([src.weight / src.block_rows for src in self.sources])
        cdf = np.cumsum(p / p.sum())
        cdf /= cdf[-1]
        stores, blocks, taken = [], [], np.zeros(len(self.sources), np.int64)
        drawn = filled = 0
        while filled < self.rows_per_epoch:
            n = min(self.WEIGHTED_PIECE, self.rows_per_epoch - drawn)
            store = cdf.searchsorted(rng.random(n), side="right")
            block = np.empty_like(store)
            for i, nb in enumerate(n_blocks):
                mine = store == i
                block[mine] = (taken[i] + np.arange(mine.sum())) % nb  # cycle through the store's own permutation
                taken[i] += mine.sum()
                filled += int(block_len[i][block[mine]].sum())
            stores.append(store)
            blocks.append(block)
            drawn += n
        rng.bit_generator.advance(self.rows_per_epoch - drawn)
        return np.concatenate(stores), np.concatenate(blocks)

    # --- targets
    def targets(self, items: np.ndarray) -> torch.Tensor:
        """Cached embeddings (n, D) float32 of (store, row, view) items: only these rows are read."""
        out = np.empty((len(items), self.dim), np.float32)
        for i, src in enumerate(self.sources):
            mine = items[:, 0] == i
            if mine.any():
                out[mine] = src.store.read_rows(items[mine, 1], items[mine, 2])
        return torch.from_numpy(out)

    def finite_targets(self, items: np.ndarray, log=print) -> tuple[torch.Tensor, np.ndarray]:
        """`targets(items)` and the mask of the finite ones; each row with a non-finite target is named once.

        The targets are checked as a batch reads them, not all before training: that would stream
        every embedding of every store (minutes at DataComp scale). The teacher pass fails a row
        whose embedding is not finite, but a store written otherwise or damaged in place may hold one,
        and a NaN target would make the loss NaN."""
        t = self.targets(items)
        finite = torch.isfinite(t).all(dim=1).numpy()
        for i, row, view in items[~finite].tolist():
            if (i, row) not in self._named:
                self._named.add((i, row))
                s = self.sources[i].store
                log(f"warning: {s.path}: row {row} ({s.keys(slice(row, row + 1))[0]}) view {view} has a non-finite "
                    f"embedding (NaN or inf): its samples are skipped; `zsd verify {s.path}` lists such rows")
        return t, finite

    def labels(self, items: np.ndarray) -> torch.Tensor:
        out = np.empty(len(items), np.int64)
        for i, src in enumerate(self.sources):
            mine = items[:, 0] == i
            out[mine] = src.labels_of(items[mine, 1])
        return torch.from_numpy(out)


class RowIndex:
    """Key, location and view boxes of a store's rows for DataLoader workers, held in numpy arrays only.

    Keys are `PackedKeys`, the rest numpy arrays: nothing a worker reads is copied into it. `whole`:
    all rows at once (a store in RAM, visited in any order); else the chunks of the rows asked
    for, `cached` of them at a time (a streamed store, visited a window of chunks at a time).
    """

    def __init__(self, store: Store, whole: bool, cached: int):
        self.store, self.cached = store, cached
        self._chunks: OrderedDict[int, tuple] = OrderedDict()  # chunk -> (first row, keys, locs, params)
        self._whole = self._load(slice(None)) if whole else None

    def _load(self, rows: slice) -> tuple:
        s = self.store
        return rows.start or 0, s.packed_keys(rows), s.locs(rows), s.view_params(rows), s.stats(rows)

    def row(self, row: int) -> tuple[str, np.ndarray, np.ndarray, np.ndarray | None]:
        """(key, loc (4,), view params (V, 5), the file's `file_stat` at caching (2,) | None) of a store row."""
        block = self._whole or self._chunk(row // self.store.chunk_rows)
        first, keys, locs, params, stats = block
        return keys[row - first], locs[row - first], params[row - first], None if stats is None else stats[row - first]

    def _chunk(self, c: int) -> tuple:
        block = self._chunks.pop(c, None) or self._load(self.store.chunk_slice(c))
        self._chunks[c] = block  # most recently used last
        while len(self._chunks) > self.cached:
            self._chunks.popitem(last=False)
        return block


class StudentInputs(Dataset):
    """(store, row, view) -> (item, uint8 student input (3, R, R) | None, error): a stored teacher
    view, rebuilt from the store's recorded source and view box and resized to the student's resolution.

    uint8, normalised by the trainer on its device: a quarter of the bytes through the workers'
    shared memory and the pinned host-to-GPU copy.

    Runs in DataLoader workers; an image that can no longer be read comes back as None with
    its reason, and the batch goes on without it. `fast_decode`: JPEGs decoded at a reduced scale
    where the view's crop allows (`render_view_fast`): faster, and close to the teacher's pixels
    rather than equal to them.
    """

    def __init__(self, targets: TrainTargets, student_pre: Preprocess, fast_decode: bool = False):
        self.readers = [RowReader(src.store.sources) for src in targets.sources]
        self.stores = [src.store.path for src in targets.sources]
        self.index = [RowIndex(src.store, src.in_ram, 2 * targets.shuffle_chunks + 2) for src in targets.sources]
        self.teacher_pre = Preprocess.from_dict(targets.teacher["preprocess"])
        self.student_pre, self.fast_decode = student_pre, fast_decode

    def teacher_pixels(self, i: int, row: int, view: int) -> torch.Tensor:
        """The uint8 pixels (3, S, S) the teacher saw for this view (with `fast_decode`, close to them)."""
        key, loc, params, stat = self.index[i].row(row)
        data, now = self.readers[i].data_stat(key, loc)
        px = (render_view_fast(data, view, params[view], self.teacher_pre) if self.fast_decode
              else render_view(load_rgb(data), view, params[view], self.teacher_pre))
        # after the decode: a file replaced by one that is no image is skipped as unreadable, like any other
        why = self.readers[i].changed(key, loc, stat, now)
        if why:
            raise ImageChanged(replaced_text(why, self.stores[i]))
        return px

    def student_pixels(self, item) -> torch.Tensor:
        """The uint8 student input (3, R, R) of a (store, row, view) item; BadImage if unreadable."""
        i, row, view = (int(x) for x in item)
        return resize_pixels(self.teacher_pixels(i, row, view), self.student_pre.size, self.student_pre.interpolation)

    def __getitem__(self, item):
        """(item, pixels | None, error): the error a reason, or an ImageChanged that stops the run."""
        try:
            px = self.student_pixels(item)
        except BadImage as e:
            return item, None, e if isinstance(e, ImageChanged) else str(e)
        return item, px, ""


def replaced_text(why: str, store) -> str:
    """The one line on a row whose image changed after it was cached: what, and the repair."""
    return (f"{why}: its embedding in {store} is the old image's; rerun `zsd cache-teacher` with the store's "
            f"sources and settings and --out {store} to recompute the changed rows")


def stop_on_replaced(errors) -> None:
    """A replaced image ends the run: its target is another image's embedding (`StudentInputs`)."""
    for e in errors:
        if isinstance(e, ImageChanged):
            raise ZsdError(str(e))


def collate(samples):
    """Keep the readable samples: (items (n, 3), uint8 pixels (n, 3, R, R) | None, [errors])."""
    ok = [s for s in samples if s[1] is not None]
    errors = [s[2] for s in samples if s[1] is None]
    items = np.array([s[0] for s in ok], dtype=np.int64).reshape(-1, 3)
    pixels = torch.stack([s[1] for s in ok]) if ok else None
    return items, pixels, errors


class BatchPlan:
    """The micro-batches of one rank from optimizer step `start` on, epoch after epoch.

    Global step g of epoch e uses samples [g*B, (g+1)*B) of `epoch_order(seed, e)` (the last
    partial batch of an epoch is dropped); it is split into `accum` micro-batches, and each
    micro-batch into `world` interleaved shards, one per rank.
    """

    def __init__(self, targets: TrainTargets, seed: int, batch_size: int, accum: int, world: int, rank: int,
                 start: int, total: int):
        self.targets, self.seed = targets, seed
        self.batch_size, self.accum, self.world, self.rank = batch_size, accum, world, rank
        self.start, self.total = start, total
        self.steps_per_epoch = targets.rows_per_epoch // batch_size

    def __iter__(self):
        micro, size = self.batch_size // self.accum, self.batch_size
        step = self.start
        while step < self.total:
            epoch, k = divmod(step, self.steps_per_epoch)
            pending = np.zeros((0, 3), np.int64)  # samples drawn, not yet batched: less than a window + a batch
            for part in self.targets.epoch_samples(self.seed, epoch, start=k * size):
                pending = np.concatenate([pending, part])
                while len(pending) >= size and step < self.total and k < self.steps_per_epoch:
                    batch, pending = pending[:size], pending[size:]
                    for a in range(self.accum):
                        yield [tuple(x) for x in batch[a * micro:(a + 1) * micro][self.rank::self.world]]
                    step, k = step + 1, k + 1
                if step >= self.total or k == self.steps_per_epoch:
                    break

    def __len__(self):
        return (self.total - self.start) * self.accum


class NoRoom(ZsdError):
    """The pixel cache cannot be written (or, for a rank that does not render, is not there)."""


class PixelCache:
    """Every sample's student input rendered once into a uint8 file, then read from RAM.

    A sample's pixels are a pure function of (store row, view, student preprocessing): the crop box
    and flip are stored and the trainer adds no augmentation of its own. So a target set that is
    small next to RAM is rendered once (decode, teacher view, resize) and every later epoch, resume
    and seed reads the same file through the page cache. On a 2-core CPU decoding, not the student,
    limits small students: mobilenetv3_small_050 at 64 px steps at ~1,100 img/s on tensors but
    trains at ~420 img/s when every sample is decoded again.

    The file lives in the cache dir under pixels/, keyed by the stores (path, teacher id, rows
    written) and the student preprocessing; it is written to a temporary name and renamed, so a
    killed render leaves nothing to trust. Batches come out as `collate` makes them, bit for bit.
    Where the file cannot be written (no room, a cache dir that is a file) or, without `render`
    (DDP ranks other than 0), is missing, the constructor raises NoRoom: the trainer decodes instead.
    """

    def __init__(self, targets: TrainTargets, dataset: StudentInputs, *, workers: int = 0, progress: bool = True,
                 log=print, render: bool = True):
        self.pre = dataset.student_pre
        views = [src.store.views for src in targets.sources]
        rows = [src.written_rows() for src in targets.sources]
        counts = [len(r) * v for r, v in zip(rows, views)]
        self.base = np.concatenate([[0], np.cumsum(counts)])[:-1]
        self.views = np.array(views)
        self.position = []  # per source: store row -> index among its written rows
        for src, r in zip(targets.sources, rows):
            pos = np.full(src.store.rows, -1, np.int64)
            pos[r] = np.arange(len(r))
            self.position.append(pos)
        # the rows' recorded file stats: a store whose replaced images were recomputed renders again
        stats = [hashlib.sha256(src.store.stats().tobytes()).hexdigest()
                 for src in targets.sources if "stat" in src.store.arrays]
        key = json.dumps([[str(src.store.path.resolve()), src.store.teacher_id, r.tolist()]
                          for src, r in zip(targets.sources, rows)] + [self.pre.to_dict()]
                         + (["fast_decode"] if dataset.fast_decode else []) + stats)  # the default's key as before
        path = cache_dir() / "pixels" / (hashlib.sha256(key.encode()).hexdigest()[:20] + ".npy")
        errors_path = path.with_suffix(".errors.json")
        shape = (int(sum(counts)), 3, self.pre.size, self.pre.size)
        loaded = _read_pixels(path, errors_path, shape)
        if loaded is None:
            if not render:
                raise NoRoom(f"the pixel cache {path} was not written")
            if path.exists():
                log(f"warning: {path} is damaged or incomplete: rendering the student inputs again")
            items = np.concatenate([np.stack([np.full(len(r) * v, i), np.repeat(r, v), np.tile(np.arange(v), len(r))], 1)
                                    for i, (r, v) in enumerate(zip(rows, views))])
            self._render(dataset, items, path, errors_path, shape, workers, progress)
            log(f"student inputs of {len(items)} samples rendered into {path} "
                f"({path.stat().st_size / 2**20:.0f} MiB)")
            loaded = _read_pixels(path, errors_path, shape)
        self.pixels, self.errors = loaded  # the page cache holds the pixels after the first epoch

    @staticmethod
    def _render(dataset: StudentInputs, items: np.ndarray, path: Path, errors_path: Path, shape: tuple,
                workers: int, progress: bool) -> None:
        """Render into a temporary file whose space is reserved first: a full disk under a memory map
        kills the process with SIGBUS, no error. The temporary file goes on any exit (Ctrl-C, SIGTERM)."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(path.parent).free
        except OSError as e:
            raise NoRoom(f"the cache dir {path.parent.parent} ($ZSD_CACHE) is not a writable folder "
                         f"({e.strerror})") from None
        need = int(np.prod(shape)) + 4096  # and the .npy header
        if free < need:
            raise NoRoom(f"the student inputs need {_size(need)} in {path.parent} ($ZSD_CACHE), {_size(free)} are free")
        try:
            with atomic_file(path) as tmp:
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
                reserve(tmp)
                errors = {}
                workers, batch = shared_memory_batch(workers, int(np.prod(shape[1:])), 2, 256)
                loader = torch.utils.data.DataLoader(_Render(dataset, items), batch_size=batch, num_workers=workers,
                                                     collate_fn=_Render.as_batch)
                with tqdm(total=len(items), unit="img", desc="rendering student inputs once", disable=not progress,
                          dynamic_ncols=True) as bar:  # closed on an interrupt too: its line ends before the error's
                    for slots, px, failed in loader:
                        stop_on_replaced(failed.values())
                        if px is not None:
                            out[slots] = px.numpy()
                        errors.update(failed)
                        bar.update(len(slots) + len(failed))
                out.flush()
                del out
                with atomic_file(errors_path) as e_tmp:  # before the pixels: they are read only with their errors
                    e_tmp.write_text(json.dumps(errors))
        except OSError as e:
            raise NoRoom(f"cannot write the student inputs into {path.parent} ($ZSD_CACHE): {e.strerror}") from None

    @staticmethod
    def nbytes(targets: TrainTargets, size: int) -> int:
        return sum(src.n_written * src.store.views for src in targets.sources) * 3 * size * size

    def slots(self, items: np.ndarray) -> np.ndarray:
        i, row, view = items[:, 0], items[:, 1], items[:, 2]
        pos = np.array([self.position[a][r] for a, r in zip(i, row)], dtype=np.int64)
        return self.base[i] + pos * self.views[i] + view

    def batches(self, plan: "BatchPlan", pin: bool = False, ahead: int = 2):
        """(items, uint8 pixels | None, [errors]) per micro-batch of `plan`, as `collate` returns them;
        with `pin`, gathered straight into pinned memory (for a GPU: the copy does not wait for it).
        A thread gathers the next `ahead` batches' pixels while the caller trains on the current one
        (np.take releases the GIL); the plan itself is walked in the caller's thread."""
        with ThreadPoolExecutor(1, thread_name_prefix="zsd-pixel-cache") as pool:
            pending = deque()
            try:
                for batch in plan:
                    pending.append(pool.submit(self._gather, batch, pin))
                    if len(pending) > ahead:
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
            finally:  # a caller that stops early (stop_after, an error) leaves no gather queued
                for f in pending:
                    f.cancel()

    def _gather(self, batch: list, pin: bool):
        items = np.array(batch, dtype=np.int64).reshape(-1, 3)
        slots = self.slots(items)
        bad = np.array([s in self.errors for s in slots], dtype=bool)
        errors = [self.errors[s] for s in slots[bad]]
        items, slots = items[~bad], slots[~bad]
        pixels = None
        if len(slots):
            pixels = torch.empty((len(slots), *self.pixels.shape[1:]), dtype=torch.uint8, pin_memory=pin)
            np.take(self.pixels, slots, axis=0, out=pixels.numpy())
        return items, pixels, errors


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def _read_pixels(path, errors_path, shape) -> tuple[np.ndarray, dict[int, str]] | None:
    """The rendered pixels (memory-mapped) and failures, or None when missing, truncated or garbled."""
    try:
        pixels = np.load(path, mmap_mode="r")
        errors = {int(k): str(v) for k, v in json.loads(errors_path.read_text()).items()}
    except (OSError, ValueError, AttributeError):  # AttributeError: a JSON that is not an object
        return None
    return (pixels, errors) if pixels.shape == shape and pixels.dtype == np.uint8 else None


class _Render(Dataset):
    def __init__(self, dataset: StudentInputs, items: np.ndarray):
        self.dataset, self.items = dataset, items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, slot):
        try:
            return slot, self.dataset.student_pixels(self.items[slot]), ""
        except BadImage as e:
            return slot, None, e if isinstance(e, ImageChanged) else str(e)

    @staticmethod
    def as_batch(samples):
        """(slots, their pixels stacked | None, {slot: error}): one tensor per batch, as each tensor a
        worker sends holds a file descriptor. A named function: workers started by spawn pickle it."""
        ok = [s for s in samples if s[1] is not None]
        return ([s[0] for s in ok], torch.stack([s[1] for s in ok]) if ok else None,
                {s[0]: s[2] for s in samples if s[1] is None})
