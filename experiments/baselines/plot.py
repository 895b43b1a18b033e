"""Test balanced accuracy against fit time of the elpv baselines: ``acc_vs_minutes.png`` (mean +- std over seeds,
the Pareto front dashed, the majority class dotted).

    python experiments/baselines/plot.py logs/baselines_elpv/runs logs/baselines_elpv_teacher/runs \
        logs/baselines_elpv_recipe/runs --out experiments/baselines/acc_vs_minutes.png

The fit times are wall times of a shared 2-core machine (two runs at a time, one thread each): an upper bound of
what a run takes alone.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

from lrk.reporting.figures import tradeoff_figure
from lrk.reporting.runs import ReportRun, find_summaries, groups_of, load_report_runs, tradeoff_points
from lrk.results import Group

#: the config keys that tell the baselines apart (model.teacher differs per seed, so it is left out)
VARIANT_KEYS = (
    "data.source", "backbone.name", "backbone.stem", "backbone.depth", "backbone.distilled", "data.image_size",
    "data.augment", "model.label_smoothing", "model.ema_decay", "model.mixup_alpha", "trainer.max_epochs",
)  # fmt: skip


GOAL_BAL_ACC, GOAL_SECONDS = 0.85, 600.0


def short_name(run: ReportRun) -> str:
    """``vit_hybrid``, ``vit_edge``, ``resnet18`` or ``DeiT-style vit_hybrid``, then what differs from the main
    job's recipe (64 px, flips/rotations, 30 epochs, no smoothing, EMA or mixup)."""
    backbone = run.value("backbone.name")
    if backbone == "vit":
        backbone = "vit_hybrid" if run.value("backbone.stem") == "conv" else "vit_edge"
    parts = [f"DeiT-style {backbone}" if run.value("backbone.distilled") else str(backbone)]
    if run.value("data.image_size") != 64:
        parts.append(f"{run.value('data.image_size')} px")
    if run.value("data.augment") is not True:
        parts.append(f"augment={run.value('data.augment')}")
    for key in ("model.label_smoothing", "model.ema_decay", "model.mixup_alpha"):
        if run.value(key):
            parts.append(f"{key.split('.')[1]}={run.value(key)}")
    if run.value("trainer.max_epochs") != 30:
        parts.append(f"{run.value('trainer.max_epochs')} epochs")
    if run.value("data.source") != "elpv":
        parts.append(f"source={run.value('data.source')}")
    return ", ".join(parts)


def paired_deltas(
    groups: Sequence[Group], names: Mapping[tuple, str], baseline: str, metric: str = "test/bal_acc"
) -> dict[str, list[float]]:
    """Per variant: ``metric`` minus the baseline variant's, seed by seed (same seed: same split and init)."""
    by_seed = {name: {} for name in names.values()}
    for group in groups:
        for run in group.completed:
            by_seed[names[group.key]][run.value("seed")] = float(run.metrics[metric])
    reference = by_seed.get(baseline, {})
    return {
        name: [values[s] - reference[s] for s in sorted(values) if s in reference]
        for name, values in by_seed.items()
        if name != baseline
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, help="run folders or folders of runs")
    parser.add_argument("--out", type=Path, default=Path("acc_vs_minutes.png"))
    parser.add_argument(
        "--baseline", default="vit_hybrid", help="the variant the paired differences are taken to"
    )
    args = parser.parse_args()
    runs, problems = load_report_runs(find_summaries(args.paths))
    for problem in problems:
        print(problem)
    groups, _ = groups_of(runs, VARIANT_KEYS)
    names = {group.key: short_name(group.runs[0]) for group in groups}
    points = tradeoff_points(groups, names, "time/fit_s", "test/bal_acc")
    for point in sorted(points, key=lambda p: p.x):
        print(
            f"{point.label}: n={point.n} bal_acc {point.y:.3f} ± {point.y_err:.3f}, fit {point.x / 60:.1f} min"
        )
    for name, deltas in paired_deltas(groups, names, args.baseline).items():
        if deltas:
            spread = statistics.stdev(deltas) if len(deltas) > 1 else 0.0
            print(
                f"{name} - {args.baseline} (paired, n={len(deltas)}): {statistics.fmean(deltas):+.3f} ± {spread:.3f}"
            )
    fig = tradeoff_figure(points, "time/fit_s", "test/bal_acc", baseline=0.5, log_x=False)
    axes = fig.axes[0]
    axes.axhline(GOAL_BAL_ACC, color="tab:red", ls="-.", lw=1, label=f"the issue's goal ({GOAL_BAL_ACC})")
    axes.axvline(GOAL_SECONDS, color="tab:red", ls=":", lw=1, label="10 minutes")
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
