"""Image sources: find the images of a data set, and read any one of them again later.

A source is scanned once into rows (key, label, loc). `loc` = (source, part, offset, size)
says where the encoded bytes live, so the trainer finds a row's image again from the store
alone, without rescanning: for a folder or a manifest the key is the path relative to the
source root; for webdataset shards `part` is the shard and (offset, size) the member's bytes.
Keys hold any file name: see `encode_key`.

Every entry of a folder named like an image is a row, whatever it is; one that is not a
readable regular file (broken or looping symlink, FIFO, directory) fails when it is read, with
that reason, so a store's written + failed rows account for all of them. Entries not named like
an image are left out and counted in the scan's problems.

Kinds (chosen from the argument):
- a directory of class subfolders (ImageFolder; folder names are the class names),
- a directory of images (flat, unlabelled),
- webdataset tar shards as DataComp / img2dataset write them: files, a directory of *.tar, or a
  brace pattern `shards/{00000..00099}.tar`; the key is the sample's `uid` from its .json,
- a synthetic-image manifest (`*.jsonl`: image, class, label, prompt, seed) as `zsd synth` writes it.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import stat
import tarfile
import threading
import warnings
import zipfile
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from zsd.errors import ZsdError, atomic_file

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class BadImage(Exception):
    """An image that cannot be used; the message is the reason recorded in the store."""


def load_rgb(data: bytes) -> Image.Image:
    """Decode bytes into an RGB image, or raise BadImage with a short reason.

    Conversions follow open_clip (`convert("RGB")`: palette, grey, CMYK and alpha images
    are converted, alpha dropped). Deeper greys are scaled to 8 bits, never clipped:
    16-bit (I;16*) by >> 8; 32-bit integer (I) as 8-bit values when all are <= 255, else as
    16-bit ones (>> 8), refused above 65535 or below 0; float (F) must lie in 0..1 and is
    scaled by 255 (rounded), anything else (NaN included) is refused.
    """
    return load_rgb_reduced(data, 1)[0]


def load_rgb_reduced(data: bytes, reduce: int) -> tuple[Image.Image, int, tuple[int, int]]:
    """`load_rgb`, a JPEG decoded at 1/s of its size in the DCT domain (libjpeg's scaled IDCT, which
    costs about 1/s² of a full decode), s the largest of 1, 2, 4 that is <= `reduce`; other formats
    at full size. -> (image, s, the full (width, height)). The pixels are not those of a
    full decode followed by a resize: see `render_view_fast`.
    """
    if not data:
        raise BadImage("empty file")
    try:
        with _bombs_are_errors():
            img = Image.open(io.BytesIO(data))
            full, scale = img.size, max(s for s in (1, 2, 4) if s <= reduce)
            if scale > 1 and img.format == "JPEG" and min(full) >= scale:
                # draft picks the largest scale that keeps at least the size asked for: exactly `scale`
                got = img.draft("RGB", (full[0] // scale, full[1] // scale))
                scale = round(full[0] / got[1][2]) if got else 1
            else:
                scale = 1
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(f"decompression bomb ({e})") from None
    except UnidentifiedImageError:
        raise BadImage("not an image") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImage(f"truncated or corrupt image ({e})") from None
    try:
        if img.mode.startswith("I;16") or img.mode in ("I", "F"):
            img = Image.fromarray(_grey_to_8bit(img), "L")
        rgb = img.convert("RGB")
    except BadImage:
        raise
    except Exception as e:  # PIL raises a zoo of types for odd modes
        raise BadImage(f"cannot convert mode {img.mode} to RGB ({e})") from None
    if full[0] < 2 or full[1] < 2:
        raise BadImage(f"image too small ({full[0]}x{full[1]})")
    return rgb, scale, full


_bomb_lock = threading.Lock()
_bomb_filter: warnings.catch_warnings | None = None  # in force while any thread decodes
_bomb_users = 0


@contextmanager
def _bombs_are_errors():
    """DecompressionBombWarning raised as an error, for every thread decoding at once.

    catch_warnings swaps the process-wide filter list on entry and puts the saved one back on
    exit, so threads using it at the same time (the CPU teacher pass decodes in a thread pool)
    would drop each other's filter or leave one behind: the first thread in installs it, the
    last one out restores the filters."""
    global _bomb_filter, _bomb_users
    with _bomb_lock:
        if _bomb_users == 0:
            _bomb_filter = warnings.catch_warnings()
            _bomb_filter.__enter__()
            warnings.simplefilter("error", Image.DecompressionBombWarning)
        _bomb_users += 1
    try:
        yield
    finally:
        with _bomb_lock:
            _bomb_users -= 1
            if _bomb_users == 0:
                _bomb_filter.__exit__(None, None, None)


def _grey_to_8bit(img: Image.Image) -> np.ndarray:
    """The scaling rule of `load_rgb` for I;16*, I and F images."""
    a = np.asarray(img)
    if a.size == 0:
        raise BadImage(f"empty {img.mode} image")
    if img.mode == "F":
        if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
            raise BadImage(f"cannot convert float image with values outside 0..1 (min {a.min():g}, max {a.max():g})")
        return np.rint(a * 255).astype(np.uint8)
    if a.min() < 0 or a.max() > 65535:
        raise BadImage(f"cannot convert {img.mode} image with values outside 0..65535")
    a = a.astype(np.uint32)
    return (a >> 8 if img.mode.startswith("I;16") or a.max() > 255 else a).astype(np.uint8)


# A byte that is not UTF-8 in a file name reaches Python as a lone surrogate U+DC80..U+DCFF
# (os.fsdecode's surrogateescape), which no UTF-8 writer (Zarr's included) can store.
_UNDECODED = re.compile("[\udc80-\udcff]")
_ESCAPED = re.compile("\x00([0-9a-f]{2})")


def encode_key(name: str) -> str:
    """The store key of a relative path `name` as Python decodes file names.

    A UTF-8 name is its own key (every store written before keys were encoded reads the same).
    Each byte that is not UTF-8 becomes NUL followed by its two lowercase hex digits: no file
    name contains NUL, so the key can never be mistaken for another name, and `key_path`
    gives the exact bytes back.
    """
    return _UNDECODED.sub(lambda m: f"\0{ord(m.group()) - 0xDC00:02x}", name)


def key_path(key: str) -> str:
    """The file name of a key again (surrogate-escaped, so `open` uses the original bytes)."""
    return _ESCAPED.sub(lambda m: chr(0xDC00 + int(m.group(1), 16)), key)


def key_text(key: str) -> str:
    """A key for display: each escaped byte reads \\xNN, as `ls -b` shows it."""
    return _ESCAPED.sub(lambda m: f"\\x{m.group(1)}", key)


class ImageChanged(BadImage):
    """A row's file is not the one its embedding was computed from: its size or modification time differ
    from those recorded when it was cached (a replaced image, same name, other pixels)."""


def file_stat(st: os.stat_result) -> tuple[int, int]:
    """What a store records of a row's file when it is read for caching (the `stat` array): (bytes, mtime_ns)."""
    return st.st_size, st.st_mtime_ns


def read_file(path: str) -> tuple[bytes, tuple[int, int]]:
    """The bytes of a regular file and its `file_stat` (of the file read: fstat), or BadImage saying what
    `path` is instead; never blocks on a FIFO."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise BadImage("symlink loop") from None
        if e.errno == errno.ENOENT and os.path.islink(path):
            raise BadImage(f"broken symlink (to {os.readlink(path)})") from None
        raise
    st = os.fstat(fd)
    mode = st.st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket",
                stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device"}.get(stat.S_IFMT(mode), "")
        raise BadImage(f"not a regular file ({kind or oct(stat.S_IFMT(mode))})")
    with os.fdopen(fd, "rb") as f:
        return f.read(), file_stat(st)


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


def scan_sources(specs: list[str], log=print, index: ShardIndex | None = None) -> Scan:
    """Scan every SOURCE argument in order; labels are indices into the union of class names.

    Webdataset shards are indexed through `index` when given (their member offsets are then read
    from it, not from the tar headers, while a shard keeps its size and mtime).
    Each problem (missing or truncated shards, entries left out) is logged as a warning, also
    when it leaves no image at all.
    """
    scan = Scan()
    for spec in specs:
        desc, keys, labels, locs, classnames = _scan_one(spec, len(scan.descs), scan.problems, index)
        remap = merge_classnames(scan.classnames, classnames)
        scan.descs.append(desc)
        scan.keys += keys
        scan.labels += [remap[lab] if lab >= 0 else -1 for lab in labels]
        scan.locs += locs
    for problem in scan.problems:
        log(f"warning: {problem}")
    if not scan.keys:
        raise ZsdError(f"no images found in {', '.join(specs)}")
    return scan


def check_source(spec: str) -> None:
    """A SOURCE names something that exists; shards (a brace pattern, .tar files) may miss some: the scan
    warns about each, before it says no images were found. Cheap, so commands check it before a model loads."""
    if "{" not in spec and not spec.endswith(".tar") and not os.path.exists(spec):
        raise ZsdError(f"source {spec} does not exist: pass an image folder, .tar shards, a brace pattern or a "
                       "manifest .jsonl")


def _scan_one(spec: str, index: int, problems: list[str], shard_index: ShardIndex | None):
    if "{" in spec:
        return _scan_shards(spec, expand_braces(spec), index, problems, shard_index)
    path = Path(spec)
    if spec.endswith(".tar"):
        return _scan_shards(spec, [spec], index, problems, shard_index)
    check_source(spec)
    if path.is_file() and path.suffix == ".jsonl":
        return _scan_manifest(path, index)
    if path.is_dir():
        # as sorted(path.glob("*.tar")), at a third of its cost (a DataComp source lists thousands)
        shards = sorted(os.path.join(str(path), n) for n in os.listdir(path) if n.endswith(".tar") and n[0] != ".")
        if shards:
            return _scan_shards(spec, shards, index, problems, shard_index)
        return _scan_folder(path, index, problems)
    raise ZsdError(f"cannot tell what kind of source {spec} is: pass a folder, .tar shards, "
                   "a brace pattern or a manifest .jsonl")


def _named_like_image(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTS


def _image_entries(top: Path, recurse: bool, problems: list[str]) -> tuple[list[str], list[str]]:
    """Relative paths of the entries under `top` named like an image, whatever they are, in
    the order `sorted(top.rglob("*"))` lists them; and the paths of the other entries.

    With `recurse`, subdirectories are walked too (symlinked ones are not followed, as rglob).
    """
    found, other, todo = [], [], [()]
    while todo:
        parts = todo.pop()
        try:
            entries = list(os.scandir(top.joinpath(*parts)))
        except OSError as e:
            problems.append(f"cannot list {top.joinpath(*parts)} ({e.strerror}); its images are left out")
            continue
        for e in entries:
            rel = (*parts, e.name)
            walk = recurse and e.is_dir(follow_symlinks=False)
            if walk:
                todo.append(rel)
            if _named_like_image(e.name):
                found.append(rel)
            elif not walk:
                other.append("/".join(rel))
    return ["/".join(p) for p in sorted(found)], other


def _scan_folder(root: Path, index: int, problems: list[str]):
    root = root.resolve()
    folders = sorted(d.name for d in root.iterdir()
                     if d.is_dir() and not d.name.startswith(".") and not _named_like_image(d.name))
    classes = [key_text(encode_key(name)) for name in folders]  # names to show and store, not paths
    keys, labels, other = [], [], []
    if classes:  # ImageFolder layout: class subfolders give labels
        for label, name in enumerate(folders):
            found, left = _image_entries(root / name, True, problems)
            keys += [f"{name}/{k}" for k in found]
            labels += [label] * len(found)
            other += [f"{name}/{k}" for k in left]
        outside = [p.name for p in root.iterdir() if p.name not in folders and not p.name.startswith(".")]
        if outside:
            problems.append(f"{root}: left out {len(outside)} entries outside the class folders "
                            f"(e.g. {key_text(encode_key(sorted(outside)[0]))})")
        kind = "folder"
    else:  # flat, unlabelled
        keys, other = _image_entries(root, False, problems)
        labels = [-1] * len(keys)
        kind = "flat"
    if other:
        problems.append(f"{root}: left out {len(other)} entries not named like an image "
                        f"({', '.join(IMAGE_EXTS)}), e.g. {key_text(encode_key(sorted(other)[0]))}")
    keys = [encode_key(k) for k in keys]
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
                keys.append(encode_key(str(rec["image"])))
                keys[-1].encode()  # a lone surrogate outside the file-name range names no file
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


def _scan_shards(spec: str, shards: list[str], index: int, problems: list[str], shard_index: ShardIndex | None):
    keys, locs, found, seen = [], [], [], {}
    for part, shard in enumerate(shards):
        shard = os.path.abspath(shard)
        found.append(shard)
        try:
            samples, error = shard_index.lookup(shard) if shard_index else _index_shard(shard)
        except FileNotFoundError:
            problems.append(f"shard {shard} is missing")
            continue
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
                    s = samples[prefix] = {"key": encode_key(stem)}
                    order.append(prefix)
                ext = "." + ext.lower()
                if ext in IMAGE_EXTS and "img" not in s:
                    s["img"] = (m.offset_data, m.size)
                elif ext == ".json":
                    try:
                        uid = json.load(tar.extractfile(m)).get("uid")
                        if uid:
                            s["key"] = encode_key(str(uid))
                    except (ValueError, AttributeError):
                        pass
    except (tarfile.TarError, EOFError, OSError) as e:
        error = f"unreadable or truncated ({e})"
    out = [(samples[p]["key"], *samples[p]["img"]) for p in order if "img" in samples[p]]
    return out, error


class ShardIndex:
    """The member offsets of webdataset shards, kept in one file (STORE/shard-index.npz) so that a resumed
    teacher pass over thousands of shards reads one file instead of every tar header again.

    An entry holds for a shard while the shard keeps its size and mtime; a changed, new or
    replaced shard is indexed again from its tar headers. `save` writes the file (temporary name,
    then rename: concurrent writers each leave a whole file) only when an entry changed.
    """

    def __init__(self, path: Path):
        self.path, self.changed = Path(path), False
        self.entries: dict[str, tuple] = {}  # shard -> (size, mtime_ns, samples, error)
        try:
            with np.load(self.path, allow_pickle=False) as z:
                shards, stats, counts = z["shards"].tolist(), z["stats"], z["counts"]
                keys, offsets, sizes, errors = z["keys"].tolist(), z["offsets"], z["sizes"], z["errors"].tolist()
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):  # absent or damaged: index the shards again
            return
        ends = np.cumsum(counts)
        for i, shard in enumerate(shards):
            lo, hi = ends[i] - counts[i], ends[i]
            samples = list(zip(keys[lo:hi], offsets[lo:hi].tolist(), sizes[lo:hi].tolist()))
            self.entries[shard] = (int(stats[i, 0]), int(stats[i, 1]), samples, errors[i] or None)

    def lookup(self, shard: str):
        """`_index_shard(shard)`, from the file while the shard is unchanged."""
        st = os.stat(shard)
        entry = self.entries.get(shard)
        if entry and entry[:2] == (st.st_size, st.st_mtime_ns):
            return entry[2], entry[3]
        samples, error = _index_shard(shard)
        self.entries[shard] = (st.st_size, st.st_mtime_ns, samples, error)
        self.changed = True
        return samples, error

    def save(self) -> None:
        if not self.changed or not self.path.parent.is_dir():
            return
        shards = list(self.entries)
        samples = [s for e in self.entries.values() for s in e[2]]
        with atomic_file(self.path) as tmp, open(tmp, "wb") as f:
            np.savez(f, shards=np.array(shards, dtype=str),
                     stats=np.array([e[:2] for e in self.entries.values()], dtype=np.int64).reshape(-1, 2),
                     counts=np.array([len(e[2]) for e in self.entries.values()], dtype=np.int64),
                     keys=np.array([k for k, _, _ in samples], dtype=str),
                     offsets=np.array([o for _, o, _ in samples], dtype=np.int64),
                     sizes=np.array([n for _, _, n in samples], dtype=np.int64),
                     errors=np.array([e[3] or "" for e in self.entries.values()], dtype=str))
        self.changed = False


class PackedKeys:
    """Keys as two numpy arrays, one UTF-8 buffer and the offsets into it: forked DataLoader workers
    share their pages, where a list of str is copied into every worker page by page as reading its
    items touches their refcounts (a DataComp source: millions of keys, once per worker)."""

    BLOCK = 1 << 16  # keys encoded at a time: the only Python objects built per key

    def __init__(self, keys):
        self._pack(keys[i:i + self.BLOCK] for i in range(0, len(keys), self.BLOCK))

    @classmethod
    def from_blocks(cls, blocks) -> "PackedKeys":
        """The keys of an iterable of key sequences (a store's key array read a block at a time)."""
        packed = cls.__new__(cls)
        packed._pack(blocks)
        return packed

    def _pack(self, blocks):
        sizes, bufs = [np.zeros(1, np.int64)], []
        for block in blocks:
            data = [k.encode() for k in block]
            sizes.append(np.fromiter(map(len, data), np.int64, len(data)))
            bufs.append(np.frombuffer(b"".join(data), np.uint8))
        self.offsets = np.cumsum(np.concatenate(sizes))
        self.buf = np.concatenate(bufs) if bufs else np.zeros(0, np.uint8)

    def __len__(self):
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        return self.buf[self.offsets[i]:self.offsets[i + 1]].tobytes().decode()


def missing_images(descs: list[dict]) -> str | None:
    """Where a store's images were cached from and are no longer (a folder moved or deleted, every shard
    gone), or None: a stat per source, no read. Each row is found by that path, so none would be read."""
    for desc in descs:
        gone = (not any(os.path.exists(p) for p in desc["shards"]) if desc["kind"] == "webdataset"
                else not os.path.isdir(desc["root"]))
        if gone:
            return describe_source(desc)
    return None


def describe_source(desc: dict) -> str:
    return desc.get("spec") or desc.get("path") or desc.get("root")


class RowReader:
    """Reads a row's encoded image bytes from the source descriptions stored with a store.

    Shard handles stay open between reads (rows of one shard come together), at most `max_open`
    of them, least recently used closed first: a DataComp source has thousands of shards and a
    process may open 1,024 files (the usual RLIMIT_NOFILE). Each DataLoader worker has its own.
    """

    def __init__(self, descs: list[dict], max_open: int = 64):
        self.descs, self.max_open = descs, max_open
        self._files: OrderedDict[str, BinaryIO] = OrderedDict()

    def read(self, key: str, loc) -> bytes:
        return self.read_stat(key, loc)[0]

    def read_stat(self, key: str, loc) -> tuple[bytes, tuple[int, int]]:
        """The row's bytes and the `file_stat` of the file they come from (a shard's for webdataset rows)."""
        src, part, offset, size = (int(x) for x in loc)
        if self.descs[src]["kind"] == "webdataset":
            f = self._shard(self.path(key, loc))
            f.seek(offset)
            return f.read(size), file_stat(os.fstat(f.fileno()))
        return read_file(self.path(key, loc))

    def path(self, key: str, loc) -> str:
        """The file a row's bytes live in: its image, or its shard."""
        desc = self.descs[int(loc[0])]
        if desc["kind"] == "webdataset":
            return desc["shards"][int(loc[1])]
        return os.path.join(desc["root"], key_path(key))

    def changed(self, key: str, loc, recorded, now: tuple[int, int] | None = None) -> str | None:
        """Why the row's file is not the one recorded (`recorded`: its `file_stat` at caching, -1 where not
        recorded), or None; `now`: the `file_stat` of the file as it was just read (default: a stat call)."""
        if recorded is None or recorded[0] < 0:
            return None
        if now is None:
            try:
                now = file_stat(os.stat(self.path(key, loc)))
            except OSError:  # gone or unreadable: the read says so
                return None
        size, mtime = (int(x) for x in recorded)
        if (size, mtime) == now:
            return None
        what = f"{size} -> {now[0]} bytes" if size != now[0] else "same size, another modification time"
        return f"{key_text(encode_key(self.path(key, loc)))} changed after it was cached ({what})"

    def _shard(self, path: str) -> BinaryIO:
        f = self._files.pop(path, None)
        if f is None:
            while len(self._files) >= self.max_open:
                self._files.popitem(last=False)[1].close()
            f = open(path, "rb")
        self._files[path] = f  # most recently used last
        return f

    def data(self, key: str, loc) -> bytes:
        """The encoded image bytes of a row; BadImage (with the reason) if they cannot be read."""
        return self.data_stat(key, loc)[0]

    def data_stat(self, key: str, loc) -> tuple[bytes, tuple[int, int]]:
        """`data` and the `file_stat` of the file read (for `changed`)."""
        try:
            return self.read_stat(key, loc)
        except OSError as e:
            raise BadImage(f"unreadable ({e.strerror or e})") from None

    def image(self, key: str, loc) -> Image.Image:
        """The decoded RGB image of a row; BadImage (with the reason) if it cannot be read or used."""
        return load_rgb(self.data(key, loc))

    def close(self) -> None:
        while self._files:
            self._files.popitem()[1].close()

    __del__ = close

    def __getstate__(self):
        return {"descs": self.descs, "max_open": self.max_open, "_files": OrderedDict()}
