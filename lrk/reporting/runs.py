"""summary.json files -> runs with everything a report draws, grouped by dataset and by the config keys that vary.

The runs, their groups and the mean +- std of a group are :mod:`lrk.results`'s (:class:`~lrk.results.Run`,
:func:`~lrk.results.group_runs`, :class:`~lrk.results.Group`); this module adds what the figures need beyond the
metrics (the per-layer report ``decomp_layers``, ``extra`` with the confusion matrix and class names, the sweep's
``optuna`` record) and turns groups into the plain data each figure function takes.
"""

from __future__ import annotations

import fnmatch
import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lrk.errors import LrkConfigError
from lrk.results import Group, Run, group_runs, load_runs, majority_baseline
from lrk.summary import SUMMARY_FILE

#: config keys that differ between runs without making them a different variant (seeds, folders, loggers)
IGNORED_KEYS = (
    "seed", "*.seed", "optuna.*", "paths.*", "hydra.*", "logger.*", "callbacks.*", "task_name", "tags",
    "trainer.default_root_dir", "*ckpt_path", "*checkpoint_path", "data.root", "*cache*", "*dir", "*dirpath",
)  # fmt: skip

#: the phases stacked in the phase-time figure (lrk.lit.callbacks.PhaseTimer; ``time/rr_s`` from the methods)
PHASES = ("time/rr_s", "time/train_s", "time/val_s")
#: attention time, measured inside the training and validation steps (so inside ``time/train_s + time/val_s``)
ATTENTION_PHASE = "time/mha_s"
MAJORITY = "test/acc_majority"
#: keys whose value names a variant by itself (``svd`` rather than ``name=svd``); tried first as variant keys
NAMED_KEYS = ("decomp.name", "backbone.name")


@dataclass
class ReportRun(Run):
    """A :class:`lrk.results.Run` plus the parts of summary.json a report draws."""

    decomp_layers: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    optuna: dict[str, Any] | None = None

    @property
    def dataset(self) -> str:
        """``data.name``, with ``data.source`` when it has one (``surface_defect (elpv)``)."""
        name, source = self.value("data.name"), self.value("data.source")
        return f"{name} ({source})" if source else str(name)

    @property
    def class_names(self) -> list[str]:
        names = (self.extra.get("data") or {}).get("class_names")
        if names:
            return [str(n) for n in names]
        return [k.removeprefix("test/recall/") for k in self.metrics if k.startswith("test/recall/")]


def find_summaries(paths: Sequence[str | Path]) -> list[Path]:
    """Every summary.json below ``paths`` (run, multirun or sweep folders, or the files), each path checked."""
    if not paths:
        raise LrkConfigError("no folder given: give run folders, a multirun folder or a sweep folder")
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_file() and path.name == SUMMARY_FILE:
            found = [path]
        elif path.is_dir():
            found = sorted(path.rglob(SUMMARY_FILE))
        elif path.exists():
            raise LrkConfigError(
                f"{path} is not a folder nor a {SUMMARY_FILE}: give run, multirun or sweep folders"
            )
        else:
            raise LrkConfigError(f"{path} does not exist: give run, multirun or sweep folders")
        if not found:
            raise LrkConfigError(
                f"{path} holds no {SUMMARY_FILE}: give run folders (each with a {SUMMARY_FILE}), "
                "a multirun folder or a sweep folder"
            )
        files.extend(f for f in found if f not in files)
    return files


def load_report_runs(files: Iterable[Path]) -> tuple[list[ReportRun], list[str]]:
    """The runs of ``files``, and one line per file that could not be read (listed in the report, not drawn)."""
    runs, unreadable = [], []
    for file in files:
        try:
            (run,) = load_runs([file])
            data = json.loads(file.read_text())
        except (OSError, ValueError) as exc:
            unreadable.append(f"{file.parent}: {SUMMARY_FILE} unreadable ({exc})")
            continue
        runs.append(
            ReportRun(
                path=run.path,
                status=run.status,
                metrics=run.metrics,
                config=run.config,
                error=run.error,
                num_classes=run.num_classes,
                decomp_layers=[r for r in data.get("decomp_layers") or [] if isinstance(r, dict)],
                extra=data.get("extra") or {},
                optuna=data.get("optuna"),
            )
        )
    return runs, unreadable


def by_dataset(runs: Sequence[ReportRun]) -> dict[str, list[ReportRun]]:
    """Runs by dataset, in the order each dataset first appears."""
    out: dict[str, list[ReportRun]] = {}
    for run in runs:
        out.setdefault(run.dataset, []).append(run)
    return out


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists become their text."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value) if isinstance(value, list) else value
    return out


def varying_keys(runs: Sequence[Run], ignored: Sequence[str] = IGNORED_KEYS) -> list[str]:
    """The config keys that tell the runs' variants apart (seeds, folders and loggers left out).

    ``decomp.name`` and ``backbone.name`` when they vary, then every key that varies among runs of the same
    method and backbone: ``decomp.branches=1,2,4`` or a sweep's ``decomp.ratio`` and ``model.lr``, but not
    ``decomp.beta`` or ``decomp.stage``, which follow from the method. Then, while runs that differ in some other
    key are still lumped together, the keys that split them. Only completed runs count (when there are any).
    ``["decomp.name"]`` when all runs are one variant."""
    completed = [r for r in runs if r.status == "completed"]
    flat = [flatten(r.config) for r in completed or runs]  # a failed run's config does not make a variant
    candidates = sorted(
        {k for f in flat for k in f if not any(fnmatch.fnmatchcase(k, pattern) for pattern in ignored)},
        key=lambda k: (NAMED_KEYS.index(k) if k in NAMED_KEYS else len(NAMED_KEYS), k),
    )

    def cell(f: Mapping[str, Any], key: str) -> str:
        return json.dumps(f.get(key), sort_keys=True, default=str)

    def classes(keys: Sequence[str]) -> int:
        return len({tuple(cell(f, k) for k in keys) for f in flat})

    named = [k for k in NAMED_KEYS if len({cell(f, k) for f in flat}) > 1]
    kinds: dict[
        tuple[str, ...], list[Mapping[str, Any]]
    ] = {}  # runs by the named keys (the method, backbone)
    for f in flat:
        kinds.setdefault(tuple(cell(f, k) for k in NAMED_KEYS), []).append(f)
    chosen = named + [
        k
        for k in candidates
        if k not in NAMED_KEYS and any(len({cell(f, k) for f in same}) > 1 for same in kinds.values())
    ]
    target = classes(candidates)
    for key in candidates:
        if classes(chosen) == target:
            break
        if key not in chosen and classes([*chosen, key]) > classes(chosen):
            chosen.append(key)
    return chosen or ["decomp.name"]


def group_label(group: Group, by: Sequence[str]) -> str:
    """``svd, ratio=0.3``: the group's values, each but ``decomp.name`` with the last part of its key (keys a
    group's runs do not have left out)."""
    parts = [
        v if k in NAMED_KEYS else f"{k.rsplit('.', 1)[-1]}={v}"
        for k, v in zip(by, group.key, strict=True)
        if v != "None"
    ]
    return ", ".join(parts) or ", ".join(group.key)


def groups_of(
    runs: Sequence[ReportRun], by: Sequence[str] | None = None, rename: Mapping[tuple, str] | None = None
) -> tuple[list[Group], dict[tuple, str]]:
    """lrk.results groups over ``by`` (default :func:`varying_keys`) and a readable name for each (``rename``:
    group key -> name, e.g. ``{("none", "False"): "NRR"}``, for the groups it names)."""
    keys = list(by) if by else varying_keys(runs)
    groups = group_runs(runs, keys)
    rename = rename or {}
    return groups, {g.key: rename.get(g.key, group_label(g, keys)) for g in groups}


@dataclass(frozen=True)
class Point:
    """One variant in a trade-off figure: mean and sample std over its completed runs (seeds)."""

    label: str
    x: float
    y: float
    x_err: float = 0.0
    y_err: float = 0.0
    n: int = 1


def tradeoff_points(groups: Sequence[Group], names: Mapping[tuple, str], x: str, y: str) -> list[Point]:
    """A point per group whose completed runs logged both metrics (runs lacking either are left out)."""
    points = []
    for group in groups:
        pairs = [
            (float(r.metrics[x]), float(r.metrics[y]))
            for r in group.completed
            if _finite(r.metrics.get(x)) and _finite(r.metrics.get(y))
        ]
        if not pairs:
            continue
        xs, ys = zip(*pairs, strict=True)
        points.append(
            Point(
                names[group.key], statistics.fmean(xs), statistics.fmean(ys), _std(xs), _std(ys), len(pairs)
            )
        )
    return points


def rank_table(groups: Sequence[Group], names: Mapping[tuple, str]) -> dict[str, dict[str, float]]:
    """Group name -> layer -> mean rank over its completed runs (from ``decomp_layers``); groups without a
    per-layer report (the dense baseline) are left out."""
    out: dict[str, dict[str, float]] = {}
    for group in groups:
        ranks: dict[str, list[float]] = {}
        for run in group.completed:
            for row in getattr(run, "decomp_layers", []):
                if _finite(row.get("rank")) and row.get("name"):
                    ranks.setdefault(str(row["name"]), []).append(float(row["rank"]))
        if ranks:
            out[names[group.key]] = {layer: statistics.fmean(v) for layer, v in ranks.items()}
    return out


def phase_times(groups: Sequence[Group], names: Mapping[tuple, str]) -> dict[str, dict[str, float]]:
    """Group name -> phase metric -> mean seconds (``PHASES`` and ``time/mha_s``; a missing phase is 0)."""
    out = {}
    for group in groups:
        if not group.completed:
            continue
        means = {m: group.mean(m) for m in (*PHASES, ATTENTION_PHASE)}
        if any(v for v in means.values()):
            out[names[group.key]] = {m: float(v or 0.0) for m, v in means.items()}
    return out


def recalls(groups: Sequence[Group], names: Mapping[tuple, str]) -> dict[str, dict[str, tuple[float, float]]]:
    """Group name -> class -> (mean, std) of ``test/recall/<class>`` over its completed runs."""
    out = {}
    for group in groups:
        classes = _class_order(group)
        cells = {}
        for name in classes:
            mean = group.mean(f"test/recall/{name}")
            if mean is not None:
                cells[name] = (mean, group.std(f"test/recall/{name}") or 0.0)
        if cells:
            out[names[group.key]] = cells
    return out


def confusions(
    groups: Sequence[Group], names: Mapping[tuple, str]
) -> tuple[dict[str, list[list[int]]], list[str]]:
    """Group name -> the test confusion matrix summed over its completed runs (rows: true class), and the class
    names of the first run that has them. Runs whose matrix has another shape than the group's first are left out."""
    out: dict[str, list[list[int]]] = {}
    classes: list[str] = []
    for group in groups:
        total: list[list[int]] | None = None
        for run in group.completed:
            matrix = (getattr(run, "extra", None) or {}).get("test_confusion_matrix")
            if not matrix:
                continue
            if total is None:
                total = [[int(v) for v in row] for row in matrix]
                classes = classes or getattr(run, "class_names", [])
            elif len(matrix) == len(total):
                total = [
                    [a + int(b) for a, b in zip(ra, rb, strict=True)]
                    for ra, rb in zip(total, matrix, strict=True)
                ]
        if total is not None:
            out[names[group.key]] = total
    return out, classes


def majority_accuracy(runs: Sequence[Run]) -> float | None:
    """The accuracy of always predicting the test split's majority class (lrk.results.majority_baseline), or
    None when the runs did not log ``test/acc_majority``."""
    return majority_baseline(runs).get("test/acc")


def failed_runs(runs: Sequence[Run]) -> list[str]:
    """One line per run that did not complete: folder, status, error (listed in the report, never drawn)."""
    return [f"{r.path}: {r.status}: {r.error}" for r in runs if r.status != "completed"]


def _class_order(group: Group) -> list[str]:
    names: list[str] = []
    for run in group.completed:
        for name in getattr(run, "class_names", []):
            if name not in names:
                names.append(name)
    return names


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _std(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0
