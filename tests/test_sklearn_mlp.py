"""scikit-learn's own MLP tests (sklearn/neural_network/tests/test_mlp.py), translated to the bnnet
estimators for every feature they share: early stopping, partial_fit, warm_start, alpha,
sample_weight, multilabel, multi-output, the fitted attributes, learning-rate schedules, n_iter_no_change."""

import warnings

import numpy as np
import pytest
from sklearn.datasets import load_digits, load_iris, make_multilabel_classification, make_regression
from sklearn.exceptions import ConvergenceWarning
from sklearn.preprocessing import MinMaxScaler, StandardScaler

from bnnet.sklearn import BNMLPClassifier, BNMLPRegressor

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")

_digits = load_digits(n_class=3)
X_digits = MinMaxScaler().fit_transform(_digits.data[:200])
y_digits = _digits.target[:200]
X_iris, y_iris = StandardScaler().fit_transform(load_iris().data), load_iris().target
X_reg, y_reg = make_regression(n_samples=200, n_features=10, random_state=7)
y_reg = StandardScaler().fit_transform(y_reg[:, None])[:, 0]


def test_alpha_shrinks_the_weights():
    sums = []
    for alpha in (0.0, 10.0, 100.0):
        mlp = BNMLPClassifier(hidden_layer_sizes=10, alpha=alpha, random_state=1, max_iter=50).fit(X_digits, y_digits)
        sums.append([np.abs(w).sum() for w in mlp.coefs_])
    sums = np.array(sums)
    assert (sums[:-1] > sums[1:]).all(), sums


def test_fitted_attributes():
    mlp = BNMLPClassifier(hidden_layer_sizes=(8, 6), max_iter=20, random_state=0).fit(X_digits, y_digits)
    assert [w.shape for w in mlp.coefs_] == [(64, 8), (8, 6), (6, 3)]
    assert [b.shape for b in mlp.intercepts_] == [(8,), (6,), (3,)]
    assert not mlp.intercepts_[0].any()  # the Linear before BatchNorm has no bias
    assert (mlp.n_layers_, mlp.n_outputs_, mlp.out_activation_) == (4, 3, "softmax")
    assert mlp.n_iter_ == len(mlp.loss_curve_) == 20 and mlp.loss_ == mlp.loss_curve_[-1]
    assert mlp.best_loss_ == min(mlp.loss_curve_) and mlp.t_ == 20 * len(X_digits)
    assert mlp.validation_scores_ is None and mlp.best_validation_score_ is None
    binary = BNMLPClassifier(hidden_layer_sizes=4, max_iter=5, random_state=0).fit(X_digits, y_digits == 1)
    assert (binary.n_outputs_, binary.out_activation_) == (1, "logistic")
    reg = BNMLPRegressor(hidden_layer_sizes=4, max_iter=5, random_state=0).fit(X_reg, y_reg)
    assert (reg.n_outputs_, reg.out_activation_) == (1, "identity")


def test_early_stopping():
    tol = 0.2
    mlp = BNMLPClassifier(tol=tol, max_iter=3000, early_stopping=True, random_state=0).fit(X_digits, y_digits)
    assert mlp.max_iter > mlp.n_iter_
    scores, best = mlp.validation_scores_, mlp.best_validation_score_
    assert max(scores) == best and best + tol > scores[-2] and best + tol > scores[-1]
    assert mlp.best_loss_ is None
    # the best epoch's weights are kept: the score on the held-out split is the best one
    assert len(scores) == mlp.n_iter_


def test_n_iter_no_change():
    tol, n_iter_no_change = 0.01, 2
    mlp = BNMLPClassifier(tol=tol, max_iter=3000, n_iter_no_change=n_iter_no_change, random_state=0)
    mlp.fit(X_digits, y_digits)
    assert mlp._no_improvement_count == n_iter_no_change + 1
    assert mlp.max_iter > mlp.n_iter_


def test_n_iter_no_change_inf():
    mlp = BNMLPClassifier(tol=1e6, max_iter=20, n_iter_no_change=np.inf, random_state=0)
    with pytest.warns(ConvergenceWarning):
        mlp.fit(X_digits, y_digits)
    assert mlp.n_iter_ == mlp.max_iter and mlp._no_improvement_count == mlp.max_iter - 1


def test_adaptive_learning_rate():
    mlp = BNMLPClassifier(tol=0.5, max_iter=3000, solver="sgd", learning_rate="adaptive", random_state=0,
                          nesterovs_momentum=False)  # fmt: skip
    mlp.fit(X_digits, y_digits)
    assert mlp.max_iter > mlp.n_iter_
    assert 1e-6 >= mlp._rate()


@pytest.mark.parametrize("learning_rate", ["invscaling", "constant"])
def test_learning_rate_warmstart(learning_rate):
    X, y = np.array([[3, 2], [1, 6], [5, 6], [-2, -4]], float), np.array([1, 1, 1, 0])
    mlp = BNMLPClassifier(solver="sgd", hidden_layer_sizes=4, learning_rate=learning_rate, max_iter=1,
                          power_t=0.25, warm_start=True, momentum=0.0, random_state=0)  # fmt: skip
    mlp.fit(X, y)
    prev = mlp._rate()
    mlp.fit(X, y)
    post = mlp._rate()
    if learning_rate == "constant":
        assert prev == post
    else:
        assert mlp.learning_rate_init / (8 + 1) ** mlp.power_t == pytest.approx(post, rel=1e-15)


def test_warm_start_keeps_classes_and_runs_max_iter():
    mlp = BNMLPClassifier(hidden_layer_sizes=2, solver="sgd", warm_start=True, max_iter=3, random_state=0,
                          nesterovs_momentum=False)  # fmt: skip
    mlp.fit(X_iris, y_iris)
    assert mlp.n_iter_ == 3
    first = mlp.coefs_[0].copy()
    mlp.fit(X_iris, y_iris)
    assert mlp.n_iter_ == 3 and not np.array_equal(mlp.coefs_[0], first)  # trained on from there
    with pytest.raises(ValueError, match="keep the classes of the first fit"):
        mlp.fit(X_iris, np.where(y_iris == 2, 5, y_iris))


def test_partial_fit_classification_equals_fit():
    kw = dict(solver="sgd", random_state=1, tol=0, alpha=1e-5, learning_rate_init=0.2, momentum=0.0, shuffle=False)
    mlp = BNMLPClassifier(max_iter=100, **kw).fit(X_digits, y_digits)  # one mini-batch of 200 rows per epoch
    stepwise = BNMLPClassifier(**kw)
    for _ in range(100):
        stepwise.partial_fit(X_digits, y_digits, classes=np.unique(y_digits))
    np.testing.assert_array_equal(stepwise.predict(X_digits), mlp.predict(X_digits))
    for a, b in zip(stepwise.coefs_, mlp.coefs_):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-10)
    assert stepwise.score(X_digits, y_digits) > 0.95 and stepwise.n_iter_ == 100


def test_partial_fit_regression_equals_fit():
    kw = dict(solver="sgd", random_state=1, tol=0, learning_rate_init=0.01, momentum=0.0, shuffle=False)
    mlp = BNMLPRegressor(max_iter=50, **kw).fit(X_reg, y_reg)
    stepwise = BNMLPRegressor(**kw)
    for _ in range(50):
        stepwise.partial_fit(X_reg, y_reg)
    np.testing.assert_allclose(stepwise.predict(X_reg), mlp.predict(X_reg), rtol=0, atol=1e-8)


def test_partial_fit_errors():
    with pytest.raises(ValueError, match="classes must be passed"):
        BNMLPClassifier().partial_fit(X_iris, y_iris)
    mlp = BNMLPClassifier(max_iter=1).partial_fit(X_iris, y_iris, classes=[0, 1, 2])
    with pytest.raises(ValueError, match="is not the same as classes_"):
        mlp.partial_fit(X_iris, y_iris, classes=[0, 1, 3])
    with pytest.raises(ValueError, match="solver='lbfgs'"):
        BNMLPClassifier(solver="lbfgs").partial_fit(X_iris, y_iris, classes=[0, 1, 2])


def test_multilabel_classification():
    X, Y = make_multilabel_classification(n_samples=150, n_features=8, n_classes=4, random_state=0)
    X = StandardScaler().fit_transform(X)
    mlp = BNMLPClassifier(hidden_layer_sizes=(50,), max_iter=300, random_state=0, learning_rate_init=0.01).fit(X, Y)
    assert mlp.score(X, Y) > 0.9
    assert mlp.predict(X).shape == Y.shape and mlp.predict_proba(X).shape == Y.shape
    assert (mlp.n_outputs_, mlp.out_activation_) == (4, "logistic")
    stepwise = BNMLPClassifier(hidden_layer_sizes=(50,), random_state=0, learning_rate_init=0.01)
    for _ in range(300):
        stepwise.partial_fit(X, Y, classes=[0, 1, 2, 3])
    assert stepwise.score(X, Y) > 0.9


def test_multioutput_regression():
    X, Y = make_regression(n_samples=200, n_targets=5, random_state=0)
    mlp = BNMLPRegressor(hidden_layer_sizes=(50,), max_iter=300, random_state=1, learning_rate_init=0.01).fit(X, Y)
    assert mlp.score(X, Y) > 0.9 and mlp.predict(X).shape == Y.shape and mlp.n_outputs_ == 5


def test_predict_proba_binary_multiclass_and_log():
    binary = BNMLPClassifier(hidden_layer_sizes=5, max_iter=10, random_state=0).fit(X_digits[:50], y_digits[:50] == 1)
    proba = binary.predict_proba(X_digits[:50])
    assert proba.shape == (50, 2)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(binary.predict_log_proba(X_digits[:50]), np.log(proba), rtol=1e-12)
    assert (np.argmax(proba, axis=1) == binary.predict(X_digits[:50])).all()
    multi = BNMLPClassifier(hidden_layer_sizes=5, max_iter=10, random_state=0).fit(X_digits, y_digits)
    proba = multi.predict_proba(X_digits)
    assert proba.shape == (200, 3) and (np.argmax(proba, axis=1) == multi.predict(X_digits)).all()
    np.testing.assert_allclose(multi.predict_log_proba(X_digits), np.log(proba), rtol=1e-12)


def test_sample_weight_zero_equals_leaving_the_rows_out():
    """With one mini-batch per epoch, shuffle=False and no penalty, weight 0 drops a row from the loss.
    (Without Batch Norm, whose batch statistics would still see the row.)"""
    w = np.ones(len(X_digits))
    w[:20] = 0
    kw = dict(hidden_layer_sizes=8, max_iter=5, random_state=0, shuffle=False, batchnorm=False, tol=0, alpha=0.0)
    weighted = BNMLPClassifier(**kw).fit(X_digits, y_digits, sample_weight=w)
    dropped = BNMLPClassifier(**kw).fit(X_digits[20:], y_digits[20:])
    for a, b in zip(weighted.coefs_, dropped.coefs_):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-10)


def test_convergence_warning_at_max_iter():
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        with pytest.raises(ConvergenceWarning, match="max_iter"):
            BNMLPClassifier(max_iter=2, random_state=0).fit(X_digits, y_digits)


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"activation": "identity"}, "makes the network linear"),
        ({"learning_rate": "optimal"}, "learning_rate must be"),
        ({"batch_size": 0}, "batch_size must be"),
        ({"validation_fraction": 1.0}, "validation_fraction must be"),
        ({"momentum": 1.5}, "momentum must be"),
        ({"n_iter_no_change": 0}, "n_iter_no_change must be"),
        ({"hidden_layer_sizes": (10, -1)}, "hidden_layer_sizes must be"),
        ({"alpha": -1.0}, "alpha must be"),
    ],
)
def test_bad_parameters_name_the_parameter(params, match):
    with pytest.raises(ValueError, match=match):
        BNMLPClassifier(**params).fit(X_iris, y_iris)
