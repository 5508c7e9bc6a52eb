"""The SVI loop: progress bar, history, early stopping, NaN stop, checkpoint and resume,
in one process or data-parallel under ``torchrun``."""

from __future__ import annotations

import contextlib
import functools
import math
import os
import time
import warnings
from typing import Any

import pyro
import pyro.optim
import pyro.poutine as poutine
import torch
from pyro.infer import Trace_ELBO, TraceEnum_ELBO
from pyro.infer.util import zero_grads
from sklearn.exceptions import ConvergenceWarning

from inference.em.distributed import all_reduce_sum, is_distributed, rank_and_size
from inference.progress import Progress
from inference.svi.checkpoint import load_checkpoint, save_checkpoint
from inference.svi.data_parallel import (
    ShardedSubsample,
    average_gradients,
    guide_buffers,
    parameters_by_name,
    synchronize_seed,
    synchronize_start,
)
from inference.svi.elbo import CWMELBO, cwm_guides
from inference.svi.optim import FusedClippedAdam
from pyro_cwm.guides.log_joint import enumerated_sites, max_plate_nesting
from pyro_cwm.nn.checks import check_positive_int


def _data_device(value) -> torch.device | None:
    """The device of the first tensor in ``value`` (nested tuples, lists and dicts)."""
    if isinstance(value, torch.Tensor):
        return value.device
    items = value.values() if isinstance(value, dict) else value
    if isinstance(value, (tuple, list, dict)):
        for item in items:
            found = _data_device(item)
            if found is not None:
                return found
    return None


def _placed(model, device: torch.device):
    """``model`` run under ``torch.device(device)``: the tensors it creates land there."""

    @functools.wraps(model)
    def placed_model(*args, **kwargs):
        with torch.device(device):
            return model(*args, **kwargs)

    return placed_model


def _default_loss(model, guide, args: tuple, kwargs: dict):
    """CWMELBO for a guide with AutoCWM parts; for another guide, TraceEnum_ELBO where the
    model has sites marked for enumeration (``config_enumerate``: summed out, not guided),
    Trace_ELBO otherwise."""
    if cwm_guides(guide):
        return CWMELBO()
    if enumerated_sites(model, *args, **kwargs):
        nesting = max_plate_nesting(model, *args, **kwargs)
        return TraceEnum_ELBO(max_plate_nesting=nesting)
    return Trace_ELBO()


def _to_device(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def _param_values() -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in pyro.get_param_store().named_parameters()}


def _buffer_values(guide) -> dict[str, torch.Tensor]:
    """The guide's buffers (AutoCWM's preconditioner, set from its random starts)."""
    return {name: b.detach().clone() for name, b in guide_buffers(guide).items()}


def _checkpoint_exists(path: str | os.PathLike) -> bool:
    """Whether the checkpoint exists, the same answer on every process (or an error)."""
    exists = os.path.exists(path)
    if not is_distributed():
        return exists
    _, size = rank_and_size()
    count = int(all_reduce_sum(torch.tensor([float(exists)]))[0])
    if 0 < count < size:
        raise ValueError(
            f"checkpoint {str(path)!r} exists on {count} of {size} processes: put it on a "
            "file system that every process reads"
        )
    return exists


INITIAL_LR, FINAL_LR = 1e-2, 1e-3


def default_step_size(step: int, num_steps: int) -> float:
    """The default step size at ``step`` of a run of ``num_steps``: 0.01 for the first
    half, then decaying exponentially to 0.001 at the last step.

    The constant half gets the parameters to the optimum as a constant step would; the
    decay then shrinks the jitter that a constant step leaves around it (on a tight
    posterior, many posterior sds). A longer run decays more slowly to the same end.
    """
    half = num_steps // 2
    if step < half:
        return INITIAL_LR
    return INITIAL_LR * (FINAL_LR / INITIAL_LR) ** ((step - half) / max(1, num_steps - 1 - half))


PLATEAU_TAIL = 0.2
"""Fraction of the steps at the end of a run over which ``fit_svi`` checks that the loss
has stopped falling (see ``loss_drop``)."""
PLATEAU_MIN_DROP = 0.05
"""Nats of fall over half that tail that count as not converged: a marginal mean a third
of a posterior sd off costs about as much KL (delta^2 / 2 for a Gaussian)."""
PLATEAU_Z = 3.0
"""Standard errors by which the fall must exceed zero (a t statistic with 18 degrees of
freedom: 0.4% of converged runs by chance alone, before ``PLATEAU_MIN_DROP``)."""


def loss_drop(
    losses: list[float], tail: float = PLATEAU_TAIL, batches: int = 20
) -> tuple[float, float] | None:
    """How far the loss fell over the end of a run, and the standard error of that fall.

    The last ``tail`` fraction of the steps is cut into ``batches`` batches, each reduced
    to its median (a loss with rare spikes of thousands of nats, as a poor guide gives,
    still shows its trend); a straight line through the medians gives the fall between
    the two halves of the tail (its slope times half the tail's length), and the median
    absolute deviation of the residuals its standard error.

    Returns:
        ``(fall, standard_error)`` in nats, or None where the tail holds fewer steps than
        ``batches``.
    """
    size = int(tail * len(losses)) // batches
    if size < 1:
        return None
    values = torch.tensor(losses[len(losses) - batches * size :], dtype=torch.float64)
    medians = values.reshape(batches, size).median(-1).values
    steps = size * torch.arange(batches, dtype=torch.float64)
    steps = steps - steps.mean()
    spread = (steps**2).sum()
    slope = (steps * (medians - medians.mean())).sum() / spread
    residuals = medians - medians.mean() - slope * steps
    scale = 1.4826 * (residuals - residuals.median()).abs().median()
    half = batches * size / 2
    return (-slope * half).item(), (half * scale / spread.sqrt()).item()


def _check_converged(history: dict[str, Any], num_steps: int) -> None:
    """Set ``history["converged"]`` and warn where the loss is still falling at the end."""
    drop = None if history["stopped_early"] else loss_drop(history["loss"])
    history["converged"] = True if history["stopped_early"] else None
    if drop is None:
        return
    fall, error = drop
    history["converged"] = not (fall > PLATEAU_MIN_DROP and fall > PLATEAU_Z * error)
    if history["converged"] or rank_and_size()[0] != 0:
        return
    tail = math.ceil(PLATEAU_TAIL * 100)
    warnings.warn(
        f"fit_svi: the fit has not converged: the loss still fell by {fall:.3g} nats "
        f"({fall / max(error, 1e-300):.1f} standard errors) from the first to the second half "
        f"of the last {tail}% of the {len(history['loss'])} steps. Run more steps (num_steps="
        f"{2 * num_steps}); to check a fit, inference.psis_diagnostic(model, guide, *args) "
        "gives PSIS k-hat (above 0.7: the guide misses the posterior's mass)",
        ConvergenceWarning,
        stacklevel=3,
    )


def fit_svi(
    model,
    guide,
    *args,
    loss=None,
    num_steps: int = 1000,
    optim: pyro.optim.PyroOptim | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    patience: int | None = None,
    smoothing: float = 0.95,
    min_delta: float = 0.0,
    keep_best: bool = False,
    average_tail: float = 0.0,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 100,
    resume: bool = True,
    **kwargs,
) -> dict[str, Any]:
    """Run SVI of ``guide`` against ``model(*args, **kwargs)`` and return the history.

    Data-parallel under ``torchrun`` ([`inference.svi.data_parallel`][inference.svi.data_parallel]).

    Args:
        model (Callable): a Pyro model.
        guide (Callable): its guide (an AutoCWM, any autoguide, or a callable).
        *args (Any): positional arguments of the model and the guide.
        loss (pyro.infer.ELBO | None): default [`CWMELBO`][inference.CWMELBO] for a guide with
            AutoCWM parts, else ``TraceEnum_ELBO`` if the model enumerates sites, or ``Trace_ELBO``.
        num_steps: maximum number of steps.
        optim: a Pyro optimizer (a ``PyroLRScheduler`` is stepped once per step);
            default ``FusedClippedAdam`` at [`default_step_size`][inference.default_step_size].
        device: move tensor arguments there (e.g. ``"cuda"``). On an accelerator the model runs
            under ``torch.device`` of the data, so priors written with Python numbers work.
        progress: show progress: a bar with the loss when interactive, else one summary line.
        patience: stop after this many steps without a ``min_delta`` gain (None: never).
        smoothing: weight of the past in the smoothed loss (bias-corrected EMA, in [0, 1)).
        min_delta: the gain of the smoothed loss that counts for ``patience``.
        keep_best: end with the parameters of the best smoothed loss (default: the last ones).
        average_tail: end with the parameters averaged over this last fraction of the steps
            (Polyak-Ruppert, in [0, 1); ignored when ``keep_best`` restores a step).
        checkpoint: file written every ``checkpoint_every`` steps and at the end (by rank 0).
        checkpoint_every: number of steps between checkpoints.
        resume: continue from ``checkpoint`` when it exists (every process reads it).
        **kwargs (Any): keyword arguments of the model and the guide.

    Returns:
        ``{"loss": [...], "smoothed_loss": [...], "steps", "stopped_early", "time_s", "best_step",
        "best_smoothed_loss", "restored_best", "averaged_steps" (0: the last step's parameters
        kept), "converged" (False: see Warns; None: too short a run to tell)}``.

    Warns:
        ConvergenceWarning: where the loss still falls clearly at the end: run more steps.

    Raises:
        FloatingPointError: when the loss or a gradient is not finite; the parameters are
            those of the last finite step.
        ValueError: for bad options; under a process group, when the processes' parameters
            differ or a plate's ``subsample_size`` exceeds a process's share of its rows.
    """
    check_positive_int("num_steps", num_steps)
    check_positive_int("checkpoint_every", checkpoint_every)
    if not 0 <= smoothing < 1:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    if not 0 <= average_tail < 1:
        raise ValueError(f"average_tail must be in [0, 1), got {average_tail}")
    if device is not None:
        args, kwargs = _to_device(args, device), _to_device(kwargs, device)
    default_optim = optim is None
    if default_optim:
        optim = FusedClippedAdam(lr=INITIAL_LR, clip_norm=10.0)

    history: dict[str, Any] = {
        "loss": [],
        "smoothed_loss": [],
        "steps": 0,
        "stopped_early": False,
        "time_s": 0.0,
        "best_smoothed_loss": math.inf,
        "best_step": 0,
        "restored_best": False,
        "averaged_steps": 0,
    }
    best_params: dict[str, torch.Tensor] = {}
    # running mean of the parameters over the tail, and the number of steps in it
    tail: dict[str, Any] = {"count": 0, "mean": {}}
    tail_start = num_steps - math.ceil(average_tail * num_steps)
    distributed = is_distributed()
    seed = synchronize_seed() if distributed else 0

    def sharded(step: int):
        return ShardedSubsample(seed, step) if distributed else contextlib.nullcontext()

    resuming = checkpoint is not None and resume and _checkpoint_exists(checkpoint)
    # Priors are usually written with Python numbers, which torch puts on the CPU: on an
    # accelerator the model runs under torch.device of the data, and so does the first
    # run of the guide, which creates its parameters from the model's trace.
    data_device = _data_device((args, kwargs))
    on_accelerator = data_device is not None and data_device.type != "cpu"
    if on_accelerator:
        model = _placed(model, data_device)
    if loss is None:
        loss = _default_loss(model, guide, args, kwargs)
    if resuming or distributed or on_accelerator:
        placed = torch.device(data_device) if on_accelerator else contextlib.nullcontext()
        with sharded(-1), placed:
            loss.loss(model, guide, *args, **kwargs)  # creates every parameter
    if resuming:
        state = load_checkpoint(checkpoint)
        with torch.no_grad():
            for name, param in pyro.get_param_store().named_parameters():
                if name in state["params"]:
                    param.copy_(state["params"][name])
            buffers = dict(guide.named_buffers()) if isinstance(guide, torch.nn.Module) else {}
            for name, value in state.get("buffers", {}).items():
                if name in buffers:
                    buffers[name].copy_(value)
        optim_state = state["optim"]
        if default_optim:  # the optimizers are re-created from this state at their next step
            lr = default_step_size(state["history"]["steps"], num_steps)
            for param_state in optim_state.values():
                for group in param_state.get("param_groups", []):
                    group["lr"] = lr
        optim.set_state(optim_state)
        torch.set_rng_state(state["rng"])
        history = state["history"]
        best_params = state.get("best_params", {})
        tail = state.get("tail", tail)
        seed = state.get("subsample_seed", seed)
    synchronize_start(guide)
    if hasattr(loss, "step"):
        loss.step = history["steps"]  # schedules in the loss (CWMELBO's warm-up) resume too

    def save() -> None:
        if rank_and_size()[0] != 0:
            return
        save_checkpoint(
            checkpoint,
            {
                "params": _param_values(),
                "buffers": _buffer_values(guide),
                "optim": optim.get_state(),
                "rng": torch.get_rng_state(),
                "history": history,
                "best_params": best_params,
                "tail": tail,
                "subsample_seed": seed,
            },
        )

    burn_in = math.ceil(1 / (1 - smoothing)) if smoothing > 0 else 0
    started = time.perf_counter() - history["time_s"]
    bar = Progress(
        range(history["steps"], history["steps"] if history["stopped_early"] else num_steps),
        "fit_svi",
        enabled=progress and rank_and_size()[0] == 0,
        unit="steps",
        initial=history["steps"],
        total=num_steps,
    )
    for step in bar:
        with poutine.trace(param_only=True) as capture, sharded(step):
            value = loss.loss_and_grads(model, guide, *args, **kwargs)
        named = parameters_by_name(capture.trace)
        value = average_gradients(named, value)
        params = set(named.values())
        finite_grads = all(p.grad is None or torch.isfinite(p.grad).all() for p in params)
        if not (math.isfinite(value) and finite_grads):
            zero_grads(params)
            raise FloatingPointError(
                f"fit_svi: the {'loss' if not math.isfinite(value) else 'gradient'} became "
                f"non-finite at step {step}; the parameters are those of the last finite "
                "step (try a smaller learning rate)"
            )
        if default_optim:
            optim.set_lr(default_step_size(step, num_steps))
        optim(params)
        if isinstance(optim, pyro.optim.PyroLRScheduler):
            optim.step()
        zero_grads(params)
        # Bias-corrected moving average: early values are not pulled toward the first loss.
        previous = history["smoothed_loss"][-1] * (1 - smoothing**step) if step else 0.0
        smoothed = (smoothing * previous + (1 - smoothing) * value) / (1 - smoothing ** (step + 1))
        history["loss"].append(value)
        history["smoothed_loss"].append(smoothed)
        history["steps"] = step + 1
        if step < burn_in:
            history["best_step"] = step
        elif smoothed < history["best_smoothed_loss"] - min_delta:
            history["best_smoothed_loss"], history["best_step"] = smoothed, step
            if keep_best:
                best_params = _param_values()
        elif patience is not None and step - history["best_step"] >= patience:
            history["stopped_early"] = True
        if step >= tail_start:
            tail["count"] += 1
            with torch.no_grad():
                for name, param in pyro.get_param_store().named_parameters():
                    mean = tail["mean"].setdefault(name, param.detach().clone())
                    mean.add_(param.detach() - mean, alpha=1.0 / tail["count"])
        bar.set_postfix(loss=f"{smoothed:.4g}")
        history["time_s"] = time.perf_counter() - started
        if checkpoint is not None and (step + 1) % checkpoint_every == 0:
            save()
        if history["stopped_early"]:
            break
    bar.close()
    history["time_s"] = time.perf_counter() - started
    if checkpoint is not None:
        save()
    if keep_best and best_params and history["best_step"] != history["steps"] - 1:
        _load_params(best_params)
        history["restored_best"] = True
    elif tail["count"] > 1:
        _load_params(tail["mean"])
    history["averaged_steps"] = tail["count"] if not history["restored_best"] else 0
    _check_converged(history, num_steps)
    return history


def _load_params(values: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, param in pyro.get_param_store().named_parameters():
            if name in values:
                param.copy_(values[name])
