"""FAIR-Calib under ``torchrun``: what each rank computes and what the ranks agree on.

llm-compressor 0.14 runs ``oneshot`` on several processes (one per GPU): each rank calibrates
its share of the data and GPTQ sums each module's Hessian on an owner rank
(``GPTQModifier.compress_modules``). FAIR-Calib follows that path and adds what is its own:

* Stage I: each rank rolls out its contiguous share of the calibration prompts
  (:func:`my_share`); the prior's statistics and the weight normalisation are summed over
  ranks (:func:`all_reduce_sum`), so every rank weights its states with the same prior as a
  single process would;
* Stage II: the cross-covariances, and the Hessians they are solved with, are summed over ranks
  before the least-squares target is formed, so every rank holds the same ``W*``;
* only the source rank writes the checkpoint (:func:`on_source_rank`);
* rotations are fused into weights the ranks share once, by the source rank
  (:func:`shared_weights_written_once`).

The process group is the caller's (``torchrun`` + ``compressed_tensors.offload.init_dist`` on
GPUs, or ``torch.distributed.init_process_group("gloo")`` on CPUs); without one every function
here is the one-process identity.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import TypeVar
from unittest import mock

import torch
import torch.distributed as dist
from compressed_tensors.distributed import is_distributed, is_source_process
from compressed_tensors.offload.cache.dist_cpu import DistributedCPUCache
from compressed_tensors.offload.cache.dist_disk import DistributedDiskCache

__all__ = [
    "all_reduce_sum",
    "my_share",
    "on_source_rank",
    "rank_and_world",
    "shared_weights_written_once",
]

#: compressed-tensors' offload caches whose storage all ranks share (shared CPU memory, one
#: set of files); llm-compressor's sequential pipeline offloads to the CPU one under torchrun
SHARED_CACHES = (DistributedCPUCache, DistributedDiskCache)

T = TypeVar("T")


def rank_and_world() -> tuple[int, int]:
    if not is_distributed():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def my_share(items: Sequence[T]) -> list[T]:
    """This rank's contiguous share of ``items`` (llm-compressor partitions data the same way)."""
    rank, world = rank_and_world()
    if world > 1 and len(items) < world:
        raise ValueError(
            f"{len(items)} calibration prompts cannot be split over {world} processes; give "
            "at least one prompt per process (raise max_prompts or add calibration text)"
        )
    start, end = len(items) * rank // world, len(items) * (rank + 1) // world
    return list(items[start:end])


def all_reduce_sum(tensors: Sequence[torch.Tensor]) -> None:
    """Sum each tensor over ranks, in place (NCCL needs them on the rank's GPU: moved there
    and back)."""
    if not is_distributed():
        return
    on_gpu = dist.get_backend() == "nccl"
    for tensor in tensors:
        if on_gpu and tensor.device.type != "cuda":
            buffer = tensor.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
            tensor.copy_(buffer)
        else:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def on_source_rank(function: Callable[[], T]) -> T | None:
    """Run ``function`` on the source rank only; every rank then returns its result or raises
    its error (so a failed save or a refused output directory stops all ranks alike)."""
    if not is_distributed():
        return function()
    outcome: list = [None, None]
    if is_source_process():
        try:
            outcome[0] = function()
        except Exception as error:  # noqa: BLE001 - re-raised on every rank below
            outcome[1] = error
    dist.broadcast_object_list(outcome, src=0)
    if outcome[1] is not None:
        raise outcome[1]
    return outcome[0]


def _keep_offload(self, offloaded, data) -> None:
    """``update_offload`` on a rank that must not write: the source rank writes the value."""


@contextmanager
def shared_weights_written_once() -> Iterator[None]:
    """Let only the source rank write weights all ranks share, for a read-modify-write step
    every rank runs (fusing a rotation: ``W <- W R``).

    Under torchrun every rank holds the same module objects over one shared storage
    (:data:`SHARED_CACHES`), and compressed-tensors' ``update_offload_parameter`` writes from
    whichever rank calls it (its docstring leaves the guarding to the caller). SpinQuant's
    ``on_calibration_start`` runs on every rank, so each rank read the weights the previous
    rank had already rotated and rotated them again: with two processes the embedding held
    ``E R1 R1`` (and every fused linear its own mix), not the one-process ``E R1``. Every rank
    still runs the whole step (attaching online transforms and offloading new modules are
    collectives); the other ranks' writes to shared storage are dropped, and the barrier
    after it makes the source rank's writes visible to all. Replicated caches (one copy per
    GPU) are written by every rank, each computing the same value.
    """
    if not is_distributed():
        yield
        return
    with ExitStack() as patches:
        if not is_source_process():
            for cache in SHARED_CACHES:
                patches.enter_context(mock.patch.object(cache, "update_offload", _keep_offload))
        yield
    dist.barrier()
