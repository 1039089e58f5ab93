"""Differential testing against PyTorch on random architectures (float64).

Each case draws an MLP or a small convnet (sizes, activation, normalization, optimizer, batch
size), builds its twin with bnnet.to_torch, trains both for a few steps on the same batches, and
compares the loss of every step, the parameters and running statistics after them, and the
eval-mode outputs; predict in small chunks must equal one forward over all rows (every array the
model returns belongs to the caller, whatever its last layer is).
"""

import numpy as np
import pytest
import torch
from helpers import TORCH_OPTIMIZERS, train_both

import bnnet
from bnnet.conv import Conv2d, Flatten, MaxPool2d
from bnnet.interop import to_torch
from bnnet.layers import BatchNorm, Linear

ACTIVATIONS = ["relu", "sigmoid", "tanh", "leaky_relu"]


def _random_case(seed):
    """(model, input shape per sample, classes, optimizer name, batch size) drawn from `seed`."""
    rng = np.random.default_rng(seed)
    activation = ACTIVATIONS[rng.integers(len(ACTIVATIONS))]
    optimizer = sorted(TORCH_OPTIMIZERS)[rng.integers(len(TORCH_OPTIMIZERS))]
    classes = int(rng.integers(2, 6))
    norm = "batch" if rng.random() < 0.8 else "none"
    if seed % 3 == 2:  # a convnet
        c, h = int(rng.integers(1, 4)), int(rng.choice([4, 6, 8]))
        channels = tuple(int(k) for k in rng.integers(1, 5, size=rng.integers(1, 3)))
        hidden = tuple(int(k) for k in rng.integers(2, 9, size=rng.integers(0, 2)))
        model = bnnet.convnet(
            in_shape=(c, h, h),
            channels=channels,
            hidden=hidden,
            classes=classes,
            activation=activation,
            norm=norm,
            seed=seed,
            dtype="float64",
            pool=2 if h // 2 ** len(channels) >= 1 else 1,
        )
        return model, (c, h, h), classes, optimizer, int(rng.integers(3, 9))
    sizes = [int(rng.integers(1, 12))] + [int(k) for k in rng.integers(2, 16, size=rng.integers(1, 4))] + [classes]
    model = bnnet.mlp(sizes, activation=activation, norm=norm, seed=seed, dtype="float64")
    return model, (sizes[0],), classes, optimizer, int(rng.integers(2, 12))


def _compare(model, tmodel):
    """bnnet's parameters and running statistics against the torch twin's, in the modules' order."""
    tparams = list(tmodel.parameters())
    ours = [p for _, p, _ in model.named_parameters()]
    assert len(ours) == len(tparams)
    for (name, p, _), t in zip(model.named_parameters(), tparams):
        t = t.detach().numpy()
        if name.endswith(".W") and p.ndim == 2:  # torch's Linear.weight is W transposed
            t = t.T
        np.testing.assert_allclose(p, t, rtol=1e-9, atol=1e-11, err_msg=name)
    tnorms = [m for m in tmodel if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    norms = [layer for layer in model.layers if isinstance(layer, BatchNorm)]
    for layer, m in zip(norms, tnorms, strict=True):
        np.testing.assert_allclose(layer.buffers["running_mean"], m.running_mean.numpy(), rtol=1e-9, atol=1e-11)
        np.testing.assert_allclose(layer.buffers["running_var"], m.running_var.numpy(), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("seed", range(24))
def test_random_architectures_train_like_torch(seed):
    model, shape, classes, optimizer, batch = _random_case(seed)
    tmodel = to_torch(model)
    make_ours, make_theirs = TORCH_OPTIMIZERS[optimizer]
    opt, topt = make_ours(), make_theirs(tmodel.parameters())
    rng = np.random.default_rng(100 + seed)
    batches = [(rng.standard_normal((batch, *shape)), rng.integers(0, classes, batch)) for _ in range(3)]
    train_both(model, tmodel, opt, topt, batches, rel=1e-10)
    _compare(model, tmodel)
    tmodel.eval()
    X = rng.standard_normal((7, *shape))
    with torch.no_grad():
        expected = tmodel(torch.from_numpy(X)).numpy()
    np.testing.assert_allclose(model.predict(X), expected, rtol=1e-9, atol=1e-11)
    # (BLAS may round a 1-row product differently from a 7-row one: 1e-12, not bitwise)
    np.testing.assert_allclose(model.predict(X, batch_size=2), model.predict(X), rtol=1e-12, atol=1e-13)


def _ends_in_flatten():
    return bnnet.Sequential(
        Conv2d(2, 3, 3, padding=1, bias=False, rng=0, dtype="float64"),
        BatchNorm(3, dtype="float64"),
        MaxPool2d(2),
        Flatten(),
    )


def test_outputs_of_a_model_ending_in_a_view_belong_to_the_caller():
    model = _ends_in_flatten()
    X = np.random.default_rng(0).standard_normal((8, 2, 4, 4))
    first = model.forward(X[:4], train=False)
    kept = first.copy()
    second = model.forward(X[4:], train=False)
    np.testing.assert_array_equal(first, kept)  # the second forward did not write into the first output
    assert not np.shares_memory(first, second)
    np.testing.assert_array_equal(model.predict(X, batch_size=4), np.concatenate([kept, second]))
    # train mode, and a model whose only layer returns its input reshaped
    out = model.forward(X, train=True)
    assert not np.shares_memory(out, model.forward(X, train=True))
    flat = bnnet.Sequential(Flatten())
    assert not np.shares_memory(flat.forward(X, train=False), X)


def test_a_chain_of_views_at_the_end_is_copied():
    model = bnnet.Sequential(Linear(4, 6, rng=0, dtype="float64"), Flatten(), Flatten())
    X = np.random.default_rng(1).standard_normal((5, 4))
    a = model.forward(X, train=False)
    b = model.forward(2 * X, train=False)
    np.testing.assert_allclose(2 * (a - model.params["0.b"]), b - model.params["0.b"], rtol=1e-12)
