"""Benchmark: training from cached targets vs. running the teacher online vs. the student alone.

In one run, with the same student, batch, threads and precision:
  (a) zsd training from a store (`zsd.train.train`: decode + rebuild the teacher view in
      DataLoader workers, resize, student forward+backward+step; targets from RAM),
  (b) the usual online distillation (open_clip --distill-model style): the same decoded teacher
      view goes through the teacher (inference) on every batch, then the student trains on it,
  (c) the limit: the student's forward+backward+step on pre-loaded tensors,
and T, the teacher's inference throughput on pre-loaded tensors. With S = (c):
  targets (a)/(c) >= 0.9 and (a)/(b) >= 0.9 x (1 + S/T)
(online costs 1/S + 1/T per image, cached 1/S, so a perfect cached trainer reaches (1 + S/T)).

The teacher is open_clip ViT-B-32 with random weights (`open_clip.create_model('ViT-B-32')`, no
download): its speed is that of the real one. The store's targets are random unit vectors, written
with the views and sources `zsd cache-teacher` would record: (a)'s cost does not depend on their
values, and this skips a teacher pass over the images. Images are synthetic JPEGs (320x240) unless
--images points to a folder (e.g. ../shared/data/food10/train).

    python tools/bench_train.py --quick          # ~1-2 min on 2 cores
    python tools/bench_train.py                  # batch 32, 6 timed steps each
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset


def make_images(root: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        # smooth random images, so JPEG decoding costs what it costs for photos
        small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((320, 240), Image.BICUBIC)
        d = root / f"class{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        img.save(d / f"{i:05d}.jpg", quality=88)
    return root


def make_store(images: Path, path: Path, teacher_pre, views: int, dim: int):
    """A store as `zsd cache-teacher` writes it, with random unit vectors as embeddings."""
    from zsd.sources import RowReader, load_rgb, scan_sources
    from zsd.store import WRITTEN, create_store
    from zsd.views import sample_views

    scan = scan_sources([str(images)])
    fp = {"backend": "open_clip", "model": "ViT-B-32", "weights": "random:bench", "preprocess": teacher_pre.to_dict(),
          "dim": dim}
    store = create_store(path, keys=scan.keys, labels=scan.labels, locs=scan.locs, views=views, dim=dim, teacher=fp,
                         teacher_id="bench-random", classnames=scan.classnames, sources=scan.descs,
                         chunk_rows=len(scan.keys))
    reader = RowReader(scan.descs)
    params = []
    for row, (key, loc) in enumerate(zip(scan.keys, scan.locs)):
        img = load_rgb(reader.read(key, loc))
        params.append(sample_views(img.width, img.height, views, 0, row, (0.9, 1.0), teacher_pre))
    emb = F.normalize(torch.randn(len(scan.keys), views, dim), dim=-1).numpy()
    store.write_chunk(0, emb, np.stack(params), [""] * len(scan.keys), np.full(len(scan.keys), WRITTEN, np.uint8))
    return store


class OnlineDataset(Dataset):
    """The same decoded teacher view as (a), returned at the teacher's and the student's resolution."""

    def __init__(self, view_dataset, rows):
        self.ds, self.rows = view_dataset, rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, j):
        from zsd.views import normalize, resize_pixels

        row, view = self.rows[j]
        px = self.ds.teacher_pixels(0, row, view)
        t = normalize(px, self.ds.teacher_pre.mean, self.ds.teacher_pre.std)
        sp = self.ds.student_pre
        s = normalize(resize_pixels(px, sp.size, sp.interpolation), sp.mean, sp.std)
        return t, s


def student_step(model, opt, x, target, autocast):
    with autocast:
        s = model(x.contiguous(memory_format=torch.channels_last))
    loss = (F.normalize(s.float(), dim=-1) - target).norm(dim=-1).mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", default="efficientnet_b0")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per measurement (after one warm-up step)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--images", default=None, help="image folder to use instead of synthetic images")
    ap.add_argument("--quick", action="store_true", help="batch 16, 3 timed steps")
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args()
    if args.quick:
        args.batch_size, args.steps = 16, 3
    torch.set_num_threads(args.threads)

    import open_clip

    from zsd.data import TrainTargets, ViewDataset
    from zsd.student import Student, student_preprocess
    from zsd.teachers import _preprocess_from_open_clip
    from zsd.train import train

    B, steps = args.batch_size, args.steps
    n_rows = B * (steps + 1)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if args.precision == "bf16" else nullcontext()
    teacher = open_clip.create_model("ViT-B-32").eval()
    teacher_pre = _preprocess_from_open_clip(teacher.visual.preprocess_cfg)
    dim = teacher.visual.output_dim
    student_pre = student_preprocess(args.student)
    tmp = Path(tempfile.mkdtemp(prefix="bench_train_"))
    if args.images:
        images = Path(args.images)
        if not images.is_dir():
            raise SystemExit(f"--images {images} is missing")
    else:
        images = make_images(tmp / "images", n_rows)
    store = make_store(images, tmp / "targets.zarr", teacher_pre, views=2, dim=dim)
    if store.rows < n_rows:
        raise SystemExit(f"{images} has {store.rows} images; need {n_rows} for batch {B} x {steps + 1} steps")
    print(f"student {args.student} @ {student_pre.size}px, teacher ViT-B-32 (random) @ {teacher_pre.size}px, "
          f"batch {B}, {steps} timed steps, {args.threads} threads, {args.workers} workers, {args.precision}")
    results = {}

    # (c) the student alone on pre-loaded tensors; S
    torch.manual_seed(0)
    model = Student(args.student, dim, student_pre.size).to(memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4)
    x = torch.randn(B, 3, student_pre.size, student_pre.size)
    target = F.normalize(torch.randn(B, dim), dim=-1)
    student_step(model, opt, x, target, autocast)
    t0 = time.perf_counter()
    for _ in range(steps):
        student_step(model, opt, x, target, autocast)
    results["c_student_only"] = B * steps / (time.perf_counter() - t0)
    print(f"(c) student fwd+bwd+step on tensors: {results['c_student_only']:.2f} img/s")

    # T: teacher inference on pre-loaded tensors
    xt = torch.randn(B, 3, teacher_pre.size, teacher_pre.size)
    with torch.inference_mode(), autocast:
        teacher.encode_image(xt)
        t0 = time.perf_counter()
        for _ in range(steps):
            teacher.encode_image(xt)
    results["T_teacher_inference"] = B * steps / (time.perf_counter() - t0)
    print(f"T   teacher inference on tensors:     {results['T_teacher_inference']:.2f} img/s")

    # (a) zsd training from the store; images/s of the timed steps from its log
    run = tmp / "run"
    train([str(store.path)], args.student, str(run), steps=steps + 1, batch_size=B, workers=args.workers,
          device="cpu", precision=args.precision, progress=False, log=lambda m: None)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    timed = [r for r in log if "loss" in r][1:]
    results["a_zsd_cached"] = sum(r["images"] for r in timed) / sum(r["images"] / r["images_per_s"] for r in timed)
    print(f"(a) zsd train from cached targets:    {results['a_zsd_cached']:.2f} img/s")

    # (b) online teacher on every batch, same decoded views, same student
    torch.manual_seed(0)
    model = Student(args.student, dim, student_pre.size).to(memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4)
    targets = TrainTargets([str(store.path)], log=lambda m: None)
    order = targets.epoch_order(0, 0)
    online = OnlineDataset(ViewDataset(targets, student_pre), [(int(r), int(v)) for _, r, v in order])
    loader = DataLoader(online, batch_size=B, num_workers=args.workers, drop_last=True)
    times = []
    t0 = time.perf_counter()
    for i, (xt, xs) in enumerate(loader):
        if i > steps:
            break
        with torch.inference_mode(), autocast:
            tz = F.normalize(teacher.encode_image(xt).float(), dim=-1)
        student_step(model, opt, xs, tz.clone(), autocast)
        times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
    results["b_online_teacher"] = B * (len(times) - 1) / sum(times[1:])
    print(f"(b) online teacher + student:         {results['b_online_teacher']:.2f} img/s")

    S, T = results["c_student_only"], results["T_teacher_inference"]
    results["a_over_c"] = results["a_zsd_cached"] / S
    results["a_over_b"] = results["a_zsd_cached"] / results["b_online_teacher"]
    results["bound_a_over_b"] = 0.9 * (1 + S / T)
    print(f"(a)/(c) = {results['a_over_c']:.2f}  (target >= 0.9)")
    print(f"(a)/(b) = {results['a_over_b']:.2f}  (target >= 0.9 x (1 + S/T) = {results['bound_a_over_b']:.2f})")
    results.update(vars(args))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
