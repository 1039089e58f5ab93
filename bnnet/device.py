"""Where a model's arrays live, and moving them: "cpu" (NumPy) or "cuda" (CuPy, on an NVIDIA GPU).

The device and the backend go together: arrays on "cuda" are run by the "cuda"
backend (bnnet.cuda_kernels), arrays on "cpu" by "numba" or "numpy". So
`model.to("cuda")` moves every parameter, buffer and gradient to the GPU and
selects the "cuda" backend; `model.to("cpu")` brings them back and selects the
default CPU backend. Checkpoints always hold host arrays (bnnet.io converts), so
a file saved from either device loads on either.

Under numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1, which the tests use on
machines without a GPU) the CUDA kernels run on the CPU and the "device" arrays
are NumPy arrays: moving is then a no-op.
"""

import os

import numpy as np

from .errors import HyperparameterError

DEVICES = ("cpu", "cuda")


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


def to_host(a):
    """A NumPy array with a's values (a itself if it is one)."""
    if isinstance(a, np.ndarray) or not hasattr(a, "__cuda_array_interface__"):
        return np.asarray(a)
    return a.get()


def to_device(a, device):
    """a on `device`: a NumPy array for "cpu", a CuPy array for "cuda" (under the simulator a NumPy
    copy, as a transfer to a GPU is one)."""
    if device == "cpu":
        return to_host(a)
    if simulated():
        return np.array(a)
    import cupy

    return cupy.asarray(a)


def device_of(a):
    """'cuda' for an array on the GPU, else 'cpu'."""
    return "cpu" if isinstance(a, np.ndarray) or not hasattr(a, "__cuda_array_interface__") else "cuda"
