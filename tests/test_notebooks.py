"""notebooks/: each notebook runs (nbclient, the venv's python3 kernel) on tiny generated runs, its .ipynb is
stored without outputs, and its .ipynb and .py (jupytext percent) hold the same cells."""

from __future__ import annotations

import shutil
from pathlib import Path

import jupytext
import nbformat
import pytest
from nbclient import NotebookClient
from report_fixtures import make_study, real_runs, write_summary  # noqa: F401  (real_runs: a fixture)

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
NAMES = ("compare_methods", "sdrm_paper", "sweep_analysis")


def _cells(nb: nbformat.NotebookNode) -> list[tuple[str, str]]:
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


@pytest.mark.parametrize("name", NAMES)
def test_ipynb_and_py_are_paired_and_the_ipynb_has_no_outputs(name):
    ipynb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    py = jupytext.read(NOTEBOOKS / f"{name}.py")
    assert _cells(ipynb) == _cells(py), f"run: jupytext --sync notebooks/{name}.ipynb"
    assert ipynb.metadata.get("jupytext", {}).get("formats") == "ipynb,py:percent"
    for cell in ipynb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name}.ipynb is stored with outputs"
    assert any("parameters" in c.metadata.get("tags", []) for c in ipynb.cells)


def _execute(name: str, runs: Path, monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Run the notebook with LRK_RUNS=runs; the outputs of every code cell, errors raised."""
    monkeypatch.setenv("LRK_RUNS", str(runs))
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    NotebookClient(
        nb, kernel_name="python3", timeout=180, resources={"metadata": {"path": str(NOTEBOOKS)}}
    ).execute()
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]


def _texts(outputs: list[dict]) -> str:
    parts = []
    for out in outputs:
        parts.append(out.get("text", ""))
        data = out.get("data", {})
        parts.append(data.get("text/markdown", "") + data.get("text/plain", "") + data.get("text/html", ""))
    return "\n".join(parts)


def _images(outputs: list[dict]) -> int:
    return sum("image/png" in out.get("data", {}) for out in outputs)


def test_compare_methods_runs_on_real_runs(real_runs, tmp_path, monkeypatch):  # noqa: F811
    runs = tmp_path / "multirun"
    shutil.copytree(real_runs, runs)
    write_summary(runs / "9", "svd", 9, {"test/acc": 0.0}, status="failed")
    outputs = _execute("compare_methods", runs, monkeypatch)
    text = _texts(outputs)
    assert "4 runs of 1 dataset(s)" in text and "| svd | 2 |" in text and "| none | 1 |" in text
    assert "not completed (not drawn):" in text
    assert _images(outputs) == 7  # acc vs params/FLOPs/latency, rank map, phase time, recall, confusion


def test_sdrm_paper_names_the_variants_and_compares_to_nrr(tmp_path, monkeypatch):
    variants = [("none", False, 0.75, 0.0), ("none", True, 0.74, 0.0), ("sdrm", False, 0.76, 50.0)]
    for decomp, distilled, acc, rr in variants:
        for seed in (1, 2):
            write_summary(
                tmp_path / f"{decomp}{distilled}{seed}",
                decomp,
                seed,
                {"test/acc": acc + seed / 100, "time/rr_s": rr, "time/train_s": 100.0, "model/params": 8e5},
                backbone={"name": "vit_edge", "distilled": distilled},
            )
    outputs = _execute("sdrm_paper", tmp_path, monkeypatch)
    text = _texts(outputs)
    assert "| NRR | 2 |" in text and "| DeiT-style | 2 |" in text
    assert "| SDRM | 2 | 0.775 ± 0.007 (×1.01)" in text  # mean of 0.77 and 0.78, ratio to NRR's 0.765
    assert _images(outputs) >= 2  # acc vs params, phase time


def test_sweep_analysis_shows_the_study(tmp_path, monkeypatch):
    storage = make_study(tmp_path / "study.db", "rank_svd-synthetic", objectives=1)
    sweep = tmp_path / "sweep"
    for k in range(3):
        write_summary(
            sweep / str(k),
            "svd",
            0,
            {"test/acc": 0.6 + k / 10, "model/params": 100.0 * (k + 1)},
            optuna={"trial": k, "study": "rank_svd-synthetic", "storage": storage},
            ratio=0.1 * (k + 1),
        )
    (sweep / "optimization_results.yaml").write_text(f"study_name: rank_svd-synthetic\nstorage: {storage}\n")
    outputs = _execute("sweep_analysis", sweep, monkeypatch)
    text = _texts(outputs)
    assert (
        "## rank_svd-synthetic\n\nbest 5 of 6 completed trials" in text
        and "| trial | val/acc_best | kind | x |" in text
    )
    assert "### history" in text and "### importances" in text
    assert "| ratio=0.1 | 1 | 0.600 |" in text  # the trials differ by decomp.ratio only
    assert _images(outputs) >= 3  # history, importances, acc vs params
