"""Test-time statistics: cumulative average, frozen statistics, Alg. 2 / exact recomputation, BN folding."""

import warnings

import numpy as np
import pytest
import torch

import bnnet
from bnnet import backend, conventions
from bnnet.layers import BatchNorm, BatchNormUntrainedWarning


@pytest.mark.parametrize("name", ["numpy", "numba"])
def test_cumulative_average_matches_torch_momentum_none(name):
    rng = np.random.default_rng(0)
    with backend.using(name):
        bn = BatchNorm(4, decay=None, dtype="float64")
        tbn = torch.nn.BatchNorm1d(4, momentum=None, dtype=torch.float64)
        batches = [rng.standard_normal((8, 4)) * (k + 1) + k for k in range(5)]
        for x in batches:
            bn.forward(x, train=True)
            tbn(torch.from_numpy(x))
    np.testing.assert_allclose(bn.buffers["running_mean"], tbn.running_mean.numpy(), rtol=1e-12)
    np.testing.assert_allclose(bn.buffers["running_var"], tbn.running_var.numpy(), rtol=1e-12)
    np.testing.assert_allclose(bn.buffers["running_mean"], np.mean([b.mean(0) for b in batches], axis=0), rtol=1e-12)


@pytest.mark.parametrize("name", ["numpy", "numba"])
def test_frozen_statistics_train_gamma_beta_only(name, rng):
    with backend.using(name):
        model = bnnet.mlp([5, 4, 3], seed=0, dtype="float64")
        X, y = rng.standard_normal((40, 5)), rng.integers(0, 3, 40)
        bnnet.fit(model, X, y, epochs=1, batch_size=8, progress=False)
        bnnet.freeze_batchnorm(model)
        stats = {k: v.copy() for k, v in model.buffers.items()}
        gamma = model.params["1.gamma"].copy()
        eval_out = model.forward(X[:1], train=False)
        np.testing.assert_allclose(model.forward(X[:1], train=True), eval_out)  # a batch of one works when frozen
        bnnet.fit(model, X, y, epochs=2, batch_size=8, progress=False, optimizer=bnnet.optim.SGD(0.1))
        for k, v in stats.items():
            np.testing.assert_array_equal(model.buffers[k], v)  # statistics untouched
        assert not np.allclose(model.params["1.gamma"], gamma)  # while gamma trained
        bnnet.freeze_batchnorm(model, False)
        model.forward(X[:8], train=True)
        assert int(model.buffers["1.count"]) == int(stats["1.count"]) + 1


def test_untrained_batchnorm_warns_once_in_eval_mode():
    model = bnnet.mlp([3, 4, 2])
    with pytest.warns(BatchNormUntrainedWarning, match="never saw a training batch"):
        model.predict(np.ones((2, 3)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.predict(np.ones((2, 3)))  # once per layer


@pytest.mark.parametrize("name", ["numpy", "numba"])
def test_recompute_batch_mode_is_algorithm_2(name, rng):
    with backend.using(name):
        bn = BatchNorm(3, dtype="float64")
        model = bnnet.Sequential(bn)
        X = rng.standard_normal((100, 3)) * [1, 2, 3] + [0, 5, -5]
        bnnet.recompute_bn_stats(model, X, batch_size=20)
    batches = X.reshape(5, 20, 3)
    np.testing.assert_allclose(bn.buffers["running_mean"], batches.mean(1).mean(0), rtol=1e-12)
    np.testing.assert_allclose(bn.buffers["running_var"], batches.var(1).mean(0) * 20 / 19, rtol=1e-12)
    assert int(bn.buffers["count"]) == 5


@pytest.mark.parametrize("name", ["numpy", "numba"])
def test_recompute_exact_mode(name, rng):
    with backend.using(name):
        model = bnnet.mlp([4, 6, 5, 2], activation="tanh", seed=1, dtype="float64")
        X = rng.standard_normal((97, 4))
        before = {k: v.copy() for k, v in model.params.items()}
        bnnet.recompute_bn_stats(model, X, batch_size=10, mode="exact")
    # layer 1's statistics are the exact moments of its input over all of X
    z = X @ model.params["0.W"]
    np.testing.assert_allclose(model.buffers["1.running_mean"], z.mean(0), rtol=1e-10)
    np.testing.assert_allclose(model.buffers["1.running_var"], z.var(0, ddof=1), rtol=1e-10)
    # and layer 4's those of its input with layer 1 in eval mode
    h = model.layers[2].forward(model.layers[1].forward(z, False), False) @ model.params["3.W"]
    np.testing.assert_allclose(model.buffers["4.running_mean"], h.mean(0), rtol=1e-10)
    np.testing.assert_allclose(model.buffers["4.running_var"], h.var(0, ddof=1), rtol=1e-10)
    for k, v in before.items():
        np.testing.assert_array_equal(model.params[k], v)


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-10), ("float32", 1e-5)])
@pytest.mark.parametrize("name", ["numpy", "numba"])
def test_fold_batchnorm(dtype, tol, name, rng, tmp_path):
    with backend.using(name):
        model = bnnet.mlp([6, 8, 7, 3], activation="relu", seed=0, dtype=dtype)
        assert not model.layers[0].bias  # hidden Linear layers have no bias; folding adds one
        X, y = rng.standard_normal((64, 6)), rng.integers(0, 3, 64)
        bnnet.fit(model, X, y, epochs=3, batch_size=16, progress=False)
        folded = bnnet.fold_batchnorm(model)
        assert [type(l).__name__ for l in folded.layers] == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
        ref = model.predict(X)
        out = folded.predict(X)
    np.testing.assert_allclose(out, ref, rtol=tol, atol=tol * np.abs(ref).max())
    with pytest.raises(bnnet.HyperparameterError, match="folded for inference"):
        folded.forward(X, train=True)
    bnnet.save(tmp_path / "f.safetensors", folded)
    again = bnnet.load(tmp_path / "f.safetensors")
    assert again.eval_only
    np.testing.assert_array_equal(again.predict(X), out)


def test_conversions():
    assert conventions.decay_from_torch_momentum(0.1) == pytest.approx(0.9)
    assert conventions.torch_momentum_from_decay(0.9) == pytest.approx(0.1)
    assert conventions.decay_from_keras_momentum(0.99) == 0.99 == conventions.keras_momentum_from_decay(0.99)
    assert conventions.decay_from_torch_momentum(None) is None
    with pytest.raises(bnnet.HyperparameterError, match=r"momentum must be in \[0, 1\]"):
        conventions.decay_from_torch_momentum(1.5)
