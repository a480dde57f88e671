"""What breaks only at scale, provoked small: thousands of shards against the open-file limit,
several shard processes writing one store at once."""

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zsd.sources import RowReader, scan_sources

REPO = Path(__file__).resolve().parents[1]


def write_shards(root: Path, n_shards: int, per_shard: int = 1) -> list[str]:
    """`n_shards` webdataset shards of `per_shard` tiny JPEGs each, uid `u{shard}_{i}`."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    uids = []
    for s in range(n_shards):
        with tarfile.open(root / f"{s:05d}.tar", "w") as tar:
            for i in range(per_shard):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)).save(buf, "JPEG")
                uids.append(f"u{s}_{i}")
                for ext, data in ((".jpg", buf.getvalue()), (".json", json.dumps({"uid": uids[-1]}).encode())):
                    info = tarfile.TarInfo(f"{s:05d}{i:03d}{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return uids


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_row_reader_keeps_at_most_max_open_shards_open_and_closes_them(tmp_path):
    write_shards(tmp_path / "shards", 20, per_shard=2)
    scan = scan_sources([str(tmp_path / "shards")])
    before = open_fds()
    reader = RowReader(scan.descs, max_open=4)
    expected = {}
    for key, loc in zip(scan.keys, scan.locs):  # shard after shard, then all again in reverse
        expected[key] = reader.read(key, loc)
        assert open_fds() - before <= 4
    for key, loc in reversed(list(zip(scan.keys, scan.locs))):
        assert reader.read(key, loc) == expected[key]  # an evicted shard is opened again
    assert list(reader._files) == [scan.descs[0]["shards"][p] for p in (3, 2, 1, 0)]  # most recent last
    reader.close()
    assert open_fds() == before
    assert len({Image.open(io.BytesIO(b)).size for b in expected.values()}) == 1  # the bytes are the JPEGs


# Runs in a fresh interpreter: the limit applies to it and its DataLoader workers, not to pytest.
LIMITED = """
import resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[5]),) * 2)
from zsd.cache import cache_teacher
from zsd.train import TrainConfig, train
shards, store, teacher, run = sys.argv[1:5]
cache_teacher([shards], store, teacher=teacher, pretrained=None, chunk_rows=64, batch_size=32, workers=2,
              progress=False, log=print)
train(TrainConfig([store], run_dir=run, student="test_efficientnet_gn", student_res=32, epochs=1, batch_size=16,
                  workers=2, device="cpu", precision="fp32", pixel_cache="no"), progress=False, log=print)
"""


def test_more_shards_than_the_open_file_limit_cache_and_train(tmp_path, tiny_teacher_name):
    """200 shards under a limit of 96 open files: before the reader's LRU every shard stayed open (the
    pass failed rows with EMFILE), and per-image tensors from the workers ran out of descriptors too."""
    from safetensors.torch import load_file

    from zsd.store import WRITTEN, open_store

    uids = write_shards(tmp_path / "shards", 200)
    store, run = tmp_path / "s.zarr", tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", LIMITED, str(tmp_path / "shards"), str(store),
                          tiny_teacher_name, str(run), "96"], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    s = open_store(store)
    assert sorted(s.keys()) == sorted(uids) and (s.status() == WRITTEN).all()
    records = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 200 // 16 and all(r["images"] == 16 and r["skipped_images"] == 0 for r in steps)
    assert load_file(str(run / "student.safetensors"))


# Two shard processes append the same new source to one store at the same moment: each waits for the
# other at the door of _open_or_create, and shard 1's append_rows waits until shard 0 has appended
# (without the store's lock shard 1 went on from the old sources it had read: rows duplicated).
APPENDER = """
import sys, time
from pathlib import Path
from zsd import cache
from zsd.store import Store
src_a, src_b, store, teacher, me, other, shard = sys.argv[1:]
open_or_create, append_rows = cache._open_or_create, Store.append_rows

def together(*a, **k):
    Path(me).touch()
    t = time.time()
    while not Path(other).exists() and time.time() - t < 60:
        time.sleep(0.01)
    return open_or_create(*a, **k)

def slowly(*a, **k):  # shard 1 appends 2 s after shard 0, both having read the old sources
    time.sleep(2.0 * int(shard))
    return append_rows(*a, **k)

cache._open_or_create, Store.append_rows = together, slowly
cache.cache_teacher([src_a, src_b], store, teacher=teacher, pretrained=None, views=2, chunk_rows=5, num_shards=2,
                    shard_index=int(shard), workers=0, progress=False, log=print)
"""


def two_folders(tmp_path):
    from conftest import make_image

    a, b = tmp_path / "a", tmp_path / "b"
    for i in range(12):
        make_image(a / f"{i:02d}.png", i, size=(40 + i, 36))
    for i in range(7):
        make_image(b / f"{i:02d}.jpg", 100 + i, size=(36, 40 + i))
    return str(a), str(b)


def cache(sources, store, teacher, **kw):
    from zsd.cache import cache_teacher

    return cache_teacher(sources, str(store), teacher=teacher, pretrained=None, views=2, chunk_rows=5, workers=0,
                         progress=False, log=lambda m: None, **kw)


def assert_same_rows(store, ref):
    """Every key exactly once, in the reference's order, with the reference's bytes."""
    from zsd.store import WRITTEN, open_store

    s, r = open_store(store), open_store(ref)
    assert list(s.keys()) == list(r.keys()) and len(set(s.keys())) == s.rows == 19
    assert (s.status() == WRITTEN).all()
    np.testing.assert_array_equal(s.embeddings(), r.embeddings())
    np.testing.assert_array_equal(s.view_params(), r.view_params())
    assert s.sources == r.sources


def test_two_shard_processes_append_and_fill_one_store_at_once(tmp_path, tiny_teacher_name):
    a, b = two_folders(tmp_path)
    ref = tmp_path / "ref.zarr"
    cache([a, b], ref, tiny_teacher_name)
    store = tmp_path / "s.zarr"
    cache([a], store, tiny_teacher_name)  # 12 rows: the last chunk (rows 10-11) partial
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}{os.pathsep}"
           f"{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    flags = [str(tmp_path / f"at_door_{i}") for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", APPENDER, a, b, str(store), tiny_teacher_name, flags[i],
                               flags[1 - i], str(i)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    assert_same_rows(store, ref)


def test_an_append_killed_before_its_commit_is_redone(tmp_path, tiny_teacher_name, monkeypatch):
    """Killed after the resize and the new keys, before the attrs that record the new source: the
    next run replaces those rows instead of refusing the store or appending them a second time."""
    import zarr.core.attributes

    a, b = two_folders(tmp_path)
    ref = tmp_path / "ref.zarr"
    cache([a, b], ref, tiny_teacher_name)
    store = tmp_path / "s.zarr"
    cache([a], store, tiny_teacher_name)

    class Killed(BaseException):
        pass

    def kill(self, key, value):
        raise Killed

    with monkeypatch.context() as m:
        m.setattr(zarr.core.attributes.Attributes, "__setitem__", kill)
        try:
            cache([a, b], store, tiny_teacher_name)
        except Killed:
            pass
        else:
            raise AssertionError("the append was not interrupted")
    from zsd.store import open_store

    assert open_store(store).rows == 19 and len(open_store(store).sources) == 1  # the torn state
    cache([a, b], store, tiny_teacher_name)
    assert_same_rows(store, ref)


def test_info_reads_no_embedding_unless_full(tmp_path, monkeypatch):
    from conftest import random_store, unit

    from zsd.store import FAILED, WRITTEN, Store, open_store

    rng = np.random.default_rng(0)
    emb = unit(rng.standard_normal((20, 2, 8))).astype(np.float16)
    store = random_store(tmp_path / "s.zarr", emb, chunk_rows=8)
    status = np.full(8, WRITTEN, np.uint8)
    status[[2, 5]] = FAILED
    errors = [f"bad {i}" if status[i] == FAILED else "" for i in range(8)]
    box = np.tile(np.array([0, 0, 1, 1, 0], np.int32), (8, 2, 1))  # all zeros, zarr would write no view chunk: damage
    store.write_chunk(0, emb[:8], box, errors, status)
    with monkeypatch.context() as m:
        m.setattr(Store, "iter_blocks", lambda *a, **k: (_ for _ in ()).throw(AssertionError("read embeddings")))
        info = open_store(store.path).info()
    assert (info["rows"], info["written"], info["failed"], info["pending"]) == (20, 18, 2, 0)
    assert info["failures"] == [{"key": "img00002", "reason": "bad 2"}, {"key": "img00005", "reason": "bad 5"}]
    assert info["norm_view0"] is None
    norms = np.linalg.norm(np.delete(emb[:, 0], [2, 5], axis=0).astype(np.float32), axis=-1)
    full = open_store(store.path).info(full=True)["norm_view0"]
    np.testing.assert_allclose([full["mean"], full["min"], full["max"]], [norms.mean(), norms.min(), norms.max()],
                               rtol=1e-6)


def test_a_resumed_pass_reads_the_shard_index_not_the_tar_headers(tmp_path, tiny_teacher_name, monkeypatch):
    """The second pass takes every shard's member offsets from STORE/shard-index.npz; a shard rewritten
    since (another size and mtime) is indexed again, and its new sample is found and embedded."""
    from zsd import sources
    from zsd.store import WRITTEN, open_store

    uids = write_shards(tmp_path / "shards", 6, per_shard=2)
    indexed = []
    index_shard = sources._index_shard
    monkeypatch.setattr(sources, "_index_shard", lambda shard: indexed.append(shard) or index_shard(shard))
    store = tmp_path / "s.zarr"
    first = cache([str(tmp_path / "shards")], store, tiny_teacher_name)
    assert len(indexed) == 6 and (store / "shard-index.npz").exists()
    indexed.clear()
    again = cache([str(tmp_path / "shards")], store, tiny_teacher_name)
    assert indexed == [] and again["processed"] == 0 and again["written"] == first["written"] == 12

    # a rewritten shard (one sample more): only it is read again, and the index says what the tar says
    fresh = tmp_path / "fresh"
    write_shards(fresh, 6, per_shard=3)
    shard = tmp_path / "shards" / "00004.tar"
    os.replace(fresh / "00004.tar", shard)
    new = sources.ShardIndex(store / "shard-index.npz")
    assert new.entries[str(shard)][2] != index_shard(str(shard))[0]  # the stale entry, until looked up
    assert new.lookup(str(shard)) == index_shard(str(shard)) and indexed == [str(shard)]
    indexed.clear()
    scan = sources.scan_sources([str(tmp_path / "shards")], index=sources.ShardIndex(store / "shard-index.npz"))
    assert indexed == [str(shard)] and len(scan) == 13 and "u4_2" in scan.keys
    assert scan.keys == sources.scan_sources([str(tmp_path / "shards")]).keys
    assert sorted(open_store(store).keys()) == sorted(uids)
    assert (open_store(store).status() == WRITTEN).all()


def test_a_resume_reads_the_stores_keys_a_block_at_a_time_and_refuses_changed_images(image_folder, tmp_path,
                                                                                       tiny_teacher_name, monkeypatch):
    """A resumed pass compares the store's keys with the sources' as packed buffers, read PackedKeys.BLOCK
    rows at a time (the whole key array as Python strings is GBs at DataComp scale), and the pass's
    dataset packs them the same way; a key that changed in the last block is still refused."""
    import pytest

    from zsd.errors import ZsdError
    from zsd.sources import PackedKeys
    from zsd.store import Store, open_store

    store = tmp_path / "s.zarr"
    assert cache([str(image_folder)], store, tiny_teacher_name)["written"] == 12
    monkeypatch.setattr(PackedKeys, "BLOCK", 5)  # = chunk_rows: one chunk per read
    spans, read = [], Store._read
    monkeypatch.setattr(Store, "_read", lambda self, name, rows=slice(None), *index: (
        spans.append(len(range(*rows.indices(self.rows)))) if name == "key" else None, read(self, name, rows, *index))[1])
    assert cache([str(image_folder)], store, tiny_teacher_name)["processed"] == 0
    assert spans == [5, 5, 2] * 2  # the check, then the pass's dataset
    packed, keys = open_store(store).packed_keys(), list(open_store(store).keys())  # 3 blocks, then 1 read
    assert [packed[i] for i in range(len(packed))] == keys and len(keys) == 12
    (image_folder / "fish_tank" / "fish_tank_3.jpg").rename(image_folder / "fish_tank" / "fish_tank_9.jpg")  # row 11
    with pytest.raises(ZsdError, match="changed since"):
        cache([str(image_folder)], store, tiny_teacher_name)


def test_a_damaged_shard_index_is_rebuilt(tmp_path):
    from zsd.sources import ShardIndex, scan_sources

    write_shards(tmp_path / "shards", 3)
    path = tmp_path / "shard-index.npz"
    path.write_bytes(b"not an npz")
    index = ShardIndex(path)
    assert index.entries == {}
    scan = scan_sources([str(tmp_path / "shards")], index=index)
    index.save()
    again = ShardIndex(path)
    assert len(again.entries) == 3 and scan_sources([str(tmp_path / "shards")], index=again).keys == scan.keys
    assert not again.changed


def test_packed_keys_and_the_row_index_give_the_stores_rows(tmp_path):
    """Keys of any text (escaped bytes and the empty key too) come back from the packed buffer; a streamed
    row index holds at most `cached` chunks and answers like the whole one and like the store."""
    from conftest import random_store, unit

    from zsd.loader import RowIndex
    from zsd.sources import PackedKeys, encode_key

    keys = ["a", "", "café.jpg", encode_key("caf\udce9.jpg"), "日本/猫.png"]
    packed = PackedKeys(keys)
    assert [packed[i] for i in range(len(packed))] == keys and packed.buf.dtype == np.uint8
    assert len(PackedKeys([])) == 0

    store = random_store(tmp_path / "s.zarr", unit(np.random.default_rng(0).standard_normal((41, 2, 4))), chunk_rows=8)
    whole, streamed = RowIndex(store, True, 2), RowIndex(store, False, 2)
    k, loc, params = store.keys(), store.locs(), store.view_params()
    for row in np.random.default_rng(1).permutation(41):
        for index in (whole, streamed):
            got = index.row(int(row))
            assert got[0] == k[row] and np.array_equal(got[1], loc[row]) and np.array_equal(got[2], params[row])
        assert len(streamed._chunks) <= 2


def test_a_streamed_store_holds_no_per_row_array_in_the_trainer(tmp_path, monkeypatch):
    """131,072 rows (some failed, labelled) read in blocks of 16,384 (1 M rows in a real run):
    building the trainer's targets of a streamed store holds < 1 byte per row afterwards and peaks at
    < 4 (the former per-row arrays held 12 bytes a row and peaked at ~18). The rows and labels it
    finds per chunk are the store's, checked against a whole read."""
    import tracemalloc

    from conftest import random_store

    from zsd.loader import TrainTargets
    from zsd.store import WRITTEN, open_store

    monkeypatch.setattr("zsd.store.BLOCK_ROWS", 16384)
    n, rng = 131072, np.random.default_rng(0)
    labels = rng.integers(0, 3, n)
    random_store(tmp_path / "s.zarr", rng.standard_normal((n, 4)).astype(np.float16), labels=labels,
                 classnames=["a", "b", "c"], chunk_rows=512, failed=range(3, n, 1000))
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        targets = TrainTargets([str(tmp_path / "s.zarr")], in_ram="no", log=lambda m: None)
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (held - before) / n < 1 and (peak - before) / n < 4, ((held - before) / n, (peak - before) / n)

    status = open_store(tmp_path / "s.zarr").status()
    src = targets.sources[0]
    assert src.rows is None and src.labels is None and targets.rows_per_epoch == (status == WRITTEN).sum()
    np.testing.assert_array_equal(src.written_rows(), np.flatnonzero(status == WRITTEN))
    sample = np.sort(rng.choice(n, 2000, replace=False))
    np.testing.assert_array_equal(src.labels_of(sample), labels[sample])
    assert src.unlabelled_rows() == 0


def test_status_read_block_by_block_gives_the_whole_reads_answers(tmp_path, monkeypatch):
    """info(), status_per_chunk() and damage() over blocks of 2 chunks (1,203 rows, chunks of 8)
    equal a whole read's answers: counts and the first 100 failed rows against numpy on the whole
    status, damage against one block of every row, with a truncated status chunk (its block's read
    fails) and a deleted emb chunk."""
    from conftest import random_store, unit

    from zsd.store import ARRAYS, FAILED, PENDING, WRITTEN, open_store

    rng = np.random.default_rng(1)
    n = 1203
    emb = unit(rng.standard_normal((n, 1, 4))).astype(np.float16)
    failed = np.flatnonzero(rng.random(n) < 0.2)
    store = random_store(tmp_path / "s.zarr", emb, chunk_rows=8, failed=failed)
    store.uncommit([7, 40])  # two chunks pending again
    (tmp_path / "s.zarr" / "status" / "c" / "30").write_bytes(b"xx")
    (tmp_path / "s.zarr" / "emb" / "c" / "90" / "0" / "0").unlink()

    answers = []
    for block_rows in (1 << 20, 16):
        monkeypatch.setattr("zsd.store.BLOCK_ROWS", block_rows)
        s = open_store(tmp_path / "s.zarr")
        answers.append(s.damage(arrays=ARRAYS))
        (tmp_path / "s.zarr" / "status" / "c" / "30").rename(tmp_path / "bad30")  # a missing chunk reads as pending
        info, per_chunk, status = s.info(), s.status_per_chunk(), s.group["status"][:]
        (tmp_path / "bad30").rename(tmp_path / "s.zarr" / "status" / "c" / "30")
        assert [info["pending"], info["written"], info["failed"]] == [int((status == v).sum())
                                                                      for v in (PENDING, WRITTEN, FAILED)]
        assert info["complete"] is False and info["pending"] == 3 * 8
        padded = np.concatenate([status, np.full(-n % 8, 255, np.uint8)]).reshape(-1, 8)  # rows per chunk
        np.testing.assert_array_equal(per_chunk, np.stack([(padded == v).sum(1) for v in (PENDING, WRITTEN, FAILED)], 1))
        assert [f["key"] for f in info["failures"]] == [f"img{r:05d}" for r in np.flatnonzero(status == FAILED)[:100]]
    assert answers[0] == answers[1] and {(a, c) for a, c, _ in answers[0]} >= {("status", 30), ("emb", 90)}


def test_a_store_changed_under_a_streaming_trainer_is_one_clear_error(tmp_path):
    from conftest import random_store, unit

    from zsd.errors import ZsdError
    from zsd.loader import TrainTargets
    from zsd.store import FAILED, open_store

    emb = unit(np.random.default_rng(0).standard_normal((64, 4))).astype(np.float16)
    random_store(tmp_path / "s.zarr", emb, chunk_rows=8, failed=[3, 12])
    targets = TrainTargets([str(tmp_path / "s.zarr")], in_ram="no", log=lambda m: None)
    assert len(targets.epoch_order(0, 0)) == 62
    open_store(tmp_path / "s.zarr", mode="r+").group["status"][13] = FAILED  # another process, mid-run
    with pytest.raises(ZsdError, match=r"s.zarr changed while training \(rows 8..15 now have 6 written, not 7\)"):
        targets.epoch_order(0, 1)
