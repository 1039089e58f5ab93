"""Interop cases found by differential testing against PyTorch: LayerNorm, dtype of tensor-less
BatchNorm, the BatchNorm rank of a model that starts with one, frozen BatchNorm, the variants
torch lacks, and N-D input to models that start with BatchNorm."""

import warnings

import numpy as np
import pytest

import bnnet
from bnnet.conv import Conv2d, Flatten
from bnnet.errors import HyperparameterError
from bnnet.layers import BatchNorm, Linear
from bnnet.normalization import BatchRenorm, GhostBatchNorm, LayerNorm

torch = pytest.importorskip("torch")
from bnnet.interop import from_torch, to_torch  # noqa: E402


def test_layernorm_converts_both_ways():
    model = bnnet.Sequential(
        Linear(3, 5, dtype="float64", rng=0), LayerNorm(5, dtype="float64"), Linear(5, 2, dtype="float64", rng=1)
    )
    model.params["1.gamma"] = np.linspace(0.5, 2, 5)
    twin = to_torch(model)
    assert isinstance(twin[1], torch.nn.LayerNorm)
    x = np.random.default_rng(0).standard_normal((4, 3))
    np.testing.assert_allclose(model.forward(x, True), twin(torch.tensor(x)).detach().numpy(), rtol=0, atol=1e-12)
    assert from_torch(twin).config() == model.config()


def test_tensorless_batchnorm_takes_the_models_dtype():
    twin = torch.nn.Sequential(
        torch.nn.Linear(3, 4, bias=False, dtype=torch.float64),
        torch.nn.BatchNorm1d(4, affine=False, track_running_stats=False, dtype=torch.float64),
        torch.nn.Linear(4, 2, dtype=torch.float64),
    )
    model = from_torch(twin)
    assert model.layers[1].dtype == "float64"
    x = np.random.default_rng(1).standard_normal((6, 3))
    np.testing.assert_allclose(
        model.forward(x, True), twin.train()(torch.tensor(x)).detach().numpy(), rtol=0, atol=1e-12
    )


def test_batchnorm_first_takes_its_rank_from_the_input_shape_or_the_next_layer():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        alone = bnnet.Sequential(BatchNorm(2, dtype="float64"))
    assert isinstance(to_torch(alone, input_shape=(2, 3, 4, 4))[0], torch.nn.BatchNorm3d)
    images = bnnet.Sequential(BatchNorm(3), Conv2d(3, 4, 3, padding=1, rng=0), Flatten(), Linear(4 * 5 * 5, 2, rng=1))
    twin = to_torch(images)
    assert isinstance(twin[0], torch.nn.BatchNorm2d)
    X = np.random.default_rng(2).random((6, 3, 5, 5)).astype(np.float32)
    np.testing.assert_allclose(
        images.forward(X, True), twin.train()(torch.tensor(X)).detach().numpy(), rtol=0, atol=1e-5
    )
    # predict and evaluate take the images a BatchNorm-first model is given
    assert images.input_shape == (3, None, None)
    assert images.predict(X).shape == (6, 2)
    assert bnnet.evaluate(images, X, np.arange(6) % 2)["accuracy"] is not None
    with pytest.raises(HyperparameterError, match="gives 3 channels"):
        bnnet.Sequential(BatchNorm(3), Linear(4, 2))


def test_what_torch_cannot_express_is_refused_in_one_line():
    for norm in (BatchRenorm(4), GhostBatchNorm(4, virtual_batch_size=2)):
        with pytest.raises(HyperparameterError, match=f"torch has no {type(norm).__name__}"):
            to_torch(bnnet.Sequential(Linear(3, 4, bias=False), norm))
    model = bnnet.Sequential(Linear(3, 4, bias=False), BatchNorm(4))
    bnnet.freeze_batchnorm(model)
    with pytest.raises(HyperparameterError, match="frozen by freeze_batchnorm"):
        to_torch(model)
