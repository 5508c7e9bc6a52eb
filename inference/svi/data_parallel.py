"""Data-parallel SVI under ``torchrun``: each process's share of the data, averaged gradients.

[`fit_svi`][inference.fit_svi] switches to this mode by itself when a `torch.distributed`
process group of more than one process is initialized (``torchrun``; gloo on CPU, NCCL on
GPUs). Every process runs the same model and guide; what differs is the data each one
looks at:

- A plate with ``subsample_size`` (``pyro.plate("data", N, subsample_size=B)``) draws its
  B indices, on each process, from that process's own contiguous share of ``range(N)``
  ([`shard_bounds`][inference.em.distributed.shard_bounds]; rank 0 holds the first rows).
  The sites in the plate are scaled so that each process's ELBO is an unbiased estimate
  of the full-data ELBO, and their average over the processes (what the averaged
  gradient follows) is one ELBO estimate on a minibatch of B rows per process, stratified
  over the shares. Data that does not fit one process can thus be held as shares: the
  indices are global, and the rows ``shard_bounds(N)`` names are the only ones a process
  ever reads.
- A plate without ``subsample_size``, or with explicit ``subsample`` indices, is left as
  the model wrote it.
- Every other random draw (the guide's noise, AutoCWM's start) comes from one random
  stream that all processes share: they begin from rank 0's seed. So the processes
  together compute exactly the estimate that one process computes on the union of their
  minibatches, and with the whole share as minibatch, the full-data gradient.

After each backward pass the gradients and the loss are averaged with one ``all_reduce``
(through [`all_reduce_sum`][inference.em.distributed.all_reduce_sum], the reduction the
EM stack uses), so every process takes the same optimizer step and holds the same
parameters. A process whose parameters differ in names or shapes from the others' makes
every process raise, instead of a collective that waits forever.
"""

from __future__ import annotations

import zlib

import pyro
import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample
from torch import Tensor

from inference.em.distributed import (
    all_reduce_sum,
    communication_device,
    is_distributed,
    process_group_from_environment,
    rank_and_size,
    shard_bounds,
    shared_seed,
)


class ShardedSubsample(Messenger):
    """Draw each subsampled plate's indices from this process's share of the plate.

    Used by [`fit_svi`][inference.fit_svi] around every step under a process group; in a
    single process it changes nothing. The draws come from a generator seeded by
    ``(seed, step, rank)``, not from the shared random stream, so a resumed run draws the
    same minibatches and the processes' guide noise stays in step.

    Args:
        seed: a seed that every process shares.
        step: the SVI step.

    Raises:
        ValueError: when a plate's ``subsample_size`` exceeds this process's share of it.
    """

    def __init__(self, seed: int, step: int) -> None:
        super().__init__()
        self.rank, self.size = rank_and_size()
        self.generator = torch.Generator().manual_seed(hash((seed, step, self.rank)) % 2**63)
        self.scales: dict[str, float] = {}

    def _pyro_sample(self, msg) -> None:
        fn = msg["fn"]
        if self.size == 1:
            return
        if isinstance(fn, _Subsample):
            if msg["value"] is not None or fn.subsample_size is None:
                return  # explicit (or replayed) indices; a plate without subsampling
            if fn.subsample_size >= fn.size:
                return
            start, stop = shard_bounds(fn.size)
            rows = stop - start
            if fn.subsample_size > rows:
                raise ValueError(
                    f"plate {msg['name']!r} draws subsample_size={fn.subsample_size} rows, "
                    f"but each of the {self.size} processes holds only about {rows} of its "
                    f"{fn.size} rows: use subsample_size <= {fn.size // self.size}"
                )
            # on the generator's device, also when the model runs under torch.device("cuda")
            draw = torch.randperm(rows, generator=self.generator, device="cpu")
            index = start + draw[: fn.subsample_size]
            msg["value"] = index.to(fn.device)
            # A share with more rows than the average weighs more, so that the mean over
            # the processes stays unbiased when N is not a multiple of their number.
            self.scales[msg["name"]] = self.size * rows / fn.size
            return
        for frame in msg["cond_indep_stack"]:
            factor = self.scales.get(frame.name)
            if factor is not None and factor != 1.0:
                msg["scale"] = msg["scale"] * factor


def synchronize_seed() -> int:
    """Reseed every process's torch random streams from rank 0's, and return the seed.

    The seed is drawn from rank 0's current stream, so a run seeded with
    ``pyro.set_rng_seed`` on rank 0 is reproducible whatever the other ranks were seeded
    with. In a single process, draws the seed and leaves the stream as it is.
    """
    seed = shared_seed(int(torch.randint(0, 2**62, (1,))))
    if is_distributed():
        torch.manual_seed(seed)
    return seed


def _signature(params: dict[str, Tensor]) -> Tensor:
    text = ";".join(f"{name}:{tuple(p.shape)}:{p.dtype}" for name, p in params.items())
    return torch.tensor([zlib.crc32(text.encode()), sum(p.numel() for p in params.values())])


def check_same_parameters(params: dict[str, Tensor]) -> None:
    """Check that every process holds parameters of the same names, shapes and dtypes.

    One small collective. A mismatch (a model that creates a parameter on one process
    only, a guide built from different data shapes) raises on every process.

    Raises:
        ValueError: on every process, if the processes' parameters differ.
    """
    _, size = rank_and_size()
    own = _signature(dict(sorted(params.items())))
    total = all_reduce_sum(own.to(communication_device()))
    if not torch.equal(total.cpu(), size * own):
        raise ValueError(
            "the processes hold different parameters (names, shapes or dtypes): every "
            f"process must run the same model and guide; this one has {len(params)}: "
            f"{sorted(params)[:5]}{' ...' if len(params) > 5 else ''}"
        )


def broadcast_from_first(tensors: dict[str, Tensor]) -> None:
    """Overwrite ``tensors`` (in place) with rank 0's values, on every process."""
    if not is_distributed() or not tensors:
        return
    rank, _ = rank_and_size()
    names = sorted(tensors)
    values = [tensors[n].detach() if rank == 0 else torch.zeros_like(tensors[n]) for n in names]
    with torch.no_grad():
        for name, value in zip(names, all_reduce_sum(values)):
            tensors[name].copy_(value)


def average_gradients(params: dict[str, Tensor], loss: float) -> float:
    """Average the gradients of ``params`` and the loss over the processes, in place.

    A parameter without a gradient on some process counts as a zero gradient there; one
    without a gradient on every process keeps ``grad = None`` (an optimizer then skips it
    everywhere, as it would in one process).

    Args:
        params: the step's parameters by name (unconstrained leaf tensors).
        loss: this process's loss.

    Returns:
        The mean loss over the processes (the same on every process; non-finite if it is
        on any process, so that every process stops together).
    """
    if not is_distributed():
        return loss
    check_same_parameters(params)
    _, size = rank_and_size()
    names = sorted(params)
    grads = [
        params[n].grad if params[n].grad is not None else torch.zeros_like(params[n])
        for n in names
    ]
    flags = torch.tensor([loss] + [params[n].grad is not None for n in names], dtype=torch.float64)
    sums = all_reduce_sum([flags, *grads])
    flags = sums[0]
    for name, has_grad, grad in zip(names, flags[1:].tolist(), sums[1:]):
        params[name].grad = grad / size if has_grad else None
    return float(flags[0]) / size


def parameters_by_name(trace) -> dict[str, Tensor]:
    """The unconstrained parameters of a ``param_only`` trace, by name."""
    return {
        name: site["value"].unconstrained()
        for name, site in trace.nodes.items()
        if site["type"] == "param"
    }


def guide_buffers(guide) -> dict[str, Tensor]:
    """The guide's buffers by name (AutoCWM's preconditioner); empty for other guides."""
    return dict(guide.named_buffers()) if isinstance(guide, torch.nn.Module) else {}


def synchronize_start(guide) -> None:
    """Give every process rank 0's parameters and guide buffers (once, at the start)."""
    if not is_distributed():
        return
    params = dict(pyro.get_param_store().named_parameters())
    check_same_parameters(params)
    broadcast_from_first(params)
    broadcast_from_first(guide_buffers(guide))


# process_group_from_environment and shard_bounds are the EM stack's (inference.em.distributed);
# they are named here too, so that an SVI script imports what it needs from one place.
__all__ = [
    "ShardedSubsample",
    "process_group_from_environment",
    "shard_bounds",
    "average_gradients",
    "broadcast_from_first",
    "check_same_parameters",
    "guide_buffers",
    "parameters_by_name",
    "synchronize_seed",
    "synchronize_start",
]
