"""Property-based checks of batch norm over shapes, scales and offsets (hypothesis)."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from bnnet import functional as F
from bnnet.layers import BatchNorm


@st.composite
def batches(draw):
    n = draw(st.integers(2, 40))
    d = draw(st.integers(1, 12))
    dtype = draw(st.sampled_from(["float32", "float64"]))
    seed = draw(st.integers(0, 2**32 - 1))
    scale = draw(st.sampled_from([1e-2, 1.0, 1e2]))
    offset = draw(st.sampled_from([0.0, -5.0, 1e3]))
    x = np.random.default_rng(seed).standard_normal((n, d)) * scale + offset
    return x.astype(dtype)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(batches())
def test_batchnorm_forward_backward_properties(x):
    n, d = x.shape
    bn = BatchNorm(d, eps=1e-5, dtype=x.dtype.name)
    y = bn.forward(x, train=True)
    assert y.dtype == x.dtype and y.shape == x.shape and np.isfinite(y).all()
    x64 = x.astype(np.float64)
    var = x64.var(axis=0)
    # float64 rounding grows with the condition |x| / std (the input's own digits spent on the offset);
    # float32 is held to a fixed 1e-5 since it computes x - mean with a float64 mean.
    cond = np.max(np.abs(x64).max(axis=0) / np.sqrt(var + 1e-5))
    tol = 1e-5 if x.dtype == np.float32 else 16 * np.finfo(np.float64).eps * (1 + cond)
    # with gamma = 1, beta = 0 the output is x_hat: mean 0 and variance var / (var + eps)
    np.testing.assert_allclose(y.mean(axis=0, dtype=np.float64), 0, atol=tol)
    np.testing.assert_allclose(y.var(axis=0, dtype=np.float64), var / (var + 1e-5), rtol=10 * tol)
    assert (bn.buffers["running_var"] >= 0).all()
    G = np.random.default_rng(n * d).standard_normal((n, d)).astype(x.dtype)
    dx = bn.backward(G)
    assert np.isfinite(dx).all()
    # dx is orthogonal to constant shifts: adding c to a feature does not change BN's output
    # (rounding: each term of dx is of size inv_std * |G| times the condition, summed n times)
    scale = np.max(1 / np.sqrt(var + 1e-5)) * np.abs(G).max()
    np.testing.assert_allclose(
        dx.sum(axis=0, dtype=np.float64), 0, atol=8 * n * np.finfo(x.dtype).eps * scale * (1 + cond)
    )
    # float32 agrees with the float64 computation on the same input
    y64 = F.batch_norm_forward(x64, np.ones(d), np.zeros(d), 1e-5)[0]
    np.testing.assert_allclose(y, y64, atol=tol)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(batches(), st.sampled_from([None, "relu", "sigmoid", "tanh"]))
def test_fast_and_reference_paths_agree(x, act):
    import bnnet
    from bnnet import backend

    n, d = x.shape
    dy = np.random.default_rng(n + d).standard_normal((n, d)).astype(x.dtype)
    out = {}
    for name in ("numpy", "numba"):
        with backend.using(name):
            layers = [BatchNorm(d, dtype=x.dtype.name)] + ([bnnet.layers.ACTIVATIONS[act]()] if act else [])
            model = bnnet.Sequential(*layers)
            y = model.forward(x, train=True)
            out[name] = y, model.backward(dy, input_grad=True), model.buffers["0.running_var"].copy()
    var = x.astype(np.float64).var(axis=0)
    # float64: 1e-12 for well-conditioned batches, more when |x| >> std (both paths round x - mean)
    cond = np.max(np.abs(x.astype(np.float64)).max(axis=0) / np.sqrt(var + 1e-5))
    tol = 1e-5 if x.dtype == np.float32 else max(1e-12, 16 * np.finfo(np.float64).eps * cond)
    scale = np.abs(dy).max() * np.max(1 / np.sqrt(var + 1e-5))  # size of the terms that make dx
    np.testing.assert_allclose(out["numba"][0], out["numpy"][0], rtol=tol, atol=tol)
    np.testing.assert_allclose(out["numba"][1], out["numpy"][1], rtol=tol, atol=tol * scale)
    np.testing.assert_allclose(out["numba"][2], out["numpy"][2], rtol=tol, atol=tol)
