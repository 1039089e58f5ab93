"""The "cuda" backend of bnnet.ops: the operations of bnnet.kernels as CUDA kernels (numba.cuda).

Nothing here checks its arguments: call these through bnnet.ops, which does.
Arrays are device arrays: CuPy's on a GPU; under numba's CUDA simulator
(NUMBA_ENABLE_CUDASIM=1, which runs these same kernels on the CPU thread by
thread: how the tests check them without a GPU) bnnet.device.SimulatedDeviceArray.

The equations are those of bnnet.functional and bnnet.optim_rules, and the
activations those of bnnet.kernels, compiled for the GPU (numpy's scalar
sqrt, floor and maximum are taught to the CUDA target below for that).
Batch norm is memory-bound, so the passes are those of the CPU kernels:

    forward  (train): 1 reduction pass (read x)          + 1 apply pass (read x, write a)
    backward (train): 1 reduction pass (read da, a, x)   + 1 dx pass (read da, a, x, write dx)

A column reduction over tall (N, D) input is split in two launches: blocks of
32 features x 8 row-threads over one chunk of rows each write float64 partial
sums (G, D), then one thread per feature adds its G partials and finishes the
statistics. Sums are float64, shifted by the first row (as in bnnet.kernels),
so no E[x^2] - E[x]^2 cancellation occurs; per-element arithmetic is float64
and rounds once to the storage dtype. (N, C, S) input (images, S = H*W) uses
one block per (channel, chunk of samples) instead, which reads runs of S.
Images also get im2col, col2im and max pooling (at the end of this file).
"""

import math

import numpy as np
from numba import cuda, float64, njit, types
from numba.core import config
from numba.extending import overload

from . import functional as F
from . import kernels as K  # the scalar activations and their derivatives
from . import optim_rules
from .device import raw, writable

# -- numpy's scalar math, for the equations compiled on the GPU -----------------------


@overload(np.sqrt, target="cuda")
def _np_sqrt(x):
    if isinstance(x, types.Float):
        return lambda x: math.sqrt(x)


@overload(np.floor, target="cuda")
def _np_floor(x):
    if isinstance(x, types.Float):
        return lambda x: math.floor(x)


@overload(np.maximum, target="cuda")
def _np_maximum(a, b):
    if isinstance(a, types.Float) and isinstance(b, (types.Float, types.Integer)):
        return lambda a, b: a if (a >= b or a != a) else b  # NaN propagates, as numpy's


_EQ = dict(inline="always", error_model="numpy")
_moments_from_sums = njit(**_EQ)(F.moments_from_sums)
_inverse_std = njit(**_EQ)(F.inverse_std)
_running_average = njit(**_EQ)(F.running_average)
_input_grad_coefficients = njit(**_EQ)(F.input_grad_coefficients)
_input_grad = njit(**_EQ)(F.input_grad)
_normalize = njit(**_EQ)(F.normalize)
_scale_shift = njit(**_EQ)(F.scale_shift)
_merge_moments = njit(**_EQ)(F.merge_moments)
_sgd_rule = njit(**_EQ)(optim_rules.sgd)
_momentum_rule = njit(**_EQ)(optim_rules.momentum)
_rmsprop_rule = njit(**_EQ)(optim_rules.rmsprop)
_adam_rule = njit(**_EQ)(optim_rules.adam)
_activate = K._activate
_activation_grad = K._activation_grad
# (it takes an array: the simulator's in-kernel arrays are Python objects, so it runs as Python there)
_window_max = K._window_max.py_func if config.ENABLE_CUDASIM else K._window_max

THREADS = 256  # threads per block of the element-wise kernels
COLS, ROWS = 32, 8  # block of the column reductions: a warp reads 32 neighbouring features
ROWS_PER_THREAD = 64  # rows one thread adds up before its partial sum is written
MAX_BLOCKS = 65535  # a grid's y size

MOMENTS, GRADS = 0, 1  # what a reduction adds up: (x - shift, its square) or (g, g * x_hat)


@njit(**_EQ)
def _terms(mode, xv, dav, av, p1, p2, act, slope):
    """The two values a reduction adds for one element (float64)."""
    if mode == MOMENTS:
        v = float64(xv) - p1
        return v, v * v
    g = float64(dav) * _activation_grad(float64(av), act, 0.0, 1.0, slope)
    return g, g * ((float64(xv) - p1) * p2)


# -- reductions: partial float64 sums, then one thread per feature -------------------


@cuda.jit
def _column_sums(mode, x, da, a, p1, p2, act, slope, rows_per_chunk, s1, s2):
    """s1[k, j], s2[k, j]: the sums of _terms over rows [k * rows_per_chunk, ...) of column j. x (N, D)."""
    tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
    j = cuda.blockIdx.x * COLS + tx
    k = cuda.blockIdx.y
    n, d = x.shape
    lo = k * rows_per_chunk
    hi = lo + rows_per_chunk if lo + rows_per_chunk < n else n  # (no min(): this CUDA target mistypes it)
    acc1 = cuda.shared.array((ROWS, COLS), float64)
    acc2 = cuda.shared.array((ROWS, COLS), float64)
    t1 = 0.0
    t2 = 0.0
    if j < d:
        q1, q2 = p1[j], p2[j]
        for i in range(lo + ty, hi, ROWS):
            u, v = _terms(mode, x[i, j], da[i, j], a[i, j], q1, q2, act, slope)
            t1 += u
            t2 += v
    acc1[ty, tx] = t1
    acc2[ty, tx] = t2
    cuda.syncthreads()
    if ty == 0 and j < d:
        for r in range(1, ROWS):
            t1 += acc1[r, tx]
            t2 += acc2[r, tx]
        s1[k, j] = t1
        s2[k, j] = t2


@cuda.jit
def _channel_sums(mode, x, da, a, p1, p2, act, slope, samples_per_chunk, s1, s2):
    """s1[k, c], s2[k, c]: the sums of _terms over x[n, c, :] for the k-th chunk of samples n. x (N, C, S)."""
    t = cuda.threadIdx.x
    c = cuda.blockIdx.x
    k = cuda.blockIdx.y
    n, _, s = x.shape
    lo = k * samples_per_chunk
    hi = lo + samples_per_chunk if lo + samples_per_chunk < n else n
    acc1 = cuda.shared.array(THREADS, float64)
    acc2 = cuda.shared.array(THREADS, float64)
    t1 = 0.0
    t2 = 0.0
    q1, q2 = p1[c], p2[c]
    for e in range(t, (hi - lo) * s, THREADS):
        i, p = lo + e // s, e % s
        u, v = _terms(mode, x[i, c, p], da[i, c, p], a[i, c, p], q1, q2, act, slope)
        t1 += u
        t2 += v
    acc1[t] = t1
    acc2[t] = t2
    cuda.syncthreads()
    width = THREADS // 2
    while width > 0:  # tree sum in shared memory
        if t < width:
            acc1[t] += acc1[t + width]
            acc2[t] += acc2[t + width]
        cuda.syncthreads()
        width //= 2
    if t == 0:
        s1[k, c] = acc1[0]
        s2[k, c] = acc2[0]


@cuda.jit
def _finish_moments(n, shift, s1, s2, train, eps, running_mean, running_var, decay, var_correction, mean, var, inv_std):
    """Per feature: batch (train) or running (eval) mean and biased variance, inv_std, the running update.

    With eps < 0 (bn_moments) it stores M2 = n * var in `var` and nothing else.
    """
    j = cuda.grid(1)
    if j >= mean.shape[0]:
        return
    if train:
        t1 = 0.0
        t2 = 0.0
        for k in range(s1.shape[0]):
            t1 += s1[k, j]
            t2 += s2[k, j]
        mean[j], m2 = _moments_from_sums(n, shift[j], t1, t2)
        if eps < 0:
            var[j] = m2
            return
        v = m2 / n
        running_mean[j] = _running_average(float64(running_mean[j]), mean[j], decay)
        running_var[j] = _running_average(float64(running_var[j]), v * var_correction, decay)
    else:
        mean[j] = running_mean[j]
        v = float64(running_var[j])
    var[j] = v
    inv_std[j] = _inverse_std(v, eps)


@cuda.jit
def _finish_grads(n, s1, s2, gamma, inv_std, train, sums_out, dbeta, dgamma, coef):
    """Per feature: dbeta = sum g, dgamma = sum g x_hat, and dx's coefficients (k, c1, c2) into coef (3, D).

    sums_out: write the float64 sums into dbeta/dgamma (bn_grad_sums) and skip the coefficients.
    """
    j = cuda.grid(1)
    if j >= s1.shape[1]:
        return
    t1 = 0.0
    t2 = 0.0
    for k in range(s1.shape[0]):
        t1 += s1[k, j]
        t2 += s2[k, j]
    dbeta[j] = t1
    dgamma[j] = t2
    if sums_out:
        return
    if train:
        coef[0, j], coef[1, j], coef[2, j] = _input_grad_coefficients(float64(gamma[j]), inv_std[j], t1, t2, n)
    else:  # the statistics are constants (no sums): BN is a per-feature affine map, dx = k g
        coef[0, j], coef[1, j], coef[2, j] = _input_grad_coefficients(float64(gamma[j]), inv_std[j], 0.0, 0.0, n)


# -- element-wise passes over (N, D) or (N, C, S), seen flat -----------------------


@cuda.jit
def _apply(x, gamma, beta, mean, inv_std, act, slope, channels, inner, out):
    """out = g((x - mean) * gamma * inv_std + beta); x, out flat; feature = (i // inner) % channels."""
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        c = (i // inner) % channels
        z = _scale_shift(float64(x[i]), mean[c], 0.0, float64(gamma[c]) * inv_std[c], float64(beta[c]))
        out[i] = _activate(z, act, 0.0, slope)


@cuda.jit
def _dx(da, a, x, mean, inv_std, coef, act, slope, channels, inner, dx):
    """dx = k ((g - c1) - x_hat c2), g = da g'(a): functional.input_grad per element (dx may be x)."""
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        c = (i // inner) % channels
        g = float64(da[i]) * _activation_grad(float64(a[i]), act, 0.0, 1.0, slope)
        x_hat = _normalize(float64(x[i]), mean[c], 0.0, inv_std[c])
        dx[i] = _input_grad(g, x_hat, coef[0, c], coef[1, c], coef[2, c])


@cuda.jit
def _bias_activation(z, b, act, slope, d):
    for i in range(cuda.grid(1), z.size, cuda.gridsize(1)):
        z[i] = _activate(float64(z[i]) + float64(b[i % d]), act, 0.0, slope)


@cuda.jit
def _update_running(running_mean, running_var, mean, var, decay, var_correction):
    j = cuda.grid(1)
    if j < mean.shape[0]:
        running_mean[j] = _running_average(float64(running_mean[j]), mean[j], decay)
        running_var[j] = _running_average(float64(running_var[j]), var[j] * var_correction, decay)


@cuda.jit
def _merge(a, b, d):
    """b[1 + j], b[1 + d + j] <- Chan's merge with a's for feature j (the counts are merged after)."""
    j = cuda.grid(1)
    if j < d:
        _, b[1 + j], b[1 + d + j] = _merge_moments(a[0], a[1 + j], a[1 + d + j], b[0], b[1 + j], b[1 + d + j])


@cuda.jit
def _merge_counts(a, b):
    if cuda.grid(1) == 0:
        b[0] = a[0] + b[0]


# -- loss, optimizer updates, finiteness -----------------------------------------


@cuda.jit
def _softmax_rows(logits, labels, dlogits, losses, bad):
    """One thread per row: its loss -log softmax(z)[y] and its row of (softmax(z) - onehot(y)) / N."""
    i = cuda.grid(1)
    n, c = logits.shape
    if i >= n:
        return
    y = labels[i]
    if y < 0 or y >= c:
        bad[0] = 1
        return
    zmax = float64(logits[i, 0])
    for k in range(1, c):
        v = float64(logits[i, k])
        zmax = v if v > zmax or v != v else zmax  # a NaN logit makes the row NaN, as the CPU kernel
    s = 0.0
    for k in range(c):
        s += math.exp(float64(logits[i, k]) - zmax)
    log_s = math.log(s)
    losses[i] = log_s - (float64(logits[i, y]) - zmax)
    for k in range(c):
        dlogits[i, k] = math.exp(float64(logits[i, k]) - zmax - log_s) / n
    dlogits[i, y] -= 1.0 / n


@cuda.jit
def _sum(values, out):
    """out[0] = sum(values): one block, THREADS threads."""
    t = cuda.threadIdx.x
    acc = cuda.shared.array(THREADS, float64)
    s = 0.0
    for i in range(t, values.size, THREADS):
        s += values[i]
    acc[t] = s
    cuda.syncthreads()
    width = THREADS // 2
    while width > 0:
        if t < width:
            acc[t] += acc[t + width]
        cuda.syncthreads()
        width //= 2
    if t == 0:
        out[0] = acc[0]


@cuda.jit
def _sgd(p, g, lr, wd):
    for i in range(cuda.grid(1), p.size, cuda.gridsize(1)):
        p[i] = _sgd_rule(p[i], g[i] + wd * p[i], lr)


@cuda.jit
def _momentum(p, g, v, lr, beta, wd):
    for i in range(cuda.grid(1), p.size, cuda.gridsize(1)):
        p[i], v[i] = _momentum_rule(p[i], g[i] + wd * p[i], v[i], lr, beta)


@cuda.jit
def _rmsprop(p, g, s, lr, beta, c, eps, wd):
    for i in range(cuda.grid(1), p.size, cuda.gridsize(1)):
        p[i], s[i] = _rmsprop_rule(p[i], g[i] + wd * p[i], s[i], lr, beta, c, eps)


@cuda.jit
def _adam(p, g, m, v, step, beta1, c1, beta2, c2, eps, inv_sqrt_bias2, wd):
    for i in range(cuda.grid(1), p.size, cuda.gridsize(1)):
        p[i], m[i], v[i] = _adam_rule(
            p[i], g[i] + wd * p[i], m[i], v[i], step, beta1, c1, beta2, c2, eps, inv_sqrt_bias2
        )


@cuda.jit
def _copy_finite(src, dst, bad):
    for i in range(cuda.grid(1), src.size, cuda.gridsize(1)):
        v = src[i]
        dst[i] = v
        if v - v != 0.0:  # NaN or +-Inf; every thread that finds one writes the same 1
            bad[0] = 1


@cuda.jit
def _nonfinite(x, bad):
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        v = x[i]
        if v - v != 0.0:
            bad[0] = 1


# -- launches: the functions bnnet.ops calls -----------------------------------------
#
# Scratch arrays (partial sums, coefficients, flags) come from the array module of
# the data: CuPy's memory pool on a GPU, NumPy under the simulator.


def _xp(x):
    return np if isinstance(x, np.ndarray) else _cupy()


def _cupy():
    import cupy

    return cupy


def _host(a):
    return a if isinstance(a, np.ndarray) else a.get()


def _stream():
    """numba's handle on CuPy's current stream, so that CuPy's GEMMs and these kernels run in order."""
    if config.ENABLE_CUDASIM:
        return 0
    ptr = _cupy().cuda.get_current_stream().ptr
    return cuda.external_stream(ptr) if ptr else 0


def _blocks(size):
    return max(1, min((size + THREADS - 1) // THREADS, 4 * 1024))


def _flat(a):
    return a.reshape(-1)  # a view: _contiguous has made every argument C-contiguous


def _contiguous(launch):
    """Run `launch` on C-contiguous writable arrays: a strided or read-only argument is copied in, and
    back out after (if writable). Kernels then index flat or row-major memory only; strided arrays are rare here
    (bnnet's layers allocate contiguous ones), and numba's simulator refuses them."""

    def run(*args):
        if config.ENABLE_CUDASIM:
            args = [_simulated_memory(a, launch.__name__, i) for i, a in enumerate(args)]
        # (a read-only array is copied too: numba's simulator writes every argument back after a launch)
        copies = [
            (a, _xp(a).array(a, order="C"))
            if hasattr(a, "flags") and (not a.flags.c_contiguous or not writable(a))
            else (a, a)
            for a in args
        ]
        result = launch(*(c for _, c in copies))
        for a, c in copies:
            if c is not a and writable(a):
                a[...] = c
        return result

    run.__name__ = launch.__name__
    run.__doc__ = launch.__doc__
    return run


def _simulated_memory(a, op, position):
    """Under the simulator, the host memory a SimulatedDeviceArray holds, which the simulated kernels
    index; a host ndarray is refused, as a GPU kernel cannot read host memory."""
    if isinstance(a, np.ndarray):
        raise TypeError(f"cuda backend: {op} got a host array (numpy.ndarray) as argument {position}")
    return raw(a)


def _layout(x):
    """(channels, inner): feature of flat element i is (i // inner) % channels."""
    return (x.shape[1], x.shape[2]) if x.ndim == 3 else (x.shape[1], 1)


def _reduce(mode, x, da, a, p1, p2, act, slope):
    """(s1, s2): float64 (G, D) partial sums of _terms over chunks of rows (or samples)."""
    xp = _xp(x)
    stream = _stream()
    n, d = x.shape[0], x.shape[1]
    if x.ndim == 2:  # rows per chunk
        per = max(ROWS * ROWS_PER_THREAD, -(-n // MAX_BLOCKS))
    else:  # samples per chunk, each of S values
        per = max(1, -(-THREADS * ROWS_PER_THREAD // x.shape[2]), -(-n // MAX_BLOCKS))
    chunks = max(1, -(-n // per))
    s1 = xp.empty((chunks, d), np.float64)
    s2 = xp.empty((chunks, d), np.float64)
    if x.ndim == 2:
        grid = ((d + COLS - 1) // COLS, chunks)
        _column_sums[grid, (COLS, ROWS), stream](mode, x, da, a, p1, p2, act, slope, per, s1, s2)
    else:
        _channel_sums[(d, chunks), THREADS, stream](mode, x, da, a, p1, p2, act, slope, per, s1, s2)
    return s1, s2


def _shift(x):
    """Each feature's first value, the shift of its sums (float64 (D,))."""
    first = x[0] if x.ndim == 2 else x[0, :, 0]
    return first.astype(np.float64)


def _per_feature_blocks(d):
    return (d + THREADS - 1) // THREADS


@_contiguous
def bn_forward(
    x, gamma, beta, eps, act, slope, train, running_mean, running_var, decay, var_correction, out, mean, var, inv_std
):
    stream = _stream()
    d = gamma.shape[0]
    count = x.size // d
    if train:
        shift = _shift(x)
        s1, s2 = _reduce(MOMENTS, x, x, x, shift, shift, act, slope)
    else:  # no sums: placeholders (never one array passed twice: the simulator copies each argument)
        shift = _xp(x).empty(d, np.float64)
        s1, s2 = (_xp(x).empty((1, d), np.float64) for _ in range(2))
    _finish_moments[_per_feature_blocks(d), THREADS, stream](
        float(count), shift, s1, s2, train, eps, running_mean, running_var, decay, var_correction, mean, var, inv_std
    )
    channels, inner = _layout(x)
    _apply[_blocks(x.size), THREADS, stream](
        _flat(x), gamma, beta, mean, inv_std, act, slope, channels, inner, _flat(out)
    )


@_contiguous
def bn_backward(da, a, x, mean, inv_std, gamma, act, slope, train, dx, dgamma, dbeta):
    stream = _stream()
    d = gamma.shape[0]
    s1, s2 = _reduce(GRADS, x, da, a, mean, inv_std, act, slope)
    coef = _xp(x).empty((3, d), np.float64)
    _finish_grads[_per_feature_blocks(d), THREADS, stream](
        float(x.size // d), s1, s2, gamma, inv_std, train, False, dbeta, dgamma, coef
    )
    channels, inner = _layout(x)
    _dx[_blocks(x.size), THREADS, stream](
        _flat(da), _flat(a), _flat(x), mean, inv_std, coef, act, slope, channels, inner, _flat(dx)
    )


@_contiguous
def bn_moments(x, mean, m2):
    d = mean.shape[0]
    if x.shape[0] == 0:  # an empty shard contributes nothing
        mean[...] = 0.0
        m2[...] = 0.0
        return
    shift = _shift(x)
    s1, s2 = _reduce(MOMENTS, x, x, x, shift, shift, 0, 0.0)
    unused = _xp(x).empty((3, d), np.float64)  # running_mean, running_var, inv_std: not written with eps < 0
    _finish_moments[_per_feature_blocks(d), THREADS, _stream()](
        float(x.shape[0]), shift, s1, s2, True, -1.0, unused[0], unused[1], 1.0, 1.0, mean, m2, unused[2]
    )


@_contiguous
def bn_grad_sums(da, a, x, mean, inv_std, act, slope, sg, sgx):
    d = mean.shape[0]
    if x.shape[0] == 0:
        sg[...] = 0.0
        sgx[...] = 0.0
        return
    s1, s2 = _reduce(GRADS, x, da, a, mean, inv_std, act, slope)
    unused = _xp(x).empty((3, d), np.float64)  # gamma and the coefficients: not used for the sums alone
    _finish_grads[_per_feature_blocks(d), THREADS, _stream()](
        0.0, s1, s2, unused[0], inv_std, True, True, sg, sgx, unused
    )


@_contiguous
def bn_grad_dx(da, a, x, mean, inv_std, gamma, act, slope, sg, sgx, n_total, dx):
    if x.size == 0:
        return
    d = mean.shape[0]
    stream = _stream()
    s1, s2 = sg.reshape(1, d), sgx.reshape(1, d)  # the whole batch's sums, as one "chunk"
    coef = _xp(x).empty((3, d), np.float64)
    scratch = _xp(x).empty((2, d), np.float64)  # receives the sums again, unused
    _finish_grads[_per_feature_blocks(d), THREADS, stream](
        float(n_total), s1, s2, gamma, inv_std, True, False, scratch[0], scratch[1], coef
    )
    _dx[_blocks(x.size), THREADS, stream](
        _flat(da), _flat(a), _flat(x), mean, inv_std, coef, act, slope, x.shape[1], 1, _flat(dx)
    )


@_contiguous
def update_running(running_mean, running_var, mean, var, decay, var_correction):
    _update_running[_per_feature_blocks(mean.shape[0]), THREADS, _stream()](
        running_mean, running_var, mean, var, decay, var_correction
    )


@_contiguous
def merge_moments(a, b):
    d = (a.size - 1) // 2
    stream = _stream()
    _merge[_per_feature_blocks(max(d, 1)), THREADS, stream](a, b, d)
    _merge_counts[1, 1, stream](a, b)


@_contiguous
def bias_activation(z, b, act, slope):
    _bias_activation[_blocks(z.size), THREADS, _stream()](_flat(z), b, act, slope, z.shape[1])


@_contiguous
def softmax_cross_entropy(logits, labels, dlogits):
    xp = _xp(logits)
    stream = _stream()
    n = logits.shape[0]
    losses = xp.zeros(max(n, 1), np.float64)
    bad = xp.zeros(1, np.int32)
    total = xp.zeros(1, np.float64)
    _softmax_rows[_per_feature_blocks(max(n, 1)), THREADS, stream](logits, labels, dlogits, losses, bad)
    _sum[1, THREADS, stream](losses, total)
    if int(_host(bad)[0]):
        return -1.0  # as the CPU kernels: a label outside [0, C)
    return float(_host(total)[0]) / n if n else 0.0


@_contiguous
def sgd(p, g, lr, wd):
    _sgd[_blocks(p.size), THREADS, _stream()](p, g, lr, wd)


@_contiguous
def momentum(p, g, v, lr, beta, wd):
    _momentum[_blocks(p.size), THREADS, _stream()](p, g, v, lr, beta, wd)


@_contiguous
def rmsprop(p, g, s, lr, beta, eps, wd):
    coefficients = optim_rules.rmsprop_coefficients(p.dtype, lr, beta, eps, wd)
    _rmsprop[_blocks(p.size), THREADS, _stream()](p, g, s, *coefficients)


@_contiguous
def adam(p, g, m, v, lr, beta1, beta2, eps, bias1, bias2, wd):
    coefficients = optim_rules.adam_coefficients(p.dtype, lr, beta1, beta2, eps, bias1, bias2, wd)
    _adam[_blocks(p.size), THREADS, _stream()](p, g, m, v, *coefficients)


@_contiguous
def copy_finite(src, dst):
    bad = _xp(src).zeros(1, np.int32)
    _copy_finite[_blocks(src.size), THREADS, _stream()](src, dst, bad)
    return not int(_host(bad)[0])


@_contiguous
def all_finite(x):
    bad = _xp(x).zeros(1, np.int32)
    _nonfinite[_blocks(x.size), THREADS, _stream()](x, bad)
    return not int(_host(bad)[0])


# -- images (N, C, H, W): im2col, its adjoint col2im, max pooling ------------------------
#
# One thread per element written, so that no two threads write one place, except in the
# max-pool backward, whose windows may overlap: there each dy is added with an atomic add.


@cuda.jit
def _im2col(x, kh, kw, sh, sw, ph, pw, ho, wo, cols):
    """cols[(c, i, j), (n, p, q)] = x[n, c, p*sh + i - ph, q*sw + j - pw], 0 outside x."""
    _, _, h, w = x.shape
    width = cols.shape[1]
    for e in range(cuda.grid(1), cols.size, cuda.gridsize(1)):
        r, col = e // width, e % width
        ch, i, j = r // (kh * kw), (r // kw) % kh, r % kw
        s, p, q = col // (ho * wo), (col // wo) % ho, col % wo
        y, xx = p * sh + i - ph, q * sw + j - pw
        v = 0.0
        if 0 <= y < h and 0 <= xx < w:
            v = x[s, ch, y, xx]
        cols[r, col] = v


@cuda.jit
def _col2im(cols, kh, kw, sh, sw, ph, pw, ho, wo, dx):
    """dx[n, c, y, x] = the sum of the columns' entries read from that pixel (gathered, no atomics)."""
    n, c, h, w = dx.shape
    for e in range(cuda.grid(1), dx.size, cuda.gridsize(1)):
        s, ch, y, xx = e // (c * h * w), (e // (h * w)) % c, (e // w) % h, e % w
        acc = 0.0
        for i in range(kh):
            py = y + ph - i  # = p * sh for the window row p that reads pixel row y at offset i
            if py < 0 or py % sh != 0 or py // sh >= ho:
                continue
            for j in range(kw):
                qx = xx + pw - j
                if qx < 0 or qx % sw != 0 or qx // sw >= wo:
                    continue
                acc += cols[(ch * kh + i) * kw + j, (s * ho + py // sh) * wo + qx // sw]
        dx[s, ch, y, xx] = acc


@cuda.jit
def _max_pool2d(x, kh, kw, sh, sw, ph, pw, out, arg):
    """One thread per output: the window's first maximum (a NaN wins and stays), and where it is."""
    c, ho, wo = out.shape[1], out.shape[2], out.shape[3]
    for e in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        s, ch, p, q = e // (c * ho * wo), (e // (ho * wo)) % c, (e // wo) % ho, e % wo
        out[s, ch, p, q], arg[s, ch, p, q] = _window_max(x, s, ch, p, q, kh, kw, sh, sw, ph, pw)


@cuda.jit
def _max_pool2d_backward(dy, arg, dx):
    """dx[n, c].flat[arg] += dy (dx zeroed before); indices outside the plane are skipped."""
    _, c, ho, wo = dy.shape
    h, w = dx.shape[2], dx.shape[3]
    for e in range(cuda.grid(1), dy.size, cuda.gridsize(1)):
        s, ch, p, q = e // (c * ho * wo), (e // (ho * wo)) % c, (e // wo) % ho, e % wo
        a = arg[s, ch, p, q]
        if 0 <= a < h * w:
            cuda.atomic.add(dx, (s, ch, a // w, a % w), dy[s, ch, p, q])


def _sizes(size, kernel, stride, padding):
    return tuple((n + 2 * pd - k) // st + 1 for n, k, st, pd in zip(size, kernel, stride, padding))


@_contiguous
def im2col(x, kernel, stride, padding, cols):
    ho, wo = _sizes(x.shape[2:], kernel, stride, padding)
    _im2col[_blocks(cols.size), THREADS, _stream()](x, *kernel, *stride, *padding, ho, wo, cols)


@_contiguous
def col2im(cols, kernel, stride, padding, dx):
    ho, wo = _sizes(dx.shape[2:], kernel, stride, padding)
    _col2im[_blocks(dx.size), THREADS, _stream()](cols, *kernel, *stride, *padding, ho, wo, dx)


@_contiguous
def max_pool2d(x, kernel, stride, padding, out, arg):
    _max_pool2d[_blocks(out.size), THREADS, _stream()](x, *kernel, *stride, *padding, out, arg)


@_contiguous
def max_pool2d_backward(dy, arg, dx):
    dx[...] = 0
    _max_pool2d_backward[_blocks(dy.size), THREADS, _stream()](dy, arg, dx)
