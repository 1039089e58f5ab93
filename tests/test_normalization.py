"""BatchRenorm, GhostBatchNorm, LayerNorm: finite differences, PyTorch, and their defining properties."""

import numpy as np
import pytest
import torch
from helpers import assert_same_as, check_layer_gradients, numerical_grad, rel_error

import bnnet
from bnnet import backend
from bnnet.layers import BatchNorm
from bnnet.normalization import BatchRenorm, GhostBatchNorm, LayerNorm


def _data(n=10, d=4, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(2.0, 3.0, (n, d)), rng.standard_normal((n, d))


def _set_gamma_beta(layer, seed=1):
    rng = np.random.default_rng(seed)
    layer.params["gamma"][...] = rng.uniform(0.5, 2.0, layer.num_features)
    layer.params["beta"][...] = rng.normal(size=layer.num_features)


# --------------------------------------------------------------------------
# BatchRenorm
# --------------------------------------------------------------------------


def test_renorm_without_room_to_correct_is_batchnorm():
    x, dy = _data()
    ref = BatchNorm(4, dtype="float64")
    ren = BatchRenorm(4, r_max=1.0, d_max=0.0, running_std=False, running_var="unbiased", dtype="float64")
    ren.buffers["renorm_mean"][...] = 7.0  # far from the batch: r, d would matter if allowed
    ren.buffers["running_mean"][...] = 7.0
    ref.buffers["running_mean"][...] = 7.0
    _set_gamma_beta(ref)
    _set_gamma_beta(ren)
    with backend.using("numpy"):
        assert_same_as(ren, ref, x, dy)


def test_renorm_running_statistics_as_tensorflow_keeps_them():
    """TensorFlow's testRenorm recurrences: moving_mean and moving_stddev = running averages of mu_B and
    sqrt(var_B + eps) (biased var_B), moving_variance = moving_stddev^2 - eps; eval mode uses them."""
    rng = np.random.default_rng(11)
    eps, momentum, renorm_momentum = 1e-3, 0.9, 0.8
    layer = BatchRenorm(3, r_max=2.0, d_max=1.0, eps=eps, decay=momentum, renorm_momentum=renorm_momentum,
                        dtype="float64")  # fmt: skip
    _set_gamma_beta(layer)
    gamma, beta = layer.params["gamma"].copy(), layer.params["beta"].copy()
    moving_mean, moving_std = np.zeros(3), np.ones(3)  # (moving_variance starts at 1)
    renorm_mean, renorm_std = np.zeros(3), np.ones(3)
    for _ in range(5):
        x = rng.standard_normal((10, 3)) * [1.0, 3.0, 0.2] + [0.5, -2.0, 4.0]
        mean, std = x.mean(0), np.sqrt(x.var(0) + eps)
        r = np.clip(std / renorm_std, 0.5, 2.0)
        d = np.clip((mean - renorm_mean) / renorm_std, -1.0, 1.0)
        y = layer.forward(x, True)
        np.testing.assert_allclose(y, gamma * ((x - mean) / std * r + d) + beta, rtol=0, atol=1e-12)
        renorm_mean = renorm_momentum * renorm_mean + (1 - renorm_momentum) * mean
        renorm_std = renorm_momentum * renorm_std + (1 - renorm_momentum) * std
        moving_mean = momentum * moving_mean + (1 - momentum) * mean
        moving_std = momentum * moving_std + (1 - momentum) * std
    moving_var = moving_std**2 - eps
    np.testing.assert_allclose(layer.buffers["running_mean"], moving_mean, rtol=0, atol=1e-12)
    np.testing.assert_allclose(layer.buffers["running_var"], moving_var, rtol=0, atol=1e-12)
    x = rng.standard_normal((4, 3))
    expected = gamma * (x - moving_mean) / np.sqrt(moving_var + eps) + beta
    np.testing.assert_allclose(layer.forward(x, False), expected, rtol=0, atol=1e-12)
    # (the variance's own running average, BatchNorm's, differs: the option keeps it)
    old = BatchRenorm(3, eps=eps, decay=momentum, running_std=False, dtype="float64")
    assert old.config()["running_std"] is False


def test_renorm_gradients_with_r_and_d_clipped():
    """With r and d at their clipping bounds they are locally constant, so finite differences of
    the whole forward apply (decay=1 keeps the running statistics fixed across the FD calls)."""
    x, _ = _data()
    layer = BatchRenorm(4, r_max=2.0, d_max=0.5, decay=1.0, renorm_momentum=1.0, dtype="float64")
    layer.buffers["renorm_mean"][...] = -50.0  # d = +d_max
    layer.buffers["renorm_std"][...] = 100.0  # r = 1/r_max
    _set_gamma_beta(layer)
    check_layer_gradients(layer, x, True, np.random.default_rng(2))
    r, d = layer.renorm
    np.testing.assert_array_equal(r, 0.5)
    np.testing.assert_array_equal(d, 0.5)


def test_renorm_gradients_treat_r_and_d_as_constants():
    """Unclipped r and d: dx equals finite differences of the forward with r, d frozen at their values."""
    x, G = _data(seed=3)
    layer = BatchRenorm(4, r_max=3.0, d_max=5.0, decay=1.0, renorm_momentum=1.0, dtype="float64")
    layer.buffers["renorm_mean"][...] = 1.5
    layer.buffers["renorm_std"][...] = np.sqrt(6.0)
    _set_gamma_beta(layer)
    layer.forward(x, True)
    r, d = layer.renorm
    assert np.all((r > 1 / 3) & (r < 3)) and np.all(np.abs(d) < 5)  # not clipped
    dx = layer.backward(G)
    gamma, beta = layer.params["gamma"], layer.params["beta"]

    def frozen():
        mu, var = x.mean(0), x.var(0)
        return float(np.sum(G * (gamma * ((x - mu) / np.sqrt(var + layer.eps) * r + d) + beta)))

    assert rel_error(dx, numerical_grad(frozen, x)) < 1e-7
    assert rel_error(layer.grads["gamma"], numerical_grad(frozen, gamma)) < 1e-7
    assert rel_error(layer.grads["beta"], numerical_grad(frozen, beta)) < 1e-7


def test_renorm_train_equals_eval_when_batch_matches_running_statistics():
    x, _ = _data(seed=4)
    layer = BatchRenorm(4, decay=1.0, renorm_momentum=1.0, running_var="biased", dtype="float64")
    _set_gamma_beta(layer)
    layer.buffers["running_mean"][...] = layer.buffers["renorm_mean"][...] = x.mean(0)
    layer.buffers["running_var"][...] = x.var(0)
    layer.buffers["renorm_std"][...] = np.sqrt(x.var(0) + layer.eps)
    layer.buffers["count"][...] = 1
    plain = BatchNorm(4, dtype="float64")
    _set_gamma_beta(plain)
    y_train = layer.forward(x, True)
    np.testing.assert_allclose(y_train, layer.forward(x, False), rtol=0, atol=1e-12)
    # ...while the running statistics differ from the batch's, train mode moves towards eval mode
    layer.buffers["running_mean"][...] += 0.3
    layer.buffers["renorm_mean"][...] += 0.3
    assert (
        np.abs(layer.forward(x, True) - layer.forward(x, False)).max()
        < np.abs(plain.forward(x, True) - layer.forward(x, False)).max()
    )


def test_renorm_warmup_ramps_the_clipping():
    layer = BatchRenorm(3, r_max=3.0, d_max=4.0, warmup=10, dtype="float64")
    assert layer.clipping() == (1.0, 1.0, 0.0)
    layer.buffers["count"][...] = 5
    assert layer.clipping() == (0.5, 2.0, 2.0)
    layer.buffers["count"][...] = 50
    assert layer.clipping() == (1 / 3, 3.0, 4.0)
    layer = BatchRenorm(3, r_max=3.0, r_min=0.5, d_max=4.0, warmup=10, dtype="float64")
    layer.buffers["count"][...] = 5
    assert layer.clipping() == (0.75, 2.0, 2.0)
    with pytest.raises(bnnet.HyperparameterError, match="r_max"):
        BatchRenorm(3, r_max=0.5)


def _algorithm_1(batches, gamma, beta, eps, r_min, r_max, d_max, alpha, decay):
    """Batch Renorm by Algorithm 1 of Ioffe (2017), written out independently of bnnet, float64:
    train outputs and the moving mu, sigma after each batch; eval mode's moving mean and (biased)
    variance updated with weight `decay` as Keras's moving_mean/moving_variance."""
    mu, sigma = np.zeros(gamma.shape), np.ones(gamma.shape)
    moving_mean, moving_var = np.zeros(gamma.shape), np.ones(gamma.shape)
    out = []
    for x in batches:
        mu_b = x.mean(axis=0)
        var_b = ((x - mu_b) ** 2).mean(axis=0)
        sigma_b = np.sqrt(var_b + eps)
        r = np.minimum(np.maximum(sigma_b / sigma, r_min), r_max)
        d = np.minimum(np.maximum((mu_b - mu) / sigma, -d_max), d_max)
        y = gamma * ((x - mu_b) / sigma_b * r + d) + beta
        mu, sigma = mu + alpha * (mu_b - mu), sigma + alpha * (sigma_b - sigma)
        moving_mean = decay * moving_mean + (1 - decay) * mu_b
        moving_var = decay * moving_var + (1 - decay) * var_b
        out.append((y, mu.copy(), sigma.copy(), moving_mean.copy(), moving_var.copy()))
    return out


def test_renorm_follows_algorithm_1_over_several_steps():
    """Twelve batches whose mean and scale drift (so that r and d are clipped at some steps and not
    at others): train outputs, mu, sigma and eval outputs match the independent reference to 1e-6."""
    rng = np.random.default_rng(7)
    d = 5
    batches = [rng.normal(loc=0.4 * t, scale=1 + 0.3 * t, size=(16, d)) * rng.uniform(0.5, 2, d) for t in range(12)]
    layer = BatchRenorm(
        d,
        r_max=1.5,
        r_min=0.8,
        d_max=0.5,
        renorm_momentum=0.9,
        decay=0.8,
        eps=1e-3,
        running_var="biased",
        running_std=False,  # (the running variance as BatchNorm keeps it: the reference's moving_var)
        dtype="float64",
    )
    _set_gamma_beta(layer, seed=3)
    gamma, beta = layer.params["gamma"].copy(), layer.params["beta"].copy()
    reference = _algorithm_1(batches, gamma, beta, 1e-3, 0.8, 1.5, 0.5, alpha=0.1, decay=0.8)
    clipped, free = 0, 0
    for x, (y, mu, sigma, moving_mean, moving_var) in zip(batches, reference):
        np.testing.assert_allclose(layer.forward(x, True), y, rtol=0, atol=1e-6)
        r, d_ = layer.renorm
        at_bound = (r == 1.5) | (r == 0.8) | (np.abs(d_) == 0.5)
        clipped, free = clipped + int(at_bound.sum()), free + int((~at_bound).sum())
        np.testing.assert_allclose(layer.buffers["renorm_mean"], mu, rtol=0, atol=1e-6)
        np.testing.assert_allclose(layer.buffers["renorm_std"], sigma, rtol=0, atol=1e-6)
        np.testing.assert_allclose(layer.buffers["running_mean"], moving_mean, rtol=0, atol=1e-6)
        np.testing.assert_allclose(layer.buffers["running_var"], moving_var, rtol=0, atol=1e-6)
        x_eval = rng.normal(size=(7, d))
        expected = gamma * (x_eval - moving_mean) / np.sqrt(moving_var + 1e-3) + beta
        np.testing.assert_allclose(layer.forward(x_eval, False), expected, rtol=0, atol=1e-6)
    assert clipped > 5 and free > 5  # r and d were clipped in some channels and steps, free in others


def test_renorm_options_survive_a_checkpoint(tmp_path):
    model = bnnet.Sequential(
        bnnet.layers.Linear(4, 3, bias=False), BatchRenorm(3, r_max=2.0, r_min=0.7, d_max=1.0, renorm_momentum=0.95)
    )
    model.forward(np.random.default_rng(0).normal(size=(8, 4)), True)
    bnnet.save(tmp_path / "m.safetensors", model)
    loaded = bnnet.load(tmp_path / "m.safetensors")
    assert loaded.layers[1].config() == model.layers[1].config()
    for key in ("renorm_mean", "renorm_std", "running_mean", "running_var"):
        np.testing.assert_array_equal(loaded.buffers[f"1.{key}"], model.buffers[f"1.{key}"])


# --------------------------------------------------------------------------
# GhostBatchNorm
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, vbs, expected", [(10, 4, [(0, 4), (4, 8), (8, 10)]), (9, 4, [(0, 4), (4, 9)]), (6, 8, [(0, 6)])]
)
def test_ghost_equals_batchnorm_on_each_virtual_batch_in_sequence(n, vbs, expected):
    x, dy = _data(n=n)
    ghost = GhostBatchNorm(4, virtual_batch_size=vbs, dtype="float64")
    _set_gamma_beta(ghost)
    assert ghost._chunks(n) == expected
    y, dx = ghost.forward(x, True), ghost.backward(dy)
    seq = BatchNorm(4, dtype="float64")  # the same virtual batches, as consecutive steps
    _set_gamma_beta(seq)
    dgamma = np.zeros(4)
    for lo, hi in expected:
        with backend.using("numpy"):
            np.testing.assert_allclose(y[lo:hi], seq.forward(x[lo:hi], True), rtol=0, atol=1e-12)
            np.testing.assert_allclose(dx[lo:hi], seq.backward(dy[lo:hi]), rtol=0, atol=1e-12)
        dgamma += seq.grads["gamma"]
    np.testing.assert_allclose(ghost.grads["gamma"], dgamma, rtol=0, atol=1e-12)
    for k in ("running_mean", "running_var", "count"):
        np.testing.assert_allclose(ghost.buffers[k], seq.buffers[k], rtol=0, atol=1e-12)
    assert int(ghost.buffers["count"]) == len(expected)


def test_ghost_gradients_by_finite_differences():
    x, _ = _data(n=11)
    layer = GhostBatchNorm(4, virtual_batch_size=4, dtype="float64")
    _set_gamma_beta(layer)
    check_layer_gradients(layer, x, True, np.random.default_rng(5))


# --------------------------------------------------------------------------
# LayerNorm
# --------------------------------------------------------------------------


def test_layernorm_gradients_by_finite_differences():
    x, _ = _data(n=5, d=6)
    layer = LayerNorm(6, dtype="float64")
    _set_gamma_beta(layer)
    check_layer_gradients(layer, x, True, np.random.default_rng(6))


@pytest.mark.parametrize("dtype, tol", [("float64", 1e-12), ("float32", 1e-5)])
def test_layernorm_matches_torch(dtype, tol):
    x, dy = _data(n=7, d=5, seed=8)
    x, dy = x.astype(dtype), dy.astype(dtype)
    layer = LayerNorm(5, eps=1e-5, dtype=dtype)
    _set_gamma_beta(layer)
    ref = torch.nn.LayerNorm(5, eps=1e-5, dtype=getattr(torch, dtype))
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(layer.params["gamma"]))
        ref.bias.copy_(torch.from_numpy(layer.params["beta"]))
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    yt = ref(xt)
    yt.backward(torch.from_numpy(dy))
    y = layer.forward(x, True)
    dx = layer.backward(dy)
    assert y.dtype == np.dtype(dtype)
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=tol, atol=tol)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=tol, atol=tol)
    np.testing.assert_allclose(layer.grads["gamma"], ref.weight.grad.numpy(), rtol=tol, atol=tol)
    np.testing.assert_allclose(layer.grads["beta"], ref.bias.grad.numpy(), rtol=tol, atol=tol)


def test_layernorm_is_per_sample():
    x, _ = _data(n=4, d=6)
    layer = LayerNorm(6, dtype="float64")
    y = layer.forward(x, True)
    np.testing.assert_allclose(y.mean(1), 0, atol=1e-12)
    np.testing.assert_allclose(layer.forward(x[:1], True), y[:1], atol=1e-12)  # a batch of one works
    np.testing.assert_array_equal(layer.forward(x, False), y)  # no train/eval difference


# --------------------------------------------------------------------------
# In models
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "norm, cls, bias",
    [
        ("batch", BatchNorm, False),
        ("renorm", BatchRenorm, False),
        ("ghost", GhostBatchNorm, False),
        ("layer", LayerNorm, True),
        ("none", None, True),
    ],
)
def test_mlp_norm_option(norm, cls, bias, tmp_path):
    opts = {"virtual_batch_size": 4} if norm == "ghost" else None
    model = bnnet.mlp([6, 5, 5, 3], norm=norm, norm_options=opts, seed=0, dtype="float64")
    assert model.layers[0].bias is bias
    if cls is not None:
        assert type(model.layers[1]) is cls
    X = np.random.default_rng(0).normal(size=(40, 6))
    y = np.arange(40) % 3
    hist = bnnet.fit(model, X, y, epochs=2, batch_size=10, seed=0, progress=False)
    assert np.isfinite(hist["loss"]).all()
    bnnet.save(tmp_path / "m.safetensors", model)
    back = bnnet.load(tmp_path / "m.safetensors")
    assert [type(l) for l in back.layers] == [type(l) for l in model.layers]
    np.testing.assert_array_equal(back.predict(X), model.predict(X))


def test_variants_are_not_fused_and_agree_across_backends():
    X = np.random.default_rng(1).normal(size=(12, 6))
    outs = []
    for be in ("numba", "numpy"):
        with backend.using(be):
            model = bnnet.mlp([6, 5, 3], norm="renorm", activation="sigmoid", seed=0, dtype="float64")
            model.layers[1].buffers["running_mean"][...] = 0.2
            outs.append(model.forward(X, True))
    np.testing.assert_allclose(outs[0], outs[1], rtol=0, atol=1e-12)


def test_mlp_unknown_norm_is_a_clear_error():
    with pytest.raises(bnnet.HyperparameterError, match="norm must be one of"):
        bnnet.mlp([3, 2, 2], norm="instance")
