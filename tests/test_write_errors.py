"""Writes that fail (full disk, read-only or impossible folders) end in one line and leave nothing half-written."""

import builtins
import functools
import errno
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from zsd import cache, train as train_mod
from zsd.cli import main as cli_main
from zsd.errors import ZsdError
from zsd.store import PENDING, WRITTEN, Store, open_store
from zsd.train import LOG, STATE, TrainConfig, train

TRAIN = dict(student="test_resnet", student_res=32, batch_size=4, lr=1e-3, workers=0, device="cpu", precision="fp32",
             pixel_cache="no")


class FullDisk:
    """Files opened for writing under `root` take bytes until `fill()`; then a write stores what
    fits (nothing) and raises ENOSPC, as a full file system does."""

    def __init__(self, monkeypatch, root):
        self.root, self.full, real_open = str(root), False, io.open

        def open_(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            if isinstance(file, (str, os.PathLike)) and os.fspath(file).startswith(self.root) and \
                    any(c in mode for c in "wax+"):
                return _Filling(f, self)
            return f

        monkeypatch.setattr(io, "open", open_)
        monkeypatch.setattr(builtins, "open", open_)

    def fill(self):
        self.full = True


class _Filling:
    def __init__(self, f, disk):
        self._f, self._disk = f, disk

    def write(self, data):
        if self._disk.full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def leftovers(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if ".tmp" in p.name or ".partial" in p.name)


def cache_args(image_folder, out, teacher):
    return ["cache-teacher", str(image_folder), "--out", str(out), "--teacher", teacher, "--views", "2", "--chunk-rows", "4",
            "--batch-size", "6", "--workers", "0", "--device", "cpu"]


def error_lines(text):
    """stderr without the progress bar's lines."""
    return [line for line in text.replace("\r", "\n").splitlines() if line.strip() and "img/s]" not in line]


def one_error_line(capsys):
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("zsd: error: "), err
    return err[0]


def test_disk_full_during_cache_teacher(image_folder, tmp_path, tiny_teacher_name, monkeypatch, capsys):
    ref = tmp_path / "ref.zarr"
    cli_main(cache_args(image_folder, ref, tiny_teacher_name))
    out = tmp_path / "s.zarr"
    disk = FullDisk(monkeypatch, out)
    real_write = Store.write_chunk

    def write_then_fill(self, *a):  # the disk fills up after the first chunk
        real_write(self, *a)
        disk.fill()

    monkeypatch.setattr(Store, "write_chunk", write_then_fill)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli_main(cache_args(image_folder, out, tiny_teacher_name))
    assert e.value.code == 1
    line = one_error_line(capsys)
    assert "No space left on device" in line and "rows 4..7" in line and "rerun the same command" in line
    assert leftovers(out) == []
    store = open_store(out)
    assert list(store.status()) == [WRITTEN] * 4 + [PENDING] * 8
    np.testing.assert_array_equal(store.embeddings()[:4], open_store(ref).embeddings()[:4])
    monkeypatch.undo()  # space again: the same command finishes the identical store
    cli_main(cache_args(image_folder, out, tiny_teacher_name))
    a, b = open_store(out), open_store(ref)
    assert a.complete() and np.array_equal(a.embeddings(), b.embeddings()) and np.array_equal(a.status(), b.status())


def test_bad_out_device_and_json_fail_before_the_pass(image_folder, tmp_path, tiny_teacher_name, monkeypatch, capsys):
    def no_teacher(*a, **k):
        raise AssertionError("the teacher was loaded before the arguments were checked")

    monkeypatch.setattr(cache, "create_teacher", no_teacher)
    (tmp_path / "file").write_text("")
    cases = [(["--out", str(tmp_path / "file" / "s.zarr")], "--out: cannot write in"),
             (["--out", str(tmp_path / "s.zarr"), "--json", str(tmp_path / "file" / "r.json")],
              f"--json: cannot write in {tmp_path / 'file'}")]  # a missing folder is made (test_cli)
    for args, message in cases:
        with pytest.raises(SystemExit):
            cli_main(["cache-teacher", str(image_folder), *args, "--teacher", tiny_teacher_name])
        assert message in one_error_line(capsys)
    monkeypatch.undo()
    for device, message in (("gpu", "--device gpu: not a torch device"), ("cuda:7", "--device cuda:7: this machine has"),
                            ("meta", "--device meta: zsd runs on cpu, cuda or mps")):
        if device == "cuda:7" and torch.cuda.device_count() > 7:
            continue
        with pytest.raises(SystemExit):
            cli_main(["cache-teacher", str(image_folder), "--out", str(tmp_path / "d.zarr"), "--teacher",
                      tiny_teacher_name, "--device", device])
        assert message in one_error_line(capsys)
        with pytest.raises(SystemExit):
            cli_main(["train", "--targets", str(tmp_path / "d.zarr"), "--student", "test_resnet", "--out",
                      str(tmp_path / "run"), "--device", device])
        assert message in one_error_line(capsys)
    with pytest.raises(SystemExit):
        cli_main(["train", "--targets", str(tmp_path / "d.zarr"), "--student", "test_resnet",
                  "--out", str(tmp_path / "file" / "run")])
    assert "--out: cannot write in" in one_error_line(capsys)
    assert not (tmp_path / "s.zarr").exists() and not (tmp_path / "d.zarr").exists()


def test_disk_full_during_a_train_checkpoint(store, tmp_path, monkeypatch):
    run = tmp_path / "run"
    disk = FullDisk(monkeypatch, run)
    real_save = train_mod.save_checkpoint
    saved = []

    def save_then_fill(run_dir, model, *a, **kw):
        if saved:  # the second checkpoint meets a full disk
            disk.fill()
        real_save(run_dir, model, *a, **kw)
        saved.append(a[-1])

    monkeypatch.setattr(train_mod, "save_checkpoint", save_then_fill)
    config = TrainConfig([store], run_dir=str(run), steps=4, save_every=2, **TRAIN)
    with pytest.raises(ZsdError) as e:
        train(config, progress=False, log=lambda m: None)
    msg = str(e.value)
    assert "\n" not in msg and "No space left on device" in msg and "the last checkpoint (step 2) is kept" in msg
    assert saved == [2] and leftovers(run) == []
    assert torch.load(run / STATE, weights_only=False)["step"] == 2
    monkeypatch.undo()
    summary = train(config, resume=True, progress=False, log=lambda m: None)
    assert summary["finished"] and [r["step"] for r in map(json.loads, (run / LOG).read_text().splitlines())
                                    if "loss" in r] == [1, 2, 3, 4]


def test_a_fresh_run_does_not_append_to_a_stale_log(store, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOG).write_text(json.dumps({"step": 1, "loss": 9.0}) + "\n" + json.dumps({"step": 2, "loss": 9.0}) + "\n")
    train(TrainConfig([store], run_dir=str(run), steps=2, **TRAIN), progress=False, log=lambda m: None)
    records = [json.loads(line) for line in (run / LOG).read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2] and all(r["loss"] != 9.0 for r in records if "loss" in r)


@functools.cache
def _can_mount_tmpfs():
    if not shutil.which("unshare") or not sys.platform.startswith("linux"):
        return False
    return subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                          capture_output=True).returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs a user namespace to mount a small tmpfs")
def test_a_really_full_and_a_read_only_file_system(image_folder, tmp_path, tiny_teacher_name):
    """A 100 KiB tmpfs (4 KiB a file) takes the new store and some chunks, not all; read-only, nothing."""
    mnt, kept = tmp_path / "mnt", tmp_path / "kept"
    mnt.mkdir()

    def zsd(out, err):
        return (f"{sys.executable} -m zsd {' '.join(cache_args(image_folder, out, tiny_teacher_name))}"
                f" >/dev/null 2>{err}; echo $? >{err}.rc")

    script = (f"mount -t tmpfs -o size=100k tmpfs {mnt} || exit 99\n{zsd(mnt / 's.zarr', tmp_path / 'full')}\n"
              f"cp -a {mnt}/. {kept}\nmount -o remount,ro {mnt}\n{zsd(mnt / 'ro.zarr', tmp_path / 'ro')}\n")
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    subprocess.run(["unshare", "-rm", "sh", "-c", script], check=True, env=env)
    for name, message in (("full", "No space left on device"), ("ro", "--out: cannot write in")):
        err = error_lines((tmp_path / name).read_text())
        assert (tmp_path / f"{name}.rc").read_text().strip() == "1"
        assert len(err) == 1 and err[0].startswith("zsd: error: ") and message in err[0], err
    assert "Read-only file system" in (tmp_path / "ro").read_text()
    assert leftovers(kept) == [] and sorted(p.name for p in kept.iterdir()) == ["s.zarr"]
    store = open_store(kept / "s.zarr")
    done = store.status() == WRITTEN
    assert 0 < done.sum() < store.rows and (store.status()[~done] == PENDING).all()
    ref = tmp_path / "ref.zarr"
    cli_main(cache_args(image_folder, ref, tiny_teacher_name))
    np.testing.assert_array_equal(store.embeddings()[done], open_store(ref).embeddings()[done])


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs a user namespace to mount a small tmpfs")
def test_a_store_that_does_not_fit_leaves_no_temporary_folder_and_no_asyncio_pages(tmp_path):
    """Its creation writes 80 chunks of keys, labels and locations; the 64 KiB tmpfs takes a few (issue #32)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    create = ("import numpy as np, sys\nfrom zsd.store import create_store\nn = 20000\n"
              f"create_store('{mnt}/s.zarr', keys=[f'k{{i:032d}}' for i in range(n)], labels=np.zeros(n), "
              "locs=np.zeros((n, 4)), views=1, dim=8, teacher={}, teacher_id='x', classnames=['a'], sources=[], "
              "chunk_rows=256)\n")
    (tmp_path / "create.py").write_text(create)
    script = f"mount -t tmpfs -o size=64k tmpfs {mnt} || exit 99\n{sys.executable} {tmp_path}/create.py; ls -A {mnt}"
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert "cannot create" in done.stderr and "No space left on device" in done.stderr, done.stderr
    assert "Task" not in done.stderr and "never retrieved" not in done.stderr, done.stderr  # no asyncio pages
    assert done.stdout == ""  # `ls -A`: not even a hidden temporary folder


def test_a_store_name_at_the_file_systems_limit(image_folder, tmp_path, tiny_teacher_name, capsys):
    out = tmp_path / ("s" * 250 + ".zarr")  # 255 bytes: a temporary name with a suffix would not fit
    cli_main(["cache-teacher", str(image_folder), "--out", str(out), "--teacher", tiny_teacher_name,
              "--chunk-rows", "4", "--workers", "0"])
    assert open_store(out).complete() and leftovers(tmp_path) == []
