"""An image replaced after caching (same name, other pixels) is found where images are read again, never
trained on against the old image's embedding: the store records each row's file size and mtime (#32)."""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import make_image
from test_train import FAST
from zsd.cache import cache_teacher
from zsd.errors import ZsdError
from zsd.store import open_store
from zsd.train import TrainConfig, train
from zsd.verify import verify


def _cache(folder, out, teacher, log=lambda m: None):
    return cache_teacher([str(folder)], str(out), teacher=teacher, pretrained=None, views=1, chunk_rows=4, workers=0,
                         progress=False, log=log)


def _fit(store, run, **fields):
    return train(TrainConfig([str(store)], run_dir=str(run), **{**FAST, "steps": 3, **fields}), progress=False,
                 log=lambda m: None)


def _replace(path, same_size):
    """Other pixels under the same name: of another size, or of the same size with only the mtime to tell."""
    before = path.stat()
    if same_size:
        data = bytearray(path.read_bytes())
        data[-20:-12] = bytes(255 - b for b in data[-20:-12])  # inside the PNG's last chunk: other bytes
        path.write_bytes(bytes(data))
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000))
    else:
        make_image(path, seed=99, size=(50, 50))
    assert path.stat().st_size != before.st_size or same_size


def test_the_store_records_each_rows_file_size_and_mtime(store, image_folder):
    s = open_store(store)
    keys, stats = s.keys(), s.stats()
    want = [(os.stat(image_folder / k).st_size, os.stat(image_folder / k).st_mtime_ns) for k in keys]
    assert stats.dtype == np.int64 and stats.tolist() == [list(w) for w in want]


@pytest.mark.parametrize("same_size", [False, True])
def test_a_replaced_image_stops_train_until_cache_teacher_recomputes_it(image_folder, tmp_path, tiny_teacher_name,
                                                                        same_size):
    store = tmp_path / "s.zarr"
    _cache(image_folder, store, tiny_teacher_name)
    replaced = image_folder / "dog" / "dog_1.jpg"
    row = list(open_store(store).keys()).index("dog/dog_1.jpg")
    assert _fit(store, tmp_path / "before", pixel_cache="yes")["finished"]
    pixels = lambda: sorted(Path(os.environ["ZSD_CACHE"]).glob("pixels/*.npy"))  # noqa: E731
    assert len(pixels()) == 1
    before = open_store(store).embeddings()
    _replace(replaced, same_size)
    what = ("same size, another modification time" if same_size
            else f"{open_store(store).stats()[row][0]} -> {replaced.stat().st_size} bytes")
    line = (f"{replaced} changed after it was cached ({what}): its embedding in {store} is the old image's; rerun "
            f"`zsd cache-teacher` with the store's sources and settings and --out {store} to recompute the changed rows")
    # the pixel cache rendered before holds the old pixels, which the old embeddings are of: consistent
    assert _fit(store, tmp_path / "old_pixels", pixel_cache="yes")["finished"]
    rendered_before = pixels()
    shutil.rmtree(rendered_before[0].parent)
    for pixel_cache in ("yes", "no"):  # rendering the pixel cache, and decoding every batch
        with pytest.raises(ZsdError) as e:
            _fit(store, tmp_path / "run", pixel_cache=pixel_cache, steps=12)
        assert str(e.value) == line, pixel_cache
    assert not list((tmp_path / "run").glob("*.safetensors")) and not list((tmp_path / "run").glob("train_state*"))
    report = verify(str(store), log=lambda m: None)
    assert len(report["problems"]) == 1 and f"first: {replaced} changed after it was cached" in report["problems"][0]

    logged = []
    summary = _cache(image_folder, store, tiny_teacher_name, log=logged.append)
    assert summary["repaired"] == 4 and summary["complete"]  # the chunk of the replaced row
    assert any(f"{replaced} changed after it was cached" in m for m in logged)
    after = open_store(store).embeddings()
    assert not np.array_equal(after[row], before[row])
    others = np.arange(len(before)) != row
    assert np.array_equal(after[others], before[others])  # the teacher recomputes the rest to the same bytes
    # the recomputed row is the new image's: a store cached from scratch from a copy of the folder agrees
    copy = tmp_path / "copy"
    shutil.copytree(image_folder, copy)
    fresh = tmp_path / "fresh.zarr"
    _cache(copy, fresh, tiny_teacher_name)
    assert np.array_equal(open_store(fresh).embeddings()[row], after[row])
    assert verify(str(store), log=lambda m: None)["problems"] == []
    assert _fit(store, tmp_path / "run", pixel_cache="yes")["finished"]
    # rendered again under another name: after a repair, a pixel cache of the old pixels must not be found
    assert len(pixels()) == 1 and pixels()[0].name != rendered_before[0].name


def test_stores_without_the_stat_array_open_train_and_repair_as_before(store, image_folder, tmp_path,
                                                                      tiny_teacher_name):
    """A store made before the array: no check (nothing recorded), everything else as it was."""
    shutil.rmtree(os.path.join(store, "stat"))
    s = open_store(store)
    assert "stat" not in s.arrays and s.stats() is None and s.damaged_chunks() == []
    _replace(image_folder / "dog" / "dog_1.jpg", same_size=False)
    assert verify(store, log=lambda m: None)["problems"] == []
    assert _fit(store, tmp_path / "run")["finished"]
    s.uncommit([0])
    assert _cache(image_folder, store, tiny_teacher_name)["processed"] == 4
    assert "stat" not in open_store(store).arrays


def test_a_garbled_stat_chunk_is_damage_that_cache_teacher_repairs(store, image_folder, tiny_teacher_name):
    s = open_store(store)
    chunk = s.chunk_file("stat", 1)
    chunk.write_bytes(np.full(chunk.stat().st_size // 8, -5, np.int64).tobytes())
    assert verify(store, log=lambda m: None)["damaged_chunks"][0]["array"] == "stat"
    assert _cache(image_folder, store, tiny_teacher_name)["repaired"] == 4
    assert verify(store, log=lambda m: None)["problems"] == []
