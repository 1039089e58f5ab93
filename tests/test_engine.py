"""The execution plan (bnnet.engine) and the thread policy (bnnet.threads)."""

import numpy as np
import pytest

import bnnet
from bnnet import backend, engine, threads
from bnnet.layers import BatchNorm, Linear, ReLU, Sigmoid, Tanh
from bnnet.normalization import BatchRenorm, LayerNorm


def _models():
    rng = np.random.default_rng(0)
    yield bnnet.mlp([6, 8, 7, 3], activation="sigmoid", seed=0, dtype="float64")
    yield bnnet.mlp([6, 8, 3], activation="relu", batchnorm=False, seed=1, dtype="float64")
    yield bnnet.Sequential(
        Linear(6, 8, bias=False, rng=rng, dtype="float64"),
        BatchNorm(8, dtype="float64"),
        BatchRenorm(8, dtype="float64"),
        Tanh(),
        LayerNorm(8, dtype="float64"),
        ReLU(),
        Linear(8, 3, rng=rng, dtype="float64"),
    )
    yield bnnet.Sequential(BatchNorm(6, dtype="float64"), Sigmoid(), Linear(6, 3, rng=rng, dtype="float64"))


@pytest.mark.parametrize("backend_name", ["numba", "numpy"])
@pytest.mark.parametrize("index", range(4))
def test_plan_equals_the_layers_run_one_by_one(backend_name, index):
    """Fusion, buffer reuse and in-place dx change no number: the plan's outputs, dx, grads and
    running statistics equal those of calling each layer's public forward/backward in turn."""
    x = np.random.default_rng(2).standard_normal((9, 6))
    dy = np.random.default_rng(3).standard_normal((9, 3))
    with backend.using(backend_name):
        model, ref = list(_models())[index], list(_models())[index]
        for _ in range(2):  # twice: the second step reuses the plan's buffers
            y = model.forward(x, train=True)
            dx = model.backward(dy, input_grad=True)
            h = x
            for layer in ref.layers:
                h = layer.forward(h, True)
            g = dy
            for layer in reversed(ref.layers):
                g = layer.backward(g)
            np.testing.assert_allclose(y, h, rtol=0, atol=1e-12)
            np.testing.assert_allclose(dx, g, rtol=0, atol=1e-12)
            for kind in ("grads", "buffers"):
                for k, v in getattr(ref, kind).items():
                    np.testing.assert_allclose(getattr(model, kind)[k], v, rtol=0, atol=1e-12, err_msg=k)


def test_both_backends_run_one_schedule():
    model = bnnet.mlp([4, 5, 5, 2], activation="tanh", seed=0)
    names = {}
    for name in ("numba", "numpy"):
        with backend.using(name):
            names[name] = [step.name for step in model.plan().steps]
    assert names["numba"] == names["numpy"]
    assert names["numba"][1] == "BatchNorm (layer 1) + Tanh (layer 2)"


def test_a_second_backward_needs_a_new_forward():
    model = bnnet.mlp([4, 5, 2], seed=0)
    model.forward(np.ones((3, 4)), train=True)
    model.backward(np.ones((3, 2)))
    with pytest.raises(bnnet.InputError, match="backward was already called"):
        model.backward(np.ones((3, 2)))


def test_public_layer_out_arguments():
    rng = np.random.default_rng(0)
    x, dy = rng.standard_normal((7, 5)).astype("float32"), rng.standard_normal((7, 5)).astype("float32")
    bn = BatchNorm(5)
    y_new = bn.forward(x, True)
    dx_new = bn.backward(dy)
    bn2 = BatchNorm(5)
    out, dx_out = np.empty_like(x), np.empty_like(x)
    assert bn2.forward(x, True, out=out) is out
    assert bn2.backward(dy, out=dx_out) is dx_out
    np.testing.assert_array_equal(out, y_new)
    np.testing.assert_array_equal(dx_out, dx_new)
    with pytest.raises(bnnet.InputError, match="out must be"):
        bn2.forward(x, True, out=np.empty((7, 4), "float32"))
    with pytest.raises(bnnet.InputError, match="out must be"):
        Sigmoid().forward(x, True, out=np.empty((7, 5), "float64"))


def test_set_num_threads_is_validated_and_bounds_the_blas():
    before = threads.get_num_threads()
    with pytest.raises(bnnet.HyperparameterError, match="n must be an integer >= 1"):
        bnnet.set_num_threads(0)
    with pytest.raises(bnnet.HyperparameterError):
        bnnet.set_num_threads(1.5)
    try:
        bnnet.set_num_threads(1)
        assert bnnet.get_num_threads() == 1
        model = bnnet.mlp([64, 256, 10], seed=0)
        model.predict(np.ones((2048, 64)))  # 2048 * 64 * 256 multiply-adds: a large product
        for lib, _ in threads._controllers():
            assert lib.num_threads == 1
    finally:
        bnnet.set_num_threads(before)


def test_small_products_run_on_one_blas_thread_and_large_on_all():
    if not threads._controllers():
        pytest.skip("no BLAS that threadpoolctl can drive")
    model = bnnet.mlp([64, 32, 10], seed=0)
    model.forward(np.ones((8, 64)), train=True)  # 8 * 64 * 32: small
    assert all(lib.num_threads == 1 for lib, _ in threads._controllers())
    model.predict(np.ones((2048, 64)), batch_size=2048)  # 2048 * 64 * 32 = 2^22 < 2^23: still small
    assert all(lib.num_threads == 1 for lib, _ in threads._controllers())
    big = bnnet.Sequential(Linear(512, 512))
    big.predict(np.ones((1024, 512)))  # 1024 * 512 * 512 = 2^28: large
    assert all(lib.num_threads == min(threads.get_num_threads(), most) for lib, most in threads._controllers())


def test_check_chain_reports_per_sample_shapes():
    shapes = engine.check_chain([Linear(3, 4), BatchNorm(4), ReLU(), Linear(4, 2)])
    assert shapes == [((3,), (4,)), ((4,), (4,)), ((4,), (4,)), ((4,), (2,))]
