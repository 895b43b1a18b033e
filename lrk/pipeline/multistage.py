"""``decomp.schedule: multistage``: progressive multi-stage compression (MUSCO, Gusak et al. 2019, in
tensor_methods_lecture: "compress with gradually decreased ranks, using past approximations; fine-tune", its
Algorithm 1; progressive LRD with knowledge distillation, accelerating_lrd_paper's conclusion).

The dense model is trained (or loaded from ``decomp.ckpt_path``) and evaluated as in ``stage=post``; then for
stage s = 1 .. ``stages``:

1. **compress**: the layers compressed by earlier stages are folded back to their dense weight (the product of
   their factors, ``FactorizedLayer.fold``) and decomposed again at the stage's lower rank: the lecture's Eq. 1.7,
   min ||F_full(theta_fact) - theta^R'|| over rank-R' factors, which a truncated SVD / HOSVD of the folded weight
   solves (for SVD exactly: the best rank-R' approximation of the previous factors' product). The layer count
   stays that of the first stage (the lecture's "multiply them so that it results in two decomposed layers
   again"). With ``layers_per_stage = k`` the next k targets not yet compressed join them (MUSCO's layer-wise
   steps); null: every target from stage 1 on. Ranks: ``stage_ratios[s-1]`` for every layer of the stage, or with
   a ratio policy ``ratio^n`` for a layer compressed for the n-th time (the same reduction at each step); a rank,
   energy or EVBMF selector (``rank_selector: evbmf``, MUSCO's automatic ranks with the weakening factor) is
   applied again to the folded weights;
2. **fine-tune** ``finetune_epochs`` (:func:`lrk.pipeline.stages.fit_phase`: fresh callbacks, checkpoints under
   ``checkpoints/stage<s>/``, the logs continue), with distillation from the dense model (deep-copied before the
   first stage) when ``distill_weight > 0``; the stage's best checkpoint (by the monitored metric) is loaded back;
3. **check**: validation accuracy of the stage. The schedule stops (keeping the last good stage: its deep copy is
   restored, with its report) when the stage diverged (a NaN/inf loss or validation metric) or when its
   ``val/acc`` is more than ``max_acc_drop`` below the dense model's. A first stage that fails restores the dense
   model.

``decomp.stage`` is not read: both multi-stage schedules start from the trained (or loaded) dense model.

summary.json: ``stages`` gets one row per stage (stage 0 = the dense model): ``stage``, ``params``, ``flops``
(per image, lrk.measure.count_flops on a real batch), ``val_acc``, ``val_bal_acc``, ``val_loss``, ``seconds``,
``ranks`` (layer -> ranks), ``ratio``, ``kept``, ``reason``; ``schedule`` says why it stopped and which stage was
kept. The model tested at the end is the kept stage's.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lrk.decomp import DecompReport, build_method
from lrk.decomp.rank.policy import FixedRank
from lrk.errors import LrkConfigError
from lrk.layers.base import FactorizedLayer
from lrk.lit.callbacks import ModelStats
from lrk.lit.distillation import DistillationLoss
from lrk.measure import count_flops, count_params
from lrk.models.utils import replace_module
from lrk.pipeline.checkpoints import best_checkpoint
from lrk.pipeline.registry import register_schedule
from lrk.pipeline.stages import (
    RunState,
    dense_weights,
    evaluate_dense,
    fit_phase,
    make_trainer,
    record_report,
    scalars,
    test,
)


# --- helpers shared with lrk.pipeline.accuracy_target ---------------------------------------------------------
def distillation_factory(state: RunState) -> Any:
    """The LossTerm class of the distillation (lrk.lit.distillation) when ``distill_weight > 0``, else None."""
    return DistillationLoss if float(state.method.cfg["distill_weight"]) > 0 else None


def teacher_terms(state: RunState, factory: Any, teacher: nn.Module | None) -> list[Any]:
    """The distillation LossTerm of the dense teacher (empty when off)."""
    if factory is None or teacher is None:
        return []
    cfg = state.method.cfg
    return [
        factory(
            teacher,
            mode="soft",
            temperature=float(cfg["distill_temperature"]),
            alpha=float(cfg["distill_weight"]),
            head="logits",
        )
    ]


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode without gradients (the distillation teacher)."""
    teacher = copy.deepcopy(model).eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher


@contextmanager
def extra_terms(state: RunState, terms: list[Any]) -> Iterator[None]:
    """``terms`` added to the LightningModule's loss terms for the duration of one fit."""
    before = list(state.lit.loss_terms)
    state.lit.loss_terms = [*before, *terms]
    try:
        yield
    finally:
        state.lit.loss_terms = before


def validate(state: RunState) -> dict[str, float]:
    """``val/*`` metrics of the model as it is now (no loggers, no checkpoints)."""
    trainer = make_trainer(state.cfg, state.run_dir / "eval", enable_progress_bar=False)
    trainer.validate(state.lit, datamodule=state.datamodule, verbose=False)
    return {k: v for k, v in scalars(trainer.callback_metrics).items() if k.startswith("val/")}


def flops_per_image(state: RunState, example: torch.Tensor | None) -> float | None:
    """FLOPs of one forward per image on a real batch (lrk.measure.count_flops)."""
    if example is None:
        return None
    device = next(state.model.parameters()).device
    return float(count_flops(state.model, example.to(device)).per_image().total)


def measured_row(state: RunState, example: Any, val: dict[str, float], began: float) -> dict[str, Any]:
    """The figures of one stage or search point: params and FLOPs of the model as it is now, its validation
    metrics, the seconds since ``began`` and the report's ranks."""
    return {
        "params": count_params(state.model),
        "flops": flops_per_image(state, example),
        "val_acc": val.get("val/acc"),
        "val_bal_acc": val.get("val/bal_acc"),
        "val_loss": val.get("val/loss"),
        "seconds": time.perf_counter() - began,
        "ranks": {r["name"]: r.get("ranks") for r in state.report.rows} if state.report else {},
    }


def example_batch(state: RunState) -> torch.Tensor | None:
    batches = state.datamodule.calibration_batches(1)
    return batches[0][:8] if batches else None


def finetune(state: RunState, phase: str, terms: list[Any]) -> dict[str, float]:
    """One stage's fine-tuning (fit_phase, with ``terms``), then its best checkpoint's weights loaded back."""
    state.lit.val_acc_best.reset()  # each stage's checkpoint picks its own best epoch
    with extra_terms(state, terms):
        values = fit_phase(state, phase, state.method.finetune_epochs)
    if values and state.trainer is not None:
        path = best_checkpoint(state.trainer)
        if path:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
            state.lit.load_state_dict(checkpoint["state_dict"])
    return values


def diverged(*metrics: dict[str, float]) -> str | None:
    """The name of the first loss / validation metric that is NaN or infinite (None when all are finite)."""
    for values in metrics:
        for key in ("train/loss", "val/loss", "val/acc", "val/bal_acc"):
            if key in values and not math.isfinite(values[key]):
                return key
    return None


def compress_with(state: RunState, targets: dict[str, dict[str, Any]]) -> DecompReport:
    """Apply the run's method to ``targets`` (layer -> config overrides, e.g. its ratio): one method per distinct
    override, built from the run's decomp config (every key validated again). Layers already factorized are folded
    to their dense weight first (compressed again from it)."""
    previous: dict[str, nn.Module] = {}
    for name in targets:
        module = state.model.get_submodule(name)
        if isinstance(module, FactorizedLayer):
            previous[name] = module
            replace_module(state.model, name, module.fold())
    groups: dict[tuple, list[str]] = {}
    for name, overrides in targets.items():
        groups.setdefault(tuple(sorted(overrides.items())), []).append(name)
    count = state.cfg.decomp.get("calibration_batches")
    batches = state.datamodule.calibration_batches(4 if count is None else int(count))
    rows: list[dict[str, Any]] = []
    for overrides, names in groups.items():
        cfg = {**state.method.cfg, **dict(overrides), "targets": names, "skip": [], "schedule": "one_shot"}
        rows.extend(build_method(cfg).apply(state.model, batches).rows)
    for row in rows:  # a folded layer the method left dense (e.g. ratio unreachable) keeps its factors
        if row["name"] in previous and row["params_after"] >= row["params_before"]:
            old = previous[row["name"]]
            replace_module(state.model, row["name"], old)
            why = row.get("note") or row["kind"]
            row.update(
                kind=f"{row['kind']}: kept the previous stage's factors",
                params_after=count_params(old),
                note=f"{why}; the previous stage's factorization is kept",
            )
    order = {name: i for i, name in enumerate(targets)}
    rows.sort(key=lambda row: order.get(row["name"], len(order)))
    return DecompReport(state.method.name, rows)


@dataclass
class Snapshot:
    """A stage's model (deep copy) and report, to come back to."""

    model: nn.Module
    report: DecompReport | None
    stage: int

    @classmethod
    def of(cls, state: RunState, stage: int) -> Snapshot:
        return cls(copy.deepcopy(state.model), state.report, stage)

    def restore(self, state: RunState) -> None:
        state.lit.model = copy.deepcopy(self.model)
        state.model = state.lit.model
        if self.report is not None:
            record_report(state, self.report)
        else:  # the dense model
            record_report(state, DecompReport(state.method.name, []))


def test_current(state: RunState, checkpoint: str | None) -> None:
    """Test the model as it is now (the kept stage, its best weights loaded), not the last fit's checkpoint."""
    if state.cfg.test:  # ModelStats measured the last fit's model: measure the tested one at the test's start
        for callback in state.main_trainer().callbacks:
            if isinstance(callback, ModelStats):
                callback.metrics.clear()
    fitted, state.fitted = state.fitted, False
    try:
        test(state)
    finally:
        state.fitted = fitted
    if state.cfg.test:
        state.summary.extra["tested_checkpoint"] = checkpoint


def ratio_policy(state: RunState) -> float | None:
    """The base ratio of a ratio policy (``ratio`` or ``default_ratio``), None for rank / energy / EVBMF."""
    policy = getattr(state.method, "policy", None)
    if policy is None or getattr(state.method, "rank_selector", None) is not None:
        return None
    return policy.ratio


def dense_row(state: RunState, val: dict[str, float], example: torch.Tensor | None) -> dict[str, Any]:
    return {
        "stage": 0,
        "params": count_params(state.model),
        "flops": flops_per_image(state, example),
        "val_acc": val.get("val/acc"),
        "val_bal_acc": val.get("val/bal_acc"),
        "val_loss": val.get("val/loss"),
        "seconds": None,
        "ranks": {},
        "ratio": 1.0,
        "kept": True,
        "reason": "dense",
    }


def precheck(state: RunState, targets: list[tuple[str, nn.Module]]) -> None:
    """Checks of the targets that ``apply`` would make only after the dense model trained: EVBMF's 2 x 2 minimum
    (``rank_selector: evbmf``) and an explicit ``rank`` against each layer's range."""
    method = state.method
    selector = getattr(method, "rank_selector", None)
    policy = getattr(method, "policy", None)
    if not hasattr(method, "problem"):
        return
    for name, module in targets:
        problem = method.problem(name, module)
        if selector is not None:
            selector.for_targets(targets).shapes(problem)
        elif policy is not None and policy.rank is not None:
            FixedRank(policy.rank).check(problem)


def start(state: RunState) -> tuple[Any, dict[str, float], torch.Tensor | None]:
    """Shared start of the multi-stage schedules: the dense model trained or loaded, tested (``dense/test/*``) and
    validated. Returns the distillation class (None when off), the dense val metrics and an example batch."""
    if state.restored is not None:  # pragma: no cover - schedule_of runs restored checkpoints one-shot
        raise LrkConfigError("a restored checkpoint is tested as saved; it is not compressed again")
    factory = distillation_factory(state)  # before any training
    dense_weights(state)
    if state.cfg.test:
        evaluate_dense(state)
    val = validate(state)
    state.metrics.update({f"dense/{k}": v for k, v in val.items()})
    return factory, val, example_batch(state)


# --- the schedule -------------------------------------------------------------------------------------------
@register_schedule("multistage")
def multistage(state: RunState) -> None:
    """Compress, fine-tune, compress again (module docstring)."""
    cfg = state.method.cfg
    stages, per_stage = int(cfg["stages"]), cfg["layers_per_stage"]
    stage_ratios, drop = cfg["stage_ratios"], cfg["max_acc_drop"]
    selected = state.method.select_targets(state.model)  # every target, checked before any training
    precheck(state, selected)
    order = [name for name, _ in selected]
    factory, dense_val, example = start(state)
    teacher = frozen_copy(state.model) if factory is not None else None
    terms = teacher_terms(state, factory, teacher)
    state.summary.stages = [dense_row(state, dense_val, example)]
    good = Snapshot.of(state, 0)
    good_checkpoint: str | None = None
    good_val = dense_val
    base_ratio = ratio_policy(state)
    times: dict[str, int] = {}  # layer -> how often it has been compressed
    outcome: dict[str, Any] = {
        "name": "multistage",
        "stages": stages,
        "reason": f"completed {stages} stage(s)",
    }
    for stage in range(1, stages + 1):
        began = time.perf_counter()
        new = [n for n in order if n not in times][: per_stage or len(order)]
        names = [*[n for n in order if n in times], *new]
        for name in names:
            times[name] = times.get(name, 0) + 1
        targets: dict[str, dict[str, Any]] = {}
        for name in names:
            if stage_ratios is not None:
                targets[name] = {"ratio": float(stage_ratios[stage - 1]), "rank": None, "energy": None}
            elif base_ratio is not None:
                targets[name] = {"ratio": base_ratio ** times[name], "rank": None, "energy": None}
            else:
                targets[name] = {}
        record_report(state, compress_with(state, targets))
        fitted = finetune(state, f"stage{stage}", terms)
        checkpoint = best_checkpoint(state.trainer) if fitted and state.trainer is not None else None
        val = validate(state)
        row = {
            "stage": stage,
            **measured_row(state, example, val, began),
            "ratio": sorted({t["ratio"] for t in targets.values() if "ratio" in t}) or None,
            "kept": True,
            "reason": None,
        }
        bad = diverged(fitted, val)
        reason = None
        if bad is not None:
            reason = f"stage {stage} diverged: {bad} is not finite"
        elif drop is not None and dense_val.get("val/acc") is not None:
            floor = dense_val["val/acc"] - float(drop)
            if val.get("val/acc", -math.inf) < floor - 1e-12:
                reason = (
                    f"stage {stage}: val/acc {val.get('val/acc'):.4f} fell more than max_acc_drop={drop:g} below "
                    f"the dense model's {dense_val['val/acc']:.4f}"
                )
        state.summary.stages.append(row)
        if reason is not None:
            row.update(kept=False, reason=reason)
            good.restore(state)
            outcome["reason"] = f"{reason}; kept stage {good.stage}"
            break
        good, good_checkpoint, good_val = Snapshot.of(state, stage), checkpoint, val
    outcome.update(kept_stage=good.stage, stopped_early=good.stage < stages)
    state.summary.schedule = outcome
    state.metrics.update(good_val)  # val/* of the kept stage, not of a dropped one's fit
    state.metrics["decomp/stages_kept"] = float(good.stage)
    test_current(state, good_checkpoint)
