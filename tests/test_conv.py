"""Convolutional layers, N-D Batch Norm and the convnet builder.

Every backward against central finite differences in float64 (random upstream
gradient), and against PyTorch 2.13.0 where it has the same operation.
"""

import warnings

import numpy as np
import pytest
import torch
from helpers import (
    TORCH_OPTIMIZERS,
    check_layer_gradients,
    numerical_grad,
    rel_error,
    torch_named,
    train_both,
)

import bnnet
from bnnet import backend, interop
from bnnet.conv import AvgPool2d, Conv2d, Flatten, GlobalAvgPool2d, MaxPool2d
from bnnet.layers import BatchNorm, ReLU
from bnnet.normalization import BatchRenorm

torch.set_num_threads(1)
TORCH = {"float64": torch.float64, "float32": torch.float32}
TOL = {"float64": dict(rtol=1e-10, atol=1e-12), "float32": dict(rtol=1e-4, atol=1e-5)}


# --------------------------------------------------------------------------
# Finite differences (float64, random upstream gradient)
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kernel,stride,padding,hw",
    [
        (3, 1, 0, (5, 6)),
        (3, 2, 1, (7, 5)),
        (2, 2, 0, (5, 5)),
        (1, 1, 0, (3, 4)),
        ((3, 1), (1, 2), (1, 0), (5, 7)),
    ],
)
@pytest.mark.parametrize("bias,train", [(True, True), (False, True), (True, False)])
def test_conv2d_gradients_by_finite_differences(kernel, stride, padding, hw, bias, train):
    # (eval mode keeps only x for backward and rebuilds the im2col matrix from it)
    rng = np.random.default_rng(1)
    layer = Conv2d(3, 4, kernel, stride=stride, padding=padding, bias=bias, rng=2, dtype="float64")
    if bias:
        layer.params["b"][...] = rng.standard_normal(4)
    check_layer_gradients(layer, rng.standard_normal((2, 3, *hw)), train, rng)


@pytest.mark.parametrize("cls", [MaxPool2d, AvgPool2d])
@pytest.mark.parametrize("kernel,stride,padding", [(2, None, 0), (3, 2, 1), (3, 1, 0), ((2, 3), (1, 2), (1, 1))])
def test_pool_gradients_by_finite_differences(cls, kernel, stride, padding):
    rng = np.random.default_rng(3)
    # distinct values, so that no max is tied within h (a tie is a kink of max)
    x = rng.permutation(2 * 3 * 7 * 6).reshape(2, 3, 7, 6) * 0.01
    check_layer_gradients(cls(kernel, stride=stride, padding=padding), x, True, rng)


@pytest.mark.parametrize("layer", [GlobalAvgPool2d, Flatten])
def test_global_pool_and_flatten_gradients(layer):
    rng = np.random.default_rng(4)
    check_layer_gradients(layer(), rng.standard_normal((3, 2, 4, 5)), True, rng)


@pytest.mark.parametrize("shape", [(4, 3, 5), (3, 3, 4, 5), (2, 3, 2, 3, 2)])
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("train", [True, False])
def test_batchnorm_nd_gradients_by_finite_differences(shape, axis, train):
    rng = np.random.default_rng(5)
    if axis == -1:
        shape = (shape[0], *shape[2:], shape[1])
    bn = BatchNorm(3, dtype="float64", axis=axis)
    bn.params["gamma"][...] = rng.uniform(0.5, 2, 3)
    bn.params["beta"][...] = rng.standard_normal(3)
    bn.buffers["running_mean"][...] = rng.standard_normal(3)
    bn.buffers["running_var"][...] = rng.uniform(0.5, 2, 3)
    bn.buffers["count"][...] = 1
    bn.decay = 1.0  # keep the running statistics still while the differences are taken
    check_layer_gradients(bn, rng.standard_normal(shape) * 2 + 1, train, rng)


def test_a_whole_convnet_in_train_mode_by_finite_differences():
    rng = np.random.default_rng(6)
    model = bnnet.convnet(
        in_shape=(2, 6, 6), channels=(3, 4), hidden=(5,), classes=3, seed=0, dtype="float64", activation="tanh"
    )  # smooth, so that h never straddles a kink
    for layer in model.layers:
        if isinstance(layer, BatchNorm):
            layer.params["gamma"][...] = rng.uniform(0.5, 2, layer.num_features)
            layer.params["beta"][...] = rng.standard_normal(layer.num_features)
    x = rng.standard_normal((4, 2, 6, 6))
    y = model.forward(x, True)
    G = rng.standard_normal(y.shape)
    dx = model.backward(G, input_grad=True)
    grads = {k: v.copy() for k, v in model.grads.items()}

    def loss():
        return float(np.sum(model.forward(x, True) * G))

    # (max pooling of distinct tanh values: a tie is as unlikely as in the pool test above)
    errors = {"x": rel_error(dx, numerical_grad(loss, x))}
    for name, p in model.params.items():
        errors[name] = rel_error(grads[name], numerical_grad(loss, p))
    assert max(errors.values()) < 1e-6, errors


# --------------------------------------------------------------------------
# PyTorch parity
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize(
    "shape,module",
    [((6, 4, 7), torch.nn.BatchNorm1d), ((4, 4, 5, 6), torch.nn.BatchNorm2d), ((3, 4, 2, 3, 4), torch.nn.BatchNorm3d)],
)
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("options", [{}, {"affine": False}, {"track_running_stats": False}])
def test_batchnorm_nd_matches_torch(dtype, shape, module, axis, options):
    rng = np.random.default_rng(len(shape))
    ours = BatchNorm(4, dtype=dtype, axis=axis, **options)
    theirs = module(4, dtype=TORCH[dtype], **options)
    if ours.affine:
        gamma, beta = rng.uniform(0.5, 2, 4).astype(dtype), rng.standard_normal(4).astype(dtype)
        ours.params["gamma"][...], ours.params["beta"][...] = gamma, beta
        with torch.no_grad():
            theirs.weight.copy_(torch.from_numpy(gamma))
            theirs.bias.copy_(torch.from_numpy(beta))
    last = (lambda a: np.moveaxis(a, 1, -1)) if axis == -1 else (lambda a: a)  # torch's layout -> ours
    first = (lambda a: np.ascontiguousarray(np.moveaxis(a, -1, 1))) if axis == -1 else (lambda a: a)
    tol = TOL[dtype]
    for step in range(3):
        x = (rng.standard_normal(shape) * rng.uniform(0.5, 3) + 2).astype(dtype)  # torch's layout
        G = rng.standard_normal(shape).astype(dtype)
        y = ours.forward(np.ascontiguousarray(last(x)), True)
        dx = ours.backward(np.ascontiguousarray(last(G)))
        xt = torch.from_numpy(x).requires_grad_(True)
        if ours.affine:
            theirs.weight.grad = theirs.bias.grad = None
        yt = theirs(xt)
        yt.backward(torch.from_numpy(G))
        np.testing.assert_allclose(first(y), yt.detach().numpy(), **tol)
        np.testing.assert_allclose(first(dx), xt.grad.numpy(), rtol=tol["rtol"], atol=tol["atol"] * np.abs(dx).max())
        n = x.size // 4
        if ours.affine:
            np.testing.assert_allclose(
                ours.grads["gamma"], theirs.weight.grad.numpy(), rtol=tol["rtol"], atol=tol["atol"] * n
            )
            np.testing.assert_allclose(
                ours.grads["beta"], theirs.bias.grad.numpy(), rtol=tol["rtol"], atol=tol["atol"] * n
            )
        if ours.track_running_stats:
            np.testing.assert_allclose(ours.buffers["running_mean"], theirs.running_mean.numpy(), **tol)
            np.testing.assert_allclose(ours.buffers["running_var"], theirs.running_var.numpy(), **tol)
            assert int(ours.buffers["count"]) == int(theirs.num_batches_tracked) == step + 1
    theirs.eval()
    x = rng.standard_normal(shape).astype(dtype)
    with torch.no_grad():
        expected = theirs(torch.from_numpy(x)).numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        np.testing.assert_allclose(first(ours.forward(np.ascontiguousarray(last(x)), False)), expected, **tol)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize(
    "kernel,stride,padding", [(3, 1, 0), (3, 2, 1), (5, 1, 2), (2, 2, 0), ((3, 2), (2, 1), (1, 0))]
)
def test_conv2d_and_pools_match_torch(dtype, kernel, stride, padding):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 4, 9, 8)).astype(dtype)
    conv = Conv2d(4, 5, kernel, stride=stride, padding=padding, rng=1, dtype=dtype)
    conv.params["b"][...] = rng.standard_normal(5)
    layers = [(conv, interop.to_torch(bnnet.Sequential(conv))[0])]
    pool_ok = all(2 * p <= k for p, k in zip(conv.padding, conv.kernel_size))
    for cls in (MaxPool2d, AvgPool2d) if pool_ok else ():
        layers.append(
            (
                cls(kernel, stride=stride, padding=padding),
                getattr(torch.nn, cls.__name__)(kernel, stride=stride, padding=padding),
            )
        )
    tol = TOL[dtype]
    for ours, theirs in layers:
        inp = np.maximum(x, 0) if isinstance(ours, MaxPool2d) else x  # ties (zeros) go to the first max in both
        y = ours.forward(inp, True)
        G = rng.standard_normal(y.shape).astype(dtype)
        dx = ours.backward(G)
        xt = torch.from_numpy(inp).requires_grad_(True)
        yt = theirs(xt)
        yt.backward(torch.from_numpy(G))
        np.testing.assert_allclose(y, yt.detach().numpy(), rtol=tol["rtol"], atol=tol["atol"] * 10)
        np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=tol["rtol"], atol=tol["atol"] * 10)
        if isinstance(ours, Conv2d):
            np.testing.assert_allclose(
                ours.grads["W"], theirs.weight.grad.numpy(), rtol=tol["rtol"], atol=tol["atol"] * 100
            )
            np.testing.assert_allclose(
                ours.grads["b"], theirs.bias.grad.numpy(), rtol=tol["rtol"], atol=tol["atol"] * 100
            )


CASES = TORCH_OPTIMIZERS


@pytest.mark.parametrize("case", list(CASES))
def test_convnet_training_steps_match_torch(case):
    rng = np.random.default_rng(8)
    model = bnnet.convnet(in_shape=(1, 8, 8), channels=(3, 4), hidden=(6,), classes=4, seed=1, dtype="float64")
    tmodel = interop.to_torch(model)
    assert isinstance(tmodel[1], torch.nn.BatchNorm2d) and isinstance(tmodel[10], torch.nn.BatchNorm1d)
    make_ours, make_theirs = CASES[case]
    opt = make_ours()
    decay = [m.weight for m in tmodel if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    rest = [p for p in tmodel.parameters() if all(p is not q for q in decay)]
    topt = make_theirs([{"params": decay}, {"params": rest}])
    train_both(
        model,
        tmodel,
        opt,
        topt,
        [(rng.standard_normal((6, 1, 8, 8)), rng.integers(0, 4, 6)) for _ in range(3)],
        rel=1e-10,
    )
    expected = torch_named(tmodel)
    ours = {**dict(model.params), **{k: v for k, v in model.buffers.items() if not k.endswith("count")}}
    assert set(ours) == set(expected)
    for name in expected:
        np.testing.assert_allclose(ours[name], expected[name], rtol=1e-8, atol=1e-11, err_msg=name)
    tmodel.eval()
    X = rng.standard_normal((5, 1, 8, 8))
    with torch.no_grad():
        np.testing.assert_allclose(model.predict(X), tmodel(torch.from_numpy(X)).numpy(), rtol=1e-9, atol=1e-12)


def test_from_torch_converts_a_torch_convnet():
    torch.manual_seed(0)
    tmodel = torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3, stride=2, padding=1, bias=False),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.AvgPool2d(2),
        torch.nn.Conv2d(4, 3, 1),
        torch.nn.LeakyReLU(0.1),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(3, 2),
    ).double()
    tmodel.train()
    X = np.random.default_rng(9).standard_normal((5, 2, 10, 10))
    tmodel(torch.from_numpy(X))  # moves the running statistics
    tmodel.eval()
    model = interop.from_torch(tmodel)
    assert [type(l).__name__ for l in model.layers] == [
        "Conv2d",
        "BatchNorm",
        "ReLU",
        "AvgPool2d",
        "Conv2d",
        "LeakyReLU",
        "GlobalAvgPool2d",
        "Flatten",
        "Linear",
    ]
    with torch.no_grad():
        np.testing.assert_allclose(model.predict(X), tmodel(torch.from_numpy(X)).numpy(), rtol=1e-10, atol=1e-12)
    with pytest.raises(bnnet.HyperparameterError, match="dilation"):
        interop.from_torch(torch.nn.Sequential(torch.nn.Conv2d(2, 2, 3, dilation=2)))
    with pytest.raises(bnnet.HyperparameterError, match="stride and padding are not in a state_dict"):
        interop.from_torch(tmodel.state_dict())


# --------------------------------------------------------------------------
# The plan, the backends, folding
# --------------------------------------------------------------------------


def test_the_plan_gives_what_the_layers_give_one_by_one():
    rng = np.random.default_rng(10)
    model = bnnet.convnet(in_shape=(2, 8, 8), channels=(3, 4), hidden=(5,), classes=3, seed=0, dtype="float64")
    x = rng.standard_normal((6, 2, 8, 8))
    y = model.forward(x, True)
    G = rng.standard_normal(y.shape)
    dx = model.backward(G, input_grad=True)
    planned = {k: v.copy() for k, v in model.grads.items()}
    twin = bnnet.convnet(in_shape=(2, 8, 8), channels=(3, 4), hidden=(5,), classes=3, seed=0, dtype="float64")
    h = x
    for layer in twin.layers:
        h = layer.forward(h, True)
    np.testing.assert_allclose(h, y, rtol=0, atol=1e-12)
    g = G
    for layer in reversed(twin.layers):
        g = layer.backward(g)
    np.testing.assert_allclose(g, dx, rtol=0, atol=1e-12)
    for k, v in planned.items():
        np.testing.assert_allclose(twin.grads[k], v, rtol=0, atol=1e-12, err_msg=k)


@pytest.mark.parametrize("dtype,atol", [("float64", 1e-12), ("float32", 2e-5)])
@pytest.mark.parametrize("act", ["relu", "sigmoid"])
def test_spatial_kernels_equal_the_numpy_reference(dtype, atol, act):
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((5, 3, 6, 7)) * 3 + 10).astype(dtype)
    G = rng.standard_normal(x.shape).astype(dtype)
    results = []
    for name in ("numba", "numpy"):
        with backend.using(name):
            model = bnnet.Sequential(BatchNorm(3, dtype=dtype), bnnet.layers.ACTIVATIONS[act]())
            y = model.forward(x, True)
            dx = model.backward(G, input_grad=True)
            results.append((y, dx, dict(model.grads), dict(model.buffers)))
    (y1, dx1, g1, b1), (y2, dx2, g2, b2) = results
    np.testing.assert_allclose(y1, y2, rtol=0, atol=atol)
    np.testing.assert_allclose(dx1, dx2, rtol=0, atol=atol)
    for k in g1:
        np.testing.assert_allclose(g1[k], g2[k], rtol=0, atol=atol * x.size**0.5, err_msg=k)
    for k in b1:
        np.testing.assert_allclose(b1[k], b2[k], rtol=0, atol=atol, err_msg=k)


@pytest.mark.parametrize("kernel,stride,padding", [(3, 1, 1), (3, 2, 0), (2, 2, 0), ((3, 2), (1, 2), (1, 1))])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_image_kernels_equal_the_numpy_reference(kernel, stride, padding, dtype):
    rng = np.random.default_rng(16)
    x = rng.permutation(3 * 4 * 7 * 6).reshape(3, 4, 7, 6).astype(dtype) - 30  # distinct values: one max each
    results = []
    for name in ("numba", "numpy"):
        with backend.using(name):
            conv = Conv2d(4, 5, kernel, stride=stride, padding=padding, rng=0, dtype=dtype)
            pool = MaxPool2d(kernel, stride=stride, padding=padding)
            y = conv.forward(x, True)
            dx = conv.backward(np.ones_like(y) + np.arange(y.size, dtype=dtype).reshape(y.shape) / y.size)
            p = pool.forward(x, True)
            dp = pool.backward(np.arange(p.size, dtype=dtype).reshape(p.shape))
            results.append((y, dx, conv.grads["W"], p, dp, pool._cache[2]))
    for a, b, what in zip(*results, ("y", "dx", "dW", "pool", "pool dx", "pool argmax")):
        np.testing.assert_allclose(a, b, rtol=1e-6 if dtype == "float32" else 1e-12, atol=0, err_msg=what)


def test_max_pool_kernels_skip_argmax_entries_outside_the_plane():
    # the cached positions come from the forward; the backward kernel still never trusts them
    for name in ("numba", "numpy"):
        with backend.using(name):
            dy = np.ones((1, 1, 2, 2))
            dx = np.full((1, 1, 3, 3), 7.0)
            bnnet.ops.max_pool2d_backward(dy, np.array([[[[0, 9], [-1, 8]]]]), dx)
            np.testing.assert_array_equal(dx.reshape(-1), [1, 0, 0, 0, 0, 0, 0, 0, 1])


def test_fold_batchnorm_folds_conv_into_one_conv():
    rng = np.random.default_rng(12)
    model = bnnet.convnet(in_shape=(1, 8, 8), channels=(3,), hidden=(), classes=2, seed=0, dtype="float64")
    for _ in range(3):
        model.forward(rng.standard_normal((8, 1, 8, 8)), True)
    folded = bnnet.fold_batchnorm(model)
    assert not any(isinstance(l, BatchNorm) for l in folded.layers)
    assert folded.layers[0].bias and isinstance(folded.layers[0], Conv2d)
    X = rng.standard_normal((4, 1, 8, 8))
    np.testing.assert_allclose(folded.predict(X), model.predict(X), rtol=0, atol=1e-12)


# --------------------------------------------------------------------------
# Shapes, the builder, the bias rule
# --------------------------------------------------------------------------


def test_shapes_that_do_not_fit_are_refused_before_anything_runs():
    model = bnnet.convnet(in_shape=(1, 8, 8), channels=(3,), hidden=(4,), classes=2, seed=0)
    with pytest.raises(bnnet.InputError, match=r"Conv2d \(layer 0\): x must be \(N, 1, \?, \?\), got \(N, 3, 8, 8\)"):
        model.forward(np.zeros((2, 3, 8, 8)), True)
    with pytest.raises(bnnet.InputError, match=r"Linear \(layer 5\): x must be \(N, 48\), got \(N, 75\).*do not chain"):
        model.forward(np.zeros((2, 1, 10, 10)), True)
    with pytest.raises(bnnet.InputError, match="smaller than the 3x3 kernel"):
        Conv2d(1, 2, 3).forward(np.zeros((1, 1, 2, 2)), True)
    with pytest.raises(bnnet.InputError, match=r"x must be \(N, C, H, W\)"):
        MaxPool2d(2).forward(np.zeros((2, 4)), True)
    with pytest.raises(bnnet.HyperparameterError, match="do not chain"):
        bnnet.Sequential(Conv2d(1, 4, 3), BatchNorm(5))
    with pytest.raises(bnnet.HyperparameterError, match="padding must be less than the kernel size"):
        Conv2d(1, 2, 3, padding=3)
    with pytest.raises(bnnet.HyperparameterError, match="padding must be at most half"):
        MaxPool2d(2, padding=2)
    with pytest.raises(bnnet.HyperparameterError, match="kernel_size must be an int or a pair"):
        Conv2d(1, 2, (3, 3, 3))
    with pytest.raises(bnnet.InputError, match=r"fit: X must be \(N, 1, \?, \?\), got shape \(4, 64\)"):
        bnnet.fit(model, np.zeros((4, 64)), np.zeros(4, int), epochs=1)
    with pytest.raises(bnnet.InputError, match=r"fit: X of shape \(4, 1, 10, 10\) does not fit the model: .*Linear"):
        bnnet.fit(model, np.zeros((4, 1, 10, 10)), np.zeros(4, int), epochs=1)


def test_convnet_builder_follows_the_bias_rule_and_its_arguments():
    model = bnnet.convnet(in_shape=(3, 16, 12), channels=(4, 6), hidden=(7, 5), classes=3, seed=0)
    kinds = [type(l).__name__ for l in model.layers]
    assert kinds == ["Conv2d", "BatchNorm", "ReLU", "MaxPool2d"] * 2 + [
        "Flatten",
        "Linear",
        "BatchNorm",
        "ReLU",
        "Linear",
        "BatchNorm",
        "ReLU",
        "Linear",
    ]
    assert not model.layers[0].bias and not model.layers[9].bias and model.layers[-1].bias
    assert model.layers[9].in_features == 6 * 4 * 3 and model.input_shape == (3, None, None)
    assert model.forward(np.zeros((2, 3, 16, 12), "float32"), True).shape == (2, 3)
    plain = bnnet.convnet(channels=(4,), hidden=(), norm="none", seed=0)
    assert plain.layers[0].bias and not any(isinstance(l, BatchNorm) for l in plain.layers)
    renorm = bnnet.convnet(channels=(4,), hidden=(8,), norm="renorm", seed=0)
    assert isinstance(renorm.layers[1], BatchRenorm)
    with pytest.warns(bnnet.BiasBeforeBatchNormWarning, match="Conv2d with bias"):
        bnnet.Sequential(Conv2d(1, 2, 3), BatchNorm(2))
    with pytest.raises(bnnet.HyperparameterError, match="kernel_size must be odd"):
        bnnet.convnet(kernel_size=4)
    with pytest.raises(bnnet.HyperparameterError, match="below one pixel"):
        bnnet.convnet(in_shape=(1, 4, 4), channels=(2, 2, 2))
    with pytest.raises(bnnet.HyperparameterError, match="norm must be one of"):
        bnnet.convnet(norm="layer")


def test_conv_bias_before_batchnorm_gets_a_zero_gradient():
    rng = np.random.default_rng(13)
    with pytest.warns(bnnet.BiasBeforeBatchNormWarning):
        model = bnnet.Sequential(Conv2d(2, 3, 3, rng=0, dtype="float64"), BatchNorm(3, dtype="float64"), ReLU())
    model.forward(rng.standard_normal((4, 2, 5, 5)), True)
    model.backward(rng.standard_normal((4, 3, 3, 3)))
    np.testing.assert_allclose(model.grads["0.b"], 0, atol=1e-12)


def test_renorm_and_sync_variants_take_images_as_rows_of_channels():
    rng = np.random.default_rng(14)
    x = rng.standard_normal((4, 3, 5, 5))
    renorm = BatchRenorm(3, r_max=1.0, d_max=0.0, dtype="float64")  # r = 1, d = 0: train mode is BatchNorm's
    bn = BatchNorm(3, dtype="float64")
    G = rng.standard_normal(x.shape)
    np.testing.assert_allclose(renorm.forward(x, True), bn.forward(x, True), rtol=0, atol=1e-12)
    np.testing.assert_allclose(renorm.backward(G), bn.backward(G), rtol=0, atol=1e-12)
    from bnnet.distributed import SingleProcess, SyncBatchNorm

    sync, bn = SyncBatchNorm(3, SingleProcess(), dtype="float64"), BatchNorm(3, dtype="float64")
    np.testing.assert_allclose(sync.forward(x, True), bn.forward(x, True), rtol=0, atol=1e-12)
    np.testing.assert_allclose(sync.backward(G), bn.backward(G), rtol=0, atol=1e-12)
    np.testing.assert_allclose(sync.buffers["running_var"], bn.buffers["running_var"], rtol=0, atol=1e-12)


def test_ghost_batchnorm_on_images_normalizes_each_virtual_batch_of_samples():
    from bnnet.normalization import GhostBatchNorm

    rng = np.random.default_rng(17)
    x, G = rng.standard_normal((7, 3, 4, 5)), rng.standard_normal((7, 3, 4, 5))
    ghost = GhostBatchNorm(3, virtual_batch_size=3, dtype="float64")
    y, dx = ghost.forward(x, True), ghost.backward(G)
    alone = BatchNorm(3, dtype="float64")
    for lo, hi in ((0, 3), (3, 6), (6, 7)):  # the last sample alone still has 20 values per channel
        np.testing.assert_allclose(y[lo:hi], alone.forward(x[lo:hi], True), rtol=0, atol=1e-12)
        np.testing.assert_allclose(dx[lo:hi], alone.backward(G[lo:hi]), rtol=0, atol=1e-12)
    np.testing.assert_allclose(ghost.buffers["running_var"], alone.buffers["running_var"], rtol=0, atol=1e-12)
    assert int(ghost.buffers["count"]) == 3


def test_a_convnet_checkpoint_round_trips_and_bad_conv_metadata_is_refused(tmp_path):
    import json
    import struct

    rng = np.random.default_rng(15)
    model = bnnet.convnet(in_shape=(1, 8, 8), channels=(3,), hidden=(4,), classes=2, seed=0)
    model.forward(rng.standard_normal((4, 1, 8, 8)).astype("float32"), True)
    path = tmp_path / "cnn.safetensors"
    bnnet.save(path, model)
    again = bnnet.load(path)
    X = rng.standard_normal((3, 1, 8, 8)).astype("float32")
    np.testing.assert_array_equal(again.predict(X), model.predict(X))
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    meta = json.loads(header["__metadata__"]["bnnet"])
    for field, value, match in (
        ("kernel_size", [3000, 3], "kernel_size = .* does not match"),
        ("out_channels", 100000, "out_channels = 100000 does not match"),
        ("stride", [1, {"a": 1}], "a list of 1 or 2 integers"),
    ):
        bad = json.loads(json.dumps(meta))
        bad["architecture"][0][field] = value
        header["__metadata__"]["bnnet"] = json.dumps(bad)
        text = json.dumps(header).encode()
        (tmp_path / "bad.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n :])
        with pytest.raises(bnnet.CheckpointError, match=match):
            bnnet.load(tmp_path / "bad.safetensors")


def test_every_metadata_field_of_a_convnet_checkpoint_with_every_odd_value(tmp_path):
    """The checkpoint fuzz's exhaustive pass on a conv net: each edited file loads a model that
    predicts (or refuses with a bnnet error), or is refused with CheckpointError; nothing else."""
    import fuzz_checkpoints as fc

    rng = np.random.default_rng(18)
    model = bnnet.Sequential(
        Conv2d(1, 2, 3, padding=1, bias=False, rng=0),
        BatchNorm(2),
        ReLU(),
        MaxPool2d(2),
        AvgPool2d(2, stride=1),
        GlobalAvgPool2d(),
        Flatten(),
        bnnet.layers.Linear(2, 3, rng=0),
    )
    X = rng.standard_normal((4, 1, 6, 6)).astype("float32")
    model.forward(X, True)
    valid = tmp_path / "valid.safetensors"
    bnnet.save(valid, model)
    data, path = valid.read_bytes(), tmp_path / "m.safetensors"
    outcomes = {"refused": 0, "loaded": 0}
    for p in fc.meta_paths(data):
        for blob in [fc.mutate_meta(data, p, v) for v in fc.ODD_VALUES] + [fc.mutate_meta(data, p, None, True)]:
            path.write_bytes(blob)
            try:
                loaded = bnnet.load(path)
            except bnnet.CheckpointError:
                outcomes["refused"] += 1
                continue
            outcomes["loaded"] += 1
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore")
                try:
                    assert loaded.predict(X).shape == (4, 3)
                except bnnet.BnnetError:
                    pass  # e.g. a pool edited to a kernel larger than the image: refused when it runs
    assert outcomes["refused"] > 50 and outcomes["loaded"] > 10, outcomes
