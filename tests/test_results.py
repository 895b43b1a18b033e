"""lrk.results: summary.json files grouped into mean +- std tables with ratios to a baseline."""

import json
import statistics

import pytest

from lrk.results import group_runs, load_runs, main, markdown_table


def _write(root, name, decomp, seed, metrics, status="completed"):
    run = root / name
    run.mkdir(parents=True)
    summary = {
        "status": status,
        "error": None if status == "completed" else "boom",
        "metrics": metrics,
        "config": {"decomp": {"name": decomp}, "seed": seed},
    }
    (run / "summary.json").write_text(json.dumps(summary))


@pytest.fixture()
def runs_dir(tmp_path):
    for seed, (acc, mha) in enumerate([(0.80, 2.0), (0.84, 2.2), (0.82, 1.8)]):
        _write(tmp_path, f"dense{seed}", "none", seed, {"test/acc": acc, "time/mha_s": mha})
    for seed, (acc, mha) in enumerate([(0.70, 1.0), (0.74, 1.2)]):
        _write(tmp_path, f"sdrm{seed}", "sdrm", seed, {"test/acc": acc, "time/mha_s": mha})
    _write(tmp_path, "sdrm_failed", "sdrm", 9, {"test/acc": 0.0}, status="failed")
    return tmp_path


def test_groups_average_completed_runs_only(runs_dir):
    groups = {g.key: g for g in group_runs(load_runs([runs_dir]), ["decomp.name"])}
    assert set(groups) == {("none",), ("sdrm",)}
    sdrm = groups[("sdrm",)]
    assert len(sdrm.runs) == 3 and len(sdrm.completed) == 2
    assert sdrm.mean("test/acc") == pytest.approx(0.72)
    assert sdrm.std("test/acc") == pytest.approx(statistics.stdev([0.70, 0.74]))
    assert groups[("none",)].mean("time/mha_s") == pytest.approx(2.0)


def test_table_shows_ratio_to_the_baseline(runs_dir):
    groups = group_runs(load_runs([runs_dir]), ["decomp.name"])[::-1]  # baseline last: the table moves it up
    table = markdown_table(groups, ["test/acc", "time/mha_s"], baseline=("none",), names={("sdrm",): "SDRM"})
    rows = table.splitlines()[2:]
    assert rows[0].startswith("| none |") and rows[1].startswith("| SDRM |")
    sdrm_row = rows[1]
    assert "0.720 ± 0.028" in sdrm_row
    assert f"(×{1.1 / 2.0:.2f})" in sdrm_row  # mean mha 1.1 s vs 2.0 s
    with pytest.raises(ValueError, match="baseline cp"):
        markdown_table(groups, ["test/acc"], baseline=("cp",))


def test_cli_lists_runs_that_did_not_complete(runs_dir, capsys):
    assert main([str(runs_dir), "--by", "decomp.name", "--metrics", "test/acc", "--baseline", "none"]) == 0
    out = capsys.readouterr().out
    assert "not completed: sdrm" in out and "failed: boom" in out
    with pytest.raises(FileNotFoundError, match="neither"):
        load_runs([runs_dir / "missing"])


def test_majority_row_from_the_runs_test_split_share(tmp_path):
    """Test split of 70 good / 30 defective: always 'good' has accuracy 0.7, balanced accuracy 1/2 and macro F1
    (F1 of 'good': precision 0.7, recall 1 -> 2 * 0.7 / 1.7; of 'defective': 0) / 2."""
    import numpy as np
    from sklearn.metrics import balanced_accuracy_score, f1_score

    for seed in range(2):
        _write(tmp_path, f"run{seed}", "none", seed, {"test/acc": 0.8, "test/acc_majority": 0.7})
        summary = json.loads((tmp_path / f"run{seed}" / "summary.json").read_text())
        summary["extra"] = {"data": {"class_names": ["good", "defective"]}}
        (tmp_path / f"run{seed}" / "summary.json").write_text(json.dumps(summary))
    labels, constant = np.array([0] * 70 + [1] * 30), np.zeros(100, dtype=int)
    table = markdown_table(
        group_runs(load_runs([tmp_path]), ["decomp.name"]), ["test/acc", "test/bal_acc", "test/f1"]
    )
    last = table.splitlines()[-1]
    expected = [0.7, balanced_accuracy_score(labels, constant), f1_score(labels, constant, average="macro")]
    assert last == "| majority class | - | " + " | ".join(f"{v:.3f}" for v in expected) + " |"
    plain = markdown_table(group_runs(load_runs([tmp_path]), ["decomp.name"]), ["test/acc"], majority=False)
    assert "majority" not in plain
