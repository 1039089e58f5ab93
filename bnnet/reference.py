"""The NumPy backend: every operation of bnnet.ops written with the equations of bnnet.functional.

Same signatures and same results as the numba kernels of bnnet.kernels
(float64 to 1e-12, float32 to 1e-5), in plain array code: outputs are written
into the arrays passed in. This is the readable reference the kernels are
tested against; bnnet.ops checks the arguments before either runs.
"""

import numpy as np

from . import functional as F
from . import optim_rules
from . import spatial as S
from .equations import LEAKY_RELU, RELU, SIGMOID, TANH  # activation codes

# code -> (g(z, slope), g'(z) written from a = g(z), slope); IDENTITY is absent: nothing to apply.
_ACTIVATIONS = {
    RELU: (lambda z, s: F.relu(z), lambda a, s: F.relu_grad(a)),
    LEAKY_RELU: (F.leaky_relu, F.leaky_relu_grad),
    SIGMOID: (lambda z, s: F.sigmoid(z), lambda a, s: F.sigmoid_grad_from_output(a)),
    TANH: (lambda z, s: F.tanh(z), lambda a, s: F.tanh_grad_from_output(a)),
}


def activate(z, act, slope):
    """a = g(z) for an activation code."""
    return _ACTIVATIONS[act][0](z, slope) if act in _ACTIVATIONS else z


def activation_grad(a, act, slope):
    """da/dz from the output a = g(z); None for the identity (nothing to multiply by)."""
    return _ACTIVATIONS[act][1](a, slope) if act in _ACTIVATIONS else None


def _upstream(da, a, act, slope):
    """g = da * g'(a): the gradient at the batch norm's output."""
    grad = activation_grad(a, act, slope)
    return da if grad is None else da * grad


def _x_hat(x, mean, inv_std):
    inv = inv_std.astype(x.dtype)
    return F.normalize(x, *F.split_mean(mean, x.dtype), inv), inv


def update_running(running_mean, running_var, mean, var, decay, var_correction):
    running_mean[...] = F.running_average(running_mean, mean, decay)
    running_var[...] = F.running_average(running_var, var * var_correction, decay)


def _rows(a):
    """(N, C, S) -> (N*S, C): each channel's values as one column (a copy); (N, D) as is."""
    return a if a.ndim == 2 else np.moveaxis(a, 1, -1).reshape(-1, a.shape[1])


def _write(dst, rows):
    """dst[...] = rows, for a dst that _rows turned into those rows."""
    if dst.ndim == 2:
        dst[...] = rows
    else:
        dst[...] = np.moveaxis(rows.reshape(dst.shape[0], dst.shape[2], dst.shape[1]), -1, 1)


def bn_forward(
    x, gamma, beta, eps, act, slope, train, running_mean, running_var, decay, var_correction, out, mean, var, inv_std
):
    x = _rows(x)
    if train:
        mean[...], var[...] = F._moments_wide(x, 0, False)
        update_running(running_mean, running_var, mean, var, decay, var_correction)
    else:
        mean[...], var[...] = running_mean, running_var
    inv_std[...] = F.inverse_std(var, eps)
    y, _ = F.batch_norm_apply(x, gamma, beta, mean, var, eps)
    _write(out, activate(y, act, slope))


def bn_backward(da, a, x, mean, inv_std, gamma, act, slope, train, dx, dgamma, dbeta):
    da, a, x = _rows(da), _rows(a), _rows(x)
    g = _upstream(da, a, act, slope)
    cache = _x_hat(x, mean, inv_std)
    dbeta[...], dgamma[...] = F.batch_norm_grad_sums(g, cache)
    if train:
        _write(dx, F.batch_norm_input_grad(g, gamma, cache, dbeta, dgamma, x.shape[0]))
    else:  # the statistics are constants: BN is a per-feature affine map
        _write(dx, F.batch_norm_input_grad(g, gamma, cache, 0.0, 0.0, x.shape[0]))


def bn_moments(x, mean, m2):
    if x.shape[0] == 0:  # an empty shard contributes nothing
        mean[...], m2[...] = 0.0, 0.0
        return
    mean[...], var = F._moments_wide(x, 0, False)
    m2[...] = var * x.shape[0]


def bn_grad_sums(da, a, x, mean, inv_std, act, slope, sg, sgx):
    sg[...], sgx[...] = F.batch_norm_grad_sums(_upstream(da, a, act, slope), _x_hat(x, mean, inv_std))


def bn_grad_dx(da, a, x, mean, inv_std, gamma, act, slope, sg, sgx, n_total, dx):
    dx[...] = F.batch_norm_input_grad(_upstream(da, a, act, slope), gamma, _x_hat(x, mean, inv_std), sg, sgx, n_total)


def merge_moments(a, b):
    d = (a.size - 1) // 2
    n, mean, m2 = F.merge_moments(a[0], a[1 : d + 1], a[d + 1 :], b[0], b[1 : d + 1], b[d + 1 :])
    b[0], b[1 : d + 1], b[d + 1 :] = n, mean, m2


def bias_activation(z, b, act, slope):
    z += b
    z[...] = activate(z, act, slope)


def softmax_cross_entropy(logits, labels, dlogits):
    if len(labels) and (labels.min() < 0 or labels.max() >= logits.shape[1]):
        return -1.0  # as the kernel: a label outside [0, C)
    loss, dlogits[...] = F.softmax_cross_entropy(logits, labels)
    return loss


def sgd(p, g, lr, wd):
    p[...] = optim_rules.sgd(p, g + wd * p if wd else g, lr)


def momentum(p, g, v, lr, beta, wd):
    p[...], v[...] = optim_rules.momentum(p, g + wd * p if wd else g, v, lr, beta)


def rmsprop(p, g, s, lr, beta, eps, wd):
    lr, beta, c, eps, wd = optim_rules.rmsprop_coefficients(p.dtype, lr, beta, eps, wd)
    p[...], s[...] = optim_rules.rmsprop(p, g + wd * p if wd else g, s, lr, beta, c, eps)


def adam(p, g, m, v, lr, beta1, beta2, eps, bias1, bias2, wd):
    *coef, wd = optim_rules.adam_coefficients(p.dtype, lr, beta1, beta2, eps, bias1, bias2, wd)
    p[...], m[...], v[...] = optim_rules.adam(p, g + wd * p if wd else g, m, v, *coef)


def copy_finite(src, dst):
    np.copyto(dst, src)
    return bool(np.isfinite(dst).all())


def all_finite(x):
    return bool(np.isfinite(x).all())


def im2col(x, kernel, stride, padding, cols):
    cols[...] = S.im2col(x, kernel, stride, padding)


def col2im(cols, kernel, stride, padding, dx):
    n, c = dx.shape[:2]
    ho, wo = (S.out_size(size, k, st, p) for size, k, st, p in zip(dx.shape[2:], kernel, stride, padding))
    dwin = cols.reshape(c, *kernel, n, ho, wo).transpose(3, 0, 4, 5, 1, 2)  # (N, C, Ho, Wo, kh, kw)
    dx[...] = S.add_windows(dwin, dx.shape, stride, padding)


def max_pool2d(x, kernel, stride, padding, out, arg):
    out[...], window_arg = S.max_pool2d(x, kernel, stride, padding)
    i, j = np.divmod(window_arg, kernel[1])  # the max's offset inside its window
    p = np.arange(out.shape[2])[:, None] * stride[0] - padding[0]  # each window's top-left corner in x
    q = np.arange(out.shape[3])[None, :] * stride[1] - padding[1]
    arg[...] = (p + i) * x.shape[3] + (q + j)


def max_pool2d_backward(dy, arg, dx):
    n, c, h, w = dx.shape
    flat = np.zeros((n, c, h * w), dx.dtype)
    inside = (arg >= 0) & (arg < h * w)
    nn, cc = np.indices(arg.shape[:2])
    np.add.at(
        flat,
        (
            np.broadcast_to(nn[..., None, None], arg.shape)[inside],
            np.broadcast_to(cc[..., None, None], arg.shape)[inside],
            arg[inside],
        ),
        dy[inside],
    )
    dx[...] = flat.reshape(dx.shape)
