"""DDP: two gloo processes under torchrun (as `torchrun --nproc-per-node 2 -m zsd train ...`) against one
process, and the all-reduces of the training loop on the model's device (NCCL reduces only CUDA tensors)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from zsd.cache import cache_teacher
from zsd.dist import all_ranks
from zsd.loader import TrainTargets
from zsd.store import open_store
from zsd.train import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]


def make_store(image_folder, path, teacher):
    cache_teacher([str(image_folder)], str(path), teacher=teacher, pretrained=None, views=2,
                  chunk_rows=4, workers=0, progress=False, log=lambda m: None)
    return path


def child_env(**more):
    """This checkout on the path, one thread: the environment of a rank this test starts."""
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "OMP_NUM_THREADS": "1", **more}


def torchrun(args, nproc=2, check=True, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "zsd", "train", *args]
    res = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=timeout)
    if check:
        assert res.returncode == 0, res.stderr[-3000:]
    return res


def log_steps(run):
    return [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "loss" in r]


def test_two_gloo_processes_train_one_student(image_folder, tmp_path, tiny_teacher_name):
    store = make_store(image_folder, tmp_path / "s.zarr", tiny_teacher_name)
    (image_folder / "cat" / "cat_0.png").write_bytes(b"gone bad")  # one rank will lack a sample
    bad_row = list(open_store(store).keys()).index("cat/cat_0.png")
    # a seed whose 4 epochs have the bad image in some first batches (of 8) and not in others
    targets = TrainTargets([str(store)], log=lambda m: None)
    seed, hit = next((seed, hit) for seed in range(100)
                     for hit in [[bad_row in targets.epoch_order(seed, e)[:8, 1] for e in range(4)]] if 0 < sum(hit) < 4)
    run = tmp_path / "run"
    torchrun(["--targets", str(store), "--student", "test_resnet", "--student-res", "32", "--out", str(run),
              "--steps", "4", "--batch-size", "8", "--accum", "2", "--workers", "0", "--device", "cpu",
              "--precision", "fp32", "--save-every", "2", "--seed", str(seed), "--ema-decay", "0.9"])
    steps = log_steps(run)
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


def test_a_nonfinite_target_on_one_rank_makes_both_skip_its_micro_batch(image_folder, tmp_path, tiny_teacher_name):
    """A NaN target leaves its rank one sample of 2: both ranks skip that micro-batch (BatchNorm needs 2),
    the rank holding it names the row, and the other steps train on all 4 images."""
    store = make_store(image_folder, tmp_path / "s.zarr", tiny_teacher_name)
    open_store(store, mode="r+").group["emb"][7] = np.nan  # both views
    targets = TrainTargets([str(store)], log=lambda m: None)

    def batches(seed):  # 6 steps of 4 samples: 2 epochs of 12 rows; sample i of a batch goes to rank i % 2
        return np.concatenate([targets.epoch_order(seed, e) for e in range(2)])[:, 1].reshape(6, 4)

    seed = next(seed for seed in range(100) if len({tuple(np.flatnonzero(b == 7) % 2) for b in batches(seed)}) == 3)
    run = tmp_path / "run"
    res = torchrun(["--targets", str(store), "--student", "test_resnet", "--student-res", "32", "--out", str(run),
                    "--steps", "6", "--batch-size", "4", "--workers", "0", "--device", "cpu", "--precision", "fp32",
                    "--seed", str(seed), "--lr", "1e-3"])
    steps = log_steps(run)
    assert [r["images"] for r in steps] == [0 if 7 in b else 4 for b in batches(seed)]
    assert steps[-1]["skipped_images"] == 2  # once an epoch
    # this seed puts row 7 on rank 0 in one epoch and on rank 1 in the other: each names it once
    assert res.stderr.count(f"row 7 ({open_store(store).keys()[7]})") == 2 and "non-finite embedding" in res.stderr
    assert all(torch.isfinite(v).all() for v in load_file(str(run / "student.safetensors")).values())


def test_two_processes_compute_what_one_process_computes(image_folder, tmp_path, tiny_teacher_name):
    """Same global batch, seed and fp32: 2 gloo ranks end with the single process's weights and losses.

    The student has no BatchNorm (GroupNorm: per-sample statistics), so a rank's half batch gives
    exactly its share of the global gradient; without the gradient all-reduce each rank would follow
    its own half. The logged loss is the mean over ranks."""
    store = make_store(image_folder, tmp_path / "s.zarr", tiny_teacher_name)
    args = dict(student="test_efficientnet_gn", student_res=32, steps=4, batch_size=8, accum_steps=2, lr=1e-2,
                workers=0, device="cpu", precision="fp32", ema_decay=0.5, seed=3)
    two = tmp_path / "two"
    torchrun(["--targets", str(store), "--student", args["student"], "--student-res", "32", "--out", str(two),
              "--steps", "4", "--batch-size", "8", "--accum", "2", "--lr", "1e-2", "--workers", "0",
              "--device", "cpu", "--precision", "fp32", "--ema-decay", "0.5", "--seed", "3"])
    one = tmp_path / "one"
    train(TrainConfig([str(store)], run_dir=str(one), **args), progress=False, log=lambda m: None)  # 1 thread (conftest)

    # Rounding differs (each rank sums half the batch, gloo adds the halves) and Adam divides by |grad|,
    # which amplifies it where a gradient is near 0. Measured: median |dw| 2e-6, 99th percentile 3e-5,
    # losses within 1e-4; with the gradient all-reduce removed, median |dw| 9e-3 and losses 8 % apart.
    for prefix in ("", "ema_"):
        a, b = load_file(str(one / f"{prefix}student.safetensors")), load_file(str(two / f"{prefix}student.safetensors"))
        assert a.keys() == b.keys()
        dw = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
        assert dw.median() < 1e-5 and dw.quantile(0.99) < 2e-4, (dw.median(), dw.quantile(0.99))
    s1, s2 = log_steps(one), log_steps(two)
    assert [r["images"] for r in s2] == [r["images"] for r in s1] == [8] * 4
    np.testing.assert_allclose([r["loss"] for r in s2], [r["loss"] for r in s1], rtol=1e-4)
    assert s1[-1]["loss"] < 0.5 * s1[0]["loss"]  # the 4 steps did move the weights


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_reductions_run_on_the_models_device(image_folder, tmp_path, tiny_teacher_name, monkeypatch, device):
    """Train inside a single-rank process group of the device's backend (nccl for cuda: there a CPU
    tensor fails), recording every all-reduce: the losses and gradients on the device of the model's
    weights, the per-micro-batch `usable` flag on the CPU in train's gloo group (no wait for the GPU)."""
    store = make_store(image_folder, tmp_path / "s.zarr", tiny_teacher_name)
    seen, real = [], dist.all_reduce
    monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **k: (seen.append((t.device, "group" in k and
                                                                             k["group"] is not None)), real(t, *a, **k))[1])
    store_ = dist.HashStore()
    dist.init_process_group("nccl" if device == "cuda" else "gloo", store=store_, rank=0, world_size=1)
    try:
        train(TrainConfig([str(store)], run_dir=str(tmp_path / "run"), student="test_efficientnet_gn",
                          student_res=32, steps=2, batch_size=4, workers=0, device=device, precision="fp32",
                          losses=["l2", "contrastive-image=0.5"]),
              progress=False, log=lambda m: None)
    finally:
        dist.destroy_process_group()
    model_device = torch.device(device, 0) if device == "cuda" else torch.device("cpu")
    # per step: `usable` of the one micro-batch (gloo group), the losses, and the criterion's temperature gradient
    assert seen == [(torch.device("cpu"), True), (model_device, False), (model_device, False)] * 2


def test_all_ranks_puts_the_value_on_the_given_device(monkeypatch):
    """The helper every scalar reduction goes through builds its tensor on the device it is given
    (a meta tensor here, where no collective could run), not on the CPU."""
    seen = []
    monkeypatch.setattr(dist, "all_reduce", lambda t, op=None, group=None: seen.append((t.device, t.dtype, op)))
    with pytest.raises(NotImplementedError):  # .tolist() of a meta tensor: the reduction itself was recorded
        all_ranks([1.0, True], dist.ReduceOp.MIN, torch.device("meta"))
    assert seen == [(torch.device("meta"), torch.float32, dist.ReduceOp.MIN)]


@pytest.mark.parametrize("in_ram", ["yes", "no"])
def test_each_rank_reads_only_its_own_target_rows(tmp_path, in_ram, monkeypatch):
    """Two ranks' plans over one store: the embedding rows each rank reads are exactly those of its own
    micro-batches, never the whole array (a rank used to load every row of a store in RAM), and
    they hold the stored values."""
    from conftest import random_store, unit

    from zsd.loader import BatchPlan
    from zsd.store import Store

    emb = unit(np.random.default_rng(0).standard_normal((40, 2, 8))).astype(np.float16)
    store = random_store(tmp_path / "s.zarr", emb, chunk_rows=8)
    targets = TrainTargets([str(store.path)], in_ram=in_ram, shuffle_chunks=2, log=lambda m: None)
    monkeypatch.setattr(Store, "embeddings", lambda *a, **k: pytest.fail("read the whole embedding array"))
    read, read_rows = [], Store.read_rows
    monkeypatch.setattr(Store, "read_rows", lambda self, rows, views: (read.append(rows.copy()),
                                                                       read_rows(self, rows, views))[1])
    plans = [BatchPlan(targets, seed=1, batch_size=8, accum=2, world=2, rank=r, start=0, total=10) for r in (0, 1)]
    order = np.concatenate([targets.epoch_order(1, e)[:8 * (40 // 8)] for e in range(2)])
    for step, (a, b) in enumerate(zip(*plans)):  # micro-batch `step` of both ranks
        mine = []
        for batch in (a, b):
            items = np.array(batch, dtype=np.int64)
            read.clear()
            np.testing.assert_array_equal(targets.targets(items).numpy(),
                                          emb[items[:, 1], items[:, 2]].astype(np.float32))
            assert sorted(np.concatenate(read).tolist()) == sorted(items[:, 1].tolist())
            mine.append(items)
        assert len(mine[0]) == len(mine[1]) == 2
        assert not set(map(tuple, mine[0])) & set(map(tuple, mine[1]))  # each rank its half
        micro = order[step * 4:(step + 1) * 4]
        assert sorted(map(tuple, np.concatenate(mine))) == sorted(map(tuple, micro))


SLOW_RANK0 = r'''
import datetime, json, sys, time
import torch.distributed as dist
from zsd import loader, train as t

real_init, real_cache = dist.init_process_group, loader.PixelCache.__init__
# NCCL's and gloo's collectives time out; here after 3 s instead of 10 minutes
dist.init_process_group = lambda *a, **k: real_init(*a, timeout=datetime.timedelta(seconds=3), **k)

def slow_render(self, *a, **k):
    if dist.get_rank() == 0:
        time.sleep(8)  # rank 0 renders the pixel cache for longer than the timeout; rank 1 waits, then reads it
    real_cache(self, *a, **k)

t.PixelCache.__init__ = slow_render
store, run = sys.argv[1:]
summary = t.train(t.TrainConfig([store], run_dir=run, student="test_resnet", student_res=32, steps=2, batch_size=4,
                                workers=0, device="cpu", precision="fp32", pixel_cache="yes", save_every=1),
                  progress=False, log=lambda m: None)
print(json.dumps({"steps": summary["steps"], "group_left": dist.is_initialized()}))
'''


def test_ranks_wait_for_a_long_pixel_cache_render_and_the_group_ends(image_folder, tmp_path, tiny_teacher_name):
    """Rank 0 renders the pixel cache for longer than the process group's timeout while rank 1 waits:
    the wait is in train's own long-timeout gloo group, so the run goes on; DDP is built after it.
    train() ends the group it started, and every rank's generator state is in the checkpoint."""
    store = make_store(image_folder, tmp_path / "s.zarr", tiny_teacher_name)
    script = tmp_path / "slow_rank0.py"
    script.write_text(SLOW_RANK0)
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in (0, 1):
        env = child_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=str(port), ZSD_CACHE=str(tmp_path / "cache"))
        procs.append(subprocess.Popen([sys.executable, str(script), str(store), str(tmp_path / "run")], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        assert json.loads(out.splitlines()[-1]) == {"steps": 2, "group_left": False}
    state = torch.load(tmp_path / "run" / "train_state.pt", weights_only=False)
    ranks = state["rng_ranks"]
    assert len(ranks) == 2 and not torch.equal(ranks[0]["torch"], ranks[1]["torch"])  # each rank its own draws
    assert torch.equal(state["rng"]["torch"], ranks[0]["torch"])


def test_a_second_torchrun_job_into_a_held_run_folder_is_refused(image_folder, tmp_path, tiny_teacher_name):
    """Rank 0 takes the run folder's lock: a resubmitted two-process job is refused in one line naming
    the holder, its other rank does not wait for the setup timeout, and the folder is left as it was."""
    from zsd.store import LOCK, folder_lock

    store = make_store(image_folder, tmp_path / "s.zarr", tiny_teacher_name)
    run = tmp_path / "run"
    run.mkdir()
    with folder_lock(run, wait=False, holder="the first job (a test)"):
        res = torchrun(["--targets", str(store), "--student", "test_resnet", "--student-res", "32", "--out", str(run),
                        "--steps", "2", "--batch-size", "8", "--workers", "0", "--device", "cpu", "--precision",
                        "fp32"], check=False, timeout=120)
    assert res.returncode != 0
    # Rank 1 learns of the refusal and ends (before or as torchrun's SIGTERM reaches it); waiting in a
    # collective, it would ignore SIGTERM until torchrun's SIGKILL 30 s later.
    assert f"zsd: error: {run} is in use by the first job (a test)" in res.stderr, res.stderr[-3000:]
    assert "SIGKILL" not in res.stderr, res.stderr[-3000:]
    assert [p.name for p in run.iterdir()] == [LOCK]
