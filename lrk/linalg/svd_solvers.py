"""One entry point for the truncated-SVD solvers of :mod:`lrk.linalg.tsvd` and :mod:`lrk.linalg.adamatrix`.

``truncated_svd(Y, rank=r)`` or ``truncated_svd(Y, energy=phi, solver="adamatrix")``: the solvers by name, so that
a config can choose one. It lives apart from both modules because AdaMatrix builds on :mod:`lrk.linalg.tsvd`.
"""

from __future__ import annotations

import torch

from lrk.linalg.adamatrix import adamatrix
from lrk.linalg.tsvd import TruncatedSVD, full_svd, gram_svd, lowrank_svd

SOLVERS = ("gram", "lowrank", "svd", "adamatrix")
_SOLVER_OPTIONS = {
    "gram": {"accumulate"},
    "lowrank": {"oversample", "niter", "generator"},
    "svd": set(),
}


def _check_options(solver: str, options: dict, allowed: set[str]) -> None:
    unknown = sorted(set(options) - allowed)
    if unknown:
        valid = ", ".join(sorted(allowed)) or "none"
        raise ValueError(
            f"solver option {unknown[0]}= is invalid for solver={solver!r}: valid options are {valid}"
        )


def truncated_svd(
    Y: torch.Tensor,
    rank: int | None = None,
    energy: float | None = None,
    solver: str = "gram",
    compute_u: bool = True,
    **solver_options: object,
) -> TruncatedSVD:
    """Rank-r truncated SVD of Y (m x n), Y ≈ U diag(S) V^T, with exactly one of ``rank`` or ``energy`` (phi,
    SDRM Eqs. 2-3). ``solver``: "gram" | "lowrank" | "svd" | "adamatrix"; ``solver_options`` go to that solver
    (gram: accumulate; lowrank: oversample, niter, generator; adamatrix: see :func:`lrk.linalg.adamatrix.adamatrix`).

    ``compute_u=False``: the caller needs V and S only; the result's ``U`` is None for every solver. Only
    ``gram`` saves work by it (no m x r product on tall Y, :func:`lrk.linalg.tsvd.gram_svd`); the other solvers
    form U on their way to V and drop it. Rank, S, V, energy and rel_error are the same as with U.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r} is invalid: it must be one of {', '.join(SOLVERS)}")
    if not isinstance(compute_u, bool):
        raise ValueError(f"compute_u={compute_u!r} is invalid: it must be True or False")
    if solver == "adamatrix":
        result = adamatrix(Y, rank, energy, **solver_options)  # type: ignore[arg-type]
    else:
        _check_options(solver, solver_options, _SOLVER_OPTIONS[solver])
        if solver == "gram":
            return gram_svd(Y, rank, energy, compute_u=compute_u, **solver_options)  # type: ignore[arg-type]
        if solver == "lowrank":
            result = lowrank_svd(Y, rank, energy, **solver_options)  # type: ignore[arg-type]
        else:
            result = full_svd(Y, rank, energy)
    if not compute_u:
        result.U = None
    return result
