"""The fit's float64 eigendecomposition of a symmetric factor, and what it costs in memory.

On the CPU the factor is decomposed by LAPACK's ``dsyevr`` (MRRR) through scipy, in place of the factor: it needs
the eigenvectors (8 n^2 bytes) and O(n) workspace beside the factor, where ``torch.linalg.eigh`` (``dsyevd``,
divide and conquer) copies the factor and takes a 2 n^2-double workspace: 24 n^2 bytes beside it (measured here:
8.4 n^2 against 26.3 n^2 at n = 3000, the same 9.1 s on one thread). For the SD-1.5 UNet's 11521-wide conv input
factor that is 1.1 GB instead of 3.2 GB. Elsewhere (CUDA; or without scipy) it is ``torch.linalg.eigh``.
"""
from __future__ import annotations

import contextlib
import importlib.util
from typing import Tuple

import torch

#: whether the CPU path can use scipy's dsyevr
SCIPY = importlib.util.find_spec("scipy") is not None


def in_place(device: torch.device) -> bool:
    """Whether ``eigh_psd(..., overwrite=True)`` decomposes in place of its input on ``device``."""
    return SCIPY and torch.device(device).type == "cpu"


def eigh_psd(mat: torch.Tensor, overwrite: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending, clamped at 0: the factor is PSD up to rounding) and eigenvectors (columns,
    column-major) of the symmetric float64 matrix ``mat: (n, n)``. ``overwrite``: ``mat`` may be destroyed (on the
    CPU it is, holding the reduction's intermediates)."""
    if mat.dtype != torch.float64:
        raise TypeError(f"the eigendecomposition takes float64, got {mat.dtype}")
    if in_place(mat.device):
        from scipy.linalg import eigh

        # the transposed view is Fortran-contiguous (and equal: mat is symmetric), so LAPACK works in its memory;
        # scipy's own BLAS gets torch's thread count (it ignores torch.set_num_threads otherwise)
        with _blas_threads(torch.get_num_threads()):
            w, z = eigh(mat.detach().numpy().T, overwrite_a=overwrite, driver="evr", check_finite=False)
        s, q = torch.from_numpy(w), torch.from_numpy(z)
    else:
        s, q = torch.linalg.eigh(mat)
    return s.clamp_min(0), q


def _blas_threads(n: int):
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # scikit-learn brings it; without it scipy's BLAS keeps its own default
        return contextlib.nullcontext()
    return threadpool_limits(limits=n, user_api="blas")


def transient_bytes(n: int, device: torch.device, overwrite: bool) -> int:
    """Bytes ``eigh_psd`` allocates beside its ``(n, n)`` input at its peak (the eigenvectors included)."""
    if in_place(device):
        return 8 * n * n * (1 if overwrite else 2) + 64 * n
    return 24 * n * n
