"""Progress of the long loops: a tqdm bar where someone watches, one summary line in a log.

Every fitting loop (``fit_svi``, ``fit_density``, the EM loops, ...) iterates through
``Progress``. With ``progress=True`` it shows a tqdm bar when
the output is interactive (stderr is a terminal, or the code runs in a Jupyter kernel, where
``tqdm.auto`` draws a widget); otherwise (a log file, CI, a redirected run) it draws no bar
and, at the end, writes one summary line such as ``fit_svi: 2000 steps in 41.2 s, loss
123.4`` through the ``logging`` logger ``inference.progress`` at level INFO. Where logging
is not configured at all, the line goes to stderr; ``logging.getLogger("inference")
.setLevel(logging.WARNING)`` silences it. ``progress=False`` shows nothing.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


def _in_jupyter_kernel() -> bool:
    """Whether this runs in a Jupyter kernel (notebook, lab, VS Code), as tqdm.auto tells."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    try:
        shell = ipython.get_ipython()
        return shell is not None and (
            "IPKernelApp" in shell.config or "zmq" in type(shell).__name__.lower()
        )
    except Exception:  # an IPython without a shell, or an unusual one
        return False


def interactive() -> bool:
    """Whether someone watches the output: stderr is a terminal, or this is a Jupyter kernel."""
    if _in_jupyter_kernel():
        return True
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):  # no stderr, a replaced or a closed one
        return False


def _logging_configured() -> bool:
    """Whether a handler would receive the summary (the application configured logging)."""
    return logger.hasHandlers()


def _silenced() -> bool:
    """Whether the user set a level above INFO on our loggers or disabled logging."""
    if logging.root.manager.disable >= logging.INFO:
        return True
    current: logging.Logger | None = logger
    while current is not None and current is not logging.root:
        if current.level:
            return current.level > logging.INFO
        current = current.parent
    return False


def emit(message: str) -> None:
    """Log ``message`` at INFO on ``inference.progress``; to stderr if logging is unset."""
    if _logging_configured():
        logger.info(message)
    elif not _silenced():
        print(message, file=sys.stderr, flush=True)


class Progress:
    """Iterate over ``iterable`` with a bar (interactive) or a final summary line (logs).

    Use it as a tqdm bar: iterate, call ``set_postfix`` with the figures to show, then
    ``close``, which writes the summary where no bar was shown.

    Args:
        iterable: what the loop runs over.
        description: the name of the loop (the bar's label, the summary's first word).
        enabled: show anything at all (the loop's ``progress``, on rank 0 only).
        unit: what one item is, plural (``"steps"``, ``"epochs"``, ``"iterations"``).
        total: the bar's total (default ``len(iterable)``).
        initial: the count a resumed loop starts from.
        leave: keep the finished bar on screen.

    Example:
        >>> bar = Progress(range(3), "demo", enabled=False)
        >>> for step in bar:
        ...     bar.set_postfix(loss=f"{1 / (step + 1):.3g}")
        >>> bar.close()
        >>> bar.summary().startswith("demo: 3 iterations in ")
        True
    """

    def __init__(
        self,
        iterable: Iterable,
        description: str,
        *,
        enabled: bool = True,
        unit: str = "iterations",
        total: int | None = None,
        initial: int = 0,
        leave: bool = True,
    ) -> None:
        self.description, self.unit, self.initial = description, unit, initial
        self.enabled = bool(enabled)
        self.count = 0
        self.postfix: dict[str, Any] = {}
        self._bar = None
        if self.enabled and interactive():
            self._bar = tqdm(iterable, desc=description, total=total, initial=initial, leave=leave)
        self._iterable = iterable if self._bar is None else self._bar
        self._started = time.perf_counter()
        self._closed = False

    def __iter__(self) -> Iterator:
        for item in self._iterable:
            self.count += 1
            yield item

    def set_postfix(self, values: dict[str, Any] | None = None, **more: Any) -> None:
        """Figures to show next to the bar and in the summary (``loss="1.23"``)."""
        self.postfix = {**(values or {}), **more}
        if self._bar is not None:
            self._bar.set_postfix(self.postfix)

    def summary(self) -> str:
        """The summary line: ``"fit_svi: 2000 steps in 41.2 s, loss 123.4"``."""
        elapsed = time.perf_counter() - self._started
        text = f"{self.description}: {self.count} {self.unit} in {elapsed:.1f} s"
        if self.initial:
            text += f" (resumed at {self.initial})"
        return ", ".join([text, *(f"{key} {value}" for key, value in self.postfix.items())])

    def close(self) -> None:
        """Close the bar, or write the summary where there was none (once)."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            emit(self.summary())
