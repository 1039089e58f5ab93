"""Argument validation shared by every public entry point.

Hyperparameters are checked once, in the constructor that receives them, with
these helpers, so that every message has the same shape:
"<owner>: <argument> must be <expected>, got <value>".
"""

import math
import numbers
import os

import numpy as np

from .device import on_device, writable
from .errors import HyperparameterError, InputError, InputTypeError

FLOAT_DTYPES = ("float32", "float64")


def _is_real(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_number(owner, name, value, *, low=None, high=None, low_open=False, high_open=False):
    """Return float(value) if low <(=) value <(=) high, else raise HyperparameterError."""
    if not _is_real(value) or not np.isfinite(value):
        raise HyperparameterError(f"{owner}: {name} must be a finite real number, got {value!r}")
    value = float(value)
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        lo = "-inf" if low is None else repr(low)
        hi = "inf" if high is None else repr(high)
        interval = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
        raise HyperparameterError(f"{owner}: {name} must be in {interval}, got {value!r}")
    return value


def check_int(owner, name, value, *, low=None):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise HyperparameterError(f"{owner}: {name} must be an integer, got {value!r}")
    if low is not None and value < low:
        raise HyperparameterError(f"{owner}: {name} must be an integer >= {low}, got {value!r}")
    return int(value)


def check_bool(owner, name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise HyperparameterError(f"{owner}: {name} must be True or False, got {value!r}")
    return bool(value)


def check_choice(owner, name, value, choices):
    if value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise HyperparameterError(f"{owner}: {name} must be one of {options}, got {value!r}")
    return value


def check_dtype(owner, dtype):
    """Normalize a float dtype spec ("float32", np.float64, ...) to its name."""
    try:
        name = None if dtype is None else np.dtype(dtype).name  # np.dtype(None) would be float64
    except TypeError:
        name = None
    if name not in FLOAT_DTYPES:
        raise HyperparameterError(f"{owner}: dtype must be 'float32' or 'float64', got {dtype!r}")
    return name


def as_array(x, name, owner):
    """np.asarray(x), with InputError for a ragged nested list (which numpy refuses with ValueError).
    An array on the GPU (bnnet.device) is returned as it is."""
    if on_device(x):
        return x
    try:
        return np.asarray(x)
    except ValueError as e:
        raise InputError(f"{owner}: {name} must be a rectangular array; cannot convert it ({e})") from None


def as_float_array(x, name, owner, dtype):
    """Convert array-like input to a floating array of `dtype` without copying when possible.

    Accepted: bool, integer and floating arrays (including float16, which is
    upcast, and read-only or non-contiguous arrays, which are used as they
    are). Rejected with InputTypeError: object, string and complex arrays.
    """
    arr = as_array(x, name, owner)
    if arr.dtype.kind not in "biuf":
        raise InputTypeError(
            f"{owner}: {name} must hold real numbers, got an array of dtype {arr.dtype}; "
            f"convert it with np.asarray({name}, dtype=np.{dtype})"
        )
    return arr.astype(dtype, copy=False)


def check_2d(x, name, owner, features=None):
    """Raise InputError unless x is (N, features) with N >= 1."""
    if x.ndim != 2:
        raise InputError(
            f"{owner}: {name} must be 2-D (batch, features), got shape {x.shape}; "
            f"reshape it with {name}.reshape(len({name}), -1)"
        )
    if x.shape[0] == 0:
        raise InputError(f"{owner}: {name} is empty (0 rows); pass at least one sample")
    if features is not None and x.shape[1] != features:
        raise InputError(f"{owner}: {name} must have {features} features (columns), got {x.shape[1]}")


def check_batch(x, name, owner):
    """Raise InputError unless x is a batch (N, ...) of N >= 1 samples, each at least 1-D."""
    if x.ndim < 2:
        raise InputError(
            f"{owner}: {name} must be a batch of shape (N, features) or (N, channels, ...), got shape {x.shape}; "
            f"a single sample is {name}[None]"
        )
    if x.shape[0] == 0:
        raise InputError(f"{owner}: {name} is empty (0 rows); pass at least one sample")


def per_sample(shape):
    """'(N, 3, ?, ?)': a per-sample shape template as error messages write it (None -> '?')."""
    return "(N, " + ", ".join("?" if d is None else str(d) for d in shape) + ")"


def check_samples(x, name, owner, shape):
    """Raise InputError unless x is a batch of N >= 1 samples of per-sample `shape` (None: any size there).

    shape None accepts any batch; a 1-tuple is a number of features (columns), as check_2d.
    """
    if shape is None:
        return check_batch(x, name, owner)
    if len(shape) == 1:
        return check_2d(x, name, owner, shape[0])
    check_batch(x, name, owner)
    if x.ndim - 1 != len(shape) or any(a is not None and a != b for a, b in zip(shape, x.shape[1:])):
        raise InputError(f"{owner}: {name} must be {per_sample(shape)}, got shape {x.shape}")


def check_seed(owner, seed):
    """None, or an integer in [0, 2**63): what np.random.default_rng takes as a seed."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**63:
        raise HyperparameterError(f"{owner}: seed must be None or an integer in [0, 2**63), got {seed!r}")
    return int(seed)


def describe(a):
    """How an array (or anything else) reads in an error message: its layout, dtype and shape."""
    if isinstance(a, np.ndarray) or on_device(a):
        flags = ("" if a.flags.c_contiguous else "non-contiguous ") + ("" if writable(a) else "read-only ")
        return f"{flags}{a.dtype} {'device ' if on_device(a) else ''}array of shape {a.shape}"
    return "nothing" if a is None else type(a).__name__


def memory_bytes():
    """The machine's physical memory in bytes (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_allocation(owner, what, shape, itemsize):
    """HyperparameterError, before allocating, when an array of `shape` would not fit in this machine's memory."""
    nbytes = math.prod(shape) * itemsize
    total = memory_bytes()
    if total is not None and nbytes > total:
        raise HyperparameterError(
            f"{owner}: {what} of shape {tuple(shape)} would take {nbytes / 2**30:,.1f} GiB, more than this "
            f"machine's {total / 2**30:,.1f} GiB of memory; use smaller sizes"
        )
