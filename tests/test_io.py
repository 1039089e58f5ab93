"""Checkpoints: round trip, optimizer state, atomic writes, and clear errors for bad files."""

import json
import os
import pickle
import warnings

import numpy as np
import pytest

import bnnet
from bnnet import optim
from bnnet.io import atomic_write, load_checkpoint


def _trained(rng, dtype="float32"):
    model = bnnet.mlp([6, 5, 4, 3], activation="tanh", seed=0, dtype=dtype)
    opt = optim.Adam(0.01)
    X, y = rng.standard_normal((40, 6)), rng.integers(0, 3, 40)
    bnnet.fit(model, X, y, optimizer=opt, epochs=2, batch_size=10, seed=0, progress=False)
    return model, opt, X


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_round_trip_gives_identical_eval_outputs(rng, tmp_path, dtype):
    model, opt, X = _trained(rng, dtype)
    path = tmp_path / "m.safetensors"
    bnnet.save(path, model, opt, loss="softmax_cross_entropy", note="hello")
    loaded = bnnet.load(path)
    np.testing.assert_array_equal(loaded.predict(X), model.predict(X))
    assert loaded.config() == model.config()
    for k in model.params:
        np.testing.assert_array_equal(loaded.params[k], model.params[k])
        assert loaded.params[k].dtype == model.params[k].dtype
    for k in model.buffers:
        np.testing.assert_array_equal(loaded.buffers[k], model.buffers[k])
    assert int(loaded.buffers["1.count"]) == 8
    assert loaded.metadata == {"loss": "softmax_cross_entropy", "note": "hello"}
    # the optimizer state comes back into a fresh optimizer
    fresh = optim.Adam(0.01)
    bnnet.load(path, optimizer=fresh)
    assert fresh.t == opt.t
    for name, st in opt.state.items():
        for k, v in st.items():
            np.testing.assert_array_equal(fresh.state[name][k], v)


def test_no_temporary_file_is_left_and_old_file_survives_a_failed_write(tmp_path):
    path = tmp_path / "ck.safetensors"
    atomic_write(path, b"first")

    with pytest.raises(TypeError):
        atomic_write(path, object())  # the write fails half way
    assert path.read_bytes() == b"first"
    assert os.listdir(tmp_path) == ["ck.safetensors"]


def test_checkpoint_is_safetensors_with_json_metadata(rng, tmp_path):
    from safetensors import safe_open

    model, opt, _ = _trained(rng)
    path = tmp_path / "m.safetensors"
    bnnet.save(path, model, opt)
    with safe_open(str(path), framework="numpy") as f:
        meta = json.loads(f.metadata()["bnnet"])
        keys = set(f.keys())
    assert meta["format"] == "bnnet-checkpoint" and meta["bnnet_version"] == bnnet.__version__
    assert meta["architecture"][1] == {
        "type": "BatchNorm",
        "num_features": 5,
        "eps": 1e-5,
        "decay": 0.9,
        "running_var": "unbiased",
        "dtype": "float32",
        "frozen": False,
    }
    assert {"params/0.W", "buffers/1.running_var", "buffers/1.count", "optimizer/0.W/m"} <= keys


@pytest.mark.parametrize(
    "content,match",
    [
        (b"", "not a valid bnnet checkpoint"),
        (b"\x00" * 3, "not a valid bnnet checkpoint"),
        (b"hello world, not a checkpoint at all", "not a valid bnnet checkpoint"),
        (pickle.dumps({"W": np.ones(3)}), "not a valid bnnet checkpoint"),
    ],
)
def test_foreign_files_are_refused(tmp_path, content, match):
    path = tmp_path / "x.safetensors"
    path.write_bytes(content)
    with pytest.raises(bnnet.CheckpointError, match=match):
        bnnet.load(path)


def test_truncated_and_other_safetensors_files_are_refused(rng, tmp_path):
    from safetensors.numpy import save_file

    model, _, _ = _trained(rng)
    good = tmp_path / "good.safetensors"
    bnnet.save(good, model)
    data = good.read_bytes()
    for cut in (10, len(data) // 2, len(data) - 1):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(bnnet.CheckpointError, match="truncated, corrupted or another program's file"):
            bnnet.load(bad)
    other = tmp_path / "other.safetensors"
    save_file({"weight": np.ones((2, 2), np.float32)}, str(other))  # valid safetensors, not ours
    with pytest.raises(bnnet.CheckpointError, match="not a valid bnnet checkpoint"):
        bnnet.load(other)
    with pytest.raises(bnnet.CheckpointError, match="no such checkpoint file"):
        bnnet.load(tmp_path / "missing.safetensors")


def test_mismatched_arrays_are_listed(rng, tmp_path):
    from safetensors.numpy import load as st_load
    from safetensors.numpy import save as st_save

    model, _, _ = _trained(rng)
    path = tmp_path / "m.safetensors"
    bnnet.save(path, model)
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8 : 8 + n])["__metadata__"]
    arrays = st_load(data)
    arrays["params/0.W"] = np.ones((5, 6), np.float32)  # wrong shape (transposed)
    del arrays["buffers/1.running_var"]  # missing
    path.write_bytes(st_save(arrays, metadata=meta))
    with pytest.raises(
        bnnet.CheckpointError,
        match=r"params 0.W: checkpoint \(5, 6\), model \(6, 5\); missing buffers 1.running_var \(5,\)",
    ):
        bnnet.load(path)


def test_load_with_optimizer_when_none_saved(rng, tmp_path):
    model, _, _ = _trained(rng)
    bnnet.save(tmp_path / "m.safetensors", model)
    with pytest.raises(bnnet.CheckpointError, match="holds no optimizer state"):
        bnnet.load(tmp_path / "m.safetensors", optimizer=optim.Adam())
    with pytest.raises(bnnet.CheckpointError, match="optimizer state is for Adam, cannot load it into SGD"):
        bnnet.save(tmp_path / "o.safetensors", model, optim.Adam())
        bnnet.load(tmp_path / "o.safetensors", optimizer=optim.SGD(0.1))


def test_bias_before_bn_checkpoint_loads_without_warning(rng, tmp_path):
    from bnnet.layers import BatchNorm, Linear

    with pytest.warns(bnnet.BiasBeforeBatchNormWarning):
        model = bnnet.Sequential(Linear(3, 2, bias=True), BatchNorm(2))
    bnnet.save(tmp_path / "m.safetensors", model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ckpt = load_checkpoint(tmp_path / "m.safetensors")
    assert ckpt.model.config() == model.config()
