"""Schedules: the order of the stages of a run, by ``decomp.stage`` (design.md "Stage").

- ``init``: compress the freshly built model, then train the compressed model from that initialisation;
- ``post``: train (or load ``decomp.ckpt_path``) the dense model, report its test metrics as ``dense/test/*``,
  compress it, fine-tune ``finetune_epochs``;
- ``restored`` (chosen by ``train=false`` on a checkpoint that carries its structure): the model as it was saved,
  tested, with the report of the run that compressed it.

A new schedule (e.g. multi-stage compression: ``compress, fit`` repeated) is a list of stages added here.
"""

from __future__ import annotations

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

SCHEDULES: dict[str, list[Stage]] = {
    "init": [compress, fit, test],
    "post": [dense_weights, evaluate_dense, compress, fit, test],
    "restored": [restored_report, fit, test],
}


def schedule_of(state: RunState) -> list[Stage]:
    """The stages of this run, in order."""
    return SCHEDULES["restored" if state.restored is not None else state.method.stage]


def run_schedule(state: RunState) -> None:
    for stage in schedule_of(state):
        stage(state)
