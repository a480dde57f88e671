import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import FAKE_TEACHER, random_store, unit
from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, top_k_accuracy_score
from student_helpers import make_student

from zsd.cache import cache_teacher
from zsd.classes import prototype_classifier, select_classes, zero_shot_classifier
from zsd.errors import ZsdError
from zsd.evaluate import classification_metrics, evaluate, student_embeddings
from zsd.sources import RowReader, load_rgb
from zsd.store import open_store
from zsd.student import load_student
from zsd.teachers import create_teacher
from zsd.templates import TEMPLATES, resolve_templates
from zsd.views import Preprocess, normalize, render_view


def make_store(image_folder, path, teacher, pretrained=None, views=2):
    cache_teacher([str(image_folder)], str(path), teacher=teacher, pretrained=pretrained, views=views, chunk_rows=4,
                  workers=0, progress=False, log=lambda m: None)
    return open_store(path)


@pytest.fixture
def cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("ZSD_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    for k in (6, 9, 12):
        scores = rng.normal(size=(200, k))
        labels = rng.integers(0, k, 200)
        labels[:3] = np.arange(3)  # every class id below 3 present at least once
        teacher_pred = rng.integers(0, k, 200)
        m = classification_metrics(scores, labels, teacher_pred, confusion=True)
        pred = scores.argmax(1)
        assert m["acc1"] == pytest.approx(accuracy_score(labels, pred))
        assert m["acc5"] == pytest.approx(top_k_accuracy_score(labels, scores, k=min(5, k), labels=np.arange(k)))
        assert m["mean_per_class_recall"] == pytest.approx(balanced_accuracy_score(labels, pred))
        assert m["agreement_with_teacher"] == pytest.approx((pred == teacher_pred).mean())
        assert np.array_equal(m["confusion_matrix"], confusion_matrix(labels, pred, labels=np.arange(k)))


def test_metrics_on_hand_example():
    scores = np.array([[3, 2, 1], [1, 3, 2], [1, 2, 3], [3, 1, 2]], float)
    labels = np.array([0, 2, 2, 1])
    m = classification_metrics(scores, labels, np.array([0, 1, 2, 2]))
    assert m["acc1"] == 0.5  # rows 0 and 2
    assert m["acc5"] == 1.0  # K=3 < 5: top-3 always hits
    assert m["mean_per_class_recall"] == pytest.approx((1 + 0 + 0.5) / 3)
    assert m["agreement_with_teacher"] == 0.75


def test_classifier_is_clip_benchmark_average(tiny_teacher_name, cache_env):
    teacher = create_teacher(tiny_teacher_name, None, "cpu")
    names, templates = ["cat", "fish tank"], TEMPLATES["cars"][:3]
    z = zero_shot_classifier(teacher, names, templates)
    tok, text = teacher.tokenizer, teacher.model.encode_text
    with torch.no_grad():
        for row, name in zip(z, names):
            e = text(tok([t.replace("{c}", name) for t in templates])).numpy().astype(np.float64)
            e /= np.linalg.norm(e, axis=1, keepdims=True)
            want = e.mean(0) / np.linalg.norm(e.mean(0))
            np.testing.assert_allclose(row, want, atol=1e-5)
    cached = list((cache_env / "classifiers").glob("*.npy"))
    assert len(cached) == 1 and np.array_equal(np.load(cached[0]), z)
    zero_shot_classifier(teacher, names, templates[:2])
    assert len(list((cache_env / "classifiers").glob("*.npy"))) == 2  # templates are part of the key


def test_select_classes_files(tmp_path):
    classes = ["Egyptian_Mau", "beagle", "fish_tank"]
    assert select_classes(classes, None)[1] == ["Egyptian Mau", "beagle", "fish tank"]
    mapping = tmp_path / "m.json"
    mapping.write_text(json.dumps({"Egyptian_Mau": {"imagenet_name": "Egyptian cat", "imagenet_index": 285},
                                   "beagle": "beagle, hound"}))
    keep, names, note = select_classes(classes, str(mapping))
    assert keep == [0, 1] and names == ["Egyptian cat", "beagle"] and "1 of 3 classes" in note
    lst = tmp_path / "l.json"
    lst.write_text(json.dumps(["a", "b"]))
    with pytest.raises(ZsdError, match="lists 2 names"):
        select_classes(classes, str(lst))
    with pytest.raises(ZsdError, match="no class names"):
        select_classes([], None)


def test_templates_resolution(tmp_path):
    assert resolve_templates(None, "real_pets") == ("pets", TEMPLATES["pets"])
    assert resolve_templates(None, "whatever")[0] == "default"
    f = tmp_path / "recipe.json"
    f.write_text(json.dumps({"templates": ["a sketch of a {c}."]}))
    assert resolve_templates(str(f))[1] == ["a sketch of a {c}."]
    f.write_text(json.dumps(["no placeholder"]))
    with pytest.raises(ZsdError, match="placeholder"):
        resolve_templates(str(f))
    with pytest.raises(ZsdError, match="neither a domain"):
        resolve_templates("nonsense")


def test_eval_teacher_and_student(image_folder, tiny_teacher_name, tmp_path, cache_env):
    store = make_store(image_folder, tmp_path / "test.zarr", tiny_teacher_name)
    run = tmp_path / "run"
    make_student(run, store.path, steps=0)
    results = evaluate(str(store.path), [str(run)], templates="default", out_dir=str(tmp_path / "res"),
                       device="cpu", progress=False, log=lambda m: None)
    teacher_res, student_res = results

    # teacher: independent computation from the store's view-0 embeddings
    model = create_teacher(tiny_teacher_name, None, "cpu")
    z = zero_shot_classifier(model, ["cat", "dog", "fish tank"], TEMPLATES["default"])
    pred = (store.embeddings(view=0).astype(np.float64) @ z.T).argmax(1)
    assert teacher_res["metrics"]["acc1"] == pytest.approx((pred == store.labels()).mean())
    assert teacher_res["metrics"]["agreement_with_teacher"] == 1.0
    assert teacher_res["task"] == "zeroshot_classification" and teacher_res["n_images"] == 12

    # student embeddings: a store of the same format, equal to the student on its own eval transform
    emb = open_store(student_res["embeddings"])
    student, config = load_student(run)
    pre = Preprocess.from_dict(config["preprocess"])
    reader = RowReader(store.sources)
    x = torch.stack([normalize(render_view(load_rgb(reader.read(k, l)), 0, None, pre), pre.mean, pre.std)
                     for k, l in zip(store.keys(), store.locs())])
    want = student.encode_images(x).numpy()
    np.testing.assert_allclose(emb.embeddings(view=0).astype(np.float32), want, atol=2e-3)
    assert emb.complete() and emb.views == 1 and np.array_equal(emb.labels(), store.labels())
    assert emb.teacher["backend"] == "zsd-student" and list(emb.keys()) == list(store.keys())
    spred = (want.astype(np.float64) @ z.T).argmax(1)
    assert student_res["metrics"]["agreement_with_teacher"] == pytest.approx((spred == pred).mean())

    # reused, not recomputed
    stamp = (emb.path / "emb" / "c").stat().st_mtime_ns
    assert student_embeddings(run, store, progress=False).path == emb.path
    assert (emb.path / "emb" / "c").stat().st_mtime_ns == stamp
    # a truncated chunk of them is recomputed to the same bytes, not read as a traceback
    chunk = emb.chunk_file("emb", 0)
    intact = chunk.read_bytes()
    chunk.write_bytes(intact[:100])
    assert student_embeddings(run, store, progress=False).path == emb.path
    assert chunk.read_bytes() == intact

    files = sorted((tmp_path / "res").glob("*.json"))
    assert [f.name for f in files] == ["test__run.json", "test__teacher.json"]
    assert json.loads(files[0].read_text())["metrics"] == student_res["metrics"]


def test_eval_refuses_bad_input(image_folder, tiny_teacher_name, tmp_path, cache_env):
    store = make_store(image_folder, tmp_path / "test.zarr", tiny_teacher_name, views=1)
    run = tmp_path / "run"
    _, config = make_student(run, store.path)
    config["teacher_id"] = "0" * 16
    (run / "student.json").write_text(json.dumps(config))
    with pytest.raises(ZsdError, match="distilled from teacher 0000"):
        evaluate(str(store.path), [str(run)], device="cpu", progress=False, log=lambda m: None)
    flat = tmp_path / "flat"
    flat.mkdir()
    for f in list(image_folder.glob("*/*"))[:3]:
        (flat / f.name).write_bytes(f.read_bytes())
    unlabelled = make_store(flat, tmp_path / "flat.zarr", tiny_teacher_name, views=1)
    with pytest.raises(ZsdError, match="unlabelled"):
        evaluate(str(unlabelled.path), device="cpu", progress=False, log=lambda m: None)
    with pytest.raises(ZsdError, match="no store"):
        evaluate(str(tmp_path / "missing.zarr"), device="cpu", progress=False, log=lambda m: None)


def test_eval_image_folder_is_cached_first(image_folder, tiny_teacher_name, cache_env):
    results = evaluate(str(image_folder), teacher=tiny_teacher_name, device="cpu", progress=False, log=lambda m: None)
    assert results[0]["n_images"] == 12
    assert len(list(cache_env.glob("imgs-*.zarr"))) == 1


def test_timm_teacher_mapping_and_checkpoint(image_folder, resnet_checkpoint, tmp_path, cache_env):
    import timm

    ckpt = resnet_checkpoint
    store = make_store(image_folder, tmp_path / "t.zarr", "timm:test_resnet", pretrained=str(ckpt), views=1)
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"cat": {"imagenet_name": "Egyptian cat"}, "dog": "beagle"}))
    with pytest.raises(ZsdError, match="--pretrained FILE"):
        evaluate(str(store.path), classnames=str(mapping), device="cpu", progress=False, log=lambda m: None)
    other = tmp_path / "other.pt"
    torch.save(timm.create_model("test_resnet").state_dict(), other)
    with pytest.raises(ZsdError, match="not the checkpoint"):
        evaluate(str(store.path), pretrained=str(other), classnames=str(mapping), device="cpu", progress=False,
                 log=lambda m: None)
    notes = []
    (res,) = evaluate(str(store.path), pretrained=str(ckpt), classnames=str(mapping), device="cpu",
                      progress=False, log=notes.append)
    assert res["n_images"] == 8 and res["dropped_rows"] == 4 and res["classnames"] == ["Egyptian cat", "beagle"]
    assert any("4 test images" in n for n in notes)
    head = create_teacher("timm:test_resnet", str(ckpt), "cpu").model.get_classifier().weight.detach()
    z = F.normalize(head[[285, 162]], dim=-1).double().numpy()
    pred = (store.embeddings(view=0).astype(np.float64) @ z.T).argmax(1)
    rows = store.labels() < 2
    assert res["metrics"]["acc1"] == pytest.approx((pred[rows] == store.labels()[rows]).mean())
    mapping.write_text(json.dumps({"cat": "not an imagenet class"}))
    with pytest.raises(ZsdError, match="not classes of"):
        evaluate(str(store.path), pretrained=str(ckpt), classnames=str(mapping), device="cpu", progress=False,
                 log=lambda m: None)


def test_eval_cli(image_folder, tiny_teacher_name, tmp_path, cache_env, capsys):
    from zsd.cli import main

    store = make_store(image_folder, tmp_path / "pets_test.zarr", tiny_teacher_name, views=1)
    main(["eval", str(store.path), "--out-dir", str(tmp_path / "res"), "--device", "cpu", "--confusion"])
    out = capsys.readouterr().out
    assert "templates pets" in out and "teacher local-dir" in out  # domain guessed from the name
    res = json.loads((tmp_path / "res" / "pets_test__teacher.json").read_text())
    assert res["metrics"]["acc1"] == pytest.approx(float(out.splitlines()[-1].split()[2]) / 100, abs=1e-4)
    assert np.sum(res["metrics"]["confusion_matrix"]) == 12
    with pytest.raises(SystemExit) as e:
        main(["eval", str(store.path), "--templates", "nonsense"])
    assert e.value.code == 1 and capsys.readouterr().err.count("\n") == 1


def test_eval_cli_embeds_train_stores_on_request(image_folder, tiny_teacher_name, tmp_path, cache_env):
    from zsd.cli import main

    test = make_store(image_folder, tmp_path / "test.zarr", tiny_teacher_name, views=1)
    train = make_store(image_folder / "dog", tmp_path / "train.zarr", tiny_teacher_name, views=2)
    run = tmp_path / "run"
    model, config = make_student(run, test.path)
    main(["eval", str(test.path), "--student", str(run), "--embed", str(train.path), "--device", "cpu"])
    emb = open_store(run / "embeddings" / "train.zarr")
    assert emb.complete() and list(emb.keys()) == list(train.keys()) and emb.views == 1
    pre = Preprocess.from_dict(config["preprocess"])
    reader = RowReader(train.sources)
    x = torch.stack([normalize(render_view(load_rgb(reader.read(k, l)), 0, None, pre), pre.mean, pre.std)
                     for k, l in zip(train.keys(), train.locs())])
    np.testing.assert_allclose(emb.embeddings(view=0).astype(np.float32), model.eval().encode_images(x).numpy(),
                               atol=2e-3)


def numpy_prototypes(store, classes):
    """Per test class, given as the list of the store's class indices it stands for: the
    normalised mean of the normalised view-0 embeddings of the written rows of those classes."""
    emb = store.embeddings(view=0).astype(np.float64)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    rows = []
    for members in classes:
        mean = emb[np.isin(store.labels(), members) & store.written()].mean(0)
        rows.append(mean / np.linalg.norm(mean))
    return np.array(rows)


def test_prototype_classifier_matches_numpy(tmp_path):
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(40, 2, 16)) * rng.uniform(0.5, 2, (40, 2, 1))  # not unit: each row is normalised
    labels = rng.integers(0, 5, 40)
    labels[[3, 9]] = -1
    labels[2] = 0
    store = random_store(tmp_path / "protos.zarr", emb, labels, ["Cat", "dog", "fish-tank", "bird", "cat"],
                         failed=[2, 7])
    z = prototype_classifier(store, ["fish_tank", "cat", "dog"])  # "bird" is not a test class: unused
    assert z.dtype == np.float32 and z.shape == (3, 16)
    # view 0 only, written rows only; "Cat" and "cat" are one class and pool their images
    np.testing.assert_allclose(z, numpy_prototypes(store, [[2], [0, 4], [1]]), atol=1e-6)
    with pytest.raises(ZsdError, match="'cat' and 'Cat' are one class"):
        prototype_classifier(store, ["cat", "Cat"])


def test_eval_with_prototypes(tmp_path, capsys):
    from zsd.cli import main

    rng = np.random.default_rng(1)
    centres = unit(rng.normal(size=(3, 16)))
    train_labels, test_labels = np.arange(30) % 3, np.arange(12) % 3
    # the prototype store spells the classes its own way, in another order, with one class more
    train = random_store(tmp_path / "train.zarr", unit(centres[train_labels] + rng.normal(size=(30, 16))),
                         (train_labels + 1) % 3, ["fish tank", "Cat", "dog", "bird"])
    test = random_store(tmp_path / "test.zarr", unit(centres[test_labels] + rng.normal(size=(12, 16))),
                        test_labels, ["cat", "dog", "fish_tank"])
    # a FAKE_TEACHER store cannot be rebuilt into a teacher: these runs never load one
    (res,) = evaluate(str(test.path), classes_from=str(train.path), out_dir=str(tmp_path / "res"), device="cpu",
                      progress=False, log=lambda m: None)
    z = numpy_prototypes(train, [[1], [2], [0]])
    pred = (test.embeddings(view=0).astype(np.float64) @ z.T).argmax(1)
    assert res["metrics"]["acc1"] == pytest.approx((pred == test_labels).mean())
    saved = json.loads((tmp_path / "res" / "test__teacher.json").read_text())
    assert saved["classifier"] == {"kind": "prototypes", "store": str(train.path), "teacher_id": test.teacher_id,
                                   "images_per_class": {"cat": 10, "dog": 10, "fish_tank": 10}}
    assert saved["templates"] is None and saved["classnames"] == ["cat", "dog", "fish_tank"]

    lacking = random_store(tmp_path / "lacking.zarr", unit(rng.normal(size=(4, 16))), np.arange(4) % 2,
                           ["cat", "dog"])
    with pytest.raises(SystemExit) as e:
        main(["eval", str(test.path), "--classes-from", str(lacking.path)])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1 and "1 of the 3 test classes (fish_tank)" in err
    other = random_store(tmp_path / "other.zarr", unit(centres[train_labels]), train_labels,
                         ["cat", "dog", "fish_tank"], teacher=dict(FAKE_TEACHER, model="another"))
    with pytest.raises(ZsdError, match=f"teacher {other.teacher_id}.*teacher {test.teacher_id}"):
        evaluate(str(test.path), classes_from=str(other.path), progress=False, log=lambda m: None)
    names = tmp_path / "names.json"
    names.write_text(json.dumps(["a cat", "a dog", "a fish tank"]))
    with pytest.raises(ZsdError, match="pass one of them"):
        evaluate(str(test.path), classes_from=str(train.path), classnames=str(names), progress=False,
                 log=lambda m: None)


def test_prototypes_need_no_checkpoint_file(image_folder, resnet_checkpoint, tmp_path, cache_env):
    from zsd.cli import main

    store = make_store(image_folder, tmp_path / "t.zarr", "timm:test_resnet", pretrained=str(resnet_checkpoint),
                       views=1)
    run = tmp_path / "run"
    make_student(run, store.path)
    # without --pretrained: the teacher, loaded from a checkpoint file, is never rebuilt
    main(["eval", str(store.path), "--classes-from", str(store.path), "--student", str(run), "--out-dir",
          str(tmp_path / "res"), "--device", "cpu"])
    res = json.loads((tmp_path / "res" / "t__run.json").read_text())
    z = prototype_classifier(store, store.classnames).astype(np.float64)
    emb = open_store(run / "embeddings" / "t.zarr").embeddings(view=0).astype(np.float64)
    pred, teacher_pred = (emb @ z.T).argmax(1), (store.embeddings(view=0).astype(np.float64) @ z.T).argmax(1)
    assert res["classifier"]["kind"] == "prototypes"
    assert res["metrics"]["acc1"] == pytest.approx((pred == store.labels()).mean())
    assert res["metrics"]["agreement_with_teacher"] == pytest.approx((pred == teacher_pred).mean())
