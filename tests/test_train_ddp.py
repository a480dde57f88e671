"""DDP on CPU: two gloo processes under torchrun, as `torchrun --nproc-per-node 2 -m zsd train ...`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from zsd.cache import cache_teacher
from zsd.data import TrainTargets
from zsd.store import open_store

REPO = Path(__file__).resolve().parents[1]


def test_two_gloo_processes_train_one_student(image_folder, tmp_path, tiny_teacher_name):
    store = tmp_path / "s.zarr"
    cache_teacher([str(image_folder)], str(store), teacher=tiny_teacher_name, pretrained=None, views=2,
                  chunk_rows=4, workers=0, progress=False, log=lambda m: None)
    (image_folder / "cat" / "cat_0.png").write_bytes(b"gone bad")  # one rank will lack a sample
    bad_row = list(open_store(store).keys()).index("cat/cat_0.png")
    # a seed whose 4 epochs have the bad image in some first batches (of 8) and not in others
    targets = TrainTargets([str(store)], log=lambda m: None)
    seed, hit = next((seed, hit) for seed in range(100)
                     for hit in [[bad_row in targets.epoch_order(seed, e)[:8, 1] for e in range(4)]] if 0 < sum(hit) < 4)
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "zsd",
           "train", "--targets", str(store), "--student", "test_resnet", "--student-res", "32", "--out", str(run),
           "--steps", "4", "--batch-size", "8", "--accum", "2", "--workers", "0", "--device", "cpu",
           "--precision", "fp32", "--save-every", "2", "--seed", str(seed), "--ema-decay", "0.9"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    records = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    # rank 0 alone logs, once per step. Each step (one epoch of 12 rows: 8 used) is 2 micro-batches of
    # 4 images, 2 per rank; where the bad image falls, its rank has 1 sample, so both ranks skip that micro-batch.
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert [r["images"] for r in steps] == [4 if h else 8 for h in hit]
    assert steps[-1]["skipped_images"] == sum(hit)
    for prefix in ("", "ema_"):
        w = load_file(str(run / f"{prefix}student.safetensors"))
        assert all(torch.isfinite(v).all() for v in w.values())
    assert json.loads((run / "student.json").read_text())["world_size"] == 2
    assert not list(run.glob("*.tmp"))
