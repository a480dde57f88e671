"""Zero-shot evaluation of the teacher and its students on a labelled test store.

The teacher's image embeddings come from the test store (view 0: its deterministic eval
transform). A student's come from a store of the same format that `student_embeddings`
writes into the student's run folder (RUN_DIR/embeddings/<test>.zarr), computed with the
student's own deterministic eval transform; `zsd coverage` reuses those stores.
Both are classified against the same class embeddings: the teacher's zero-shot classifier
(CLIP_benchmark's procedure: per class, embed every template, normalise, average, renormalise;
or a timm teacher's classifier rows looked up by ImageNet class name), or prototypes: per class,
the normalised mean of the teacher's normalised embeddings of that class's images in a labelled
store, which needs no text tower, no class head and no teacher rebuild.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zsd.cache import cache_teacher, embed_rows
from zsd.cpu import tune_allocator
from zsd.errors import ZsdError, atomic_file, check_at_least, check_writable, write_atomic
from zsd.open_clip_folder import is_open_clip_folder
from zsd.sources import PackedKeys, class_key
from zsd.store import CHUNK_WRITES, WRITTEN, Store, cache_dir, cache_folder, create_store, open_store, resolve_store
from zsd.student import load_student, student_files, student_fingerprint, student_location
from zsd.teachers import (DEFAULT_TEACHER, Teacher, rebuild_teacher, resolve_device, resolve_precision,
                           same_teacher, teacher_id)
from zsd.templates import resolve_templates
from zsd.views import Preprocess, ViewDataset


# ---------------------------------------------------------------- classes and classifier

def prompt_name(folder_name: str) -> str:
    return folder_name.replace("_", " ")


def select_classes(store_classnames: list[str], classnames_file: str | None) -> tuple[list[int], list[str], str]:
    """(store class indices to evaluate, their names for the classifier, a note on dropped classes).

    The file is a JSON list (one name per store class, in store order), or a JSON object mapping
    store class name -> name or -> {"imagenet_name": ...}; classes missing from a mapping are
    left out of the evaluation. Comma-separated synonym lists ("Siamese cat, Siamese") keep the first.
    """
    if not classnames_file:
        if not store_classnames:
            raise ZsdError("the test store has no class names (unlabelled images): pass --classnames FILE "
                           "or a labelled test set")
        return list(range(len(store_classnames))), [prompt_name(c) for c in store_classnames], ""
    path = Path(classnames_file)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ZsdError(f"cannot read --classnames {path} as JSON ({e})") from None
    if isinstance(data, list):
        if len(data) != len(store_classnames):
            raise ZsdError(f"--classnames {path} lists {len(data)} names but the test store has "
                           f"{len(store_classnames)} classes")
        return list(range(len(data))), [str(n).split(",")[0].strip() for n in data], ""
    if not isinstance(data, dict):
        raise ZsdError(f"--classnames {path} is neither a JSON list nor a JSON object")
    keep, names = [], []
    for i, folder in enumerate(store_classnames):
        if folder not in data:
            continue
        entry = data[folder]
        name = entry.get("imagenet_name") or entry.get("name") if isinstance(entry, dict) else entry
        if not isinstance(name, str) or not name.strip():
            raise ZsdError(f"--classnames {path}: entry {folder!r} has no name (a string or {{\"imagenet_name\": ...}})")
        keep.append(i)
        names.append(name.split(",")[0].strip())
    if not keep:
        raise ZsdError(f"--classnames {path} maps none of the test store's classes "
                       f"({', '.join(store_classnames[:5])}, ...)")
    dropped = len(store_classnames) - len(keep)
    note = f"{dropped} of {len(store_classnames)} classes are not in {path.name} and are left out" if dropped else ""
    return keep, names, note


def zero_shot_classifier(teacher: Teacher, names: list[str], templates: list[str], cache: bool = True) -> np.ndarray:
    """(K, D) float32 unit rows; cached per (teacher id, names, templates) in the cache dir."""
    key = hashlib.sha256(json.dumps([teacher.id, names, templates]).encode()).hexdigest()[:20]
    path = cache_dir() / "classifiers" / f"{key}.npy"
    if cache and path.is_file():
        return np.load(path)
    z = teacher.classifier(names, templates).float().numpy().astype(np.float32)
    if cache:
        cache_folder("classifiers")
        with atomic_file(path) as tmp, open(tmp, "wb") as f:
            np.save(f, z)
    return z


def prototype_labels(store: Store, classnames: list[str]) -> np.ndarray:
    """Per row of `store`: the index in `classnames` of its class, or -1 (unlabelled, not written,
    or a class not in `classnames`). Classes match by `class_key`; a missing one is an error."""
    index = {}
    for i, name in enumerate(classnames):
        first = index.setdefault(class_key(name), i)
        if first != i:
            raise ZsdError(f"the test classes {classnames[first]!r} and {name!r} are one class by name "
                           "(case, spaces, '_' and '-' do not count): prototypes cannot tell them apart")
    # Several of the store's classes may share a key (merged sources spell a class differently): pooled.
    to_test = np.array([index.get(class_key(name), -1) for name in store.classnames] + [-1])
    labels = to_test[store.labels()]  # label -1 picks the trailing -1
    labels[~store.written()] = -1
    missing = [name for name, n in zip(classnames, np.bincount(labels[labels >= 0], minlength=len(classnames)))
               if n == 0]
    if missing:
        raise ZsdError(f"{store.path} has no written images of {len(missing)} of the {len(classnames)} test "
                       f"classes ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}): prototypes need "
                       "every class")
    return labels


def prototype_classifier(store: Store, classnames: list[str]) -> np.ndarray:
    """(K, D) float32 unit rows: per class, the normalised mean of the normalised view-0 embeddings
    of the store's written rows of that class. Streams the store, so any size fits in memory."""
    return _class_means(store, prototype_labels(store, classnames), len(classnames))


def _class_means(store: Store, labels: np.ndarray, n_classes: int) -> np.ndarray:
    sums = np.zeros((n_classes, store.dim))
    for start, block in store.iter_blocks(0):
        rows = labels[start:start + len(block)]
        ok = (rows >= 0) & np.isfinite(block).all(axis=1)  # a non-finite row would make its class NaN
        emb = block[ok].astype(np.float64)
        np.add.at(sums, rows[ok], emb / np.linalg.norm(emb, axis=1, keepdims=True))
    return (sums / np.linalg.norm(sums, axis=1, keepdims=True)).astype(np.float32)


@dataclass
class Classifier:
    """The class embeddings a test store's images are scored against, and how they were made."""

    keep: list[int]  # the test store's class indices, one per row of `weights`
    names: list[str]
    weights: np.ndarray  # (K, D) float32 unit rows
    info: dict  # the results' "classifier" entry
    note: str = ""  # classes left out, for the user


def build_classifier(store: Store, *, classes_from: str | None = None, classnames: str | None = None,
                    templates: str | None = None, pretrained: str | None = None, device: str = "auto") -> Classifier:
    """Prototypes from the labelled store `classes_from`, or the rebuilt teacher's zero-shot classifier."""
    if classes_from:
        if classnames:
            raise ZsdError("--classnames names classes for the text classifier, --classes-from matches the stores' "
                           "own class names: pass one of them")
        source = open_store(classes_from)
        if source.teacher_id != store.teacher_id:
            raise ZsdError(f"--classes-from {source.path} holds teacher {source.teacher_id}'s embeddings, the test "
                           f"store {store.path} teacher {store.teacher_id}'s: prototypes need the same teacher")
        names = store.classnames
        labels = prototype_labels(source, names)
        counts = np.bincount(labels[labels >= 0], minlength=len(names))
        info = {"kind": "prototypes", "store": str(source.path), "teacher_id": source.teacher_id,
                "images_per_class": dict(zip(names, counts.tolist()))}
        return Classifier(list(range(len(names))), names, _class_means(source, labels, len(names)), info)
    keep, names, note = select_classes(store.classnames, classnames)
    teacher = rebuild_teacher(store.teacher, store.teacher_id, pretrained, device)
    template_source, template_list = resolve_templates(templates, dataset_name(store))
    info = {"kind": "templates", "templates": template_source, "n_templates": len(template_list)}
    return Classifier(keep, names, zero_shot_classifier(teacher, names, template_list), info, note)


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


def student_embeddings(run_dir: str | os.PathLike, store: Store, model=None, config: dict | None = None, *,
                       device: str = "cpu", batch_size: int = 128, workers: int = 0, progress: bool = True) -> Store:
    """A store of the student's embeddings of `store`'s images (same rows), in RUN_DIR/embeddings/
    (`ema_<store>` for the student RUN_DIR:ema), or in the cache dir for an exported open_clip folder
    and for a run folder that is not writable (`embeddings_folder`).

    Reused when it exists, matches this student checkpoint and the source store, and is
    complete; resumed when partial; rebuilt when it belongs to an older checkpoint.
    """
    device = resolve_device(device)  # "auto" is zsd's word, not torch's
    if model is None:
        model, config = load_student(run_dir, device)
    if not store.complete():
        raise ZsdError(f"{store.path} is not complete: finish `zsd cache-teacher` before computing student embeddings")
    fingerprint = student_fingerprint(run_dir, config)
    sid = teacher_id(fingerprint)
    # which store, as it stands: a store rebuilt at the same path (other failed rows, other images) is another
    status = store.status()
    source = {"store": str(store.path.resolve()), "teacher_id": store.teacher_id, "rows": store.rows,
              "created": store.attrs.get("created"), "status": hashlib.sha256(status.tobytes()).hexdigest()[:16]}
    folder, prefix = student_location(run_dir)
    if is_open_clip_folder(folder):  # a model folder, perhaps downloaded or to be uploaded: nothing is added to it
        out = cache_dir() / "student_embeddings" / f"{sid}-{store.path.name}"
    else:
        out = embeddings_folder(folder) / (prefix + store.path.name)
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


def dataset_name(store: Store) -> str:
    return store.path.name.removesuffix(".zarr")


def check_student_teacher(run_dir, config: dict, store: Store, log=print) -> None:
    """A student is compared with the embeddings of its own teacher; a test store of the same teacher
    at another precision (fp32 on a CPU, bf16 on a GPU) is accepted with a note."""
    match = same_teacher(config.get("teacher_id"), config.get("teacher"), store.teacher_id, store.teacher)
    if match == "other":
        raise ZsdError(f"student {run_dir} was distilled from teacher {config.get('teacher_id')}, but "
                       f"{store.path} holds teacher {store.teacher_id}'s embeddings")
    if match == "precision":
        log(f"note: student {run_dir} learnt {config['teacher'].get('precision', 'fp32')} targets, {store.path} "
            f"holds the same teacher's {store.teacher.get('precision', 'fp32')} embeddings: compared across "
            "precisions (they differ by rounding)")


def check_labelled(store: Store) -> None:
    if store.rows == 0:
        raise ZsdError(f"{store.path} holds no images")
    if not store.classnames or (store.labels() < 0).all():
        raise ZsdError(f"{store.path} is unlabelled: zero-shot accuracy needs a labelled test set")


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
             device: str = "auto", batch_size: int = 128, workers: int | None = 0, confusion: bool = False,
             out_dir: str | None = None, progress: bool = True, log=print) -> list[dict]:
    """Zero-shot metrics of the teacher and every student; one CLIP_benchmark-shaped dict each.

    With `classes_from` (a labelled store of the same teacher) every model is scored against its
    class prototypes (see `build_classifier`), and the teacher is not loaded.
    """
    check_at_least("--batch-size", batch_size, 1)
    check_at_least("--workers", workers, 0)
    resolve_device(device)
    for run_dir in students:  # a typo in the last --student fails before the teacher is run
        student_files(run_dir)
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
    for run_dir in students:
        student, config = load_student(run_dir, resolve_device(device))
        check_student_teacher(run_dir, config, store, log)
        emb = student_embeddings(run_dir, store, student, config, device=next(student.parameters()).device,
                                 batch_size=batch_size, workers=workers or 0, progress=progress)
        ok = rows & emb.written()
        scores = emb.embeddings(view=0).astype(np.float64) @ z.T
        metrics = classification_metrics(scores[ok], mapped[ok], teacher_pred[ok], confusion)
        results.append({"model": config["student"], "pretrained": emb.teacher["weights"], "role": "student",
                        "run_dir": str(run_dir), "metrics": metrics, "n_images": int(ok.sum()),
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
    lines = [f"{results[0]['dataset']}: zero-shot, {how}", head, "-" * len(head)]
    for r in results:
        m = r["metrics"]
        name = "teacher " + r["model"] if r["role"] == "teacher" else result_label(r)
        lines.append(f"{name[:28]:<28} {100 * m['acc1']:>7.2f} {100 * m['acc5']:>7.2f} "
                     f"{100 * m['mean_per_class_recall']:>7.2f} {100 * m['agreement_with_teacher']:>7.2f} "
                     f"{r['n_images']:>7}")
    return "\n".join(lines)
