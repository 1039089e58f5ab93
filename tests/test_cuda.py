"""The cuda backend's kernels against the NumPy reference, through bnnet.ops.

On a machine without a GPU they run on numba's CUDA simulator (tests/conftest.py sets
NUMBA_ENABLE_CUDASIM=1): every thread of every block runs on the CPU, so indexing, the
two-launch reductions, shared memory and the block sums are exercised for real, at small
sizes. With BNNET_TEST_GPU=1 on a machine with an NVIDIA GPU, CuPy and numba-cuda, the same
tests run on the GPU (arrays moved there with bnnet.device). test_kernels_compile_to_ptx
compiles every kernel for an H100/H200 (sm_90) with NVVM, which needs no GPU.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import bnnet
from bnnet import backend, cuda_kernels, ops
from bnnet.device import simulated, to_device, to_host

ON_GPU = not simulated()
TOL = {"float64": dict(rtol=1e-12, atol=1e-12), "float32": dict(rtol=1e-5, atol=1e-5)}
ACTS = [ops.IDENTITY, ops.RELU, ops.LEAKY_RELU, ops.SIGMOID, ops.TANH]


def dev(a):
    return to_device(a, "cuda")


def _bn(backend_name, x, da, gamma, beta, act, train, running):
    """Forward then backward through bnnet.ops with one backend; every result on the host."""
    d = gamma.shape[0]
    put = dev if backend_name == "cuda" else np.asarray
    with backend.using(backend_name):
        x_, da_, g_, b_ = put(x), put(da), put(gamma), put(beta)
        rm, rv = put(running[0].copy()), put(running[1].copy())
        out = put(np.empty_like(x))
        mean, var, inv = (put(np.empty(d)) for _ in range(3))
        ops.bn_forward(x_, g_, b_, 1e-3, act, 0.2, train, rm, rv, 0.8, 1.25, out, mean, var, inv)
        dx, dg, db = put(np.empty_like(x)), put(np.empty(d, x.dtype)), put(np.empty(d, x.dtype))
        ops.bn_backward(da_, out, x_, mean, inv, g_, act, 0.2, train, dx, dg, db)
    return [to_host(a) for a in (out, mean, var, inv, rm, rv, dx, dg, db)]


def _case(shape, dtype, seed=0):
    rng = np.random.default_rng(seed + shape[0] * 31 + shape[1])
    d = shape[1]
    bshape = (1, d) + (1,) * (len(shape) - 2)
    x = rng.standard_normal(shape) * rng.uniform(0.5, 3, bshape) + rng.standard_normal(bshape) * 2
    da = rng.standard_normal(shape)
    gamma, beta = rng.uniform(0.5, 2.0, d), rng.standard_normal(d)
    running = rng.standard_normal(d), rng.uniform(0.5, 2.0, d)
    return [a.astype(dtype) for a in (x, da, gamma, beta)], [r.astype(dtype) for r in running]


def _compare(shape, dtype, act, train):
    (x, da, gamma, beta), running = _case(shape, dtype)
    want = _bn("numpy", x, da, gamma, beta, act, train, running)
    got = _bn("cuda", x, da, gamma, beta, act, train, running)
    tol = TOL[dtype]
    n = x.size // shape[1]
    names = "out mean var inv_std running_mean running_var dx dgamma dbeta".split()
    for name, g, w in zip(names, got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        if name == "dx" and train:  # a difference of O(gamma inv_std |da|) terms: compare on that scale
            scale = np.abs(da).max() * 2.0 * np.abs(want[3]).max()
            np.testing.assert_allclose(g, w, rtol=tol["rtol"], atol=tol["atol"] * scale, err_msg=name)
        elif name in ("dgamma", "dbeta"):
            np.testing.assert_allclose(g, w, rtol=tol["rtol"], atol=tol["atol"] * n, err_msg=name)
        else:
            np.testing.assert_allclose(g, w, **tol, err_msg=name)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("act", ACTS)
def test_batchnorm_rows_match_reference(dtype, act):
    _compare((19, 40), dtype, act, True)  # 40 features: two column blocks, the second partly empty
    _compare((3, 40), dtype, act, False)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("shape", [(2, 1), (3, 5), (2, 33), (5, 3, 7), (2, 1, 1), (3, 2, 300)])
@pytest.mark.parametrize("train", [True, False])
def test_batchnorm_odd_shapes_match_reference(dtype, shape, train):
    _compare(shape, dtype, ops.SIGMOID, train)


@pytest.mark.parametrize("shape", [(100, 3), (23, 2, 5)])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_tall_inputs_reduce_over_many_chunks(monkeypatch, shape, dtype):
    """Small chunks force the partial sums of many blocks through the second launch."""
    calls = []
    real = cuda_kernels._reduce

    def spy(mode, x, *args):
        s1, s2 = real(mode, x, *args)
        calls.append(s1.shape)
        return s1, s2

    monkeypatch.setattr(cuda_kernels, "_reduce", spy)
    monkeypatch.setattr(cuda_kernels, "ROWS_PER_THREAD", 1)
    _compare(shape, dtype, ops.TANH, True)
    if shape == (100, 3):
        assert calls == [(13, 3), (13, 3)]  # 8 rows per chunk: 13 partial rows, forward and backward


def test_nan_stays_in_its_feature():
    (x, da, gamma, beta), running = _case((9, 4), "float64")
    x[3, 2] = np.nan
    out, mean, var, inv, rm, rv, dx, dg, db = _bn("cuda", x, da, gamma, beta, ops.SIGMOID, True, running)
    for a in (out, dx):
        assert np.isnan(a[:, 2]).all() and np.isfinite(np.delete(a, 2, axis=1)).all()
    for a in (mean, var, rm, rv, dg, db):
        assert np.isnan(a[2]) and np.isfinite(np.delete(a, 2)).all()


def test_strided_input_and_output():
    (x, da, gamma, beta), running = _case((20, 6), "float64")
    big = np.zeros((40, 12))
    big[::2, ::2] = x
    xs = big[::2, ::2]  # not contiguous
    with backend.using("cuda"):
        outs = []
        for src in (x, xs):
            out = dev(np.zeros((20, 12)))[:, ::2] if not ON_GPU else dev(np.zeros((20, 6)))
            m, v, i = (dev(np.empty(6)) for _ in range(3))
            rm, rv = dev(running[0].copy()), dev(running[1].copy())
            ops.bn_forward(dev(src), dev(gamma), dev(beta), 1e-5, ops.RELU, 0.0, True, rm, rv, 0.9, 1.0, out, m, v, i)
            outs.append(to_host(out))
    np.testing.assert_array_equal(outs[0], outs[1])
    want = _bn("numpy", x, da, gamma, beta, ops.RELU, True, running)[0]
    assert np.abs(outs[0] - np.maximum(want, 0)).max() < 1.0  # same sign pattern, sanity


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_sync_batchnorm_pieces_match_reference(dtype):
    (x, da, gamma, beta), _ = _case((11, 5), dtype)
    a = np.tanh(x)
    results = {}
    for name in ("numpy", "cuda"):
        put = dev if name == "cuda" else np.asarray
        with backend.using(name):
            mean, m2, sg, sgx = (put(np.empty(5)) for _ in range(4))
            ops.bn_moments(put(x), mean, m2)
            inv = put(1.0 / np.sqrt(to_host(m2) / 11 + 1e-5))
            ops.bn_grad_sums(put(da), put(a), put(x), mean, inv, ops.TANH, 0.0, sg, sgx)
            dx = put(np.empty_like(x))
            ops.bn_grad_dx(put(da), put(a), put(x), mean, inv, put(gamma), ops.TANH, 0.0, sg, sgx, 22.0, dx)
            packed = [put(np.concatenate([[3.0], np.arange(5.0), np.ones(5)])) for _ in range(2)]
            b = put(np.concatenate([[4.0], np.arange(5.0) + 1, 2 * np.ones(5)]))
            ops.merge_moments(packed[0], b)
            rm, rv = put(np.zeros(5, dtype)), put(np.ones(5, dtype))
            ops.update_running(rm, rv, mean, put(to_host(m2) / 11), 0.7, 11 / 10)
            results[name] = [to_host(v) for v in (mean, m2, sg, sgx, dx, b, rm, rv)]
    for g, w in zip(results["cuda"], results["numpy"]):
        np.testing.assert_allclose(g, w, rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"] * 20)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_loss_bias_and_updates_match_reference(dtype):
    rng = np.random.default_rng(4)
    logits = (rng.standard_normal((13, 7)) * 5).astype(dtype)
    labels = rng.integers(0, 7, 13)
    z, b = rng.standard_normal((9, 4)).astype(dtype), rng.standard_normal(4).astype(dtype)
    p, g = rng.standard_normal(300).astype(dtype), rng.standard_normal(300).astype(dtype)
    s1, s2 = rng.uniform(0, 1, 300).astype(dtype), rng.uniform(0, 1, 300).astype(dtype)
    results = {}
    for name in ("numpy", "cuda"):
        put = dev if name == "cuda" else (lambda a: np.array(a))
        with backend.using(name):
            d = put(np.empty_like(logits))
            loss = ops.softmax_cross_entropy(put(logits), put(labels), d)
            zz = put(z)
            ops.bias_activation(zz, put(b), ops.LEAKY_RELU, 0.1)
            params = [put(p) for _ in range(4)]
            state = [put(s) for s in (s1, s1, s1, s2)]
            ops.sgd(params[0], put(g), 0.1, 0.01)
            ops.momentum(params[1], put(g), state[0], 0.1, 0.9, 0.0)
            ops.rmsprop(params[2], put(g), state[1], 0.1, 0.9, 1e-8, 0.01)
            ops.adam(params[3], put(g), state[2], state[3], 0.1, 0.9, 0.999, 1e-8, 0.1, 0.001, 0.0)
            results[name] = [np.array(loss), to_host(d), to_host(zz)] + [to_host(a) for a in params + state]
    names = "loss dlogits z p_sgd p_momentum p_rmsprop p_adam v s m v_adam".split()
    for name, g_, w in zip(names, results["cuda"], results["numpy"]):
        np.testing.assert_allclose(g_, w, **TOL[dtype], err_msg=name)


def test_bad_label_and_nonfinite_values():
    with backend.using("cuda"):
        logits = dev(np.zeros((4, 3)))
        with pytest.raises(bnnet.InputError, match=r"labels must be in \[0, 3\)"):
            ops.softmax_cross_entropy(logits, dev(np.array([0, 1, 3, 2])), dev(np.zeros((4, 3))))
        src = np.arange(700.0)
        dst = dev(np.zeros(700))
        assert ops.copy_finite(dev(src), dst) and ops.all_finite(dev(src))
        np.testing.assert_array_equal(to_host(dst), src)
        for bad in (np.nan, np.inf, -np.inf):
            src[613] = bad
            assert not ops.copy_finite(dev(src), dst)
            assert not ops.all_finite(dev(src))


def test_wrong_shapes_are_refused_before_a_kernel_runs():
    with backend.using("cuda"):
        x, out = dev(np.zeros((4, 3))), dev(np.zeros((4, 3)))
        per = [dev(np.ones(3)) for _ in range(4)]  # gamma, beta, running_mean, running_var
        stats = [dev(np.empty(3)) for _ in range(3)]
        with pytest.raises(bnnet.InputError, match=r"gamma must be float64 of shape \(3,\)"):
            ops.bn_forward(x, dev(np.ones(2)), per[1], 1e-5, 0, 0.0, True, per[2], per[3], 0.9, 1.0, out, *stats)
        with pytest.raises(bnnet.InputError, match=r"out must be float64 of shape \(4, 3\)"):
            ops.bn_forward(x, *per[:2], 1e-5, 0, 0.0, True, *per[2:], 0.9, 1.0, dev(np.zeros((5, 3))), *stats)
        with pytest.raises(bnnet.InputError, match=r"x must be a 2-D or 3-D float32/float64 array"):
            ops.bn_forward(dev(np.zeros(3)), *per[:2], 1e-5, 0, 0.0, True, *per[2:], 0.9, 1.0, out, *stats)


def test_fit_on_cuda_backend_equals_cpu():
    """Under the simulator the device arrays have their own type, which the cuda backend requires:
    this also shows that no layer, loss or optimizer hands a host array to a kernel."""
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((48, 6)), rng.integers(0, 3, 48)
    histories, params, predictions = [], [], []
    for device in ("cpu", "cuda"):
        model = bnnet.mlp([6, 5, 3], activation="tanh", dtype="float64", seed=1)
        histories.append(
            bnnet.fit(
                model, X, y, optimizer="adam", epochs=2, batch_size=16, seed=2, device=device, progress=False,
                validation_data=(X[:10], y[:10]),
            )
        )  # fmt: skip
        assert model.device == device
        assert (backend.get_backend() == "cuda") == (device == "cuda")
        predictions.append(model.predict(X[:7]))
        assert type(predictions[-1]) is np.ndarray  # back on the host
        params.append({k: to_host(v) for k, v in model.params.items()})
        model.to("cpu")
    assert backend.get_backend() in ("numba", "numpy")
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        np.testing.assert_allclose(histories[1][key], histories[0][key], rtol=1e-10, err_msg=key)
    np.testing.assert_allclose(predictions[1], predictions[0], rtol=1e-9)
    for k in params[0]:
        np.testing.assert_allclose(params[1][k], params[0][k], rtol=1e-9, atol=1e-12)


def test_checkpoint_from_cuda_model_loads_on_cpu(tmp_path):
    model = bnnet.mlp([4, 3, 2], seed=0).to("cuda")
    try:
        assert model.device == "cuda"
        bnnet.save(tmp_path / "m.safetensors", model)
    finally:
        model.to("cpu")
    loaded = bnnet.load(tmp_path / "m.safetensors")
    assert loaded.device == "cpu"
    for k, v in model.params.items():
        np.testing.assert_array_equal(loaded.params[k], to_host(v))


def test_device_names_are_checked():
    model = bnnet.mlp([4, 3, 2], seed=0)
    with pytest.raises(bnnet.HyperparameterError, match="device must be 'cpu' or 'cuda', got 'gpu'"):
        model.to("gpu")
    with pytest.raises(bnnet.HyperparameterError, match="fit: device must be"):
        bnnet.fit(model, np.zeros((4, 4)), np.zeros(4, int), device=3, progress=False)


@pytest.mark.skipif(ON_GPU, reason="a machine with a GPU has what is missing here")
def test_without_a_gpu_the_cuda_backend_says_what_is_missing():
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "0", "BNNET_BACKEND": "cuda"}
    code = "import bnnet, bnnet.backend as b; b.get_backend()"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 1
    assert "the cuda backend needs an NVIDIA GPU: " in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "bnnet", "train", "--device", "cuda", "--epochs", "1"],
        env={**env, "BNNET_BACKEND": ""},
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "needs an NVIDIA GPU" in r.stderr


def test_kernels_compile_to_ptx():
    """Every kernel, with each dtype it runs on, compiled by NVVM for sm_90 (no GPU needed)."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    script = os.path.join(os.path.dirname(__file__), "cuda_ptx.py")
    r = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "compiled" in r.stdout


@pytest.mark.skipif(ON_GPU, reason="on a GPU, scripts/gpu_check.sh runs the benchmark itself")
def test_gpu_benchmark_harness_runs_on_the_simulator(tmp_path):
    """benchmarks/gpu.py end to end on the simulator: workers, pooling, targets, gpu.json and gpu.md."""
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "gpu.py")
    r = subprocess.run(
        [sys.executable, script, "--simulate", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert result["simulated"] and result["machine"]["gpu"] == "numba CUDA simulator"
    assert [(r["shape"], r["act"]) for r in result["rows"]] == [([8, 4], "identity"), ([8, 4], "sigmoid")]
    assert all(r["median_s"]["bnnet"] > 0 for r in result["rows"])
    assert "| 8x4 | sigmoid |" in (tmp_path / "gpu.md").read_text()


IMAGE_CASES = [((3, 3), (1, 1), (1, 1)), ((2, 2), (2, 2), (0, 0)), ((3, 2), (2, 1), (1, 0))]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("kernel, stride, padding", IMAGE_CASES)
def test_image_kernels_match_reference(dtype, kernel, stride, padding):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 3, 5, 6)).astype(dtype)
    x[1, 2, 2, 3] = np.nan  # a NaN wins its max-pool windows and stays
    x[0, 1, :2, :2] = 1.5  # ties: the first maximum, row by row
    ho, wo = ((s + 2 * p - k) // st + 1 for s, k, st, p in zip(x.shape[2:], kernel, stride, padding))
    cols_shape = (3 * kernel[0] * kernel[1], 2 * ho * wo)
    dcols = rng.standard_normal(cols_shape).astype(dtype)
    dy = rng.standard_normal((2, 3, ho, wo)).astype(dtype)
    pool = 2 * max(padding) <= min(kernel)  # max pooling allows padding up to half the kernel
    results = {}
    for name in ("numpy", "cuda"):
        put = dev if name == "cuda" else np.asarray
        with backend.using(name):
            cols = put(np.empty(cols_shape, dtype))
            ops.im2col(put(x), kernel, stride, padding, cols)
            dx = put(np.empty_like(x))
            ops.col2im(put(dcols), kernel, stride, padding, dx)
            got = [cols, dx]
            if pool:
                out, arg = put(np.empty((2, 3, ho, wo), dtype)), put(np.empty((2, 3, ho, wo), np.int64))
                ops.max_pool2d(put(x), kernel, stride, padding, out, arg)
                dxp = put(np.full_like(x, 7.0))  # overwritten
                ops.max_pool2d_backward(put(dy), arg, dxp)
                got += [out, arg, dxp]
            results[name] = [to_host(a) for a in got]
    for g, w in zip(results["cuda"], results["numpy"]):
        np.testing.assert_allclose(g, w, **TOL[dtype])


def test_convnet_fit_on_cuda_equals_cpu():
    rng = np.random.default_rng(1)
    X, y = rng.standard_normal((8, 1, 6, 6)), rng.integers(0, 3, 8)
    losses, params = [], []
    for device in ("cpu", "cuda"):
        model = bnnet.convnet(in_shape=(1, 6, 6), channels=(2,), hidden=(4,), classes=3, dtype="float64", seed=0)
        history = bnnet.fit(model, X, y, optimizer="sgd", epochs=1, batch_size=4, seed=0, device=device,
                            progress=False)  # fmt: skip
        losses.append(history["loss"])
        params.append({k: to_host(v) for k, v in model.params.items()})
        model.to("cpu")
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-10)
    for k in params[0]:
        np.testing.assert_allclose(params[1][k], params[0][k], rtol=1e-9, atol=1e-12, err_msg=k)


def test_sync_batchnorm_on_one_rank_equals_cpu():
    """SyncBatchNorm's forward and backward (global moments, the sums allreduce) on the device, with
    a communicator of one rank: the same training as on the CPU."""
    from bnnet.distributed import SingleProcess, sync_batchnorm

    rng = np.random.default_rng(2)
    X, y = rng.normal(2.0, 3.0, (24, 5)), rng.integers(0, 3, 24)
    params = []
    for device in ("cpu", "cuda"):
        model = sync_batchnorm(bnnet.mlp([5, 4, 3], activation="sigmoid", dtype="float64", seed=3), SingleProcess())
        bnnet.fit(model, X, y, optimizer="momentum", epochs=1, batch_size=8, seed=0, device=device, progress=False)
        params.append({k: to_host(v) for k, v in {**model.params, **model.buffers}.items()})
        model.to("cpu")
    for k in params[0]:
        np.testing.assert_allclose(params[1][k], params[0][k], rtol=1e-10, atol=1e-12, err_msg=k)


def _mlp_with(norm, **options):
    return lambda: bnnet.mlp([5, 4, 3], norm=norm, norm_options=options or None, dtype="float64", seed=0)


def _bn_without(**options):
    from bnnet.layers import BatchNorm, Linear, ReLU

    return lambda: bnnet.Sequential(
        Linear(5, 4, bias=False, dtype="float64", rng=0),
        BatchNorm(4, dtype="float64", **options),
        ReLU(),
        Linear(4, 3, dtype="float64", rng=1),
    )


def _avg_pool_net():
    from bnnet.conv import AvgPool2d, Conv2d, GlobalAvgPool2d
    from bnnet.layers import BatchNorm, Linear, ReLU

    return bnnet.Sequential(
        Conv2d(1, 2, 3, padding=1, bias=False, dtype="float64", rng=0),
        BatchNorm(2, dtype="float64"),
        ReLU(),
        AvgPool2d(2),
        Conv2d(2, 2, 3, dtype="float64", rng=1),
        GlobalAvgPool2d(),
        Linear(2, 3, dtype="float64", rng=2),
    )


VARIANTS = {
    "renorm": (_mlp_with("renorm"), (24, 5)),
    "ghost": (_mlp_with("ghost", virtual_batch_size=4), (24, 5)),
    "layernorm": (_mlp_with("layer"), (8, 5)),  # (small: the simulator runs 256 threads for each sample)
    "affine=False": (_bn_without(affine=False), (24, 5)),
    "track_running_stats=False": (_bn_without(track_running_stats=False), (24, 5)),
    "avg pools": (_avg_pool_net, (8, 1, 6, 6)),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_normalization_variants_and_pools_train_on_cuda_as_on_cpu(name):
    make, shape = VARIANTS[name]
    rng = np.random.default_rng(1)
    X, y = rng.normal(1.0, 2.0, shape), rng.integers(0, 3, shape[0])
    params = []
    for device in ("cpu", "cuda"):
        model = make()
        bnnet.fit(model, X, y, optimizer="sgd", epochs=1, batch_size=8 if shape[0] > 8 else 4, seed=0,
                  device=device, progress=False)  # fmt: skip
        params.append({k: to_host(v) for k, v in {**model.params, **model.buffers}.items()})
        model.to("cpu")
    for k in params[0]:
        np.testing.assert_allclose(params[1][k], params[0][k], rtol=1e-10, atol=1e-12, err_msg=k)


def test_a_host_array_put_into_a_model_on_the_device_is_refused():
    """Layers check their arrays with the backend's array types (as ops does): a NumPy parameter or buffer
    in a model on the GPU is refused before a kernel runs, and so is a host gradient array (replaced)."""
    model = bnnet.mlp([4, 3, 2], seed=0).to("cuda")
    try:
        X = np.ones((5, 4), "float32")
        model.forward(X, train=True)  # a host batch is copied to the device
        model.layers[1].buffers["running_mean"] = np.zeros(3, "float32")  # a host array, right shape and dtype
        with pytest.raises(bnnet.InputError, match=r"running_mean.*got float32 array of shape \(3,\)"):
            model.forward(X, train=True)
        model.layers[1].buffers["running_mean"] = bnnet.device.to_device(np.zeros(3, "float32"), "cuda")
        model.layers[0].grads["W"] = np.zeros((4, 3), "float32")  # host: replaced by the device's view
        loss = bnnet.losses.SoftmaxCrossEntropy()
        loss.forward(model.forward(X, train=True), bnnet.device.to_device(np.arange(5) % 2, "cuda"))
        model.backward(loss.backward())
        assert bnnet.device.device_of(model.layers[0].grads["W"]) == "cuda"
    finally:
        model.to("cpu")


@pytest.mark.skipif(ON_GPU, reason="the simulator's device arrays; on a GPU they are CuPy's")
def test_simulated_device_arrays_are_not_host_arrays():
    """As CuPy's arrays: NumPy's functions and operators keep them on the device and share memory
    as NumPy's views do, while a host array mixed in, or an implicit copy to the host, is a TypeError."""
    from bnnet.device import SimulatedDeviceArray

    host = np.arange(6.0).reshape(2, 3)
    d = dev(host)
    assert not isinstance(d, np.ndarray) and isinstance(d, SimulatedDeviceArray)
    for result in (d + 1, d * d, np.exp(d), d.T, d[0], d[0, 1], d.sum(), np.empty_like(d), np.concatenate([d, d])):
        assert type(result) is SimulatedDeviceArray
    view = d.reshape(-1)
    view[4] = 40.0
    assert to_host(d)[1, 1] == 40.0 and type(to_host(d)) is np.ndarray
    np.multiply(d, 2.0, out=d)
    np.testing.assert_array_equal(to_host(d), np.array([[0.0, 2, 4], [6, 80, 10]]))
    for implicit in (
        lambda: np.asarray(d),
        lambda: d + host,
        lambda: np.add(host, d),
        lambda: d.__setitem__(slice(None), host),
        lambda: np.concatenate([d, host]),
        lambda: np.multiply(d, 2.0, out=host),
    ):
        with pytest.raises(TypeError):
            implicit()


def test_a_host_array_reaching_a_cuda_kernel_is_refused():
    """Below bnnet.ops' checks too: a kernel launched with one host argument fails, as it would on a GPU."""
    (x, da, gamma, beta), running = _case((6, 4), "float64")
    args = [dev(a) for a in (x, gamma, beta)] + [1e-5, ops.RELU, 0.0, True, dev(running[0]), dev(running[1]), 0.9]
    args += [1.0, dev(np.empty_like(x))] + [dev(np.empty(4)) for _ in range(3)]
    with backend.using("cuda"):
        cuda_kernels.bn_forward(*args)  # every array on the device: runs
        for position in (0, 1, 11, 14):
            bad = list(args)
            bad[position] = to_host(bad[position])
            with pytest.raises(TypeError, match=rf"bn_forward got a host array .*argument {position}"):
                cuda_kernels.bn_forward(*bad)
            with pytest.raises(bnnet.InputError, match=r"is on the cpu device, but the cuda backend runs on the cuda"):
                ops.bn_forward(*bad)


def test_out_arrays_on_the_device():
    """A layer's out= takes an array of the backend's type: a device array on the GPU, not a host one."""
    model = bnnet.mlp([4, 3, 2], dtype="float64", seed=0).to("cuda")
    try:
        bn, x = model.layers[1], dev(np.random.default_rng(0).standard_normal((5, 3)))
        bn.forward(x, train=True)  # running statistics that saw a batch
        out = dev(np.full((5, 3), np.nan))
        assert bn.forward(x, train=False, out=out) is out
        np.testing.assert_array_equal(to_host(out), to_host(bn.forward(x, train=False)))
        wanted = r"out must be a writable float64 array of shape \(5, 3\), got float64 array"
        with pytest.raises(bnnet.InputError, match=wanted):
            bn.forward(x, train=False, out=np.empty((5, 3)))
    finally:
        model.to("cpu")
