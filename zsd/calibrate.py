"""`zsd calibrate`: the calibrated guarantee of a student on real photos (zsd.guarantee has the procedure).

Per test photo, the teacher's and the student's zero-shot predictions as `zsd eval` makes them; the
guarantee of zsd.guarantee chosen on a calibration part and checked on a holdout part; a report, a
per-photo JSON, a risk-coverage plot, and the record written into the student's run folder.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from zsd.classes import build_classifier
from zsd.dist import resolve_device
from zsd.errors import ZsdError, check_at_least, write_atomic
from zsd.evaluate import check_student_teacher, evaluated_rows, prepare_test_store, student_embeddings
from zsd.guarantee import calibrate_arrays, check_level, guarantee, write_guarantee
from zsd.student import load_student, resolve_student, student_fingerprint


# ---------------------------------------------------------------- reading a test set and a student

def load_predictions(test: str, student: str, *, teacher: str | None = None, pretrained: str | None = None,
                     templates: str | None = None, classnames: str | None = None, classes_from: str | None = None,
                     device: str = "auto", batch_size: int = 128, workers: int | None = None, progress: bool = True,
                     log=print) -> dict:
    """Per test photo, as `zsd eval` computes them: keys, labels (None when unlabelled), the teacher's
    top-1 and the student's cosines to the class embeddings, and the store, classifier and student."""
    student = resolve_student(student)  # a typo fails before the teacher runs
    store = prepare_test_store(test, teacher, pretrained, device, workers, progress, log)
    classifier = build_classifier(store, classes_from=classes_from, classnames=classnames, templates=templates,
                                  pretrained=pretrained, device=device)
    labelled = bool(store.classnames) and bool((store.labels() >= 0).any())
    if labelled:
        mapped, rows, _ = evaluated_rows(store, classifier, log)
    else:  # the disagreement with the teacher needs no labels: every written photo counts
        mapped, rows = None, store.written()
    z = classifier.weights.astype(np.float64)
    model, config = load_student(student, resolve_device(device))
    check_student_teacher(student, config, store, log)
    emb = student_embeddings(student, store, model, config, device=next(model.parameters()).device,
                             batch_size=batch_size, workers=workers, progress=progress)
    t = store.embeddings(view=0).astype(np.float64)
    s = emb.embeddings(view=0).astype(np.float64)
    rows &= emb.written() & np.isfinite(t).all(axis=1) & np.isfinite(s).all(axis=1)
    s = s[rows] / np.linalg.norm(s[rows], axis=1, keepdims=True)  # as the exported graph normalises
    return {"keys": [str(k) for k in store.keys()[rows]], "labels": mapped[rows] if labelled else None,
            "teacher_pred": (t[rows] @ z.T).argmax(1),
            "student_cos": s @ z.T, "classnames": classifier.names, "classifier": classifier.info, "store": store,
            "config": config, "weights": student_fingerprint(student, config)["weights"]}


def calibrate(test: str, student: str, *, alpha: float = 0.05, delta: float = 0.05, risk: str = "disagreement",
              score: str = "margin", holdout: float = 0.5, seed: int = 0, record: bool = True, log=print,
              **predictions) -> dict:
    """`zsd calibrate`: the report of `calibrate_arrays` on TEST and the student, with the guarantee
    (also written into the student's run folder as calibration.json unless `record` is False)."""
    check_level(alpha, delta)
    check_at_least("--holdout", holdout, 0)
    p = load_predictions(test, student, log=log, **predictions)
    report = calibrate_arrays(p["keys"], p["student_cos"], p["teacher_pred"], p["labels"], p["classnames"],
                              alpha=alpha, delta=delta, risk=risk, score=score, holdout=holdout, seed=seed)
    report.update(test=str(p["store"].path), student=str(student), classifier=p["classifier"])
    calibration_keys = [r["key"] for r in report["records"] if r["part"] == "calibration"]
    report["guarantee"] = guarantee(report, calibration_keys=calibration_keys, teacher_id=p["store"].teacher_id,
                                    classifier=p["classifier"], test=str(p["store"].path))
    report["guarantee"]["student_weights"] = p["weights"]  # a run that trains on no longer has this guarantee
    if record:
        path = write_guarantee(student, report["guarantee"])
        report["guarantee_path"] = str(path) if path else None
    return report


# ---------------------------------------------------------------- output

def json_ready(value):
    """The report as strict JSON takes it: a threshold of +inf (nothing certified) becomes null."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def calibration_text(report: dict, prompts_hint: str = "RECIPE --options OPTIONS.json") -> str:
    r, g = report["result"], report.get("guarantee", {})
    risk = "disagreement with the teacher" if report["risk"] == "disagreement" else "top-1 error"
    lines = [f"calibration of {report.get('student', 'the student')} on {report.get('test', 'the test photos')}: "
             f"{report['n_photos']} photos, {report['n_calibration']} calibrate, "
             f"{report['n_photos'] - report['n_calibration']} check (--holdout {report['holdout_fraction']}, "
             f"--seed {report['seed']})",
             f"risk: {risk}; alpha {report['alpha']}, delta {report['delta']}", "",
             "scores (each alone, certified on its tested photos; holdout: accepted / realised risk):",
             f"  {'score':<10} {'certified':>9} {'bound':>7} {'tested':>7} {'holdout acc':>11} {'holdout risk':>12}"]
    for name, row in report["comparison"].items():
        h = row.get("holdout") or {}
        lines.append(f"  {name:<10} {_pct(row['certified_fraction']):>9} {_pct(row['bound']):>7} {row['n_tested']:>7} "
                     f"{_pct(h.get('accepted_fraction')):>11} {_pct(h.get('risk')):>12}")
    chosen = report["score"]["name"]
    how = (f"auto: {chosen}, chosen and its start planned on {r['plan']['fit_photos']} fit photos"
           if "plan" in r else chosen)
    lines.append("")
    if r["certified"]:
        lines.append(f"chosen: {how}; threshold {r['threshold']:.6g}: accepts {_pct(r['accepted_fraction'])} of "
                     f"{r['n']} tested photos, empirical risk {_pct(r['risk'])}, upper bound {_pct(r['bound'])} "
                     f"<= alpha")
        lines.append(f"guarantee: {g.get('statement', '')}")
    else:
        lines.append(f"chosen: {how}; NOTHING CERTIFIED: no threshold's bound is <= {report['alpha']} on {r['n']} "
                     "tested photos, so every prediction abstains (more photos, a larger --alpha or a better student)")
    h = report["holdout"]
    if h:
        o = report["oracle_holdout"]
        lines.append(f"holdout check: {h['n']} photos, accepted {_pct(h['accepted_fraction'])}, realised risk "
                     f"{_pct(h['risk'])} (alpha {_pct(report['alpha'])}); the oracle on these photos would accept "
                     f"{_pct(o['accepted_fraction'])}")
    pc = report["per_class"]
    lines += ["", f"per class (by {pc['by']}, on the {'holdout' if h else 'calibration'} photos):",
              f"  {'class':<24} {'n':>6} {'accepted':>9} {'risk':>7}"]
    for row in pc["classes"]:
        lines.append(f"  {row['class'][:24]:<24} {row['n']:>6} {_pct(row['accepted_fraction']):>9} {_pct(row['risk']):>7}")
    if report["next_to_generate"]:
        lines += ["", "generate next (accepted least): " + ", ".join(report["next_to_generate"]),
                  f"  zsd prompts {prompts_hint} --out next_prompts.jsonl --seed 1   (options of these classes only)"]
    if report.get("guarantee_path"):
        lines.append(f"\nguarantee recorded in {report['guarantee_path']}")
    return "\n".join(lines)


def restrict_options(options_path: str, classes: list[str], out: str) -> None:
    """An options file of `classes` only (those `zsd prompts` should make more prompts for)."""
    from zsd.options import load_options

    options = load_options(options_path)
    keep = {name: dims for name, dims in options.classes.items() if name.replace("_", " ") in
            {c.replace("_", " ") for c in classes}}
    if not keep:
        raise ZsdError(f"--options {options_path} has none of the classes to generate next ({', '.join(classes)})")
    write_atomic(out, json.dumps({"classes": keep}, indent=1) + "\n", flag="--next-options")


def plot_calibration(report: dict, path: str | os.PathLike) -> None:
    """Risk-coverage curves of the chosen score (calibration and holdout photos), the bounds of the tested
    thresholds, alpha and the chosen point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    recs = report["records"]
    for part, style in (("calibration", "-"), ("holdout", "--")):
        rows = sorted((r for r in recs if r["part"] == part), key=lambda r: -r["score"])
        if rows:
            loss = np.array([not r["agree"] if report["risk"] == "disagreement" else r["student"] != r["label"]
                             for r in rows], float)
            n = np.arange(1, len(rows) + 1)
            ax.plot(n / len(rows), np.cumsum(loss) / n, style, label=f"{part} risk")
    r = report["result"]
    if r["steps"]:
        ax.plot([s["accepted"] / r["n"] for s in r["steps"]], [s["bound"] for s in r["steps"]], ".", ms=3,
                label="upper bound of a tested threshold")
    ax.axhline(report["alpha"], color="k", lw=0.8, label=f"alpha {report['alpha']}")
    if r["certified"]:
        ax.plot([r["accepted_fraction"]], [r["bound"]], "r*", ms=12, label="chosen threshold (bound)")
    ax.set(xlabel="accepted fraction (most confident first)", ylabel=report["risk"], ylim=(0, None),
           title=f"{report['score']['name']}: risk-coverage, delta {report['delta']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    from zsd.errors import atomic_file

    with atomic_file(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
