"""Run folders, exports, the pixel cache and evaluation caches are as safe as the stores: a second
trainer, a full disk, a signal, an output over an input, a run that learns nothing (issue #25)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import cli
from student_helpers import make_student
from test_write_errors import TRAIN, _can_mount_tmpfs, error_lines, leftovers
from zsd.classes import TEXT
from zsd.errors import RUN_FILES, ZsdError
from zsd.evaluate import student_embeddings
from zsd.store import LOCK, WRITTEN, open_store
from zsd.student import CONFIG, EMA_PREFIX, WEIGHTS
from zsd.train import LOG, STATE, TrainConfig, train

REPO = Path(__file__).resolve().parents[1]


def env():
    """This test's environment (its private ZSD_CACHE) for a child process running this checkout."""
    return {**os.environ, "PYTHONPATH": str(REPO)}

needs_tmpfs = pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs a user namespace to mount a small tmpfs")


def train_args(store, out, *more):
    return [str(a) for a in ["train", "--targets", store, "--student", "test_resnet", "--student-res", "32",
                             "--batch-size", "4", "--workers", "0", "--device", "cpu", "--precision", "fp32",
                             "--pixel-cache", "no", "--out", out, *more]]


def one_error(err):
    """The one `zsd: error:` line, last, after at most the command's own notes (train's "resuming ...")."""
    lines = [line for line in error_lines(err) if "%|" not in line]  # without progress bars
    assert [line for line in lines if line.startswith("zsd:")] == lines[-1:] and "Traceback" not in err, err
    notes = [line for line in lines[:-1] if not line.startswith("chose for ")]  # train's line of chosen defaults
    assert lines[-1].startswith("zsd: error: ") and len(notes) <= 1, err
    return lines[-1]


def test_run_files_are_the_ones_zsd_writes():
    assert {WEIGHTS, CONFIG, EMA_PREFIX + WEIGHTS, EMA_PREFIX + CONFIG, STATE, LOG, TEXT, LOCK} == RUN_FILES


# ---------------------------------------------------------------- 1. one trainer per run folder

def test_a_second_trainer_is_refused_naming_the_first_and_sigterm_cleans_up(store, tmp_path, capsys):
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "zsd", *train_args(store, run, "--steps", "100000",
                                                                       "--save-every", "100000")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env(), cwd=tmp_path)
    try:
        deadline = time.time() + 120
        while not (run / LOG).is_file() or not (run / LOG).read_text():  # training, with the lock held
            assert first.poll() is None and time.time() < deadline, first.stderr.read() if first.poll() else "slow"
            time.sleep(0.2)
        assert f"pid {first.pid} " in (run / LOCK).read_text()
        for more in ([], ["--resume"]):
            code, _, err = cli(train_args(store, run, "--steps", "4", *more), capsys)
            assert code == 1 and f"is in use by `zsd train` (pid {first.pid} on" in one_error(err)
        first.send_signal(signal.SIGTERM)  # a job's time limit: the cleanups run
        assert first.wait(60) == 128 + signal.SIGTERM
        assert error_lines(first.stderr.read())[-1] == "zsd: terminated"
    finally:
        if first.poll() is None:
            first.kill()
    assert leftovers(run) == [] and not (run / STATE).exists()
    code, _, err = cli(train_args(store, run, "--steps", "2"), capsys)  # the lock went with its holder
    assert code == 0, err
    assert [r["step"] for r in map(json.loads, (run / LOG).read_text().splitlines()) if "loss" in r] == [1, 2]


def test_a_failed_first_run_leaves_no_folder(store, tmp_path, capsys):
    run = tmp_path / "new" / "run"
    code, _, err = cli(train_args(store, run, "--steps", "2", "--init", tmp_path / "missing"), capsys)
    assert code == 1 and "holds no trained student" in one_error(err)
    assert not run.exists()


# ---------------------------------------------------------------- 2. a full disk while writing the log

@needs_tmpfs
def test_a_log_line_cut_by_a_full_disk_is_dropped_on_resume(store, tmp_path):
    """A 24 MiB tmpfs holds the run; after its checkpoint at step 2 a file fills it, so a log line is cut
    where its page ends. One line, no temporary file; --resume (with room) finishes the same run."""
    mnt, kept = tmp_path / "mnt", tmp_path / "kept"
    mnt.mkdir()
    zsd = f"{sys.executable} -m zsd"
    first = " ".join(train_args(store, mnt / "run", "--steps", "30", "--stop-after", "2"))
    resume = " ".join(train_args(store, mnt / "run", "--steps", "30", "--save-every", "1000", "--resume"))
    script = (f"mount -t tmpfs -o size=24m tmpfs {mnt} || exit 99\n{zsd} {first} 2>/dev/null || exit 98\n"
              f"head -c 64m /dev/zero > {mnt}/filler 2>/dev/null\n"
              f"{zsd} {resume} >/dev/null 2>{tmp_path}/err; echo $? >{tmp_path}/rc\ncp -a {mnt}/run {kept}\n")
    subprocess.run(["unshare", "-rm", "sh", "-c", script], check=True, env=env())
    line = one_error((tmp_path / "err").read_text())
    assert (tmp_path / "rc").read_text().strip() == "1"
    assert "No space left on device" in line and "the last checkpoint (step 2) is kept" in line, line
    assert leftovers(kept) == [] and LOCK in os.listdir(kept)
    text = (kept / LOG).read_text()
    assert not text.endswith("\n")  # the cut line
    config = TrainConfig([store], run_dir=str(kept), steps=30, save_every=1000, **dict(TRAIN, lr=5e-4))  # the CLI's lr
    summary = train(config, resume=True, progress=False, log=lambda m: None)
    assert summary["finished"] and summary["images"] == 28 * 4
    steps = [r["step"] for r in map(json.loads, (kept / LOG).read_text().splitlines()) if "loss" in r]
    assert steps == list(range(1, 31))


# ---------------------------------------------------------------- 3. the pixel cache on a full disk

@needs_tmpfs
def test_the_pixel_cache_on_a_full_disk_falls_back_or_says_so(store, tmp_path):
    """ZSD_CACHE on a 16 KiB tmpfs: the student inputs (12 x 3 x 32 x 32 bytes) do not fit."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    zsd = f"ZSD_CACHE={mnt} {sys.executable} -m zsd"
    script = f"mount -t tmpfs -o size=16k tmpfs {mnt} || exit 99\n"
    for mode in ("auto", "yes"):
        args = train_args(store, tmp_path / mode, "--steps", "2")
        args[args.index("--pixel-cache") + 1] = mode
        script += f"{zsd} {' '.join(args)} >/dev/null 2>{tmp_path}/{mode}.err; echo $? >{tmp_path}/{mode}.rc\n"
    script += f"ls -a {mnt} {mnt}/pixels > {tmp_path}/left 2>&1; true\n"
    subprocess.run(["unshare", "-rm", "sh", "-c", script], check=True, env=env())
    assert (tmp_path / "auto.rc").read_text().strip() == "0"
    auto = error_lines((tmp_path / "auto.err").read_text())
    assert any(line.startswith("note: no pixel cache: the student inputs need") and "decoding" in line
               for line in auto), auto
    assert (tmp_path / "yes.rc").read_text().strip() == "1"
    line = one_error((tmp_path / "yes.err").read_text())
    assert "--pixel-cache yes: the student inputs need 40 KiB in" in line and "KiB are free" in line
    assert ".tmp" not in (tmp_path / "left").read_text()
    log = [json.loads(x) for x in (tmp_path / "auto" / LOG).read_text().splitlines()]
    assert sum(r.get("images", 0) for r in log) == 8  # trained, on decoded images


def test_a_cache_dir_that_is_a_file(store, tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("ZSD_CACHE", str(tmp_path / "file"))
    config = dict(TRAIN, pixel_cache="auto")
    notes = []
    train(TrainConfig([store], run_dir=str(tmp_path / "a"), steps=2, **config), progress=False, log=notes.append)
    assert any("no pixel cache: the cache dir" in n and "not a writable folder" in n for n in notes), notes
    with pytest.raises(ZsdError, match="--pixel-cache yes: the cache dir .* is not a writable folder"):
        train(TrainConfig([store], run_dir=str(tmp_path / "b"), steps=2, **dict(config, pixel_cache="yes")),
              progress=False, log=lambda m: None)


def test_sigterm_while_rendering_the_pixel_cache_leaves_no_temporary_file(store, tmp_path):
    cache = Path(os.environ["ZSD_CACHE"])
    args = train_args(store, tmp_path / "run", "--steps", "2")
    args[args.index("--pixel-cache") + 1] = "yes"
    script = ("import time, zsd.loader\nfrom zsd.cli import main\nrender = zsd.loader._Render.__getitem__\n"
              "zsd.loader._Render.__getitem__ = lambda self, i: (time.sleep(0.5), render(self, i))[1]\n"
              f"main({args!r})\n")
    child = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True, env=env())
    deadline = time.time() + 120
    while not list(cache.glob("pixels/.*.tmp")):
        assert child.poll() is None and time.time() < deadline, child.stderr.read()
        time.sleep(0.1)
    child.send_signal(signal.SIGTERM)
    assert child.wait(60) == 128 + signal.SIGTERM
    assert error_lines(child.stderr.read())[-1] == "zsd: terminated"
    assert list(cache.glob("pixels/*")) == [] and list(cache.glob("pixels/.*")) == []


# ---------------------------------------------------------------- 4. no output over an input or a run's file

def test_export_never_writes_over_its_inputs_or_a_runs_files(store, tmp_path, capsys):
    run = tmp_path / "run"
    make_student(run, store)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    names = tmp_path / "names.json"
    names.write_text(json.dumps(["a", "b"]))
    for out, more, what in ((run / "student.onnx", [], f"would overwrite student.json of the run in {run}"),
                            (tmp_path / "names.onnx", ["--classes", names], f"would overwrite {names}, an input"),
                            (tmp_path / "x.onnx", ["--json", run / "student.json"], "--json")):
        code, out_, err = cli(["export", run, "--out", out, *more, "--no-check"], capsys)
        assert code == 1 and what in one_error(err), err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before and json.loads(names.read_text()) == ["a", "b"]
    assert not list(tmp_path.glob("*.onnx"))
    # a name the file system takes, whose temporary name (+ suffix) it would not
    long = tmp_path / ("m" * 240 + ".onnx")
    code, _, err = cli(["export", run, "--out", long, "--no-check"], capsys)
    assert code == 0, err
    assert long.is_file() and long.with_suffix(".json").is_file() and leftovers(tmp_path) == []


def test_prompts_never_write_over_their_options(tmp_path, capsys):
    options = tmp_path / "options.json"
    options.write_text("{}")
    code, _, err = cli(["prompts", "--options", options, "--out", options], capsys)
    assert code == 1 and "an input of this command" in one_error(err) and options.read_text() == "{}"


# ---------------------------------------------------------------- 5. a run that learns nothing

def test_micro_batches_of_one_are_refused_and_a_run_without_images_fails(store, image_folder, tmp_path, capsys):
    for more in (["--batch-size", "1"], ["--batch-size", "4", "--accum", "4"]):
        args = train_args(store, tmp_path / "r1", "--steps", "2")
        args[args.index("--batch-size"):args.index("--batch-size") + 2] = more
        code, _, err = cli(args, capsys)
        assert code == 1 and "micro-batches of 1 image" in one_error(err)
    assert not (tmp_path / "r1").exists()
    shutil.rmtree(image_folder)  # every sample's image is gone: each step skips its micro-batch
    code, _, err = cli(train_args(store, tmp_path / "r2", "--steps", "3"), capsys)
    assert code == 1 and "3 steps saw no image (12 samples skipped" in one_error(err)
    assert not (tmp_path / "r2" / STATE).exists() and not (tmp_path / "r2" / CONFIG).exists()


# ---------------------------------------------------------------- 6. evaluation caches name the weights they hold

def test_eval_caches_embeddings_under_the_weights_it_loaded(store, tmp_path, monkeypatch, capsys):
    import zsd.evaluate

    run = tmp_path / "run"
    make_student(run, store, seed=0)
    real_load = zsd.evaluate.load_student

    def load_then_new_checkpoint(spec, device="cpu"):  # the trainer renames a new checkpoint into place
        loaded = real_load(spec, device)
        make_student(run, store, steps=5, seed=1)
        return loaded

    monkeypatch.setattr(zsd.evaluate, "load_student", load_then_new_checkpoint)
    assert cli(["eval", store, "--student", run, "--classes-from", store, "--device", "cpu"], capsys)[0] == 0
    monkeypatch.undo()
    code, out, err = cli(["eval", store, "--student", run, "--classes-from", store, "--device", "cpu"], capsys)
    assert code == 0, err
    # the cache now holds the new weights' embeddings, as a fresh computation in another folder does
    fresh = tmp_path / "fresh"
    shutil.copytree(run, fresh, ignore=shutil.ignore_patterns("embeddings"))
    want = student_embeddings(fresh, open_store(store), progress=False).embeddings()
    got = open_store(run / "embeddings" / "s.zarr").embeddings()
    np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------- weak spots

@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs a user namespace for a read-only bind mount")
def test_eval_and_coverage_of_a_read_only_run(store, tmp_path):
    run = tmp_path / "run"
    make_student(run, store)
    zsd = f"{sys.executable} -m zsd"
    script = (f"mount --bind {run} {run} && mount -o remount,bind,ro {run} || exit 99\n"
              f"{zsd} eval {store} --student {run} --classes-from {store} --device cpu >{tmp_path}/eval 2>&1; "
              f"echo $? >{tmp_path}/eval.rc\n"
              f"{zsd} coverage --train {store} --test {store} --student {run} >{tmp_path}/cov 2>&1; "
              f"echo $? >{tmp_path}/cov.rc\n")
    subprocess.run(["unshare", "-rm", "sh", "-c", script], check=True, env=env())
    for name in ("eval", "cov"):
        assert (tmp_path / f"{name}.rc").read_text().strip() == "0", (tmp_path / name).read_text()
    assert not (run / "embeddings").exists()
    cached = list(Path(os.environ["ZSD_CACHE"]).glob("student_embeddings/run-*/s.zarr"))
    assert len(cached) == 1 and open_store(cached[0]).complete()


def test_damaged_run_files_are_one_line(store, tmp_path, capsys):
    run = tmp_path / "run"
    make_student(run, store)
    good = (run / CONFIG).read_text()
    (run / CONFIG).write_text(good[:50])
    for args in (["eval", store, "--student", run, "--classes-from", store],
                 ["export", run, "--out", tmp_path / "m.onnx"], train_args(store, tmp_path / "r", "--steps", "1", "--init", run)):
        code, _, err = cli(args, capsys)
        assert code == 1 and f"{run / CONFIG} is damaged" in one_error(err), (args, err)
    (run / CONFIG).write_text(good)
    (run / WEIGHTS).write_bytes((run / WEIGHTS).read_bytes()[:1000])
    code, _, err = cli(["export", run, "--out", tmp_path / "m.onnx"], capsys)
    assert code == 1 and f"{run / WEIGHTS} is damaged" in one_error(err)


def test_predict_with_damaged_metadata_is_one_line(store, tmp_path, image_folder, capsys):
    import onnx

    run = tmp_path / "run"
    make_student(run, store)
    model = tmp_path / "m.onnx"
    assert cli(["export", run, "--out", model, "--classes-from", store, "--no-check"], capsys)[0] == 0
    image = sorted(image_folder.glob("*/*"))[0]
    proto = onnx.load(str(model))
    meta = json.loads(proto.metadata_props[0].value)
    for value, what in ((json.dumps({**meta, "preprocess": {**meta["preprocess"], "std": [0.5, 0.0, 0.5]}}), "std > 0"),
                        ("{not json", "JSONDecodeError"), (json.dumps({"classnames": []}), "KeyError")):
        proto.metadata_props[0].value = value
        onnx.save(proto, str(tmp_path / "bad.onnx"))
        code, out, err = cli(["predict", tmp_path / "bad.onnx", image], capsys)
        assert code == 1 and out == "" and "'zsd' metadata is damaged" in one_error(err) and what in err, err


def test_a_full_disk_at_the_final_checkpoint_names_the_kept_one(store, tmp_path, monkeypatch):
    from test_write_errors import FullDisk
    from zsd import train as train_mod

    run = tmp_path / "run"
    config = TrainConfig([store], run_dir=str(run), steps=4, save_every=1000, **TRAIN)
    train(config, stop_after=2, progress=False, log=lambda m: None)  # the checkpoint of step 2
    disk, real_save = FullDisk(monkeypatch, run), train_mod.save_checkpoint

    def fill_then_save(*a, **k):  # the resumed run's final checkpoint meets a full disk
        disk.fill()
        real_save(*a, **k)

    monkeypatch.setattr(train_mod, "save_checkpoint", fill_then_save)
    with pytest.raises(ZsdError, match=r"No space left on device\); the last checkpoint \(step 2\) is kept"):
        train(config, resume=True, progress=False, log=lambda m: None)
    assert leftovers(run) == [] and torch.load(run / STATE, weights_only=False)["step"] == 2


def test_cache_teacher_into_a_folder_that_is_no_store_leaves_no_lock(image_folder, tmp_path, tiny_teacher_name,
                                                                      capsys):
    folder = tmp_path / "notastore"
    folder.mkdir()
    (folder / "mine.txt").write_text("x")
    code, _, err = cli(["cache-teacher", image_folder, "--out", folder, "--teacher", tiny_teacher_name, "--device",
                        "cpu", "--workers", "0"], capsys)
    assert code == 1 and "is not a zsd store" in one_error(err)
    assert os.listdir(folder) == ["mine.txt"]


def test_info_on_a_damaged_store_says_so(store, capsys):
    (Path(store) / "emb/c/1/0/0").unlink()
    code, out, err = cli(["info", store], capsys)
    assert code == 1 and "-> DAMAGED" in out and "complete" not in out
    assert "is damaged: 1 damaged chunk file(s) (first: emb rows 4..7" in one_error(err)
    assert "rerun `zsd cache-teacher`" in err


def test_eval_does_not_reuse_student_embeddings_of_a_store_since_rebuilt(image_folder, tmp_path, tiny_teacher_name):
    """Rebuilt at the same path with the same rows, a store whose failed row now has its image (issue #32)."""
    from zsd.cache import cache_teacher

    photo = image_folder / "cat" / "cat_0.png"
    good = photo.read_bytes()
    photo.write_bytes(b"not an image")
    path = tmp_path / "t.zarr"

    def build():
        cache_teacher([str(image_folder)], str(path), teacher=tiny_teacher_name, chunk_rows=4, workers=0,
                      progress=False, log=lambda m: None)
        return open_store(path)

    run = tmp_path / "run"
    build()
    make_student(run, str(path))
    assert (student_embeddings(run, open_store(path), progress=False).status() == WRITTEN).sum() == 11
    shutil.rmtree(path)
    photo.write_bytes(good)
    rebuilt = build()
    assert rebuilt.written().all()
    assert student_embeddings(run, rebuilt, progress=False).written().all()  # all 12, not the stale 11
