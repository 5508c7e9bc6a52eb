"""The cross-process reduction of EM: one sum over the processes of a `torch.distributed` group.

EM's statistics are sums over the points, so data-parallel EM needs nothing but sums: every
process computes the statistics of its own shard of the data and
[`all_reduce_sum`][inference.em.distributed.all_reduce_sum] adds them up, after which every
process holds the statistics of the whole data set and takes the same M-step. Every
collective of the EM stack goes through that one function: statistics, log-likelihoods,
point counts, k-means sums and counts, the data mean, and also the few exchanges that are
not sums in themselves (the shard check, a shared seed, the rows of the k-means++ seeds),
written as sums in which the processes that do not own a value contribute zeros.

In a single process, or when `torch.distributed` is not initialized, the function returns
its input: the same code runs on one device or many (`torchrun`; gloo on CPU, NCCL on GPUs).
A collective waits for every process of the group; the timeout given to
`torch.distributed.init_process_group` bounds that wait.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from inference.em.families import SufficientStatistics

T = TypeVar("T", Tensor, Sequence[Tensor], SufficientStatistics)

_DTYPE_CODES = {torch.float32: 1, torch.float64: 2}


def is_distributed() -> bool:
    """Whether a `torch.distributed` process group of more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_size() -> tuple[int, int]:
    """This process's rank and the number of processes: ``(0, 1)`` when not distributed."""
    if not is_distributed():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def communication_device(device: torch.device | None = None) -> torch.device:
    """Where tensors for the collectives live: the current CUDA device under NCCL, else
    ``device`` (default CPU)."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return device if device is not None else torch.device("cpu")


def all_reduce_sum(values: T) -> T:
    """The sum over the processes of ``values``: the identity in a single process.

    Args:
        values (torch.Tensor | Sequence[torch.Tensor] | SufficientStatistics): a tensor, a
            sequence of tensors, or EM sufficient statistics
            (``inference.em.families.SufficientStatistics``, whose ``center`` is the same on
            every process and is not summed). Every process passes the same structure,
            shapes and dtypes.

    Returns:
        The same structure holding the sums, new tensors (the input is not modified). All
        tensors of one dtype travel in one collective.

    Raises:
        RuntimeError: from `torch.distributed` when a process does not take part before
            the group's timeout.
    """
    if not is_distributed():
        return values
    if isinstance(values, SufficientStatistics):
        names = SufficientStatistics._SUMS
        sums = _all_reduce_tensors([getattr(values, name) for name in names])
        return replace(values, **dict(zip(names, sums)))
    if isinstance(values, Tensor):
        return _all_reduce_tensors([values])[0]
    return type(values)(_all_reduce_tensors(list(values)))


def _all_reduce_tensors(tensors: list[Tensor]) -> list[Tensor]:
    out: list[Tensor | None] = [None] * len(tensors)
    groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, tensor in enumerate(tensors):
        groups.setdefault((tensor.dtype, tensor.device), []).append(i)
    for (_, device), members in groups.items():
        flat = torch.cat([tensors[i].reshape(-1) for i in members])
        comm = communication_device(device)
        flat = flat.to(comm)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat = flat.to(device)
        start = 0
        for i in members:
            size = tensors[i].numel()
            out[i] = flat[start : start + size].reshape(tensors[i].shape)
            start += size
    return out


def shard_offset(num_rows: int) -> tuple[int, int]:
    """``(offset, total)``: the global index of this shard's first row, and all rows.

    The global order of the data is the shards concatenated in rank order.
    """
    rank, size = rank_and_size()
    rows = torch.zeros(size, dtype=torch.int64, device=communication_device())
    rows[rank] = num_rows
    rows = all_reduce_sum(rows)
    return int(rows[:rank].sum()), int(rows.sum())


def check_shards(dim: int, dtype: torch.dtype, error: Exception | None = None) -> None:
    """Check that every process has data of the same width and dtype, before any EM step.

    A process whose own data failed validation passes its ``error``; the check is one small
    collective, so every process raises (instead of some waiting forever for the others).

    Args:
        dim: this shard's number of features.
        dtype: the dtype this shard is fitted in.
        error: the validation error of this shard, or None.

    Raises:
        ValueError: on every process if a shard is invalid (``error`` is re-raised where it
            occurred), or if the shards differ in their number of features or dtype.
    """
    rank, size = rank_and_size()
    if size == 1:
        if error is not None:
            raise error
        return
    table = torch.zeros(size, 3, dtype=torch.int64, device=communication_device())
    table[rank] = torch.tensor([int(error is not None), dim, _DTYPE_CODES.get(dtype, 0)])
    table = all_reduce_sum(table)
    if error is not None:
        raise error
    failed = [r for r in range(size) if table[r, 0]]
    if failed:
        raise ValueError(f"the data of rank(s) {failed} is invalid (see the error on those ranks)")
    dims, codes = table[:, 1].tolist(), table[:, 2].tolist()
    if len(set(dims)) > 1 or len(set(codes)) > 1:
        names = {code: str(dt).replace("torch.", "") for dt, code in _DTYPE_CODES.items()}
        shards = ", ".join(
            f"rank {r}: {d} features, {names.get(c, 'other dtype')}"
            for r, (d, c) in enumerate(zip(dims, codes))
        )
        raise ValueError(
            f"X must have the same number of features and dtype on every process, got {shards}"
        )


def shared_seed(seed: int) -> int:
    """Rank 0's ``seed`` on every process (``seed`` itself in a single process)."""
    rank, size = rank_and_size()
    if size == 1:
        return seed
    value = torch.tensor([seed if rank == 0 else 0], dtype=torch.int64)
    return int(all_reduce_sum(value.to(communication_device()))[0])


def global_rows(x: Tensor, index: Tensor, offset: int) -> Tensor:
    """The rows of the global data set at global indices ``index`` (m,), on every process.

    Args:
        x: this shard's rows (n, ...), global rows ``offset`` to ``offset + n - 1``.
        index: global row indices (m,), the same on every process.
        offset: the global index of ``x[0]`` (see ``shard_offset``).

    Returns:
        The rows (m, ...): each is copied by the process that owns it and summed with zeros.
    """
    if not is_distributed():
        return x[index.to(x.device) - offset]
    local = index.to(x.device) - offset
    owned = (local >= 0) & (local < x.shape[0])
    rows = x.new_zeros(index.shape[0], *x.shape[1:])
    rows[owned] = x[local[owned]]
    return all_reduce_sum(rows)


def shard_bounds(num_rows: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of ``num_rows`` that this process takes in an even split
    (rank order; the first ``num_rows % size`` processes take one row more)."""
    rank, size = rank_and_size()
    base, extra = divmod(num_rows, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


@contextlib.contextmanager
def process_group_from_environment(
    device: torch.device, timeout: datetime.timedelta = datetime.timedelta(minutes=10)
) -> Iterator[torch.device]:
    """Join the process group that ``torchrun`` describes in the environment, for a block.

    Started by ``torchrun`` with more than one process (``WORLD_SIZE`` > 1) and no group
    yet, this initializes one (NCCL for a CUDA ``device``, else gloo) and destroys it at
    the end of the block; otherwise it does nothing.

    Args:
        device: the device asked for; a CUDA device without an index becomes
            ``cuda:LOCAL_RANK``.
        timeout: how long a collective waits for the other processes.

    Yields:
        The device this process computes on.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or not dist.is_available() or dist.is_initialized():
        yield device
        return
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    try:
        yield device
        # Every process done before the group goes: destroyed while another process still
        # talks to it, gloo can abort at exit ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


__all__ = [
    "all_reduce_sum",
    "check_shards",
    "communication_device",
    "global_rows",
    "is_distributed",
    "process_group_from_environment",
    "rank_and_size",
    "shard_bounds",
    "shard_offset",
    "shared_seed",
]
