"""scikit-learn estimators: a batch-normalized MLP as a classifier and as a regressor.

    from bnnet.sklearn import BNMLPClassifier
    clf = BNMLPClassifier(hidden_layer_sizes=(64, 64), max_epochs=30).fit(X, y)
    clf.predict_proba(X_test)

They follow scikit-learn's conventions (hyperparameters stored as given and
validated in fit, fitted attributes ending in "_", input checked by sklearn's
own validate_data) and pass its parametrize_with_checks suite. Needs
scikit-learn (pip install ".[sklearn]" in the checkout).
"""

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, column_or_1d, validate_data

from . import functional as F
from .model import mlp
from .optim import OPTIMIZERS
from .train import fit


class _BNMLP(BaseEstimator):
    """Shared by both estimators: hyperparameters, network construction and training."""

    def __init__(
        self,
        hidden_layer_sizes=(100,),
        activation="relu",
        batchnorm=True,
        optimizer="adam",
        learning_rate=1e-3,
        batch_size=64,
        max_epochs=50,
        random_state=None,
        dtype="float64",
        verbose=False,
    ):
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.batchnorm = batchnorm
        self.optimizer = optimizer
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.random_state = random_state
        self.dtype = dtype
        self.verbose = verbose

    def _fit_network(self, X, targets, n_outputs, loss):
        if len(X) < 2 and self.batchnorm:
            raise ValueError(f"{type(self).__name__}: got 1 sample; BatchNorm needs n_samples >= 2 to train")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"{type(self).__name__}: optimizer must be one of {sorted(OPTIMIZERS)}, got {self.optimizer!r}"
            )
        hidden = [self.hidden_layer_sizes] if np.isscalar(self.hidden_layer_sizes) else list(self.hidden_layer_sizes)
        # an int is used as the seed itself; None or a RandomState draws one (scikit-learn's convention)
        seed = (
            self.random_state
            if isinstance(self.random_state, (int, np.integer))
            else check_random_state(self.random_state).randint(2**31 - 1)
        )
        init = "he" if self.activation in ("relu", "leaky_relu") else "xavier"
        self.model_ = mlp(
            [X.shape[1], *hidden, n_outputs],
            activation=self.activation,
            batchnorm=self.batchnorm,
            init=init,
            seed=int(seed),
            dtype=self.dtype,
        )
        opt = OPTIMIZERS[self.optimizer](self.learning_rate)
        batch_size = min(self.batch_size, len(X)) if isinstance(self.batch_size, (int, np.integer)) else self.batch_size
        self.history_ = fit(
            self.model_,
            X,
            targets,
            optimizer=opt,
            loss=loss,
            epochs=self.max_epochs,
            batch_size=batch_size,
            seed=int(seed),
            progress=self.verbose,
        )
        self.n_iter_ = self.max_epochs
        return self

    def _outputs(self, X):
        check_is_fitted(self, "model_")
        X = validate_data(self, X, reset=False, dtype=[np.float64, np.float32])
        return self.model_.predict(X)


class BNMLPClassifier(ClassifierMixin, _BNMLP):
    """Multilayer perceptron with BatchNorm in every hidden layer, trained with softmax cross-entropy.

    Parameters: hidden_layer_sizes=(100,), activation="relu" ("relu", "leaky_relu", "sigmoid",
    "tanh"), batchnorm=True, optimizer="adam" ("sgd", "momentum", "rmsprop", "adam"),
    learning_rate=1e-3, batch_size=64, max_epochs=50, random_state=None (int for a
    reproducible fit), dtype="float64", verbose=False (progress bar).
    Fitted attributes: classes_, n_features_in_, model_ (a bnnet Sequential), history_, n_iter_.
    """

    def fit(self, X, y):
        X, y = validate_data(self, X, y, dtype=[np.float64, np.float32])
        y = column_or_1d(y, warn=True)
        check_classification_targets(y)
        self.classes_, encoded = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(
                f"BNMLPClassifier: needs samples of at least 2 classes, got 1 class ({self.classes_[0]!r})"
            )
        return self._fit_network(X, encoded, len(self.classes_), "softmax_cross_entropy")

    def predict_proba(self, X):
        """Class probabilities (N, n_classes), in the order of classes_."""
        return F.softmax(self._outputs(X).astype(np.float64))

    def predict(self, X):
        outputs = self._outputs(X)  # first: it raises NotFittedError before classes_ exists
        return self.classes_[np.argmax(outputs, axis=1)]


class BNMLPRegressor(RegressorMixin, _BNMLP):
    """Multilayer perceptron with BatchNorm in every hidden layer, trained with mean squared error.

    The target is standardized for training (y_mean_, y_scale_) and predictions
    are mapped back. Parameters as BNMLPClassifier.
    Fitted attributes: n_features_in_, model_, history_, n_iter_, y_mean_, y_scale_.
    """

    def fit(self, X, y):
        X, y = validate_data(self, X, y, dtype=[np.float64, np.float32], y_numeric=True)
        y = column_or_1d(y, warn=True).astype(np.float64)
        self.y_mean_ = float(y.mean())
        self.y_scale_ = float(y.std()) or 1.0
        return self._fit_network(X, (y - self.y_mean_) / self.y_scale_, 1, "mse")

    def predict(self, X):
        return self._outputs(X)[:, 0].astype(np.float64) * self.y_scale_ + self.y_mean_
