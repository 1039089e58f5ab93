"""scikit-learn estimators: sklearn's own check suite, and use in a Pipeline with GridSearchCV."""

import numpy as np
import pytest
from sklearn.datasets import make_classification, make_regression
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

from bnnet.sklearn import BNMLPClassifier, BNMLPRegressor

# Small nets and few epochs keep the ~50 checks per estimator fast. Every check runs; one is expected to
# fail, as it is for scikit-learn's own MLPs: weights equal to repeating rows in the loss (tested in
# test_weights.py), but mini-batches drawn from repeated rows and Batch Norm's statistics differ.
FAST = dict(hidden_layer_sizes=(16,), max_iter=30, learning_rate_init=1e-2, batch_size=32, random_state=0)
EXPECTED_FAILURES = {
    "check_sample_weight_equivalence_on_dense_data": "mini-batches of repeated rows differ from weighted ones"
}


@parametrize_with_checks(
    [BNMLPClassifier(**FAST), BNMLPRegressor(**FAST)], expected_failed_checks=lambda est: EXPECTED_FAILURES
)
def test_sklearn_compatible(estimator, check):
    check(estimator)


def test_pipeline_with_grid_search():
    X, y = make_classification(n_samples=240, n_features=8, n_informative=5, n_classes=3, random_state=0)
    pipe = make_pipeline(StandardScaler(), BNMLPClassifier(max_iter=20, random_state=0))
    search = GridSearchCV(
        pipe,
        {"bnmlpclassifier__hidden_layer_sizes": [(8,), (32, 16)], "bnmlpclassifier__learning_rate_init": [1e-3, 1e-2]},
        cv=3,
    )
    search.fit(X, y)
    assert search.best_score_ > 0.6
    assert search.predict_proba(X).shape == (240, 3)
    np.testing.assert_allclose(search.predict_proba(X).sum(axis=1), 1.0, rtol=1e-12)


def test_regressor_learns_and_labels_round_trip():
    X, y = make_regression(n_samples=200, n_features=5, noise=1.0, random_state=0)
    reg = BNMLPRegressor(hidden_layer_sizes=(32,), max_iter=60, learning_rate_init=1e-2, random_state=0).fit(
        X, y * 100 + 7
    )
    assert reg.score(X, y * 100 + 7) > 0.9
    Xc, yc = make_classification(n_samples=120, n_features=4, random_state=1)
    labels = np.array(["no", "yes"])[yc]
    clf = BNMLPClassifier(**FAST).fit(Xc, labels)
    assert set(clf.predict(Xc)) <= {"no", "yes"} and clf.score(Xc, labels) > 0.8


def test_bad_hyperparameters_are_reported_at_fit():
    X, y = make_classification(n_samples=40, n_features=4, random_state=0)
    with pytest.raises(ValueError, match="solver='lbfgs' takes full-batch steps"):
        BNMLPClassifier(solver="lbfgs").fit(X, y)
    with pytest.raises(ValueError, match="solver must be 'adam' or 'sgd'"):
        BNMLPClassifier(solver="rmsprop").fit(X, y)
    with pytest.raises(ValueError, match="activation must be one of"):
        BNMLPClassifier(activation="gelu").fit(X, y)
