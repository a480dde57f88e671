"""Classify images with a model that `zsd export` wrote: onnxruntime, PIL and numpy only.

This is the smallest deployment of a student: no torch, timm or open_clip is imported on this
path (a test checks `sys.modules`), so start-up is onnxruntime's, not torch's. The model file
carries everything needed: the exact eval preprocessing in its metadata (`zsd` key, JSON), the
class names, and a graph from normalised pixels to (unit embedding, logits).

`preprocess` is zsd's student eval transform (`zsd.views.render_view` view 0 + `normalize`)
rebuilt on PIL and numpy: torchvision resizes a PIL image with PIL itself, so the same PIL
calls give the same pixels, bit for bit (tested against the torch path).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from zsd.guarantee import abstains, applies
from zsd.errors import ZsdError
from zsd.sources import IMAGE_EXTS, BadImage, load_rgb

METADATA_KEY = "zsd"
# torchvision's InterpolationMode -> PIL filter (torchvision.transforms.functional.pil_modes_mapping).
PIL_FILTERS = {"nearest": Image.NEAREST, "nearest-exact": Image.NEAREST, "bilinear": Image.BILINEAR,
               "bicubic": Image.BICUBIC, "box": Image.BOX, "hamming": Image.HAMMING, "lanczos": Image.LANCZOS}


def preprocess(img: Image.Image, pre: dict) -> np.ndarray:
    """(3, size, size) float32 model input of a decoded RGB image; `pre` is a Preprocess dict."""
    size, resample = pre["size"], PIL_FILTERS[pre["interpolation"]]
    w, h = img.size
    if pre.get("resize_mode", "shortest") == "squash":
        if (w, h) != (size, size):
            img = img.resize((size, size), resample)
    else:  # resize the shortest side to `resize`, then take the centre size x size (zero padding if smaller)
        short, long = min(w, h), max(w, h)
        new_short, new_long = pre["resize"], int(pre["resize"] * long / short)
        new = (new_short, new_long) if w <= h else (new_long, new_short)
        if new != (w, h):
            img = img.resize(new, resample)
        w, h = img.size
        left = -((size - w) // 2) if size > w else int(round((w - size) / 2.0))
        top = -((size - h) // 2) if size > h else int(round((h - size) / 2.0))
        img = img.crop((left, top, left + size, top + size))
    x = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32) / np.float32(255)
    mean = np.asarray(pre["mean"], dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(pre["std"], dtype=np.float32).reshape(3, 1, 1)
    return (x - mean) / std


def check_preprocess(pre: dict) -> dict:
    """`pre` if `preprocess` can apply it; else ValueError (a std of 0 divides into inf and NaN)."""
    if not (isinstance(pre["size"], int) and pre["size"] > 0 and pre["interpolation"] in PIL_FILTERS
            and (pre.get("resize_mode", "shortest") == "squash" or isinstance(pre["resize"], int) and pre["resize"] > 0)):
        raise ValueError(f"size, resize or interpolation unusable: {pre}")
    mean, std = np.asarray(pre["mean"], dtype=np.float64), np.asarray(pre["std"], dtype=np.float64)
    if mean.shape != (3,) or std.shape != (3,) or not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
        raise ValueError(f"mean {pre['mean']} and std {pre['std']} must be 3 finite numbers each, std > 0")
    return pre


def read_image(path: str | os.PathLike) -> Image.Image:
    """Decoded RGB image, as zsd decodes store rows; a file that is no image is one ZsdError line."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ZsdError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        return load_rgb(data)
    except BadImage as e:
        raise ZsdError(f"{path}: {e}") from None


def image_paths(args: list[str]) -> list[Path]:
    """Files as given; folders expand to their images (recursively, sorted)."""
    out = []
    for arg in args:
        path = Path(arg)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
            if not found:
                raise ZsdError(f"{path} holds no images ({', '.join(IMAGE_EXTS)})")
            out += found
        elif path.exists():
            out.append(path)
        else:
            raise ZsdError(f"{path}: no such file or folder")
    if not out:
        raise ZsdError("no images given")
    return out


class ExportedModel:
    """An exported zsd model in an onnxruntime session, with its recorded metadata."""

    def __init__(self, path: str | os.PathLike, threads: int = 0):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ZsdError("running an exported model needs onnxruntime: pip install onnxruntime "
                           "(or zsd[export])") from None
        path = Path(path)
        if not path.is_file():
            raise ZsdError(f"{path}: no such model file")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0: onnxruntime's default, one per physical core
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise ZsdError(f"{path} is not an ONNX model onnxruntime can load "
                           f"({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in meta:
            raise ZsdError(f"{path} is an ONNX model but not one `zsd export` wrote (no {METADATA_KEY!r} metadata)")
        self.path = path
        try:
            self.meta = json.loads(meta[METADATA_KEY])
            self.classnames: list[str] = list(self.meta["classnames"])
            self.preprocess: dict = check_preprocess(self.meta["preprocess"])
        except (ValueError, KeyError, TypeError) as e:
            raise ZsdError(f"{path}: its {METADATA_KEY!r} metadata is damaged ({type(e).__name__}: {e}); "
                           "export the model again") from None
        # A guarantee (`zsd calibrate`) speaks only for the classes it was calibrated with.
        record = self.meta.get("calibration")
        self.calibration: dict | None = record if self.classnames and applies(record, self.classnames) else None
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.input_dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
        self.batch = inp.shape[0] if isinstance(inp.shape[0], int) else None  # None: any batch size

    def run(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(unit embeddings (n, D), logits (n, K) or None) of normalised pixels (n, 3, S, S)."""
        pixels = pixels.astype(self.input_dtype, copy=False)
        step = self.batch or len(pixels)
        outs = [self.session.run(None, {self.input_name: pixels[i:i + step]}) for i in range(0, len(pixels), step)]
        emb = np.concatenate([o[0] for o in outs])
        return emb, (np.concatenate([o[1] for o in outs]) if self.classnames else None)

    def predict(self, images, top_k: int = 5, batch_size: int = 32) -> list[dict]:
        """Per image (a path or a PIL image): its top-k classes with probabilities, and its embedding."""
        results = []
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            x = np.stack([preprocess(read_image(im) if isinstance(im, (str, os.PathLike)) else im.convert("RGB"),
                                     self.preprocess) for im in chunk])
            emb, logits = self.run(x)
            if self.calibration is not None:
                abstain = abstains(self.calibration, logits.astype(np.float64) / self.meta["logit_scale"])
            for j, im in enumerate(chunk):
                result = {"image": str(im) if isinstance(im, (str, os.PathLike)) else f"<image {start + j}>"}
                if logits is not None:
                    z = logits[j].astype(np.float64)
                    prob = np.exp(z - z.max())
                    prob /= prob.sum()
                    order = np.argsort(-z, kind="stable")[:top_k]
                    result["top"] = [{"class": self.classnames[c], "prob": float(prob[c]), "logit": float(z[c])}
                                     for c in order]
                    if self.calibration is not None:
                        result["abstained"] = bool(abstain[j])
                result["embedding"] = emb[j].tolist()
                results.append(result)
        return results


def predict(model: str | os.PathLike | ExportedModel, images, top_k: int = 5) -> list[dict]:
    """Classify images (paths, folders or PIL images) with an exported model (a path or ExportedModel)."""
    model = model if isinstance(model, ExportedModel) else ExportedModel(model)
    paths = [im for im in images if isinstance(im, (str, os.PathLike))]
    if len(paths) == len(images):
        images = image_paths([str(p) for p in paths])
    return model.predict(list(images), top_k)


def predictions_text(results: list[dict]) -> str:
    lines = []
    for r in results:
        if "top" in r:
            lines.append(f"{r['image']}: " + ("ABSTAINED (below the calibrated threshold): " if r.get("abstained")
                                               else "") + ", ".join(f"{t['class']} {t['prob']:.3f}" for t in r["top"]))
        else:
            lines.append(f"{r['image']}: {len(r['embedding'])}-d embedding (the model has no classes; --json prints it)")
    return "\n".join(lines)
