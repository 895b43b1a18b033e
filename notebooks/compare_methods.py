# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Compare methods
#
# A multirun (several methods, several seeds) -> the results table (mean ± std over seeds, the majority-class
# row), accuracy against parameters / FLOPs / latency with the Pareto front, the rank of every layer, the time
# per phase, per-class recall and the confusion matrices. All the work is in `lrk.reporting`; this notebook only
# wires it. `python -m lrk.report <folder>` writes the same as one HTML page.

# %%
# %matplotlib inline
import os

from IPython.display import Markdown, display

from lrk.reporting import (
    by_dataset,
    dataset_figures,
    dataset_table,
    failed_runs,
    find_summaries,
    load_report_runs,
)

# %% tags=["parameters"]
RUNS = os.environ.get("LRK_RUNS", "../logs/accelerating_lrd/multiruns")  # run, multirun or sweep folders
BY = None  # config keys that define a variant, e.g. ["decomp.name", "decomp.ratio"]; None: the keys that vary

# %%
runs, unreadable = load_report_runs(find_summaries(RUNS.split(os.pathsep)))
datasets = by_dataset(runs)
print(f"{len(runs)} runs of {len(datasets)} dataset(s); unreadable: {unreadable or 'none'}")

# %%
for name, dataset_runs in datasets.items():
    display(Markdown(f"## {name}\n\n" + dataset_table(dataset_runs, BY)))
    for line in failed_runs(dataset_runs):
        print("not completed (not drawn):", line)

# %%
for name, dataset_runs in datasets.items():
    for figure_name, figure in dataset_figures(dataset_runs, BY).items():
        display(Markdown(f"### {name}: {figure_name}"))
        display(figure)
