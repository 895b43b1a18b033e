"""The decomp keys of the multi-stage schedules (``schedule: multistage`` and ``schedule: accuracy_target``,
lrk.pipeline.multistage and lrk.pipeline.accuracy_target), accepted by every method and validated in its
constructor (:func:`check_schedule_keys`, called from ``DecompMethod.__init__``), before anything trains.

- ``stages`` (int >= 1): compression steps of ``multistage``;
- ``layers_per_stage`` (null or int >= 1): null = every target in every stage; k = stage s compresses the next k
  targets not yet compressed and compresses the earlier stages' layers again (MUSCO);
- ``stage_ratios`` (null or a list of ``stages`` fractions in (0, 1]): the ratio of every layer of stage s (a
  fraction of its dense parameters); null with a ratio policy: a layer compressed for the n-th time keeps
  ``ratio^n`` (MUSCO(nx, c, s): the same reduction c = 1/ratio at each step);
- ``max_acc_drop`` (null or a number in [0, 1)): ``multistage`` stops when a stage's validation accuracy falls
  more than this below the dense model's, keeping the last good stage; ``accuracy_target`` needs it;
- ``distill_weight`` (lambda in [0, 1], 0 = off) and ``distill_temperature`` (tau > 0): soft knowledge
  distillation from the dense model during every stage's fine-tuning (accelerating_lrd_paper's conclusion;
  lrk.lit.distillation: (1 - lambda) CE + lambda tau^2 KL);
- ``search_policy`` (ratio | energy), ``ratio_min`` / ``ratio_max`` (0 < min < max <= 1) and ``search_steps``
  (int >= 1): the bisection of ``accuracy_target`` over one global ratio (or energy).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lrk.checks import is_fraction, is_int, is_number
from lrk.errors import LrkConfigError

SCHEDULE_KEYS: dict[str, Any] = {
    "stages": 1,
    "layers_per_stage": None,
    "stage_ratios": None,
    "max_acc_drop": None,
    "distill_weight": 0.0,
    "distill_temperature": 4.0,
    "search_policy": "ratio",
    "ratio_min": 0.05,
    "ratio_max": 1.0,
    "search_steps": 4,
}
SEARCH_POLICIES = ("ratio", "energy")
#: schedules that compress a trained model more than once (their keys are cross-checked here)
MULTI = ("multistage", "accuracy_target")


def check_schedule_keys(cfg: Mapping[str, Any]) -> None:
    """Raise :class:`LrkConfigError` (one message naming the key, its value and what is valid) for a bad value of
    any :data:`SCHEDULE_KEYS` entry, whatever the schedule; and for combinations the multi-stage schedules
    cannot run."""
    get = lambda key: cfg.get(key, SCHEDULE_KEYS[key])  # noqa: E731
    stages = get("stages")
    if not (is_int(stages) and stages >= 1):
        raise LrkConfigError(f"decomp.stages={stages!r} is invalid: it must be an integer >= 1")
    per_stage = get("layers_per_stage")
    if per_stage is not None and not (is_int(per_stage) and per_stage >= 1):
        raise LrkConfigError(
            f"decomp.layers_per_stage={per_stage!r} is invalid: it must be null (every target each stage) or an "
            "integer >= 1"
        )
    ratios = get("stage_ratios")
    if ratios is not None:
        if not (isinstance(ratios, list | tuple) and all(is_fraction(r) for r in ratios)):
            raise LrkConfigError(
                f"decomp.stage_ratios={ratios!r} is invalid: it must be null or a list of fractions in (0, 1]"
            )
        if len(ratios) != stages:
            raise LrkConfigError(
                f"decomp.stage_ratios={list(ratios)} is invalid: it must have decomp.stages={stages} entries"
            )
        given = [k for k in ("rank", "energy") if cfg.get(k) is not None]
        if given or cfg.get("rank_selector", "policy") == "evbmf":
            what = f"decomp.{given[0]}" if given else "decomp.rank_selector=evbmf"
            raise LrkConfigError(
                f"decomp.stage_ratios={list(ratios)} is invalid with {what}: stage ratios set the ranks; unset one"
            )
    drop = get("max_acc_drop")
    if drop is not None and not (is_number(drop) and 0.0 <= drop < 1.0):
        raise LrkConfigError(
            f"decomp.max_acc_drop={drop!r} is invalid: it must be null or a number in [0, 1) (a fraction of "
            "accuracy, 0.01 = one point)"
        )
    weight = get("distill_weight")
    if not (is_number(weight) and 0 <= weight <= 1):
        raise LrkConfigError(
            f"decomp.distill_weight={weight!r} is invalid: it must be a number in [0, 1] (lambda of the soft "
            "distillation loss, the label loss keeps 1 - lambda; 0 = off)"
        )
    temperature = get("distill_temperature")
    if not (is_number(temperature) and temperature > 0):
        raise LrkConfigError(
            f"decomp.distill_temperature={temperature!r} is invalid: it must be a number > 0"
        )
    policy = get("search_policy")
    if policy not in SEARCH_POLICIES:
        raise LrkConfigError(
            f"decomp.search_policy={policy!r} is invalid: it must be one of {list(SEARCH_POLICIES)}"
        )
    low, high = get("ratio_min"), get("ratio_max")
    if not (is_fraction(low) and is_fraction(high) and low < high):
        raise LrkConfigError(
            f"decomp.ratio_min={low!r}, decomp.ratio_max={high!r} are invalid: they must be numbers with "
            "0 < ratio_min < ratio_max <= 1"
        )
    steps = get("search_steps")
    if not (is_int(steps) and steps >= 1):
        raise LrkConfigError(f"decomp.search_steps={steps!r} is invalid: it must be an integer >= 1")
    schedule = cfg.get("schedule", "one_shot")
    if schedule in MULTI and cfg.get("merge") is True:
        raise LrkConfigError(
            f"decomp.merge=true is invalid with decomp.schedule={schedule}: a merged block cannot be compressed "
            "again; set merge: false"
        )
    if schedule == "accuracy_target" and cfg.get("rank_selector", "policy") == "evbmf":
        raise LrkConfigError(
            "decomp.rank_selector=evbmf is invalid with decomp.schedule=accuracy_target: the search sets one global "
            f"{get('search_policy')}; use rank_selector=policy (or schedule=multistage for EVBMF ranks)"
        )
    if schedule == "accuracy_target" and drop is None:
        raise LrkConfigError(
            "decomp.max_acc_drop=None is invalid with decomp.schedule=accuracy_target: it must be a number in "
            "[0, 1), the accuracy the search may lose"
        )
