"""The schedule registry: ``decomp.schedule`` name -> the function that runs a whole run's stages.

A schedule module registers itself with :func:`register_schedule` and imports only this registry and
:mod:`lrk.pipeline.stages`; :mod:`lrk.pipeline.schedules` imports every schedule module (no import cycle).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Schedule = Callable[[Any], None]
#: decomp.schedule name -> the function that runs the whole schedule on a RunState
SCHEDULES: dict[str, Schedule] = {}


def register_schedule(name: str) -> Callable[[Schedule], Schedule]:
    """Function decorator: run ``decomp.schedule=<name>`` with the decorated function."""

    def decorator(schedule: Schedule) -> Schedule:
        if name in SCHEDULES and SCHEDULES[name] is not schedule:
            raise ValueError(f"schedule {name!r} is already registered by {SCHEDULES[name].__qualname__}")
        SCHEDULES[name] = schedule
        return schedule

    return decorator
