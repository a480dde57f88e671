import json

import numpy as np
import pytest
import torch
from conftest import make_image
from student_helpers import make_student

from zsd.cache import cache_teacher
from zsd.classes import zero_shot_classifier
from zsd.cli import main
from zsd.errors import ZsdError
from zsd.robustness import (CORRUPTIONS, corrupt_image, model_input, parse_corruptions, parse_severities, render,
                            robustness)
from zsd.store import open_store
from zsd.student import load_student
from zsd.teachers import create_teacher
from zsd.templates import TEMPLATES
from zsd.views import Preprocess, normalize, render_view

pytest.importorskip("imagecorruptions")


def smooth_images(n=4, size=32):
    """Gradients with noise: images where blur, noise and weather all visibly change something."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size] * (256 // size)
    out = []
    for i in range(n):
        img = np.stack([x, y, (x + y) / 2], -1)[:, ::(1 if i % 2 else -1)] + rng.normal(0, 20, (size, size, 3))
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


def test_every_corruption_changes_the_image_and_more_at_severity_5():
    images = smooth_images()
    for c in CORRUPTIONS:
        change = [np.mean([np.abs(corrupt_image(im, c, s, k).astype(float) - im).mean()
                           for k, im in enumerate(images)]) for s in (1, 5)]
        assert change[0] > 0.5, c
        assert change[1] > change[0], c


def test_corruption_is_seeded_per_call_and_leaves_numpy_alone():
    img = smooth_images(1)[0]
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    for c in ("gaussian_noise", "impulse_noise", "glass_blur", "frost"):
        a, b = corrupt_image(img, c, 3, 5), corrupt_image(img, c, 3, 5)
        assert a.dtype == np.uint8 and a.shape == img.shape and np.array_equal(a, b), c
        assert not np.array_equal(a, corrupt_image(img, c, 3, 6)), c  # the seed is what is random
    assert np.array_equal(np.random.get_state()[1], before)


def test_parse_names_and_severities():
    assert parse_corruptions(None) == list(CORRUPTIONS)
    assert parse_corruptions("fog, gaussian_noise") == ["gaussian_noise", "fog"]  # canonical order
    assert parse_severities("5,1,1") == [1, 5]
    with pytest.raises(ZsdError, match="unknown corruption gaussian_blur"):
        parse_corruptions("gaussian_blur")
    for bad in ("0", "6", "1,6"):
        with pytest.raises(ZsdError, match="severities are 1-5"):
            parse_severities(bad)
    with pytest.raises(ZsdError, match="integers"):
        parse_severities("high")


def test_model_input_matches_the_pil_eval_transform():
    img = smooth_images(1, 48)[0]
    pre = Preprocess(size=32, resize=36, interpolation="bicubic", mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    from PIL import Image

    want = normalize(render_view(Image.fromarray(img), 0, None, pre), pre.mean, pre.std)
    got = model_input(img[None], pre)[0]
    assert got.shape == want.shape
    assert (got - want).abs().mean() < 0.03  # tensor vs PIL resampling: same transform, rounding apart


@pytest.fixture
def test_store(image_folder, tiny_teacher_name, tmp_path):
    path = tmp_path / "pets_test.zarr"
    cache_teacher([str(image_folder)], str(path), teacher=tiny_teacher_name, views=1, chunk_rows=4, workers=0,
                  progress=False, log=lambda m: None)
    return open_store(path)


def test_render_is_identical_on_rerun_and_resumes(test_store, tmp_path, monkeypatch):
    import zsd.robustness as rob

    kw = dict(size=32, corruptions=["shot_noise", "glass_blur"], severities=[2], seed=1, progress=False)
    monkeypatch.setattr(rob, "BLOCK", 5)  # 12 images: 3 blocks
    first = render(test_store, **kw)
    files = sorted(p.name for p in first.folder.glob("*.npy"))
    original = {name: (first.folder / name).read_bytes() for name in files}

    monkeypatch.setenv("ZSD_CACHE", str(tmp_path / "other_cache"))
    again = render(test_store, **kw, workers=2)  # rendered in worker processes
    assert again.folder != first.folder
    assert {name: (again.folder / name).read_bytes() for name in files} == original

    # A render killed after the first block of glass blur: the rest is rendered, the first block is not redone.
    variant = "glass_blur-2"
    done = np.load(again.folder / f"{variant}.done.npy")
    done[1:] = False
    np.save(again.folder / f"{variant}.done.npy", done)
    arr = np.load(again.path(variant), mmap_mode="r+")
    arr[5:] = 0
    arr.flush()
    del arr
    calls = []
    real = rob._corrupt_block
    monkeypatch.setattr(rob, "_corrupt_block", lambda clean, keys, *a: calls.append(list(keys)) or real(clean, keys, *a))
    render(test_store, **kw)
    assert [len(k) for k in calls] == [5, 2]  # blocks 1 and 2 of glass blur only
    assert again.path(variant).read_bytes() == original[f"{variant}.npy"]
    assert not np.array_equal(np.load(again.path(variant))[:5], np.load(again.path("clean"))[:5])


def test_robustness_metrics_match_an_independent_computation(test_store, tiny_teacher_name, tmp_path):
    run = tmp_path / "run"
    make_student(run, test_store.path, steps=3)
    out = tmp_path / "out"
    result = robustness(str(test_store.path), [str(run)], templates="default", corruptions="gaussian_noise,fog",
                        severities=[1, 5], size=32, device="cpu", batch_size=5, out_dir=str(out), progress=False,
                        log=lambda m: None)
    records = result["records"]
    assert len(records) == 2 * (1 + 2 * 2)  # models x (clean + corruptions x severities)
    cache = result["settings"]["render_cache"]

    teacher = create_teacher(tiny_teacher_name, None, "cpu")
    assert teacher.preprocess.size == teacher.preprocess.resize == 32  # the base crop is its input as is
    z = zero_shot_classifier(teacher, ["cat", "dog", "fish tank"], TEMPLATES["default"]).astype(np.float64)
    student, config = load_student(run)
    labels = test_store.labels()
    pre_s = Preprocess.from_dict(config["preprocess"])

    def pixels(variant):
        return np.load(f"{cache}/{variant}.npy")

    def teacher_emb(pix):
        x = normalize(torch.from_numpy(pix).permute(0, 3, 1, 2), teacher.preprocess.mean, teacher.preprocess.std)
        return teacher.encode_images(x).numpy().astype(np.float64)

    def student_emb(pix):
        return student.encode_images(model_input(pix, pre_s)).numpy().astype(np.float64)

    t_clean = teacher_emb(pixels("clean"))
    for role, embed in (("teacher", teacher_emb), ("student", student_emb)):
        mine = {(r["corruption"], r["severity"]): r["metrics"] for r in records if r["role"] == role}
        accs = {}
        for (c, s), m in mine.items():
            pix = pixels("clean" if c == "clean" else f"{c}-{s}")
            e, t = embed(pix), teacher_emb(pix)
            pred, t_pred = (e @ z.T).argmax(1), (t @ z.T).argmax(1)
            accs[c, s] = (pred == labels).mean()
            assert m["acc1"] == pytest.approx(accs[c, s])
            assert m["agreement_with_teacher"] == pytest.approx((pred == t_pred).mean())
            assert m["mean_cosine_to_teacher_clean"] == pytest.approx((e * t_clean).sum(1).mean(), abs=1e-5)
        summary = next(m for m in result["summary"] if m["role"] == role)
        mpc = np.mean([a for k, a in accs.items() if k[0] != "clean"])
        assert summary["mPC"] == pytest.approx(mpc)
        assert summary["rPC"] == pytest.approx(mpc / accs["clean", 0])
        assert summary["acc1_per_severity"]["5"] == pytest.approx((accs["gaussian_noise", 5] + accs["fog", 5]) / 2)
        assert summary["acc1_per_corruption"]["fog"] == pytest.approx((accs["fog", 1] + accs["fog", 5]) / 2)
    teacher_clean = next(r for r in records if r["role"] == "teacher" and r["corruption"] == "clean")["metrics"]
    assert teacher_clean["agreement_with_teacher"] == 1 and teacher_clean["mean_cosine_to_teacher_clean"] == \
        pytest.approx(1, abs=1e-5)

    # The report: JSON read back, the markdown table, a PNG; a rerun writes the same bytes.
    saved = (out / "robustness.json").read_bytes()
    assert json.loads(saved)["records"] == json.loads(json.dumps(records))
    table = (out / "robustness.md").read_text()
    assert "| teacher" in table and "| run |" in table and "fog" in table
    assert (out / "robustness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    robustness(str(test_store.path), [str(run)], templates="default", corruptions="gaussian_noise,fog",
               severities=[1, 5], size=32, device="cpu", batch_size=5, out_dir=str(out), progress=False,
               log=lambda m: None)
    assert (out / "robustness.json").read_bytes() == saved


def test_bad_input_is_one_line(tmp_path, tiny_teacher_name, test_store, capsys):
    flat = tmp_path / "flat"
    for i in range(3):
        make_image(flat / f"{i}.png", seed=i, size=(32, 32))
    cases = [
        (["--corruptions", "gaussian_blur"], "unknown corruption gaussian_blur"),
        (["--severities", "0"], "severities are 1-5"),
        (["--severities", "6"], "severities are 1-5"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit) as e:
            main(["robustness", str(test_store.path), "--out", str(tmp_path / "o"), "--size", "32", *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 1 and len(err) == 1 and err[0].startswith("zsd: error:") and message in err[0]
    with pytest.raises(SystemExit):
        main(["robustness", str(flat), "--teacher", tiny_teacher_name, "--out", str(tmp_path / "o"), "--size", "32",
              "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("zsd: error:") and "unlabelled" in err[-1]
    assert not (tmp_path / "o").exists()
