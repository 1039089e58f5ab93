"""scikit-learn estimators: MLPClassifier and MLPRegressor with Batch Norm in every hidden layer.

    from bnnet.sklearn import BNMLPClassifier
    clf = BNMLPClassifier(hidden_layer_sizes=(64, 64), early_stopping=True, random_state=0).fit(X, y)
    clf.predict_proba(X_test)

They take scikit-learn's MLPClassifier / MLPRegressor parameters under the same names and with the same
meaning (solver "adam" or "sgd", alpha, batch_size="auto", learning_rate schedules, max_iter, tol,
n_iter_no_change, early_stopping, warm_start, ...), set the same fitted attributes (loss_curve_,
best_loss_, validation_scores_, coefs_, intercepts_, n_iter_, t_, ...), offer partial_fit,
predict_log_proba, multilabel and multi-output targets and fit(sample_weight=), and warn with
ConvergenceWarning when max_iter ends the fit. Where Batch Norm changes things, said here once:

    - solver="lbfgs" is refused: L-BFGS takes full-batch steps, and Batch Norm's statistics are
      mini-batch statistics.
    - activation="identity" is refused: the network would be linear.
    - coefs_ are the Linear layers' weights; a Linear before a BatchNorm has no bias, so its
      entry in intercepts_ is zeros (beta plays its part).
    - solver="sgd" with momentum runs classic momentum (nesterovs_momentum=True warns).
    - loss_curve_ holds the data loss of each epoch (scikit-learn adds the alpha penalty to it).

Extra parameters: batchnorm=True (False: plain MLP), dtype="float64". Needs scikit-learn
(pip install ".[sklearn]" in the checkout).
"""

import warnings

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import accuracy_score, r2_score
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import LabelBinarizer
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import type_of_target, unique_labels
from sklearn.utils.validation import _check_sample_weight, check_is_fitted, column_or_1d, validate_data

from . import functional as F
from .callbacks import Callback, model_arrays, set_model_arrays
from .layers import Linear
from .model import mlp
from .optim import SGD, Adam, Momentum
from .train import fit

_ACTIVATIONS = {"relu": "relu", "logistic": "sigmoid", "tanh": "tanh", "sigmoid": "sigmoid", "leaky_relu": "leaky_relu"}


class _BNMLP(BaseEstimator):
    """Shared by both estimators: hyperparameters (checked in one place), the network, training."""

    def __init__(
        self,
        hidden_layer_sizes=(100,),
        activation="relu",
        *,
        solver="adam",
        alpha=0.0001,
        batch_size="auto",
        learning_rate="constant",
        learning_rate_init=0.001,
        power_t=0.5,
        max_iter=200,
        shuffle=True,
        random_state=None,
        tol=1e-4,
        verbose=False,
        warm_start=False,
        momentum=0.9,
        nesterovs_momentum=True,
        early_stopping=False,
        validation_fraction=0.1,
        beta_1=0.9,
        beta_2=0.999,
        epsilon=1e-8,
        n_iter_no_change=10,
        max_fun=15000,
        batchnorm=True,
        dtype="float64",
    ):
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.solver = solver
        self.alpha = alpha
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.learning_rate_init = learning_rate_init
        self.power_t = power_t
        self.max_iter = max_iter
        self.shuffle = shuffle
        self.random_state = random_state
        self.tol = tol
        self.verbose = verbose
        self.warm_start = warm_start
        self.momentum = momentum
        self.nesterovs_momentum = nesterovs_momentum
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.n_iter_no_change = n_iter_no_change
        self.max_fun = max_fun
        self.batchnorm = batchnorm
        self.dtype = dtype

    # -- checking the hyperparameters, in one place ----------------------------------------------

    def _check_hyperparameters(self):
        name = type(self).__name__

        def bad(param, expected):
            raise ValueError(f"{name}: {param} must be {expected}, got {getattr(self, param)!r}")

        def number(param, low, high=np.inf, low_open=False, high_open=False):
            v = getattr(self, param)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not np.isfinite(v):
                bad(param, "a number")
            if v < low or (low_open and v == low) or v > high or (high_open and v == high):
                bad(param, f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}")

        if self.solver == "lbfgs":
            raise ValueError(
                f"{name}: solver='lbfgs' takes full-batch steps, which Batch Norm's mini-batch statistics do not "
                "allow; use solver='adam' or 'sgd'"
            )
        if self.solver not in ("adam", "sgd"):
            bad("solver", "'adam' or 'sgd'")
        if self.activation == "identity":
            raise ValueError(
                f"{name}: activation='identity' makes the network linear; use 'relu', 'tanh' or 'logistic'"
            )
        if self.activation not in _ACTIVATIONS:
            bad("activation", f"one of {', '.join(_ACTIVATIONS)}")
        if self.learning_rate not in ("constant", "invscaling", "adaptive"):
            bad("learning_rate", "'constant', 'invscaling' or 'adaptive'")
        sizes = [self.hidden_layer_sizes] if np.isscalar(self.hidden_layer_sizes) else list(self.hidden_layer_sizes)
        if not all(isinstance(h, (int, np.integer)) and not isinstance(h, bool) and h > 0 for h in sizes):
            bad("hidden_layer_sizes", "positive integers")
        if self.batch_size != "auto" and (
            isinstance(self.batch_size, bool)
            or not isinstance(self.batch_size, (int, np.integer))
            or self.batch_size < 1
        ):
            bad("batch_size", "'auto' or an integer >= 1")
        for param in ("max_iter", "n_iter_no_change", "max_fun"):
            v = getattr(self, param)
            if param == "n_iter_no_change" and v == np.inf:
                continue  # (never stop on a stall)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                bad(param, "an integer >= 1" + (" or np.inf" if param == "n_iter_no_change" else ""))
        number("alpha", 0)
        number("learning_rate_init", 0, low_open=True)
        number("power_t", 0)
        number("tol", 0)
        number("momentum", 0, 1)
        number("validation_fraction", 0, 1, low_open=True, high_open=True)
        for param in ("beta_1", "beta_2"):
            number(param, 0, 1, high_open=True)
        number("epsilon", 0, low_open=True)
        for param in ("shuffle", "verbose", "warm_start", "nesterovs_momentum", "early_stopping", "batchnorm"):
            if not isinstance(getattr(self, param), (bool, np.bool_)):
                bad(param, "True or False")
        if self.dtype not in ("float32", "float64"):
            bad("dtype", "'float32' or 'float64'")
        return sizes

    # -- training --------------------------------------------------------------------------------

    def _fit(self, X, y, incremental, sample_weight=None, classes=None):
        hidden = self._check_hyperparameters()
        first = not hasattr(self, "model_") or not (self.warm_start or incremental)
        X, y = validate_data(self, X, y, reset=first, dtype=[np.float64, np.float32], multi_output=True)
        if y.ndim == 2 and y.shape[1] == 1:  # a column vector: one target (scikit-learn warns, and so do we)
            y = column_or_1d(y, warn=True)
        targets, loss = self._encode(y, first, classes)
        n_outputs = 1 if targets.ndim == 1 and loss != "softmax_cross_entropy" else self._n_model_outputs(targets)
        weights = None if sample_weight is None else _check_sample_weight(sample_weight, X, dtype=np.float64)
        if len(X) < 2 and self.batchnorm:
            raise ValueError(f"{type(self).__name__}: got {len(X)} sample(s); BatchNorm needs n_samples >= 2 to train")
        rng = check_random_state(self.random_state)
        if first:
            seed = int(rng.randint(2**31 - 1))
            init = "he" if _ACTIVATIONS[self.activation] in ("relu", "leaky_relu") else "xavier"
            sizes = [X.shape[1], *hidden, n_outputs]
            self.model_ = mlp(
                sizes, activation=_ACTIVATIONS[self.activation], batchnorm=self.batchnorm, init=init, seed=seed,
                dtype=self.dtype,
            )  # fmt: skip
            self._optimizer = self._new_optimizer()
            self.t_, self.loss_curve_, self._seeds = 0, [], np.random.RandomState(seed)
            self.best_loss_, self.validation_scores_, self.best_validation_score_ = np.inf, None, None
            if self.early_stopping:
                self.best_loss_, self.validation_scores_, self.best_validation_score_ = None, [], -np.inf
        if first or not incremental:
            self.n_iter_, self._no_improvement_count = 0, 0  # (the epochs of this fit; partial_fit adds up)
        elif self.model_.layers[-1].out_features != n_outputs:
            raise ValueError(
                f"{type(self).__name__}: the data has {n_outputs} outputs but the fitted network "
                f"{self.model_.layers[-1].out_features}"
            )
        validation = None
        if self.early_stopping and not incremental:
            stratify = targets if loss == "softmax_cross_entropy" or (targets.ndim == 1 and loss != "mse") else None
            split = train_test_split(
                np.arange(len(X)), random_state=self._seeds.randint(2**31 - 1), test_size=self.validation_fraction,
                stratify=stratify,
            )  # fmt: skip
            train_rows, val_rows = split
            validation = (X[val_rows], y[val_rows])
            X, targets = X[train_rows], targets[train_rows]
            weights = None if weights is None else weights[train_rows]
        batch_size = min(200, len(X)) if self.batch_size == "auto" else min(self.batch_size, len(X))
        self._optimizer.weight_decay = self.alpha / batch_size  # scikit-learn's penalty alpha/2 ||W||^2 per mini-batch
        monitor = _MLPRules(self, validation, incremental, len(X))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*leave a last mini-batch of one row.*")
            self.history_ = fit(
                self.model_, X, targets, optimizer=self._optimizer, loss=loss,
                epochs=1 if incremental else self.max_iter, batch_size=batch_size,
                seed=int(self._seeds.randint(2**31 - 1)), shuffle=bool(self.shuffle), progress=bool(self.verbose),
                sample_weight=weights, callbacks=[monitor],
            )  # fmt: skip
        if monitor.best_weights is not None:  # early stopping: the best validation score's parameters
            set_model_arrays(self.model_, monitor.best_weights)
        self._set_weight_attributes(n_outputs)
        if not incremental and not monitor.stopped:
            warnings.warn(
                f"{type(self).__name__}: stochastic optimizer reached max_iter ({self.max_iter}) and the "
                "optimization has not converged yet",
                ConvergenceWarning,
                stacklevel=3,
            )
        return self

    def _new_optimizer(self):
        if self.solver == "adam":
            return Adam(self.learning_rate_init, beta1=self.beta_1, beta2=self.beta_2, eps=self.epsilon)
        if self.momentum > 0:
            if self.nesterovs_momentum:
                warnings.warn(
                    f"{type(self).__name__}: nesterovs_momentum=True runs as classic momentum in bnnet",
                    UserWarning,
                    stacklevel=4,
                )
            # classic momentum v = mu v - lr g equals bnnet's Momentum(lr / (1 - mu), mu) at a constant rate
            return Momentum(self.learning_rate_init / (1 - self.momentum), beta=self.momentum)
        return SGD(self.learning_rate_init)

    def _set_weight_attributes(self, n_outputs):
        linears = [layer for layer in self.model_.layers if isinstance(layer, Linear)]
        self.coefs_ = [layer.params["W"] for layer in linears]
        self.intercepts_ = [
            layer.params["b"] if layer.bias else np.zeros(layer.out_features, layer.dtype) for layer in linears
        ]
        self.n_layers_ = len(linears) + 1
        self.n_outputs_ = n_outputs
        self.loss_ = self.loss_curve_[-1] if self.loss_curve_ else None

    def _outputs(self, X):
        check_is_fitted(self, "model_")
        X = validate_data(self, X, reset=False, dtype=[np.float64, np.float32])
        return self.model_.predict(X).astype(np.float64)

    def _rate(self):
        """The optimizer's rate as scikit-learn's learning_rate (Momentum holds lr / (1 - momentum))."""
        opt = self._optimizer
        return opt.lr * (1 - opt.beta) if isinstance(opt, Momentum) else opt.lr

    def _set_rate(self, value):
        opt = self._optimizer
        opt.lr = value / (1 - opt.beta) if isinstance(opt, Momentum) else value


class _MLPRules(Callback):
    """scikit-learn's rules after each epoch: the loss curve, the validation score (early_stopping), the
    no-improvement count against tol, the 'adaptive' and 'invscaling' learning rates, and stopping."""

    def __init__(self, est, validation, incremental, n_rows):
        self.est, self.validation, self.incremental, self.n_rows = est, validation, incremental, n_rows
        self.best_weights, self.stopped = None, False

    def on_epoch_end(self, epoch, logs):
        est = self.est
        est.n_iter_ += 1
        est.t_ += self.n_rows
        est.loss_curve_.append(logs["loss"])
        if self.validation is not None and est.validation_scores_ is not None:
            score = est._score_network(*self.validation)
            est.validation_scores_.append(score)
            est._no_improvement_count = (
                est._no_improvement_count + 1 if score < est.best_validation_score_ + est.tol else 0
            )
            if score > est.best_validation_score_:
                est.best_validation_score_ = score
                self.best_weights = model_arrays(est.model_)
        elif est.best_loss_ is not None:
            loss = logs["loss"]
            est._no_improvement_count = est._no_improvement_count + 1 if loss > est.best_loss_ - est.tol else 0
            est.best_loss_ = min(est.best_loss_, loss)
        if est.solver == "sgd" and est.learning_rate == "invscaling":
            est._set_rate(est.learning_rate_init / (est.t_ + 1) ** est.power_t)
        if self.incremental or est._no_improvement_count <= est.n_iter_no_change:
            return
        if est.solver == "sgd" and est.learning_rate == "adaptive" and est._rate() > 1e-6:
            est._set_rate(est._rate() / 5)  # a stall lowers the rate instead of stopping
            est._no_improvement_count = 0
            return
        self.stopped = self.training.stop = True


class BNMLPClassifier(ClassifierMixin, _BNMLP):
    """scikit-learn's MLPClassifier with Batch Norm in every hidden layer (see the module docstring).

    Binary targets train one sigmoid output (out_activation_ "logistic"), multiclass targets a softmax
    over n_classes outputs ("softmax"), multilabel indicator targets one sigmoid per label.
    Fitted attributes: classes_, loss_, best_loss_, loss_curve_, validation_scores_,
    best_validation_score_, t_, coefs_, intercepts_, n_features_in_, n_iter_, n_layers_, n_outputs_,
    out_activation_, and model_ (the bnnet Sequential), history_ (bnnet.fit's history of the last fit).
    """

    def fit(self, X, y, sample_weight=None):
        """Train on (X, y) from scratch (or on from the fitted network with warm_start=True)."""
        return self._fit(X, y, incremental=False, sample_weight=sample_weight)

    def partial_fit(self, X, y, classes=None, sample_weight=None):
        """One epoch over (X, y) from the current network. classes: every class, needed at the first call."""
        if not hasattr(self, "model_"):
            if classes is None:
                raise ValueError("BNMLPClassifier: classes must be passed on the first call to partial_fit")
        elif classes is not None and not np.array_equal(unique_labels(classes), self.classes_):
            raise ValueError(f"BNMLPClassifier: classes={classes!r} is not the same as classes_={self.classes_!r}")
        return self._fit(X, y, incremental=True, sample_weight=sample_weight, classes=classes)

    def _encode(self, y, fresh, classes=None):
        """(targets, loss name) for bnnet.fit; learns classes_ when fresh (from `classes` when given:
        partial_fit's first call)."""
        if fresh:
            multilabel = type_of_target(y).startswith("multilabel")
            self._binarizer = LabelBinarizer().fit(y if classes is None or multilabel else classes)
            self.classes_ = self._binarizer.classes_
        if fresh and len(self.classes_) < 2 and self._binarizer.y_type_ != "multilabel-indicator":
            raise ValueError(
                f"BNMLPClassifier: needs samples of at least 2 classes, got 1 class ({self.classes_[0]!r})"
            )
        if self._binarizer.y_type_ != "multilabel-indicator" and not set(unique_labels(y)) <= set(self.classes_):
            raise ValueError(
                f"BNMLPClassifier: y holds labels not in classes_ ({self.classes_!r}); warm_start and partial_fit "
                "keep the classes of the first fit"
            )
        kind = self._binarizer.y_type_
        encoded = self._binarizer.transform(y)
        if kind == "multiclass":
            self.out_activation_ = "softmax"
            return np.argmax(encoded, axis=1), "softmax_cross_entropy"
        self.out_activation_ = "logistic"
        return (encoded[:, 0] if kind == "binary" else encoded).astype(np.float64), "binary_cross_entropy"

    def _n_model_outputs(self, targets):
        return len(self.classes_) if targets.ndim == 1 else targets.shape[1]

    def _score_network(self, X, y):
        return accuracy_score(y, self.predict(X))

    def predict_proba(self, X):
        """Class probabilities: (N, n_classes) in the order of classes_ ((N, n_labels) for multilabel)."""
        z = self._outputs(X)
        if self.out_activation_ == "softmax":
            return F.softmax(z)
        p = F.sigmoid(z)
        return np.hstack([1 - p, p]) if self._binarizer.y_type_ == "binary" else p

    def predict_log_proba(self, X):
        """log(predict_proba(X))."""
        with np.errstate(divide="ignore"):
            return np.log(self.predict_proba(X))

    def predict(self, X):
        z = self._outputs(X)  # first: it raises NotFittedError before classes_ exists
        if self.out_activation_ == "softmax":
            return self.classes_[np.argmax(z, axis=1)]
        return self._binarizer.inverse_transform((z > 0).astype(int))

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_label = True
        return tags


class BNMLPRegressor(RegressorMixin, _BNMLP):
    """scikit-learn's MLPRegressor with Batch Norm in every hidden layer (see the module docstring).

    The targets are standardized for training (y_mean_, y_scale_ per output) and predictions mapped
    back; y may be (N,) or (N, n_outputs). Fitted attributes as BNMLPClassifier's (out_activation_
    "identity"), and y_mean_, y_scale_.
    """

    def fit(self, X, y, sample_weight=None):
        return self._fit(X, y, incremental=False, sample_weight=sample_weight)

    def partial_fit(self, X, y, sample_weight=None):
        """One epoch over (X, y) from the current network."""
        return self._fit(X, y, incremental=True, sample_weight=sample_weight)

    def _encode(self, y, fresh, classes=None):
        y = np.asarray(y, dtype=np.float64)
        if fresh:
            self.y_mean_ = y.mean(axis=0)
            scale = y.std(axis=0)
            self.y_scale_ = np.where(scale > 0, scale, 1.0)
            self.out_activation_ = "identity"
        return (y - self.y_mean_) / self.y_scale_, "mse"

    def _n_model_outputs(self, targets):
        return 1 if targets.ndim == 1 else targets.shape[1]

    def _score_network(self, X, y):
        return r2_score(y, self.predict(X))

    def predict(self, X):
        z = self._outputs(X) * self.y_scale_ + self.y_mean_
        return z[:, 0] if np.ndim(self.y_mean_) == 0 else z

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags
