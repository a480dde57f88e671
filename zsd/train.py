"""The trainer: a timm student regresses the cached teacher embeddings of one or more stores.

    zsd train --targets cache/pets.zarr --student tiny_vit_11m_224 --out runs/pets

A run is defined by one `TrainConfig` (zsd.train_config; the CLI builds its options from it); `train(config)`
runs it: `plan_run` (targets, steps, student, resume state), `build_student`, `open_inputs` (pixel cache
or DataLoader), then the loop in `_train`, one `train_step` per optimizer step.

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
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader
from tqdm import tqdm

from zsd.classes import class_prototype_embeddings, class_text_embeddings
from zsd.cpu import check_shared_memory, decode_workers, render_workers, tune_allocator
from zsd.dist import Ranks, join_ranks
from zsd.errors import ZsdError, atomic_file, check_at_least, check_writable, out_of_memory, write_atomic
from zsd.loader import (BatchPlan, NoRoom, PixelCache, StudentInputs, TrainTargets, collate, ram_budget,
                        stop_on_replaced)
from zsd.losses import LOSSES, Criterion, needs_text
from zsd.student import (EMA_PREFIX, Student, _unwrap, config_problem, load_pretrained_backbone, load_student,
                         save_student, student_preprocess)
from zsd.store import LOCK, folder_lock
from zsd.teachers import same_teacher
from zsd.train_config import (TrainConfig, resolve_defaults, resume_conflicts, run_definition,  # noqa: F401
                              total_steps)  # (zsd.train.TrainConfig)
from zsd.views import Preprocess, normalize

STATE, LOG = "train_state.pt", "log.jsonl"
# Steps between the log's reads of the training figures from the device (a host sync each; also at a
# checkpoint and at the end).
LOG_EVERY = 10


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


def checkpoint(run, step: int) -> None:
    """Every rank's random generators to rank 0, which saves the run at `step`."""
    rng = run.ranks.gather(rng_state(run.device))
    if run.ranks.main:
        save_checkpoint(run.dir, run.model, run.ema, run.criterion, run.optimizer, run.meta, step, rng=rng)


def lr_at(step: int, base: float, warmup: int, total: int, schedule: str) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    if schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return base * 0.5 * (1 + math.cos(math.pi * progress))
    return base


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


def _pinned(x: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """`x` on `dev`; from pinned memory on a GPU, so the copy does not wait for the GPU to finish."""
    return x.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else x.to(dev)


def train(config: TrainConfig, *, resume: bool = False, stop_after: int | None = None, progress: bool = True,
          log=print) -> dict:
    """Run `config`; returns a summary dict (see `_summary`).

    `resume=True` continues the run in config.run_dir as if it had never stopped (the config must
    define the same run). `stop_after` ends this invocation after that many steps with a checkpoint
    (job time limits).

    The run folder's lock (RUN_DIR/zsd.lock, held by rank 0 while it runs) refuses a second run
    into the same folder in one line naming the first; a run that fails before it wrote anything
    leaves no folder behind.
    """
    t_start = time.perf_counter()
    run_dir = Path(config.run_dir)
    ranks = join_ranks(config.device)
    try:  # whatever ends the run, its process groups end with it
        return _start(config, ranks, run_dir, t_start, resume=resume, stop_after=stop_after, progress=progress,
                      log=log)
    finally:
        ranks.end()


def _start(config: TrainConfig, ranks: Ranks, run_dir: Path, t_start: float, **how) -> dict:
    """Rank 0 takes the run folder (and tells the others if it cannot), then every rank trains."""
    if not ranks.main:
        refusal = ranks.rank0_says(None)
        if refusal:
            raise ZsdError(refusal)
        return _train(config, ranks, t_start, **how)
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
            ranks.rank0_says(str(e) if isinstance(e, ZsdError) else
                             f"rank 0 could not start: {type(e).__name__}: {e}")
            raise
        ranks.rank0_says(None)
        return _train(config, ranks, t_start, **how)


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


def _train(config: TrainConfig, ranks: Ranks, t_start: float, *, resume: bool, stop_after: int | None,
           progress: bool, log) -> dict:
    """Set the run up, then step: the loop a reader follows."""
    check_at_least("--stop-after", stop_after, 1)
    tune_allocator(ranks.device)
    say = log if ranks.main else (lambda m: None)
    run = plan_run(config, ranks, resume, say)
    config = run.config  # its device-dependent defaults resolved
    build_student(run, say)
    if run.chosen:  # once the run is set up: an error before stays the only line
        say(run.chosen)
    end = run.total if stop_after is None else min(run.total, run.start + stop_after)
    loader = open_inputs(run, end, progress, log)
    net = wrap(run)
    book = Logbook(run, progress)
    step = run.start
    batches = iter(loader)
    run.model.train()
    try:
        while step < end:
            for g in run.optimizer.param_groups:
                g["lr"] = lr_at(step, config.lr, config.warmup_steps, run.total, config.lr_schedule)
            out = train_step(run, net, batches, log)
            optimizer_step(run, step)
            step += 1
            if run.ema is not None:
                run.ema.update(run.model, step=step)
            book.step(step, out)
            saves = step % config.save_every == 0 and step < end
            # The log reads the steps' figures back (and stops on a non-finite loss) before a checkpoint
            # is written: no checkpoint holds weights a non-finite loss moved.
            if saves or step % LOG_EVERY == 0 or step == end:
                book.flush()
            if saves:
                checkpoint(run, step)
                book.last_good = step
        if step > run.start and book.seen == 0:  # every micro-batch was skipped: the weights never moved
            raise ZsdError(f"{step - run.start} steps saw no image ({book.skipped} samples skipped: unreadable "
                           f"images or non-finite targets): nothing was learnt, so no final checkpoint is written in "
                           f"{run.dir}")
        checkpoint(run, step)
    except OSError as e:  # writing the log or a checkpoint: a full disk, a read-only or vanished folder
        kept = _kept(run.dir)
        again = "rerun the same command" if kept.startswith("no ") else "rerun with --resume"
        raise ZsdError(f"cannot write {e.filename or run.dir} at step {step} ({e.strerror}); {kept}: "
                       f"make room and {again}") from None
    finally:
        book.close()
        if hasattr(batches, "close"):  # the pixel cache's generator: its gather thread ends now, not whenever
            batches.close()            # a traceback holding this frame is collected
        del batches
    ranks.barrier(setup=False)  # rank 0 writes the last checkpoint
    return _summary(run, step, book.seen, book.skipped, book.last_loss, time.perf_counter() - t_start, say)


# --- setup: plan the run (targets, steps, student, resume state), then build what it trains

@dataclass
class Run:
    """One training run as its setup resolved it; `build_student` adds the model and its optimizer."""

    config: TrainConfig
    ranks: Ranks
    dir: Path
    data: TrainTargets
    steps_per_epoch: int
    total: int  # optimizer steps of the whole run
    student: str | None
    student_res: int | None
    state: dict | None = None  # the checkpoint --resume continues from
    init: Student | None = None  # --init's student (a fresh run only)
    precision: str = "fp32"
    preprocess: Preprocess | None = None  # the student's
    model: Student | None = None
    ema: ModelEmaV3 | None = None
    criterion: Criterion | None = None
    optimizer: torch.optim.Optimizer | None = None
    meta: dict | None = None  # student.json
    start: int = 0  # the step this invocation starts at
    skipped: int = 0  # samples this rank skipped since `start`
    chosen: str = ""  # the line naming the defaults chosen for the device

    @property
    def device(self) -> torch.device:
        return self.ranks.device


def plan_run(config: TrainConfig, ranks: Ranks, resume: bool, say) -> Run:
    """The targets, the run length and the student, checked before any weights are made. Resuming,
    only the same run continues, and its student (resolved from init_from) comes from the checkpoint.
    The defaults that depend on the device are chosen here (`Run.chosen` says which), or are the resumed run's."""
    state = _saved_state(Path(config.run_dir), resume)
    config, chosen = resolve_defaults(config, ranks.device.type, state and state["student"]["train_config"])
    batch_size, accum, world = config.batch_size, config.accum_steps, ranks.world
    if batch_size % (accum * world):
        raise ZsdError(f"--batch-size {batch_size} must be divisible by accumulation steps x processes "
                       f"({accum} x {world})")
    if batch_size // (accum * world) < 2:  # a lone image is skipped for BatchNorm: the run would learn nothing
        raise ZsdError(f"--batch-size {batch_size} over {accum} accumulation step(s) x {world} process(es) gives "
                       "micro-batches of 1 image; a step needs at least 2: raise --batch-size or lower --accum")
    data = TrainTargets(config.targets, in_ram=config.in_ram, shuffle_chunks=config.shuffle_chunks, log=say)
    steps_per_epoch = data.rows_per_epoch // batch_size
    if steps_per_epoch == 0:
        raise ZsdError(f"the targets have {data.rows_per_epoch} written rows, fewer than one batch (--batch-size "
                       f"{batch_size}): pass --batch-size {data.rows_per_epoch} or less, or cache more images")
    if config.steps is None and round((config.epochs or 1) * steps_per_epoch) == 0:
        say(f"note: --epochs {config.epochs:g} is less than one step ({steps_per_epoch} steps per epoch): "
            "training 1 step")
    run = Run(config, ranks, Path(config.run_dir), data, steps_per_epoch, total_steps(config, data.rows_per_epoch),
              config.student, config.student_res, precision=config.precision)
    _resume_state(run, state, resume, say)
    # A resumed run's checkpoint holds the weights: init_from and student_pretrained are not loaded again.
    if config.init_from and run.state is None:
        run.init, init_cfg = load_student(config.init_from)
        if _teacher_of(init_cfg, data, say, f"--init {config.init_from}") == "other":
            raise ZsdError(f"--init {config.init_from} was distilled from another teacher (id "
                           f"{init_cfg.get('teacher_id')}) than the targets' ({data.teacher['model']}, "
                           f"id {data.teacher_id})")
        run.student = run.student or init_cfg["student"]
        if run.student != init_cfg["student"]:
            raise ZsdError(f"--init {config.init_from} is a {init_cfg['student']} student, not {run.student}")
        run.student_res = run.student_res or init_cfg["preprocess"]["size"]
    if not run.student:
        raise ZsdError("pass --student TIMM_NAME (or --init an earlier run)")
    run.chosen = chosen
    return run


def _saved_state(run_dir: Path, resume: bool) -> dict | None:
    """The checkpoint --resume continues from (None: none, or a new run); a damaged one is one line."""
    if not (resume and (run_dir / STATE).is_file()):
        return None
    try:
        state = torch.load(run_dir / STATE, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated, garbled, unreadable
        raise unusable_state(run_dir, _first_sentence(e)) from None
    if not isinstance(state, dict) or "step" not in state:
        raise unusable_state(run_dir, "not a training state")
    if "student" not in state:  # written before runs were TrainConfigs: nothing to compare with
        raise ZsdError(f"--resume: {run_dir} was written by an older zsd; start a new run (another --out)")
    prev = state["student"]
    problem = "its student record is not an object" if not isinstance(prev, dict) else config_problem(prev) or \
        next((f"its student record lacks {k}" for k in ("teacher_id", "train_config", "total_steps", "world_size")
              if k not in prev), None)
    if problem:
        raise unusable_state(run_dir, problem)
    return state


def _teacher_of(student: dict, data: TrainTargets, say, what: str) -> str:
    """zsd.teachers.same_teacher of a student.json (`student`) and the targets; the same teacher at another
    precision (a run started on a CPU at fp32, continued on a GPU's bf16 targets) goes on with a note."""
    match = same_teacher(student.get("teacher_id"), student.get("teacher"), data.teacher_id, data.teacher)
    if match == "precision":
        say(f"note: {what} learnt {student['teacher'].get('precision', 'fp32')} targets, these are the same "
            f"teacher's at {data.teacher.get('precision', 'fp32')} precision (they differ by rounding)")
    return match


def _resume_state(run: Run, state: dict | None, resume: bool, say) -> None:
    """`run.state`, student and resolution from the checkpoint of the same run; a new run refuses a
    folder that holds one."""
    path = run.dir / STATE
    if state is not None:
        prev, dev = state["student"], run.device.type
        if _teacher_of(prev, run.data, say, f"--resume: {run.dir}") == "other":
            raise ZsdError(f"--resume: {run.dir} was trained on another teacher's targets (id {prev['teacher_id']})")
        conflicts = resume_conflicts(
            run_definition(prev["train_config"], prev["total_steps"], prev["world_size"], dev),
            run_definition(asdict(run.config), run.total, run.ranks.world, dev))
        if conflicts:
            raise ZsdError(f"--resume: {run.dir} is another run ({conflicts}): pass its settings again, "
                           "or another --out for a new run")
        run.state, run.student, run.student_res = state, prev["student"], prev["preprocess"]["size"]
    elif resume:
        say(f"--resume: no {STATE} in {run.dir}, starting fresh")
    elif path.is_file():
        raise ZsdError(f"{run.dir} already holds a training run: pass --resume to continue it or another --out")


def _first_sentence(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0].split('. ')[0][:120]}"


def unusable_state(run_dir: Path, why: str) -> ZsdError:
    """--resume on a train_state.pt that cannot be read (damaged after it was written: it is written
    atomically). The optimizer's state is lost; the student's weights may not be."""
    init = (f", or start one from this run's student weights with --init {run_dir} (a fresh optimizer)"
            if (run_dir / "student.safetensors").is_file() else "")
    return ZsdError(f"--resume: {run_dir / STATE} is damaged ({why}), so the run cannot continue where it stopped: "
                    f"start a new run with another --out{init}")


def build_student(run: Run, say) -> None:
    """The student (seeded: one initialisation on every rank), its criterion, optimizer and EMA, at
    the checkpoint's step when resuming; then each rank its own random draws (drop-path masks)."""
    config, data, ranks, dev = run.config, run.data, run.ranks, run.device
    torch.manual_seed(config.seed)
    run.preprocess = student_preprocess(run.student, Preprocess.from_dict(data.teacher["preprocess"]), run.student_res)
    model = run.model = Student(run.student, data.dim, run.preprocess.size)
    if run.init is not None:
        model.load_state_dict(run.init.state_dict())
    elif config.student_pretrained and run.state is None:
        load_pretrained_backbone(model, config.student_pretrained, run.preprocess.size)
    run.criterion = Criterion(config.losses, _class_embeddings(run, say))
    fix = "choose a smaller --student, or free the device (another process may hold its memory)"
    with out_of_memory(dev, f"moving the {run.student} student to it", fix):
        model.to(dev)
        run.criterion.to(dev)
        if config.channels_last:
            model.to(memory_format=torch.channels_last)
    run.optimizer = torch.optim.AdamW([{"params": list(model.parameters())},
                                       {"params": list(run.criterion.parameters()), "weight_decay": 0.0}],
                                      lr=config.lr, weight_decay=config.weight_decay)
    # The EMA copy (eval mode) is updated after every optimizer step; its first update copies the weights.
    with out_of_memory(dev, f"the EMA copy of the {run.student} student", f"pass --ema-decay 0, or {fix}"):
        run.ema = ModelEmaV3(model, decay=config.ema_decay, use_warmup=config.ema_warmup) if config.ema_decay else None
    if ranks.rank:  # one initialisation for all, then each rank its own drop-path masks (CPU and CUDA generators)
        torch.manual_seed(config.seed + 1_000_003 * ranks.rank)
    if run.state is not None:
        state = run.state
        try:
            model.load_state_dict(state["model"])
            if run.ema is not None:
                run.ema.module.load_state_dict(state["ema"])
            run.criterion.load_state_dict(state["criterion"])
            run.optimizer.load_state_dict(state["optimizer"])
            set_rng_state((state.get("rng_ranks") or [state["rng"]] * ranks.world)[ranks.rank], dev)
            run.start = int(state["step"])
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:  # whole file, garbled contents
            raise unusable_state(run.dir, _first_sentence(e)) from None
        if not 0 <= run.start <= run.total:
            raise unusable_state(run.dir, f"its step {run.start} is outside 0..{run.total}")
        say(f"resuming {run.dir} at step {run.start} of {run.total}")
    # student.json: what the student is, and the run that made it.
    run.meta = {"student": run.student, "embed_dim": data.dim, "preprocess": run.preprocess.to_dict(),
                "teacher": data.teacher, "teacher_id": data.teacher_id, "classnames": data.classnames,
                "train_config": asdict(config), "total_steps": run.total, "world_size": ranks.world}


def _class_embeddings(run: Run, say) -> torch.Tensor | None:
    """The (K, D) class embeddings of the clip/mp losses (None without them). Rank 0 computes the
    prompt embeddings into the run folder first; the others then read them there."""
    config, data = run.config, run.data
    if not needs_text(config.losses):
        return None
    counts = sum(src.class_rows(len(data.classnames)) for src in data.sources)
    if counts[-1]:
        raise ZsdError("the clip and mp losses need labelled rows, but some --targets rows have no class")
    present = [name for name, n in zip(data.classnames, counts) if n]
    if len(present) < 2:  # one class: the loss is 0 (clip) or constant, and nothing is learnt
        losses = [f"--loss {name}" for name in config.losses if LOSSES[name].needs_text]
        raise ZsdError(f"{' and '.join(losses)} need{'s' if len(losses) == 1 else ''} >= 2 classes among the written rows of the targets' labels; "
                       f"{len(present)} found ({', '.join(present) or 'none'}): use --loss l2 (or cosine, mse, "
                       "contrastive-image), or add --targets of other classes")
    if config.class_embeddings_from:
        return class_prototype_embeddings(data, config.class_embeddings_from)
    if run.ranks.main:
        class_text_embeddings(data, config.superclass, run.dir, config.pretrained, log=say)
    run.ranks.barrier()
    return class_text_embeddings(data, config.superclass, run.dir, config.pretrained, log=say)


def wrap(run: Run):
    """The module a step runs: the student, in DDP where there are several ranks, compiled with --compile.

    DDP only now that the pixel caches are rendered. Gradients as views of DDP's buckets: no copy,
    and no stride mismatch with channels_last weights. Compiled around DDP, compile(DDP(model)), as
    torch's DDP documentation recommends: TorchDynamo then sees DDP's buckets and splits the graph
    at them (its DDPOptimizer), so each bucket's all-reduce overlaps the rest of the backward;
    DDP(compile(model)) hides the buckets from it and all-reduces only after the compiled backward."""
    net, ranks = run.model, run.ranks
    if ranks.distributed:
        with out_of_memory(run.device, "setting up DDP (its gradient buckets hold a copy of the gradients)",
                           "choose a smaller --student, or free the device"):
            net = torch.nn.parallel.DistributedDataParallel(
                net, device_ids=[run.device.index] if run.device.type == "cuda" else None,
                gradient_as_bucket_view=True)
    return torch.compile(net) if run.config.compile else net


# --- the inputs: every micro-batch's pixels, from the pixel cache or decoded by a DataLoader

def open_inputs(run: Run, end: int, progress: bool, log):
    """An iterable of (items, uint8 pixels, errors) per micro-batch from step `run.start` to `end`;
    its batches are fixed by (seed, step), not by loader state. `log`: every rank's (the first rank
    of each node speaks for it)."""
    config, data, ranks, pre = run.config, run.data, run.ranks, run.preprocess
    workers = config.workers if config.workers is not None else decode_workers(run.device)
    plan = BatchPlan(data, config.seed, config.batch_size, config.accum_steps, ranks.world, ranks.rank, run.start,
                     end)
    views = StudentInputs(data, pre, config.fast_decode)
    pixels = None
    if config.pixel_cache == "yes" or (config.pixel_cache == "auto" and
                                       PixelCache.nbytes(data, pre.size) <= ram_budget() // 2):
        render = config.workers if config.workers is not None else render_workers(run.device)
        pixels = _pixel_cache(run, views, render, progress, log if ranks.local == 0 else (lambda m: None))
    if pixels is not None:
        return pixels.batches(plan, pin=run.device.type == "cuda")
    micro = config.batch_size // (config.accum_steps * ranks.world)
    check_shared_memory(workers, micro * 3 * pre.size ** 2, 4)
    return DataLoader(views, batch_sampler=plan, num_workers=workers, collate_fn=collate,
                      prefetch_factor=4 if workers else None, pin_memory=run.device.type == "cuda",
                      generator=torch.Generator().manual_seed(config.seed))  # keeps the global RNG untouched


def _pixel_cache(run: Run, views: StudentInputs, workers: int, progress: bool, note) -> PixelCache | None:
    """The pixel cache in this node's cache dir, or None (decode instead; --pixel-cache yes refuses).

    Rank 0 renders first; then each other node's first rank (LOCAL_RANK 0) renders into its own
    node's cache dir, or finds rank 0's file where the nodes share one; then the other ranks open
    their node's. Every rank passes both waits, so a rank that failed does not leave the others
    waiting. `note`: the log of the node's first rank, where the fallback is said on every node."""
    config, ranks, first = run.config, run.ranks, run.ranks.local == 0
    got = {}

    def open_it():
        try:
            got["pixels"] = PixelCache(run.data, views, workers=workers, progress=progress and first, log=note,
                                       render=first)
        except NoRoom as e:
            got["failure"] = e
    if ranks.main:
        open_it()
    ranks.barrier()  # rank 0's render
    if first and not ranks.main:
        open_it()
    ranks.barrier()  # the other nodes' renders
    if not first:
        open_it()
    pixels, failure = got.get("pixels"), got.get("failure")
    if config.pixel_cache == "yes" and not ranks.all_agree(pixels is not None):
        raise ZsdError(f"--pixel-cache yes: {failure or 'another rank has no pixel cache'}: make room, set ZSD_CACHE "
                       "to another folder, or pass --pixel-cache no")
    if failure is not None:
        note(f"note: no pixel cache: {failure}; decoding the images of every batch instead")
    return pixels


# --- one optimizer step

@dataclass
class StepOut:
    figures: torch.Tensor  # on the device, over all ranks: loss, the `terms`, see `_over_ranks`
    terms: list[str]


def train_step(run: Run, net, batches, log) -> StepOut:
    """Forward and backward over the step's `accum` micro-batches, gradients averaged over the ranks;
    the optimizer step is the caller's. Losses and distances stay on the device: the log reads them
    back every LOG_EVERY steps (`Logbook.flush`), so a step has no host sync of its own."""
    config, data, ranks, dev, pre = run.config, run.data, run.ranks, run.device, run.preprocess
    accum = config.accum_steps
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if run.precision == "bf16" else nullcontext()
    loss_sum, dists, skipped = torch.zeros((), device=dev), [], 0
    term_sums = {k: torch.zeros((), device=dev) for k in run.criterion.weights}  # skipped micro-batches too
    for _ in range(accum):
        items, pixels, errors = next(batches)
        stop_on_replaced(errors)
        t, finite = data.finite_targets(items, log)  # every rank names its own samples' rows
        if not finite.all():  # skipped like an unreadable image
            errors = errors + ["non-finite target"] * int((~finite).sum())
            keep = torch.from_numpy(finite)
            items, pixels, t = items[finite], pixels[keep], t[keep]
        skipped += len(errors)
        # Unreadable images and non-finite targets leave holes; BatchNorm needs two samples.
        # Under DDP every rank skips together, or the others would wait for this one's gradients forever.
        if not ranks.all_agree(pixels is not None and len(pixels) >= 2):
            continue
        # uint8 to the device (from pinned memory on a GPU, asynchronously), normalised there
        x = normalize(pixels.to(dev, non_blocking=True), pre.mean, pre.std)
        if config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        t = _pinned(t, dev)
        labels = _pinned(data.labels(items), dev) if needs_text(config.losses) else None  # read only for clip/mp
        # Gradients are all-reduced on every micro-batch (no no_sync), so a skipped last
        # micro-batch cannot leave the earlier ones unsynchronised.
        # the last checkpoint stays; --resume continues from it
        with out_of_memory(dev, f"a training step of {len(x)} images per process ({run.student} at {pre.size} px)",
                           "lower --batch-size or raise --accum (a step's images per process are --batch-size / "
                           "(--accum x processes))"):
            with autocast:
                s = net(x)
            loss, terms = run.criterion(s, t, labels)
            (loss / accum).backward()
        loss_sum += loss.detach().float() / accum
        for k, v in terms.items():
            term_sums[k] += v.detach().float() / accum
        with torch.no_grad():
            sn = torch.nn.functional.normalize(s.float(), dim=-1)
            dists.append((sn - t).norm(dim=-1))
    names = sorted(term_sums)
    # the mean over ranks is logged; a non-finite loss on any rank stops all
    scalars = ranks.mean(torch.stack([loss_sum, *(term_sums[k] for k in names)]))
    for p in run.criterion.parameters():  # the temperatures live outside DDP
        if p.grad is not None:
            ranks.mean(p.grad)
    run.skipped += skipped
    return StepOut(torch.cat([scalars, _over_ranks(dists, run)]), names)


def _over_ranks(dists: list[torch.Tensor], run: Run) -> torch.Tensor:
    """The step's distances summarised over every rank's images (mean, p50, p90, max), the images and
    the samples skipped since `run.start` over the ranks: on the device, without a host sync. Each
    rank's distances, NaN-padded to one length, and its count of skipped samples travel in one gather."""
    ranks, dev = run.ranks, run.device
    most = run.config.batch_size // ranks.world
    mine = torch.full((most + 1,), math.nan, device=dev)
    if dists:
        d = torch.cat(dists).float()
        mine[:len(d)] = d
    mine[most] = run.skipped  # a scalar fill on the device, not a copy from the host
    every = [mine]
    if ranks.distributed:
        every = [torch.empty_like(mine) for _ in range(ranks.world)]
        dist.all_gather(every, mine)
    every = torch.stack(every)
    d, skipped = every[:, :most].flatten(), every[:, most].sum()
    summary = torch.stack([d.nanmean(), d.nanquantile(0.5), d.nanquantile(0.9), d.nan_to_num(-math.inf).amax()])
    return torch.cat([summary.nan_to_num(0.0, neginf=0.0), torch.stack([(~d.isnan()).sum().float(), skipped])])


def optimizer_step(run: Run, step: int) -> None:
    """AdamW allocates its two moments per weight on its first step: there a large student runs out of memory."""
    with out_of_memory(run.device, f"the optimizer's step {step + 1} (AdamW keeps 2 values per weight of "
                                   f"{run.student})", "choose a smaller --student, or free the device"):
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)


# --- logging: log.jsonl (one record per step and per epoch) and the progress bar, on rank 0

class Logbook:
    """Per step, the device figures of `train_step` are kept; `flush` reads them back in one host sync,
    stops on a non-finite loss (every rank: the loss is the mean over the ranks) and writes the records
    (rank 0). Every rank flushes at the same steps."""

    def __init__(self, run: Run, progress: bool):
        self.run, self.main, self.epoch_losses, self.last_loss = run, run.ranks.main, [], None
        self.pending, self.seen, self.skipped, self.since = [], 0, 0, time.perf_counter()
        self.last_good = run.start if run.state is not None else None
        resumed = run.state is not None
        if self.main and resumed:
            _truncate_log(run.dir / LOG, run.start)
        # A fresh run starts a fresh log: one interrupted before its first checkpoint may have left one.
        self.file = open(run.dir / LOG, "a" if resumed else "w") if self.main else None
        self.bar = tqdm(total=run.total, initial=run.start, unit="step", desc=f"train {run.student} -> {run.dir.name}",
                        disable=not (progress and self.main), dynamic_ncols=True)

    def step(self, step: int, out: StepOut) -> None:
        self.pending.append((step, out, self.run.optimizer.param_groups[0]["lr"]))
        self.bar.update(1)

    def flush(self) -> None:
        if not self.pending:
            return
        figures = torch.stack([out.figures for _, out, _ in self.pending]).tolist()  # the one host sync
        images_per_s = sum(f[-2] for f in figures) / max(time.perf_counter() - self.since, 1e-9)
        per_epoch = self.run.steps_per_epoch
        for (step, out, lr), values in zip(self.pending, figures):
            n = len(out.terms)
            loss, terms, dists, (images, skipped) = values[0], values[1:1 + n], values[1 + n:-2], map(int, values[-2:])
            if not math.isfinite(loss):
                where = f"the last good checkpoint (step {self.last_good}) is kept" if self.last_good is not None \
                    else "no checkpoint was written yet"
                raise ZsdError(f"loss became {loss} at step {step}: stopping; {where} in {self.run.dir}")
            self.epoch_losses.append(loss)
            self.last_loss, self.seen, self.skipped = loss, self.seen + images, skipped
            if not self.main:
                continue
            record = {"step": step, "epoch": (step - 1) // per_epoch, "images": images, "loss": loss,
                      "terms": dict(zip(out.terms, terms)), "lr": lr, "images_per_s": images_per_s,
                      "dist": dict(zip(("mean", "p50", "p90", "max"), dists)), "skipped_images": skipped}
            self.file.write(json.dumps(record) + "\n")
            if step % per_epoch == 0:
                self.file.write(json.dumps({"epoch_end": record["epoch"], "step": step,
                                            "mean_loss": float(np.mean(self.epoch_losses))}) + "\n")
                self.epoch_losses = []
        self.pending, self.since = [], time.perf_counter()
        if self.main:
            self.file.flush()
            self.bar.set_postfix(loss=f"{self.last_loss:.4f}", max_dist=f"{dists[-1]:.3f}")

    def close(self) -> None:
        self.bar.close()
        if self.file:
            try:
                self.file.close()
            except OSError:  # the rest of a line a full disk refused: --resume drops the cut line
                pass
            log = self.run.dir / LOG
            if log.is_file() and log.stat().st_size == 0:  # a fresh run that logged no step (a full disk) leaves none
                log.unlink()


def _summary(run: Run, step: int, seen: int, skipped: int, last_loss, elapsed: float, say) -> dict:
    summary = {"run_dir": str(run.dir), "student": run.student, "steps": step, "total_steps": run.total,
               "finished": step >= run.total, "epochs": step / run.steps_per_epoch, "images": seen,
               "skipped_images": skipped, "skipped_rows": run.data.skipped_rows,
               "final_loss": last_loss, "seconds": round(elapsed, 2),
               "images_per_s": round(seen / max(elapsed, 1e-9), 2), "teacher_id": run.data.teacher_id}
    say(f"{run.dir}: {step}/{run.total} steps, {seen} images in {elapsed:.1f} s ({summary['images_per_s']} img/s)"
        + (f", {skipped} samples skipped (unreadable images, non-finite targets)" if skipped else "")
        + ("" if summary["finished"] else "; continue with --resume"))
    return summary
