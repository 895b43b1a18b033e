"""Smoke test of the benchmark scripts (design.md: each prints a readable table, has ``--quick``, and ends with one
line of JSON): every ``benchmarks/*.py`` except the helper modules starting with ``_`` runs with ``--quick`` in a
subprocess, exits 0, and the last line of its stdout parses as a JSON object.

Which scripts run in the default ``pytest`` run comes from QUICK_SECONDS, the measured wall time of ``--quick``
on the shared 2-core machine (2026-12, the largest of two runs through this test with other jobs beside it; one
script took 21 s once under load and 2.3 s alone, which shows the noise): those over SLOW_AFTER seconds are
marked ``slow`` (``pytest -m slow tests/test_benchmarks.py``). The fast ones together add ~50 s to the default
run. A script not in the table has not been measured and runs in the default run until someone measures it and
adds it here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = sorted(p for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_"))

#: measured seconds of ``python benchmarks/<name>.py --quick`` (2 shared cores)
QUICK_SECONDS = {
    "accelerating_lrd": 16,
    "attention_variants": 11,
    "branched_tucker": 19,
    "callback_overhead": 8,
    "factorized_layers": 58,
    "freeze_merge": 10,
    "lrd_2x_counts": 16,
    "model_flops": 5,
    "rank_search_curve": 8,
    "sdrm_attention": 26,
    "export_latency": 49,
    "sdrm_distributed": 22,
    "sdrm_phases": 15,
    "tsvd": 3,
}
SLOW_AFTER = 20
TIMEOUT_S = 600


def _param(path: Path):
    seconds = QUICK_SECONDS.get(path.stem)
    marks = [pytest.mark.slow] if seconds is not None and seconds > SLOW_AFTER else []
    return pytest.param(path, marks=marks, id=path.stem)


def test_the_table_names_existing_scripts() -> None:
    assert SCRIPTS, f"no benchmark scripts found in {BENCHMARKS}"
    stale = sorted(set(QUICK_SECONDS) - {p.stem for p in SCRIPTS})
    assert not stale, f"QUICK_SECONDS names scripts that are gone: {stale}"
    assert any(QUICK_SECONDS.get(p.stem, 0) <= SLOW_AFTER for p in SCRIPTS)  # some run by default


@pytest.mark.parametrize("script", [_param(p) for p in SCRIPTS])
def test_quick_run_ends_with_one_line_of_json(script: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(script), "--quick"],
        cwd=BENCHMARKS.parent,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert done.returncode == 0, f"{script.name} --quick exited {done.returncode}:\n{done.stderr[-3000:]}"
    lines = done.stdout.rstrip("\n").splitlines()
    assert lines, f"{script.name} --quick printed nothing"
    try:
        result = json.loads(lines[-1])
    except json.JSONDecodeError as exc:
        pytest.fail(f"the last stdout line of {script.name} --quick is not JSON ({exc}): {lines[-1][:300]!r}")
    assert isinstance(result, dict) and result, f"{script.name}: the JSON line is not a non-empty object"
