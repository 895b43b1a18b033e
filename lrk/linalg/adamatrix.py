"""AdaMatrix: SDRM's gradient iteration for the truncated SVD (seeds/sdrm_paper.txt, section 3.2, Algorithm 1).

What lrk's default (``variant="engineered"``) is, in plain terms: a warm-started block subspace iteration. U and S
come in closed form (Rayleigh-Ritz on Y V), V takes one curvature-scaled gradient step of Eq. (4) with lr 1, no
momentum and betas (0, 0), which is exactly one block power iteration V <- orth(Y^T U S^-T) (point 3 below), and
:class:`AdaMatrixSolver` starts every call from the previous call's block (the previous batch's V). The paper's
Adam with momentum and Nesterov look-ahead is kept as ``variant="paper"`` (it does not converge, table below).

The paper: loss Eq. (4) L = ||Y - U S V^T||_F^2 + lambda1 ||S||_1 + lambda2 ||U||_* + lambda3 ||V||_* (printed
with -lambda1; Eq. 6's +lambda1 sign(S) and "regularization ... to compress" make it a penalty, + here),
gradients Eqs. (5)-(7) with an element-wise weight W initialised from w_i = s_i^2 / sum_{j<=r} s_j^2 (Eq. 8),
Adam moments Eqs. (9)-(10), the update Eq. (11) with a momentum term m * DeltaPsi_prev and a Nesterov look-ahead
(Algorithm 1 l.12), QR of U and V after every update (l.24-25), random normal U, S (r x r), V (l.3-8); lr 1e-4
and lambdas 1e-3, 1e-4, 1e-4 (Fig. 6 caption). ``variant="paper"`` implements exactly that.

As published it does not converge. ``python benchmarks/tsvd.py --ablation`` (3000 x 96 ViT-like tokens, power
spectrum, r = 23 at phi = 0.9, 3 seeds; updates until the error is within 1 % of the Eckart-Young optimum, and
where the default tolerance stop lands; design.md: 12608 x 192 had not converged after 2000 steps / 56 s):

  variant                                                  updates to 1.01 x opt   error / optimum
  Algorithm 1 as published, raw Y, lr 1e-4, 2000 steps     never                   19.2 - 22.2
  + ||Y||_F = 1, lr 1e-3 / 1e-2, 2000 steps                never                   2.6 - 3.8 / 1.32 - 1.39
  closed-form U, S + Adam (Eqs. 9-10) on V, lr 1e-2        76, >300, >300 (random) 1.010 - 1.013
                                                           8 - 16 (spectral)       tol stop: 1.0125
  engineered (default), random start                       4 - 5                   tol stop: 1.0025 - 1.0035
  engineered (default), spectral start                     1 - 2                   tol stop: 1.0013 - 1.0027
  engineered + the paper's betas (0.9, 0.999)              1 - 2                   tol stop: 1.010 - 1.012 (!)
  engineered + momentum 0.2 / 0.5                          1 / 1 - 3               tol stop: <= 1.0036
  engineered + W of Eq. 8                                  178 - 221 (spectral)    tol stop: 1.044 - 1.049 (!)
                                                           never (random, 300)     1.057 - 1.062
  engineered + oversample r/4                              1                       tol stop: 1.0003 - 1.0006

What lrk changes relative to the paper, and why:

1. Scale (``normalize=True``): Y is divided by ||Y||_F, so lr and the lambdas are relative to the data
   (raw Y at lr 1e-4: 19x the optimum after 2000 steps; the same steps on ||Y||_F = 1 at lr 1e-2: 1.3x).
2. U and S in closed form: Eqs. (5) and (6) set to zero. For a given V the best orthonormal U spans Y V and the
   best r x r S (Algorithm 1 keeps S a full r x r matrix, l.4) is U^T Y V. lrk takes them in the Ritz basis,
   the eigenvectors W of C = (Y V)^T (Y V) / ||Y||^2: then S = diag(sig) with sig^2 the eigenvalues, U = Y V W /
   sig, and the L1 term of Eq. (4) soft-thresholds it, S = max(sig - lambda1 / 2, 0). Only V is iterated. One
   iteration is two passes over Y (Y V and Y^T (Y V)), O(mnr) as Theorem 2 counts; U is formed once, at the end.
3. The second moment is the curvature (``update="newton"``, default): Eq. (10) estimates each coordinate's
   gradient scale from g^2; for Eq. (4) in V the exact curvature is known, 2 S_j^2 for component j, so
   v_j = (2 S_j^2)^2 (beta2-averaged) and Eq. (11)'s step is DeltaV_j = lr * m_j / (2 S_j^2): a learning rate
   per singular component, which is what the paper says Adam is for ("fit it to different singular value
   components"). With lr = 1 the step lands on the minimiser of Eq. (4) in V for fixed U, S, i.e. one block power
   (subspace) iteration V <- orth(Y^T U S^-T), whose convergence is known. The element-wise Adam of the paper is
   kept as ``update="adam"``: its step size is set by lr, not by the error, so it creeps (8 - 300+ updates) and
   the tolerance stop lands 1.2 - 1.7 % above the optimum.
4. betas = (0, 0) and momentum m = 0 by default: with exact (not stochastic) gradients the moving averages only
   add lag; with the paper's Adam betas the error falls so slowly that the tolerance stop fired 1.0 - 1.2 %
   above the optimum. Momentum 0.2 saved at most one update and makes the error non-monotone, which the
   tolerance stop misreads. Both stay available. The look-ahead V - m DeltaV_prev is re-orthonormalised (QR):
   the closed-form S assumes orthonormal V.
5. W of Eq. (8), ``weighting=False`` by default. Interpretation: "we map w_i to the elements of U and V" = the
   gradient columns of component i are scaled by w_i (normalised to max 1), dL/dV * (1 w^T), with w from the
   current S. A positive per-column scale does not change where the gradient vanishes, so W cannot move the
   optimum (test: started at the exact factors, weighting stays there), but w_i ~ s_i^2 cancels the 1 / s_i^2
   step of (3): 178 - 221 updates from a spectral start, never within 1 % in 300 from a random one. A literal
   element-wise weight on the m x n residual would change the minimiser (weighted low-rank approximation has no
   SVD solution), which is why lrk does not read Eq. (5)'s W that way.
6. Nuclear norms (lambda2, lambda3): for orthonormal U, V the norm is the constant r and its subgradient is U
   (V) itself; the paper writes the norm (a scalar) into Eqs. (5) and (7), lrk uses the subgradient. QR
   re-normalises what they shrink: lambda2 cannot change the closed-form U; lambda3 V enters Eq. (7) as written.
7. L1 (lambda1): during the iteration S is soft-thresholded (2.); the returned S is refitted without the
   shrinkage (``debias=True``) so that full rank reproduces Y (phi = 1 must equal dense attention).
   ``debias=False`` returns the shrunk S (S - lambda1 ||Y||_F / 2).
8. Starts: ``init="spectral"`` (default) = the leading eigenvectors of the Gram matrix of max(2n, 256)
   uniformly sampled rows (a few % of one Gram product); ``"random"`` = Algorithm 1 l.3-8; or a warm start: a
   [n, k] basis, e.g. the previous batch's V (``AdaMatrixSolver`` keeps it across calls).
9. Stopping: Algorithm 1 l.10 stops below an absolute loss epsilon; lrk stops when the relative error changes
   by at most ``tol`` (1e-3) between iterations (or at ``target_error``; ``max_iter`` -> ``converged=False``).
   On these spectra the remaining excess is 1.5 - 3x the last change: tol 1e-3 stops within 0.05 - 0.35 %.
10. Energy rank: phi is applied to the Ritz values of the factors actually returned (energy >= phi); the block
   starts at the row sample's energy rank + 1 (+ ``oversample``) and widens when it cannot hold phi.
11. Divergence (NaN/inf anywhere): the exact gram solver's result, ``fell_back=True``, logged as a warning.

Cost and Theorem 2 (AdaMatrix cheaper than a direct SVD): one iteration costs two thin products, 4mnr flops,
against m n^2 for the Gram product that the direct route needs, i.e. 4r/n of it; a warm start needs 1 - 2
updates, a spectral start 3 - 4 (to tol). Measured by benchmarks/tsvd.py (1 thread; shared, noisy machine),
time to within 1 % of the optimum with the default tolerance stop, in Gram products Y^T Y, for 12608 x 192 /
50432 x 384 / 200704 x 768 (r = 36 / 57 / 86): AdaMatrix warm 2.2 / 2.1 / 1.4, spectral start 4.2 / 3.9 / 2.0;
gram 1.8 / 1.6 / 1.3; torch.linalg.svd 6.7 / 9.0 / (not run); torch.svd_lowrank 4.0 / 4.3 / 2.5. Theorem 2
holds against a full SVD, not against the Gram route that its own proof describes: AdaMatrix comes close to
gram only warm-started and with r << n.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, fields

import torch

from lrk.linalg.rank import energy_rank
from lrk.linalg.tsvd import (
    TruncatedSVD,
    check_request,
    complete_orthonormal,
    gram_svd,
    sample_spectrum,
    small_lapack_threads,
    squared_norm,
)

_log = logging.getLogger(__name__)

PAPER_LR = 1e-4  # Fig. 6 caption
PAPER_ENERGY = 0.9  # Fig. 6 caption (phi)
PAPER_LAMBDAS = (1e-3, 1e-4, 1e-4)  # Fig. 6 caption (lambda1 on S, lambda2 on U, lambda3 on V)
ADAM_BETAS = (0.9, 0.999)  # Adam's usual moments; the paper gives none
INITS = ("spectral", "random")
UPDATES = ("newton", "adam")
VARIANTS = ("engineered", "paper")


@dataclass
class _Options:
    init: str | torch.Tensor = "spectral"
    lr: float | None = None
    momentum: float | None = None
    betas: tuple[float, float] | None = None
    eps: float = 1e-8
    lambdas: tuple[float, float, float] = PAPER_LAMBDAS
    weighting: bool = False
    update: str = "newton"
    oversample: int | None = None
    max_iter: int = 100
    tol: float = 1e-3
    target_error: float | None = None
    sample_rows: int | None = None
    normalize: bool = True
    debias: bool = True
    generator: torch.Generator | None = None
    variant: str = "engineered"


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)


def _resolve(opts: _Options) -> _Options:
    """Validate the options and fill the variant-dependent defaults."""
    if opts.variant not in VARIANTS:
        raise ValueError(f"variant={opts.variant!r} is invalid: it must be one of {', '.join(VARIANTS)}")
    if opts.update not in UPDATES:
        raise ValueError(f"update={opts.update!r} is invalid: it must be one of {', '.join(UPDATES)}")
    if not isinstance(opts.init, torch.Tensor) and opts.init not in INITS:
        raise ValueError(f"init={opts.init!r} is invalid: it must be one of {', '.join(INITS)} or a tensor")
    paper = opts.variant == "paper"
    if opts.lr is None:
        opts.lr = PAPER_LR if paper else 1.0
    if opts.momentum is None:
        opts.momentum = 0.5 if paper else 0.0
    if opts.betas is None:
        opts.betas = ADAM_BETAS if paper else (0.0, 0.0)
    if not _is_real(opts.lr) or opts.lr <= 0:
        raise ValueError(f"lr={opts.lr!r} is invalid: it must be a positive number")
    if not _is_real(opts.momentum) or not 0.0 <= opts.momentum < 1.0:
        raise ValueError(f"momentum={opts.momentum!r} is invalid: it must lie in [0, 1)")
    betas = tuple(opts.betas)
    if len(betas) != 2 or not all(_is_real(b) and 0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas={opts.betas!r} is invalid: it must be two numbers in [0, 1)")
    opts.betas = (float(betas[0]), float(betas[1]))
    lambdas = tuple(opts.lambdas)
    if len(lambdas) != 3 or not all(_is_real(v) and v >= 0 for v in lambdas):
        raise ValueError(f"lambdas={opts.lambdas!r} is invalid: it must be three non-negative numbers")
    opts.lambdas = (float(lambdas[0]), float(lambdas[1]), float(lambdas[2]))
    if not _is_real(opts.eps) or opts.eps <= 0:
        raise ValueError(f"eps={opts.eps!r} is invalid: it must be a positive number")
    if isinstance(opts.max_iter, bool) or not isinstance(opts.max_iter, int) or opts.max_iter < 1:
        raise ValueError(f"max_iter={opts.max_iter!r} is invalid: it must be a positive integer")
    if not _is_real(opts.tol) or opts.tol < 0:
        raise ValueError(f"tol={opts.tol!r} is invalid: it must be a non-negative number")
    if opts.target_error is not None and (not _is_real(opts.target_error) or opts.target_error < 0):
        raise ValueError(
            f"target_error={opts.target_error!r} is invalid: it must be a non-negative number or None"
        )
    for name in ("oversample", "sample_rows"):
        value = getattr(opts, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"{name}={value!r} is invalid: it must be a non-negative integer or None")
    return opts


def energy_weights(s: torch.Tensor, rank: int) -> torch.Tensor:
    """Eq. (8): w_i = s_i^2 / sum_{j<=r} s_j^2, for every component i of ``s`` (including any beyond r)."""
    sq = s.double() ** 2
    total = sq[:rank].sum()
    return sq / total if total > 0 else torch.ones_like(sq)


def _orth(A: torch.Tensor) -> torch.Tensor:
    """Q of the thin QR of A with a non-negative diagonal of R (Algorithm 1, lines 7-8 and 24-25)."""
    with small_lapack_threads(A.device):
        Q, R = torch.linalg.qr(A)
    return Q * torch.where(torch.diagonal(R) < 0, -1.0, 1.0).to(Q.dtype)


def _random_orth(n: int, k: int, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Algorithm 1, lines 5 and 8: a random normal n x k matrix, orthonormalised by QR."""
    G = torch.randn(n, k, generator=generator, dtype=torch.float64)
    return _orth(G).to(device=like.device, dtype=like.dtype)


def _extend(V: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
    """Widen an orthonormal V [n, k0] to k columns (random directions orthogonal to V) or cut it to k."""
    n, k0 = V.shape
    if k0 >= k:
        return V[:, :k]
    extra = _random_orth(n, k - k0, V, generator)
    extra = extra - V @ (V.T @ extra)
    return _orth(torch.cat([V, extra], dim=1))


def _ritz(C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of the small Gram matrix C = Z^T Z, descending, eigenvector signs fixed so that
    diag(W) >= 0 (columns keep their identity across iterations, so the moments stay aligned)."""
    with small_lapack_threads(C.device):
        evals, W = torch.linalg.eigh(C)
    evals, W = evals.flip(0).clamp_min(0.0), W.flip(1)
    return evals, W * torch.where(torch.diagonal(W) < 0, -1.0, 1.0).to(W.dtype)


class _Diverged(RuntimeError):
    pass


def _explained(S: torch.Tensor, sig: torch.Tensor) -> torch.Tensor:
    """Cumulative explained energy of the leading components: ||Y||^2 - ||Y - U S V^T||^2 with
    U S V^T's components j <= r, = sum_j (2 S_j sig_j - S_j^2) (= sum sig_j^2 without the L1 shrinkage)."""
    return torch.cumsum(2 * S * sig - S * S, 0)


def _energy_cut(expl: torch.Tensor, energy: float) -> int | None:
    hits = torch.nonzero(expl >= energy * (1 - 1e-12))
    return int(hits[0]) + 1 if hits.numel() else None


@dataclass
class _State:
    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor
    rank: int
    rel_error: float
    iterations: int
    converged: bool
    block: torch.Tensor  # [n, k] orthonormal block in Ritz order, the warm start of the next call


def _engineered(
    Y: torch.Tensor, total: float, rank: int | None, energy: float | None, V: torch.Tensor, o: _Options
) -> _State:
    """The engineered AdaMatrix loop on tall Y (see the module docstring for each step's equation)."""
    _m, n = Y.shape
    dt = Y.dtype
    lam1, _lam2, lam3 = o.lambdas  # lambda2 acts on U, which is solved in closed form (see docstring)
    beta1, beta2 = o.betas
    mu, lr = float(o.momentum), float(o.lr)
    p = o.oversample if o.oversample is not None else 0
    k = V.shape[1]
    M = torch.zeros_like(V)  # Eq. 9 first moment
    Q2 = torch.zeros(k, dtype=torch.float64, device=V.device) if o.update == "newton" else torch.zeros_like(V)
    D = torch.zeros_like(V)  # Delta V_prev of Eq. 11
    prev_err: float | None = None
    prev_r: int | None = None
    it = 0
    while True:
        # Algorithm 1 l.12: Nesterov look-ahead V~ = V - m * DeltaV_prev, re-orthonormalised (l.24-25)
        Vt = _orth(V - mu * D) if mu > 0 and it > 0 else V
        Z = Y @ Vt  # one pass over Y
        C = (Z.T @ Z).double() / total
        if not bool(torch.isfinite(C).all()):
            raise _Diverged("non-finite U^T Y V")
        # Eqs. 5-6 set to zero: the best U (orthonormal) and S for this V in closed form, in the Ritz basis
        # (S diagonal): U = Z W / sig, S = soft-threshold(sig, lambda1 / 2) (the L1 term of Eq. 4)
        lam, W = _ritz(C)
        sig = lam.sqrt()
        S = (sig - lam1 / 2).clamp_min(0.0)
        S_out = sig if o.debias else S  # returned S: refitted without the L1 shrinkage unless debias=False
        expl = _explained(S_out, sig)
        if rank is not None:
            r = rank
        else:
            cut = _energy_cut(expl, energy)  # type: ignore[arg-type]
            if (cut is None or cut >= k) and k < n:  # the block cannot hold phi with a spare column: widen
                k_new = min(n, max(2 * k, (cut or k) + max(p, 1)))
                Vt = _extend(Vt @ W.to(dt), k_new, o.generator)
                V, k = Vt, k_new
                M, D, Q2 = _extend_zero(M @ W.to(dt), k), _extend_zero(D @ W.to(dt), k), _extend_zero(Q2, k)
                prev_err = prev_r = None
                continue
            r = cut if cut is not None else k
        err = math.sqrt(max(1.0 - float(expl[r - 1]), 0.0))  # Eq. 4's data term, relative
        if not math.isfinite(err):
            raise _Diverged("non-finite error")
        done = o.target_error is not None and err <= o.target_error
        if prev_err is not None and r == prev_r and abs(prev_err - err) <= o.tol * max(err, 1e-30):
            done = True
        if done or it >= o.max_iter:
            Wd = W.to(dt)
            block = Vt @ Wd
            good = sig[:r] > 0
            U = (
                (Z @ Wd[:, :r])
                / torch.where(good, sig[:r], torch.ones_like(sig[:r])).to(dt)
                / math.sqrt(total)
            )
            U = complete_orthonormal(U, good)
            S_out = (S_out[:r] * math.sqrt(total)).to(dt)
            keep = min(k, r + max(p, 0 if rank is not None else 1))  # warm start: r + oversample columns
            return _State(U, S_out, block[:, :r], r, err, it, done, block[:, :keep])
        prev_err, prev_r = err, r
        # Eq. 7: dL/dV = 2 (V S^T S - Y^T U S) + lambda3 dV||V||_* (= V for orthonormal V), in the Ritz basis
        Wd = W.to(dt)
        P = (Y.T @ Z) @ Wd / total  # second pass over Y: Y^T U S = P diag(S / sig)
        Vr = Vt @ Wd
        ratio = torch.where(sig > 0, S / sig.clamp_min(1e-300), torch.zeros_like(sig)).to(dt)
        g = 2 * (Vr * (S * S).to(dt) - P * ratio) + lam3 * Vr
        if o.weighting:  # Eq. 8 weights mapped onto the columns (components) of V, scaled to max 1
            w = energy_weights(S, r)
            g = g * (w / w.max().clamp_min(1e-300)).to(dt)
        t = it + 1
        M = beta1 * (M @ Wd) + (1 - beta1) * g  # Eq. 9
        m_hat = M / (1 - beta1**t)
        if o.update == "newton":  # Eq. 10 with the exact curvature of Eq. 4 in V, (2 S_j^2)^2, for g^2
            Q2 = beta2 * Q2 + (1 - beta2) * (2 * S * S) ** 2
            denom = (Q2 / (1 - beta2**t)).sqrt()
            step = torch.where(
                denom > 0, lr * m_hat / denom.clamp_min(1e-300).to(dt), torch.zeros_like(m_hat)
            )
        else:  # Eq. 10 as published: element-wise second moment of the gradient
            Q2 = beta2 * (Q2 @ (Wd * Wd)) + (1 - beta2) * g * g
            step = lr * m_hat / ((Q2 / (1 - beta2**t)).sqrt() + o.eps)
        D = step + mu * (D @ Wd)  # Eq. 11: Delta V = eta m^ / sqrt(v^) + m Delta V_prev
        V = _orth(Vr - D)  # Eq. 11's update, then QR (Algorithm 1 l.24-25)
        if not bool(torch.isfinite(V).all()):
            raise _Diverged("non-finite V")
        it += 1


def _extend_zero(A: torch.Tensor, k: int) -> torch.Tensor:
    """Pad the last dimension of a moment/momentum buffer with zeros up to k."""
    pad = k - A.shape[-1]
    if pad <= 0:
        return A[..., :k]
    return torch.cat([A, A.new_zeros((*A.shape[:-1], pad))], dim=-1)


def _paper(Y: torch.Tensor, total: float, r: int, o: _Options) -> _State:
    """Algorithm 1 as published: Adam (Eqs. 9-11) with Nesterov look-ahead on U, S (r x r) and V from a random
    start, QR of U and V after every update. Forms the m x n residual each step: for small matrices only."""
    m, n = Y.shape
    dt = Y.dtype
    lam1, lam2, lam3 = o.lambdas
    beta1, beta2 = o.betas
    mu, lr = float(o.momentum), float(o.lr)
    scale = math.sqrt(total) if o.normalize else 1.0
    Yn = Y / scale
    gen = o.generator
    U = _random_orth(m, r, Y, gen)  # l.3, l.7
    S = torch.randn(r, r, generator=gen, dtype=torch.float64).to(device=Y.device, dtype=dt)  # l.4
    V = _random_orth(n, r, Y, gen)  # l.5, l.8
    params = [U, S, V]
    M = [torch.zeros_like(x) for x in params]
    Q2 = [torch.zeros_like(x) for x in params]
    D = [torch.zeros_like(x) for x in params]  # l.6
    prev_err: float | None = None
    it = 0
    while True:
        Ut, St, Vt = (x - mu * d for x, d in zip(params, D, strict=True))  # l.12, Nesterov look-ahead
        E = Ut @ St @ Vt.T - Yn
        err = float(torch.linalg.vector_norm(E).double()) / (math.sqrt(total) / scale)
        if not math.isfinite(err):
            raise _Diverged("non-finite residual")
        done = o.target_error is not None and err <= o.target_error
        if prev_err is not None and abs(prev_err - err) <= o.tol * max(err, 1e-30):
            done = True
        if done or it >= o.max_iter:
            break
        prev_err = err
        gU = 2 * E @ Vt @ St.T + lam2 * Ut  # Eq. 5 (d||U||_* = U for orthonormal U)
        gS = 2 * Ut.T @ E @ Vt + lam1 * torch.sign(St)  # Eq. 6
        gV = 2 * E.T @ Ut @ St + lam3 * Vt  # Eq. 7
        if o.weighting:  # Eq. 8 on the components (columns of S's energy), mapped onto U's and V's columns
            w = energy_weights(torch.linalg.vector_norm(St, dim=0), r)
            w = (w / w.max().clamp_min(1e-300)).to(dt)
            gU, gV = gU * w, gV * w
        t = it + 1
        for i, g in enumerate((gU, gS, gV)):
            M[i] = beta1 * M[i] + (1 - beta1) * g  # Eq. 9
            Q2[i] = beta2 * Q2[i] + (1 - beta2) * g * g  # Eq. 10
            step = lr * (M[i] / (1 - beta1**t)) / ((Q2[i] / (1 - beta2**t)).sqrt() + o.eps)
            D[i] = step + mu * D[i]  # Eq. 11
            params[i] = params[i] - D[i]
        params[0], params[2] = _orth(params[0]), _orth(params[2])  # l.24-25
        if not all(bool(torch.isfinite(x).all()) for x in params):
            raise _Diverged("non-finite factors")
        it += 1
    # output: diagonalise the r x r S (S = P diag(s) Q^T) so that U diag(s) V^T is an SVD-shaped result
    P_, s, Qh = torch.linalg.svd(St.double())
    U_out, V_out = Ut @ P_.to(dt), Vt @ Qh.T.to(dt)
    return _State(U_out, (s * scale).to(dt), V_out, r, err, it, done, V_out)


def adamatrix(
    Y: torch.Tensor,
    rank: int | None = None,
    energy: float | None = None,
    *,
    init: str | torch.Tensor = "spectral",
    lr: float | None = None,
    momentum: float | None = None,
    betas: tuple[float, float] | None = None,
    eps: float = 1e-8,
    lambdas: tuple[float, float, float] = PAPER_LAMBDAS,
    weighting: bool = False,
    update: str = "newton",
    oversample: int | None = None,
    max_iter: int = 100,
    tol: float = 1e-3,
    target_error: float | None = None,
    sample_rows: int | None = None,
    normalize: bool = True,
    debias: bool = True,
    generator: torch.Generator | None = None,
    variant: str = "engineered",
) -> TruncatedSVD:
    """Truncated SVD of Y by AdaMatrix (SDRM section 3.2, Algorithm 1); exactly one of ``rank`` / ``energy``.

    ``init``: "spectral" (leading right singular vectors of a row sample of Y), "random" (Algorithm 1, l.3-8)
    or a tensor [min(m, n), k] on Y's shorter side (V for tall Y; e.g. the previous batch's V: warm start).
    ``lr``, ``momentum`` (m of Eq. 11), ``betas`` (Eqs. 9-10): defaults 1.0, 0, (0, 0) for the engineered
    variant and 1e-4, 0.5, (0.9, 0.999) for ``variant="paper"`` (Algorithm 1 as published). ``lambdas``:
    (lambda1, lambda2, lambda3) of Eq. 4 (Fig. 6 caption), relative to ||Y||_F = 1 when ``normalize``.
    ``weighting``: the Eq. 8 weights (off by default). ``update``: "newton" (curvature second moment) or
    "adam" (Eq. 10 as published). ``oversample``: extra columns iterated beyond r (default 0; in energy mode
    at least one). ``debias``: return S refitted without the L1 shrinkage (the least-squares S of the final
    U, V), so that full rank reproduces Y. Stops when the relative error changes by at most ``tol`` (relative) between iterations,
    reaches ``target_error``, or after ``max_iter`` updates (``converged=False``). NaN/inf falls back to the
    exact gram solver (``fell_back=True``, logged as a warning).
    """
    o = _Options(
        init, lr, momentum, betas, eps, tuple(lambdas), weighting, update, oversample, max_iter, tol,
        target_error, sample_rows, normalize, debias, generator, variant,
    )  # fmt: skip
    return _solve(Y, rank, energy, o)[0]


def _solve(
    Y: torch.Tensor, rank: int | None, energy: float | None, o: _Options
) -> tuple[TruncatedSVD, torch.Tensor | None]:
    """Validate, run, fall back on divergence. Returns the result and the warm-start block (None on fallback)."""
    o = _resolve(o)
    if not isinstance(Y, torch.Tensor) or Y.dim() != 2 or not Y.is_floating_point():
        shape = tuple(Y.shape) if isinstance(Y, torch.Tensor) else type(Y).__name__
        raise ValueError(f"Y={shape} is invalid: it must be a 2-D floating-point torch.Tensor (m, n)")
    check_request(tuple(Y.shape), rank, energy)
    if Y.dtype in (torch.float16, torch.bfloat16):
        Y = Y.float()
    wide = Y.shape[0] < Y.shape[1]
    try:
        state = _run(Y.T if wide else Y, rank, energy, o)
    except (_Diverged, torch.linalg.LinAlgError) as exc:
        _log.warning("AdaMatrix diverged (%s): falling back to the exact gram solver", exc)
        exact = gram_svd(Y, rank, energy)
        exact.solver, exact.fell_back, exact.converged = "adamatrix", True, False
        return exact, None
    U, V = (state.V, state.U) if wide else (state.U, state.V)
    err = state.rel_error
    result = TruncatedSVD(
        U,
        state.S,
        V,
        state.rank,
        1.0 - err * err,
        err,
        state.iterations,
        "adamatrix",
        converged=state.converged,
    )
    return result, state.block


def _run(Y: torch.Tensor, rank: int | None, energy: float | None, o: _Options) -> _State:
    """Initialise (Algorithm 1 l.1-8, or spectral / warm) and run the chosen variant on tall Y."""
    _m, n = Y.shape
    total = squared_norm(Y)
    if not math.isfinite(total):
        raise ValueError("||Y||_F^2 is not finite: Y contains NaN or inf (or overflows its dtype)")
    if total == 0:
        zeros = Y.new_zeros
        r = rank or 1
        eye = torch.eye(max(Y.shape), r, dtype=Y.dtype, device=Y.device)
        return _State(eye[: Y.shape[0]], zeros(r), eye[:n], r, 0.0, 0, True, eye[:n])
    rows = o.sample_rows if o.sample_rows is not None else max(2 * n, 256)
    s_est = V_est = None
    warm = isinstance(o.init, torch.Tensor)
    if warm:
        V0 = o.init.detach().to(device=Y.device, dtype=Y.dtype)
        if V0.dim() != 2 or V0.shape[0] != n or not 1 <= V0.shape[1] <= n:
            raise ValueError(
                f"init of shape {tuple(V0.shape)} is invalid: a warm start must be [{n}, k] with 1 <= k <= {n} "
                f"(the factor on Y's shorter side)"
            )
        V0 = _orth(V0)
    if rank is None and (not warm or o.variant == "paper"):
        s_est, V_est = sample_spectrum(Y, rows, o.generator)
        r_est = energy_rank(s_est, energy)  # type: ignore[arg-type]
    else:
        r_est = rank if rank is not None else V0.shape[1]
    if o.variant == "paper":
        return _paper(Y, total, rank if rank is not None else r_est, o)
    p = o.oversample if o.oversample is not None else 0
    k = min(n, r_est + p) if (rank is not None or not warm) else V0.shape[1]
    if energy is not None and k < n and not warm:
        k = min(n, k + max(1, p))  # at least one spare column to see the energy cut
    if warm:
        V = _extend(V0, k, o.generator)
    elif o.init == "spectral":
        if V_est is None:
            s_est, V_est = sample_spectrum(Y, rows, o.generator)
        V = V_est[:, :k].to(Y.dtype).contiguous()
    else:
        V = _random_orth(n, k, Y, o.generator)
    return _engineered(Y, total, rank, energy, V, o)


def check_options(rank: int | None = None, energy: float | None = None, **options: object) -> _Options:
    """Validate the arguments of :class:`AdaMatrixSolver` without building one (a config check needs no solver):
    at most one of ``rank`` / ``energy``, only :func:`adamatrix`'s keyword options (``init`` as "spectral" or
    "random", not a tensor) with valid values. Returns the options with the variant's defaults filled in;
    raises ValueError naming the first bad one. The rank's upper bound needs the matrix (checked per call)."""
    if rank is not None and energy is not None:
        raise ValueError(f"rank={rank}, energy={energy} is invalid: give exactly one of rank or energy")
    allowed = {f.name for f in fields(_Options)}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(
            f"option {unknown[0]}= is invalid for AdaMatrixSolver: valid options are {', '.join(sorted(allowed))}"
        )
    if isinstance(options.get("init"), torch.Tensor):
        raise ValueError("init=<tensor> is invalid for AdaMatrixSolver: it keeps its own warm start")
    return _resolve(_Options(**options))  # type: ignore[arg-type]


class AdaMatrixSolver:
    """Stateful AdaMatrix for per-batch use (SDRM attention): each call starts from the previous call's
    right factor block (warm start across batches); ``reset()`` forgets it. Counts calls and fallbacks.

    ``energy`` defaults to the paper's phi = 0.9 when neither ``rank`` nor ``energy`` is given; ``options``
    are :func:`adamatrix`'s keyword arguments (``init`` only as "spectral" or "random": the first call's start).
    """

    def __init__(self, rank: int | None = None, energy: float | None = None, **options: object) -> None:
        if rank is None and energy is None:
            energy = PAPER_ENERGY
        self.rank, self.energy = rank, energy
        self.options = check_options(rank, energy, **options)
        self._block: torch.Tensor | None = None
        self.calls = 0
        self.fallbacks = 0
        self.last: TruncatedSVD | None = None

    def reset(self) -> None:
        """Forget the warm start (the next call starts from ``init``, spectral by default)."""
        self._block = None

    @property
    def warm(self) -> bool:
        """Whether the next call starts from the previous factors."""
        return self._block is not None

    def __call__(self, Y: torch.Tensor) -> TruncatedSVD:
        o = _Options(**{f.name: getattr(self.options, f.name) for f in fields(_Options)})
        short = min(Y.shape) if isinstance(Y, torch.Tensor) and Y.dim() == 2 else None
        if self._block is not None and self._block.shape[0] == short and self._block.device == Y.device:
            o.init = self._block
        result, block = _solve(Y, self.rank, self.energy, o)
        self.calls += 1
        self.fallbacks += int(result.fell_back)
        if block is not None:
            self._block = block.detach()
        self.last = result
        return result
