"""Symmetric eigendecompositions of the K-FAC factors, and the thread guard around CPU LAPACK.

Fitting K-FAC/EK-FAC spends its non-data time in ``eigh`` of each layer's A [I, I] and S [O, O]
(GPT-2 small, MLP layers only: 12 x (769 + 3072 + 3073 + 768)). ``symmetric_eigh`` is the one
entry point for one matrix and ``symmetric_eigh_many`` for a layer set; ``benchmarks/eigh.py``
measures every method offered here (``benchmarks/results/eigh.md``).

What matters downstream is the damped preconditioner ``(G + lambda I)^-1`` with lambda = 0.1 x
the mean eigenvalue, so accuracy is stated in those terms. With ``e``, ``Q`` from a method,
d = 0.1 x mean eigenvalue and kappa_d = max eigenvalue / d + 1 (the condition number of the
damped matrix; 1e3 .. 3e4 on the benchmark's GPT-2-sized factors), each method guarantees
the bounds below; ``tests/test_linalg.py`` checks them against references that need no eigh
(``solve(A + d I, v)``, matrices built from known eigenpairs) on ill-conditioned covariances,
rank-deficient ones (fewer tokens than dimensions), eigenvalues spanning 1e-10..1, exact
repeats and exact zeros. In brackets: the worst measured, at n <= 256 in the tests and at
768..3073 in ``benchmarks/results/eigh.md`` (there against the float64 method).

=================  ===============  ===========================  ==============================================
method             max |Q^TQ - I|   ||Q e Q^T - A||_F / ||A||_F  damped inverse: ||x - x*|| / ||x*||,
                                                                 x = Q (e + d)^-1 Q^T v, x* = (A + d I)^-1 v
=================  ===============  ===========================  ==============================================
float64, auto,     1e-12 [8e-15]    1e-12 [3e-15]                1e-10 for kappa_d <= 1e5 [6e-13]
scipy-evd
scipy-evr          1e-11 [6e-12]    1e-12 [7e-15]                1e-10 for kappa_d <= 1e5 [1e-12]
float32,           1e-10 [4e-11]    1e-4 [1.3e-5]                10 eps32 kappa_d [2.3 eps32 kappa_d: 5.0e-3 at
scipy-ev?-float32                                                n = 3073, kappa_d = 3e4]
float32-raw        fails: ~2e-6     as float32                   as float32
=================  ===============  ===========================  ==============================================

(eps32 = 1.19e-7.) float32's damped-inverse error is set by the float32 eigh itself: the
eigenvectors of eigenvalues below ~eps32 ||A|| are only determined to that absolute level,
which the damping (0.1 x the mean, i.e. ~||A|| / kappa_d) magnifies by kappa_d, and no cheap
float64 refinement recovers them (``_refine``). Only the float64 class meets a 1e-5
damped-inverse target on realistic factors, and on this CPU it is also no slower (``_auto``),
so "auto" never picks float32.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

__all__ = ["METHODS", "lapack_threads", "symmetric_eigh", "symmetric_eigh_many"]

# "float64": torch.linalg.eigh (LAPACK syevd, MKL in the CPU wheel). "float32": the same on the
# matrix scaled to unit diagonal in float32, then a float64 Newton-Schulz step and float64
# Rayleigh quotients. "float32-raw": float32 eigh cast up (for comparison; not orthonormal).
# "scipy-evd"/"scipy-evr": scipy.linalg.eigh (OpenBLAS) with divide-and-conquer / MRRR;
# "-float32" runs it in float32 with float32's refinement.
METHODS = (
    "auto",
    "float64",
    "float32",
    "float32-raw",
    "scipy-evd",
    "scipy-evr",
    "scipy-evd-float32",
    "scipy-evr-float32",
)


@contextlib.contextmanager
def lapack_threads(t: torch.Tensor, threads: int = 1) -> Iterator[None]:
    """Run CPU LAPACK calls (eigh) on ``threads`` threads (default one); a no-op off the CPU.

    OpenBLAS's threaded eigh spins while it waits: on a machine whose cores are shared it was
    measured 150-500x slower with 2 threads than with 1 (a 1024x1024 fp64 eigh: 49 s vs 0.33 s),
    and single-threaded eigh loses little even on an idle machine. torch 2.13's MKL build and
    scipy 1.17's OpenBLAS do the same, less extremely (``benchmarks/results/eigh.md``, 3072
    float64, medians of 3): 2 threads take 2.6-2.9 s against 1 thread's 4.9-5.2 s when the
    other core is mostly free (load 1.4-1.7, the benchmark's own thread included), but 15-17 s
    (single runs to 30 s) while another user's tests hold it, and 22 s under a busy loop where
    1 thread takes 11 s; at n = 128 a 2-thread eigh took 0.79 s against 0.002 s.
    ``symmetric_eigh_many`` gets the parallel speed without the waiting.
    """
    if t.device.type != "cpu":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@contextlib.contextmanager
def _blas_threads(method: str, threads: int) -> Iterator[None]:
    """The same limit for scipy's own OpenBLAS, which ``torch.set_num_threads`` does not reach.

    Only for the scipy methods: threadpoolctl walks the loaded libraries on every call.
    """
    if not method.startswith("scipy-"):
        yield
        return
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=threads, user_api="blas"):
        yield


def _auto(matrix: torch.Tensor) -> str:
    """The method "auto" resolves to: "float64" at every size, on every device.

    Measured on this project's 2-core Xeon (AVX-512; torch 2.13 with MKL, scipy 1.17 with
    OpenBLAS), single-threaded medians of 3 from two full runs of ``benchmarks/eigh.py``
    (``benchmarks/results/eigh.md``; load average 1.4-3.9 from another user's tests), seconds:

    ==========  =========  =========  =========  ================  ===========  =================
    n           float64    scipy-evd  scipy-evr  float32 (refined) float32-raw  scipy-evr-float32
    ==========  =========  =========  =========  ================  ===========  =================
    768 / 769   0.08-0.12  0.08-0.10  0.10-0.11  0.07-0.09         0.04-0.06    0.15-0.18
    3072        4.5-4.9    4.7-4.9    4.7-4.9    5.0-5.2           2.3-2.5      9.7-9.8
    3073        4.9-5.2    4.5-4.9    4.6-4.7    5.3-5.7           2.2-2.4      9.4-10.3
    ==========  =========  =========  =========  ================  ===========  =================

    The float32 eigh is twice as fast, but the float64 refinement that makes its vectors
    orthonormal (a Newton-Schulz step and Rayleigh quotients: two float64 GEMMs and one float32
    GEMM, ~0.8 s each at 3072) costs more than it saves, and its damped-inverse error stays at
    ~eps32 kappa_d (8.5e-4 at 3072, 5.0e-3 at 3073) against the 1e-5 that float64 meets with
    room to spare (<= 6e-13). The scipy drivers are float64's equals within the noise. So no
    size threshold pays off: float64 is the fastest accurate method at every size measured, and
    the remaining CPU win is concurrency (``symmetric_eigh_many``), not a method. Threads stay
    at one (``lapack_threads``). On CUDA: cuSOLVER float64, for the same accuracy reason
    (float32's error comes from its precision, not the device; not timed: no GPU was available).
    """
    return "float64"


def _check(matrix: torch.Tensor) -> torch.Tensor:
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"symmetric_eigh needs a square matrix, got shape {tuple(matrix.shape)}")
    if not matrix.is_floating_point():
        raise TypeError(f"symmetric_eigh needs a floating-point matrix, got {matrix.dtype}")
    return matrix.to(torch.float64)


def _refine(a: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 polish of float32 eigenvectors ``q`` of ``a``: one Newton-Schulz step, Rayleigh quotients.

    ``Q <- Q (3I - Q^T Q) / 2 = Q - Q R / 2`` with ``R = Q^T Q - I`` squares the loss of
    orthonormality (max |R| 1.7e-6 -> 7.8e-12 at n = 3072); R needs float64 but ``Q R`` is a
    small correction, so it is formed in float32. torch's float32 eigh needs one step; scipy's
    MRRR driver ('evr') can leave R ~ 1e-5 on a rank-deficient matrix and then gets a second.
    The eigenvalues are the float64 Rayleigh quotients diag(Q^T A Q), exact for the basis
    returned. Cost: one float64 and one float32 GEMM per step, one float64 GEMM (A Q) for the
    quotients: ~0.8 s each at n = 3072 on this machine, against the 2.3 s of the float32 eigh.

    A Jacobi-style correction from the off-diagonal of Q^T A Q (Ogita & Aishima 2018, one step:
    ``E_ij = (S_ij + l_j R_ij) / (l_j - l_i)``) was measured and dropped: its convergence test
    must leave pairs closer than ~||offdiag(S)||_F uncorrected, which on a decaying spectrum is
    most of them, and the damped-inverse error stayed where it was (3.8e-4 before and after on a
    256 covariance with kappa_d = 2e3) at the price of three more GEMMs.
    """
    n = q.shape[1]
    eye = torch.eye(n, dtype=q.dtype, device=q.device)
    for _ in range(3):
        r = q.mT @ q - eye
        q = q - 0.5 * (q.float() @ r.float()).double()
        # The step leaves ~(3/4) R^2, whose entries are at most the largest squared row norm of R:
        # below 5e-11 the result is orthonormal to 1e-10 without paying for another check.
        if 0.75 * (r * r).sum(1).max().item() < 5e-11:
            break
    e = (q * (a @ q)).sum(0)
    e, order = torch.sort(e)  # near-equal Rayleigh quotients may swap
    return e, q[:, order]


def _float32(a: torch.Tensor, solver, refine: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 eigh of ``a / c``, c = max diagonal (>= every |a_ij| of a PSD matrix).

    The scaling keeps a factor of tiny gradients (S entries ~1e-12) out of float32's
    subnormal range, where the arithmetic is slow and inaccurate.
    """
    c = a.diagonal().abs().max()
    if c == 0:
        return torch.zeros_like(a.diagonal()), torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    e32, q32 = solver((a / c).float())
    if not refine:
        return e32.double() * c, q32.double()
    e, q = _refine(a, q32.double())
    return e, q


def _torch_eigh(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.linalg.eigh(m)


def _scipy_solver(driver: str):
    def solve(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        import scipy.linalg

        e, q = scipy.linalg.eigh(m.numpy(), driver=driver, check_finite=False)
        return torch.from_numpy(e), torch.from_numpy(q)

    return solve


def _eigh(a: torch.Tensor, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch without any thread guard (the callers hold one)."""
    if method == "float64":
        e, q = torch.linalg.eigh(a)
    elif method in ("float32", "float32-raw"):
        e, q = _float32(a, _torch_eigh, refine=method == "float32")
    elif method.startswith("scipy-"):
        if a.device.type != "cpu":
            raise ValueError(f"method {method!r} runs on the CPU only; the matrix is on {a.device}")
        driver = method.split("-")[1]
        if method.endswith("-float32"):
            e, q = _float32(a, _scipy_solver(driver), refine=True)
        else:
            e, q = _scipy_solver(driver)(a)
    else:
        raise ValueError(f"unknown eigh method {method!r}; expected one of {', '.join(METHODS)}")
    return e, q.contiguous()


def symmetric_eigh(
    matrix: torch.Tensor, *, method: str = "auto", threads: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigendecomposition of a symmetric PSD matrix (a K-FAC covariance): (eigenvalues, eigenvectors).

    Eigenvalues ascending, float64 (tiny ones may be slightly negative: clamp if needed);
    eigenvectors float64, orthonormal columns, contiguous, on the matrix's device. The matrix
    should be float64 (others are cast). ``method`` is one of ``METHODS``; the accuracy of each
    is stated in the module docstring, and "auto" (``_auto``) picks float64. ``threads`` is the
    LAPACK thread count on the CPU (see ``lapack_threads`` before raising it); ignored on CUDA.
    """
    a = _check(matrix)
    method = _auto(a) if method == "auto" else method
    if a.shape[0] == 0:
        return a.new_zeros(0), a.new_zeros(0, 0)
    if a.device.type != "cpu":
        return _eigh(a, method)
    with lapack_threads(a, threads), _blas_threads(method, threads):
        return _eigh(a, method)


def symmetric_eigh_many(
    matrices: Sequence[torch.Tensor], *, method: str = "auto", workers: int | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``symmetric_eigh`` of each matrix, as ``workers`` concurrent single-threaded calls on the CPU.

    Results are in input order; the largest matrices start first, so the last one to finish is
    small. Independent single-threaded calls do not wait on each other the way a threaded
    LAPACK's threads do, and on a shared machine two threads also get twice one thread's share
    of the cores. Per 3072 float64 matrix, 2 workers against one by one (``benchmarks/results/
    eigh.md``): 2.39 vs 5.22 s (load 1.5, the benchmark included), 4.18 vs 4.88 s (load 3:
    another user's tests on both cores), 4.82 vs 11.27 s with a busy loop on top; on an idle
    machine two took 3.95 s together against 3.85 s for one. GPT-2 small's 48 MLP factors
    end to end under load 2.3-3.2: 113 s against 140 s one by one (medians of 3).
    ``workers`` defaults to the cores this process may use (capped at the number of matrices;
    with several processes per machine, pass cores // processes); on CUDA the calls run one
    after the other.
    """
    mats = [_check(m) for m in matrices]
    if not mats:
        return []
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = max(1, min(workers, len(mats)))
    if mats[0].device.type != "cpu" or workers == 1:
        return [symmetric_eigh(m, method=method) for m in mats]
    order = sorted(range(len(mats)), key=lambda i: -mats[i].shape[0])
    out: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(mats)

    def one(i: int) -> None:
        a = mats[i]
        if a.shape[0] == 0:
            out[i] = (a.new_zeros(0), a.new_zeros(0, 0))
        else:
            out[i] = _eigh(a, _auto(a) if method == "auto" else method)

    # One guard around the pool: torch.set_num_threads is process-wide, so per-call guards
    # in the workers would restore each other's settings mid-call.
    with lapack_threads(mats[0], 1), _blas_threads(method, 1), ThreadPoolExecutor(workers) as pool:
        for f in [pool.submit(one, i) for i in order]:
            f.result()
    return out  # type: ignore[return-value]
