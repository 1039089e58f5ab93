"""bnnet.functional: moments, the tf.nn.batch_normalization formula, numerics of the losses."""

import warnings

import numpy as np
import pytest

from bnnet import functional as F


def tf_batch_normalization(x, mean, variance, offset, scale, variance_epsilon):
    """TensorFlow's documented formula, written out independently of bnnet:
    gamma * (x - mu) / sigma + beta, with sigma = sqrt(variance + epsilon), offset/scale optional."""
    sigma = np.sqrt(variance + variance_epsilon)
    out = (x - mean) / sigma
    if scale is not None:
        out = out * scale
    if offset is not None:
        out = out + offset
    return out


def test_moments_matches_definition(rng):
    x = rng.standard_normal((7, 5, 3))
    for axes in [0, (0,), (0, 1), (1, 2)]:
        mean, var = F.moments(x, axes)
        ax = axes if isinstance(axes, tuple) else (axes,)
        n = np.prod([x.shape[a] for a in ax])
        ref_mean = x.sum(axis=ax) / n
        ref_var = ((x - np.expand_dims(ref_mean, ax)) ** 2).sum(axis=ax) / n  # biased
        np.testing.assert_allclose(mean, ref_mean, rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(var, ref_var, rtol=1e-13, atol=1e-15)
    mean, var = F.moments(x, (0, 1), keepdims=True)
    assert mean.shape == var.shape == (1, 1, 3)


def test_moments_float32_two_pass_with_large_offset(rng):
    """A float32 feature with mean 1e4 and std 1: E[x^2] - E[x]^2 in float32 is garbage, ours is not."""
    x = (1e4 + rng.standard_normal((1000, 4))).astype(np.float32)
    mean, var = F.moments(x, 0)
    assert mean.dtype == var.dtype == np.float32
    ref = x.astype(np.float64)
    np.testing.assert_allclose(var, ref.var(axis=0), rtol=1e-5)
    np.testing.assert_allclose(mean, ref.mean(axis=0), rtol=1e-7)
    naive = (x * x).mean(axis=0) - x.mean(axis=0) ** 2  # what we must never do
    assert np.max(np.abs(naive - ref.var(axis=0))) > 0.1


@pytest.mark.parametrize("with_offset,with_scale", [(True, True), (False, True), (True, False), (False, False)])
def test_batch_normalization_is_tf_formula(rng, with_offset, with_scale):
    x = rng.standard_normal((6, 4)) * 3 + 2
    mean, var = rng.standard_normal(4), rng.uniform(0.1, 2, 4)
    offset = rng.standard_normal(4) if with_offset else None
    scale = rng.uniform(0.5, 2, 4) if with_scale else None
    got = F.batch_normalization(x, mean, var, offset, scale, 1e-3)
    np.testing.assert_allclose(got, tf_batch_normalization(x, mean, var, offset, scale, 1e-3), rtol=1e-13, atol=1e-13)


def test_batch_norm_forward_normalizes(rng):
    x = rng.standard_normal((50, 6)) * rng.uniform(0.1, 10, 6) + rng.standard_normal(6) * 5
    gamma, beta = rng.uniform(0.5, 2, 6), rng.standard_normal(6)
    y, mean, var, (x_hat, inv_std) = F.batch_norm_forward(x, gamma, beta, 1e-8)
    np.testing.assert_allclose(x_hat.mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(x_hat.var(axis=0), 1, rtol=1e-6)
    np.testing.assert_allclose(
        y, tf_batch_normalization(x, x.mean(0), x.var(0), beta, gamma, 1e-8), rtol=1e-12, atol=1e-12
    )
    np.testing.assert_allclose(var, x.var(axis=0), rtol=1e-12)


@pytest.mark.parametrize("offset", [0.0, 1e3, 1e4, 1e5])
def test_float32_batch_norm_matches_float64_at_large_offsets(rng, offset):
    """x - mean keeps float64 precision in float32 (mean split into rounded part + rounding error)."""
    std = rng.uniform(0.5, 2, 8)
    x = (offset + rng.standard_normal((256, 8)) * std).astype(np.float32)
    gamma, beta = np.ones(8, np.float32), np.zeros(8, np.float32)
    y32 = F.batch_norm_forward(x, gamma, beta, 1e-5)[0]
    y64 = F.batch_norm_forward(x.astype(np.float64), gamma.astype(np.float64), beta.astype(np.float64), 1e-5)[0]
    assert y32.dtype == np.float32
    assert np.max(np.abs(y32 - y64)) < 1e-5  # a few float32 ulps of |x_hat| <~ 4


def test_constant_feature_gives_beta_and_finite_grads():
    x = np.full((5, 2), 3.0)
    gamma, beta = np.array([2.0, 0.5]), np.array([0.25, -1.0])
    y, _, var, cache = F.batch_norm_forward(x, gamma, beta, 1e-5)
    np.testing.assert_allclose(y, np.broadcast_to(beta, (5, 2)))
    assert (var == 0).all()
    dx, dg, db = F.batch_norm_backward(np.arange(10.0).reshape(5, 2), gamma, cache)
    assert np.isfinite(dx).all() and np.isfinite(dg).all() and np.isfinite(db).all()


def test_activation_values():
    z = np.array([-3.0, -0.5, 0.0, 0.5, 3.0])
    np.testing.assert_array_equal(F.relu(z), [0, 0, 0, 0.5, 3])
    np.testing.assert_allclose(F.leaky_relu(z, 0.1), [-0.3, -0.05, 0, 0.5, 3])
    np.testing.assert_allclose(F.sigmoid(z), 1 / (1 + np.exp(-z)), rtol=1e-15)
    np.testing.assert_allclose(F.tanh(z), np.tanh(z))


def test_sigmoid_and_losses_do_not_overflow():
    z = np.array([[-1000.0], [1000.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any overflow warning fails the test
        np.testing.assert_array_equal(F.sigmoid(z), [[0.0], [1.0]])
        loss, d = F.sigmoid_binary_cross_entropy(z, np.array([[0.0], [1.0]]))
        assert loss == 0.0 and np.isfinite(d).all()
        loss, d = F.sigmoid_binary_cross_entropy(z, np.array([[1.0], [0.0]]))
        assert loss == pytest.approx(1000.0)
        loss, d = F.softmax_cross_entropy(np.array([[1000.0, -1000.0, 0.0]]), np.array([1]))
        assert loss == pytest.approx(2000.0) and np.isfinite(d).all()


def test_softmax_cross_entropy_value(rng):
    logits = rng.standard_normal((4, 3))
    labels = np.array([0, 2, 1, 2])
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    expected = -np.mean(np.log(p[np.arange(4), labels]))
    assert F.softmax_cross_entropy(logits, labels)[0] == pytest.approx(expected, rel=1e-13)


def test_mse_value(rng):
    a, b = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    assert F.mean_squared_error(a, b)[0] == pytest.approx(np.mean((a - b) ** 2), rel=1e-13)
