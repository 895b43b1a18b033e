"""One function per figure of a report, each drawing the plain data it is handed into a new matplotlib Figure.

The figures are built without pyplot (``matplotlib.figure.Figure``): nothing is shown, nothing is kept in
pyplot's figure list, any backend works (PNG and SVG are written through Agg / the SVG canvas).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from lrk.reporting.runs import ATTENTION_PHASE, PHASES, Point

#: readable axis labels of the metric vocabulary (design.md)
LABELS = {
    "test/acc": "test accuracy",
    "test/bal_acc": "test balanced accuracy",
    "val/acc_best": "best validation accuracy",
    "model/params": "parameters",
    "model/flops": "FLOPs per image",
    "time/infer_ms": "latency per test batch (ms)",
    "time/fit_s": "fit time (s)",
    "time/rr_s": "rank reduction",
    "time/train_s": "training steps",
    "time/val_s": "validation",
    "time/mha_s": "attention (inside training + validation)",
}


#: legends right of the axes (constrained layout makes room), so they never hide a marker or a bar
OUTSIDE = {"loc": "upper left", "bbox_to_anchor": (1.02, 1.0), "borderaxespad": 0.0}


def label(metric: str) -> str:
    return LABELS.get(metric, metric)


def pareto_front(
    xs: Sequence[float], ys: Sequence[float], minimize_x: bool = True, maximize_y: bool = True
) -> list[bool]:
    """Which points no other point dominates (as small or smaller x and as large or larger y, one of them
    strictly, for the default directions). Equal points are all on the front. O(n log n): sort by x, then keep the
    points whose y beats every y seen at a strictly better x."""
    if len(xs) != len(ys):
        raise ValueError(f"pareto_front: {len(xs)} x values but {len(ys)} y values")
    sx = [x if minimize_x else -x for x in xs]
    sy = [-y if maximize_y else y for y in ys]  # both minimized from here on
    order = sorted(range(len(sx)), key=lambda i: (sx[i], sy[i]))
    front = [False] * len(sx)
    best_before = math.inf  # the smallest y among points with a strictly smaller x
    i = 0
    while i < len(order):
        j = i
        while j < len(order) and sx[order[j]] == sx[order[i]]:
            j += 1
        tie = order[i:j]  # same x, sorted by y: only those with the tie's smallest y can be on the front
        lowest = sy[tie[0]]
        for k in tie:
            front[k] = sy[k] == lowest and lowest < best_before
        best_before = min(best_before, lowest)
        i = j
    return front


def tradeoff_figure(
    points: Sequence[Point],
    x_metric: str,
    y_metric: str = "test/acc",
    baseline: float | None = None,
    log_x: bool | None = None,
) -> Figure:
    """``y_metric`` against ``x_metric``, one marker per variant with error bars (sample std over its seeds), the
    Pareto front (smaller x, larger y) as a line through its points; ``baseline`` (e.g. the majority-class
    accuracy) as a dashed line. ``log_x``: default when the x values span more than a factor of 20."""
    fig = Figure(figsize=(10.0, 4.6), layout="constrained")
    ax = fig.add_subplot()
    front = pareto_front([p.x for p in points], [p.y for p in points])
    colours = matplotlib.colormaps["tab10" if len(points) <= 10 else "tab20"].colors
    for i, (point, on_front) in enumerate(zip(points, front, strict=True)):
        ax.errorbar(
            point.x,
            point.y,
            xerr=point.x_err,
            yerr=point.y_err,
            fmt="o" if on_front else "s",
            capsize=3,
            label=f"{point.label} (n={point.n})",
            color=colours[i % len(colours)],
            markeredgecolor="black" if on_front else None,
        )
    best = sorted((p for p, f in zip(points, front, strict=True) if f), key=lambda p: p.x)
    if best:
        ax.plot([p.x for p in best], [p.y for p in best], "k--", lw=1, label="Pareto front", zorder=0)
    if baseline is not None:
        ax.axhline(baseline, color="grey", ls=":", lw=1, label=f"majority class ({baseline:.3f})")
    xs = [p.x for p in points if p.x > 0]
    if log_x or (log_x is None and xs and max(xs) / min(xs) > 20):
        ax.set_xscale("log")
    ax.set_xlabel(label(x_metric))
    ax.set_ylabel(label(y_metric))
    ax.set_title(f"{label(y_metric)} vs {label(x_metric)}")
    ax.grid(alpha=0.3)
    if points:
        ax.legend(fontsize="small", **OUTSIDE)
    return fig


def rank_map_figure(ranks: Mapping[str, Mapping[str, float]]) -> Figure:
    """A heat map of the rank each layer got (rows: layers in order of first appearance; columns: variants);
    layers a variant did not decompose are blank."""
    methods = list(ranks)
    layers: list[str] = []
    for per_layer in ranks.values():
        layers.extend(name for name in per_layer if name not in layers)
    grid = np.full((len(layers), len(methods)), np.nan)
    for j, method in enumerate(methods):
        for i, layer in enumerate(layers):
            if layer in ranks[method]:
                grid[i, j] = ranks[method][layer]
    # a variant's label is one line per config value ("svd, ratio=0.5" -> two lines): long labels stay readable
    labels = [method.replace(", ", "\n") for method in methods]
    label_lines = max(label.count("\n") + 1 for label in labels) if labels else 1
    fig = Figure(
        figsize=(2.5 + 1.6 * len(methods), 1.5 + 0.28 * len(layers) + 0.15 * label_lines),
        layout="constrained",
    )
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="rank")
    ax.set_xticks(range(len(methods)), labels, fontsize="x-small")
    ax.set_yticks(range(len(layers)), layers, fontsize="x-small")
    if grid.size <= 400:
        for i, j in zip(*np.nonzero(np.isfinite(grid)), strict=True):
            ax.text(j, i, f"{grid[i, j]:.0f}", ha="center", va="center", fontsize="xx-small", color="white")
    ax.set_xlabel("variant")
    ax.set_ylabel("layer")
    ax.set_title("rank per layer")
    return fig


def phase_time_figure(times: Mapping[str, Mapping[str, float]]) -> Figure:
    """Where a run's time goes: stacked bars of rank reduction, training steps and validation (disjoint phases)
    per variant, and the attention time (measured inside training and validation) as a hatched bar over them."""
    names = list(times)
    fig = Figure(figsize=(5.5 + 0.9 * max(1, len(names)), 4.6), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(names))
    bottom = np.zeros(len(names))
    for phase in PHASES:
        heights = np.array([times[n].get(phase, 0.0) for n in names])
        ax.bar(x, heights, 0.6, bottom=bottom, label=label(phase))
        bottom += heights
    rr = np.array([times[n].get("time/rr_s", 0.0) for n in names])
    mha = np.array([times[n].get(ATTENTION_PHASE, 0.0) for n in names])
    ax.bar(x, mha, 0.3, bottom=rr, fill=False, hatch="//", edgecolor="black", label=label(ATTENTION_PHASE))
    ax.set_xticks(x, names, rotation=30, ha="right", fontsize="small")
    ax.set_ylabel("seconds (mean over seeds)")
    ax.set_title("time per phase")
    ax.legend(fontsize="small", **OUTSIDE)
    return fig


def recall_figure(recalls: Mapping[str, Mapping[str, tuple[float, float]]]) -> Figure:
    """Per-class test recall, one group of bars per class and one bar per variant (error bars: std over seeds)."""
    names = list(recalls)
    classes: list[str] = []
    for cells in recalls.values():
        classes.extend(c for c in cells if c not in classes)
    fig = Figure(figsize=(6 + 0.5 * len(classes) * max(1, len(names)) ** 0.5, 4.2), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(names))
    for k, name in enumerate(names):
        cells = recalls[name]
        xs = [i + (k - (len(names) - 1) / 2) * width for i, c in enumerate(classes) if c in cells]
        ax.bar(
            xs,
            [cells[c][0] for c in classes if c in cells],
            width,
            yerr=[cells[c][1] for c in classes if c in cells],
            capsize=2,
            label=name,
        )
    ax.set_xticks(range(len(classes)), classes)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("class")
    ax.set_ylabel("test recall")
    ax.set_title("recall per class")
    ax.legend(fontsize="small", **OUTSIDE)
    return fig


def confusion_figure(
    matrices: Mapping[str, Sequence[Sequence[int]]], class_names: Sequence[str] = ()
) -> Figure:
    """One confusion matrix per variant (rows: true class, columns: predicted; counts summed over seeds),
    shaded by the fraction of the row."""
    names = list(matrices)
    cols = min(3, max(1, len(names)))
    rows = max(1, math.ceil(len(names) / cols))
    fig = Figure(figsize=(3.4 * cols, 3.2 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, name in zip(axes, names, strict=False):
        counts = np.asarray(matrices[name], dtype=float)
        shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
        ticks = list(class_names) if len(class_names) == len(counts) else [str(i) for i in range(len(counts))]
        ax.set_xticks(range(len(counts)), ticks, rotation=30, ha="right", fontsize="small")
        ax.set_yticks(range(len(counts)), ticks, fontsize="small")
        for i in range(len(counts)):
            for j in range(len(counts)):
                color = "white" if shares[i, j] > 0.5 else "black"
                ax.text(j, i, f"{counts[i, j]:.0f}", ha="center", va="center", color=color, fontsize="small")
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(name, fontsize="small")
    for ax in axes[len(names) :]:
        ax.set_axis_off()
    fig.suptitle("test confusion matrices")
    return fig
