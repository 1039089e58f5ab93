"""float32 BatchNorm against a float64 reference on hard inputs, in both backends."""

import numpy as np
import pytest

from bnnet import backend
from bnnet.layers import BatchNorm


def _bn64(x, dy):
    """Float64 batch norm (gamma 1, beta 0) and its dx, from the definition."""
    x = x.astype(np.float64)
    mu, var = x.mean(0), x.var(0)
    inv = 1 / np.sqrt(var + 1e-5)
    xh = (x - mu) * inv
    dx = inv * (dy - dy.mean(0) - xh * (dy * xh).mean(0))
    return xh, dx


@pytest.mark.parametrize("name", ["numpy", "numba"])
@pytest.mark.parametrize("case", ["offset_1e4", "offset_1e6", "tiny_variance", "mixed"])
def test_float32_matches_float64(name, case):
    rng = np.random.default_rng(7)
    n, d = 512, 6
    base = rng.standard_normal((n, d))
    x = {
        "offset_1e4": 1e4 + base,  # mean = 1e4 std
        "offset_1e6": 1e6 + 10 * base,  # mean = 1e5 std
        "tiny_variance": 1.0 + 1e-3 * base,
        "mixed": np.concatenate([1e4 + base[:, :3], 1e-2 * base[:, 3:]], axis=1),
    }[case].astype(np.float32)
    dy = rng.standard_normal((n, d)).astype(np.float32)
    with backend.using(name):
        bn = BatchNorm(d)
        y = bn.forward(x, train=True)
        dx = bn.backward(dy)
    y64, dx64 = _bn64(x, dy.astype(np.float64))  # same float32 input, exact arithmetic
    assert np.max(np.abs(y - y64)) <= 1e-3 * np.max(np.abs(y64))
    assert np.max(np.abs(dx - dx64)) <= 1e-3 * np.max(np.abs(dx64))
    assert (bn.buffers["running_var"] >= 0).all()


@pytest.mark.parametrize("name", ["numpy", "numba"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_constant_feature(name, dtype):
    x = np.full((8, 3), 2.5, dtype=dtype)
    x[:, 2] = np.arange(8)
    with backend.using(name):
        bn = BatchNorm(3, dtype=dtype)
        bn.params["beta"][:] = [0.5, -1.0, 0.0]
        y = bn.forward(x, train=True)
        dx = bn.backward(np.random.default_rng(0).standard_normal((8, 3)).astype(dtype))
    np.testing.assert_allclose(y[:, :2], np.broadcast_to([0.5, -1.0], (8, 2)))  # constant in, beta out
    assert np.isfinite(dx).all() and np.isfinite(bn.grads["gamma"]).all()
    assert (bn.buffers["running_var"] >= 0).all() and (bn.buffers["running_var"][:2] == 0.9).all()
