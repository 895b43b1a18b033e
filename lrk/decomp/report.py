"""The per-layer decomposition report (design.md "The decomposition contract": Report)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lrk.measure import count_params

ROW_KEYS = (
    "name",
    "kind",
    "shape",
    "rank",
    "ranks",
    "params_before",
    "params_after",
    "rel_error",
    "energy",
    "seconds",
    "note",
)

#: ``kind`` of a row whose layer a weight method left dense because no rank choice meets the requested ratio
#: within ``ratio_tolerance`` (rank and ranks null, params_after == params_before, the reason in ``note``)
DENSE_KIND = "dense (ratio unreachable)"


def is_dense_row(row: dict[str, Any]) -> bool:
    """Whether a report row is a layer left dense: its ratio was unreachable (:data:`DENSE_KIND`), or the rank
    search found no decomposed rank faster than the dense layer (``dense (slower decomposed)``)."""
    return str(row.get("kind", "")).startswith("dense (")


def dense_row(name: str, module: Any, kind: str, seconds: float, note: str) -> dict[str, Any]:
    """The row of a layer a method left dense (``kind`` says why, ``note`` how): the keys of every row, rank null,
    ``params_after == params_before`` (counted from the module), no error."""
    params = count_params(module)
    return {
        "name": name,
        "kind": kind,
        "shape": list(module.weight.shape),
        "rank": None,
        "ranks": None,
        "params_before": params,
        "params_after": params,
        "rel_error": 0.0,
        "energy": 1.0,
        "seconds": seconds,
        "note": note,
    }


@dataclass
class DecompReport:
    """One row per decomposed layer.

    Row keys: ``name`` (module name), ``kind`` (e.g. ``svd``, ``tucker2``, ``cp``, ``tt``,
    ``trawl_tucker``), ``shape`` (the dense weight's shape), ``rank`` (a number: the rank, or the mean of
    the ranks of a multi-rank layer), ``ranks`` (all ranks), ``params_before`` / ``params_after``
    (weights and bias of the layer, counted from the modules; a TRAWL layer is charged its share of the
    group's shared factors), ``rel_error`` (||W - W_hat||_F / ||W||_F, W_hat rebuilt from the new module),
    ``energy`` (1 - rel_error^2: the retained energy sum_{i<=r} s_i^2 / sum s_i^2 for SVD and HOSVD-type
    Tucker, the explained fraction of ||W||_F^2 otherwise), ``seconds`` (decomposition time), ``note``
    (None, or how the ranks were found when the plain ratio rule missed the tolerance, or why a layer stayed
    dense).

    A layer a weight method left dense (the requested ratio is unreachable within ``ratio_tolerance``) has
    ``kind`` :data:`DENSE_KIND`, ``rank`` / ``ranks`` null, ``params_after == params_before``, ``rel_error`` 0
    and ``energy`` 1: it counts in the parameter totals and the error mean (it is exact), not in the rank mean;
    ``decomp/layers_dense`` counts such rows.
    """

    method: str
    rows: list[dict[str, Any]] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        """``decomp/*`` metrics and ``time/rr_s``. An empty report (``decomp=none``) gives
        ``time/rr_s`` = 0 and ``decomp/layers`` = 0 and no rank/error keys (there is nothing to average)."""
        out: dict[str, float] = {
            "time/rr_s": float(sum(r["seconds"] for r in self.rows)),
            "decomp/layers": float(len(self.rows)),
        }
        if not self.rows:
            return out
        n = len(self.rows)
        before = sum(r["params_before"] for r in self.rows)
        after = sum(r["params_after"] for r in self.rows)
        ranked = [r["rank"] for r in self.rows if r.get("rank") is not None]
        if ranked:
            out["decomp/rank_mean"] = float(sum(ranked) / len(ranked))
        out.update(
            {
                "decomp/layers_dense": float(sum(is_dense_row(r) for r in self.rows)),
                "decomp/rel_error_mean": float(sum(r["rel_error"] for r in self.rows) / n),
                "decomp/energy": float(sum(r["energy"] for r in self.rows) / n),
                "decomp/params_before": float(before),
                "decomp/params_after": float(after),
                "decomp/layer_compression": float(before / after) if after else float("inf"),
            }
        )
        return out

    def table(self) -> tuple[list[str], list[list[Any]]]:
        """Columns and rows for a CSV / W&B table (lists rendered as 'a x b')."""
        columns = list(ROW_KEYS)
        columns += [k for row in self.rows for k in row if k not in columns]  # e.g. TRAWL's group, group_size
        columns = list(dict.fromkeys(columns))

        def cell(value: Any) -> Any:
            if isinstance(value, (list, tuple)):
                return "x".join(str(v) for v in value)
            return value

        return columns, [[cell(row.get(k)) for k in columns] for row in self.rows]
