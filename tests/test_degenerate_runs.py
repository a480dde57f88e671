"""Runs that cannot learn what they claim are refused before step 1, never reported as a success (#32)."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import cli, make_image
from test_train import FAST, make_store
from zsd.errors import ZsdError
from zsd.loader import TrainTargets
from zsd.store import open_store
from zsd.train import TrainConfig, train


def test_one_store_passed_twice_is_refused_under_any_spelling(store, tmp_path, monkeypatch):
    """The same store twice would silently double every epoch while the summary says one."""
    monkeypatch.chdir(tmp_path)
    relative = os.path.relpath(store, tmp_path)
    for specs in ([str(store), str(store)], [str(store), relative], [f"{store}=1", f"./{relative}/=2"]):
        with pytest.raises(ZsdError, match="are the same store") as e:
            TrainTargets(specs, log=lambda m: None)
        assert "pass it once" in str(e.value) and "\n" not in str(e.value)
    assert TrainTargets([str(store)], log=lambda m: None).rows_per_epoch > 0


def _fit(targets, run_dir, **fields):
    config = TrainConfig(list(targets), run_dir=str(run_dir), **{**FAST, **fields})
    return train(config, progress=False, log=lambda m: None)


@pytest.mark.parametrize("losses", [["clip"], ["mp"], ["l2", "clip=0.5"]])
def test_class_losses_on_one_class_are_refused_before_step_1(tmp_path, tiny_teacher_name, losses):
    """One class: clip's cross-entropy over one class is 0 at every step, and the run said "finished"."""
    for i in range(4):
        make_image(tmp_path / "one" / "cat" / f"{i}.png", seed=i)
    store = make_store(tmp_path / "one", tmp_path / "one.zarr", tiny_teacher_name, views=1)
    with pytest.raises(ZsdError) as e:
        _fit([store], tmp_path / "run", steps=2, losses=losses)
    assert str(e.value) == (f"--loss {[n for n in losses if n.split('=')[0] in ('clip', 'mp')][0].split('=')[0]} "
                            "needs >= 2 classes among the written rows of the targets' labels; 1 found (cat): use "
                            "--loss l2 (or cosine, mse, contrastive-image), or add --targets of other classes")
    assert not (tmp_path / "run").exists()  # refused before anything was written
    assert _fit([store], tmp_path / "run", steps=2)["finished"]  # l2 learns from the same store


def test_class_losses_count_only_classes_with_written_rows(tmp_path, tiny_teacher_name):
    """Two class folders, but every image of one is unreadable: one class is left to learn from."""
    for i in range(4):
        make_image(tmp_path / "two" / "cat" / f"{i}.png", seed=i)
        (tmp_path / "two" / "dog").mkdir(parents=True, exist_ok=True)
        (tmp_path / "two" / "dog" / f"{i}.png").write_bytes(b"not a png")
    store = make_store(tmp_path / "two", tmp_path / "two.zarr", tiny_teacher_name, views=1)
    assert open_store(store).classnames == ["cat", "dog"]
    with pytest.raises(ZsdError, match=r"^--loss mp needs >= 2 classes .*; 1 found \(cat\)"):
        _fit([store], tmp_path / "run", steps=1, losses=["mp"])
    # a second store brings the other class's rows: the run learns
    for i in range(4):
        make_image(tmp_path / "dogs" / "dog" / f"{i}.png", seed=10 + i)
    dogs = make_store(tmp_path / "dogs", tmp_path / "dogs.zarr", tiny_teacher_name, views=1)
    summary = _fit([store, dogs], tmp_path / "run", steps=2, losses=["clip"])
    assert summary["finished"] and summary["final_loss"] > 0


def test_micro_batches_of_one_and_targets_below_one_batch_are_refused(store, tmp_path):
    """contrastive-image over one image is log(1) = 0; fewer rows than a batch give no step at all."""
    with pytest.raises(ZsdError, match=r"micro-batches of 1 image; a step needs at least 2: raise --batch-size"):
        _fit([store], tmp_path / "a", steps=1, batch_size=2, accum_steps=2, losses=["contrastive-image"])
    with pytest.raises(ZsdError) as e:
        _fit([store], tmp_path / "b", steps=1, batch_size=16)  # the store has 12 written rows
    assert str(e.value) == ("the targets have 12 written rows, fewer than one batch (--batch-size 16): pass "
                            "--batch-size 12 or less, or cache more images")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_fraction_of_an_epoch_trains_one_step_and_says_so(store, tmp_path):
    """--epochs so small that it rounds to 0 steps runs 1 step, and the summary reports that epoch fraction."""
    log = []
    config = TrainConfig([store], run_dir=str(tmp_path / "r"), epochs=0.01, **FAST)
    summary = train(config, progress=False, log=log.append)
    assert summary["steps"] == summary["total_steps"] == 1 and summary["epochs"] == pytest.approx(1 / 3)
    assert any("--epochs 0.01 is less than one step" in m for m in log)


@pytest.fixture
def stopped_run(store, tmp_path):
    """A run stopped after 2 of 4 steps, and the arguments that continue it."""
    args = ["train", "--targets", store, "--student", "test_resnet", "--student-res", "32", "--batch-size", "4",
            "--workers", "0", "--device", "cpu", "--precision", "fp32", "--pixel-cache", "no", "--steps", "4",
            "--out", tmp_path / "run"]
    from zsd.cli import main
    main([str(a) for a in args + ["--stop-after", "2"]])
    return tmp_path / "run", args


def _garble_state(path, how):
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    elif how == "garbage":
        path.write_bytes(np.random.default_rng(0).bytes(5000))
    else:
        state = torch.load(path, weights_only=False)
        if how == "not a dict":
            state = [1, 2]
        elif how == "negative size":
            state["student"]["preprocess"]["size"] = -3
        elif how == "other weights":
            state["model"] = {"x": torch.zeros(1)}
        elif how == "step out of range":
            state["step"] = 99
        torch.save(state, path)


@pytest.mark.parametrize("how,why", [("truncated", "RuntimeError: PytorchStreamReader failed reading zip archive"),
                                     ("garbage", "UnpicklingError"), ("not a dict", "not a training state"),
                                     ("negative size", "its preprocess size is -3, not a whole number in 1..8192"),
                                     ("other weights", "RuntimeError: Error(s) in loading state_dict"),
                                     ("step out of range", "its step 99 is outside 0..4")])
def test_a_damaged_training_state_is_one_line_on_resume(stopped_run, capsys, how, why):
    run, args = stopped_run
    _garble_state(run / "train_state.pt", how)
    files = lambda: sorted((p.name, p.read_bytes()) for p in run.iterdir() if p.name != "zsd.lock")  # noqa: E731
    before = files()
    code, _, err = cli(args + ["--resume"], capsys)
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"zsd: error: --resume: {run / 'train_state.pt'} is damaged ({why}") and err.endswith(
        "so the run cannot continue where it stopped: start a new run with another --out, or start one from this "
        f"run's student weights with --init {run} (a fresh optimizer)\n")
    assert files() == before  # nothing written
    # the way out it names works: a new run from the kept student weights
    new = [str(a) for a in args[:-1]] + [str(run.parent / "new"), "--init", str(run)]
    assert cli([a for a in new if a not in ("--student", "test_resnet")], capsys)[0] == 0


@pytest.mark.parametrize("field,value,problem", [
    ("size", -5, "its preprocess size is -5, not a whole number in 1..8192"),
    ("size", 10 ** 9, "its preprocess size is 1000000000, not a whole number in 1..8192"),
    ("size", 32.5, "its preprocess size is 32.5, not a whole number in 1..8192"),
    ("std", [0.5, 0, 0.5], "its preprocess std is [0.5, 0, 0.5], not 3 numbers above 0")])
def test_impossible_sizes_in_student_json_are_one_line_everywhere(stopped_run, store, tmp_path, capsys, field,
                                                                  value, problem):
    run, args = stopped_run
    config = json.loads((run / "student.json").read_text())
    config["preprocess"][field] = value
    (run / "student.json").write_text(json.dumps(config))
    want = (f"zsd: error: {run / 'student.json'} is damaged: {problem}; rerun its `zsd train ... --resume`, which "
            "writes it again from train_state.pt\n")
    for command in (["eval", "--student", run, store], ["export", run, "--out", tmp_path / "s.onnx"]):
        code, _, err = cli(command, capsys)
        assert (code, err) == (1, want), command
    assert not (tmp_path / "s.onnx").exists()
    assert cli(args + ["--resume"], capsys)[0] == 0  # the repair it names
    assert json.loads((run / "student.json").read_text())["preprocess"]["size"] == 32
    assert cli(["eval", "--student", run, store], capsys)[0] == 0


def test_a_run_folder_is_no_store_or_test_set_and_a_moved_image_folder_is_named(stopped_run, store, image_folder,
                                                                                tmp_path, capsys, monkeypatch):
    run, _ = stopped_run
    store_line = (f"zsd: error: {run} is a `zsd train` run folder, not a store of embeddings: pass a store "
                  "(`zsd cache-teacher` makes one), or the run as --student\n")
    for command in (["info", run], ["verify", run], ["train", "--targets", run, "--student", "test_resnet",
                                                     "--out", tmp_path / "new"]):
        assert cli(command, capsys)[1:] == ("", store_line), command
    code, _, err = cli(["eval", "--student", run, run], capsys)
    assert (code, err) == (1, f"zsd: error: TEST {run} is a student (a run or an exported folder), not a test set: "
                              f"pass a labelled image folder or a store, and the student as --student {run}\n")
    monkeypatch.chdir(tmp_path)  # a bare name is a store in the cache dir, not the folder here
    code, _, err = cli(["info", "run"], capsys)
    assert code == 1 and err.endswith("(a bare name is a store in the cache dir); ./run here is a `zsd train` run "
                                      "folder, not a store\n")
    assert not (tmp_path / "new").exists()
    image_folder.rename(tmp_path / "moved")
    code, out, err = cli(["verify", store], capsys)
    assert code == 1 and (f"the images were cached from {image_folder}, which is no longer there (moved or "
                          "deleted)") in err


def test_a_store_path_without_suffix_is_where_it_was_asked(image_folder, tmp_path, tiny_teacher_name, monkeypatch):
    """`--out ./mystore` is a path: it was resolved twice, the second time as the bare name `mystore`, and the
    store went into the cache dir."""
    monkeypatch.chdir(tmp_path)
    make_store(image_folder, "./mystore", tiny_teacher_name, views=1)
    assert open_store("./mystore").rows == 12 and (tmp_path / "mystore" / "stat").is_dir()
    assert not list(Path(os.environ["ZSD_CACHE"]).glob("*.zarr"))
