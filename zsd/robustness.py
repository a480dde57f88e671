"""Robustness to common corruptions (Hendrycks & Dietterich's ImageNet-C; the paper's A.9).

Every test image is cut to one square base crop (resize the shortest side to `size`, centre
crop), which is corrupted with the 15 ImageNet-C corruptions at severities 1-5 by the
`imagecorruptions-imaug` package. The corrupted pixels are rendered once into a cache folder
(one uint8 array per corruption and severity, written block by block, so a killed render
resumes) and every model reads them from there through its own evaluation transform; the
rendering, glass blur above all, costs far more than a small model's forward pass.

Each image's corruption is seeded by (seed, corruption, severity, image key), so a rerun, a
resumed render or a subset renders the same pixels. Metrics follow Michaelis et al. (2019):
mPC = the mean top-1 over the corruptions and severities evaluated, rPC = mPC / clean top-1.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF
from tqdm import tqdm

from zsd.cache import default_workers
from zsd.classes import build_classifier, check_labelled, dataset_name
from zsd.dist import resolve_device
from zsd.errors import ZsdError, atomic_file, out_of_memory, reserve, write_atomic
from zsd.evaluate import (check_student_teacher, classification_metrics, evaluated_rows, prepare_test_store,
                          result_label)
from zsd.sources import BadImage, RowReader
from zsd.store import Store, cache_folder
from zsd.student import load_student, resolve_student, student_config
from zsd.teachers import rebuild_teacher
from zsd.views import Preprocess, normalize

CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
               "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
               "jpeg_compression")
SEVERITIES = (1, 2, 3, 4, 5)
# These two take their seed as an argument (glass blur draws inside numba, impulse noise from
# scikit-image's own generator); the others draw from numpy's global generator.
SEEDED_BY_ARGUMENT = {"glass_blur", "impulse_noise"}
BLOCK = 32  # images per rendered block: the unit of resumption


def parse_corruptions(spec: str | list[str] | None) -> list[str]:
    """Names (a list, or one comma-separated string) in the canonical order; None: all 15."""
    if spec is None:
        return list(CORRUPTIONS)
    names = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec) if n.strip()]
    unknown = [n for n in names if n not in CORRUPTIONS]
    if unknown or not names:
        raise ZsdError(f"unknown corruption {', '.join(unknown) or '(none given)'}: choose from {', '.join(CORRUPTIONS)}")
    return [c for c in CORRUPTIONS if c in names]


def parse_severities(spec: str | list[int] | None) -> list[int]:
    if spec is None:
        return list(SEVERITIES)
    items = spec.split(",") if isinstance(spec, str) else spec
    try:
        values = sorted({int(str(s).strip()) for s in items if str(s).strip()})
    except ValueError:
        raise ZsdError(f"--severities {spec}: give integers 1-5, e.g. 1,3,5") from None
    bad = [s for s in values if s not in SEVERITIES]
    if bad or not values:
        raise ZsdError(f"severity {', '.join(map(str, bad)) or '(none given)'} does not exist: severities are 1-5")
    return values


def image_seed(seed: int, corruption: str, severity: int, key: str) -> int:
    digest = hashlib.sha256(json.dumps([seed, corruption, severity, key]).encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _corrupt_fn():
    try:
        from imagecorruptions import corrupt
    except ImportError:
        raise ZsdError("the corruptions need the imagecorruptions-imaug package: pip install 'zsd[robustness]'") \
            from None
    return corrupt


def corrupt_image(pixels: np.ndarray, corruption: str, severity: int, seed: int) -> np.ndarray:
    """uint8 (H, W, 3) -> the corrupted uint8 (H, W, 3); the same seed gives the same pixels."""
    corrupt = _corrupt_fn()
    state = np.random.get_state()  # the caller's global generator is left as it was
    try:
        np.random.seed(seed)
        kwargs = {"seed": seed} if corruption in SEEDED_BY_ARGUMENT else {}
        out = np.asarray(corrupt(pixels, severity=severity, corruption_name=corruption, **kwargs))
    finally:
        np.random.set_state(state)
    if out.shape != pixels.shape:
        raise ZsdError(f"{corruption} turned a {pixels.shape} image into {out.shape}: use a larger --size")
    return np.clip(np.rint(out), 0, 255).astype(np.uint8) if out.dtype != np.uint8 else out


# ---------------------------------------------------------------- the rendered cache

@dataclass
class Rendered:
    """The cache folder of one test store's base crops and their corrupted variants."""

    folder: Path
    size: int
    rows: int

    def path(self, variant: str) -> Path:
        return self.folder / f"{variant}.npy"

    def pixels(self, variant: str) -> np.ndarray:
        """(rows, size, size, 3) uint8, memory-mapped."""
        return np.load(self.path(variant), mmap_mode="r")


def variant_name(corruption: str, severity: int) -> str:
    return f"{corruption}-{severity}"


def base_crop(img, size: int) -> np.ndarray:
    """The square image every corruption starts from: shortest side to `size`, centre crop."""
    img = TF.center_crop(TF.resize(img, size, InterpolationMode.BICUBIC), size)
    return np.asarray(img, dtype=np.uint8)


def render(store: Store, *, size: int = 224, corruptions: list[str], severities: list[int], seed: int = 0,
           workers: int = 0, progress: bool = True) -> Rendered:
    """Render (or finish rendering) the base crops and every requested variant; returns the cache.

    Rows the teacher could not read stay black and are never scored.
    """
    _corrupt_fn()
    import imagecorruptions

    ident = {"store": str(store.path.resolve()), "teacher_id": store.teacher_id, "rows": store.rows,
             "keys": hashlib.sha256("\n".join(store.keys()).encode()).hexdigest(), "size": size, "seed": seed,
             "imagecorruptions": getattr(imagecorruptions, "__version__", "imaug-1.1")}
    tag = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
    folder = cache_folder("corruptions", f"{dataset_name(store)}-{tag}")
    write_atomic(folder / "meta.json", json.dumps(ident, indent=1) + "\n", flag="$ZSD_CACHE")
    out = Rendered(folder, size, store.rows)
    written = store.written()
    keys = list(store.keys())
    blocks = [range(b, min(b + BLOCK, store.rows)) for b in range(0, store.rows, BLOCK)]

    if _pending(out, "clean", len(blocks)):
        reader, locs = RowReader(store.sources), store.locs()
        _render_variant(out, "clean", blocks, lambda rows: _read_block(reader, keys, locs, written, rows, size),
                        desc="base crops", progress=progress)
    clean = out.pixels("clean")
    pending = {(c, s): _pending(out, variant_name(c, s), len(blocks)) for c in corruptions for s in severities}
    variants = [v for v, todo in pending.items() if todo]
    bar = tqdm(total=sum(len(blocks[b]) for todo in pending.values() for b in todo), unit="img",
               desc="rendering corruptions",
               disable=not progress or not variants, dynamic_ncols=True)
    pool = ProcessPoolExecutor(workers) if workers > 0 and variants else None
    try:
        for c, s in variants:
            def job(rows, c=c, s=s):
                args = (np.array(clean[rows.start:rows.stop]), [keys[r] for r in rows],
                        written[rows.start:rows.stop], c, s, seed)
                return pool.submit(_corrupt_block, *args) if pool else _corrupt_block(*args)
            _render_variant(out, variant_name(c, s), blocks, job, bar=bar, pooled=pool is not None)
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
        bar.close()
    return out


def _read_block(reader: RowReader, keys, locs, written, rows: range, size: int) -> np.ndarray:
    out = np.zeros((len(rows), size, size, 3), np.uint8)
    for i, r in enumerate(rows):
        if written[r]:
            try:
                out[i] = base_crop(reader.image(keys[r], locs[r]), size)
            except BadImage:  # the teacher read it when caching; if it is gone now, say so
                raise ZsdError(f"test image {keys[r]} can no longer be read: re-cache the test set") from None
    return out


def _corrupt_block(clean: np.ndarray, keys: list[str], written: np.ndarray, corruption: str, severity: int,
                   seed: int) -> np.ndarray:
    out = np.zeros_like(clean)
    for i, key in enumerate(keys):
        if written[i]:
            out[i] = corrupt_image(clean[i], corruption, severity, image_seed(seed, corruption, severity, key))
    return out


def _done_path(out: Rendered, variant: str) -> Path:
    return out.folder / f"{variant}.done.npy"


def _pending(out: Rendered, variant: str, n_blocks: int) -> list[int]:
    """Blocks of `variant` not yet rendered; a missing, damaged or mismatched file counts as none done."""
    try:
        done = np.load(_done_path(out, variant))
        arr = out.pixels(variant)
        if done.shape != (n_blocks,) or arr.shape != (out.rows, out.size, out.size, 3):
            raise ValueError
    except (OSError, ValueError):
        return list(range(n_blocks))
    return [int(b) for b in np.flatnonzero(~done)]


def _render_variant(out: Rendered, variant: str, blocks: list[range], job: Callable, *, desc: str = "",
                    bar=None, pooled: bool = False, progress: bool = True) -> None:
    todo = _pending(out, variant, len(blocks))
    if len(todo) == len(blocks):  # nothing usable: start the array afresh
        np.lib.format.open_memmap(out.path(variant), mode="w+", dtype=np.uint8,
                                  shape=(out.rows, out.size, out.size, 3)).flush()
        reserve(out.path(variant))  # written through a memory map below
        done = np.zeros(len(blocks), bool)
    else:
        done = np.load(_done_path(out, variant))
    arr = np.load(out.path(variant), mmap_mode="r+")
    own_bar = bar is None
    bar = bar or tqdm(total=sum(len(blocks[b]) for b in todo), unit="img", desc=desc, disable=not progress,
                      dynamic_ncols=True)
    results = [(b, job(blocks[b])) for b in todo]  # pooled: futures, submitted all at once
    for b, result in results:
        rows = blocks[b]
        arr[rows.start:rows.stop] = result.result() if pooled else result
        arr.flush()  # pixels on disk before the block is marked done
        done[b] = True
        with atomic_file(_done_path(out, variant)) as tmp, open(tmp, "wb") as f:
            np.save(f, done)
        bar.update(len(rows))
    if own_bar:
        bar.close()


# ---------------------------------------------------------------- models on the rendered pixels

def model_input(pixels: np.ndarray, pre: Preprocess, device: str | torch.device = "cpu") -> torch.Tensor:
    """uint8 (B, S, S, 3) square crops -> the model's normalised input through its eval transform, on
    `device`: the uint8 crops go there first, so a GPU resizes them, not the CPU's main thread."""
    x = torch.from_numpy(np.ascontiguousarray(pixels)).to(device).permute(0, 3, 1, 2)
    mode = pre.interpolation_mode
    if pre.resize_mode == "squash":
        x = TF.resize(x, [pre.size, pre.size], mode, antialias=True)
    else:
        x = TF.center_crop(TF.resize(x, pre.resize, mode, antialias=True), pre.size)
    return normalize(x, pre.mean, pre.std)


def embed_pixels(pixels: np.ndarray, rows: np.ndarray, encode, pre: Preprocess, batch_size: int,
                 device: str | torch.device = "cpu") -> np.ndarray:
    """(N, D) float32 unit embeddings of the `rows` of `pixels`; other rows stay zero."""
    idx = np.flatnonzero(rows)
    out = None
    for start in range(0, len(idx), batch_size):
        part = idx[start:start + batch_size]
        with out_of_memory(device, f"a forward of {len(part)} images", "lower --batch-size"):
            z = encode(model_input(pixels[part], pre, device)).float().cpu().numpy()
        if out is None:
            out = np.zeros((len(pixels), z.shape[1]), np.float32)
        out[part] = z
    return out


@dataclass
class Model:
    record: dict  # model, pretrained, role (and run_dir): the keys its records start with
    pre: Preprocess
    encode: Callable


def robustness(test: str, students: list[str] = (), *, teacher: str | None = None, pretrained: str | None = None,
               templates: str | None = None, classnames: str | None = None, classes_from: str | None = None,
               corruptions: str | list[str] | None = None, severities: str | list[int] | None = None,
               size: int = 224, seed: int = 0, device: str = "auto", batch_size: int = 128, workers: int | None = None,
               out_dir: str | None = None, progress: bool = True, log=print) -> dict:
    """Top-1, agreement with the teacher and cosine to the teacher's clean embedding of the teacher
    and every student, per corruption and severity, with mPC and rPC per model.

    Returns {"settings", "summary": one entry per model, "records": one per model x variant}.
    """
    corruptions, severities = parse_corruptions(corruptions), parse_severities(severities)
    workers = default_workers(resolve_device(device), workers)
    if size < 16:
        raise ZsdError(f"--size {size}: the corruptions need images of at least 16 px")
    store = prepare_test_store(test, teacher, pretrained, device, workers, progress, log)
    check_labelled(store)
    classifier = build_classifier(store, classes_from=classes_from, classnames=classnames, templates=templates,
                                  pretrained=pretrained, device=device)
    mapped, rows, _ = evaluated_rows(store, classifier, log)
    students = [resolve_student(s) for s in students]
    for ref in students:  # before the long render: a student of another teacher is a typo
        check_student_teacher(ref, student_config(ref), store, log)
    rendered = render(store, size=size, corruptions=corruptions, severities=severities, seed=seed, workers=workers,
                      progress=progress)

    t = rebuild_teacher(store.teacher, store.teacher_id, pretrained, device)
    models = [Model({"model": store.teacher["model"], "pretrained": store.teacher["weights"], "role": "teacher"},
                    t.preprocess, t.encode_images)]
    for ref in students:
        student, config = load_student(ref, resolve_device(device))
        dev = next(student.parameters()).device
        models.append(Model({"model": config["student"], "pretrained": f"run:{Path(ref.spec).resolve().name}",
                             "role": "student", "run_dir": ref.spec},
                            Preprocess.from_dict(config["preprocess"]),
                            lambda x, m=student, d=dev: m.encode_images(x.to(d))))

    variants = [("clean", 0)] + [(c, s) for c in corruptions for s in severities]
    z = classifier.weights.astype(np.float64)
    common = {"dataset": dataset_name(store), "task": "zeroshot_classification", "language": "en",
              "teacher_id": store.teacher_id, "classifier": classifier.info}
    records, teacher_pred, teacher_clean = [], {}, None
    bar = tqdm(total=len(models) * len(variants), unit="variant", desc="embedding", disable=not progress,
               dynamic_ncols=True)
    for model in models:
        for c, s in variants:
            emb = embed_pixels(rendered.pixels("clean" if c == "clean" else variant_name(c, s)), rows, model.encode,
                               model.pre, batch_size, t.device)
            scores = emb.astype(np.float64) @ z.T
            if model.record["role"] == "teacher":
                teacher_pred[c, s] = scores.argmax(axis=1)
                if c == "clean":
                    teacher_clean = emb
            metrics = classification_metrics(scores[rows], mapped[rows], teacher_pred[c, s][rows])
            metrics["mean_cosine_to_teacher_clean"] = float(
                (emb[rows].astype(np.float64) * teacher_clean[rows]).sum(axis=1).mean())
            records.append({**model.record, "corruption": c, "severity": s, "metrics": metrics,
                            "n_images": int(rows.sum()), **common})
            bar.update()
    bar.close()
    result = {"settings": {"dataset": common["dataset"], "test_store": str(store.path), "size": size, "seed": seed,
                           "corruptions": corruptions, "severities": severities, "classifier": classifier.info,
                           "classnames": classifier.names, "render_cache": str(rendered.folder)},
              "summary": summarize(records), "records": records}
    if out_dir:
        write_report(result, out_dir)
    return result


def summarize(records: list[dict]) -> list[dict]:
    """Per model: clean top-1, mPC, rPC = mPC / clean, the degradation clean - mPC, and the
    mean top-1 per corruption and per severity; computed from the records alone."""
    out = []
    for label in dict.fromkeys(result_label(r) for r in records):
        mine = [r for r in records if result_label(r) == label]
        clean = next(r["metrics"]["acc1"] for r in mine if r["corruption"] == "clean")
        corrupted = [r for r in mine if r["corruption"] != "clean"]
        acc = {(r["corruption"], r["severity"]): r["metrics"]["acc1"] for r in corrupted}
        mpc = float(np.mean(list(acc.values())))
        per_c = {c: float(np.mean([a for (cc, _), a in acc.items() if cc == c])) for c in dict.fromkeys(k[0] for k in acc)}
        per_s = {str(s): float(np.mean([a for (_, ss), a in acc.items() if ss == s]))
                 for s in sorted({k[1] for k in acc})}
        agree = float(np.mean([r["metrics"]["agreement_with_teacher"] for r in corrupted]))
        cosine = float(np.mean([r["metrics"]["mean_cosine_to_teacher_clean"] for r in corrupted]))
        first = mine[0]
        out.append({"label": label, "model": first["model"], "role": first["role"], "clean_acc1": clean,
                    "mPC": mpc, "rPC": mpc / clean if clean > 0 else float("nan"), "degradation": clean - mpc,
                    "mean_agreement_with_teacher": agree, "mean_cosine_to_teacher_clean": cosine,
                    "acc1_per_corruption": per_c, "acc1_per_severity": per_s})
    return out


def markdown_table(result: dict) -> str:
    s = result["settings"]
    corruptions = s["corruptions"]
    head = ["model", "clean", "mPC", "rPC", "agree", "cos"] + [c.replace("_", " ") for c in corruptions]
    lines = [f"{s['dataset']}: top-1 (%) under {len(corruptions)} corruptions x severities "
             f"{','.join(map(str, s['severities']))}; rPC = mPC / clean; agree: top-1 agreement with the teacher on "
             "the same corrupted image; cos: mean cosine to the teacher's embedding of the clean image",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in result["summary"]:
        name = f"teacher {m['model']}" if m["role"] == "teacher" else m["label"]
        cells = [name, f"{100 * m['clean_acc1']:.1f}", f"{100 * m['mPC']:.1f}", f"{m['rPC']:.3f}",
                 f"{100 * m['mean_agreement_with_teacher']:.1f}", f"{m['mean_cosine_to_teacher_clean']:.3f}"]
        cells += [f"{100 * m['acc1_per_corruption'][c]:.1f}" for c in corruptions]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_robustness(result: dict, path: str | os.PathLike) -> None:
    """A PNG at `path`: top-1 vs severity (0 = clean) per model, the mean over corruptions, then one panel per corruption."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["settings"]
    panels = ["mean"] + s["corruptions"]
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False, sharey=True)
    xs = [0] + s["severities"]
    for ax, panel in zip(axes.flat, panels):
        for m in result["summary"]:
            mine = [r for r in result["records"] if result_label(r) == m["label"]]
            if panel == "mean":
                ys = [m["clean_acc1"]] + [m["acc1_per_severity"][str(v)] for v in s["severities"]]
            else:
                acc = {r["severity"]: r["metrics"]["acc1"] for r in mine if r["corruption"] == panel}
                ys = [m["clean_acc1"]] + [acc[v] for v in s["severities"]]
            ax.plot(xs, [100 * y for y in ys], marker="o", ms=3,
                    label=f"teacher {m['model']}" if m["role"] == "teacher" else m["label"])
        ax.set_title(panel.replace("_", " "), fontsize=9)
        ax.set_xticks(xs)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    axes[0, 0].set_ylabel("top-1 (%)")
    axes[0, 0].legend(fontsize=7)
    fig.supxlabel("severity (0 = clean)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")  # PNG whatever the name: a temporary one ends in .tmp
    plt.close(fig)


def write_report(result: dict, out_dir: str | os.PathLike) -> list[Path]:
    """robustness.json, robustness.md and robustness.png in `out_dir`, each written whole (temp + rename)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "robustness.json", out_dir / "robustness.md", out_dir / "robustness.png"]
    with atomic_file(paths[0]) as js, atomic_file(paths[1]) as md, atomic_file(paths[2]) as png:
        js.write_text(json.dumps(result, indent=1) + "\n")
        md.write_text(markdown_table(result) + "\n")
        plot_robustness(result, png)
    return paths

