"""Benchmark: zsd's streaming coverage search vs raw faiss.IndexFlatIP on in-RAM fp32 arrays.

    PYTHONPATH=. python tools/bench_coverage.py --train-rows 1000000 --test-rows 10000

Creates (once, reused) a train store and a test store of random unit 512-d vectors in fp16, with
`--leaks` test rows copied from train rows (near-duplicates the audit must count). Then, each in
its own subprocess so that peak RSS is measured per side:
  zsd:  `zsd.coverage.coverage([train], test)`: streams the train store in fp16 blocks -> fp32,
        exact top-k, per-image records and aggregates (everything `zsd coverage` computes without a student);
  raw:  the train store loaded into RAM as one fp32 array, IndexFlatIP.add + search (timed: add + search).
Prints one JSON line: seconds and peak RSS of each side, their ratio, near-duplicates found, and
whether both sides found the same nearest neighbours.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_stores(workdir: Path, train_rows: int, test_rows: int, dim: int, leaks: int, chunk_rows: int = 8192):
    from zsd.store import WRITTEN, create_store, open_store
    from zsd.teachers import teacher_id

    teacher = {"backend": "bench", "model": "random", "weights": "none", "preprocess": {}, "dim": dim}
    train_path, test_path = (workdir / f"train_{train_rows}x{dim}.zarr",
                             workdir / f"test_{test_rows}x{dim}_leaks{leaks}_of{train_rows}.zarr")
    for path, n, seed in ((train_path, train_rows, 0), (test_path, test_rows, 1)):
        if path.exists() and open_store(path).complete():
            continue
        store = create_store(path, keys=[f"r{i:08d}" for i in range(n)], labels=np.full(n, -1), locs=np.zeros((n, 4)),
                             views=1, dim=dim, teacher=teacher, teacher_id=teacher_id(teacher), classnames=[],
                             sources=[], chunk_rows=chunk_rows)
        for c in store.pending_chunks():
            sl = store.chunk_slice(c)
            rng = np.random.default_rng([seed, c])
            x = rng.standard_normal((sl.stop - sl.start, dim), dtype=np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            if seed == 1 and c == 0:  # the first `leaks` test rows are copies of train rows (0, 97, 194, ...)
                rows = np.arange(min(leaks, len(x))) * 97 % train_rows
                x[:len(rows)] = open_store(train_path).group["emb"].oindex[rows, 0, :].astype(np.float32)
            store.write_chunk(c, x[:, None, :], np.zeros((len(x), 1, 5), np.int32), [""] * len(x),
                              np.full(len(x), WRITTEN, np.uint8))
    return train_path, test_path


def peak_rss_gb() -> float:
    """This process's peak RSS. VmHWM, not getrusage's ru_maxrss: that one survives fork + exec,
    so a child would report its parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def side_zsd(train: str, test: str, k: int, block_rows: int, out: str):
    from zsd.coverage import coverage

    t0 = time.perf_counter()
    report = coverage([train], test, k=k, block_rows=block_rows, progress=False, log=lambda m: None)
    seconds = time.perf_counter() - t0
    from zsd.store import open_store

    keys = {k: i for i, k in enumerate(open_store(train).keys())}
    nearest = np.array([keys[r["nearest"]] for r in report["images"]])
    np.save(out, nearest)
    return {"seconds": seconds, "peak_rss_gb": peak_rss_gb(), "near_duplicates": report["near_duplicates"]}


def side_raw(train: str, test: str, k: int, out: str):
    import faiss

    from zsd.store import open_store

    xb = open_store(train).embeddings(view=0).astype(np.float32)
    xq = open_store(test).embeddings(view=0).astype(np.float32)
    t0 = time.perf_counter()
    index = faiss.IndexFlatIP(xb.shape[1])
    index.add(xb)
    _, idx = index.search(xq, k)
    seconds = time.perf_counter() - t0
    np.save(out, idx[:, 0])
    return {"seconds": seconds, "peak_rss_gb": peak_rss_gb()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-rows", type=int, default=1_000_000)
    p.add_argument("--test-rows", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--block-rows", type=int, default=65536)
    p.add_argument("--leaks", type=int, default=100, help="test rows copied from train rows")
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "zsd_bench"))
    p.add_argument("--side", choices=["zsd", "raw"], help=argparse.SUPPRESS)
    p.add_argument("--train", help=argparse.SUPPRESS)
    p.add_argument("--test", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.side == "zsd":
        print(json.dumps(side_zsd(a.train, a.test, a.k, a.block_rows, a.out)))
        return
    if a.side == "raw":
        print(json.dumps(side_raw(a.train, a.test, a.k, a.out)))
        return

    workdir = Path(a.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train, test = make_stores(workdir, a.train_rows, a.test_rows, a.dim, a.leaks)
    build_s = time.perf_counter() - t0
    results = {}
    for side in ("raw", "zsd"):
        cmd = [sys.executable, __file__, "--side", side, "--train", str(train), "--test", str(test), "--k", str(a.k),
               "--block-rows", str(a.block_rows), "--out", str(workdir / f"nn_{side}.npy")]
        results[side] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    same = float((np.load(workdir / "nn_zsd.npy") == np.load(workdir / "nn_raw.npy")).mean())
    print(json.dumps({
        "train_rows": a.train_rows, "test_rows": a.test_rows, "dim": a.dim, "k": a.k, "block_rows": a.block_rows,
        "store_build_s": round(build_s, 1), "raw": results["raw"], "zsd": results["zsd"],
        "ratio": round(results["zsd"]["seconds"] / results["raw"]["seconds"], 3),
        "same_nearest_fraction": same, "leaks_planted": a.leaks,
    }))


if __name__ == "__main__":
    main()
