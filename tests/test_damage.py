"""A damaged store is found, named and repaired: never a traceback, never a silent wrong result."""

import filecmp
import json
import shutil

import numpy as np
import pytest
import torch

import zsd.cache
from conftest import random_store, unit
from test_cache import direct_embeddings, run_cache
from zsd.cli import main
from zsd.errors import ZsdError
from zsd.loader import TrainTargets
from zsd.store import FAILED, WRITTEN, Store, open_store
from zsd.teachers import create_teacher
from zsd.verify import verify


@pytest.fixture
def store30(tmp_path):
    """The issue's store: 30 rows, chunks of 8, 2 views, labelled, one failed row."""
    rng = np.random.default_rng(0)
    labels = np.arange(30) % 3
    random_store(tmp_path / "s.zarr", unit(rng.normal(size=(30, 2, 16))).astype(np.float32), labels=labels,
                 classnames=["a", "b", "c"], failed=[3], chunk_rows=8)
    return tmp_path / "s.zarr"


def run_cli(capsys, *args):
    """(exit code, stdout, stderr) of `zsd ARGS` run in this process."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def truncate(path, size=100):
    path.write_bytes(path.read_bytes()[:size])


DAMAGE = {  # name -> (damage the store, what the error says)
    "truncated emb chunk": (lambda p: truncate(p / "emb/c/1/0/0"), "emb rows 8..15: chunk file emb/c/1/0/0 is 100 bytes, not 512"),
    "deleted emb chunk": (lambda p: (p / "emb/c/1/0/0").unlink(), "emb rows 8..15: chunk file emb/c/1/0/0 is missing"),
    "truncated status chunk": (lambda p: truncate(p / "status/c/2", 3), "status rows 16..23: chunk file status/c/2 is 3 bytes"),
    "garbled key chunk": (lambda p: (p / "key/c/0").write_bytes(b"\x05garbage"),
                          "key rows 0..7: chunk file key/c/0 says it holds 1918985989 strings, not 8"),
    "undecodable key chunk": (lambda p: truncate(p / "key/c/0", 10), "key rows 0..7: cannot decode"),
    "deleted view chunk": (lambda p: (p / "view/c/3/0/0").unlink(), "view rows 24..29: chunk file view/c/3/0/0 is missing"),
    # bytes of the right size that no store holds (issue #32): found by their values
    "garbled status chunk": (lambda p: (p / "status/c/2").write_bytes(bytes(range(200, 208))),
                             "status rows 16..23: 8 value(s) are impossible: statuses other than 0"),
    "deleted label chunk": (lambda p: (p / "label/c/1").unlink(), "label rows 8..15: chunk file label/c/1 is missing"),
    "garbled label chunk": (lambda p: (p / "label/c/1").write_bytes(b"\x7f" * 32),
                            "label rows 8..15: 8 value(s) are impossible: labels outside -1..2"),
    "garbled loc chunk": (lambda p: (p / "loc/c/1/0").write_bytes(b"\xff" * 256), "loc rows 8..15: 8 value(s)"),
    "garbled view chunk": (lambda p: (p / "view/c/1/0/0").write_bytes(b"\xff" * 320), "view rows 8..15: 8 value(s)"),
    "garbage store metadata": (lambda p: (p / "zarr.json").write_text("{garbage"), "is not a zsd store"),
    "garbage array metadata": (lambda p: (p / "emb/zarr.json").write_text('{"zarr_format": 3, "node_type": "array"}'),
                               "is damaged: array emb is missing or its metadata emb/zarr.json is unreadable"),
}


ALL = {"info", "verify", "train", "eval", "coverage"}
# the commands that read each array; info, verify and train check every chunk file (stat calls)
READERS = {"key": ALL - {"eval"}, "view": {"info", "verify", "train"}, "loc": {"info", "verify", "train"}}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_every_command_names_the_damage_in_one_line(store30, tmp_path, capsys, damage):
    hurt, message = DAMAGE[damage]
    hurt(store30)
    commands = [["info", store30, "--full"], ["verify", store30],
                ["train", "--targets", store30, "--student", "test_resnet", "--batch-size", 8, "--steps", 1,
                 "--workers", 0, "--out", tmp_path / "run"],
                ["eval", store30, "--classes-from", store30], ["coverage", "--train", store30, "--test", store30]]
    for cmd in commands:
        if cmd[0] not in READERS.get(damage.split()[-2], ALL):  # a command that never reads the array just works
            assert run_cli(capsys, *cmd)[0] == 0, cmd
            continue
        code, _, err = run_cli(capsys, *cmd)
        error = err.splitlines()[-1]  # after warnings, e.g. train's about the failed row
        assert code == 1 and "Traceback" not in err, (cmd, err)
        assert error.startswith("zsd: error: ") and str(store30) in error and message in error, (cmd, err)
    assert not (tmp_path / "run").exists()


def test_status_claiming_rows_whose_embeddings_were_never_written(store30, capsys):
    """A status chunk copied from a finished store into one where that chunk was never written."""
    s = open_store(store30)
    commit = s.chunk_file("status", 2).read_bytes()
    for name in ("emb", "view", "status"):  # chunk 2 as before the teacher reached it
        s.chunk_file(name, 2).unlink()
    assert s.damage() == [] and s.pending_chunks() == [2]
    assert run_cli(capsys, "info", store30, "--full")[0] == 0
    s.chunk_file("status", 2).write_bytes(commit)
    code, _, err = run_cli(capsys, "info", store30, "--full")
    assert code == 1 and "emb rows 16..23: chunk file emb/c/2/0/0 is missing (status says rows are written)" in err
    assert [(a, c) for a, c, _ in s.damage()] == [("emb", 2), ("view", 2)]


def test_nonfinite_rows_are_counted_by_info_and_failed_by_verify_and_not_read_at_the_trainers_start(
        tmp_path, capsys, monkeypatch):
    rng = np.random.default_rng(1)
    emb = unit(rng.normal(size=(30, 2, 16))).astype(np.float32)
    emb[5, 1, 3] = np.nan
    emb[17, 0] = np.inf
    bad = random_store(tmp_path / "bad.zarr", emb, chunk_rows=8)
    good_emb = unit(rng.normal(size=(20, 2, 16))).astype(np.float32)
    good = random_store(tmp_path / "good.zarr", good_emb, chunk_rows=8)

    code, out, _ = run_cli(capsys, "info", bad.path, "--json", "-", "--full")
    info = json.loads(out)
    assert code == 0 and info["nonfinite"] == ["img00005", "img00017"]
    assert np.isfinite([info["norm_view0"]["mean"], info["norm_view0"]["min"]]).all()
    code, out, _ = run_cli(capsys, "info", bad.path, "--full")
    assert "2 written rows have non-finite embeddings (first: img00005)" in out

    # the trainer's start reads no embedding (a pass over every store: minutes at DataComp scale); its
    # batches check their own targets (test_the_trainer_skips_and_names_nonfinite_targets_as_batches_read_them)
    for in_ram in ("yes", "no"):
        messages = []
        with monkeypatch.context() as m:
            m.setattr(Store, "iter_blocks", lambda *a, **k: pytest.fail("streamed the embeddings"))
            m.setattr(Store, "read_rows", lambda *a, **k: pytest.fail("read embeddings"))
            targets = TrainTargets([str(bad.path), str(good.path)], in_ram=in_ram, log=messages.append)
        assert messages == [] and targets.rows_per_epoch == 30 + 20 and targets.skipped_rows == 0
        order = np.concatenate([targets.epoch_order(0, e) for e in range(4)])
        t, finite = targets.finite_targets(order, log=messages.append)
        bad_samples = [(0, 5, 1), (0, 17, 0)]  # (store, row, view): the other views are finite
        expect = np.array([tuple(x) not in bad_samples for x in order.tolist()])
        np.testing.assert_array_equal(finite, expect)
        keep = torch.from_numpy(finite)
        assert torch.isfinite(t[keep]).all() and not torch.isfinite(t[~keep]).all(dim=1).any()
        np.testing.assert_array_equal(t[keep].numpy(), np.concatenate([emb, good_emb])[order[:, 1] + 30 * order[:, 0],
                                                                                       order[:, 2]][finite].astype(np.float16))
        first = {}  # row -> view of its first non-finite sample: each row is named once
        for _, r, v in order[~finite].tolist():
            first.setdefault(r, v)
        assert sorted(first) == [5, 17] and (~finite).sum() > 2  # this seed draws both, and one again
        assert messages == [f"warning: {bad.path}: row {r} (img{r:05d}) view {v} has a non-finite embedding (NaN or "
                            f"inf): its samples are skipped; `zsd verify {bad.path}` lists such rows"
                            for r, v in first.items()]

    code, _, err = run_cli(capsys, "verify", bad.path)
    assert code == 1 and err.count("\n") == 1 and "2 written rows have non-finite embeddings (first: img00005)" in err
    code, out, err = run_cli(capsys, "verify", good.path)
    assert code == 0 and err == "" and out.rstrip().endswith("OK")


def test_the_trainer_skips_and_names_nonfinite_targets_as_batches_read_them(image_folder, tmp_path, tiny_teacher_name):
    """A sample whose cached target is NaN leaves its micro-batch like an unreadable image: every step
    trains on the others (counted against the epoch order, computed here), the row is named once,
    and the loss and weights stay finite."""
    from safetensors.torch import load_file

    from zsd.train import TrainConfig, train

    store = tmp_path / "s.zarr"
    run_cache([image_folder], store, tiny_teacher_name)  # 12 rows, 2 views
    open_store(store, mode="r+").group["emb"][5, 1] = np.nan
    targets = TrainTargets([str(store)], log=lambda m: None)
    per_step = lambda seed: [int(((o[:, 1] == 5) & (o[:, 2] == 1)).sum())  # noqa: E731
                             for e in range(3) for o in np.split(targets.epoch_order(seed, e), 2)]
    seed = next(seed for seed in range(100) if 1 < sum(per_step(seed)) < 3)  # in 2 of the 3 epochs
    messages = []
    summary = train(TrainConfig([str(store)], run_dir=str(tmp_path / "run"), student="test_efficientnet_gn",
                                student_res=32, steps=6, batch_size=6, workers=0, device="cpu", precision="fp32",
                                pixel_cache="no", seed=seed), progress=False, log=messages.append)
    steps = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "loss" in r]
    assert [r["images"] for r in steps] == [6 - n for n in per_step(seed)]
    assert summary["skipped_images"] == steps[-1]["skipped_images"] == 2 and summary["images"] == 34
    assert [m for m in messages if "non-finite embedding" in m] == [
        f"warning: {store}: row 5 ({open_store(store).keys()[5]}) view 1 has a non-finite embedding (NaN or inf): its samples are "
        f"skipped; `zsd verify {store}` lists such rows"]
    assert all(np.isfinite(r["loss"]) for r in steps)
    assert all(torch.isfinite(v).all() for v in load_file(str(tmp_path / "run" / "student.safetensors")).values())


def test_a_teacher_that_returns_nan_fails_the_row_with_a_reason(image_folder, tmp_path, tiny_teacher_name, monkeypatch):
    make = zsd.cache.create_teacher

    def nan_on_first_image(*args):
        teacher = make(*args)
        encode = teacher.encode_images
        calls = []

        def encode_images(x):
            z = encode(x).clone()
            if not calls:  # the first batch starts at row 0: its first view
                z[0, 0] = float("nan")
            calls.append(1)
            return z
        teacher.encode_images = encode_images
        return teacher

    monkeypatch.setattr(zsd.cache, "create_teacher", nan_on_first_image)
    summary = run_cache([image_folder], tmp_path / "s.zarr", tiny_teacher_name)
    s = open_store(tmp_path / "s.zarr")
    assert list(s.status()) == [FAILED] + [WRITTEN] * 11
    assert s.errors()[0] == "the teacher's embedding is not finite (NaN or inf)"
    assert summary["failure_reasons"] == {"the teacher's embedding is not finite": 1}
    assert not s.embeddings()[0].any() and np.isfinite(s.embeddings()).all()


def _same_files(a, b):
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for f in files:
        assert filecmp.cmp(a / f, b / f, shallow=False), f


def test_cache_teacher_repairs_damaged_chunks_to_the_bytes_of_a_clean_run(image_folder, tmp_path, tiny_teacher_name):
    ref = tmp_path / "ref.zarr"
    run_cache([image_folder], ref, tiny_teacher_name)  # 12 rows, 3 chunks of 4
    hurt = tmp_path / "hurt.zarr"
    shutil.copytree(ref, hurt)  # the same creation time in the group attributes
    truncate(hurt / "emb/c/0/0/0")
    truncate(hurt / "status/c/2", 2)
    (hurt / "key/c/1").unlink()
    logs = []
    summary = run_cache([image_folder], hurt, tiny_teacher_name, log=logs.append)
    assert summary["repaired"] == 8 and summary["processed"] == 8 and summary["complete"]
    assert any("recomputing 8 rows of 2 damaged chunk(s); first: emb rows 0..3: chunk file emb/c/0/0/0 is 100 "
               "bytes" in m for m in logs)
    assert any("rewriting the keys, labels and locations of rows 4..7" in m for m in logs)
    assert "8 rows of damaged chunks repaired" in logs[-1]
    _same_files(hurt, ref)
    assert verify(str(hurt))["problems"] == []


def test_cache_teacher_recomputes_every_row_verify_rejects(image_folder, tmp_path, tiny_teacher_name, capsys):
    """Bytes of the right size (issue #32): verify rejects them, and the documented repair repairs them."""
    ref = tmp_path / "ref.zarr"
    run_cache([image_folder], ref, tiny_teacher_name)  # 12 rows, 3 chunks of 4, 3 classes
    hurt = tmp_path / "hurt.zarr"
    shutil.copytree(ref, hurt)
    rng = np.random.default_rng(0)
    emb = hurt / "emb/c/0/0/0"
    emb.write_bytes(rng.integers(0, 256, emb.stat().st_size, dtype=np.uint8).tobytes())
    (hurt / "status/c/1").write_bytes(b"\x09" * 4)
    labels = np.frombuffer((ref / "label/c/2").read_bytes(), np.int32)
    (hurt / "label/c/2").write_bytes(((labels + 1) % 3).astype(np.int32).tobytes())  # in range, but wrong
    (hurt / "label/c/0").unlink()
    assert run_cli(capsys, "verify", hurt)[0] == 1
    damaged = [(d["array"], d["rows"]) for d in verify(str(hurt))["damaged_chunks"]]
    assert damaged == [("label", [0, 3]), ("status", [4, 7])]
    logs = []
    summary = run_cache([image_folder], hurt, tiny_teacher_name, log=logs.append)
    assert summary["repaired"] == 8 and summary["complete"], logs
    assert any("rewriting the keys, labels and locations of rows 8..11" in m for m in logs)  # found by the rescan
    assert any("emb rows 0..3: embeddings" in m and "(garbled)" in m for m in logs), logs
    _same_files(hurt, ref)
    assert verify(str(hurt))["problems"] == []


def test_a_store_metadata_written_over_is_restored_by_cache_teacher(image_folder, tmp_path, tiny_teacher_name,
                                                                   capsys):
    ref = tmp_path / "ref.zarr"
    run_cache([image_folder], ref, tiny_teacher_name)
    hurt = tmp_path / "hurt.zarr"
    shutil.copytree(ref, hurt)
    (hurt / "zarr.json").write_text(json.dumps({"rows": 12}))  # what `zsd info --json STORE/zarr.json` wrote before #32
    code, _, err = run_cli(capsys, "info", hurt)
    assert code == 1 and "is not a zsd store" in err and "rerun `zsd cache-teacher`" in err, err
    logs = []
    with pytest.raises(ZsdError, match="another teacher"):  # the copy is checked against the run, as any store
        run_cache([image_folder], hurt, tiny_teacher_name, precision="bf16", log=logs.append)
    assert any("restoring it from the copy in emb/zarr.json" in m for m in logs)
    summary = run_cache([image_folder], hurt, tiny_teacher_name)
    assert summary["processed"] == 0 and summary["complete"]  # no row recomputed: the arrays were intact
    assert json.loads((hurt / "zarr.json").read_text()) == json.loads((ref / "zarr.json").read_text())
    assert verify(str(hurt))["problems"] == []


def test_verify_recomputes_sampled_rows_and_finds_a_wrong_embedding(image_folder, tmp_path, tiny_teacher_name,
                                                                     capsys):
    path = tmp_path / "s.zarr"
    run_cache([image_folder], path, tiny_teacher_name)
    report = verify(str(path), recompute=12, log=lambda m: None)
    r = report["recompute"]
    assert report["problems"] == [] and r["rows"] == 12 and r["views"] == 24
    # independently: each view alone through the teacher, against the stored fp16 embeddings
    s = open_store(path)
    ref = direct_embeddings(s, create_teacher(tiny_teacher_name, None, "cpu"))
    stored = s.embeddings().astype(np.float32)
    cos = (ref * stored).sum(-1) / np.linalg.norm(ref, axis=-1) / np.linalg.norm(stored, axis=-1)
    assert r["cosine_min"] == pytest.approx(cos.min(), abs=1e-5)
    assert r["max_error"] == pytest.approx(1 - cos.min(), abs=1e-5) and r["max_error"] < 1e-3

    # a swapped but unit-norm embedding passes every file check; only the recomputation sees it
    open_store(path, mode="r+").group["emb"][7, 1] = stored[2, 1].astype(np.float16)
    code, out, err = run_cli(capsys, "verify", path, "--recompute", 12, "--json", "-")
    report = json.loads(out)
    error = err.splitlines()[-1]  # after the progress line
    assert code == 1 and error.startswith("zsd: error: ") and "1 of 24 recomputed views differ" in error
    assert report["recompute"]["above_tolerance"] == 1
    assert report["recompute"]["worst"][0]["row"] == 7 and report["recompute"]["worst"][0]["view"] == 1
    assert report["damaged_chunks"] == [] and report["nonfinite"] == [] and report["off_norm"] == []


def test_eval_and_coverage_leave_nonfinite_rows_out_like_a_store_without_them(tmp_path):
    from zsd.coverage import coverage
    from zsd.evaluate import evaluate

    rng = np.random.default_rng(2)
    emb = unit(rng.normal(size=(30, 16)) + np.repeat(np.eye(3, 16) * 2, 10, axis=0)).astype(np.float32)
    labels = np.repeat(np.arange(3), 10)
    emb[4, 0], emb[21, 7] = np.nan, -np.inf
    keep = np.setdiff1d(np.arange(30), [4, 21])
    bad = random_store(tmp_path / "bad.zarr", emb, labels=labels, classnames=["a", "b", "c"])
    clean = random_store(tmp_path / "clean.zarr", emb[keep], labels=labels[keep], classnames=["a", "b", "c"])
    logs = []
    got = evaluate(str(bad.path), classes_from=str(bad.path), progress=False, log=logs.append)[0]
    want = evaluate(str(clean.path), classes_from=str(clean.path), progress=False, log=lambda m: None)[0]
    assert got["n_images"] == want["n_images"] == 28 and got["metrics"] == want["metrics"]
    assert logs == [f"warning: {bad.path}: 2 written rows have non-finite embeddings and are left out "
                    f"(`zsd verify {bad.path}` lists them)"]
    got = coverage([str(bad.path)], str(bad.path), k=3, progress=False, log=lambda m: None)
    want = coverage([str(clean.path)], str(clean.path), k=3, progress=False, log=lambda m: None)
    assert [r["eps_t"] for r in got["images"]] == [r["eps_t"] for r in want["images"]]
    assert [r["nearest"] for r in got["images"]] == [f"img{keep[int(r['nearest'][3:])]:05d}" for r in want["images"]]
