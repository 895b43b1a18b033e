"""FLOPs of one forward pass, attention products and in-forward factorizations included.

:func:`count_flops` runs the module once under :class:`torch.utils.flop_counter.FlopCounterMode` with two
additions to torch's table of formulas (:func:`flop_formulas`, passed as ``custom_mapping``):

- **attention**: torch 2.14 counts the fused CUDA kernels of ``F.scaled_dot_product_attention``
  (``_scaled_dot_product_flash_attention``, ``_efficient_attention``, ``_cudnn_attention``) and the math
  fallback (it decomposes into ``bmm``), but not the CPU kernel ``_scaled_dot_product_flash_attention_for_cpu``
  (0 FLOPs for q = k = v of shape [1, 4, 65, 32]) nor ``_scaled_dot_product_fused_attention_overrideable``.
  Both get torch's own SDPA formula: the two products Q K^T and A V, 2 B H T_q T_k (d_qk + d_v) FLOPs
  (a causal mask is not discounted, as in torch). ``FlopCount.attention`` is what was counted *inside* calls
  of ``F.scaled_dot_product_attention`` (seen by a ``TorchFunctionMode``), whichever kernel ran: so the
  fused, the CPU and the math paths all land there, each once.
- **factorizations** (dense linear algebra that torch counts as 0), with the operation counts of Golub &
  Van Loan, *Matrix Computations*, 4th ed. (2013), batched over the leading dimensions. For an m x n
  matrix, k = min(m, n), M = max(m, n):

  ============================  ==============================================================================
  ``eigh`` / ``eigvalsh``       symmetric QR algorithm (Alg. 8.3.3): 9 n^3 with eigenvectors, 4 n^3 / 3 without
  ``svd`` (Sec. 8.6.3 table)    the cheaper of Golub-Reinsch and R-SVD (a QR first, as LAPACK does for tall
                                matrices; with U, V it wins for M > 3k/2): values only
                                min(4 M k^2 - 4 k^3 / 3, 2 M k^2 + 2 k^3);
                                thin U, V (``full_matrices=False``) min(14 M k^2 + 8 k^3, 6 M k^2 + 20 k^3);
                                full U, V min(4 M^2 k + 8 M k^2 + 9 k^3, 4 M^2 k + 22 k^3)
  ``qr`` (Sec. 5.2.2, 5.1.6)    Householder R: 4 (m n k - (m + n) k^2 / 2 + k^3 / 3) (= 2 m n^2 - 2 n^3 / 3 for
                                m >= n); plus the thin Q (m x k): 2 m k^2 - 2 k^3 / 3; or the full Q (m x m):
                                4 (m^2 k - m k^2 + k^3 / 3). ``geqrf`` is R, ``householder_product`` is Q
  ``cholesky`` (Sec. 4.2)       n^3 / 3
  LU (Sec. 3.2, 3.4)            2 (m n k - (m + n) k^2 / 2 + k^3 / 3) (= 2 n^3 / 3); ``lu_factor``, ``lu``,
                                ``det``, ``slogdet``; ``solve`` adds 2 n^2 r for r right-hand sides; ``inv`` 2 n^3
  triangular solves (Sec. 3.1)  n^2 r (``solve_triangular``); ``cholesky_solve`` 2 n^2 r; ``cholesky_inverse``
                                2 n^3 / 3
  ``eig`` (Sec. 7.5.6)          Francis QR on the Hessenberg form: 25 n^3 with eigenvectors, 10 n^3 without
  ============================  ==============================================================================

What :attr:`FlopCount.total` includes: matrix products (``mm``, ``addmm``, ``bmm``, ``baddbmm``, ``matmul``
and ``linear`` through them, ``einsum`` where it lowers to them), convolutions, scaled-dot-product attention
and the factorizations above; 2 FLOPs per multiply-add. What it leaves out: elementwise operations, softmax,
normalisations, activations, pooling, reductions, and linear algebra not listed (``lstsq``, ``pinv``,
``matrix_exp``). A randomized SVD (``torch.svd_lowrank``) or a Gram product ``Y^T Y`` before an ``eigh``
counts its matrix products under ``mm``/``bmm`` (in ``total``) and only its QR/SVD/eigh under
``factorization``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten

__all__ = [
    "FACTORIZATION_OPS",
    "FlopCount",
    "FlopCounter",
    "count_flops",
    "flop_formulas",
]


def _prod(dims: Sequence[int]) -> int:
    return math.prod(int(d) for d in dims)


def _batch(shape: Sequence[int]) -> int:
    """Number of matrices in a batched [..., m, n] operand."""
    return _prod(shape[:-2])


def _numel(shape: Any) -> int:
    return _prod(shape) if shape is not None else 0


def _round(x: float) -> int:
    return round(x)


# ------------------------------------------------------------------------------------------ attention


def sdpa_forward_flops(query: Sequence[int], key: Sequence[int], value: Sequence[int]) -> int:
    """Q K^T and A V of scaled-dot-product attention: 2 B H_q T_q T_k (d_qk + d_v) (grouped KV heads broadcast)."""
    *lead, t_q, d_qk = query
    t_k, d_v = key[-2], value[-1]
    return 2 * _prod(lead) * t_q * t_k * (d_qk + d_v)


def sdpa_backward_flops(query: Sequence[int], key: Sequence[int], value: Sequence[int]) -> int:
    """The backward of :func:`sdpa_forward_flops` as torch counts it: the scores recomputed, then dV, dP, dQ, dK."""
    *lead, t_q, d_qk = query
    t_k, d_v = key[-2], value[-1]
    return 2 * _prod(lead) * t_q * t_k * (3 * d_qk + 2 * d_v)


def _sdpa_flop(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_forward_flops(query, key, value)


def _sdpa_cpu_backward_flop(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flops(query, key, value)


# ------------------------------------------------------------------------------------- factorizations

#: set while a values-only linear-algebra function runs (see :class:`FlopCounter`)
_VALUES_ONLY: ContextVar[bool] = ContextVar("lrk_measure_values_only", default=False)
_VALUES_ONLY_FUNCTIONS = frozenset(
    {
        torch.linalg.eigvalsh,
        torch.linalg.svdvals,
        torch.linalg.eigvals,
        torch.linalg.matrix_rank,
        torch.linalg.matrix_norm,
        torch.linalg.norm,
        torch.linalg.cond,
    }
)
# Each formula receives the shapes of the op's inputs and ``out_shape``, the shapes of its outputs
# (torch.utils.flop_counter's shape_wrapper). Outputs tell what was computed: eigenvectors, U/V or Q of
# numel 0 were not.


def householder_r_flops(m: int, n: int) -> float:
    """Householder triangularisation of an m x n matrix (GVL Alg. 5.2.1): 2 m n^2 - 2 n^3 / 3 for m >= n."""
    k = min(m, n)
    return 4.0 * (m * n * k - (m + n) * k * k / 2 + k**3 / 3)


def eigh_flops(n: int, vectors: bool = True) -> float:
    """Symmetric QR algorithm on an n x n matrix (GVL Alg. 8.3.3): 9 n^3 with eigenvectors, 4 n^3 / 3 without."""
    return 9.0 * n**3 if vectors else 4.0 * n**3 / 3


def svd_flops(m: int, n: int, uv: bool = True, full_matrices: bool = False) -> float:
    """SVD of an m x n matrix (GVL Sec. 8.6.3): the cheaper of Golub-Reinsch and R-SVD."""
    big, k = max(m, n), min(m, n)
    if not uv:
        return min(4.0 * big * k * k - 4.0 * k**3 / 3, 2.0 * big * k * k + 2.0 * k**3)
    if full_matrices:
        return min(4.0 * big * big * k + 8.0 * big * k * k + 9.0 * k**3, 4.0 * big * big * k + 22.0 * k**3)
    return min(14.0 * big * k * k + 8.0 * k**3, 6.0 * big * k * k + 20.0 * k**3)


def qr_flops(m: int, n: int, mode: str = "reduced") -> float:
    """Householder QR of an m x n matrix (GVL Sec. 5.2.2): R, plus Q accumulated backwards (Sec. 5.1.6):
    thin (m x k, ``reduced``) or full (m x m, ``complete``); ``r``: R only."""
    k = min(m, n)
    flops = householder_r_flops(m, n)
    if mode == "reduced":
        flops += 2.0 * m * k * k - 2.0 * k**3 / 3
    elif mode == "complete":
        flops += 4.0 * (m * m * k - m * k * k + k**3 / 3)
    return flops


def cholesky_flops(n: int) -> float:
    """Cholesky of an n x n SPD matrix (GVL Sec. 4.2): n^3 / 3."""
    return n**3 / 3.0


def lu_flops(m: int, n: int) -> float:
    """Gaussian elimination with partial pivoting of an m x n matrix (GVL Sec. 3.2, 3.4): 2 n^3 / 3 if square."""
    k = min(m, n)
    return 2.0 * (m * n * k - (m + n) * k * k / 2 + k**3 / 3)


def eig_flops(n: int, vectors: bool = True) -> float:
    """Francis QR on the Hessenberg form of an n x n matrix (GVL Sec. 7.5.6): 25 n^3 with vectors, 10 n^3 without."""
    return 25.0 * n**3 if vectors else 10.0 * n**3


def _rhs(a_shape: Sequence[int], b_shape: Sequence[int], left: bool = True) -> int:
    """Right-hand sides per matrix of ``A X = B`` (``left``) or ``X A = B``: a vector B counts 1."""
    if len(b_shape) == len(a_shape) - 1 or len(b_shape) == 1:
        return 1
    return int(b_shape[-1] if left else b_shape[-2])


def _batched(shape: Sequence[int], flops: float) -> int:
    return _round(_batch(shape) * flops)


def _vectors(out: Any) -> bool:
    """Whether eigen/singular vectors were asked for: not inside a values-only call (``eigvalsh``, ``svdvals``,
    ``eigvals``, ...; under a dispatch mode torch computes the vectors anyway), and not an empty output."""
    return not _VALUES_ONLY.get() and (out is None or _numel(out) > 0)


def _eigh(a, *args, out_shape=None, **kwargs) -> int:
    vectors = _vectors(out_shape[1] if out_shape is not None else None)
    return _batched(a, eigh_flops(a[-1], vectors))


def _svd(a, *args, out_shape=None, **kwargs) -> int:
    m, n = a[-2], a[-1]
    uv, full = _vectors(None), False
    if out_shape is not None:  # (U, S, Vh): U [..., m, m or k], Vh [..., n or k, n], both empty without uv
        u, vh = out_shape[0], out_shape[2]
        uv = _vectors(u)
        full = uv and m != n and u[-1] == m and vh[-2] == n
    return _batched(a, svd_flops(m, n, uv, full))


def _qr(a, *args, out_shape=None, **kwargs) -> int:
    m, n = a[-2], a[-1]
    mode = "reduced"
    if out_shape is not None:
        q = out_shape[0]
        if _numel(q) == 0:
            mode = "r"
        elif q[-1] == m and m > n:
            mode = "complete"
    return _batched(a, qr_flops(m, n, mode))


def _geqrf(a, *args, out_shape=None, **kwargs) -> int:
    return _batched(a, householder_r_flops(a[-2], a[-1]))


def _householder_product(a, tau, *args, out_shape=None, **kwargs) -> int:
    m, n, k = a[-2], a[-1], tau[-1]  # orgqr: m x n Q from k reflectors
    return _batched(a, 4.0 * (m * n * k - (m + n) * k * k / 2 + k**3 / 3))


def _cholesky(a, *args, out_shape=None, **kwargs) -> int:
    return _batched(a, cholesky_flops(a[-1]))


def _lu(a, *args, out_shape=None, **kwargs) -> int:
    return _batched(a, lu_flops(a[-2], a[-1]))


def _solve(a, b, *args, out_shape=None, left=True, **kwargs) -> int:
    n = a[-1]
    return _batched(a, lu_flops(n, n) + 2.0 * n * n * _rhs(a, b, left))


def _inv(a, *args, out_shape=None, **kwargs) -> int:
    return _batched(a, 2.0 * a[-1] ** 3)


def _solve_triangular(a, b, *args, out_shape=None, left=True, **kwargs) -> int:
    n = a[-1]
    return _round(max(_batch(a), _batch(b)) * n * n * _rhs(a, b, left))


def _cholesky_solve(b, l_factor, *args, out_shape=None, **kwargs) -> int:
    n = l_factor[-1]
    return _round(max(_batch(b), _batch(l_factor)) * 2.0 * n * n * _rhs(l_factor, b))


def _cholesky_inverse(l_factor, *args, out_shape=None, **kwargs) -> int:
    return _batched(l_factor, 2.0 * l_factor[-1] ** 3 / 3)


def _eig(a, *args, out_shape=None, **kwargs) -> int:
    vectors = _vectors(out_shape[1] if out_shape is not None else None)
    return _batched(a, eig_flops(a[-1], vectors))


_FACTORIZATION_FORMULAS: dict[Any, Callable[..., int]] = {
    aten._linalg_eigh: _eigh,
    aten.linalg_eigh: _eigh,
    aten._linalg_svd: _svd,
    aten.linalg_qr: _qr,
    aten.geqrf: _geqrf,
    aten.linalg_householder_product: _householder_product,
    aten.linalg_cholesky_ex: _cholesky,
    aten.linalg_lu_factor_ex: _lu,
    aten.linalg_lu: _lu,
    aten._linalg_det: _lu,
    aten._linalg_slogdet: _lu,
    aten._linalg_solve_ex: _solve,
    aten.linalg_inv_ex: _inv,
    aten.linalg_solve_triangular: _solve_triangular,
    aten.cholesky_solve: _cholesky_solve,
    aten.cholesky_inverse: _cholesky_inverse,
    aten.linalg_eig: _eig,
}

#: the aten ops whose FLOPs form :attr:`FlopCount.factorization`
FACTORIZATION_OPS: frozenset[Any] = frozenset(_FACTORIZATION_FORMULAS)


def flop_formulas() -> dict[Any, Callable[..., int]]:
    """The ``custom_mapping`` for :class:`FlopCounterMode`: the SDPA kernels torch does not count and the
    factorizations of the module docstring (shape-based formulas; torch wraps them with its shape_wrapper)."""
    return {
        aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flop,
        aten._scaled_dot_product_fused_attention_overrideable: _sdpa_flop,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward_flop,
        aten._scaled_dot_product_fused_attention_overrideable_backward: _sdpa_cpu_backward_flop,
        **_FACTORIZATION_FORMULAS,
    }


# ---------------------------------------------------------------------------------------------- count


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one forward (2 per multiply-add; see the module docstring for what is counted).

    ``total`` includes ``attention`` (inside ``F.scaled_dot_product_attention``: Q K^T and A V) and
    ``factorization`` (eigh / SVD / QR / Cholesky / LU work inside the forward). ``by_op``: FLOPs per aten op
    (``"aten.mm"``, ...). ``batch_size``: images of the example (its first dimension).
    """

    total: float
    attention: float
    factorization: float
    by_op: dict[str, float] = field(default_factory=dict)
    batch_size: int = 1

    @property
    def dense(self) -> float:
        """FLOPs outside attention and factorizations (projections, MLPs, convolutions, heads)."""
        return self.total - self.attention - self.factorization

    def per_image(self, batch: int | None = None) -> FlopCount:
        """Every figure divided by ``batch`` (default: :attr:`batch_size`)."""
        n = self.batch_size if batch is None else batch
        if n < 1:
            raise ValueError(f"per_image(batch={n}) is invalid: batch must be >= 1")
        return replace(
            self,
            total=self.total / n,
            attention=self.attention / n,
            factorization=self.factorization / n,
            by_op={k: v / n for k, v in self.by_op.items()},
            batch_size=1,
        )


class _FunctionScopes(TorchFunctionMode):
    """Sees torch's Python-level calls: adds to ``attention`` what ``counter`` counted inside each
    ``F.scaled_dot_product_attention`` call, and marks values-only linear algebra for the formulas."""

    def __init__(self, counter: FlopCounterMode) -> None:
        super().__init__()
        self.counter = counter
        self.attention = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            before = self.counter.get_total_flops()
            try:
                return func(*args, **kwargs)
            finally:
                self.attention += self.counter.get_total_flops() - before
        if func in _VALUES_ONLY_FUNCTIONS:
            token = _VALUES_ONLY.set(True)
            try:
                return func(*args, **kwargs)
            finally:
                _VALUES_ONLY.reset(token)
        return func(*args, **kwargs)


class FlopCounter:
    """Context manager that counts FLOPs of whatever runs inside it (a forward, or a training step with its
    backward) with lrk's formulas; :meth:`count` gives the :class:`FlopCount` (``batch_size`` as told).

        with FlopCounter() as counter:
            model(x).sum().backward()
        counter.count(batch_size=x.shape[0]).per_image()
    """

    def __init__(self) -> None:
        self.mode = FlopCounterMode(display=False, custom_mapping=flop_formulas())
        self._scopes = _FunctionScopes(self.mode)

    def __enter__(self) -> FlopCounter:
        self._scopes.attention = 0
        self.mode.__enter__()
        self._scopes.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._scopes.__exit__(*exc)
        self.mode.__exit__(*exc)

    def count(self, batch_size: int = 1) -> FlopCount:
        raw = self.mode.get_flop_counts().get("Global", {})
        return FlopCount(
            total=float(self.mode.get_total_flops()),
            attention=float(self._scopes.attention),
            factorization=float(sum(flops for op, flops in raw.items() if op in FACTORIZATION_OPS)),
            by_op={str(op): float(flops) for op, flops in raw.items()},
            batch_size=batch_size,
        )


def count_flops(module: nn.Module, example: torch.Tensor | Sequence[Any] | Mapping[str, Any]) -> FlopCount:
    """FLOPs of one forward of ``module`` on ``example`` (a tensor, a tuple of positional arguments or a dict of
    keyword arguments), in eval mode without gradients; the module's training mode is restored.

    Counted on the whole example: divide by the batch with :meth:`FlopCount.per_image`.
    """
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), FlopCounter() as counter:
            if isinstance(example, Mapping):
                module(**example)
            elif isinstance(example, tuple | list):
                module(*example)
            else:
                module(example)
    finally:
        module.train(was_training)
    return counter.count(_batch_size(example))


def _batch_size(example: Any) -> int:
    tensors = (
        list(example.values())
        if isinstance(example, Mapping)
        else list(example)
        if isinstance(example, tuple | list)
        else [example]
    )
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            return int(t.shape[0])
    return 1
