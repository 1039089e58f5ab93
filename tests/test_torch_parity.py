"""bnnet against PyTorch 2.13.0 (CPU): BatchNorm1d forward/backward/running stats, and whole training steps."""

import numpy as np
import pytest
import torch
from helpers import TORCH_OPTIMIZERS, torch_named, train_both

import bnnet
from bnnet import optim
from bnnet.layers import BatchNorm, Linear

torch.set_num_threads(1)

TORCH_DTYPE = {"float64": torch.float64, "float32": torch.float32}
# float64: both compute the same formula, so agreement is to rounding; float32: a
# few ulps of the normalized values (|x_hat| <~ 4) and of the gradient sums.
TOL = {"float64": dict(rtol=1e-10, atol=1e-12), "float32": dict(rtol=1e-4, atol=1e-5)}


def _torch_bn(D, dtype, gamma, beta):
    bn = torch.nn.BatchNorm1d(D, eps=1e-5, momentum=0.1, dtype=TORCH_DTYPE[dtype])
    with torch.no_grad():
        bn.weight.copy_(torch.from_numpy(gamma))
        bn.bias.copy_(torch.from_numpy(beta))
    return bn


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("N,D,offset", [(16, 8, 0.0), (2, 3, 0.0), (9, 1, 0.0), (64, 10, 1e3), (5, 4, -50.0)])
def test_batchnorm_matches_torch(dtype, N, D, offset):
    rng = np.random.default_rng(N * 100 + D)
    gamma = rng.uniform(0.5, 2.0, D).astype(dtype)
    beta = rng.standard_normal(D).astype(dtype)
    ours = BatchNorm(D, dtype=dtype)
    ours.params["gamma"][:] = gamma
    ours.params["beta"][:] = beta
    theirs = _torch_bn(D, dtype, gamma, beta)
    tol = dict(TOL[dtype])
    std = rng.uniform(0.5, 3.0, D)
    if dtype == "float32" and offset:
        # torch computes x - mean with mean rounded to float32, so its own error grows
        # like eps32 * |offset| / std (bnnet's does not: see test_functional); allow for it.
        tol["atol"] += 8 * np.finfo(np.float32).eps * abs(offset) / std.min()
    for step in range(3):  # several steps so running statistics accumulate
        x = (offset + rng.standard_normal((N, D)) * std).astype(dtype)
        G = rng.standard_normal((N, D)).astype(dtype)
        y = ours.forward(x, train=True)
        dx = ours.backward(G)
        xt = torch.from_numpy(x).requires_grad_(True)
        theirs.weight.grad = theirs.bias.grad = None
        yt = theirs(xt)
        yt.backward(torch.from_numpy(G))
        np.testing.assert_allclose(y, yt.detach().numpy(), **tol)
        # dx scales like gamma*inv_std*G; compare relative to its own size
        np.testing.assert_allclose(
            dx, xt.grad.numpy(), rtol=tol["rtol"], atol=tol["atol"] * np.abs(dx).max() + tol["atol"]
        )
        np.testing.assert_allclose(
            ours.grads["gamma"], theirs.weight.grad.numpy(), rtol=tol["rtol"], atol=tol["atol"] * N
        )
        np.testing.assert_allclose(ours.grads["beta"], theirs.bias.grad.numpy(), rtol=tol["rtol"], atol=tol["atol"] * N)
        np.testing.assert_allclose(
            ours.buffers["running_mean"],
            theirs.running_mean.numpy(),
            rtol=tol["rtol"],
            atol=tol["atol"] * (1 + abs(offset)),
        )
        np.testing.assert_allclose(ours.buffers["running_var"], theirs.running_var.numpy(), **tol)
        assert int(ours.buffers["count"]) == int(theirs.num_batches_tracked) == step + 1
    # eval mode uses the running statistics in both
    theirs.eval()
    x = (offset + rng.standard_normal((N, D))).astype(dtype)
    with torch.no_grad():
        expected = theirs(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ours.forward(x, train=False), expected, **tol)


def _to_torch(model, dtype=torch.float64):
    """The same network in torch, weights copied (torch's Linear.weight is our W transposed)."""
    mods = []
    for layer in model.layers:
        if isinstance(layer, Linear):
            m = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias, dtype=dtype)
            with torch.no_grad():
                m.weight.copy_(torch.from_numpy(layer.params["W"].T))
                if layer.bias:
                    m.bias.copy_(torch.from_numpy(layer.params["b"]))
        elif isinstance(layer, BatchNorm):
            m = torch.nn.BatchNorm1d(layer.num_features, eps=layer.eps, momentum=1 - layer.decay, dtype=dtype)
        else:
            m = {"ReLU": torch.nn.ReLU, "Sigmoid": torch.nn.Sigmoid, "Tanh": torch.nn.Tanh}[type(layer).__name__]()
        mods.append(m)
    return torch.nn.Sequential(*mods)


def _torch_decay_groups(tmodel, wd):
    """Weight decay on W only (bnnet's default), none on b, gamma, beta."""
    decay = [m.weight for m in tmodel if isinstance(m, torch.nn.Linear)]
    ids = {id(p) for p in decay}
    rest = [p for p in tmodel.parameters() if id(p) not in ids]
    return [{"params": decay, "weight_decay": wd}, {"params": rest, "weight_decay": 0.0}]


# Each case: our optimizer, and the torch optimizer with the conventions mapped explicitly.
CASES = {
    **TORCH_OPTIMIZERS,
    "sgd+weight_decay": (lambda: optim.SGD(0.1, weight_decay=0.01), lambda g: torch.optim.SGD(g, lr=0.1)),
    "adam+weight_decay": (lambda: optim.Adam(0.01, weight_decay=0.01), lambda g: torch.optim.Adam(g, lr=0.01)),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("activation", ["relu", "sigmoid"])
def test_training_steps_match_torch(case, activation):
    rng = np.random.default_rng(7)
    model = bnnet.mlp([12, 10, 8, 4], activation=activation, seed=5, dtype="float64")
    tmodel = _to_torch(model)
    make_ours, make_theirs = CASES[case]
    opt = make_ours()
    groups = _torch_decay_groups(tmodel, opt.weight_decay)
    topt = make_theirs(groups)
    train_both(model, tmodel, opt, topt, [(rng.standard_normal((16, 12)), rng.integers(0, 4, 16)) for _ in range(4)])
    expected = torch_named(tmodel)
    ours = {**dict(model.params), **{k: v for k, v in model.buffers.items() if not k.endswith("count")}}
    assert set(ours) == set(expected)
    for name in expected:
        np.testing.assert_allclose(ours[name], expected[name], rtol=1e-9, atol=1e-12, err_msg=name)
    # and eval mode agrees after training
    tmodel.eval()
    X = rng.standard_normal((5, 12))
    with torch.no_grad():
        np.testing.assert_allclose(model.predict(X), tmodel(torch.from_numpy(X)).numpy(), rtol=1e-9, atol=1e-12)
