"""How many threads bnnet's operations use: one setting, and a rule per operation.

    bnnet.set_num_threads(n)     # at most n threads for the BLAS and the numba kernels
    bnnet.get_num_threads()

The default is OMP_NUM_THREADS when it is set, else the number of cores this
process may run on; a BLAS never gets more than its own setting
(OPENBLAS_NUM_THREADS, ...) gave it. Within that limit each operation takes what pays off:

    GEMMs       each matrix product of a Linear layer runs on one BLAS thread when it
                is small (< SMALL_GEMM_MACS multiply-adds: every product of the paper's
                net at batch 60, the largest being 60 x 784 x 100 = 4.7 M), on all
                threads otherwise (the wide net at batch 256, predict on 1,000 rows);
    kernels     batch-norm kernels split rows across threads only above
                bnnet.kernels.PARALLEL_MIN_ELEMENTS elements.

Why: a second thread makes small GEMMs only somewhat faster on an idle machine
(the paper's net: about 10% per step), but when other processes keep the cores
busy, BLAS threads that wait on each other make them several times slower
(2 epochs of `bnnet train` next to two busy loops: about 1.0 s with one
thread, 5 s in half the runs with two; benchmarks/run.py --only busy). One
thread never waits. Setting the count costs under a microsecond and happens
only when it changes. OpenBLAS is driven through threadpoolctl, the standard tool for
BLAS thread pools; the numba pool is told when a parallel kernel first runs.
"""

import os

from .errors import HyperparameterError

# Matrix products below this many multiply-adds (m * k * n) run on one BLAS thread.
SMALL_GEMM_MACS = 1 << 23

_limit = None  # threads allowed, None until first asked
_blas = None  # threadpoolctl controllers of the BLAS libraries, [] when none can be driven
_blas_now = None  # threads the BLAS was last set to


def _default():
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) >= 1:
        return int(env)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def get_num_threads():
    """The most threads any bnnet operation uses."""
    global _limit
    if _limit is None:
        _limit = _default()
    return _limit


def set_num_threads(n):
    """Use at most n >= 1 threads for the BLAS and the numba kernels (the whole process)."""
    global _limit, _blas_now
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise HyperparameterError(f"set_num_threads: n must be an integer >= 1, got {n!r}")
    _limit = n
    _blas_now = None  # applied at the next matrix product; numba's pool at the next parallel kernel


def numba_threads():
    """Threads for a parallel kernel: the limit, applied to numba's pool (started only when
    a kernel first needs it, which keeps small runs from starting it at all)."""
    import numba

    n = min(get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    if numba.get_num_threads() != n:
        numba.set_num_threads(n)
    return n


def _controllers():
    """[(threadpoolctl controller, the threads the BLAS started with)]: its own setting
    (OPENBLAS_NUM_THREADS, MKL_NUM_THREADS, ...) stays an upper bound."""
    global _blas
    if _blas is None:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:  # without threadpoolctl the BLAS keeps its own setting
            _blas = []
        else:
            _blas = [(lib, lib.num_threads) for lib in ThreadpoolController().select(user_api="blas").lib_controllers]
    return _blas


def for_gemm(macs):
    """Set the BLAS threads for matrix products of `macs` multiply-adds (a no-op when unchanged)."""
    global _blas_now
    n = 1 if macs < SMALL_GEMM_MACS else get_num_threads()
    if n != _blas_now:
        for lib, most in _controllers():
            lib.set_num_threads(min(n, most))
        _blas_now = n
