"""The optimizer update rules, each written once as elementwise arithmetic.

Each function takes a parameter p, its gradient g (weight decay already added)
and the rule's state, and returns the new values. Weight decay is not part of any
rule: bnnet.optim applies it (L2 in the gradient, or decoupled before the rule). They work on NumPy arrays
(bnnet.optim applies them in place with the NumPy backend) and on scalars
(bnnet.kernels compiles them with numba and runs them in one pass per parameter).
"""

import numpy as np


def sgd(p, g, lr):
    """p - lr * g."""
    return p - lr * g


def momentum(p, g, v, lr, beta):
    """v = beta * v + (1 - beta) * g;  p - lr * v   (the lecture's exponentially weighted average)."""
    v = beta * v + (1.0 - beta) * g
    return p - lr * v, v


def rmsprop(p, g, s, lr, beta, c, eps):
    """s = beta * s + c * g^2 with c = 1 - beta;  p - lr * g / (sqrt(s) + eps)."""
    s = beta * s + c * g * g
    return p - lr * g / (np.sqrt(s) + eps), s


def adam(p, g, m, v, step, beta1, c1, beta2, c2, eps, inv_sqrt_bias2):
    """Adam's p - lr * m_hat / (sqrt(v_hat) + eps), with m_hat = m / bias1 and v_hat = v / bias2, written
    with one division per element:

        m = beta1 * m + c1 * g           v = beta2 * v + c2 * g^2          (c_i = 1 - beta_i)
        p - step * m / (sqrt(v) * inv_sqrt_bias2 + eps)

    step = lr / bias1 and inv_sqrt_bias2 = 1 / sqrt(bias2), bias_i = 1 - beta_i^k (adam_coefficients).
    (Division and square root are the slow operations of the update: one of each per element.)
    """
    m = beta1 * m + c1 * g
    v = beta2 * v + c2 * g * g
    return p - step * m / (np.sqrt(v) * inv_sqrt_bias2 + eps), m, v


# The scalars each backend hands the rules, computed once per update in the parameters' dtype: the
# arithmetic then runs in float32 for float32 parameters (as PyTorch's does), twice the vector width
# of float64, and nothing is promoted by a float64 constant.


def rmsprop_coefficients(dtype, lr, beta, eps, wd):
    """(lr, beta, c, eps, wd) for rmsprop (and the kernels' weight-decay term), as `dtype` scalars."""
    t = np.dtype(dtype).type
    return t(lr), t(beta), t(1.0 - beta), t(eps), t(wd)


def adam_coefficients(dtype, lr, beta1, beta2, eps, bias1, bias2, wd):
    """(step, beta1, c1, beta2, c2, eps, inv_sqrt_bias2, wd) for adam, as `dtype` scalars."""
    t = np.dtype(dtype).type
    return t(lr / bias1), t(beta1), t(1.0 - beta1), t(beta2), t(1.0 - beta2), t(eps), t(1.0 / np.sqrt(bias2)), t(wd)
