"""Bad input at the public boundary: clear errors naming the argument; awkward but valid input works."""

import subprocess
import sys

import numpy as np
import pytest

import bnnet
from bnnet.layers import BatchNorm, Linear


def test_exception_hierarchy():
    assert issubclass(bnnet.InputError, ValueError) and issubclass(bnnet.InputTypeError, TypeError)
    for cls in (
        bnnet.InputError,
        bnnet.InputTypeError,
        bnnet.HyperparameterError,
        bnnet.CheckpointError,
        bnnet.DatasetError,
        bnnet.NonFiniteError,
    ):
        assert issubclass(cls, bnnet.BnnetError)


@pytest.mark.parametrize(
    "bad,exc,match",
    [
        (
            np.array([["1", "2"], ["3", "4"]]),
            bnnet.InputTypeError,
            r"X must hold real numbers, got an array of dtype <U1",
        ),
        (np.ones((3, 2), dtype=complex), bnnet.InputTypeError, "complex128"),
        (np.array([[1.0, np.inf], [0.0, 1.0]]), bnnet.InputError, r"X contains NaN or Inf \(first at index \(0, 1\)\)"),
        (np.ones((2, 3, 1)), bnnet.InputError, r"X must be 2-D \(batch, features\), got shape \(2, 3, 1\)"),
        (np.ones((0, 2)), bnnet.InputError, "X is empty"),
    ],
)
def test_predict_rejects(bad, exc, match):
    with pytest.raises(exc, match=match):
        bnnet.mlp([2, 3, 2]).predict(bad)


def test_awkward_valid_inputs_work(rng):
    model = bnnet.mlp([4, 5, 3], seed=0)
    X = rng.standard_normal((20, 4))
    ref = model.predict(X.astype(np.float32))
    ro = X.copy()
    ro.setflags(write=False)
    big = np.zeros((20, 8))
    big[:, ::2] = X  # non-contiguous view
    for variant in (ro, big[:, ::2], np.asfortranarray(X), X.astype(np.float16).astype(np.float64), X.tolist()):
        out = model.predict(variant)
        assert out.dtype == np.float32
        np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-3)  # float16 rounds the input
    ints = model.predict(np.arange(8).reshape(2, 4))  # integers are converted to the model's dtype
    np.testing.assert_allclose(ints, model.predict(np.arange(8.0).reshape(2, 4)), rtol=1e-6)
    # fit accepts read-only, non-contiguous X and list labels
    y = [int(v) for v in rng.integers(0, 3, 20)]
    bnnet.fit(model, big[:, ::2], y, epochs=1, batch_size=5, progress=False)
    bnnet.fit(model, ro, np.asarray(y, dtype=np.uint8), epochs=1, batch_size=5, progress=False)


@pytest.mark.parametrize(
    "loss,y,match",
    [
        ("softmax_cross_entropy", np.array(["a", "b", "a", "b"]), "integer class labels, got dtype <U1"),
        ("softmax_cross_entropy", np.zeros((4, 2), dtype=int), r"1-D integer class labels \(N,\), got shape \(4, 2\)"),
        ("binary_cross_entropy", np.array([0, 1, 2, 1]), r"targets must be in \[0, 1\]"),
        ("mse", np.array([0.0, np.nan, 1.0, 2.0]), "targets contains NaN or Inf"),
    ],
)
def test_bad_targets(loss, y, match):
    X = np.ones((4, 2))
    out = 1 if loss != "softmax_cross_entropy" else 3
    with pytest.raises(bnnet.InputError, match=match):
        bnnet.fit(bnnet.mlp([2, 3, out]), X, y, loss=loss, epochs=1, progress=False)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: BatchNorm(3, decay=-0.1), r"decay must be in \[0, 1\], got -0.1"),
        (lambda: BatchNorm(3, eps=-1e-5), r"eps must be in \(0"),
        (lambda: BatchNorm(3.5), "num_features must be an integer"),
        (lambda: Linear(3, 2, init="normal", std=-1.0), r"std must be in \(0"),
        (lambda: bnnet.optim.Adam(1e-3, beta1=-0.5), r"beta1 must be in \[0, 1\)"),
        (lambda: bnnet.optim.RMSprop(1e-3, beta=1.0), r"beta must be in \[0, 1\)"),
        (lambda: bnnet.losses.get_loss("hinge"), "loss must be a Loss or one of"),
        (lambda: bnnet.backend.set_backend("gpu"), "backend must be one of"),
    ],
)
def test_hyperparameters(make, match):
    with pytest.raises(bnnet.HyperparameterError, match=match):
        make()


def test_dy_shape_is_checked():
    model = bnnet.mlp([3, 4, 2])
    model.forward(np.ones((5, 3)), train=True)
    with pytest.raises(bnnet.InputError, match=r"dy must have the shape of the last output \(5, 2\), got \(5, 3\)"):
        model.backward(np.ones((5, 3)))
    layer = BatchNorm(4)
    layer.forward(np.random.default_rng(0).standard_normal((6, 4)), train=True)
    with pytest.raises(bnnet.InputError, match=r"BatchNorm: dy must have the shape of the last output \(6, 4\)"):
        layer.backward(np.ones((6, 3)))


def test_npz_with_object_arrays_is_refused_without_unpickling(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(
        path, X_train=np.array([{"a": 1}], dtype=object), y_train=np.zeros(1), X_test=np.zeros(1), y_test=np.zeros(1)
    )
    with pytest.raises(bnnet.DatasetError, match="holds Python objects"):
        bnnet.datasets.load_npz(str(path))


def test_cli_predict_refuses_a_pickled_npy(tmp_path):
    np.save(tmp_path / "x.npy", np.array([object()], dtype=object), allow_pickle=True)
    bnnet.save(tmp_path / "m.safetensors", bnnet.mlp([2, 3, 2]))
    res = subprocess.run(
        [sys.executable, "-m", "bnnet", "predict", str(tmp_path / "m.safetensors"), str(tmp_path / "x.npy")],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 1 and "holds Python objects" in res.stderr and "Traceback" not in res.stderr
