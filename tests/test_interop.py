"""PyTorch interop: round trips, eval outputs and a training step against torch."""

import numpy as np
import pytest
import torch

import bnnet
from bnnet.interop import from_torch, to_torch


def _torch_mlp(dtype=torch.float64, momentum=0.1):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 8, bias=False, dtype=dtype),
        torch.nn.BatchNorm1d(8, eps=1e-3, momentum=momentum, dtype=dtype),
        torch.nn.LeakyReLU(0.2),
        torch.nn.Linear(8, 5, bias=False, dtype=dtype),
        torch.nn.BatchNorm1d(5, dtype=dtype),
        torch.nn.Tanh(),
        torch.nn.Linear(5, 3, dtype=dtype),
    )


def _train_torch(tm, steps=3):
    rng = np.random.default_rng(1)
    for _ in range(steps):
        tm(torch.from_numpy(rng.standard_normal((16, 6))))  # running statistics move


@pytest.mark.parametrize("momentum", [0.1, None])
def test_module_round_trip_and_eval_outputs(momentum):
    tm = _torch_mlp(momentum=momentum)
    _train_torch(tm)
    model = from_torch(tm)
    assert [type(l).__name__ for l in model.layers] == [
        "Linear",
        "BatchNorm",
        "LeakyReLU",
        "Linear",
        "BatchNorm",
        "Tanh",
        "Linear",
    ]
    bn = model.layers[1]
    assert bn.eps == 1e-3 and (bn.decay == pytest.approx(0.9) if momentum else bn.decay is None)
    assert int(bn.buffers["count"]) == 3 and model.dtype == "float64"
    X = np.random.default_rng(2).standard_normal((10, 6))
    tm.eval()
    with torch.no_grad():
        expected = tm(torch.from_numpy(X)).numpy()
    np.testing.assert_allclose(model.predict(X), expected, rtol=1e-12, atol=1e-12)
    back = to_torch(model)
    for (k1, v1), (k2, v2) in zip(tm.state_dict().items(), back.state_dict().items()):
        assert k1 == k2
        np.testing.assert_array_equal(v1.numpy(), v2.numpy())
    assert back[1].momentum == momentum or back[1].momentum == pytest.approx(momentum)


def test_state_dict_and_one_training_step():
    tm = _torch_mlp()
    _train_torch(tm)
    model = from_torch(tm.state_dict(), activation="tanh", eps=1e-3)  # positions 2 and 5 become Tanh
    model.layers[2] = bnnet.layers.LeakyReLU(0.2)  # the state dict cannot know layer 2 was a LeakyReLU
    model.layers[4].eps = 1e-5  # nor the second BatchNorm's eps
    model = bnnet.Sequential(*model.layers)
    rng = np.random.default_rng(3)
    X, y = rng.standard_normal((32, 6)), rng.integers(0, 3, 32)
    tm.train()
    topt = torch.optim.SGD(tm.parameters(), lr=0.1)
    topt.zero_grad()
    torch.nn.functional.cross_entropy(tm(torch.from_numpy(X)), torch.from_numpy(y)).backward()
    topt.step()
    loss = bnnet.losses.SoftmaxCrossEntropy()
    loss.forward(model.forward(X, train=True), y)
    model.backward(loss.backward())
    bnnet.optim.SGD(0.1).step(model)
    back = to_torch(model).state_dict()
    for k, v in tm.state_dict().items():
        np.testing.assert_allclose(back[k].numpy(), v.numpy(), rtol=1e-10, atol=1e-12, err_msg=k)


def test_float32_and_errors():
    tm = _torch_mlp(dtype=torch.float32)
    model = from_torch(tm)
    assert model.dtype == "float32"
    with pytest.raises(bnnet.HyperparameterError, match="cannot convert Conv1d"):
        from_torch(torch.nn.Sequential(torch.nn.Conv1d(1, 1, 1)))
    with pytest.raises(bnnet.HyperparameterError, match="keys like '0.weight'"):
        from_torch({"fc.weight": torch.zeros(2, 2)})
    with pytest.raises(bnnet.HyperparameterError, match="running_var='biased'"):
        to_torch(bnnet.Sequential(bnnet.layers.BatchNorm(3, running_var="biased")))
