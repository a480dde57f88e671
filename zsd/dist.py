"""This process's place among several: the one reader of torchrun's RANK, WORLD_SIZE and LOCAL_RANK.

The teacher pass and `zsd synth` split their work into shards (torchrun's ranks, or a SLURM array
with --num-shards/--shard-index); the trainer joins a process group (`Ranks`). All ask here, and
every command resolves its --device here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from zsd.errors import ZsdError


def torchrun_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) for a lone process."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def shard(num_shards: int | None, shard_index: int | None) -> tuple[int, int]:
    """(num_shards, shard_index): the flags where given, else torchrun's WORLD_SIZE/RANK, else one shard."""
    rank, world, _ = torchrun_env()
    if world > 1 and (num_shards is not None or shard_index is not None):
        raise ZsdError(f"--num-shards/--shard-index under torchrun: all {world} ranks would redo the one shard given; "
                       "torchrun's ranks are the shards already: drop --num-shards/--shard-index, or start one "
                       "process per shard without torchrun")
    num_shards = world if num_shards is None else num_shards
    shard_index = rank if shard_index is None else shard_index
    if not 0 <= shard_index < num_shards:
        raise ZsdError(f"--shard-index {shard_index} is not in 0..{num_shards - 1}: pass an index below --num-shards")
    return num_shards, shard_index


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """--device: auto (cuda if there is one), cpu, cuda, cuda:N, ...; a typo or an absent GPU is one line."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ZsdError(f"--device {device}: not a torch device; pass auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not (torch.cuda.is_available() and (dev.index or 0) < torch.cuda.device_count()):
        raise ZsdError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                       "pass cpu or auto")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ZsdError(f"--device {device}: MPS is not available here")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ZsdError(f"--device {device}: zsd runs on cpu, cuda or mps")
    return dev


def local_device(device: str | torch.device = "auto") -> torch.device:
    """This process's compute device, made current on CUDA (`torch.cuda.set_device`).

    Under torchrun (LOCAL_RANK set) a CUDA device without an index (`auto`, `cuda`) is the
    process's own GPU, cuda:LOCAL_RANK: otherwise every rank would open a context on GPU 0 (GBs
    each, and an error on exclusive-process GPUs). An explicit cuda:N is kept: the way to run where
    each process sees only its own GPU (srun --gpus-per-task); where the processes of a node see
    several GPUs it would put them all on one, which is refused.
    """
    dev = resolve_device(device)
    if dev.type != "cuda":
        return dev
    env = os.environ
    on_node = int(env.get("LOCAL_WORLD_SIZE", env.get("WORLD_SIZE", 1))) if "LOCAL_RANK" in env else 1
    if dev.index is not None and on_node > 1 and torch.cuda.device_count() > 1:
        raise ZsdError(f"--device {device} under torchrun: all {on_node} processes of this node would share that "
                       f"GPU (each sees {torch.cuda.device_count()}): pass --device cuda (or auto), which gives each "
                       "its own, cuda:LOCAL_RANK")
    if dev.index is None:
        local, n = (torchrun_env()[2] if "LOCAL_RANK" in os.environ else 0), torch.cuda.device_count()
        if local >= n:
            raise ZsdError(f"LOCAL_RANK is {local} but this process sees {n} CUDA device(s) (CUDA_VISIBLE_DEVICES="
                           f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): let every process of a node see all "
                           "its GPUs (e.g. srun --gpus-per-node, not --gpus-per-task), or pass --device cuda:0 "
                           "where each process sees only its own GPU")
        dev = torch.device("cuda", local)
    torch.cuda.set_device(dev)
    return dev


# Ranks that wait for rank 0 (rendering the pixel cache, loading a teacher for the class prompts)
# wait in this gloo group: NCCL's default timeout (10 minutes) would abort a long render. Only the
# set-up waits: the training steps' CPU collectives have the default timeout, so a hung rank stops
# the job in minutes, not in 12 hours.
SETUP_TIMEOUT = timedelta(hours=12)


@dataclass(frozen=True)
class Ranks:
    """The trainer's place in its process group; one process alone is `Ranks(device=...)`.

    `setup`: a gloo group for the set-up waits (`barrier`, `rank0_says`), with a timeout long enough
    for a pixel-cache render; `steps`: a gloo group with the default timeout for the CPU collectives
    of the training steps; `local`: the rank on its node (LOCAL_RANK); `started`: this process
    initialised the default group, so `end` destroys it.
    """

    device: torch.device
    world: int = 1
    rank: int = 0
    distributed: bool = False
    started: bool = False
    setup: object = None  # torch.distributed.ProcessGroup
    steps: object = None
    local: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self, setup: bool = True) -> None:
        """Wait for every rank: with the set-up timeout, or (`setup=False`) the default one."""
        if self.distributed:
            dist.barrier(group=self.setup if setup else self.steps)

    def rank0_says(self, message: str | None) -> str | None:
        """Rank 0's `message` on every rank (None: go on). The other ranks learn so that rank 0 refused
        the run, instead of waiting for it in a collective until the job is killed."""
        if not self.distributed:
            return message
        box = [message]
        dist.broadcast_object_list(box, src=0, group=self.setup)
        return box[0]

    def gather(self, value) -> list:
        """Every rank's `value` (any picklable object), in rank order, on every rank."""
        if not self.distributed:
            return [value]
        values = [None] * self.world
        dist.all_gather_object(values, value)
        return values

    def all_agree(self, flag: bool) -> bool:
        """Whether `flag` holds on every rank; reduced in the gloo group, without waiting for the GPU."""
        if not self.distributed:
            return flag
        return bool(all_ranks([flag], dist.ReduceOp.MIN, torch.device("cpu"), self.steps)[0])

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """`t` averaged over the ranks, in place (on its own device: NCCL reduces only CUDA tensors)."""
        if self.distributed:
            dist.all_reduce(t)
            t /= self.world
        return t

    def end(self) -> None:
        """Close the groups `join_ranks` opened (the default one only where it started it)."""
        if self.distributed:
            dist.destroy_process_group(self.setup)
            dist.destroy_process_group(self.steps)
            if self.started:
                dist.destroy_process_group()


def join_ranks(device: str) -> Ranks:
    """This process's `Ranks`. A process group the caller initialised is joined; otherwise torchrun's
    WORLD_SIZE/RANK start one (gloo on CPU, nccl on GPUs). The device is the rank's own GPU
    (LOCAL_RANK), made current."""
    dev = local_device(device)
    if torchrun_env()[1] == 1 and not dist.is_initialized():
        return Ranks(dev)
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    setup = dist.new_group(backend="gloo", timeout=SETUP_TIMEOUT)
    steps = dist.new_group(backend="gloo")
    return Ranks(dev, dist.get_world_size(), dist.get_rank(), True, started, setup, steps, torchrun_env()[2])


def all_ranks(values: list[float], op, dev: torch.device, group=None) -> list[float]:
    """`values` reduced elementwise over all ranks with `op`, in one collective. The tensor lives on
    `dev`: NCCL reduces only CUDA tensors, gloo (`group`) CPU ones without waiting for the GPU."""
    t = torch.tensor([float(v) for v in values], device=dev)
    dist.all_reduce(t, op=op, group=group)
    return t.tolist()
