"""This process's place among several: the one reader of torchrun's RANK, WORLD_SIZE and LOCAL_RANK.

The teacher pass and `zsd synth` split their work into shards (torchrun's ranks, or a SLURM array
with --num-shards/--shard-index); the trainer joins a process group. All ask here.
"""

import os

import torch

from zsd.errors import ZsdError


def torchrun_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) for a lone process."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def shard(num_shards: int | None, shard_index: int | None) -> tuple[int, int]:
    """(num_shards, shard_index): the flags where given, else torchrun's WORLD_SIZE/RANK, else one shard."""
    rank, world, _ = torchrun_env()
    num_shards = world if num_shards is None else num_shards
    shard_index = rank if shard_index is None else shard_index
    if not 0 <= shard_index < num_shards:
        raise ZsdError(f"--shard-index {shard_index} is not in 0..{num_shards - 1}: pass an index below --num-shards")
    return num_shards, shard_index


def local_device(device: str | torch.device = "auto") -> torch.device:
    """This process's compute device, made current on CUDA (`torch.cuda.set_device`).

    Under torchrun (LOCAL_RANK set) a CUDA device without an index (`auto`, `cuda`) is the
    process's own GPU, cuda:LOCAL_RANK: otherwise every rank would open a context on GPU 0 (GBs
    each, and an error on exclusive-process GPUs). An explicit cuda:N is kept: the way to run where
    each process sees only its own GPU (srun --gpus-per-task).
    """
    from zsd.teachers import resolve_device  # zsd.teachers imports more than this module needs

    dev = resolve_device(device)
    if dev.type != "cuda":
        return dev
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
