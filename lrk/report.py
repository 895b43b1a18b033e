"""``python -m lrk.report <run dirs | multirun dir | sweep dir> [--out DIR] [--force]``: one HTML page of figures.

Finds every summary.json below the given folders and writes ``<out>/index.html`` (self-contained: figures embedded
as PNG) with the figures also as PNG and SVG beside it: the results table of :mod:`lrk.results` (mean +- std over
seeds, with the majority-class row), accuracy against parameters / FLOPs / latency with the Pareto front, the rank
of every layer, the time per phase, per-class recall, confusion matrices and, for a sweep, Optuna's figures of its
study. Runs that did not complete are listed, never drawn; runs of several datasets get one section each.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lrk.errors import LrkConfigError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lrk.report", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "paths", nargs="+", help="run folders, multirun folders, sweep folders or summary.json files"
    )
    parser.add_argument("--out", help="the report's folder (default: <first path>/report)")
    parser.add_argument("--force", action="store_true", help="replace the report in an existing --out folder")
    parser.add_argument(
        "--by", nargs="+", help="config keys that define a variant (default: the keys that vary)"
    )
    parser.add_argument(
        "--metrics", nargs="+", help="the table's columns (default: the usual ones that were logged)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    from lrk.reporting import build_report

    try:
        report = build_report(args.paths, args.out, args.force, args.by, args.metrics, not args.no_progress)
    except LrkConfigError as exc:
        print(f"lrk: error: {exc}", file=sys.stderr)
        return 2
    for note in report.notes:
        print(f"lrk: note: {note}", file=sys.stderr)
    pngs = [p for p in report.figures if p.suffix == ".png"]
    print(f"report: {report.page} ({len(pngs)} figures, PNG and SVG in {report.out})")
    for png in pngs:
        print(f"  {png.stem}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
