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
# # SDRM paper: tables and figures from its runs
#
# The runs of `python train.py -m experiment=sdrm_paper` (experiments/sdrm_paper/README.md): NRR (no rank
# reduction), DeiT-style, SDRM and TRAWL over three seeds. The table is the README's (ratios to NRR); the
# figures are lrk.reporting's: accuracy against parameters and latency, the time per phase (the paper's RR, MHA
# and Val phases, Figs. 6-8), recall per class and the confusion matrices.

# %%
# %matplotlib inline
import os

from IPython.display import Markdown, display

from lrk.reporting import (
    by_dataset,
    dataset_figures,
    failed_runs,
    find_summaries,
    groups_of,
    load_report_runs,
)
from lrk.results import markdown_table

# %% tags=["parameters"]
RUNS = os.environ.get("LRK_RUNS", "../logs/sdrm_paper/multiruns")
BY = ["decomp.name", "backbone.distilled"]
NAMES = {
    ("none", "False"): "NRR",
    ("none", "True"): "DeiT-style",
    ("sdrm", "False"): "SDRM",
    ("trawl", "False"): "TRAWL",
}
METRICS = ["test/acc", "test/bal_acc", "time/rr_s", "time/mha_s", "time/val_s", "time/fit_s", "model/params"]

# %%
runs, unreadable = load_report_runs(find_summaries(RUNS.split(os.pathsep)))
print(f"{len(runs)} runs; unreadable: {unreadable or 'none'}")

# %%
for name, dataset_runs in by_dataset(runs).items():
    groups, names = groups_of(dataset_runs, BY, NAMES)
    baseline = ("none", "False") if any(g.key == ("none", "False") for g in groups) else None
    display(Markdown(f"## {name}\n\n" + markdown_table(groups, METRICS, baseline, names, BY)))
    for line in failed_runs(dataset_runs):
        print("not completed (not drawn):", line)

# %%
for name, dataset_runs in by_dataset(runs).items():
    for figure_name, figure in dataset_figures(dataset_runs, BY, rename=NAMES).items():
        display(Markdown(f"### {name}: {figure_name}"))
        display(figure)
