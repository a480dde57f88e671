"""Benchmark: DataComp scale on one machine, without a teacher.

Builds >= 2,000 tiny webdataset shards (one 32x32 JPEG each) and a store of --rows rows x 512
fp16 embeddings written directly in large blocks (random unit vectors; row i's image is shard
i % shards, so the trainer really decodes images). Then, in one run, it reports:
  index     scanning the shards with an empty shard index (tar headers) vs with the saved index:
            the start-up of a first teacher pass vs a resume (target second/first <= 0.1), best of 3;
            shards of one tiny sample in the page cache are the worst case (a DataComp shard has
            ~10,000 members in ~1 GB: its first scan costs far more, the resume the same)
  keys      a resume's check that the store's keys are the sources': the store's key array read and
            compared a block of chunks at a time (zsd now) vs as one list of Python strings (before),
            time and tracemalloc peak
  train     peak memory of `zsd train --workers 4 --in-ram no` on the store (a few steps of a tiny
            student at 32 px), summed over the trainer and its workers: RSS (shared pages counted
            in every process) and PSS (shared pages split); target <= 2 GB whatever --rows
  targets   rows/s of the trainer's target loader (TrainTargets.targets over the epoch order) vs
            raw zarr reads of the same number of rows chunk by chunk (target >= 0.9)
  info      `python -m zsd info STORE` wall time (a fresh process) and Store.info() in this one

    python tools/bench_scale.py                     # 1 M rows, ~1 GB store; minutes on 2 cores
    python tools/bench_scale.py --rows 10000000     # ~10 GB store: the row-count independence
    python tools/bench_scale.py --rows 10000000 --dry-run   # sizes and free disk, writes nothing
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DIM = 512
BLOCK = 1 << 16  # rows per write: 64 MiB of embeddings, one zarr call over 128 chunks


def write_shards(root: Path, n: int) -> list[tuple[int, int]]:
    """`n` shards of one JPEG + json each; returns each shard's (offset, size) of its image."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    where = []
    for s in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
        with tarfile.open(root / f"{s:06d}.tar", "w") as tar:
            for ext, data in ((".jpg", buf.getvalue()), (".json", json.dumps({"uid": f"u{s}"}).encode())):
                info = tarfile.TarInfo(f"{s:06d}{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        where.append((512, len(buf.getvalue())))  # the first member's data follows its 512-byte header
    return where


def write_store(path: Path, rows: int, shards: list[str], where, chunk_rows: int):
    """A complete store of `rows` rows: index arrays, then embeddings, boxes and status in BLOCK-row writes."""
    from zsd.store import WRITTEN, create_store
    from zsd.teachers import teacher_id
    from zsd.views import Preprocess

    pre = Preprocess(32, 32, "bicubic", (0.48, 0.46, 0.41), (0.27, 0.26, 0.28))
    teacher = {"backend": "bench", "model": "random", "weights": "none", "preprocess": pre.to_dict(), "dim": DIM}
    desc = {"kind": "webdataset", "spec": str(Path(shards[0]).parent), "shards": shards}
    store = create_store(path, keys=[], labels=[], locs=np.zeros((0, 4)), views=1, dim=DIM, teacher=teacher,
                         teacher_id=teacher_id(teacher), classnames=[], sources=[desc], chunk_rows=chunk_rows)
    for name in ("emb", "key", "label", "loc", "view", "error", "status"):
        arr = store.group[name]
        arr.resize((rows, *arr.shape[1:]))
    rng = np.random.default_rng(0)
    unit = rng.standard_normal((BLOCK, 1, DIM), dtype=np.float32)
    unit = (unit / np.linalg.norm(unit, axis=-1, keepdims=True)).astype(np.float16)
    where = np.array(where, np.int64)
    g = store.group
    for start in range(0, rows, BLOCK):
        n = min(BLOCK, rows - start)
        r = np.arange(start, start + n)
        part = r % len(shards)
        g["key"][start:start + n] = np.char.add("u", r.astype(str))
        g["loc"][start:start + n] = np.stack([np.zeros(n, np.int64), part, where[part, 0], where[part, 1]], 1)
        g["emb"][start:start + n] = np.roll(unit, start // BLOCK, axis=0)[:n]
        g["view"][start:start + n] = np.broadcast_to(np.array([0, 0, 32, 32, 0], np.int32), (n, 1, 5))
        g["error"][start:start + n] = np.full(n, "", dtype=str)
        g["status"][start:start + n] = WRITTEN
    return store


def tree_memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in bytes summed over `pid` and its descendants."""
    import psutil

    rss = pss = 0
    try:
        procs = [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return 0, 0
    for p in procs:
        try:
            m = p.memory_full_info()
            rss, pss = rss + m.rss, pss + m.pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return rss, pss


def measure_train(store: Path, run: Path, steps: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "zsd", "train", "--targets", str(store), "--out", str(run), "--student",
           "test_efficientnet_gn", "--student-res", "32", "--steps", str(steps), "--batch-size", "64",
           "--workers", "4", "--in-ram", "no", "--pixel-cache", "no", "--device", "cpu", "--precision", "fp32"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak_rss = peak_pss = 0
    while proc.poll() is None:
        rss, pss = tree_memory(proc.pid)
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        time.sleep(0.2)
    out = proc.stdout.read()
    if proc.returncode:
        raise SystemExit(f"zsd train failed:\n{out[-3000:]}")
    return {"seconds": time.perf_counter() - t0, "peak_rss": peak_rss, "peak_pss": peak_pss}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--shards", type=int, default=2000)
    ap.add_argument("--chunk-rows", type=int, default=512)
    ap.add_argument("--steps", type=int, default=40, help="trainer steps of 64 images for the memory figure")
    ap.add_argument("--target-rows", type=int, default=200_000, help="rows read by the target loader and raw")
    ap.add_argument("--dir", help="a new work folder, kept (default: a temporary one, removed at the end)")
    ap.add_argument("--dry-run", action="store_true", help="print the sizes and the free disk; write nothing")
    args = ap.parse_args()

    need = args.rows * DIM * 2 + args.rows * (4 * 8 + 5 * 4 + 4 + 1 + 16)
    at = Path(args.dir or tempfile.gettempdir())
    free = shutil.disk_usage(at if at.exists() else at.parent).free
    print(f"{args.rows:,} rows x {DIM} fp16 (~{need / 2**30:.1f} GiB) in chunks of {args.chunk_rows}, "
          f"{args.shards:,} shards; {free / 2**30:.0f} GiB free at {at}")
    if args.dry_run or need * 1.2 > free:
        if not args.dry_run:
            raise SystemExit(f"not enough disk at {at}")
        return
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="zsd_bench_scale_"))
    from zsd.loader import TrainTargets
    from zsd.cache import same_keys
    from zsd.sources import ShardIndex, scan_sources
    from zsd.store import open_store

    try:
        t0 = time.perf_counter()
        where = write_shards(root / "shards", args.shards)
        t_shards = time.perf_counter() - t0
        shards = sorted(str(p) for p in (root / "shards").glob("*.tar"))

        index_file = root / "shard-index.npz"
        t_first = t_second = float("inf")  # best of 3 of each: the machine may be shared
        for _ in range(3):
            index_file.unlink(missing_ok=True)
            t0 = time.perf_counter()
            index = ShardIndex(index_file)
            first = scan_sources([str(root / "shards")], log=lambda m: None, index=index)
            index.save()
            t_first = min(t_first, time.perf_counter() - t0)
            t0 = time.perf_counter()
            second = scan_sources([str(root / "shards")], log=lambda m: None, index=ShardIndex(index_file))
            t_second = min(t_second, time.perf_counter() - t0)
        assert second.keys == first.keys and second.locs == first.locs and len(first) == args.shards

        t0 = time.perf_counter()
        store = write_store(root / "s.zarr", args.rows, shards, where, args.chunk_rows)
        t_store = time.perf_counter() - t0
        print(f"wrote {args.shards} shards in {t_shards:.1f} s, the store in {t_store:.1f} s "
              f"({store.bytes_on_disk() / 2**30:.2f} GiB)")

        # a resume's key check: the scan's keys against the store's, a block at a time vs the former
        # list of every stored key (time and traced peak memory; the scan's own list is not counted)
        keys = [f"u{i}" for i in range(args.rows)]
        check = {}
        for name, same in (("blocks", lambda s: same_keys(s, keys, s.rows)), ("list", lambda s: list(s.keys()) == keys)):
            s = open_store(root / "s.zarr")
            tracemalloc.start()
            t0 = time.perf_counter()
            assert same(s)
            check[name] = (time.perf_counter() - t0, tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()

        # target loader vs raw zarr chunk reads, the same number of rows (page cache warm for both)
        n = min(args.target_rows, args.rows)
        raw = open_store(root / "s.zarr")
        t0 = time.perf_counter()
        got = 0
        for c in range(raw.n_chunks):
            got += len(raw.group["emb"][raw.chunk_slice(c)])
            if got >= n:
                break
        t_raw = time.perf_counter() - t0
        raw_rows = got
        targets = TrainTargets([str(root / "s.zarr")], in_ram="no", log=lambda m: None)
        t0 = time.perf_counter()
        got = 0
        for part in targets.epoch_samples(0, 0):
            for b in range(0, len(part), 256):
                got += len(targets.targets(part[b:b + 256]))
            if got >= n:
                break
        t_loader = time.perf_counter() - t0

        t0 = time.perf_counter()
        open_store(root / "s.zarr").info()
        t_info_lib = time.perf_counter() - t0
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "zsd", "info", str(root / "s.zarr")], check=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL)
        t_info = time.perf_counter() - t0

        mem = measure_train(root / "s.zarr", root / "run", args.steps)
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)

    loader, rawr = got / t_loader, raw_rows / t_raw
    from zsd.cpu import describe_machine
    print(f"\n{'rows':>12} {args.rows:,}   {describe_machine()}")
    print(f"index     first scan {t_first:7.2f} s   resume scan {t_second:7.3f} s   "
          f"ratio {t_second / t_first:.3f}  (target <= 0.1)")
    print(f"keys      resume check of {args.rows:,} keys: by blocks {check['blocks'][0]:.2f} s, "
          f"{check['blocks'][1] / 2**20:.0f} MiB peak   list of all keys {check['list'][0]:.2f} s, "
          f"{check['list'][1] / 2**20:.0f} MiB peak")
    print(f"train     peak RSS {mem['peak_rss'] / 2**30:.2f} GiB   peak PSS {mem['peak_pss'] / 2**30:.2f} GiB "
          f"(trainer + 4 workers, {args.steps} steps in {mem['seconds']:.0f} s; target <= 2 GB)")
    print(f"targets   loader {loader:,.0f} rows/s   raw zarr chunks {rawr:,.0f} rows/s   "
          f"ratio {loader / rawr:.2f}  (target >= 0.9)")
    print(f"info      zsd info {t_info:.2f} s (fresh process)   Store.info() {t_info_lib:.3f} s")


if __name__ == "__main__":
    main()
