"""Tucker and CP approximations of an attention tensor A in R^{(B x) H x T x T} and their product with V.

Seed: seeds/vit_nla_slides.txt, slide "Used methods. Tensor decomposition". The slides reshape the attention
tensor to a matrix and take an SVD; here the tensor is decomposed as a tensor, over its head, query and key modes:

- Tucker (HOSVD, optionally refined by HOOI; TensorLy ``partial_tucker``):
  A ~= A_hat = G x_h U_h x_q U_q x_k U_k with orthonormal factors U_h in R^{H x R_h}, U_q in R^{T x R_q},
  U_k in R^{T x R_k}. The factors come from TensorLy on the *detached* tensor; the core is then recomputed in
  torch as the orthogonal projection G = A x_h U_h^T x_q U_q^T x_k U_k^T (:func:`project_core`), so A_hat is
  differentiable in A with the factors held constant.
- CP (TensorLy ``parafac``): A ~= A_hat = sum_r u_h,r o u_q,r o u_k,r. The head and key factors come from
  TensorLy on the detached tensor; the query factor is then re-solved in closed form by linear least squares
  from A (:func:`cp_solve_factor`), which is differentiable in A. A_hat is then the orthogonal projection of A
  onto the span of the tensors {u_h,r o x o u_k,r : x in R^T}.

Both ways A_hat is an orthogonal projection of A, so ||A_hat||^2 + ||A - A_hat||^2 = ||A||^2 and the retained
energy ||A_hat||^2 / ||A||^2 lies in [0, 1].

Products with V are evaluated without forming A_hat (:func:`tucker_apply`, :func:`cp_apply`).
Pure tensor maths: no nn.Module, no config.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import tensorly as tl
import torch
from tensorly.decomposition import parafac, partial_tucker

from lrk.linalg.cp import mttkrp
from lrk.linalg.rank import energy_rank
from lrk.linalg.svd import tensorly_svd
from lrk.linalg.tucker import unfolding


# --- helpers ------------------------------------------------------------------------------------------------
def mode_product(tensor: torch.Tensor, matrix: torch.Tensor, mode: int) -> torch.Tensor:
    """Mode-``mode`` product ``tensor x_mode matrix``: that mode's index i is replaced by j = sum_i M[j, i] X[..i..]."""
    return torch.movedim(torch.tensordot(matrix, torch.movedim(tensor, mode, 0), dims=([1], [0])), 0, mode)


def _factor_dtype(tensor: torch.Tensor) -> torch.dtype:
    return tensor.dtype if tensor.dtype in (torch.float32, torch.float64) else torch.float32


def check_ranks(shape: Sequence[int], ranks: Sequence[int], modes: Sequence[int]) -> None:
    """Each rank must lie in [1, size of its mode] (ValueError otherwise)."""
    if len(ranks) != len(modes):
        raise ValueError(f"{len(ranks)} ranks given for {len(modes)} modes {list(modes)}")
    for mode, r in zip(modes, ranks, strict=True):
        if not 1 <= r <= shape[mode]:
            raise ValueError(
                f"rank {r} for mode {mode} of a {tuple(shape)} tensor is invalid: it must lie in [1, {shape[mode]}]"
            )


# --- rank choice --------------------------------------------------------------------------------------------
def mode_spectrum(tensor: torch.Tensor, mode: int) -> torch.Tensor:
    """Singular values (float64, descending) of the mode-``mode`` unfolding, from the eigenvalues of its Gram
    matrix (the unfoldings of an attention tensor are short and wide)."""
    m = unfolding(tensor.detach().double(), mode)
    evals = torch.linalg.eigvalsh(m @ m.T)
    return evals.flip(0).clamp_min(0.0).sqrt()


def mode_energy_ranks(tensor: torch.Tensor, energy: float, modes: Sequence[int]) -> list[int]:
    """Per mode, the smallest rank keeping ``energy`` (phi) of the mode unfolding's energy (SDRM Eqs. 2-3 applied
    to each unfolding's spectrum: the truncation rule of the HOSVD)."""
    return [energy_rank(mode_spectrum(tensor, m), energy) for m in modes]


# --- Tucker -------------------------------------------------------------------------------------------------
def tucker_factors(
    tensor: torch.Tensor, ranks: Sequence[int], modes: Sequence[int], n_iter_max: int = 0, tol: float = 1e-6
) -> list[torch.Tensor]:
    """Orthonormal Tucker factors of ``tensor`` over ``modes`` (the other modes kept at full rank), by TensorLy's
    ``partial_tucker`` on the detached tensor: the truncated HOSVD, refined by ``n_iter_max`` HOOI sweeps
    (0 = HOSVD alone). Constants (no gradient), in ``tensor``'s dtype (float32 at least)."""
    check_ranks(tensor.shape, ranks, modes)
    dtype = _factor_dtype(tensor)
    x = tensor.detach().to(dtype)
    with tl.backend_context("pytorch", local_threadsafe=True):
        (_, factors), _ = partial_tucker(
            x, rank=list(ranks), modes=list(modes), n_iter_max=n_iter_max, tol=tol, svd=tensorly_svd
        )
    return [f.detach().to(dtype) for f in factors]


def project_core(tensor: torch.Tensor, factors: Sequence[torch.Tensor], modes: Sequence[int]) -> torch.Tensor:
    """The Tucker core G = A x_m U_m^T over ``modes``: the best core for orthonormal factors (differentiable in
    ``tensor``). The mode with the largest reduction goes first, which keeps the intermediates small."""
    order = sorted(range(len(modes)), key=lambda i: factors[i].shape[1] / factors[i].shape[0])
    core = tensor
    for i in order:
        core = mode_product(core, factors[i].to(tensor.dtype).T, modes[i])
    return core


def tucker_to_tensor(
    core: torch.Tensor, factors: Sequence[torch.Tensor], modes: Sequence[int]
) -> torch.Tensor:
    """A_hat = G x_m U_m over ``modes`` (the dense approximation; for tests and diagnostics)."""
    out = core
    for factor, mode in zip(factors, modes, strict=True):
        out = mode_product(out, factor.to(core.dtype), mode)
    return out


def tucker_apply(core: torch.Tensor, factors: Sequence[torch.Tensor], values: torch.Tensor) -> torch.Tensor:
    """A_hat V per head without forming A_hat: out_h = U_q [(G x_h U_h)_h] (U_k^T V_h).

    ``core``: [..., R_h, R_q, R_k] over (head, query, key); ``factors``: (U_h [H, R_h], U_q [T, R_q], U_k [T, R_k]),
    shared by the leading (batch) axes; ``values``: [..., H, T, d]. Returns [..., H, T, d]. Cost per image:
    H (T R_k d + R_h R_q R_k + R_q R_k d + T R_q d), against H T^2 (R + d) for forming A_hat and multiplying.
    """
    u_h, u_q, u_k = (f.to(values.dtype) for f in factors)
    reduced = torch.einsum("jc,...hjd->...hcd", u_k, values)  # U_k^T V_h: [..., H, R_k, d]
    mixed = torch.einsum("ha,...abc->...hbc", u_h, core)  # (G x_h U_h)_h: [..., H, R_q, R_k]
    return torch.einsum("ib,...hbd->...hid", u_q, mixed @ reduced)


def tucker_energy(core: torch.Tensor, tensor: torch.Tensor) -> float:
    """Retained energy ||A_hat||^2 / ||A||^2 = ||G||^2 / ||A||^2 (orthonormal factors)."""
    total = float(tensor.detach().double().square().sum())
    return float(core.detach().double().square().sum()) / total if total > 0 else 1.0


# --- CP -----------------------------------------------------------------------------------------------------
def cp_factors(
    tensor: torch.Tensor, rank: int, n_iter_max: int = 20, tol: float = 1e-8, seed: int = 0
) -> list[torch.Tensor]:
    """Rank-``rank`` CP factors of ``tensor`` (one [I_n, R] matrix per mode) by TensorLy's ``parafac`` (ALS from
    the SVD initialisation, seeded) on the detached tensor; the weights are folded into the first factor.
    Constants (no gradient), in ``tensor``'s dtype (float32 at least)."""
    if rank < 1:
        raise ValueError(f"CP rank {rank} is invalid: it must be a positive integer")
    dtype = _factor_dtype(tensor)
    x = tensor.detach().to(dtype)
    with tl.backend_context("pytorch", local_threadsafe=True), warnings.catch_warnings():
        # TensorLy warns when the rank exceeds a mode's size; it then pads the SVD start with random columns
        warnings.simplefilter("ignore", UserWarning)
        weights, factors = parafac(
            x, rank, n_iter_max=n_iter_max, init="svd", svd=tensorly_svd, tol=tol, random_state=seed
        )
    factors = [f.detach().to(dtype) for f in factors]
    factors[0] = factors[0] * weights.detach().to(dtype)
    return factors


def cp_solve_factor(
    tensor: torch.Tensor, factors: Sequence[torch.Tensor], mode: int, ridge: float = 1e-9
) -> torch.Tensor:
    """Least-squares factor of ``mode`` with the other factors fixed (one ALS update, in closed form):
    A_mode = X_(mode) KR (V)^{-1}, V = Hadamard product of the other factors' Gram matrices.

    Differentiable in ``tensor`` (the other factors are constants). A ridge of ``ridge`` times V's mean diagonal
    keeps V invertible when the rank exceeds what the other factors can separate.
    """
    dtype = tensor.dtype
    others = [f.to(dtype) for f in factors]
    m = mttkrp(tensor, others, mode)  # [I_mode, R]
    gram = None
    for n, f in enumerate(others):
        if n != mode:
            g = f.T @ f
            gram = g if gram is None else gram * g
    assert gram is not None
    rank = gram.shape[0]
    gram = gram + (ridge * float(gram.diagonal().mean()) + torch.finfo(dtype).tiny) * torch.eye(
        rank, dtype=dtype, device=gram.device
    )
    return torch.linalg.solve(gram, m.T).T


def cp_reconstruct(factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Dense tensor sum_r a_0r o a_1r o ... of CP factors (unit weights)."""
    letters = "abcdefghijklmnopqrstuvwxy"[: len(factors)]
    spec = ",".join(f"{c}z" for c in letters) + "->" + letters
    return torch.einsum(spec, *factors)


def cp_apply(
    head: torch.Tensor, query: torch.Tensor, key: torch.Tensor, values: torch.Tensor
) -> torch.Tensor:
    """A_hat V per head without forming A_hat, for A_hat[..., h, i, j] = sum_r U_h[h, r] U_q[..., i, r] U_k[j, r]:
    out[..., h, i] = sum_r U_q[..., i, r] U_h[h, r] (U_k^T V_h)[r]. ``head`` [H, R] and ``key`` [T, R] are shared,
    ``query`` is [..., T, R] (one per image), ``values`` [..., H, T, d]. Cost per image 2 H T R d."""
    head, key = head.to(values.dtype), key.to(values.dtype)
    reduced = torch.einsum("jr,...hjd->...hrd", key, values) * head[:, :, None]  # [..., H, R, d]
    return torch.einsum("...ir,...hrd->...hid", query, reduced)


def cp_energy(factors: Sequence[torch.Tensor], tensor: torch.Tensor) -> float:
    """Retained energy ||A_hat||^2 / ||A||^2 of a CP model, from the factors' Gram matrices."""
    total = float(tensor.detach().double().square().sum())
    gram = None
    for f in factors:
        g = f.detach().double().T @ f.detach().double()
        gram = g if gram is None else gram * g
    assert gram is not None
    return float(gram.sum()) / total if total > 0 else 1.0


def stacked_query_tensor(attention: torch.Tensor) -> torch.Tensor:
    """[B, H, T, T] -> [H, B T, T]: the images' query modes side by side (images b's rows b T .. b T + T - 1).
    A CP of this tensor shares the head and key factors over the batch and gives every image its own query rows."""
    b, h, t, k = attention.shape
    return attention.permute(1, 0, 2, 3).reshape(h, b * t, k)
