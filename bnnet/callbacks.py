"""Callbacks: code that `fit` runs at the start, after every epoch and at the end of training.

    history = bnnet.fit(model, X, y, validation_split=0.2,
                        callbacks=[EarlyStopping(patience=5, restore_best_weights=True)])

A callback is a small object with three hooks. `fit` sets `callback.training` (a Training: the
model, the optimizer, the history, and `stop`, which a callback sets to end the run after the
current epoch) before calling the first one:

    on_train_begin()            before the first epoch (state is reset here)
    on_epoch_end(epoch, logs)   epoch counts from 1; logs = {"loss", "accuracy", "val_loss",
                                "val_accuracy", "lr"} of that epoch (accuracy None for regression)
    on_train_end()              after the last epoch, or after a callback stopped the run

A callback that keeps state across epochs returns it from `state_dict()` as (JSON-serializable
values, {name: array}); fit stores both in its checkpoints, so that a resumed run stops at the same
epoch, with the same numbers, as an uninterrupted one.
"""

import math

import numpy as np

from ._checks import check_int, check_number
from .device import to_host
from .errors import CheckpointError, HyperparameterError

MONITORS = ("loss", "accuracy", "val_loss", "val_accuracy")


class Training:
    """What callbacks see of a run: model, optimizer, history (fit's), is_root (the process that
    writes files), and stop (set it to True to end the run after this epoch)."""

    def __init__(self, model, optimizer, history, is_root=True):
        self.model, self.optimizer, self.history, self.is_root = model, optimizer, history, is_root
        self.stop = False


class Callback:
    """Base class: every hook does nothing."""

    training = None  # set by fit before on_train_begin

    def on_train_begin(self):
        pass

    def on_epoch_end(self, epoch, logs):
        pass

    def on_train_end(self):
        pass

    def state_dict(self):
        """(values, arrays) to save in a checkpoint: a JSON-serializable dict and {name: array}."""
        return {}, {}

    def load_state_dict(self, values, arrays, source):
        """Restore what state_dict returned; `source` names the file in errors."""

    def check_logs(self, has_validation, has_accuracy):
        """HyperparameterError when the run will not log what this callback reads (checked before training)."""


class _Monitor(Callback):
    """A callback that watches one logged value for improvement (mode "min", "max" or "auto")."""

    def __init__(self, monitor, mode, min_delta):
        owner = type(self).__name__
        if monitor not in MONITORS:
            raise HyperparameterError(f"{owner}: monitor must be one of {', '.join(MONITORS)}, got {monitor!r}")
        if mode not in ("auto", "min", "max"):
            raise HyperparameterError(f"{owner}: mode must be 'auto', 'min' or 'max', got {mode!r}")
        self.monitor = monitor
        self.mode = ("max" if "accuracy" in monitor else "min") if mode == "auto" else mode
        self.min_delta = check_number(owner, "min_delta", min_delta, low=0)
        self.best = None

    def check_logs(self, has_validation, has_accuracy):
        owner = type(self).__name__
        if self.monitor.startswith("val_") and not has_validation:
            raise HyperparameterError(
                f"{owner}: monitor={self.monitor!r} needs validation data; give fit validation_data or validation_split"
            )
        if "accuracy" in self.monitor and not has_accuracy:
            raise HyperparameterError(f"{owner}: monitor={self.monitor!r}, but this loss has no accuracy")

    def improved(self, value):
        """Whether `value` beats the best so far by more than min_delta."""
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def value(self, logs):
        value = logs[self.monitor]
        return float(value) if value is not None and math.isfinite(value) else None


class EarlyStopping(_Monitor):
    """Stop when `monitor` has not improved for `patience` epochs in a row.

    Args:
        monitor: "val_loss" (default), "val_accuracy", "loss" or "accuracy".
        patience: epochs without improvement before the run stops (default 0: the first one).
        min_delta: an improvement must exceed this (default 0).
        mode: "auto" (default: max for accuracies, min for losses), "min" or "max".
        restore_best_weights: at the end of training, put back the parameters and running statistics
            of the best epoch (default False). The optimizer state stays that of the last epoch.

    After training: best (the best value), best_epoch, stopped_epoch (0 if it never stopped the run).
    """

    def __init__(self, monitor="val_loss", patience=0, min_delta=0.0, mode="auto", restore_best_weights=False):
        super().__init__(monitor, mode, min_delta)
        self.patience = check_int("EarlyStopping", "patience", patience, low=0)
        if not isinstance(restore_best_weights, bool):
            raise HyperparameterError(
                f"EarlyStopping: restore_best_weights must be True or False, got {restore_best_weights!r}"
            )
        self.restore_best_weights = restore_best_weights
        self.on_train_begin()

    def on_train_begin(self):
        self.best, self.best_epoch, self.stopped_epoch, self.wait = None, 0, 0, 0
        self.best_weights = None  # {"params/<name>" or "buffers/<name>": host copy}

    def on_epoch_end(self, epoch, logs):
        value = self.value(logs)
        if value is not None and self.improved(value):
            self.best, self.best_epoch, self.wait = value, epoch, 0
            if self.restore_best_weights:
                self.best_weights = model_arrays(self.training.model)
            return
        self.wait += 1
        if self.wait >= self.patience:
            self.stopped_epoch = epoch
            self.training.stop = True

    def on_train_end(self):
        if self.restore_best_weights and self.best_weights is not None:
            set_model_arrays(self.training.model, self.best_weights)

    def state_dict(self):
        values = {k: getattr(self, k) for k in ("best", "best_epoch", "stopped_epoch", "wait")}
        return values, dict(self.best_weights or {})

    def load_state_dict(self, values, arrays, source):
        _load_values(self, values, source, best=_number_or_none, best_epoch=_count, stopped_epoch=_count, wait=_count)
        if arrays:
            expected = model_arrays(self.training.model, copy=False)
            _check_arrays(arrays, expected, source, "EarlyStopping's best weights")
            self.best_weights = {k: np.array(v) for k, v in arrays.items()}
        else:
            self.best_weights = None


class ReduceLROnPlateau(_Monitor):
    """Multiply the optimizer's lr by `factor` when `monitor` has not improved for `patience` epochs.

    Args:
        monitor: "val_loss" (default), "val_accuracy", "loss" or "accuracy".
        factor: in (0, 1) (default 0.1): new lr = max(lr * factor, min_lr).
        patience: epochs without improvement before the lr is lowered (default 10).
        min_delta: an improvement must exceed this (default 1e-4).
        mode: "auto" (default), "min" or "max".
        cooldown: epochs after a reduction that are not counted (default 0; as torch's ReduceLROnPlateau).
        min_lr: the lr is never lowered below this (default 0).

    The rate changed is the optimizer's base lr (a Schedule, if any, still multiplies it).
    """

    def __init__(
        self, monitor="val_loss", factor=0.1, patience=10, min_delta=1e-4, mode="auto", cooldown=0, min_lr=0.0
    ):
        super().__init__(monitor, mode, min_delta)
        owner = "ReduceLROnPlateau"
        self.factor = check_number(owner, "factor", factor, low=0, high=1, low_open=True, high_open=True)
        self.patience = check_int(owner, "patience", patience, low=0)
        self.cooldown = check_int(owner, "cooldown", cooldown, low=0)
        self.min_lr = check_number(owner, "min_lr", min_lr, low=0)
        self.on_train_begin()

    def on_train_begin(self):
        self.best, self.wait, self.cooldown_left = None, 0, 0

    def on_epoch_end(self, epoch, logs):
        value = self.value(logs)
        improved = value is not None and self.improved(value)
        if improved:
            self.best = value
        if self.cooldown_left > 0:  # the epochs right after a reduction are not counted
            self.cooldown_left -= 1
            self.wait = 0
            return
        if improved:
            self.wait = 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            opt = self.training.optimizer
            opt.lr = max(opt.lr * self.factor, self.min_lr)
            self.cooldown_left, self.wait = self.cooldown, 0

    def state_dict(self):
        values = {k: getattr(self, k) for k in ("best", "wait", "cooldown_left")}
        return values | {"lr": self.training.optimizer.lr}, {}

    def load_state_dict(self, values, arrays, source):
        _load_values(self, values, source, best=_number_or_none, wait=_count, cooldown_left=_count)
        lr = values.get("lr")
        if _number_or_none(lr) is None or lr <= 0:
            raise CheckpointError(f"{source}: ReduceLROnPlateau's lr must be a number > 0, got {lr!r}")
        self.training.optimizer.lr = float(lr)


class ModelCheckpoint(_Monitor):
    """Save the model (and optimizer) after each epoch, or only when `monitor` improves.

    Args:
        path: the file; may contain "{epoch}" (e.g. "runs/ckpt-{epoch}.safetensors") to keep one per epoch.
        monitor: what save_best_only compares (default "val_loss").
        save_best_only: save only when monitor improves (default False: after every epoch).
        mode: "auto" (default), "min" or "max".

    Each file is a bnnet checkpoint (bnnet.load reads it) with the epoch and the logs in its metadata.
    """

    def __init__(self, path, monitor="val_loss", save_best_only=False, mode="auto"):
        if not isinstance(path, str) or not path:
            raise HyperparameterError(f"ModelCheckpoint: path must be a file name, got {path!r}")
        if not isinstance(save_best_only, bool):
            raise HyperparameterError(f"ModelCheckpoint: save_best_only must be True or False, got {save_best_only!r}")
        super().__init__(monitor, mode, 0.0)
        self.path, self.save_best_only = path, save_best_only

    def check_logs(self, has_validation, has_accuracy):
        if self.save_best_only:
            super().check_logs(has_validation, has_accuracy)

    def on_train_begin(self):
        self.best = None

    def on_epoch_end(self, epoch, logs):
        if self.save_best_only:
            value = self.value(logs)
            if value is None or not self.improved(value):
                return
            self.best = value
        if self.training.is_root:
            from .io import save

            logged = {k: v for k, v in logs.items() if v is not None}
            save(self.path.format(epoch=epoch), self.training.model, self.training.optimizer, epoch=epoch, logs=logged)

    def state_dict(self):
        return {"best": self.best}, {}

    def load_state_dict(self, values, arrays, source):
        _load_values(self, values, source, best=_number_or_none)


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def model_arrays(model, copy=True):
    """{"params/<name>": array, "buffers/<name>": array}: host copies (or the live arrays)."""
    out = {}
    for kind in ("params", "buffers"):
        for name, a in getattr(model, kind).items():
            out[f"{kind}/{name}"] = np.array(to_host(a)) if copy else a
    return out


def set_model_arrays(model, arrays):
    """Copy what model_arrays returned back into the model's live arrays."""
    for key, value in arrays.items():
        kind, _, name = key.partition("/")
        getattr(model, kind)[name] = value


def _check_arrays(arrays, expected, source, what):
    if set(arrays) != set(expected):
        raise CheckpointError(f"{source}: {what} name {sorted(arrays)} but the model has {sorted(expected)}")
    for k, a in arrays.items():
        if a.shape != expected[k].shape or a.dtype != expected[k].dtype:
            raise CheckpointError(
                f"{source}: {what}: {k} is {a.dtype} {a.shape}, the model's is {expected[k].dtype} {expected[k].shape}"
            )
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise CheckpointError(f"{source}: {what}: {k} holds NaN or Inf")


def _number_or_none(v):
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return False
    return float(v)


def _count(v):
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else False


def _load_values(target, values, source, **fields):
    """Set target.<field> = values[field] for each field, after checking it with its converter."""
    if not isinstance(values, dict):
        raise CheckpointError(f"{source}: {type(target).__name__}'s saved state must be an object, got {values!r}")
    for field, convert in fields.items():
        value = convert(values.get(field))
        if value is False:
            raise CheckpointError(
                f"{source}: {type(target).__name__}'s saved {field} is invalid, got {values.get(field)!r}"
            )
        setattr(target, field, value)


def check_callbacks(callbacks):
    """fit's `callbacks` argument as a list of Callback (HyperparameterError naming the bad entry)."""
    if callbacks is None:
        return []
    if isinstance(callbacks, Callback) or not isinstance(callbacks, (list, tuple)):
        raise HyperparameterError(f"fit: callbacks must be a list of bnnet.callbacks.Callback, got {callbacks!r}")
    for i, cb in enumerate(callbacks):
        if not isinstance(cb, Callback):
            raise HyperparameterError(f"fit: callbacks[{i}] must be a bnnet.callbacks.Callback, got {cb!r}")
    return list(callbacks)
