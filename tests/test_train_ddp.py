"""DDP on CPU: two gloo processes under torchrun, as `torchrun --nproc-per-node 2 -m zsd train ...`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from zsd.cache import cache_teacher

REPO = Path(__file__).resolve().parents[1]


def test_two_gloo_processes_train_one_student(image_folder, tmp_path, tiny_teacher_name):
    store = tmp_path / "s.zarr"
    cache_teacher([str(image_folder)], str(store), teacher=tiny_teacher_name, pretrained=None, views=2,
                  chunk_rows=4, workers=0, progress=False, log=lambda m: None)
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "zsd",
           "train", "--targets", str(store), "--student", "test_resnet", "--student-res", "32", "--out", str(run),
           "--steps", "4", "--batch-size", "4", "--workers", "0", "--device", "cpu", "--precision", "fp32",
           "--save-every", "2"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    records = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    # rank 0 alone logs, once per step; each step's batch of 4 came from both ranks (2 + 2)
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(r["images"] == 4 for r in steps)
    w = load_file(str(run / "student.safetensors"))
    assert all(torch.isfinite(v).all() for v in w.values())
    assert json.loads((run / "student.json").read_text())["train_args"]["world_size"] == 2
    assert not list(run.glob("*.tmp"))
