"""Benchmark: gloo data-parallel training vs one process, both through `zsd train` on the CPU.

Issue 11's target: 2 gloo processes train at >= 0.8 x 2 x the images/s of one process, where the
machine has the cores for it. Each process gets one torch thread (OMP_NUM_THREADS=1) and the same
per-rank batch, so 2 processes need 2 free cores; the core count and load average are printed
beside the figure, as on a shared machine the second core may be busy with something else.

  1 process    python -m zsd train --batch-size B            (B images per step)
  2 processes  python -m torch.distributed.run --standalone --nproc-per-node 2 -m zsd train
               --batch-size 2B                               (B per rank, gradients all-reduced by gloo)

The store is written here, as `zsd cache-teacher` would record it (bench_train.make_store: random
unit embeddings, the views of generated JPEGs); the student inputs come from the pixel cache,
rendered once by a warm-up run before anything is timed, so decoding does not dominate. A run's
images/s is that of its steps after the first `--skip`, from its own log.jsonl (the time a step
takes, all-reduces included; not the start-up). The configurations are interleaved round by
round and the best round of each counts: other processes on a shared machine slow some down.

    python tools/bench_ddp.py                       # ~2 min on 2 cores
    python tools/bench_ddp.py --student efficientnet_b0 --student-res 96 --batch-size 16
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(TOOLS))


def zsd_train(env: dict, nproc: int, args: list[str]) -> None:
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)] if nproc > 1 else []
    res = subprocess.run([sys.executable, *launch, "-m", "zsd", "train", *args], env=env, capture_output=True,
                         text=True)
    if res.returncode:
        raise SystemExit(f"zsd train ({nproc} process(es)) failed:\n{res.stderr[-3000:]}")


def steady_images_per_s(run: Path, skip: int) -> float:
    """Images over seconds of the logged steps after the first `skip` (each record: its images and img/s)."""
    steps = [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "loss" in r][skip:]
    return sum(r["images"] for r in steps) / sum(r["images"] / r["images_per_s"] for r in steps)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", default="mobilenetv3_small_050")
    ap.add_argument("--student-res", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32, help="images per step of each process")
    ap.add_argument("--steps", type=int, default=40, help="steps per run")
    ap.add_argument("--skip", type=int, default=5, help="first steps of a run left out of its images/s")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the best of each configuration counts")
    ap.add_argument("--images", type=int, default=256, help="generated images in the store (2 views each)")
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    args = ap.parse_args()
    if args.steps <= args.skip:
        raise SystemExit("--steps must exceed --skip")

    from bench_train import make_images, make_store

    from zsd.views import Preprocess

    tmp = Path(tempfile.mkdtemp(prefix="zsd_bench_ddp_"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "ZSD_CACHE": str(tmp / "cache")}
    try:
        teacher_pre = Preprocess(args.student_res, args.student_res, "bicubic", (0.48, 0.46, 0.41), (0.27, 0.26, 0.28))
        store = make_store(make_images(tmp / "images", args.images), tmp / "targets.zarr", teacher_pre, views=2,
                           dim=512)

        def run(name: str, nproc: int, steps: int) -> float:
            out = tmp / name
            zsd_train(env, nproc, ["--targets", str(store.path), "--student", args.student, "--student-res",
                                   str(args.student_res), "--batch-size", str(nproc * args.batch_size),
                                   "--steps", str(steps), "--precision", args.precision, "--device", "cpu",
                                   "--workers", "0", "--pixel-cache", "yes", "--save-every", str(steps),
                                   "--out", str(out)])
            return steady_images_per_s(out, args.skip) if steps > args.skip else 0.0

        t0 = time.perf_counter()
        run("warmup", 1, 1)  # renders the pixel cache that every timed run then reads
        from zsd.cpu import describe_machine
        print(f"{args.student} @ {args.student_res} px, {args.batch_size} images per process and step, "
              f"{args.precision}, 1 torch thread per process, {args.steps} steps per run ({args.skip} not timed); "
              f"{describe_machine()}", flush=True)
        rounds = {1: [], 2: []}
        for r in range(args.rounds):
            for nproc in rounds:
                rounds[nproc].append(run(f"r{r}p{nproc}", nproc, args.steps))
            print(f"round {r + 1}: 1 process {rounds[1][-1]:.1f} img/s, 2 processes {rounds[2][-1]:.1f} img/s",
                  flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    one, two = max(rounds[1]), max(rounds[2])
    ratio = two / (2 * one)
    print(f"\nbest of {args.rounds}: 1 process {one:.1f} img/s, 2 gloo processes {two:.1f} img/s; "
          f"2-proc / (2 x 1-proc) = {ratio:.2f} (target >= 0.8 where 2 cores are free)")
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
