"""``decomp=svd_train``: SVD training (seeds/svd_training_abstract.txt, Yang et al. 2020).

"SVD training first decomposes each layer into the form of its full-rank SVD, then performs training directly on the
decomposed weights [...] orthogonality regularization [...] sparsity-inducing regularizers on the singular values
[...] Singular value pruning is applied at the end to explicitly reach a low-rank model."

This method does the two model changes; the schedule ``svd_train`` (:mod:`lrk.pipeline.svd_train`) orders them
with the regularised fit and the fine-tuning:

1. :meth:`SVDTrainMethod.apply` (the decomposition contract): every target Linear / Conv2d becomes its SVD form
   ``U diag(s) V^T`` (:mod:`lrk.layers.svd_train`; convolutions ``decomposition: channel`` [S x C k k] or
   ``spatial`` [S k x C k]) from the thin SVD of its current weights, at full rank by default (rank, ratio and energy
   null), so the model computes what it computed. ``stage=post``: the weights of the trained dense model.
   ``stage=init``: the SVD of the freshly initialised dense weights, so the product U diag(s) V^T starts with the
   backbone's own initialisation distribution (U and V orthonormal, s the spectrum of the random init). Setting one
   of rank / ratio / energy starts from a truncated SVD instead (an lrk option, not in the paper).
2. :meth:`SVDTrainMethod.prune` (after the regularised fit): per layer, the singular values by decreasing |s_i|,
   kept by ``prune_energy`` phi (the shared energy rule: smallest r with sum_{i<=r} s_i^2 >= phi sum s_i^2, on the
   trained s, not on a fresh SVD: U and V are only near-orthonormal) or ``prune_ratio`` (the fraction of the dense
   layer's parameters the pruned layer keeps, as ``decomp.ratio``, within ``ratio_tolerance``; a layer that cannot
   reach it is folded back to its dense module and reported ``dense (ratio unreachable)``). The layer becomes the
   two-factor layer at that rank (sqrt(|s|) split onto both factors, the sign on U's side): ``SVDLinear``,
   ``SVDConv2d`` (channel) or ``SpatialSVDConv2d`` (spatial). As we read the full paper (arXiv:2004.09031, not in
   the seeds) its threshold is stated as the energy *removed*; lrk's phi is the energy *kept* (phi = 1 - e).

Report rows after pruning: ``rank_full`` (rank of the SVD form) and ``rank`` / ``ranks`` (after pruning),
``params_before`` (the dense layer), ``params_full`` (the SVD form), ``params_after`` (the pruned layer, counted from
the module), ``rel_error`` = ||W_full - W_pruned||_F / ||W_full||_F against the *trained* SVD-form weight (the dense
weight it started from is no reference after training), ``energy`` = 1 - rel_error^2, ``s_energy`` the fraction of
sum s_i^2 kept (what the rule read), ``seconds`` (decomposition + pruning).
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

import torch
from torch import nn

from lrk.checks import is_fraction, is_int, is_number
from lrk.decomp.base import register_method
from lrk.decomp.rank.policy import POLICY_KEYS, RankPolicy, RankProblem, Ranks
from lrk.decomp.report import DENSE_KIND, DecompReport
from lrk.decomp.weight.base import WeightMethod
from lrk.decomp.weight.svd import conv_support_error
from lrk.errors import LrkConfigError
from lrk.layers.base import FactorizedLayer, describe
from lrk.layers.svd_train import DECOMPOSITIONS, SVDTrainConv2d, SVDTrainLinear, _SVDTrainBase
from lrk.linalg.rank import retained_energy
from lrk.measure import count_params
from lrk.models.utils import replace_module

SCHEDULE = "svd_train"
SPARSITY_KINDS = ("l1", "hoyer", "hoyer_square")


class _FullRank:
    """The rank selector of the default (rank, ratio and energy null): every layer at its full rank."""

    def select(self, problem: RankProblem) -> Ranks:
        return tuple(problem.limits)


def _matrix_shape(module: nn.Module, decomposition: str) -> tuple[int, int]:
    """(m, n) of the matricized weight: out x in (Linear, channel) or (S kw) x (C kh) (spatial)."""
    w = module.weight
    if isinstance(module, nn.Linear) or decomposition == "channel":
        return int(w.shape[0]), int(w[0].numel())
    s, c, kh, kw = w.shape
    return int(s * kw), int(c * kh)


def _problem(
    name: str, description: str, m: int, n: int, bias: int, params, dense_params: int, spectra, kind: str
) -> RankProblem:
    limit = min(m, n)
    return RankProblem(
        layer=name,
        description=description,
        limits=(limit,),
        scalar_limit=limit,
        from_scalar=lambda r: (r,),
        params=params,
        dense_params=dense_params,
        spectra=spectra,
        ratio_guess=lambda ratio: (ratio * dense_params - bias) / (m + n),
        notes={"kind": kind},
    )


@register_method("svd_train")
class SVDTrainMethod(WeightMethod):
    """SVD training: full-rank SVD form, then (schedule ``svd_train``) regularised fit, pruning, fine-tuning."""

    supported = (
        "Linear and Conv2d with groups=1 (a kernel matricized as out x (in k k), decomposition=channel, or "
        "(out k) x (in k), decomposition=spatial)"
    )
    extra_keys: ClassVar[dict[str, Any]] = {
        "decomposition": "channel",
        "orth_weight": 0.01,
        "sparsity_weight": 0.001,
        "sparsity": "hoyer",
        "prune_energy": None,
        "prune_ratio": None,
        "default_prune_energy": 0.9,
        "train_epochs": None,
    }
    generic_cases: ClassVar[dict[str, Any]] = {  # tests/test_methods_generic.py
        "exact": {"decomposition": "spatial"},  # full rank (the default): the SVD form equals the dense layer
        "lossy": {"rank": 1},
        "invalid": [
            {"orth_weight": -0.1},
            {"sparsity_weight": "a lot"},
            {"prune_energy": 1.5},
            {"prune_energy": 0.9, "prune_ratio": 0.5},
            {"sparsity": "l2"},
            {"decomposition": "depthwise"},
            {"schedule": "one_shot"},
            {"train_epochs": -1},
            {"rank": 10_000},
        ],
    }

    def __init__(self, cfg: Any) -> None:
        values = dict(cfg)
        schedule = values.get("schedule", SCHEDULE)
        if schedule != SCHEDULE:
            raise LrkConfigError(
                f"decomp.schedule={schedule!r} is invalid for decomp=svd_train: its schedule is {SCHEDULE!r} "
                "(full-rank SVD form, regularised fit, pruning, fine-tuning; lrk/pipeline/svd_train.py)"
            )
        values["schedule"] = SCHEDULE
        # rank, ratio and energy all null: the SVD form at full rank (the paper); a placeholder policy for the base
        self.full_rank = all(values.get(k) is None for k in (*POLICY_KEYS, "default_ratio"))
        if self.full_rank:
            values["energy"] = 1.0
        super().__init__(values)
        if self.rank_search is not None:
            raise LrkConfigError(
                f"decomp.rank_search={self.cfg['rank_search']!r} is invalid for decomp=svd_train: it must be none "
                "(the ranks come from pruning the trained singular values)"
            )
        cfg = self.cfg
        if cfg.get("rank_selector", "policy") not in (None, "policy"):
            raise LrkConfigError(
                f"decomp.rank_selector={cfg['rank_selector']!r} is invalid for decomp=svd_train: it must be policy "
                "(the SVD form starts at full rank, or at rank / ratio / energy; pruning sets the final ranks)"
            )
        decomposition = cfg["decomposition"]
        if decomposition not in DECOMPOSITIONS:
            raise LrkConfigError(
                f"decomp.decomposition={decomposition!r} is invalid: it must be one of {list(DECOMPOSITIONS)}"
            )
        self.decomposition: str = decomposition
        for key in ("orth_weight", "sparsity_weight"):
            if not (is_number(cfg[key]) and cfg[key] >= 0):
                raise LrkConfigError(f"decomp.{key}={cfg[key]!r} is invalid: it must be a number >= 0")
        self.orth_weight, self.sparsity_weight = float(cfg["orth_weight"]), float(cfg["sparsity_weight"])
        if cfg["sparsity"] not in SPARSITY_KINDS:
            raise LrkConfigError(
                f"decomp.sparsity={cfg['sparsity']!r} is invalid: it must be one of {list(SPARSITY_KINDS)}"
            )
        self.sparsity: str = cfg["sparsity"]
        epochs = cfg["train_epochs"]
        if epochs is not None and not (is_int(epochs) and epochs >= 0):
            raise LrkConfigError(
                f"decomp.train_epochs={epochs!r} is invalid: it must be an integer >= 0, or null (trainer.max_epochs)"
            )
        self.train_epochs: int | None = epochs
        self.prune_policy: RankPolicy = self._prune_policy()

    def _prune_policy(self) -> RankPolicy:
        cfg = self.cfg
        chosen = {k: cfg[k] for k in ("prune_energy", "prune_ratio") if cfg[k] is not None}
        label = "prune_energy"
        if not chosen and cfg["default_prune_energy"] is not None:
            chosen, label = {"prune_energy": cfg["default_prune_energy"]}, "default_prune_energy"
        if len(chosen) != 1:
            given = ", ".join(f"{k}={v}" for k, v in chosen.items()) or "neither"
            raise LrkConfigError(
                f"decomp=svd_train pruning sets {given}: set exactly one of decomp.prune_energy (phi in (0, 1]: the "
                "energy of the singular values kept) or decomp.prune_ratio (in (0, 1]: the fraction of each layer's "
                "parameters kept)"
            )
        ((key, value),) = chosen.items()
        if not is_fraction(value):
            shown = label if key == "prune_energy" else key
            raise LrkConfigError(f"decomp.{shown}={value!r} is invalid: it must be a number in (0, 1]")
        extra = {
            "rank_multiple": self.policy.rank_multiple,
            "min_rank": self.policy.min_rank,
            "ratio_tolerance": self.policy.ratio_tolerance,
        }
        if key == "prune_energy":
            return RankPolicy(energy=float(value), **extra)
        return RankPolicy(ratio=float(value), **extra)

    # --- apply: the full-rank SVD form --------------------------------------------------------------------------
    def support_error(self, name: str, module: nn.Module) -> str | None:
        if isinstance(module, nn.Linear):
            return None
        return conv_support_error(module)

    def kind(self, module: nn.Module) -> str:
        return "svd_train" if isinstance(module, nn.Linear) else f"svd_train_{self.decomposition}"

    def problem(self, name: str, module: nn.Module) -> RankProblem:
        """The rank problem of the SVD form (its parameters: r (m + n) + r + bias)."""
        m, n = _matrix_shape(module, self.decomposition)
        bias = module.bias.numel() if module.bias is not None else 0

        def spectra() -> list[torch.Tensor]:
            weight = module.weight.detach().double()
            matrix = (
                weight if isinstance(module, nn.Linear) else SVDTrainConv2d.matrix(weight, self.decomposition)
            )
            return [torch.linalg.svdvals(matrix)]

        return _problem(
            name,
            describe(module),
            m,
            n,
            bias,
            lambda ranks: ranks[0] * (m + n + 1) + bias,
            count_params(module),
            spectra,
            self.kind(module),
        )

    def prepare(
        self, model: nn.Module, targets: list[tuple[str, nn.Module]], batches: list[Any]
    ) -> dict[str, Any]:
        context = super().prepare(model, targets, batches)
        if self.full_rank:
            context["selector"] = _FullRank()
        return context

    def build_layer(
        self, name: str, module: nn.Module, ranks: Ranks, problem: RankProblem
    ) -> FactorizedLayer:
        if isinstance(module, nn.Linear):
            return SVDTrainLinear.from_dense(module, ranks[0])
        return SVDTrainConv2d.from_dense(module, ranks[0], self.decomposition)

    def finish(self, model: nn.Module, built, batches: list[Any], context: dict[str, Any]):
        rows = super().finish(model, built, batches, context)
        for row in rows:
            row["rank_full"] = row["rank"]
            row["params_full"] = row["params_after"]
        return rows

    # --- after the regularised fit: pruning ---------------------------------------------------------------------
    def prune_problem(self, name: str, layer: _SVDTrainBase, dense_params: int) -> RankProblem:
        """The rank problem of pruning one SVD-form layer: its trained |s| (sorted) and the two-factor layer's
        parameters r (m + n) + bias."""
        u, _, v = layer.svd_factors()
        m, n = int(u.shape[0]), int(v.shape[0])
        bias = layer.w1.bias.numel() if layer.w1.bias is not None else 0
        problem = _problem(
            name,
            f"{type(layer).__name__} rank {layer.ranks[0]}",
            m,
            n,
            bias,
            lambda ranks: ranks[0] * (m + n) + bias,
            dense_params,
            lambda: [layer.spectrum()],
            "",
        )
        problem.limits, problem.scalar_limit = (layer.ranks[0],), layer.ranks[0]
        return problem

    def prune(self, model: nn.Module, report: DecompReport) -> DecompReport:
        """Replace every SVD-form layer of ``model`` (the rows of ``report``, the report of :meth:`apply`) by its
        pruned two-factor layer; returns the report of the pruned model (module docstring: the row keys)."""
        modules = dict(model.named_modules())
        policy, rows = self.prune_policy, []
        selector = policy.selector()
        for old in report.rows:
            layer = modules.get(old["name"])
            if not isinstance(layer, _SVDTrainBase):  # left dense at apply (ratio unreachable)
                rows.append(dict(old))
                continue
            start = time.perf_counter()
            problem = self.prune_problem(old["name"], layer, old["params_before"])
            choice = policy.choose(problem, selector)
            with torch.no_grad():
                full = layer.dense_weight().detach().double()
                spectrum = layer.spectrum()
                if choice.reachable:
                    new: nn.Module = layer.prune(choice.ranks[0])
                    weight = new.dense_weight()
                else:
                    new = layer.fold()
                    weight = new.weight
                norm = float(full.norm())
                rel = (
                    float((weight.detach().double().reshape(full.shape) - full).norm()) / norm
                    if norm
                    else 0.0
                )
            replace_module(model, old["name"], new)
            row = dict(old)
            if choice.reachable:
                kept = choice.ranks[0]
                row.update(
                    rank=float(kept), ranks=[kept], s_energy=retained_energy(spectrum, kept), note=choice.note
                )
            else:
                low, high = policy.tolerance_range()
                row.update(
                    kind=DENSE_KIND,
                    rank=None,
                    ranks=None,
                    s_energy=1.0,
                    note=(
                        f"prune_ratio {policy.ratio:g} unreachable within ratio_tolerance={policy.ratio_tolerance:g} "
                        f"([{low:.3f}, {high:.3f}] of the layer): best {choice.achieved:.4f}; folded back to dense"
                    ),
                )
            row.update(
                params_after=count_params(new),
                rel_error=rel,
                energy=max(0.0, 1.0 - rel * rel),
                seconds=float(old.get("seconds") or 0.0) + time.perf_counter() - start,
            )
            rows.append(row)
        return DecompReport(self.name, rows)

    def __repr__(self) -> str:
        prune = self.prune_policy
        return (
            f"{type(self).__name__}(stage={self.stage!r}, decomposition={self.decomposition!r}, "
            f"orth_weight={self.orth_weight:g}, sparsity={self.sparsity!r}, sparsity_weight={self.sparsity_weight:g}, "
            f"prune={prune.kind}={prune.value:g}, targets={self.targets}, skip={self.skip})"
        )
