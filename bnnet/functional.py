"""The equations of a batch-normalized network, as pure NumPy functions.

Nothing here holds state: every function takes arrays and returns arrays.
The layers in `bnnet.layers` own parameters and running statistics and call
these functions, so this file is the one to read to see the math run.

Shapes: N = batch size (rows), D = features (columns), C = classes.
"""

import numbers

import numpy as np

from .errors import HyperparameterError, InputError

# --------------------------------------------------------------------------
# Moments and the tf.nn.batch_normalization formula
# --------------------------------------------------------------------------


def moments(x, axes, keepdims=False):
    """Mean and biased variance of `x` over `axes` (the contract of `tf.nn.moments`).

        mean = (1/m) sum_i x_i
        var  = (1/m) sum_i (x_i - mean)^2          (biased: divides by m)

    Computed from sums of x - K, K one sample of each reduced slice
    (`moments_from_sums`), never E[x^2] - E[x]^2, which cancels catastrophically
    when |mean| >> std. float16/float32 input is accumulated in float64; the
    results are returned in the input's dtype.

    Args:
        x: array, e.g. (N, D).
        axes: int or sequence of ints to reduce over, e.g. 0 or [0] for per-feature moments.
        keepdims: keep the reduced axes with length 1 (default False).
    Returns:
        (mean, variance), each of x's shape without `axes` (e.g. (D,)).
    """
    x = np.asarray(x)
    axes = _check_axes(x, axes)
    mean, var = _moments_wide(x, axes, keepdims)
    out = x.dtype if x.dtype.kind == "f" else np.float64
    return mean.astype(out, copy=False), var.astype(out, copy=False)


def _check_axes(x, axes):
    """axes as a tuple of ints in [-ndim, ndim); HyperparameterError for anything else."""
    items = [axes] if isinstance(axes, numbers.Integral) else axes
    try:
        items = list(items) if not isinstance(items, (str, bytes)) else None
    except TypeError:
        items = None
    if (
        items is None
        or not items
        or not all(isinstance(a, numbers.Integral) and not isinstance(a, bool) for a in items)
    ):
        raise HyperparameterError(f"moments: axes must be an int or a non-empty sequence of ints, got {axes!r}")
    if not all(-x.ndim <= a < x.ndim for a in items):
        raise HyperparameterError(f"moments: axes {axes!r} out of range for an input of shape {x.shape}")
    return tuple(int(a) for a in items)


def _moments_wide(x, axes, keepdims):
    """moments() in the accumulation dtype (float64 unless x is float64 or wider)."""
    axes = tuple(sorted({int(a) % x.ndim for a in np.atleast_1d(axes)})) if x.ndim else ()
    acc = x.dtype if x.dtype.kind == "f" and x.dtype.itemsize >= 8 else np.dtype(np.float64)
    n = int(np.prod([x.shape[a] for a in axes], dtype=np.int64))
    first = tuple(slice(0, 1) if a in axes else slice(None) for a in range(x.ndim))
    shift = x[first].astype(acc)  # K: one sample per reduced slice, so x - K stays small
    d = x - shift  # in float64 for float32 input
    s1 = d.sum(axis=axes, dtype=acc, keepdims=True)
    s2 = (d * d).sum(axis=axes, dtype=acc, keepdims=True)
    mean, m2 = moments_from_sums(n, shift, s1, s2)
    var = m2 / n
    if not keepdims:
        mean, var = np.squeeze(mean, axis=axes), np.squeeze(var, axis=axes)
    return mean, var


# --------------------------------------------------------------------------
# The scalar equations of batch norm. Each is written once, here, in
# arithmetic that works elementwise on NumPy arrays and on scalars: the
# functions below use them on arrays, and bnnet.kernels compiles these same
# functions with numba (njit) and calls them per feature or per element.
# --------------------------------------------------------------------------


def moments_from_sums(n, shift, s1, s2):
    """Mean and M2 = sum((x - mean)^2) of n values from s1 = sum(x - K), s2 = sum((x - K)^2).

    K (`shift`) is one of the values, so the sums stay small and s2 - s1^2 / n
    does not cancel the way E[x^2] - E[x]^2 does. Rounding can leave M2 slightly
    negative: it is clipped to 0 (NaN stays NaN).
    """
    m1 = s1 / n
    m2 = s2 - s1 * m1
    return shift + m1, np.maximum(m2, 0.0)


def inverse_std(var, eps):
    """1 / sqrt(var + eps)."""
    return 1.0 / np.sqrt(var + eps)


def normalize(x, mean_hi, mean_lo, inv_std):
    """x_hat = ((x - mean_hi) - mean_lo) * inv_std, the mean split in two (see batch_norm_apply)."""
    return ((x - mean_hi) - mean_lo) * inv_std


def scale_shift(x, mean_hi, mean_lo, scale, beta):
    """z~ = gamma * x_hat + beta with scale = gamma * inv_std folded in: ((x - mean_hi) - mean_lo) * scale + beta,
    the forward pass's one multiply-add per element (normalize's x_hat times gamma, plus beta)."""
    return ((x - mean_hi) - mean_lo) * scale + beta


def running_average(running, batch, decay):
    """The running-statistics update: decay * running + (1 - decay) * batch.

    `decay` is the weight of the old value (Keras' momentum; 1 - PyTorch's momentum).
    """
    return decay * running + (1.0 - decay) * batch


def variance_correction(m, unbiased):
    """m / (m - 1) when the running variance is "unbiased" (Alg. 2, PyTorch), else 1 (Keras)."""
    return m / (m - 1.0) if unbiased and m > 1 else 1.0


def input_grad_coefficients(gamma, inv_std, sum_dy, sum_dy_xhat, n):
    """(k, c1, c2) of dx = k * ((dy - c1) - x_hat * c2): k = gamma * inv_std, c1 = sum(dy)/n, c2 = sum(dy x_hat)/n."""
    return gamma * inv_std, sum_dy / n, sum_dy_xhat / n


def input_grad(dy, x_hat, k, c1, c2):
    """The closed-form dL/dx of batch norm in training mode: k * ((dy - c1) - x_hat * c2)."""
    return k * ((dy - c1) - x_hat * c2)


def batch_normalization(x, mean, variance, offset, scale, variance_epsilon):
    """Normalize with given statistics (the formula of `tf.nn.batch_normalization`).

        y = scale * (x - mean) / sqrt(variance + variance_epsilon) + offset

    Args:
        x: (N, D) input.
        mean, variance: (D,) statistics (batch or running), broadcastable to x.
        offset: (D,) beta, or None for 0.
        scale: (D,) gamma, or None for 1.
        variance_epsilon: small float > 0 added to the variance.
    Returns:
        (N, D) array. Computed as (x - mean) * inv + offset, not x * inv + (offset
        - mean * inv) as TensorFlow arranges it: subtracting first keeps float32
        accurate when |mean| >> std.
    """
    shapes = [np.shape(a) for a in (x, mean, variance, offset, scale) if a is not None]
    try:
        np.broadcast_shapes(*shapes)
    except ValueError:
        raise InputError(
            f"batch_normalization: x, mean, variance, offset and scale must broadcast together, "
            f"got shapes {', '.join(map(str, shapes))}"
        ) from None
    inv = 1.0 / np.sqrt(variance + variance_epsilon)
    if scale is not None:
        inv = inv * scale
    y = (x - mean) * inv
    if offset is not None:
        y = y + offset
    return y.astype(np.result_type(x, np.float32), copy=False)


# --------------------------------------------------------------------------
# Batch norm in training mode: forward with a cache, closed-form backward
# --------------------------------------------------------------------------


def batch_norm_forward(x, gamma, beta, eps):
    """Batch norm with the mini-batch's own statistics (Ioffe & Szegedy 2015, Alg. 1).

        mu      = mean(x, axis=0)                          (D,)
        var     = mean((x - mu)^2, axis=0)   (biased)      (D,)
        inv_std = 1 / sqrt(var + eps)                      (D,)
        x_hat   = (x - mu) * inv_std                       (N, D)
        y       = gamma * x_hat + beta                     (N, D)   the lecture's z~

    Args:
        x: (N, D), N >= 2. gamma, beta: (D,). eps: float > 0.
    Returns:
        y (N, D); mean (D,) and biased var (D,) for the running statistics;
        cache (x_hat, inv_std): exactly what `batch_norm_backward` needs.
    """
    mean, var = _moments_wide(x, 0, False)  # (D,), (D,) in float64 for float32 x
    y, cache = batch_norm_apply(x, gamma, beta, mean, var, eps)
    return y, mean.astype(x.dtype), var.astype(x.dtype), cache


def batch_norm_apply(x, gamma, beta, mean, var, eps):
    """y = gamma * (x - mean) / sqrt(var + eps) + beta with given batch statistics.

    The second half of batch_norm_forward, on its own for when the statistics
    come from elsewhere (a synchronized BatchNorm merges them across processes).
    mean, var: (D,), float64 for float32 x. Returns y (N, D) and the cache
    (x_hat, inv_std) for the backward functions.
    """
    inv_std = inverse_std(var, eps).astype(x.dtype)  # (D,)
    x_hat = normalize(x, *split_mean(mean, x.dtype), inv_std)  # (N, D)
    y = gamma * x_hat + beta  # (N, D)
    return y, (x_hat, inv_std)


def split_mean(mean, dtype):
    """The float64 mean as hi + lo in `dtype`: hi rounded, lo its rounding error.

    x - mu is computed in x's dtype as (x - hi) - lo: x - hi is exact when x is
    near hi, so a float32 batch with a large offset (|mu| >> std) keeps the
    precision of the float64 mean.
    """
    hi = mean.astype(dtype)
    return hi, (mean - hi).astype(dtype)


def merge_moments(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Moments of the union of two disjoint sets from each set's (count, mean, M2), M2 = sum((x - mean)^2).

    Chan, Golub & LeVeque's parallel formula:

        n     = n_a + n_b
        delta = mean_b - mean_a
        mean  = (n_a mean_a + n_b mean_b) / n
        M2    = M2_a + M2_b + delta^2 n_a n_b / n

    No E[x^2] - E[x]^2 appears, so it is as accurate as the two-pass variance.
    Written symmetrically: merging (a, b) and (b, a) gives bitwise the same
    result, which keeps an MPI allreduce identical on every process (as long
    as the compiler does not contract it into FMAs). Empty sets (n = 0) are
    allowed. Works on arrays and on scalars (bnnet.kernels compiles it).
    Returns (n, mean, M2).
    """
    n = n_a + n_b
    if n == 0:
        return n, mean_a * 0.0, m2_a * 0.0
    delta = mean_b - mean_a
    mean = (n_a * mean_a + n_b * mean_b) / n
    m2 = (m2_a + m2_b) + delta * delta * (n_a * n_b / n)
    return n, mean, m2


def batch_norm_backward(dy, gamma, cache):
    """Gradients of batch norm in training mode, in closed form.

    Because mu and var depend on every row, dx has two correction terms:

        dbeta  = sum(dy, axis=0)                                         (D,)
        dgamma = sum(dy * x_hat, axis=0)                                 (D,)
        dx     = gamma * inv_std * (dy - mean(dy) - x_hat * mean(dy * x_hat))   (N, D)

    Args:
        dy: (N, D) upstream gradient dL/dy. gamma: (D,). cache: from batch_norm_forward.
    Returns:
        dx (N, D), dgamma (D,), dbeta (D,).
    """
    dbeta, dgamma = batch_norm_grad_sums(dy, cache)
    dx = batch_norm_input_grad(dy, gamma, cache, dbeta, dgamma, dy.shape[0])
    return dx, dgamma, dbeta


def batch_norm_grad_sums(dy, cache):
    """sum(dy, axis=0) and sum(dy * x_hat, axis=0): dbeta and dgamma, each (D,)."""
    x_hat, _ = cache
    return dy.sum(axis=0), (dy * x_hat).sum(axis=0)


def batch_norm_input_grad(dy, gamma, cache, sum_dy, sum_dy_xhat, n):
    """dx = gamma * inv_std * (dy - sum_dy / n - x_hat * sum_dy_xhat / n)   (N, D).

    n and the two sums are those of the whole batch the statistics came from
    (in a synchronized BatchNorm, summed over every process's shard).
    """
    x_hat, inv_std = cache
    return input_grad(dy, x_hat, *input_grad_coefficients(gamma, inv_std, sum_dy, sum_dy_xhat, n))


# --------------------------------------------------------------------------
# Linear layer and activations
# --------------------------------------------------------------------------


def linear(x, W, b=None, out=None):
    """z = x @ W + b.   x: (N, in), W: (in, out), b: (out,) or None -> z: (N, out).

    out: optional (N, out) array to write z into (saves an allocation per step).
    """
    z = np.matmul(x, W, out=out)
    if b is not None:
        z += b
    return z


def linear_backward(dz, x, W, has_bias=True, input_grad=True, dx_out=None, dW_out=None, db_out=None, weight_grad=True):
    """Given dz = dL/dz (N, out): dx = dz @ W.T (N, in), dW = x.T @ dz (in, out), db = sum(dz) (out,).

    input_grad=False skips dx (returned as None), e.g. for a network's first layer; weight_grad=False
    skips dW (None; a frozen W). The *_out arrays, when given, receive the results in place.
    """
    dx = np.matmul(dz, W.T, out=dx_out) if input_grad else None
    dW = np.matmul(x.T, dz, out=dW_out) if weight_grad else None
    db = dz.sum(axis=0, out=db_out) if has_bias else None
    return dx, dW, db


def relu(z):
    """a = max(z, 0)."""
    return np.maximum(z, 0)


def relu_grad(z):
    """da/dz = 1 where z > 0 else 0 (the subgradient 0 is taken at z = 0, as PyTorch does)."""
    return (z > 0).astype(z.dtype)


def leaky_relu(z, negative_slope=0.01):
    """a = z if z > 0 else negative_slope * z."""
    return np.where(z > 0, z, z * negative_slope)


def leaky_relu_grad(z, negative_slope=0.01):
    """da/dz = 1 where z > 0 else negative_slope."""
    return np.where(z > 0, 1.0, negative_slope).astype(z.dtype)


def sigmoid(z):
    """a = 1 / (1 + exp(-z)), evaluated without overflow for large |z|.

    For z >= 0 use 1 / (1 + exp(-z)); for z < 0 use exp(z) / (1 + exp(z)).
    """
    e = np.exp(-np.abs(z))  # in (0, 1]: never overflows
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(z.dtype, copy=False)


def sigmoid_grad_from_output(a):
    """da/dz = a * (1 - a), written in terms of the output a = sigmoid(z)."""
    return a * (1 - a)


def tanh(z):
    """a = tanh(z)."""
    return np.tanh(z)


def tanh_grad_from_output(a):
    """da/dz = 1 - a^2, written in terms of the output a = tanh(z)."""
    return 1 - a * a


# --------------------------------------------------------------------------
# Losses (mean over the batch) and their gradients with respect to the outputs
# --------------------------------------------------------------------------


def log_softmax(logits):
    """log softmax over the last axis via log-sum-exp: z - max(z) - log(sum(exp(z - max(z))))."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def softmax(logits):
    """softmax over the last axis, shifted by the row max so exp never overflows."""
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def softmax_cross_entropy(logits, labels, weights=None):
    """L = -(1/N) sum_i log softmax(logits_i)[labels_i], or -sum_i w_i log softmax(logits_i)[labels_i].

    Args:
        logits: (N, C). labels: (N,) integers in [0, C).
        weights: None (the mean), or (N,) float64 row weights that sum to 1 (a weighted mean).
    Returns:
        (loss, dlogits) with dlogits = (softmax(logits) - onehot(labels)) * w_i, w_i = 1/N without weights.
    """
    n = logits.shape[0]
    logp = log_softmax(logits)  # (N, C)
    rows = np.arange(n)
    dlogits = np.exp(logp)
    dlogits[rows, labels] -= 1
    if weights is None:
        loss = -logp[rows, labels].mean(dtype=np.float64)
        dlogits /= n
    else:
        loss = -np.dot(weights, logp[rows, labels].astype(np.float64))
        dlogits *= weights[:, None].astype(logits.dtype)
    return float(loss), dlogits


def sigmoid_binary_cross_entropy(logits, targets, weights=None):
    """L = (1/N) sum_i sum_k [max(z_ik, 0) - z_ik * y_ik + log(1 + exp(-|z_ik|))]   (z = logits), or the
    sum with each row's terms times w_i.

    This equals -[y log s(z) + (1 - y) log(1 - s(z))] but never takes log(0).

    Args:
        logits: (N,), (N, 1) or (N, K) (K labels, summed). targets: same shape, values in [0, 1].
        weights: None (the mean), or (N,) float64 row weights that sum to 1 (a weighted mean).
    Returns:
        (loss, dlogits) with dlogits = (sigmoid(z) - y) * w_i (w_i = 1/N without weights), shaped like logits.
    """
    n = logits.shape[0]
    z, y = logits, targets
    per_sample = np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))
    if weights is None:
        loss = per_sample.sum(dtype=np.float64) / n
        dlogits = (sigmoid(z) - y) / n
    else:
        w = weights.reshape((n,) + (1,) * (z.ndim - 1))
        loss = (per_sample * w).sum(dtype=np.float64)
        dlogits = (sigmoid(z) - y) * w
    return float(loss), dlogits.astype(logits.dtype, copy=False)


def mean_squared_error(outputs, targets, weights=None):
    """L = (1/(N*K)) sum_ij (outputs_ij - targets_ij)^2   (mean over every element, as torch's MSELoss),
    or (1/K) sum_ij w_i (outputs_ij - targets_ij)^2.

    Args:
        outputs, targets: (N, K) (or (N,)), same shape.
        weights: None (the mean), or (N,) float64 row weights that sum to 1 (a weighted mean over rows).
    Returns:
        (loss, doutputs) with doutputs = 2 (outputs - targets) / (N*K), or 2 w_i (outputs - targets) / K.
    """
    diff = outputs - targets
    if weights is None:
        loss = np.mean(diff * diff, dtype=np.float64)
        return float(loss), (2.0 / diff.size) * diff
    k = diff.size // len(diff)
    w = weights.reshape((len(diff),) + (1,) * (diff.ndim - 1))
    loss = (diff * diff * w).sum(dtype=np.float64) / k
    return float(loss), ((2.0 / k) * w * diff).astype(diff.dtype, copy=False)
