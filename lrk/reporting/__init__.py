"""Reports from summary.json files: figures (one function per plot, each drawing the data it is handed), the
results table of :mod:`lrk.results`, and the HTML page of ``python -m lrk.report``.

Imports only lrk.results, lrk.summary, lrk.errors and lrk.checks (no torch): a report runs wherever the runs'
folders are.
"""

from lrk.reporting.figures import (
    confusion_figure,
    pareto_front,
    phase_time_figure,
    rank_map_figure,
    recall_figure,
    tradeoff_figure,
)
from lrk.reporting.page import (
    Report,
    build_report,
    dataset_figures,
    dataset_table,
    results_table,
    table_metrics,
)
from lrk.reporting.runs import (
    Point,
    ReportRun,
    by_dataset,
    confusions,
    failed_runs,
    find_summaries,
    groups_of,
    load_report_runs,
    phase_times,
    rank_table,
    recalls,
    tradeoff_points,
    varying_keys,
)
from lrk.reporting.sweep import best_trials_table, load_study, study_figures, study_refs

__all__ = [
    "Point", "Report", "ReportRun", "best_trials_table", "build_report", "by_dataset", "confusion_figure", "confusions",
    "dataset_figures", "dataset_table", "failed_runs", "find_summaries", "groups_of", "load_report_runs", "load_study",
    "pareto_front", "phase_time_figure", "phase_times", "rank_map_figure", "rank_table", "recall_figure",
    "recalls", "results_table", "study_figures", "study_refs", "table_metrics", "tradeoff_figure",
    "tradeoff_points", "varying_keys",
]  # fmt: skip
