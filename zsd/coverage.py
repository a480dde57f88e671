"""Train/test coverage audit and the certificate of the paper's Lemma 1 (appendix A.16).

For a test image i with teacher/student embeddings T(i), S(i) and a train image ĩ:

    δ(i) = ‖S(i) − T(i)‖ ≤ B(i) = ‖T(i) − T(ĩ)‖ + ‖S(i) − S(ĩ)‖ + ‖T(ĩ) − S(ĩ)‖   (triangle inequality)

and, with unit class embeddings Z_k, the student predicts the teacher's class wherever the
teacher's top-1 margin exceeds 2δ(i): for any class k, ⟨S, Z_k − Z_top⟩ ≤ ⟨T, Z_k − Z_top⟩ + 2δ < 0.
Two certificates follow, by what they check about the student on the train set:
- witness-certified, `margin > 2B`: the student's gap ‖T(ĩ) − S(ĩ)‖ only at i's own witness;
- paper-certified, `margin > 6ε` with ε = max(‖T(i) − T(ĩ)‖, ‖S(i) − S(ĩ)‖, max_j ‖T(j) − S(j)‖):
  Lemma 1 as the paper states it, its premise ‖T − S‖ < ε checked on every training image j.
Since B ≤ 3ε: paper-certified ⇒ witness-certified ⇒ directly certified (`margin > 2δ`) ⇒ agreement.

Nearest neighbours are exact: the train stores stream in fp16 blocks, converted to fp32 and
searched with faiss (inner product), keeping a running top-k per test row, so memory is bounded
by one block whatever the train set's size. Distances of witnesses and certificates are computed
in float64 from the stored vectors themselves (no unit-norm shortcut), so the implications above
hold exactly, not just up to rounding.
"""

from __future__ import annotations

import os
from pathlib import Path

import faiss
import numpy as np
from tqdm import tqdm

from zsd.cache import default_workers
from zsd.classes import build_classifier, select_classes
from zsd.dist import resolve_device
from zsd.errors import ZsdError, atomic_file, check_at_least
from zsd.evaluate import check_student_teacher, student_embeddings
from zsd.sources import class_key
from zsd.store import Store, open_store
from zsd.student import StudentRef, load_student, resolve_student
from zsd.teachers import same_teacher

DEFAULT_BLOCK_ROWS = 65536
DUP_THRESHOLD = 1e-2  # teacher-space L2 distance below which a train image counts as a copy of a test image


# ---------------------------------------------------------------- streaming over train stores

def _blocks(stores: list[Store], block_rows: int, partners: list[Store] | None = None):
    """Yield (global start, fp32 block, valid mask[, partner fp32 block]) over the concatenated stores.

    `partners` are stores with the same rows (student embeddings of each train store); a row is
    valid where it is written in its store and in its partner.
    """
    offset = 0
    for n, store in enumerate(stores):
        written = store.written()
        partner = partners[n] if partners else None
        if partner is not None:
            written &= partner.written()
            partner_blocks = partner.iter_blocks(0, block_rows)
        for start, block in store.iter_blocks(0, block_rows):
            valid = written[start:start + len(block)] & np.isfinite(block).all(axis=1)
            if partner is None:
                yield offset + start, block.astype(np.float32), valid
            else:
                p_start, p_block = next(partner_blocks)
                assert p_start == start and len(p_block) == len(block)
                yield offset + start, block.astype(np.float32), valid, p_block.astype(np.float32)
        offset += store.rows


def nearest_train(queries: np.ndarray, stores: list[Store], k: int = 10, block_rows: int = DEFAULT_BLOCK_ROWS,
                  partners: list[Store] | None = None, progress: bool = False, desc: str = "search"):
    """Exact top-k inner-product neighbours of `queries` (Q, D) among the train stores' written rows.

    Returns (distances (Q, k) fp32 L2, global row indices (Q, k) int64, squared norms of all
    train rows (N,) fp32); with `partners`, also ‖row − partner row‖ (N,) float64 (NaN where invalid).
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    total = sum(s.rows for s in stores)
    n_valid = sum(int(s.written().sum()) for s in stores)
    if n_valid == 0:
        raise ZsdError("the train stores hold no written embeddings")
    k = min(k, n_valid)
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    sqnorm = np.zeros(total, np.float32)
    gap = np.full(total, np.nan) if partners else None
    bar = tqdm(total=total, unit="row", desc=desc, disable=not progress, dynamic_ncols=True)
    for item in _blocks(stores, block_rows, partners):
        start, block, valid = item[:3]
        if not valid.all():
            block = block[valid]
        ids = start + np.flatnonzero(valid)
        if len(block):
            sims, idx = faiss.knn(queries, block, min(k, len(block)), metric=faiss.METRIC_INNER_PRODUCT)
            heap.add_result(sims, ids[idx])
            sqnorm[ids] = np.einsum("ij,ij->i", block, block)
            if partners:
                partner = item[3][valid] if not valid.all() else item[3]
                gap[ids] = _row_distances(block, partner)
        bar.update(len(valid))
    bar.close()
    heap.finalize()
    qn = np.einsum("ij,ij->i", queries, queries)
    dist = np.sqrt(np.maximum(0.0, qn[:, None] + sqnorm[heap.I] - 2 * heap.D)).astype(np.float32)
    return (dist, heap.I.astype(np.int64), sqnorm) + ((gap,) if partners else ())


def _row_distances(a: np.ndarray, b: np.ndarray, batch: int = 8192) -> np.ndarray:
    """‖a_r − b_r‖ per row in float64 (in batches, to bound memory)."""
    out = np.empty(len(a))
    for s in range(0, len(a), batch):
        d = a[s:s + batch].astype(np.float64) - b[s:s + batch]
        out[s:s + batch] = np.sqrt(np.einsum("ij,ij->i", d, d))
    return out


def pair_distances(queries: np.ndarray, pairs_q: np.ndarray, pairs_j: np.ndarray, stores: list[Store],
                   block_rows: int = DEFAULT_BLOCK_ROWS, batch: int = 16384) -> np.ndarray:
    """‖queries[q] − train[j]‖ in float64 for every pair (q, j), streaming the train stores once."""
    order = np.argsort(pairs_j, kind="stable")
    q_sorted, j_sorted = pairs_q[order], pairs_j[order]
    out = np.empty(len(order))
    for start, block, _ in _blocks(stores, block_rows):
        lo, hi = np.searchsorted(j_sorted, [start, start + len(block)])
        for s in range(lo, hi, batch):
            e = min(hi, s + batch)
            d = queries[q_sorted[s:e]].astype(np.float64) - block[j_sorted[s:e] - start]
            out[s:e] = np.sqrt(np.einsum("ij,ij->i", d, d))
    result = np.empty_like(out)
    result[order] = out
    return result


# ---------------------------------------------------------------- the audit

def _check_stores(train: list[Store], test: Store) -> list[str]:
    """Notes for train stores of the test store's teacher at another precision; else an error."""
    notes = []
    names = [s.path.name for s in train]
    if len(set(names)) < len(names):
        raise ZsdError(f"train stores need distinct names (records and student embeddings are kept by name): {', '.join(names)}")
    for s in [test, *train]:
        if s.rows == 0 or not s.written().any():
            raise ZsdError(f"{s.path} holds no written embeddings")
    for s in train:
        match = same_teacher(s.teacher_id, s.teacher, test.teacher_id, test.teacher)
        if match == "other":
            raise ZsdError(f"{s.path} holds teacher {s.teacher_id}'s embeddings ({s.teacher['model']}), "
                           f"{test.path} teacher {test.teacher_id}'s ({test.teacher['model']}): compare one teacher's stores")
        if match == "precision":
            notes.append(f"{s.path.name} holds {s.teacher.get('precision', 'fp32')} embeddings, {test.path.name} "
                         f"{test.teacher.get('precision', 'fp32')} ones of the same teacher: distances include rounding")
        if s.dim != test.dim:
            raise ZsdError(f"{s.path} has {s.dim}-d embeddings, {test.path} {test.dim}-d")
    return notes


def coverage(train: list[str], test: str, student: str | None = None, *, k: int = 10,
             block_rows: int = DEFAULT_BLOCK_ROWS, pretrained: str | None = None, templates: str | None = None,
             classnames: str | None = None, classes_from: str | None = None, dup_threshold: float = DUP_THRESHOLD,
             worst: int = 20, device: str = "auto", batch_size: int = 128, workers: int | None = None,
             progress: bool = True,
             log=print) -> dict:
    """The audit as a JSON-ready dict: per-image `images` records plus aggregates.

    The teacher margins use the class embeddings of `zsd.classes.build_classifier`: prototypes
    from the labelled store `classes_from`, or the teacher's zero-shot classifier.
    """
    for flag, value in (("-k", k), ("--block-rows", block_rows), ("--batch-size", batch_size)):
        check_at_least(flag, value, 1)
    for flag, value in (("--dup-threshold", dup_threshold), ("--worst", worst), ("--workers", workers)):
        check_at_least(flag, value, 0)
    if student is not None:  # before the teacher-space search, not after it
        student = resolve_student(student)
    workers = default_workers(resolve_device(device), workers)
    train_stores = [open_store(t) for t in train]
    test_store = open_store(test)
    notes = _check_stores(train_stores, test_store)
    names = [s.path.name.removesuffix(".zarr") for s in train_stores]
    offsets = np.cumsum([0] + [s.rows for s in train_stores])
    train_keys = np.concatenate([s.keys() for s in train_stores])
    train_labels = _train_label_names(train_stores)

    test_emb = test_store.embeddings(view=0)
    test_rows = np.flatnonzero(test_store.written() & np.isfinite(test_emb).all(axis=1))
    if len(test_rows) < test_store.rows:
        notes.append(f"{test_store.rows - len(test_rows)} test rows failed in the teacher pass (or have non-finite "
                     "embeddings) and are left out")
    if classnames and test_store.classnames:  # audit the test images `zsd eval --classnames` scores, no others
        inside = np.isin(test_store.labels()[test_rows], select_classes(test_store.classnames, classnames)[0])
        if not inside.all():
            notes.append(f"{int((~inside).sum())} test images of classes outside --classnames are left out (as in zsd eval)")
        test_rows = test_rows[inside]
    test_keys = test_store.keys()[test_rows]
    test_labels = test_store.labels()[test_rows]
    T = test_emb[test_rows].astype(np.float32)

    dist_t, nn_t, _ = nearest_train(T, train_stores, k, block_rows, progress=progress, desc="teacher-space search")
    report = {
        "test": str(test_store.path), "train": [str(s.path) for s in train_stores], "teacher_id": test_store.teacher_id,
        "teacher": {"model": test_store.teacher["model"], "weights": test_store.teacher["weights"]},
        "student": None, "classifier": None, "n_test": int(len(test_rows)),
        "n_train": int(sum(s.written().sum() for s in train_stores)),
        "k": int(nn_t.shape[1]), "dup_threshold": dup_threshold, "notes": notes,
    }
    eps_t = dist_t[:, 0].astype(np.float64)
    store_of = np.searchsorted(offsets, nn_t[:, 0], side="right") - 1
    records = [{"key": str(key), "label": _label_name(test_store, lab), "nearest": str(train_keys[j]),
                "nearest_store": names[s], "eps_t": float(e)}
               for key, lab, j, s, e in zip(test_keys, test_labels, nn_t[:, 0], store_of, eps_t)]

    if student is None and not test_store.classnames:
        notes.append("the test store is unlabelled (no class names): no per-class coverage")
    if student is not None:
        student_part = _student_certificates(student, train_stores, test_store, test_rows, T, nn_t, k, block_rows,
                                             pretrained, templates, classnames, classes_from, device, batch_size,
                                             workers, progress, log, notes)
        report["student"] = student_part.pop("student")
        report["classifier"] = student_part.pop("classifier", None)
        for n, rec in enumerate(records):
            w = int(student_part["witness"][n])
            rec["witness"] = str(train_keys[w])
            rec["witness_store"] = names[int(np.searchsorted(offsets, w, side="right") - 1)]
            for field in ("eps_t_witness", "eps_s", "eps_train", "bound", "delta", "paper_eps"):
                rec[field] = float(student_part[field][n])
            if "margin" in student_part:
                rec["margin"] = float(student_part["margin"][n])
                for field in ("paper_certified", "witness_certified", "direct_certified", "agree"):
                    rec[field] = bool(student_part[field][n])
        report["certificate"] = _certificate_summary(student_part)

    report["eps_t"] = _quantiles(eps_t)
    report["near_duplicates"] = int((eps_t < dup_threshold).sum())
    report["coverage_curve"] = _coverage_curve(eps_t)
    report["per_class"] = _per_class(records, test_store, train_labels, nn_t[:, 0])
    worst_rows = np.argsort(-eps_t, kind="stable")[:worst]
    report["least_covered"] = [
        {"key": records[n]["key"], "label": records[n]["label"], "eps_t": records[n]["eps_t"],
         "nearest": [{"key": str(train_keys[j]), "store": names[int(np.searchsorted(offsets, j, side="right") - 1)],
                      "label": train_labels[j], "eps": float(d)} for j, d in zip(nn_t[n, :3], dist_t[n, :3])]}
        for n in worst_rows]
    report["images"] = records
    return report


def _label_name(store: Store, label: int):
    return store.classnames[label] if label >= 0 and store.classnames else None


def _train_label_names(stores: list[Store]) -> list:
    out = []
    for s in stores:
        out += [s.classnames[lab] if lab >= 0 and s.classnames else None for lab in s.labels()]
    return out


def _student_certificates(student: StudentRef, train_stores, test_store, test_rows, T, nn_t, k, block_rows, pretrained,
                          templates, classnames, classes_from, device, batch_size, workers, progress, log,
                          notes) -> dict:
    """Witnesses, bounds and (for a labelled test set) margins and certificates per test row."""
    model, config = load_student(student, resolve_device(device))
    check_student_teacher(student, config, test_store, log)
    dev = next(model.parameters()).device
    embed = dict(device=dev, batch_size=batch_size, workers=workers, progress=progress)
    s_test = student_embeddings(student, test_store, model, config, **embed)
    s_train = [student_embeddings(student, s, model, config, **embed) for s in train_stores]
    if not s_test.written()[test_rows].all():
        raise ZsdError(f"the student could not embed every test image the teacher embedded ({s_test.path})")
    S = s_test.embeddings(view=0)[test_rows].astype(np.float32)
    log(f"student embeddings: {s_test.path} and {len(s_train)} train store(s) in {s_test.path.parent}")

    out = {"student": {"run_dir": student.spec, "model": config["student"], "weights": s_test.teacher["weights"],
                       "test_embeddings": str(s_test.path), "train_embeddings": [str(s.path) for s in s_train]}}
    out.update(witnesses(T, S, nn_t, train_stores, s_train, k, block_rows, progress))
    if not test_store.classnames and not classnames:
        notes.append("the test store is unlabelled (no class names): coverage and bounds only, "
                     "no margins, certificates or agreement")
        return out
    classifier = build_classifier(test_store, classes_from=classes_from, classnames=classnames, templates=templates,
                                  pretrained=pretrained, device=device)
    if len(classifier.keep) < 2:
        raise ZsdError("margins need at least 2 classes")
    out["classifier"] = classifier.info
    out.update(certify(T, S, classifier.weights, out))
    return out


def witnesses(T: np.ndarray, S: np.ndarray, nn_t: np.ndarray, train_stores: list[Store], s_train: list[Store],
              k: int = 10, block_rows: int = DEFAULT_BLOCK_ROWS, progress: bool = False) -> dict:
    """Per test row: the witness ĩ minimising B among the top-k in teacher and in student space.

    T, S: the test rows' teacher/student embeddings; nn_t: their teacher-space top-k (global train
    rows); s_train: the student embedding stores of the train stores (same rows).
    """
    _, nn_s, _, eps_train_all = nearest_train(S, s_train, k, block_rows, partners=train_stores,
                                              progress=progress, desc="student-space search")
    cand = np.concatenate([nn_t, nn_s], axis=1)
    q = np.repeat(np.arange(len(T)), cand.shape[1])
    d_t = pair_distances(T, q, cand.ravel(), train_stores, block_rows).reshape(cand.shape)
    d_s = pair_distances(S, q, cand.ravel(), s_train, block_rows).reshape(cand.shape)
    e_tr = eps_train_all[cand]
    e_tr[np.isnan(e_tr)] = np.inf  # a train row the student could not embed is no witness
    bound = d_t + d_s + e_tr
    pick = (np.arange(len(T)), np.argmin(bound, axis=1))
    diff = S.astype(np.float64) - T
    out = {"witness": cand[pick], "eps_t_witness": d_t[pick], "eps_s": d_s[pick], "eps_train": e_tr[pick],
           "bound": bound[pick], "delta": np.sqrt(np.einsum("ij,ij->i", diff, diff))}
    # The paper's Lemma 1 needs ‖T(j) − S(j)‖ < ε on every training image j, not only at the witness.
    out["eps_train_max"] = float(np.nanmax(eps_train_all))
    out["paper_eps"] = np.maximum(np.maximum(out["eps_t_witness"], out["eps_s"]), out["eps_train_max"])
    return out


def certify(T: np.ndarray, S: np.ndarray, z: np.ndarray, bounds: dict) -> dict:
    """Teacher margins, agreement and the certificates, given `bounds` = witnesses(...)."""
    z = z.astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)  # exactly unit rows: the certificate's proof needs ‖Z‖ ≤ 1
    t_scores, s_scores = T.astype(np.float64) @ z.T, S.astype(np.float64) @ z.T
    top2 = np.sort(t_scores, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    return {"margin": margin, "agree": t_scores.argmax(1) == s_scores.argmax(1),
            "paper_certified": margin > 6 * bounds["paper_eps"], "witness_certified": margin > 2 * bounds["bound"],
            "direct_certified": margin > 2 * bounds["delta"]}


def _certificate_summary(part: dict) -> dict:
    delta, bound = part["delta"], part["bound"]
    out = {"delta": _quantiles(delta), "bound": _quantiles(bound), "paper_eps": _quantiles(part["paper_eps"]),
           "eps_train_max": part["eps_train_max"],
           "bound_over_delta_median": float(np.median(bound / np.maximum(delta, 1e-12)))}
    if "margin" not in part:
        return out
    agree, paper, witness, direct = part["agree"], part["paper_certified"], part["witness_certified"], part["direct_certified"]

    def rate(mask):
        return float(agree[mask].mean()) if mask.any() else None

    out.update({
        "margin": _quantiles(part["margin"]),
        "agreement": float(agree.mean()),
        "paper_certified": float(paper.mean()),
        "witness_certified": float(witness.mean()),
        "direct_certified": float(direct.mean()),
        "agreement_witness_certified": rate(witness), "agreement_direct_certified": rate(direct),
        "agreement_uncertified": rate(~direct),
        # Both must be 0: a non-zero count is a bug in zsd, not a property of the data.
        "violations": {"paper_not_witness": int((paper & ~witness).sum()),
                       "witness_not_direct": int((witness & ~direct).sum()),
                       "direct_not_agree": int((direct & ~agree).sum())},
    })
    return out


def _quantiles(x: np.ndarray) -> dict:
    q = np.quantile(x, [0, 0.1, 0.5, 0.9, 1])
    return {"mean": float(x.mean()), "min": float(q[0]), "p10": float(q[1]), "median": float(q[2]),
            "p90": float(q[3]), "max": float(q[4])}


def _coverage_curve(eps_t: np.ndarray, points: int = 101) -> dict:
    """Fraction of test images whose nearest train image is closer than t, for t on a grid up to max ε_T."""
    thresholds = np.linspace(0, float(eps_t.max()) * 1.001 + 1e-9, points)
    fraction = np.searchsorted(np.sort(eps_t), thresholds, side="left") / len(eps_t)
    return {"threshold": thresholds.round(6).tolist(), "fraction": fraction.round(6).tolist()}


def _per_class(records: list[dict], test_store: Store, train_labels: list, nearest: np.ndarray) -> list[dict]:
    rows = {}
    for n, rec in enumerate(records):
        if rec["label"] is not None:
            rows.setdefault(rec["label"], []).append(n)
    train_labelled = any(lab is not None for lab in train_labels)
    out = []
    for name in test_store.classnames:
        idx = rows.get(name, [])
        if not idx:
            continue
        eps = np.array([records[n]["eps_t"] for n in idx])
        entry = {"class": name, "n": len(idx), "median_eps_t": float(np.median(eps)), "mean_eps_t": float(eps.mean()),
                 "max_eps_t": float(eps.max()),
                 "nearest_same_class": (float(np.mean([train_labels[nearest[n]] is not None
                                                       and class_key(train_labels[nearest[n]]) == class_key(name)
                                                       for n in idx]))
                                        if train_labelled else None)}
        if "agree" in records[idx[0]]:
            entry["agreement"] = float(np.mean([records[n]["agree"] for n in idx]))
            entry["direct_certified"] = float(np.mean([records[n]["direct_certified"] for n in idx]))
            entry["witness_certified"] = float(np.mean([records[n]["witness_certified"] for n in idx]))
        out.append(entry)
    return sorted(out, key=lambda e: -e["median_eps_t"])


# ---------------------------------------------------------------- presentation

def coverage_text(report: dict) -> str:
    e = report["eps_t"]
    lines = [f"coverage of {report['test']} ({report['n_test']} images) by {', '.join(report['train'])} "
             f"({report['n_train']} images), teacher {report['teacher']['model']}",
             f"  eps_T (teacher-space L2 to the nearest train image): median {e['median']:.4f}, "
             f"p90 {e['p90']:.4f}, max {e['max']:.4f}; near-duplicates (< {report['dup_threshold']}): "
             f"{report['near_duplicates']}"]
    c = report.get("certificate")
    if c:
        lines.append(f"  student {report['student']['run_dir']}: delta median {c['delta']['median']:.4f}, "
                     f"bound B median {c['bound']['median']:.4f}, B/delta median {c['bound_over_delta_median']:.2f}")
        if "agreement" in c:
            lines.append(f"  agreement {100 * c['agreement']:.2f} %; certified: paper's Lemma 1 (margin > 6 eps, "
                         f"student gap <= {c['eps_train_max']:.4f} on every train image) {100 * c['paper_certified']:.2f} %, "
                         f"witness (margin > 2B) {100 * c['witness_certified']:.2f} %, "
                         f"direct (margin > 2 delta) {100 * c['direct_certified']:.2f} %")
            unc = c["agreement_uncertified"]
            lines.append("  agreement among uncertified images: " + ("-" if unc is None else f"{100 * unc:.2f} %"))
    for note in report["notes"]:
        lines.append(f"  note: {note}")
    if report["per_class"]:
        lines.append("  least-covered classes (median eps_T, nearest train image of the same class):")
        for p in report["per_class"][:5]:
            same = "-" if p["nearest_same_class"] is None else f"{100 * p['nearest_same_class']:.0f} %"
            lines.append(f"    {p['class']:<28} {p['median_eps_t']:.4f}  {same}")
    lines.append("  least-covered test images:")
    for w in report["least_covered"][:5]:
        lines.append(f"    {w['key']}  eps_T {w['eps_t']:.4f}  nearest {w['nearest'][0]['key']}")
    return "\n".join(lines)


PLOT_CLASSES = 20  # the per-class panel shows this many least and best covered classes when there are more


def plot_coverage(report: dict, path: str | os.PathLike):
    """A PNG of the audit: coverage curve, per-class coverage and, with margins, one panel per certificate.

    Every panel has its own scales and a title; agreement and disagreement have their own colours
    in every panel. Returns the matplotlib figure (closed), whose axes tests read back.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cert = report.get("certificate") or {}
    per_class = sorted(report["per_class"], key=lambda p: p["median_eps_t"])
    shown = per_class if len(per_class) <= 2 * PLOT_CLASSES else per_class[:PLOT_CLASSES] + per_class[-PLOT_CLASSES:]
    rows = 2 if "margin" in cert else 1
    height = max(4.0, 0.16 * len(shown) + 1)  # the per-class labels never overlap
    fig, axes = plt.subplots(rows, 2, figsize=(11, height + 4 * (rows - 1)), squeeze=False,
                             gridspec_kw={"height_ratios": [height, 4][:rows]})
    axes = axes.ravel()
    curve = report["coverage_curve"]
    axes[0].plot(curve["threshold"], curve["fraction"])
    axes[0].set(xlabel="t (teacher-space L2)", ylabel="fraction of test images with eps_T < t",
                title=f"coverage curve ({report['n_test']} test images)")
    if shown:
        y = range(len(shown))
        axes[1].barh(y, [p["median_eps_t"] for p in shown])
        axes[1].set_yticks(y, [p["class"] for p in shown], fontsize=7)
        cut = "" if len(shown) == len(per_class) else f": the {PLOT_CLASSES} least and best covered of {len(per_class)}"
        axes[1].set(xlabel="median eps_T (lower: better covered)", title=f"per-class coverage{cut}")
        if cut:
            axes[1].axhline(PLOT_CLASSES - 0.5, color="k", lw=0.8, ls=":")
    else:
        axes[1].hist([r["eps_t"] for r in report["images"]], bins=50)
        axes[1].set(xlabel="eps_T", ylabel="test images", title="eps_T histogram")
    if rows == 2:
        imgs = report["images"]
        margin = np.array([r["margin"] for r in imgs])
        agree = np.array([r["agree"] for r in imgs])
        for ax, field, name, title in (
                (axes[2], "delta", "2 delta", "direct certificate: margin > 2 delta"),
                (axes[3], "bound", "2 B", "witness certificate: margin > 2 B")):
            x = 2 * np.array([r[field] for r in imgs])
            ax.scatter(x[agree], margin[agree], s=8, c="tab:blue", label="student agrees with teacher")
            ax.scatter(x[~agree], margin[~agree], s=14, c="tab:red", marker="x", label="student disagrees")
            top = float(min(x.max(), margin.max())) or 1e-6
            ax.plot([0, top], [0, top], "k--", lw=0.8, label="certified above the line")
            ax.set_xlim(0, float(x.max()) * 1.05 or 1e-6)  # each panel its own scale: margins are
            ax.set_ylim(0, float(margin.max()) * 1.05 or 1e-6)  # often 10x smaller than 2 B
            ax.set(xlabel=name, ylabel="teacher top-1 margin", title=f"{title} ({(margin > x).mean():.0%} certified)")
            ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:  # the format from the name asked for: the temporary one ends in .tmp
        fig.savefig(tmp, dpi=120, format=Path(path).suffix.lstrip(".").lower() or "png")
    plt.close(fig)
    return fig
