"""ONNX export: the checker passes and onnxruntime reproduces bnnet's eval outputs."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import bnnet


@pytest.fixture(scope="module")
def trained():
    X, y, Xt, yt = bnnet.datasets.load_mnist5k()
    model = bnnet.mlp([784, 32, 16, 10], activation="sigmoid", init="xavier", seed=0)
    bnnet.fit(model, X[:1000], y[:1000], epochs=2, batch_size=50, seed=0, progress=False)
    return model, Xt[:200]


@pytest.mark.parametrize("fold", [False, True])
def test_onnxruntime_matches_bnnet(trained, tmp_path, fold):
    model, Xt = trained
    path = bnnet.export_onnx(model, tmp_path / "m.onnx", fold=fold)
    proto = onnx.load(path)
    onnx.checker.check_model(proto)
    ops = [n.op_type for n in proto.graph.node]
    if fold:
        assert "BatchNormalization" not in ops and ops.count("Gemm") == 3
    else:
        assert ops == ["MatMul", "BatchNormalization", "Sigmoid", "MatMul", "BatchNormalization", "Sigmoid", "Gemm"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(["y"], {"x": Xt})[0]
    np.testing.assert_allclose(out, model.predict(Xt), rtol=1e-5, atol=1e-5)


def test_float64_and_other_activations(tmp_path, rng):
    model = bnnet.Sequential(
        bnnet.layers.Linear(5, 4, dtype="float64", rng=0),
        bnnet.layers.ReLU(),
        bnnet.layers.Linear(4, 4, bias=False, dtype="float64", rng=1),
        bnnet.layers.BatchNorm(4, dtype="float64"),
        bnnet.layers.LeakyReLU(0.3),
        bnnet.layers.Linear(4, 3, dtype="float64", rng=2),
        bnnet.layers.Tanh(),
    )
    model.forward(rng.standard_normal((16, 5)), train=True)
    X = rng.standard_normal((7, 5))
    session = ort.InferenceSession(
        str(bnnet.export_onnx(model, tmp_path / "m.onnx")), providers=["CPUExecutionProvider"]
    )
    # onnxruntime's double-precision Tanh is a fast approximation (~1e-9); the spec asks for 1e-5
    np.testing.assert_allclose(session.run(["y"], {"x": X})[0], model.predict(X), rtol=1e-7, atol=1e-8)
