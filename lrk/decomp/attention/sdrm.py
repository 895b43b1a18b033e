"""``decomp=sdrm``: every ViT attention becomes an :class:`~lrk.layers.attention.sdrm.SDRMAttention` (SDRM,
seeds/sdrm_paper.txt sections 3-4). The computation, and where lrk reads the paper differently, are documented in
:mod:`lrk.layers.attention.sdrm`.

This module is the method: it validates the keys of conf/decomp/sdrm.yaml once (``energy`` phi or ``rank``,
``solver``, ``svd_batch_size``, ``block_size``, ``subspace``, ``head_split``, ``factored``, ``adamatrix``,
``monitor``, ``distributed_heads``), checks what needs the model before anything changes (block size and rank
against the token count T and, for ``head_split=input``, against d/h; with ``distributed_heads`` the process group
and the head count against its world size), fits the frozen basis of
``subspace=calibrated`` on the attention inputs of the calibration batches (their Gram matrices summed, then eigh),
and reports per layer what the rank rule did on the calibration batches. :func:`sdrm_metrics` collects the figures
of the t-SVDs inside the fit's forwards (``time/rr_s``, ``decomp/rank_mean``, ...).

``head_split``: ``projected`` (default) keeps the dense attention's parameters and splits the heads from the
projected Q, K, V after one t-SVD of all d features; ``input`` is the paper's Algorithm 2 / Section 3.2 (X split into
X_i in R^{b x t x d/h}, a t-SVD and W^Q_i, W^K_i, W^V_i of (d/h) x (d/h) per head: 3 d^2 / h qkv weights).
``head_loop`` runs the heads one at a time in the chosen split (with ``projected``: every head on the shared
t-SVD of all d features, the same numbers as the batched heads; it is *not* the paper's input split).
``factored`` (auto | true | false): attention and W^O from the rank-r factors (T^2 r instead of T^2 d/h per head;
auto where r < d/h); same numbers either way. The default split stays ``projected``: the input split is a different
(smaller) model, which drops the off-diagonal qkv blocks of a dense model (see experiments/sdrm_paper/README.md for
its measured accuracy).

``distributed_heads`` (false | true): every SDRM attention spreads its heads over the ranks of the default
``torch.distributed`` process group (section 4: heads on different devices; gloo on CPU, nccl on GPU), all ranks on
the same input: rank k computes heads [k h/W, (k+1) h/W), the per-head outputs are all-gathered and W^O applied on
every rank (:mod:`lrk.layers.attention.distributed`, docs/distributed_heads.md: the bytes each rank sends). The
group must exist before the method is built (``WORLD_SIZE`` > 1 without one is an error); without a group (or with
one rank) the model runs as one process, which is logged. It is model parallelism: it cannot share a group with
data-parallel DDP, whose ranks see different batches.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, ClassVar

import torch
from torch import nn

from lrk.checks import is_fraction, is_int, is_number
from lrk.decomp.attention.base import (
    AttentionSwapMethod,
    collect_attention_inputs,
    run_batches,
    token_count,
)
from lrk.decomp.base import Built, Rows, register_method
from lrk.errors import LrkConfigError
from lrk.layers.attention.dense import AttentionBase
from lrk.layers.attention.distributed import group_ready, valid_world_sizes, world_size
from lrk.layers.attention.sdrm import (
    DEFAULT_BLOCK_BUDGET_MB,
    DEFAULT_SOLVER,
    HEAD_SPLITS,
    SUBSPACES,
    SDRMAttention,
)
from lrk.linalg.adamatrix import PAPER_ENERGY, check_options
from lrk.linalg.svd_solvers import SOLVERS
from lrk.measure import count_params
from lrk.models.utils import attention_modules

log = logging.getLogger(__name__)


# --- checks (the config rules of decomp=sdrm; SDRMAttention only refuses what it cannot run with) ----------
def check_settings(
    energy: float | None,
    rank: int | None,
    solver: str,
    svd_batch_size: int | None,
    block_size: int | str | None,
    subspace: str,
    block_budget_mb: float,
    head_split: str = "projected",
    factored: Any = "auto",
) -> None:
    """Validate SDRM's settings (each bad value -> one :class:`LrkConfigError` naming it and what is valid)."""
    if (energy is None) == (rank is None):
        raise LrkConfigError(
            f"decomp.energy={energy}, decomp.rank={rank} is invalid for decomp=sdrm: set exactly one of "
            "decomp.energy (phi in (0, 1]) or decomp.rank (an integer >= 1)"
        )
    if energy is not None and not is_fraction(energy):
        raise LrkConfigError(
            f"decomp.energy={energy!r} is invalid: phi (the energy retention of Eqs. 2-3) must lie in (0, 1]"
        )
    if rank is not None and not (is_int(rank) and rank >= 1):
        raise LrkConfigError(f"decomp.rank={rank!r} is invalid: it must be an integer >= 1")
    if solver not in SOLVERS:
        raise LrkConfigError(f"decomp.solver={solver!r} is invalid: it must be one of {', '.join(SOLVERS)}")
    if svd_batch_size is not None and not (is_int(svd_batch_size) and svd_batch_size >= 1):
        raise LrkConfigError(
            f"decomp.svd_batch_size={svd_batch_size!r} is invalid: it must be an integer >= 1 (images per "
            "t-SVD chunk) or null (the whole batch)"
        )
    if block_size is not None and block_size != "adaptive" and not (is_int(block_size) and block_size >= 1):
        raise LrkConfigError(
            f"decomp.block_size={block_size!r} is invalid: it must be an integer >= 1 (query tokens per block), "
            "'adaptive' or null (no blocking)"
        )
    if subspace not in SUBSPACES:
        raise LrkConfigError(
            f"decomp.subspace={subspace!r} is invalid: it must be one of {', '.join(SUBSPACES)}"
        )
    if head_split not in HEAD_SPLITS:
        raise LrkConfigError(
            f"decomp.head_split={head_split!r} is invalid: it must be one of {', '.join(HEAD_SPLITS)} (projected: "
            "heads split from the projected Q, K, V; input: the paper's per-head split of the input features)"
        )
    if not (factored == "auto" or isinstance(factored, bool)):
        raise LrkConfigError(
            f"decomp.factored={factored!r} is invalid: it must be auto, true or false (attention from the rank-r "
            "factors: auto = where r + 1 < d/h)"
        )
    if not (is_number(block_budget_mb) and block_budget_mb > 0):
        raise LrkConfigError(
            f"decomp.block_budget_mb={block_budget_mb!r} is invalid: it must be a positive number"
        )


def check_heads(name: str, dim: int, heads: int, rank: int | None) -> None:
    """head_split=input: d must split into h heads of d/h input features, and a fixed rank fit d/h."""
    if dim % heads:
        valid = [h for h in range(1, dim + 1) if dim % h == 0]
        raise LrkConfigError(
            f"decomp.head_split=input is invalid for '{name}': its dim d={dim} does not divide into num_heads "
            f"h={heads} heads of d/h input features (head counts that divide d={dim}: {valid}); or use "
            "decomp.head_split=projected"
        )
    if rank is not None and rank > dim // heads:
        raise LrkConfigError(
            f"decomp.rank={rank} is invalid for decomp.head_split=input on '{name}': every head's t-SVD has "
            f"d/h = {dim // heads} features, so use a rank in [1, {dim // heads}]"
        )


def check_tokens(
    block_size: int | str | None, rank: int | None, svd_batch_size: int | None, tokens: int | None, dim: int
) -> None:
    """Checks that need the model: block_size <= T, and rank <= min(svd_batch_size * T, d) (rank <= d when the
    token count T is unknown before the first forward)."""
    if tokens is not None and is_int(block_size) and block_size > tokens:  # type: ignore[operator]
        raise LrkConfigError(
            f"decomp.block_size={block_size} is invalid for this model: it must lie in [1, {tokens}] "
            f"(the attention modules see T={tokens} tokens per image), or be 'adaptive' or null"
        )
    if rank is not None:
        if tokens is None:
            limit = dim
        else:
            limit = dim if svd_batch_size is None else min(svd_batch_size * tokens, dim)
        if rank > limit:
            where = f"d={dim}" if limit == dim else f"svd_batch_size * T = {svd_batch_size} * {tokens}"
            raise LrkConfigError(
                f"decomp.rank={rank} is invalid for this model: the t-SVD of Y = reshape(X, (b t, d)) has at "
                f"most min(b t, d) = {limit} components ({where}); use a rank in [1, {limit}]"
            )


def check_process_group() -> int:
    """``distributed_heads=true``: the world size W of the default process group (1 without one). WORLD_SIZE > 1
    in the environment without an initialised group is an error (the ranks would each run all heads alone)."""
    if group_ready():
        return world_size()
    env = os.environ.get("WORLD_SIZE", "1").strip() or "1"
    launched = int(env) if env.isdigit() else None
    if launched is None or launched > 1:
        raise LrkConfigError(
            f"decomp.distributed_heads=true is invalid here: WORLD_SIZE={env} but no torch.distributed process "
            "group is initialised; call torch.distributed.init_process_group (gloo on CPU, nccl on GPU) before "
            "decomp=sdrm is built, or run one process (WORLD_SIZE unset or 1)"
        )
    return 1


def check_world(name: str, heads: int, world: int) -> None:
    """``distributed_heads=true``: the world size must split the module's heads evenly."""
    if heads % world:
        raise LrkConfigError(
            f"decomp.distributed_heads=true is invalid for '{name}' on a process group of world size {world}: its "
            f"h={heads} heads do not split evenly over {world} ranks; valid world sizes (the divisors of h): "
            f"{valid_world_sizes(heads)}"
        )


def check_adamatrix(options: Any, rank: int | None, energy: float | None) -> dict[str, Any]:
    """``decomp.adamatrix``: a mapping of AdaMatrix options (null values = the variant's default), validated by
    :func:`lrk.linalg.adamatrix.check_options` without building a solver. Returns the options to pass on."""
    if not isinstance(options, dict):
        raise LrkConfigError(
            f"decomp.adamatrix={options!r} is invalid: it must be a mapping of AdaMatrix options"
        )
    options = {k: v for k, v in options.items() if v is not None}  # null = the variant's default
    for key in ("lambdas", "betas"):
        if key in options and isinstance(options[key], (list, tuple)):
            options[key] = tuple(options[key])
    try:
        check_options(rank=rank, energy=None if rank is not None else energy, **options)
    except (TypeError, ValueError) as exc:
        raise LrkConfigError(f"decomp.adamatrix={options} is invalid: {exc}") from exc
    return options


# --- collecting the figures of a run ---------------------------------------------------------------------
def sdrm_modules(model: nn.Module) -> list[tuple[str, SDRMAttention]]:
    """Every SDRM attention module of ``model`` with its name."""
    return attention_modules(model, SDRMAttention)


def reset_sdrm_stats(model: nn.Module) -> None:
    """Zero the statistics of every SDRM module (e.g. before a fit, so that the figures cover the fit only)."""
    for _, module in sdrm_modules(model):
        module.stats.reset()


def sdrm_metrics(model: nn.Module) -> dict[str, float]:
    """SDRM's figures summed/averaged over the SDRM modules of ``model`` since apply (or the last reset).

    ``time/rr_s``: factorization seconds inside forwards + calibration seconds in apply (SDRM's RR phase);
    ``time/rr_forward_s``: the part inside forwards (inside PhaseTimer's ``time/mha_s``: the paper's MHA phase is
    ``time/mha_s - time/rr_forward_s`` over the same forwards);
    ``time/sdrm_attention_s``: wall time of the SDRM forwards (the t-SVD included); ``decomp/rank_mean``,
    ``decomp/cr`` (Theorem 1): means over all factorizations (one per chunk per forward and layer);
    ``decomp/energy``, ``decomp/rel_error_mean``: means over the factorizations that measured them (every
    batch-mode t-SVD; a calibrated basis only with ``monitor: true``, otherwise they are left out and the
    report's figures, measured on the calibration batches at apply, stand); ``decomp/adamatrix_iterations_mean`` and
    ``decomp/adamatrix_rel_error`` (the last factorization's relative error, averaged over layers) with
    solver=adamatrix; ``decomp/fallbacks`` (AdaMatrix diverged -> gram), ``decomp/rank_clamped``,
    ``decomp/factorizations``, ``decomp/block_size`` (mean last block size). {} without SDRM modules; the
    averages are left out while nothing has been factorized (no NaN).
    """
    modules = [m for _, m in sdrm_modules(model)]
    if not modules:
        return {}
    stats = [m.stats for m in modules]
    n = sum(s.factorizations for s in stats)
    out: dict[str, float] = {
        "time/rr_s": float(sum(s.rr_seconds + s.fit_seconds for s in stats)),
        "time/rr_forward_s": float(sum(s.rr_seconds for s in stats)),
        "time/sdrm_attention_s": float(sum(s.forward_seconds for s in stats)),
        "decomp/factorizations": float(n),
        "decomp/fallbacks": float(sum(s.fallbacks for s in stats)),
        "decomp/rank_clamped": float(sum(s.clamped for s in stats)),
    }
    if n:
        out["decomp/rank_mean"] = sum(s.rank_sum for s in stats) / n
        out["decomp/cr"] = sum(s.cr_sum for s in stats) / n
    measured = sum(s.measured for s in stats)
    # batch mode always; a calibrated basis with monitor=True only (otherwise the report's figures stand)
    if measured:
        out["decomp/energy"] = sum(s.energy_sum for s in stats) / measured
        out["decomp/rel_error_mean"] = sum(s.rel_error_sum for s in stats) / measured
    ada = [
        m.stats
        for m in modules
        if m.solver == "adamatrix" and m.subspace == "batch" and m.stats.factorizations
    ]
    if ada:
        out["decomp/adamatrix_iterations_mean"] = sum(s.iterations_sum for s in ada) / sum(
            s.factorizations for s in ada
        )
        out["decomp/adamatrix_rel_error"] = sum(float(s.last_rel_error or 0.0) for s in ada) / len(ada)
    blocks = [s.last_block for s in stats if s.forwards]
    if blocks:
        out["decomp/block_size"] = float(sum(blocks) / len(blocks))
    return out


# --- the method ---------------------------------------------------------------------------------------------
@register_method("sdrm")
class SDRMMethod(AttentionSwapMethod):
    """``decomp=sdrm``: every attention module (or those matching ``targets``, minus ``skip``) becomes an
    :class:`SDRMAttention` with the same weights. Keys (conf/decomp/sdrm.yaml): ``energy`` (phi) or ``rank``
    (``default_energy`` applies when both are null), ``solver``, ``svd_batch_size``, ``block_size``,
    ``block_keys``, ``block_budget_mb``, ``subspace``, ``head_split``, ``head_loop``, ``factored``, ``monitor`` (a calibrated
    basis's per-forward energy; default false), ``adamatrix`` (options of
    :class:`~lrk.linalg.adamatrix.AdaMatrixSolver`, validated by :func:`~lrk.linalg.adamatrix.check_options`
    without building one), plus the common ``stage``, ``calibration_batches`` ... Every config rule is checked
    here, once: in the constructor, and those that need the model in :meth:`prepare`, before anything changes.
    """

    supported = "the attention modules (lrk.models.AttentionBase) of a ViT/DeiT backbone"
    extra_keys: ClassVar[dict[str, Any]] = {
        "default_energy": PAPER_ENERGY,
        "solver": DEFAULT_SOLVER,
        "svd_batch_size": 16,
        "block_size": None,
        "block_keys": False,
        "block_budget_mb": DEFAULT_BLOCK_BUDGET_MB,
        "subspace": "batch",
        "head_loop": False,
        "head_split": "projected",
        "factored": "auto",
        "monitor": False,
        "distributed_heads": False,
        "adamatrix": {},
    }
    generic_cases: ClassVar[dict[str, Any]] = {  # tests/test_methods_generic.py
        "exact": {"energy": 1.0, "svd_batch_size": 1},
        "lossy": {"rank": 1},
        "invalid": [
            {"ratio": 0.5},
            {"rank": 10_000},
            {"solver": "qr"},
            {"subspace": "calibrated", "calibration_batches": 0},
            {"targets": ["blocks.*.mlp"]},
            {"head_split": "output"},
            {"factored": "maybe"},
            {"distributed_heads": "yes"},
        ],
    }

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        c = self.cfg
        if c["ratio"] is not None:
            raise LrkConfigError(
                f"decomp.ratio={c['ratio']} is invalid for decomp=sdrm: SDRM reduces the rank of activations, "
                "not weights; set decomp.energy (phi) or decomp.rank"
            )
        energy, rank = c["energy"], c["rank"]
        if energy is None and rank is None:
            energy = c["default_energy"]
        check_settings(
            energy,
            rank,
            c["solver"],
            c["svd_batch_size"],
            c["block_size"],
            c["subspace"],
            c["block_budget_mb"],
            c["head_split"],
            c["factored"],
        )
        for key in ("block_keys", "head_loop", "monitor", "distributed_heads"):
            if not isinstance(c[key], bool):
                raise LrkConfigError(f"decomp.{key}={c[key]!r} is invalid: it must be true or false")
        options = check_adamatrix(c["adamatrix"] or {}, rank, energy)
        if c["subspace"] == "calibrated" and c["calibration_batches"] == 0:
            raise LrkConfigError(
                "decomp.calibration_batches=0 is invalid for decomp.subspace=calibrated: the basis is fitted on "
                "calibration batches; use >= 1"
            )
        self.settings: dict[str, Any] = {
            "energy": None if rank is not None else float(energy),
            "rank": rank,
            "solver": c["solver"],
            "svd_batch_size": c["svd_batch_size"],
            "block_size": c["block_size"],
            "block_keys": c["block_keys"],
            "block_budget_mb": float(c["block_budget_mb"]),
            "subspace": c["subspace"],
            "head_loop": c["head_loop"],
            "head_split": c["head_split"],
            "factored": c["factored"],
            "monitor": c["monitor"],
            "distributed_heads": c["distributed_heads"],
            "adamatrix": options,
        }
        if c["distributed_heads"]:
            check_process_group()  # before anything trains (stage=post trains the dense model first)

    def prepare(
        self, model: nn.Module, targets: list[tuple[str, AttentionBase]], batches: list[Any]
    ) -> dict[str, Any]:
        """Token-count checks; for ``subspace=calibrated`` the Gram matrices of every target's calibration inputs."""
        s = self.settings
        tokens = token_count(model)
        for (
            name,
            module,
        ) in targets:  # without a known T: rank <= d here, block_size <= T at the first forward
            if s["head_split"] == "input":
                check_heads(name, module.dim, module.num_heads, s["rank"])
            check_tokens(s["block_size"], s["rank"], s["svd_batch_size"], tokens, module.dim)
        if s["distributed_heads"]:
            world = check_process_group()
            for name, module in targets:
                check_world(name, module.num_heads, world)
            if world == 1:
                log.info(
                    "decomp.distributed_heads=true without a process group of more than one rank: every SDRM "
                    "attention runs all its heads in this one process"
                )
            else:
                log.info(
                    "decomp.distributed_heads=true: %d SDRM attention modules spread their heads over %d ranks "
                    "(this is rank %d)",
                    len(targets),
                    world,
                    torch.distributed.get_rank(),
                )
        context: dict[str, Any] = {"grams": {}, "tokens": {}, "seconds": {}}
        if s["subspace"] != "calibrated":
            return context
        if not batches:
            raise LrkConfigError(
                "decomp.subspace=calibrated needs calibration batches (decomp.calibration_batches >= 1), got none"
            )
        if self.stage == "init":
            log.warning(
                "decomp=sdrm subspace=calibrated with stage=init: the basis is fitted to the untrained model's "
                "attention inputs and stays frozen while the weights train; stage=post fits it to a trained model"
            )
        grams, counts, seconds = context["grams"], context["tokens"], context["seconds"]

        def accumulate(name: str, x: torch.Tensor) -> None:
            start = time.perf_counter()
            Y = x.reshape(-1, x.shape[-1]).double()
            if name in grams:
                grams[name] += Y.T @ Y
            else:
                grams[name] = Y.T @ Y
            counts[name] = counts.get(name, 0) + Y.shape[0]
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start

        collect_attention_inputs(model, [n for n, _ in targets], batches, accumulate)
        for name, module in targets:  # a fixed rank must fit what the calibration tokens hold
            limit = min(counts.get(name, 0), module.dim)
            if s["rank"] is not None and s["rank"] > limit:
                raise LrkConfigError(
                    f"decomp.rank={s['rank']} is invalid: the calibration tokens of '{name}' "
                    f"({counts.get(name, 0)} x {module.dim}) have at most {limit} components"
                )
        return context

    def build_module(self, name: str, module: AttentionBase, context: dict[str, Any]) -> SDRMAttention:
        new = SDRMAttention.from_attention(module, **self.settings, layer_name=name)
        if name in context["grams"]:
            new.fit_basis(context["grams"][name], context["tokens"][name])
            new.stats.fit_seconds += context["seconds"][name]
        return new

    def runtime_metrics(self, model: nn.Module) -> dict[str, float]:
        """:func:`sdrm_metrics`: the t-SVDs inside the fit's forwards (``time/rr_s``, ranks, energy, CR)."""
        return sdrm_metrics(model)

    def finish(self, model: nn.Module, built: Built, batches: list[Any], context: dict[str, Any]) -> Rows:
        """One row per swapped module: what the rank rule did on the calibration batches (their t-SVDs with the
        configured solver and chunks, or the calibrated basis). The run statistics then start from zero; the
        calibration time stays in ``stats.fit_seconds`` (part of ``time/rr_s``)."""
        calibrated = self.settings["subspace"] == "calibrated"
        if batches and not calibrated:
            run_batches(model, batches)  # run them through the SDRM modules
        rows = []
        tokens = token_count(model)
        for name, old, new in built:
            assert isinstance(new, SDRMAttention)
            st = new.stats
            n = st.factorizations
            kind = f"sdrm_{self.settings['subspace']}" + ("_input" if new.head_split == "input" else "")
            if calibrated:  # the frozen basis, fitted on all calibration tokens (input split: mean head rank)
                rank, energy = float(new.basis_rank.double().mean()), float(new.basis_energy)
                rel = math.sqrt(max(1.0 - energy, 0.0))
            elif n:  # the rank rule on the calibration batches' t-SVDs (each measures its energy and error)
                rank = st.rank_sum / n
                energy, rel = st.energy_sum / st.measured, st.rel_error_sum / st.measured
            else:  # no calibration batch: the bounds the configuration promises (rank <= r or d, energy >= phi)
                kind += "_bounds"
                width = new.dim if new.head_split == "projected" else new.head_dim
                rank = float(new.rank if new.rank is not None else width)
                energy = float(new.energy) if new.energy is not None else 0.0
                rel = math.sqrt(max(1.0 - energy, 0.0))
            rows.append(
                {
                    "name": name,
                    "kind": kind,
                    "shape": [tokens or 0, new.dim],
                    "rank": float(rank),
                    "ranks": [round(rank)],
                    "params_before": count_params(old),
                    "params_after": count_params(new),
                    "rel_error": float(rel),
                    "energy": float(energy),
                    "seconds": float(st.rr_seconds + st.fit_seconds),
                }
            )
            fit = st.fit_seconds + st.rr_seconds
            st.reset()
            st.fit_seconds = fit
        return rows
