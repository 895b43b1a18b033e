"""Compare finished runs: read their summary.json files, group them, and print mean +- std tables.

Every lrk run leaves ``<run dir>/summary.json`` (lrk.summary); an experiment is a set of such runs (usually one
Hydra multirun folder, several seeds per variant). This module turns them into the tables of
``experiments/*/README.md``:

    python -m lrk.results logs/sdrm_paper/multiruns --by decomp.name backbone.distilled \\
        --baseline none,False --metrics test/acc test/bal_acc time/epoch_s time/mha_s mem/peak_mb \\
        --rename none,False=NRR none,True=DeiT-style

Rows are groups of runs with the same values of the ``--by`` config keys (dotted paths into the run's config);
each cell is the mean +- sample standard deviation over the group's completed runs, and, when a baseline group
is named, the ratio of the group's mean to the baseline's mean. Runs that did not complete are counted and
listed, never averaged.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lrk.summary import SUMMARY_FILE


@dataclass
class Run:
    """One run's summary.json: where it lies, its status, metrics and (nested) config."""

    path: Path
    status: str
    metrics: dict[str, float]
    config: dict[str, Any]
    error: str | None = None
    num_classes: int | None = None

    def value(self, dotted: str) -> Any:
        """The config value at a dotted path (``decomp.name``); ``None`` when a part is missing."""
        node: Any = self.config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node


@dataclass
class Group:
    """Runs sharing the values of the grouping keys."""

    key: tuple[str, ...]
    runs: list[Run] = field(default_factory=list)

    @property
    def completed(self) -> list[Run]:
        return [r for r in self.runs if r.status == "completed"]

    def values(self, metric: str) -> list[float]:
        """The metric over the completed runs that logged a finite value of it."""
        out = []
        for run in self.completed:
            value = run.metrics.get(metric)
            if isinstance(value, (int, float)) and math.isfinite(value):
                out.append(float(value))
        return out

    def mean(self, metric: str) -> float | None:
        values = self.values(metric)
        return statistics.fmean(values) if values else None

    def std(self, metric: str) -> float | None:
        values = self.values(metric)
        return statistics.stdev(values) if len(values) > 1 else (0.0 if values else None)


def load_runs(roots: Iterable[str | Path]) -> list[Run]:
    """Every ``summary.json`` below the given folders (or the files themselves), oldest path first."""
    files: list[Path] = []
    for root in roots:
        root = Path(root)
        if root.is_file():
            files.append(root)
        elif root.is_dir():
            files.extend(sorted(root.rglob(SUMMARY_FILE)))
        else:
            raise FileNotFoundError(f"{root} is neither a summary.json nor a folder holding run folders")
    runs = []
    for path in files:
        data = json.loads(path.read_text())
        runs.append(
            Run(
                path=path.parent,
                status=str(data.get("status")),
                metrics={k: v for k, v in (data.get("metrics") or {}).items() if isinstance(v, (int, float))},
                config=data.get("config") or {},
                error=data.get("error"),
                num_classes=len(((data.get("extra") or {}).get("data") or {}).get("class_names") or [])
                or None,
            )
        )
    return runs


def group_runs(runs: Sequence[Run], by: Sequence[str]) -> list[Group]:
    """Groups of runs with equal values at the ``by`` paths, in the order their first run appears."""
    groups: dict[tuple[str, ...], Group] = {}
    for run in runs:
        key = tuple(str(run.value(k)) for k in by)
        groups.setdefault(key, Group(key)).runs.append(run)
    return list(groups.values())


MAJORITY_ROW = "majority class"


def majority_baseline(runs: Sequence[Run]) -> dict[str, float]:
    """The metrics of always predicting the test split's most frequent class, from the completed runs'
    ``test/acc_majority`` (its share p of the test split) and their number of classes K: accuracy p, balanced
    accuracy 1/K (recall 1 on one class, 0 on the others), macro F1 (2p / (1 + p)) / K. ``{}`` without them."""
    shares = [
        r.metrics["test/acc_majority"]
        for r in runs
        if r.status == "completed" and "test/acc_majority" in r.metrics
    ]
    classes = {r.num_classes for r in runs if r.status == "completed" and r.num_classes}
    if not shares or len(classes) != 1:
        return {}
    share, k = statistics.fmean(shares), classes.pop()
    return {"test/acc": share, "test/bal_acc": 1.0 / k, "test/f1": 2 * share / (1 + share) / k}


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _digits(metric: str) -> int:
    if metric.startswith(("time/", "mem/")):
        return 1 if not metric.endswith("_ms") else 2
    if metric.startswith(("model/params", "model/flops")):
        return 0
    return 3


def markdown_table(
    groups: Sequence[Group],
    metrics: Sequence[str],
    baseline: tuple[str, ...] | None = None,
    names: dict[tuple[str, ...], str] | None = None,
    by: Sequence[str] = (),
    majority: bool = True,
) -> str:
    """A Markdown table: one row per group (the baseline first), ``mean +- std`` per metric and ``(x ratio)`` to
    the baseline; last, when the runs logged ``test/acc_majority`` and ``majority``, the majority-class row
    (:func:`majority_baseline`; its other cells ``-``)."""
    names = names or {}
    base = next((g for g in groups if g.key == baseline), None) if baseline is not None else None
    if baseline is not None and base is None:
        known = ", ".join(",".join(g.key) for g in groups)
        raise ValueError(f"baseline {','.join(baseline)} is not one of the groups: {known}")
    if base is not None:  # the baseline first, the others in their order
        groups = [base, *(g for g in groups if g is not base)]
    head = ["run" if not by else " / ".join(by), "n", *metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for group in groups:
        cells = [names.get(group.key, ", ".join(group.key)), str(len(group.completed))]
        for metric in metrics:
            mean, std, digits = group.mean(metric), group.std(metric), _digits(metric)
            cell = _fmt(mean, digits)
            if mean is not None and len(group.values(metric)) > 1:
                cell += f" ± {_fmt(std, digits)}"
            base_mean = base.mean(metric) if base is not None else None
            if mean is not None and base_mean and group is not base:
                cell += f" (×{mean / base_mean:.2f})"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    trivial = majority_baseline([run for group in groups for run in group.runs]) if majority else {}
    if trivial:
        cells = [MAJORITY_ROW, "-", *(_fmt(trivial.get(m), _digits(m)) for m in metrics)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def problems(groups: Sequence[Group]) -> list[str]:
    """One line per run that did not complete: its group, folder, status and error."""
    out = []
    for group in groups:
        for run in group.runs:
            if run.status != "completed":
                out.append(f"{', '.join(group.key)}: {run.path} {run.status}: {run.error}")
    return out


def _parse_names(items: Sequence[str]) -> dict[tuple[str, ...], str]:
    names = {}
    for item in items:
        key, sep, name = item.rpartition("=")
        if not sep or not key:
            raise SystemExit(
                f"--rename {item!r} is invalid: write KEY1,KEY2=Name (the values of --by, comma-separated)"
            )
        names[tuple(key.split(","))] = name
    return names


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lrk.results", description=__doc__.split("\n\n")[0])
    parser.add_argument("roots", nargs="+", help="run folders, multirun folders or summary.json files")
    parser.add_argument("--by", nargs="+", default=["decomp.name"], help="config keys that define a group")
    parser.add_argument(
        "--metrics", nargs="+", default=["test/acc", "test/bal_acc", "time/epoch_s", "mem/peak_mb"]
    )
    parser.add_argument("--baseline", help="the baseline group's values of --by, comma-separated (e.g. none)")
    parser.add_argument("--rename", nargs="*", default=[], help="KEY1,KEY2=Name: a readable name for a group")
    args = parser.parse_args(argv)
    runs = load_runs(args.roots)
    if not runs:
        raise SystemExit(f"no {SUMMARY_FILE} below {', '.join(args.roots)}")
    groups = group_runs(runs, args.by)
    baseline = tuple(args.baseline.split(",")) if args.baseline else None
    try:
        print(markdown_table(groups, args.metrics, baseline, _parse_names(args.rename), args.by))
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc
    for line in problems(groups):
        print(f"not completed: {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
