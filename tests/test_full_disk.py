"""Every command that writes, on a full disk: one `zsd: error:` line naming the file, no temporary or
half-written file, and once there is room the same command finishes (issue #25). The writes all go
through `errors.atomic_file`; these tests check it and then the commands end to end."""

import errno
import json
import os
import re

import numpy as np
import pytest
import torch

from conftest import cli
from student_helpers import make_student
from test_prompts import _options
from test_write_errors import FullDisk, leftovers
from zsd.errors import atomic_file, disk_error, temp_path, write_atomic


def one_line(err: str) -> str:
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "|" not in line
             and not line.startswith("chose for ")]  # train's line of the defaults it chose comes first
    assert len(lines) == 1 and lines[0].startswith("zsd: error: ") and "Traceback" not in err, err
    return lines[0]


def test_atomic_file_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "a.json"
    target.write_text("old")
    with pytest.raises(ValueError):
        with atomic_file(target) as tmp:
            tmp.write_text("half")
            raise ValueError
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["a.json"]
    with atomic_file(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name != target.name and str(os.getpid()) in tmp.name
        tmp.write_text("new")
        assert target.read_text() == "old"  # not before the block ends
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["a.json"]

    folder = tmp_path / "f"  # a folder, replacing an empty one
    folder.mkdir()
    with pytest.raises(KeyboardInterrupt):
        with atomic_file(folder) as tmp:
            (tmp / "x").mkdir(parents=True)
            (tmp / "x" / "y").write_text("1")
            raise KeyboardInterrupt
    assert sorted(os.listdir(tmp_path)) == ["a.json", "f"] and not any(folder.iterdir())
    with atomic_file(folder) as tmp:
        tmp.mkdir()
        (tmp / "y").write_text("2")
    assert (folder / "y").read_text() == "2" and sorted(os.listdir(tmp_path)) == ["a.json", "f"]

    fresh = tmp_path / "g"
    stale = temp_path(fresh)  # left by a killed process whose pid this one has again (pid 1 in containers)
    (stale / "old").mkdir(parents=True)
    with atomic_file(fresh) as tmp:
        tmp.mkdir()
        (tmp / "z").write_text("3")
    assert os.listdir(fresh) == ["z"] and sorted(os.listdir(tmp_path)) == ["a.json", "f", "g"]

    long = tmp_path / ("n" * 250)  # a legal name that a temporary suffix would make too long
    write_atomic(long, b"x")
    assert long.read_bytes() == b"x" and len(os.listdir(tmp_path)) == 4


def test_a_failed_write_names_the_folder_and_leaves_nothing(tmp_path, monkeypatch):
    FullDisk(monkeypatch, tmp_path).fill()
    with pytest.raises(OSError) as e:
        with atomic_file(tmp_path / "r.json") as tmp, open(tmp, "w") as f:
            f.write("x")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path)  # the folder that is full
    assert os.listdir(tmp_path) == []


def test_disk_errors_are_found_behind_torch_save(tmp_path):
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    try:
        try:
            raise full
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc] PytorchStreamWriter failed writing file")
    except RuntimeError as wrapped:
        assert disk_error(wrapped) is full
    assert disk_error(OSError(errno.EROFS, "Read-only file system")) is not None
    assert disk_error(OSError(errno.ENOENT, "No such file")) is None  # a missing file is no full disk
    assert disk_error(RuntimeError("a bug")) is None


def test_prompts_on_a_full_disk(tmp_path, monkeypatch, capsys):
    opts = tmp_path / "options.json"
    opts.write_text(json.dumps({"classes": _options(["cat", "dog"], {"location": 4, "daytime": 4}).classes}))
    out = tmp_path / "out" / "p.jsonl"
    out.parent.mkdir()
    FullDisk(monkeypatch, out.parent).fill()
    code, _, err = cli(["prompts", "--options", opts, "--out", out], capsys)
    assert code == 1 and "No space left on device" in one_line(err) and str(out) in err
    assert os.listdir(out.parent) == []
    monkeypatch.undo()
    assert cli(["prompts", "--options", opts, "--out", out], capsys)[0] == 0
    assert len(out.read_text().splitlines()) == 32


def test_spurious_on_a_full_disk(image_folder, tmp_path, monkeypatch, capsys):
    parent = tmp_path / "outs"
    parent.mkdir()
    disk = FullDisk(monkeypatch, parent)
    import PIL.Image

    real_save, saved = PIL.Image.Image.save, []

    def save_then_fill(self, fp, *a, **k):  # the disk fills after the third image
        real_save(self, fp, *a, **k)
        saved.append(fp)
        if len(saved) == 3:
            disk.fill()

    monkeypatch.setattr(PIL.Image.Image, "save", save_then_fill)
    code, _, err = cli(["spurious", image_folder, "--out", parent / "o"], capsys)
    assert code == 1 and f"No space left on device ({parent})" in one_line(err) and len(saved) == 3
    assert os.listdir(parent) == []  # neither the folder nor its temporary one
    monkeypatch.undo()
    assert cli(["spurious", image_folder, "--out", parent / "o"], capsys)[0] == 0
    assert json.loads((parent / "o" / "spurious.json").read_text())["images"]


def test_robustness_report_on_a_full_disk(store, tmp_path, monkeypatch, capsys):
    pytest.importorskip("imagecorruptions")
    out = tmp_path / "outs" / "rob"
    out.mkdir(parents=True)
    args = ["robustness", store, "--out", out, "--size", "32", "--corruptions", "gaussian_noise",
            "--severities", "1", "--device", "cpu"]
    FullDisk(monkeypatch, out).fill()  # the render cache (in ZSD_CACHE) has room; the report has none
    code, _, err = cli(args, capsys)
    assert code == 1 and f"No space left on device ({out})" in one_line(err)
    assert os.listdir(out) == []
    monkeypatch.undo()
    assert cli(args, capsys)[0] == 0
    assert sorted(os.listdir(out)) == ["robustness.json", "robustness.md", "robustness.png"]
    assert (out / "robustness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_on_a_full_disk(store, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    make_student(run, store)
    FullDisk(monkeypatch, run).fill()  # the student's embeddings of the test store go to RUN/embeddings
    args = ["eval", store, "--student", run]
    code, out, err = cli(args, capsys)
    assert code == 1 and "No space left on device" in one_line(err) and "acc1" not in out, err
    assert leftovers(run) == []
    monkeypatch.undo()
    code, out, _ = cli(args, capsys)
    assert code == 0 and "acc1" in out and leftovers(run) == []


def test_train_class_prompt_embeddings_on_a_full_disk(store, tmp_path, monkeypatch, capsys):
    """The clip loss's class-prompt embeddings are torch.save'd into the run: torch wraps the full disk."""
    run = tmp_path / "run"
    args = ["train", "--targets", store, "--student", "test_resnet", "--student-res", "32", "--batch-size", "4",
            "--workers", "0", "--device", "cpu", "--precision", "fp32", "--pixel-cache", "no", "--steps", "2",
            "--loss", "l2", "--loss", "clip=0.5", "--out", run]
    run.mkdir()
    FullDisk(monkeypatch, run).fill()
    code, _, err = cli(args, capsys)
    notes, error = err.splitlines()[0], one_line("\n".join(err.splitlines()[1:]))
    assert code == 1 and notes.startswith("computing 3 class-prompt embeddings")
    assert f"No space left on device ({run})" in error
    assert leftovers(run) == []
    monkeypatch.undo()
    assert cli(args, capsys)[0] == 0
    assert torch.load(run / "text_embeddings.pt", weights_only=True)["embeddings"].shape[0] == 3
    assert np.isfinite(json.loads((run / "log.jsonl").read_text().splitlines()[-1]).get("loss", 0.0))


def test_a_fresh_train_on_a_full_disk_names_the_folder_and_leaves_no_run(store, tmp_path, monkeypatch, capsys):
    """The first log line meets the full disk: no run folder with an empty log stays, and the same command
    (there is no checkpoint to resume) runs once there is room."""
    parent = tmp_path / "disk"
    parent.mkdir()
    run = parent / "run"
    args = ["train", "--targets", store, "--student", "test_resnet", "--student-res", "32", "--batch-size", "4",
            "--workers", "0", "--device", "cpu", "--precision", "fp32", "--pixel-cache", "no", "--steps", "2",
            "--out", run]
    FullDisk(monkeypatch, parent).fill()
    code, _, err = cli(args, capsys)
    # the log is written every few steps and at the end (one host sync per flush): the step is the first flush
    assert code == 1 and re.fullmatch(re.escape(f"zsd: error: cannot write {run} at step ") + r"[12]" + re.escape(
        f" (No space left on device); no checkpoint is kept in {run}: make room and rerun the same command"),
        one_line(err))
    assert os.listdir(parent) == []
    monkeypatch.undo()
    assert cli(args, capsys)[0] == 0
    assert len([json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]) == 2
