"""Fused batch-norm kernels compiled with numba: the "numba" backend of bnnet.ops.

Nothing here checks its arguments: call these through bnnet.ops, which does.

The equations are those of `bnnet.functional`; only the schedule differs.
Batch norm is memory-bound, so every kernel makes the fewest passes over the
(N, D) activations:

    forward  (train): 1 statistics pass (read x)            + 1 apply pass (read x, write a)
    backward (train): 1 reduction pass (read da, a, x)      + 1 apply pass (read da, a, x, write dx)

where the apply pass also runs the activation that follows batch norm
(a = g(z~)), and the backward pass its derivative, from the saved output a.
x_hat is never stored: it is recomputed as (x - mean) * inv_std, which costs
less than writing and re-reading it. Statistics and every sum are accumulated
in float64 whatever the storage dtype, shifted by the first row so that no
E[x^2] - E[x]^2 cancellation occurs; per-element arithmetic runs in the storage
dtype (as the NumPy reference does), except sigmoid/tanh, computed in float64.

Each kernel exists as a serial function (small batches: no thread start-up)
and a parallel one (rows split across threads, contiguous inner loop over
features), kept as distinct functions so that numba's on-disk caches of the two
never collide. `bn_forward` / `bn_backward` pick one by size. Each is compiled
for one activation at a time (`_PerActivation`): a model compiles the loops of
the activations it uses, not all five.
"""

import math
import os

# numba runs its parallel kernels on OpenMP threads. By default those spin after
# each parallel region, and so do OpenBLAS's after each GEMM: on a 2-core machine
# the two pools then take turns on the cores and a 0.1 ms kernel can take 10 ms.
# Sleeping workers cost a few microseconds to wake instead. (Only effective if
# set before OpenMP starts; a value the user chose is kept.)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
from llvmlite import ir  # noqa: E402
from numba import njit, prange, types  # noqa: E402
from numba.extending import intrinsic  # noqa: E402

from . import functional as F  # noqa: E402
from . import optim_rules  # noqa: E402
from .equations import ACTIVATION_CODES, LEAKY_RELU, RELU, SIGMOID, TANH  # noqa: E402
from .threads import numba_threads  # noqa: E402

# Above this many elements the parallel kernels are used. One core nearly
# saturates memory bandwidth on our 2-core machines, so splitting rows gains
# little below about two million elements, and right after a GEMM (OpenBLAS's own
# threads still awake) it loses: measured with benchmarks/run.py.
PARALLEL_MIN_ELEMENTS = 1 << 21

# IEEE semantics (no ZeroDivisionError branch, which would block vectorization);
# contraction to FMA is allowed, reassociation is not.
_OPTS = dict(cache=True, error_model="numpy", fastmath={"contract", "nsz"})
_OPTS_EQ = dict(error_model="numpy", fastmath={"contract", "nsz"})

# The equations of bnnet.functional, compiled: each kernel below calls these,
# so a formula is written once (there) and runs in both backends.
_moments_from_sums = njit(inline="always", **_OPTS_EQ)(F.moments_from_sums)
_inverse_std = njit(inline="always", **_OPTS_EQ)(F.inverse_std)
_normalize = njit(inline="always", **_OPTS_EQ)(F.normalize)
_scale_shift = njit(inline="always", **_OPTS_EQ)(F.scale_shift)
_running_average = njit(inline="always", **_OPTS_EQ)(F.running_average)
_input_grad_coefficients = njit(inline="always", **_OPTS_EQ)(F.input_grad_coefficients)
_input_grad = njit(inline="always", **_OPTS_EQ)(F.input_grad)
# Chan's merge without FMA contraction, so that merge(a, b) and merge(b, a) are bitwise equal.
_merge_moments = njit(cache=True, error_model="numpy")(F.merge_moments)


# --------------------------------------------------------------------------
# exp(-a) that LLVM can vectorize (numba has no vector libm here)
# --------------------------------------------------------------------------


@intrinsic
def _float64_from_bits(typingctx, bits):
    """Reinterpret an int64's bits as a float64 (a no-op at machine level)."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return types.float64(types.int64), codegen


_LOG2E = 1.4426950408889634
_LN2_HI = 6.93147180369123816490e-01  # ln 2 split in two so that n * ln2 is exact
_LN2_LO = 1.90821492927058770002e-10


@njit(inline="always", **_OPTS)
def _exp_neg(a):
    """exp(-a) for a >= 0, to about 1 ulp in float64.

    -a = n ln2 + r with |r| <= ln2 / 2; exp(r) by its Taylor series to r^13
    (truncation < 1e-17); 2^n built from its exponent bits.
    """
    a = 708.0 if a > 708.0 else a  # exp(-708) is the smallest normal float64 scale we build (NaN stays NaN)
    n = np.floor(-a * _LOG2E + 0.5)
    r = (-a - n * _LN2_HI) - n * _LN2_LO
    p = 1.0 / 6227020800.0
    p = p * r + 1.0 / 479001600.0
    p = p * r + 1.0 / 39916800.0
    p = p * r + 1.0 / 3628800.0
    p = p * r + 1.0 / 362880.0
    p = p * r + 1.0 / 40320.0
    p = p * r + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    p = p * r + 1.0
    p = p * r + 1.0
    return p * _float64_from_bits(np.int64(n + 1023.0) << 52)


@njit(inline="always", **_OPTS)
def _activate(z, act, zero, slope):
    """a = g(z) for the activation code `act`. z, zero, slope share the storage dtype;
    sigmoid and tanh are computed in float64 (their exp is the costly part anyway)."""
    # Comparisons are written so that NaN propagates (NaN < 0 is false), as in NumPy.
    if act == RELU:
        return zero if z < zero else z
    if act == LEAKY_RELU:
        return z * slope if z < zero else z
    if act == SIGMOID:
        zd = np.float64(z)
        e = _exp_neg(-zd if zd < 0 else zd)  # in (0, 1]: no overflow for any z
        s = 1.0 / (1.0 + e)
        return e * s if zd < 0 else s
    if act == TANH:
        zd = np.float64(z)
        az = -zd if zd < 0 else zd
        e = _exp_neg(2.0 * az)
        t = (1.0 - e) / (1.0 + e)
        z2 = zd * zd  # near 0, 1 - e loses digits: use the series z - z^3/3 + 2z^5/15 - 17z^7/315 + ...
        small = zd * (1.0 + z2 * (-1.0 / 3.0 + z2 * (2.0 / 15.0 + z2 * (-17.0 / 315.0 + z2 * (62.0 / 2835.0)))))
        return small if az < 0.0625 else (-t if zd < 0 else t)
    return z


@njit(inline="always", **_OPTS)
def _activation_grad(a, act, zero, one, slope):
    """da/dz written in terms of the output a = g(z), in the storage dtype."""
    if act == RELU:
        return zero if a <= zero else one  # NaN gives one: the NaN in da (or a) propagates
    if act == LEAKY_RELU:
        return slope if a <= zero else one
    if act == SIGMOID:
        return a * (one - a)
    if act == TANH:
        return one - a * a
    return one


# --------------------------------------------------------------------------
# Per-feature coefficients, stored in the data's dtype so that the element
# loops run at its full SIMD width (16 float32 lanes on AVX-512, not 8).
# The mean is split into hi (rounded to the dtype) + lo (its rounding error):
# (x - hi) - lo keeps the float64 mean's precision when |mean| >> std.
# --------------------------------------------------------------------------

HI, LO, SCALE, BETA = 0, 1, 2, 3  # forward table rows: a = g(((x - hi) - lo) * scale + beta)
INV, K, C1, C2 = 2, 3, 4, 5  # backward table rows: x_hat = ((x - hi) - lo) * inv; dx = k (g - c1 - x_hat c2)


@njit(inline="always", **_OPTS)
def _constants(x, slope):
    c = np.empty(3, x.dtype)  # zero, one, slope in the storage dtype
    c[0] = 0.0
    c[1] = 1.0
    c[2] = slope
    return c


@njit(inline="always", **_OPTS)
def _split_mean(mean, table):
    for j in range(mean.shape[0]):
        table[HI, j] = mean[j]
        table[LO, j] = mean[j] - np.float64(table[HI, j])


# --------------------------------------------------------------------------
# Statistics: float64 sums of (x - shift) and (x - shift)^2 per feature
# --------------------------------------------------------------------------


@njit(inline="always", **_OPTS)
def _accumulate(x, shift, lo, hi, s1, s2):
    """s1 += the sum over rows lo..hi-1 of (x - shift), s2 += that of (x - shift)^2, per feature.

    Four rows at a time into accumulators of its own, added to s1 and s2 at the end: each
    accumulator is loaded and stored once per four rows, not every row, and the compiler knows
    they share no memory with x (1.3x faster at 256x1024, 2-3x at 100-wide rows, one core).
    """
    d = x.shape[1]
    a1 = np.zeros(d)
    a2 = np.zeros(d)
    c = np.empty(d)
    for j in range(d):
        c[j] = shift[j]
    i = lo
    while i + 4 <= hi:
        x0, x1, x2, x3 = x[i], x[i + 1], x[i + 2], x[i + 3]
        for j in range(d):
            v0 = np.float64(x0[j]) - c[j]
            v1 = np.float64(x1[j]) - c[j]
            v2 = np.float64(x2[j]) - c[j]
            v3 = np.float64(x3[j]) - c[j]
            a1[j] += (v0 + v1) + (v2 + v3)
            a2[j] += (v0 * v0 + v1 * v1) + (v2 * v2 + v3 * v3)
        i += 4
    for r in range(i, hi):
        xr = x[r]
        for j in range(d):
            v = np.float64(xr[j]) - c[j]
            a1[j] += v
            a2[j] += v * v
    for j in range(d):
        s1[j] += a1[j]
        s2[j] += a2[j]


@njit(inline="always", **_OPTS)
def _update_running_at(running_mean, running_var, j, mean_j, var_j, decay, var_correction):
    """functional.running_average for feature j; var_correction = m/(m-1) or 1 (see BatchNorm)."""
    running_mean[j] = _running_average(running_mean[j], mean_j, decay)
    running_var[j] = _running_average(running_var[j], var_j * var_correction, decay)


@njit(inline="always", **_OPTS)
def _statistics(
    n,
    shift,
    gamma,
    beta,
    eps,
    train,
    running_mean,
    running_var,
    decay,
    var_correction,
    s1,
    s2,
    mean,
    var,
    inv_std,
    table,
):
    """Batch statistics from the sums s1, s2 of n values per feature shifted by `shift`
    (train, then also the running update) or the running ones (eval); fills the forward
    coefficient table."""
    for j in range(gamma.shape[0]):
        if train:
            mean[j], m2 = _moments_from_sums(n, shift[j], s1[j], s2[j])
            v = m2 / n
            _update_running_at(running_mean, running_var, j, mean[j], v, decay, var_correction)
        else:
            v = np.float64(running_var[j])
            mean[j] = running_mean[j]
        var[j] = v
        inv_std[j] = _inverse_std(v, eps)
        table[SCALE, j] = np.float64(gamma[j]) * inv_std[j]
        table[BETA, j] = beta[j]
    _split_mean(mean, table)


# --------------------------------------------------------------------------
# Apply: a = g((x - mean) * (gamma * inv_std) + beta)
# --------------------------------------------------------------------------


@njit(inline="always", **_OPTS)
def _apply_rows_as(x, t, act, c, out, lo, hi):
    zero, slope = c[0], c[2]
    for i in range(lo, hi):
        xi = x[i]
        oi = out[i]
        for j in range(xi.shape[0]):
            oi[j] = _activate(_scale_shift(xi[j], t[HI, j], t[LO, j], t[SCALE, j], t[BETA, j]), act, zero, slope)


class _PerActivation:
    """A kernel compiled for one activation at a time: kernel[act] is the numba function with the
    activation code a constant, made on first use.

    Each of the five activations gets its own loop either way (so that the branch in _activate folds
    away and the loop vectorizes); compiled separately, a model compiles only the loops of the
    activations it uses (about a third of the cold compile for one activation, against all five in
    one function). numba caches each on disk (its index is keyed by the constant).
    """

    def __init__(self, make):
        self._make, self._kernels = make, {}

    def __getitem__(self, act):
        kernel = self._kernels.get(act)
        if kernel is None:
            if act not in ACTIVATION_CODES:  # (bnnet.ops checks the code before any kernel runs)
                raise ValueError(f"unknown activation code {act!r}; expected one of {ACTIVATION_CODES}")
            kernel = self._kernels[act] = self._make(act)
        return kernel

    def dispatchers(self):
        """The kernels made so far, {act: numba dispatcher}."""
        return dict(self._kernels)


def _forward_serial_for(act):
    """The forward pass on one thread, compiled for the activation code `act`."""

    @njit(**_OPTS)
    def _forward_serial(
        x, gamma, beta, eps, slope, train, running_mean, running_var, decay, var_correction, out, mean, var, inv_std
    ):
        n, d = x.shape
        s1 = np.zeros(d)
        s2 = np.zeros(d)
        shift = np.zeros(d)
        if train:
            shift[:] = x[0]
            _accumulate(x, shift, 0, n, s1, s2)
        table = np.empty((4, d), x.dtype)
        _statistics(
            n,
            shift,
            gamma,
            beta,
            eps,
            train,
            running_mean,
            running_var,
            decay,
            var_correction,
            s1,
            s2,
            mean,
            var,
            inv_std,
            table,
        )
        _apply_rows_as(x, table, act, _constants(x, slope), out, 0, n)

    return _forward_serial


_forward_serial = _PerActivation(_forward_serial_for)


def _forward_parallel_for(act):
    """The forward pass, rows split across `chunks` threads, compiled for the activation code `act`."""

    @njit(parallel=True, **_OPTS)
    def _forward_parallel(
        x,
        gamma,
        beta,
        eps,
        slope,
        train,
        running_mean,
        running_var,
        decay,
        var_correction,
        out,
        mean,
        var,
        inv_std,
        chunks,
    ):
        n, d = x.shape
        rows = (n + chunks - 1) // chunks
        s1 = np.zeros(d)
        s2 = np.zeros(d)
        shift = np.zeros(d)
        if train:
            shift[:] = x[0]
            p1 = np.zeros((chunks, d))
            p2 = np.zeros((chunks, d))
            for c in prange(chunks):
                _accumulate(x, shift, c * rows, min(n, (c + 1) * rows), p1[c], p2[c])
            for c in range(chunks):  # the partial sums share one shift, so they add
                for j in range(d):
                    s1[j] += p1[c, j]
                    s2[j] += p2[c, j]
        table = np.empty((4, d), x.dtype)
        _statistics(
            n,
            shift,
            gamma,
            beta,
            eps,
            train,
            running_mean,
            running_var,
            decay,
            var_correction,
            s1,
            s2,
            mean,
            var,
            inv_std,
            table,
        )
        cst = _constants(x, slope)
        for c in prange(chunks):
            _apply_rows_as(x, table, act, cst, out, c * rows, min(n, (c + 1) * rows))

    return _forward_parallel


_forward_parallel = _PerActivation(_forward_parallel_for)


# --------------------------------------------------------------------------
# Backward: g = da * g'(a); sums of g and g * x_hat; then dx
# --------------------------------------------------------------------------


@njit(inline="always", **_OPTS)
def _grad_terms(da, a, x, i, j, t, act, zero, one, slope):
    """(g, g * x_hat) of element (i, j) in float64, g = da * g'(a) in the storage dtype."""
    g = da[i, j] * _activation_grad(a[i, j], act, zero, one, slope)
    return np.float64(g), np.float64(g * _normalize(x[i, j], t[HI, j], t[LO, j], t[INV, j]))


@njit(inline="always", **_OPTS)
def _grad_sums_rows_as(da, a, x, t, act, c, lo, hi, sg, sgx):
    """sg += the sum over rows lo..hi-1 of g, sgx += that of g * x_hat, per feature (float64): four
    rows at a time into accumulators of its own, as _accumulate does."""
    zero, one, slope = c[0], c[1], c[2]
    d = x.shape[1]
    b1 = np.zeros(d)
    b2 = np.zeros(d)
    i = lo
    while i + 4 <= hi:
        for j in range(d):
            g0, h0 = _grad_terms(da, a, x, i, j, t, act, zero, one, slope)
            g1, h1 = _grad_terms(da, a, x, i + 1, j, t, act, zero, one, slope)
            g2, h2 = _grad_terms(da, a, x, i + 2, j, t, act, zero, one, slope)
            g3, h3 = _grad_terms(da, a, x, i + 3, j, t, act, zero, one, slope)
            b1[j] += (g0 + g1) + (g2 + g3)
            b2[j] += (h0 + h1) + (h2 + h3)
        i += 4
    for r in range(i, hi):
        for j in range(d):
            g, h = _grad_terms(da, a, x, r, j, t, act, zero, one, slope)
            b1[j] += g
            b2[j] += h
    for j in range(d):
        sg[j] += b1[j]
        sgx[j] += b2[j]


@njit(inline="always", **_OPTS)
def _dx_rows_as(da, a, x, t, act, c, dx, lo, hi):
    """dx = k * (g - c1 - x_hat * c2), k = gamma * inv_std, c1 = mean(g), c2 = mean(g * x_hat)."""
    zero, one, slope = c[0], c[1], c[2]
    for i in range(lo, hi):
        dai = da[i]
        ai = a[i]
        xi = x[i]
        dxi = dx[i]
        for j in range(xi.shape[0]):
            g = dai[j] * _activation_grad(ai[j], act, zero, one, slope)
            x_hat = _normalize(xi[j], t[HI, j], t[LO, j], t[INV, j])
            dxi[j] = _input_grad(g, x_hat, t[K, j], t[C1, j], t[C2, j])


@njit(inline="always", **_OPTS)
def _backward_table(x, mean, inv_std):
    t = np.empty((6, x.shape[1]), x.dtype)
    _split_mean(mean, t)
    for j in range(x.shape[1]):
        t[INV, j] = inv_std[j]
    return t


@njit(inline="always", **_OPTS)
def _dx_coefficients(sg, sgx, gamma, inv_std, n, train, t):
    """k, c1, c2 of dx = k (g - c1 - x_hat c2) from the sums over all n rows of the batch."""
    for j in range(sg.shape[0]):
        # in eval mode the statistics are constants: c1 = c2 = 0, dx = k * g
        t[K, j], t[C1, j], t[C2, j] = _input_grad_coefficients(
            np.float64(gamma[j]), inv_std[j], sg[j] if train else 0.0, sgx[j] if train else 0.0, n
        )


@njit(inline="always", **_OPTS)
def _backward_coefficients(sg, sgx, gamma, inv_std, n, train, t, dgamma, dbeta):
    for j in range(sg.shape[0]):
        dbeta[j] = sg[j]
        dgamma[j] = sgx[j]
    _dx_coefficients(sg, sgx, gamma, inv_std, n, train, t)


def _backward_serial_for(act):
    """The backward pass on one thread, compiled for the activation code `act`."""

    @njit(**_OPTS)
    def _backward_serial(da, a, x, mean, inv_std, gamma, slope, train, dx, dgamma, dbeta):
        n, d = x.shape
        t = _backward_table(x, mean, inv_std)
        cst = _constants(x, slope)
        sg = np.zeros(d)
        sgx = np.zeros(d)
        _grad_sums_rows_as(da, a, x, t, act, cst, 0, n, sg, sgx)
        _backward_coefficients(sg, sgx, gamma, inv_std, n, train, t, dgamma, dbeta)
        _dx_rows_as(da, a, x, t, act, cst, dx, 0, n)

    return _backward_serial


_backward_serial = _PerActivation(_backward_serial_for)


def _backward_parallel_for(act):
    """The backward pass, rows split across `chunks` threads, compiled for the activation code `act`."""

    @njit(parallel=True, **_OPTS)
    def _backward_parallel(da, a, x, mean, inv_std, gamma, slope, train, dx, dgamma, dbeta, chunks):
        n, d = x.shape
        rows = (n + chunks - 1) // chunks
        t = _backward_table(x, mean, inv_std)
        cst = _constants(x, slope)
        p1 = np.zeros((chunks, d))
        p2 = np.zeros((chunks, d))
        for c in prange(chunks):
            _grad_sums_rows_as(da, a, x, t, act, cst, c * rows, min(n, (c + 1) * rows), p1[c], p2[c])
        sg = np.zeros(d)
        sgx = np.zeros(d)
        for c in range(chunks):
            for j in range(d):
                sg[j] += p1[c, j]
                sgx[j] += p2[c, j]
        _backward_coefficients(sg, sgx, gamma, inv_std, n, train, t, dgamma, dbeta)
        for c in prange(chunks):
            _dx_rows_as(da, a, x, t, act, cst, dx, c * rows, min(n, (c + 1) * rows))

    return _backward_parallel


_backward_parallel = _PerActivation(_backward_parallel_for)


# --------------------------------------------------------------------------
# Channels of N-D input: x (N, C, S), each channel's N*S values normalized
# together (the layer's (N, C, H, W) input with S = H*W). One thread per
# channel; within a channel the float64 sums are kept per position k of S (so
# that the inner loop over k vectorizes) and added up at the end. Backward runs
# both of its passes over one channel before the next, while it is in cache.
# --------------------------------------------------------------------------


@njit(inline="always", **_OPTS)
def _channel_sums(x, j, shift):
    """The sums of (x - shift) and (x - shift)^2 over channel j's N*S values, kept per position k of S
    and added up at the end; four samples at a time, as _accumulate does."""
    n, s = x.shape[0], x.shape[2]
    row1 = np.zeros(s)
    row2 = np.zeros(s)
    i = 0
    while i + 4 <= n:
        x0, x1, x2, x3 = x[i, j], x[i + 1, j], x[i + 2, j], x[i + 3, j]
        for k in range(s):
            v0 = np.float64(x0[k]) - shift
            v1 = np.float64(x1[k]) - shift
            v2 = np.float64(x2[k]) - shift
            v3 = np.float64(x3[k]) - shift
            row1[k] += (v0 + v1) + (v2 + v3)
            row2[k] += (v0 * v0 + v1 * v1) + (v2 * v2 + v3 * v3)
        i += 4
    for r in range(i, n):
        xr = x[r, j]
        for k in range(s):
            v = np.float64(xr[k]) - shift
            row1[k] += v
            row2[k] += v * v
    return row1.sum(), row2.sum()


@njit(inline="always", **_OPTS)
def _apply_channel_as(x, t, act, c, out, j):
    zero, slope = c[0], c[2]
    hi, lo, scale, beta = t[HI, j], t[LO, j], t[SCALE, j], t[BETA, j]
    for i in range(x.shape[0]):
        xi = x[i, j]
        oi = out[i, j]
        for k in range(xi.shape[0]):
            oi[k] = _activate(_scale_shift(xi[k], hi, lo, scale, beta), act, zero, slope)


def _forward_spatial_for(act):
    """The forward pass over (N, C, S), one thread per channel, compiled for the activation code `act`."""

    @njit(parallel=True, **_OPTS)
    def _forward_spatial(
        x, gamma, beta, eps, slope, train, running_mean, running_var, decay, var_correction, out, mean, var, inv_std
    ):
        n, d, s = x.shape
        s1 = np.zeros(d)
        s2 = np.zeros(d)
        shift = np.zeros(d)
        if train:
            for j in prange(d):
                shift[j] = x[0, j, 0]
                s1[j], s2[j] = _channel_sums(x, j, shift[j])
        table = np.empty((4, d), x.dtype)
        _statistics(
            n * s,
            shift,
            gamma,
            beta,
            eps,
            train,
            running_mean,
            running_var,
            decay,
            var_correction,
            s1,
            s2,
            mean,
            var,
            inv_std,
            table,
        )
        cst = _constants(x, slope)
        for j in prange(d):
            _apply_channel_as(x, table, act, cst, out, j)

    return _forward_spatial


_forward_spatial = _PerActivation(_forward_spatial_for)


@njit(inline="always", **_OPTS)
def _channel_grad_sums_as(da, a, x, t, act, c, j):
    """The sums of g and g * x_hat over channel j, per position of S and then added up."""
    zero, one, slope = c[0], c[1], c[2]
    hi, lo, inv = t[HI, j], t[LO, j], t[INV, j]
    row1 = np.zeros(x.shape[2])
    row2 = np.zeros(x.shape[2])
    for i in range(x.shape[0]):
        dai = da[i, j]
        ai = a[i, j]
        xi = x[i, j]
        for k in range(xi.shape[0]):
            g = dai[k] * _activation_grad(ai[k], act, zero, one, slope)
            row1[k] += np.float64(g)
            row2[k] += np.float64(g * _normalize(xi[k], hi, lo, inv))
    return row1.sum(), row2.sum()


@njit(inline="always", **_OPTS)
def _dx_channel_as(da, a, x, t, act, c, dx, j):
    zero, one, slope = c[0], c[1], c[2]
    hi, lo, inv, k_, c1, c2 = t[HI, j], t[LO, j], t[INV, j], t[K, j], t[C1, j], t[C2, j]
    for i in range(x.shape[0]):
        dai = da[i, j]
        ai = a[i, j]
        xi = x[i, j]
        dxi = dx[i, j]
        for k in range(xi.shape[0]):
            g = dai[k] * _activation_grad(ai[k], act, zero, one, slope)
            dxi[k] = _input_grad(g, _normalize(xi[k], hi, lo, inv), k_, c1, c2)


@njit(inline="always", **_OPTS)
def _backward_channel_as(da, a, x, mean, inv_std, gamma, act, c, train, dx, dgamma, dbeta, t, j):
    sg, sgx = _channel_grad_sums_as(da, a, x, t, act, c, j)
    dbeta[j] = sg
    dgamma[j] = sgx
    # in eval mode the statistics are constants: c1 = c2 = 0, dx = k * g
    t[K, j], t[C1, j], t[C2, j] = _input_grad_coefficients(
        np.float64(gamma[j]), inv_std[j], sg if train else 0.0, sgx if train else 0.0, x.shape[0] * x.shape[2]
    )
    _dx_channel_as(da, a, x, t, act, c, dx, j)


def _backward_spatial_for(act):
    """The backward pass over (N, C, S), one thread per channel, compiled for the activation code `act`."""

    @njit(parallel=True, **_OPTS)
    def _backward_spatial(da, a, x, mean, inv_std, gamma, slope, train, dx, dgamma, dbeta):
        t = _backward_table(x, mean, inv_std)
        cst = _constants(x, slope)
        for j in prange(x.shape[1]):
            _backward_channel_as(da, a, x, mean, inv_std, gamma, act, cst, train, dx, dgamma, dbeta, t, j)

    return _backward_spatial


_backward_spatial = _PerActivation(_backward_spatial_for)


# --------------------------------------------------------------------------
# The same passes, split where a synchronized BatchNorm (bnnet.distributed)
# combines its shard's statistics and sums with the other processes'. Serial
# only: under MPI every process runs one thread.
# --------------------------------------------------------------------------


@njit(**_OPTS)
def _moments_serial(x, mean, m2):
    n, d = x.shape
    if n == 0:  # an empty shard contributes nothing
        mean[:] = 0.0
        m2[:] = 0.0
        return
    s1 = np.zeros(d)
    s2 = np.zeros(d)
    shift = x[0].astype(np.float64)
    _accumulate(x, shift, 0, n, s1, s2)
    for j in range(d):
        mean[j], m2[j] = _moments_from_sums(n, shift[j], s1[j], s2[j])


def _grad_sums_serial_for(act):
    """A shard's gradient sums (synchronized BatchNorm), compiled for the activation code `act`."""

    @njit(**_OPTS)
    def _grad_sums_serial(da, a, x, mean, inv_std, slope, sg, sgx):
        t = _backward_table(x, mean, inv_std)
        sg[:] = 0.0
        sgx[:] = 0.0
        _grad_sums_rows_as(da, a, x, t, act, _constants(x, slope), 0, x.shape[0], sg, sgx)

    return _grad_sums_serial


_grad_sums_serial = _PerActivation(_grad_sums_serial_for)


def _dx_serial_for(act):
    """A shard's dx from the whole batch's sums (synchronized BatchNorm), compiled for the activation code `act`."""

    @njit(**_OPTS)
    def _dx_serial(da, a, x, mean, inv_std, gamma, slope, sg, sgx, n_total, dx):
        t = _backward_table(x, mean, inv_std)
        _dx_coefficients(sg, sgx, gamma, inv_std, n_total, True, t)
        _dx_rows_as(da, a, x, t, act, _constants(x, slope), dx, 0, x.shape[0])

    return _dx_serial


_dx_serial = _PerActivation(_dx_serial_for)


@njit(cache=True, error_model="numpy")  # no FMA contraction: it would make the merge asymmetric
def merge_moments(a, b):
    """b <- merge(a, b) for packed [count, mean (D), M2 (D)] float64 buffers: the formula of
    bnnet.functional.merge_moments, as the MPI reduction of a synchronized BatchNorm."""
    d = (a.shape[0] - 1) // 2
    na, nb = a[0], b[0]
    for j in range(1, d + 1):
        _, b[j], b[j + d] = _merge_moments(na, a[j], a[j + d], nb, b[j], b[j + d])
    b[0] = na + nb


@njit(**_OPTS)
def update_running(running_mean, running_var, mean, var, decay, var_correction):
    """The running-statistics update of the fused forward, from statistics computed elsewhere."""
    for j in range(mean.shape[0]):
        _update_running_at(running_mean, running_var, j, mean[j], var[j], decay, var_correction)


def bn_moments(x, mean, m2):
    """Per-feature mean and M2 = sum((x - mean)^2) of x (N, D), N >= 0, into float64 (D,) arrays."""
    _moments_serial(_plain(x), mean, m2)


def bn_grad_sums(da, a, x, mean, inv_std, act, slope, sg, sgx):
    """sg = sum(g), sgx = sum(g * x_hat) over this shard's rows, g = da * g'(a); float64 (D,) outputs."""
    _grad_sums_serial[act](_plain(da), _plain(a), _plain(x), mean, inv_std, slope, sg, sgx)


def bn_grad_dx(da, a, x, mean, inv_std, gamma, act, slope, sg, sgx, n_total, dx):
    """dx = gamma inv_std (g - sg/n_total - x_hat sgx/n_total), with sg, sgx summed over the whole batch."""
    da, a, x, gamma = _plain(da), _plain(a), _plain(x), _plain(gamma)
    _dx_serial[act](da, a, x, mean, inv_std, gamma, slope, sg, sgx, float(n_total), dx)


# --------------------------------------------------------------------------
# Entry points used by the layers
# --------------------------------------------------------------------------


def _plain(a):
    """a as the kernels are compiled for it: C-contiguous and writable, else a copy that is.

    numba compiles a kernel again, for seconds, for every read-only or strided argument; the layers
    hand the kernels arrays of their own, and a read-only or strided input from elsewhere (a user's
    array given to bnnet.ops, a read-only parameter) costs one copy instead.
    """
    flags = a.flags
    return a if flags.c_contiguous and flags.writeable else np.array(a, order="C")


def _chunks(x):
    """Number of row blocks for the parallel kernels, or 0 for the serial ones.

    (The thread count is read here, not inside the kernels: calling
    numba.get_num_threads() in a kernel stops numba from caching it.)
    """
    if x.size < PARALLEL_MIN_ELEMENTS:
        return 0
    threads = numba_threads()  # bnnet.set_num_threads's limit
    return threads if threads > 1 else 0


def bn_forward(
    x, gamma, beta, eps, act, slope, train, running_mean, running_var, decay, var_correction, out, mean, var, inv_std
):
    """out = g((x - mean) * gamma * inv_std + beta), one statistics pass + one apply pass.

    x: (N, D) float32/float64; gamma, beta, running_*: (D,); out: (N, D) like x.
    train=True normalizes with the batch statistics (N >= 2) and updates
    running_* in place (running = decay * running + (1 - decay) * batch, the
    variance times var_correction); train=False uses the running statistics.
    The float64 (D,) arrays mean, var (biased) and inv_std = 1/sqrt(var + eps)
    receive the statistics used, for backward.
    """
    x, gamma, beta = _plain(x), _plain(gamma), _plain(beta)
    if not train:  # (read only then; in train mode bnnet.ops has checked that they are writable)
        running_mean, running_var = _plain(running_mean), _plain(running_var)
    args = (
        x,
        gamma,
        beta,
        eps,
        slope,
        train,
        running_mean,
        running_var,
        decay,
        var_correction,
        out,
        mean,
        var,
        inv_std,
    )
    if x.ndim == 3:  # (N, C, S)
        _forward_spatial[act](*args)
        return
    chunks = _chunks(x)
    if chunks:
        _forward_parallel[act](*args, chunks)
    else:
        _forward_serial[act](*args)


def bn_backward(da, a, x, mean, inv_std, gamma, act, slope, train, dx, dgamma, dbeta):
    """dx (N, D), dgamma (D,), dbeta (D,) of a = g(BN(x)), written into the given arrays.

    da: dL/da (N, D); a: the forward output; x: the BN input; mean, inv_std:
    the float64 statistics the forward used (batch ones in train mode, running
    ones in eval mode, where dx = g * gamma * inv_std).
    """
    da, a, x, gamma = _plain(da), _plain(a), _plain(x), _plain(gamma)
    if x.ndim == 3:  # (N, C, S)
        _backward_spatial[act](da, a, x, mean, inv_std, gamma, slope, train, dx, dgamma, dbeta)
        return
    chunks = _chunks(x)
    if chunks:
        _backward_parallel[act](da, a, x, mean, inv_std, gamma, slope, train, dx, dgamma, dbeta, chunks)
    else:
        _backward_serial[act](da, a, x, mean, inv_std, gamma, slope, train, dx, dgamma, dbeta)


# --------------------------------------------------------------------------
# Optimizer updates: one pass over a parameter, its gradient and its state,
# each calling the rule of bnnet.optim compiled (wd adds weight_decay * p to g)
# --------------------------------------------------------------------------

_sgd_rule = njit(inline="always", **_OPTS_EQ)(optim_rules.sgd)
_momentum_rule = njit(inline="always", **_OPTS_EQ)(optim_rules.momentum)
_rmsprop_rule = njit(inline="always", **_OPTS_EQ)(optim_rules.rmsprop)
_adam_rule = njit(inline="always", **_OPTS_EQ)(optim_rules.adam)


@njit(**_OPTS)
def sgd(p, g, lr, wd):
    for i in range(p.size):
        p[i] = _sgd_rule(p[i], g[i] + wd * p[i], lr)


@njit(**_OPTS)
def momentum(p, g, v, lr, beta, wd):
    for i in range(p.size):
        p[i], v[i] = _momentum_rule(p[i], g[i] + wd * p[i], v[i], lr, beta)


@njit(**_OPTS)
def _rmsprop(p, g, s, lr, beta, c, eps, wd):
    for i in range(p.size):
        p[i], s[i] = _rmsprop_rule(p[i], g[i] + wd * p[i], s[i], lr, beta, c, eps)


def rmsprop(p, g, s, lr, beta, eps, wd):
    _rmsprop(p, g, s, *optim_rules.rmsprop_coefficients(p.dtype, lr, beta, eps, wd))


@njit(**_OPTS)
def _adam(p, g, m, v, step, beta1, c1, beta2, c2, eps, inv_sqrt_bias2, wd):
    for i in range(p.size):
        p[i], m[i], v[i] = _adam_rule(
            p[i], g[i] + wd * p[i], m[i], v[i], step, beta1, c1, beta2, c2, eps, inv_sqrt_bias2
        )


def adam(p, g, m, v, lr, beta1, beta2, eps, bias1, bias2, wd):
    _adam(p, g, m, v, *optim_rules.adam_coefficients(p.dtype, lr, beta1, beta2, eps, bias1, bias2, wd))


# --------------------------------------------------------------------------
# Softmax cross-entropy: loss and gradient in one pass over the logits
# --------------------------------------------------------------------------


@njit(**_OPTS)
def softmax_cross_entropy(logits, labels, dlogits):
    """Mean over rows of -log softmax(z_i)[y_i]; writes (softmax(z) - onehot(y)) / N into dlogits.

    Returns -1.0 (a loss can never be negative) without writing anything if a label is outside
    [0, C): the labels index the logits, so they are checked here, before any is used.
    """
    n, c = logits.shape
    for i in range(n):
        if labels[i] < 0 or labels[i] >= c:
            return -1.0
    total = 0.0
    for i in range(n):
        zi = logits[i]
        gi = dlogits[i]
        zmax = np.float64(zi[0])
        for k in range(1, c):
            zmax = max(zmax, np.float64(zi[k]))
        s = 0.0
        for k in range(c):
            s += np.exp(np.float64(zi[k]) - zmax)
        log_s = np.log(s)
        total += log_s - (np.float64(zi[labels[i]]) - zmax)
        for k in range(c):
            gi[k] = np.exp(np.float64(zi[k]) - zmax - log_s) / n
        gi[labels[i]] -= 1.0 / n
    return total / n


# --------------------------------------------------------------------------
# Bias + activation after a Linear (no BatchNorm): a = g(z + b), in place
# --------------------------------------------------------------------------


def _bias_activation_for(act):
    """z <- g(z + b) in place, compiled for the activation code `act`."""

    @njit(**_OPTS)
    def _bias_activation(z, b, slope):
        d = z.shape[1]
        t = np.zeros((4, d), z.dtype)
        for j in range(d):
            t[SCALE, j] = 1.0
            t[BETA, j] = b[j]
        _apply_rows_as(z, t, act, _constants(z, slope), z, 0, z.shape[0])

    return _bias_activation


_bias_activation = _PerActivation(_bias_activation_for)


def bias_activation(z, b, act, slope):
    """z <- g(z + b) in place (one pass), with b (D,) in z's dtype: the apply pass with mean 0, scale 1."""
    _bias_activation[act](z, b, slope)


@njit(**_OPTS)
def copy_finite(src, dst):
    # v - v is 0 for every finite v and NaN for NaN/Inf. An integer OR is associative, so the
    # loop vectorizes like a plain copy (a float sum would be one long dependency chain).
    bad = 0
    for i in range(src.size):
        v = src[i]
        dst[i] = v
        bad |= (v - v) != 0.0
    return bad == 0


@njit(**_OPTS)
def all_finite(x):
    bad = 0  # as in copy_finite: an integer OR of (v - v) != 0 vectorizes
    for i in range(x.size):
        v = x[i]
        bad |= (v - v) != 0.0
    return bad == 0


# --------------------------------------------------------------------------
# Images (N, C, H, W): im2col and its adjoint col2im (one thread per row of the
# im2col matrix, or per channel, so that no two threads write one element), and
# max pooling (one thread per (sample, channel) plane)
# --------------------------------------------------------------------------


@njit(parallel=True, **_OPTS)
def _im2col(x, kh, kw, sh, sw, ph, pw, ho, wo, cols):
    n, c, h, w = x.shape
    zero = x.dtype.type(0)
    for r in prange(c * kh * kw):
        ch, i, j = r // (kh * kw), (r // kw) % kh, r % kw
        row = cols[r]
        for s in range(n):
            for p in range(ho):
                y = p * sh + i - ph
                base = (s * ho + p) * wo
                if y < 0 or y >= h:
                    for q in range(wo):
                        row[base + q] = zero
                    continue
                xr = x[s, ch, y]
                for q in range(wo):
                    xx = q * sw + j - pw
                    row[base + q] = xr[xx] if 0 <= xx < w else zero


def im2col(x, kernel, stride, padding, cols):
    ho = (x.shape[2] + 2 * padding[0] - kernel[0]) // stride[0] + 1
    wo = (x.shape[3] + 2 * padding[1] - kernel[1]) // stride[1] + 1
    _im2col(x, kernel[0], kernel[1], stride[0], stride[1], padding[0], padding[1], ho, wo, cols)


@njit(parallel=True, **_OPTS)
def _col2im(cols, kh, kw, sh, sw, ph, pw, ho, wo, dx):
    n, c, h, w = dx.shape
    for ch in prange(c):
        for s in range(n):
            dx[s, ch] = 0
        for i in range(kh):
            for j in range(kw):
                row = cols[(ch * kh + i) * kw + j]
                for s in range(n):
                    for p in range(ho):
                        y = p * sh + i - ph
                        if y < 0 or y >= h:
                            continue
                        dr = dx[s, ch, y]
                        base = (s * ho + p) * wo
                        for q in range(wo):
                            xx = q * sw + j - pw
                            if 0 <= xx < w:
                                dr[xx] += row[base + q]


def col2im(cols, kernel, stride, padding, dx):
    ho = (dx.shape[2] + 2 * padding[0] - kernel[0]) // stride[0] + 1
    wo = (dx.shape[3] + 2 * padding[1] - kernel[1]) // stride[1] + 1
    _col2im(cols, kernel[0], kernel[1], stride[0], stride[1], padding[0], padding[1], ho, wo, dx)


@njit(inline="always", **_OPTS)
def _window_max(x, s, ch, p, q, kh, kw, sh, sw, ph, pw):
    """(max, where) over window (p, q) of the plane x[s, ch], where = y * W + x of the max (-1 if the
    window holds only padding, which never wins): the first maximum row by row, and a NaN wins and
    stays (numpy's argmax; NaN propagates as in PyTorch). The CPU and the CUDA kernels both call this."""
    h, w = x.shape[2], x.shape[3]
    best = -math.inf
    where = -1
    for i in range(kh):
        y = p * sh + i - ph
        if y < 0 or y >= h:
            continue
        for j in range(kw):
            xx = q * sw + j - pw
            if xx < 0 or xx >= w:
                continue
            v = np.float64(x[s, ch, y, xx])
            if where < 0 or (not math.isnan(best) and (v > best or math.isnan(v))):
                best = v
                where = y * w + xx
    return best, where


@njit(parallel=True, **_OPTS)
def _max_pool2d(x, kh, kw, sh, sw, ph, pw, out, arg):
    n, c = x.shape[0], x.shape[1]
    ho, wo = out.shape[2], out.shape[3]
    for t in prange(n * c):
        s, ch = t // c, t % c
        for p in range(ho):
            for q in range(wo):
                out[s, ch, p, q], arg[s, ch, p, q] = _window_max(x, s, ch, p, q, kh, kw, sh, sw, ph, pw)


def max_pool2d(x, kernel, stride, padding, out, arg):
    _max_pool2d(x, kernel[0], kernel[1], stride[0], stride[1], padding[0], padding[1], out, arg)


@njit(parallel=True, **_OPTS)
def _max_pool2d_backward(dy, arg, dx):
    n, c, h, w = dx.shape
    for t in prange(n * c):
        s, ch = t // c, t % c
        flat = dx[s, ch].reshape(h * w)
        flat[:] = 0
        g, a = dy[s, ch], arg[s, ch]
        for p in range(g.shape[0]):
            for q in range(g.shape[1]):
                k = a[p, q]
                if 0 <= k < h * w:  # (arg comes from the forward; never trusted to be in range)
                    flat[k] += g[p, q]


def max_pool2d_backward(dy, arg, dx):
    _max_pool2d_backward(dy, arg, dx)
