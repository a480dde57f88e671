"""Export a trained student to one self-contained ONNX file: a zero-shot classifier without torch.

The graph maps a batch of normalised pixels (n, 3, S, S) to the student's unit embeddings (n, D)
and, when classes are given, their logits (n, K) = logit_scale * embedding @ classes.T, where the
class embeddings are computed once (`zsd.classes.class_head`) and frozen into the graph: the
teacher's zero-shot classifier (text tower + templates, as `zsd eval` builds it) or prototypes of a
labelled store (`--classes-from`). Without classes the graph is the encoder alone.

The model's metadata (key `zsd`, JSON; repeated in a .json file beside the model) records what a
runtime needs and what the model is: the exact eval preprocessing (the student's own, as `zsd
eval` applies it), class names, logit scale, teacher id, the student and its weights' hash, zsd
version. `zsd.predict` runs it with onnxruntime, PIL and numpy only.

The parity check runs images through both sides end to end: zsd's torch preprocessing and the
student in torch, against `zsd.predict`'s numpy preprocessing and onnxruntime; it fails the export
(nothing written) when the embeddings or logits differ by more than the tolerance.
"""

from __future__ import annotations

import copy
import io
import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from zsd import __version__
from zsd.classes import class_head
from zsd.errors import ZsdError, atomic_file, check_outputs, check_writable
from zsd.guarantee import shipped_guarantee
from zsd.predict import METADATA_KEY, preprocess
from zsd.sources import BadImage, RowReader, scan_sources
from zsd.store import open_store, resolve_store
from zsd.student import load_student, resolve_student, still_training, student_fingerprint
from zsd.views import Preprocess, normalize, render_view

DEFAULT_OPSET = 17
# Default max abs embedding difference, torch fp32 vs onnxruntime: fp32 and fp16 weights.
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}


class ExportGraph(nn.Module):
    """Normalised pixels -> (unit embeddings, logits) or unit embeddings alone."""

    def __init__(self, student: nn.Module, classes: torch.Tensor | None, logit_scale: float):
        super().__init__()
        self.student, self.logit_scale = student, logit_scale
        self.register_buffer("classes", None if classes is None else classes.float())

    def forward(self, pixels: torch.Tensor):
        z = F.normalize(self.student(pixels).float(), dim=-1)  # the head runs in fp32 under --fp16 too
        if self.classes is None:
            return z
        return z, self.logit_scale * z @ self.classes.T


def describe_preprocess(pre: Preprocess) -> str:
    if pre.resize_mode == "squash":
        geometry = f"resize to {pre.size}x{pre.size} ({pre.interpolation})"
    else:
        geometry = (f"resize the shortest side to {pre.resize} px ({pre.interpolation}, PIL), "
                    f"centre crop {pre.size}x{pre.size}")
    return (f"decode, convert to RGB; {geometry}; divide by 255, subtract mean {list(pre.mean)}, "
            f"divide by std {list(pre.std)}; NCHW")


def check_images(source: str | None, n: int, seed: int = 0) -> list:
    """`n` decoded RGB images spread over a store's or an image source's rows, or `n` generated ones."""
    from PIL import Image

    if source is None:  # smooth colour fields of varied sizes and aspect ratios, a little noise on top
        rng = np.random.default_rng(seed)
        images = []
        for _ in range(n):
            w, h = (int(x) for x in rng.integers(24, 320, 2))
            field = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
            noisy = np.asarray(field, dtype=np.int16) + rng.integers(-12, 13, (h, w, 3))
            images.append(Image.fromarray(noisy.clip(0, 255).astype(np.uint8)))
        return images
    path = resolve_store(source)
    if (path / "zarr.json").exists():
        store = open_store(path)
        descs, keys, locs = store.sources, store.keys(), store.locs()
    else:
        scan = scan_sources([source])
        descs, keys, locs = scan.descs, scan.keys, scan.locs
    reader = RowReader(descs)
    images = []
    for row in np.unique(np.linspace(0, len(keys) - 1, min(n, len(keys))).round().astype(int)):
        try:
            images.append(reader.image(str(keys[row]), locs[row]))
        except BadImage:
            continue  # failed rows of a store are not part of the check
    if not images:
        raise ZsdError(f"--check-images {source}: none of its images could be read")
    return images


def parity(graph: ExportGraph, session, pre: Preprocess, images: list, batch: int | None) -> dict:
    """Torch path (zsd's torch preprocessing + the fp32 graph) vs onnxruntime path (numpy preprocessing)."""
    ref = torch.stack([normalize(render_view(img, 0, None, pre), pre.mean, pre.std) for img in images])
    mine = np.stack([preprocess(img, pre.to_dict()) for img in images])
    with torch.inference_mode():
        want = graph(ref)
    want = [t.numpy() for t in want] if isinstance(want, tuple) else [want.numpy()]
    inp = session.get_inputs()[0]
    dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
    step = batch or len(mine)
    outs = [session.run(None, {inp.name: mine[i:i + step].astype(dtype)}) for i in range(0, len(mine), step)]
    got = [np.concatenate([o[k] for o in outs]) for k in range(len(want))]
    report = {"images": len(images), "max_abs_pixels": float(np.abs(mine - ref.numpy()).max()),
              "max_abs_embedding": float(np.abs(got[0] - want[0]).max())}
    if len(want) == 2:
        report["max_abs_logits"] = float(np.abs(got[1] - want[1]).max())
        report["top1_agreement"] = float((got[1].argmax(1) == want[1].argmax(1)).mean())
    return report


def export(run: str, out: str | os.PathLike, *, classes: str | None = None, classes_from: str | None = None,
           templates: str | None = None, pretrained: str | None = None, opset: int | None = None,
           dynamic_batch: bool = False, fp16: bool = False, check: bool = True, check_images_from: str | None = None,
           check_n: int = 64, tolerance: float | None = None, log=print) -> dict:
    """Write OUT (.onnx) and OUT's .json beside it; returns the metadata (with the parity report)."""
    try:
        import onnx
        import onnxruntime as ort
    except ImportError:
        raise ZsdError("zsd export needs onnx and onnxruntime: pip install 'zsd[export]'") from None
    out, opset = Path(out), opset or DEFAULT_OPSET
    if out.suffix != ".onnx":
        raise ZsdError(f"--out {out}: name the model file *.onnx")
    side = out.with_suffix(".json")
    ref = resolve_student(run)
    check_outputs([out, side], [ref.config_file, ref.weights_file, classes, check_images_from])
    check_writable(out.parent, "--out")
    student, config = load_student(ref, "cpu")
    if warning := still_training(ref, config):
        log(warning)
    pre = Preprocess.from_dict(config["preprocess"])
    names, weights, scale, info = class_head(config, classes=classes, classes_from=classes_from,
                                             templates=templates, pretrained=pretrained)
    precision = "fp16" if fp16 else "fp32"
    graph = ExportGraph(student, weights, scale).eval()
    to_export = ExportGraph(copy.deepcopy(student).half(), weights, scale).eval() if fp16 else graph
    dummy = torch.zeros(1, 3, pre.size, pre.size, dtype=torch.float16 if fp16 else torch.float32)
    outputs = ["embedding", "logits"] if names else ["embedding"]
    buf = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice; it needs no onnxscript
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(to_export, (dummy,), buf, dynamo=False, opset_version=opset, input_names=["pixels"],
                              output_names=outputs, do_constant_folding=True,
                              dynamic_axes={k: {0: "batch"} for k in ["pixels", *outputs]} if dynamic_batch else None)
        except Exception as e:  # an opset the exporter or an op of the student does not support
            raise ZsdError(f"torch.onnx.export of {config['student']} at opset {opset} failed: "
                           f"{str(e).splitlines()[0][:200]}") from None
    model = onnx.load_from_string(buf.getvalue())
    student_fp = student_fingerprint(ref, config)
    meta = {
        "format": "zsd-onnx/1",
        "zsd_version": __version__,
        "student": {"model": config["student"], "weights": student_fp["weights"], "run": str(Path(run).resolve()),
                    "embed_dim": int(config["embed_dim"]), "step": config.get("step"),
                    "total_steps": config.get("total_steps")},
        "teacher_id": config.get("teacher_id"),
        "teacher": {k: config.get("teacher", {}).get(k) for k in ("backend", "model", "weights")},
        "preprocess": {**pre.to_dict(), "crop": "center" if pre.resize_mode == "shortest" else "none",
                       "description": describe_preprocess(pre)},
        "input": {"name": "pixels", "shape": ["batch" if dynamic_batch else 1, 3, pre.size, pre.size],
                  "dtype": "float16" if fp16 else "float32"},
        "outputs": outputs,
        "classnames": names,
        "classifier": info,
        "logit_scale": scale if names else None,
        "precision": precision,
        "opset": opset,
        "dynamic_batch": dynamic_batch,
    }
    if names:  # `zsd predict` abstains below the threshold of a guarantee made for exactly these classes
        calibration, why = shipped_guarantee(ref, student_fp["weights"], names, info)
        if calibration:
            meta["calibration"] = calibration
            log(f"the calibrated guarantee goes with it: {calibration['statement']}")
        elif why:
            log(f"note: {why}; the model carries no guarantee")
    _set_metadata(model, meta)
    data = model.SerializeToString()
    if check:
        tol = TOLERANCE[precision] if tolerance is None else tolerance
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        report = parity(graph, session, pre, check_images(check_images_from or classes_from, check_n),
                        None if dynamic_batch else 1)
        report.update(source=check_images_from or classes_from or "generated", tolerance=tol,
                      reference="torch fp32")
        log(parity_text(report))
        # logits = scale * z . w with unit w: |d logits| <= scale * ||d z|| <= scale * sqrt(D) * max|d z|
        logit_tol = tol * scale * math.sqrt(int(config["embed_dim"]))
        if report["max_abs_embedding"] > tol or report.get("max_abs_logits", 0.0) > logit_tol:
            raise ZsdError(f"parity check failed, nothing written: torch vs onnxruntime max abs difference "
                           f"{report['max_abs_embedding']:.2e} in embeddings (tolerance {tol:.0e}), "
                           f"{report.get('max_abs_logits', 0.0):.2e} in logits (tolerance {logit_tol:.1e}) "
                           f"on {report['images']} images")
        meta["parity"] = report
        _set_metadata(model, meta)
        data = model.SerializeToString()
    # Both files to temporary names first: a full disk leaves the old pair (or nothing), never a mixed one.
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(side) as side_tmp, atomic_file(out) as out_tmp:  # the inner one is renamed first
            out_tmp.write_bytes(data)
            side_tmp.write_text(json.dumps(meta, indent=2) + "\n")
    except OSError as e:
        raise ZsdError(f"--out: cannot write {out} ({e.strerror or e}); nothing was written") from None
    return meta


def _set_metadata(model, meta: dict) -> None:
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta)
    model.producer_name, model.producer_version = "zsd", __version__


def parity_text(report: dict) -> str:
    text = (f"parity on {report['images']} images ({report['source']}): torch vs onnxruntime max abs difference "
            f"{report['max_abs_embedding']:.2e} (embeddings)")
    if "max_abs_logits" in report:
        text += f", {report['max_abs_logits']:.2e} (logits), top-1 agreement {100 * report['top1_agreement']:.1f} %"
    return text + f"; inputs differ by {report['max_abs_pixels']:.1e}"
