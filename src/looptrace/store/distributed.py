"""Which shards this process fills: rank i of a world of w takes shard j when j mod w == i."""

from __future__ import annotations

import torch

from looptrace.errors import ConfigError


def rank_and_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """``(rank, world_size)``: the given values, else torch.distributed's, else ``(0, 1)``."""
    r0, w0 = 0, 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        r0, w0 = torch.distributed.get_rank(), torch.distributed.get_world_size()
    rank = r0 if rank is None else rank
    world = w0 if world_size is None else world_size
    if not 0 <= rank < world:
        raise ConfigError(f"rank {rank} is not in a world of {world}")
    return rank, world


def mine(index: int, rank: int, world: int) -> bool:
    return index % world == rank
