"""The teacher pass: image source -> decoded views (DataLoader workers) -> teacher -> store.

Rows are processed chunk by chunk in store order; every teacher batch lies inside one chunk
and starts at the same row whatever happened before, so a resumed, sharded or uninterrupted
run feeds the teacher identical batches and writes identical bytes.
"""

from __future__ import annotations

import os
import time
from collections import Counter

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from zsd.cpu import tune_allocator
from zsd.errors import ZsdError, check_at_least
from zsd.sources import BadImage, RowReader, scan_sources
from zsd.store import DEFAULT_CHUNK_ROWS, FAILED, PENDING, WRITTEN, Store, create_store, open_store, resolve_store
from zsd.teachers import DEFAULT_TEACHER, create_teacher, resolve_device
from zsd.views import Preprocess, normalize, render_view, sample_views


# Views per teacher forward on a CPU: measured with the proxy teacher (tf_efficientnet_lite0) on 2
# cores, throughput is flat from 16 to 64 and halves at 128, where activations outgrow the caches.
CPU_BATCH = 32


class ViewDataset(Dataset):
    """Row index -> (row, uint8 views (V, 3, S, S) | None, view params, error, decode seconds)."""

    def __init__(self, descs, keys, locs, pre: Preprocess, views: int, view_seed: int, crop_scale):
        self.reader = RowReader(descs)
        self.keys, self.locs = keys, locs
        self.pre, self.views, self.view_seed, self.crop_scale = pre, views, view_seed, tuple(crop_scale)

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, row):
        t0 = time.perf_counter()
        try:
            img = self.reader.image(self.keys[row], self.locs[row])
        except BadImage as e:
            return row, None, None, str(e), time.perf_counter() - t0
        params = sample_views(img.width, img.height, self.views, self.view_seed, row, self.crop_scale, self.pre)
        pixels = torch.stack([render_view(img, v, params[v], self.pre) for v in range(self.views)])
        return row, pixels, params, "", time.perf_counter() - t0


def _collate(items):
    return items


def _shard_from_env(num_shards, shard_index):
    """--num-shards/--shard-index, else torchrun's WORLD_SIZE/RANK, else one shard."""
    if num_shards is None:
        num_shards = int(os.environ.get("WORLD_SIZE", 1))
        shard_index = int(os.environ.get("RANK", 0))
    shard_index = shard_index or 0
    if not 0 <= shard_index < num_shards:
        raise ZsdError(f"--shard-index {shard_index} is not in 0..{num_shards - 1}")
    return num_shards, shard_index


def _open_or_create(out, scan, teacher, views, view_seed, crop_scale, chunk_rows):
    path = resolve_store(out)
    fresh = dict(keys=scan.keys, labels=scan.labels, locs=scan.locs, views=views, dim=teacher.dim,
                 teacher=teacher.fingerprint, teacher_id=teacher.id, classnames=scan.classnames,
                 sources=scan.descs, view_seed=view_seed, crop_scale=crop_scale, chunk_rows=chunk_rows)
    if not path.exists():
        return create_store(path, **fresh)
    store = open_store(path, mode="r+")
    if store.teacher_id != teacher.id:
        old = store.teacher
        raise ZsdError(f"{path} holds embeddings of another teacher ({old['model']}, {old['weights']}, "
                       f"{old.get('precision', 'fp32')}, id {store.teacher_id}); this run's teacher is "
                       f"{teacher.model_name} ({teacher.weights}, {teacher.precision}, id {teacher.id}): "
                       "choose another --out (or the store's --precision)")
    for name, want in (("views", views), ("view_seed", view_seed), ("crop_scale", list(crop_scale))):
        if store.attrs[name] != want:
            raise ZsdError(f"{path} was made with {name}={store.attrs[name]}, not {want}: "
                           "rerun with the same settings or choose another --out")
    old = store.sources
    if old != scan.descs[:len(old)]:
        raise ZsdError(f"{path} was made from other sources ({', '.join(_describe(d) for d in old)}): "
                       "pass the same sources, more sources after them to append, or another --out")
    n_old = int(sum(1 for loc in scan.locs if loc[0] < len(old)))
    if list(store.keys()) != scan.keys[:n_old]:
        raise ZsdError(f"the images of {', '.join(_describe(d) for d in old)} changed since {path} was "
                       "made: cache them into a new store")
    if len(old) < len(scan.descs):
        store.append_rows(scan.keys[n_old:], scan.labels[n_old:], scan.locs[n_old:], scan.descs, scan.classnames)
    return store


def _describe(desc: dict) -> str:
    return desc.get("spec") or desc.get("path") or desc.get("root")


def cache_teacher(sources: list[str], out: str, *, teacher: str = DEFAULT_TEACHER,
                  pretrained: str | None = None, views: int = 1, batch_size: int | None = None,
                  precision: str = "auto",
                  workers: int | None = None, device: str = "auto", num_shards: int | None = None,
                  shard_index: int | None = None, chunk_rows: int = DEFAULT_CHUNK_ROWS, view_seed: int = 0,
                  crop_scale=(0.9, 1.0), progress: bool = True, log=print) -> dict:
    """Embed every image of `sources` with the teacher into the store `out`; resumable.

    `batch_size` counts views per teacher forward (images per batch = batch_size // views); by
    default 256 on a GPU and 32 on a CPU, where larger batches only add memory traffic (docs: the
    CPU section of the README). `precision`: auto (bf16 on CUDA, fp32 on CPU), fp32 or bf16; it is
    part of the teacher's fingerprint, so one store never mixes precisions.
    Returns a summary dict (rows, written, failed, seconds per phase, images/s).
    """
    for flag, value in (("--views", views), ("--batch-size", batch_size), ("--chunk-rows", chunk_rows),
                        ("--num-shards", num_shards)):
        check_at_least(flag, value, 1)
    check_at_least("--workers", workers, 0)
    resolve_device(device)
    num_shards, shard_index = _shard_from_env(num_shards, shard_index)
    if device == "auto" and num_shards > 1 and torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    t_start = time.perf_counter()
    model = create_teacher(teacher, pretrained, device, precision)
    tune_allocator(model.device)
    if batch_size is None:
        batch_size = CPU_BATCH if model.device.type == "cpu" else 256
    scan = scan_sources(sources)
    for problem in scan.problems:
        log(f"warning: {problem}")
    store = _open_or_create(out, scan, model, views, view_seed, crop_scale, chunk_rows)

    chunks = [c for c in store.pending_chunks() if c % num_shards == shard_index]
    if workers is None:
        workers = min(4, max(1, (os.cpu_count() or 2) - 1))
    dataset = ViewDataset(store.sources, list(store.keys()), store.locs(), model.preprocess, views,
                          store.attrs["view_seed"], store.attrs["crop_scale"])
    run = embed_rows(store, dataset, model.encode_images, chunks, images_per_batch=max(1, batch_size // views),
                     workers=workers, pin_memory=model.device.type == "cuda",
                     desc=f"cache-teacher -> {store.path.name}", progress=progress)

    elapsed = time.perf_counter() - t_start
    status = store.status()  # counts only: info()'s norm statistics would read every embedding
    summary = {
        "store": str(store.path), "rows": store.rows, "processed": run["done"], "failed_now": run["failed"],
        "written": int((status == WRITTEN).sum()), "failed": int((status == FAILED).sum()),
        "pending": int((status == PENDING).sum()), "complete": bool((status != PENDING).all()),
        "seconds": round(elapsed, 2),
        "images_per_s": round(run["done"] / max(run["seconds"], 1e-9), 2), "loop_seconds": run["seconds"],
        "phases_s": run["phases_s"], "failure_reasons": run["failure_reasons"],
        "shard": [shard_index, num_shards], "problems": scan.problems,
    }
    log(_summary_text(summary))
    return summary


def embed_rows(store: Store, dataset: ViewDataset, encode, chunks: list[int], *, images_per_batch: int,
               workers: int = 0, skip: dict[int, str] | None = None, pin_memory: bool = False, desc: str = "",
               encoder_name: str = "teacher", progress: bool = True) -> dict:
    """Mapper and writer: encode every view of the rows of `chunks` and write whole chunks.

    `encode` maps normalised pixels (n, 3, S, S) to normalised embeddings (n, D). A batch never
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
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=workers if todo else 0, collate_fn=_collate,
                        pin_memory=pin_memory, prefetch_factor=4 if workers and todo else None)
    timing, reasons = Counter(), Counter()
    done = failed = 0
    buffers: dict[int, dict] = {}

    def buffer(c):  # allocated on first use: a DataComp-scale pass holds one or two chunks at a time
        if c not in buffers:
            sl = store.chunk_slice(c)
            n = sl.stop - sl.start
            buf = buffers[c] = {"emb": np.zeros((n, views, store.dim), np.float16), "error": [""] * n,
                                "view": np.zeros((n, views, 5), np.int32), "status": np.full(n, WRITTEN, np.uint8),
                                "start": sl.start, "left": live[c]}
            for r in range(sl.start, sl.stop):
                if r in skip:
                    buf["error"][r - sl.start], buf["status"][r - sl.start] = skip[r], FAILED
        return buffers[c]

    def flush(c):
        t0 = time.perf_counter()
        buf = buffers.pop(c)
        store.write_chunk(c, buf["emb"], buf["view"], buf["error"], buf["status"])
        timing["writing"] += time.perf_counter() - t0

    for c in chunks:  # chunks with nothing to read are written at once
        if live[c] == 0:
            buffer(c)
            flush(c)
    bar = tqdm(total=todo, unit="img", desc=desc, disable=not progress, dynamic_ncols=True)
    t_loop = t_wait = time.perf_counter()
    for items in loader:
        timing["waiting for images"] += time.perf_counter() - t_wait
        c = items[0][0] // store.chunk_rows
        buf = buffer(c)
        timing["decoding (workers, overlapped)"] += sum(it[4] for it in items)
        ok = [it for it in items if it[1] is not None]
        if ok:
            t0 = time.perf_counter()
            x = normalize(torch.stack([it[1] for it in ok]).flatten(0, 1), pre.mean, pre.std)
            z = encode(x).cpu().view(len(ok), views, -1).numpy().astype(np.float16)
            timing[encoder_name] += time.perf_counter() - t0
            for it, e in zip(ok, z):
                buf["emb"][it[0] - buf["start"]], buf["view"][it[0] - buf["start"]] = e, it[2]
        for it in items:
            if it[1] is None:
                buf["error"][it[0] - buf["start"]], buf["status"][it[0] - buf["start"]] = it[3], FAILED
                reasons[it[3].split(" (")[0]] += 1
                failed += 1
        buf["left"] -= len(items)
        if buf["left"] == 0:
            flush(c)
        done += len(items)
        bar.update(len(items))
        if failed:
            bar.set_postfix(failed=failed)
        t_wait = time.perf_counter()
    bar.close()
    return {"done": done, "failed": failed, "seconds": round(time.perf_counter() - t_loop, 2),
            "phases_s": {k: round(v, 2) for k, v in timing.items()}, "failure_reasons": dict(reasons)}


def _summary_text(s: dict) -> str:
    lines = [f"{s['store']}: {s['processed']} images this run ({s['failed_now']} failed) in {s['seconds']} s, "
             f"{s['images_per_s']} img/s; store has {s['written']} written, {s['failed']} failed, "
             f"{s['pending']} pending of {s['rows']} rows" + (" (complete)" if s["complete"] else "")]
    if s["phases_s"]:
        lines.append("  time: " + ", ".join(f"{k} {v} s" for k, v in s["phases_s"].items()))
    if s["failure_reasons"]:
        lines.append("  skipped: " + ", ".join(f"{n} {r}" for r, n in s["failure_reasons"].items())
                     + " (zsd info STORE lists them)")
    return "\n".join(lines)
