"""Faults in training: NaN/Inf stops fit with a message naming the step and the layer; clipping."""

import numpy as np
import pytest

import bnnet
from bnnet import optim


def _data(rng, n=96, d=6, classes=3):
    X = rng.standard_normal((n, d)).astype(np.float32)
    return X, rng.integers(0, classes, n)


def test_overflowing_input_names_the_first_layer(rng):
    X, y = _data(rng)
    X[5, :] = 3e38  # finite, but x @ W overflows float32
    model = bnnet.mlp([6, 8, 3], seed=0)
    before = {k: v.copy() for k, v in model.params.items()}
    with pytest.raises(
        bnnet.NonFiniteError, match=r"at step \d+ \(epoch 1\); NaN/Inf first appears in Linear \(layer 0\)"
    ):
        bnnet.fit(model, X, y, optimizer=optim.SGD(0.1), epochs=1, batch_size=96, seed=0, progress=False)
    for k, v in before.items():  # stopped before the update: parameters untouched
        np.testing.assert_array_equal(model.params[k], v)


def test_divergence_stops_and_keeps_the_last_good_checkpoint(rng, tmp_path):
    X, y = _data(rng)
    X *= 50
    model = bnnet.mlp([6, 8, 3], activation="relu", batchnorm=False, seed=0)
    ckpt = tmp_path / "ck.safetensors"
    with pytest.raises(bnnet.NonFiniteError, match=r"the loss is (nan|inf) at step (\d+).*first appears in") as info:
        bnnet.fit(
            model,
            X,
            y,
            optimizer=optim.SGD(1e4),
            epochs=50,
            batch_size=16,
            seed=0,
            progress=False,
            checkpoint=ckpt,
            checkpoint_every=1,
        )
    step = int(info.value.args[0].split("at step ")[1].split()[0])
    good = bnnet.io.load_checkpoint(ckpt)
    assert good.metadata["fit"]["step"] == step - 1  # the last step that completed
    assert all(np.isfinite(v).all() for v in good.model.params.values())


def test_check_activations_catches_a_nan_inside(rng):
    X, y = _data(rng)
    model = bnnet.mlp([6, 8, 8, 3], activation="tanh", seed=0)
    huge = np.full_like(X, 3e38)  # finite in float32, but X @ W overflows in the first Linear
    with pytest.raises(bnnet.NonFiniteError, match=r"Linear \(layer 0\) produced NaN or Inf"):
        bnnet.fit(model, huge, y, epochs=1, progress=False, check_activations=True)
    with pytest.raises(bnnet.NonFiniteError, match=r"first appears in Linear \(layer 0\)"):
        bnnet.fit(model, huge, y, epochs=1, progress=False)
    model.params["3.W"][0, 0] = np.nan  # a corrupted weight: refused before the first step
    with pytest.raises(bnnet.NonFiniteError, match=r"holds NaN or Inf before training, in parameter 3.W"):
        bnnet.fit(model, X, y, epochs=1, progress=False)


def test_clip_grad_norm(rng):
    X, y = _data(rng)
    model = bnnet.mlp([6, 8, 3], seed=0, dtype="float64")
    loss = bnnet.losses.SoftmaxCrossEntropy()
    loss.forward(model.forward(X * 100, train=True), y)
    model.backward(loss.backward())
    raw = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in model.grads.values()))
    norm = optim.clip_grad_norm(model, 0.5)
    assert norm == pytest.approx(raw, rel=1e-12) and raw > 0.5
    after = np.sqrt(sum(np.sum(g**2) for g in model.grads.values()))
    assert after == pytest.approx(0.5, rel=1e-12)
    assert optim.clip_grad_norm(model, 10.0) == pytest.approx(0.5, rel=1e-12)  # below the bound: unchanged
    with pytest.raises(bnnet.HyperparameterError, match="max_norm must be in"):
        optim.clip_grad_norm(model, 0)
    h = bnnet.fit(bnnet.mlp([6, 8, 3], seed=0), X, y, epochs=2, clip_grad_norm=1.0, progress=False, seed=0)
    assert all(np.isfinite(h["loss"]))


def _state(model, opt):
    """Copies of everything a step changes: parameters, buffers, optimizer state and counter."""
    return (
        {k: v.copy() for k, v in model.params.items()},
        {k: v.copy() for k, v in model.buffers.items()},
        {f"{n}/{k}": np.array(v, copy=True) for n, st in opt.state.items() for k, v in st.items()},
        opt.t,
    )


def _assert_state_equal(a, b):
    for x, y in zip(a[:3], b[:3]):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)
    assert a[3] == b[3]


def _run_until_nonfinite(model, opt, X, y, path, monkeypatch):
    """fit until NonFiniteError; returns (message, [state before training and after each good step])."""
    good = [_state(model, opt)]
    after_step = bnnet.train.Checkpoints.after_step

    def record(self, run):
        after_step(self, run)
        good.append(_state(model, opt))

    monkeypatch.setattr(bnnet.train.Checkpoints, "after_step", record)
    with np.errstate(all="ignore"), pytest.raises(bnnet.NonFiniteError) as info:
        bnnet.fit(
            model,
            X,
            y,
            optimizer=opt,
            epochs=3,
            batch_size=20,
            progress=False,
            checkpoint=str(path),
            checkpoint_every=1,
        )
    return str(info.value), good


def _assert_last_good_everywhere(model, opt, good, path):
    _assert_state_equal(_state(model, opt), good[-1])
    for part in good[-1][:3]:
        assert all(np.isfinite(v).all() for v in part.values() if v.dtype.kind == "f")
    if len(good) > 1:  # a checkpoint was written after the last good step: it holds that step
        ckpt = bnnet.io.load_checkpoint(str(path))
        on_disk = (
            dict(ckpt.model.params.items()),
            dict(ckpt.model.buffers.items()),
            ckpt.optimizer_arrays,
            ckpt.optimizer_info["t"],
        )
        _assert_state_equal(on_disk, good[-1])
    else:
        assert not path.exists()


@pytest.mark.parametrize("name", ["sgd", "momentum", "rmsprop", "adam"])
@pytest.mark.parametrize("kind", ["the loss", "the update", "buffer 1.running_var"])
def test_each_kind_of_nonfinite_step_is_named_and_undone(name, kind, tmp_path, monkeypatch):
    """Made to happen at the first step, whatever the machine: logits that overflow (the loss), an
    update that overflows (a parameter), a batch variance beyond float32 (the running variance,
    while the normalized output and the loss stay finite)."""
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((60, 8)).astype(np.float32), np.arange(60) % 3
    model = bnnet.mlp([8, 16, 3], activation="relu", seed=0)
    lr = 1e308 if kind == "the update" else 1e-3
    if kind == "the loss":
        model.params["3.W"][...] = 3e38
    if kind.startswith("buffer"):
        X = X * np.float32(5e19)
    opt = bnnet.optim.OPTIMIZERS[name](lr)
    message, good = _run_until_nonfinite(model, opt, X, y, tmp_path / "ck.safetensors", monkeypatch)
    assert "at step 1 " in message and "restored to the last good step" in message, message
    assert (f"made {kind}" if kind.startswith("buffer") else kind) in message, message
    _assert_last_good_everywhere(model, opt, good, tmp_path / "ck.safetensors")


@pytest.mark.parametrize("name,lr", [("sgd", 1e4), ("momentum", 1e8), ("rmsprop", 1e20), ("adam", 1e20)])
def test_after_divergence_memory_and_disk_hold_the_last_good_step(name, lr, tmp_path, monkeypatch):
    """A learning rate that diverges after some steps (where and how depends on the machine's
    arithmetic): the model, the optimizer and the checkpoint on disk all equal the state after
    the last step that completed."""
    rng = np.random.default_rng(0)
    X, y = (rng.random((120, 8)) * 40).astype(np.float32), np.arange(120) % 3
    model = bnnet.mlp([8, 16, 3], activation="relu", seed=0)
    opt = bnnet.optim.OPTIMIZERS[name](lr)
    message, good = _run_until_nonfinite(model, opt, X, y, tmp_path / "ck.safetensors", monkeypatch)
    assert "restored to the last good step" in message, message
    _assert_last_good_everywhere(model, opt, good, tmp_path / "ck.safetensors")
