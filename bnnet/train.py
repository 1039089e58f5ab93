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
from .errors import CheckpointError, HyperparameterError, InputError, NonFiniteError
from .losses import get_loss
from .io import fill_model, load_checkpoint, save
from .distributed import DataParallel, is_root
from .model import first_nonfinite, has_batchnorm
from .optim import clip_grad_norm as clip_gradients  # fit's own argument is named clip_grad_norm
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
        validation_data=None, progress=True, clip_grad_norm=None, check_activations=False,
        checkpoint=None, checkpoint_every=None, resume=None, checkpoint_metadata=None, comm=None):
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
        clip_grad_norm: if set, scale the gradients to this global L2 norm at most before each update.
        check_activations: also check every layer's output for NaN/Inf at every step (slower).
            The loss is always checked: a NaN/Inf stops training with NonFiniteError naming
            the step and where it first appears, before the update, so the parameters and
            the last checkpoint on disk are the last good ones.
        checkpoint: path to write checkpoints to (atomically); may contain "{step}" to keep one
            file per checkpoint. Written every `checkpoint_every` updates and at the end.
        resume: path of a checkpoint written by fit: restores parameters, running statistics,
            optimizer state (and with it the learning-rate schedule), the shuffling RNG and the
            step/epoch counters, and continues. The run then ends exactly (bitwise) where an
            uninterrupted run with the same arguments ends.
        checkpoint_metadata: extra JSON-serializable metadata stored in each checkpoint.
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
    loss_fn = get_loss(loss)
    opt = get_optimizer(optimizer)
    epochs = check_int("fit", "epochs", epochs, low=1)
    batch_size = check_int("fit", "batch_size", batch_size, low=1)
    if checkpoint_every is not None:
        checkpoint_every = check_int("fit", "checkpoint_every", checkpoint_every, low=1)
        if checkpoint is None:
            raise HyperparameterError("fit: checkpoint_every needs checkpoint=PATH to write to")
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

    # The sizes of one epoch's mini-batches (the same every epoch; only the order changes).
    batch_sizes = [len(b) for b in minibatches(len(X), batch_size, np.random.default_rng(0), drop_single=bn)]
    dp = None
    if comm is not None and comm.size > 1:
        dp = DataParallel(model, comm)
        seed = dp.start(seed)  # every rank now holds rank 0's parameters and draws rank 0's order
        # np.array_split gives the smallest shard of the smallest (last) batch len // size rows
        smallest = min(batch_sizes) // comm.size
        if dp.local_bn and smallest < 2:
            raise InputError(f"fit: with unsynchronized BatchNorm every rank normalizes its own shard, which needs "
                             f">= 2 rows; batch_size={batch_size} over {comm.size} ranks gives shards of {smallest}. "
                             "Use bnnet.distributed.sync_batchnorm(model, comm) or a larger batch_size")
    rng = np.random.default_rng(seed)
    # Where training stands: enough to continue exactly after a crash (saved in checkpoints).
    state = {"epoch": 1, "batch": 0, "step": 0, "rng": rng.bit_generator.state, "partial": [0.0, 0.0, 0],
             "history": {"epoch": [], "loss": [], "accuracy": [], "val_loss": [], "val_accuracy": []},
             "run": {"epochs": epochs, "batch_size": batch_size, "seed": seed, "n": len(X), "loss": loss_fn.name}}
    if resume is not None:
        ckpt = load_checkpoint(resume)
        saved = ckpt.metadata.get("fit")
        if saved is None:
            raise CheckpointError(f"{resume}: holds no training state to resume (it was not written by fit)")
        if saved["run"] != state["run"]:
            raise CheckpointError(f"{resume}: was written by a run with {saved['run']}, not {state['run']}; "
                                  "resume with the same epochs, batch_size, seed, data and loss")
        fill_model(model, {f"params/{k}": v for k, v in ckpt.model.params.items()}
                   | {f"buffers/{k}": v for k, v in ckpt.model.buffers.items()}, resume)
        if ckpt.optimizer_info is None:
            raise CheckpointError(f"{resume}: holds no optimizer state to resume")
        opt.load_state_dict(ckpt.optimizer_arrays, ckpt.optimizer_info)
        state = saved
    history = state["history"]

    def write_checkpoint():
        if not is_root(comm):
            return
        path = str(checkpoint).format(step=state["step"])
        save(path, model, opt, **(checkpoint_metadata or {}), loss=loss_fn.name, fit=state)

    steps_per_epoch = len(batch_sizes)
    bar = tqdm(total=epochs * steps_per_epoch, initial=state["step"], disable=not progress or not is_root(comm), unit="step",
               dynamic_ncols=True)
    X_buf = np.empty((min(batch_size, len(X)), X.shape[1]), X.dtype)  # each mini-batch is gathered here
    try:
        for epoch in range(state["epoch"], epochs + 1):
            bar.set_description(f"epoch {epoch}/{epochs}")
            rng.bit_generator.state = state["rng"]  # the epoch's order is drawn from this state
            batches = minibatches(len(X), batch_size, rng, drop_single=bn)
            total_loss, total_correct, seen = state["partial"]
            for b in range(state["batch"], len(batches)):
                idx = batches[b]
                n_batch = len(idx)
                if dp is not None:
                    idx = dp.shard(idx)  # this rank's rows of the global mini-batch
                X_t, y_t = np.take(X, idx, axis=0, out=X_buf[:len(idx)]), y[idx]
                logits = model.plan().forward(X_t, True, check_finite=check_activations)
                if len(idx):
                    batch_loss = loss_fn.forward(logits, y_t)
                    acc = loss_fn.accuracy(logits, y_t)
                    dlogits = loss_fn.backward()
                else:  # an empty shard still takes part in every collective
                    batch_loss, acc, dlogits = 0.0, 0.0, np.zeros_like(logits)
                if dp is not None:
                    # Each rank's share of the global mean loss: its gradients then add up across ranks.
                    dlogits = dlogits * (len(idx) / n_batch)
                    model.backward(dlogits)
                    batch_loss, acc = dp.allreduce(batch_loss * len(idx), (acc or 0.0) * len(idx), len(idx), n_batch)
                    acc = acc if loss_fn.has_accuracy else None
                if not np.isfinite(batch_loss):
                    # (one rank alone cannot rerun a synchronized forward to find the layer)
                    where = first_nonfinite(model, X_t, train=True) if dp is None else None
                    where = where or "the loss"
                    raise NonFiniteError(f"fit: the loss is {batch_loss} at step {state['step'] + 1} (epoch {epoch}); "
                                         f"NaN/Inf first appears in {where}. Lower the learning rate or set "
                                         "clip_grad_norm; the parameters are those before this step")
                if dp is None:
                    model.backward(dlogits)
                if clip_grad_norm is not None:
                    norm = clip_gradients(model, clip_grad_norm)
                    if not np.isfinite(norm):
                        raise NonFiniteError(f"fit: the gradients hold NaN or Inf at step {state['step'] + 1} "
                                             f"(epoch {epoch}); the parameters are those before this step")
                opt.step(model)

                total_loss += batch_loss * n_batch
                total_correct += (acc or 0.0) * n_batch
                seen += n_batch
                state.update(batch=b + 1, step=state["step"] + 1, partial=[total_loss, total_correct, seen])
                bar.update(1)
                if bar.n % 10 == 0 or bar.n == bar.total:
                    bar.set_postfix(_postfix(total_loss / seen, acc and total_correct / seen), refresh=False)
                if checkpoint_every and state["step"] % checkpoint_every == 0:
                    write_checkpoint()
            history["epoch"].append(epoch)
            history["loss"].append(total_loss / seen)
            history["accuracy"].append(total_correct / seen if loss_fn.has_accuracy else None)
            if validation_data is not None:
                val = evaluate(model, Xv, yv, loss_fn)
                history["val_loss"].append(val["loss"])
                history["val_accuracy"].append(val["accuracy"])
                bar.set_postfix({**_postfix(history["loss"][-1], history["accuracy"][-1]),
                                 **_postfix(val["loss"], val["accuracy"], "val_")})
            state.update(epoch=epoch + 1, batch=0, rng=rng.bit_generator.state, partial=[0.0, 0.0, 0])
        if checkpoint is not None:
            write_checkpoint()
    finally:
        bar.close()
    return history


def _postfix(loss, acc, prefix=""):
    out = {f"{prefix}loss": f"{loss:.4f}"}
    if acc is not None:
        out[f"{prefix}acc"] = f"{acc:.4f}"
    return out
