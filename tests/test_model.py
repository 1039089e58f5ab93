"""Layers and Sequential: the bias rule, train vs eval, dotted names, errors at the boundary."""

import warnings

import numpy as np
import pytest

import bnnet
from bnnet.layers import BatchNorm, Linear, ReLU, Sigmoid

# -- the seed's bias rule ---------------------------------------------------


def test_mlp_drops_bias_before_batchnorm():
    model = bnnet.mlp([8, 6, 5, 3], activation="relu")
    linears = [l for l in model.layers if isinstance(l, Linear)]
    assert [l.bias for l in linears] == [False, False, True]  # hidden: no b (beta's role); output: b
    assert [type(l).__name__ for l in model.layers] == [
        "Linear",
        "BatchNorm",
        "ReLU",
        "Linear",
        "BatchNorm",
        "ReLU",
        "Linear",
    ]
    assert "0.b" not in model.params and "1.beta" in model.params and "6.b" in model.params
    plain = bnnet.mlp([8, 6, 3], batchnorm=False)
    assert [type(l).__name__ for l in plain.layers] == ["Linear", "ReLU", "Linear"] and plain.layers[0].bias


def test_bias_before_batchnorm_warns_and_is_useless(rng):
    with pytest.warns(bnnet.BiasBeforeBatchNormWarning, match="beta takes its role"):
        model = bnnet.Sequential(
            Linear(5, 4, bias=True, rng=1, dtype="float64"),
            BatchNorm(4, dtype="float64"),
            ReLU(),
            Linear(4, 3, rng=2, dtype="float64"),
        )
    X = rng.standard_normal((10, 5))
    G = rng.standard_normal((10, 3))
    out = model.forward(X, train=True)
    model.backward(G)
    np.testing.assert_allclose(model.grads["0.b"], 0, atol=1e-12)  # dL/db = 0
    assert np.abs(model.grads["0.W"]).max() > 1e-3  # while W does learn
    model.params["0.b"] = rng.standard_normal(4) * 10  # any b: same output
    np.testing.assert_allclose(model.forward(X, train=True), out, rtol=1e-12, atol=1e-12)


def test_no_warning_for_mlp():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bnnet.mlp([4, 3, 2])


# -- BatchNorm train vs eval ------------------------------------------------


def test_batchnorm_running_statistics_update(rng):
    bn = BatchNorm(3, decay=0.8, dtype="float64")
    x = rng.standard_normal((6, 3)) * 2 + 1
    bn.forward(x, train=True)
    np.testing.assert_allclose(bn.buffers["running_mean"], 0.2 * x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(bn.buffers["running_var"], 0.8 + 0.2 * x.var(0, ddof=1), rtol=1e-12)
    assert int(bn.buffers["count"]) == 1
    biased = BatchNorm(3, decay=0.8, running_var="biased", dtype="float64")
    biased.forward(x, train=True)
    np.testing.assert_allclose(biased.buffers["running_var"], 0.8 + 0.2 * x.var(0), rtol=1e-12)


def test_train_and_eval_modes_differ_and_eval_is_stateless(rng):
    bn = BatchNorm(4, dtype="float64")
    x = rng.standard_normal((8, 4)) * 3 + 5
    y_train = bn.forward(x, train=True)
    np.testing.assert_allclose(y_train.mean(0), 0, atol=1e-12)  # batch statistics
    before = {k: v.copy() for k, v in bn.buffers.items()}
    y_eval = bn.forward(x, train=False)
    expected = (x - before["running_mean"]) / np.sqrt(before["running_var"] + bn.eps)
    np.testing.assert_allclose(y_eval, expected, rtol=1e-12)  # running statistics
    for k, v in bn.buffers.items():
        np.testing.assert_array_equal(v, before[k])  # eval mode changes nothing
    assert not np.allclose(y_train, y_eval)


def test_decay_one_freezes_and_zero_follows_last_batch(rng):
    x = rng.standard_normal((5, 2)) + 3
    frozen, follow = BatchNorm(2, decay=1.0, dtype="float64"), BatchNorm(2, decay=0.0, dtype="float64")
    frozen.forward(x, True)
    follow.forward(x, True)
    np.testing.assert_array_equal(frozen.buffers["running_mean"], 0)
    np.testing.assert_allclose(follow.buffers["running_mean"], x.mean(0), rtol=1e-12)


def test_batch_of_one_in_train_mode_is_a_clear_error():
    model = bnnet.mlp([3, 4, 2])
    with pytest.raises(bnnet.InputError, match=r"BatchNorm \(layer 1\).*batch of 1 row.*batch_size >= 2.*train=False"):
        model.forward(np.ones((1, 3)), train=True)
    assert model.forward(np.ones((1, 3)), train=False).shape == (1, 2)  # eval mode is fine


@pytest.mark.parametrize(
    "bad,match",
    [
        (np.ones((4, 5)), r"Linear \(layer 0\): x must be \(N, 3\), got \(N, 5\)"),
        (np.ones(3), r"must be a batch of shape \(N, features\) or \(N, channels, ...\), got shape \(3,\)"),
        (np.ones((0, 3)), r"x is empty"),
    ],
)
def test_bad_shapes_name_the_layer(bad, match):
    with pytest.raises(bnnet.InputError, match=match):
        bnnet.mlp([3, 4, 2]).forward(bad, train=True)


def test_bad_dtypes():
    model = bnnet.mlp([2, 3, 2])
    with pytest.raises(bnnet.InputTypeError, match="must hold real numbers.*object"):
        model.forward(np.array([["a", None], [1, 2]], dtype=object), train=False)
    with pytest.raises(TypeError):  # InputTypeError is a TypeError
        model.forward(np.ones((2, 2), dtype=complex), train=False)
    # integers, float16, read-only and non-contiguous arrays all work (cast to the model dtype)
    ints = np.arange(8).reshape(4, 2)
    half = ints.astype(np.float16)
    ro = ints.astype(np.float32)
    ro.setflags(write=False)
    strided = np.arange(16.0).reshape(4, 4)[:, ::2]
    outs = [model.forward(a, train=False) for a in (ints, half, ro, strided[:, :2] * 0 + ints)]
    for o in outs:
        assert o.dtype == np.float32
        np.testing.assert_allclose(o, outs[0], rtol=1e-6)
    assert model.forward(strided, train=True).shape == (4, 2)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: BatchNorm(3, eps=0), r"BatchNorm: eps must be in \(0"),
        (lambda: BatchNorm(3, decay=1.5), r"BatchNorm: decay must be in \[0, 1\], got 1.5"),
        (lambda: BatchNorm(3, running_var="sample"), "running_var must be one of 'unbiased', 'biased'"),
        (lambda: BatchNorm(0), "num_features must be an integer >= 1"),
        (lambda: Linear(3, 2, init="glorot"), "init must be one of"),
        (lambda: Linear(3, 2, std=0.1), "std is used only with init='normal'"),
        (lambda: Linear(3, 2, dtype="int32"), "dtype must be 'float32' or 'float64'"),
        (lambda: bnnet.mlp([3, 2], activation="gelu"), "activation must be one of"),
        (lambda: bnnet.mlp([3]), "sizes must be a list"),
        (lambda: bnnet.Sequential(Linear(2, 2), "relu"), "argument 1 must be a bnnet layer"),
    ],
)
def test_hyperparameter_errors(make, match):
    with pytest.raises(bnnet.HyperparameterError, match=match):
        make()


# -- Sequential's dotted views ----------------------------------------------


def test_dotted_names_are_live_and_writable(rng):
    model = bnnet.mlp([4, 3, 2], activation="sigmoid", seed=0)
    assert list(model.params) == ["0.W", "1.gamma", "1.beta", "3.W", "3.b"]
    assert list(model.buffers) == ["1.running_mean", "1.running_var", "1.count"]
    assert model.params["0.W"] is model.layers[0].params["W"]
    W = rng.standard_normal((4, 3))
    model.params["0.W"] = W  # copies into the layer's own array
    assert model.params["0.W"] is model.layers[0].params["W"]
    np.testing.assert_allclose(model.layers[0].params["W"], W.astype(np.float32))
    model.params["1.gamma"][:] = 2.0  # in-place edits are visible too
    assert (model.layers[1].params["gamma"] == 2).all()
    with pytest.raises(bnnet.InputError, match=r"has shape \(4, 3\); cannot assign an array of shape \(3, 4\)"):
        model.params["0.W"] = W.T
    with pytest.raises(KeyError):
        model.params["9.W"]
    model.forward(rng.standard_normal((5, 4)), train=True)
    model.backward(rng.standard_normal((5, 2)).astype(np.float32))
    assert list(model.grads) == list(model.params)
    for k in model.params:
        assert model.grads[k].shape == model.params[k].shape and model.grads[k].dtype == model.params[k].dtype


def test_mlp_seed_is_deterministic_and_dtype_respected():
    a, b = bnnet.mlp([5, 4, 2], seed=3, dtype="float64"), bnnet.mlp([5, 4, 2], seed=3, dtype="float64")
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k])
        assert a.params[k].dtype == np.float64
    assert not np.array_equal(a.params["0.W"], bnnet.mlp([5, 4, 2], seed=4, dtype="float64").params["0.W"])


def test_init_scales(rng):
    big = 400
    assert np.std(Linear(big, big, init="he", rng=0).params["W"]) == pytest.approx(np.sqrt(2 / big), rel=0.02)
    assert np.std(Linear(big, big, init="xavier", rng=0).params["W"]) == pytest.approx(np.sqrt(1 / big), rel=0.02)
    assert np.std(Linear(big, big, init="normal", std=0.05, rng=0).params["W"]) == pytest.approx(0.05, rel=0.02)


def test_predict_batches_equal_one_pass(rng):
    model = bnnet.mlp([6, 5, 3], activation="sigmoid", seed=1, dtype="float64")
    model.forward(rng.standard_normal((20, 6)), train=True)  # non-trivial running stats
    X = rng.standard_normal((23, 6))
    np.testing.assert_allclose(model.predict(X, batch_size=4), model.forward(X, train=False), rtol=1e-14)
    with pytest.raises(bnnet.InputError, match="NaN or Inf"):
        model.predict(np.full((2, 6), np.nan))


def test_backward_before_forward_is_an_error():
    with pytest.raises(bnnet.InputError, match="backward\\(\\) called before forward"):
        Sigmoid().backward(np.ones((2, 2)))


def test_train_flag_must_be_a_bool():
    with pytest.raises(bnnet.HyperparameterError, match="train must be True or False"):
        bnnet.mlp([2, 2, 2]).forward(np.ones((3, 2)), train="eval")
