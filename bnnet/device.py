"""Where a model's arrays live, and moving them: "cpu" (NumPy) or "cuda" (CuPy, on an NVIDIA GPU).

The device and the backend go together: arrays on "cuda" are run by the "cuda"
backend (bnnet.cuda_kernels), arrays on "cpu" by "numba" or "numpy". So
`model.to("cuda")` moves every parameter, buffer and gradient to the GPU and
selects the "cuda" backend; `model.to("cpu")` brings them back and selects the
default CPU backend. Checkpoints always hold host arrays (bnnet.io converts), so
a file saved from either device loads on either.

Under numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1, which the tests use on
machines without a GPU) the CUDA kernels run on the CPU, and "device" arrays are
SimulatedDeviceArray: it holds a host array but is not an ndarray, and behaves as
CuPy's arrays do (NumPy's functions on it return device arrays; a host array mixed
in, or np.asarray of a device array, is a TypeError; a host array given to the cuda
backend is refused). So the tests catch a layer that allocates on the host, or reads
a device array as a host one, while the model is on the device.

Layers allocate their outputs with `empty(like, shape, dtype)` / `zeros(...)`, which
put the new array where `like` is (NumPy's empty_like dispatches to CuPy).
"""

import os

import numpy as np
from numpy.lib.mixins import NDArrayOperatorsMixin

from .errors import HyperparameterError

DEVICES = ("cpu", "cuda")


class SimulatedDeviceArray(NDArrayOperatorsMixin):
    """An array "on the GPU" under numba's CUDA simulator (see the module's docstring).

    It holds a host array but is not one, and behaves as a CuPy array does: NumPy's functions and
    operators on device arrays return device arrays, a host ndarray mixed into them is refused
    (TypeError), and np.asarray(a) is refused too: copy to the host with `a.get()` or `to_host`.
    So a layer that hands a host array to a device operation, or reads a device array as a host
    one, fails under the simulator as it would on a GPU. The cuda kernels receive the held array
    (`raw`).
    """

    __slots__ = ("_memory",)

    def __init__(self, memory):
        self._memory = memory  # the simulated device memory: an np.ndarray

    # -- CuPy's array attributes and methods ------------------------------------------
    shape = property(lambda self: self._memory.shape)
    dtype = property(lambda self: self._memory.dtype)
    ndim = property(lambda self: self._memory.ndim)
    size = property(lambda self: self._memory.size)
    itemsize = property(lambda self: self._memory.itemsize)
    nbytes = property(lambda self: self._memory.nbytes)
    strides = property(lambda self: self._memory.strides)
    flags = property(lambda self: self._memory.flags)
    T = property(lambda self: _device(self._memory.T))
    base = property(lambda self: None if self._memory.base is None else _device(self._memory.base))

    def get(self):
        """A host copy (CuPy's name)."""
        return self._memory.copy()

    def __array__(self, dtype=None, copy=None):
        raise TypeError(
            "Implicit conversion to a NumPy array is not allowed (a device array): use .get() or bnnet.device.to_host"
        )

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        out = kwargs.get("out")
        if out is not None:
            kwargs["out"] = tuple(_raw_operand(o) for o in out)
        result = getattr(ufunc, method)(*(_raw_operand(a) for a in inputs), **kwargs)
        if out is not None:
            return out[0] if len(out) == 1 else out
        return _device(result)

    def __array_function__(self, func, types, args, kwargs):
        return _device(func(*_raw_operand(args), **_raw_operand(kwargs)))

    def __getitem__(self, key):
        return _device(self._memory[_raw_operand(key)])

    def __setitem__(self, key, value):
        self._memory[_raw_operand(key)] = _raw_operand(value)

    def __len__(self):
        return len(self._memory)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __repr__(self):
        return f"SimulatedDeviceArray({self._memory!r})"

    def __float__(self):
        return float(self._memory)

    def __int__(self):
        return int(self._memory)

    def __index__(self):
        return self._memory.__index__()

    def __bool__(self):
        return bool(self._memory)

    def item(self):
        return self._memory.item()

    def fill(self, value):
        self._memory.fill(_raw_operand(value))

    def reshape(self, *shape, **kwargs):
        return _device(self._memory.reshape(*shape, **kwargs))

    def astype(self, dtype, **kwargs):
        return _device(self._memory.astype(dtype, **kwargs))

    def view(self, *args, **kwargs):
        return _device(self._memory.view(*args, **kwargs))

    def __getattr__(self, name):
        # the other ndarray methods (copy, ravel, sum, max, transpose, ...): run on the device memory,
        # operands checked and results kept on the device
        if name.startswith("__"):  # NumPy's and Python's protocols: only those defined above
            raise AttributeError(name)
        method = getattr(self._memory, name)
        if not callable(method):
            raise AttributeError(name)

        def on_device(*args, **kwargs):
            return _device(method(*_raw_operand(args), **_raw_operand(kwargs)))

        return on_device


def raw(a):
    """The held host array of a SimulatedDeviceArray (what a simulated kernel receives); a itself else."""
    return a._memory if isinstance(a, SimulatedDeviceArray) else a


def _raw_operand(value):
    """Arguments of a device operation with device arrays unwrapped; a host ndarray among them is
    refused, as CuPy refuses one (it would be an implicit transfer)."""
    if isinstance(value, SimulatedDeviceArray):
        return value._memory
    if isinstance(value, np.ndarray):
        raise TypeError(f"a host array (numpy.ndarray of shape {value.shape}) was given where a device array is needed")
    if isinstance(value, (tuple, list)):
        return type(value)(_raw_operand(v) for v in value)
    if isinstance(value, dict):
        return {k: _raw_operand(v) for k, v in value.items()}
    return value


def _device(result):
    """What a device operation returns: arrays (and NumPy scalars, as CuPy gives 0-d arrays) on the device."""
    if isinstance(result, np.ndarray):
        return SimulatedDeviceArray(result)
    if isinstance(result, np.generic) and not isinstance(result, np.bool_):
        return SimulatedDeviceArray(np.asarray(result))
    if isinstance(result, (tuple, list)):
        return type(result)(_device(r) for r in result)
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
    return isinstance(a, SimulatedDeviceArray) or hasattr(a, "__cuda_array_interface__")


def to_host(a):
    """A NumPy array with a's values: a itself if it is one, else a copy from the device."""
    if not on_device(a):
        return np.asarray(a)
    return a.get()


def to_device(a, device):
    """a on `device`: a NumPy array for "cpu" (a itself if it is one), a CuPy array for "cuda"
    (under the simulator a SimulatedDeviceArray copy, as a transfer to a GPU is one)."""
    if device == "cpu":
        return to_host(a)
    if on_device(a):
        return a
    if simulated():
        return SimulatedDeviceArray(np.array(a))
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
