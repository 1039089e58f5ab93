"""Losses: forward(outputs, targets, sample_weight=None) -> float (mean over the batch),
backward() -> dL/d(outputs).

With sample_weight (N,) the mean becomes the weighted mean sum_i w_i L_i / sum_i w_i, scikit-learn's
convention: a weight of 0 ignores a row, an integer weight k counts a row k times, and weights that
sum to 0 give a loss of 0 with a zero gradient.

Each loss also knows how to turn outputs into predictions (`predict_labels`)
and how to score them (`accuracy`, None for regression).
"""

import numpy as np

from . import functional as F
from . import ops
from ._checks import as_array, as_float_array
from .errors import HyperparameterError, InputError


class Loss:
    name = None
    has_accuracy = False  # classification losses report accuracy

    def __init__(self):
        self._grad = None

    def forward(self, outputs, targets, sample_weight=None):
        raise NotImplementedError

    def backward(self):
        """dL/d(outputs) of the last forward, same shape and dtype as the outputs."""
        if self._grad is None:
            raise InputError(f"{type(self).__name__}: backward() called before forward()")
        return self._grad

    def check_targets(self, targets, n_outputs=None):
        """Validate and convert targets (done once per fit, and on every forward)."""
        raise NotImplementedError

    def predict_labels(self, outputs):
        return outputs

    def accuracy(self, outputs, targets):
        return None

    @staticmethod
    def _outputs(outputs, owner):
        outputs = as_array(outputs, "outputs", owner)
        dtype = outputs.dtype.name if outputs.dtype.name in ("float32", "float64") else "float64"
        outputs = as_float_array(outputs, "outputs", owner, dtype)
        if outputs.ndim == 0 or outputs.shape[0] == 0:
            raise InputError(f"{owner}: outputs must have at least one row, got shape {outputs.shape}")
        ops.check_finite(outputs, "outputs", owner)
        return outputs

    @staticmethod
    def _weights(sample_weight, n, owner):
        """None, or the (N,) float64 weights divided by their sum (all zeros when they sum to 0)."""
        if sample_weight is None:
            return None
        w = check_sample_weight(sample_weight, n, owner)
        total = w.sum()
        return w / total if total > 0 else w

    @staticmethod
    def _same_length(outputs, targets, owner):
        if len(targets) != len(outputs):
            raise InputError(
                f"{owner}: outputs have {len(outputs)} rows but targets have {len(targets)}; pass one target per row"
            )

    def __repr__(self):
        return f"{type(self).__name__}()"


class SoftmaxCrossEntropy(Loss):
    """L = -(1/N) sum_i log softmax(z_i)[y_i].   outputs: logits (N, C); targets: integer labels (N,) in [0, C)."""

    name = "softmax_cross_entropy"
    has_accuracy = True

    def check_targets(self, targets, n_outputs=None):
        y = as_array(targets, "targets", type(self).__name__)
        if y.ndim != 1:
            raise InputError(
                f"{type(self).__name__}: targets must be 1-D integer class labels (N,), got shape {y.shape}"
            )
        if y.dtype.kind == "f":
            if not np.isfinite(y).all() or not np.array_equal(y, np.round(y)):
                raise InputError(f"{type(self).__name__}: targets must be integer class labels, got non-integer floats")
            y = y.astype(np.int64)
        elif y.dtype.kind not in "iu":
            raise InputError(f"{type(self).__name__}: targets must be integer class labels, got dtype {y.dtype}")
        if len(y) and (y.min() < 0 or (n_outputs is not None and y.max() >= n_outputs)):
            bad = y[(y < 0) | (y >= (n_outputs if n_outputs is not None else np.inf))][0]
            raise InputError(
                f"{type(self).__name__}: label {int(bad)} is out of range [0, {n_outputs}); "
                f"the model has {n_outputs} outputs, one per class"
            )
        return y.astype(np.intp, copy=False)

    def forward(self, outputs, targets, sample_weight=None):
        z = self._outputs(outputs, type(self).__name__)
        if z.ndim != 2:
            raise InputError(f"SoftmaxCrossEntropy: outputs must be logits of shape (N, C), got {z.shape}")
        y = self.check_targets(targets, z.shape[1])
        self._same_length(z, y, type(self).__name__)
        w = self._weights(sample_weight, len(z), type(self).__name__)
        if w is not None:
            loss, self._grad = F.softmax_cross_entropy(z, y, w)
            return loss
        self._grad = np.empty_like(z)  # (N, C), returned by backward()
        return ops.softmax_cross_entropy(z, y, self._grad)

    def predict_labels(self, outputs):
        return np.argmax(outputs, axis=1)

    def accuracy(self, outputs, targets):
        return float(np.mean(self.predict_labels(outputs) == targets))


class BinaryCrossEntropy(Loss):
    """Sigmoid cross-entropy from logits, summed over the K labels and averaged over the N rows:

        L = (1/N) sum_i sum_k max(z_ik, 0) - z_ik * y_ik + log(1 + exp(-|z_ik|))

    outputs: logits (N,), (N, 1) or (N, K) (K independent labels: multilabel classification, as
    scikit-learn's MLPClassifier scores it); targets: 0/1 (or probabilities in [0, 1]) of the same
    shape ((N,) and (N, 1) interchangeably).
    """

    name = "binary_cross_entropy"
    has_accuracy = True

    def check_targets(self, targets, n_outputs=None):
        y = np.asarray(targets)
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.ndim not in (1, 2) or (y.ndim == 2 and n_outputs is not None and y.shape[1] != n_outputs):
            raise InputError(
                f"BinaryCrossEntropy: targets must have shape (N,), (N, 1) or (N, K) with K the model's outputs "
                f"({n_outputs}), got {y.shape}"
            )
        y = as_float_array(y, "targets", "BinaryCrossEntropy", "float64")
        ops.check_finite(y, "targets", "BinaryCrossEntropy")
        if y.size and (y.min() < 0 or y.max() > 1):
            raise InputError(
                f"BinaryCrossEntropy: targets must be in [0, 1] (0/1 labels), got values in [{y.min()}, {y.max()}]"
            )
        return y

    def forward(self, outputs, targets, sample_weight=None):
        z = self._outputs(outputs, "BinaryCrossEntropy")
        if z.ndim not in (1, 2):
            raise InputError(f"BinaryCrossEntropy: outputs must be logits of shape (N,) or (N, K), got {z.shape}")
        y = self.check_targets(targets)
        self._same_length(z, y, "BinaryCrossEntropy")
        if y.size != z.size:
            raise InputError(f"BinaryCrossEntropy: outputs have shape {z.shape} but targets {np.shape(targets)}")
        w = self._weights(sample_weight, len(z), "BinaryCrossEntropy")
        loss, self._grad = F.sigmoid_binary_cross_entropy(z, y.reshape(z.shape).astype(z.dtype), w)
        return loss

    def predict_labels(self, outputs):
        """0/1 per label: (N,) for one label, (N, K) for K."""
        outputs = np.asarray(outputs)
        labels = (outputs > 0).astype(np.int64)
        return labels.reshape(len(outputs)) if outputs.ndim == 1 or outputs.shape[1] == 1 else labels

    def accuracy(self, outputs, targets):
        """The fraction of rows whose every label is right (scikit-learn's subset accuracy)."""
        labels = self.predict_labels(outputs)
        truth = (np.asarray(targets).reshape(labels.shape) > 0.5).astype(np.int64)
        return float(np.mean((labels == truth).reshape(len(labels), -1).all(axis=1)))


class MSE(Loss):
    """L = mean over every element of (outputs - targets)^2 (as torch.nn.MSELoss).

    outputs: (N, K); targets: (N, K), or (N,) when K = 1.
    """

    name = "mse"

    def check_targets(self, targets, n_outputs=None):
        y = np.asarray(targets)
        if y.ndim == 1:
            y = y[:, None]
        if y.ndim != 2 or (n_outputs is not None and y.shape[1] != n_outputs):
            raise InputError(
                f"MSE: targets must have shape (N, {n_outputs}) (or (N,) for one output), got {np.shape(targets)}"
            )
        y = as_float_array(y, "targets", "MSE", "float64")
        ops.check_finite(y, "targets", "MSE")
        return y

    def forward(self, outputs, targets, sample_weight=None):
        z = self._outputs(outputs, "MSE")
        if z.ndim == 1:
            z = z[:, None]
        y = self.check_targets(targets, z.shape[1])
        self._same_length(z, y, "MSE")
        w = self._weights(sample_weight, len(z), "MSE")
        loss, grad = F.mean_squared_error(z, y.astype(z.dtype), w)
        self._grad = grad.reshape(np.shape(outputs))
        return loss


def check_sample_weight(sample_weight, n, owner):
    """sample_weight as (n,) float64: finite, >= 0 (InputError naming what is wrong)."""
    w = as_float_array(sample_weight, "sample_weight", owner, "float64")
    if w.shape != (n,):
        raise InputError(f"{owner}: sample_weight must have shape ({n},), one weight per row, got {w.shape}")
    ops.check_finite(w, "sample_weight", owner)
    if n and w.min() < 0:
        raise InputError(f"{owner}: sample_weight must be >= 0, got {w.min()} at row {int(np.argmin(w))}")
    return w


def class_weights(class_weight, y, n_classes, owner):
    """Per-row weights (N,) from class_weight: "balanced" (n / (n_classes_present * count(class)), as
    scikit-learn's compute_class_weight) or a dict {class: weight} (classes not named weigh 1)."""
    y = np.asarray(y).astype(np.intp, copy=False)
    if isinstance(class_weight, str):
        if class_weight != "balanced":
            raise HyperparameterError(f"{owner}: class_weight must be 'balanced' or a dict, got {class_weight!r}")
        counts = np.bincount(y, minlength=n_classes)
        present = np.count_nonzero(counts)
        table = np.where(counts > 0, len(y) / (present * np.maximum(counts, 1)), 0.0)
        return table[y]
    if not isinstance(class_weight, dict):
        raise HyperparameterError(f"{owner}: class_weight must be 'balanced' or a dict, got {class_weight!r}")
    table = np.ones(n_classes)
    for c, w in class_weight.items():
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or not 0 <= c < n_classes:
            raise HyperparameterError(f"{owner}: class_weight key {c!r} is not a class label in [0, {n_classes})")
        if isinstance(w, bool) or not isinstance(w, (int, float, np.number)) or not np.isfinite(w) or w < 0:
            raise HyperparameterError(f"{owner}: class_weight[{c!r}] must be a number >= 0, got {w!r}")
        table[int(c)] = float(w)
    return table[y]


LOSSES = {cls.name: cls for cls in (SoftmaxCrossEntropy, BinaryCrossEntropy, MSE)}
_ALIASES = {"cross_entropy": "softmax_cross_entropy", "bce": "binary_cross_entropy", "mean_squared_error": "mse"}


def get_loss(loss):
    """A Loss instance from an instance or a name ('softmax_cross_entropy', 'binary_cross_entropy', 'mse')."""
    if isinstance(loss, Loss):
        return loss
    name = _ALIASES.get(loss, loss)
    if name not in LOSSES:
        raise HyperparameterError(f"loss must be a Loss or one of {sorted(LOSSES) + sorted(_ALIASES)}, got {loss!r}")
    return LOSSES[name]()
