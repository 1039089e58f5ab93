"""Dropout, GroupNorm and InstanceNorm2d: PyTorch parity (forward, gradients, a training step),
finite differences in float64, interop both ways, ONNX through onnxruntime, the builders' norm=."""

import numpy as np
import pytest
from helpers import assert_equal_to_twin, check_layer_gradients, train_both

import bnnet
from bnnet.conv import Conv2d, Flatten
from bnnet.dropout import Dropout
from bnnet.errors import HyperparameterError, InputError
from bnnet.layers import BatchNorm, Linear, ReLU
from bnnet.normalization import GroupNorm, InstanceNorm2d, LayerNorm

torch = pytest.importorskip("torch")

CASES = [
    (lambda: GroupNorm(2, 6, dtype="float64"), lambda: torch.nn.GroupNorm(2, 6, dtype=torch.float64), (4, 6, 3, 5)),
    (lambda: GroupNorm(3, 6, dtype="float64"), lambda: torch.nn.GroupNorm(3, 6, dtype=torch.float64), (4, 6)),
    (lambda: GroupNorm(1, 4, affine=False, dtype="float64"),
     lambda: torch.nn.GroupNorm(1, 4, affine=False, dtype=torch.float64), (3, 4, 2, 2)),
    (lambda: InstanceNorm2d(3, affine=True, dtype="float64"),
     lambda: torch.nn.InstanceNorm2d(3, affine=True, dtype=torch.float64), (2, 3, 4, 4)),
    (lambda: InstanceNorm2d(3, dtype="float64"), lambda: torch.nn.InstanceNorm2d(3, dtype=torch.float64), (1, 3, 3, 2)),
]  # fmt: skip


def _randomize(layer, rng):
    if getattr(layer, "affine", False):
        layer.params["gamma"][...] = rng.standard_normal(layer.num_features)
        layer.params["beta"][...] = rng.standard_normal(layer.num_features)
    return layer


@pytest.mark.parametrize(("make", "make_torch", "shape"), CASES)
def test_per_sample_norms_match_torch(make, make_torch, shape):
    rng = np.random.default_rng(0)
    layer = _randomize(make(), rng)
    twin = make_torch()
    if layer.affine:
        with torch.no_grad():
            twin.weight.copy_(torch.tensor(layer.params["gamma"]))
            twin.bias.copy_(torch.tensor(layer.params["beta"]))
    x, dy = rng.standard_normal(shape), rng.standard_normal(shape)
    for train in (True, False):  # the same statistics in both modes
        xt = torch.tensor(x, requires_grad=True)
        (twin.train() if train else twin.eval())
        yt = twin(xt)
        yt.backward(torch.tensor(dy))
        np.testing.assert_allclose(layer.forward(x, train), yt.detach().numpy(), rtol=0, atol=1e-12)
        np.testing.assert_allclose(layer.backward(dy), xt.grad.numpy(), rtol=0, atol=1e-12)
        if layer.affine:
            np.testing.assert_allclose(layer.grads["gamma"], twin.weight.grad.numpy(), rtol=0, atol=1e-12)
            np.testing.assert_allclose(layer.grads["beta"], twin.bias.grad.numpy(), rtol=0, atol=1e-12)
            twin.zero_grad()


@pytest.mark.parametrize(("make", "make_torch", "shape"), CASES)
def test_per_sample_norms_match_finite_differences(make, make_torch, shape):
    rng = np.random.default_rng(1)
    layer = _randomize(make(), rng)
    check_layer_gradients(layer, rng.standard_normal(shape), True, rng)


def test_dropout_matches_torch_with_the_same_mask():
    rng = np.random.default_rng(2)
    layer = Dropout(0.3, seed=5)
    x, dy = rng.standard_normal((6, 7)), rng.standard_normal((6, 7))
    y = layer.forward(x, True)
    mask = layer.mask
    assert set(np.unique(mask)) <= {0.0, 1 / 0.7} and 0 < np.count_nonzero(mask) < mask.size
    xt = torch.tensor(x, requires_grad=True)
    yt = xt * torch.tensor(mask != 0) / 0.7  # torch's inverted dropout with this mask
    yt.backward(torch.tensor(dy))
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=0, atol=1e-15)
    np.testing.assert_allclose(layer.backward(dy), xt.grad.numpy(), rtol=0, atol=1e-15)
    np.testing.assert_array_equal(layer.forward(x, False), x)  # identity in eval
    np.testing.assert_array_equal(layer.backward(dy), dy)


def test_dropout_finite_differences_with_its_mask_fixed():
    rng = np.random.default_rng(3)
    layer = Dropout(0.5, seed=1)
    x = rng.standard_normal((5, 4))
    y = layer.forward(x, True)
    np.testing.assert_allclose(y, x * layer.mask)
    G = rng.standard_normal(y.shape)
    dx = layer.backward(G)
    # L = sum(y * G) is linear in x with the mask fixed: dL/dx = G * mask exactly
    np.testing.assert_array_equal(dx, G * layer.mask)


def test_dropout_keeps_the_expected_fraction_and_seeds():
    x = np.ones((400, 250))
    a, b = Dropout(0.2, seed=7), Dropout(0.2, seed=7)
    kept = np.count_nonzero(a.forward(x, True)) / x.size
    assert abs(kept - 0.8) < 0.01
    b.forward(x, True)
    np.testing.assert_array_equal(a.mask, b.mask)  # the same seed: the same first mask
    first = a.mask.copy()
    a.forward(x, True)
    assert not np.array_equal(a.mask, first)  # a new mask every forward
    assert a.buffers["rng"][1] == 2
    other = Dropout(0.2, seed=8)
    other.forward(x, True)
    assert not np.array_equal(other.mask, first)


def test_dropout_resume_draws_the_same_masks(tmp_path):
    rng = np.random.default_rng(4)
    X, y = rng.standard_normal((48, 5)), rng.integers(0, 3, 48)

    def make(seed):
        return bnnet.Sequential(
            Linear(5, 8, bias=False, dtype="float64", rng=seed), BatchNorm(8, dtype="float64"), ReLU(),
            Dropout(0.4, seed=seed), Linear(8, 3, dtype="float64", rng=seed),
        )  # fmt: skip

    ref = make(0)
    kw = {"epochs": 3, "batch_size": 16, "seed": 0, "progress": False}
    bnnet.fit(ref, X, y, checkpoint=str(tmp_path / "c-{step}.safetensors"), checkpoint_every=4, **kw)
    again = make(9)
    bnnet.fit(again, X, y, resume=str(tmp_path / "c-4.safetensors"), **kw)
    for k, v in ref.params.items():
        np.testing.assert_array_equal(again.params[k], v)
    np.testing.assert_array_equal(again.buffers["3.rng"], [0, 9])


def _net():
    rng = np.random.default_rng(5)
    model = bnnet.Sequential(
        Conv2d(3, 6, 3, padding=1, dtype="float32", rng=0), GroupNorm(3, 6), ReLU(), Dropout(0.25),
        InstanceNorm2d(6, affine=True), Flatten(), Linear(6 * 5 * 5, 8, dtype="float32", rng=1), LayerNorm(8),
        Linear(8, 3, dtype="float32", rng=2),
    )  # fmt: skip
    for layer in model.layers:
        _randomize(layer, rng)
        if isinstance(layer, LayerNorm):
            layer.params["gamma"][...] = rng.standard_normal(8)
    return model


def test_interop_round_trip_and_a_training_step_match_torch():
    from bnnet.interop import from_torch, to_torch

    model = _net()
    twin = to_torch(model)
    assert [type(m).__name__ for m in twin][1:5] == ["GroupNorm", "ReLU", "Dropout", "InstanceNorm2d"]
    back = from_torch(twin)
    assert back.config() == model.config()
    for k, v in model.params.items():
        np.testing.assert_array_equal(back.params[k], v)
    x = np.random.default_rng(6).standard_normal((4, 3, 5, 5)).astype(np.float32)
    np.testing.assert_allclose(model.predict(x), twin.eval()(torch.tensor(x)).detach().numpy(), rtol=0, atol=1e-5)


def test_a_training_step_matches_torch_float64():
    from bnnet.interop import to_torch

    rng = np.random.default_rng(7)
    model = bnnet.Sequential(
        Linear(5, 6, dtype="float64", rng=0), GroupNorm(2, 6, dtype="float64"), ReLU(),
        Linear(6, 6, dtype="float64", rng=1), LayerNorm(6, dtype="float64"), Linear(6, 3, dtype="float64", rng=2),
    )  # fmt: skip
    twin = to_torch(model)
    X, y = rng.standard_normal((10, 5)), rng.integers(0, 3, 10)
    opt, topt = bnnet.optim.Adam(0.01), torch.optim.Adam(twin.parameters(), lr=0.01)
    train_both(model, twin, opt, topt, [(X, y)] * 2)
    assert_equal_to_twin(model, twin)


def test_onnx_export_runs_in_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = _net()
    path = bnnet.export_onnx(model, str(tmp_path / "m.onnx"))
    x = np.random.default_rng(8).standard_normal((3, 3, 5, 5)).astype(np.float32)
    out = ort.InferenceSession(path).run(None, {"x": x})[0]
    np.testing.assert_allclose(out, model.predict(x), rtol=0, atol=1e-5)


def test_checkpoints_and_builders(tmp_path):
    model = _net()
    bnnet.save(str(tmp_path / "m.safetensors"), model)
    loaded = bnnet.load(str(tmp_path / "m.safetensors"))
    assert loaded.config() == model.config()
    x = np.random.default_rng(9).standard_normal((2, 3, 5, 5))
    np.testing.assert_array_equal(loaded.predict(x), model.predict(x))
    m = bnnet.mlp([4, 12, 6, 2], norm="group", seed=0)
    assert [type(l).__name__ for l in m.layers] == [
        "Linear",
        "GroupNorm",
        "ReLU",
        "Linear",
        "GroupNorm",
        "ReLU",
        "Linear",
    ]
    assert (m.layers[1].num_groups, m.layers[4].num_groups) == (6, 3) and m.layers[0].bias
    c = bnnet.convnet((1, 8, 8), channels=[4], hidden=[6], norm="group", norm_options={"num_groups": 2}, seed=0)
    assert isinstance(c.layers[1], GroupNorm) and c.layers[1].num_groups == 2
    X, y = np.random.default_rng(1).standard_normal((12, 4)), np.arange(12) % 2
    bnnet.fit(m, X, y, epochs=1, batch_size=4, progress=False)  # small batches are fine


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: GroupNorm(4, 6), HyperparameterError, "must divide num_channels"),
        (lambda: Dropout(1.0), HyperparameterError, "p must be"),
        (lambda: Dropout(0.1, seed=-1), HyperparameterError, "seed"),
        (lambda: GroupNorm(2, 4).forward(np.ones((2, 3)), True), InputError, r"\(N, 4, \.\.\.\)"),
        (lambda: GroupNorm(2, 2).forward(np.ones((2, 2)), True), InputError, "at least 2 values"),
        (lambda: InstanceNorm2d(2).forward(np.ones((2, 2)), True), InputError, "InstanceNorm2d"),
    ],
)
def test_bad_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_a_convnet_training_step_with_instance_norm_matches_torch_float64():
    from bnnet.interop import to_torch

    rng = np.random.default_rng(10)
    model = bnnet.Sequential(
        Conv2d(2, 4, 3, padding=1, dtype="float64", rng=0), InstanceNorm2d(4, affine=True, dtype="float64"), ReLU(),
        Conv2d(4, 4, 3, padding=1, dtype="float64", rng=1), GroupNorm(2, 4, dtype="float64"), ReLU(),
        Flatten(), Linear(4 * 5 * 5, 3, dtype="float64", rng=2),
    )  # fmt: skip
    twin = to_torch(model)
    X, y = rng.standard_normal((6, 2, 5, 5)), rng.integers(0, 3, 6)
    opt, topt = bnnet.optim.SGD(0.1), torch.optim.SGD(twin.parameters(), lr=0.1)
    train_both(model, twin, opt, topt, [(X, y)] * 2)
    assert_equal_to_twin(model, twin)
