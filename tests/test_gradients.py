"""Every backward against central finite differences in float64, with random upstream gradients."""

import numpy as np
import pytest
from helpers import away_from_zero, check_layer_gradients, numerical_grad, rel_error

import bnnet
from bnnet import functional as F
from bnnet.layers import BatchNorm, LeakyReLU, Linear, ReLU, Sigmoid, Tanh
from bnnet.losses import MSE, BinaryCrossEntropy, SoftmaxCrossEntropy

TOL = 1e-7


@pytest.mark.parametrize("bias", [True, False])
def test_linear(rng, bias):
    layer = Linear(5, 4, bias=bias, rng=0, dtype="float64")
    check_layer_gradients(layer, rng.standard_normal((6, 5)), True, rng, TOL)


# With N = 2 the normalized output is +-1 whatever x is, so dx is O(eps): a large eps
# makes it big enough for finite differences to resolve.
@pytest.mark.parametrize("shape,eps", [((8, 5), 1e-5), ((2, 3), 1.0), ((7, 1), 1e-5), ((3, 4), 1e-3)])
def test_batchnorm_train(rng, shape, eps):
    layer = BatchNorm(shape[1], eps=eps, dtype="float64")
    layer.params["gamma"][:] = rng.uniform(0.5, 2.0, shape[1])
    layer.params["beta"][:] = rng.standard_normal(shape[1])
    x = rng.standard_normal(shape) * rng.uniform(0.5, 3.0, shape[1]) + rng.standard_normal(shape[1])
    check_layer_gradients(layer, x, True, rng, TOL)


def test_batchnorm_eval(rng):
    layer = BatchNorm(4, dtype="float64")
    layer.buffers["running_mean"][:] = rng.standard_normal(4)
    layer.buffers["running_var"][:] = rng.uniform(0.5, 2.0, 4)
    layer.params["gamma"][:] = rng.uniform(0.5, 2.0, 4)
    check_layer_gradients(layer, rng.standard_normal((5, 4)), False, rng, TOL)


@pytest.mark.parametrize("layer", [ReLU(), LeakyReLU(0.1), Sigmoid(), Tanh()], ids=lambda l: type(l).__name__)
def test_activations(rng, layer):
    check_layer_gradients(layer, away_from_zero(rng, (6, 5)), True, rng, TOL)


def _check_loss(loss, z, t):
    loss.forward(z, t)
    analytic = loss.backward().copy()
    numeric = numerical_grad(lambda: loss.forward(z, t), z)
    assert rel_error(analytic, numeric) <= TOL


def test_softmax_cross_entropy(rng):
    _check_loss(SoftmaxCrossEntropy(), rng.standard_normal((7, 4)) * 3, rng.integers(0, 4, 7))


@pytest.mark.parametrize("shape", [(9,), (9, 1)])
def test_binary_cross_entropy(rng, shape):
    _check_loss(BinaryCrossEntropy(), rng.standard_normal(shape) * 3, rng.integers(0, 2, shape))


def test_mse(rng):
    _check_loss(MSE(), rng.standard_normal((6, 3)), rng.standard_normal((6, 3)))


@pytest.mark.parametrize("activation", ["relu", "sigmoid", "tanh", "leaky_relu"])
def test_whole_mlp_with_batchnorm_train_mode(rng, activation):
    model = bnnet.mlp([6, 5, 4, 3], activation=activation, seed=3, dtype="float64")
    for k, p in model.params.items():  # non-trivial gamma/beta
        if k.endswith(("gamma", "beta")):
            p[:] = rng.uniform(0.5, 1.5, p.shape)
    X = rng.standard_normal((10, 6))
    y = rng.integers(0, 3, 10)
    loss = SoftmaxCrossEntropy()

    def f():
        return loss.forward(model.forward(X, train=True), y)

    f()
    model.backward(loss.backward())
    analytic = {k: v.copy() for k, v in model.grads.items()}
    assert set(analytic) == set(model.params)
    for name, p in model.params.items():
        err = rel_error(analytic[name], numerical_grad(f, p))
        assert err <= TOL, (name, err)


def test_the_check_catches_a_wrong_batchnorm_backward(rng):
    """The finite-difference check can fail: BN's backward without its mean corrections is rejected."""
    x = rng.standard_normal((8, 3))
    gamma, beta = rng.uniform(0.5, 2, 3), rng.standard_normal(3)
    G = rng.standard_normal((8, 3))
    _, _, _, (x_hat, inv_std) = F.batch_norm_forward(x, gamma, beta, 1e-5)
    naive_dx = G * gamma * inv_std  # treats mu and var as constants: wrong in train mode
    numeric = numerical_grad(lambda: float(np.sum(F.batch_norm_forward(x, gamma, beta, 1e-5)[0] * G)), x)
    assert rel_error(naive_dx, numeric) > 1e-2
    dx, _, _ = F.batch_norm_backward(G, gamma, (x_hat, inv_std))
    assert rel_error(dx, numeric) <= TOL


def test_all_ones_upstream_gives_zero_dx(rng):
    """Why the checks use random G: with G = 1, BN's dx is exactly zero whatever the formula's details."""
    x = rng.standard_normal((8, 3))
    _, _, _, cache = F.batch_norm_forward(x, np.ones(3), np.zeros(3), 1e-5)
    dx, _, _ = F.batch_norm_backward(np.ones((8, 3)), np.ones(3), cache)
    assert np.max(np.abs(dx)) < 1e-12
