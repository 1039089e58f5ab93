"""Memory safety: no array a user assigns or a file holds is read or written past its end.

Every params/buffers/grads/optimizer-state entry of every layer type gets
wrong-size, wrong-dtype, wrong-rank, non-contiguous and read-only arrays, cut
out of larger arrays filled with canary values; a train step and an eval step
then run on both backends. Each case must raise an error from bnnet.errors or
give exactly the result of a correct assignment, and no canary may change.
"""

import json
import struct
import subprocess
import sys

import numpy as np
import pytest

import bnnet
from bnnet import backend, ops
from bnnet.conv import AvgPool2d, Conv2d, Flatten, MaxPool2d
from bnnet.distributed import SingleProcess, SyncBatchNorm
from bnnet.layers import BatchNorm, Linear, ReLU, Sigmoid, Tanh
from bnnet.normalization import BatchRenorm, GhostBatchNorm, LayerNorm

CANARY = 777.0
NORMS = {
    "BatchNorm": lambda d: BatchNorm(d),
    "BatchRenorm": lambda d: BatchRenorm(d, warmup=0),
    "GhostBatchNorm": lambda d: GhostBatchNorm(d, virtual_batch_size=4),
    "LayerNorm": lambda d: LayerNorm(d),
    "SyncBatchNorm": lambda d: SyncBatchNorm(d, SingleProcess()),
}


CONV = "Conv2d+BatchNorm (N, C, H, W)"  # a conv net: the spatial kernels and the conv/pool layers


def _model(norm):
    rng = np.random.default_rng(0)
    if norm == CONV:
        return bnnet.Sequential(
            Conv2d(2, 3, 3, padding=1, bias=False, rng=rng),
            BatchNorm(3),
            ReLU(),
            MaxPool2d(2),
            Conv2d(3, 2, 1, rng=rng),
            AvgPool2d(2, padding=1),
            Flatten(),
            Linear(8, 3, rng=rng),
        )
    return bnnet.Sequential(Linear(5, 6, bias=False, rng=rng), NORMS[norm](6), Tanh(), Linear(6, 3, rng=rng))


_DATA = {}


def _data():
    rng = np.random.default_rng(1)
    return rng.standard_normal(_DATA.get("shape", (8, 5))).astype("float32"), rng.integers(0, 3, 8)


def _run(model, opt, warm=True):
    """Two train steps (the first creates the optimizer state) and an eval forward; everything they produce."""
    X, y = _data()
    loss = bnnet.losses.SoftmaxCrossEntropy()
    outs = []
    for _ in range(2 if warm else 1):
        outs.append(model.forward(X, train=True))
        loss.forward(outs[-1], y)
        model.backward(loss.backward())
        opt.step(model)
    outs.append(model.forward(X, train=False))
    return (
        outs
        + [np.array(v, np.float64) for v in model.params.values()]
        + [np.array(v, np.float64) for v in model.buffers.values()]
    )


def _canaried(value, variant):
    """(bad array holding value's numbers where it can, the canary buffer it lives in, slice of the view)."""
    value = np.asarray(value)
    n = max(value.size, 1)
    if variant == "short":
        big = np.full(n + 3, CANARY, value.dtype)
        view = big[1 : 1 + n - 1] if n > 1 else big[1:1]
        view[...] = value.reshape(-1)[: view.size]
        return view, big, slice(1, 1 + view.size)
    if variant == "long":
        big = np.full(n + 3, CANARY, value.dtype)
        view = big[1 : n + 2]
        view[:n] = value.reshape(-1)
        view[n:] = 0
        return view, big, slice(1, n + 2)
    if variant == "strided":  # same shape, every other element of a larger array
        big = np.full(2 * n + 2, CANARY, value.dtype)
        view = big[1 : 1 + 2 * n : 2][:n].reshape(value.shape) if value.ndim else big[1:2].reshape(())
        view[...] = value
        return view, big, None
    if variant == "dtype":
        other = np.float64 if value.dtype != np.float64 else np.float32
        return value.astype(other), None, None
    if variant == "rank":  # one extra leading axis
        return value.reshape((1,) + value.shape).copy(), None, None
    if variant == "readonly":
        ro = value.copy()
        ro.flags.writeable = False
        return ro, None, None
    raise AssertionError(variant)


VARIANTS = ("short", "long", "strided", "dtype", "rank", "readonly")


def _entries(model, opt):
    """(label, dict, key) for every params/buffers/grads entry of the norm layer and the Linears, and the
    optimizer state."""
    out = []
    for i, layer in enumerate(model.layers):
        for kind in ("params", "buffers", "grads"):
            for key in getattr(layer, kind):
                out.append((f"{i}.{kind}[{key}]", getattr(layer, kind), key))
    for name, st in opt.state.items():
        for key in st:
            out.append((f"opt[{name}][{key}]", st, key))
    return out


def _check_canaries(big, inside):
    if big is None:
        return
    mask = np.ones(big.size, bool)
    if inside is not None:
        mask[inside] = False
    else:
        mask[1:-1:2] = False  # strided: the view's elements
    assert (big[mask] == CANARY).all(), "a canary changed: memory outside the array was written"


@pytest.mark.parametrize("backend_name", ["numba", "numpy"])
@pytest.mark.parametrize("norm", [*NORMS, CONV])
def test_fuzz_assignments_are_refused_or_used_correctly(backend_name, norm, monkeypatch):
    monkeypatch.setitem(_DATA, "shape", (8, 2, 6, 6) if norm == CONV else (8, 5))
    with backend.using(backend_name):
        reference = None
        # a correct run: the result every accepted case must reproduce
        model, opt = _model(norm), bnnet.optim.Adam(1e-2)
        _run(model, opt, warm=True)
        labels = [label for label, _, _ in _entries(model, opt)]
        base_model, base_opt = _model(norm), bnnet.optim.Adam(1e-2)
        reference = _run(base_model, base_opt, warm=True) + _run(base_model, base_opt, warm=False)
        assert labels
        tried = refused = 0
        for label in labels:
            for variant in VARIANTS:
                model, opt = _model(norm), bnnet.optim.Adam(1e-2)
                first = _run(model, opt, warm=True)  # creates grads and optimizer state
                ((_, d, key),) = [e for e in _entries(model, opt) if e[0] == label]
                bad, big, inside = _canaried(d[key], variant)
                d[key] = bad
                tried += 1
                try:
                    result = first + _run(model, opt, warm=False)
                except bnnet.BnnetError:
                    refused += 1
                else:
                    assert len(result) == len(reference), (label, variant)
                    for a, b in zip(result, reference):
                        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, err_msg=f"{label} {variant}")
                _check_canaries(big, inside)
        assert refused > 0 and tried > refused  # both outcomes occur: the test can fail either way


def _compiled_runner(model, opt):
    """_run through one CompiledStep kept across calls (an assignment lands between its steps):
    each step's loss in place of its output, then the same eval forward and arrays."""
    X, y = _data()
    step = bnnet.compile_step(model, bnnet.losses.SoftmaxCrossEntropy(), opt)

    def run(warm=True):
        outs = [np.array(step(X, y)[0]) for _ in range(2 if warm else 1)]
        outs.append(model.forward(X, train=False))
        return (
            outs
            + [np.array(v, np.float64) for v in model.params.values()]
            + [np.array(v, np.float64) for v in model.buffers.values()]
        )

    return run


@pytest.mark.parametrize("backend_name", ["numba", "numpy"])
@pytest.mark.parametrize("norm", ["BatchNorm", "LayerNorm", CONV])
def test_fuzz_assignments_between_compiled_steps(backend_name, norm, monkeypatch):
    """The same assignments between two steps of one compiled step (which looks its arrays up once
    per batch size): each is refused with an error of bnnet.errors or gives the correct result,
    and no canary changes."""
    monkeypatch.setitem(_DATA, "shape", (8, 2, 6, 6) if norm == CONV else (8, 5))
    with backend.using(backend_name):
        model, opt = _model(norm), bnnet.optim.Adam(1e-2)
        _compiled_runner(model, opt)(warm=True)
        labels = [label for label, _, _ in _entries(model, opt)]
        base = _compiled_runner(_model(norm), bnnet.optim.Adam(1e-2))
        reference = base(warm=True) + base(warm=False)
        tried = refused = 0
        for label in labels:
            for variant in VARIANTS:
                model, opt = _model(norm), bnnet.optim.Adam(1e-2)
                run = _compiled_runner(model, opt)
                first = run(warm=True)
                ((_, d, key),) = [e for e in _entries(model, opt) if e[0] == label]
                bad, big, inside = _canaried(d[key], variant)
                d[key] = bad
                tried += 1
                try:
                    result = first + run(warm=False)
                except bnnet.BnnetError:
                    refused += 1
                else:
                    for a, b in zip(result, reference):
                        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, err_msg=f"{label} {variant}")
                _check_canaries(big, inside)
        assert refused > 0 and tried > refused


@pytest.mark.parametrize("backend_name", ["numba", "numpy"])
def test_ops_refuse_wrong_shapes_before_any_kernel_runs(backend_name):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 4)).astype("float32")
    d = 4
    good = dict(
        gamma=np.ones(d, "float32"),
        beta=np.zeros(d, "float32"),
        rm=np.zeros(d, "float32"),
        rv=np.ones(d, "float32"),
        out=np.empty_like(x),
        st=np.empty((3, d)),
    )
    with backend.using(backend_name):
        ops.bn_forward(
            x,
            good["gamma"],
            good["beta"],
            1e-5,
            ops.SIGMOID,
            0.0,
            True,
            good["rm"],
            good["rv"],
            0.9,
            1.2,
            good["out"],
            *good["st"],
        )
        for name in ("gamma", "beta", "rm", "rv"):
            big = np.full(d + 2, CANARY, "float32")
            args = dict(good, **{name: big[1:d]})  # one element short
            with pytest.raises(bnnet.InputError, match="bn_forward"):
                ops.bn_forward(
                    x,
                    args["gamma"],
                    args["beta"],
                    1e-5,
                    ops.RELU,
                    0.0,
                    True,
                    args["rm"],
                    args["rv"],
                    0.9,
                    1.2,
                    args["out"],
                    *args["st"],
                )
            assert (big[[0, d, d + 1]] == CANARY).all()
        with pytest.raises(bnnet.InputError, match="out"):
            ops.bn_forward(
                x,
                good["gamma"],
                good["beta"],
                1e-5,
                0,
                0.0,
                False,
                good["rm"],
                good["rv"],
                0.9,
                1.0,
                np.empty((5, 4), "float32"),
                *good["st"],
            )
        with pytest.raises(bnnet.InputError, match="dx"):
            ops.bn_backward(
                x,
                x,
                x,
                good["st"][0],
                good["st"][2],
                good["gamma"],
                0,
                0.0,
                True,
                np.empty((6, 3), "float32"),
                np.empty(d, "float32"),
                np.empty(d, "float32"),
            )
        # (N, C, S): the per-channel arrays must have C entries, and out/dx x's three dimensions
        x3 = rng.standard_normal((3, d, 5)).astype("float32")
        ops.bn_forward(
            x3,
            good["gamma"],
            good["beta"],
            1e-5,
            0,
            0.0,
            True,
            good["rm"],
            good["rv"],
            0.9,
            1.0,
            np.empty_like(x3),
            *good["st"],
        )
        big = np.full(d + 2, CANARY, "float32")
        with pytest.raises(bnnet.InputError, match="gamma"):
            ops.bn_forward(
                x3,
                big[1:d],
                good["beta"],
                1e-5,
                0,
                0.0,
                True,
                good["rm"],
                good["rv"],
                0.9,
                1.0,
                np.empty_like(x3),
                *good["st"],
            )
        with pytest.raises(bnnet.InputError, match="out"):
            ops.bn_forward(
                x3,
                good["gamma"],
                good["beta"],
                1e-5,
                0,
                0.0,
                True,
                good["rm"],
                good["rv"],
                0.9,
                1.0,
                np.empty((3, d, 4), "float32"),
                *good["st"],
            )
        with pytest.raises(bnnet.InputError, match="dx"):
            ops.bn_backward(
                x3,
                x3,
                x3,
                good["st"][0],
                good["st"][2],
                good["gamma"],
                0,
                0.0,
                True,
                np.empty((3, d, 6), "float32"),
                np.empty(d, "float32"),
                np.empty(d, "float32"),
            )
        with pytest.raises(bnnet.InputError, match="2-D or 3-D"):
            ops.bn_forward(
                x3[..., None],
                good["gamma"],
                good["beta"],
                1e-5,
                0,
                0.0,
                True,
                good["rm"],
                good["rv"],
                0.9,
                1.0,
                np.empty_like(x3[..., None]),
                *good["st"],
            )
        with pytest.raises(bnnet.InputError, match="at least 2 values per feature"):
            ops.bn_forward(
                x3[:1, :, :1],
                good["gamma"],
                good["beta"],
                1e-5,
                0,
                0.0,
                True,
                good["rm"],
                good["rv"],
                0.9,
                1.0,
                np.empty_like(x3[:1, :, :1]),
                *good["st"],
            )
        assert (big[[0, d, d + 1]] == CANARY).all()
        # images: the im2col matrix, its adjoint and max pooling against the sizes x implies
        img = rng.standard_normal((2, 3, 5, 5)).astype("float32")
        k, st, pd = (3, 3), (1, 1), (1, 1)
        ops.im2col(img, k, st, pd, np.empty((27, 50), "float32"))
        for bad_cols in (np.empty((27, 49), "float32"), np.empty((26, 50), "float32"), np.empty((27, 50))):
            with pytest.raises(bnnet.InputError, match="cols"):
                ops.im2col(img, k, st, pd, bad_cols)
            with pytest.raises(bnnet.InputError, match="cols"):
                ops.col2im(bad_cols, k, st, pd, np.empty_like(img))
        with pytest.raises(bnnet.InputError, match="does not fit"):
            ops.im2col(img, (7, 7), st, (0, 0), np.empty((147, 0), "float32"))
        with pytest.raises(bnnet.InputError, match="kernel must be a pair"):
            ops.im2col(img, (3, 0), st, pd, np.empty((27, 50), "float32"))
        with pytest.raises(bnnet.InputError, match="C-contiguous"):
            ops.col2im(np.empty((27, 50), "float32"), k, st, pd, np.empty((2, 3, 5, 10), "float32")[..., ::2])
        out, arg = np.empty((2, 3, 2, 2), "float32"), np.empty((2, 3, 2, 2), np.int64)
        ops.max_pool2d(img, (2, 2), (2, 2), (0, 0), out, arg)
        with pytest.raises(bnnet.InputError, match="arg"):
            ops.max_pool2d(img, (2, 2), (2, 2), (0, 0), out, np.empty((2, 3, 2, 2), np.int32))
        with pytest.raises(bnnet.InputError, match="out"):
            ops.max_pool2d(img, (2, 2), (2, 2), (0, 0), np.empty((2, 3, 3, 3), "float32"), arg)
        with pytest.raises(bnnet.InputError, match="dx"):
            ops.max_pool2d_backward(out, arg, np.empty((2, 4, 5, 5), "float32"))
        with pytest.raises(bnnet.InputError, match="arg"):
            ops.max_pool2d_backward(out, arg[:, :2], np.empty_like(img))
        with pytest.raises(bnnet.InputError, match="labels"):
            ops.softmax_cross_entropy(x, np.array([0, 1, 2, 3, 4, 5]), np.empty_like(x))
        with pytest.raises(bnnet.InputError, match="state"):
            ops.adam(np.zeros(10), np.zeros(10), np.zeros(9), np.zeros(10), 0.1, 0.9, 0.99, 1e-8, 0.1, 0.01, 0.0)
        with pytest.raises(bnnet.InputError, match="gradient"):
            ops.sgd(np.zeros(10), np.zeros(11), 0.1, 0.0)
        with pytest.raises(bnnet.InputError, match="merge_moments"):
            ops.merge_moments(np.zeros(5), np.zeros(7))
        with pytest.raises(bnnet.InputError, match="bias_activation"):
            ops.bias_activation(np.zeros((3, 4)), np.zeros(3), ops.RELU, 0.0)
        with pytest.raises(bnnet.InputError, match="copy_finite"):
            ops.copy_finite(np.zeros(10), np.zeros(9))
        with pytest.raises(bnnet.InputError, match="copy_finite"):
            ops.copy_finite(np.zeros(10, "float32"), np.zeros(10))
        with pytest.raises(bnnet.InputError, match="all_finite"):
            ops.all_finite(np.zeros(10, "int64"))


# --------------------------------------------------------------------------
# Layers that do not chain
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layers",
    [
        lambda: (Linear(4, 64, bias=False), BatchNorm(2), ReLU(), Linear(2, 3)),
        lambda: (Linear(4, 8), ReLU(), Linear(9, 3)),
        lambda: (BatchNorm(4), Linear(5, 3)),
        lambda: (Linear(4, 8, bias=False), LayerNorm(7), Sigmoid(), Linear(8, 2)),
    ],
)
def test_models_whose_layers_do_not_chain_are_refused(layers):
    with pytest.raises(bnnet.HyperparameterError, match="do not chain"):
        bnnet.Sequential(*layers())


def test_a_layer_replaced_after_building_is_checked_before_the_next_step():
    model = bnnet.mlp([4, 12, 3], seed=0)
    x = np.ones((8, 4), "float32")
    model.forward(x, True)
    model.layers[1] = BatchNorm(2)
    with pytest.raises(bnnet.HyperparameterError, match="do not chain"):
        model.forward(x, True)
    model.layers[1] = BatchNorm(12)
    assert model.forward(x, True).shape == (8, 3)


def _craft(path, meta, arrays):
    """A safetensors file with bnnet metadata, written byte by byte (bnnet.save refuses such models)."""
    header, offset, blobs = {"__metadata__": {"bnnet": json.dumps(meta)}}, 0, []
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        dtype = {"float32": "F32", "float64": "F64", "int64": "I64"}[a.dtype.name]
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        blobs.append(a.tobytes())
        offset += a.nbytes
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def test_crafted_checkpoint_whose_layers_do_not_chain_is_refused(tmp_path):
    good = bnnet.mlp([4, 12, 3], seed=0)
    path = tmp_path / "good.safetensors"
    bnnet.save(path, good)
    meta = json.loads(
        json.loads(path.read_bytes()[8 : 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]])["__metadata__"]["bnnet"]
    )
    arch = meta["architecture"]
    arch[1]["num_features"] = 4000  # a BatchNorm far wider than its Linear, with arrays to match its config
    arrays = {f"params/{k}": v for k, v in good.params.items() if not k.startswith("1.")}
    arrays.update({f"buffers/{k}": v for k, v in good.buffers.items() if not k.startswith("1.")})
    arrays.update(
        {
            "params/1.gamma": np.ones(4000, "float32"),
            "params/1.beta": np.zeros(4000, "float32"),
            "buffers/1.running_mean": np.zeros(4000, "float32"),
            "buffers/1.running_var": np.ones(4000, "float32"),
            "buffers/1.count": np.array(3, np.int64),
        }
    )
    bad = tmp_path / "bad.safetensors"
    _craft(bad, meta, arrays)
    with pytest.raises(bnnet.CheckpointError, match="do not chain"):
        bnnet.load(bad)
    np.save(tmp_path / "x.npy", np.ones((2, 4), "float32"))
    for args in (["evaluate", str(bad)], ["predict", str(bad), str(tmp_path / "x.npy")], ["recompute-stats", str(bad)]):
        proc = subprocess.run([sys.executable, "-m", "bnnet", *args], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1, (args, proc.returncode, proc.stderr)
        assert proc.stderr.count("\n") == 1 and "do not chain" in proc.stderr, proc.stderr


def test_optimizer_state_of_the_wrong_shape_is_refused_and_nothing_is_updated():
    model = bnnet.mlp([4, 6, 3], seed=0)
    X, y = np.random.default_rng(0).standard_normal((8, 4)), np.arange(8) % 3
    loss, opt = bnnet.losses.SoftmaxCrossEntropy(), bnnet.optim.Adam(1e-2)
    for _ in range(2):
        loss.forward(model.forward(X, True), y)
        model.backward(loss.backward())
        opt.step(model)
    before = {k: v.copy() for k, v in model.params.items()}
    opt.state["3.W"]["v"] = np.zeros(5, "float32")  # the last parameter checked: the others come first
    with pytest.raises(bnnet.InputError, match=r"state\['3.W'\]\['v'\].*\(6, 3\)"):
        opt.step(model)
    for k, v in model.params.items():
        np.testing.assert_array_equal(v, before[k])


# --------------------------------------------------------------------------
# Outputs the caller owns
# --------------------------------------------------------------------------


@pytest.mark.parametrize("backend_name", ["numba", "numpy"])
def test_layer_forward_twice_inside_a_model_gives_independent_arrays(backend_name):
    with backend.using(backend_name):
        model = bnnet.mlp([4, 6, 3], activation="sigmoid", seed=0)
        x1, x2 = np.ones((5, 4), "float32"), np.full((5, 4), 2.0, "float32")
        model.forward(x1, True)  # the model has built its plan and buffers
        for layer in model.layers:
            h1 = layer.forward(x1 if layer is model.layers[0] else np.ones((5, 6), "float32"), True)
            keep = h1.copy()
            layer.forward(x2 if layer is model.layers[0] else np.full((5, 6), 3.0, "float32"), True)
            np.testing.assert_array_equal(h1, keep)
        y1 = model.forward(x1, True)
        keep = y1.copy()
        model.forward(x2, True)
        np.testing.assert_array_equal(y1, keep)


def test_kernels_never_index_out_of_range_with_boundscheck(request):
    """The kernel tests again (test_backends.py and this file), compiled with NUMBA_BOUNDSCHECK=1:
    an out-of-range index raises IndexError there instead of touching memory. The run started in
    the background when the tests were collected (tests/boundscheck.py); this collects its result."""
    run = getattr(request.config, "_bnnet_boundscheck", None)
    if run is None:  # (selected in a way the collection hook did not see)
        from boundscheck import start

        run = request.config._bnnet_boundscheck = start()
    code, output = run.result()
    assert code == 0, output[-6000:]
    assert " passed" in output


def test_resume_from_a_checkpoint_with_wrong_optimizer_state_is_one_line(tmp_path):
    """bnnet train --resume with an optimizer moment of the wrong shape: one error line, exit 1."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    run = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bnnet",
            "train",
            "--epochs",
            "1",
            "--hidden",
            "8",
            "--quiet",
            "--checkpoint-every",
            "5",
            "--out",
            str(run),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    path = run / "model.safetensors"
    with safe_open(str(path), "np") as f:
        meta = f.metadata()
        arrays = {k: f.get_tensor(k) for k in f.keys()}
    key = next(k for k in arrays if k.startswith("optimizer/") and k.endswith("/m"))
    arrays[key] = np.zeros(3, arrays[key].dtype)  # a moment far smaller than its parameter
    meta_fit = json.loads(meta["bnnet"])
    meta_fit["user"]["fit"]["epoch"] = 1  # mid-run, so that training continues
    meta_fit["user"]["fit"]["batch"] = 5
    meta_fit["user"]["fit"]["step"] = 5
    save_file(arrays, str(path), metadata={"bnnet": json.dumps(meta_fit)})
    proc = subprocess.run(
        [sys.executable, "-m", "bnnet", "train", "--resume", str(run), "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert proc.stderr.count("\n") == 1 and "optimizer tensor" in proc.stderr and "(3,)" in proc.stderr, proc.stderr
