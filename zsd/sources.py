"""Image sources: find the images of a data set, and read any one of them again later.

A source is scanned once into rows (key, label, loc). `loc` = (source, part, offset, size)
says where the encoded bytes live, so the trainer finds a row's image again from the store
alone, without rescanning: for a folder or a manifest the key is the path relative to the
source root; for webdataset shards `part` is the shard and (offset, size) the member's bytes.

Kinds (chosen from the argument):
- a directory of class subfolders (ImageFolder; folder names are the class names),
- a directory of images (flat, unlabelled),
- webdataset tar shards as DataComp / img2dataset write them: files, a directory of *.tar, or a
  brace pattern `shards/{00000..00099}.tar`; the key is the sample's `uid` from its .json,
- a synthetic-image manifest (`*.jsonl`: image, class, label, prompt, seed) as `zsd synth` writes it.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from zsd.errors import ZsdError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class BadImage(Exception):
    """An image that cannot be used; the message is the reason recorded in the store."""


def load_rgb(data: bytes) -> Image.Image:
    """Decode bytes into an RGB image, or raise BadImage with a short reason.

    Conversions follow open_clip (`convert("RGB")`: palette, grey, CMYK and alpha images
    are converted, alpha dropped); 16-bit images are scaled to 8 bits rather than clipped.
    """
    if not data:
        raise BadImage("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(f"decompression bomb ({e})") from None
    except UnidentifiedImageError:
        raise BadImage("not an image") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImage(f"truncated or corrupt image ({e})") from None
    try:
        if img.mode.startswith("I;16") or img.mode in ("I", "F"):
            a = np.asarray(img)
            if a.size == 0 or not np.isfinite(a).all() or a.min() < 0 or a.max() > 65535:
                raise BadImage(f"cannot convert {img.mode} image with values outside 0..65535")
            a = a.astype(np.uint32) >> 8 if a.max() > 255 else a.astype(np.uint32)
            img = Image.fromarray(a.astype(np.uint8), "L")
        rgb = img.convert("RGB")
    except BadImage:
        raise
    except Exception as e:  # PIL raises a zoo of types for odd modes
        raise BadImage(f"cannot convert mode {img.mode} to RGB ({e})") from None
    if rgb.width < 2 or rgb.height < 2:
        raise BadImage(f"image too small ({rgb.width}x{rgb.height})")
    return rgb


@dataclass
class Scan:
    """Rows found in one or more sources, in a fixed order (the store's row order)."""

    descs: list[dict] = field(default_factory=list)  # one per source, stored in the store attrs
    keys: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    locs: list[tuple[int, int, int, int]] = field(default_factory=list)
    classnames: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # missing / truncated shards, reported not fatal

    def __len__(self):
        return len(self.keys)


def expand_braces(pattern: str) -> list[str]:
    """`a{00..02}b{x,y}` -> a00bx, a00by, ... (numeric ranges keep their zero padding)."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    head, tail, body = pattern[: m.start()], pattern[m.end():], m.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.groups()
        parts = [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
    else:
        parts = body.split(",")
    return [x for p in parts for x in expand_braces(head + p + tail)]


def class_key(name: str) -> str:
    """The one class-name normaliser: names that differ only in case, spaces, '_' or '-' match
    ("Egyptian_Mau" the folder, "egyptian mau" the prompt or ImageNet synonym, "American Bulldog"
    a recipe's display name and "american_bulldog" its dataset folder). Used wherever classes
    of two origins meet: mixed sources and stores, recipes and folders, coverage, classifiers."""
    return re.sub(r"[\s_\-]+", " ", name.strip().lower())


def merge_classnames(merged: list[str], names: list[str]) -> list[int]:
    """Add `names` to `merged` (one class per `class_key`; the first spelling seen is kept) and
    return each name's index in it."""
    keys = [class_key(m) for m in merged]
    for name in names:
        if class_key(name) not in keys:
            merged.append(name)
            keys.append(class_key(name))
    return [keys.index(class_key(name)) for name in names]


def scan_sources(specs: list[str]) -> Scan:
    """Scan every SOURCE argument in order; labels are indices into the union of class names."""
    scan = Scan()
    for spec in specs:
        index = len(scan.descs)
        desc, keys, labels, locs, classnames = _scan_one(spec, index, scan.problems)
        remap = merge_classnames(scan.classnames, classnames)
        scan.descs.append(desc)
        scan.keys += keys
        scan.labels += [remap[lab] if lab >= 0 else -1 for lab in labels]
        scan.locs += locs
    if not scan.keys:
        raise ZsdError(f"no images found in {', '.join(specs)}")
    return scan


def _scan_one(spec: str, index: int, problems: list[str]):
    if "{" in spec:
        return _scan_shards(spec, expand_braces(spec), index, problems)
    path = Path(spec)
    if spec.endswith(".tar"):
        return _scan_shards(spec, [spec], index, problems)
    if not path.exists():
        raise ZsdError(f"source {spec} does not exist")
    if path.is_file() and path.suffix == ".jsonl":
        return _scan_manifest(path, index)
    if path.is_dir():
        shards = sorted(str(p) for p in path.glob("*.tar"))
        if shards:
            return _scan_shards(spec, shards, index, problems)
        return _scan_folder(path, index)
    raise ZsdError(f"cannot tell what kind of source {spec} is: pass a folder, .tar shards, "
                   "a brace pattern or a manifest .jsonl")


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTS and p.is_file()


def _scan_folder(root: Path, index: int):
    root = root.resolve()
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    keys, labels = [], []
    if classes:  # ImageFolder layout: class subfolders give labels
        for label, name in enumerate(classes):
            for p in sorted((root / name).rglob("*")):
                if _is_image(p):
                    keys.append(p.relative_to(root).as_posix())
                    labels.append(label)
        kind = "folder"
    else:  # flat, unlabelled
        for p in sorted(root.iterdir()):
            if _is_image(p):
                keys.append(p.name)
                labels.append(-1)
        kind = "flat"
    desc = {"kind": kind, "root": str(root)}
    return desc, keys, labels, [(index, 0, -1, -1)] * len(keys), classes


def _scan_manifest(path: Path, index: int):
    path = path.resolve()
    keys, labels, names = [], [], {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                keys.append(str(rec["image"]))
                label = int(rec.get("label", -1))
            except (ValueError, KeyError, TypeError) as e:
                raise ZsdError(f"{path}:{n}: not a manifest line ({e})") from None
            labels.append(label)
            if label >= 0 and "class" in rec:
                if names.setdefault(label, rec["class"]) != rec["class"]:
                    raise ZsdError(f"{path}:{n}: label {label} is both {names[label]!r} and {rec['class']!r}")
    classnames = [names.get(i, f"class_{i}") for i in range(max(names, default=-1) + 1)]
    desc = {"kind": "manifest", "path": str(path), "root": str(path.parent)}
    return desc, keys, labels, [(index, 0, -1, -1)] * len(keys), classnames


def _scan_shards(spec: str, shards: list[str], index: int, problems: list[str]):
    keys, locs, found, seen = [], [], [], {}
    for part, shard in enumerate(shards):
        shard = os.path.abspath(shard)
        found.append(shard)
        if not os.path.exists(shard):
            problems.append(f"shard {shard} is missing")
            continue
        samples, error = _index_shard(shard)
        if error:
            problems.append(f"shard {shard}: {error}; kept the {len(samples)} complete samples before it")
        repeated = []
        for key, offset, size in samples:
            if key in seen:
                repeated.append(key)
                continue
            seen[key] = shard
            keys.append(key)
            locs.append((index, part, offset, size))
        if repeated:  # a store row is one key: a second sample with a seen uid would be a silent duplicate
            problems.append(f"shard {shard}: {len(repeated)} samples repeat an earlier sample's uid "
                            f"(e.g. {repeated[0]!r}); skipped")
    desc = {"kind": "webdataset", "spec": spec, "shards": found}
    return desc, keys, [-1] * len(keys), locs, []


def _index_shard(shard: str):
    """(key, offset, size) of each sample's image, in tar order; the key is the json uid if any."""
    file_size = os.path.getsize(shard)
    samples, error = {}, None
    order = []
    try:
        with tarfile.open(shard, "r:") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                base = m.name.rsplit("/", 1)[-1]
                stem, _, ext = base.partition(".")
                prefix = m.name[: len(m.name) - len(base)] + stem
                if m.offset_data + m.size > file_size:
                    error = "truncated"
                    break
                s = samples.get(prefix)
                if s is None:
                    s = samples[prefix] = {"key": stem}
                    order.append(prefix)
                ext = "." + ext.lower()
                if ext in IMAGE_EXTS and "img" not in s:
                    s["img"] = (m.offset_data, m.size)
                elif ext == ".json":
                    try:
                        uid = json.load(tar.extractfile(m)).get("uid")
                        if uid:
                            s["key"] = str(uid)
                    except (ValueError, AttributeError):
                        pass
    except (tarfile.TarError, EOFError, OSError) as e:
        error = f"unreadable or truncated ({e})"
    out = [(samples[p]["key"], *samples[p]["img"]) for p in order if "img" in samples[p]]
    return out, error


class RowReader:
    """Reads a row's encoded image bytes from the source descriptions stored with a store."""

    def __init__(self, descs: list[dict]):
        self.descs = descs
        self._files = {}  # open shard handles, per process (DataLoader workers get their own)

    def read(self, key: str, loc) -> bytes:
        src, part, offset, size = (int(x) for x in loc)
        desc = self.descs[src]
        if desc["kind"] == "webdataset":
            path = desc["shards"][part]
            f = self._files.get(path)
            if f is None:
                f = self._files[path] = open(path, "rb")
            f.seek(offset)
            return f.read(size)
        with open(os.path.join(desc["root"], key), "rb") as f:
            return f.read()

    def image(self, key: str, loc) -> Image.Image:
        """The decoded RGB image of a row; BadImage (with the reason) if it cannot be read or used."""
        try:
            data = self.read(key, loc)
        except OSError as e:
            raise BadImage(f"unreadable ({e.strerror or e})") from None
        return load_rgb(data)

    def __getstate__(self):
        return {"descs": self.descs, "_files": {}}
