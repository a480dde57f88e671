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
