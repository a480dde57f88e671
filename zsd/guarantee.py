"""The calibrated guarantee: which of a student's predictions agree with its teacher, with a guarantee.

A student abstains on a photo when a score it computes alone, from its own zero-shot cosines, is
below a threshold. The threshold is chosen on calibration photos so that, with probability at least
1 - delta over the draw of those photos, the risk among accepted photos (disagreement with the
teacher's top-1, or top-1 error against labels) is at most alpha: Learn-then-Test (Angelopoulos,
Bates, Candes, Jordan, Lei 2021) with fixed-sequence testing and exact Clopper-Pearson bounds.

Thresholds are tested from the strictest to the loosest and the sequence stops at the first one
whose upper bound exceeds alpha; the loosest that passed is returned, or none (accept nothing).
Each test is at level delta and no test is made after a failure, so the family-wise error is at
most delta (the fixed-sequence principle). `auto` picks the score and where its sequence starts on
a third of the calibration photos and tests on the others (`_planned`). The grid is the calibration photos' own score order statistics,
1 % of the photos apart, starting where a bound can pass with some disagreement among the accepted
(a sequence that starts at a handful of photos stops at their first disagreement).

This module is the pure core (`cp_upper`, `compute_score`, `certify`, `calibrate_arrays`, ...) on numpy
arrays, and the guarantee record a student carries (`guarantee`, `shipped_guarantee`, `abstains`):
`zsd eval`, `zsd export` and `zsd predict` read it, so it imports nothing beyond numpy at load time.
The stage `zsd calibrate`, which reads a test store and a student the way `zsd eval` does, is
zsd.calibrate.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np

from zsd.errors import ZsdError, write_atomic

SCORES = ("margin", "msp", "combined")
SCORE_CHOICES = ("auto", *SCORES)
RISKS = ("disagreement", "error")
# CLIP's trained logit scale (zsd.export.CLIP_LOGIT_SCALE): msp and the combined score's features
# are computed at it from cosines, so they mean the same in `zsd calibrate` and `zsd predict`.
LOGIT_SCALE = 100.0
FIT_FRACTION = 1 / 3  # of the calibration photos, used to fit the combined score (and then not tested on)
START_TOLERANCE = 0.5  # the sequence starts where a bound passes with alpha * this disagreement
GRID_STEP = 0.01  # of the calibration photos between two thresholds
RECORD = "calibration.json"
FORMAT = "zsd-calibration/1"


# ---------------------------------------------------------------- bounds

def cp_upper(k: int, n: int, delta: float) -> float:
    """Exact one-sided Clopper-Pearson upper bound on a binomial rate after k events in n trials, at
    level delta: the p with P(Binomial(n, p) <= k) = delta, which is beta(k + 1, n - k)'s 1 - delta quantile."""
    from scipy.stats import beta  # only here: `zsd predict` imports this module without scipy's cost

    if n <= 0:
        return 1.0
    return 1.0 if k >= n else float(beta.ppf(1 - delta, k + 1, n - k))


def cp_upper_many(k: np.ndarray, n: np.ndarray, delta: float) -> np.ndarray:
    """`cp_upper` of many (k, n) pairs at once."""
    from scipy.stats import beta

    k, n = np.asarray(k), np.asarray(n)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = beta.ppf(1 - delta, k + 1, np.maximum(n - k, 1))
    return np.where(k >= n, 1.0, out)


def min_count(alpha: float, delta: float) -> int:
    """The fewest accepted photos whose bound can be <= alpha: all of them agreeing, (1 - alpha)^n <= delta."""
    return math.ceil(math.log(delta) / math.log1p(-alpha) - 1e-12)


def start_count(alpha: float, delta: float, n: int, tolerance: float = START_TOLERANCE) -> int:
    """The smallest accepted count m whose bound passes with floor(tolerance * alpha * m) disagreements;
    the zero-disagreement minimum when no m <= n does."""
    m0 = min_count(alpha, delta)
    if tolerance > 0:
        for m in range(m0, n + 1):
            if cp_upper(math.floor(tolerance * alpha * m), m, delta) <= alpha:
                return m
    return m0


def check_level(alpha: float, delta: float) -> None:
    for flag, value in (("--alpha", alpha), ("--delta", delta)):
        if not 0 < value < 1:
            raise ZsdError(f"{flag} {value}: must be between 0 and 1 (e.g. 0.05)")


# ---------------------------------------------------------------- scores

def _softmax(cos: np.ndarray, scale: float) -> np.ndarray:
    z = scale * cos
    p = np.exp(z - z.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


def features(cos: np.ndarray, scale: float = LOGIT_SCALE) -> np.ndarray:
    """(n, 5) per photo: top-1 cosine, top-1 - top-2 margin, max softmax probability, entropy (at
    `scale`), and top-2 - top-3 margin (0 with 2 classes)."""
    s = -np.sort(-np.asarray(cos, dtype=np.float64), axis=1)
    p = _softmax(np.asarray(cos, dtype=np.float64), scale)
    entropy = -(p * np.log(np.maximum(p, 1e-300))).sum(axis=1)
    second = s[:, 1] - s[:, 2] if s.shape[1] > 2 else np.zeros(len(s))
    return np.stack([s[:, 0], s[:, 0] - s[:, 1], p.max(axis=1), entropy, second], axis=1)


def compute_score(spec: dict, cos: np.ndarray) -> np.ndarray:
    """The score `spec` (a guarantee's "score" entry) of each row of student cosines (n, K): higher is
    more confident. margin: top-1 - top-2 cosine; msp: max softmax probability at spec's logit scale;
    combined: a logistic model's log-odds of agreement from `features` and the predicted class."""
    cos = np.asarray(cos, dtype=np.float64)
    if cos.ndim != 2 or cos.shape[1] < 2:
        raise ZsdError(f"scores need at least 2 classes (got cosines of shape {cos.shape})")
    f = features(cos, spec.get("logit_scale", LOGIT_SCALE))
    name = spec["name"]
    if name == "margin":
        return f[:, 1]
    if name == "msp":
        return f[:, 2]
    if name == "combined":
        x = (f - np.asarray(spec["mean"])) / np.asarray(spec["std"])
        return x @ np.asarray(spec["weights"]) + spec["bias"] + np.asarray(spec["class_bias"])[cos.argmax(axis=1)]
    raise ZsdError(f"unknown score {name!r}: one of {', '.join(SCORES)}")


def fit_combined(cos: np.ndarray, agree: np.ndarray, ridge: float = 1.0, scale: float = LOGIT_SCALE) -> dict:
    """A `combined` score spec: L2-regularised logistic regression of agreement on the standardised
    `features` plus one intercept per predicted class (Newton's method; ridge on all but the bias)."""
    f = features(cos, scale)
    mean, std = f.mean(axis=0), f.std(axis=0)
    std[std < 1e-12] = 1.0
    k = cos.shape[1]
    x = np.hstack([(f - mean) / std, np.eye(k)[cos.argmax(axis=1)], np.ones((len(f), 1))])
    y = np.asarray(agree, dtype=np.float64)
    penalty = np.full(x.shape[1], ridge)
    penalty[-1] = 0.0
    w = np.zeros(x.shape[1])
    for _ in range(50):
        p = 1 / (1 + np.exp(-np.clip(x @ w, -30, 30)))
        grad = x.T @ (p - y) + penalty * w
        hess = (x * (p * (1 - p))[:, None]).T @ x + np.diag(penalty + 1e-9)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    nf = f.shape[1]
    return {"name": "combined", "logit_scale": scale, "features": ["top1", "margin", "msp", "entropy", "margin23"],
            "mean": mean.tolist(), "std": std.tolist(), "weights": w[:nf].tolist(),
            "class_bias": w[nf:nf + k].tolist(), "bias": float(w[-1])}


def score_spec(name: str) -> dict:
    return {"name": name, "logit_scale": LOGIT_SCALE}


# ---------------------------------------------------------------- the procedure

def certify(scores: np.ndarray, losses: np.ndarray, alpha: float, delta: float,
            tolerance: float = START_TOLERANCE, step: float = GRID_STEP, start: int | None = None) -> dict:
    """Fixed-sequence test of thresholds on calibration (score, loss 0/1) pairs, strictest first.

    `start` (an accepted count, chosen without these photos) replaces the start that `tolerance` sets.
    Returns threshold (inf: nothing certified), accepted count and fraction, empirical risk and its
    Clopper-Pearson bound at the threshold, and every tested step (the risk-coverage curve)."""
    scores, losses = np.asarray(scores, dtype=np.float64), np.asarray(losses, dtype=np.float64)
    n = len(scores)
    m0 = min_count(alpha, delta)
    if n < m0:
        raise ZsdError(f"{n} calibration photos are too few for --alpha {alpha} --delta {delta}: at least {m0} are "
                       "needed (pass more photos, a smaller --holdout, or a larger --alpha or --delta)")
    order = np.argsort(-scores, kind="stable")
    sorted_scores, cum = scores[order], np.cumsum(losses[order])
    start = start_count(alpha, delta, n, tolerance) if start is None else min(max(start, m0), n)
    counts = np.unique(np.r_[np.arange(start, n + 1, max(1, round(step * n))), n])
    thresholds = sorted_scores[counts - 1]
    accepted = np.searchsorted(-sorted_scores, -thresholds, side="right")  # ties at a threshold are accepted too
    keep = np.r_[True, accepted[1:] != accepted[:-1]]
    thresholds, accepted = thresholds[keep], accepted[keep]
    k = cum[accepted - 1].astype(int)
    bounds = cp_upper_many(k, accepted, delta)
    fails = np.flatnonzero(bounds > alpha)
    stop = int(fails[0]) if len(fails) else len(bounds)  # the first failure is the last step tested
    steps = [{"threshold": float(t), "accepted": int(a), "risk": float(e / a), "bound": float(u)}
             for t, a, e, u in zip(thresholds[:stop + 1], accepted[:stop + 1], k[:stop + 1], bounds[:stop + 1])]
    best = steps[stop - 1] if stop > 0 else None
    out = {"n": n, "alpha": alpha, "delta": delta, "start": start, "steps": steps, "certified": best is not None}
    if best is None:
        out.update(threshold=math.inf, accepted=0, accepted_fraction=0.0, risk=0.0, bound=None)
    else:
        out.update(threshold=best["threshold"], accepted=best["accepted"], accepted_fraction=best["accepted"] / n,
                   risk=best["risk"], bound=best["bound"])
    return out


def fit_mask(n: int, seed: int) -> np.ndarray:
    """The calibration photos (a random FIT_FRACTION, fixed by `seed`) that fit the combined score and
    plan `auto`; they are never tested on."""
    fit = np.zeros(n, bool)
    fit[np.random.default_rng(seed).permutation(n)[:int(FIT_FRACTION * n)]] = True
    return fit


def _candidate(name: str, cos: np.ndarray, agree: np.ndarray, losses: np.ndarray, alpha: float, delta: float,
               seed: int) -> tuple[dict, dict, np.ndarray]:
    """(score spec, certify result, the calibration rows it was tested on) of one score; `combined` is
    fitted on the `fit_mask` rows and tested on the others only."""
    if name != "combined":
        spec, rows = score_spec(name), np.arange(len(cos))
    else:
        fit = fit_mask(len(cos), seed)
        spec, rows = fit_combined(cos[fit], agree[fit]), np.flatnonzero(~fit)
    return spec, certify(compute_score(spec, cos[rows]), losses[rows], alpha, delta), rows


def plan(fit_scores: np.ndarray, fit_losses: np.ndarray, n_test: int, alpha: float, delta: float,
         step: float = GRID_STEP) -> dict:
    """Where a sequence over `n_test` photos should start, predicted from other photos (the fit part):
    at each count m of the grid, the fit photos' risk among the same top fraction stands in for the
    test photos'; the start is the count whose predicted bound is furthest below alpha, and the
    predicted fraction the last count of the grid, from the start on, whose predicted bound passes."""
    order = np.argsort(-fit_scores, kind="stable")
    risk = np.cumsum(fit_losses[order]) / np.arange(1, len(order) + 1)
    counts = np.arange(min_count(alpha, delta), n_test + 1, max(1, round(step * n_test)))
    if not len(counts) or not len(risk):
        return {"start": None, "fraction": 0.0}
    top = np.clip(np.ceil(counts / n_test * len(risk)).astype(int), 1, len(risk)) - 1
    bounds = cp_upper_many(np.ceil(risk[top] * counts - 1e-9), counts, delta)
    best = int(np.argmin(bounds))
    if bounds[best] > alpha:
        return {"start": None, "fraction": 0.0}
    fails = np.flatnonzero(bounds[best:] > alpha)
    last = best + (int(fails[0]) if len(fails) else len(counts) - best) - 1
    return {"start": int(counts[best]), "fraction": float(counts[last] / n_test)}


def _planned(cos: np.ndarray, agree: np.ndarray, losses: np.ndarray, alpha: float, delta: float,
             seed: int, combined: dict | None = None) -> tuple[dict, dict, np.ndarray]:
    """`auto`: on the fit photos, fit the combined score and `plan` every score; keep the score with
    the largest predicted fraction and start where its plan says. Then test it, at delta, on the
    other calibration photos only: the plan saw none of them, so the guarantee is the plain one."""
    fit = fit_mask(len(cos), seed)
    rows = np.flatnonzero(~fit)
    specs = {name: score_spec(name) for name in SCORES if name != "combined"}
    specs["combined"] = combined or fit_combined(cos[fit], agree[fit])  # the comparison's fit, on the same rows
    plans = {name: plan(compute_score(spec, cos[fit]), losses[fit], len(rows), alpha, delta)
             for name, spec in specs.items()}
    name = max(plans, key=lambda k: (plans[k]["fraction"], -SCORES.index(k)))
    result = certify(compute_score(specs[name], cos[rows]), losses[rows], alpha, delta, start=plans[name]["start"])
    return specs[name], {**result, "plan": {"fit_photos": int(fit.sum()), "chosen": name, **plans}}, rows


def _candidates(cos, agree, losses, alpha: float, delta: float, seed: int, required: str | None = None) -> dict:
    """Every score's `_candidate`; combined's tested part may be too small, and it is then left out
    (unless it is the `required` one)."""
    out = {}
    for name in SCORES:
        try:
            out[name] = _candidate(name, cos, agree, losses, alpha, delta, seed)
        except ZsdError:
            if name == required:
                raise
    return out


def choose(cos: np.ndarray, agree: np.ndarray, losses: np.ndarray, alpha: float, delta: float, score: str = "margin",
           seed: int = 0) -> tuple[dict, dict, np.ndarray, dict]:
    """(spec, certify result, tested calibration rows) of `score`, and every score's own (spec, result)
    (the comparison). See `_planned` for `auto`."""
    if score not in SCORE_CHOICES:
        raise ZsdError(f"--score {score}: one of {', '.join(SCORE_CHOICES)}")
    m0 = min_count(alpha, delta)
    needed = m0 if score in ("margin", "msp") else math.ceil(m0 / (1 - FIT_FRACTION))
    if len(cos) < needed:
        raise ZsdError(f"{len(cos)} calibration photos are too few for --alpha {alpha} --delta {delta} --score {score}: "
                       f"at least {needed} are needed (pass more photos, a smaller --holdout, or a larger --alpha or "
                       "--delta)")
    comparison = _candidates(cos, agree, losses, alpha, delta, seed, required=score)
    chosen = comparison[score] if score != "auto" else \
        _planned(cos, agree, losses, alpha, delta, seed, comparison.get("combined", (None,))[0])
    return (*chosen, {k: v[:2] for k, v in comparison.items()})


def realised(accepted: np.ndarray, losses: np.ndarray) -> dict:
    n_acc = int(accepted.sum())
    return {"n": int(len(accepted)), "accepted": n_acc, "accepted_fraction": n_acc / max(len(accepted), 1),
            "risk": float(losses[accepted].mean()) if n_acc else None}


def oracle(scores: np.ndarray, losses: np.ndarray, alpha: float) -> dict:
    """The largest top-score set of these photos themselves whose risk is <= alpha (no guarantee: it
    is chosen on the photos it is measured on)."""
    order = np.argsort(-scores, kind="stable")
    risk = np.cumsum(losses[order]) / np.arange(1, len(order) + 1)
    ok = np.flatnonzero(risk <= alpha)
    m = int(ok[-1]) + 1 if len(ok) else 0
    return {"accepted": m, "accepted_fraction": m / max(len(scores), 1), "risk": float(risk[m - 1]) if m else None}


def split(n: int, holdout: float, seed: int) -> np.ndarray:
    """Per photo: True for the holdout part (a random `holdout` fraction, fixed by `seed`)."""
    part = np.zeros(n, bool)
    part[np.random.default_rng(seed).permutation(n)[:int(round(holdout * n))]] = True
    return part


def calibrate_arrays(keys, student_cos: np.ndarray, teacher_pred: np.ndarray, labels: np.ndarray | None,
                     classnames: list[str], *, alpha: float = 0.05, delta: float = 0.05, risk: str = "disagreement",
                     score: str = "margin", holdout: float = 0.5, seed: int = 0, next_k: int = 5) -> dict:
    """The whole report from per-photo arrays: student cosines (n, K), teacher top-1, labels (or None)."""
    check_level(alpha, delta)
    if not 0 <= holdout < 1:
        raise ZsdError(f"--holdout {holdout}: must be in [0, 1) (0: calibrate on every photo, no check)")
    if risk not in RISKS:
        raise ZsdError(f"--risk {risk}: one of {', '.join(RISKS)}")
    cos = np.asarray(student_cos, dtype=np.float64)
    pred = cos.argmax(axis=1)
    agree = pred == teacher_pred
    if risk == "error":
        if labels is None or (np.asarray(labels) < 0).all():
            raise ZsdError("--risk error needs labelled photos: this test set has no labels (use --risk disagreement)")
        if (np.asarray(labels) < 0).any():
            raise ZsdError("--risk error needs every photo labelled: some are not (use --risk disagreement)")
        losses = (pred != labels).astype(np.float64)
        group, group_by = np.asarray(labels), "label"
    else:
        losses = (~agree).astype(np.float64)
        group, group_by = np.asarray(teacher_pred), "teacher's top-1"
    hold = split(len(cos), holdout, seed)
    cal = np.flatnonzero(~hold)
    spec, result, tested, comparison = choose(cos[cal], agree[cal], losses[cal], alpha, delta, score, seed)
    scores = compute_score(spec, cos)
    accepted = scores >= result["threshold"]
    part = np.where(hold, "holdout", "calibration")
    if spec["name"] == "combined":  # its fit photos are neither tested nor a check
        fit = np.ones(len(cos), bool)
        fit[cal[tested]] = False
        fit[hold] = False
        part[fit] = "fit"
    comparison_rows = {}
    for name, (spec_n, res) in comparison.items():
        row = {"certified_fraction": res["accepted_fraction"], "threshold": res["threshold"], "risk": res["risk"],
               "bound": res["bound"], "n_tested": res["n"]}
        if holdout > 0:
            row["holdout"] = realised(compute_score(spec_n, cos[hold]) >= res["threshold"], losses[hold])
        comparison_rows[name] = row
    report = {
        "alpha": alpha, "delta": delta, "risk": risk, "score_asked": score, "holdout_fraction": holdout, "seed": seed,
        "n_photos": int(len(cos)), "n_calibration": int(len(cal)), "n_tested": result["n"],
        "score": spec, "result": result, "comparison": comparison_rows,
        "holdout": realised(accepted[hold], losses[hold]) if holdout > 0 else None,
        "oracle_holdout": oracle(scores[hold], losses[hold], alpha) if holdout > 0 else None,
        "classnames": list(classnames),
        "records": [{"key": str(k), "part": str(p), "score": float(s), "accepted": bool(a), "agree": bool(g),
                     "student": int(sp), "teacher": int(tp), **({"label": int(lb)} if labels is not None else {})}
                    for k, p, s, a, g, sp, tp, lb in zip(keys, part, scores, accepted, agree, pred, teacher_pred,
                                                          labels if labels is not None else [None] * len(cos))],
    }
    where = hold if holdout > 0 else ~hold
    report["per_class"] = per_class(group[where], accepted[where], losses[where], classnames, group_by)
    seen = [row for row in report["per_class"]["classes"] if row["n"]]  # a class with no photo has no fraction
    report["next_to_generate"] = [row["class"] for row in sorted(seen, key=lambda r: (r["accepted_fraction"],
                                                                                      -r["n"]))][:next_k]
    return report


def per_class(group: np.ndarray, accepted: np.ndarray, losses: np.ndarray, classnames: list[str], by: str) -> dict:
    rows = []
    for c, name in enumerate(classnames):
        mine = group == c
        r = realised(accepted[mine], losses[mine])
        rows.append({"class": name, "n": r["n"], "accepted": r["accepted"],
                     "accepted_fraction": r["accepted_fraction"] if r["n"] else None, "risk": r["risk"]})
    return {"by": by, "classes": rows}


# ---------------------------------------------------------------- the guarantee shipped with a student

def fingerprint(keys, teacher_id: str | None) -> str:
    """The calibration photos' identity: their keys (sorted) and the teacher that labelled them."""
    h = hashlib.sha256(json.dumps([teacher_id, sorted(map(str, keys))]).encode())
    return "sha256:" + h.hexdigest()


def guarantee(report: dict, *, calibration_keys, teacher_id: str | None, classifier: dict, test: str) -> dict:
    """The record a student carries (its run folder's calibration.json; the lead copies it into the ONNX
    metadata and the open_clip folder): what is promised, for which photos, classes and templates."""
    r = report["result"]
    certified = r["certified"]
    pct = lambda x: f"{100 * x:.0f} %"  # noqa: E731
    what = "agree with the teacher" if report["risk"] == "disagreement" else "are correct"
    statement = (f"on photos like the calibration set, accepted predictions {what} at least {pct(1 - report['alpha'])} "
                 f"of the time, with {pct(1 - report['delta'])} confidence; {pct(r['accepted_fraction'])} were accepted"
                 if certified else "nothing could be certified: every prediction abstains")
    return {
        "format": FORMAT, "risk": report["risk"], "score": report["score"],
        "threshold": r["threshold"] if certified else None,  # None: accept nothing
        "alpha": report["alpha"], "delta": report["delta"], "certified": certified,
        "accepted_fraction": r["accepted_fraction"], "empirical_risk": r["risk"], "risk_bound": r["bound"],
        "n_calibration": r["n"], "calibration_fingerprint": fingerprint(calibration_keys, teacher_id),
        "test": test, "teacher_id": teacher_id, "classnames": report["classnames"], "classifier": classifier,
        "holdout": report["holdout"], "statement": statement,
        "scope": "holds only for these class names and this classifier (templates or prototypes); "
                 "with other classes nothing is claimed",
    }


def write_guarantee(student: str | os.PathLike, record: dict) -> Path | None:
    """Write `record` as calibration.json (ema_calibration.json for RUN_DIR:ema) into the student's run
    folder, atomically; an exported open_clip folder is left as it is (None)."""
    from zsd.student import resolve_student

    ref = resolve_student(student)
    if ref.kind == "open_clip":
        return None
    path = ref.folder / (ref.prefix + RECORD)
    write_atomic(path, json.dumps(record, indent=1) + "\n", flag="--student (its calibration.json)")
    return path


def read_guarantee(student: str | os.PathLike) -> dict | None:
    """The run's calibration record, None when it has none, or {"damaged": path} when it cannot be read."""
    from zsd.student import resolve_student

    ref = resolve_student(student)
    path = ref.folder / (ref.prefix + RECORD)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        record = None
    if not isinstance(record, dict) or record.get("format") != FORMAT:  # a damaged record claims nothing
        return {"damaged": str(path)}
    return record


def _classifier_key(info: dict | None) -> tuple:
    info = info or {}
    return info.get("kind"), info.get("templates") if info.get("kind") == "templates" else info.get("store")


def applies(record: dict | None, classnames: list[str], classifier: dict | None = None) -> bool:
    """Whether a guarantee speaks about predictions over `classnames` (the same classes, same order) and,
    when given, class embeddings made the same way (the same templates, or prototypes of the same store)."""
    return bool(record) and list(record.get("classnames", [])) == list(classnames) and \
        (classifier is None or _classifier_key(record.get("classifier")) == _classifier_key(classifier))


def shipped_guarantee(student, weights: str, classnames: list[str] | None = None,
                      classifier: dict | None = None) -> tuple[dict | None, str]:
    """(the student's guarantee, "") where it speaks for these weights (and classes), else (None, why not):
    eval reports selective accuracy with it, export carries it into the ONNX file and the open_clip folder."""
    record = read_guarantee(student)
    if record is None:
        return None, ""
    if "damaged" in record:
        return None, f"{record['damaged']} is damaged: nothing is claimed; run `zsd calibrate` again"
    if record.get("student_weights") != weights:
        return None, (f"{RECORD} of {student} was calibrated on other weights (the run went on since): nothing is "
                      "claimed; run `zsd calibrate` again")
    if classnames is not None and not applies(record, classnames, classifier):
        return None, (f"the guarantee of {student} was calibrated for other classes or class embeddings "
                      f"({len(record.get('classnames', []))} classes, {_classifier_key(record.get('classifier'))}): "
                      "nothing is claimed for these")
    return record, ""


def abstains(record: dict, cos: np.ndarray) -> np.ndarray:
    """Per row of student cosines: True where the guarantee's score is below its threshold (all rows
    when nothing was certified)."""
    if record.get("threshold") is None:
        return np.ones(len(cos), bool)
    return compute_score(record["score"], cos) < record["threshold"]


