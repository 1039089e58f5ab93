"""The numba kernels against the NumPy reference (bnnet.functional): same numbers, many shapes."""

import os

import numpy as np
import pytest

import bnnet
from bnnet import backend, kernels, ops
from bnnet.layers import BatchNorm, LeakyReLU, ReLU, Sigmoid, Tanh

TOL = {"float64": dict(rtol=1e-12, atol=1e-12), "float32": dict(rtol=1e-5, atol=1e-5)}
SHAPES = [(2, 1), (2, 5), (3, 1), (7, 3), (60, 100), (129, 33), (256, 17)]
ACTIVATIONS = [None, ReLU, lambda: LeakyReLU(0.2), Sigmoid, Tanh]


def _run(model, x, dy, train):
    y = model.forward(x, train=train, check_input=False)  # some tests feed NaN on purpose
    dx = model.backward(dy, input_grad=True)
    grads = {k: v.copy() for k, v in model.grads.items()}
    return y.copy(), dx.copy(), grads, {k: v.copy() for k, v in model.buffers.items()}


def _bn_model(d, dtype, act, rng):
    bn = BatchNorm(d, dtype=dtype, decay=0.8)
    bn.params["gamma"][:] = rng.uniform(0.5, 2.0, d)
    bn.params["beta"][:] = rng.standard_normal(d)
    bn.buffers["running_mean"][:] = rng.standard_normal(d)
    bn.buffers["running_var"][:] = rng.uniform(0.5, 2.0, d)
    layers = [bn] if act is None else [bn, act()]
    return bnnet.Sequential(*layers)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("act", range(len(ACTIVATIONS)))
@pytest.mark.parametrize("train", [True, False])
def test_fused_batchnorm_activation_matches_reference(dtype, shape, act, train):
    n, d = shape
    rng = np.random.default_rng(n * 31 + d)
    x = (rng.standard_normal(shape) * rng.uniform(0.5, 3, d) + rng.standard_normal(d) * 2).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    results = {}
    for name in ("numpy", "numba"):
        with backend.using(name):
            model = _bn_model(d, dtype, ACTIVATIONS[act], np.random.default_rng(0))
            results[name] = _run(model, x, dy, train)
    (y0, dx0, g0, b0), (y1, dx1, g1, b1) = results["numpy"], results["numba"]
    tol = TOL[dtype]
    np.testing.assert_allclose(y1, y0, **tol)
    # dx is a difference of O(gamma * inv_std * |dy|) terms: compare on that scale
    scale = np.abs(dy).max() * 2.0 / np.sqrt(x.astype(np.float64).var(axis=0).min() + 1e-5) if train else 1.0
    np.testing.assert_allclose(dx1, dx0, rtol=tol["rtol"], atol=tol["atol"] * scale)
    for k in g0:
        np.testing.assert_allclose(g1[k], g0[k], rtol=tol["rtol"], atol=tol["atol"] * n)
    for k in b0:
        np.testing.assert_allclose(b1[k], b0[k], **tol)
    assert y1.dtype == y0.dtype == np.dtype(dtype)


def test_non_contiguous_and_readonly_input():
    rng = np.random.default_rng(5)
    big = rng.standard_normal((40, 30))
    x = big[::2, ::3]  # (20, 10), strided in both axes
    x.setflags(write=False)
    out = {}
    for name in ("numpy", "numba"):
        with backend.using(name):
            bn = BatchNorm(10, dtype="float64")
            out[name] = bn.forward(x, train=True), bn.backward(np.ones_like(x) + x, True)
    np.testing.assert_allclose(out["numba"][0], out["numpy"][0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out["numba"][1], out["numpy"][1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_parallel_kernels_match_serial(monkeypatch, dtype):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1003, 37)).astype(dtype) * 3 + 1
    da = rng.standard_normal(x.shape).astype(dtype)
    g, b = rng.uniform(0.5, 2, 37).astype(dtype), rng.standard_normal(37).astype(dtype)
    results = []
    for threshold in (1 << 40, 1):  # serial, then parallel
        monkeypatch.setattr(kernels, "PARALLEL_MIN_ELEMENTS", threshold)
        out, dx = np.empty_like(x), np.empty_like(x)
        rm, rv = np.zeros(37, dtype), np.ones(37, dtype)
        st = np.empty((3, 37))
        dg, db = np.empty(37, dtype), np.empty(37, dtype)
        kernels.bn_forward(x, g, b, 1e-5, kernels.SIGMOID, 0.0, True, rm, rv, 0.9, 1003 / 1002, out, *st)
        kernels.bn_backward(da, out, x, st[0], st[2], g, kernels.SIGMOID, 0.0, True, dx, dg, db)
        results.append((out, dx, dg, db, rm, rv))
    for a, b_ in zip(*results):
        np.testing.assert_allclose(a, b_, **TOL[dtype])


@pytest.mark.parametrize("opt", ["sgd", "momentum", "rmsprop", "adam"])
def test_fused_optimizer_updates_match_reference(opt):
    rng = np.random.default_rng(11)
    X, y = rng.standard_normal((32, 6)), rng.integers(0, 3, 32)
    finals = {}
    for name in ("numpy", "numba"):
        with backend.using(name):
            model = bnnet.mlp([6, 5, 3], activation="tanh", seed=0, dtype="float64")
            o = bnnet.optim.get_optimizer(opt, 0.01)
            o.weight_decay = 0.01
            loss = bnnet.losses.SoftmaxCrossEntropy()
            for t in range(4):
                loss.forward(model.forward(X[t * 8 : (t + 1) * 8], True), y[t * 8 : (t + 1) * 8])
                model.backward(loss.backward())
                o.step(model)
            finals[name] = (
                {k: v.copy() for k, v in model.params.items()},
                {(p, k): v.copy() for p, st in o.state.items() for k, v in st.items()},
            )
    for k in finals["numpy"][0]:
        np.testing.assert_allclose(finals["numba"][0][k], finals["numpy"][0][k], rtol=1e-12, atol=1e-14)
    assert finals["numba"][1].keys() == finals["numpy"][1].keys()
    for k, v in finals["numpy"][1].items():
        assert finals["numba"][1][k].shape == v.shape  # state keeps the parameter's shape
        np.testing.assert_allclose(finals["numba"][1][k], v, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_softmax_cross_entropy_kernel(dtype):
    rng = np.random.default_rng(2)
    z = (rng.standard_normal((17, 6)) * 5).astype(dtype)
    y = rng.integers(0, 6, 17)
    out = {}
    for name in ("numpy", "numba"):
        with backend.using(name):
            loss = bnnet.losses.SoftmaxCrossEntropy()
            out[name] = loss.forward(z, y), loss.backward().copy()
    assert out["numba"][0] == pytest.approx(out["numpy"][0], rel=TOL[dtype]["rtol"])
    np.testing.assert_allclose(out["numba"][1], out["numpy"][1], **TOL[dtype])


def test_exp_kernel_accuracy():
    """The vectorizable exp used by the sigmoid/tanh kernels is within a few ulps of numpy's."""
    z = np.linspace(-700, 700, 200001)
    out = np.empty((1, z.size))
    zeros, ones = np.zeros(z.size), np.ones(z.size)
    st = np.empty((3, z.size))
    kernels.bn_forward(z[None, :], ones, zeros, 1.0, kernels.SIGMOID, 0.0, False, zeros, zeros, 0.9, 1.0, out, *st)
    ref = 1 / (1 + np.exp(-z))  # eps = 1, running var 0: the input passes unchanged
    np.testing.assert_allclose(out[0], ref, rtol=1e-14, atol=0)


def test_backend_switch():
    assert backend.get_backend() in ("numba", "numpy")
    with backend.using("numpy"):
        assert not backend.fast()
    with pytest.raises(bnnet.HyperparameterError, match="backend must be one of"):
        backend.set_backend("opencl")
    assert backend.get_backend() in ("numba", "numpy")  # a refused name leaves the backend as it was


@pytest.mark.parametrize("act", range(len(ACTIVATIONS)))
def test_nan_propagates_like_numpy(act):
    """A NaN in one feature gives NaN in that feature's outputs and gradients, in both backends."""
    x = np.random.default_rng(0).standard_normal((6, 3))
    x[2, 1] = np.nan
    for name in ("numpy", "numba"):
        with backend.using(name):
            model = _bn_model(3, "float64", ACTIVATIONS[act], np.random.default_rng(0))
            y, dx, grads, _ = _run(model, x, np.ones_like(x) + x * 0.1, True)
            assert np.isnan(y[:, 1]).all() and np.isfinite(y[:, [0, 2]]).all(), name
            assert np.isnan(dx[:, 1]).all() and np.isnan(grads["0.gamma"][1]), name


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_finiteness_checks_agree_between_backends(dtype):
    """copy_finite (fit's last good state) and all_finite (input checks): the same answer and copy in
    both backends, for NaN/+Inf/-Inf at the first, a middle and the last position, and none."""
    for n in (1, 7, 64, 1001):
        for position in (None, 0, n // 2, n - 1):
            for bad in (np.nan, np.inf, -np.inf):
                x = np.random.default_rng(n).standard_normal(n).astype(dtype)
                if position is not None:
                    x[position] = bad
                expected = position is None
                for name in ("numpy", "numba"):
                    with backend.using(name):
                        out = np.full_like(x, 7.0)
                        assert bnnet.ops.copy_finite(x, out) is expected, (name, n, position, bad)
                        np.testing.assert_array_equal(out, x)
                        assert bnnet.ops.all_finite(x) is expected
                        assert bnnet.ops.all_finite(x.reshape(1, n)[:, ::-1]) is expected  # not contiguous


def test_per_activation_kernels_refuse_an_unknown_code():
    """Each fused kernel is compiled per activation code; a code no activation has is refused before
    anything is compiled or run (bnnet.ops refuses it first, naming the argument)."""
    z = np.ones((3, 4))
    with pytest.raises(ValueError, match="unknown activation code 7"):
        kernels.bias_activation(z, np.zeros(4), 7, 0.0)
    assert np.all(z == 1.0)
    with pytest.raises(bnnet.InputError, match="bias_activation: unknown activation code 7"):
        ops.bias_activation(z, np.zeros(4), 7, 0.0)


def test_each_kernel_compiles_once_per_dtype_and_rank():
    """Read-only or strided arrays (a user's input, a read-only parameter, the constant gamma and beta
    of affine=False BatchNorm, LayerNorm and GroupNorm) reach the kernels as C-contiguous writable
    arrays, so numba never compiles a second version of a kernel (seconds each) for them. Run in a
    fresh process: this one's dispatchers hold what the other tests compiled."""
    code = """
import numpy as np, bnnet
from numba.core.registry import CPUDispatcher
from bnnet import kernels, ops
from bnnet.layers import BatchNorm, Linear
from bnnet.normalization import GroupNorm, LayerNorm
rng = np.random.default_rng(0)
x = rng.standard_normal((40, 12))[::2, ::2]  # (20, 6), strided
x.setflags(write=False)
for layer in (BatchNorm(6, dtype="float64"), BatchNorm(6, dtype="float64", affine=False),
              LayerNorm(6, dtype="float64"), GroupNorm(2, 6, dtype="float64")):
    layer.forward(x, train=True)
    layer.backward(np.ones_like(x), True)
bn = BatchNorm(6, dtype="float64")
bn.params["gamma"] = np.ones(6)
bn.params["gamma"].setflags(write=False)  # a read-only parameter is used as it is
bn.forward(x, train=True), bn.backward(x, True), bn.forward(x, train=False)
moments = np.empty(6), np.empty(6)
ops.bn_moments(x, *moments)
dispatchers = [(name, f) for name, f in vars(kernels).items() if isinstance(f, CPUDispatcher)]
dispatchers += [(f"{name}[{act}]", f) for name, k in vars(kernels).items() if isinstance(k, kernels._PerActivation)
                for act, f in k.dispatchers().items()]
assert any("[" in name for name, _ in dispatchers)  # (the per-activation kernels are looked at too)
found = [(name, str(sig)) for name, f in dispatchers
         for sig in f.signatures if "True, aligned" in str(sig) or "'A'" in str(sig)]
assert not found, found
print("ok")
"""
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "BNNET_BACKEND": "numba"}
    )
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]
