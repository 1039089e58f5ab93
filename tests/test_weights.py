"""Sample and class weights: a weighted loss equals the loss on repeated rows, weight 0 equals dropping
the row, "balanced" equals scikit-learn's compute_class_weight, and fit trains on them."""

import numpy as np
import pytest
from helpers import numerical_grad, rel_error

import bnnet
from bnnet.errors import HyperparameterError, InputError
from bnnet.losses import MSE, BinaryCrossEntropy, SoftmaxCrossEntropy, class_weights


def _case(loss, rng, n=9):
    if isinstance(loss, SoftmaxCrossEntropy):
        return rng.standard_normal((n, 4)), rng.integers(0, 4, n)
    if isinstance(loss, BinaryCrossEntropy):
        return rng.standard_normal((n, 1)), rng.integers(0, 2, n).astype(float)
    return rng.standard_normal((n, 3)), rng.standard_normal((n, 3))


LOSSES = [SoftmaxCrossEntropy(), BinaryCrossEntropy(), MSE()]


@pytest.mark.parametrize("loss", LOSSES, ids=lambda l: l.name)
def test_integer_weights_equal_repeated_rows(loss):
    rng = np.random.default_rng(0)
    z, y = _case(loss, rng)
    w = rng.integers(0, 4, len(z))
    w[0] = 0
    weighted = loss.forward(z, y, w)
    g = loss.backward().copy()
    rows = np.repeat(np.arange(len(z)), w)
    repeated = loss.forward(z[rows], y[rows])
    g_rep = np.zeros_like(z)
    np.add.at(g_rep, rows, loss.backward())
    assert abs(weighted - repeated) <= 1e-12
    np.testing.assert_allclose(g, g_rep, rtol=0, atol=1e-12)


@pytest.mark.parametrize("loss", LOSSES, ids=lambda l: l.name)
def test_weight_zero_drops_the_row_and_ones_change_nothing(loss):
    rng = np.random.default_rng(1)
    z, y = _case(loss, rng)
    w = np.ones(len(z))
    w[3] = 0.0
    keep = np.arange(len(z)) != 3
    assert abs(loss.forward(z, y, w) - loss.forward(z[keep], y[keep])) <= 1e-12
    g = loss.forward(z, y, w) and loss.backward()
    assert not g[3].any()
    assert abs(loss.forward(z, y, np.ones(len(z))) - loss.forward(z, y)) <= 1e-12
    assert loss.forward(z, y, np.zeros(len(z))) == 0.0 and not loss.backward().any()


@pytest.mark.parametrize("loss", LOSSES, ids=lambda l: l.name)
def test_weighted_gradient_matches_finite_differences(loss):
    rng = np.random.default_rng(2)
    z, y = _case(loss, rng, n=6)
    w = rng.random(6) * 3
    loss.forward(z, y, w)
    g = loss.backward().copy()
    assert rel_error(g, numerical_grad(lambda: loss.forward(z, y, w), z)) < 1e-7


def test_class_weights_match_torch_cross_entropy():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    z, y = rng.standard_normal((10, 3)), rng.integers(0, 3, 10)
    table = {0: 0.5, 1: 2.0, 2: 1.25}
    ours = SoftmaxCrossEntropy().forward(z, y, class_weights(table, y, 3, "test"))
    zt = torch.tensor(z, requires_grad=True)
    ref = torch.nn.functional.cross_entropy(
        zt, torch.tensor(y), weight=torch.tensor([0.5, 2.0, 1.25], dtype=torch.float64)
    )
    assert abs(ours - ref.item()) <= 1e-12


def test_balanced_equals_scikit_learn():
    from sklearn.utils.class_weight import compute_class_weight

    y = np.array([0, 0, 0, 0, 1, 3, 3, 2, 0, 3])
    expected = compute_class_weight("balanced", classes=np.unique(y), y=y)
    np.testing.assert_allclose(class_weights("balanced", y, 4, "t"), expected[np.searchsorted(np.unique(y), y)])


def test_fit_with_integer_weights_equals_fit_on_repeated_rows():
    """Full-batch SGD without BatchNorm: the weighted run is the run on the repeated rows."""
    rng = np.random.default_rng(4)
    X, y = rng.standard_normal((20, 5)), rng.integers(0, 3, 20)
    w = rng.integers(0, 3, 20)
    rows = np.repeat(np.arange(20), w)
    runs = []
    for Xi, yi, wi in ((X, y, w), (X[rows], y[rows], None)):
        model = bnnet.mlp([5, 7, 3], dtype="float64", batchnorm=False, seed=0)
        bnnet.fit(model, Xi, yi, optimizer=bnnet.optim.SGD(0.1), epochs=3, batch_size=len(Xi), seed=0,
                  sample_weight=wi, progress=False)  # fmt: skip
        runs.append(model)
    for k, v in runs[0].params.items():
        np.testing.assert_allclose(runs[1].params[k], v, rtol=0, atol=1e-12)


@pytest.mark.parametrize("check_activations", [False, True])  # the compiled step, and the layers
def test_fit_uses_the_weights_on_both_paths(check_activations):
    rng = np.random.default_rng(5)
    X, y = rng.standard_normal((64, 6)), rng.integers(0, 2, 64)
    models = []
    for weights in (None, "balanced"):
        model = bnnet.mlp([6, 8, 2], dtype="float64", seed=0)
        bnnet.fit(model, X, y, epochs=2, batch_size=16, seed=0, class_weight=weights,
                  check_activations=check_activations, progress=False)  # fmt: skip
        models.append(model)
    assert not np.array_equal(models[0].params["0.W"], models[1].params["0.W"])


def test_compiled_and_layer_paths_agree_with_weights():
    rng = np.random.default_rng(6)
    X, y, w = rng.standard_normal((50, 6)), rng.integers(0, 3, 50), rng.random(50)
    models = []
    for check in (False, True):
        model = bnnet.mlp([6, 8, 3], dtype="float64", seed=0)
        bnnet.fit(model, X, y, epochs=2, batch_size=16, seed=0, sample_weight=w, check_activations=check,
                  progress=False)  # fmt: skip
        models.append(model)
    for k, v in models[0].params.items():
        np.testing.assert_allclose(models[1].params[k], v, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("kw", "error", "match"),
    [
        ({"sample_weight": -np.ones(30)}, InputError, "sample_weight must be >= 0"),
        ({"sample_weight": np.ones(29)}, InputError, r"shape \(30,\)"),
        ({"sample_weight": np.full(30, np.nan)}, InputError, "sample_weight"),
        ({"sample_weight": np.zeros(30)}, InputError, "sum to 0"),
        ({"class_weight": "even"}, HyperparameterError, "class_weight must be 'balanced'"),
        ({"class_weight": {5: 1.0}}, HyperparameterError, "key 5"),
        ({"class_weight": {0: -1.0}}, HyperparameterError, r"class_weight\[0\]"),
        ({"class_weight": "balanced", "loss": "mse"}, HyperparameterError, "classification loss"),
    ],
)
def test_bad_weights(kw, error, match):
    rng = np.random.default_rng(7)
    X, y = rng.standard_normal((30, 4)), rng.integers(0, 2, 30)
    if kw.get("loss") == "mse":
        y = y[:, None].astype(float)
    model = bnnet.mlp([4, 5, 2 if kw.get("loss") != "mse" else 1], seed=0)
    with pytest.raises(error, match=match):
        bnnet.fit(model, X, y, progress=False, epochs=1, **kw)


def test_loss_refuses_nonfinite_outputs():
    with pytest.raises(InputError, match="outputs"):
        SoftmaxCrossEntropy().forward(np.array([[0.0, np.nan]]), np.array([0]))
