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
# # Sweep analysis
#
# An Optuna sweep (`python train.py -m hparams_search=...`): the study in its storage (named by the trials'
# `optuna.study` / `optuna.storage` and by the sweep dir's `optimization_results.yaml`) -> the optimization
# history, the parameter importances, the Pareto front when there are several objectives, the best trials; and
# the trials' runs as one table with accuracy against size.

# %%
# %matplotlib inline
import os

from IPython.display import Markdown, display

from lrk.reporting import (
    dataset_figures,
    dataset_table,
    find_summaries,
    load_report_runs,
    load_study,
    study_figures,
)
from lrk.reporting.sweep import best_trials_table, storage_missing, study_refs

# %% tags=["parameters"]
RUNS = os.environ.get("LRK_RUNS", "../logs/train/multiruns")  # the sweep dir (one folder per trial below it)
TOP = 5  # best trials listed

# %%
roots = RUNS.split(os.pathsep)
runs, unreadable = load_report_runs(find_summaries(roots))
refs = study_refs(runs, roots)
print(f"{len(runs)} trial runs; studies: {refs or 'none'}; unreadable: {unreadable or 'none'}")

# %%
for study_name, storage in refs:
    if storage_missing(storage):
        print(f"study {study_name}: {storage_missing(storage)}")
        continue
    study = load_study(study_name, storage)
    display(Markdown(f"## {study_name}\n\n" + best_trials_table(study, TOP)))
    for figure_name, figure in study_figures(study).items():
        display(Markdown(f"### {figure_name}"))
        display(figure)

# %%
display(Markdown(dataset_table(runs)))
for figure_name in ("acc_vs_params", "acc_vs_flops"):
    figure = dataset_figures(runs).get(figure_name)
    if figure is not None:
        display(figure)
