"""Clocks that see the device's work: ``perf_counter`` after ``torch.cuda.synchronize()`` when asked.

CUDA kernels run asynchronously: without a synchronisation a forward's time would miss the work still queued.
"""

from __future__ import annotations

from collections.abc import Iterable
from time import perf_counter
from typing import Any

import torch
from torch import nn

__all__ = ["ModuleTimer", "Stopwatch", "clock", "needs_sync"]


def needs_sync(device: torch.device | str | None) -> bool:
    """Whether timing work on ``device`` needs a CUDA synchronisation."""
    return device is not None and torch.device(device).type == "cuda"


def clock(sync: bool) -> float:
    """``time.perf_counter()``, after ``torch.cuda.synchronize()`` when ``sync``."""
    if sync:
        torch.cuda.synchronize()
    return perf_counter()


class Stopwatch:
    """``with Stopwatch(sync) as watch: ...`` then ``watch.seconds``; re-entering adds to ``seconds``."""

    def __init__(self, sync: bool = False) -> None:
        self.sync = sync
        self.seconds = 0.0
        self._start = 0.0

    def __enter__(self) -> Stopwatch:
        self._start = clock(self.sync)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds += clock(self.sync) - self._start


class ModuleTimer:
    """Sums the wall time of the forwards of ``modules`` (forward pre/post hooks); a call nested in another
    timed call is timed once, as part of the outer one. ``seconds`` and ``calls`` accumulate until reset.

    Hooks are attached on construction (``attach=True``) or by :meth:`attach`, removed by :meth:`remove`;
    as a context manager it attaches on entry and removes on exit.
    """

    def __init__(self, modules: Iterable[nn.Module], sync: bool = False, attach: bool = True) -> None:
        self.modules = list(modules)
        self.sync = sync
        self.seconds = 0.0
        self.calls = 0
        self._handles: list[Any] = []
        self._depth = 0
        self._start = 0.0
        if attach:
            self.attach()

    def _pre(self, module: nn.Module, args: Any) -> None:
        if self._depth == 0:
            self._start = clock(self.sync)
        self._depth += 1

    def _post(self, module: nn.Module, args: Any, output: Any) -> None:
        self._depth -= 1
        if self._depth == 0:
            self.seconds += clock(self.sync) - self._start
            self.calls += 1

    def attach(self) -> ModuleTimer:
        if not self._handles:
            for module in self.modules:
                self._handles.append(module.register_forward_pre_hook(self._pre))
                self._handles.append(module.register_forward_hook(self._post))
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._depth = 0

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0

    def __enter__(self) -> ModuleTimer:
        return self.attach()

    def __exit__(self, *exc: Any) -> None:
        self.remove()
