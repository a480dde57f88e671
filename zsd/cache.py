"""The teacher pass: image source -> decoded views -> teacher -> store.

Rows are processed chunk by chunk in store order; every teacher batch lies inside one chunk
and starts at the same row whatever happened before, so a resumed, sharded or uninterrupted
run feeds the teacher identical batches and writes identical bytes.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from zsd.cpu import check_shared_memory, decode_workers, tune_allocator
from zsd.dist import local_device, resolve_device, shard
from zsd.errors import ZsdError, check_at_least, check_writable, out_of_memory
from zsd.sources import PackedKeys, RowReader, ShardIndex, check_source, describe_source, scan_sources
from zsd.store import (CHUNK_WRITES, DEFAULT_CHUNK_ROWS, FAILED, SHARD_INDEX, WRITTEN, Store, create_store,
                       open_store, resolve_store, restore_metadata, store_lock)
from zsd.teachers import DEFAULT_TEACHER, create_teacher
from zsd.views import ViewDataset, normalize


# Views per teacher forward on a CPU: measured with the proxy teacher (tf_efficientnet_lite0) on 2
# cores, throughput is flat from 16 to 64 and halves at 128, where activations outgrow the caches.
CPU_BATCH = 32


def gpu_batch(size: int) -> int:
    """Views per teacher forward on a GPU: 256 at 224 px and below, fewer as the pixels per view grow
    (activations do), a power of two, at least 16."""
    n = 256
    while n > 16 and n * size * size > 256 * 224 * 224:
        n //= 2
    return n


def _collate(items):
    """(rows, uint8 views of the readable rows stacked (n, V, 3, S, S) | None, params, errors, decode seconds,
    the files' `file_stat`s (None where unread)).

    One pixel tensor per batch: every tensor a DataLoader worker sends holds a file descriptor
    until the main process takes it, and one per image (prefetch x workers x batch of them in
    flight) exceeded a lowered open-file limit ("Too many open files")."""
    ok = [it[1] for it in items if it[1] is not None]
    return [it[0] for it in items], (torch.stack(ok) if ok else None), [it[2] for it in items], \
        [it[3] for it in items], sum(it[4] for it in items), [it[5] for it in items]


def default_workers(device: torch.device, workers: int | None = None) -> int:
    """Decode processes for a pass (`workers` where given): on a GPU the cores of this process's share
    but its own (at most 16); on a CPU none, the views are decoded by low-priority threads of this
    process (`_decode_ahead`). The teacher pass's default, and eval's, coverage's and robustness's."""
    if workers is not None:
        return workers
    return 0 if device.type == "cpu" else decode_workers(device)


def _lower_this_threads_priority():
    if sys.platform.startswith("linux"):  # per thread on Linux only; elsewhere it would slow the whole process
        os.setpriority(os.PRIO_PROCESS, 0, 19)


def _decode_ahead(dataset: ViewDataset, batches: list[list[int]], threads: int):
    """Collated batches, each decoded while the teacher runs on the one before.

    The `threads` decode threads run at the lowest priority (nice 19): on a CPU with no core to
    spare beyond torch's threads they use the moments the teacher's threads leave a core idle and
    yield it as soon as the teacher wants it back, instead of preempting an OpenMP thread whose
    partner then waits at the next barrier (README, Performance). When the loop asks for a batch
    that is not ready, this thread decodes what the others have not started, at normal priority.
    PIL decodes and resizes without the GIL."""
    def start(rows):
        todo, items, lock = list(range(len(rows)))[::-1], [None] * len(rows), threading.Lock()

        def work():
            while True:
                with lock:
                    if not todo:
                        return
                    i = todo.pop()
                items[i] = dataset[rows[i]]
        return work, items, [pool.submit(work) for _ in range(threads)]

    with ThreadPoolExecutor(threads, thread_name_prefix="zsd-decode", initializer=_lower_this_threads_priority) as pool:
        ahead = start(batches[0]) if batches else None
        for k in range(len(batches)):
            work, items, futures = ahead
            work()
            for f in futures:
                f.result()
            ahead = start(batches[k + 1]) if k + 1 < len(batches) else None
            yield _collate(items)


class OtherTeacher(ZsdError):
    """--out is a store of another teacher (or precision) than this run's."""


def _open_or_create(out, scan, teacher, views, view_seed, crop_scale, chunk_rows, log):
    path = resolve_store(out)
    if not path.exists():  # create_store opens the store another process created first
        create_store(path, keys=scan.keys, labels=scan.labels, locs=scan.locs, views=views, dim=teacher.dim,
                     teacher=teacher.fingerprint, teacher_id=teacher.id, classnames=scan.classnames,
                     sources=scan.descs, view_seed=view_seed, crop_scale=crop_scale, chunk_rows=chunk_rows)
    restore_metadata(path, log)  # a zarr.json written over: checked against this run below
    open_store(path)  # a folder that is no store is refused before the lock leaves a file in it
    with store_lock(path):  # other shard processes may be appending the same sources
        store = open_store(path, mode="r+")  # as the last holder of the lock left it
        n_old = _check_compatible(store, scan, teacher, views, view_seed, crop_scale, log)
        if len(store.sources) < len(scan.descs):
            store.append_rows(n_old, scan.keys[n_old:], scan.labels[n_old:], scan.locs[n_old:], scan.descs,
                              scan.classnames)
    return store


def _check_compatible(store, scan, teacher, views, view_seed, crop_scale, log) -> int:
    """The number of the store's rows that this run's scan shares, or a ZsdError."""
    path = store.path
    if store.teacher_id != teacher.id:
        old = store.teacher
        raise OtherTeacher(f"{path} holds embeddings of another teacher ({old['model']}, {old['weights']}, "
                       f"{old.get('precision', 'fp32')}, id {store.teacher_id}); this run's teacher is "
                       f"{teacher.model_name} ({teacher.weights}, {teacher.precision}, id {teacher.id}): "
                       "choose another --out (or the store's --precision)")
    for name, want in (("views", views), ("view_seed", view_seed), ("crop_scale", list(crop_scale))):
        if store.attrs[name] != want:
            raise ZsdError(f"{path} was made with {name}={store.attrs[name]}, not {want}: "
                           "rerun with the same settings or choose another --out")
    old = store.sources
    if old != scan.descs[:len(old)]:
        raise ZsdError(f"{path} was made from other sources ({', '.join(describe_source(d) for d in old)}): "
                       "pass the same sources, more sources after them to append, or another --out")
    n_old = int(sum(1 for loc in scan.locs if loc[0] < len(old)))
    # written from the scan: damaged chunks, then any whose labels or locations differ from it (garbled in range)
    for damaged in (lambda: {c for _, c, _ in store.damage(arrays=("key", "label", "loc"), values=True)},
                    lambda: _differing_chunks(store, scan, n_old)):
        for c in sorted(damaged()):
            sl = store.chunk_slice(c)
            log(f"warning: {path}: rewriting the keys, labels and locations of rows {sl.start}..{sl.stop - 1} "
                "from the sources")
            store.write_index(sl, scan.keys[sl], scan.labels[sl], scan.locs[sl])
    # rows after n_old, if any, are those of a killed append: append_rows replaces them
    if store.rows < n_old or not same_keys(store, scan.keys, n_old):
        raise ZsdError(f"the images of {', '.join(describe_source(d) for d in old)} changed since {path} was "
                       "made: cache them into a new store")
    return n_old


def _differing_chunks(store: Store, scan, n: int) -> set[int]:
    """The chunks of the first `n` rows whose stored labels or locations are not the scan's."""
    found = set()
    for name, want in (("label", np.asarray(scan.labels[:n])), ("loc", np.asarray(scan.locs[:n]).reshape(-1, 4))):
        for a, block in store.blocks(name, slice(0, n)):
            differ = block != want[a:a + len(block)]
            rows = a + np.flatnonzero(differ if differ.ndim == 1 else differ.any(axis=1))
            found |= set((rows // store.chunk_rows).tolist())
    return found


def same_keys(store: Store, keys: list[str], n: int) -> bool:
    """Whether the store's first `n` keys are keys[:n], compared a block at a time (memory: one block)."""
    return all(list(block) == keys[a:a + len(block)]
               for a, block in store.blocks("key", slice(0, n), PackedKeys.BLOCK))


def cache_teacher(sources: list[str], out: str, *, teacher: str = DEFAULT_TEACHER,
                  pretrained: str | None = None, views: int = 1, batch_size: int | None = None,
                  precision: str = "auto",
                  workers: int | None = None, device: str = "auto", num_shards: int | None = None,
                  shard_index: int | None = None, chunk_rows: int = DEFAULT_CHUNK_ROWS, view_seed: int = 0,
                  crop_scale=(0.9, 1.0), progress: bool = True, log=print) -> dict:
    """Embed every image of `sources` with the teacher into the store `out`; resumable.

    `batch_size` counts views per teacher forward (images per batch = batch_size // views); by
    default on a GPU 256 for a 224 px teacher (`gpu_batch`) and on a CPU 32, where larger batches only add memory traffic (docs: the
    CPU section of the README). `workers`: decode processes beside the forward; 0 decodes in
    low-priority threads of this process, a batch ahead (`_decode_ahead`; the default on a CPU).
    `precision`: auto (bf16 on CUDA, fp32 on CPU), fp32 or bf16; it is part of the teacher's
    fingerprint, so one store never mixes precisions.
    Returns a summary dict (rows, written, failed, seconds per phase, images/s overall and
    after the first batch).
    """
    for flag, value in (("--views", views), ("--batch-size", batch_size), ("--chunk-rows", chunk_rows),
                        ("--num-shards", num_shards)):
        check_at_least(flag, value, 1)
    check_at_least("--workers", workers, 0)
    resolve_device(device)
    num_shards, shard_index = shard(num_shards, shard_index)
    path = resolve_store(out)
    check_writable(path if path.is_dir() else path.parent, "--out")
    device = local_device(device)  # under torchrun: this rank's own GPU
    t_start = time.perf_counter()
    for source in sources:  # a typo fails now, not after the teacher loaded
        check_source(source)
    model = create_teacher(teacher, pretrained, device, precision)
    tune_allocator(model.device)
    if batch_size is None:
        batch_size = CPU_BATCH if model.device.type == "cpu" else gpu_batch(model.preprocess.size)
    index = ShardIndex(path / SHARD_INDEX)
    scan = scan_sources(sources, log=log, index=index)
    store = _open_or_create(out, scan, model, views, view_seed, crop_scale, chunk_rows, log)
    index.save()  # now that the store exists: a first pass keeps its scan for the resumes

    mine = [c for c in range(store.n_chunks) if c % num_shards == shard_index]
    keys, locs = store.packed_keys(), store.locs()
    # before trusting a commit: a cut-short copy must not read as zeros, garbled bytes not as embeddings;
    # the rows verify rejects in whole files are looked for once the damaged chunks are pending, then the
    # rows whose image was replaced after it was cached (its size or mtime differ from the recorded ones)
    repaired = 0
    for find in (lambda: store.damage(mine, CHUNK_WRITES, values=True), lambda: _rejected_rows(store, mine),
                 lambda: changed_rows(store, mine, keys, locs)):
        damage = find()
        damaged = sorted({c for _, c, _ in damage})
        rows = sum(store.chunk_slice(c).stop - store.chunk_slice(c).start for c in damaged)
        if damaged:
            name, c, why = damage[0]
            log(f"warning: {store.path}: recomputing {rows} rows of {len(damaged)} damaged chunk(s); first: "
                f"{name} rows {store.chunk_slice(c).start}..{store.chunk_slice(c).stop - 1}: {why}")
            store.uncommit(damaged)
        repaired += rows
    chunks = [c for c in store.pending_chunks() if c % num_shards == shard_index]
    workers = default_workers(model.device, workers)
    dataset = ViewDataset(store.sources, keys, locs, model.preprocess, views,
                          store.attrs["view_seed"], store.attrs["crop_scale"])
    run = embed_rows(store, dataset, model.encode_images, chunks, images_per_batch=max(1, batch_size // views),
                     workers=workers, device=model.device,
                     desc=f"cache-teacher -> {store.path.name}", progress=progress)

    elapsed = time.perf_counter() - t_start
    pending, written, failed = store.status_per_chunk().sum(0).tolist()  # not info(): it reads failed keys
    summary = {
        "store": str(store.path), "rows": store.rows, "processed": run["done"], "failed_now": run["failed"],
        "written": written, "failed": failed, "pending": pending, "complete": pending == 0,
        "repaired": repaired, "seconds": round(elapsed, 2),
        "images_per_s": round(run["done"] / max(run["seconds"], 1e-9), 2), "loop_seconds": run["seconds"],
        "first_batch_s": run["first_batch_s"], "steady_images_per_s": run["steady_images_per_s"],
        "phases_s": run["phases_s"], "failure_reasons": run["failure_reasons"],
        "shard": [shard_index, num_shards], "problems": scan.problems,
    }
    log(_summary_text(summary))
    return summary


def changed_rows(store: Store, chunks=None, keys: PackedKeys | None = None, locs: np.ndarray | None = None
                 ) -> list[tuple[str, int, str]]:
    """("stat", chunk, why) per written row of `chunks` (default all) whose file is not the one it was
    cached from (`RowReader.changed`: a stat call per image, one per shard); none for a store without
    the stat array, nor for rows without a recorded stat. `keys` and `locs`: the store's, when the
    caller holds them. `zsd cache-teacher` recomputes their chunks, `zsd verify` reports them."""
    if "stat" not in store.arrays:
        return []
    keys = store.packed_keys() if keys is None else keys
    locs = store.locs() if locs is None else locs
    reader, found, shards = RowReader(store.sources), [], {}
    counts = store.status_per_chunk()
    for c in range(store.n_chunks) if chunks is None else chunks:
        if not counts[c, 1]:
            continue
        sl = store.chunk_slice(c)
        status, stats = store.status(sl), store.stats(sl)
        for r in sl.start + np.flatnonzero((status == WRITTEN) & (stats[:, 0] >= 0)):
            key, loc, recorded = keys[r], locs[r], stats[r - sl.start]
            if store.sources[int(loc[0])]["kind"] == "webdataset":  # a shard is looked at once
                shard = (reader.path(key, loc), tuple(recorded))
                if shard not in shards:
                    shards[shard] = reader.changed(key, loc, recorded)
                why = shards[shard]
            else:
                why = reader.changed(key, loc, recorded)
            if why:
                found.append(("stat", c, why))
    return found


def _rejected_rows(store: Store, chunks: list[int]) -> list[tuple[str, int, str]]:
    """(array, chunk, problem) of the chunks whose rows `zsd verify` rejects although their files are
    whole (`Store.embedding_health`): embeddings not finite or off unit norm (bytes of the right size
    but garbled), failed rows without a reason. Reads the embeddings of `chunks` once."""
    written = store.status_per_chunk()[:, 1:].any(axis=1)
    health = store.embedding_health([c for c in chunks if written[c]])
    found = {}
    for key, what in (("unexplained", "failed rows without a reason"), ("off_norm", "embeddings off unit norm"),
                      ("nonfinite", "embeddings that are not finite")):
        for r in health[key]:
            found[int(r) // store.chunk_rows] = ("error" if key == "unexplained" else "emb", f"{what} (garbled)")
    return [(name, c, why) for c, (name, why) in found.items()]


def embed_rows(store: Store, dataset: ViewDataset, encode, chunks: list[int], *, images_per_batch: int,
               workers: int = 0, skip: dict[int, str] | None = None, device: torch.device | str = "cpu",
               desc: str = "", encoder_name: str = "teacher", progress: bool = True) -> dict:
    """Mapper and writer: encode every view of the rows of `chunks` and write whole chunks.

    `encode` maps normalised pixels (n, 3, S, S) on `device` to normalised embeddings (n, D); on a
    GPU the loader pins its batches, so the copy overlaps the work. A batch never
    crosses a chunk and always starts at the same row, so every run feeds the encoder the same
    batches. Rows in `skip` are recorded as failed with their reason, without being read.
    """
    skip = skip or {}
    views, pre = dataset.views, dataset.pre
    batches, live = [], {}
    for c in chunks:
        sl = store.chunk_slice(c)
        rows = [r for r in range(sl.start, sl.stop) if r not in skip]
        live[c] = len(rows)
        batches += [rows[s:s + images_per_batch] for s in range(0, len(rows), images_per_batch)]
    todo = sum(live.values())
    if workers:
        check_shared_memory(workers, images_per_batch * views * 3 * pre.size ** 2, 4)
        loader = DataLoader(dataset, batch_sampler=batches, num_workers=workers if todo else 0, collate_fn=_collate,
                            pin_memory=torch.device(device).type == "cuda", prefetch_factor=4 if todo else None)
    else:
        loader = _decode_ahead(dataset, batches, torch.get_num_threads())
    timing, reasons = Counter(), Counter()
    done = failed = 0
    buffers: dict[int, dict] = {}

    def buffer(c):  # allocated on first use: a DataComp-scale pass holds one or two chunks at a time
        if c not in buffers:
            sl = store.chunk_slice(c)
            n = sl.stop - sl.start
            buf = buffers[c] = {"emb": np.zeros((n, views, store.dim), np.float16), "error": [""] * n,
                                "view": np.zeros((n, views, 5), np.int32), "status": np.full(n, WRITTEN, np.uint8),
                                "stat": np.full((n, 2), -1, np.int64),
                                "start": sl.start, "left": live[c]}
            for r in range(sl.start, sl.stop):
                if r in skip:
                    buf["error"][r - sl.start], buf["status"][r - sl.start] = skip[r], FAILED
        return buffers[c]

    def flush(c):
        t0 = time.perf_counter()
        buf = buffers.pop(c)
        store.write_chunk(c, buf["emb"], buf["view"], buf["error"], buf["status"], buf["stat"])
        timing["writing"] += time.perf_counter() - t0

    for c in chunks:  # chunks with nothing to read are written at once
        if live[c] == 0:
            buffer(c)
            flush(c)
    bar = tqdm(total=todo, unit="img", desc=desc, disable=not progress, dynamic_ncols=True)
    t_loop = t_wait = time.perf_counter()
    first = None
    try:  # the bar ends its line before an error (a full disk) is printed
        for rows, pixels, params, errors, decode_s, stats in loader:
            timing["waiting for images"] += time.perf_counter() - t_wait
            c = rows[0] // store.chunk_rows
            buf = buffer(c)
            timing["decoding (workers, overlapped)" if workers else "decoding (threads, summed)"] += decode_s
            ok = [i for i, e in enumerate(errors) if not e]
            bad = [(row, error) for row, error in zip(rows, errors) if error]
            if ok:
                t0 = time.perf_counter()
                # uint8 crosses to the device (pinned, asynchronously) and is normalised there: a quarter of the bytes
                x = normalize(pixels.to(device, non_blocking=True).flatten(0, 1), pre.mean, pre.std)
                # the chunks written so far stay; a rerun resumes after them
                with out_of_memory(device, f"the {encoder_name} forward of {len(x)} views", "lower --batch-size"):
                    z = encode(x).cpu().view(len(ok), views, -1).numpy().astype(np.float16)
                timing[encoder_name] += time.perf_counter() - t0
                for i, e in zip(ok, z):
                    if np.isfinite(e).all():
                        r = rows[i] - buf["start"]
                        buf["emb"][r], buf["view"][r], buf["stat"][r] = e, params[i], stats[i]
                    else:  # a NaN target stops training at its first batch: the row fails here instead
                        bad.append((rows[i], f"the {encoder_name}'s embedding is not finite (NaN or inf)"))
            for row, reason in bad:
                buf["error"][row - buf["start"]], buf["status"][row - buf["start"]] = reason, FAILED
                reasons[reason.split(" (")[0]] += 1
                failed += 1
            buf["left"] -= len(rows)
            if buf["left"] == 0:
                flush(c)
            done += len(rows)
            if first is None:  # the first forward builds the CPU kernels (oneDNN JIT): a one-off cost
                first = (done, time.perf_counter() - t_loop)
            bar.update(len(rows))
            if failed:
                bar.set_postfix(failed=failed)
            t_wait = time.perf_counter()
    finally:
        bar.close()
    seconds = time.perf_counter() - t_loop
    steady = (done - first[0]) / max(seconds - first[1], 1e-9) if first and done > first[0] else None
    return {"done": done, "failed": failed, "seconds": round(seconds, 2),
            "first_batch_s": round(first[1], 2) if first else None,
            "steady_images_per_s": round(steady, 2) if steady else None,
            "phases_s": {k: round(v, 2) for k, v in timing.items()}, "failure_reasons": dict(reasons)}


def _summary_text(s: dict) -> str:
    lines = [f"{s['store']}: {s['processed']} images this run ({s['failed_now']} failed) in {s['seconds']} s, "
             f"{s['images_per_s']} img/s; store has {s['written']} written, {s['failed']} failed, "
             f"{s['pending']} pending of {s['rows']} rows" + (" (complete)" if s["complete"] else "")
             + (f"; {s['repaired']} rows of damaged chunks repaired" if s["repaired"] else "")]
    if s["phases_s"]:
        lines.append("  time: " + ", ".join(f"{k} {v} s" for k, v in s["phases_s"].items()))
    if s["steady_images_per_s"]:
        lines.append(f"  after the first batch ({s['first_batch_s']} s, kernels built on first use): "
                     f"{s['steady_images_per_s']} img/s")
    if s["failure_reasons"]:
        lines.append("  skipped: " + ", ".join(f"{n} {r}" for r, n in s["failure_reasons"].items())
                     + " (zsd info STORE lists them)")
    return "\n".join(lines)
