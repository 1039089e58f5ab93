"""Where a model's arrays live, and moving them: "cpu" (NumPy) or "cuda" (CuPy, on an NVIDIA GPU).

The device and the backend go together: arrays on "cuda" are run by the "cuda"
backend (bnnet.cuda_kernels), arrays on "cpu" by "numba" or "numpy". So
`model.to("cuda")` moves every parameter, buffer and gradient to the GPU and
selects the "cuda" backend; `model.to("cpu")` brings them back and selects the
default CPU backend. Checkpoints always hold host arrays (bnnet.io converts), so
a file saved from either device loads on either.

Under numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1, which the tests use on
machines without a GPU) the CUDA kernels run on the CPU, and "device" arrays are
SimulatedDeviceArray, a NumPy subclass: NumPy functions keep the subclass (as CuPy's
functions return CuPy arrays), while a host array made with np.empty & co. stays a
plain ndarray, which the cuda backend refuses as it would on a GPU. So the tests
catch a layer that allocates on the host while the model is on the device.

Layers allocate their outputs with `empty(like, shape, dtype)` / `zeros(...)`, which
put the new array where `like` is (NumPy's empty_like dispatches to CuPy).
"""

import os

import numpy as np

from .errors import HyperparameterError

DEVICES = ("cpu", "cuda")


class SimulatedDeviceArray(np.ndarray):
    """An array "on the GPU" under numba's CUDA simulator (see the module's docstring).

    As with CuPy, what NumPy's functions return from device arrays stays on the device (ufuncs
    keep a subclass by themselves; np.concatenate & co. are wrapped here).
    """

    def __array_function__(self, func, types, args, kwargs):
        return _on_simulated_device(super().__array_function__(func, types, args, kwargs))


def _on_simulated_device(result):
    if type(result) is np.ndarray:
        return result.view(SimulatedDeviceArray)
    if isinstance(result, (tuple, list)):
        return type(result)(_on_simulated_device(r) for r in result)
    return result


def simulated():
    """True under numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1)."""
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")


def require_gpu():
    """Return if the "cuda" backend can run here; else HyperparameterError saying what is missing."""
    if simulated():
        return
    try:
        import cupy
    except ImportError:
        why = 'CuPy is not installed (pip install ".[cuda]", or the cupy-cudaXXx wheel for your CUDA)'
    else:
        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except Exception as e:  # no driver, no device: CuPy raises its own CUDA error types
            count, detail = 0, f": {e}"
        else:
            detail = ""
        why = f"no NVIDIA GPU is visible to CuPy{detail}" if count == 0 else None
        if why is None:
            from numba import cuda

            why = None if cuda.is_available() else "numba cannot reach the CUDA driver (pip install numba-cuda)"
    if why:
        raise HyperparameterError(f"the cuda backend needs an NVIDIA GPU: {why}")


def check_device(owner, device):
    """'cpu' or 'cuda' (case-insensitive), or HyperparameterError naming `owner`."""
    name = device.lower() if isinstance(device, str) else None
    if name not in DEVICES:
        raise HyperparameterError(f"{owner}: device must be 'cpu' or 'cuda', got {device!r}")
    return name


def on_device(a):
    """True for an array on the GPU: CuPy's (or anything with __cuda_array_interface__), or a
    SimulatedDeviceArray."""
    if isinstance(a, np.ndarray):
        return isinstance(a, SimulatedDeviceArray)
    return hasattr(a, "__cuda_array_interface__")


def to_host(a):
    """A NumPy array with a's values: a itself if it is one, else a copy from the device."""
    if not on_device(a):
        return np.asarray(a)
    return np.array(a) if isinstance(a, np.ndarray) else a.get()


def to_device(a, device):
    """a on `device`: a NumPy array for "cpu" (a itself if it is one), a CuPy array for "cuda"
    (under the simulator a SimulatedDeviceArray copy, as a transfer to a GPU is one)."""
    if device == "cpu":
        return to_host(a)
    if on_device(a):
        return a
    if simulated():
        return np.array(a).view(SimulatedDeviceArray)
    import cupy

    return cupy.asarray(a)


def device_of(a):
    """'cuda' for an array on the GPU, else 'cpu'."""
    return "cuda" if on_device(a) else "cpu"


def writable(a):
    """Whether a result can be written into a (CuPy arrays always can; NumPy's may be read-only)."""
    return getattr(a.flags, "writeable", True)


def contiguous(a, dtype=None):
    """a as a C-contiguous array of `dtype` on its own device (a itself when it already is one).

    np.ascontiguousarray would bring a GPU array to the host (CuPy refuses that implicit copy)."""
    if dtype is not None and a.dtype != dtype:
        a = a.astype(dtype)
    return a if a.flags.c_contiguous else a.copy(order="C")


def empty(like, shape, dtype):
    """An uninitialized C-contiguous array of `shape` and `dtype` where `like` is (host or GPU)."""
    return np.empty_like(like, dtype=dtype, shape=shape, order="C")


def zeros(like, shape, dtype):
    """Zeros of `shape` and `dtype` where `like` is."""
    return np.zeros_like(like, dtype=dtype, shape=shape, order="C")
