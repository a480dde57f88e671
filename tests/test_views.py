import numpy as np
import open_clip
import pytest
import timm
import torch
from PIL import Image
from torchvision.transforms import functional as F

from zsd.teachers import create_teacher
from zsd.views import eval_box, normalize, render_view, resize_pixels, sample_views


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
    from zsd.student import student_preprocess

    model = timm.create_model("tf_efficientnetv2_b3", pretrained=False)
    cfg = timm.data.resolve_data_config({}, model=model)
    assert cfg["crop_mode"] == "squash" and cfg["crop_pct"] < 1
    transform = timm.data.create_transform(**cfg, is_training=False)
    pre = student_preprocess("tf_efficientnetv2_b3")
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
