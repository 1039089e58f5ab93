"""Losses: forward(outputs, targets) -> float (mean over the batch), backward() -> dL/d(outputs).

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

    def forward(self, outputs, targets):
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
        return outputs

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

    def forward(self, outputs, targets):
        z = self._outputs(outputs, type(self).__name__)
        if z.ndim != 2:
            raise InputError(f"SoftmaxCrossEntropy: outputs must be logits of shape (N, C), got {z.shape}")
        y = self.check_targets(targets, z.shape[1])
        self._same_length(z, y, type(self).__name__)
        self._grad = np.empty_like(z)  # (N, C), returned by backward()
        return ops.softmax_cross_entropy(z, y, self._grad)

    def predict_labels(self, outputs):
        return np.argmax(outputs, axis=1)

    def accuracy(self, outputs, targets):
        return float(np.mean(self.predict_labels(outputs) == targets))


class BinaryCrossEntropy(Loss):
    """Sigmoid cross-entropy from logits: L = (1/N) sum max(z,0) - z*y + log(1+exp(-|z|)).

    outputs: logits (N,) or (N, 1); targets: 0/1 (or probabilities in [0, 1]) of shape (N,) or (N, 1).
    """

    name = "binary_cross_entropy"
    has_accuracy = True

    def check_targets(self, targets, n_outputs=None):
        y = np.asarray(targets)
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.ndim != 1:
            raise InputError(f"BinaryCrossEntropy: targets must have shape (N,) or (N, 1), got {y.shape}")
        y = as_float_array(y, "targets", "BinaryCrossEntropy", "float64")
        ops.check_finite(y, "targets", "BinaryCrossEntropy")
        if len(y) and (y.min() < 0 or y.max() > 1):
            raise InputError(
                f"BinaryCrossEntropy: targets must be in [0, 1] (0/1 labels), got values in [{y.min()}, {y.max()}]"
            )
        return y

    def forward(self, outputs, targets):
        z = self._outputs(outputs, "BinaryCrossEntropy")
        if not (z.ndim == 1 or (z.ndim == 2 and z.shape[1] == 1)):
            raise InputError(f"BinaryCrossEntropy: outputs must be logits of shape (N,) or (N, 1), got {z.shape}")
        y = self.check_targets(targets)
        self._same_length(z, y, "BinaryCrossEntropy")
        loss, self._grad = F.sigmoid_binary_cross_entropy(z, y.reshape(z.shape).astype(z.dtype))
        return loss

    def predict_labels(self, outputs):
        return (np.asarray(outputs).reshape(len(outputs)) > 0).astype(np.int64)

    def accuracy(self, outputs, targets):
        return float(np.mean(self.predict_labels(outputs) == (np.asarray(targets).reshape(len(outputs)) > 0.5)))


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

    def forward(self, outputs, targets):
        z = self._outputs(outputs, "MSE")
        if z.ndim == 1:
            z = z[:, None]
        y = self.check_targets(targets, z.shape[1])
        self._same_length(z, y, "MSE")
        loss, grad = F.mean_squared_error(z, y.astype(z.dtype))
        self._grad = grad.reshape(np.shape(outputs))
        return loss


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
