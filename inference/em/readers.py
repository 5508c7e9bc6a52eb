"""Out-of-core readers: the data of an EM fit, read in row chunks from a tensor or a memmap.

``ChunkedData`` holds the validated data on the fitting device and hands the EM loop its
row chunks: the splits of a tensor, or blocks of a ``numpy.memmap`` read by ``ChunkReader``
(about ``READ_BYTES`` at a time, checked for NaN and inf) through ``MappedRows``, which drops
the file's pages it has read so that the resident memory does not grow with the file. Under
a process group it also knows the shard's place in the data set (the data mean, the rows
drawn to initialize).
"""

from __future__ import annotations

import math
import mmap

import numpy as np
import torch
from torch import Tensor

from inference.em.distributed import (
    all_reduce_sum,
    check_shards,
    communication_device,
    is_distributed,
    shard_offset,
)

READ_BYTES = 2**23  # a memmap is read in blocks of about this size (whole E-step chunks)


class MappedRows:
    """Copies of rows of a ``numpy.memmap`` that leave no page of the file resident.

    The pages of a file mapping that a process has read count in its resident set (RSS)
    until the kernel needs the memory, so a plain pass over a memmap leaves the whole file
    resident, however small the chunks copied out of it. After copying, the pages under the
    rows read are dropped from this process's mapping (``madvise(MADV_DONTNEED)``: the file
    and the kernel's page cache keep them, the next read maps them again), so the resident
    memory stays at one block of rows whatever the file's size; the values are the same.

    Pages are not dropped (rows are read as they are) where that could lose data or is
    unsupported: a copy-on-write memmap (``mode="c"``, whose pages written in memory exist
    nowhere else), an array whose buffer is not a ``mmap.mmap``, or a platform without
    ``madvise`` (Windows).
    """

    def __init__(self, array: np.memmap):
        self.array, self.mapping, self.address = array, None, 0
        owner = array
        while isinstance(owner, np.ndarray):  # a view's base chain ends at the mmap
            owner = owner.base
        if (
            isinstance(owner, mmap.mmap)
            and getattr(array, "mode", "c") != "c"
            and hasattr(owner, "madvise")
            and hasattr(mmap, "MADV_DONTNEED")
        ):
            self.mapping = owner
            self.address = np.frombuffer(owner, np.uint8).ctypes.data  # export released here
        row_bytes = array.itemsize * math.prod(array.shape[1:])
        self.block_rows = max(1, READ_BYTES // max(1, row_bytes))

    def read(self, start: int, stop: int) -> np.ndarray:
        """A copy of rows ``[start, stop)``."""
        view = self.array[start:stop]
        out = np.array(view)
        self._release(view)
        return out

    def take(self, index: np.ndarray) -> np.ndarray:
        """A copy of the rows at ``index`` (sorted), read block by block."""
        parts = [np.empty((0, *self.array.shape[1:]), self.array.dtype)]
        step = self.block_rows
        for start in np.unique(index // step) * step:
            lo, hi = np.searchsorted(index, [start, start + step])
            view = self.array[start : start + step]
            parts.append(np.asarray(view[index[lo:hi] - start]))
            self._release(view)
        return np.concatenate(parts)

    def _release(self, view: np.ndarray) -> None:
        """Drop the pages under ``view`` from this process's mapping."""
        if self.mapping is None or view.size == 0:
            return
        low = high = view.ctypes.data
        for length, stride in zip(view.shape, view.strides):
            if stride > 0:
                high += stride * (length - 1)
            else:
                low += stride * (length - 1)
        page = mmap.PAGESIZE
        start = (low - self.address) // page * page
        stop = min(-(-(high + view.itemsize - self.address) // page) * page, len(self.mapping))
        try:
            self.mapping.madvise(mmap.MADV_DONTNEED, start, stop - start)
        except (OSError, ValueError):  # unsupported here: read as they are from now on
            self.mapping = None


class ChunkedData:
    """Validated data on the fitting device: a tensor, or a memmap read in row chunks."""

    def __init__(self, values, device: torch.device, dtype: torch.dtype, is_numpy: bool):
        if isinstance(values, Tensor):
            values = values.to(device=device, dtype=dtype)
        self.values, self.device, self.dtype, self.is_numpy = values, device, dtype, is_numpy
        self.num_rows, self.dim = values.shape
        self.mapped = None if isinstance(values, Tensor) else MappedRows(values)
        # This shard's place in the data set split across processes (see ``shard``).
        self.offset, self.total_rows, self.memmap_anywhere = 0, self.num_rows, self.is_memmap

    @property
    def is_memmap(self) -> bool:
        return not isinstance(self.values, Tensor)

    def shard(self) -> ChunkedData:
        """Find this shard's place among the processes' shards (a no-op in one process)."""
        if is_distributed():
            self.offset, self.total_rows = shard_offset(self.num_rows)
            flag = torch.tensor([float(self.is_memmap)], device=communication_device())
            self.memmap_anywhere = bool(all_reduce_sum(flag)[0] > 0)
        return self

    def rows(self, start: int, stop: int) -> Tensor:
        if self.mapped is None:
            block = self.values[start:stop]
        else:
            block = torch.from_numpy(self.mapped.read(start, stop))  # a copy of the rows read
        return block.to(device=self.device, dtype=self.dtype)

    def chunks(self, size: int, shift: Tensor | None = None) -> list[Tensor] | ChunkReader:
        """Row chunks minus ``shift``; a tensor is shifted once, a memmap at every read."""
        if isinstance(self.values, Tensor):
            x = self.values if shift is None else self.values - shift
            return list(torch.split(x, size))
        return ChunkReader(self, size, shift)

    def mean(self, size: int) -> Tensor:
        """The mean row (d,) of the data set (of every process's shard).

        The first pass over a memmap, which checks its values: under a process group a
        NaN or inf in one shard is a ValueError on every process.
        """
        total, error = None, None
        try:
            total = sum(chunk.sum(0) for chunk in self.chunks(size))
        except ValueError as caught:
            if not is_distributed():
                raise
            error = caught
        if is_distributed():
            check_shards(self.dim, self.dtype, error)
        return all_reduce_sum(total) / self.total_rows

    def init_rows(self, limit: int, generator: torch.Generator) -> Tensor:
        """All rows of a tensor; at most ``limit`` random rows of a memmap.

        Under a process group: this shard's part of the rows, drawn among all the rows of
        the data set (the same draw on every process).
        """
        if not self.memmap_anywhere or self.total_rows <= limit:
            return self.rows(0, self.num_rows)
        index = torch.randperm(self.total_rows, generator=generator)[:limit].sort().values
        index = index[(index >= self.offset) & (index < self.offset + self.num_rows)]
        index = (index - self.offset).numpy()
        block = self.values[index] if self.mapped is None else self.mapped.take(index)
        return torch.as_tensor(block).to(device=self.device, dtype=self.dtype)


class ChunkReader:
    """The row chunks of a memmap minus ``shift``, re-iterable (one pass per iteration).

    Rows are read a block of whole chunks at a time (about ``READ_BYTES``), checked for NaN
    and inf, shifted and cut into the chunks, which are those of the same data in memory.
    """

    def __init__(self, data: ChunkedData, size: int, shift: Tensor | None):
        self.data, self.size, self.shift = data, size, shift

    def __iter__(self):
        block = self.size * max(1, self.data.mapped.block_rows // self.size)
        for start in range(0, self.data.num_rows, block):
            x = self.data.rows(start, start + block)
            if not torch.isfinite(x).all():
                raise ValueError("Input X contains NaN or infinity.")
            yield from torch.split(x if self.shift is None else x - self.shift, self.size)


__all__ = ["READ_BYTES", "ChunkReader", "ChunkedData", "MappedRows"]
