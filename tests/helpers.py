"""Shared test helpers: central finite differences and a norm-wise relative error."""

import numpy as np


def numerical_grad(f, x, h=1e-6):
    """d f() / d x by central differences, perturbing x in place one entry at a time (float64)."""
    assert x.dtype == np.float64
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        old = x[idx]
        x[idx] = old + h
        fp = f()
        x[idx] = old - h
        fm = f()
        x[idx] = old
        g[idx] = (fp - fm) / (2 * h)
    return g


def rel_error(a, b):
    """||a - b|| / (||a|| + ||b||); 0 when both are zero."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    denom = np.linalg.norm(a) + np.linalg.norm(b)
    return 0.0 if denom == 0 else float(np.linalg.norm(a - b) / denom)


def away_from_zero(rng, shape, margin=0.1):
    """Random values with |v| >= margin, so kinks (ReLU at 0) are never straddled by h."""
    return rng.choice([-1.0, 1.0], size=shape) * rng.uniform(margin, 2.0, size=shape)


def assert_same_as(layer, ref, x, dy, atol=1e-12):
    """layer and ref give the same train-mode output, dx, grads and buffers on (x, dy)."""
    np.testing.assert_allclose(layer.forward(x, True), ref.forward(x, True), rtol=0, atol=atol)
    np.testing.assert_allclose(layer.backward(dy), ref.backward(dy), rtol=0, atol=atol)
    for kind in ("grads", "buffers"):
        for key, value in getattr(ref, kind).items():
            np.testing.assert_allclose(getattr(layer, kind)[key], value, rtol=0, atol=atol, err_msg=f"{kind}[{key!r}]")


def check_layer_gradients(layer, x, train, rng, tol=1e-7):
    """Compare backward() with finite differences of L = sum(forward(x) * G), G random.

    Returns the largest relative error over dx and every parameter.
    """
    y = layer.forward(x, train)
    G = rng.standard_normal(y.shape)  # random upstream gradient: all-ones makes BN's dx exactly 0
    dx = layer.backward(G)
    grads = {k: v.copy() for k, v in layer.grads.items()}

    def loss():
        return float(np.sum(layer.forward(x, train) * G))

    errors = {"x": rel_error(dx, numerical_grad(loss, x))}
    for name, p in layer.params.items():
        errors[name] = rel_error(grads[name], numerical_grad(loss, p))
    worst = max(errors.values())
    assert worst <= tol, errors
    return worst


def train_both(model, tmodel, opt, topt, batches, rel=1e-12):
    """One training step per (X, y) of `batches` in bnnet (softmax cross-entropy, `opt`) and in torch
    (`tmodel`, `topt`); asserts that each step's loss agrees to `rel`."""
    import pytest
    import torch

    import bnnet

    loss_fn = bnnet.losses.SoftmaxCrossEntropy()
    for X, y in batches:
        loss = loss_fn.forward(model.forward(X, train=True), y)
        model.backward(loss_fn.backward())
        opt.step(model)
        topt.zero_grad()
        tloss = torch.nn.functional.cross_entropy(tmodel(torch.from_numpy(X)), torch.from_numpy(y))
        tloss.backward()
        topt.step()
        assert loss == pytest.approx(tloss.item(), rel=rel)


def assert_equal_to_twin(model, tmodel, atol=1e-12):
    """Every tensor of torch's `tmodel` equals that of bnnet's model converted with to_torch."""
    import numpy as np

    from bnnet.interop import to_torch

    ours = to_torch(model).state_dict()
    for k, v in tmodel.state_dict().items():
        np.testing.assert_allclose(ours[k].numpy(), v.numpy(), rtol=0, atol=atol, err_msg=k)


def torch_named(tmodel):
    """A torch nn.Sequential's parameters and running statistics under bnnet's dotted names (the
    modules line up one to one with bnnet's layers; torch's Linear.weight is bnnet's W transposed)."""
    import torch

    out = {}
    for i, m in enumerate(tmodel):
        if isinstance(m, torch.nn.Linear):
            out[f"{i}.W"] = m.weight.detach().numpy().T
        elif isinstance(m, torch.nn.Conv2d):
            out[f"{i}.W"] = m.weight.detach().numpy()
        elif isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            out[f"{i}.gamma"], out[f"{i}.beta"] = m.weight.detach().numpy(), m.bias.detach().numpy()
            out[f"{i}.running_mean"], out[f"{i}.running_var"] = m.running_mean.numpy(), m.running_var.numpy()
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and m.bias is not None:
            out[f"{i}.b"] = m.bias.detach().numpy()
    return out


def _torch_optimizers():
    import torch

    from bnnet import optim

    return {
        "sgd": (lambda: optim.SGD(0.1), lambda g: torch.optim.SGD(g, lr=0.1)),
        # v = b v + (1-b) g; p -= lr v   ==   torch u = b u + g; p -= lr (1-b) u
        "momentum": (
            lambda: optim.Momentum(0.1, beta=0.9),
            lambda g: torch.optim.SGD(g, lr=0.1 * (1 - 0.9), momentum=0.9, dampening=0),
        ),
        "rmsprop": (
            lambda: optim.RMSprop(0.01, beta=0.9, eps=1e-8),
            lambda g: torch.optim.RMSprop(g, lr=0.01, alpha=0.9, eps=1e-8),
        ),
        "adam": (
            lambda: optim.Adam(0.01, beta1=0.9, beta2=0.999, eps=1e-8),
            lambda g: torch.optim.Adam(g, lr=0.01, betas=(0.9, 0.999), eps=1e-8),
        ),
    }


# Each case: bnnet's optimizer, and torch's with the conventions mapped explicitly (torch is the oracle
# of the tests that use these; it is imported when this module is).
TORCH_OPTIMIZERS = _torch_optimizers()
