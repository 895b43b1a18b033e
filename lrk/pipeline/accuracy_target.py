"""``decomp.schedule: accuracy_target``: the strongest compression whose fine-tuned validation accuracy stays within
``max_acc_drop`` of the dense model's (NNCF's adaptive compression level is the model: a bisection over one
global compression level, each candidate fine-tuned and validated).

The dense model is trained (or loaded) and validated as in ``stage=post``; its weights are kept (deep copy).
Then ``search_steps`` bisection steps over the level ``x`` in [``ratio_min``, ``ratio_max``] of ``search_policy``
(``ratio``: every target keeps the fraction x of its parameters; ``energy``: the energy rule with phi = x; a
smaller x compresses more in both): every point starts from the same dense weights, is compressed at x,
fine-tuned ``finetune_epochs`` (with distillation when ``distill_weight > 0``; its best checkpoint loaded back)
and validated. Feasible (``val/acc >= dense val/acc - max_acc_drop`` and finite): the next step searches below
x; else above. Feasibility is assumed monotone in x, as bisection needs.

The result is the compressed model of the best point: the feasible point of the smallest x (ties: the higher
val/acc); when no point is feasible, the point of the highest val/acc, and ``schedule.feasible`` is false. It is
tested. summary.json: ``search_points`` (one row per evaluated point: ``point``, ``level``, ``params``, ``flops``,
``val_acc``, ``val_bal_acc``, ``val_loss``, ``seconds``, ``feasible``, ``ranks``) and ``schedule`` (the policy,
the bounds, the dense val/acc, the chosen point).
"""

from __future__ import annotations

import math
import time
from typing import Any

from lrk.pipeline.checkpoints import best_checkpoint
from lrk.pipeline.multistage import (
    Snapshot,
    compress_with,
    diverged,
    finetune,
    frozen_copy,
    measured_row,
    precheck,
    start,
    teacher_terms,
    test_current,
    validate,
)
from lrk.pipeline.registry import register_schedule
from lrk.pipeline.stages import RunState, record_report


def bisection_levels(low: float, high: float, feasible: list[bool]) -> tuple[float, float, float]:
    """The next midpoint of a bisection over [low, high] after the outcomes ``feasible`` of the previous
    midpoints (feasible: search below; infeasible: above); returns (midpoint, low, high)."""
    for ok in feasible:
        middle = (low + high) / 2
        low, high = (low, middle) if ok else (middle, high)
    return (low + high) / 2, low, high


@register_schedule("accuracy_target")
def accuracy_target(state: RunState) -> None:
    """Bisection over one global ratio (or energy) for the strongest compression within ``max_acc_drop``."""
    cfg = state.method.cfg
    key, low, high = cfg["search_policy"], float(cfg["ratio_min"]), float(cfg["ratio_max"])
    steps, drop = int(cfg["search_steps"]), float(cfg["max_acc_drop"])
    selected = state.method.select_targets(state.model)  # every target, checked before any training
    precheck(state, selected)
    names = [name for name, _ in selected]
    factory, dense_val, example = start(state)
    dense = Snapshot.of(state, 0)
    teacher = frozen_copy(state.model) if factory is not None else None
    terms = teacher_terms(state, factory, teacher)
    floor = dense_val.get("val/acc", -math.inf) - drop
    outcomes: list[bool] = []
    best: tuple[tuple[Any, ...], Snapshot, str | None, dict[str, Any], dict[str, float]] | None = None
    for point in range(1, steps + 1):
        began = time.perf_counter()
        level, _, _ = bisection_levels(low, high, outcomes)
        dense.restore(state)
        overrides = {"ratio": None, "rank": None, "energy": None, key: level}
        record_report(state, compress_with(state, {name: overrides for name in names}))
        fitted = finetune(state, f"point{point}", terms)
        checkpoint = best_checkpoint(state.trainer) if fitted and state.trainer is not None else None
        val = validate(state)
        acc = val.get("val/acc", -math.inf)
        ok = diverged(fitted, val) is None and acc >= floor - 1e-12
        outcomes.append(ok)
        row = {
            "point": point,
            "level": level,
            "policy": key,
            **measured_row(state, example, val, began),
            "feasible": ok,
        }
        state.summary.search_points.append(row)
        # feasible points first, then the smallest level (strongest compression), then the highest accuracy;
        # without a feasible point: the highest accuracy
        rank = (0, level, -acc) if ok else (1, -acc if math.isfinite(acc) else math.inf, level)
        if best is None or rank < best[0]:
            best = (rank, Snapshot.of(state, point), checkpoint, row, val)
    assert best is not None  # search_steps >= 1 (checked in the method's constructor)
    _, snapshot, checkpoint, row, val = best
    snapshot.restore(state)
    state.metrics.update(val)  # val/* of the chosen point
    state.summary.schedule = {
        "name": "accuracy_target",
        "policy": key,
        "bounds": [float(cfg["ratio_min"]), high],
        "max_acc_drop": drop,
        "dense_val_acc": dense_val.get("val/acc"),
        "chosen_point": row["point"],
        "chosen_level": row["level"],
        "feasible": bool(row["feasible"]),
    }
    state.metrics["decomp/search_level"] = float(row["level"])
    test_current(state, checkpoint)
