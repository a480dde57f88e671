import json

import faiss
import numpy as np
import pytest
from conftest import FAKE_TEACHER, make_image, random_store, unit
from student_helpers import make_student

from zsd.cache import cache_teacher
from zsd.coverage import certify, coverage, nearest_train, pair_distances, plot_coverage, witnesses
from zsd.errors import ZsdError
from zsd.store import open_store


def test_nearest_matches_numpy_bruteforce(tmp_path):
    rng = np.random.default_rng(0)
    a, b = unit(rng.normal(size=(50, 16))), unit(rng.normal(size=(37, 16)))
    q = unit(rng.normal(size=(20, 16))).astype(np.float16).astype(np.float32)
    stores = [random_store(tmp_path / "a.zarr", a, failed=[3, 17]), random_store(tmp_path / "b.zarr", b, failed=[0])]
    dist, idx, _ = nearest_train(q, stores, k=5, block_rows=16)

    train = np.concatenate([a, b]).astype(np.float16).astype(np.float64)
    d = np.linalg.norm(q[:, None, :].astype(np.float64) - train[None], axis=-1)
    d[:, [3, 17, 50]] = np.inf  # failed rows are never neighbours
    want = np.argsort(d, axis=1)[:, :5]
    np.testing.assert_array_equal(idx, want)
    np.testing.assert_allclose(dist, np.take_along_axis(d, want, 1), atol=1e-5)
    np.testing.assert_allclose(pair_distances(q, np.arange(20), want[:, 0], stores, 16), d[np.arange(20), want[:, 0]])


def test_fp16_streaming_equals_fp32_in_ram(tmp_path):
    rng = np.random.default_rng(1)
    train = unit(rng.normal(size=(1000, 16)))
    q = unit(rng.normal(size=(64, 16))).astype(np.float32)
    store = random_store(tmp_path / "t.zarr", train, chunk_rows=64)
    _, idx, _ = nearest_train(q, [store], k=10, block_rows=128)
    index = faiss.IndexFlatIP(16)
    index.add(store.embeddings(view=0).astype(np.float32))
    _, want = index.search(q, 10)
    np.testing.assert_array_equal(idx, want)


def synthetic_case(rng, n_train=60, n_test=40, classes=5, d=16):
    """Class directions, teacher = class + noise, student = teacher + controlled noise."""
    z = unit(rng.normal(size=(classes, d)))
    noise_t, noise_s = rng.uniform(0.2, 1.5), rng.uniform(0.005, 0.4)

    def sample(n):
        t = unit(z[rng.integers(0, classes, n)] + noise_t * rng.normal(size=(n, d)) / np.sqrt(d))
        return t, unit(t + noise_s * rng.normal(size=(n, d)) / np.sqrt(d))

    return z, sample(n_train), sample(n_test)


def test_certificates_never_certify_a_disagreement(tmp_path):
    counts = np.zeros(5, int)  # paper-, witness-, direct-certified, disagreements, images
    for seed in range(40):
        rng = np.random.default_rng(seed)
        z, (t_train, s_train), (t_test, s_test) = synthetic_case(rng)
        stores = [random_store(tmp_path / f"t{seed}.zarr", t_train), random_store(tmp_path / f"s{seed}.zarr", s_train)]
        T = t_test.astype(np.float16).astype(np.float32)
        S = s_test.astype(np.float16).astype(np.float32)
        _, nn_t, _ = nearest_train(T, stores[:1], k=4, block_rows=16)
        bounds = witnesses(T, S, nn_t, stores[:1], stores[1:], k=4, block_rows=16)
        cert = certify(T, S, z, bounds)
        assert (bounds["delta"] <= bounds["bound"]).all()
        assert not (cert["paper_certified"] & ~cert["witness_certified"]).any()
        assert not (cert["witness_certified"] & ~cert["direct_certified"]).any()
        assert not (cert["direct_certified"] & ~cert["agree"]).any()

        # the witness minimises B over the union of both top-4 lists (numpy brute force)
        tt, ss = t_train.astype(np.float16).astype(np.float64), s_train.astype(np.float16).astype(np.float64)
        d_t = np.linalg.norm(T[:, None].astype(np.float64) - tt[None], axis=-1)
        d_s = np.linalg.norm(S[:, None].astype(np.float64) - ss[None], axis=-1)
        b_all = d_t + d_s + np.linalg.norm(tt - ss, axis=-1)[None]
        for i in range(len(T)):
            cand = np.union1d(np.argsort(d_t[i])[:4], np.argsort(d_s[i])[:4])
            assert bounds["bound"][i] == pytest.approx(b_all[i, cand].min(), abs=1e-9)
        # the paper's epsilon: the student's largest gap over every training image, independently
        gap_max = np.linalg.norm(tt - ss, axis=-1).max()
        assert bounds["eps_train_max"] == pytest.approx(gap_max, abs=1e-9)
        eps = np.maximum(np.maximum(bounds["eps_t_witness"], bounds["eps_s"]), gap_max)
        assert np.array_equal(cert["paper_certified"], cert["margin"] > 6 * eps)
        counts += [cert["paper_certified"].sum(), cert["witness_certified"].sum(), cert["direct_certified"].sum(),
                   (~cert["agree"]).sum(), len(T)]
    # the property is not vacuous: both certificates fire and the students do disagree somewhere
    assert counts[1] > 0 and counts[2] > counts[1] and counts[3] > 0 and counts[2] < counts[4]
    assert counts[1] >= counts[0]  # the paper's premise on every train image is the stricter one


def cache_train_and_test(image_folder, tmp_path, teacher, pretrained=None, train_views=1):
    """tmp_path/train.zarr of image_folder, tmp_path/test.zarr of 3 new images of each of its classes."""
    test_folder = tmp_path / "test_imgs"
    for c, name in enumerate(["cat", "dog", "fish_tank"]):
        for i in range(3):
            make_image(test_folder / name / f"t{i}.png", seed=500 + 10 * c + i, size=(44, 40))
    kw = dict(teacher=teacher, pretrained=pretrained, chunk_rows=4, workers=0, progress=False, log=lambda m: None)
    cache_teacher([str(image_folder)], str(tmp_path / "train.zarr"), views=train_views, **kw)
    cache_teacher([str(test_folder)], str(tmp_path / "test.zarr"), views=1, **kw)


def test_coverage_with_tiny_trained_student(image_folder, tiny_teacher_name, tmp_path, monkeypatch):
    monkeypatch.setenv("ZSD_CACHE", str(tmp_path / "cache"))
    cache_train_and_test(image_folder, tmp_path, tiny_teacher_name, train_views=2)
    run = tmp_path / "run"
    make_student(run, tmp_path / "train.zarr", steps=30)

    report = coverage([str(tmp_path / "train.zarr")], str(tmp_path / "test.zarr"), str(run), k=3, block_rows=4,
                      templates="default", device="cpu", progress=False, log=lambda m: None)
    images = report["images"]
    assert len(images) == 9 and report["n_train"] == 12
    for r in images:
        assert r["delta"] <= r["bound"] + 1e-12
        assert not r["paper_certified"] or r["witness_certified"]
        assert not r["witness_certified"] or r["direct_certified"]
        assert not r["direct_certified"] or r["agree"]
    assert report["certificate"]["violations"] == {"paper_not_witness": 0, "witness_not_direct": 0,
                                                   "direct_not_agree": 0}

    # eps_t and eps_train against an independent computation from the stores
    train, test = open_store(tmp_path / "train.zarr"), open_store(tmp_path / "test.zarr")
    s_train = open_store(run / "embeddings" / "train.zarr")
    tt = train.embeddings(view=0).astype(np.float64)
    d = np.linalg.norm(test.embeddings(view=0).astype(np.float64)[:, None] - tt[None], axis=-1)
    keys = list(train.keys())
    for r, row in zip(images, d):
        assert r["nearest"] == keys[row.argmin()] and r["eps_t"] == pytest.approx(row.min(), abs=1e-4)
        w = keys.index(r["witness"])
        gap = np.linalg.norm(tt[w] - s_train.embeddings(view=0)[w].astype(np.float64))
        assert r["eps_train"] == pytest.approx(gap, abs=1e-9)
    assert [p["class"] for p in report["per_class"]] and len(report["least_covered"]) == 9
    assert report["coverage_curve"]["fraction"][-1] == 1.0
    plot_coverage(report, tmp_path / "cov.png")
    assert (tmp_path / "cov.png").read_bytes()[:4] == b"\x89PNG"
    plot_coverage(report, tmp_path / "cov.pdf")  # the format the name asks for, written whole
    assert (tmp_path / "cov.pdf").read_bytes()[:5] == b"%PDF-" and not list(tmp_path.glob(".*"))
    json.dumps(report)  # JSON-ready


def test_coverage_without_student_and_bad_input(tmp_path):
    rng = np.random.default_rng(3)
    train = unit(rng.normal(size=(30, 16)))
    test = np.concatenate([train[:2], unit(rng.normal(size=(8, 16)))])  # two leaked train images
    random_store(tmp_path / "train.zarr", train, labels=np.arange(30) % 2, classnames=["a", "b"])
    random_store(tmp_path / "test.zarr", test, labels=np.arange(10) % 2, classnames=["a", "b"])
    report = coverage([str(tmp_path / "train.zarr")], str(tmp_path / "test.zarr"), progress=False)
    assert report["near_duplicates"] == 2 and report["images"][0]["nearest"] == "img00000"
    assert report["images"][0]["eps_t"] < 1e-3 and "delta" not in report["images"][0]
    assert {p["class"] for p in report["per_class"]} == {"a", "b"}

    other = dict(FAKE_TEACHER, model="another")
    random_store(tmp_path / "other.zarr", train, teacher=other)
    with pytest.raises(ZsdError, match="compare one teacher's stores"):
        coverage([str(tmp_path / "other.zarr")], str(tmp_path / "test.zarr"), progress=False)
    random_store(tmp_path / "empty.zarr", np.zeros((0, 16)))
    with pytest.raises(ZsdError, match="holds no written embeddings"):
        coverage([str(tmp_path / "empty.zarr")], str(tmp_path / "test.zarr"), progress=False)
    random_store(tmp_path / "allfailed.zarr", train[:4], failed=range(4))
    with pytest.raises(ZsdError, match="holds no written embeddings"):
        coverage([str(tmp_path / "allfailed.zarr")], str(tmp_path / "test.zarr"), progress=False)


def test_coverage_unlabelled_test_store_with_student(image_folder, tiny_teacher_name, tmp_path, monkeypatch):
    monkeypatch.setenv("ZSD_CACHE", str(tmp_path / "cache"))
    flat = tmp_path / "flat"
    for i in range(3):
        make_image(flat / f"u{i}.png", seed=900 + i)
    kw = dict(teacher=tiny_teacher_name, pretrained=None, chunk_rows=4, workers=0, progress=False, log=lambda m: None)
    cache_teacher([str(image_folder)], str(tmp_path / "train.zarr"), views=1, **kw)
    cache_teacher([str(flat)], str(tmp_path / "flat.zarr"), views=1, **kw)
    run = tmp_path / "run"
    make_student(run, tmp_path / "train.zarr")
    report = coverage([str(tmp_path / "train.zarr")], str(tmp_path / "flat.zarr"), str(run), k=2, device="cpu",
                      progress=False, log=lambda m: None)
    assert any("unlabelled" in n for n in report["notes"])
    assert "bound" in report["images"][0] and "margin" not in report["images"][0]
    assert "agreement" not in report["certificate"]


def test_coverage_prototypes_need_no_checkpoint_file(image_folder, resnet_checkpoint, tmp_path, monkeypatch):
    from zsd.cli import main
    from zsd.classes import prototype_classifier

    monkeypatch.setenv("ZSD_CACHE", str(tmp_path / "cache"))
    cache_train_and_test(image_folder, tmp_path, "timm:test_resnet", str(resnet_checkpoint))
    run = tmp_path / "run"
    make_student(run, tmp_path / "train.zarr")
    # without --pretrained: the teacher, loaded from a checkpoint file, is never rebuilt
    main(["coverage", "--train", str(tmp_path / "train.zarr"), "--test", str(tmp_path / "test.zarr"), "--student",
          str(run), "--classes-from", str(tmp_path / "train.zarr"), "-k", "2", "--device", "cpu", "--json",
          str(tmp_path / "cov.json")])
    report = json.loads((tmp_path / "cov.json").read_text())
    assert report["classifier"]["kind"] == "prototypes"
    assert report["classifier"]["store"] == str(tmp_path / "train.zarr")

    # the teacher margins are taken against the train store's prototypes
    train, test = open_store(tmp_path / "train.zarr"), open_store(tmp_path / "test.zarr")
    z = prototype_classifier(train, test.classnames).astype(np.float64)
    top2 = np.sort(test.embeddings(view=0).astype(np.float64) @ z.T, axis=1)[:, -2:]
    np.testing.assert_allclose([r["margin"] for r in report["images"]], top2[:, 1] - top2[:, 0], atol=1e-6)


def test_coverage_cli(tmp_path, capsys):
    from zsd.cli import main

    rng = np.random.default_rng(4)
    random_store(tmp_path / "a.zarr", unit(rng.normal(size=(20, 16))))
    random_store(tmp_path / "b.zarr", unit(rng.normal(size=(20, 16))))
    random_store(tmp_path / "test.zarr", unit(rng.normal(size=(6, 16))), labels=np.arange(6) % 2, classnames=["x", "y"])
    out = tmp_path / "out"
    main(["coverage", "--train", str(tmp_path / "a.zarr"), str(tmp_path / "b.zarr"), "--test",
          str(tmp_path / "test.zarr"), "--json", str(out / "cov.json"), "--plot", str(out / "cov.png")])
    report = json.loads((out / "cov.json").read_text())
    assert report["n_train"] == 40 and {r["nearest_store"] for r in report["images"]} <= {"a", "b"}
    assert (out / "cov.png").stat().st_size > 0 and "eps_T" in capsys.readouterr().out

    random_store(tmp_path / "other.zarr", unit(rng.normal(size=(5, 16))), teacher=dict(FAKE_TEACHER, weights="x"))
    with pytest.raises(SystemExit) as e:
        main(["coverage", "--train", str(tmp_path / "other.zarr"), "--test", str(tmp_path / "test.zarr")])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith("zsd: error:") and err.count("\n") == 1


def test_the_plot_is_readable_with_many_classes_and_small_margins(tmp_path):
    """Margins < 0.35 next to bounds ~ 2.5 and 120 classes: every panel keeps its own scale and title."""
    from matplotlib.colors import to_rgba

    rng = np.random.default_rng(0)
    n = 300
    margin, delta = rng.uniform(0, 0.35, n), rng.uniform(0, 0.2, n)
    images = [{"eps_t": float(e), "margin": float(m), "delta": float(d), "bound": float(d + 2.3), "agree": bool(a)}
              for e, m, d, a in zip(rng.uniform(0, 1, n), margin, delta, rng.uniform(size=n) < 0.8)]
    report = {"n_test": n, "coverage_curve": {"threshold": [0, 0.5, 1], "fraction": [0, 0.5, 1]},
              "per_class": [{"class": f"class {i}", "median_eps_t": i / 120} for i in range(120)],
              "images": images, "certificate": {"margin": {}}}
    fig = plot_coverage(report, tmp_path / "cov.png")
    assert (tmp_path / "cov.png").read_bytes()[:4] == b"\x89PNG"
    curve, classes, direct, witness = fig.axes
    assert all(ax.get_title() for ax in fig.axes)
    labels = [t.get_text() for t in classes.get_yticklabels()]
    assert len(labels) == 40 and "class 0" in labels and "class 119" in labels and "class 60" not in labels
    assert direct.get_ylim()[1] == pytest.approx(1.05 * margin.max())  # not squashed under 2 B's scale
    assert witness.get_xlim()[1] == pytest.approx(1.05 * 2 * (delta.max() + 2.3))
    assert f"{(margin > 2 * delta).mean():.0%} certified" in direct.get_title()
    agree_dots, disagree_dots = witness.collections[:2]
    assert to_rgba(agree_dots.get_facecolor()[0]) != to_rgba(disagree_dots.get_facecolor()[0])
