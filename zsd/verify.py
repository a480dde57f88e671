"""`zsd verify`: can a store be trusted? TinyViT's --check-saved-logits, for embeddings.

Checks, cheapest first: the structure (attributes, array metadata, shapes and chunking), every
chunk file (present where status says rows are written or failed, of its exact uncompressed
size), failed rows carry a reason, the written embeddings are finite and unit-norm (within fp16
rounding), the written rows' image files are those they were cached from (size and mtime, in stores
that record them); and with `recompute` > 0 it re-runs the store's recorded teacher on that many random
written rows, every view rebuilt from the stored source and crop box exactly as the trainer
rebuilds it, and compares with the stored embeddings by cosine.
"""

from __future__ import annotations

import numpy as np
import torch

from zsd.cache import changed_rows
from zsd.errors import ZsdError, out_of_memory
from zsd.sources import BadImage, RowReader, missing_images
from zsd.store import FAILED, NORM_TOLERANCE, PENDING, WRITTEN, damage_text, open_store
from zsd.teachers import rebuild_teacher
from zsd.views import normalize, render_view

# Largest cosine error (1 - cosine) a recomputed view may have, by the teacher's precision. fp32
# recomputes to ~1e-6 (fp16 storage, other batch sizes); bf16 autocast differs by batch size to ~1e-3.
TOLERANCE = {"fp32": 1e-3, "bf16": 1e-2}


def verify(name: str, recompute: int = 0, *, tolerance: float | None = None, pretrained: str | None = None,
           device: str = "auto", seed: int = 0, batch_size: int = 64, log=print) -> dict:
    """The report as a JSON-ready dict; `problems` lists one sentence per failed check (empty: all good)."""
    store = open_store(name)  # the structure; a store that does not open is one ZsdError
    damaged = store.damaged_chunks()  # every array's chunk files and impossible values
    status = store.status(checked=not damaged)
    report = {"store": str(store.path), "rows": store.rows, "chunks": store.n_chunks,
              "written": int((status == WRITTEN).sum()), "failed": int((status == FAILED).sum()),
              "pending": int((status == PENDING).sum()), "problems": []}
    problems = report["problems"]

    report["damaged_chunks"] = damaged
    if report["damaged_chunks"]:
        problems.append(damage_text(report["damaged_chunks"]))
        return report  # the embeddings of damaged chunks cannot be read

    keys = store.keys()
    health = store.embedding_health()
    unexplained = health["unexplained"]
    if len(unexplained):
        problems.append(f"{len(unexplained)} failed rows have no reason (first: {keys[unexplained[0]]})")
    report["norm_view0"] = health["norm_view0"]
    report["nonfinite"] = [str(keys[r]) for r in health["nonfinite"]]
    report["off_norm"] = [str(keys[r]) for r in health["off_norm"]]
    if len(health["nonfinite"]):
        problems.append(f"{len(health['nonfinite'])} written rows have non-finite embeddings (first: "
                        f"{report['nonfinite'][0]}); `zsd train` drops them")
    if len(health["off_norm"]):
        problems.append(f"{len(health['off_norm'])} written rows have an embedding whose norm is off 1 by more "
                        f"than {NORM_TOLERANCE} (first: {report['off_norm'][0]})")
    gone = missing_images(store.sources)
    if gone:
        problems.append(f"the images were cached from {gone}, which is no longer there (moved or deleted): "
                        "`zsd train` reads them there; put them back")
    report["changed"] = [why for _, _, why in changed_rows(store)]  # empty for stores that record no stats
    if report["changed"]:
        problems.append(f"{len(report['changed'])} written rows' images changed after they were cached (first: "
                        f"{report['changed'][0]}): their embeddings are the old images'; rerun `zsd cache-teacher` "
                        "on the store to recompute them")

    if recompute > 0:
        usable = np.setdiff1d(np.flatnonzero(status == WRITTEN), health["nonfinite"])
        rows = np.sort(np.random.default_rng(seed).choice(usable, min(recompute, len(usable)), replace=False))
        report["recompute"] = _recompute(store, rows, keys, tolerance, pretrained, device, batch_size, log)
        r = report["recompute"]
        if r["unreadable"]:
            problems.append(f"{len(r['unreadable'])} sampled rows' images can no longer be read (first: "
                            f"{r['unreadable'][0]['key']}: {r['unreadable'][0]['reason']})")
        if r["above_tolerance"]:
            w = r["worst"][0]
            problems.append(f"{r['above_tolerance']} of {r['views']} recomputed views differ from the stored "
                            f"embedding by more than cosine error {r['tolerance']} (worst: {w['key']} view "
                            f"{w['view']}, cosine {w['cosine']:.6f})")
    return report


def _recompute(store, rows, keys, tolerance, pretrained, device, batch_size, log) -> dict:
    teacher = rebuild_teacher(store.teacher, store.teacher_id, pretrained, device)
    tolerance = TOLERANCE.get(teacher.precision, 1e-2) if tolerance is None else tolerance
    pre, reader, locs, params = teacher.preprocess, RowReader(store.sources), store.locs(), store.view_params()
    log(f"recomputing {len(rows)} rows x {store.views} views with {store.teacher['model']} ({teacher.precision})")
    pixels, where, unreadable, stored = [], [], [], {}
    for r in rows:
        stored[int(r)] = store.embeddings(rows=slice(r, r + 1))[0].astype(np.float32)
        try:
            img = reader.image(keys[r], locs[r])
        except BadImage as e:
            unreadable.append({"key": str(keys[r]), "reason": str(e)})
            continue
        for v in range(store.views):
            pixels.append(render_view(img, v, params[r, v], pre))
            where.append((int(r), v))
    cosines = np.zeros(len(where))
    for s in range(0, len(where), batch_size):
        x = normalize(torch.stack(pixels[s:s + batch_size]), pre.mean, pre.std)
        with out_of_memory(teacher.device, f"the teacher forward of {len(x)} views",
                           "free the device, or recompute on the CPU (--device cpu)"):
            z = teacher.encode_images(x).float().cpu().numpy()
        z /= np.linalg.norm(z, axis=1, keepdims=True)
        ref = np.stack([stored[r][v] for r, v in where[s:s + batch_size]])
        cosines[s:s + len(z)] = (z * ref).sum(axis=1) / np.linalg.norm(ref, axis=1)
    cosines = np.clip(cosines, -1, 1)  # float rounding lands a hair above 1
    order = np.argsort(cosines)
    return {"rows": len(rows), "views": len(where), "tolerance": tolerance,
            "cosine_min": float(cosines.min()) if len(where) else None,
            "cosine_mean": float(cosines.mean()) if len(where) else None,
            "max_error": float(1 - cosines.min()) if len(where) else None,
            "mean_error": float(1 - cosines.mean()) if len(where) else None,
            "above_tolerance": int((1 - cosines > tolerance).sum()),
            "worst": [{"key": str(keys[where[i][0]]), "row": where[i][0], "view": where[i][1],
                       "cosine": float(cosines[i])} for i in order[:5]],
            "unreadable": unreadable}


def verify_text(report: dict) -> str:
    lines = [f"{report['store']}: {report['rows']} rows in {report['chunks']} chunks: {report['written']} written, "
             f"{report['failed']} failed, {report['pending']} pending",
             f"  chunk files      {len(report['damaged_chunks'])} damaged"]
    for d in report["damaged_chunks"][:10]:
        lines.append(f"    {d['array']} rows {d['rows'][0]}..{d['rows'][1]}: {d['problem']}")
    if "nonfinite" in report:
        norm = report["norm_view0"]
        lines.append(f"  embeddings       {len(report['nonfinite'])} non-finite rows, {len(report['off_norm'])} "
                     "rows off unit norm" + (f"; view 0 norms {norm['min']:.4f}..{norm['max']:.4f}" if norm else ""))
    if "changed" in report:
        lines.append(f"  source files     {len(report['changed'])} changed after caching"
                     + (f" (first: {report['changed'][0]})" if report["changed"] else ""))
    r = report.get("recompute")
    if r and r["views"]:
        lines.append(f"  recomputed       {r['rows']} rows, {r['views']} views: cosine min {r['cosine_min']:.6f}, "
                     f"mean {r['cosine_mean']:.6f} (max error {r['max_error']:.2e}, mean {r['mean_error']:.2e}; "
                     f"tolerance {r['tolerance']:g})")
        for w in r["worst"][:3]:
            lines.append(f"    {w['key']} view {w['view']}: cosine {w['cosine']:.6f}")
    lines.append("  " + ("OK" if not report["problems"] else f"{len(report['problems'])} check(s) failed"))
    return "\n".join(lines)


def raise_problems(report: dict) -> None:
    if report["problems"]:
        raise ZsdError(f"{report['store']}: " + "; ".join(report["problems"]))
