"""Benchmark: `zsd cache-teacher` end to end vs the same teacher's raw forward, in one run.

    python tools/bench_cache.py [--images 256] [--batch-size 32] [--model ViT-B-32]

The teacher is a ViT-B-32-sized open_clip model with random weights (timing only), saved as a
local-dir: folder so that cache-teacher loads it through its real path. Images: real photos
from ../shared/data when present (JPEG, short side 224), else generated 320x240 JPEGs.
(a) cache-teacher: decoding in DataLoader workers + teacher + Zarr writes, images/s of the pass;
(b) raw: the same model's encode_images on pre-decoded, pre-normalised tensors, same batch and
threads. Prints (a)/(b); the target on a 2-core CPU is >= 0.9.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from zsd.cache import cache_teacher, keep_freed_memory
from zsd.teachers import create_teacher

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet1k_sample" / "val"


def make_images(root: Path, n: int) -> str:
    src = sorted(SHARED.rglob("*.JPEG")) + sorted(SHARED.rglob("*.jpg")) if SHARED.exists() else []
    rng = np.random.default_rng(0)
    for i in range(n):
        dst = root / f"{i:05d}.jpg"
        if src:
            dst.write_bytes(src[i % len(src)].read_bytes())
        else:
            Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)).save(dst, quality=90)
    return "real photos from ../shared/data" if src else "generated 320x240 JPEGs"


def save_random_open_clip(name: str, d: Path) -> None:
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.create_model(name)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "open_clip_model.safetensors"))
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": open_clip.get_model_config(name),
                                                         "preprocess_cfg": model.visual.preprocess_cfg}))


def raw_forward(teacher, n: int, batch_size: int) -> float:
    pre = teacher.preprocess
    x = torch.randn(batch_size, 3, pre.size, pre.size)
    teacher.encode_images(x)  # warm-up
    done, t0 = 0, time.perf_counter()
    while done < n:
        teacher.encode_images(x[: min(batch_size, n - done)])
        done += min(batch_size, n - done)
    return n / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    keep_freed_memory()  # cache-teacher sets it on CPU; the raw side gets the same allocator
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "imgs").mkdir()
        (tmp / "model").mkdir()
        what = make_images(tmp / "imgs", args.images)
        save_random_open_clip(args.model, tmp / "model")
        teacher_name = f"local-dir:{tmp / 'model'}"
        teacher = create_teacher(teacher_name, None, "cpu")
        raw_before = raw_forward(teacher, args.images, args.batch_size)
        summary = cache_teacher([str(tmp / "imgs")], str(tmp / "s.zarr"), teacher=teacher_name, pretrained=None,
                                batch_size=args.batch_size, workers=args.workers, device="cpu", progress=False,
                                log=lambda m: None)
        raw_after = raw_forward(teacher, args.images, args.batch_size)
    raw = (raw_before + raw_after) / 2
    e2e = summary["images_per_s"]
    print(f"images: {args.images} {what}; teacher {args.model} (random weights); batch {args.batch_size}; "
          f"torch threads {torch.get_num_threads()}; decode workers {args.workers}")
    print(f"(b) raw teacher forward on pre-decoded tensors: {raw:.2f} img/s (before {raw_before:.2f}, after {raw_after:.2f})")
    print(f"(a) zsd cache-teacher end to end:               {e2e:.2f} img/s  phases {summary['phases_s']}")
    print(f"ratio (a)/(b) = {e2e / raw:.3f}  (target >= 0.9)")


if __name__ == "__main__":
    main()
