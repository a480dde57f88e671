"""The CUDA-only branches, checked on the CPU where their logic allows: a torchrun rank's own GPU,
precisions across devices, per-rank generators, TF32, out of memory, host syncs, decode workers and
/dev/shm. What only a GPU shows is a step of tools/gpu_smoke.sh (docs/gpu.md)."""

import json
import os
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch

from student_helpers import make_student
from zsd import cpu, dist as zdist, synth, train as train_module
from zsd.cache import cache_teacher, gpu_batch
from zsd.errors import ZsdError
from zsd.evaluate import evaluate, prepare_test_store
from zsd.store import open_store
from zsd.student import Student
from zsd.teachers import Teacher, create_teacher, exact_fp32, same_teacher
from zsd.train import STATE, TrainConfig, rng_state, set_rng_state, train


@pytest.fixture
def fake_gpus(monkeypatch):
    """torch believes in 2 GPUs; set_device calls are recorded."""
    made_current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", made_current.append)
    return made_current


def torchrun_rank(monkeypatch, rank, world=2):
    for name, value in (("RANK", rank), ("LOCAL_RANK", rank), ("WORLD_SIZE", world)):
        monkeypatch.setenv(name, str(value))


def test_a_torchrun_rank_uses_and_makes_current_its_own_gpu(fake_gpus, monkeypatch, tmp_path):
    torchrun_rank(monkeypatch, 1)
    assert zdist.local_device("auto") == torch.device("cuda", 1)
    assert zdist.local_device("cuda") == torch.device("cuda", 1)  # an explicit --device cuda used to mean GPU 0
    # cuda:0 where the node's processes see both GPUs would put them all on GPU 0 (NCCL's "Duplicate GPU")
    with pytest.raises(ZsdError) as e:
        zdist.local_device("cuda:0")
    assert len(str(e.value).splitlines()) == 1 and "pass --device cuda (or auto)" in str(e.value)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert zdist.local_device("cuda:0") == torch.device("cuda", 0)  # one GPU per task: the user says which
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert zdist.local_device("cpu") == torch.device("cpu")
    assert fake_gpus == [torch.device("cuda", 1)] * 2 + [torch.device("cuda", 0)]
    assert synth._resolve("auto", "auto") == ("cuda:1", torch.float16)

    seen = []

    def teacher_on(name, pretrained, device, precision):
        seen.append(device)
        raise ZsdError("stop here")

    monkeypatch.setattr("zsd.cache.create_teacher", teacher_on)
    (tmp_path / "photos").mkdir()  # sources are checked before the teacher loads: one that exists
    with pytest.raises(ZsdError, match="stop here"):
        cache_teacher([str(tmp_path / "photos")], str(tmp_path / "unused.zarr"), device="cuda")
    assert seen == [torch.device("cuda", 1)] and fake_gpus[-1] == torch.device("cuda", 1)


def test_a_local_rank_beyond_the_visible_gpus_is_one_line(fake_gpus, monkeypatch):
    torchrun_rank(monkeypatch, 2, world=4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    with pytest.raises(ZsdError) as e:
        zdist.local_device("auto")
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and "LOCAL_RANK is 2 but this process sees 2 CUDA device(s)" in msg
    assert "CUDA_VISIBLE_DEVICES=2,3" in msg and "--device cuda:0" in msg and not fake_gpus


def test_stores_of_two_precisions_of_one_teacher(image_folder, tmp_path, tiny_teacher_name):
    """A folder first evaluated on a CPU (fp32) and then on a GPU (bf16) gets a store each; a student
    trained on bf16 (GPU) targets is evaluated against an fp32 (CPU) test store, with a note; another
    teacher is still refused."""
    logs = []
    fp32 = prepare_test_store(str(image_folder), tiny_teacher_name, None, "cpu", 0, False, logs.append)
    bf16 = prepare_test_store(str(image_folder), tiny_teacher_name, None, "cpu", 0, False, logs.append,
                              precision="bf16")
    assert fp32.path != bf16.path and (fp32.teacher["precision"], bf16.teacher["precision"]) == ("fp32", "bf16")
    assert same_teacher(fp32.teacher_id, fp32.teacher, bf16.teacher_id, bf16.teacher) == "precision"
    # the fp32 name is the one zsd used before precision was part of it: existing caches are found again
    assert prepare_test_store(str(image_folder), tiny_teacher_name, None, "cpu", 0, False, logs.append).path == fp32.path
    cos = (fp32.embeddings(view=0).astype(np.float64) * bf16.embeddings(view=0)).sum(-1)
    assert cos.min() > 0.98  # the same teacher, rounded differently

    run = tmp_path / "student_bf16"
    make_student(run, bf16.path, steps=5)
    notes = []
    results = evaluate(str(fp32.path), [str(run)], device="cpu", progress=False, log=notes.append)
    assert [r["role"] for r in results] == ["teacher", "student"]
    assert any(n.startswith("note: student") and "learnt bf16 targets" in n and "fp32 embeddings" in n for n in notes)

    other = tmp_path / "other"
    torch.manual_seed(1)
    make_student(other, fp32.path)
    cfg = json.loads((other / "student.json").read_text())
    cfg["teacher"] = {**cfg["teacher"], "weights": "sha256:another"}
    cfg["teacher_id"] = "0123456789abcdef"
    (other / "student.json").write_text(json.dumps(cfg))
    with pytest.raises(ZsdError, match="was distilled from teacher 0123456789abcdef"):
        evaluate(str(fp32.path), [str(other)], device="cpu", progress=False, log=notes.append)


def test_targets_of_two_precisions_of_one_teacher_train_one_student(image_folder, tmp_path, tiny_teacher_name):
    """Several --targets of one teacher, one cached at fp32 and one at bf16 (a CPU and a GPU pass): one
    student, with a note; a store of another teacher beside them is still refused."""
    from zsd.loader import TrainTargets
    fp32 = prepare_test_store(str(image_folder), tiny_teacher_name, None, "cpu", 0, False, lambda m: None)
    bf16 = prepare_test_store(str(image_folder), tiny_teacher_name, None, "cpu", 0, False, lambda m: None,
                              precision="bf16")
    notes = []
    targets = TrainTargets([str(fp32.path), str(bf16.path)], log=notes.append)
    assert targets.rows_per_epoch == fp32.rows + bf16.rows
    assert notes == ["note: the --targets stores hold one teacher's embeddings at bf16 and fp32 precision"]
    other = tmp_path / "other.zarr"
    shutil.copytree(fp32.path, other)
    meta = json.loads((other / "zarr.json").read_text())
    meta["attributes"]["zsd"]["teacher"]["weights"] = "sha256:another"
    meta["attributes"]["zsd"]["teacher_id"] = "0123456789abcdef"
    (other / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(ZsdError, match="come from different teachers"):
        TrainTargets([str(bf16.path), str(other)], log=notes.append)


def test_init_and_resume_across_precisions_of_one_teacher(image_folder, tmp_path, tiny_teacher_name):
    """--init a student distilled on a CPU (fp32 targets) for a GPU's bf16 targets of the same teacher, and
    --resume a run whose store was recomputed at bf16: both go on with a note, neither says "another teacher"."""
    fp32 = prepare_test_store(str(image_folder), tiny_teacher_name, None, "cpu", 0, False, lambda m: None)
    bf16 = prepare_test_store(str(image_folder), tiny_teacher_name, None, "cpu", 0, False, lambda m: None,
                              precision="bf16")
    args = dict(student_res=32, batch_size=4, workers=0, device="cpu", save_every=100)
    train(TrainConfig([str(fp32.path)], run_dir=str(tmp_path / "stage1"), student="test_resnet", steps=2, **args),
          progress=False, log=lambda m: None)
    notes = []
    train(TrainConfig([str(bf16.path)], run_dir=str(tmp_path / "stage2"), init_from=str(tmp_path / "stage1"),
                      steps=1, **args), progress=False, log=notes.append)
    assert any(n.startswith(f"note: --init {tmp_path / 'stage1'} learnt fp32 targets") and "bf16" in n for n in notes)
    assert json.loads((tmp_path / "stage2" / "student.json").read_text())["teacher"]["precision"] == "bf16"

    targets = tmp_path / "targets.zarr"
    shutil.copytree(fp32.path, targets)
    cfg = TrainConfig([str(targets)], run_dir=str(tmp_path / "run"), student="test_resnet", steps=4, **args)
    train(cfg, stop_after=2, progress=False, log=lambda m: None)
    shutil.rmtree(targets)
    shutil.copytree(bf16.path, targets)  # the same images, the teacher pass redone on a GPU
    notes = []
    assert train(cfg, resume=True, progress=False, log=notes.append)["steps"] == 4
    assert any(n.startswith(f"note: --resume: {tmp_path / 'run'} learnt fp32 targets") for n in notes)


def test_rng_state_carries_the_cuda_generator(monkeypatch):
    """On a GPU the CUDA generator (drop-path masks) is saved and restored with the others; a CPU
    generator stands in for it here. A checkpoint from a CPU (no CUDA state) restores the rest."""
    stand_in = torch.Generator().manual_seed(5)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda dev: stand_in.get_state())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, dev: stand_in.set_state(state))
    gpu = torch.device("cuda", 0)
    torch.manual_seed(0)
    saved = rng_state(gpu)
    assert set(saved) == {"torch", "numpy", "python", "cuda"}
    first = (torch.rand(3), torch.rand(3, generator=stand_in))
    torch.rand(10, generator=stand_in)
    set_rng_state(saved, gpu)
    assert torch.equal(torch.rand(3), first[0]) and torch.equal(torch.rand(3, generator=stand_in), first[1])
    set_rng_state({k: v for k, v in saved.items() if k != "cuda"}, gpu)
    assert torch.equal(torch.rand(3), first[0])
    assert "cuda" not in rng_state(torch.device("cpu"))


def test_fp32_passes_run_without_tf32(tiny_teacher_name, monkeypatch):
    """cuDNN's TF32 (on by default) is off during an fp32 teacher forward and restored after;
    bf16 leaves the flags alone."""
    flags = lambda: (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    before = flags()
    during = []
    teacher = create_teacher(tiny_teacher_name, None, "cpu", "fp32")
    forward = teacher._forward
    monkeypatch.setattr(teacher, "_forward", lambda x: (during.append(flags()), forward(x))[1])
    torch.backends.cudnn.allow_tf32 = True
    try:
        teacher.encode_images(torch.zeros(2, 3, 32, 32))
        assert during == [(False, False)] and flags() == (True, before[1])
        teacher.precision = "bf16"
        teacher.encode_images(torch.zeros(2, 3, 32, 32))
        assert during[-1] == (True, before[1])
        with pytest.raises(KeyError), exact_fp32():
            raise KeyError
        assert flags() == (True, before[1])
    finally:
        torch.backends.cudnn.allow_tf32 = before[0]


def oom(*a, **k):
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


def test_out_of_memory_in_the_teacher_pass_is_one_line_and_resumable(image_folder, tmp_path, tiny_teacher_name,
                                                                      monkeypatch, capsys):
    """The chunks written before stay, the rest stay pending, and a rerun completes the store."""
    from zsd.cli import main as cli_main

    out = tmp_path / "s.zarr"
    real, calls = Teacher.encode_images, []

    def fail_third(self, x):
        calls.append(len(x))
        return oom() if len(calls) == 3 else real(self, x)

    monkeypatch.setattr(Teacher, "encode_images", fail_third)
    with pytest.raises(SystemExit) as e:
        cli_main(["cache-teacher", str(image_folder), "--out", str(out), "--teacher", tiny_teacher_name,
                  "--batch-size", "4", "--chunk-rows", "4", "--workers", "0", "--device", "cpu"])
    err = [line for line in capsys.readouterr().err.splitlines() if line and "img/s" not in line]  # no progress bar
    assert e.value.code == 1 and err == ["zsd: error: out of memory on cpu in the teacher forward of 4 views: "
                                         "lower --batch-size"]
    assert open_store(out).status_per_chunk().sum(0).tolist() == [4, 8, 0]  # pending, written, failed
    monkeypatch.setattr(Teacher, "encode_images", real)
    assert cache_teacher([str(image_folder)], str(out), teacher=tiny_teacher_name, batch_size=4, chunk_rows=4,
                         workers=0, device="cpu", progress=False, log=lambda m: None)["complete"]


def test_out_of_memory_in_training_names_the_batch_flags(image_folder, tmp_path, tiny_teacher_name, monkeypatch):
    store = tmp_path / "s.zarr"
    cache_teacher([str(image_folder)], str(store), teacher=tiny_teacher_name, views=2, workers=0, device="cpu",
                  progress=False, log=lambda m: None)
    monkeypatch.setattr(Student, "forward", oom)
    with pytest.raises(ZsdError) as e:
        train(TrainConfig([str(store)], run_dir=str(tmp_path / "run"), student="test_resnet", student_res=32,
                          steps=2, batch_size=4, workers=0, device="cpu"), progress=False, log=lambda m: None)
    assert str(e.value) == ("out of memory on cpu in a training step of 4 images per process (test_resnet at 32 px): "
                            "lower --batch-size or raise --accum (a step's images per process are --batch-size / "
                            "(--accum x processes))")
    assert not list((tmp_path / "run").glob("*.tmp")) and not (tmp_path / "run" / STATE).exists()


def test_host_syncs_only_every_log_interval_whatever_the_accumulation(image_folder, tmp_path, tiny_teacher_name,
                                                                       monkeypatch):
    """The steps keep their figures on the device; the log reads them back every LOG_EVERY steps (and at the
    end) in one .tolist(). Counted: every .item/.tolist/.cpu/.numpy and torch.tensor/as_tensor called from
    zsd's own code during a run, but the loader's (its .numpy() views of host tensors: store rows and the
    pinned pixel buffer, before they go to the device), 3 steps against 9 (the setup and the last checkpoint
    are the same in both): 6 steps more cost 2 syncs (the reads at steps 4 and 8), with 1 or 4 micro-batches."""
    store = tmp_path / "s.zarr"
    cache_teacher([str(image_folder)], str(store), teacher=tiny_teacher_name, views=2, workers=0, device="cpu",
                  progress=False, log=lambda m: None)
    monkeypatch.setattr(train_module, "LOG_EVERY", 4)
    zsd_dir, counts, key = str(Path(train_module.__file__).parent), {}, [None]
    host_side = str(Path(zsd_dir) / "loader.py")

    def counting(owner, name):
        real = getattr(owner, name)

        def counted(*a, **k):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(zsd_dir) and caller != host_side:
                counts[key[0]] = counts.get(key[0], 0) + 1
            return real(*a, **k)
        monkeypatch.setattr(owner, name, counted)
    for name in ("item", "tolist", "cpu", "numpy"):
        counting(torch.Tensor, name)
    for name in ("tensor", "as_tensor"):  # a tensor built from Python values: a blocking copy to a GPU
        counting(torch, name)
    for accum in (1, 4):
        for steps in (3, 9):
            key[0] = (accum, steps)
            train(TrainConfig([str(store)], run_dir=str(tmp_path / f"a{accum}s{steps}"), student="test_resnet",
                              student_res=32, steps=steps, batch_size=8, accum_steps=accum, workers=0, device="cpu",
                              save_every=100, losses=["l2", "contrastive-image=0.5"]),
                  progress=False, log=lambda m: None)
    assert counts[1, 9] - counts[1, 3] == counts[4, 9] - counts[4, 3] == 2, counts
    logged = [json.loads(x) for x in (tmp_path / "a4s9" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == list(range(1, 10))  # every step is still a record


@pytest.mark.parametrize("where", ["optimizer", "model.to", "ema", "ddp"])
def test_out_of_memory_while_setting_up_or_stepping_is_one_line(where, image_folder, tmp_path, tiny_teacher_name,
                                                                monkeypatch):
    """AdamW's first step (it allocates its state then), moving the student, the EMA copy and DDP's buckets:
    each is one line naming what ran out and what to change, and no checkpoint is written."""
    import torch.distributed as dist
    store = tmp_path / "s.zarr"
    cache_teacher([str(image_folder)], str(store), teacher=tiny_teacher_name, views=2, workers=0, device="cpu",
                  progress=False, log=lambda m: None)
    target, expect = {"optimizer": ((torch.optim.AdamW, "step"), "the optimizer's step 1"),
                      "model.to": ((Student, "to"), "moving the test_resnet student to it"),
                      "ema": ((train_module, "ModelEmaV3"), "the EMA copy of the test_resnet student"),
                      "ddp": ((torch.nn.parallel, "DistributedDataParallel"), "setting up DDP")}[where]
    monkeypatch.setattr(*target, oom)
    if where == "ddp":
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(ZsdError) as e:
            train(TrainConfig([str(store)], run_dir=str(tmp_path / "run"), student="test_resnet", student_res=32,
                              steps=2, batch_size=4, workers=0, device="cpu", ema_decay=0.9), progress=False,
                  log=lambda m: None)
    finally:
        if where == "ddp":
            dist.destroy_process_group()
    msg = str(e.value)
    assert msg.startswith(f"out of memory on cpu in {expect}") and len(msg.splitlines()) == 1, msg
    assert ("--ema-decay 0" in msg) == (where == "ema") and "--student" in msg
    assert not (tmp_path / "run" / STATE).exists()


def test_out_of_memory_in_robustness_and_verify_is_one_line(image_folder, tmp_path, tiny_teacher_name, monkeypatch):
    from zsd.robustness import embed_pixels
    from zsd.verify import verify
    from zsd.views import Preprocess
    pre = Preprocess(32, 32, "bicubic", [0.5] * 3, [0.5] * 3)
    with pytest.raises(ZsdError, match=r"^out of memory on cpu in a forward of 2 images: lower --batch-size$"):
        embed_pixels(np.zeros((3, 32, 32, 3), np.uint8), np.array([True, True, False]), oom, pre, 8, "cpu")
    store = tmp_path / "s.zarr"
    cache_teacher([str(image_folder)], str(store), teacher=tiny_teacher_name, workers=0, device="cpu",
                  progress=False, log=lambda m: None)
    monkeypatch.setattr(Teacher, "encode_images", oom)
    with pytest.raises(ZsdError) as e:
        verify(str(store), recompute=2, device="cpu", log=lambda m: None)
    assert str(e.value) == ("out of memory on cpu in the teacher forward of 2 views: free the device, or recompute "
                            "on the CPU (--device cpu)")


def test_student_embeddings_are_exact_fp32_on_any_device(monkeypatch):
    """A student's eval pass runs without cuDNN's TF32, like the teacher's fp32 pass, so its cached embeddings
    are one computation on a CPU and a GPU; the record says fp32 and its id is the one it had before."""
    from zsd.student import student_fingerprint
    from zsd.teachers import teacher_id
    flags = lambda: (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    model, during = Student("test_resnet", 8, 32).eval(), []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda x: (during.append(flags()), forward(x))[1])
    before = flags()
    torch.backends.cudnn.allow_tf32 = True
    try:
        model.encode_images(torch.zeros(2, 3, 32, 32))
        assert during == [(False, False)] and flags() == (True, before[1])
    finally:
        torch.backends.cudnn.allow_tf32 = before[0]
    config = {"student": "test_resnet", "preprocess": {"size": 32}, "embed_dim": 8, "teacher_id": "t",
              "weights_sha256": "ab"}
    fp = student_fingerprint("unused", config)
    assert fp["precision"] == "fp32"
    assert teacher_id(fp) == teacher_id({k: v for k, v in fp.items() if k != "precision"})  # caches stay valid


def test_shards_and_a_fixed_gpu_under_torchrun_are_one_line(monkeypatch, fake_gpus):
    torchrun_rank(monkeypatch, 1)
    for flags in ((4, None), (None, 2), (4, 2)):
        with pytest.raises(ZsdError) as e:
            zdist.shard(*flags)
        assert "under torchrun" in str(e.value) and "drop --num-shards/--shard-index" in str(e.value)
    assert zdist.shard(None, None) == (2, 1)  # torchrun's ranks are the shards
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # one process per node (multi-node): its GPU 0 is its own
    assert zdist.local_device("cuda:0") == torch.device("cuda", 0)


def test_set_up_waits_have_the_long_timeout_and_the_steps_the_default(monkeypatch):
    """The 12 h timeout is for the set-up waits only: the per-micro-batch all-reduce of `usable` runs in a
    gloo group with the default timeout, so a hung rank stops the job in minutes."""
    import torch.distributed as dist
    made, real_new = [], dist.new_group
    monkeypatch.setattr(dist, "new_group", lambda *a, **k: (made.append(k.get("timeout")), real_new(*a, **k))[1])
    reduced, real_reduce = [], dist.all_reduce
    monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **k: (reduced.append(k.get("group")), real_reduce(t, *a, **k))[1])
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        ranks = zdist.join_ranks("cpu")
        assert made == [zdist.SETUP_TIMEOUT, None]
        assert ranks.all_agree(True) and reduced == [ranks.steps] and ranks.steps is not ranks.setup
        ranks.end()
    finally:
        dist.destroy_process_group()


def test_each_nodes_first_rank_renders_the_pixel_cache_into_its_own_cache_dir(image_folder, tmp_path,
                                                                              tiny_teacher_name, monkeypatch):
    """On a second node (rank 2, LOCAL_RANK 0) the node's first rank renders into its node's (empty) cache dir
    after rank 0's render; rank 3 (LOCAL_RANK 1) opens it; where the render fails, the node's first rank says
    so, and with --pixel-cache yes every rank refuses."""
    from types import SimpleNamespace
    from zsd.loader import StudentInputs, TrainTargets
    from zsd.views import Preprocess
    store = tmp_path / "s.zarr"
    cache_teacher([str(image_folder)], str(store), teacher=tiny_teacher_name, views=2, workers=0, device="cpu",
                  progress=False, log=lambda m: None)
    monkeypatch.setenv("ZSD_CACHE", str(tmp_path / "node2_cache"))
    targets = TrainTargets([str(store)], log=lambda m: None)
    views = StudentInputs(targets, Preprocess.from_dict({**targets.teacher["preprocess"], "size": 32}))
    events = []

    def node_rank(rank, local, pixel_cache="auto"):
        ranks = SimpleNamespace(rank=rank, local=local, main=rank == 0, barrier=lambda: events.append("wait"),
                                all_agree=lambda flag: flag)
        return SimpleNamespace(config=SimpleNamespace(pixel_cache=pixel_cache), ranks=ranks, data=targets)
    notes = []
    first = train_module._pixel_cache(node_rank(2, 0), views, 0, False, notes.append)
    assert first is not None and events == ["wait", "wait"]  # rendered between rank 0's render and the others'
    assert any("rendered into" in n and str(tmp_path / "node2_cache") in n for n in notes)
    other = train_module._pixel_cache(node_rank(3, 1), views, 0, False, notes.append)
    assert np.array_equal(other.pixels, first.pixels)
    shutil.rmtree(tmp_path / "node2_cache")
    (tmp_path / "node2_cache").write_text("a file, not a folder")
    notes.clear()
    assert train_module._pixel_cache(node_rank(2, 0), views, 0, False, notes.append) is None
    assert len(notes) == 1 and notes[0].startswith("note: no pixel cache:")
    with pytest.raises(ZsdError, match="--pixel-cache yes: .*pass --pixel-cache no"):
        train_module._pixel_cache(node_rank(3, 1, "yes"), views, 0, False, notes.append)


def test_decode_workers_follow_the_cores_of_each_gpus_share(monkeypatch):
    monkeypatch.setattr(cpu.os, "sched_getaffinity", lambda pid: set(range(32)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert cpu.decode_workers("cuda") == 16 and cpu.decode_workers("cpu") == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # 8 GPUs share 32 cores: 4 each, one for the main process
    assert cpu.decode_workers("cuda:3") == 3
    monkeypatch.setattr(cpu.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert cpu.decode_workers("cuda") == 1 and cpu.decode_workers("cpu") == 1


def test_the_pixel_cache_render_takes_the_whole_nodes_cores(monkeypatch):
    """One rank per node renders while the others wait: it decodes with the node's cores, not one GPU's share."""
    monkeypatch.setattr(cpu.os, "sched_getaffinity", lambda pid: set(range(32)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert cpu.decode_workers("cuda") == 3 and cpu.render_workers("cuda") == 31
    assert cpu.render_workers("cpu") == cpu.decode_workers("cpu") == 4


def test_teacher_batches_on_a_gpu_shrink_with_the_input_size():
    assert [gpu_batch(s) for s in (32, 224, 256, 336, 448, 1024)] == [256, 256, 128, 64, 64, 16]


def test_too_little_shared_memory_for_the_workers_is_one_line(image_folder, tmp_path, tiny_teacher_name, monkeypatch):
    """A container's 64 MiB /dev/shm: decode workers would die with 'Bus error'."""
    store = tmp_path / "s.zarr"
    cache_teacher([str(image_folder)], str(store), teacher=tiny_teacher_name, workers=0, device="cpu",
                  progress=False, log=lambda m: None)
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(64 << 20, 0, 4096))
    with pytest.raises(ZsdError) as e:
        train(TrainConfig([str(store)], run_dir=str(tmp_path / "run"), student="test_resnet", student_res=32,
                          steps=1, batch_size=4, workers=2, device="cpu", pixel_cache="no"),
              progress=False, log=lambda m: None)
    assert "/dev/shm has 0 MiB free" in str(e.value) and "--shm-size=1g" in str(e.value)
    assert "--workers 0" in str(e.value) and not (tmp_path / "run" / STATE).exists()
    with pytest.raises(ZsdError, match="2 decode workers keep about"):
        cache_teacher([str(image_folder)], str(tmp_path / "t.zarr"), teacher=tiny_teacher_name, workers=2,
                      device="cpu", progress=False, log=lambda m: None)


def test_the_pixel_cache_render_fits_its_batches_to_shared_memory(image_folder, tmp_path, tiny_teacher_name,
                                                                     monkeypatch):
    """The render's batch size is zsd's own: it shrinks to what /dev/shm holds, and where not even a
    small batch fits, the render stays in the main process instead of dying with 'Bus error'."""
    Usage = namedtuple("Usage", "total used free")
    shm, real_usage = tmp_path / "shm", shutil.disk_usage
    shm.mkdir()
    room = {"free": 64 << 20}
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(64 << 20, 0, room["free"]) if str(p) == str(shm)
                        else real_usage(p))
    sample = 3 * 224 * 224
    # 64 MiB, 4 workers x 2 batches in flight, half of the room: 64 MiB / 2 / 8 / 150528 B = 27 samples
    assert cpu.shared_memory_batch(4, sample, 2, 256, path=str(shm)) == (4, 27)
    room["free"] = 1 << 20
    assert cpu.shared_memory_batch(4, sample, 2, 256, path=str(shm)) == (0, 256)
    assert cpu.shared_memory_batch(0, sample, 2, 256, path=str(shm)) == (0, 256)
    # the render asked for 2 workers with no room: no worker starts, the pixels are the loader's
    room["free"] = 4096
    from zsd.loader import PixelCache, StudentInputs, TrainTargets
    from zsd.views import Preprocess
    real_fit = cpu.shared_memory_batch
    monkeypatch.setattr("zsd.loader.shared_memory_batch", lambda *a, **k: real_fit(*a, **k, path=str(shm)))
    store = tmp_path / "s.zarr"
    cache_teacher([str(image_folder)], str(store), teacher=tiny_teacher_name, views=2, workers=0, device="cpu",
                  progress=False, log=lambda m: None)
    started = []
    real_iter = torch.utils.data.DataLoader._get_iterator
    monkeypatch.setattr(torch.utils.data.DataLoader, "_get_iterator",
                        lambda self: started.append(self.num_workers) or real_iter(self))
    targets = TrainTargets([str(store)], log=lambda m: None)
    inputs = StudentInputs(targets, Preprocess.from_dict({**targets.teacher["preprocess"], "size": 32}))
    cache = PixelCache(targets, inputs, workers=2, progress=False, log=lambda m: None)
    assert started == [0]
    items = np.array([(0, r, v) for r in range(open_store(str(store)).rows) for v in range(2)])
    assert torch.equal(torch.from_numpy(cache.pixels[cache.slots(items)]),
                       torch.stack([inputs.student_pixels(i) for i in items]))


def test_pixel_cache_batches_are_gathered_ahead_in_a_thread(image_folder, tmp_path, tiny_teacher_name):
    """Gathered ahead by a thread: the same batches in the same order as gathered one at a time, and
    a consumer that stops early leaves nothing running."""
    import threading
    from zsd.loader import BatchPlan, PixelCache, StudentInputs, TrainTargets
    from zsd.views import Preprocess
    store = tmp_path / "s.zarr"
    cache_teacher([str(image_folder)], str(store), teacher=tiny_teacher_name, views=2, workers=0, device="cpu",
                  progress=False, log=lambda m: None)
    targets = TrainTargets([str(store)], log=lambda m: None)
    inputs = StudentInputs(targets, Preprocess.from_dict({**targets.teacher["preprocess"], "size": 32}))
    cache = PixelCache(targets, inputs, progress=False, log=lambda m: None)
    plan = BatchPlan(targets, seed=3, batch_size=4, accum=2, world=1, rank=0, start=0, total=7)
    threads, real_gather = set(), cache._gather
    cache._gather = lambda *a: threads.add(threading.current_thread().name) or real_gather(*a)
    ahead, serial = list(cache.batches(plan, ahead=2)), list(cache.batches(plan, ahead=0))
    assert len(ahead) == len(serial) == len(plan) == 14
    for (i, p, e), (i0, p0, e0) in zip(ahead, serial):
        assert np.array_equal(i, i0) and torch.equal(p, p0) and e == e0
    # the pixels are the ones rendered for those samples
    items = np.concatenate([b[0] for b in ahead])
    assert torch.equal(torch.cat([b[1] for b in ahead]), torch.stack([inputs.student_pixels(i) for i in items]))
    assert threads and all(t.startswith("zsd-pixel-cache") for t in threads)
    gen = cache.batches(plan)
    next(gen)
    gen.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("zsd-pixel-cache")]


REPO = Path(__file__).resolve().parents[1]


def test_gpu_smoke_runs_its_sequence_on_the_cpu(tmp_path):
    """tools/gpu_smoke.sh --device cpu: every step of the GPU check at a small size, one table, the JSON
    under $OUT, and its work folder removed."""
    env = {**os.environ, "OUT": str(tmp_path / "out"), "TMPDIR": str(tmp_path / "tmp")}
    (tmp_path / "tmp").mkdir()
    res = subprocess.run(["bash", str(REPO / "tools" / "gpu_smoke.sh"), "--device", "cpu"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu_smoke.json").read_text())
    results = {s["step"]: s["result"] for s in report["steps"]}
    assert results == {"teacher fp32/bf16": "pass", "TF32 conv teacher": "pass", "cache pass": "pass",
                       "train + resume": "pass", "host syncs": "skip", "out of memory": "skip",
                       "pytest -k cuda": "skip", "torchrun 2 GPUs": "skip", "eval CPU then dev": "pass",
                       "coverage": "pass", "robustness": "pass", "verify --recompute": "pass",
                       "export + parity": "pass"}
    assert report["failed"] == [] and report["device"] == "cpu"
    assert set(report["speed"]) == {"cache_pass_img_s", "teacher_forward_img_s", "train_img_s",
                                    "student_step_img_s", "decode_img_s_per_core"}
    assert all(v > 0 for v in report["speed"].values())
    assert "resumed within 0.0e+00" in res.stdout  # on a CPU the resumed run is the same computation
    assert set(report["speed_verdicts"]) == {"cache_pass_img_s", "train_img_s"}
    assert all(v in ("ok", "SLOW") for v in report["speed_verdicts"].values())
    table = res.stdout[res.stdout.index("\nstep"):]
    assert all(f"{name:<20}" in table for name in results) and "all steps passed" in res.stdout
    assert not list((tmp_path / "tmp").glob("zsd_gpu_smoke_*"))  # the work folder is gone


def test_gpu_smoke_without_the_cuda_device_is_one_line(tmp_path):
    """Asked for CUDA where torch sees none (the suite hides the GPUs): one line, exit 1, nothing written."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TMPDIR": str(tmp_path), "OUT": str(tmp_path / "out")}
    res = subprocess.run(["bash", str(REPO / "tools" / "gpu_smoke.sh")], env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 1 and res.stdout == ""
    assert len(res.stderr.splitlines()) == 1
    assert res.stderr.startswith("zsd: error: tools/gpu_smoke.sh --device cuda needs a CUDA device")
    assert "--device cpu" in res.stderr and list(tmp_path.iterdir()) == []
