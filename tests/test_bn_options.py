"""BatchNorm's affine=False and track_running_stats=False (PyTorch's names), reset_running_stats()
and reset_parameters(): finite differences, PyTorch, both backends, checkpoints, interop, ONNX,
folding."""

import warnings

import numpy as np
import pytest
import torch
from helpers import check_layer_gradients

import bnnet
from bnnet import backend
from bnnet.interop import from_torch, to_torch
from bnnet.layers import BatchNorm, Linear, ReLU

OPTIONS = [(False, True), (True, False), (False, False)]  # (affine, track_running_stats)


def _layer(affine, track, dtype="float64", seed=0):
    bn = BatchNorm(4, dtype=dtype, affine=affine, track_running_stats=track, decay=0.8)
    rng = np.random.default_rng(seed)
    if affine:
        bn.params["gamma"][...] = rng.uniform(0.5, 2, 4)
        bn.params["beta"][...] = rng.normal(size=4)
    if track:
        bn.buffers["running_mean"][...] = rng.normal(size=4)
        bn.buffers["running_var"][...] = rng.uniform(0.5, 2, 4)
        bn.buffers["count"][...] = 3
    return bn


def _torch_bn(layer):
    return to_torch(bnnet.Sequential(layer))[0]


@pytest.mark.parametrize("affine,track", OPTIONS)
def test_params_and_buffers_follow_the_options(affine, track):
    bn = _layer(affine, track)
    assert sorted(bn.params) == (["beta", "gamma"] if affine else [])
    assert sorted(bn.buffers) == (["count", "running_mean", "running_var"] if track else [])
    with pytest.raises(bnnet.HyperparameterError, match="track_running_stats"):
        BatchNorm(4, frozen=True, track_running_stats=False)


@pytest.mark.parametrize("affine,track", OPTIONS)
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("name", ["numba", "numpy"])
def test_gradients_by_finite_differences(affine, track, train, name):
    bn = _layer(affine, track)
    x = np.random.default_rng(1).normal(size=(6, 4)) * 3 + 1
    with backend.using(name), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_layer_gradients(bn, x, train, np.random.default_rng(2))


@pytest.mark.parametrize("affine,track", OPTIONS)
@pytest.mark.parametrize("name", ["numba", "numpy"])
def test_matches_pytorch_in_train_and_eval_mode(affine, track, name):
    """Outputs, dx, gamma/beta grads and running statistics after two train steps, then eval."""
    rng = np.random.default_rng(3)
    bn = _layer(affine, track)
    ref = _torch_bn(_layer(affine, track))
    with backend.using(name):
        for step in range(2):
            x, dy = rng.normal(size=(8, 4)) * 2 + step, rng.normal(size=(8, 4))
            xt = torch.tensor(x, requires_grad=True)
            ref.train()
            yt = ref(xt)
            yt.backward(torch.tensor(dy))
            np.testing.assert_allclose(bn.forward(x, True), yt.detach().numpy(), rtol=0, atol=1e-10)
            np.testing.assert_allclose(bn.backward(dy), xt.grad.numpy(), rtol=0, atol=1e-10)
            if affine:
                np.testing.assert_allclose(bn.grads["gamma"], ref.weight.grad.numpy(), rtol=0, atol=1e-10)
                np.testing.assert_allclose(bn.grads["beta"], ref.bias.grad.numpy(), rtol=0, atol=1e-10)
                ref.weight.grad = ref.bias.grad = None
        if track:
            np.testing.assert_allclose(bn.buffers["running_mean"], ref.running_mean.numpy(), rtol=0, atol=1e-12)
            np.testing.assert_allclose(bn.buffers["running_var"], ref.running_var.numpy(), rtol=0, atol=1e-12)
        ref.eval()
        x = rng.normal(size=(5, 4))
        np.testing.assert_allclose(bn.forward(x, False), ref(torch.tensor(x)).detach().numpy(), rtol=0, atol=1e-10)


def test_without_running_statistics_eval_mode_uses_the_batch_and_needs_two_rows():
    bn = _layer(True, False)
    x = np.random.default_rng(4).normal(size=(6, 4))
    np.testing.assert_array_equal(bn.forward(x, False), bn.forward(x, True))
    with pytest.raises(bnnet.InputError, match="a batch of 1 row"):
        bn.forward(x[:1], False)


def test_reset_running_stats_and_parameters():
    bn = _layer(True, True)
    bn.reset_running_stats()
    np.testing.assert_array_equal(bn.buffers["running_mean"], 0)
    np.testing.assert_array_equal(bn.buffers["running_var"], 1)
    assert int(bn.buffers["count"]) == 0
    assert not np.all(bn.params["gamma"] == 1)  # parameters kept
    bn.reset_parameters()
    np.testing.assert_array_equal(bn.params["gamma"], 1)
    np.testing.assert_array_equal(bn.params["beta"], 0)
    _layer(False, False).reset_parameters()  # nothing to reset: no error


@pytest.mark.parametrize("affine,track", OPTIONS)
def test_models_with_the_options_train_save_load_export_and_convert(affine, track, tmp_path):
    import onnxruntime as ort

    rng = np.random.default_rng(5)
    X, y = rng.normal(size=(60, 6)).astype(np.float32), np.arange(60) % 3
    model = bnnet.Sequential(
        Linear(6, 5, bias=False, rng=0),
        BatchNorm(5, affine=affine, track_running_stats=track),
        ReLU(),
        Linear(5, 3, rng=1),
    )
    bnnet.fit(model, X, y, epochs=2, batch_size=10, seed=0, progress=False, checkpoint=str(tmp_path / "m.safetensors"))
    expected = model.predict(X)
    loaded = bnnet.load(tmp_path / "m.safetensors")
    assert loaded.layers[1].config() == model.layers[1].config()
    np.testing.assert_array_equal(loaded.predict(X), expected)
    # ONNX: onnxruntime gives the eval outputs (batch statistics of the whole input when not tracking)
    session = ort.InferenceSession(
        str(bnnet.export_onnx(model, tmp_path / "m.onnx")), providers=["CPUExecutionProvider"]
    )
    np.testing.assert_allclose(session.run(None, {"x": X})[0], model.forward(X, False), rtol=1e-4, atol=1e-5)
    # PyTorch, both ways
    module = to_torch(model).eval()
    np.testing.assert_allclose(module(torch.tensor(X)).detach().numpy(), model.forward(X, False), rtol=1e-4, atol=1e-5)
    back = from_torch(module)
    assert back.layers[1].config() == {**model.layers[1].config(), "decay": back.layers[1].decay}
    np.testing.assert_allclose(back.forward(X, False), model.forward(X, False), rtol=1e-6, atol=1e-6)
    # folding needs running statistics
    if track:
        np.testing.assert_allclose(bnnet.fold_batchnorm(model).predict(X), expected, rtol=1e-4, atol=1e-5)
    else:
        with pytest.raises(bnnet.HyperparameterError, match="keeps no running statistics"):
            bnnet.fold_batchnorm(model)


def test_a_tensorless_layer_loads_and_a_huge_claim_does_not(tmp_path):
    model = bnnet.Sequential(BatchNorm(4, affine=False, track_running_stats=False))
    bnnet.save(tmp_path / "m.safetensors", model)
    assert bnnet.load(tmp_path / "m.safetensors").layers[0].num_features == 4
    import json
    import struct

    data = (tmp_path / "m.safetensors").read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    meta = json.loads(header["__metadata__"]["bnnet"])
    meta["architecture"][0]["num_features"] = 10**9
    header["__metadata__"]["bnnet"] = json.dumps(meta)
    text = json.dumps(header).encode()
    (tmp_path / "huge.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n :])
    with pytest.raises(bnnet.CheckpointError, match="num_features = 1000000000"):
        bnnet.load(tmp_path / "huge.safetensors")


# --------------------------------------------------------------------------
# N-D input: (N, C, L), (N, C, H, W), (N, C, D, H, W), and channels last
# --------------------------------------------------------------------------

LAYOUTS = [
    ((5, 3, 4), torch.nn.BatchNorm1d),
    ((4, 3, 5, 2), torch.nn.BatchNorm2d),
    ((2, 3, 4, 3, 2), torch.nn.BatchNorm3d),
]


@pytest.mark.parametrize("shape,torch_cls", LAYOUTS, ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("name", ["numba", "numpy"])
def test_nd_input_matches_pytorch_batchnorm_1d_2d_3d(shape, torch_cls, name):
    rng = np.random.default_rng(6)
    bn = BatchNorm(3, dtype="float64", decay=0.9)
    ref = torch_cls(3, dtype=torch.float64)
    with torch.no_grad():
        ref.weight.copy_(torch.tensor(rng.uniform(0.5, 2, 3)))
        ref.bias.copy_(torch.tensor(rng.normal(size=3)))
    bn.params["gamma"][...] = ref.weight.detach().numpy()
    bn.params["beta"][...] = ref.bias.detach().numpy()
    with backend.using(name):
        for step in range(2):
            x, dy = rng.normal(size=shape) * 2 + step, rng.normal(size=shape)
            xt = torch.tensor(x, requires_grad=True)
            yt = ref(xt)
            yt.backward(torch.tensor(dy))
            np.testing.assert_allclose(bn.forward(x, True), yt.detach().numpy(), rtol=0, atol=1e-10)
            np.testing.assert_allclose(bn.backward(dy), xt.grad.numpy(), rtol=0, atol=1e-10)
            np.testing.assert_allclose(bn.grads["gamma"], ref.weight.grad.numpy(), rtol=0, atol=1e-10)
            np.testing.assert_allclose(bn.grads["beta"], ref.bias.grad.numpy(), rtol=0, atol=1e-10)
            ref.weight.grad = ref.bias.grad = None
        np.testing.assert_allclose(bn.buffers["running_mean"], ref.running_mean.numpy(), rtol=0, atol=1e-12)
        np.testing.assert_allclose(bn.buffers["running_var"], ref.running_var.numpy(), rtol=0, atol=1e-12)
        ref.eval()
        x = rng.normal(size=shape)
        np.testing.assert_allclose(bn.forward(x, False), ref(torch.tensor(x)).detach().numpy(), rtol=0, atol=1e-10)


def test_nd_gradients_by_finite_differences():
    bn = _layer(True, True)
    x = np.random.default_rng(7).normal(size=(3, 4, 2, 3)) * 2 + 1
    check_layer_gradients(bn, x, True, np.random.default_rng(8))


def test_channels_last_equals_channels_first_transposed():
    rng = np.random.default_rng(9)
    x, dy = rng.normal(size=(4, 3, 5, 2)), rng.normal(size=(4, 3, 5, 2))
    first, last = BatchNorm(3, dtype="float64"), BatchNorm(3, dtype="float64", axis=-1)
    to_last = (0, 2, 3, 1)
    np.testing.assert_allclose(
        last.forward(x.transpose(to_last), True), first.forward(x, True).transpose(to_last), rtol=0, atol=1e-12
    )
    np.testing.assert_allclose(
        last.backward(dy.transpose(to_last)), first.backward(dy).transpose(to_last), rtol=0, atol=1e-12
    )
    np.testing.assert_allclose(last.grads["gamma"], first.grads["gamma"], rtol=0, atol=1e-12)
    out = np.empty((4, 5, 2, 3))
    assert last.forward(x.transpose(to_last), False, out=out) is out
    assert BatchNorm(3, axis=-1).config()["axis"] == -1 and "axis" not in BatchNorm(3).config()


def test_nd_shapes_that_do_not_fit_are_refused():

    bn = BatchNorm(3)
    with pytest.raises(bnnet.InputError, match="must have 3 channels on axis 1"):
        bn.forward(np.zeros((4, 5, 6)), True)
    with pytest.raises(bnnet.InputError, match=r"must be \(N, C\), \(N, C, L\)"):
        bn.forward(np.zeros((2, 3, 2, 2, 2, 2)), True)
    bn.forward(np.random.default_rng(0).normal(size=(4, 3, 5)), True)
    with pytest.raises(bnnet.InputError, match=r"dy must have the shape of the last output \(4, 3, 5\)"):
        bn.backward(np.zeros((4, 3, 6)))
    with pytest.raises(bnnet.HyperparameterError, match="axis must be 1 .* or -1 .*, got 0"):
        BatchNorm(4, axis=0)


@pytest.mark.parametrize("kw", [{"center": False}, {"scale": False}, {"affine": False, "center": True}])
def test_center_and_scale_apart(kw, tmp_path):
    """Keras's center/scale: one of beta, gamma learned, the other fixed; saved, converted and exported."""
    torch = pytest.importorskip("torch")
    from helpers import assert_equal_to_twin, check_layer_gradients, train_both

    from bnnet.interop import to_torch
    from bnnet.layers import BatchNorm, Linear, ReLU

    rng = np.random.default_rng(0)
    bn = BatchNorm(4, dtype="float64", **kw)
    learned = {"gamma"} if bn.scale else {"beta"}
    assert set(bn.params) == learned and not bn.affine
    check_layer_gradients(BatchNorm(4, dtype="float64", **kw), rng.standard_normal((6, 4)), True, rng)
    model = bnnet.Sequential(
        Linear(3, 4, bias=False, dtype="float64", rng=0), bn, ReLU(), Linear(4, 2, dtype="float64", rng=1)
    )
    twin = to_torch(model)
    X, y = rng.standard_normal((8, 3)), rng.integers(0, 2, 8)
    opt, topt = bnnet.optim.SGD(0.1), torch.optim.SGD([p for p in twin.parameters() if p.requires_grad], lr=0.1)
    train_both(model, twin, opt, topt, [(X, y)] * 2)
    assert_equal_to_twin(model, twin)
    bnnet.save(str(tmp_path / "m.safetensors"), model)
    loaded = bnnet.load(str(tmp_path / "m.safetensors"))
    assert (loaded.layers[1].center, loaded.layers[1].scale) == (bn.center, bn.scale)
    np.testing.assert_array_equal(loaded.predict(X), model.predict(X))
    ort = pytest.importorskip("onnxruntime")
    path = bnnet.export_onnx(model, str(tmp_path / "m.onnx"))
    out = ort.InferenceSession(path).run(None, {"x": X})[0]
    np.testing.assert_allclose(out, model.predict(X), rtol=0, atol=1e-12)
    folded = bnnet.fold_batchnorm(model)
    np.testing.assert_allclose(folded.predict(X), model.predict(X), rtol=0, atol=1e-12)
