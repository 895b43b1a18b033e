import math

import pytest
import torch

from lrk.linalg.rank import energy_rank
from lrk.linalg.svd_solvers import SOLVERS, truncated_svd
from lrk.linalg.tsvd import optimal_rank_error, squared_norm


def _matrix(m: int, n: int, spectrum: torch.Tensor, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """Y = U0 diag(spectrum) V0^T with random orthonormal U0, V0 (a known spectrum)."""
    g = torch.Generator().manual_seed(seed)
    k = spectrum.numel()
    U0, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    V0, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return ((U0 * spectrum.double()) @ V0.T).to(dtype)


SPECTRUM = torch.logspace(0, -1.3, 30, dtype=torch.float64)  # well conditioned, 1 .. 0.05


def _actual_error(Y: torch.Tensor, t) -> float:
    return float(torch.linalg.norm(Y.double() - t.reconstruct().double()) / torch.linalg.norm(Y.double()))


def _orthonormality(A: torch.Tensor) -> float:
    return float((A.double().T @ A.double() - torch.eye(A.shape[1], dtype=torch.float64)).abs().max())


@pytest.mark.parametrize("solver", ["svd", "gram"])
@pytest.mark.parametrize("shape", [(200, 30), (30, 200)])
def test_exact_solvers_reach_the_eckart_young_optimum(solver, shape):
    Y = _matrix(*shape, SPECTRUM) if shape[0] > shape[1] else _matrix(shape[1], shape[0], SPECTRUM).T
    opt = optimal_rank_error(SPECTRUM, 7)
    t = truncated_svd(Y, rank=7, solver=solver)
    assert (t.U.shape, t.S.shape, t.V.shape, t.rank, t.solver) == (
        (shape[0], 7),
        (7,),
        (shape[1], 7),
        7,
        solver,
    )
    assert t.rel_error == pytest.approx(opt, rel=1e-5)
    assert _actual_error(Y, t) == pytest.approx(t.rel_error, rel=1e-6)
    assert t.energy == pytest.approx(1 - opt**2, rel=1e-6)
    torch.testing.assert_close(t.S.double(), SPECTRUM[:7], rtol=1e-6, atol=0)
    assert _orthonormality(t.U) < 1e-8 and _orthonormality(t.V) < 1e-8
    assert (t.iterations, t.fell_back) == (0, False)


def test_gram_in_float32_matches_the_optimum():
    Y = _matrix(500, 40, torch.logspace(0, -1.3, 40), dtype=torch.float32)
    s = torch.linalg.svdvals(Y.double())
    for accumulate in ("input", "float64"):
        t = truncated_svd(Y, rank=9, solver="gram", accumulate=accumulate)
        assert t.U.dtype == t.S.dtype == t.V.dtype == torch.float32
        assert t.rel_error == pytest.approx(optimal_rank_error(s, 9), rel=1e-4)
        assert _actual_error(Y, t) == pytest.approx(t.rel_error, rel=1e-4)


@pytest.mark.parametrize("shape", [(300, 40), (40, 300)])
def test_lowrank_is_within_one_percent_of_the_optimum(shape):
    # a slowly decaying spectrum is the hard case for a randomized range finder
    spectrum = torch.arange(1, 41, dtype=torch.float64) ** -0.6
    Y = _matrix(max(shape), 40, spectrum, dtype=torch.float32)
    Y = Y if shape[0] > shape[1] else Y.T
    t = truncated_svd(Y, rank=8, solver="lowrank", generator=torch.Generator().manual_seed(0))
    opt = optimal_rank_error(spectrum, 8)
    assert opt <= t.rel_error <= 1.01 * opt
    assert _actual_error(Y, t) == pytest.approx(t.rel_error, rel=1e-4)
    assert t.iterations == 2  # niter


@pytest.mark.parametrize("solver", ["svd", "gram", "lowrank", "adamatrix"])
@pytest.mark.parametrize("phi", [0.5, 0.9, 0.99])
def test_energy_rule_picks_the_smallest_rank_keeping_phi(solver, phi):
    Y = _matrix(200, 30, SPECTRUM)
    exact_r = energy_rank(SPECTRUM, phi)
    t = truncated_svd(Y, energy=phi, solver=solver)
    assert t.energy >= phi - 1e-9
    if solver == "lowrank":  # randomized values only underestimate: at most a slightly larger rank
        assert exact_r <= t.rank <= exact_r + 1
    else:
        assert t.rank == exact_r
    assert t.rel_error == pytest.approx(optimal_rank_error(SPECTRUM, t.rank), rel=1e-3)


@pytest.mark.parametrize("solver", ["svd", "gram", "adamatrix"])
def test_energy_one_keeps_the_whole_spectrum(solver):
    Y = _matrix(100, 12, torch.linspace(1, 0.2, 12))
    t = truncated_svd(Y, energy=1.0, solver=solver)
    assert t.rank == 12
    assert t.rel_error < 1e-6


def test_gram_completes_u_for_zero_singular_values():
    Y = _matrix(80, 10, torch.tensor([3.0, 2.0, 1.0]))  # rank 3
    t = truncated_svd(Y, rank=5, solver="gram")
    assert _orthonormality(t.U) < 1e-8 and _orthonormality(t.V) < 1e-8
    assert float(t.S[3:].abs().max()) < 1e-6
    assert t.rel_error < 1e-7 and _actual_error(Y, t) < 1e-7


def test_gram_keeps_small_singular_values_of_a_long_float32_matrix():
    spectrum = torch.logspace(0, -3, 8, dtype=torch.float64)  # down to 1e-3 s_1, 20000 rows
    Y = _matrix(20000, 8, spectrum, dtype=torch.float32)
    t = truncated_svd(Y, rank=8, solver="gram")
    torch.testing.assert_close(t.S.double(), spectrum, rtol=1e-2, atol=0)
    assert t.energy == pytest.approx(1.0, abs=1e-5)


def test_optimal_rank_error_and_squared_norm():
    s = torch.tensor([3.0, 2.0, 1.0])
    assert optimal_rank_error(s, 1) == pytest.approx(math.sqrt(5 / 14))
    assert optimal_rank_error(s, 3) == 0.0
    Y = torch.randn(5000, 7, generator=torch.Generator().manual_seed(1))
    assert squared_norm(Y) == pytest.approx(float((Y.double() ** 2).sum()), rel=1e-6)
    assert squared_norm(Y.T) == pytest.approx(squared_norm(Y), rel=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rank": 0}, r"rank=0 is invalid: it must be an integer in \[1, min\(m, n\)\] = \[1, 12\]"),
        ({"rank": 13}, r"rank=13 is invalid.*\[1, 12\]"),
        ({"rank": 2.5}, r"rank=2.5 is invalid"),
        ({"rank": True}, r"rank=True is invalid"),
        ({"energy": 0.0}, r"energy=0.0 is invalid: it must lie in \(0, 1\]"),
        ({"energy": 1.5}, r"energy=1.5 is invalid"),
        ({"energy": -0.1}, r"energy=-0.1 is invalid"),
        ({"rank": 3, "energy": 0.9}, r"exactly one of rank"),
        ({}, r"exactly one of rank"),
    ],
)
@pytest.mark.parametrize("solver", SOLVERS)
def test_bad_requests_raise_one_clear_error(kwargs, match, solver):
    """The same bad request is refused by every solver; a valid request under the same parametrisation runs that
    solver (its result's ``solver``), so each case tests the solver it names."""
    Y = torch.randn(40, 12, generator=torch.Generator().manual_seed(0))
    assert "solver" not in kwargs
    with pytest.raises(ValueError, match=match):
        truncated_svd(Y, solver=solver, **kwargs)
    assert truncated_svd(Y, rank=3, solver=solver).solver == solver


@pytest.mark.parametrize(
    ("solver", "options", "match"),
    [
        ("qr", {}, r"solver='qr' is invalid: it must be one of gram, lowrank, svd, adamatrix"),
        ("lowrank", {"nither": 2}, r"nither= is invalid for solver='lowrank'.*niter"),
        ("gram", {"accumulate": "half"}, r"accumulate='half' is invalid"),
        ("lowrank", {"niter": -1}, r"niter=-1 is invalid"),
    ],
)
def test_bad_solver_options_raise_one_clear_error(solver, options, match):
    """Options of one solver, each run with its own solver (not crossed with every solver, where the case's
    solver would override the parametrised one); without the bad option that solver runs."""
    Y = torch.randn(40, 12, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=match):
        truncated_svd(Y, rank=3, solver=solver, **options)
    if solver in SOLVERS:
        assert truncated_svd(Y, rank=3, solver=solver).solver == solver


def test_bad_matrices_raise_clear_errors():
    with pytest.raises(ValueError, match="2-D"):
        truncated_svd(torch.randn(10), rank=1)
    with pytest.raises(ValueError, match="floating-point"):
        truncated_svd(torch.ones(4, 3, dtype=torch.int64), rank=1)
    bad = torch.randn(20, 4)
    bad[3, 1] = float("nan")
    for solver in SOLVERS:
        with pytest.raises(ValueError, match="NaN or inf"):
            truncated_svd(bad, rank=2, solver=solver)


# --- compute_u=False: V and S without U ------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(200, 30), (30, 200)])
@pytest.mark.parametrize("request_", [{"rank": 7}, {"energy": 0.9}])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gram_without_u_gives_the_same_v_s_rank_and_error(shape, request_, dtype):
    """gram_svd(compute_u=False): U is None; rank, V and S are those of compute_u=True, and energy / rel_error
    (from the eigenvalues) match the error of the full factorisation and the Eckart-Young optimum."""
    from lrk.linalg.tsvd import gram_svd

    Y = (
        _matrix(*shape, SPECTRUM, dtype=dtype)
        if shape[0] > shape[1]
        else _matrix(shape[1], shape[0], SPECTRUM, dtype=dtype).T
    )
    with_u = gram_svd(Y, **request_)
    without = gram_svd(Y, **request_, compute_u=False)
    assert without.U is None and with_u.U is not None
    assert without.rank == with_u.rank and without.V.shape == with_u.V.shape == (shape[1], with_u.rank)
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    torch.testing.assert_close(without.V, with_u.V, atol=tol, rtol=0)
    torch.testing.assert_close(without.S, with_u.S, atol=tol * float(SPECTRUM[0]), rtol=0)
    opt = optimal_rank_error(SPECTRUM, with_u.rank)
    assert (
        without.rel_error == pytest.approx(_actual_error(Y, with_u), abs=tol) == pytest.approx(opt, abs=tol)
    )
    assert without.energy == pytest.approx(1 - opt**2, abs=tol)
    with pytest.raises(ValueError, match="no U"):
        without.reconstruct()


def test_gram_without_u_forms_no_product_with_y_beyond_the_gram_matrix():
    """Tall Y: compute_u=False multiplies Y only into its Gram matrix (U = Y V / S is the product it skips)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from lrk.linalg.tsvd import gram_svd

    class Products(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in ("mm", "addmm", "bmm", "matmul"):
                self.shapes.append([tuple(a.shape) for a in args if isinstance(a, torch.Tensor)])
            return func(*args, **(kwargs or {}))

    Y = _matrix(200, 30, SPECTRUM)
    with Products() as with_u:
        gram_svd(Y, rank=7)
    with Products() as without:
        gram_svd(Y, rank=7, compute_u=False)
    assert without.shapes == [[(30, 200), (200, 30)]]  # Y^T Y only
    assert with_u.shapes == [[(30, 200), (200, 30)], [(200, 30), (30, 7)]]  # Y^T Y and Y V


@pytest.mark.parametrize("solver", SOLVERS)
def test_truncated_svd_without_u_for_every_solver(solver):
    Y = _matrix(120, 30, SPECTRUM)
    full = truncated_svd(
        Y,
        rank=5,
        solver=solver,
        **({"generator": torch.Generator().manual_seed(0)} if solver == "lowrank" else {}),
    )
    light = truncated_svd(
        Y,
        rank=5,
        solver=solver,
        compute_u=False,
        **({"generator": torch.Generator().manual_seed(0)} if solver == "lowrank" else {}),
    )
    assert light.U is None and light.rank == full.rank == 5
    torch.testing.assert_close(light.V @ light.V.T, full.V @ full.V.T, atol=1e-6, rtol=0)  # the same subspace
    assert light.rel_error == pytest.approx(full.rel_error, rel=1e-6)
    with pytest.raises(ValueError, match="compute_u=1 is invalid"):
        truncated_svd(Y, rank=5, solver=solver, compute_u=1)
