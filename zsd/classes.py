"""Class embeddings: the (K, D) unit rows a student's or teacher's image embeddings are scored against.

Two sources, one set of checks, for every consumer (`zsd eval`, `coverage` and `robustness` through
`build_classifier`, `zsd export` through `class_head`, the trainer's clip and mp losses through
`class_prototype_embeddings` and `class_text_embeddings`):

- the teacher's text: per class, its name in every template, embedded by the text tower, normalised,
  averaged and renormalised (CLIP_benchmark's procedure); a timm teacher's classifier rows, looked up
  by ImageNet class name, stand in for it;
- prototypes of a labelled store: per class, the normalised mean of the normalised view-0 teacher
  embeddings of that class's images. No text tower, no class head and no teacher rebuild.

The checks: a store of the same teacher at any precision (a store cached at bf16 on a GPU and one at
fp32 on a CPU hold embeddings that differ by rounding, and their class means by less), a labelled
store, class names a timm head knows; each refusal names the option that fixes it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from zsd.errors import ZsdError, atomic_file
from zsd.sources import class_key
from zsd.store import Store, cache_dir, cache_folder, open_store
from zsd.teachers import Teacher, rebuild_teacher, same_teacher
from zsd.templates import resolve_templates

# CLIP's logit scale after training (exp of the clamped log scale): used when the class embeddings
# come from prototypes or a timm teacher's classifier rows, which have no scale of their own.
CLIP_LOGIT_SCALE = 100.0
# The trainer's one prompt per class, and its cache in the run folder.
PROMPT = "a photo of a {c}, a type of {superclass}."
TEXT = "text_embeddings.pt"


# ---------------------------------------------------------------- class names

def prompt_name(folder_name: str) -> str:
    return folder_name.replace("_", " ")


def _first_synonym(name: str) -> str:
    """Of a comma-separated synonym list ("Siamese cat, Siamese") the first."""
    return name.split(",")[0].strip()


def select_classes(store_classnames: list[str], classnames_file: str | None) -> tuple[list[int], list[str], str]:
    """(store class indices to evaluate, their names for the classifier, a note on dropped classes).

    The file is a JSON list (one name per store class, in store order), or a JSON object mapping
    store class name -> name or -> {"imagenet_name": ...}; classes missing from a mapping are
    left out of the evaluation. Comma-separated synonym lists ("Siamese cat, Siamese") keep the first.
    """
    if not classnames_file:
        if not store_classnames:
            raise ZsdError("the test store has no class names (unlabelled images): pass --classnames FILE "
                           "(a JSON list of class names) or --classes-from STORE, or a labelled test set")
        return list(range(len(store_classnames))), [prompt_name(c) for c in store_classnames], ""
    path = Path(classnames_file)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ZsdError(f"cannot read --classnames {path} as JSON ({e})") from None
    if isinstance(data, list):
        if not store_classnames:  # unlabelled photos (`zsd calibrate`): the list is the classifier's classes
            return [], [_first_synonym(str(n)) for n in data], ""
        if len(data) != len(store_classnames):
            raise ZsdError(f"--classnames {path} lists {len(data)} names but the test store has "
                           f"{len(store_classnames)} classes")
        return list(range(len(data))), [_first_synonym(str(n)) for n in data], ""
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
        names.append(_first_synonym(name))
    if not keep:
        raise ZsdError(f"--classnames {path} maps none of the test store's classes "
                       f"({', '.join(store_classnames[:5])}, ...)")
    dropped = len(store_classnames) - len(keep)
    note = f"{dropped} of {len(store_classnames)} classes are not in {path.name} and are left out" if dropped else ""
    return keep, names, note


def read_classnames(path: str) -> list[str]:
    """A JSON list of class names, an object with "classnames": [...], or a `zsd eval --classnames`
    mapping (class -> name or {"imagenet_name": ...}: its names in its order, so
    zsd/data/pets37/imagenet_classes.json is one) (`zsd export --classes`); of a comma-separated
    synonym list the first is kept, as `zsd eval --classnames` does."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise ZsdError(f"cannot read --classes {path}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ZsdError(f"--classes {path} is not JSON ({e})") from None
    names = data.get("classnames") if isinstance(data, dict) else data
    if isinstance(data, dict) and names is None:
        names = [e.get("imagenet_name") or e.get("name") if isinstance(e, dict) else e for e in data.values()]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise ZsdError(f"--classes {path} holds no class names (a JSON list of strings, an object with "
                       "\"classnames\": [...], or one mapping each class to a name or {\"imagenet_name\": ...})")
    names = [_first_synonym(n) for n in names]
    if len(set(names)) < len(names):
        raise ZsdError(f"--classes {path} names a class twice")
    return names


def dataset_name(store: Store) -> str:
    return store.path.name.removesuffix(".zarr")


# ---------------------------------------------------------------- the checks

def check_labelled(store: Store, flag: str | None = None) -> None:
    """`store` holds labelled images: a test set (no `flag`) or the class source given by `flag`."""
    name = f"{flag} {store.path}" if flag else str(store.path)
    if store.rows == 0:
        raise ZsdError(f"{name} holds no images")
    if not store.classnames or (store.labels() < 0).all():
        raise ZsdError(f"{name} is unlabelled: " + ("prototypes need a labelled store" if flag
                                                     else "zero-shot accuracy needs a labelled test set"))


def check_same_teacher(source: Store, flag: str, teacher_id: str | None, teacher: dict | None, whose: str) -> None:
    """The class source `flag` holds the embeddings of the teacher `teacher_id` at any precision; `whose`
    names the other side ("the test store X holds")."""
    if same_teacher(source.teacher_id, source.teacher, teacher_id, teacher) == "other":
        raise ZsdError(f"{flag} {source.path} holds teacher {source.teacher_id}'s embeddings, {whose} teacher "
                       f"{teacher_id}'s: prototypes need the same teacher (at any precision)")


def teacher_rows(teacher: Teacher, names: list[str], templates: list[str], prototypes_flag: str) -> torch.Tensor:
    """(K, D) float32 rows of the teacher's classifier; names a timm head does not know (or a timm model
    without a linear head) end in one line that also names the way around them: class prototypes."""
    try:
        return teacher.classifier(names, templates).float()
    except ZsdError as e:
        raise ZsdError(f"{e}; or take class prototypes from a labelled store of this teacher: "
                       f"{prototypes_flag} STORE") from None


# ---------------------------------------------------------------- the teacher's text

def zero_shot_classifier(teacher: Teacher, names: list[str], templates: list[str], cache: bool = True,
                         prototypes_flag: str = "--classes-from") -> np.ndarray:
    """(K, D) float32 unit rows; cached per (teacher id, names, templates) in the cache dir."""
    key = hashlib.sha256(json.dumps([teacher.id, names, templates]).encode()).hexdigest()[:20]
    path = cache_dir() / "classifiers" / f"{key}.npy"
    if cache and path.is_file():
        return np.load(path)
    z = teacher_rows(teacher, names, templates, prototypes_flag).numpy().astype(np.float32)
    if cache:
        cache_folder("classifiers")
        with atomic_file(path) as tmp, open(tmp, "wb") as f:
            np.save(f, z)
    return z


# ---------------------------------------------------------------- prototypes of a labelled store

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


def class_prototypes(flag: str, path: str, classnames: list[str] | None, teacher_id: str | None,
                     teacher: dict | None, whose: str) -> tuple[Store, np.ndarray, np.ndarray]:
    """(the source store, per row its class index or -1, (K, D) prototypes) of the store `flag` PATH for
    `classnames` (default: the store's own), after the checks every consumer makes."""
    source = open_store(path)
    check_same_teacher(source, flag, teacher_id, teacher, whose)
    check_labelled(source, flag)
    names = source.classnames if classnames is None else classnames
    labels = prototype_labels(source, names)
    return source, labels, _class_means(source, labels, len(names))


# ---------------------------------------------------------------- the consumers

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
    """`zsd eval`, `coverage`, `robustness`: prototypes from the labelled store `classes_from`, or the
    rebuilt teacher's zero-shot classifier."""
    if classes_from:
        if classnames:
            raise ZsdError("--classnames names classes for the text classifier, --classes-from matches the stores' "
                           "own class names: pass one of them")
        # an unlabelled test store (`zsd calibrate`) is scored against the source's own classes
        source, labels, weights = class_prototypes("--classes-from", classes_from, store.classnames or None,
                                                   store.teacher_id, store.teacher, f"the test store {store.path} holds")
        names = store.classnames or source.classnames
        counts = np.bincount(labels[labels >= 0], minlength=len(names))
        info = {"kind": "prototypes", "store": str(source.path), "teacher_id": source.teacher_id,
                "images_per_class": dict(zip(names, counts.tolist()))}
        return Classifier(list(range(len(store.classnames))), names, weights, info)
    keep, names, note = select_classes(store.classnames, classnames)
    teacher = rebuild_teacher(store.teacher, store.teacher_id, pretrained, device)
    template_source, template_list = resolve_templates(templates, dataset_name(store))
    info = {"kind": "templates", "templates": template_source, "n_templates": len(template_list)}
    return Classifier(keep, names, zero_shot_classifier(teacher, names, template_list), info, note)


def class_head(config: dict, *, classes: str | None = None, classes_from: str | None = None,
               templates: str | None = None, pretrained: str | None = None) -> tuple[list[str], torch.Tensor | None,
                                                                                     float, dict | None]:
    """`zsd export`: (class names, (K, D) unit class embeddings, logit scale, how they were made) for the
    teacher of the student whose config is `config`."""
    if classes and classes_from:
        raise ZsdError("--classes names classes for the teacher's text classifier, --classes-from takes prototypes "
                       "from a store: pass one of them")
    if templates and not classes:
        raise ZsdError("--templates needs --classes (the text classifier's class names)")
    if classes_from:
        source, _, weights = class_prototypes("--classes-from", classes_from, None, config.get("teacher_id"),
                                              config.get("teacher"), "the student learnt")
        info = {"kind": "prototypes", "store": str(source.path), "teacher_id": source.teacher_id}
        return list(source.classnames), torch.from_numpy(weights), CLIP_LOGIT_SCALE, info
    if not classes:
        return [], None, 1.0, None
    names = read_classnames(classes)
    teacher = rebuild_teacher(config["teacher"], config["teacher_id"], pretrained, "cpu")
    source, template_list = resolve_templates(templates)
    weights = zero_shot_classifier(teacher, names, template_list)
    scale = getattr(getattr(teacher, "model", None), "logit_scale", None)  # open_clip's learned scale
    info = {"kind": "templates", "templates": source, "n_templates": len(template_list),
            "logit_scale": "teacher" if scale is not None else "CLIP's 100 (the teacher has none)"}
    return names, torch.from_numpy(weights), float(scale.detach().exp()) if scale is not None else CLIP_LOGIT_SCALE, info


# The trainer's `targets` is a zsd.loader.TrainTargets: its classnames, teacher and teacher_id are read.

def _target_classes(targets) -> list[str]:
    if not targets.classnames:
        raise ZsdError("the clip and mp losses need class labels, but the --targets stores have no classes")
    return targets.classnames


def class_prototype_embeddings(targets, store: str) -> torch.Tensor:
    """(K, D) per class of the targets: the class prototypes of the labelled `store` (as `zsd eval --classes-from`)."""
    _, _, weights = class_prototypes("--class-embeddings-from", store, _target_classes(targets), targets.teacher_id,
                                     targets.teacher, "the --targets stores hold")
    return torch.from_numpy(weights)


def class_text_embeddings(targets, superclass: str, run_dir: Path, pretrained: str | None = None,
                          log=print) -> torch.Tensor:
    """(K, D) teacher embeddings of "a photo of a {class}, a type of {superclass}." per class.

    Cached in RUN_DIR/text_embeddings.pt keyed by teacher id and prompts. timm teachers have no
    text tower: their classifier rows (looked up by class name) are the class embeddings.
    """
    names = [prompt_name(c) for c in _target_classes(targets)]
    template = PROMPT.replace("{superclass}", superclass)
    key = {"teacher_id": targets.teacher_id, "template": template, "classes": names}
    path = Path(run_dir) / TEXT
    if path.is_file():
        cached = torch.load(path, weights_only=True)
        if cached["key"] == key:
            return cached["embeddings"]
    teacher = rebuild_teacher(targets.teacher, targets.teacher_id, pretrained, "cpu")
    log(f"computing {len(names)} class-prompt embeddings with the teacher {teacher.model_name}")
    emb = teacher_rows(teacher, names, [template], "--class-embeddings-from")
    with atomic_file(path) as tmp, open(tmp, "wb") as f:  # Python's write: a full disk raises OSError
        torch.save({"key": key, "embeddings": emb}, f)
    return emb
