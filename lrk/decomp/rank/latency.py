"""Hardware-aware rank selection, ``decomp.rank_search: latency`` (accelerating_lrd_paper Sec. 2.1, Algorithm 1).

The rank policy (rank | ratio | energy) gives each layer its rank R; ranks such as 309 may run slower on the
hardware than a nearby 304 or 256 (the paper's Fig. 2: Tucker rank 257 -> 256 of a [512, 512, 3, 3] conv, 15 %
less time at < 1 % of the parameters). For every target layer, :class:`LatencySearch` times the decomposed layer
at ranks from R down to R_min, times the dense layer (T), and keeps the rank Algorithm 1 picks, or the dense
layer where no candidate beats T (report kind :data:`SLOWER_KIND`). This module holds:

- :func:`select_rank`: Algorithm 1's choice as a pure function of a timing curve (tested without timing);
- :func:`candidate_scalars` / :func:`candidate_ranks`: which ranks are timed (``rank_search_step``);
- :class:`LatencyCache`: the on-disk timings (``rank_search_cache``), keyed by device, layer, precision, input
  shape and ranks, reused by later runs and sweeps;
- :class:`RankSearch` (the validated config keys) and :class:`LatencySearch` (one ``apply``: the input shapes
  captured from a calibration batch, the timing of every layer).

How lrk reads Algorithm 1 (seeds/accelerating_lrd_paper.txt, lines 120-153; the algorithm's own statements are
numbered here 1-16: 1 ``T <- time of L(x)``, 2 ``r <- R, R_opt <- 0``, 3 ``while r >= R_min``, 4 ``L_r <-
decompose L at rank r``, 5 ``t(r) <- time of L_r(x)``, 6 ``if r < R``, 7 ``Delta t(r) <- t(r) - t(r - 1)``,
8 ``end if``, 9 ``r <- r - 1``, 10 ``end while``, 11 ``R_opt <- argmax_{r in [R_min, R]} Delta t(r)``, 12 ``if
t(R_opt) < T``, 13 ``replace L with L_r``, 14 ``else``, 15 ``use the original layer L``, 16 ``end if``):

- Line 7, as printed, subtracts t(r - 1), which is not yet measured in iteration r (r - 1 is timed in the next
  one), and the argmax of line 11 over t(r) - t(r - 1) would be the *higher* rank of the largest drop, the slow
  one; the paper's own results take the lower one (Fig. 2: 257 -> 256; Table 2: 38 -> 32, 309 -> 308). lrk
  reads line 7 as the drop from the higher ranks already timed to r, defined for r < R only, which is what the
  guard of line 6 allows: ``Delta t(r) = min_{r' > r} t(r') - t(r)``, from the fastest of them (on a curve
  that falls step by step this is the previous rank's t(r + 1) - t(r); the minimum keeps one slow candidate,
  e.g. a load spike or a size the hardware handles badly, from making a "drop" onto the next one that is no
  faster than R). Line 11 then picks the rank right *after* the largest drop; of equal drops, the higher rank.
- Lines 9 and 3: r steps down by ``rank_search_step`` (below), from R to R_min = max(``min_rank``,
  ceil(``rank_search_floor`` x R)) (the paper: "searches in a domain around the original ranks"; default 0.75:
  Table 2's largest change, fc 335 -> 253, is 0.755 R).
- Guards the paper does not state, without which line 11 is the argmax of timing noise on a flat curve, and of
  the slope on a curve where time falls steadily with the rank (a CPU's, mostly: then every larger step size
  trades more rank for time the ratio did not ask for): a drop counts by what it exceeds the curve's typical
  slope, ``excess(r) = Delta t(r) - m * gap(r)`` with ``gap`` the rank distance from the fastest higher
  candidate and m the median over the curve of ``(t(r_prev) - t(r)) / (r_prev - r)`` between neighbouring
  candidates (m = 0 for fewer than 3 drops); R_opt = R unless the
  largest excess exceeds ``rank_search_min_drop`` x t(R) (default 0.03) and t(R_opt) < t(R). On a step curve
  (most drops ~0, m ~ 0) this is line 11 itself; the hardware's discontinuities (Sec. 2.1: "dimensions that
  are powers of 2 ... more efficient") are what it finds.
- Lines 12-15 as printed: the rank R_opt replaces L only if t(R_opt) < T; else L stays dense.

Multi-rank layers (Tucker-2's (R2, R1), TT's bonds) are searched along the method's scalar rank curve
(``RankProblem.from_scalar``, e.g. Tucker's (round(beta r), r)): the first candidate is the policy's ranks
themselves, then the curve's points below them (the largest scalar whose ranks are all <= the policy's, and
down), each rounded by the policy (``rank_multiple``, ``min_rank``) and taken once.

Timing (lrk.measure: :func:`~lrk.measure.alternating_latency`, CUDA-synchronised on a GPU): the forward (no
gradient, eval) of each candidate and of the dense layer on a random input of the layer's real input shape,
captured from the first calibration batch with forward pre-hooks, its batch dimension set to
``rank_search_batch`` (default: the calibration batch's size); ``rank_search_warmup`` untimed rounds, then
``rank_search_repeats`` rounds that run every candidate once, in rotating order (so that the candidates share
the same stretch of machine load); each time is the minimum over the rounds (load only adds time). The
candidates are built from the layer's *shape* with random weights (:data:`SHAPE_BUILDERS`, the layer classes'
constructors), not decomposed: a forward's time does not depend on the weights' values, and one SVD/HOSVD/ALS
per candidate would cost far more than the timing. Only the chosen rank is decomposed, by the method.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import statistics
import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lrk.checks import is_int, is_number
from lrk.decomp.rank.policy import RankPolicy, RankProblem, Ranks
from lrk.decomp.report import dense_row
from lrk.errors import LrkConfigError
from lrk.layers.base import describe
from lrk.layers.cp import CPConv2d, CPLinear
from lrk.layers.svd import SVDConv2d, SVDLinear
from lrk.layers.tt import TTConv1x1, TTLinear
from lrk.layers.tucker import TuckerConv2d
from lrk.measure import Stopwatch, alternating_latency, needs_sync
from lrk.progress import Progress

log = logging.getLogger(__name__)
PROGRESS_MIN_LAYERS = 4  # a progress bar over the searched layers from this many (each times many candidates)

#: default path of the timing cache (``~`` expanded): one file per user, shared by runs and sweeps
DEFAULT_CACHE = "~/.cache/lrk/rank_latency.json"
#: ``rank_search_step: auto`` picks the smallest power-of-two step that times at most this many candidates
AUTO_CANDIDATES = 32
#: ``kind`` of the report row of a layer kept dense because no decomposed candidate ran faster (Algorithm 1,
#: lines 12-15)
SLOWER_KIND = "dense (slower decomposed)"
CACHE_VERSION = 1

#: the config keys of the rank search, with their defaults (every weight method has them)
RANK_SEARCH_KEYS: dict[str, Any] = {
    "rank_search": "none",
    "rank_search_step": "auto",
    "rank_search_floor": 0.75,
    "rank_search_min_drop": 0.03,
    "rank_search_batch": None,
    "rank_search_repeats": 5,
    "rank_search_warmup": 2,
    "rank_search_cache": DEFAULT_CACHE,
    "rank_search_device": "auto",
    "rank_search_precision": "32-true",
}
SEARCHES = ("none", "latency")
#: trainer.precision values -> (dtype of weights and input, autocast dtype or None)
PRECISIONS: dict[str, tuple[torch.dtype, torch.dtype | None]] = {
    "32-true": (torch.float32, None),
    "32": (torch.float32, None),
    "64-true": (torch.float64, None),
    "64": (torch.float64, None),
    "16-mixed": (torch.float32, torch.float16),
    "16": (torch.float32, torch.float16),
    "bf16-mixed": (torch.float32, torch.bfloat16),
    "bf16": (torch.float32, torch.bfloat16),
    "16-true": (torch.float16, None),
    "bf16-true": (torch.bfloat16, None),
}


class RankSearchCacheWarning(UserWarning):
    """The timing cache file could not be read (it is rebuilt)."""


# --- Algorithm 1, as a pure function of the timing curve ---------------------------------------------------------
@dataclass(frozen=True)
class Selection:
    """Algorithm 1's choice: ``index`` into the curve (0 = the policy's rank R), or None = keep the dense layer;
    ``step`` the index after the largest drop (None for a curve of one point), ``reason`` in words."""

    index: int | None
    step: int | None
    reason: str


def select_rank(
    times: Sequence[float],
    dense_time: float,
    min_drop: float = 0.0,
    positions: Sequence[float] | None = None,
) -> Selection:
    """Algorithm 1 on a timing curve (module docstring: how lrk reads it).

    ``times[i]`` is t(r_i) for ranks r_0 = R > r_1 > ... >= R_min at ``positions[i]`` (the scalar ranks; default
    one apart); ``dense_time`` is T. The drop onto candidate i is ``min(times[:i]) - times[i]`` (line 7, from
    the fastest higher candidate); its excess over the curve's median slope between neighbours (per rank, times
    the distance to that candidate; no slope for fewer than 3 drops) ranks the drops, and R_opt is the
    candidate after the largest (line 11; of equal ones the higher rank), kept only if
    that excess exceeds ``min_drop`` x t(R) and t(R_opt) < t(R) (else R_opt = R); the dense layer is kept unless
    t(R_opt) < T (lines 12-15).
    """
    if not times:
        raise ValueError("select_rank needs at least one timed rank")
    n = len(times)
    pos = [float(p) for p in positions] if positions is not None else [float(n - i) for i in range(n)]
    if len(pos) != n:
        raise ValueError(f"select_rank: {n} times but {len(pos)} positions")
    gap = [max(pos[i - 1] - pos[i], 1e-12) for i in range(1, n)]
    slopes = [(times[i - 1] - times[i]) / gap[i - 1] for i in range(1, n)]
    slope = statistics.median(slopes) if len(slopes) >= 3 else 0.0
    excess, best = [], 0  # best: the fastest candidate above i
    for i in range(1, n):
        excess.append(times[best] - times[i] - slope * (pos[best] - pos[i]))
        best = i if times[i] < times[best] else best
    step = max(range(1, n), key=lambda i: (excess[i - 1], -i)) if n > 1 else None
    index, reason = 0, "one candidate: R kept"
    if step is not None:
        share = f"{max(excess[step - 1], 0.0) / times[0]:.1%} of t(R)"
        what = "largest drop of t(r)" + (" beyond its median slope" if slope else "")
        if excess[step - 1] <= min_drop * times[0]:
            reason = f"{what} ({share}) is not above min_drop ({min_drop:.1%}): R kept"
        elif times[step] >= times[0]:
            reason = f"{what} ({share}) ends at {times[step]:.4g} >= t(R) = {times[0]:.4g}: R kept"
        else:
            index, reason = step, f"{what} ({share}) onto candidate {step}"
    if times[index] < dense_time:
        return Selection(index, step, reason)
    return Selection(
        None, step, f"{reason}; t(R_opt) = {times[index]:.4g} >= T = {dense_time:.4g}: dense kept"
    )


def candidate_scalars(top: int, low: int, step: int) -> list[int]:
    """The scalar ranks timed, descending: ``top``, then every multiple of ``step`` in [low, top), then ``low``
    (for step 1: every rank from top down to low). Multiples rather than top - k step: a hardware's fast
    sizes are multiples (of 8, 32, ...), and a step of 16 then still lands on 256."""
    top, low = int(top), max(1, min(int(low), int(top)))
    if step <= 1:
        return list(range(top, low - 1, -1))
    out = [top, *range((top - 1) // step * step, low - 1, -step)]
    if out[-1] != low:
        out.append(low)
    return list(dict.fromkeys(out))


def auto_step(top: int, low: int, max_candidates: int = AUTO_CANDIDATES) -> int:
    """``rank_search_step: auto``: 1 when at most ``max_candidates`` ranks lie in [low, top], else the smallest
    power of two whose :func:`candidate_scalars` are at most that many."""
    step = 1
    while len(candidate_scalars(top, low, step)) > max_candidates:
        step *= 2
    return step


def scalar_top(problem: RankProblem, ranks: Ranks) -> int | None:
    """The largest scalar rank whose point of the method's curve (``from_scalar``, clamped) is <= ``ranks`` in
    every rank (None when even scalar 1 is not)."""
    for s in range(problem.scalar_limit, 0, -1):
        if all(a <= b for a, b in zip(problem.clamp(problem.from_scalar(s)), ranks, strict=True)):
            return s
    return None


def candidate_ranks(
    problem: RankProblem, ranks: Ranks, policy: RankPolicy, step: int | str, floor: float
) -> list[Ranks]:
    """The rank tuples timed for one layer, from the policy's ``ranks`` (R, first) down the method's scalar curve
    to R_min = max(min_rank, ceil(floor x R)), every ``step``-th scalar (``"auto"``: :func:`auto_step`), each
    rounded by ``policy.finalize``; duplicates dropped."""
    top = scalar_top(problem, ranks)
    out = [tuple(ranks)]
    if top is None:
        return out
    low = max(policy.min_rank, math.ceil(floor * top))
    k = auto_step(top, low) if step == "auto" else int(step)
    for s in candidate_scalars(top, low, k):
        cand = policy.finalize(problem.clamp(problem.from_scalar(s)), problem)
        if all(a <= b for a, b in zip(cand, ranks, strict=True)):
            out.append(cand)
    return list(dict.fromkeys(out))


# --- layers built from a shape ---------------------------------------------------------------------------------
ShapeBuilder = Callable[[nn.Module, Ranks, RankProblem], nn.Module]

#: problem ``kind`` (``RankProblem.notes["kind"]``) -> a builder of the factorized layer of that kind at some
#: ranks, from the dense layer's shape (a twin module with random weights): the layer classes' constructors,
#: no decomposition. A kind not here cannot be timed (a config error in ``prepare``).
SHAPE_BUILDERS: dict[str, ShapeBuilder] = {}


def register_shape_builder(kind: str) -> Callable[[ShapeBuilder], ShapeBuilder]:
    """Decorator: register the shape builder of a problem kind (for a method's new factorized layer)."""

    def decorator(fn: ShapeBuilder) -> ShapeBuilder:
        SHAPE_BUILDERS[kind] = fn
        return fn

    return decorator


def _factory(module: nn.Module) -> dict[str, Any]:
    return {"device": module.weight.device, "dtype": module.weight.dtype}


@register_shape_builder("svd")
def _svd(twin: nn.Module, ranks: Ranks, problem: RankProblem) -> nn.Module:
    if isinstance(twin, nn.Linear):
        return SVDLinear(
            twin.in_features, twin.out_features, ranks[0], twin.bias is not None, **_factory(twin)
        )
    return SVDConv2d(twin, ranks[0])


@register_shape_builder("tucker2")
def _tucker2(twin: nn.Module, ranks: Ranks, problem: RankProblem) -> nn.Module:
    return TuckerConv2d(twin, (ranks[0], ranks[1]))


@register_shape_builder("branched_tucker2")
def _branched_tucker2(twin: nn.Module, ranks: Ranks, problem: RankProblem) -> nn.Module:
    from lrk.layers.branched_tucker import BranchedTuckerConv2d  # the branched layer (decomp.branches > 1)

    return BranchedTuckerConv2d(twin, (ranks[0], ranks[1]), problem.notes["branches"])


@register_shape_builder("cp")
def _cp(twin: nn.Module, ranks: Ranks, problem: RankProblem) -> nn.Module:
    return CPConv2d(twin, ranks[0])


@register_shape_builder("cp_linear")
def _cp_linear(twin: nn.Module, ranks: Ranks, problem: RankProblem) -> nn.Module:
    out_shape, in_shape = problem.notes["shapes"]
    return CPLinear(out_shape, in_shape, ranks[0], twin.bias is not None, **_factory(twin))


@register_shape_builder("tt")
def _tt(twin: nn.Module, ranks: Ranks, problem: RankProblem) -> nn.Module:
    out_shape, in_shape = problem.notes["shapes"]
    if isinstance(twin, nn.Linear):
        return TTLinear(out_shape, in_shape, ranks, twin.bias is not None, **_factory(twin))
    return TTConv1x1(out_shape, in_shape, ranks, twin.bias is not None, twin.stride, **_factory(twin))


def twin(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A fresh ``nn.Linear`` / ``nn.Conv2d`` with ``module``'s shape and geometry on ``device`` / ``dtype``
    (random weights: the timing does not depend on them; ``module`` itself is never moved)."""
    factory = {"device": device, "dtype": dtype}
    if isinstance(module, nn.Linear):
        return nn.Linear(module.in_features, module.out_features, module.bias is not None, **factory)
    if isinstance(module, nn.Conv2d):
        return nn.Conv2d(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=module.groups,
            bias=module.bias is not None,
            padding_mode=module.padding_mode,
            **factory,
        )
    raise TypeError(f"rank search cannot time a {type(module).__name__}")


def layer_signature(module: nn.Module) -> str:
    """The dense layer's type and shape for the cache key: in/out, kernel, stride, padding, dilation, groups,
    bias."""
    bias = int(module.bias is not None)
    if isinstance(module, nn.Linear):
        return f"Linear({module.in_features},{module.out_features},bias={bias})"
    m = module
    geometry = f"k={m.kernel_size},s={m.stride},p={m.padding},d={m.dilation},g={m.groups},{m.padding_mode}"
    return f"{type(m).__name__}({m.in_channels},{m.out_channels},{geometry},bias={bias})".replace(" ", "")


def device_name(device: torch.device) -> str:
    """The timing device for the cache key, with the torch version (kernels change between releases):
    ``cuda:<device name>``, or ``cpu:<processor>/<torch threads>t`` (the processor from /proc/cpuinfo where
    there is one, else ``platform.processor()`` or ``platform.machine()``)."""
    if device.type == "cuda":
        name = f"cuda:{torch.cuda.get_device_name(device)}"
    elif device.type == "cpu":
        processor = ""
        try:
            with open("/proc/cpuinfo") as handle:
                processor = next(
                    (line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), ""
                )
        except OSError:
            pass
        processor = processor or platform.processor() or platform.machine()
        name = f"cpu:{processor}/{torch.get_num_threads()}t"
    else:
        name = str(device)
    return f"{name}|torch {torch.__version__}"


# --- the cache ---------------------------------------------------------------------------------------------------
class LatencyCache:
    """Timings in milliseconds by key, in a JSON file ``{"version": 1, "entries": {key: ms}}`` (``path`` None:
    in memory only). A key names the device, precision, layer, input shape and ranks (:meth:`LatencySearch.key`),
    so a timing from another device is never reused. An unreadable file is warned about
    (:class:`RankSearchCacheWarning`) and rebuilt; :meth:`save` merges the entries on disk (other runs of a
    sweep) with this run's and writes atomically (a temporary file renamed over the old one)."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(os.path.expanduser(str(path))) if path else None
        self.entries: dict[str, float] = self._read(warn=True) if self.path else {}
        self._new: dict[str, float] = {}

    def _read(self, warn: bool) -> dict[str, float]:
        assert self.path is not None
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
            entries = (
                data["entries"] if isinstance(data, dict) and data.get("version") == CACHE_VERSION else None
            )
            if not isinstance(entries, dict):
                raise ValueError(f"not a version-{CACHE_VERSION} lrk rank latency cache")
            return {str(k): float(v) for k, v in entries.items() if is_number(v)}
        except (OSError, ValueError, TypeError, KeyError) as error:
            if warn:
                message = f"rank latency cache {self.path} is unreadable ({error}): it is rebuilt"
                log.warning(message)
                warnings.warn(message, RankSearchCacheWarning, stacklevel=3)
            return {}

    def get(self, key: str) -> float | None:
        return self.entries.get(key)

    def put(self, key: str, ms: float) -> None:
        self.entries[key] = self._new[key] = float(ms)

    def save(self) -> None:
        if self.path is None or not self._new:
            return
        merged = {**self._read(warn=False), **self._new}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": CACHE_VERSION, "entries": merged}, indent=0, sort_keys=True))
        os.replace(tmp, self.path)
        self.entries.update(merged)
        self._new.clear()


# --- the search ----------------------------------------------------------------------------------------------------
def _compact(ms: float) -> float:
    return float(f"{ms:.4g}")


@dataclass
class SearchResult:
    """One layer's search: the policy's ranks, the candidates' times (ms, from R down), the dense time, the
    chosen ranks (None = dense kept), why, the search's seconds and how many timings were new (not cached)."""

    policy_ranks: Ranks
    curve: list[tuple[Ranks, float]]
    dense_ms: float
    selection: Selection
    seconds: float
    timed: int

    @property
    def ranks(self) -> Ranks | None:
        index = self.selection.index
        return None if index is None else self.curve[index][0]

    @property
    def note(self) -> str:
        chosen = "dense" if self.ranks is None else list(self.ranks)
        return f"rank search (Algorithm 1): {list(self.policy_ranks)} -> {chosen}: {self.selection.reason}"

    def fields(self) -> dict[str, Any]:
        """The report row's search columns: ``rank_policy``, ``rank_chosen`` (ranks, or ``"dense"``),
        ``dense_ms``, ``policy_ms``, ``chosen_ms`` (null when dense), ``latency_curve`` ([[*ranks, ms], ...]
        from R down), ``search_s``, ``search_timed`` (timings measured, not read from the cache)."""
        chosen = self.ranks
        index = self.selection.index
        return {
            "rank_policy": list(self.policy_ranks),
            "rank_chosen": "dense" if chosen is None else list(chosen),
            "dense_ms": _compact(self.dense_ms),
            "policy_ms": _compact(self.curve[0][1]),
            "chosen_ms": None if index is None else _compact(self.curve[index][1]),
            "latency_curve": [[*r, _compact(ms)] for r, ms in self.curve],
            "search_s": round(self.seconds, 3),
            "search_timed": self.timed,
        }

    def ratio_ok(self, policy: RankPolicy, built: float) -> bool:
        """The ratio check of the built module (fraction ``built`` of the dense layer): as usual at the policy's
        ranks; below them (the search only lowers ranks) only the upper end of the tolerance applies."""
        if self.ranks == self.policy_ranks or policy.ratio is None:
            return policy.within(built)
        return built <= policy.tolerance_range()[1] + 1e-12

    def dense_row(self, name: str, module: nn.Module, seconds: float) -> dict[str, Any]:
        """The report row of a layer kept dense because no candidate beat the dense time (kind
        :data:`SLOWER_KIND`, the keys of every row, rank null)."""
        return {**dense_row(name, module, SLOWER_KIND, seconds, self.note), **self.fields()}


#: the search columns of a row whose layer was not searched (ratio unreachable): every row has the same keys
EMPTY_FIELDS: dict[str, Any] = dict.fromkeys(
    (
        "rank_policy",
        "rank_chosen",
        "dense_ms",
        "policy_ms",
        "chosen_ms",
        "latency_curve",
        "search_s",
        "search_timed",
    )
)


def _check(ok: bool, key: str, value: Any, what: str) -> None:
    if not ok:
        raise LrkConfigError(f"decomp.{key}={value!r} is invalid: it must be {what}")


def resolve_device(value: str) -> torch.device:
    """``rank_search_device`` (trainer.accelerator's values, or a torch device): ``auto`` (CUDA when available,
    else CPU), ``cpu``, ``gpu`` / ``cuda`` (the current CUDA device), ``cuda:N``, ``mps``."""
    text = str(value).lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text in ("gpu", "cuda") or text.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise LrkConfigError(
                f"decomp.rank_search_device={value!r} is invalid here: no CUDA device is available (use cpu)"
            )
        return torch.device("cuda" if text == "gpu" else text)
    if text in ("cpu", "mps"):
        return torch.device(text)
    raise LrkConfigError(
        f"decomp.rank_search_device={value!r} is invalid: it must be auto, cpu, gpu, cuda, cuda:<N> or mps"
    )


@dataclass(frozen=True)
class RankSearch:
    """The validated ``rank_search*`` keys of a weight method (:meth:`from_config`; None when ``rank_search:
    none``). :meth:`prepare` starts the search of one ``apply``."""

    step: int | str = "auto"
    floor: float = 0.75
    min_drop: float = 0.03
    batch: int | None = None
    repeats: int = 5
    warmup: int = 2
    cache: str | None = DEFAULT_CACHE
    device: str = "auto"
    precision: str = "32-true"

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], method: str, per_layer: bool = True) -> RankSearch | None:
        """Check the keys (one :class:`LrkConfigError` naming the key): ``rank_search`` none | latency;
        ``rank_search_step`` an integer >= 1 or auto; ``rank_search_floor`` in [0, 1]; ``rank_search_min_drop``
        in [0, 1); ``rank_search_batch`` null or an integer >= 1; ``rank_search_repeats`` >= 1;
        ``rank_search_warmup`` >= 0; ``rank_search_cache`` null or a path. With ``latency`` only (so that a trainer
        setting no search uses cannot fail a run): ``rank_search_device`` and ``rank_search_precision``
        (trainer.accelerator / trainer.precision values, :func:`resolve_device`, :data:`PRECISIONS`); the method
        must build layers one by one (``per_layer``; TRAWL builds groups) and ``calibration_batches`` must not
        be 0 (the search times each layer at the input shape a calibration batch gives it)."""
        get = {**RANK_SEARCH_KEYS, **{k: v for k, v in cfg.items() if k in RANK_SEARCH_KEYS}}
        mode = "none" if get["rank_search"] is None else get["rank_search"]
        _check(mode in SEARCHES, "rank_search", mode, "none or latency (accelerating_lrd_paper Algorithm 1)")
        step = get["rank_search_step"]
        _check(
            step == "auto" or (is_int(step) and step >= 1),
            "rank_search_step",
            step,
            "an integer >= 1 or auto",
        )
        floor = get["rank_search_floor"]
        _check(
            is_number(floor) and 0 <= floor <= 1, "rank_search_floor", floor, "a number in [0, 1] (R_min / R)"
        )
        drop = get["rank_search_min_drop"]
        _check(
            is_number(drop) and 0 <= drop < 1, "rank_search_min_drop", drop, "a number in [0, 1) (of t(R))"
        )
        batch = get["rank_search_batch"]
        _check(
            batch is None or (is_int(batch) and batch >= 1),
            "rank_search_batch",
            batch,
            "an integer >= 1 or null",
        )
        repeats, warmup = get["rank_search_repeats"], get["rank_search_warmup"]
        _check(is_int(repeats) and repeats >= 1, "rank_search_repeats", repeats, "an integer >= 1")
        _check(is_int(warmup) and warmup >= 0, "rank_search_warmup", warmup, "an integer >= 0")
        cache = get["rank_search_cache"]
        _check(
            cache is None or (isinstance(cache, str) and cache.strip()),
            "rank_search_cache",
            cache,
            "a path or null",
        )
        if mode == "none":
            return None
        precision = str(get["rank_search_precision"])
        _check(precision in PRECISIONS, "rank_search_precision", precision, f"one of {list(PRECISIONS)}")
        device = str(get["rank_search_device"])
        resolve_device(device)
        if not per_layer:
            raise LrkConfigError(
                f"decomp.rank_search=latency is not supported by decomp={method}: its layers share factors across "
                "a group, there is no per-layer rank to time; use rank_search: none"
            )
        if cfg.get("calibration_batches") == 0:
            raise LrkConfigError(
                "decomp.rank_search=latency needs a calibration batch: decomp.calibration_batches=0 gives none; set "
                "it >= 1 (or null = 4); the search times each layer at the input shape a batch gives it"
            )
        return cls(step, float(floor), float(drop), batch, repeats, warmup, cache, device, precision)

    def prepare(
        self,
        model: nn.Module,
        targets: Sequence[tuple[str, nn.Module]],
        batches: Sequence[Any],
        problems: Mapping[str, RankProblem],
    ) -> LatencySearch:
        """The search of one ``apply``: every target's kind must have a shape builder, and its input shape is
        captured from the first calibration batch (LrkConfigError, before anything is built, when there is no
        batch, a kind cannot be timed, or a target receives no input)."""
        if not batches:
            raise LrkConfigError(
                "decomp.rank_search=latency needs at least one calibration batch (decomp.calibration_batches >= 1, "
                "or null = 4): it times each layer at the input shape a batch gives it"
            )
        for name, module in targets:
            kind = problems[name].notes.get("kind")
            if kind not in SHAPE_BUILDERS or not isinstance(module, (nn.Linear, nn.Conv2d)):
                raise LrkConfigError(
                    f"decomp.rank_search=latency cannot time layer '{name}' ({describe(module)}, kind {kind!r}): "
                    f"it times the kinds {sorted(SHAPE_BUILDERS)} of Linear/Conv2d layers; skip the layer "
                    "(decomp.skip) or use rank_search: none"
                )
        shapes = capture_input_shapes(model, [name for name, _ in targets], batches[0])
        missing = [name for name, _ in targets if name not in shapes]
        if missing:
            raise LrkConfigError(
                f"decomp.rank_search=latency needs each target's input shape, but {missing} received no input "
                "when a calibration batch ran through the model; skip them (decomp.skip) or use rank_search: none"
            )
        return LatencySearch(self, shapes, LatencyCache(self.cache))


def capture_input_shapes(model: nn.Module, names: Sequence[str], batch: Any) -> dict[str, tuple[int, ...]]:
    """The input shape of each module named in ``names`` when ``batch`` (an image tensor or an (images, labels)
    pair) runs through ``model`` (eval, no gradient; modes restored), by forward pre-hooks."""
    images = batch[0] if isinstance(batch, (list, tuple)) and batch else batch
    if not isinstance(images, torch.Tensor):
        raise LrkConfigError(
            f"calibration batch of type {type(images).__name__} is invalid: it must be an image tensor or an "
            "(images, labels) pair"
        )
    modules = dict(model.named_modules())
    shapes: dict[str, tuple[int, ...]] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple[Any, ...]) -> None:  # returns None: the input is unchanged
            shapes.setdefault(name, tuple(args[0].shape))

        return record

    handles = [modules[name].register_forward_pre_hook(hook(name)) for name in names]
    modes = {m: m.training for m in model.modules()}
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        model.eval()
        with torch.no_grad():
            model(images.to(device))
    finally:
        for handle in handles:
            handle.remove()
        for m, mode in modes.items():
            m.train(mode)
    return shapes


def time_forwards(
    fns: Mapping[str, Callable[[], Any]], repeats: int, warmup: int, sync: bool
) -> dict[str, float]:
    """Seconds of each forward: the minimum over ``repeats`` alternating rounds after ``warmup``
    (:func:`lrk.measure.alternating_latency`). ``fns`` keys: ``"dense"`` or the ranks joined by ``x``."""
    return {name: s.min_s for name, s in alternating_latency(fns, repeats, warmup, sync).items()}


@dataclass
class LatencySearch:
    """The rank search of one ``apply``: the settings, each target's input shape, the cache; a progress bar
    (:mod:`lrk.progress`) over the searched layers from :data:`PROGRESS_MIN_LAYERS` of them."""

    settings: RankSearch
    shapes: dict[str, tuple[int, ...]]
    cache: LatencyCache
    results: dict[str, SearchResult] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.device = resolve_device(self.settings.device)
        self.dtype, self.autocast = PRECISIONS[self.settings.precision]
        self.device_key = device_name(self.device)
        self.progress = Progress(
            len(self.shapes), "rank search (latency)", min_total=PROGRESS_MIN_LAYERS, logger=log
        )

    def input_shape(self, name: str) -> tuple[int, ...]:
        shape = self.shapes[name]
        return (self.settings.batch, *shape[1:]) if self.settings.batch else shape

    def key(self, name: str, module: nn.Module, kind: str, ranks: Ranks | None, problem: RankProblem) -> str:
        """The cache key: device, precision, kind (with a tensorized layer's factor shapes), dense layer, input
        shape, ranks (``dense`` for the dense layer)."""
        shapes, branches = problem.notes.get("shapes"), problem.notes.get("branches")
        kind_text = kind + (f"{list(shapes[0])}<-{list(shapes[1])}" if shapes else "")
        kind_text = "dense" if ranks is None else kind_text + (f"/{branches}" if branches else "")
        rank_text = "dense" if ranks is None else "x".join(map(str, ranks))
        size = "x".join(map(str, self.input_shape(name)))
        return f"{self.device_key}|{self.settings.precision}|{kind_text}|{layer_signature(module)}|in={size}|r={rank_text}"

    def search(
        self, name: str, module: nn.Module, problem: RankProblem, ranks: Ranks, policy: RankPolicy
    ) -> SearchResult:
        """Algorithm 1 for one layer at the policy's ``ranks`` (``policy`` rounds the candidates)."""
        s, kind = self.settings, problem.notes["kind"]
        with Stopwatch() as watch:
            candidates = candidate_ranks(problem, tuple(ranks), policy, s.step, s.floor)
            keys = {None: self.key(name, module, kind, None, problem)}
            keys.update({r: self.key(name, module, kind, r, problem) for r in candidates})
            missing = [r for r, k in keys.items() if self.cache.get(k) is None]
            if missing:
                for label, seconds in self._time(name, module, kind, problem, missing).items():
                    self.cache.put(keys[label], 1000.0 * seconds)
                self.cache.save()
            curve = [(r, self.cache.get(keys[r])) for r in candidates]
            dense_ms = self.cache.get(keys[None])
            positions = [sum(r) / len(r) for r, _ in curve]  # along the scalar curve
            selection = select_rank([ms for _, ms in curve], dense_ms, s.min_drop, positions)
        result = SearchResult(tuple(ranks), curve, dense_ms, selection, watch.seconds, len(missing))
        self.results[name] = result
        self.progress.update()
        if len(self.results) >= len(self.shapes):
            self.progress.close()
        return result

    def _time(
        self, name: str, module: nn.Module, kind: str, problem: RankProblem, ranks: list[Ranks | None]
    ) -> dict[Ranks | None, float]:
        """Seconds of one forward of each of ``ranks`` (None: the dense layer), built from the layer's shape."""
        dense = twin(module, self.device, self.dtype)
        x = torch.randn(self.input_shape(name), device=self.device, dtype=self.dtype)
        layers: dict[Ranks | None, nn.Module] = {}
        with torch.no_grad():
            for r in ranks:
                layer = dense if r is None else SHAPE_BUILDERS[kind](dense, r, problem)
                for p in layer.parameters():
                    p.normal_(0.0, 0.02)
                layers[r] = layer.eval()
        label = {r: "dense" if r is None else "x".join(map(str, r)) for r in ranks}
        fns = {label[r]: (lambda m=m: m(x)) for r, m in layers.items()}
        autocast = torch.autocast(self.device.type, dtype=self.autocast) if self.autocast else nullcontext()
        with torch.inference_mode(), autocast:
            seconds = time_forwards(fns, self.settings.repeats, self.settings.warmup, needs_sync(self.device))
        return {r: seconds[label[r]] for r in ranks}
