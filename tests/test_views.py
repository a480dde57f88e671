import io

import numpy as np
import open_clip
import pytest
import timm
import torch
from PIL import Image
from torchvision.transforms import functional as F

from zsd.sources import load_rgb, load_rgb_reduced
from zsd.teachers import create_teacher
from zsd.views import (Preprocess, eval_box, normalize, render_view, render_view_fast, resize_pixels, sample_views,
                       timm_preprocess)


def _img(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


@pytest.mark.parametrize("size", [(48, 40), (31, 77), (200, 120)])
def test_view0_is_open_clips_own_preprocess_val(tiny_teacher_name, size):
    _, _, preprocess_val = open_clip.create_model_and_transforms(tiny_teacher_name)
    teacher = create_teacher(tiny_teacher_name, None, "cpu")
    img = _img(*size)
    ours = normalize(render_view(img, 0, np.zeros(5), teacher.preprocess), teacher.preprocess.mean,
                     teacher.preprocess.std)
    assert torch.equal(ours, preprocess_val(img))


def test_view0_is_timms_own_eval_transform(tmp_path):
    model = timm.create_model("test_efficientnet", pretrained=False)
    path = tmp_path / "w.pth"
    torch.save(model.state_dict(), path)
    teacher = create_teacher("timm:test_efficientnet", str(path), "cpu")
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model), is_training=False)
    img = _img(97, 61)
    pre = teacher.preprocess
    assert torch.equal(normalize(render_view(img, 0, np.zeros(5), pre), pre.mean, pre.std), transform(img))


@pytest.mark.parametrize("size", [(97, 61), (40, 130)])
def test_squash_crop_mode_is_timms_own_eval_transform(size):
    """tf_efficientnetv2_b3 squashes to 1/crop_pct of the input, then centre-crops (timm's crop_mode)."""
    model = timm.create_model("tf_efficientnetv2_b3", pretrained=False)
    cfg = timm.data.resolve_data_config({}, model=model)
    assert cfg["crop_mode"] == "squash" and cfg["crop_pct"] < 1
    transform = timm.data.create_transform(**cfg, is_training=False)
    pre = timm_preprocess(model)
    img = _img(*size)
    assert torch.equal(normalize(render_view(img, 0, np.zeros(5), pre), pre.mean, pre.std), transform(img))
    top, left, h, w = eval_box(*size, pre)  # the kept region: the centre size/resize (~ crop_pct) of each side
    keep = pre.size / int(pre.size / cfg["crop_pct"])
    assert (h, w) == (round(size[1] * keep), round(size[0] * keep))
    assert (top, left) == (round((size[1] - h) / 2), round((size[0] - w) / 2))


def test_timm_teacher_dim_is_the_pre_logits_width(tmp_path):
    """MobileNetV3's head conv widens the pooled features (288 -> 1024): the embedding is 1024-d."""
    model = timm.create_model("mobilenetv3_small_050", pretrained=False)
    path = tmp_path / "w.pth"
    torch.save(model.state_dict(), path)
    teacher = create_teacher("timm:mobilenetv3_small_050", str(path), "cpu")
    assert model.num_features != model.head_hidden_size
    z = teacher.encode_images(torch.zeros(2, 3, 64, 64))
    assert teacher.dim == z.shape[-1] == model.head_hidden_size


def test_augmented_views_are_reproducible_and_in_bounds(tiny_teacher_name):
    pre = create_teacher(tiny_teacher_name, None, "cpu").preprocess
    a = sample_views(120, 80, 50, seed=3, row=7, scale=(0.3, 1.0), pre=pre)
    b = sample_views(120, 80, 50, seed=3, row=7, scale=(0.3, 1.0), pre=pre)
    c = sample_views(120, 80, 50, seed=3, row=8, scale=(0.3, 1.0), pre=pre)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    top, left, h, w, flip = a[1:].T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 80).all() and (left + w <= 120).all()
    area = h * w / (120 * 80)
    assert area.min() >= 0.3 - 0.05 and area.max() <= 1.0
    assert set(flip) == {0, 1}


def test_augmented_view_matches_torchvision_resized_crop_and_flip(tiny_teacher_name):
    pre = create_teacher(tiny_teacher_name, None, "cpu").preprocess
    img = _img(90, 70, seed=2)
    params = np.array([5, 9, 40, 50, 1])
    expected = F.pil_to_tensor(F.hflip(F.resized_crop(img, 5, 9, 40, 50, [pre.size, pre.size],
                                                      F.InterpolationMode.BICUBIC)))
    assert torch.equal(render_view(img, 1, params, pre), expected)


def test_resize_pixels_keeps_same_size_and_resizes_otherwise():
    px = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    assert resize_pixels(px, 32) is px
    assert resize_pixels(px, 24).shape == (3, 24, 24)


def _jpeg(w, h, seed=0, fmt="JPEG") -> bytes:
    """A photo-like image: coarse random colours upscaled smoothly, plus camera-like noise (sigma 4)."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8))
    a = np.asarray(coarse.resize((w, h), Image.BICUBIC)).astype(np.float32) + rng.normal(0, 4, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8)).save(buf, fmt, quality=90)
    return buf.getvalue()


@pytest.mark.parametrize("size", [(150, 120), (97, 181)])
def test_reduced_jpeg_pixels_are_the_full_decodes_s_by_s_block_means(size):
    """The box mapping of --fast-decode: pixel i of a 1/s decode covers pixels [i*s, (i+1)*s) of the full one."""
    w, h = size
    data = _jpeg(w, h)
    full = np.asarray(load_rgb(data)).astype(np.float32)
    for s in (2, 4):
        img, scale, shape = load_rgb_reduced(data, s)
        assert (scale, shape, img.size) == (s, (w, h), (-(-w // s), -(-h // s)))
        a = np.asarray(img).astype(np.float32)[:h // s, :w // s]
        means = full[:h // s * s, :w // s * s].reshape(h // s, s, w // s, s, 3).mean((1, 3))
        assert np.abs(a - means).mean() < 1.0  # measured 0.6-0.9; one pixel off: > 5
        assert np.abs(a[:, 1:] - means[:, :-1]).mean() > 4 and np.abs(a[1:] - means[:-1]).mean() > 4
    assert load_rgb_reduced(data, 1)[1] == 1 and np.array_equal(np.asarray(load_rgb_reduced(data, 1)[0]), full)
    png = _jpeg(w, h, fmt="PNG")  # other formats are decoded whole
    assert load_rgb_reduced(png, 4)[1:] == (1, (w, h))


@pytest.mark.parametrize("interpolation,mode,resize", [("bicubic", "shortest", 56), ("bilinear", "squash", 64)])
def test_fast_decode_pixels_are_close_to_the_teachers(interpolation, mode, resize):
    """--fast-decode against `render_view` (what the teacher saw): every view of JPEGs that decode at 1/1,
    1/2 and 1/4 (measured: max 1 / mean <= 0.18 unreduced, max 11 / mean <= 1.2 reduced; 1/8 would be 2.8)."""
    pre = Preprocess(size=56, resize=resize, interpolation=interpolation, mean=(0.5,) * 3, std=(0.5,) * 3,
                     resize_mode=mode)
    reduced = set()
    for w, h in [(70, 60), (97, 181), (150, 120), (300, 240)]:
        data = _jpeg(w, h, seed=w)
        img = load_rgb(data)
        for scale in ((0.9, 1.0), (0.2, 1.0)):
            params = sample_views(w, h, 5, 0, w, scale, pre)
            for v in range(5):
                exact, fast = render_view(img, v, params[v], pre), render_view_fast(data, v, params[v], pre)
                assert fast.shape == exact.shape == (3, 56, 56) and fast.dtype == torch.uint8
                d = (exact.int() - fast.int()).abs()
                s = max((s for s in (2, 4) if min(params[v][2:4]) >= s * 56), default=1)
                reduced.add(s)
                assert d.max() <= (3 if s == 1 else 16) and d.float().mean() <= (0.3 if s == 1 else 1.5), (w, h, v)
    assert reduced == {1, 2, 4}


def test_fast_decode_is_exact_where_it_only_copies_or_falls_back():
    """Unreduced, the teacher's pixels exactly where no resize happens (the short side is already the
    size), for an interpolation torch does not match (nearest), and for a view 0 whose crop pads."""
    pre = Preprocess(size=56, resize=56, interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3)
    data = _jpeg(80, 56)
    assert torch.equal(render_view_fast(data, 0, np.array([0, 12, 56, 56, 0]), pre),
                       render_view(load_rgb(data), 0, None, pre))
    nearest = Preprocess(56, 56, "nearest", (0.5,) * 3, (0.5,) * 3)
    data = _jpeg(100, 80)
    params = sample_views(100, 80, 3, 0, 0, (0.9, 1.0), nearest)
    for v in range(3):
        assert torch.equal(render_view_fast(data, v, params[v], nearest), render_view(load_rgb(data), v, params[v],
                                                                                      nearest))
    pads = Preprocess(56, 48, "bicubic", (0.5,) * 3, (0.5,) * 3)  # resize 48, then a 56 centre crop: padded
    data = _jpeg(300, 240)
    params = sample_views(300, 240, 1, 0, 0, (1.0, 1.0), pads)
    assert torch.equal(render_view_fast(data, 0, params[0], pads), render_view(load_rgb(data), 0, params[0], pads))


def test_normalize_builds_its_constants_once(monkeypatch):
    # A tensor built from Python lists on a GPU is a blocking host copy: the hot path must not make
    # one per call. Count torch.tensor calls over repeated normalisations after the first.
    from zsd import views

    pixels = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    mean, std = (0.48, 0.45, 0.40), (0.26, 0.26, 0.27)
    first = views.normalize(pixels, mean, std)
    calls = []
    real = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: calls.append(a) or real(*a, **k))
    for _ in range(5):
        again = views.normalize(pixels, list(mean), list(std))
    assert calls == []
    expected = (pixels.double() / 255 - torch.tensor(mean, dtype=torch.float64).view(3, 1, 1)) \
        / torch.tensor(std, dtype=torch.float64).view(3, 1, 1)
    torch.testing.assert_close(again, expected.float())
    torch.testing.assert_close(first, again)
