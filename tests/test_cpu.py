"""The CPU allocator tuning (zsd.cpu) and the teacher pass's precision.

The allocator tests run in fresh processes: an allocator setting cannot be undone in-process,
and the behaviour asserted is the one that matters: page faults per forward of a small CNN whose
activations (64 MiB each) are larger than glibc's largest dynamic mmap threshold (32 MiB).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_cache import run_cache
from zsd.errors import ZsdError
from zsd.store import open_store
from zsd.teachers import create_teacher, teacher_id

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import json, resource, sys, torch
from zsd.cpu import tune_allocator
{setup}
def faults_per_forward():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(32, 32, 3, padding=1))
    x = torch.randn(8, 3, 256, 256)  # every activation is 64 MiB
    with torch.inference_mode():
        for _ in range(6):  # the heap settles in the first few forwards
            net(x)
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(5):
            net(x)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 5
print(json.dumps({{"applied": applied, "faults": faults_per_forward()}}))
"""


def probe(setup: str, env: dict | None = None) -> dict:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}, **(env or {}),
           "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    out = subprocess.run([sys.executable, "-c", PROBE.format(setup=setup)], env=env, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


PAGES_64MIB = (64 << 20) // 4096


def test_tuned_allocator_stops_the_page_fault_storm():
    default = probe("applied = None")
    assert default["faults"] > PAGES_64MIB  # glibc faults every 64 MiB activation in again: the storm
    tuned = probe("applied = tune_allocator('cpu')")
    assert tuned["applied"] is True
    assert tuned["faults"] < default["faults"] / 10


def test_cuda_devices_and_the_users_own_settings_are_left_alone():
    r = probe("applied = tune_allocator('cuda:0')")
    assert r["applied"] is False and r["faults"] > 0.5 * PAGES_64MIB
    for env in ({"MALLOC_ARENA_MAX": "2"}, {"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"}):
        r = probe("applied = tune_allocator('cpu')", env)
        assert r["applied"] is False and r["faults"] > 0.5 * PAGES_64MIB


def test_a_cpu_teacher_pass_applies_the_tuning(tmp_path, image_folder, tiny_teacher_name):
    setup = (f"from test_cache import run_cache\n"
             f"run_cache([{str(image_folder)!r}], {str(tmp_path / 's.zarr')!r}, {tiny_teacher_name!r}, device='cpu')\n"
             f"applied = None")
    assert probe(setup)["faults"] < probe("applied = None")["faults"] / 10


def test_precision_is_recorded_and_stores_never_mix_precisions(tmp_path, image_folder, tiny_teacher_name):
    run_cache([image_folder], tmp_path / "fp32.zarr", tiny_teacher_name, views=1)
    run_cache([image_folder], tmp_path / "bf16.zarr", tiny_teacher_name, views=1, precision="bf16")
    fp32, bf16 = open_store(tmp_path / "fp32.zarr"), open_store(tmp_path / "bf16.zarr")
    assert fp32.teacher["precision"] == "fp32" and bf16.teacher["precision"] == "bf16"  # auto on CPU is fp32
    assert fp32.teacher_id != bf16.teacher_id
    # fp32 ids are those of stores written before precision was recorded
    assert teacher_id({k: v for k, v in fp32.teacher.items() if k != "precision"}) == fp32.teacher_id
    a, b = fp32.embeddings(view=0).astype(np.float32), bf16.embeddings(view=0).astype(np.float32)
    cos = (a * b).sum(-1)
    assert cos.min() > 0.99 and not np.array_equal(a, b)
    with pytest.raises(ZsdError, match="another teacher.*bf16.*fp32"):
        run_cache([image_folder], tmp_path / "bf16.zarr", tiny_teacher_name, views=1, precision="fp32")
    with pytest.raises(ZsdError, match="--precision fp16"):
        create_teacher(tiny_teacher_name, None, "cpu", precision="fp16")
