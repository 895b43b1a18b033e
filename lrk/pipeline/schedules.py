"""Schedules: the order of the stages of a run, chosen by ``decomp.schedule`` and ``decomp.stage``.

``decomp.schedule: one_shot`` (the default) is one of the stage lists below, by ``decomp.stage``
(design.md "Stage"):

- ``init``: compress the freshly built model, then train the compressed model from that initialisation;
- ``post``: train (or load ``decomp.ckpt_path``) the dense model, report its test metrics as ``dense/test/*``,
  compress it, fine-tune ``finetune_epochs``;
- ``restored`` (chosen by ``train=false`` on a checkpoint that carries its structure): the model as it was saved,
  tested, with the report of the run that compressed it.

Any other schedule (multi-stage compression, SVD training's prune-and-fine-tune, ...) is a function of the
:class:`RunState` registered with :func:`lrk.pipeline.registry.register_schedule` by the module that defines it,
imported at the end of this module.
"""

from __future__ import annotations

from lrk.errors import LrkConfigError
from lrk.pipeline.registry import SCHEDULES, Schedule, register_schedule
from lrk.pipeline.stages import (
    RunState,
    Stage,
    compress,
    dense_weights,
    evaluate_dense,
    fit,
    restored_report,
    test,
)

#: the one-shot stage lists, by decomp.stage (and ``restored``)
ONE_SHOT: dict[str, list[Stage]] = {
    "init": [compress, fit, test],
    "post": [dense_weights, evaluate_dense, compress, fit, test],
    "restored": [restored_report, fit, test],
}


def run_stages(state: RunState, stages: list[Stage]) -> None:
    for stage in stages:
        stage(state)


@register_schedule("one_shot")
def one_shot(state: RunState) -> None:
    """Compress once (``stage=init`` or ``post``), fit, test; a restored checkpoint: report, fit, test."""
    run_stages(state, ONE_SHOT["restored" if state.restored is not None else state.method.stage])


def schedule_of(state: RunState) -> Schedule:
    """The schedule of this run (``decomp.schedule``; a restored checkpoint is always run one-shot: nothing is
    compressed again). Raises :class:`LrkConfigError` for an unknown name, before anything trains."""
    name = getattr(state.method, "schedule", "one_shot")
    if state.restored is not None:
        name = "one_shot"
    if name not in SCHEDULES:
        raise LrkConfigError(f"decomp.schedule={name!r} is invalid: it must be one of {sorted(SCHEDULES)}")
    return SCHEDULES[name]


def run_schedule(state: RunState) -> None:
    schedule_of(state)(state)


import lrk.pipeline.svd_train  # noqa: E402, F401  (registers the schedule svd_train)
from lrk.pipeline import accuracy_target, multistage  # noqa: E402, F401  (register multistage, accuracy_target)
