"""Calibration experiment (#31): does `zsd calibrate`'s guarantee hold, and how much does it accept?

    python tools/calibration_experiment.py --run RUN_DIR [--val STORE] [--train STORE] [--splits 20]
        [--alpha 0.05] [--delta 0.1] [--out results/calibration]

On the CIFAR-10 fidelity student (`tools/fidelity.py`: RUN_DIR its seed-0 run, the val and train
stores in the cache dir's fidelity/ folder), classified as fidelity does (class prototypes of the
train store), the val photos are split `--splits` times at random into calibration and holdout
halves. Per split and per score (margin, msp, combined, auto): the certified fraction, the holdout's
accepted fraction and realised disagreement; beside them the oracle: the largest top-score set of
the holdout photos themselves whose disagreement is <= alpha (no guarantee: chosen on what it is
measured on). Writes OUT/results.json and OUT/results.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from fidelity import command_line, report_header, shown  # noqa: E402

from zsd.guarantee import SCORES, calibrate_arrays, compute_score, oracle  # noqa: E402
from zsd.cpu import describe_machine  # noqa: E402
from zsd.classes import prototype_classifier  # noqa: E402
from zsd.evaluate import student_embeddings  # noqa: E402
from zsd.store import cache_dir, open_store  # noqa: E402

ROWS = (*SCORES, "auto")


def predictions(run: str, val, train) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(student cosines (n, K), teacher top-1 (n,), keys) on the val photos both embedded, as fidelity measures."""
    protos = prototype_classifier(train, val.classnames).astype(np.float64)
    emb = student_embeddings(run, val, device="cpu", progress=False)
    ok = val.written() & emb.written() & (val.labels() >= 0)
    t = val.embeddings(view=0)[ok].astype(np.float64)
    s = emb.embeddings(view=0)[ok].astype(np.float64)
    s /= np.linalg.norm(s, axis=1, keepdims=True)
    return s @ protos.T, (t @ protos.T).argmax(1), [str(k) for k in val.keys()[ok]]


def one_split(cos, teacher, keys, classnames, alpha, delta, seed) -> dict:
    report = calibrate_arrays(keys, cos, teacher, None, classnames, alpha=alpha, delta=delta, score="auto",
                              holdout=0.5, seed=seed)
    hold = np.array([r["part"] == "holdout" for r in report["records"]])
    losses = (cos.argmax(1) != teacher).astype(float)
    out = {}
    for name, row in report["comparison"].items():
        spec = report["score"] if name == report["score"]["name"] else {"name": name, "logit_scale": 100.0}
        if name == "combined" and report["score"]["name"] != "combined":
            spec = None  # its fitted weights are not in the comparison: its oracle is the auto row's when chosen
        out[name] = {"certified": row["certified_fraction"], "holdout_accepted": row["holdout"]["accepted_fraction"],
                     "holdout_risk": row["holdout"]["risk"],
                     "oracle": oracle(compute_score(spec, cos[hold]), losses[hold], alpha)["accepted_fraction"]
                     if spec else None}
    h = report["holdout"]
    out["auto"] = {"certified": report["result"]["accepted_fraction"], "holdout_accepted": h["accepted_fraction"],
                   "holdout_risk": h["risk"], "chosen": report["score"]["name"],
                   "oracle": report["oracle_holdout"]["accepted_fraction"]}
    return out


def summary(splits: list[dict], alpha: float) -> dict:
    out = {}
    for name in ROWS:
        rows = [s[name] for s in splits if name in s]
        risks = [r["holdout_risk"] for r in rows]
        oracle_values = [r["oracle"] for r in rows if r["oracle"] is not None]
        out[name] = {
            "splits": len(rows),
            "holdout_risk_le_alpha": sum(r is None or r <= alpha for r in risks),  # None: nothing accepted
            **{f"{key}_{stat}": float(f(np.array([r[key] for r in rows]))) for key in ("certified", "holdout_accepted")
               for stat, f in (("mean", np.mean), ("std", np.std), ("min", np.min), ("max", np.max))},
            "oracle_mean": float(np.mean(oracle_values)) if oracle_values else None,
            "oracle_std": float(np.std(oracle_values)) if oracle_values else None,
            "mean_holdout_risk": float(np.mean([r for r in risks if r is not None])) if any(
                r is not None for r in risks) else None,
        }
    if any("chosen" in s["auto"] for s in splits):
        out["auto"]["chosen"] = {n: sum(s["auto"]["chosen"] == n for s in splits) for n in SCORES}
    return out


def markdown(results: dict) -> str:
    a = results["alpha"]
    lines = ["# Calibrated agreement guarantee on the CIFAR-10 fidelity student", "", *report_header(results),
             f"Student {results['run']}, val store {results['val_store']} ({results['n_val']} photos; agreement with "
             f"the teacher {100 * results['agreement']:.1f} %), prototypes of {results['train_store']}. "
             f"{results['splits']} random calibration/holdout halves; alpha {a}, delta {results['delta']}.", "",
             "| score | holdout disagreement <= alpha | certified (calibration) | accepted on holdout | "
             "oracle on holdout | mean realised disagreement |", "|---|---|---|---|---|---|"]
    for name, s in results["summary"].items():
        oracle_text = "-" if s["oracle_mean"] is None else f"{100 * s['oracle_mean']:.1f} ± {100 * s['oracle_std']:.1f} %"
        risk = "-" if s["mean_holdout_risk"] is None else f"{100 * s['mean_holdout_risk']:.2f} %"
        lines.append(f"| {name} | {s['holdout_risk_le_alpha']} of {s['splits']} | "
                     f"{100 * s['certified_mean']:.1f} ± {100 * s['certified_std']:.1f} % "
                     f"({100 * s['certified_min']:.1f}–{100 * s['certified_max']:.1f}) | "
                     f"{100 * s['holdout_accepted_mean']:.1f} ± {100 * s['holdout_accepted_std']:.1f} % | "
                     f"{oracle_text} | {risk} |")
    chosen = results["summary"]["auto"].get("chosen")
    lines += ["", "± is the standard deviation over splits; the range is min–max. The oracle is the largest top-score "
              "set of the holdout photos whose disagreement is <= alpha, chosen on those photos (for auto: of the "
              "score auto chose). combined and auto test on two thirds of the calibration half (the other third "
              "fits and plans)." + (f" auto chose: {chosen}." if chosen else "")]
    return "\n".join(lines) + "\n"


def main() -> None:
    fid = cache_dir() / "fidelity"
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="The fidelity student's run folder (e.g. .../runs/seed0).")
    ap.add_argument("--val", default=str(fid / "cifar10_val.zarr"), help="The val store (fidelity's).")
    ap.add_argument("--train", default=str(fid / "cifar10_train_v4.zarr"), help="The train store (prototypes).")
    ap.add_argument("--splits", type=int, default=20)
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--delta", type=float, default=0.1)
    ap.add_argument("--out", default="results/calibration")
    args = ap.parse_args()
    val, train = open_store(args.val), open_store(args.train)
    cos, teacher, keys = predictions(args.run, val, train)
    splits = [one_split(cos, teacher, keys, val.classnames, args.alpha, args.delta, seed) for seed in range(args.splits)]
    results = {"command": command_line(), "machine": describe_machine(), "run": shown(args.run),
               "val_store": shown(args.val), "train_store": shown(args.train), "n_val": len(keys),
               "agreement": float((cos.argmax(1) == teacher).mean()), "alpha": args.alpha, "delta": args.delta,
               "splits": args.splits, "summary": summary(splits, args.alpha), "per_split": splits}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
