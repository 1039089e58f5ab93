"""Frozen parameters: bitwise unchanged by training, no optimizer state, saved in checkpoints, and the
other updates equal PyTorch's with requires_grad=False."""

import numpy as np
import pytest
from helpers import assert_equal_to_twin, train_both

import bnnet
from bnnet import optim
from bnnet.errors import HyperparameterError


def _data(n=64, d=6, c=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)), rng.integers(0, c, n)


@pytest.mark.parametrize("check_activations", [False, True])  # the compiled step, and the layers
@pytest.mark.parametrize("opt", ["sgd", "momentum", "rmsprop", "adam", "adamw"])
def test_frozen_parameters_do_not_move_and_have_no_state(opt, check_activations):
    X, y = _data()
    model = bnnet.mlp([6, 8, 8, 3], dtype="float64", seed=0)
    model.freeze(0, "1.gamma", "6.b")
    before = {k: v.copy() for k, v in model.params.items()}
    optimizer = optim.get_optimizer(opt)
    optimizer.weight_decay = 1e-2  # (decay would move a frozen W if it were applied)
    bnnet.fit(model, X, y, optimizer=optimizer, epochs=2, batch_size=16, progress=False,
              check_activations=check_activations)  # fmt: skip
    assert model.frozen_params == ["0.W", "1.gamma", "6.b"]
    for k, v in before.items():
        assert np.array_equal(model.params[k], v) == (k in model.frozen_params), k
    assert not set(optimizer.state) & set(model.frozen_params)
    assert not model.grads["0.W"].any()  # the first layer's dW is not computed


def test_frozen_first_layer_matches_torch_requires_grad_false():
    torch = pytest.importorskip("torch")
    from bnnet.interop import to_torch

    X, y = _data(seed=1)
    model = bnnet.mlp([6, 8, 8, 3], dtype="float64", seed=3)
    model.freeze(0)
    twin = to_torch(model)
    assert not twin[0].weight.requires_grad
    from bnnet.interop import from_torch

    assert from_torch(to_torch(model)).frozen_params == model.frozen_params == ["0.W"]  # and back
    opt = optim.Adam(0.01)
    topt = torch.optim.Adam([p for p in twin.parameters() if p.requires_grad], lr=0.01)
    train_both(model, twin, opt, topt, [(X[16 * t : 16 * t + 16], y[16 * t : 16 * t + 16]) for t in range(3)])
    assert_equal_to_twin(model, twin)


def test_frozen_names_are_saved_and_training_resumes(tmp_path):
    X, y = _data()
    model = bnnet.mlp([6, 8, 3], dtype="float64", seed=0).freeze("0")
    opt = optim.Adam(0.01)
    bnnet.fit(model, X, y, optimizer=opt, epochs=2, batch_size=16, seed=0, progress=False,
              checkpoint=str(tmp_path / "c-{step}.safetensors"), checkpoint_every=4)  # fmt: skip
    loaded = bnnet.load(str(tmp_path / "c-8.safetensors"))
    assert loaded.frozen_params == ["0.W"]
    again = bnnet.mlp([6, 8, 3], dtype="float64", seed=5).freeze("0")
    bnnet.fit(again, X, y, optimizer=optim.Adam(0.01), epochs=2, batch_size=16, seed=0, progress=False,
              resume=str(tmp_path / "c-4.safetensors"))  # fmt: skip
    for k, v in model.params.items():
        np.testing.assert_array_equal(again.params[k], v)


def test_trainable_unfreeze_and_single_layers():
    layer = bnnet.layers.BatchNorm(4, dtype="float64")
    layer.trainable = False
    assert not layer.trainable and layer.frozen_params == {"gamma", "beta"}
    x = np.random.default_rng(0).standard_normal((5, 4))
    layer.forward(x, True)
    layer.backward(x)
    gamma = layer.params["gamma"].copy()
    optim.SGD(0.1).step(layer)
    np.testing.assert_array_equal(layer.params["gamma"], gamma)
    layer.trainable = True
    optim.SGD(0.1).step(layer)
    assert not np.array_equal(layer.params["gamma"], gamma)
    model = bnnet.mlp([3, 4, 2], seed=0).freeze()
    assert len(model.frozen_params) == len(model.params)
    model.unfreeze("1.beta")
    assert "1.beta" not in model.frozen_params


def test_clip_grad_norm_leaves_frozen_gradients_out():
    X, y = _data()
    model = bnnet.mlp([6, 8, 3], dtype="float64", seed=0)
    loss = bnnet.losses.SoftmaxCrossEntropy()
    loss.forward(model.forward(X, True), y)
    model.backward(loss.backward())
    full = optim.clip_grad_norm(model, 1e9)
    model.freeze("1")
    part = optim.clip_grad_norm(model, 1e9)
    expected = np.sqrt(sum(np.sum(g**2) for k, _, g in model.named_parameters() if not k.startswith("1.")))
    assert part < full and abs(part - expected) < 1e-12


@pytest.mark.parametrize(
    ("names", "match"),
    [((7,), "names no layer"), (("0.gamma",), "no parameter 'gamma'"), ((1.5,), "layer indices"), (("x",), "names no")],
)
def test_bad_freeze_names(names, match):
    with pytest.raises(HyperparameterError, match=match):
        bnnet.mlp([3, 4, 2], seed=0).freeze(*names)
    with pytest.raises(HyperparameterError, match="trainable must be"):
        bnnet.layers.Linear(2, 2).trainable = "no"
