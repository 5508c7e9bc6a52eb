"""Density estimation: fit a CWM (or a conditional CWM) to data by maximum likelihood."""

from __future__ import annotations

import copy
import functools
import math
import os
import time
from typing import Any

import torch
from torch import Tensor

from inference.em.pretrain import em_pretrain
from inference.progress import Progress
from inference.svi.checkpoint import load_checkpoint, save_checkpoint
from inference.validation import as_data_tensor
from pyro_cwm.nn.checks import check_positive_int


def _mean_nll(model, data: Tensor, context: Tensor | None, chunk: int = 65536) -> float:
    """Mean negative log-likelihood of ``data`` (evaluated in chunks, without gradients)."""
    total = 0.0
    with torch.no_grad():
        for start in range(0, data.shape[0], chunk):
            ctx = None if context is None else context[start : start + chunk]
            total -= model(ctx).log_prob(data[start : start + chunk]).sum().item()
    return total / data.shape[0]


def _split(n: int, validation: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    perm = torch.randperm(n, generator=generator)
    n_val = int(round(validation * n))
    return perm[n_val:], perm[:n_val]


def _parameter_groups(model, lr: float, classifier_lr: float | None) -> list[dict]:
    """Adam's groups: a CWM's classifier at ``classifier_lr`` (default ``10 * lr``)."""
    classifier = getattr(model, "classifier", None)
    if not (hasattr(model, "set_gaussian_mixture") and isinstance(classifier, torch.nn.Module)):
        return [{"params": list(model.parameters())}]
    inner = {id(p) for p in classifier.parameters()}
    rest = [p for p in model.parameters() if id(p) not in inner]
    groups = [{"params": rest}] if rest else []
    rate = classifier_lr if classifier_lr is not None else 10 * lr
    return groups + [{"params": list(classifier.parameters()), "lr": rate}]


def fit_density(
    model,
    data,
    context=None,
    *,
    epochs: int = 100,
    batch_size: int = 256,
    lr: float = 1e-3,
    classifier_lr: float | None = None,
    weight_decay: float = 0.0,
    validation: float = 0.1,
    validation_data: tuple | None = None,
    patience: int | None = 20,
    em_pretraining: bool | None = None,
    em_options: dict[str, Any] | None = None,
    grad_clip: float | None = None,
    seed: int | None = 0,
    progress: bool = True,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = True,
) -> dict[str, Any]:
    """Fit ``model`` to ``data`` by maximum likelihood with minibatch Adam.

    For a CWM: start from the EM-fitted diagonal Gaussian mixture, then train maps and
    classifier together, the classifier at a ten times larger learning rate (its logits must
    grow from zero to steep slopes, and Adam moves a weight by about ``lr`` per step).

    Args:
        model (torch.nn.Module): a [`CWM`][pyro_cwm.nn.CWM] (conditional with ``context``) or any
            module whose call returns a distribution; moved to the device and dtype of ``data``.
        data (torch.Tensor | numpy.ndarray): points, shape (N, d); numpy: in the model's dtype.
        context (torch.Tensor | numpy.ndarray | None): contexts, shape (N, context_dim).
        epochs: maximum number of passes over the training data.
        batch_size: minibatch size.
        lr: Adam's learning rate.
        classifier_lr: learning rate of a CWM's classifier (``model.classifier``; ``10 * lr``).
        weight_decay: Adam's weight decay.
        validation: fraction of the data held out for early stopping and for keeping the best
            parameters (0: neither).
        validation_data: ``(data,)`` or ``(data, context)`` held out instead of a fraction.
        patience: stop when this many epochs (>= 1) have passed since the trained epoch with
            the best held-out NLL (None: never).
        em_pretraining: start from a diagonal Gaussian mixture fitted by EM unless resuming
            ([`em_pretrain`][inference.em_pretrain]); default: if the model supports it.
        em_options: options of [`GaussianMixtureEM`][inference.GaussianMixtureEM] (diagonal).
        grad_clip: clip the gradient norm to this value.
        seed: seed of the split, the shuffling and the EM initialization.
        progress: show progress: a bar when interactive, else one summary line.
        checkpoint: path of a checkpoint written after every epoch.
        resume: continue from ``checkpoint`` when it exists.

    Returns:
        The history: ``train_nll``, ``val_nll`` (mean NLL per point and epoch), ``best_epoch``
        (-1: the start), ``best_val_nll``, ``start_val_nll``, ``stopped_early``, ``epochs``,
        ``em_log_likelihood`` and ``time_s``. With held-out data the model ends with the
        parameters of the best epoch, or of the start if no epoch beat it.

    Raises:
        ValueError, TypeError: for bad data, context or options.
        FloatingPointError: if the loss or its gradient stops being finite; the model keeps
            the parameters of the last finite step.
    """
    dim, context_dim = getattr(model, "dim", None), getattr(model, "context_dim", None)
    can_em = hasattr(model, "set_gaussian_mixture")
    if em_pretraining and not can_em:
        raise ValueError("em_pretraining needs a model with set_gaussian_mixture (a CWM)")
    em_pretraining = can_em if em_pretraining is None else em_pretraining
    param = next(model.parameters())
    if isinstance(data, Tensor):
        model.to(device=data.device, dtype=data.dtype if data.is_floating_point() else None)
        param = next(model.parameters())
    as_tensor = functools.partial(as_data_tensor, dtype=param.dtype, device=param.device)
    data = as_tensor(data, dim=dim, min_rows=2)
    if context_dim and context is None:
        raise ValueError(f"context is required: the model has context_dim={context_dim}")
    if context is not None:
        if context_dim == 0:
            raise ValueError("context was given but the model is unconditional (context_dim=0)")
        context = as_tensor(context, "context", dim=context_dim)
        if context.shape[0] != data.shape[0]:
            raise ValueError(f"context has {context.shape[0]} rows but data has {data.shape[0]}")
    check_positive_int("epochs", epochs)
    check_positive_int("batch_size", batch_size)
    if patience is not None:
        check_positive_int("patience", patience)
    if not 0 <= validation < 1:
        raise ValueError(f"validation must be a fraction in [0, 1), got {validation}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if classifier_lr is not None and not classifier_lr > 0:
        raise ValueError(f"classifier_lr must be positive, got {classifier_lr}")

    generator = torch.Generator().manual_seed(seed if seed is not None else torch.seed())
    if validation_data is not None:
        val_x = as_tensor(validation_data[0], "validation_data", dim=data.shape[1])
        val_c = None
        if context is not None:
            if len(validation_data) < 2:
                raise ValueError("validation_data must be (data, context) for a conditional model")
            val_c = as_tensor(validation_data[1], "validation context", dim=context.shape[1])
        train_x, train_c = data, context
    else:
        train_idx, val_idx = _split(data.shape[0], validation, generator)
        train_idx, val_idx = train_idx.to(data.device), val_idx.to(data.device)
        train_x, val_x = data[train_idx], data[val_idx]
        train_c = val_c = None
        if context is not None:
            train_c, val_c = context[train_idx], context[val_idx]
    has_val = val_x.shape[0] > 0

    optimizer = torch.optim.Adam(
        _parameter_groups(model, lr, classifier_lr), lr=lr, weight_decay=weight_decay
    )
    history: dict[str, Any] = {
        "train_nll": [],
        "val_nll": [],
        "best_epoch": None,
        "best_val_nll": math.inf,
        "stopped_early": False,
        "epochs": 0,
        "em_log_likelihood": [],
        "time_s": 0.0,
    }
    best_state = None
    start_epoch = 0
    if checkpoint is not None and resume and os.path.exists(checkpoint):
        state = load_checkpoint(checkpoint, map_location=param.device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        history, best_state, start_epoch = state["history"], state["best_model"], state["epoch"]
    elif em_pretraining:
        em_seed = int(torch.randint(2**31, (1,), generator=generator))
        fit = em_pretrain(model, train_x, **{"random_state": em_seed, **(em_options or {})})
        history["em_log_likelihood"] = list(fit.lower_bounds_)
    if has_val and start_epoch == 0:
        # The start (the EM mixture, for a CWM) is a candidate too: a fit never ends worse
        # on the held-out data than where it started.
        history["start_val_nll"] = _mean_nll(model, val_x, val_c)
        history["best_val_nll"], history["best_epoch"] = history["start_val_nll"], -1
        best_state = copy.deepcopy(model.state_dict())

    n = train_x.shape[0]
    started = time.perf_counter() - history["time_s"]
    bar = Progress(
        range(start_epoch, start_epoch if history["stopped_early"] else epochs),
        "fit_density",
        enabled=progress,
        unit="epochs",
        initial=start_epoch,
        total=epochs,
    )
    for epoch in bar:
        model.train()
        perm = torch.randperm(n, generator=generator).to(data.device)
        total = torch.zeros((), dtype=param.dtype, device=param.device)
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            ctx = None if train_c is None else train_c[idx]
            loss = -model(ctx).log_prob(train_x[idx]).mean()
            optimizer.zero_grad()
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(
                model.parameters(), grad_clip if grad_clip is not None else math.inf
            )
            # One device sync per step, before the parameters change.
            if not bool(torch.isfinite(loss.detach()) & torch.isfinite(norm)):
                what = "loss" if not torch.isfinite(loss) else "gradient norm"
                raise FloatingPointError(
                    f"fit_density: the {what} became non-finite at epoch {epoch}; the model "
                    "keeps the parameters of the last finite step (try a smaller lr or "
                    "grad_clip)"
                )
            optimizer.step()
            total += loss.detach() * idx.shape[0]
        model.eval()
        train_nll = total.item() / n
        history["train_nll"].append(train_nll)
        history["epochs"] = epoch + 1
        postfix = {"train_nll": f"{train_nll:.4f}"}
        if has_val:
            val = _mean_nll(model, val_x, val_c)
            history["val_nll"].append(val)
            postfix["val_nll"] = f"{val:.4f}"
            if val < history["best_val_nll"]:  # the best so far, the start included
                history["best_val_nll"], history["best_epoch"] = val, epoch
                best_state = copy.deepcopy(model.state_dict())
            # Patience counts from the best trained epoch, not from the start: a CWM's
            # classifier often first costs held-out NLL and then gains more than it cost.
            trained = history["val_nll"]
            best_trained = min(range(len(trained)), key=trained.__getitem__)
            if patience is not None and epoch - best_trained >= patience:
                history["stopped_early"] = True
        bar.set_postfix(postfix)
        history["time_s"] = time.perf_counter() - started
        if checkpoint is not None:
            save_checkpoint(
                checkpoint,
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "generator": generator.get_state(),
                    "history": history,
                    "best_model": best_state,
                    "epoch": epoch + 1,
                },
            )
        if history["stopped_early"]:
            break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    history["time_s"] = time.perf_counter() - started
    return history
