"""``python -m lrk.wandb_dashboard --entity E --project P``: a W&B workspace for lrk's metric vocabulary (issue 13).

Built with the ``wandb-workspaces`` package (``wandb_workspaces.workspaces`` for the view,
``wandb_workspaces.reports.v2`` for the panels) from the names lrk logs (design.md, "Metrics"; the run attributes
of :mod:`lrk.wandb_run`). Runs are grouped by W&B group (the experiment, or the sweep's study) and job type (the
decomposition). Sections:

- **Accuracy vs compression**: scatter plots of ``test/acc`` / ``test/bal_acc`` against ``model/compression``,
  ``model/params``, ``model/flops`` and ``time/infer_ms`` (summaries: one point per run);
- **Where the time goes**: bars of the phase times ``time/rr_s``, ``time/mha_s``, ``time/train_s``,
  ``time/val_s`` per run, and inference ``time/infer_ms``;
- **Learning**: ``val/acc``, ``val/bal_acc``, ``train/loss``, ``val/loss`` against Lightning's
  ``trainer/global_step``;
- **Search: <name>** for every ``conf/hparams_search/<name>.yaml`` (or those given with ``--search``): a
  parallel-coordinates panel over the keys its ``hydra.sweeper.params`` search (``interval``, ``range``,
  ``choice``, ``tag(log, ...)`` - log scale - or a comma list; fixed values are left out) as the runs' flattened
  config keys (``decomp.energy`` -> ``decomp/energy``, as :mod:`lrk.wandb_run` logs them; a group choice such as
  ``decomp: choice(svd, tucker)`` -> ``decomp/name``), followed by the search's
  ``optimized_metric`` (every objective) and ``test/acc``.

``--dry-run`` builds the workspace and checks it offline: the view model W&B would receive is serialised to JSON
and parsed back into a workspace with the same sections and panels; the JSON is printed (or written to ``--out``).
Without ``--dry-run`` the workspace is saved to W&B: that needs the network and a W&B login (``wandb login`` or
``WANDB_API_KEY``); the URL of the new view is printed. Bad input (no entity or project, an unknown search) is one
``lrk: error:`` line, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from lrk.errors import LrkConfigError

CONF = Path(__file__).resolve().parent.parent / "conf"
SEARCH_DIR = CONF / "hparams_search"

#: (x, y) summary pairs of the accuracy-vs-compression scatter plots
SCATTERS = [
    ("model/compression", "test/acc"),
    ("model/params", "test/bal_acc"),
    ("model/flops", "test/acc"),
    ("time/infer_ms", "test/acc"),
]
PHASES = ["time/rr_s", "time/mha_s", "time/train_s", "time/val_s"]
CURVES = [["val/acc", "val/bal_acc"], ["train/loss", "val/loss"]]
STEP = "trainer/global_step"
_SEARCHED = re.compile(r"^\s*(interval|range|choice|tag|glob)\s*\(")


def searched_keys(search: str | Path) -> dict[str, bool]:
    """The config keys an hparams_search yaml searches: ``hydra.sweeper.params`` entries whose value is a sweep
    (``interval(...)``, ``range(...)``, ``choice(...)``, ``tag(...)``, or a comma list), as flattened run config keys
    (``decomp.energy`` -> ``decomp/energy``; a config group's choice, ``decomp: choice(svd, tucker)``, ->
    ``decomp/name``) -> whether it is searched on a log scale (``tag(log, ...)``). ``search``:
    a file, or a name in conf/hparams_search."""
    path = _search_path(search)
    node = OmegaConf.load(path)
    params = OmegaConf.select(node, "hydra.sweeper.params")
    if params is None:
        raise LrkConfigError(f"{path} has no hydra.sweeper.params: it is not an hparams_search config")
    keys: dict[str, bool] = {}
    for key, value in OmegaConf.to_container(params, resolve=False).items():  # type: ignore[union-attr]
        text = str(value) if value is not None else ""
        if _SEARCHED.match(text) or ("," in text and "(" not in text):
            name = str(key).lstrip("+~")
            if (
                CONF / name
            ).is_dir():  # a config group choice (decomp: choice(svd, tucker)): the node's name key
                name = f"{name}.name"
            keys[name.replace(".", "/")] = bool(re.match(r"^\s*tag\s*\(\s*log\b", text))
    return keys


def optimized_metrics(search: str | Path) -> list[str]:
    """The search's ``optimized_metric`` (every objective of a multi-objective search), ``val/bal_acc`` by default
    (conf/train.yaml)."""
    node = OmegaConf.load(_search_path(search))
    value = node.get("optimized_metric", "val/bal_acc")
    return [str(v) for v in value] if OmegaConf.is_list(value) else [str(value)]


def _search_path(search: str | Path) -> Path:
    path = Path(search)
    if path.suffix in {".yaml", ".yml"} and path.is_file():
        return path
    candidate = SEARCH_DIR / f"{search}.yaml"
    if candidate.is_file():
        return candidate
    known = sorted(p.stem for p in SEARCH_DIR.glob("*.yaml"))
    raise LrkConfigError(
        f"--search {search} is neither a yaml file nor one of conf/hparams_search: {', '.join(known)}"
    )


def build_workspace(entity: str, project: str, name: str = "lrk", searches: list[str] | None = None) -> Any:
    """The :class:`wandb_workspaces.workspaces.Workspace` (module docstring); builds offline, saves nothing.
    ``searches``: hparams_search names or files (default: every conf/hparams_search/*.yaml)."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    for key, value in (("--entity", entity), ("--project", project), ("--name", name)):
        if not value or not str(value).strip():
            raise LrkConfigError(f"{key} is empty: give the W&B {key[2:]} to build the workspace in")
    if searches is None:
        searches = sorted(p.stem for p in SEARCH_DIR.glob("*.yaml"))
    scatter = [
        wr.ScatterPlot(
            title=f"{y} vs {x}", x=wr.SummaryMetric(x), y=wr.SummaryMetric(y), log_x=x != "model/compression"
        )
        for x, y in SCATTERS
    ]
    phases = [
        wr.BarPlot(title="phase times (s)", metrics=PHASES, orientation="v", title_y="seconds"),
        wr.BarPlot(title="inference latency per batch (ms)", metrics=["time/infer_ms"], orientation="v"),
    ]
    curves = [wr.LinePlot(title=" / ".join(ys), x=STEP, y=ys) for ys in CURVES]
    sections = [
        ws.Section(name="Accuracy vs compression", panels=scatter, is_open=True),
        ws.Section(name="Where the time goes", panels=phases, is_open=True),
        ws.Section(name="Learning", panels=curves, is_open=False),
    ]
    for search in searches:
        keys = searched_keys(search)
        metrics = optimized_metrics(search)
        columns = [
            wr.ParallelCoordinatesPlotColumn(metric=wr.Config(k), log=log or None) for k, log in keys.items()
        ]
        for summary in dict.fromkeys([*metrics, "test/acc"]):
            columns.append(wr.ParallelCoordinatesPlotColumn(metric=wr.SummaryMetric(summary)))
        title = Path(search).stem
        sections.append(
            ws.Section(
                name=f"Search: {title}",
                panels=[
                    wr.ParallelCoordinatesPlot(
                        title=f"{title}: searched keys -> {', '.join(metrics)}", columns=columns
                    )
                ],
            )
        )
    return ws.Workspace(
        entity=entity,
        project=project,
        name=name,
        sections=sections,
        runset_settings=ws.RunsetSettings(groupby=[ws.Metric("Group"), ws.Metric("JobType")]),
    )


def workspace_spec(workspace: Any) -> dict[str, Any]:
    """The view model W&B receives on save, as plain JSON data (no network)."""
    return json.loads(workspace._to_model().model_dump_json(by_alias=True))


def check_spec(workspace: Any) -> dict[str, Any]:
    """Serialise ``workspace`` and parse the JSON back (the W&B view model, then a Workspace): raises when the
    round trip loses a section or a panel; returns the spec."""
    import wandb_workspaces.workspaces as ws
    from wandb_workspaces.workspaces import internal

    spec = workspace_spec(workspace)
    back = ws.Workspace._from_model(internal.View.model_validate(spec))
    want = [(s.name, [type(p).__name__ for p in s.panels]) for s in workspace.sections]
    got = [(s.name, [type(p).__name__ for p in s.panels]) for s in back.sections]
    if want != got:
        raise LrkConfigError(f"the workspace spec does not round-trip: built {want}, parsed back {got}")
    return spec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lrk.wandb_dashboard", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--entity", help="W&B entity (user or team)")
    parser.add_argument("--project", help="W&B project the runs are logged to (conf/logger/wandb.yaml: lrk)")
    parser.add_argument("--name", default="lrk", help="name of the workspace view (default lrk)")
    parser.add_argument(
        "--search",
        action="append",
        help="hparams_search name or yaml for a parallel-coordinates panel (repeatable; "
        "default: every conf/hparams_search/*.yaml)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="build and check the spec offline, print its JSON"
    )
    parser.add_argument(
        "--out", type=Path, help="with --dry-run: write the JSON spec here instead of printing it"
    )
    args = parser.parse_args(argv)
    try:
        missing = [f"--{k}" for k in ("entity", "project") if not getattr(args, k)]
        if missing:
            raise LrkConfigError(
                f"{' and '.join(missing)} missing: give the W&B entity and project the workspace belongs to "
                "(e.g. --entity my-team --project lrk)"
            )
        workspace = build_workspace(args.entity, args.project, args.name, args.search)
        spec = check_spec(workspace)
        if args.dry_run:
            text = json.dumps(spec, indent=1)
            if args.out:
                args.out.write_text(text)
                print(f"workspace spec ({len(workspace.sections)} sections) written to {args.out}")
            else:
                print(text)
            return 0
        try:
            saved = workspace.save()
        except Exception as exc:  # network, login, permissions: all from wandb
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise LrkConfigError(
                f"saving the workspace to {args.entity}/{args.project} failed ({type(exc).__name__}: {first[:200]}): "
                "it needs the network and a W&B login (wandb login); --dry-run builds it offline"
            ) from exc
        print(f"workspace saved: {getattr(saved, 'url', '')}")
        return 0
    except LrkConfigError as exc:
        print(f"lrk: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
