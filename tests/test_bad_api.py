"""A table of bad API calls: each raises the expected error from bnnet.errors with a message that
names the argument and what was wrong (never a raw NumPy or Python error)."""

import warnings

import numpy as np
import pytest

import bnnet
import bnnet.experiments
from bnnet import functional as F
from bnnet import optim
from bnnet.layers import BatchNorm, LeakyReLU, Linear, Sigmoid
from bnnet.losses import MSE, BinaryCrossEntropy, SoftmaxCrossEntropy
from bnnet.normalization import BatchRenorm, GhostBatchNorm, LayerNorm

E = bnnet.errors
rng = np.random.default_rng(0)
X = rng.random((20, 4)).astype(np.float32)
y = np.arange(20) % 3


def model():
    return bnnet.mlp([4, 5, 3], seed=0)


def fit(**kwargs):
    args = {"epochs": 1, "batch_size": 5, "progress": False, **kwargs}
    X_, y_ = args.pop("X", X), args.pop("y", y)
    return bnnet.fit(args.pop("model", model()), X_, y_, **args)


def twice_backward():
    m = model()
    m.forward(X, train=True)
    m.backward(np.ones((20, 3)))
    m.backward(np.ones((20, 3)))


def with_nan(a, index=(0, 0)):
    a = a.copy()
    a[index] = np.nan
    return a


def bn_backward_first():
    BatchNorm(4).backward(np.ones((3, 4)))


def assign_wrong_shape():
    model().params["0.W"] = np.ones((3, 3))


CASES = [
    # model builders and layers
    ("mlp(5)", lambda: bnnet.mlp(5), E.HyperparameterError, "mlp: sizes must be a list"),
    ("mlp([4])", lambda: bnnet.mlp([4]), E.HyperparameterError, "at least 2 ints"),
    ("mlp size 0", lambda: bnnet.mlp([4, 0, 3]), E.HyperparameterError, "mlp: sizes must be an integer >= 1"),
    ("mlp size 2.5", lambda: bnnet.mlp([4, 2.5, 3]), E.HyperparameterError, "mlp: sizes must be an integer, got 2.5"),
    (
        "mlp activation",
        lambda: bnnet.mlp([4, 3], activation="softmax"),
        E.HyperparameterError,
        "activation must be one of",
    ),
    ("mlp norm", lambda: bnnet.mlp([4, 5, 3], norm="instance"), E.HyperparameterError, "norm must be one of"),
    (
        "mlp dtype None",
        lambda: bnnet.mlp([4, 3], dtype=None),
        E.HyperparameterError,
        "dtype must be 'float32' or 'float64', got None",
    ),
    ("mlp dtype float16", lambda: bnnet.mlp([4, 3], dtype="float16"), E.HyperparameterError, "got 'float16'"),
    (
        "mlp seed str",
        lambda: bnnet.mlp([4, 3], seed="abc"),
        E.HyperparameterError,
        "mlp: seed must be None or an integer",
    ),
    ("mlp seed negative", lambda: bnnet.mlp([4, 3], seed=-5), E.HyperparameterError, "mlp: seed must be"),
    ("mlp init", lambda: bnnet.mlp([4, 3], init="zeros"), E.HyperparameterError, "init must be one of"),
    ("Sequential()", lambda: bnnet.Sequential(), E.HyperparameterError, "needs at least one layer"),
    (
        "Sequential(not a layer)",
        lambda: bnnet.Sequential(Linear(4, 3), "relu"),
        E.HyperparameterError,
        "argument 1 must be a bnnet layer",
    ),
    ("Sequential not chaining", lambda: bnnet.Sequential(Linear(4, 3), Linear(5, 2)), E.HyperparameterError, "5"),
    ("Linear in 0", lambda: Linear(0, 3), E.HyperparameterError, "in_features must be an integer >= 1"),
    ("Linear bias str", lambda: Linear(4, 3, bias="yes"), E.HyperparameterError, "Linear: bias must be True or False"),
    (
        "Linear rng str",
        lambda: Linear(4, 3, rng="abc"),
        E.HyperparameterError,
        "Linear: rng must be None, an integer seed",
    ),
    (
        "Linear std without normal",
        lambda: Linear(4, 3, std=0.1),
        E.HyperparameterError,
        "std is used only with init='normal'",
    ),
    ("BatchNorm eps 0", lambda: BatchNorm(4, eps=0), E.HyperparameterError, "eps must be in (0, inf)"),
    ("BatchNorm decay 2", lambda: BatchNorm(4, decay=2), E.HyperparameterError, "decay must be in [0, 1]"),
    (
        "BatchNorm running_var",
        lambda: BatchNorm(4, running_var="both"),
        E.HyperparameterError,
        "running_var must be one of",
    ),
    ("BatchNorm frozen str", lambda: BatchNorm(4, frozen="no"), E.HyperparameterError, "frozen must be True or False"),
    ("BatchNorm features 0", lambda: BatchNorm(0), E.HyperparameterError, "num_features must be an integer >= 1"),
    ("BatchRenorm r_max < 1", lambda: BatchRenorm(4, r_max=0.5), E.HyperparameterError, "r_max"),
    (
        "GhostBatchNorm virtual 1",
        lambda: GhostBatchNorm(4, virtual_batch_size=1),
        E.HyperparameterError,
        "virtual_batch_size",
    ),
    ("LayerNorm eps", lambda: LayerNorm(4, eps=-1), E.HyperparameterError, "eps"),
    ("LeakyReLU slope", lambda: LeakyReLU(negative_slope="a"), E.HyperparameterError, "negative_slope"),
    # forward / backward / predict
    (
        "forward NaN",
        lambda: model().forward(with_nan(X), train=True),
        E.InputError,
        "Sequential.forward: x contains NaN or Inf",
    ),
    (
        "forward Inf eval",
        lambda: model().forward(np.full((2, 4), np.inf), train=False),
        E.InputError,
        "contains NaN or Inf",
    ),
    ("forward 1-D", lambda: model().forward(X[0], train=True), E.InputError, "must be a batch of shape (N, features)"),
    ("forward features", lambda: model().forward(X[:, :3], train=True), E.InputError, "x must be (N, 4), got (N, 3)"),
    ("forward empty", lambda: model().forward(X[:0], train=True), E.InputError, "is empty (0 rows)"),
    (
        "forward strings",
        lambda: model().forward(np.array([["a"] * 4]), train=False),
        E.InputTypeError,
        "must hold real numbers",
    ),
    ("forward complex", lambda: model().forward(X + 1j, train=False), E.InputTypeError, "dtype complex"),
    (
        "forward ragged",
        lambda: model().forward([[1, 2, 3, 4], [1]], train=False),
        E.InputError,
        "must be a rectangular array",
    ),
    (
        "forward train str",
        lambda: model().forward(X, train="yes"),
        E.HyperparameterError,
        "train must be True or False",
    ),
    (
        "forward one row",
        lambda: model().forward(X[:1], train=True),
        E.InputError,
        "a batch of 1 row in train mode has no variance",
    ),
    ("second backward", twice_backward, E.InputError, "backward was already called for the last forward"),
    ("backward before forward", lambda: model().backward(np.ones((2, 3))), E.InputError, "no forward to backpropagate"),
    ("layer backward first", bn_backward_first, E.InputError, "backward() called before forward()"),
    ("layer forward NaN", lambda: Sigmoid().forward(with_nan(X), train=False), E.InputError, "Sigmoid: x contains NaN"),
    (
        "predict 1e38",
        lambda: _wide_model().predict(np.full((2, 4), 3e38)),
        E.NonFiniteError,
        "predict: the outputs of 2 row(s) hold NaN or Inf",
    ),
    ("predict NaN", lambda: model().predict(with_nan(X)), E.InputError, "predict: X contains NaN or Inf"),
    (
        "predict batch 0",
        lambda: model().predict(X, batch_size=0),
        E.HyperparameterError,
        "batch_size must be an integer >= 1",
    ),
    ("assign wrong shape", assign_wrong_shape, E.InputError, "cannot assign an array of shape (3, 3)"),
    # fit and evaluate
    ("fit seed str", lambda: fit(seed="abc"), E.HyperparameterError, "fit: seed must be None or an integer"),
    ("fit seed negative", lambda: fit(seed=-5), E.HyperparameterError, "fit: seed must be"),
    ("fit validation bare", lambda: fit(validation_data=X), E.HyperparameterError, "validation_data must be a pair"),
    (
        "fit validation NaN",
        lambda: fit(validation_data=(with_nan(X), y)),
        E.InputError,
        "fit(validation_data): X contains NaN",
    ),
    ("fit epochs 0", lambda: fit(epochs=0), E.HyperparameterError, "epochs must be an integer >= 1"),
    ("fit epochs float", lambda: fit(epochs=1.5), E.HyperparameterError, "epochs must be an integer"),
    ("fit batch 0", lambda: fit(batch_size=0), E.HyperparameterError, "batch_size must be an integer >= 1"),
    ("fit batch 1 with BN", lambda: fit(batch_size=1), E.InputError, "batch_size=1 cannot train BatchNorm"),
    (
        "fit optimizer name",
        lambda: fit(optimizer="lbfgs"),
        E.HyperparameterError,
        "optimizer must be an Optimizer or one of",
    ),
    ("fit loss name", lambda: fit(loss="hinge"), E.HyperparameterError, "hinge"),
    ("fit X NaN", lambda: fit(X=with_nan(X)), E.InputError, "fit: X contains NaN or Inf"),
    ("fit y length", lambda: fit(y=y[:10]), E.InputError, "X has 20 rows but y has 10"),
    ("fit label range", lambda: fit(y=y + 5), E.InputError, "label"),
    ("fit label float", lambda: fit(y=y + 0.5), E.InputError, "integer"),
    ("fit labels strings", lambda: fit(y=np.array(["a"] * 20)), E.BnnetError, "labels"),
    (
        "fit checkpoint_every without path",
        lambda: fit(checkpoint_every=2),
        E.HyperparameterError,
        "checkpoint_every needs checkpoint=PATH",
    ),
    (
        "fit checkpoint_every 0",
        lambda: fit(checkpoint_every=0, checkpoint="x.safetensors"),
        E.HyperparameterError,
        "checkpoint_every must be an integer >= 1",
    ),
    (
        "fit checkpoint_metadata",
        lambda: fit(checkpoint="x.safetensors", checkpoint_metadata={"a": object()}),
        E.HyperparameterError,
        "checkpoint_metadata must be JSON-serializable",
    ),
    (
        "fit resume missing",
        lambda: fit(resume="/nonexistent/ck.safetensors"),
        E.CheckpointError,
        "no such checkpoint file",
    ),
    (
        "fit params NaN",
        lambda: fit(model=_nan_model()),
        E.NonFiniteError,
        "holds NaN or Inf before training, in parameter 0.W",
    ),
    ("evaluate features", lambda: bnnet.evaluate(model(), X[:, :2], y), E.InputError, "must have 4 features"),
    # losses
    (
        "softmax labels 2-D",
        lambda: SoftmaxCrossEntropy().forward(np.zeros((4, 3)), np.zeros((4, 3))),
        E.InputError,
        "labels",
    ),
    (
        "bce targets NaN",
        lambda: BinaryCrossEntropy().forward(np.zeros((3, 1)), with_nan(np.zeros((3, 1)))),
        E.InputError,
        "NaN",
    ),
    (
        "mse rows",
        lambda: MSE().forward(np.zeros((3, 2)), np.zeros((4, 2))),
        E.InputError,
        "outputs have 3 rows but targets have 4",
    ),
    ("loss backward first", lambda: SoftmaxCrossEntropy().backward(), E.BnnetError, "forward"),
    # optimizers
    ("SGD lr 0", lambda: optim.SGD(0), E.HyperparameterError, "SGD: lr must be in (0, inf)"),
    ("SGD lr nan", lambda: optim.SGD(float("nan")), E.HyperparameterError, "lr must be a finite real number"),
    ("Adam beta1 1", lambda: optim.Adam(1e-3, beta1=1.0), E.HyperparameterError, "beta1 must be in [0, 1)"),
    ("RMSprop eps 0", lambda: optim.RMSprop(1e-3, eps=0), E.HyperparameterError, "eps"),
    ("Momentum beta -1", lambda: optim.Momentum(0.1, beta=-1), E.HyperparameterError, "beta must be in [0, 1)"),
    ("weight_decay negative", lambda: optim.SGD(0.1, weight_decay=-1), E.HyperparameterError, "weight_decay"),
    (
        "decay_names str",
        lambda: optim.SGD(0.1, decay_names="W"),
        E.HyperparameterError,
        "decay_names must be a sequence",
    ),
    (
        "schedule not a Schedule",
        lambda: optim.SGD(0.1, schedule="cosine"),
        E.HyperparameterError,
        "schedule must be None",
    ),
    ("ExponentialDecay steps 0", lambda: optim.ExponentialDecay(0.1, 0), E.HyperparameterError, "decay_steps"),
    (
        "schedule config",
        lambda: optim.schedule_from_config({"type": "cosine"}),
        E.HyperparameterError,
        "schedule config must be",
    ),
    ("clip_grad_norm 0", lambda: optim.clip_grad_norm(model(), 0), E.HyperparameterError, "max_norm"),
    # functional
    ("moments axes str", lambda: F.moments(X, axes="0"), E.BnnetError, "axes"),
    ("moments axes out of range", lambda: F.moments(X, axes=[5]), E.BnnetError, "axes"),
    (
        "batch_normalization shapes",
        lambda: F.batch_normalization(X, np.zeros(3), np.ones(4), None, None, 1e-3),
        E.BnnetError,
        "shape",
    ),
    # files and interop
    ("load missing", lambda: bnnet.load("/nonexistent.safetensors"), E.CheckpointError, "no such checkpoint file"),
    (
        "save not a model",
        lambda: bnnet.save("/tmp/x.safetensors", "model"),
        TypeError,
        "save: model must be a bnnet Sequential",
    ),
    ("datasets.load spec", lambda: bnnet.datasets.load("mnist6k"), E.DatasetError, "--data must be 'mnist5k'"),
    (
        "datasets.load_npy missing",
        lambda: bnnet.datasets.load_npy("/nonexistent.npy"),
        E.DatasetError,
        "/nonexistent.npy: no such file",
    ),
    (
        "recompute NaN",
        lambda: bnnet.recompute_bn_stats(model(), with_nan(X)),
        E.InputError,
        "recompute_bn_stats: X contains NaN",
    ),
    (
        "recompute batch 1",
        lambda: bnnet.recompute_bn_stats(model(), X, batch_size=1),
        E.HyperparameterError,
        "batch_size must be an integer >= 2",
    ),
    (
        "recompute mode",
        lambda: bnnet.recompute_bn_stats(model(), X, mode="median"),
        E.HyperparameterError,
        "mode must be one of",
    ),
    (
        "recompute overflow",
        lambda: bnnet.recompute_bn_stats(_wide_model(), np.full((4, 4), 3e38, np.float32), mode="exact"),
        E.BnnetError,
        "NaN or Inf",
    ),
    (
        "experiment steps 0",
        lambda: bnnet.experiments.run("fig1", "/tmp/x", steps=0),
        E.HyperparameterError,
        "experiment fig1: steps must be an integer >= 1",
    ),
    (
        "experiment name",
        lambda: bnnet.experiments.run("fig9", "/tmp/x"),
        E.HyperparameterError,
        "experiment must be one of",
    ),
    ("set_num_threads 0", lambda: bnnet.set_num_threads(0), E.HyperparameterError, "must be an integer >= 1"),
]


def _nan_model():
    m = model()
    m.params["0.W"][0, 0] = np.nan
    return m


def _wide_model():
    m = model()
    m.params["0.W"][...] = 1.0
    return m


@pytest.mark.parametrize("call,error,fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_api_call(call, error, fragment):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(error) as info:
            call()
    assert isinstance(info.value, bnnet.BnnetError) or error is TypeError, type(info.value)
    assert fragment in str(info.value), str(info.value)


def test_the_table_is_long_enough():
    assert len(CASES) >= 60


def test_moments_accepts_any_sequence_of_axes_as_tensorflow_does():
    for axes in ([0], (0,), 0, np.array([0]), range(1)):
        mean, var = F.moments(X.astype(np.float64), axes=axes)
        np.testing.assert_allclose(mean, X.mean(axis=0), rtol=1e-6)
        np.testing.assert_allclose(var, X.var(axis=0), rtol=1e-5)


def test_values_that_are_not_numbers_and_sizes_beyond_memory_are_named():
    model = bnnet.mlp([3, 4, 2], seed=0)
    for value in ("abc", [["a"] * 4] * 3, np.zeros((3, 4), complex), None):
        with pytest.raises(E.InputError, match=r"params\['0.W'\] holds float32 numbers; cannot assign"):
            model.params["0.W"] = value
    with pytest.raises(E.HyperparameterError, match=r"Linear: W of shape \(4, 1000000000000\) would take"):
        bnnet.mlp([4, 10**12])
    with pytest.raises(E.HyperparameterError, match="BatchNorm: each of gamma"):
        bnnet.layers.BatchNorm(10**13)


def test_one_optimizer_on_two_layers_is_refused_before_any_update():
    a, b = bnnet.layers.Linear(3, 3, rng=0), bnnet.layers.Linear(3, 3, rng=1)
    x = np.ones((2, 3), np.float32)
    for layer in (a, b):
        layer.forward(x, True)
        layer.backward(x)
    opt = bnnet.optim.Adam()
    opt.step(a)
    before = b.params["W"].copy()
    with pytest.raises(E.HyperparameterError, match="already holds the state of another layer"):
        opt.step(b)
    np.testing.assert_array_equal(b.params["W"], before)
    opt.step(a)  # its own layer again: fine
