"""This process's place among several: the one reader of torchrun's RANK, WORLD_SIZE and LOCAL_RANK.

The teacher pass and `zsd synth` split their work into shards (torchrun's ranks, or a SLURM array
with --num-shards/--shard-index); the trainer joins a process group. All ask here.
"""

import os

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


def local_cuda(device: str) -> str:
    """`auto` on a CUDA machine under torchrun is this process's own GPU (LOCAL_RANK); else `device`."""
    if device != "auto" or "LOCAL_RANK" not in os.environ:
        return device
    import torch

    return f"cuda:{torchrun_env()[2]}" if torch.cuda.is_available() else device
