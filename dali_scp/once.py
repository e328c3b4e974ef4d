"""Work that one process per job does for all: the dataset check, reading a split's categories.

Why: under torchrun every process builds its own loader, and each would check the whole dataset at
the same moment (a COCO-sized JSON: minutes and ~2.5 GB per process; eight of them on an 8-GPU
node). Here one process computes the result into the cache folder while the others wait, then all
read it. Which process needs no configuration: global rank 0 first; if some process then does not
see the result (the cache is node-local), local rank 0 of each such node; a process that still sees
none (a cache per process) computes by itself. Outside torch.distributed (the profiler, the
visualiser, the CLI) it is a plain cache lookup.
"""
from __future__ import annotations

import logging
import os
import sys
from datetime import timedelta
from typing import Callable, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")
WAIT = timedelta(hours=2)  # how long the others wait for the one that computes (a slow network disk)
_GROUPS: dict = {}


def once_per_job(lookup: Callable[[], T | None], compute: Callable[[], T], what: str) -> T:
    """``lookup()``: the cached result or None; ``compute()``: make it (and cache it). Under an
    initialised torch.distributed with several processes this is a collective: every process must
    call it at the same point. An exception in the process that computes is raised in every process
    (the others with its one-line description), so none waits forever."""
    group = _process_group()
    if group is None:
        hit = lookup()
        return hit if hit is not None else compute()
    import torch.distributed as dist
    rank = dist.get_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))

    def step(mine: bool, who: str):
        result, error = None, None
        if mine:
            try:
                result = lookup()
                result = result if result is not None else compute()
            except Exception as e:  # every process must learn of it
                error = e
        else:
            log.info("%s: waiting for %s", what, who)
        errors = [e for e in _all_gather(group, None if error is None else _describe(error)) if e]
        if error is not None:
            raise error
        if errors:
            raise ValueError(f"{what} ({who}): {errors[0]}")
        return result

    # every process takes part in every collective below, in the same order
    hit = step(rank == 0, "global rank 0")
    hit = hit if hit is not None else lookup()
    if all(_all_gather(group, hit is not None)):
        return hit
    got = step(hit is None and local_rank == 0, "local rank 0 of each node")
    hit = hit if hit is not None else got if got is not None else lookup()
    if hit is None:
        log.warning("%s: rank %d sees neither rank 0's nor its node's result in the cache (a cache folder per "
                    "process?); computing it here", what, rank)
        hit = compute()
    return hit


def _describe(e: Exception) -> str:
    from dali_scp import cli
    return cli.describe(e)


def _process_group():
    """A gloo group over all processes (object collectives on the CPU, and a timeout long enough for
    a dataset check: NCCL's default would end a job whose check takes over 10 minutes), or None
    outside torch.distributed. torch is only looked at when something imported it."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    world = dist.group.WORLD
    if id(world) not in _GROUPS:
        _GROUPS.clear()
        _GROUPS[id(world)] = dist.new_group(backend="gloo", timeout=WAIT)
    return _GROUPS[id(world)]


def _all_gather(group, obj) -> list:
    import torch.distributed as dist
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out
