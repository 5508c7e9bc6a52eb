"""Training FlowGMM: supervised (log p(x, y)) and semi-supervised (plus log p(x)) by Adam."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from inference.progress import Progress
from pyro_cwm.models.flow_gmm import FlowGMM
from pyro_cwm.nn.checks import check_positive_int

Preprocess = Callable[[Tensor, torch.Generator | None], Tensor]


def _check_xy(model: FlowGMM, x: Tensor, y: Tensor | None, name: str) -> None:
    if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != model.dim:
        raise ValueError(f"{name} must be a tensor of shape (N, {model.dim})")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")
    if y is not None:
        if y.shape != (x.shape[0],):
            raise ValueError(
                f"labels must have shape ({x.shape[0]},) to match {name}, got {tuple(y.shape)}"
            )
        if y.min() < 0 or y.max() >= model.num_classes:
            raise ValueError(f"labels must be in [0, {model.num_classes})")


@torch.no_grad()
def evaluate_flow_gmm(
    model: FlowGMM, x: Tensor, y: Tensor, preprocess: Preprocess | None = None
) -> dict[str, float]:
    """Accuracy and mean ``-log p(x, y)`` and ``-log p(x)`` on labelled data (one pass)."""
    model.eval()
    x = preprocess(x, None) if preprocess is not None else x
    joint = model.joint_log_probs(x)
    return {
        "accuracy": (joint.argmax(-1) == y).float().mean().item(),
        "nll_joint": -joint.gather(-1, y.long()[:, None]).mean().item(),
        "nll": -torch.logsumexp(joint, -1).mean().item(),
    }


def fit_flow_gmm(
    model: FlowGMM,
    x: Tensor,
    y: Tensor,
    *,
    x_unlabeled: Tensor | None = None,
    epochs: int = 50,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    discriminative_weight: float = 0.0,
    unlabeled_weight: float = 1.0,
    preprocess: Preprocess | None = None,
    validation: tuple[Tensor, Tensor] | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Fit a [`FlowGMM`][pyro_cwm.models.FlowGMM] by maximum likelihood with Adam.

    The loss of a step is ``-(n_l log p(x, y) + n_u log p(x)) / (n_l + n_u)`` on a labelled
    and (semi-supervised) an unlabelled minibatch, each a mean weighted by its share of
    the data; ``discriminative_weight`` (lambda) adds ``-lambda log p(y | x)`` on the
    labelled batch (a hybrid objective; 0 is pure maximum likelihood). The class prior is
    set to the label frequencies.

    Args:
        model: the FlowGMM (its device and dtype are used).
        x: labelled points (N, d).
        y: their labels (N,).
        x_unlabeled: unlabelled points (M, d), for the semi-supervised objective.
        epochs: passes over the data (labelled and unlabelled).
        batch_size: points per step, labelled and unlabelled in proportion.
        lr: Adam's learning rate.
        weight_decay: Adam's weight decay.
        discriminative_weight: lambda >= 0, see above.
        unlabeled_weight: multiplies the unlabelled points' term (1: every point counts
            the same).
        preprocess: maps a raw batch to model space (e.g. dequantization and logit), called
            with a generator in training and None in evaluation.
        validation: ``(x_val, y_val)``; the model keeps the epoch with the best validation
            accuracy (ties: lower ``-log p(x, y)``).
        seed: seed of the shuffling and of ``preprocess``'s noise.
        progress: show progress: a bar with the loss when interactive, else a summary line.

    Returns:
        History: ``loss`` per epoch, ``val_accuracy``, ``val_nll_joint`` (with
        validation), ``best_epoch``, ``time_s``.

    Raises:
        ValueError: for mismatched or invalid inputs or options.
        FloatingPointError: if the loss stops being finite (the model keeps its last
            finite parameters).
    """
    check_positive_int("epochs", epochs)
    check_positive_int("batch_size", batch_size)
    if discriminative_weight < 0:
        raise ValueError(f"discriminative_weight must be >= 0, got {discriminative_weight}")
    if unlabeled_weight < 0:
        raise ValueError(f"unlabeled_weight must be >= 0, got {unlabeled_weight}")
    param = next(model.parameters())
    x, y = x.to(param.device, param.dtype), y.to(param.device).long()
    _check_xy(model, x, y, "x")
    if x_unlabeled is not None:
        x_unlabeled = x_unlabeled.to(param.device, param.dtype)
        _check_xy(model, x_unlabeled, None, "x_unlabeled")
    counts = torch.bincount(y, minlength=model.num_classes).to(param.dtype)
    model.set_class_weights(counts.clamp_min(1.0))
    n_l = x.shape[0]
    n_u = 0 if x_unlabeled is None else x_unlabeled.shape[0]
    # An epoch is one pass over all points; every step takes its share of both sets.
    steps = math.ceil((n_l + n_u) / batch_size)
    l_batch = math.ceil(n_l / steps)
    u_batch = math.ceil(n_u / steps) if n_u else 0
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    history: dict[str, Any] = {
        "loss": [],
        "val_accuracy": [],
        "val_nll_joint": [],
        "best_epoch": None,
        "time_s": 0.0,
    }
    best_key, best_state = None, None
    started = time.perf_counter()
    bar = Progress(range(epochs), "fit_flow_gmm", enabled=progress, unit="epochs")
    for epoch in bar:
        model.train()
        order = torch.randperm(n_l, generator=generator).to(x.device)
        u_order = torch.randperm(n_u, generator=generator).to(x.device) if n_u else None
        total = 0.0
        for step in range(steps):
            index = order[step * l_batch : (step + 1) * l_batch]
            if index.numel() == 0:
                continue
            xb = x[index] if preprocess is None else preprocess(x[index], generator)
            joint = model.joint_log_probs(xb)
            labelled = joint.gather(-1, y[index, None]).squeeze(-1)
            loss = -labelled.mean() * n_l / (n_l + n_u)
            if discriminative_weight:
                conditional = labelled - torch.logsumexp(joint, -1)
                loss = loss - discriminative_weight * conditional.mean()
            if n_u:
                ub = x_unlabeled[u_order[step * u_batch : (step + 1) * u_batch]]
                if preprocess is not None:
                    ub = preprocess(ub, generator)
                share = unlabeled_weight * n_u / (n_l + n_u)
                loss = loss - model.log_prob(ub).mean() * share
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the loss is {loss.item()} at epoch {epoch}")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item()
        history["loss"].append(total / steps)
        postfix = {"loss": f"{total / steps:.3f}"}
        if validation is not None:
            scores = evaluate_flow_gmm(model, *validation, preprocess=preprocess)
            history["val_accuracy"].append(scores["accuracy"])
            history["val_nll_joint"].append(scores["nll_joint"])
            key = (scores["accuracy"], -scores["nll_joint"])
            if best_key is None or key > best_key:
                best_key, best_state = key, copy.deepcopy(model.state_dict())
                history["best_epoch"] = epoch
            postfix["val_acc"] = f"{scores['accuracy']:.3f}"
        bar.set_postfix(postfix)
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    history["time_s"] = time.perf_counter() - started
    return history
