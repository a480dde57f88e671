"""How good is the quickstart's student, beyond its 100 test photos? Rotated splits of the shipped pets.

    python tools/quickstart_cv.py [--folds 5] [--out results/quickstart_cv]

`zsd quickstart` trains on 6 photos per breed and tests on 4 (100 test photos of the 25 breeds that
are ImageNet classes), so one run's top-1 carries about +-7 points. This tool reruns the quickstart
itself (`zsd.quickstart.quickstart`, nothing re-implemented) on rotated splits of the same 370
shipped photos: in fold k the test photos of each breed are its sorted photos 2k .. 2k+3 (mod 10),
the other 6 train, so every photo is tested in exactly 2 of the 5 folds and the split sizes are the
quickstart's. Two recipes on the same folds and the same teacher stores:
  two_stage  the quickstart's default: the shipped first-stage student fine-tuned at 64 px;
  scratch    the quickstart before the shipped first stage: the same student from scratch at 128 px.
Reports each recipe's top-1 over all 500 test predictions with a 95 % bootstrap interval that
resamples photos (each photo's 2 predictions stay together), the teacher's, and the paired
difference two_stage - scratch. Needs no data outside the package; about 5 min on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from fidelity import bootstrap_ci, command_line, report_header  # noqa: E402
from proxy_experiment import pets_measure  # noqa: E402
from zsd.cpu import describe_machine  # noqa: E402
from zsd.evaluate import student_embeddings  # noqa: E402
from zsd.quickstart import DATA, quickstart  # noqa: E402
from zsd.store import open_store  # noqa: E402

RECIPES = {"two_stage": {}, "scratch": {"student_res": 128}}
PHOTOS_PER_BREED, TEST_PER_FOLD = 10, 4


def make_fold(k: int, folds: int, dst: Path) -> None:
    """Fold k of the shipped photos as a quickstart data folder of symlinks (train/, test/, class map)."""
    if (dst / "imagenet_classes.json").exists():  # linked last: the fold is complete
        return
    shutil.rmtree(dst, ignore_errors=True)  # a fold cut short by a kill is made again
    step = PHOTOS_PER_BREED // folds
    for breed in sorted(p.name for p in (DATA / "train").iterdir()):
        photos = sorted((DATA / "train" / breed).iterdir()) + sorted((DATA / "test" / breed).iterdir())
        photos.sort(key=lambda p: p.name)
        if len(photos) != PHOTOS_PER_BREED:
            raise SystemExit(f"{breed}: {len(photos)} photos, expected {PHOTOS_PER_BREED}")
        test = {(step * k + j) % PHOTOS_PER_BREED for j in range(TEST_PER_FOLD)}
        for i, photo in enumerate(photos):
            link = dst / ("test" if i in test else "train") / breed / photo.name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(photo.resolve())
    (dst / "imagenet_classes.json").symlink_to((DATA / "imagenet_classes.json").resolve())


def fold_predictions(test_store, students: dict[str, Path], data: Path) -> dict:
    """Per test photo (of the 25 ImageNet breeds): its name and each model's correctness."""
    measure = pets_measure(test_store, data / "imagenet_classes.json")
    out = {}
    for name, run in students.items():
        m = measure(student_embeddings(str(run), test_store, device="cpu", progress=False))
        out[name] = m["student_correct"]
    keys = test_store.keys()
    out.update(teacher=m["teacher_correct"], photo=[Path(str(keys[r])).name for r in m["row"]])
    return out


def per_photo(preds: list[dict], model: str) -> tuple[list[str], np.ndarray]:
    """Mean correctness of each photo over the folds that tested it (the bootstrap's unit)."""
    acc: dict[str, list[float]] = {}
    for p in preds:
        for photo, ok in zip(p["photo"], p[model]):
            acc.setdefault(photo, []).append(float(ok))
    photos = sorted(acc)
    return photos, np.array([np.mean(acc[ph]) for ph in photos])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folds", type=int, default=5, choices=(1, 2, 5), help="Rotated splits (5: each photo twice).")
    ap.add_argument("--only", type=int, default=None, metavar="N",
                    help="Run only the first N of the folds (each photo is then tested 0-2 times; the interval "
                         "still resamples photos).")
    ap.add_argument("--recipes", default="two_stage,scratch", help="Comma-separated subset of: " + ", ".join(RECIPES))
    ap.add_argument("--work", default="cache/quickstart_cv", help="Fold folders, their stores and runs.")
    ap.add_argument("--out", default="results/quickstart_cv", help="results.json and results.md go here.")
    args = ap.parse_args(argv)
    names = args.recipes.split(",")
    if not set(names) <= set(RECIPES):
        ap.error(f"--recipes {args.recipes}: pick from {', '.join(RECIPES)}")
    if args.only is not None and not 1 <= args.only <= args.folds:
        ap.error(f"--only {args.only}: between 1 and --folds ({args.folds})")
    recipes = {r: RECIPES[r] for r in names}
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0, preds, seconds = time.time(), [], {r: [] for r in recipes}
    for k in range(args.only or args.folds):
        data = work / f"fold{k}" / "data"
        make_fold(k, args.folds, data)
        os.environ["ZSD_CACHE"] = str(work / f"fold{k}" / "cache")  # the fold's own teacher stores
        runs = {}
        for name, recipe in recipes.items():
            t = time.time()
            quickstart(data=data, out=str(work / f"fold{k}" / name), device="cpu", log=lambda *a: None, **recipe)
            seconds[name].append(time.time() - t)
            runs[name] = next((work / f"fold{k}" / name).glob("*/student"))
        test_store = open_store(next((work / f"fold{k}" / "cache" / "quickstart").glob("*/pets_test.zarr")))
        preds.append(fold_predictions(test_store, runs, data))
        print(f"fold {k}: " + ", ".join(f"{m} {np.mean(preds[-1][m]):.1%}" for m in ("teacher", *recipes))
              + f"  (+{time.time() - t0:.0f} s)", flush=True)

    report = {"folds": args.folds, "folds_run": len(preds), "test_predictions": int(sum(len(p["photo"]) for p in preds)), "models": {},
              "machine": describe_machine(), "command": command_line(),
              "minutes": round((time.time() - t0) / 60, 1), "chance": 1 / 25}
    for model in ("teacher", *recipes):
        photos, v = per_photo(preds, model)
        report["models"][model] = {"top1": float(v.mean()), "top1_ci95": bootstrap_ci(v), "photos": len(photos),
                                   "per_fold": [float(np.mean(p[model])) for p in preds]}
        if model in seconds:
            report["models"][model]["seconds_per_quickstart"] = float(np.mean(seconds[model]))
    if set(recipes) == set(RECIPES):
        _, a = per_photo(preds, "two_stage")
        _, b = per_photo(preds, "scratch")
        ci = bootstrap_ci(a - b)
        report["two_stage_minus_scratch"] = {"difference": float((a - b).mean()), "ci95": ci,
                                             "significant": bool(ci[0] > 0 or ci[1] < 0)}
    (out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "results.md").write_text(markdown(report))
    print(markdown(report))


def markdown(r: dict) -> str:
    lines = [*report_header(r), f"Quickstart on {r['folds_run']} of {r['folds']} rotated splits of the shipped pets photos ({r['test_predictions']} test "
             f"predictions; 95 % intervals resample photos; chance {r['chance']:.0%}; "
             f"{r['minutes']} min)", "", "| model | top-1 | 95 % CI | per fold |", "|---|---|---|---|"]
    for name, m in r["models"].items():
        lo, hi = m["top1_ci95"]
        lines.append(f"| {name} | {m['top1']:.1%} | [{lo:.1%}, {hi:.1%}] | "
                     + " ".join(f"{x:.0%}" for x in m["per_fold"]) + " |")
    if "two_stage_minus_scratch" in r:
        d = r["two_stage_minus_scratch"]
        lines += ["", f"two_stage - scratch: {d['difference']:+.1%} [{d['ci95'][0]:+.1%}, {d['ci95'][1]:+.1%}]"
                  + (" (significant)" if d["significant"] else " (not significant)")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
