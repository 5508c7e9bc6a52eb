"""Run Pyro code as if no handler were active: a guide's set-up inside SVI's handlers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from pyro.poutine import runtime


@contextmanager
def outside_handlers() -> Iterator[None]:
    """Suspend every active Pyro handler, plate dimension and enumeration dimension.

    An autoguide sets itself up at its first call, which under ``TraceEnum_ELBO`` happens
    inside the ELBO's handlers: a vectorized particle plate holds a dimension, and the
    guide-side ``poutine.enum`` owns the enumeration allocator. AutoCWM's set-up runs the
    model many times under its own particle plate and enumeration; inside this context it
    sees the model as it is, and on exit the ELBO's state is restored unchanged.

    Pyro keeps this state in module-level objects without a public API to suspend them,
    hence the private names here; the context restores exactly what it saved.
    """
    stack = list(runtime._PYRO_STACK)
    plate_dims = list(runtime._DIM_ALLOCATOR._stack)
    enum_state = {
        key: dict(value) if isinstance(value, dict) else value
        for key, value in vars(runtime._ENUM_ALLOCATOR).items()
    }
    runtime._PYRO_STACK.clear()
    runtime._DIM_ALLOCATOR._stack.clear()
    try:
        yield
    finally:
        runtime._PYRO_STACK[:] = stack
        runtime._DIM_ALLOCATOR._stack[:] = plate_dims
        vars(runtime._ENUM_ALLOCATOR).clear()
        vars(runtime._ENUM_ALLOCATOR).update(enum_state)
