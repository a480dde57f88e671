"""zsd.classes: the class embeddings of every command, and the one set of checks they share.

A store cached at bf16 (a GPU's default) and one at fp32 (a CPU's) of the same teacher are one teacher
to every consumer of class prototypes (eval/coverage/robustness --classes-from, export --classes-from,
train --class-embeddings-from); another teacher is refused in one line by each."""

import json

import numpy as np
import pytest

from conftest import cli, random_store, unit
from student_helpers import make_student
from zsd.cache import cache_teacher
from zsd.classes import class_head, class_prototype_embeddings, class_prototypes, prototype_classifier, teacher_rows
from zsd.errors import ZsdError
from zsd.evaluate import evaluate
from zsd.loader import TrainTargets
from zsd.store import open_store
from zsd.teachers import create_teacher, same_teacher


def numpy_means(store, classnames, by_key=lambda c: c.lower().replace("_", " ")):
    """Per class of `classnames`: the normalised mean of the normalised written, finite view-0 rows."""
    emb = open_store(store.path).embeddings(view=0).astype(np.float64)
    names = [by_key(store.classnames[lab]) if lab >= 0 else None for lab in store.labels()]
    ok = store.written() & np.isfinite(emb).all(axis=1)
    return np.stack([unit(unit(emb[ok & np.array([n == by_key(c) for n in names])]).sum(0)) for c in classnames])


@pytest.fixture
def two_precisions(image_folder, tmp_path, tiny_teacher_name):
    """(fp32 store, bf16 store) of the tiny teacher, both of `image_folder`, 1 view."""
    out = []
    for precision in ("fp32", "bf16"):
        path = tmp_path / f"pets_{precision}.zarr"
        cache_teacher([str(image_folder)], str(path), teacher=tiny_teacher_name, views=1, precision=precision,
                      device="cpu", chunk_rows=4, workers=0, progress=False, log=lambda m: None)
        out.append(open_store(path))
    fp32, bf16 = out
    assert (fp32.teacher["precision"], bf16.teacher["precision"]) == ("fp32", "bf16")
    assert fp32.teacher_id != bf16.teacher_id
    assert same_teacher(fp32.teacher_id, fp32.teacher, bf16.teacher_id, bf16.teacher) == "precision"
    return fp32, bf16


def other_teacher(store, path):
    """A labelled store like `store` but of another teacher (other weights): refused as a class source."""
    return random_store(path, store.embeddings(view=0).astype(np.float64), store.labels(), store.classnames,
                        teacher={**store.teacher, "weights": "sha256:another"})


def test_prototypes_equal_numpy_class_means(tmp_path):
    rng = np.random.default_rng(3)
    names = ["Fish_tank", "bird", "cat", "dog"]
    labels = np.array([0, 1, 2, 3, 2, 3, 0, 2, 3, 0, 2, -1, 1])
    emb = rng.normal(size=(len(labels), 2, 16))
    emb[9, 0, 3] = np.nan  # a non-finite row is left out, not a NaN class
    store = random_store(tmp_path / "protos.zarr", emb, labels, names, failed=[4])
    classes = ["cat", "dog", "fish tank"]  # another order and spelling; "bird" is not asked for
    source, rows, z = class_prototypes("--classes-from", str(store.path), classes, store.teacher_id, store.teacher,
                                       "the test store holds")
    want = numpy_means(store, classes)
    np.testing.assert_allclose(z, want, atol=1e-6)
    np.testing.assert_allclose(prototype_classifier(store, classes), want, atol=1e-6)
    assert source.path == store.path and z.dtype == np.float32
    assert rows.tolist() == [2, -1, 0, 1, -1, 1, 2, 0, 1, 2, 0, -1, -1]  # failed, unlabelled and bird rows: -1
    # the store's own classes by default
    _, _, own = class_prototypes("--classes-from", str(store.path), None, store.teacher_id, store.teacher, "x")
    np.testing.assert_allclose(own, numpy_means(store, names), atol=1e-6)

    unlabelled = random_store(tmp_path / "unlabelled.zarr", emb)
    with pytest.raises(ZsdError, match="--classes-from .*unlabelled.zarr is unlabelled: prototypes need a labelled"):
        class_prototypes("--classes-from", str(unlabelled.path), None, store.teacher_id, store.teacher, "x")


def test_eval_takes_prototypes_of_a_store_at_another_precision(two_precisions, tmp_path, capsys):
    fp32, bf16 = two_precisions
    for test, source in ((fp32, bf16), (bf16, fp32)):
        (res,) = evaluate(str(test.path), classes_from=str(source.path), device="cpu", progress=False,
                          log=lambda m: None)
        assert res["classifier"]["teacher_id"] == source.teacher_id and res["teacher_id"] == test.teacher_id
        z = numpy_means(source, test.classnames)
        pred = (test.embeddings(view=0).astype(np.float64) @ z.T).argmax(1)
        assert res["metrics"]["acc1"] == pytest.approx((pred == test.labels()).mean())
    # the prototypes of the two precisions differ by rounding only
    assert (prototype_classifier(fp32, fp32.classnames) * prototype_classifier(bf16, fp32.classnames)).sum(1).min() \
        > 0.99

    other = other_teacher(fp32, tmp_path / "other.zarr")
    code, _, err = cli(["eval", fp32.path, "--classes-from", other.path, "--device", "cpu"], capsys)
    assert code == 1 and err.count("\n") == 1 and "prototypes need the same teacher" in err
    assert f"teacher {other.teacher_id}" in err and f"teacher {fp32.teacher_id}" in err


def test_export_takes_prototypes_of_a_store_at_another_precision(two_precisions, tmp_path, capsys):
    """The GPU smoke's export: a student of the bf16 train store, --classes-from the fp32 test store."""
    fp32, bf16 = two_precisions
    run = tmp_path / "run"
    _, config = make_student(run, bf16.path)
    names, weights, scale, info = class_head(config, classes_from=str(fp32.path))
    assert names == fp32.classnames and info["teacher_id"] == fp32.teacher_id and scale == 100.0
    np.testing.assert_allclose(weights.numpy(), numpy_means(fp32, fp32.classnames), atol=1e-6)

    model = tmp_path / "m.onnx"
    code, _, err = cli(["export", run, "--out", model, "--classes-from", fp32.path], capsys)
    assert code == 0, err
    meta = json.loads(model.with_suffix(".json").read_text())
    assert meta["teacher_id"] == bf16.teacher_id and meta["classifier"]["store"] == str(fp32.path)
    assert meta["classnames"] == fp32.classnames and meta["parity"]["top1_agreement"] == 1.0

    other = other_teacher(fp32, tmp_path / "other.zarr")
    code, _, err = cli(["export", run, "--out", tmp_path / "o.onnx", "--classes-from", other.path], capsys)
    assert code == 1 and err.count("\n") == 1 and "prototypes need the same teacher" in err
    assert not (tmp_path / "o.onnx").exists()


def test_trainer_takes_prototypes_of_a_store_at_another_precision(two_precisions, tmp_path, capsys):
    fp32, bf16 = two_precisions
    targets = TrainTargets([str(bf16.path)], log=lambda m: None)
    got = class_prototype_embeddings(targets, str(fp32.path)).numpy()
    np.testing.assert_allclose(got, numpy_means(fp32, targets.classnames), atol=1e-6)

    train = ["train", "--targets", bf16.path, "--student", "test_efficientnet", "--student-res", "32", "--steps", "1",
             "--batch-size", "4", "--device", "cpu", "--precision", "fp32", "--pixel-cache", "no", "--loss", "clip"]
    code, _, err = cli([*train, "--out", tmp_path / "ok", "--class-embeddings-from", fp32.path], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "ok" / "student.json").read_text())["train_config"]["class_embeddings_from"] \
        == str(fp32.path)

    other = other_teacher(fp32, tmp_path / "other.zarr")
    code, _, err = cli([*train, "--out", tmp_path / "no", "--class-embeddings-from", other.path], capsys)
    last = err.strip().splitlines()[-1]
    assert code == 1 and last.startswith("zsd: error: --class-embeddings-from") and "prototypes need the same" in last


def test_names_a_timm_head_lacks_name_the_prototype_option(resnet_checkpoint):
    teacher = create_teacher("timm:test_resnet", str(resnet_checkpoint), "cpu")
    rows = teacher_rows(teacher, ["beagle", "Egyptian cat"], ["{c}"], "--classes-from").numpy()
    head = teacher.model.get_classifier().weight.detach().double().numpy()
    np.testing.assert_allclose(rows, unit(head[[162, 285]]), atol=1e-6)
    for flag in ("--classes-from", "--class-embeddings-from"):
        with pytest.raises(ZsdError) as e:
            teacher_rows(teacher, ["beagle", "ragdoll"], ["{c}"], flag)
        assert "not classes of" in str(e.value) and f"{flag} STORE" in str(e.value)
        assert len(str(e.value).splitlines()) == 1
