"""Pixels: the teacher's evaluation preprocessing and reproducible augmented views.

Every cached embedding belongs to one *view* of an image. View 0 is the teacher's own
deterministic evaluation transform (resize shortest side, centre crop), identical to what
open_clip's `preprocess_val` or timm's eval transform computes. Views 1..V-1 are
RandomResizedCrop + horizontal flip, as in CLIP training; their parameters are drawn from a
generator seeded by (view_seed, row) and stored per row, so the trainer rebuilds exactly the
pixels the teacher saw. Both sides go through `render_view`, so there is one definition of a view,
and read a store's images through `ViewDataset`.
"""

from __future__ import annotations

import functools
import math
import threading
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torch.utils.data import Dataset
from torchvision.transforms import functional as F

from zsd.sources import BadImage, PackedKeys, RowReader, load_rgb, load_rgb_reduced

# One stored view = (top, left, height, width, flip) in the decoded image's pixel coordinates.
VIEW_FIELDS = ("top", "left", "height", "width", "flip")


@dataclass(frozen=True)
class Preprocess:
    """A model's deterministic evaluation transform, as data (it goes into fingerprints)."""

    size: int  # square input resolution
    resize: int  # shortest side before the centre crop (size / crop_pct for timm)
    interpolation: str  # "bicubic" | "bilinear" | "nearest"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize_mode: str = "shortest"  # "shortest" (resize + centre crop) or "squash"

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        d = dict(d)
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return cls(**d)

    @property
    def interpolation_mode(self) -> InterpolationMode:
        return InterpolationMode(self.interpolation)

    def at(self, size: int, mean, std) -> "Preprocess":
        """This transform's geometry (field of view, resize mode, interpolation) at resolution `size`,
        normalised with `mean` and `std`: how a student sees what this teacher sees."""
        return Preprocess(size=size, resize=round(size * self.resize / self.size), interpolation=self.interpolation,
                          mean=tuple(mean), std=tuple(std), resize_mode=self.resize_mode)


def timm_preprocess(model, size: int | None = None) -> Preprocess:
    """A timm model's evaluation transform from its data config (at `size` if given): the one
    definition for timm teachers and students, `crop_mode` included."""
    from timm.data import resolve_data_config

    from zsd.errors import ZsdError

    cfg = resolve_data_config({}, model=model)
    mode = cfg.get("crop_mode") or "center"
    if mode not in ("center", "squash"):
        raise ZsdError(f"timm crop_mode {mode!r} of {type(model).__name__} is not supported (center, squash)")
    size = size or cfg["input_size"][-1]
    return Preprocess(size=size, resize=int(size / cfg.get("crop_pct", 1.0)), interpolation=cfg["interpolation"],
                      mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                      resize_mode="squash" if mode == "squash" else "shortest")


def eval_box(width: int, height: int, pre: Preprocess) -> tuple[int, int, int, int]:
    """The region of the original image that the evaluation transform keeps, for the record."""
    if pre.resize_mode == "squash":  # both sides scaled to `resize`, then the centre `size` kept
        h, w = int(round(height * pre.size / pre.resize)), int(round(width * pre.size / pre.resize))
        return int(round((height - h) / 2)), int(round((width - w) / 2)), h, w
    scale = pre.resize / min(width, height)
    crop = min(pre.size / scale, width, height)
    h = w = int(round(crop))
    return int(round((height - h) / 2)), int(round((width - w) / 2)), h, w


def sample_views(width: int, height: int, n_views: int, seed: int, row: int,
                 scale: tuple[float, float], pre: Preprocess) -> np.ndarray:
    """View parameters (n_views, 5) for one image; row 0 is the evaluation view.

    The sampler follows torchvision's RandomResizedCrop.get_params (10 tries, then a centre
    crop with clamped aspect ratio), but draws from a numpy generator keyed by (seed, row) so
    that a resumed or sharded run draws the same views for the same row.
    """
    out = np.zeros((n_views, 5), dtype=np.int32)
    out[0, :4] = eval_box(width, height, pre)
    if n_views == 1:  # seeding a generator costs 0.14 ms, 5 % of rendering a photo's view 0
        return out
    rng = np.random.Generator(np.random.PCG64([seed, row]))
    area = width * height
    log_ratio = (math.log(3 / 4), math.log(4 / 3))
    for v in range(1, n_views):
        for _ in range(10):
            target_area = area * rng.uniform(scale[0], scale[1])
            aspect = math.exp(rng.uniform(*log_ratio))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                break
        else:
            ratio = width / height
            if ratio < 3 / 4:
                w, h = width, int(round(width / (3 / 4)))
            elif ratio > 4 / 3:
                h, w = height, int(round(height * (4 / 3)))
            else:
                w, h = width, height
            top, left = (height - h) // 2, (width - w) // 2
        out[v] = (top, left, h, w, int(rng.integers(0, 2)))
    return out


def render_view(img: Image.Image, view: int, params: np.ndarray, pre: Preprocess) -> torch.Tensor:
    """The uint8 (3, size, size) pixels the teacher saw for one view of a decoded RGB image."""
    if view == 0:
        if pre.resize_mode == "squash":  # timm's crop_mode squash; open_clip's has resize == size
            out = F.center_crop(F.resize(img, [pre.resize, pre.resize], pre.interpolation_mode), pre.size)
        else:
            out = F.center_crop(F.resize(img, pre.resize, pre.interpolation_mode), pre.size)
    else:
        top, left, h, w, flip = (int(x) for x in params)
        out = F.resized_crop(img, top, left, h, w, [pre.size, pre.size], pre.interpolation_mode)
        if flip:
            out = F.hflip(out)
    return F.pil_to_tensor(out)


def eval_geometry(width: int, height: int, pre: Preprocess) -> tuple[int, int, int, int] | None:
    """(resized width, height, crop top, left) of view 0's resize + centre crop in torchvision's
    arithmetic; None when the centre crop pads (a resize below `pre.size`)."""
    if pre.resize_mode == "squash":
        rw = rh = pre.resize
    elif width <= height:
        rw, rh = pre.resize, int(pre.resize * height / width)
    else:
        rw, rh = int(pre.resize * width / height), pre.resize
    if min(rw, rh) < pre.size:
        return None
    return rw, rh, int(round((rh - pre.size) / 2.0)), int(round((rw - pre.size) / 2.0))


def render_view_fast(data: bytes, view: int, params: np.ndarray, pre: Preprocess) -> torch.Tensor:
    """`render_view` of encoded image bytes, faster and close to it rather than equal (the trainer's
    --fast-decode; tools/bench_decode.py measures both, tests/test_views.py bounds the difference).

    A JPEG whose view crop is at least twice `pre.size` on each side is decoded at 1/2 or 1/4 scale
    in the DCT domain (the larger that keeps the crop >= `pre.size`; not 1/8, which keeps only each
    8x8 block's mean and measured 2-3x the difference) and the crop's region of it resized in one
    step (PIL's resize with a fractional box). Otherwise the image is decoded whole and a bilinear or
    bicubic view resized by torch's uint8 antialiased kernel on channels-last pixels (the crop, or
    view 0's resize + centre crop, as `render_view`), which differs from PIL's by rounding alone;
    other interpolations, a view 0 that is only cropped or that pads go through `render_view` itself.
    """
    h, w = int(params[2]), int(params[3])  # view 0's row holds its eval box: close enough to choose
    reduce = max((s for s in (2, 4) if min(h, w) >= s * pre.size), default=1) if pre.resize >= pre.size else 1
    img, scale, (width, height) = load_rgb_reduced(data, reduce)
    geometry = eval_geometry(width, height, pre)
    if scale > 1:
        if view:
            top, left = int(params[0]), int(params[1])
            box = (left, top, left + w, top + h)
        else:  # view 0's region of the full image, from its resize + crop
            rw, rh, top, left = geometry
            box = (left * width / rw, top * height / rh, (left + pre.size) * width / rw, (top + pre.size) * height / rh)
        # pixel i of a 1/s decode covers pixels [i*s, (i+1)*s) of the full one (8x8 DCT blocks -> 8/s)
        out = img.resize((pre.size, pre.size), F.pil_modes_mapping[pre.interpolation_mode],
                         box=tuple(c / scale for c in box))
        if view and params[4]:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return F.pil_to_tensor(out)
    if pre.interpolation not in ("bilinear", "bicubic") or (view == 0 and (geometry is None or
                                                                         geometry[:2] == (width, height))):
        return render_view(img, view, params, pre)  # view 0 resized to its own size is a crop: exact and cheap
    x = F.pil_to_tensor(img)[None]  # a view of HWC pixels: channels-last, the layout torch's uint8 kernel wants
    if view:
        top, left, flip = int(params[0]), int(params[1]), int(params[4])
        x = torch.nn.functional.interpolate(x[..., top:top + h, left:left + w], size=(pre.size, pre.size),
                                            mode=pre.interpolation, antialias=True)
        return (x.flip(-1) if flip else x)[0]
    rw, rh, top, left = geometry
    x = torch.nn.functional.interpolate(x, size=(rh, rw), mode=pre.interpolation, antialias=True)
    return x[0, :, top:top + pre.size, left:left + pre.size]


@functools.lru_cache(maxsize=64)
def _channel_stats(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Built once per (mean, std, device): a tensor made from Python lists on a GPU is a blocking
    # host-to-device copy, and normalize runs per micro-batch in training and per batch in the cache pass.
    m = torch.tensor(mean, dtype=torch.float32, device=device).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=device).view(3, 1, 1)
    return m, s


def normalize(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float32 normalised model input, on the pixels' device."""
    x = pixels.float().div_(255)
    m, s = _channel_stats(tuple(map(float, mean)), tuple(map(float, std)), x.device)
    return x.sub_(m).div_(s)


def resize_pixels(pixels: torch.Tensor, size: int, interpolation: str = "bicubic") -> torch.Tensor:
    """Resize teacher pixels (uint8, ..., 3, S, S) to a student's square resolution."""
    if pixels.shape[-1] == size and pixels.shape[-2] == size:
        return pixels
    return F.resize(pixels, [size, size], InterpolationMode(interpolation), antialias=True)


class ViewDataset(Dataset):
    """The teacher pass's dataset: a store's rows decoded from its recorded sources with preprocessing
    `pre`; row -> (row, uint8 views (V, 3, S, S) | None, view params, error, decode seconds), the
    views drawn by `sample_views` from (view_seed, row). Keys are `PackedKeys` and locations a numpy
    array, so forked DataLoader workers share them instead of copying; each worker, and each thread
    of the CPU pass's in-process decoding, opens its own shard handles (a shard's seek + read must
    not interleave with another thread's).
    """

    def __init__(self, descs, keys: PackedKeys, locs, pre: Preprocess, views: int = 1, view_seed: int = 0,
                 crop_scale=(1.0, 1.0)):
        self.descs, self.keys, self.locs = descs, keys, np.asarray(locs, dtype=np.int64)
        self.pre, self.views, self.view_seed, self.crop_scale = pre, views, view_seed, tuple(crop_scale)
        self._local = threading.local()

    def __getstate__(self):  # DataLoader workers pickle the dataset; each builds its own readers
        return {k: v for k, v in self.__dict__.items() if k != "_local"}

    def __setstate__(self, state):
        self.__dict__.update(state, _local=threading.local())

    def __len__(self):
        return len(self.keys)

    def image(self, row: int) -> tuple[Image.Image, tuple[int, int]]:
        """The decoded RGB image of a row and the `file_stat` of the file read; BadImage if it can no longer be read."""
        reader = getattr(self._local, "reader", None)
        if reader is None:
            reader = self._local.reader = RowReader(self.descs)
        data, stat = reader.data_stat(self.keys[row], self.locs[row])
        return load_rgb(data), stat

    def __getitem__(self, row):
        """(row, views, view params, error, decode seconds, the file's `file_stat` (None if unread))."""
        t0 = time.perf_counter()
        try:
            img, stat = self.image(row)
        except BadImage as e:
            return row, None, None, str(e), time.perf_counter() - t0, None
        params = sample_views(img.width, img.height, self.views, self.view_seed, row, self.crop_scale, self.pre)
        pixels = torch.stack([render_view(img, v, params[v], self.pre) for v in range(self.views)])
        return row, pixels, params, "", time.perf_counter() - t0, stat
