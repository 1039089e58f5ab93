"""The operations the layers, losses and optimizers run, with one check of their arguments.

Each function here is one operation (batch norm forward, its backward, an
optimizer update, ...). It checks that every array it will read or write has
the shape and dtype the others imply, then runs the active backend's
implementation (see bnnet.backend):

    "numba"  bnnet.kernels       fused, compiled loops (the default)
    "numpy"  bnnet.reference     the equations of bnnet.functional, in array code
    "cuda"   bnnet.cuda_kernels  the numba kernels' passes as CUDA kernels, on GPU arrays

All have the same signatures and write their outputs into the arrays given.
Arrays are NumPy's, or CuPy's (on the GPU) for the "cuda" backend: an array of
the other kind is refused like one of the wrong shape.
Compiled loops index arrays without bounds checks, so this module is the
line that keeps a wrong-sized array (a user's assignment, a crafted file)
from being read or written past its end: nothing reaches a kernel unchecked.
The checks compare shapes and dtypes only (no copies, about a microsecond each).

Shapes: x (N, D) float32/float64, or for the batch-norm forward and backward
also (N, C, S): C channels of S values each (the layer's (N, C, H, W) input
seen with H*W = S), normalized per channel over N*S values; per-feature arrays (D,) or (C,) in x's dtype
(gamma, beta, running statistics) or float64 (mean, var, inv_std, sums).
Activation codes: IDENTITY, RELU, LEAKY_RELU, SIGMOID, TANH.
"""

import numpy as np

from . import backend
from ._checks import describe
from .device import writable
from .equations import ACTIVATION_CODES, IDENTITY, LEAKY_RELU, RELU, SIGMOID, TANH  # noqa: F401  (re-exported)
from .errors import InputError

_F64 = np.dtype(np.float64)


_arrays = backend.array_types  # NumPy's ndarray, or CuPy's for the cuda backend on a GPU


def _fail(op, what, **arrays):
    """InputError naming the op. An array among `arrays` (name=array) that sits on the other device
    (a host array given to the cuda backend, or a GPU array to a CPU one) is reported as that
    instead: it is the likelier mistake, and its shape and dtype may well be right."""
    for name, a in arrays.items():
        if hasattr(a, "shape") and not isinstance(a, _arrays()):
            from .device import device_of

            where, need = device_of(a), ("cuda" if backend.get_backend() == "cuda" else "cpu")
            if where != need:
                what = (
                    f"{name} is on the {where} device, but the {backend.get_backend()} backend runs on the {need} "
                    "device; move the model and data together (model.to(...), bnnet.device.to_device)"
                )
                break
    raise InputError(f"bnnet.ops.{op}: {what}")


def _input(op, x, spatial=False):
    """The number of features of x: (N, D), or (N, C, S) where the op takes each channel's S values."""
    if (
        not isinstance(x, _arrays()) or x.ndim not in ((2, 3) if spatial else (2,)) or x.dtype.char not in "fd"
    ):  # float32, float64
        _fail(op, f"x must be a {'2-D or 3-D' if spatial else '2-D'} float32/float64 array, got {describe(x)}", x=x)
    return x.shape[1]


def _same(op, names, arrays, x, write=False):
    """Each array is like x (shape and dtype); writable if it receives a result."""
    _check(op, names, arrays, x.shape, x.dtype, write)


def _per_feature(op, names, arrays, d, dtype, write=False):
    """Each array is (d,) of `dtype`; writable if it receives a result."""
    _check(op, names, arrays, (d,), dtype, write)


def _check(op, names, arrays, shape, dtype, write):
    for a in arrays:  # the common case, fast: no strings built
        if not isinstance(a, _arrays()) or a.shape != shape or a.dtype != dtype or (write and not writable(a)):
            break
    else:
        return
    for name, a in zip(names.split(), arrays):
        if not isinstance(a, _arrays()) or a.shape != shape or a.dtype != dtype:
            _fail(op, f"{name} must be {np.dtype(dtype).name} of shape {shape}, got {describe(a)}", **{name: a})
        if write and not writable(a):
            _fail(op, f"{name} is read-only; it receives the result")


def _act(op, act):
    if act not in ACTIVATION_CODES:
        _fail(op, f"unknown activation code {act!r}")


# --------------------------------------------------------------------------
# Batch norm (+ the activation after it)
# --------------------------------------------------------------------------


def bn_forward(
    x, gamma, beta, eps, act, slope, train, running_mean, running_var, decay, var_correction, out, mean, var, inv_std
):
    """out = g((x - mean) * gamma * inv_std + beta): one statistics pass + one apply pass.

    x: (N, D) or (N, C, S); gamma, beta, running_*: (D,) in x's dtype; out: like x.
    train=True normalizes with the batch statistics (N >= 2) and updates
    running_* in place by functional.running_average (the variance times
    var_correction); train=False uses the running statistics. The float64 (D,)
    arrays mean, var (biased) and inv_std = 1/sqrt(var + eps) receive the
    statistics used, for backward.
    """
    d = _input("bn_forward", x, spatial=True)
    _per_feature("bn_forward", "gamma beta", (gamma, beta), d, x.dtype)
    _per_feature("bn_forward", "running_mean running_var", (running_mean, running_var), d, x.dtype, write=train)
    _per_feature("bn_forward", "mean var inv_std", (mean, var, inv_std), d, _F64, write=True)
    _same("bn_forward", "out", (out,), x, write=True)
    _act("bn_forward", act)
    if train and x.size // max(d, 1) < 2:
        _fail("bn_forward", f"train mode needs at least 2 values per feature, got x of shape {x.shape}")
    backend.impl().bn_forward(
        x,
        gamma,
        beta,
        float(eps),
        act,
        float(slope),
        bool(train),
        running_mean,
        running_var,
        float(decay),
        float(var_correction),
        out,
        mean,
        var,
        inv_std,
    )


def bn_apply(x, gamma, beta, eps, act, slope, mean, var, out, inv_std):
    """out = g((x - mean) * gamma * inv_std + beta) with given float64 (D,) statistics mean, var
    (a synchronized BatchNorm's global ones); inv_std (float64, (D,)) receives 1/sqrt(var + eps)."""
    d = _input("bn_apply", x)
    _per_feature("bn_apply", "gamma beta", (gamma, beta), d, x.dtype)
    _per_feature("bn_apply", "mean var", (mean, var), d, _F64)
    _per_feature("bn_apply", "inv_std", (inv_std,), d, _F64, write=True)
    _same("bn_apply", "out", (out,), x, write=True)
    _act("bn_apply", act)
    # the eval-mode forward, with these statistics in the place of the running ones
    backend.impl().bn_forward(
        x, gamma, beta, float(eps), act, float(slope), False, mean, var, 1.0, 1.0, out, mean.copy(), var.copy(), inv_std
    )


def bn_backward(da, a, x, mean, inv_std, gamma, act, slope, train, dx, dgamma, dbeta):
    """dx (N, D), dgamma (D,), dbeta (D,) of a = g(BN(x)), written into the given arrays.

    da: dL/da; a: the forward output; x: the BN input (dx may be x itself: each
    element is read before it is written); mean, inv_std: the float64
    statistics the forward used (batch ones in train mode, running ones in eval
    mode, where dx = g'(a) da * gamma * inv_std).
    """
    d = _input("bn_backward", x, spatial=True)
    _same("bn_backward", "da a", (da, a), x)
    _same("bn_backward", "dx", (dx,), x, write=True)
    _per_feature("bn_backward", "mean inv_std", (mean, inv_std), d, _F64)
    _per_feature("bn_backward", "gamma", (gamma,), d, x.dtype)
    _per_feature("bn_backward", "dgamma dbeta", (dgamma, dbeta), d, x.dtype, write=True)
    _act("bn_backward", act)
    backend.impl().bn_backward(da, a, x, mean, inv_std, gamma, act, float(slope), bool(train), dx, dgamma, dbeta)


def bn_moments(x, mean, m2):
    """Per-feature mean and M2 = sum((x - mean)^2) of x (N, D), N >= 0, into float64 (D,) arrays."""
    d = _input("bn_moments", x)
    _per_feature("bn_moments", "mean m2", (mean, m2), d, _F64, write=True)
    backend.impl().bn_moments(x, mean, m2)


def bn_grad_sums(da, a, x, mean, inv_std, act, slope, sg, sgx):
    """sg = sum(g), sgx = sum(g * x_hat) over this shard's rows, g = da * g'(a); float64 (D,) outputs."""
    d = _input("bn_grad_sums", x)
    _same("bn_grad_sums", "da a", (da, a), x)
    _per_feature("bn_grad_sums", "mean inv_std", (mean, inv_std), d, _F64)
    _per_feature("bn_grad_sums", "sg sgx", (sg, sgx), d, _F64, write=True)
    _act("bn_grad_sums", act)
    backend.impl().bn_grad_sums(da, a, x, mean, inv_std, act, float(slope), sg, sgx)


def bn_grad_dx(da, a, x, mean, inv_std, gamma, act, slope, sg, sgx, n_total, dx):
    """dx = gamma inv_std (g - sg/n_total - x_hat sgx/n_total), with sg, sgx summed over the whole batch."""
    d = _input("bn_grad_dx", x)
    _same("bn_grad_dx", "da a", (da, a), x)
    _same("bn_grad_dx", "dx", (dx,), x, write=True)
    _per_feature("bn_grad_dx", "mean inv_std sg sgx", (mean, inv_std, sg, sgx), d, _F64)
    _per_feature("bn_grad_dx", "gamma", (gamma,), d, x.dtype)
    _act("bn_grad_dx", act)
    backend.impl().bn_grad_dx(da, a, x, mean, inv_std, gamma, act, float(slope), sg, sgx, float(n_total), dx)


def update_running(running_mean, running_var, mean, var, decay, var_correction):
    """running_* <- functional.running_average(running_*, batch statistics, decay), in place."""
    d = running_mean.shape[0] if isinstance(running_mean, _arrays()) and running_mean.ndim == 1 else -1
    dtype = running_mean.dtype if d >= 0 else None
    _per_feature("update_running", "running_mean running_var", (running_mean, running_var), d, dtype, write=True)
    _per_feature("update_running", "mean var", (mean, var), d, _F64)
    backend.impl().update_running(running_mean, running_var, mean, var, float(decay), float(var_correction))


def merge_moments(a, b):
    """b <- Chan's merge of two packed [count, mean (D), M2 (D)] float64 buffers (the SyncBN reduction)."""
    if not (
        isinstance(a, _arrays())
        and isinstance(b, _arrays())
        and a.shape == b.shape
        and a.ndim == 1
        and a.size % 2 == 1
        and a.dtype == _F64
        and b.dtype == _F64
    ):
        _fail(
            "merge_moments",
            f"needs two float64 buffers of one odd length, got {describe(a)} and {describe(b)}",
            a=a,
            b=b,
        )
    backend.impl().merge_moments(a, b)


# --------------------------------------------------------------------------
# Linear + activation, loss, optimizer updates
# --------------------------------------------------------------------------


def bias_activation(z, b, act, slope):
    """z <- g(z + b) in place: z (N, D), b (D,) in z's dtype."""
    d = _input("bias_activation", z)
    _same("bias_activation", "z", (z,), z, write=True)
    _per_feature("bias_activation", "b", (b,), d, z.dtype)
    _act("bias_activation", act)
    backend.impl().bias_activation(z, b, act, float(slope))


def softmax_cross_entropy(logits, labels, dlogits):
    """Mean over rows of -log softmax(z_i)[y_i]; writes (softmax(z) - onehot(y)) / N into dlogits."""
    _input("softmax_cross_entropy", logits)
    n, c = logits.shape
    _same("softmax_cross_entropy", "dlogits", (dlogits,), logits, write=True)
    if not (isinstance(labels, _arrays()) and labels.shape == (n,) and labels.dtype.kind in "iu"):
        _fail(
            "softmax_cross_entropy", f"labels must be integers of shape ({n},), got {describe(labels)}", labels=labels
        )
    loss = float(backend.impl().softmax_cross_entropy(logits, labels, dlogits))  # checks the labels' range
    if loss < 0:
        _fail("softmax_cross_entropy", f"labels must be in [0, {c}), got values in [{labels.min()}, {labels.max()}]")
    return loss


def _update(op, p, g, *state):
    if not (isinstance(p, _arrays()) and p.ndim == 1 and p.dtype.char in "fd"):
        _fail(op, f"the parameter must be a flat float32/float64 array, got {describe(p)}", parameter=p)
    _per_feature(op, "parameter", (p,), p.size, p.dtype, write=True)
    _per_feature(op, "gradient", (g,), p.size, p.dtype)
    _per_feature(op, " ".join(["state"] * len(state)), state, p.size, p.dtype, write=True)


def sgd(p, g, lr, wd):
    """p <- optim_rules.sgd(p, g + wd p, lr) over flat arrays, in place."""
    _update("sgd", p, g)
    backend.impl().sgd(p, g, float(lr), float(wd))


def momentum(p, g, v, lr, beta, wd):
    _update("momentum", p, g, v)
    backend.impl().momentum(p, g, v, float(lr), float(beta), float(wd))


def rmsprop(p, g, s, lr, beta, eps, wd):
    _update("rmsprop", p, g, s)
    backend.impl().rmsprop(p, g, s, float(lr), float(beta), float(eps), float(wd))


def adam(p, g, m, v, lr, beta1, beta2, eps, bias1, bias2, wd):
    """bias1 = 1 - beta1^k, bias2 = 1 - beta2^k."""
    _update("adam", p, g, m, v)
    backend.impl().adam(
        p, g, m, v, float(lr), float(beta1), float(beta2), float(eps), float(bias1), float(bias2), float(wd)
    )


def copy_finite(src, dst):
    """dst <- src (flat float arrays of one size and dtype); returns whether every value of src is finite.

    One pass: what `fit` uses to keep a copy of the last good state and check the new one together.
    """
    if not (isinstance(src, _arrays()) and src.ndim == 1 and src.dtype.char in "fd" and src.flags.c_contiguous):
        _fail("copy_finite", f"src must be a flat C-contiguous float32/float64 array, got {describe(src)}", src=src)
    _per_feature("copy_finite", "dst", (dst,), src.size, src.dtype, write=True)
    return bool(backend.impl().copy_finite(src, dst))


def all_finite(x):
    """Whether every value of the float array x is finite: one read pass, no temporary array."""
    if not (isinstance(x, _arrays()) and x.dtype.char in "fd"):
        _fail("all_finite", f"x must be a float32/float64 array, got {describe(x)}", x=x)
    if not x.flags.c_contiguous:
        return bool(np.isfinite(x).all())
    return bool(backend.impl().all_finite(x.reshape(-1)))


def check_finite(x, name, owner):
    """Raise InputError if x holds NaN or Inf, naming the first such index (a validation, in bnnet.ops
    because its fast path is an operation: one compiled read pass, no boolean temporary)."""
    if x.dtype.kind != "f":
        return
    # host data checked while a model trains on the GPU takes NumPy's pass
    fast = x.dtype.char in "fd" and isinstance(x, _arrays())
    if all_finite(x) if fast else np.isfinite(x).all():
        return
    bad = np.argwhere(~np.isfinite(x))[0]
    raise InputError(
        f"{owner}: {name} contains NaN or Inf (first at index {tuple(int(i) for i in bad)}); "
        "clean or impute the data before training"
    )


# --------------------------------------------------------------------------
# Images (N, C, H, W): the im2col matrix of a convolution and its adjoint, max pooling
# --------------------------------------------------------------------------


def _window_sizes(op, x_shape, kernel, stride, padding):
    """(Ho, Wo) of a kernel sliding over (H, W); every size checked to be a positive int."""
    for name, pair, low in (("kernel", kernel, 1), ("stride", stride, 1), ("padding", padding, 0)):
        if (
            not isinstance(pair, tuple)
            or len(pair) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= low for v in pair)
        ):
            _fail(op, f"{name} must be a pair of ints >= {low}, got {pair!r}")
    sizes = []
    for size, k, s, p in zip(x_shape[2:], kernel, stride, padding):
        if size + 2 * p < k or p >= k:
            _fail(op, f"a {kernel} kernel with padding {padding} does not fit an image of {x_shape[2:]}")
        sizes.append((size + 2 * p - k) // s + 1)
    return tuple(sizes)


def _image(op, name, x):
    if not isinstance(x, _arrays()) or x.ndim != 4 or x.dtype.char not in "fd":
        _fail(op, f"{name} must be a 4-D (N, C, H, W) float32/float64 array, got {describe(x)}", **{name: x})


def im2col(x, kernel, stride, padding, cols):
    """cols[(c, i, j), (n, p, q)] = x[n, c, p*sh + i - ph, q*sw + j - pw], 0 outside x (bnnet.spatial.im2col).

    x: (N, C, H, W); cols: (C*kh*kw, N*Ho*Wo) in x's dtype, written.
    """
    _image("im2col", "x", x)
    n, c = x.shape[:2]
    ho, wo = _window_sizes("im2col", x.shape, kernel, stride, padding)
    _check("im2col", "cols", (cols,), (c * kernel[0] * kernel[1], n * ho * wo), x.dtype, True)
    backend.impl().im2col(x, kernel, stride, padding, cols)


def col2im(cols, kernel, stride, padding, dx):
    """dx = the adjoint of im2col: each column's values added to the pixels they were read from.

    dx: (N, C, H, W), overwritten; cols: (C*kh*kw, N*Ho*Wo) in dx's dtype.
    """
    _image("col2im", "dx", dx)
    n, c = dx.shape[:2]
    ho, wo = _window_sizes("col2im", dx.shape, kernel, stride, padding)
    _check("col2im", "cols", (cols,), (c * kernel[0] * kernel[1], n * ho * wo), dx.dtype, False)
    if not writable(dx) or not dx.flags.c_contiguous:
        _fail("col2im", f"dx must be writable and C-contiguous; it receives the result, got {describe(dx)}")
    backend.impl().col2im(cols, kernel, stride, padding, dx)


def max_pool2d(x, kernel, stride, padding, out, arg):
    """out = the max of each window of x (padding never wins); arg = where it is, as h * W + w in x's plane
    (the first maximum, row by row, on ties). x: (N, C, H, W); out: (N, C, Ho, Wo) like x; arg: int64."""
    _image("max_pool2d", "x", x)
    if any(2 * p > k for p, k in zip(padding, kernel)):
        _fail("max_pool2d", f"padding {padding} must be at most half the kernel {kernel}")
    ho, wo = _window_sizes("max_pool2d", x.shape, kernel, stride, padding)
    shape = (*x.shape[:2], ho, wo)
    _check("max_pool2d", "out", (out,), shape, x.dtype, True)
    _check("max_pool2d", "arg", (arg,), shape, np.dtype(np.int64), True)
    backend.impl().max_pool2d(x, kernel, stride, padding, out, arg)


def max_pool2d_backward(dy, arg, dx):
    """dx = 0, then dx[n, c].flat[arg[n, c, p, q]] += dy[n, c, p, q] (indices outside the plane are skipped).

    dy, arg: (N, C, Ho, Wo); dx: (N, C, H, W) in dy's dtype, overwritten.
    """
    _image("max_pool2d_backward", "dy", dy)
    _image("max_pool2d_backward", "dx", dx)
    _check("max_pool2d_backward", "arg", (arg,), dy.shape, np.dtype(np.int64), False)
    if dx.shape[:2] != dy.shape[:2] or dx.dtype != dy.dtype or not writable(dx) or not dx.flags.c_contiguous:
        _fail(
            "max_pool2d_backward",
            f"dx must be a writable C-contiguous {dy.dtype} array of shape {dy.shape[:2]} + (H, W), got {describe(dx)}",
        )
    backend.impl().max_pool2d_backward(dy, arg, dx)
