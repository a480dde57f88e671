"""Spurious-feature variants of an image folder (the paper's section 5.1, Table 2).

`shapes`: every image gets its class's coloured shape (shape and colour fixed per class,
position and size drawn per image), so the shape alone predicts the class. `background`: the
class's colour fills the background (where a foreground mask says so) or, without masks, a
border band around the image. Each run writes two ordinary ImageFolders:

- OUT/train:    every image with its own class's feature (the spurious correlation);
- OUT/shuffled: every image with the feature of another class, by a derangement of the
  classes (no class keeps its own), which is the paper's "shuffled spurious features" test.

Maps, colours and per-image draws depend only on the seed, the sorted class names and the image
keys, so running it on a train folder and on a test folder with the same seed and classes
gives the same class -> feature maps; spurious.json records them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from zsd.errors import ZsdError, atomic_file
from zsd.sources import BadImage, RowReader, scan_sources

MODES = ("shapes", "background")
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = {"red": (230, 25, 25), "green": (25, 200, 40), "blue": (30, 60, 230), "yellow": (250, 225, 20),
           "magenta": (230, 30, 220), "cyan": (20, 220, 230), "orange": (250, 130, 10), "purple": (120, 40, 180),
           "white": (255, 255, 255), "black": (0, 0, 0)}
SHAPE_FRACTION = (0.15, 0.3)  # shape side as a fraction of the image's shorter side
BORDER_FRACTION = 0.12  # background mode without masks: band width per side


def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly drawn permutation of range(n) without fixed points (rejection; ~e tries)."""
    if n < 2:
        raise ZsdError("a shuffled spurious feature needs at least 2 classes")
    while True:
        p = rng.permutation(n)
        if (p != np.arange(n)).all():
            return p


def class_features(classnames: list[str], mode: str, seed: int) -> list[dict]:
    """Per class (in `classnames` order): its shape (shapes mode) and colour; distinct across classes.

    Colours differ between any 10 consecutive classes and shapes cycle with them, so with up to 10
    classes the colour alone tells every class apart (a small circle and a diamond look alike at
    32 px); class j + 10m reuses j's colour with a shape m places on, so 50 combinations stay distinct."""
    rng = np.random.default_rng([seed, 0])
    limit = len(COLOURS) * (len(SHAPES) if mode == "shapes" else 1)
    if len(classnames) > limit:
        raise ZsdError(f"{len(classnames)} classes but only {limit} distinct {mode} features")
    colours = [list(COLOURS)[i] for i in rng.permutation(len(COLOURS))]
    shapes = [SHAPES[i] for i in rng.permutation(len(SHAPES))]
    out = []
    for j in range(len(classnames)):
        colour = colours[j % len(colours)]
        feature = {"colour": colour, "rgb": list(COLOURS[colour])}
        if mode == "shapes":
            feature = {"shape": shapes[(j + j // len(colours)) % len(shapes)], **feature}
        out.append(feature)
    return out


def _image_rng(seed: int, key: str) -> np.random.Generator:
    return np.random.default_rng([seed, int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")])


def draw_shape(img: Image.Image, shape: str, rgb, box: tuple[int, int, int, int]) -> None:
    x0, y0, x1, y1 = box
    cx, cy, w = (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0
    d = ImageDraw.Draw(img)
    fill = tuple(rgb)
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    elif shape == "triangle":
        d.polygon([(x0, y1), (x1, y1), (cx, y0)], fill=fill)
    elif shape == "diamond":
        d.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    elif shape == "cross":
        t = w / 6
        d.rectangle((x0, cy - t, x1, cy + t), fill=fill)
        d.rectangle((cx - t, y0, cx + t, y1), fill=fill)
    else:
        raise ValueError(shape)


def shape_box(width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    side = max(4, int(round(min(width, height) * rng.uniform(*SHAPE_FRACTION))))
    x0 = int(rng.integers(0, width - side + 1))
    y0 = int(rng.integers(0, height - side + 1))
    return x0, y0, x0 + side - 1, y0 + side - 1


def apply_feature(img: Image.Image, mode: str, feature: dict, key: str, seed: int,
                  mask: np.ndarray | None = None) -> tuple[Image.Image, dict]:
    """The image with `feature` added, and what was drawn where (for spurious.json)."""
    img = img.copy()
    if mode == "shapes":
        box = shape_box(img.width, img.height, _image_rng(seed, key))
        draw_shape(img, feature["shape"], feature["rgb"], box)
        return img, {"box": list(box)}
    arr = np.array(img)
    if mask is not None:
        arr[~mask] = feature["rgb"]
        return Image.fromarray(arr), {"background_pixels": int((~mask).sum())}
    band = max(1, int(round(min(img.width, img.height) * BORDER_FRACTION)))
    frame = np.ones(arr.shape[:2], bool)
    frame[band:-band, band:-band] = False
    arr[frame] = feature["rgb"]
    return Image.fromarray(arr), {"border": band}


def _load_mask(masks: Path, key: str, size: tuple[int, int]) -> np.ndarray:
    path = (masks / key).with_suffix(".png")
    try:
        mask = Image.open(path)
        mask.load()
    except OSError:
        raise ZsdError(f"no readable foreground mask {path} for {key} (--masks: one PNG per image, same relative "
                       "path, non-zero = foreground)") from None
    if mask.size != size:
        raise ZsdError(f"the mask {path} is {mask.size[0]}x{mask.size[1]}, its image {size[0]}x{size[1]}")
    return np.array(mask.convert("L")) > 0


def make_spurious(src: str, out: str, *, mode: str = "shapes", seed: int = 0, masks: str | None = None,
                  log=print) -> dict:
    """Write OUT/train and OUT/shuffled (see the module doc) and OUT/spurious.json; returns the record."""
    if mode not in MODES:
        raise ZsdError(f"--mode {mode}: choose {' or '.join(MODES)}")
    if masks and mode != "background":
        raise ZsdError("--masks only applies to --mode background")
    if not Path(src).is_dir():
        raise ZsdError(f"{src} is not a folder: pass an ImageFolder (one subfolder per class)")
    scan = scan_sources([src])
    if not scan.classnames or (np.asarray(scan.labels) < 0).any():
        raise ZsdError(f"{src} is unlabelled: a class-specific feature needs one subfolder per class")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ZsdError(f"{out} exists and is not empty: pass a new --out")
    classes = list(scan.classnames)
    features = class_features(classes, mode, seed)
    shuffle = derangement(len(classes), np.random.default_rng([seed, 1]))
    reader = RowReader(scan.descs)
    images, skipped = {}, []
    with atomic_file(out) as tmp:  # the folder appears whole (it replaces an empty --out) or not at all
        tmp.mkdir(parents=True)
        for key, label, loc in zip(scan.keys, scan.labels, scan.locs):
            try:
                img = reader.image(key, loc)
            except BadImage as e:
                skipped.append(f"{key}: {e}")
                continue
            mask = _load_mask(Path(masks), key, img.size) if masks else None
            name = str(Path(key).with_suffix(".png"))  # lossless: the feature stays exactly its colour
            entry = {"class": classes[label]}
            for split, feature_class in (("train", label), ("shuffled", int(shuffle[label]))):
                variant, drawn = apply_feature(img, mode, features[feature_class], key, seed, mask)
                path = tmp / split / name
                path.parent.mkdir(parents=True, exist_ok=True)
                variant.save(path)
                entry[split] = {"feature_class": classes[feature_class], **drawn}
            images[name] = entry
        record = {"mode": mode, "seed": seed, "source": str(Path(src).resolve()), "masks": masks,
                  "classes": classes, "features": dict(zip(classes, features)),
                  "shuffled_map": {c: classes[int(shuffle[i])] for i, c in enumerate(classes)},
                  "splits": {"train": "each class with its own feature",
                             "shuffled": "each class with the feature of shuffled_map[class] (a derangement)"},
                  "skipped": skipped, "images": images}
        (tmp / "spurious.json").write_text(json.dumps(record, indent=1) + "\n")
    if skipped:
        log(f"warning: {len(skipped)} unreadable images left out (listed in spurious.json)")
    log(f"{len(images)} images x 2 variants of {len(classes)} classes in {out}/train and {out}/shuffled")
    return record
