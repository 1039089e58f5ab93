"""The compiled step (bnnet.step) against the layer-by-layer path it replaces.

It runs the same functions in the same order, so the numbers must agree bit for bit (float64 and
float32): every builder configuration it takes, each optimizer with and without weight decay, both
CPU backends; fit with it equals fit without it; what it cannot take is named, and fit then runs
the interpreted step; assignments between steps are caught or laid out again, as between
interpreted steps.
"""

import copy

import numpy as np
import pytest

import bnnet
from bnnet import backend, optim
from bnnet.dropout import Dropout
from bnnet.errors import HyperparameterError, InputError
from bnnet.step import compilable, compile_step
from bnnet.train import Step

OPTIMIZERS = {
    "sgd": lambda: optim.SGD(0.1),
    "momentum+wd": lambda: optim.Momentum(0.1, weight_decay=1e-3),
    "rmsprop": lambda: optim.RMSprop(1e-2),
    "adam+wd": lambda: optim.Adam(1e-2, weight_decay=1e-2),
    "adamw": lambda: optim.AdamW(1e-2),
}


def _assert_same(a, b):
    for name in a.params:
        np.testing.assert_array_equal(a.params[name], b.params[name], err_msg=name)
    for name in a.buffers:
        np.testing.assert_array_equal(a.buffers[name], b.buffers[name], err_msg=name)
    for name in a.grads:
        np.testing.assert_array_equal(a.grads[name], b.grads[name], err_msg=name)


CONFIGS = [
    dict(activation=a, norm=n, dtype=d)
    for a in ("relu", "sigmoid", "tanh", "leaky_relu")
    for n in ("batch", "none")
    for d in ("float64", "float32")
]


@pytest.mark.parametrize("backend_name", ["numba", "numpy"])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(c.values()))
def test_compiled_step_equals_the_layers_bitwise(config, backend_name):
    rng = np.random.default_rng(0)
    with backend.using(backend_name):
        for opt_name, make in OPTIMIZERS.items():
            ours = bnnet.mlp([6, 9, 7, 4], seed=3, **config)
            theirs = copy.deepcopy(ours)
            loss_fn = bnnet.losses.SoftmaxCrossEntropy()
            step = compile_step(ours, bnnet.losses.SoftmaxCrossEntropy(), make(), batch_size=12)
            opt = make()
            for t in range(4):
                n = 12 - 3 * t  # smaller batches use the first rows of the buffers
                X, y = rng.standard_normal((n, 6)), rng.integers(0, 4, n)
                loss, acc = step(X, y)
                expected = loss_fn.forward(theirs.forward(X, train=True), y)
                assert acc == loss_fn.accuracy(theirs._last_logits, y)
                theirs.backward(loss_fn.backward())
                opt.step(theirs)
                assert loss == expected, (opt_name, t)
            _assert_same(ours, theirs)
            for name, st in opt.state.items():
                for key, value in st.items():
                    np.testing.assert_array_equal(step.optimizer.state[name][key], value, err_msg=f"{name}/{key}")


def _with_dropout(dtype):
    L = bnnet.layers
    return bnnet.Sequential(
        L.Linear(6, 9, bias=False, dtype=dtype, rng=0), L.BatchNorm(9, dtype=dtype), L.ReLU(), Dropout(0.3, seed=1),
        L.Linear(9, 7, dtype=dtype, rng=1), L.Tanh(), Dropout(0.2, seed=2), L.Linear(7, 4, dtype=dtype, rng=2),
    )  # fmt: skip


NORM_MODELS = {
    "renorm": lambda d: bnnet.mlp(
        [6, 9, 7, 4], norm="renorm", norm_options={"r_max": 1.5, "d_max": 0.5}, seed=3, dtype=d
    ),
    "ghost": lambda d: bnnet.mlp([6, 9, 7, 4], norm="ghost", norm_options={"virtual_batch_size": 4}, seed=3, dtype=d),
    "layer": lambda d: bnnet.mlp([6, 9, 7, 4], norm="layer", activation="sigmoid", seed=3, dtype=d),
    "group": lambda d: bnnet.mlp([6, 9, 6, 4], norm="group", norm_options={"num_groups": 3}, seed=3, dtype=d),
    "dropout": _with_dropout,
}


@pytest.mark.parametrize("backend_name", ["numba", "numpy"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", list(NORM_MODELS))
def test_other_norms_and_dropout_compiled_equal_the_layers_bitwise(name, dtype, backend_name):
    """Batch Renorm, Ghost BN, LayerNorm, GroupNorm (through their own _forward/_backward) and Dropout."""
    rng = np.random.default_rng(1)
    with backend.using(backend_name):
        ours = NORM_MODELS[name](dtype)
        theirs = copy.deepcopy(ours)
        assert compilable(ours, bnnet.losses.SoftmaxCrossEntropy()) is None
        step = compile_step(ours, bnnet.losses.SoftmaxCrossEntropy(), optim.Adam(1e-2), batch_size=12)
        opt, loss_fn = optim.Adam(1e-2), bnnet.losses.SoftmaxCrossEntropy()
        for t in range(4):
            n = 12 - 2 * t
            X, y = rng.standard_normal((n, 6)), rng.integers(0, 4, n)
            loss, _ = step(X, y)
            expected = loss_fn.forward(theirs.forward(X, train=True), y)
            theirs.backward(loss_fn.backward())
            opt.step(theirs)
            assert loss == expected, t
        _assert_same(ours, theirs)


@pytest.fixture(autouse=True)
def _keep_logits(monkeypatch):
    """Record the logits each Sequential.forward returns, so that the accuracy can be compared."""
    original = bnnet.Sequential.forward

    def forward(self, x, train, *args, **kwargs):
        out = original(self, x, train, *args, **kwargs)
        self._last_logits = out
        return out

    monkeypatch.setattr(bnnet.Sequential, "forward", forward)


@pytest.mark.parametrize("loss", ["mse", "binary_cross_entropy"])
def test_other_losses_give_the_same_numbers(loss):
    rng = np.random.default_rng(1)
    ours = bnnet.mlp([5, 8, 1], activation="tanh", seed=0, dtype="float64")
    theirs = copy.deepcopy(ours)
    loss_fn = bnnet.losses.get_loss(loss)
    step = compile_step(ours, bnnet.losses.get_loss(loss), optim.Adam(1e-2))
    opt = optim.Adam(1e-2)
    for _ in range(3):
        X, y = rng.standard_normal((10, 5)), rng.integers(0, 2, 10).astype(float)
        loss_value, _ = step(X, y)
        expected = loss_fn.forward(theirs.forward(X, train=True), y)
        theirs.backward(loss_fn.backward())
        opt.step(theirs)
        assert loss_value == expected
    _assert_same(ours, theirs)


def test_fit_with_the_compiled_step_equals_fit_without_it(monkeypatch):
    X, y, _, _ = bnnet.datasets.load_mnist5k()
    X, y = X[:600], y[:600]
    used = []
    original = Step.__call__

    def spy(self, *args):
        used.append(self.compiled is not None)
        return original(self, *args)

    monkeypatch.setattr(Step, "__call__", spy)
    fast = bnnet.mlp([784, 32, 10], activation="sigmoid", seed=0)
    slow = copy.deepcopy(fast)
    h1 = bnnet.fit(fast, X, y, optimizer=optim.Adam(3e-3), epochs=2, batch_size=64, seed=0, progress=False)
    assert used and all(used)  # the compiled step ran
    monkeypatch.setattr("bnnet.train.compilable", lambda *a: "forced off for this test")
    used.clear()
    h2 = bnnet.fit(slow, X, y, optimizer=optim.Adam(3e-3), epochs=2, batch_size=64, seed=0, progress=False)
    assert used and not any(used)
    assert h1 == h2
    _assert_same(fast, slow)


def _conv_avg(dtype):
    from bnnet.conv import AvgPool2d, Conv2d, Flatten, GlobalAvgPool2d

    L = bnnet.layers
    return bnnet.Sequential(
        Conv2d(1, 3, 3, padding=1, bias=False, dtype=dtype, rng=0), L.BatchNorm(3, dtype=dtype), L.Tanh(),
        AvgPool2d(2), Conv2d(3, 4, 3, dtype=dtype, rng=1), GlobalAvgPool2d(), Flatten(),
        L.Linear(4, 3, dtype=dtype, rng=2),
    )  # fmt: skip


PREFIX_MODELS = {  # layers before the blocks the step runs itself: they run through their own plan
    "convnet": lambda d: bnnet.convnet((1, 8, 8), channels=(2, 3), hidden=(5,), classes=3, dtype=d, seed=0),
    "convnet, no hidden": lambda d: bnnet.convnet((1, 8, 8), channels=(2,), hidden=(), classes=3, dtype=d, seed=1),
    "avg pools": _conv_avg,
    "BatchNorm first": lambda d: bnnet.Sequential(
        bnnet.layers.BatchNorm(4, dtype=d),
        bnnet.layers.Linear(4, 6, bias=False, dtype=d, rng=0),
        bnnet.layers.BatchNorm(6, dtype=d),
        bnnet.layers.ReLU(),
        bnnet.layers.Linear(6, 3, dtype=d, rng=1),
    ),  # fmt: skip
    "Dropout first": lambda d: bnnet.Sequential(Dropout(0.3, seed=4), bnnet.layers.Linear(4, 3, dtype=d, rng=0)),
}


@pytest.mark.parametrize("backend_name", ["numba", "numpy"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", list(PREFIX_MODELS))
def test_convnets_and_other_prefixes_compiled_equal_the_layers_bitwise(name, dtype, backend_name):
    rng = np.random.default_rng(2)
    shape = (4,) if name in ("BatchNorm first", "Dropout first") else (1, 8, 8)
    with backend.using(backend_name):
        ours = PREFIX_MODELS[name](dtype)
        theirs = copy.deepcopy(ours)
        assert compilable(ours, bnnet.losses.SoftmaxCrossEntropy()) is None
        step = compile_step(ours, bnnet.losses.SoftmaxCrossEntropy(), optim.Adam(1e-2, weight_decay=1e-3), 6)
        assert step.prefix is not None
        opt, loss_fn = optim.Adam(1e-2, weight_decay=1e-3), bnnet.losses.SoftmaxCrossEntropy()
        for t in range(3):
            n = 6 - t  # smaller batches use the first rows of the buffers
            X, y = rng.standard_normal((n, *shape)), rng.integers(0, 3, n)
            loss, acc = step(X, y)
            expected = loss_fn.forward(theirs.forward(X, train=True), y)
            assert (loss, acc) == (expected, loss_fn.accuracy(theirs._last_logits, y)), t
            theirs.backward(loss_fn.backward())
            opt.step(theirs)
            _assert_same(ours, theirs)
        wrong = (5,) if len(shape) == 1 else (2, 8, 8)  # one feature or one channel too many
        with pytest.raises(InputError, match=r"\(layer [01]\): x must .*got (shape )?\(N, (5|2, 8, 8)\)"):
            step(rng.standard_normal((4, *wrong)), np.zeros(4, int))


def test_a_convnet_fit_runs_the_compiled_step_and_equals_the_layers(monkeypatch):
    X, y = np.random.default_rng(3).standard_normal((20, 1, 8, 8)), np.arange(20) % 3
    histories, models = [], []
    for forced_off in (False, True):
        if forced_off:
            monkeypatch.setattr("bnnet.train.compilable", lambda *a: "forced off for this test")
        model = bnnet.convnet((1, 8, 8), channels=(2,), hidden=(4,), classes=3, dtype="float64", seed=0)
        histories.append(bnnet.fit(model, X, y, optimizer="momentum", epochs=2, batch_size=8, seed=0, progress=False))
        models.append(model)
    assert histories[0] == histories[1]
    _assert_same(*models)


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda: bnnet.Sequential(bnnet.layers.Linear(4, 3), bnnet.layers.ReLU()), "must end in a Linear"),
    ],
)
def test_what_it_cannot_take_is_named_and_fit_runs_the_interpreted_step(make, reason):
    model = make()
    loss = bnnet.losses.SoftmaxCrossEntropy()
    assert reason in compilable(model, loss)
    with pytest.raises(HyperparameterError, match=reason):
        compile_step(model, loss)


def test_fit_chooses_the_step_it_can_compile(monkeypatch):
    kinds = []
    original = Step.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        kinds.append("compiled" if self.compiled is not None else "layers")

    monkeypatch.setattr(Step, "__init__", spy)
    X, y = np.random.default_rng(0).standard_normal((40, 4)), np.arange(40) % 3
    bnnet.fit(bnnet.mlp([4, 5, 3], seed=0), X, y, epochs=1, batch_size=8, progress=False)
    bnnet.fit(bnnet.mlp([4, 5, 3], norm="layer", seed=0), X, y, epochs=1, batch_size=8, progress=False)
    bnnet.fit(bnnet.mlp([4, 5, 3], seed=0), X, y, epochs=1, batch_size=8, progress=False, check_activations=True)
    assert kinds == ["compiled", "compiled", "layers"]


def test_assignments_between_compiled_steps_are_caught_or_used():
    rng = np.random.default_rng(2)
    X, y = rng.standard_normal((8, 4)).astype("float32"), rng.integers(0, 3, 8)
    model = bnnet.mlp([4, 6, 3], seed=0)
    step = compile_step(model, bnnet.losses.SoftmaxCrossEntropy(), optim.Adam(1e-2))
    step(X, y)
    model.layers[1].buffers["running_var"] = np.ones(5, "float32")  # wrong shape: refused before any kernel
    with pytest.raises(InputError, match="running_var"):
        step(X, y)
    model.layers[1].buffers["running_var"] = np.ones(6, "float32")
    model.layers[0].params["W"] = np.full((4, 6), 0.1, "float32")  # a new valid array: laid out again
    step(X, y)
    assert np.shares_memory(model.params["0.W"], model.flat_layout().groups[0].params)
    step.optimizer.state["0.W"]["m"] = np.zeros(3, "float32")
    with pytest.raises(InputError, match=r"state\['0.W'\]\['m'\]"):
        step(X, y)


def test_changes_between_compiled_steps_are_followed_as_the_layers_follow_them():
    """The step looks its arrays up once per batch size; every change the layers would see at their next
    call must reach it too: a gradient replaced (by a valid array, which is written into, or a read-only
    one, which is replaced), a parameter replaced, a layer frozen, BatchNorm's eps and decay changed."""
    rng = np.random.default_rng(4)
    X, y = rng.standard_normal((10, 5)), rng.integers(0, 3, 10)
    ours = bnnet.mlp([5, 7, 6, 3], seed=1, dtype="float64")
    theirs = copy.deepcopy(ours)
    step = compile_step(ours, bnnet.losses.SoftmaxCrossEntropy(), optim.Momentum(0.05))
    loss_fn, opt = bnnet.losses.SoftmaxCrossEntropy(), optim.Momentum(0.05)

    def both(change):
        for model in (ours, theirs):
            change(model)
        loss, _ = step(X, y)
        assert loss == loss_fn.forward(theirs.forward(X, train=True), y)
        theirs.backward(loss_fn.backward())
        opt.step(theirs)
        _assert_same(ours, theirs)

    both(lambda m: None)
    both(lambda m: m.layers[0].grads.__setitem__("W", np.zeros((5, 7))))  # a valid array: written into
    assert ours.layers[0].grads["W"].any()

    def read_only(m):
        m.layers[3].grads["W"] = np.zeros((7, 6))
        m.layers[3].grads["W"].flags.writeable = False

    both(read_only)  # replaced by a writable one, not written into
    assert ours.layers[3].grads["W"].flags.writeable
    both(lambda m: m.layers[3].grads.__setitem__("W", np.zeros((7, 6))))
    both(lambda m: setattr(m.layers[3].grads["W"].flags, "writeable", False))  # the same array, now read-only
    assert ours.layers[3].grads["W"].flags.writeable
    both(lambda m: m.layers[1].params.__setitem__("gamma", np.full(7, 0.5)))  # a new parameter
    both(lambda m: setattr(m.layers[1], "eps", 1e-2))
    both(lambda m: setattr(m.layers[4], "decay", None))  # the cumulative average, which reads the count
    both(lambda m: setattr(m.layers[1], "frozen", True))  # the running statistics from now on
    both(lambda m: m.freeze("0.W"))


def test_a_norm_without_its_required_option_is_named():
    with pytest.raises(HyperparameterError, match="virtual_batch_size"):
        bnnet.mlp([4, 5, 3], norm="ghost")
    with pytest.raises(HyperparameterError, match="norm_options must be a dict"):
        bnnet.mlp([4, 5, 3], norm="ghost", norm_options=16)


def test_bad_batches_are_refused_with_one_clear_error():
    model = bnnet.mlp([4, 6, 3], seed=0)
    step = compile_step(model, bnnet.losses.SoftmaxCrossEntropy())
    X, y = np.ones((8, 4), "float32"), np.arange(8) % 3
    with pytest.raises(InputError, match=r"X_t must be a \(N, 4\)"):
        step(np.ones((8, 5)), y)
    with pytest.raises(InputError, match="no variance"):
        step(X[:1], y[:1])
    with pytest.raises(InputError, match="NaN or Inf"):
        step(np.full((8, 4), np.nan), y)
    with pytest.raises(InputError, match="out of range"):
        step(X, y + 5)
    with pytest.raises(InputError, match="rows"):
        step(X, y[:5])
    model.layers.append(bnnet.layers.ReLU())
    with pytest.raises(HyperparameterError, match="layers changed"):
        step(X, y)


def test_data_parallel_fit_with_the_compiled_step_equals_the_interpreted_one():
    """Two ranks (local BatchNorm: the only collective is the gradient allreduce after the step)."""
    import os
    import subprocess
    import sys

    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    script = os.path.join(os.path.dirname(__file__), "mpi_compiled.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}
    proc = subprocess.run(
        [mpiexec, "-n", "2", sys.executable, script], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "0:True:True 1:True:True", proc.stdout + proc.stderr[-3000:]


def test_compile_step_takes_names_as_fit_does_and_refuses_bad_arguments_in_one_line():
    model = bnnet.mlp([4, 5, 3], seed=0)
    step = compile_step(model, "softmax_cross_entropy", "adamw")
    assert type(step.loss) is bnnet.losses.SoftmaxCrossEntropy and type(step.optimizer) is optim.AdamW
    for args, kwargs, match in [
        ((model, "nope"), {}, "loss must be a Loss or one of"),
        ((model, "mse", "sgdx"), {}, "optimizer must be an Optimizer or one of"),
        ((model, "mse"), {"batch_size": -1}, "batch_size must be an integer >= 1, got -1"),
        (("x", "mse"), {}, "must be a bnnet Sequential, got str"),
    ]:
        with pytest.raises(HyperparameterError, match=match):
            compile_step(*args, **kwargs)
    with pytest.raises(bnnet.InputTypeError, match="X_t must hold real numbers"):
        step(np.array([["a"] * 4] * 4), np.arange(4) % 3)
    with pytest.raises(InputError, match="non-integer floats"):
        step(np.ones((4, 4)), np.array([0.5, 1, 2, 0]))


def test_a_model_that_mixes_dtypes_runs_the_interpreted_step():
    model = bnnet.Sequential(
        bnnet.layers.Linear(4, 5, bias=False, dtype="float64"),
        bnnet.layers.BatchNorm(5, dtype="float32"),
        bnnet.layers.ReLU(),
        bnnet.layers.Linear(5, 3, dtype="float32"),
    )
    assert "mix dtypes (float32, float64)" in compilable(model, bnnet.losses.SoftmaxCrossEntropy())


BN_OPTIONS = [
    {"affine": False},
    {"track_running_stats": False},
    {"frozen": True},
    {"decay": None, "running_var": "biased"},
    {"axis": -1, "eps": 1e-3},
]


@pytest.mark.parametrize("backend_name", ["numba", "numpy"])
@pytest.mark.parametrize("options", BN_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_batchnorm_options_give_the_same_numbers_compiled(options, backend_name):
    rng = np.random.default_rng(4)
    with backend.using(backend_name):
        layers = [
            bnnet.layers.Linear(5, 7, bias=False, rng=0, dtype="float64"),
            bnnet.layers.BatchNorm(7, dtype="float64", **options),
            bnnet.layers.LeakyReLU(0.1),
            bnnet.layers.Linear(7, 3, rng=1, dtype="float64"),
        ]
        ours = bnnet.Sequential(*layers)
        if options.get("frozen"):  # running statistics to normalize with
            ours.layers[1].buffers["running_mean"][...] = rng.standard_normal(7)
            ours.layers[1].buffers["running_var"][...] = rng.random(7) + 0.5
            ours.layers[1].buffers["count"][...] = 1
        theirs = copy.deepcopy(ours)
        loss_fn = bnnet.losses.SoftmaxCrossEntropy()
        step, opt = compile_step(ours, "softmax_cross_entropy", optim.Adam(1e-2)), optim.Adam(1e-2)
        for n in (9, 6, 9):
            X, y = rng.standard_normal((n, 5)), rng.integers(0, 3, n)
            loss, _ = step(X, y)
            assert loss == loss_fn.forward(theirs.forward(X, train=True), y)
            theirs.backward(loss_fn.backward())
            opt.step(theirs)
        _assert_same(ours, theirs)
