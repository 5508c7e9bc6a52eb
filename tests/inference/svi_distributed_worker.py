"""A worker of the data-parallel SVI tests, started by ``torchrun`` (test_svi_distributed.py).

    torchrun --standalone --nproc_per_node=2 tests/inference/svi_distributed_worker.py DIR

Every process joins a gloo group (60 s timeout) and, in one launch:

1. ``gradients``: for each guide of ``GUIDES``, the first step's averaged gradient, with
   each process's minibatch its whole share of the plate (written with the starting
   parameters, so that the test can compute the same step in one process on all data);
2. ``fit``: a data-parallel ``fit_svi`` of the logistic regression with AutoNormal;
3. ``checkpoint``: resumes, on two processes, the checkpoint that the test wrote in one
   process, and writes one of its own (rank 0) that the test resumes in one process;
4. ``errors``: parameters that differ between the processes, a minibatch larger than a
   share, a checkpoint that only one process sees: each must raise on every process.

Results go to ``DIR/rank<r>.pt``. The models, data and guides are shared with the test.
"""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.infer.autoguide import AutoDelta, AutoGuideList, AutoNormal

from inference import CWMELBO, fit_svi
from inference.em.distributed import process_group_from_environment
from inference.svi.data_parallel import (
    ShardedSubsample,
    average_gradients,
    parameters_by_name,
    synchronize_start,
)
from pyro_cwm.guides import AutoCWM

NUM_POINTS, NUM_GROUPS = 600, 16
FIT_STEPS, FIT_BATCH = 1200, 100  # per process; one process uses 2 * FIT_BATCH
CHECKPOINT_STEPS = 300


def logistic_data() -> tuple[torch.Tensor, torch.Tensor]:
    """Features (NUM_POINTS, 3) with an intercept column, and 0/1 labels, float64."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(NUM_POINTS, 3, generator=generator, dtype=torch.float64)
    x[:, 0] = 1.0
    logits = x @ torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    y = torch.bernoulli(torch.sigmoid(logits), generator=generator)
    return x, y


def logistic(x, y, batch=None):
    beta = pyro.sample("beta", dist.Normal(x.new_zeros(3), 2.0).to_event(1))
    with pyro.plate("data", x.shape[0], subsample_size=batch) as idx:
        pyro.sample("y", dist.Bernoulli(logits=(x[idx] * beta).sum(-1)), obs=y[idx])


def hierarchical_data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    sigma = 0.5 + torch.rand(NUM_GROUPS, generator=generator, dtype=torch.float64)
    y = 1.0 + torch.randn(NUM_GROUPS, generator=generator, dtype=torch.float64) * (1 + sigma)
    return y, sigma


def hierarchical(y, sigma, batch=None):
    mu = pyro.sample("mu", dist.Normal(y.new_zeros(()), 5.0))
    with pyro.plate("groups", y.shape[0], subsample_size=batch) as idx:
        theta = pyro.sample("theta", dist.Normal(mu, 1.0))
        pyro.sample("y", dist.Normal(theta, sigma[idx]), obs=y[idx])


def make_case(name: str):
    """``(model, data, guide, loss)`` of a gradient case; the guide is built, not yet set up."""
    if name == "autonormal":
        return logistic, logistic_data(), AutoNormal(logistic), pyro.infer.Trace_ELBO()
    if name == "autocwm":
        # The maps pinned: map="auto" decides from the start's Newton steps, which see a
        # minibatch in the workers and all the data in the one-process reference.
        guide = AutoCWM(logistic, num_components=2, map="location_scale")
        return logistic, logistic_data(), guide, CWMELBO(num_particles=4)
    if name == "guide-list":
        guide = AutoGuideList(hierarchical)
        guide.append(AutoCWM(poutine.block(hierarchical, expose=["mu"]), num_components=2))
        guide.append(AutoDelta(poutine.block(hierarchical, hide=["mu"])))
        return hierarchical, hierarchical_data(), guide, CWMELBO(num_particles=4)
    raise ValueError(name)


GUIDES = ("autonormal", "autocwm", "guide-list")
STEP_SEED = 7


def first_gradient(name: str, size: int) -> dict:
    """Set up the guide, then one step's gradient; each process's batch is its share."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model, data, guide, loss = make_case(name)
    batch = data[0].shape[0] // size
    loss.loss(model, guide, *data, batch)  # sets up the guide and creates its parameters
    synchronize_start(guide)
    start = {n: p.detach().clone() for n, p in pyro.get_param_store().named_parameters()}
    buffers = {n: b.clone() for n, b in guide.named_buffers()}
    pyro.set_rng_seed(STEP_SEED)
    with poutine.trace(param_only=True) as capture, ShardedSubsample(seed=3, step=0):
        value = loss.loss_and_grads(model, guide, *data, batch)
    params = parameters_by_name(capture.trace)
    value = average_gradients(params, value)
    grads = {n: p.grad.clone() for n, p in params.items() if p.grad is not None}
    return {"start": start, "buffers": buffers, "loss": value, "grads": grads}


def posterior_of(guide: AutoNormal) -> dict[str, torch.Tensor]:
    return {"loc": guide.locs.beta.detach().clone(), "scale": guide.scales.beta.detach().clone()}


def fit_logistic(directory: Path, batch: int, **options) -> tuple[AutoNormal, dict]:
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoNormal(logistic)
    history = fit_svi(logistic, guide, *logistic_data(), batch, progress=False, **options)
    return guide, history


def run_errors(directory: Path, rank: int) -> dict[str, str]:
    errors = {}
    x, y = logistic_data()

    def extra_parameter(x, y, batch=None):
        if rank == 1:
            pyro.param("only_on_rank_1", torch.zeros(2, dtype=torch.float64))
        logistic(x, y, batch)

    cases = {
        "parameters": (extra_parameter, {}),
        "batch": (logistic, {"batch": NUM_POINTS // 2 + 1}),
        "checkpoint": (logistic, {"checkpoint": directory / f"only-rank0-{rank}.pt"}),
    }
    if rank == 0:
        torch.save({}, directory / "only-rank0-0.pt")
    for name, (model, options) in cases.items():
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        batch = options.pop("batch", 50)
        try:
            fit_svi(model, AutoNormal(model), x, y, batch, num_steps=3, progress=False, **options)
        except ValueError as error:
            errors[name] = str(error)
    return errors


def main() -> None:
    directory = Path(sys.argv[1])
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=60)
    with process_group_from_environment(torch.device("cpu"), timeout=timeout):
        rank, size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        out: dict = {"gradients": {name: first_gradient(name, size) for name in GUIDES}}
        guide, history = fit_logistic(directory, FIT_BATCH, num_steps=FIT_STEPS)
        out["fit"] = {"posterior": posterior_of(guide), "loss": history["loss"]}
        # Resume on two processes what one process wrote; write a checkpoint for the test.
        guide, history = fit_logistic(
            directory, FIT_BATCH, num_steps=2 * CHECKPOINT_STEPS,
            checkpoint=directory / "from-one.pt",
        )
        out["resumed"] = {"posterior": posterior_of(guide), "loss": history["loss"]}
        guide, history = fit_logistic(
            directory, FIT_BATCH, num_steps=CHECKPOINT_STEPS, checkpoint=directory / "from-two.pt"
        )
        out["written"] = {"loss": history["loss"]}
        out["errors"] = run_errors(directory, rank)
        torch.save(out, directory / f"rank{rank}.pt")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
