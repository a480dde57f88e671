"""Zero-shot evaluation of the teacher and its students on a labelled test store.

The teacher's image embeddings come from the test store (view 0: its deterministic eval
transform). A student's come from a store of the same format that `student_embeddings`
writes into the student's run folder (RUN_DIR/embeddings/<test>.zarr), computed with the
student's own deterministic eval transform; `zsd coverage` reuses those stores.
Both are classified against the same class embeddings (`zsd.classes.build_classifier`): the
teacher's zero-shot classifier, or the class prototypes of a labelled store.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np

from zsd.cache import cache_teacher, default_workers, embed_rows
from zsd.classes import Classifier, build_classifier, check_labelled, dataset_name
from zsd.cpu import tune_allocator
from zsd.dist import resolve_device
from zsd.errors import ZsdError, check_at_least, check_writable, is_run_folder, write_atomic
from zsd.guarantee import abstains, shipped_guarantee
from zsd.sources import PackedKeys
from zsd.store import CHUNK_WRITES, PENDING, WRITTEN, Store, cache_dir, create_store, open_store, resolve_store
from zsd.student import OPEN_CLIP_CONFIG, StudentRef, load_student, resolve_student, student_fingerprint
from zsd.teachers import DEFAULT_TEACHER, resolve_precision, same_teacher, teacher_id
from zsd.views import Preprocess, ViewDataset


# ---------------------------------------------------------------- metrics

def classification_metrics(scores: np.ndarray, labels: np.ndarray, teacher_pred: np.ndarray | None = None,
                           confusion: bool = False) -> dict:
    """top-1, top-5 (top-K when K < 5), mean per-class recall (over classes present), agreement."""
    n, k = scores.shape
    order = np.argsort(-scores, axis=1, kind="stable")
    pred = order[:, 0]
    top = min(5, k)
    recalls = [float((pred[labels == c] == c).mean()) for c in np.unique(labels)]
    out = {
        "acc1": float((pred == labels).mean()),
        "acc5": float((order[:, :top] == labels[:, None]).any(axis=1).mean()),
        "mean_per_class_recall": float(np.mean(recalls)),
    }
    if teacher_pred is not None:
        out["agreement_with_teacher"] = float((pred == teacher_pred).mean())
    if confusion:
        matrix = np.zeros((k, k), dtype=np.int64)
        np.add.at(matrix, (labels, pred), 1)
        out["confusion_matrix"] = matrix.tolist()
    return out


def selective_metrics(guarantee: dict, scores: np.ndarray, labels: np.ndarray, teacher_pred: np.ndarray,
                      norms: np.ndarray) -> dict:
    """The predictions the student's calibrated guarantee accepts (`zsd calibrate`): their fraction, top-1
    and agreement with the teacher; the others abstain."""
    accepted = ~abstains(guarantee, scores / norms[:, None])  # the score is defined on cosines
    pred = scores.argmax(axis=1)
    n = int(accepted.sum())
    return {"accepted_fraction": float(accepted.mean()) if len(accepted) else 0.0, "n_accepted": n,
            "acc1": float((pred[accepted] == labels[accepted]).mean()) if n else None,
            "agreement_with_teacher": float((pred[accepted] == teacher_pred[accepted]).mean()) if n else None,
            "score": guarantee["score"]["name"], "threshold": guarantee["threshold"], "alpha": guarantee["alpha"],
            "delta": guarantee["delta"], "risk": guarantee["risk"]}


# ---------------------------------------------------------------- student embeddings

def embeddings_folder(run_folder: Path) -> Path:
    """RUN_DIR/embeddings; for a run folder this process cannot write (a colleague's run, a read-only
    install), a folder of its own in the cache dir, named by the run folder's absolute path."""
    own = run_folder / "embeddings"
    try:
        check_writable(own, "the student's embeddings")
        return own
    except ZsdError:
        tag = hashlib.sha256(str(run_folder.resolve()).encode()).hexdigest()[:16]
        return cache_dir() / "student_embeddings" / f"{run_folder.resolve().name}-{tag}"


def student_embeddings(student: str | os.PathLike | StudentRef, store: Store, model=None, config: dict | None = None, *,
                       device: str = "cpu", batch_size: int = 128, workers: int | None = None,
                       progress: bool = True) -> Store:
    """A store of the student's embeddings of `store`'s images (same rows), in RUN_DIR/embeddings/
    (`ema_<store>` for the student RUN_DIR:ema), or in the cache dir for an exported open_clip folder
    and for a run folder that is not writable (`embeddings_folder`).

    Reused when it exists, matches this student checkpoint and the source store, and is
    complete; resumed when partial; rebuilt when it belongs to an older checkpoint.
    """
    device = resolve_device(device)  # "auto" is zsd's word, not torch's
    workers = default_workers(device, workers)
    ref = resolve_student(student)
    if model is None:
        model, config = load_student(ref, device)
    status = store.status()
    if (status == PENDING).any():
        raise ZsdError(f"{store.path} is not complete: finish `zsd cache-teacher` before computing student embeddings")
    fingerprint = student_fingerprint(ref, config)
    sid = teacher_id(fingerprint)
    # which store, as it stands: a store rebuilt at the same path (other failed rows, other images) is another
    source = {"store": str(store.path.resolve()), "teacher_id": store.teacher_id, "rows": store.rows,
              "created": store.attrs.get("created"), "status": hashlib.sha256(status.tobytes()).hexdigest()[:16]}
    if ref.kind == "open_clip":  # a model folder, perhaps downloaded or to be uploaded: nothing is added to it
        out = cache_dir() / "student_embeddings" / f"{sid}-{store.path.name}"
    else:
        out = embeddings_folder(ref.folder) / (ref.prefix + store.path.name)
    keys = store.keys()
    if out.exists():
        try:
            old = open_store(out, mode="r+")
            same = old.teacher_id == sid and old.attrs.get("embeds") == source and np.array_equal(old.keys(), keys)
        except ZsdError:  # damaged beyond its chunks of embeddings: rebuilt like a stale one
            same = False
        if same:
            old.uncommit(sorted({c for _, c, _ in old.damage(arrays=CHUNK_WRITES)}))  # recomputed below
            if old.complete():
                return old
        else:  # an earlier checkpoint's or another store's embeddings: they describe nothing now
            shutil.rmtree(out)
    emb_store = create_store(out, keys=keys, labels=store.labels(), locs=store.locs(), views=1,
                             dim=int(config["embed_dim"]), teacher=fingerprint, teacher_id=sid,
                             classnames=store.classnames, sources=store.sources,
                             chunk_rows=store.chunk_rows, extra={"embeds": source})

    # Rows the teacher could not embed are recorded as failed here too, without being read.
    errors = store.errors()
    skip = {int(r): str(errors[r]) or "not embedded by the teacher" for r in np.flatnonzero(status != WRITTEN)}
    dataset = ViewDataset(store.sources, PackedKeys(keys), store.locs(), Preprocess.from_dict(config["preprocess"]))
    model = model.to(device).eval()
    tune_allocator(device)
    embed_rows(emb_store, dataset, model.encode_images, emb_store.pending_chunks(),
               images_per_batch=batch_size, workers=workers, skip=skip, device=device,
               desc=f"student -> {out.parent.parent.name}/{out.name}", encoder_name="student", progress=progress)
    return emb_store


# ---------------------------------------------------------------- the evaluation

def prepare_test_store(test: str, teacher: str | None, pretrained: str | None, device: str,
                       workers: int | None, progress: bool, log, precision: str = "auto") -> Store:
    """A store name/path opens as is; an image folder is first cached with the teacher (1 view), into
    a store named by folder, teacher, weights and (unless fp32) precision: a folder evaluated on a CPU
    (fp32) and on a GPU (bf16) gets a store each."""
    folder = Path(test)
    if is_run_folder(folder) or (folder / OPEN_CLIP_CONFIG).is_file():  # not images: caching it would find none
        raise ZsdError(f"TEST {folder} is a student (a run or an exported folder), not a test set: pass a labelled "
                       f"image folder or a store, and the student as --student {folder}")
    if folder.is_dir() and not (folder / "zarr.json").exists():
        teacher = teacher or DEFAULT_TEACHER
        precision = resolve_precision(precision, resolve_device(device))
        key = [str(folder.resolve()), teacher, pretrained] + ([precision] if precision != "fp32" else [])
        tag = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:8]
        out = cache_dir() / f"{folder.name}-{tag}.zarr"
        log(f"caching test images of {folder} with {teacher} ({precision}) into {out}")
        cache_teacher([str(folder)], str(out), teacher=teacher, pretrained=pretrained, views=1, workers=workers,
                      device=device, precision=precision, progress=progress, log=log)
        return open_store(out)
    return open_store(resolve_store(test))


def check_student_teacher(student: StudentRef, config: dict, store: Store, log=print) -> None:
    """A student is compared with the embeddings of its own teacher; a test store of the same teacher
    at another precision (fp32 on a CPU, bf16 on a GPU) is accepted with a note."""
    match = same_teacher(config.get("teacher_id"), config.get("teacher"), store.teacher_id, store.teacher)
    if match == "other":
        raise ZsdError(f"student {student} was distilled from teacher {config.get('teacher_id')}, but "
                       f"{store.path} holds teacher {store.teacher_id}'s embeddings")
    if match == "precision":
        log(f"note: student {student} learnt {config['teacher'].get('precision', 'fp32')} targets, {store.path} "
            f"holds the same teacher's {store.teacher.get('precision', 'fp32')} embeddings: compared across "
            "precisions (they differ by rounding)")


def evaluated_rows(store: Store, classifier: Classifier, log=print) -> tuple[np.ndarray, np.ndarray, int]:
    """(per row: its class index in the classifier or -1, the rows to score, images left out by class)."""
    labels = store.labels()
    if classifier.note:
        log(f"note: {classifier.note}")
    new_label = np.full(max(len(store.classnames), 1), -1)
    new_label[classifier.keep] = np.arange(len(classifier.keep))
    mapped = np.where(labels >= 0, new_label[np.maximum(labels, 0)], -1)
    rows = store.written() & (mapped >= 0)
    dropped = int((store.written() & (labels >= 0) & (mapped < 0)).sum())
    if dropped:
        log(f"note: {dropped} test images of classes outside --classnames are left out")
    if not rows.any():
        raise ZsdError(f"{store.path} has no written, labelled rows of the evaluated classes")
    return mapped, rows, dropped


def evaluate(test: str, students: list[str] = (), *, teacher: str | None = None, pretrained: str | None = None,
             templates: str | None = None, classnames: str | None = None, classes_from: str | None = None,
             device: str = "auto", batch_size: int = 128, workers: int | None = None, confusion: bool = False,
             out_dir: str | None = None, progress: bool = True, log=print) -> list[dict]:
    """Zero-shot metrics of the teacher and every student; one CLIP_benchmark-shaped dict each.

    With `classes_from` (a labelled store of the same teacher) every model is scored against its
    class prototypes (see `build_classifier`), and the teacher is not loaded.
    """
    check_at_least("--batch-size", batch_size, 1)
    check_at_least("--workers", workers, 0)
    workers = default_workers(resolve_device(device), workers)
    refs = [resolve_student(s) for s in students]  # a typo in the last --student fails before the teacher is run
    store = prepare_test_store(test, teacher, pretrained, device, workers, progress, log)
    check_labelled(store)
    classifier = build_classifier(store, classes_from=classes_from, classnames=classnames, templates=templates,
                                  pretrained=pretrained, device=device)
    names, note = classifier.names, classifier.note
    mapped, rows, dropped = evaluated_rows(store, classifier, log)
    dataset = dataset_name(store)
    z = classifier.weights.astype(np.float64)
    teacher_scores = store.embeddings(view=0).astype(np.float64) @ z.T
    nonfinite = rows & ~np.isfinite(teacher_scores).all(axis=1)
    if nonfinite.any():  # NaN scores would argmax to class 0 and count silently
        log(f"warning: {store.path}: {int(nonfinite.sum())} written rows have non-finite embeddings and are left "
            f"out (`zsd verify {store.path}` lists them)")
        rows &= ~nonfinite
    teacher_pred = teacher_scores.argmax(axis=1)

    info = classifier.info
    common = {"dataset": dataset, "task": "zeroshot_classification", "language": "en",
              "teacher_id": store.teacher_id, "classnames": names, "classifier": info,
              "templates": info.get("templates"), "n_templates": info.get("n_templates", 0),
              "classes_note": note, "dropped_rows": dropped}
    results = []
    metrics = classification_metrics(teacher_scores[rows], mapped[rows], teacher_pred[rows], confusion)
    results.append({"model": store.teacher["model"], "pretrained": store.teacher["weights"], "role": "teacher",
                    "metrics": metrics, "n_images": int(rows.sum()), "embeddings": str(store.path), **common})
    for ref in refs:
        student, config = load_student(ref, resolve_device(device))
        check_student_teacher(ref, config, store, log)
        emb = student_embeddings(ref, store, student, config, device=next(student.parameters()).device,
                                 batch_size=batch_size, workers=workers, progress=progress)
        ok = rows & emb.written()
        s = emb.embeddings(view=0).astype(np.float64)
        scores = s @ z.T
        metrics = classification_metrics(scores[ok], mapped[ok], teacher_pred[ok], confusion)
        guarantee, why = shipped_guarantee(ref, emb.teacher["weights"], names, info)
        if guarantee:
            metrics["selective"] = selective_metrics(guarantee, scores[ok], mapped[ok], teacher_pred[ok],
                                                     np.linalg.norm(s[ok], axis=1))
        elif why:
            log(f"note: {why}")
        results.append({"model": config["student"], "pretrained": emb.teacher["weights"], "role": "student",
                        "run_dir": ref.spec, "metrics": metrics, "n_images": int(ok.sum()),
                        "embeddings": str(emb.path), **common})
    if out_dir:
        write_results(results, out_dir)
    return results


def result_label(result: dict) -> str:
    label = "teacher" if result["role"] == "teacher" else Path(result["run_dir"]).resolve().name
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label)


def write_results(results: list[dict], out_dir: str | os.PathLike) -> list[Path]:
    """One JSON per (data set, model), as CLIP_benchmark writes them: easy to glob and aggregate."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for r in results:
        path = out_dir / f"{r['dataset']}__{result_label(r)}.json"
        write_atomic(path, json.dumps(r, indent=2) + "\n", flag="--out-dir")
        paths.append(path)
    return paths


def results_table(results: list[dict]) -> str:
    head = f"{'model':<28} {'acc1':>7} {'acc5':>7} {'mpcr':>7} {'agree':>7} {'n':>7}"
    info = results[0]["classifier"]
    how = f"prototypes from {info['store']}" if info["kind"] == "prototypes" else f"templates {info['templates']}"
    lines = [f"{results[0]['dataset']}: zero-shot, {how}",
             "(acc1/acc5: top-1/top-5 accuracy %; mpcr: mean per-class recall %; agree: % of photos whose top-1 is "
             "the teacher's; n: photos scored)", head, "-" * len(head)]
    for r in results:
        m = r["metrics"]
        name = "teacher " + r["model"] if r["role"] == "teacher" else result_label(r)
        lines.append(f"{name[:28]:<28} {100 * m['acc1']:>7.2f} {100 * m['acc5']:>7.2f} "
                     f"{100 * m['mean_per_class_recall']:>7.2f} {100 * m['agreement_with_teacher']:>7.2f} "
                     f"{r['n_images']:>7}")
    for r in results:
        sel = r["metrics"].get("selective")
        if sel:
            got = (f"top-1 {100 * sel['acc1']:.2f} %, agreement {100 * sel['agreement_with_teacher']:.2f} %"
                   if sel["n_accepted"] else "nothing accepted")
            lines.append(f"{result_label(r)}: its calibrated guarantee ({sel['risk']} <= {sel['alpha']}, "
                         f"confidence {1 - sel['delta']:.0%}) accepts {100 * sel['accepted_fraction']:.1f} % "
                         f"({sel['n_accepted']} photos): {got}")
    return "\n".join(lines)
