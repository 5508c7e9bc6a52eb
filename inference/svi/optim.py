"""``fit_svi``'s default optimizer: Pyro's ClippedAdam as one torch optimizer."""

from __future__ import annotations

from collections.abc import Iterable

import pyro
import pyro.optim
import torch
from torch import Tensor


class FusedClippedAdam(pyro.optim.PyroOptim):
    """Pyro's ``ClippedAdam`` (every gradient element clipped to ``[-clip_norm,
    clip_norm]``, then Adam) as one ``torch.optim.Adam`` over all parameters, stepped with
    torch's multi-tensor (foreach) kernels.

    Pyro's optimizers hold one torch optimizer per parameter tensor; a guide with many
    small tensors (AutoCWM's classifier and maps) then spends much of a small model's
    step in them. This one steps them together. As with Pyro's, a parameter is added when
    first seen and only the parameters of the current step move; ``get_state`` and
    ``set_state`` use Pyro's format (a per-parameter torch state dict by parameter name),
    so it works with ``pyro.infer.SVI`` and its states load into Pyro's optimizers.

    Raises:
        ValueError: for a non-positive ``lr`` or ``clip_norm``.
    """

    def __init__(
        self,
        lr: float = 1e-3,
        clip_norm: float = 10.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        for name, value in (("lr", lr), ("clip_norm", clip_norm)):
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value!r}")
        super().__init__(torch.optim.Adam, {"lr": lr, "betas": betas, "eps": eps})
        self.clip_norm = float(clip_norm)
        self.optimizer: torch.optim.Adam | None = None

    @property
    def lr(self) -> float:
        return self.pt_optim_args["lr"]

    def set_lr(self, lr: float) -> None:
        """Set the step size of every parameter (present and future)."""
        self.pt_optim_args["lr"] = lr
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr

    def __call__(self, params: Iterable[Tensor], *args, **kwargs) -> None:
        params = list(params)
        new = [p for p in params if p not in self.optim_objs]
        if new:
            if self.optimizer is None:
                self.optimizer = torch.optim.Adam(new, **self.pt_optim_args, foreach=True)
            else:
                self.optimizer.add_param_group({"params": new, **self.pt_optim_args})
            for p in new:
                self.optim_objs[p] = self.optimizer
                name = pyro.get_param_store().param_name(p)
                waiting = self._state_waiting_to_be_consumed.pop(name, None)
                if waiting is not None:
                    self._load(p, waiting)
        if len(params) < len(self.optim_objs):
            # As with one optimizer per parameter: the others do not move this step.
            stepping = set(params)
            for p in self.optim_objs:
                if p not in stepping:
                    p.grad = None
        with_grad = [p for p in params if p.grad is not None]
        if with_grad:
            torch.nn.utils.clip_grad_value_(with_grad, self.clip_norm, foreach=True)
            self.optimizer.step()

    def _load(self, param: Tensor, state: dict) -> None:
        """Load one parameter's torch state dict (Pyro's per-parameter format)."""
        saved = next(iter(state.get("state", {}).values()), None)
        if not saved:
            return
        loaded = {k: v.to(param.device) if torch.is_tensor(v) else v for k, v in saved.items()}
        step = loaded.get("step", 0)
        loaded["step"] = torch.as_tensor(float(step), dtype=torch.float32)
        self.optimizer.state[param] = loaded

    def get_state(self) -> dict:
        """The state of every parameter seen, by name, each as a torch state dict."""
        states = {}
        store = pyro.get_param_store()
        groups = self.optimizer.param_groups if self.optimizer is not None else []
        group_of = {id(p): group for group in groups for p in group["params"]}
        for param in self.optim_objs:
            group = {k: v for k, v in group_of[id(param)].items() if k != "params"}
            state = {k: v.clone() for k, v in self.optimizer.state.get(param, {}).items()}
            states[store.param_name(param)] = {
                "state": {0: state} if state else {},
                "param_groups": [group | {"params": [0]}],
            }
        return states
