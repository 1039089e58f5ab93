"""The optimizer update rules, each written once as elementwise arithmetic.

Each function takes a parameter p, its gradient g (weight decay already added)
and the rule's state, and returns the new values. They work on NumPy arrays
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


def rmsprop(p, g, s, lr, beta, eps):
    """s = beta * s + (1 - beta) * g^2;  p - lr * g / (sqrt(s) + eps)."""
    s = beta * s + (1.0 - beta) * g * g
    return p - lr * g / (np.sqrt(s) + eps), s


def adam(p, g, m, v, lr, beta1, beta2, eps, bias1, bias2):
    """m, v as Momentum and RMSprop; p - lr * (m / bias1) / (sqrt(v / bias2) + eps), bias_i = 1 - beta_i^k."""
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * g * g
    return p - lr * (m / bias1) / (np.sqrt(v / bias2) + eps), m, v
