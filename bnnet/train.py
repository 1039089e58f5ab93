"""Mini-batch gradient descent, as the lecture writes it:

    for t in range(num_minibatches):
        logits = model.forward(X_t, train=True)     # BN replaces z by z~ in each hidden layer
        loss = loss_fn.forward(logits, y_t)
        model.backward(loss_fn.backward())          # dW, dgamma, dbeta
        opt.step(model)                             # W -= lr * dW, ... (or Momentum/RMSprop/Adam)

`fit` is that loop with shuffling, a progress bar, a history, checkpoints and
resume; `evaluate` runs the model in eval mode. Read top to bottom:

    fit             checks its arguments, builds the pieces below, runs the epochs
    Step            one mini-batch: forward, loss, backward (DataParallelStep adds the collectives)
    RunState        where training stands: counters, RNG, partial sums, history (saved in checkpoints)
    LastGood        a copy of the last all-finite state, to undo a step that produced NaN/Inf
    _train_epoch    the mini-batches of one epoch: step, clip, update, count, checkpoint
    Checkpoints     when and how checkpoints are written, and resuming from one
    Progress        the tqdm bar
"""

import json
import sys
import warnings

import numpy as np
from tqdm.auto import tqdm

from . import backend, ops
from ._checks import as_float_array, check_bool, check_int, check_number, check_samples, check_seed
from .callbacks import Training, check_callbacks
from .device import check_device, contiguous, empty, to_device, writable
from .distributed import DataParallel, is_root
from .engine import check_chain
from .errors import CheckpointError, HyperparameterError, InputError, NonFiniteError
from .io import field_error, fill_model, load_checkpoint, save
from .losses import check_sample_weight, class_weights, get_loss
from .model import first_nonfinite, has_batchnorm
from .optim import (
    clip_grad_norm as clip_gradients,  # fit's own argument is named clip_grad_norm
)
from .optim import get_optimizer
from .step import CompiledStep, compilable
from .tensorboard import TensorBoardLog


def fit(
    model,
    X,
    y,
    *,
    optimizer="adam",
    loss="softmax_cross_entropy",
    epochs=10,
    batch_size=64,
    seed=None,
    validation_data=None,
    progress=True,
    clip_grad_norm=None,
    check_activations=False,
    checkpoint=None,
    checkpoint_every=None,
    resume=None,
    checkpoint_metadata=None,
    comm=None,
    validation_name="val",
    validation_split=None,
    log_dir=None,
    device=None,
    callbacks=None,
    sample_weight=None,
    class_weight=None,
    shuffle=True,
):
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
        validation_split: a fraction in (0, 1): hold out that last part of X and y (before any
            shuffling, as Keras does) as the validation data; not with validation_data.
        validation_name: what the progress display calls it (default "val": val_loss, val_acc; e.g. "test"
            when validation_data is the test split). The history's keys stay val_loss, val_accuracy.
        progress: show a tqdm progress bar with the running loss and accuracy.
        clip_grad_norm: if set, scale the gradients to this global L2 norm at most before each update.
        check_activations: also check every layer's output for NaN/Inf at every step (slower).
            The loss, and after each update every parameter, running statistic and optimizer
            state, are always checked: a NaN/Inf stops training with NonFiniteError naming the
            step and where it first appears, after putting back the state of the last good step
            (LastGood), so the model, the optimizer and every checkpoint written hold finite values.
        checkpoint: path to write checkpoints to (atomically); may contain "{step}" to keep one
            file per checkpoint. Written every `checkpoint_every` updates and at the end.
        resume: path of a checkpoint written by fit: restores parameters, running statistics,
            optimizer state (and with it the learning-rate schedule), the shuffling RNG and the
            step/epoch counters, and continues. The run then ends exactly (bitwise) where an
            uninterrupted run with the same arguments ends.
        checkpoint_metadata: extra JSON-serializable metadata stored in each checkpoint.
        log_dir: a folder for TensorBoard event files (bnnet.tensorboard; needs tensorboardX): loss,
            accuracy, validation, learning rate, gradient norms and running statistics per epoch.
        device: None (default: train where the model is), "cpu" or "cuda": move the model there
            first (Sequential.to, which also selects the backend). Mini-batches are gathered on
            the host and copied to the device one at a time.
        sample_weight: optional (N,) weights >= 0 of the rows of X: each mini-batch's loss becomes the
            weighted mean sum w_i L_i / sum w_i (weight 0 ignores a row; an integer weight k counts it
            k times in the loss). BatchNorm's batch statistics stay unweighted, and the reported
            accuracy counts every row once.
        class_weight: optional "balanced" (n_rows / (n_classes * rows of the class), as scikit-learn) or
            {class: weight}: each row's weight is its class's (times sample_weight). Classification only.
        shuffle: draw a new order of the rows every epoch (default True); False keeps their order.
        callbacks: a list of bnnet.callbacks.Callback (EarlyStopping, ReduceLROnPlateau, ModelCheckpoint or
            your own), run after every epoch in order; their state is saved in checkpoints and resumed.
        comm: a bnnet.distributed.Communicator for data-parallel training (run one process per
            rank under mpiexec, each calling fit with the same arguments and data). batch_size
            is then the global batch, split into one shard per rank; rank 0's parameters and
            seed are used everywhere; only rank 0 writes checkpoints and shows progress. Use
            bnnet.distributed.sync_batchnorm(model, comm) first for synchronized BatchNorm
            (the same steps as one process); plain BatchNorm layers normalize each shard alone.
    Returns:
        {"epoch": [1, ...], "loss": [...], "accuracy": [...], "val_loss": [...], "val_accuracy": [...]}.
        Train loss/accuracy of an epoch are the means over its mini-batches, in
        train mode (as Keras reports them); accuracy entries are None for regression.
    """
    loss_fn, opt = get_loss(loss), get_optimizer(optimizer)
    callbacks = check_callbacks(callbacks)
    if device is not None:
        model.to(check_device("fit", device))
    epochs = check_int("fit", "epochs", epochs, low=1)
    batch_size = check_int("fit", "batch_size", batch_size, low=1)
    seed = check_seed("fit", seed)
    shuffle = check_bool("fit", "shuffle", shuffle)
    checkpoints = Checkpoints(checkpoint, checkpoint_every, model, opt, loss_fn, checkpoint_metadata, comm)
    X, y = _check_data(model, X, y, loss_fn, "fit")
    weights = _row_weights(sample_weight, class_weight, y, loss_fn, model, "fit")
    if validation_split is not None:
        X, y, validation_data = _split_validation(X, y, validation_split, validation_data)
        weights = None if weights is None else weights[: len(X)]
    val = (
        None
        if validation_data is None
        else _check_data(model, *_pair(validation_data), loss_fn, "fit(validation_data)")
    )
    for cb in callbacks:
        cb.check_logs(val is not None, loss_fn.has_accuracy)
    drop_single = _check_batches(model, len(X), batch_size)
    # The sizes of one epoch's mini-batches (the same every epoch; only the order changes).
    batch_sizes = [len(b) for b in minibatches(len(X), batch_size, np.random.default_rng(0), drop_single)]
    # The step built once (bnnet.step) where it can be: the same numbers as the layer-by-layer path.
    compiled = None
    if not check_activations and compilable(model, loss_fn, opt) is None:
        compiled = CompiledStep(model, loss_fn, None, max(batch_sizes))
    step = (
        Step(model, loss_fn, check_activations, compiled)
        if comm is None or comm.size == 1
        else DataParallelStep(model, loss_fn, check_activations, compiled, comm, min(batch_sizes))
    )
    step.agree(
        {
            "rows": len(X),
            "features": list(X.shape[1:]),
            "dtype": model.dtype,
            "architecture": model.config(),
            "optimizer": {k: v for k, v in opt.state_dict()[1].items() if k != "t"},
            "loss": loss_fn.name,
            "batch_size": batch_size,
            "epochs": epochs,
            "validation_rows": None if val is None else len(val[0]),
            "resume": resume is not None,
        }
    )
    if weights is not None and isinstance(step, DataParallelStep):
        raise HyperparameterError("fit: sample_weight and class_weight cannot be used with data-parallel training")
    seed = step.start(seed)
    run = RunState(epochs, batch_size, seed, len(X), loss_fn.name, callbacks, shuffle)
    training = Training(model, opt, run.history, is_root(comm))
    for cb in callbacks:
        cb.training = training
        cb.on_train_begin()
    if resume is not None:
        run = checkpoints.resume(resume, run, len(batch_sizes))
        training.history = run.history
    last_good = LastGood(model, opt)
    bar = Progress(progress and is_root(comm), epochs * len(batch_sizes), run.step, validation_name)
    log = TensorBoardLog(log_dir) if log_dir is not None and is_root(comm) else None
    data = (X, y, weights)
    try:
        for epoch in range(run.epoch, epochs + 1):
            if run.stopped:
                break
            bar.epoch(epoch, epochs)
            _train_epoch(run, step, opt, data, batch_size, drop_single, clip_grad_norm, checkpoints, bar, last_good)
            logs = _end_epoch(run, model, loss_fn, val, bar) | {"lr": opt.current_lr()}
            if log is not None:
                log.epoch(run.history, model, opt)
            for cb in callbacks:
                cb.on_epoch_end(epoch, logs)
            run.stopped = training.stop
        for cb in callbacks:
            cb.on_train_end()
        checkpoints.final(run)
    finally:
        bar.close()
        if log is not None:
            log.close()
    return run.history


def evaluate(model, X, y, loss="softmax_cross_entropy", batch_size=1024):
    """Eval-mode loss and accuracy: {"loss": float, "accuracy": float or None (regression)}."""
    loss = get_loss(loss)
    X, y = _check_data(model, X, y, loss, "evaluate")
    outputs = model.outputs(X, batch_size, "evaluate")  # on the model's device, and y with them
    y = to_device(y, model.device)
    return {"loss": loss.forward(outputs, y), "accuracy": loss.accuracy(outputs, y)}


def minibatches(n, batch_size, rng, drop_single=False):
    """Index arrays of one shuffled epoch: rng.permutation(n) cut into batch_size pieces (rng None: the
    rows in order).

    With drop_single, a trailing batch of one row is dropped (BatchNorm cannot
    train on it). Returns the batches as a list.
    """
    order = np.arange(n) if rng is None else rng.permutation(n)
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    if drop_single and len(batches) > 1 and len(batches[-1]) == 1:
        batches.pop()
    return batches


# --------------------------------------------------------------------------
# Checking what fit is given
# --------------------------------------------------------------------------


def _check_data(model, X, y, loss, owner):
    X = as_float_array(X, "X", owner, model.dtype)
    check_samples(X, "X", owner, model.input_shape)
    try:  # the whole chain with this sample shape (an image of the wrong size stops at its Flatten -> Linear)
        check_chain(model.layers, X.shape[1:], error=InputError)
    except InputError as e:
        raise InputError(f"{owner}: X of shape {X.shape} does not fit the model: {e}") from None
    ops.check_finite(X, "X", owner)
    y = loss.check_targets(y, _n_outputs(model))
    if len(y) != len(X):
        raise InputError(f"{owner}: X has {len(X)} rows but y has {len(y)}; pass one target per row of X")
    return X, y


def _n_outputs(model):
    """The model's number of outputs (its last layer with out_features), or None."""
    return next((l.out_features for l in reversed(model.layers) if hasattr(l, "out_features")), None)


def _row_weights(sample_weight, class_weight, y, loss, model, owner):
    """The (N,) weights of the training rows (sample_weight times class_weight), or None for neither."""
    if sample_weight is None and class_weight is None:
        return None
    weights = np.ones(len(y)) if sample_weight is None else check_sample_weight(sample_weight, len(y), owner)
    if class_weight is not None:
        if not loss.has_accuracy:
            raise HyperparameterError(f"{owner}: class_weight needs a classification loss, not {loss.name}")
        if loss.name == "binary_cross_entropy":
            if y.ndim != 1 or not np.isin(y, (0, 1)).all():
                raise InputError(f"{owner}: class_weight needs one 0/1 target per row (not multilabel targets)")
            n_classes = 2
        else:
            n_classes = _n_outputs(model)
        weights = weights * class_weights(class_weight, y, n_classes, owner)
    if not weights.sum() > 0:
        raise InputError(f"{owner}: the row weights sum to {weights.sum()}; at least one row needs a weight > 0")
    return weights


def _split_validation(X, y, fraction, validation_data):
    """(X_train, y_train, (X_val, y_val)): the last `fraction` of the rows held out."""
    if validation_data is not None:
        raise HyperparameterError("fit: give validation_data or validation_split, not both")
    fraction = check_number("fit", "validation_split", fraction, low=0, high=1, low_open=True, high_open=True)
    n_val = int(round(len(X) * fraction))
    if not 1 <= n_val < len(X):
        raise InputError(
            f"fit: validation_split={fraction} of {len(X)} rows leaves {n_val} for validation and "
            f"{len(X) - n_val} for training; both need at least one"
        )
    return X[:-n_val], y[:-n_val], (X[-n_val:], y[-n_val:])


def _pair(validation_data):
    if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
        raise HyperparameterError(
            f"fit: validation_data must be a pair (X_val, y_val), got {type(validation_data).__name__}"
        )
    return validation_data


def _check_batches(model, n, batch_size):
    """Whether a trailing 1-row mini-batch is dropped (models with BatchNorm); refuses what BN cannot train on."""
    bn = has_batchnorm(model)
    if bn and n < 2:
        raise InputError("fit: a model with BatchNorm needs at least 2 training rows")
    if bn and batch_size < 2:
        raise InputError(
            "fit: batch_size=1 cannot train BatchNorm (a batch of one has no variance); use batch_size >= 2"
        )
    if bn and n % batch_size == 1:
        warnings.warn(
            f"fit: {n} rows with batch_size={batch_size} leave a last mini-batch of one row, "
            "which BatchNorm cannot train on; it is dropped every epoch",
            stacklevel=3,
        )
    return bn


# --------------------------------------------------------------------------
# One step: forward, loss, backward
# --------------------------------------------------------------------------


class Step:
    """One mini-batch in this process: forward in train mode, loss, backward. Returns (loss, accuracy).

    compiled: a bnnet.step.CompiledStep of the same model and loss, which then runs the mini-batches
    (the same numbers, with the checks and buffers decided once), or None for the layer-by-layer path.
    """

    def __init__(self, model, loss_fn, check_activations, compiled=None):
        self.model, self.loss_fn, self.check_activations = model, loss_fn, check_activations
        self.compiled = compiled

    def agree(self, settings):
        """Check that every process runs the same training (one process: nothing to compare)."""

    def start(self, seed):
        """The seed every process shuffles with."""
        return seed

    def rows(self, idx):
        """The rows of a mini-batch this process computes (all of them here)."""
        return idx

    def __call__(self, X_t, y_t, n_batch, w_t=None):
        """Gradients in model.grads for the mean loss over the n_batch rows of the mini-batch (weighted by
        w_t when given)."""
        share = None if len(X_t) == n_batch else len(X_t) / n_batch  # this process's part of the mean
        if self.compiled is not None and len(X_t) >= 2:  # (an empty or one-row shard: the layers)
            # (fit checked X, y)
            loss, acc = self.compiled.gradients(X_t, y_t, check_input=False, share=share, sample_weight=w_t)
            return self.combine(loss, acc, len(X_t), n_batch)
        if self.model.device == "cuda":
            X_t, y_t = to_device(X_t, "cuda"), to_device(y_t, "cuda")
        logits = self.model.plan().forward(X_t, True, check_finite=self.check_activations)
        if len(X_t):
            # (a Loss of the user's own may take no weights: they are passed only when there are some)
            loss = self.loss_fn.forward(logits, y_t) if w_t is None else self.loss_fn.forward(logits, y_t, w_t)
            acc = self.loss_fn.accuracy(logits, y_t)
            dlogits = self.loss_fn.backward()
        else:  # an empty shard still takes part in every collective
            loss, acc, dlogits = 0.0, 0.0, np.zeros_like(logits)
        if share is not None:
            dlogits = dlogits * share
        self.model.backward(dlogits)
        return self.combine(loss, acc, len(X_t), n_batch)

    def combine(self, loss, acc, n_rows, n_batch):
        """The mini-batch's loss and accuracy from this process's."""
        return loss, acc

    def where_nonfinite(self, X_t):
        """Where NaN/Inf first appears (a parameter, the input, a layer), to name it in the error."""
        return first_nonfinite(self.model, X_t, train=True)


class DataParallelStep(Step):
    """The step of one rank in data-parallel training (bnnet.distributed): its shard of each
    mini-batch, then one allreduce of the gradients, loss and accuracy sums."""

    def __init__(self, model, loss_fn, check_activations, compiled, comm, smallest_batch):
        # (compiled: each rank's shard as a compiled step, the gradient allreduce after it; a
        # SyncBatchNorm's collectives run inside it, in the same order as the layers' on every rank)
        super().__init__(model, loss_fn, check_activations, compiled)
        self.dp = DataParallel(model, comm)
        self.smallest_batch = smallest_batch

    def agree(self, settings):
        self.dp.check_agreement(settings)  # first: the checks below assume every rank has the same data
        # np.array_split gives the smallest shard of the smallest batch len // size rows
        size = self.dp.size
        if self.dp.local_bn and self.smallest_batch // size < 2:
            error = InputError(
                f"fit: with unsynchronized BatchNorm every rank normalizes its own shard, which needs "
                f">= 2 rows; batches of {self.smallest_batch} over {size} ranks give shards of "
                f"{self.smallest_batch // size}. Use bnnet.distributed.sync_batchnorm(model, comm) "
                "or a larger batch_size"
            )
            error.collective = True  # the same on every rank: one of them reports it
            raise error

    def start(self, seed):
        return self.dp.start(seed)  # every rank now holds rank 0's parameters and draws rank 0's order

    def rows(self, idx):
        return self.dp.shard(idx)

    def combine(self, loss, acc, n_rows, n_batch):
        loss, acc = self.dp.allreduce(loss * n_rows, (acc or 0.0) * n_rows, n_rows, n_batch)
        return loss, acc if self.loss_fn.has_accuracy else None

    def where_nonfinite(self, X_t):
        return None  # one rank alone cannot rerun a synchronized forward to find the layer


# --------------------------------------------------------------------------
# Where training stands, and one epoch
# --------------------------------------------------------------------------


class RunState:
    """Counters, RNG state, the epoch's partial sums and the history: enough to continue
    exactly after a crash. `as_dict()` is what checkpoints store under "fit"."""

    def __init__(self, epochs, batch_size, seed, n, loss_name, callbacks=(), shuffle=True):
        self.rng = np.random.default_rng(seed)
        self.epoch, self.batch, self.step = 1, 0, 0
        self.rng_state = self.rng.bit_generator.state  # the next epoch's order is drawn from this state
        self.partial = [0.0, 0.0, 0]  # loss sum, correct sum, rows seen in the current epoch
        self.history = {"epoch": [], "loss": [], "accuracy": [], "val_loss": [], "val_accuracy": []}
        self.run = {"epochs": epochs, "batch_size": batch_size, "seed": seed, "n": n, "loss": loss_name}
        if not shuffle:
            self.run["shuffle"] = False  # (present only when off: checkpoints of shuffled runs stay as they were)
        self.shuffle = shuffle
        self.callbacks = callbacks
        self.stopped = False  # a callback ended the run early

    def as_dict(self):
        """The JSON part of the state (callbacks' arrays: callback_arrays)."""
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "step": self.step,
            "rng": self.rng_state,
            "partial": self.partial,
            "history": self.history,
            "run": self.run,
            "stopped": self.stopped,
            "callbacks": [{"type": type(cb).__name__, "state": cb.state_dict()[0]} for cb in self.callbacks],
        }

    def callback_arrays(self):
        """{"callbacks.<i>/<name>": array} of every callback's state (saved as a checkpoint's extra arrays)."""
        return {f"callbacks.{i}/{k}": v for i, cb in enumerate(self.callbacks) for k, v in cb.state_dict()[1].items()}

    def restore(self, saved, arrays, source):
        self.epoch, self.batch, self.step = saved["epoch"], saved["batch"], saved["step"]
        self.rng_state, self.partial, self.history = saved["rng"], saved["partial"], saved["history"]
        self.stopped = saved.get("stopped", False)
        states = saved.get("callbacks", [])
        types = [type(cb).__name__ for cb in self.callbacks]
        saved_types = (
            [s.get("type") if isinstance(s, dict) else s for s in states] if isinstance(states, list) else states
        )
        if saved_types != types:
            raise CheckpointError(
                f"{source}: was written by a run with the callbacks {saved_types!r}, not {types}; "
                "resume with the same callbacks in the same order"
            )
        for i, (cb, st) in enumerate(zip(self.callbacks, states)):
            prefix = f"callbacks.{i}/"
            own = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
            cb.load_state_dict(st.get("state"), own, source)


def _train_epoch(run, step, opt, data, batch_size, drop_single, clip_grad_norm, checkpoints, bar, last_good):
    """The mini-batches of epoch run.epoch, from run.batch on (after a resume, mid-epoch).
    data: (X, y, row weights or None)."""
    X, y, weights = data
    run.rng.bit_generator.state = run.rng_state  # the epoch's order is drawn from this state
    batches = minibatches(len(X), batch_size, run.rng if run.shuffle else None, drop_single)
    X_buf = np.empty((min(batch_size, len(X)), *X.shape[1:]), X.dtype)  # each mini-batch is gathered here
    total_loss, total_correct, seen = run.partial
    for b in range(run.batch, len(batches)):
        idx = step.rows(batches[b])
        # (mode="clip": the rows are a permutation's, always in range, and numpy's default mode
        # gathers into a temporary first when given out=, one more copy of the mini-batch)
        X_t, y_t = np.take(X, idx, axis=0, out=X_buf[: len(idx)], mode="clip"), y[idx]
        batch_loss, acc = step(X_t, y_t, len(batches[b]), None if weights is None else weights[idx])
        when = f"at step {run.step + 1} (epoch {run.epoch})"
        if not np.isfinite(batch_loss):
            where = step.where_nonfinite(X_t) or "the loss"
            last_good.restore()
            raise NonFiniteError(
                f"fit: the loss is {batch_loss} {when}; NaN/Inf first appears in {where}. "
                f"Lower the learning rate or set clip_grad_norm; {LastGood.RESTORED}"
            )
        if clip_grad_norm is not None and not np.isfinite(clip_gradients(step.model, clip_grad_norm)):
            last_good.restore()
            raise NonFiniteError(f"fit: the gradients hold NaN or Inf {when}; {LastGood.RESTORED}")
        opt.step(step.model)
        if not last_good.commit():
            where = last_good.first_nonfinite()
            last_good.restore()
            raise NonFiniteError(
                f"fit: the update {when} made {where} NaN or Inf (the loss was {batch_loss:.4g}). "
                f"Lower the learning rate or set clip_grad_norm; {LastGood.RESTORED}"
            )
        n_batch = len(batches[b])
        total_loss += batch_loss * n_batch
        total_correct += (acc or 0.0) * n_batch
        seen += n_batch
        run.batch, run.step, run.partial = b + 1, run.step + 1, [total_loss, total_correct, seen]
        bar.update(total_loss / seen, acc and total_correct / seen)
        checkpoints.after_step(run)


_KIND_NAMES = {"params": "parameter", "buffers": "buffer", "optimizer": "optimizer state"}


class LastGood:
    """The last state of training that was finite everywhere, so that a step producing NaN/Inf is undone.

    After each update, `commit` copies everything a step changes (parameters, buffers such as
    running statistics, optimizer state and its step counter) into the older of two copies and
    checks it finite in the same pass (the backend's copy_finite); only an all-finite copy becomes
    the last good one. `restore` writes the last good copy back into the live arrays. The cost
    is about one memory copy of the state per step, in a few calls: the parameters and the
    optimizer state are copied as their flat buffers (bnnet.flat), one call per buffer.
    """

    RESTORED = "the model and optimizer were restored to the last good step, and no checkpoint holds NaN/Inf"

    def __init__(self, model, opt):
        self.model, self.opt = model, opt
        self.slots = [None, None]  # each: the live arrays, their copies, the scalars and opt.t at commit
        self._parts_cache = None  # (layout, flat optimizer state?, parts): see _parts
        self.good = None  # which slot holds the last good state
        if not self.commit():
            raise NonFiniteError(f"fit: the model holds NaN or Inf before training, in {self.first_nonfinite()}")

    def _named(self):
        """[((kind, where, name), value)] for every array a step changes, one entry per array."""
        live = [
            ((kind, i, k), a)
            for i, layer in enumerate(self.model.layers)
            for kind in ("params", "buffers")
            for k, a in getattr(layer, kind).items()
        ]
        live += [(("optimizer", name, k), a) for name, st in self.opt.state.items() for k, a in st.items()]
        return live

    def _live(self):
        """What commit copies: [(key, array)], with each flat buffer as one entry, and the parts
        {flat buffer's key: [(named key, start, stop, shape)]} that say which named arrays it holds
        (for restore)."""
        layout = self.model.flat_layout() if hasattr(self.model, "flat_layout") else None
        if layout is None:
            return self._named(), {}
        live = [(("flat", "params", gi), group.params) for gi, group in enumerate(layout.groups)]
        live += [(("buffers", i, k), a) for i, layer in enumerate(self.model.layers) for k, a in layer.buffers.items()]
        opt_state = self.opt.state
        flat_state = self.opt.current_flat_state(layout)
        flat = flat_state is not None and self._state_is_flat(layout)
        if flat:
            live += [
                (("flat", "optimizer", (gi, key)), a)
                for gi, arrays in enumerate(flat_state)
                for key, a in arrays.items()
            ]
            live += [
                (("optimizer", name, k), a)
                for name, st in opt_state.items()
                for k, a in st.items()
                if isinstance(a, np.generic)  # the per-parameter counters
            ]
        else:
            live += [(("optimizer", name, k), a) for name, st in opt_state.items() for k, a in st.items()]
        return live, self._parts(layout, flat)

    def _parts(self, layout, flat_state):
        """{flat buffer's key: [(named key, start, stop, shape)]}: which named arrays each flat buffer of
        `layout` holds (the parameters, and with flat_state the optimizer's state). Fixed for a layout
        (its views keep their shapes), so it is built once per layout."""
        cached = self._parts_cache
        if cached is not None and cached[0] is layout and cached[1] == flat_state:
            return cached[2]
        index = {id(layer): i for i, layer in enumerate(self.model.layers)}
        parts = {}
        for gi, group in enumerate(layout.groups):
            parts["flat", "params", gi] = [
                (("params", index[id(layer)], key), start, stop, layer.params[key].shape)
                for _, layer, key, start, stop in group.entries
            ]
            for key in self.opt.state_names if flat_state else ():
                parts["flat", "optimizer", (gi, key)] = [
                    (("optimizer", name, key), start, stop, layer.params[pkey].shape)
                    for name, layer, pkey, start, stop in group.entries
                ]
        self._parts_cache = (layout, flat_state, parts)
        return parts

    def _state_is_flat(self, layout):
        """The optimizer holds no state arrays besides the views of its flat state (nothing else to copy)."""
        views = len(self.opt._flat[2])  # (the flat state is current: see _live)
        arrays = sum(1 for st in self.opt.state.values() for a in st.values() if not isinstance(a, np.generic))
        return arrays == views

    def commit(self):
        """Copy the live state into the spare slot; if it is all finite it becomes the last good state."""
        spare = 1 if self.good == 0 else 0
        live, parts = self._live()
        slot = self.slots[spare]
        arrays = [a for _, a in live if not isinstance(a, np.generic)]
        if (
            slot is None
            or len(slot["arrays"]) != len(arrays)
            or any(x is not y for x, y in zip(slot["arrays"], arrays))
        ):
            # New or replaced arrays (the first step creates the optimizer state): new copies, made
            # here with the same size and dtype, so the kernel below needs no other check.
            copies = [empty(a, a.shape, a.dtype) for a in arrays]  # on each array's device
            pairs = [(contiguous(a).reshape(-1), c.reshape(-1)) for a, c in zip(arrays, copies)]
            slot = {
                "keys": [key for key, a in live if not isinstance(a, np.generic)],
                "arrays": arrays,
                "copies": copies,
                "floats": [(a, c) for a, c in pairs if a.dtype.kind == "f"],
                "integers": [(a, c) for a, c in pairs if a.dtype.kind != "f"],  # (BatchNorm's count)
            }
        copy_finite, ok = backend.impl().copy_finite, True
        for src, dst in slot["floats"]:
            ok &= copy_finite(src, dst)
        for src, dst in slot["integers"]:
            np.copyto(dst, src)
        # numpy scalars (the optimizer's per-parameter counters) are immutable: kept as they are
        slot["scalars"] = {key: a for key, a in live if isinstance(a, np.generic)}
        slot["parts"] = parts
        slot["state_keys"] = [(name, k) for name, st in self.opt.state.items() for k in st]
        slot["t"] = self.opt.t
        self.slots[spare] = slot
        if ok:
            self.good = spare
        return ok

    def restore(self):
        """Put the last good state back: values copied into the live arrays, optimizer state created
        since then removed, the optimizer's counter set back."""
        slot = self.slots[self.good]
        saved = dict(zip(slot["keys"], slot["copies"])) | slot["scalars"]
        saved = self._unflatten(saved, slot["parts"])
        for layer_index, layer in enumerate(self.model.layers):
            for kind in ("params", "buffers"):
                d = getattr(layer, kind)
                for k in d:
                    _put(d, k, saved[kind, layer_index, k])
        state = {}
        for name, k in slot["state_keys"]:
            entry = state.setdefault(name, {})
            entry[k] = self.opt.state.get(name, {}).get(k)
            _put(entry, k, saved["optimizer", name, k])
        self.opt.state, self.opt.t = state, slot["t"]

    @staticmethod
    def _unflatten(saved, parts):
        """saved with each flat copy split into the named arrays it holds (the keys _named uses)."""
        out = {k: v for k, v in saved.items() if k[0] != "flat"}
        for flat_key, named in parts.items():
            for key, start, stop, shape in named:
                out[key] = saved[flat_key][start:stop].reshape(shape)
        return out

    def first_nonfinite(self):
        """The first live array holding NaN/Inf, as "parameter 0.W", "buffer 1.running_var", ..."""
        for (kind, where, name), a in self._named():
            if not isinstance(a, np.generic) and a.dtype.kind == "f" and not np.isfinite(a).all():
                sep = "/" if kind == "optimizer" else "."
                return f"{_KIND_NAMES[kind]} {where}{sep}{name}"
        return "nothing"


def _put(d, k, saved):
    """d[k] = saved, into d[k]'s own memory when it is an array of that shape (others hold references)."""
    a = d.get(k)
    if a is not None and not isinstance(a, np.generic) and a.shape == saved.shape and writable(a):
        np.copyto(a, saved, casting="unsafe")
    else:
        d[k] = saved if isinstance(saved, np.generic) else saved.copy()


def _end_epoch(run, model, loss_fn, val, bar):
    """Record the epoch's means (and validation), then move the counters to the next epoch."""
    total_loss, total_correct, seen = run.partial
    run.history["epoch"].append(run.epoch)
    run.history["loss"].append(total_loss / seen)
    run.history["accuracy"].append(total_correct / seen if loss_fn.has_accuracy else None)
    postfix = _postfix(run.history["loss"][-1], run.history["accuracy"][-1])
    if val is not None:
        result = evaluate(model, *val, loss_fn)
        run.history["val_loss"].append(result["loss"])
        run.history["val_accuracy"].append(result["accuracy"])
        postfix.update(_postfix(result["loss"], result["accuracy"], f"{bar.validation_name}_"))
    bar.show(postfix)
    run.epoch, run.batch, run.partial = run.epoch + 1, 0, [0.0, 0.0, 0]
    run.rng_state = run.rng.bit_generator.state
    return {k: run.history[k][-1] if run.history[k] else None for k in ("loss", "accuracy", "val_loss", "val_accuracy")}


# --------------------------------------------------------------------------
# Checkpoints and resume
# --------------------------------------------------------------------------


class Checkpoints:
    """Writes checkpoints (on rank 0 only) every `every` steps and at the end; resumes from one."""

    def __init__(self, path, every, model, opt, loss_fn, metadata, comm):
        if every is not None:
            every = check_int("fit", "checkpoint_every", every, low=1)
            if path is None:
                raise HyperparameterError("fit: checkpoint_every needs checkpoint=PATH to write to")
        if metadata is not None:
            if not isinstance(metadata, dict):
                raise HyperparameterError(f"fit: checkpoint_metadata must be a dict, got {type(metadata).__name__}")
            try:  # refused now, not at the first checkpoint after minutes of training
                json.dumps(metadata)
            except (TypeError, ValueError) as e:
                raise HyperparameterError(f"fit: checkpoint_metadata must be JSON-serializable ({e})") from None
        self.path, self.every, self.model, self.opt = path, every, model, opt
        self.loss_name, self.metadata, self.comm = loss_fn.name, metadata or {}, comm

    def write(self, run):
        if is_root(self.comm):
            path = str(self.path).format(step=run.step)
            save(
                path,
                self.model,
                self.opt,
                extra_arrays=run.callback_arrays(),
                **self.metadata,
                loss=self.loss_name,
                fit=run.as_dict(),
            )

    def after_step(self, run):
        if self.every and run.step % self.every == 0:
            self.write(run)

    def final(self, run):
        if self.path is not None:
            self.write(run)

    def resume(self, path, run, batches_per_epoch):
        """Load model, optimizer and run state from a checkpoint written by fit with the same settings."""
        ckpt = load_checkpoint(path)
        saved = ckpt.metadata.get("fit")
        if not isinstance(saved, dict):
            raise CheckpointError(f"{path}: holds no training state to resume (it was not written by fit)")
        if saved.get("run") != run.run:
            raise CheckpointError(
                f"{path}: was written by a run with {saved.get('run')}, not {run.run}; "
                "resume with the same epochs, batch_size, seed, data and loss"
            )
        _check_run_state(path, saved, run, batches_per_epoch)
        if ckpt.optimizer_info is None:
            raise CheckpointError(f"{path}: holds no optimizer state to resume")
        if ckpt.optimizer_info["type"] != type(self.opt).__name__:
            raise CheckpointError(
                f"{path}: holds {ckpt.optimizer_info['type']} state; this run trains with {type(self.opt).__name__}"
            )
        _check_finite_state(path, ckpt)
        fill_model(
            self.model,
            {f"params/{k}": v for k, v in ckpt.model.params.items()}
            | {f"buffers/{k}": v for k, v in ckpt.model.buffers.items()},
            path,
        )
        self.opt.load_state_dict(ckpt.optimizer_arrays, ckpt.optimizer_info)
        run.restore(saved, ckpt.extra_arrays, path)
        return run


def _check_run_state(path, saved, run, batches_per_epoch):
    """The "fit" metadata of a checkpoint, field by field: counters that agree with each other, an RNG
    state numpy accepts, partial sums and a history of the right lengths."""

    def bad(field, expected):
        raise field_error(path, f"user.fit.{field}", expected, saved.get(field))

    def integer(field, low, high):
        value = saved.get(field)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            bad(field, f"an integer in [{low}, {high}]")
        return value

    epochs = run.run["epochs"]
    epoch = integer("epoch", 1, epochs + 1)
    batch = integer("batch", 0, batches_per_epoch if epoch <= epochs else 0)
    integer("step", 0, epochs * batches_per_epoch)
    if saved["step"] != (epoch - 1) * batches_per_epoch + batch:
        bad("step", f"(epoch - 1) * {batches_per_epoch} + batch = {(epoch - 1) * batches_per_epoch + batch}")
    if not isinstance(saved.get("stopped", False), bool):
        bad("stopped", "true or false")
    try:
        np.random.default_rng(0).bit_generator.state = saved.get("rng")
    except (TypeError, ValueError, KeyError, OverflowError):
        bad("rng", "a numpy PCG64 state")
    partial = saved.get("partial")
    if (
        not isinstance(partial, list)
        or len(partial) != 3
        or not all(_is_number(v) for v in partial)
        or not isinstance(partial[2], int)
        or partial[2] < 0
    ):
        bad("partial", "[loss sum, correct sum, rows] (two numbers and an integer >= 0)")
    history = saved.get("history")
    keys = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy")
    if not isinstance(history, dict) or set(history) != set(keys):
        bad("history", f"an object with the lists {', '.join(keys)}")
    for key in keys:
        values = history[key]
        lengths = (epoch - 1,) if key in ("epoch", "loss", "accuracy") else (0, epoch - 1)
        if (
            not isinstance(values, list)
            or len(values) not in lengths
            or not all(v is None or _is_number(v) for v in values)
        ):
            raise field_error(path, f"user.fit.history.{key}", f"a list of {epoch - 1} numbers", values)


def _check_finite_state(path, ckpt):
    """Refuse to resume from a checkpoint holding NaN/Inf (fit never writes one; an edited file may)."""
    arrays = [("params", k, v) for k, v in ckpt.model.params.items()]
    arrays += [("buffers", k, v) for k, v in ckpt.model.buffers.items()]
    arrays += [("optimizer", k, v) for k, v in ckpt.optimizer_arrays.items()]
    for kind, key, a in arrays:
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise CheckpointError(
                f"{path}: {_KIND_NAMES[kind]} {key} holds NaN or Inf; resume from an earlier checkpoint"
            )


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# --------------------------------------------------------------------------
# Progress bar
# --------------------------------------------------------------------------


class Progress:
    """A tqdm bar over all steps, showing the epoch and the running loss/accuracy; on a stderr that
    is not a terminal (a log file, CI), one plain line per epoch instead of carriage-return updates."""

    def __init__(self, enabled, total, initial, validation_name="val"):
        self.lines = enabled and not sys.stderr.isatty()
        self.validation_name = validation_name
        self.bar = tqdm(
            total=total, initial=initial, disable=not enabled or self.lines, unit="step", dynamic_ncols=True
        )
        self.description = ""

    def epoch(self, epoch, epochs):
        self.description = f"epoch {epoch}/{epochs}"
        self.bar.set_description(self.description)

    def update(self, loss, acc):
        if self.bar.disable:  # (a disabled bar counts nothing: n would stay 0 and match every step)
            return
        self.bar.update(1)
        if self.bar.n % 10 == 0 or self.bar.n == self.bar.total:
            self.bar.set_postfix(_postfix(loss, acc), refresh=False)

    def show(self, postfix):
        """The epoch's results (at its end)."""
        self.bar.set_postfix(postfix)
        if self.lines:
            print(
                f"{self.description}: " + " ".join(f"{k} {v}" for k, v in postfix.items()), file=sys.stderr, flush=True
            )

    def close(self):
        self.bar.close()


def _postfix(loss, acc, prefix=""):
    out = {f"{prefix}loss": f"{loss:.4f}"}
    if acc is not None:
        out[f"{prefix}acc"] = f"{acc:.4f}"
    return out
