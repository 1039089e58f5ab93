"""Which implementation runs the operations of bnnet.ops.

    "numba": fused kernels from bnnet.kernels (default when numba imports);
    "numpy": bnnet.reference, the readable equations of bnnet.functional, nothing compiled;
    "cuda":  bnnet.cuda_kernels, the same kernels for an NVIDIA GPU (numba.cuda), on
             CuPy arrays (see bnnet.device for moving a model there).

All give the same numbers (float64 to 1e-12, float32 to 1e-5; tests check it).
Choose with the environment variable BNNET_BACKEND=numba|numpy|cuda (read at import),
or in code with bnnet.backend.set_backend(name) or `with bnnet.backend.using(name):`.
"""

import contextlib
import os

from .errors import HyperparameterError

BACKENDS = ("numba", "numpy", "cuda")
_requested = None  # None: not resolved yet


def _resolve(name):
    if name in (None, "", "auto"):
        try:
            import numba  # noqa: F401
        except ImportError:
            return "numpy"
        return "numba"
    if name not in BACKENDS:
        raise HyperparameterError(
            f"backend must be one of 'numba', 'numpy', 'cuda' or 'auto', got {name!r} "
            "(check the BNNET_BACKEND environment variable)"
        )
    if name == "numba":
        try:
            import numba  # noqa: F401
        except ImportError:
            raise HyperparameterError(
                "backend 'numba' was requested but numba is not installed; "
                "pip install numba, or use BNNET_BACKEND=numpy"
            ) from None
    if name == "cuda":
        from .device import require_gpu

        require_gpu()
    return name


def get_backend():
    """The active backend's name: "numba", "numpy" or "cuda"."""
    global _requested
    if _requested is None:
        _requested = _resolve(os.environ.get("BNNET_BACKEND"))
    return _requested


def set_backend(name):
    """Switch backend for the whole process: "numba", "numpy", "cuda" or "auto"."""
    global _requested
    _requested = _resolve(name)


@contextlib.contextmanager
def using(name):
    """Run a block with another backend, then restore the previous one."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


_modules = {}


def impl():
    """The module implementing bnnet.ops for the active backend: bnnet.kernels, .reference or .cuda_kernels.

    The one place where the backend decides what runs; imported (numba with
    it) on first use.
    """
    name = _requested or get_backend()
    module = _modules.get(name)
    if module is None:
        if name == "numba":
            from . import kernels as module
        elif name == "cuda":
            from . import cuda_kernels as module
        else:
            from . import reference as module
        _modules[name] = module
    return module


_array_types = {}


def array_types():
    """The array types bnnet.ops accepts with the active backend: (numpy.ndarray,), or
    (cupy.ndarray,) for "cuda" on a GPU (under numba's CUDA simulator, bnnet.device.SimulatedDeviceArray)."""
    name = _requested or get_backend()
    types = _array_types.get(name)
    if types is None:
        import numpy as np

        from .device import SimulatedDeviceArray, simulated

        if name == "cuda" and not simulated():
            import cupy

            types = (cupy.ndarray,)
        elif name == "cuda":
            types = (SimulatedDeviceArray,)
        else:
            types = (np.ndarray,)
        _array_types[name] = types
    return types


def fast():
    """True when the numba kernels serve bnnet.ops."""
    return (_requested or get_backend()) == "numba"
