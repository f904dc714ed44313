"""The thread-count variables that OpenMP, OpenBLAS and MKL read when their pools start.

One rule for whoever sets them: the pycaffe worker (and through it the real-Caffe oracle)
and the benchmark scripts. This module imports nothing heavy, so a script can set them
before numpy and the engines load.
"""

from __future__ import annotations

THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def blas_thread_env(threads: int) -> dict[str, str]:
    """{variable: threads} for every OpenMP/OpenBLAS/MKL thread-count variable."""
    return {name: str(threads) for name in THREAD_VARIABLES}
