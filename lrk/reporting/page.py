"""The report: summary.json files -> figures (PNG + SVG files) and one self-contained HTML page.

:func:`build_report` is what ``python -m lrk.report`` runs; :func:`dataset_figures` and :func:`results_table` are
the pieces the notebooks call.
"""

from __future__ import annotations

import base64
import html
import io
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from matplotlib.figure import Figure

from lrk.errors import LrkConfigError
from lrk.reporting import figures as F
from lrk.reporting.runs import (
    MAJORITY,
    ReportRun,
    by_dataset,
    confusions,
    failed_runs,
    find_summaries,
    groups_of,
    load_report_runs,
    majority_accuracy,
    phase_times,
    rank_table,
    recalls,
    tradeoff_points,
    varying_keys,
)
from lrk.reporting.sweep import load_study, storage_missing, study_figures, study_refs
from lrk.results import Group, markdown_table

#: the table's columns, those that no run logged left out
TABLE_METRICS = (
    "test/acc", "test/bal_acc", "test/f1", "model/params", "model/compression", "model/flops",
    "time/infer_ms", "time/rr_s", "time/epoch_s", "mem/peak_mb",
)  # fmt: skip
#: x axes of the accuracy trade-off figures
TRADEOFF_X = ("model/params", "model/flops", "time/infer_ms")
HTML_FILE = "index.html"


def results_table(
    groups: Sequence[Group], names: dict[tuple, str], by: Sequence[str], metrics: Sequence[str]
) -> str:
    """lrk.results' Markdown table (mean +- std over completed runs), ending with its majority-class row when
    the runs logged ``test/acc_majority``."""
    return markdown_table(groups, metrics, names=names, by=by)


def table_metrics(runs: Sequence[ReportRun], metrics: Sequence[str] = TABLE_METRICS) -> list[str]:
    """The ``metrics`` that at least one completed run logged."""
    return [m for m in metrics if any(m in r.metrics for r in runs if r.status == "completed")]


def dataset_table(
    runs: Sequence[ReportRun],
    by: Sequence[str] | None = None,
    metrics: Sequence[str] | None = None,
    rename: Mapping[tuple, str] | None = None,
) -> str:
    """The results table of one dataset's runs: variants by ``by`` (default: the config keys that vary), columns
    ``metrics`` (default: the usual ones that were logged), the majority-class row where runs logged it."""
    keys = list(by) if by else varying_keys(runs)
    groups, names = groups_of(runs, keys, rename)
    return results_table(
        groups, names, keys, list(metrics) if metrics else table_metrics(runs) or ["test/acc"]
    )


def dataset_figures(
    runs: Sequence[ReportRun],
    by: Sequence[str] | None = None,
    y_metric: str = "test/acc",
    rename: Mapping[tuple, str] | None = None,
) -> dict[str, Figure]:
    """Every figure of one dataset's runs (failed runs are not drawn): ``acc_vs_<x>`` for parameters, FLOPs and
    latency, ``rank_map``, ``phase_time``, ``recall`` and ``confusion``; a figure without data is left out."""
    return {name: draw() for name, draw in figure_plan(runs, by, y_metric, rename)}


def figure_plan(
    runs: Sequence[ReportRun],
    by: Sequence[str] | None = None,
    y_metric: str = "test/acc",
    rename: Mapping[tuple, str] | None = None,
) -> list[tuple[str, Callable[[], Figure]]]:
    """(name, draw) for each figure that has data, so a caller can show progress while they are drawn."""
    groups, names = groups_of(runs, by, rename)
    plan: list[tuple[str, Callable[[], Figure]]] = []
    baseline = majority_accuracy(runs) if y_metric == "test/acc" else None
    for x in TRADEOFF_X:
        points = tradeoff_points(groups, names, x, y_metric)
        if points:
            short = x.split("/")[-1]
            plan.append(
                (f"acc_vs_{short}", lambda p=points, x=x: F.tradeoff_figure(p, x, y_metric, baseline))
            )
    ranks = rank_table(groups, names)
    if ranks:
        plan.append(("rank_map", lambda: F.rank_map_figure(ranks)))
    times = phase_times(groups, names)
    if times:
        plan.append(("phase_time", lambda: F.phase_time_figure(times)))
    recall = recalls(groups, names)
    if recall:
        plan.append(("recall", lambda: F.recall_figure(recall)))
    matrices, classes = confusions(groups, names)
    if matrices:
        plan.append(("confusion", lambda: F.confusion_figure(matrices, classes)))
    return plan


@dataclass
class Section:
    title: str
    notes: list[str] = field(default_factory=list)
    table: str = ""
    figures: list[tuple[str, Figure]] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


@dataclass
class Report:
    """What :func:`build_report` wrote."""

    out: Path
    page: Path
    figures: list[Path]
    notes: list[str]


def build_report(
    paths: Sequence[str | Path],
    out: str | Path | None = None,
    force: bool = False,
    by: Sequence[str] | None = None,
    metrics: Sequence[str] | None = None,
    progress: bool = True,
) -> Report:
    """Find the summary.json files below ``paths``, draw every figure, write ``<out>/index.html`` (figures
    embedded as PNG) and each figure as ``<out>/<name>.png`` and ``.svg``. ``out`` defaults to
    ``<first path>/report``; an existing ``out`` is refused unless ``force``. Bad input: LrkConfigError."""
    files = find_summaries(paths)
    first = Path(paths[0])
    out = Path(out) if out is not None else (first.parent if first.is_file() else first) / "report"
    if out.exists() and not force:
        raise LrkConfigError(
            f"--out {out} already exists: give another --out, or --force to replace its report"
        )
    if out.exists() and not out.is_dir():
        raise LrkConfigError(f"--out {out} is a file: give a folder")
    notes: list[str] = []
    with steps(len(files), "reading summaries", progress) as advance:
        runs, unreadable = load_report_runs(files)
        for _ in files:
            advance()
    datasets = by_dataset(runs)
    if len(datasets) > 1:
        counts = ", ".join(f"{name}: {len(rs)} runs" for name, rs in datasets.items())
        notes.append(f"runs of {len(datasets)} datasets mixed ({counts}): one section per dataset")
    sections: list[Section] = []
    plans: list[tuple[Section, str, Callable[[], Figure]]] = []
    for name, dataset_runs in datasets.items():
        section = Section(f"dataset {name}")
        keys = list(by) if by else varying_keys(dataset_runs)
        completed = [r for r in dataset_runs if r.status == "completed"]
        section.notes.append(
            f"{len(dataset_runs)} runs, {len(completed)} completed; variants by {', '.join(keys)}"
        )
        if MAJORITY in {m for r in completed for m in r.metrics}:
            section.notes.append(
                "majority class: accuracy of always predicting the test split's majority class"
            )
        section.table = dataset_table(dataset_runs, keys, metrics) if completed else ""
        section.failed = failed_runs(dataset_runs)
        stem = _slug(name) + "_" if len(datasets) > 1 else ""
        plans.extend((section, stem + fig_name, draw) for fig_name, draw in figure_plan(dataset_runs, keys))
        sections.append(section)
    sweep = Section("sweep")
    studies = []
    for study_name, storage in study_refs(runs, paths):
        missing = storage_missing(storage)
        if missing:
            sweep.notes.append(f"study {study_name}: storage {storage} cannot be read ({missing})")
        else:
            studies.append((study_name, storage))
    notes.extend(unreadable)

    written: list[Path] = []
    _prepare(out)
    with steps(len(plans) + len(studies), "drawing figures", progress) as advance:
        for section, fig_name, draw in plans:
            fig = draw()
            written += _save(fig, out, fig_name)
            section.figures.append((fig_name, fig))
            advance()
        for study_name, storage in studies:
            try:
                figs = study_figures(load_study(study_name, storage))
            except (
                Exception
            ) as exc:  # not an Optuna storage, or the study is not in it: say so, draw the rest
                sweep.notes.append(
                    f"study {study_name} in {storage} cannot be read: {type(exc).__name__}: {exc}"
                )
                figs = None
            if figs == {}:
                sweep.notes.append(f"study {study_name}: no completed trial yet")
            for key, fig in (figs or {}).items():
                written += _save(fig, out, _slug(f"optuna_{study_name}_{key}"))
                sweep.figures.append((f"{study_name}: {key}", fig))
            advance()
    if sweep.figures or sweep.notes:
        sections.append(sweep)
    page = out / HTML_FILE
    page.write_text(render_html(sections, notes, [str(p) for p in paths]))
    return Report(out, page, written, notes)


def _prepare(out: Path) -> None:
    """Create ``out``; in an existing one (``--force``) remove only what a report writes (no other file)."""
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("*.png"), *out.glob("*.svg"), out / HTML_FILE]:
        if old.is_file():
            old.unlink()


def _save(fig: Figure, out: Path, stem: str) -> list[Path]:
    paths = [out / f"{stem}.png", out / f"{stem}.svg"]
    # tight: the legends drawn right of the axes are part of the picture
    fig.savefig(paths[0], dpi=110, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
    return paths


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def png_base64(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def markdown_to_html(table: str) -> str:
    """lrk.results' Markdown table as an HTML table (first line: header; second: the rule)."""
    lines = [line.strip().strip("|").split("|") for line in table.strip().splitlines()]
    if len(lines) < 2:
        return ""
    head = "".join(f"<th>{html.escape(c.strip())}</th>" for c in lines[0])
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in row) + "</tr>" for row in lines[2:]
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


STYLE = """body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:90%}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}figure{display:inline-block;margin:0.5em;vertical-align:top}
img{max-width:100%}.note{color:#8a5a00}.failed{color:#a00}"""


def render_html(sections: Sequence[Section], notes: Sequence[str], sources: Sequence[str]) -> str:
    """One page: the notes, then per section its table, failed runs and figures (PNG embedded as base64)."""
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>lrk report</title>",
        f"<style>{STYLE}</style></head><body><h1>lrk report</h1>",
        f"<p>From {html.escape(', '.join(sources))}; written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.</p>",
    ]
    parts += [f"<p class='note'>{html.escape(n)}</p>" for n in notes]
    for section in sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        parts += [f"<p class='note'>{html.escape(n)}</p>" for n in section.notes]
        if section.table:
            parts.append(markdown_to_html(section.table))
        if section.failed:
            parts.append(f"<h3>runs that did not complete ({len(section.failed)}, not drawn)</h3><ul>")
            parts += [f"<li class='failed'>{html.escape(line)}</li>" for line in section.failed]
            parts.append("</ul>")
        for name, fig in section.figures:
            parts.append(
                f"<figure><img alt='{html.escape(name)}' src='data:image/png;base64,{png_base64(fig)}'>"
                f"<figcaption>{html.escape(name)}</figcaption></figure>"
            )
    parts.append("</body></html>")
    return "\n".join(parts)


@contextmanager
def steps(total: int, what: str, enabled: bool = True) -> Iterator[Callable[[], None]]:
    """A progress bar over ``total`` steps (rich, on a terminal); redirected, one plain line per tenth of the work
    on stderr, so logs stay readable. Yields ``advance()``."""
    if not enabled or total == 0:
        yield lambda: None
        return
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.progress import Progress

        with Progress(console=Console(stderr=True)) as bar:
            task = bar.add_task(what, total=total)
            yield lambda: bar.advance(task)
        return
    done = 0
    every = max(1, total // 10)

    def advance() -> None:
        nonlocal done
        done += 1
        if done % every == 0 or done == total:
            print(f"lrk.report: {what} {done}/{total}", file=sys.stderr, flush=True)

    yield advance
