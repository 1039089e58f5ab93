"""TensorBoard event files of a training run, read back and compared with fit's history."""

import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import bnnet


def read_scalars(folder):
    """{tag: [(step, value), ...]} from the event files in `folder` (TFRecord framing: length, its
    CRC, the Event proto, its CRC), parsed with tensorboardX's own protobuf definitions."""
    from tensorboardX.proto import event_pb2

    out = {}
    for path in sorted(Path(folder).glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[i + 12 : i + 12 + n])
            i += 12 + n + 4
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def test_fit_writes_the_history_learning_rate_gradients_and_running_statistics(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((90, 5))
    y = (X[:, 0] + X[:, 1] > 0).astype(int) + (X[:, 2] > 1)
    model = bnnet.mlp([5, 8, 3], seed=0)
    opt = bnnet.optim.Adam(1e-2, schedule=bnnet.optim.ExponentialDecay(0.5, 10))
    history = bnnet.fit(
        model,
        X,
        y,
        optimizer=opt,
        epochs=3,
        batch_size=16,
        seed=0,
        progress=False,
        validation_split=0.2,
        log_dir=tmp_path / "tb",
    )
    scalars = read_scalars(tmp_path / "tb")
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        steps, values = zip(*scalars[f"epoch/{key}"])
        assert list(steps) == [1, 2, 3]
        np.testing.assert_allclose(values, history[key], rtol=1e-6, err_msg=key)  # stored as float32
    lr = [v for _, v in scalars["epoch/lr"]]
    np.testing.assert_allclose(lr[-1], opt.current_lr(), rtol=1e-6)
    assert lr[0] > lr[1] > lr[2]  # the schedule decays it
    assert {f"grad_norm/{name}" for name, _, _ in model.named_parameters()} <= set(scalars)
    np.testing.assert_allclose(scalars["grad_norm/0.W"][-1][1], np.linalg.norm(model.grads["0.W"]), rtol=1e-5)
    np.testing.assert_allclose(scalars["bn/1/running_var"][-1][1], model.buffers["1.running_var"].mean(), rtol=1e-6)
    # validation_split held out the last 20% of the rows, before any shuffling
    last = bnnet.evaluate(model, X[-18:], y[-18:])
    np.testing.assert_allclose(history["val_loss"][-1], last["loss"], rtol=1e-12)


def test_validation_split_is_checked():
    X, y = np.zeros((10, 3)), np.zeros(10, int)
    with pytest.raises(bnnet.HyperparameterError, match="validation_split must be"):
        bnnet.fit(bnnet.mlp([3, 2]), X, y, validation_split=1.0, progress=False)
    with pytest.raises(bnnet.HyperparameterError, match="not both"):
        bnnet.fit(bnnet.mlp([3, 2]), X, y, validation_split=0.5, validation_data=(X, y), progress=False)
    with pytest.raises(bnnet.InputError, match="leaves 0 for validation"):
        bnnet.fit(bnnet.mlp([3, 2]), X, y, validation_split=0.01, progress=False)


def test_without_tensorboardx_the_error_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    with pytest.raises(bnnet.BnnetError, match=r'pip install "\.\[tensorboard\]"'):
        bnnet.fit(bnnet.mlp([3, 2]), np.zeros((8, 3)), np.zeros(8, int), log_dir=tmp_path, progress=False)


def test_bnnet_train_log_dir(tmp_path):
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "bnnet",
            "train",
            "--epochs",
            "2",
            "--quiet",
            "--out",
            str(tmp_path / "run"),
            "--log-dir",
            str(tmp_path / "tb"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    scalars = read_scalars(tmp_path / "tb")
    acc = float(res.stdout.split("test accuracy ")[1].split()[0])
    assert [s for s, _ in scalars["epoch/val_accuracy"]] == [1, 2]
    assert scalars["epoch/val_accuracy"][-1][1] == pytest.approx(acc, abs=1e-4)
    assert {"bn/1/running_mean", "bn/4/running_var", "grad_norm/0.W", "epoch/lr"} <= set(scalars)
