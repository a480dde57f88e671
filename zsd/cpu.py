"""CPU speed: keep freed activation memory in the process instead of handing it back to the OS.

A CPU forward (and backward) allocates and frees tens to hundreds of MiB of activations per
batch. glibc serves every block above its mmap threshold (128 KiB, adapting up to 32 MiB) with a
fresh mmap and returns it on free, so the next batch page-faults the same memory in again: on
a 2-core CPU the EfficientNet-Lite0 teacher pass spent more time in
the kernel than in the model (issue 15: 21.5 img/s at batch 256, 37 img/s at batch 32, against
169 img/s with the thresholds raised). Raising the mmap and trim thresholds to their maximum
keeps those blocks on the heap, so after the first batch a pass runs without page faults.

Two facts shape the mechanism:
- glibc reads MALLOC_MMAP_THRESHOLD_ and friends only at process start, so a running zsd can
  only use mallopt(3); it is called before the first batch and DataLoader workers, forked
  later, inherit it.
- mallopt pins the thresholds and would silently override a user's own tuning, so nothing is
  changed when the user set glibc's malloc variables or GLIBC_TUNABLES, or preloads another
  allocator (jemalloc, tcmalloc, mimalloc): their choice wins.
The cost is memory: up to the largest batch's activations (plus 2 GiB of trimmable top at most)
stay mapped until the process ends, which is what a long pass needs anyway. GPU runs are left
alone: their activations live in CUDA's caching allocator.
"""

from __future__ import annotations

import ctypes
import os
import platform
import shutil

import torch

from zsd.errors import ZsdError
from zsd.dist import resolve_device

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MAX_THRESHOLD = 2**31 - 1  # mallopt takes an int
TOP_PAD = 64 << 20  # grow the heap in 64 MiB steps: fewer brk calls while the first batches run

_applied: bool | None = None


def decode_workers(device: str | torch.device = "cpu") -> int:
    """DataLoader decode processes beside a model. On a CPU every core but the main process's, at
    most 4 (they compete with the model for the cores). On a GPU the cores of this process's share of
    the machine (torchrun's LOCAL_WORLD_SIZE processes share it) but the main process's, at most 16:
    decoding needs about 2 cores per GPU for 224 px photos and up to 16 for 1024 px ones."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    if torch.device(device).type == "cuda":
        share = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
        return min(16, max(1, share - 1))
    return min(4, max(1, cores - 1))


def render_workers(device: str | torch.device = "cpu") -> int:
    """Processes for the pixel-cache render. One rank per node renders while the node's other ranks
    wait for it, so on a GPU node it takes the whole node's cores but its own, not one rank's share."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    return min(32, max(1, cores - 1)) if torch.device(device).type == "cuda" else decode_workers(device)


def check_shared_memory(workers: int, batch_bytes: int, prefetch: int, path: str = "/dev/shm") -> None:
    """DataLoader workers hand their batches over in shared memory: where `path` has less room than
    the batches in flight (a container's default 64 MiB), a worker dies with a bare "Bus error".
    Say so before starting them."""
    if not workers or not os.path.isdir(path):
        return
    need, free = workers * prefetch * batch_bytes, shutil.disk_usage(path).free
    if free < need:
        raise ZsdError(f"{path} has {free / 2**20:.0f} MiB free, but {workers} decode workers keep about "
                       f"{need / 2**20:.0f} MiB of batches in it (workers die with 'Bus error'): give the container "
                       f"more shared memory (docker run --shm-size={max(1, -(-2 * need // 2**30))}g, or --ipc=host), "
                       "or pass --workers 0")


def shared_memory_batch(workers: int, sample_bytes: int, prefetch: int, batch: int, smallest: int = 16,
                        path: str = "/dev/shm") -> tuple[int, int]:
    """(workers, batch) for a DataLoader whose batch size zsd chooses (the pixel-cache render): the
    batch shrinks until the batches in flight take at most half of `path`'s free room, and below
    `smallest` samples the work stays in the main process (no shared memory at all), so a container's
    64 MiB /dev/shm renders more slowly instead of dying with 'Bus error'."""
    if not workers or not os.path.isdir(path):
        return workers, batch
    fits = shutil.disk_usage(path).free // 2 // (workers * prefetch * sample_bytes)
    return (workers, min(batch, int(fits))) if fits >= min(smallest, batch) else (0, batch)


def describe_machine() -> str:
    """The hardware line of every benchmark and experiment report: CPU model, cores, torch and its threads."""
    model = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:  # not Linux
        pass
    model = model or platform.processor() or platform.machine()
    return f"{model}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def user_allocator_setting() -> str | None:
    """The user's own allocator choice, if any (then zsd leaves the allocator alone)."""
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_ARENA_MAX"):
        if name in os.environ:
            return name
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES"
    if any(a in os.environ.get("LD_PRELOAD", "") for a in ("jemalloc", "tcmalloc", "mimalloc")):
        return "LD_PRELOAD"
    return None


def tune_allocator(device: str | torch.device = "cpu") -> bool:
    """Raise glibc's mmap/trim thresholds for a CPU compute pass; True when they are in force.

    Idempotent; a no-op for CUDA devices, off glibc, and when the user tuned the allocator.
    """
    global _applied
    if device == "auto":
        device = resolve_device(device)
    if torch.device(device).type != "cpu":  # only the type: naming a device that is absent is not an error here
        return False
    if _applied is None:
        _applied = False
        if user_allocator_setting() is None:
            try:
                libc = ctypes.CDLL("libc.so.6")
                _applied = bool(libc.mallopt(M_MMAP_THRESHOLD, MAX_THRESHOLD)
                                and libc.mallopt(M_TRIM_THRESHOLD, MAX_THRESHOLD)
                                and libc.mallopt(M_TOP_PAD, TOP_PAD))
            except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
                pass
    return _applied
