"""``decomp=trawl``: the TRAWL baseline (Luo et al. 2024, cited as [51] by seeds/sdrm_paper.txt section 5.1):
stack same-shaped weights of different layers into one higher-order tensor and decompose it with
Tucker or CP, so that the layers share factors.

The layers it builds, and how they compute, are documented in :mod:`lrk.layers.trawl`; this module is
the method: targets, ranks, validation.

Ranks are chosen per group with the shared policy: ``rank`` (R1 = R2 = rank, or the CP rank), ``ratio``
(of the group's dense parameters, met within ``ratio_tolerance``, else the whole group stays dense with one
warning per layer; when R_out = R_in is capped by the smaller channel count, the other rank is solved alone,
e.g. the twelve 1152 x 384 qkv of a ViT-S at 0.5 get R_in = 384, R_out = 435), ``energy`` (per channel-mode unfolding of the stack; for CP the
largest of the per-mode energy ranks). Shared parameters are ``nn.Parameter`` objects held by one
:class:`TrawlShared` module that every layer of the group registers, so ``model.parameters()`` counts them
once and fine-tuning updates them for all layers. In the report each layer is charged its own
parameters plus 1/L of the group's shared ones.

Default targets: every Linear except the classifier head and every Conv2d (groups=1) except the stem.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any, ClassVar

import torch
from torch import nn

from lrk.checks import is_int
from lrk.decomp import base as decomp_base
from lrk.decomp.base import Built, register_method
from lrk.decomp.rank.policy import FixedRank, RankProblem, Ranks
from lrk.decomp.weight.base import WeightMethod
from lrk.decomp.weight.svd import conv_support_error
from lrk.errors import LrkConfigError
from lrk.layers.base import FactorizedLayer, describe
from lrk.layers.trawl import DECOMPOSITIONS, build_group
from lrk.linalg.cp import cp_params, cp_rank_bound
from lrk.linalg.tucker import mode_singular_values
from lrk.measure import count_params
from lrk.progress import Progress


def group_key(module: nn.Module) -> tuple[str, tuple[int, ...]]:
    return type(module).__name__, tuple(module.weight.shape)


@register_method("trawl")
class TrawlMethod(WeightMethod):
    """Stacked same-shaped weights decomposed jointly (Tucker or CP), factors shared across the group."""

    supported = "Linear and Conv2d (groups=1, padding_mode='zeros'), grouped by weight shape"
    extra_keys: ClassVar[dict[str, Any]] = {
        "decomposition": "tucker",
        "layer_rank": None,
        "n_iter_max": None,
        "tol": 1e-5,
    }
    generic_cases: ClassVar[dict[str, Any]] = {  # tests/test_methods_generic.py
        "exact": {"energy": 1.0},
        "lossy": {"rank": 1},
        "invalid": [
            {"rank": 2, "decomposition": "svd"},
            {"rank": 2, "layer_rank": 10_000},
            {"rank": 10_000},
            {"rank": 2, "decomposition": "cp", "n_iter_max": 0},
        ],
    }

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        kind = self.cfg["decomposition"]
        if kind not in DECOMPOSITIONS:
            raise LrkConfigError(
                f"decomp.decomposition={kind!r} is invalid: it must be one of {list(DECOMPOSITIONS)}"
            )
        self.kind = kind
        layer_rank = self.cfg["layer_rank"]
        if layer_rank is not None and not (is_int(layer_rank) and layer_rank >= 1):
            raise LrkConfigError(
                f"decomp.layer_rank={layer_rank!r} is invalid: it must be an integer >= 1 or null"
            )
        self.layer_rank = layer_rank
        n_iter = self.cfg["n_iter_max"]
        if n_iter is None:  # tucker: the plain HOSVD; cp: 25 ALS sweeps
            n_iter = 0 if kind == "tucker" else 25
        if not (
            isinstance(n_iter, int)
            and not isinstance(n_iter, bool)
            and n_iter >= (0 if kind == "tucker" else 1)
        ):
            raise LrkConfigError(
                f"decomp.n_iter_max={n_iter!r} is invalid: it must be an integer >= {0 if kind == 'tucker' else 1} "
                "(HOOI sweeps for tucker, ALS sweeps for cp) or null"
            )
        self.n_iter_max, self.tol = n_iter, float(self.cfg["tol"])

    def support_error(self, name: str, module: nn.Module) -> str | None:
        if isinstance(module, nn.Linear):
            return None
        reason = conv_support_error(module)
        if reason is None and module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} is not supported, only 'zeros'"
        return reason

    def group_problem(self, names: list[str], modules: list[nn.Module]) -> RankProblem:
        first = modules[0]
        stack = torch.stack(
            [m.weight.detach().reshape(m.weight.shape[0], m.weight.shape[1], -1) for m in modules]
        )
        n_layers, s_out, c_in, k2 = stack.shape
        bias_n = sum(m.bias.numel() for m in modules if m.bias is not None)
        dense = stack.numel() + bias_n
        label = names[0] if len(names) == 1 else f"{names[0]} (+{len(names) - 1} same-shaped)"
        description = f"group of {n_layers} x {describe(first)}"
        if self.kind == "tucker":
            layer_rank = self.layer_rank
            if layer_rank is not None and layer_rank > n_layers:
                raise LrkConfigError(
                    f"decomp.layer_rank={layer_rank} is invalid for group '{label}' of {n_layers} layers: "
                    f"it must lie in [1, {n_layers}]"
                )
            per_layer = n_layers if layer_rank is None or layer_rank == n_layers else None

            def params(ranks: Ranks) -> int:
                r_out, r_in = ranks
                shared = s_out * r_out + c_in * r_in
                if per_layer is not None:
                    return shared + n_layers * r_out * r_in * k2 + bias_n
                return shared + layer_rank * r_out * r_in * k2 + n_layers * layer_rank + bias_n

            return RankProblem(
                layer=label,
                description=description,
                limits=(min(s_out, n_layers * c_in * k2), min(c_in, n_layers * s_out * k2)),
                scalar_limit=min(s_out, c_in),
                from_scalar=lambda r: (r, r),
                rank_names=("R_out", "R_in"),
                params=params,
                dense_params=dense,
                spectra=lambda: [mode_singular_values(stack, 1), mode_singular_values(stack, 2)],
                notes={"kind": "trawl_tucker", "stack": stack},
            )
        cp_stack = stack if k2 > 1 else stack[..., 0]
        dims = tuple(cp_stack.shape)
        bound = cp_rank_bound(dims)
        return RankProblem(
            layer=label,
            description=description,
            limits=(bound,),
            scalar_limit=bound,
            from_scalar=lambda r: (r,),
            params=lambda ranks: cp_params(dims, ranks[0]) + bias_n,
            dense_params=dense,
            spectra=lambda: [mode_singular_values(cp_stack, m) for m in range(cp_stack.ndim)],
            from_energy=lambda ranks: (max(ranks),),
            notes={"kind": "trawl_cp", "stack": cp_stack},
        )

    def build_group(
        self, names: list[str], modules: list[nn.Module], ranks: Ranks, problem: RankProblem
    ) -> list[FactorizedLayer]:
        """The group's layers sharing one decomposition of their stacked weights (:func:`lrk.layers.trawl.build_group`)."""
        layer_rank = self.layer_rank if self.kind == "tucker" else None
        return build_group(modules, ranks, self.kind, layer_rank, self.n_iter_max, self.tol)

    def prepare(
        self, model: nn.Module, targets: list[tuple[str, nn.Module]], batches: list[Any]
    ) -> dict[str, Any]:
        """Same-shaped targets form one group; one rank problem per group (explicit ranks checked here)."""
        groups: OrderedDict[tuple, list[tuple[str, nn.Module]]] = OrderedDict()
        for name, module in targets:
            groups.setdefault(group_key(module), []).append((name, module))
        selector = self.policy.selector()
        problems = [self.group_problem([n for n, _ in g], [m for _, m in g]) for g in groups.values()]
        if isinstance(selector, FixedRank):
            for p in problems:
                selector.check(p)
        return {"selector": selector, "groups": list(zip(groups.values(), problems, strict=True)), "rows": {}}

    def build(self, targets: list[tuple[str, nn.Module]], context: dict[str, Any]) -> Built:
        """Each group's layers share their factors: they are built together."""
        built: Built = []
        bar = Progress(  # counted in layers, like the base build (lrk.decomp.base.PROGRESS_MIN_LAYERS)
            len(targets), f"decomposing layers ({self.name})", min_total=decomp_base.PROGRESS_MIN_LAYERS
        )
        for group, problem in context["groups"]:
            names, modules = [n for n, _ in group], [m for _, m in group]
            with torch.no_grad():
                start = time.perf_counter()
                choice = self.policy.choose(problem, context["selector"])
                layers = self.build_group(names, modules, choice.ranks, problem) if choice.reachable else []
                seconds = time.perf_counter() - start
            rows: list[dict[str, Any]] = []
            built_ratio = None
            if layers:
                shared_params = count_params(layers[0].shared)
                for name, module, layer in zip(names, modules, layers, strict=True):
                    layer.train(module.training)
                    row = self.row(name, module, layer, choice.ranks, seconds / len(layers), problem)
                    row["params_after"] = count_params(layer) - shared_params + shared_params / len(layers)
                    row["note"] = choice.note
                    rows.append(row)
                built_ratio = sum(r["params_after"] for r in rows) / sum(r["params_before"] for r in rows)
            if not layers or not self.policy.within(
                built_ratio
            ):  # the group stays dense, a warning per layer
                rows = [
                    self.dense_row(n, m, choice, seconds / len(names), problem, built=built_ratio)
                    for n, m in zip(names, modules, strict=True)
                ]
                layers = list(modules)
            for name, module, layer, row in zip(names, modules, layers, rows, strict=True):
                row["group"] = problem.layer
                row["group_size"] = len(names)
                context["rows"][name] = row
                built.append((name, module, layer))
            bar.update(len(names))
        bar.close()
        order = [n for n, _ in targets]
        return sorted(built, key=lambda b: order.index(b[0]))
