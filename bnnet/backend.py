"""Which implementation runs the operations of bnnet.ops.

    "numba": fused kernels from bnnet.kernels (default when numba imports);
    "numpy": bnnet.reference, the readable equations of bnnet.functional, nothing compiled.

Both give the same numbers (float64 to 1e-12, float32 to 1e-5; tests check it).
Choose with the environment variable BNNET_BACKEND=numba|numpy (read at import),
or in code with bnnet.backend.set_backend(name) or `with bnnet.backend.using(name):`.
"""

import contextlib
import os

from .errors import HyperparameterError

BACKENDS = ("numba", "numpy")
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
            f"backend must be one of 'numba', 'numpy' or 'auto', got {name!r} "
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
    return name


def get_backend():
    """The active backend's name, "numba" or "numpy"."""
    global _requested
    if _requested is None:
        _requested = _resolve(os.environ.get("BNNET_BACKEND"))
    return _requested


def set_backend(name):
    """Switch backend for the whole process: "numba", "numpy" or "auto"."""
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
    """The module implementing bnnet.ops for the active backend: bnnet.kernels or bnnet.reference.

    The one place where the backend decides what runs; imported (numba with
    it) on first use.
    """
    name = _requested or get_backend()
    module = _modules.get(name)
    if module is None:
        if name == "numba":
            from . import kernels as module
        else:
            from . import reference as module
        _modules[name] = module
    return module


def fast():
    """True when the numba kernels serve bnnet.ops."""
    return (_requested or get_backend()) == "numba"
