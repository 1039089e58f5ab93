"""Mini-batch gradient descent, as the lecture writes it:

    for t in range(num_minibatches):
        logits = model.forward(X_t, train=True)     # BN replaces z by z~ in each hidden layer
        loss = loss_fn.forward(logits, y_t)
        model.backward(loss_fn.backward())          # dW, dgamma, dbeta
        opt.step(model)                             # W -= lr * dW, ... (or Momentum/RMSprop/Adam)

`fit` is that loop with shuffling, a progress bar and a history; `evaluate`
runs the model in eval mode.
"""
import warnings

import numpy as np
from tqdm.auto import tqdm

from ._checks import as_float_array, check_2d, check_finite, check_int
from .errors import InputError
from .losses import get_loss
from .model import has_batchnorm
from .optim import get_optimizer


def _check_data(model, X, y, loss, owner):
    X = as_float_array(X, "X", owner, model.dtype)
    check_2d(X, "X", owner, model.in_features)
    check_finite(X, "X", owner)
    n_out = next((l.out_features for l in reversed(model.layers) if hasattr(l, "out_features")), None)
    y = loss.check_targets(y, n_out)
    if len(y) != len(X):
        raise InputError(f"{owner}: X has {len(X)} rows but y has {len(y)}; pass one target per row of X")
    return X, y


def minibatches(n, batch_size, rng, drop_single=False):
    """Yield index arrays of one shuffled epoch: rng.permutation(n) cut into batch_size pieces.

    With drop_single, a trailing batch of one row is dropped (BatchNorm cannot
    train on it). Returns the batches as a list.
    """
    order = rng.permutation(n)
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    if drop_single and len(batches) > 1 and len(batches[-1]) == 1:
        batches.pop()
    return batches


def evaluate(model, X, y, loss="softmax_cross_entropy", batch_size=1024):
    """Eval-mode loss and accuracy: {"loss": float, "accuracy": float or None (regression)}."""
    loss = get_loss(loss)
    X, y = _check_data(model, X, y, loss, "evaluate")
    outputs = model.predict(X, batch_size=batch_size)
    return {"loss": loss.forward(outputs, y), "accuracy": loss.accuracy(outputs, y)}


def fit(model, X, y, *, optimizer="adam", loss="softmax_cross_entropy", epochs=10, batch_size=64, seed=None,
        validation_data=None, progress=True):
    """Train `model` on (X, y) by mini-batch gradient descent; return the history.

    Args:
        model: a Sequential (e.g. from bnnet.mlp).
        X: (N, in_features) inputs; cast to the model's dtype; must be finite.
        y: targets for `loss` (class labels (N,) for softmax cross-entropy).
        optimizer: an Optimizer, or a name ("sgd", "momentum", "rmsprop", "adam") with its default lr.
        loss: a Loss, or a name ("softmax_cross_entropy", "binary_cross_entropy", "mse").
        epochs: passes over the data (default 10). batch_size: rows per update (default 64).
        seed: seeds the shuffling; the same seed and model give the same run.
        validation_data: optional (X_val, y_val), evaluated in eval mode after every epoch.
        progress: show a tqdm progress bar with the running loss and accuracy.
    Returns:
        {"epoch": [1, ...], "loss": [...], "accuracy": [...], "val_loss": [...], "val_accuracy": [...]}.
        Train loss/accuracy of an epoch are the means over its mini-batches, in
        train mode (as Keras reports them); accuracy entries are None for regression.
    """
    loss_fn = get_loss(loss)
    opt = get_optimizer(optimizer)
    epochs = check_int("fit", "epochs", epochs, low=1)
    batch_size = check_int("fit", "batch_size", batch_size, low=1)
    X, y = _check_data(model, X, y, loss_fn, "fit")
    if validation_data is not None:
        Xv, yv = _check_data(model, *validation_data, loss_fn, "fit(validation_data)")
    bn = has_batchnorm(model)
    if bn and len(X) < 2:
        raise InputError("fit: a model with BatchNorm needs at least 2 training rows")
    if bn and batch_size < 2:
        raise InputError("fit: batch_size=1 cannot train BatchNorm (a batch of one has no variance); use batch_size >= 2")
    if bn and len(X) % batch_size == 1:
        warnings.warn(f"fit: {len(X)} rows with batch_size={batch_size} leave a last mini-batch of one row, "
                      "which BatchNorm cannot train on; it is dropped every epoch", stacklevel=2)

    rng = np.random.default_rng(seed)
    history = {"epoch": [], "loss": [], "accuracy": [], "val_loss": [], "val_accuracy": []}
    steps_per_epoch = len(minibatches(len(X), batch_size, np.random.default_rng(0), drop_single=bn))
    bar = tqdm(total=epochs * steps_per_epoch, disable=not progress, unit="step", dynamic_ncols=True)
    X_buf = np.empty((min(batch_size, len(X)), X.shape[1]), X.dtype)  # each mini-batch is gathered here
    try:
        for epoch in range(1, epochs + 1):
            bar.set_description(f"epoch {epoch}/{epochs}")
            total_loss, total_correct, seen = 0.0, 0.0, 0
            for idx in minibatches(len(X), batch_size, rng, drop_single=bn):
                X_t, y_t = np.take(X, idx, axis=0, out=X_buf[:len(idx)]), y[idx]
                logits = model.forward(X_t, train=True)
                batch_loss = loss_fn.forward(logits, y_t)
                model.backward(loss_fn.backward())
                opt.step(model)

                acc = loss_fn.accuracy(logits, y_t)
                total_loss += batch_loss * len(idx)
                total_correct += (acc or 0.0) * len(idx)
                seen += len(idx)
                bar.update(1)
                if bar.n % 10 == 0 or bar.n == bar.total:
                    bar.set_postfix(_postfix(total_loss / seen, acc and total_correct / seen), refresh=False)
            history["epoch"].append(epoch)
            history["loss"].append(total_loss / seen)
            history["accuracy"].append(total_correct / seen if acc is not None else None)
            if validation_data is not None:
                val = evaluate(model, Xv, yv, loss_fn)
                history["val_loss"].append(val["loss"])
                history["val_accuracy"].append(val["accuracy"])
                bar.set_postfix({**_postfix(history["loss"][-1], history["accuracy"][-1]),
                                 **_postfix(val["loss"], val["accuracy"], "val_")})
    finally:
        bar.close()
    return history


def _postfix(loss, acc, prefix=""):
    out = {f"{prefix}loss": f"{loss:.4f}"}
    if acc is not None:
        out[f"{prefix}acc"] = f"{acc:.4f}"
    return out
