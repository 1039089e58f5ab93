"""Flat parameter buffers (bnnet.flat) and the optimizers' one-call update over them.

The flat update must give the same numbers as the per-parameter one (bitwise: the same kernel runs
on the same values, only in fewer calls), views must stay views through assignments, load,
set_state and device moves, and AdamW must equal PyTorch's.
"""

import copy

import numpy as np
import pytest
import torch
from helpers import train_both

import bnnet
from bnnet import backend, optim

RULES = {
    "sgd": lambda: optim.SGD(0.1),
    "sgd+wd": lambda: optim.SGD(0.1, weight_decay=0.01),
    "momentum+wd": lambda: optim.Momentum(0.1, weight_decay=0.02),
    "rmsprop": lambda: optim.RMSprop(0.01),
    "adam": lambda: optim.Adam(0.01),
    "adam+wd": lambda: optim.Adam(0.01, weight_decay=0.01),
    "adamw": lambda: optim.AdamW(0.01, weight_decay=0.1),
    "adamw all params": lambda: optim.AdamW(0.01, weight_decay=0.1, decay_names=("W", "b", "gamma", "beta")),
}


def _grads_step(model, X, y):
    loss = bnnet.losses.SoftmaxCrossEntropy()
    loss.forward(model.forward(X, train=True), y)
    model.backward(loss.backward())


def _unflatten_grads(model):
    """Replace every gradient by a copy outside the flat buffer: the optimizer then takes its per-parameter path."""
    for layer in model.layers:
        for k, g in list(layer.grads.items()):
            layer.grads[k] = g.copy()


@pytest.mark.parametrize("backend_name", ["numba", "numpy"])
@pytest.mark.parametrize("rule", list(RULES))
def test_the_flat_update_equals_the_per_parameter_update_bitwise(rule, backend_name):
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((16, 6)), rng.integers(0, 3, 16)
    with backend.using(backend_name):
        flat_model = bnnet.mlp([6, 8, 5, 3], activation="tanh", seed=1, dtype="float64")
        loose_model = copy.deepcopy(flat_model)
        loose_model.flat_layout()  # (laid out now: a layout made later adopts the gradients it finds)
        flat_opt, loose_opt = RULES[rule](), RULES[rule]()
        for _ in range(3):
            _grads_step(flat_model, X, y)
            flat_opt.step(flat_model)
            _grads_step(loose_model, X, y)
            _unflatten_grads(loose_model)
            loose_opt.step(loose_model)
            assert flat_opt._flat is not None and loose_opt._flat is None  # each took the path meant
            _unflatten_grads(loose_model)
        for name in flat_model.params:
            np.testing.assert_array_equal(flat_model.params[name], loose_model.params[name], err_msg=name)
        for name, st in flat_opt.state.items():
            for key, value in st.items():
                np.testing.assert_array_equal(value, loose_opt.state[name][key], err_msg=f"{name}/{key}")


def test_parameters_gradients_and_state_are_views_into_one_buffer():
    model = bnnet.mlp([5, 7, 3], seed=0)
    group = model.flat_layout().groups[0]
    assert group.size == sum(p.size for p in model.params.values())
    for p in model.params.values():
        assert np.shares_memory(p, group.params)
    assert len(model.grads) == 0  # no gradient before the first backward
    X, y = np.ones((4, 5), "float32"), np.arange(4) % 3
    opt = optim.Adam(1e-2)
    _grads_step(model, X, y)
    opt.step(model)
    for g in model.grads.values():
        assert np.shares_memory(g, group.grads)
    for st in opt.state.values():
        assert any(np.shares_memory(st["m"], flat["m"]) for flat in opt._flat[1])
    # weights first: weight decay on W is one run of the buffer
    names = [name for name, *_ in group.entries]
    assert names == ["0.W", "3.W", "1.gamma", "1.beta", "3.b"]


def test_views_stay_views_through_assignment_load_and_set_state(tmp_path):
    model = bnnet.mlp([4, 6, 3], seed=0)
    layout = model.flat_layout()
    model.params["0.W"] = np.zeros((4, 6))
    assert model.flat_layout() is layout and not model.params["0.W"].any()
    path = tmp_path / "m.safetensors"
    bnnet.save(path, model)
    loaded = bnnet.load(path)
    group = loaded.flat_layout().groups[0]
    assert all(np.shares_memory(p, group.params) for p in loaded.params.values())
    copied = copy.deepcopy(model)
    copied_group = copied.flat_layout().groups[0]
    assert all(np.shares_memory(p, copied_group.params) for p in copied.params.values())
    assert not np.shares_memory(copied_group.params, layout.groups[0].params)


def test_views_stay_views_through_device_moves():
    """model.to(device) lays the flat buffers out on the new device, parameters and gradients views
    into them there (on numba's CUDA simulator here, whose device arrays are not NumPy arrays)."""
    from bnnet.device import device_of, simulated

    if not simulated():
        pytest.skip("the simulated device; on a GPU tests/test_cuda.py runs the device moves")
    model = bnnet.mlp([4, 6, 3], dtype="float64", seed=0)
    values = {k: v.copy() for k, v in model.params.items()}
    X, y = bnnet.device.to_device(np.ones((4, 4)), "cuda"), np.arange(4) % 3
    try:
        model.to("cuda")
        group = model.flat_layout().groups[0]
        assert device_of(group.params) == "cuda" and not isinstance(group.params, np.ndarray)
        assert all(np.shares_memory(p, group.params) for p in model.params.values())
        _grads_step(model, X, bnnet.device.to_device(y, "cuda"))
        assert all(np.shares_memory(g, group.grads) for g in model.grads.values())
    finally:
        model.to("cpu")
    group = model.flat_layout().groups[0]
    assert all(type(p) is np.ndarray and np.shares_memory(p, group.params) for p in model.params.values())
    for k, v in values.items():
        np.testing.assert_array_equal(model.params[k], v)  # the moves copy the values both ways


def test_a_replaced_parameter_is_laid_out_again_with_its_values():
    model = bnnet.mlp([4, 6, 3], seed=0)
    old = model.flat_layout()
    new_w = np.full((4, 6), 0.5, "float32")
    model.layers[0].params["W"] = new_w  # the dict entry itself, not a copy into the view
    layout = model.flat_layout()
    assert layout is not old
    assert np.shares_memory(model.layers[0].params["W"], layout.groups[0].params)
    np.testing.assert_array_equal(model.params["0.W"], new_w)


def test_step_counts_that_differ_fall_back_to_the_per_parameter_path():
    model = bnnet.mlp([4, 6, 3], seed=0, dtype="float64")
    X, y = np.ones((4, 4)), np.arange(4) % 3
    opt = optim.Adam(1e-2)
    _grads_step(model, X, y)
    opt.step(model.layers[0])  # one layer alone: its W has one more update than the rest
    opt.step(model)
    assert int(opt.state["W"]["k"]) == 1 and int(opt.state["0.W"]["k"]) == 1
    _grads_step(model, X, y)
    opt.state["3.b"]["k"] = np.int64(5)
    before = model.params["3.b"].copy()
    opt.step(model)  # counts 2 and 6: parameter by parameter, each with its own bias correction
    assert int(opt.state["3.b"]["k"]) == 6 and int(opt.state["0.W"]["k"]) == 2
    assert not np.array_equal(before, model.params["3.b"])


def test_adamw_matches_torch():
    rng = np.random.default_rng(3)
    model = bnnet.mlp([10, 8, 6, 4], activation="relu", seed=2, dtype="float64")
    from bnnet.interop import to_torch

    tmodel = to_torch(model)
    decay = [m.weight for m in tmodel if isinstance(m, torch.nn.Linear)]
    rest = [p for p in tmodel.parameters() if all(p is not d for d in decay)]
    opt = optim.AdamW(0.01, beta1=0.8, beta2=0.99, eps=1e-7, weight_decay=0.3)
    topt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.3}, {"params": rest, "weight_decay": 0.0}],
        lr=0.01,
        betas=(0.8, 0.99),
        eps=1e-7,
    )
    batches = [(rng.standard_normal((12, 10)), rng.integers(0, 4, 12)) for _ in range(5)]
    train_both(model, tmodel, opt, topt, batches)
    tparams = list(tmodel.parameters())
    for (name, p, _), t in zip(model.named_parameters(), tparams):
        t = t.detach().numpy()
        np.testing.assert_allclose(p, t.T if name.endswith("W") else t, rtol=1e-10, atol=1e-12, err_msg=name)
    # and it is not Adam with L2: the same run with Adam(weight_decay=0.3) ends elsewhere
    other = bnnet.mlp([10, 8, 6, 4], activation="relu", seed=2, dtype="float64")
    adam = optim.Adam(0.01, beta1=0.8, beta2=0.99, eps=1e-7, weight_decay=0.3)
    for X, y in batches:
        _grads_step(other, X, y)
        adam.step(other)
    assert np.abs(other.params["0.W"] - model.params["0.W"]).max() > 1e-4


def test_adamw_round_trips_through_checkpoints_and_the_cli_names_it(tmp_path):
    model = bnnet.mlp([4, 5, 3], seed=0)
    opt = optim.get_optimizer("adamw", lr=2e-3)
    assert isinstance(opt, optim.AdamW) and opt.weight_decay == 0.01
    X, y = np.ones((6, 4), "float32"), np.arange(6) % 3
    _grads_step(model, X, y)
    opt.step(model)
    bnnet.save(tmp_path / "c.safetensors", model, opt)
    ckpt = bnnet.io.load_checkpoint(tmp_path / "c.safetensors")
    loaded = optim.optimizer_from_info(ckpt.optimizer_info)
    loaded.load_state_dict(ckpt.optimizer_arrays, ckpt.optimizer_info)
    assert type(loaded) is optim.AdamW and loaded.weight_decay == 0.01 and loaded.t == 1
    np.testing.assert_array_equal(loaded.state["0.W"]["m"], opt.state["0.W"]["m"])
    with pytest.raises(bnnet.HyperparameterError, match="optimizer must be None or a bnnet.optim Optimizer"):
        bnnet.load(tmp_path / "c.safetensors", optimizer=True)


@pytest.mark.parametrize(
    "bad, match",
    [
        ("abc", "must be a writable C-contiguous float32/float64 array, got str"),
        ([1, 2], "got list"),
        (None, "got nothing"),
        (np.zeros((4, 6), int), "got int64 array"),
        (np.zeros((2, 2), "float32"), r"the gradient of '0.W' has shape \(4, 6\), the parameter \(2, 2\)"),
    ],
)
def test_a_parameter_replaced_by_something_else_is_named_by_the_optimizer(bad, match):
    """What cannot be laid out flat is left where it is, for the per-parameter checks to name; a
    gradient of another shape is not adopted into the new layout."""
    model = bnnet.mlp([4, 6, 3], seed=0)
    _grads_step(model, np.ones((5, 4), "float32"), np.arange(5) % 3)
    before = {k: v.copy() for k, v in model.params.items() if k != "0.W"}
    model.layers[0].params["W"] = bad
    with pytest.raises(bnnet.InputError, match=match):
        optim.SGD(0.1).step(model)
    for k, v in before.items():
        np.testing.assert_array_equal(model.params[k], v, err_msg=k)
