# PYTHON_ARGCOMPLETE_OK  (argcomplete: this module completes its own command line)
"""The `bnnet` command: train, evaluate, predict.

    bnnet train                      # Ioffe & Szegedy's MNIST net (784-100-100-100-10, sigmoid, BN) on the bundled data
    bnnet evaluate runs/<run>        # test loss and accuracy of a saved model
    bnnet predict runs/<run> X.npy   # class labels (or raw outputs) for new inputs
    bnnet export runs/<run> --onnx model.onnx [--fold]
    bnnet recompute-stats runs/<run> [--mode batch|exact]
    bnnet fold runs/<run> folded.safetensors
    bnnet summary runs/<run>         # layers, output shapes, parameter counts
    mpiexec -n 4 bnnet train --distributed   # data-parallel over 4 MPI ranks, BatchNorm synchronized

One training step, top to bottom: cmd_train -> bnnet.fit (train.py: Step) ->
Sequential.forward/backward (model.py) -> its execution plan (engine.py) ->
BatchNorm._forward/_backward (layers.py) -> bnnet.ops.bn_forward/bn_backward
(ops.py: checks) -> the kernels (kernels.py) or the reference (reference.py),
both built on the equations of functional.py -> optimizer.step (optim.py ->
ops -> optim_rules.py).
"""

import argparse
import csv
import json
import math
import os
import sys
import time
import traceback

import numpy as np

from . import __version__, backend, datasets, distributed, experiments, optim, threads
from .callbacks import EarlyStopping
from .errors import BnnetError
from .io import load, load_checkpoint, save
from .losses import get_loss
from .model import convnet, has_batchnorm, mlp
from .tables import Standardizer, read_csv
from .train import evaluate, fit

CHECKPOINT_NAME = "model.safetensors"
# Optional packages some commands import, and the extra that installs each.
OPTIONAL_EXTRAS = {
    "onnx": "onnx",
    "onnxruntime": "onnx",
    "matplotlib": "plot",
    "mpi4py": "mpi",
    "sklearn": "sklearn",
    "tensorboardX": "tensorboard",
}
# Learning rates that `bnnet train` uses by default, per rule (an optimizer derived from one, such as
# AdamW from Adam, takes its rate): BatchNorm tolerates rates well above the usual ones (tuned on
# the bundled data; see docs/cli.md).
TRAIN_LR = {"SGD": 0.5, "Momentum": 0.5, "RMSprop": 1e-3, "Adam": 3e-3}


def _train_lr(name):
    cls = optim.OPTIMIZERS[name]
    return next(TRAIN_LR[c.__name__] for c in cls.__mro__ if c.__name__ in TRAIN_LR)


# -- option types: argparse names the option and exits 2 when one refuses its value --


def _option(convert, ok, expected):
    """An argparse type: convert(text), refused as "<expected>, got <text>" unless ok(value)."""

    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"{expected}, got {text!r}")
        return value

    return parse


def _int_at_least(low):
    return _option(int, lambda n: n >= low, f"must be an integer >= {low}")


_threads = _positive = _int_at_least(1)
_count = _int_at_least(2)
_seed = _option(int, lambda n: 0 <= n < 2**63, "must be an integer in [0, 2**63)")
_positive_float = _option(float, lambda v: math.isfinite(v) and v > 0, "must be a finite number > 0")
_fraction = _option(float, lambda v: 0 < v <= 1, "expected a number in (0, 1]")
_open_fraction = _option(float, lambda v: 0 < v < 1, "expected a number in (0, 1)")
_non_negative = _int_at_least(0)


def _sizes(text):
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 100,100,100, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected positive layer sizes, got {text!r}")
    return sizes


def _new_run_dir(root="runs"):
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, i = os.path.join(root, stamp), 1
    while os.path.exists(path):
        path, i = os.path.join(root, f"{stamp}-{i}"), i + 1
    return path


def _checkpoint_path(path):
    """A run folder stands for the checkpoint inside it."""
    return os.path.join(path, CHECKPOINT_NAME) if os.path.isdir(path) else path


def _beside(path, tag):
    """model.safetensors -> model.<tag>.safetensors, in the same folder."""
    stem, ext = os.path.splitext(path)
    return f"{stem}.{tag}{ext or '.safetensors'}"


def _write_history(folder, history):
    with open(os.path.join(folder, "history.json"), "w") as f:
        json.dump(history, f, indent=1)
    with open(os.path.join(folder, "history.csv"), "w", newline="") as f:
        w = csv.writer(f)
        keys = list(history)
        w.writerow(keys)
        w.writerows(zip(*(history[k] for k in keys)))


# The options that define a training run: stored in its checkpoints, and taken from there by --resume.
TRAIN_SETTINGS = (
    "model",
    "channels",
    "hidden",
    "activation",
    "no_batchnorm",
    "init",
    "optimizer",
    "lr",
    "lr_decay",
    "epochs",
    "batch_size",
    "seed",
    "data",
    "dtype",
    "clip_grad_norm",
    "local_bn",
    "checkpoint_every",
    "target",
    "task",
    "in_shape",
    "validation_split",
    "early_stopping",
    "monitor",
    "class_weight",
)
# What --hidden and --activation mean when not given, per --model.
MODEL_DEFAULTS = {
    "mlp": {"hidden": [100, 100, 100], "activation": "sigmoid"},
    "cnn": {"hidden": [128], "activation": "relu"},
}


def _resume_settings(args, parser):
    """With --resume RUN_DIR, the run's own settings (stored in its checkpoint) replace the command line's.

    Each saved setting is validated as if it were typed on the command line; an option given
    on this command line that disagrees with the saved run is refused rather than ignored.
    """
    ckpt_path = _checkpoint_path(args.resume)
    saved = load_checkpoint(ckpt_path).metadata.get("cli")
    if not isinstance(saved, dict):
        raise BnnetError(
            f"{ckpt_path}: not written by `bnnet train` (no 'cli' settings), so it cannot be resumed "
            "by the CLI; use bnnet.fit(..., resume=PATH)"
        )
    actions = {a.dest: a for a in parser.train_parser._actions}
    for key in TRAIN_SETTINGS:
        default = actions[key].default
        # runs saved before a setting existed had it at its default
        value = _saved_setting(ckpt_path, actions[key], saved[key]) if key in saved else default
        given = getattr(args, key)
        if given != default and given != value:
            raise BnnetError(
                f"{actions[key].option_strings[0]} {given} conflicts with the resumed run's own "
                f"setting ({value}); a resume keeps the run's settings: drop the option"
            )
        setattr(args, key, value)
    args.out = args.out or (args.resume if os.path.isdir(args.resume) else os.path.dirname(args.resume))
    return ckpt_path


def _saved_setting(path, action, value):
    """A setting read back from a checkpoint, checked by the same rules as its command-line option."""

    def refuse(why):
        raise BnnetError(
            f"{path}: metadata field user.cli.{action.dest} = {value!r} is invalid ({why}); "
            "the checkpoint was edited or corrupted"
        )

    if value is None:
        return None if action.default is None else refuse("it may not be null")
    if isinstance(action, argparse._StoreTrueAction):
        return value if isinstance(value, bool) else refuse("expected true or false")
    if isinstance(value, bool) or not isinstance(value, (int, float, str, list)):
        refuse("expected a number, a string or a list of sizes")
    text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
    try:
        parsed = action.type(text) if action.type else text
    except (argparse.ArgumentTypeError, ValueError) as e:
        refuse(str(e))
    if isinstance(value, float) and action.type is not None and not isinstance(parsed, float):
        refuse("expected an integer")
    if action.choices is not None and parsed not in action.choices:
        refuse(f"expected one of {', '.join(map(str, action.choices))}")
    return parsed


def cmd_train(args):
    if args.log_dir is not None:  # (an optional package: said before any data is read or folder made)
        import tensorboardX  # noqa: F401
    if args.resume:
        args.resume_path = _resume_settings(args, args.parser)
    if args.local_bn and not args.distributed:
        raise BnnetError("--local-bn only applies with --distributed (one process always uses its whole batch)")
    if args.device == "cuda":
        if args.distributed:
            raise BnnetError("--device cuda does not run with --distributed yet; train on one GPU")
        backend.set_backend("cuda")  # says what is missing before any data is read
    if not args.distributed:
        return _train(args, None)
    comm = distributed.Communicator()
    distributed.exit_on_interrupt(comm, "bnnet train")
    distributed.limit_threads()  # the ranks already fill the cores
    # a failure on one rank ends every rank, with the one line the single-process CLI prints
    with distributed.abort_on_error(comm, command="bnnet train", describe=error_message):
        _train(args, comm)


def _train(args, comm):
    root = distributed.is_root(comm)  # only rank 0 prints and writes files
    resume = getattr(args, "resume_path", None)
    X, y, Xt, yt, info = load_data(args.data, args.target, args.task, args.seed)
    outputs = 1 if args.task == "regression" else len(info.get("classes") or []) or int(max(y.max(), yt.max())) + 1
    model, X, Xt, described = _build_model(args, X, Xt, outputs)
    loss = "mse" if args.task == "regression" else "softmax_cross_entropy"
    callbacks = []
    if args.early_stopping is not None:
        if args.validation_split is None:
            args.validation_split = 0.1  # (early stopping watches held-out training rows, never the test set)
        callbacks.append(EarlyStopping(args.monitor, patience=args.early_stopping, restore_best_weights=True))
    validation = {"validation_split": args.validation_split, "validation_name": "val"}
    if args.validation_split is None:
        validation = {"validation_data": (Xt, yt), "validation_name": "test"}
    if comm is not None and not args.local_bn:
        model = distributed.sync_batchnorm(model, comm)
    lr = args.lr if args.lr is not None else _train_lr(args.optimizer)
    steps = args.epochs * -(-len(X) // args.batch_size)
    # Exponential decay that reaches lr * lr_decay at the last step (lr_decay = 1: constant).
    schedule = optim.ExponentialDecay(args.lr_decay, steps) if args.lr_decay != 1 else None
    opt = optim.OPTIMIZERS[args.optimizer](lr, schedule=schedule)
    out = args.out or (_new_run_dir() if root else None)
    if comm is not None:
        out = comm.broadcast_object(out)
    if root:
        os.makedirs(out, exist_ok=True)
    if not args.quiet and root:
        where = "" if comm is None else f" on {comm.size} ranks ({'local' if args.local_bn else 'synchronized'} BN)"
        print(
            f"bnnet: {'resuming' if resume else 'training'} {described}"
            f"{'' if args.no_batchnorm else ' + BatchNorm'}; {_describe_optimizer(args.optimizer, lr, args.lr_decay)}, "
            f"batch {args.batch_size}, {_epochs(args.epochs)}; {args.data} "
            f"({len(X)} train / {len(Xt)} test rows{_held_out(args)}){where}",
            file=sys.stderr,
        )
    start = time.perf_counter()
    settings = {k: getattr(args, k) for k in TRAIN_SETTINGS}
    kernels = _KernelClock()
    # The checkpoint in the run folder is rewritten every --checkpoint-every steps and at the end.
    with kernels:
        history = fit(
            model,
            X,
            y,
            optimizer=opt,
            loss=loss,
            epochs=args.epochs,
            batch_size=args.batch_size,
            seed=args.seed,
            progress=not args.quiet,
            clip_grad_norm=args.clip_grad_norm,
            checkpoint=os.path.join(out, CHECKPOINT_NAME),
            checkpoint_every=args.checkpoint_every,
            resume=resume,
            checkpoint_metadata={
                "cli": settings,
                "data": args.data,
                "input_range": [float(X.min()), float(X.max())],
                "input_shape": list(X.shape[1:]),
                **info,
            },
            comm=comm,
            log_dir=args.log_dir,
            device=args.device if args.device == "cuda" else None,
            callbacks=callbacks,
            class_weight=args.class_weight,
            **validation,
        )
    seconds = time.perf_counter() - start - kernels.seconds  # training, without compiling the kernels
    if not root:
        return
    test = evaluate(model, Xt, yt, loss)
    _write_history(out, history)
    summary = {
        "test_loss": test["loss"],
        "test_accuracy": test["accuracy"],
        "train_seconds": seconds,
        "kernel_seconds": kernels.seconds,
        "args": settings,
    }
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    result = (
        f"test MSE {test['loss']:.4g}"
        if test["accuracy"] is None
        else (f"test accuracy {test['accuracy']:.4f} (loss {test['loss']:.4f})")
    )
    trained = _epochs(len(history["epoch"]))
    if callbacks and callbacks[0].stopped_epoch:
        trained += f" (early stopping; weights of epoch {callbacks[0].best_epoch})"
    print(f"{result} after {trained} in {seconds:.1f} s of training{kernels.describe()}; run saved to {out}")


class _KernelClock:
    """The seconds numba spends compiling bnnet's kernels inside a `with` block (its "numba:compile"
    events), so that `bnnet train` reports them apart from the training: a first run compiles for
    several seconds; later runs load the kernels from numba's on-disk cache."""

    def __init__(self):
        self.seconds = 0.0
        self._timer = None

    def __enter__(self):
        try:
            from numba.core.event import install_timer
        except ImportError:  # (the NumPy backend without numba: nothing is compiled)
            return self
        self._timer = install_timer("numba:compile", self._add)
        self._timer.__enter__()
        return self

    def _add(self, duration):
        self.seconds += duration

    def __exit__(self, *exc):
        if self._timer is not None:
            self._timer.__exit__(*exc)
        return False

    def describe(self):
        if self.seconds < 0.05:
            return ""
        return f" (+ {self.seconds:.1f} s compiling kernels; later runs load them from numba's cache)"


def load_data(spec, target=None, task="classification", seed=0, saved=None):
    """(X, y, X_test, y_test, info) for --data: bnnet.datasets' image data, or a CSV table (--target;
    80/20 split seeded by --seed, features standardized with the training rows' mean and std).
    info is what the checkpoint keeps for predict: task, and for a table its features, target,
    classes and standardization. saved: a checkpoint's metadata, whose standardization and feature
    columns are used instead (evaluating a model on a table, its own or another)."""
    if not spec.endswith(".csv"):
        if target is not None or task != "classification":
            raise BnnetError("--target and --task regression apply to a CSV table (--data FILE.csv)")
        return (*datasets.load(spec), {"task": task})
    if target is None:
        raise BnnetError(f"--data {spec} is a table: say which column to predict with --target COLUMN")
    table = read_csv(spec, target, features=None if saved is None else saved.get("features"))
    X, y, Xt, yt, classes = table.split(task, test_fraction=0.2, seed=seed)
    if saved is not None and saved.get("classes") != classes:
        raise BnnetError(
            f"{spec}: column {target} holds the classes {classes}, the model was trained on {saved.get('classes')}"
        )
    scaler = (
        Standardizer.fit(X) if saved is None else Standardizer.from_dict(saved.get("standardize"), "the checkpoint")
    )
    info = {"task": task, "target": target, "features": table.features, "classes": classes}
    info["standardize"] = scaler.as_dict()
    return scaler(X), y, scaler(Xt), yt, info


def _held_out(args):
    return "" if args.validation_split is None else f", {args.validation_split:g} of train held out for validation"


def _epochs(n):
    return f"{n} epoch{'' if n == 1 else 's'}"


def _describe_optimizer(name, lr, decay):
    """'Adam lr 3e-3 -> 3e-4' (or 'SGD lr 0.5' without decay): what the run's first line says."""
    label = optim.OPTIMIZERS[name].__name__
    return f"{label} lr {lr:g}" + (f" -> {lr * decay:g}" if decay != 1 else "")


def _build_model(args, X, Xt, classes):
    """The network --model asks for -> (model, X, Xt, its one-line description).

    cnn: the rows of X are square single-channel images (MNIST's 784 = 28 x 28 pixels),
    reshaped to (N, 1, side, side) for bnnet.convnet.
    """
    defaults = MODEL_DEFAULTS[args.model]
    # (resolved here, so that the run's saved settings say what was trained)
    hidden = args.hidden = defaults["hidden"] if args.hidden is None else args.hidden
    activation = args.activation = args.activation or defaults["activation"]
    init = args.init or ("he" if activation in ("relu", "leaky_relu") else "xavier")
    norm = "none" if args.no_batchnorm else "batch"
    if args.model == "mlp":
        for option, value in (("--channels", args.channels), ("--in-shape", args.in_shape)):
            if value is not None:
                raise BnnetError(f"{option} applies to --model cnn only")
        X, Xt = X.reshape(len(X), -1), Xt.reshape(len(Xt), -1)  # (images become rows of pixels)
        sizes = [X.shape[1], *hidden, classes]
        model = mlp(sizes, activation=activation, norm=norm, init=init, seed=args.seed, dtype=args.dtype)
        return model, X, Xt, f"{'-'.join(map(str, sizes))} {activation}"
    in_shape = _image_shape(args, X)
    X, Xt = X.reshape(len(X), *in_shape), Xt.reshape(len(Xt), *in_shape)
    channels = args.channels = [32, 64] if args.channels is None else args.channels
    model = convnet(
        in_shape,
        channels=channels,
        hidden=hidden,
        classes=classes,
        activation=activation,
        norm=norm,
        init=init,
        seed=args.seed,
        dtype=args.dtype,
    )
    return (
        model,
        X,
        Xt,
        f"convnet {'x'.join(map(str, in_shape))} conv {'-'.join(map(str, channels))} "
        f"fc {'-'.join(map(str, [*hidden, classes]))} {activation}",
    )


def _image_shape(args, X):
    """(C, H, W) of --model cnn's images: X's own (N, C, H, W) shape, --in-shape for flat rows, or
    square single-channel images (MNIST's 784 = 28 x 28 pixels)."""
    if args.in_shape is not None:
        if len(args.in_shape) != 3 or math.prod(args.in_shape) != math.prod(X.shape[1:]):
            raise BnnetError(
                f"--in-shape must be C,H,W with C*H*W = {math.prod(X.shape[1:])} (the features per sample of "
                f"{args.data}), got {','.join(map(str, args.in_shape))}"
            )
        return tuple(args.in_shape)
    if X.ndim == 4:
        return X.shape[1:]
    side = math.isqrt(X.shape[1]) if X.ndim == 2 else 0
    if side * side != math.prod(X.shape[1:]) or X.ndim != 2:
        raise BnnetError(
            f"--model cnn takes images: {args.data} has samples of shape {X.shape[1:]}; give --in-shape C,H,W, "
            "or store X as (N, C, H, W)"
        )
    return (1, side, side)


def as_model_input(model, X, metadata=None):
    """Inputs as the model takes them: images flattened to rows for an MLP; rows of features reshaped
    to images (N, C, H, W) for a convnet, to the checkpoint's input_shape (metadata) when it has one,
    else to square images.

    Anything else is returned as is, for the model's own shape check to judge.
    """
    shape = (metadata or {}).get("input_shape")
    if model.input_shape is not None and len(model.input_shape) == 1 and X.ndim > 2:
        return X.reshape(len(X), -1)
    if model.input_shape is None or len(model.input_shape) != 3 or X.ndim != 2:
        return X
    if isinstance(shape, list) and len(shape) == 3 and math.prod(shape) == X.shape[1]:
        return X.reshape(len(X), *shape)
    shape = model.input_shape
    side = math.isqrt(X.shape[1] // shape[0])
    if shape[0] * side * side != X.shape[1]:
        raise BnnetError(
            f"the model takes images of {shape[0]} channel(s); rows of {X.shape[1]} features are not "
            f"{shape[0]} square image(s)"
        )
    return X.reshape(len(X), shape[0], side, side)


def _saved_data(ckpt, data):
    """(X, y, X_test, y_test) as the run that wrote `ckpt` loaded them (the same table split, and the
    checkpoint's own standardization and feature columns), from `data` (default: the run's own --data)."""
    cli = ckpt.metadata.get("cli") if isinstance(ckpt.metadata.get("cli"), dict) else {}
    task = ckpt.metadata.get("task", "classification")
    seed = cli.get("seed", 0) if isinstance(cli.get("seed", 0), int) else 0
    spec = data or ckpt.metadata.get("data", "mnist5k")
    saved = ckpt.metadata if ckpt.metadata.get("standardize") is not None else None  # (a table's run)
    X, y, Xt, yt, _ = load_data(spec, ckpt.metadata.get("target"), task, seed, saved)
    return X, y, Xt, yt


def cmd_evaluate(args):
    ckpt = load_checkpoint(_checkpoint_path(args.checkpoint))
    loss = ckpt.metadata.get("loss", "softmax_cross_entropy")
    X, y, Xt, yt = _saved_data(ckpt, args.data)
    Xs, ys = (X, y) if args.split == "train" else (Xt, yt)
    Xs = as_model_input(ckpt.model, Xs, ckpt.metadata)
    result = evaluate(ckpt.model, Xs, ys, loss)
    acc = "" if result["accuracy"] is None else f"accuracy {result['accuracy']:.4f} "
    print(f"{args.split}: {acc}loss {result['loss']:.4f} ({len(Xs)} rows)")


def cmd_predict(args):
    path = _checkpoint_path(args.checkpoint)
    model = load(path)
    meta = model.metadata
    if args.input.endswith(".csv"):
        features = meta.get("features")
        if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
            raise BnnetError(f"{path}: was not trained on a table (no feature names), so it cannot read {args.input}")
        X = read_csv(args.input, features=features).X  # (the target column, if present, is left out)
    else:
        X = datasets.load_npy(args.input)
        if X.ndim == 1:
            X = X[None, :]
    if meta.get("standardize") is not None:  # a table's features, scaled as in training
        X = Standardizer.from_dict(meta["standardize"], path)(X.reshape(len(X), -1).astype(np.float64))
    else:
        _warn_outside_training_range(meta.get("input_range"), X)
    outputs = model.predict(as_model_input(model, X, meta))
    regression = meta.get("task") == "regression" or meta.get("loss") == "mse"
    if args.outputs or regression:
        result, fmt = outputs, "%.6g"
    else:
        result, fmt = get_loss(meta.get("loss", "softmax_cross_entropy")).predict_labels(outputs), "%d"
        classes = meta.get("classes")
        if isinstance(classes, list) and len(classes) == outputs.shape[1]:  # the table's own class values
            result, fmt = np.array(classes)[result], "%s"
    if args.out:
        np.save(args.out, result, allow_pickle=False)
        print(f"wrote {result.shape} {'outputs' if args.outputs else 'predictions'} to {args.out}")
    else:
        np.savetxt(sys.stdout, result if result.ndim > 1 else result[:, None], fmt=fmt)


def _warn_outside_training_range(trained, X):
    """One warning line when X ranges well beyond the training data (e.g. 0-255 pixels for a model
    trained on 0-1): the model would still answer, wrongly."""
    if (
        not isinstance(trained, list)
        or len(trained) != 2
        or not all(isinstance(v, (int, float)) and np.isfinite(v) for v in trained)
        or X.size == 0
        or X.dtype.kind not in "biuf"
    ):  # (anything else is refused by predict itself)
        return
    lo, hi = trained
    width = max(hi - lo, 1e-12)
    x_lo, x_hi = float(np.min(X)), float(np.max(X))
    if x_lo < lo - width or x_hi > hi + width:
        hint = " (for 8-bit images: X / 255)" if hi <= 1.0 and x_hi > 1.0 else ""
        print(
            f"bnnet predict: warning: the inputs range over [{x_lo:g}, {x_hi:g}] but the model was trained on "
            f"[{lo:g}, {hi:g}]; scale them as the training data was{hint}",
            file=sys.stderr,
        )


def cmd_export(args):
    from .export import export_onnx

    model = load(_checkpoint_path(args.checkpoint))
    export_onnx(model, args.onnx, fold=args.fold)
    if not has_batchnorm(model):
        what = "no BatchNorm layers"
    elif args.fold:
        what = "BatchNorm folded into the layers before it"
    else:
        what = "BatchNormalization nodes with the running statistics"
    shape = model.metadata.get("input_shape") if isinstance(model.metadata.get("input_shape"), list) else None
    shape = shape or list(model.input_shape or ())
    takes = "x of shape (" + ", ".join(["N", *(str(d) if d is not None else "?" for d in shape)]) + ")"
    if len(shape) == 3:
        takes += " (images; bnnet predict also takes them as flat rows)"
    if model.metadata.get("standardize") is not None:
        takes += "; standardize the features first as the checkpoint's metadata says (bnnet predict does)"
    print(f"wrote {args.onnx} ({len(model.layers)} layers, {what}); the graph takes {takes}")


def cmd_recompute_stats(args):
    from .inference import recompute_bn_stats

    path = _checkpoint_path(args.checkpoint)
    ckpt = load_checkpoint(path)
    X, _, _, _ = _saved_data(ckpt, args.data)
    if args.in_place and args.out:
        raise BnnetError("give --out FILE or --in-place, not both")
    if not has_batchnorm(ckpt.model):
        raise BnnetError(
            f"{path}: the model has no BatchNorm layers (folded or trained without), so it has no "
            "statistics to recompute"
        )
    recompute_bn_stats(
        ckpt.model, as_model_input(ckpt.model, X, ckpt.metadata), batch_size=args.batch_size, mode=args.mode
    )
    out = path if args.in_place else args.out or _beside(path, "recomputed")
    save(out, ckpt.model, **ckpt.metadata)  # the optimizer state is dropped: these statistics are for inference
    print(f"recomputed BatchNorm statistics ({args.mode} mode, {len(X)} rows); wrote {out}")


def cmd_fold(args):
    from .inference import fold_batchnorm

    ckpt = load_checkpoint(_checkpoint_path(args.checkpoint))
    if not has_batchnorm(ckpt.model):
        raise BnnetError(
            f"{args.checkpoint}: the model has no BatchNorm layers to fold (already folded, or trained without)"
        )
    folded = fold_batchnorm(ckpt.model)
    meta = {k: v for k, v in ckpt.metadata.items() if k not in ("fit", "cli")}
    save(args.out, folded, **meta)
    print(f"wrote {args.out}: {len(ckpt.model.layers)} layers folded into {len(folded.layers)} (eval only)")


def cmd_experiment(args):
    out = args.out or _new_run_dir(os.path.join("runs", args.name))
    kwargs = {"data": args.data, "seed": args.seed, "quick": args.quick, "progress": not args.quiet}
    if args.steps is not None:
        if args.name == "batch-size":
            raise BnnetError("experiment batch-size trains a fixed number of epochs per batch size; use --epochs")
        kwargs["steps"] = args.steps
    if args.epochs is not None:
        if args.name != "batch-size":
            raise BnnetError(f"--epochs applies to experiment batch-size only; {args.name} takes --steps")
        kwargs["epochs"] = args.epochs
    experiments.run(args.name, out, **kwargs)
    with open(os.path.join(out, "summary.md")) as f:
        print(f.read().split("![")[0].rstrip())
    print(f"\nwrote {out}/: {args.name}.csv, {args.name}.png, summary.md, summary.json")


def cmd_summary(args):
    ckpt = load_checkpoint(_checkpoint_path(args.checkpoint))
    shape = ckpt.metadata.get("input_shape")
    valid = isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
    print(ckpt.model.summary(tuple(shape) if valid else None))


def cmd_report(args):
    print(f"wrote {experiments.report(args.runs, args.out)}")


class _Help(argparse.RawDescriptionHelpFormatter):
    """Help pages that show each option's default (unless its text already says it) and keep the
    examples' line breaks."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (
            default is not None
            and default is not False
            and default is not argparse.SUPPRESS
            and "default" not in text
            and action.option_strings
        ):
            text += " (default: %(default)s)"
        return text


EXAMPLES = {
    "train": [
        "bnnet train",
        "bnnet train --model cnn --epochs 5 --out runs/cnn",
        "bnnet train --activation relu --optimizer sgd --lr 0.5 --checkpoint-every 100",
        "bnnet train --data table.csv --target label --hidden 64,64 --activation relu --early-stopping 5",
        "bnnet train --data prices.csv --target price --task regression --activation relu",
        "bnnet train --model cnn --data cifar10.npz --epochs 10 --class-weight balanced",
    ],
    "evaluate": ["bnnet evaluate runs/cnn", "bnnet evaluate runs/cnn/model.safetensors --split train"],
    "predict": ["bnnet predict runs/cnn images.npy", "bnnet predict runs/cnn images.npy --outputs --out logits.npy"],
    "export": ["bnnet export runs/cnn --onnx model.onnx", "bnnet export runs/cnn --onnx model.onnx --fold"],
    "recompute-stats": ["bnnet recompute-stats runs/cnn", "bnnet recompute-stats runs/cnn --mode exact --in-place"],
    "fold": ["bnnet fold runs/cnn folded.safetensors", "bnnet evaluate folded.safetensors"],
    "experiment": ["bnnet experiment fig1", "bnnet experiment cnn --quick --out runs/cnn-quick"],
    "report": ["bnnet report runs/fig1/* --out report.md", "bnnet report runs/cnn"],
    "summary": ["bnnet summary runs/cnn"],
}


def _command(sub, name, help):
    epilog = "examples:\n" + "\n".join(f"  {line}" for line in EXAMPLES[name])
    return sub.add_parser(name, help=help, description=help, epilog=epilog, formatter_class=_Help)


def build_parser():
    p = argparse.ArgumentParser(
        prog="bnnet",
        description="Batch-normalized neural networks in NumPy.",
        epilog="Run `bnnet COMMAND --help` for a command's options and examples.",
    )
    p.add_argument("--version", action="version", version=f"bnnet {__version__}")
    p.add_argument("--debug", action="store_true", help="print the full traceback of an error")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = _command(sub, "train", "train an MLP or a convnet with BatchNorm (default: Ioffe & Szegedy's MNIST net)")
    t.add_argument(
        "--model",
        choices=["mlp", "cnn"],
        default="mlp",
        help="mlp: Linear -> BatchNorm -> activation layers (default); cnn: bnnet.convnet, "
        "Conv -> BatchNorm -> ReLU -> MaxPool blocks on the images reshaped to 1 x side x side",
    )
    t.add_argument("--channels", type=_sizes, default=None, help="cnn: channels of each conv block (default 32,64)")
    t.add_argument(
        "--hidden",
        type=_sizes,
        default=None,
        help="hidden sizes of the fully connected layers (default 100,100,100 for mlp, 128 for cnn)",
    )
    t.add_argument(
        "--activation",
        choices=["sigmoid", "relu", "leaky_relu", "tanh"],
        default=None,
        help="default sigmoid for mlp (the paper's), relu for cnn",
    )
    t.add_argument("--no-batchnorm", action="store_true", help="plain Linear(bias) -> activation layers")
    t.add_argument(
        "--init",
        choices=["he", "xavier", "normal"],
        default=None,
        help="weight init (default: xavier for sigmoid/tanh, he for relu)",
    )
    t.add_argument("--optimizer", choices=sorted(optim.OPTIMIZERS), default="adam", help="the update rule")
    t.add_argument(
        "--lr",
        type=_positive_float,
        default=None,
        help="learning rate (default: 3e-3 adam/adamw, 1e-3 rmsprop, 0.5 sgd/momentum)",
    )
    t.add_argument(
        "--lr-decay",
        type=_fraction,
        default=0.1,
        help="decay the lr exponentially to lr * LR_DECAY at the last step (default 0.1; 1 = constant)",
    )
    t.add_argument("--epochs", type=_positive, default=20, help="passes over the training data")
    t.add_argument("--batch-size", type=_positive, default=60, help="rows per mini-batch (default 60, as in the paper)")
    t.add_argument("--seed", type=_seed, default=0, help="seeds the weights and the shuffling")
    t.add_argument("--data", default="mnist5k", help="'mnist5k' (bundled), a folder of MNIST IDX files, or an .npz")
    t.add_argument("--target", default=None, metavar="COLUMN", help="with --data FILE.csv: the column to predict")
    t.add_argument(
        "--task",
        choices=["classification", "regression"],
        default="classification",
        help="with a CSV table: classes (softmax cross-entropy) or numbers (MSE, one output)",
    )
    t.add_argument(
        "--in-shape",
        type=_sizes,
        default=None,
        metavar="C,H,W",
        help="cnn: the image shape of flat rows (default: X's own (N, C, H, W) shape, or square 1-channel images)",
    )
    t.add_argument(
        "--validation-split",
        type=_open_fraction,
        default=None,
        metavar="F",
        help="hold out this fraction of the training rows for validation (default: report the test split)",
    )
    t.add_argument(
        "--early-stopping",
        type=_non_negative,
        default=None,
        metavar="PATIENCE",
        help="stop after PATIENCE epochs without improvement of --monitor and keep the best epoch's weights "
        "(validates on --validation-split, default 0.1)",
    )
    t.add_argument(
        "--monitor", choices=["val_loss", "val_accuracy"], default="val_loss", help="what --early-stopping watches"
    )
    t.add_argument(
        "--class-weight",
        choices=["balanced"],
        default=None,
        help="balanced: weigh each class's rows by n_rows / (n_classes * rows of the class), for imbalanced data",
    )
    t.add_argument("--dtype", choices=["float32", "float64"], default="float32", help="parameters and activations")
    t.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="where to train: cuda runs the cuda backend on an NVIDIA GPU (needs the [cuda] extra)",
    )
    t.add_argument("--out", default=None, help="run folder (default: a new folder under runs/)")
    t.add_argument("--quiet", action="store_true", help="no progress bar; print only the result")
    t.add_argument(
        "--log-dir",
        default=None,
        metavar="DIR",
        help="also write TensorBoard event files here (needs the [tensorboard] extra; "
        "view with `tensorboard --logdir DIR`)",
    )
    t.add_argument(
        "--threads",
        type=_threads,
        default=None,
        metavar="N",
        help="use at most N threads (default: OMP_NUM_THREADS if set, else every core)",
    )
    t.add_argument("--clip-grad-norm", type=_positive_float, default=None, help="clip gradients to this global L2 norm")
    t.add_argument(
        "--checkpoint-every",
        type=_positive,
        default=None,
        metavar="N",
        help="also write the run's checkpoint every N steps (atomically), for --resume",
    )
    t.add_argument(
        "--resume",
        default=None,
        metavar="RUN_DIR",
        help="continue an interrupted run from its checkpoint. The run keeps its own settings "
        f"({', '.join('--' + k.replace('_', '-') for k in TRAIN_SETTINGS)}), read from the "
        "checkpoint; giving one of them with a different value is an error. --out (default: "
        "RUN_DIR), --quiet, --threads and --distributed may be given",
    )
    t.add_argument(
        "--distributed",
        action="store_true",
        help="data-parallel over the MPI ranks (launch with mpiexec -n K; needs the [mpi] extra): "
        "each rank takes batch-size/K rows of every mini-batch",
    )
    t.add_argument(
        "--local-bn",
        action="store_true",
        help="with --distributed: each rank normalizes with its own shard's statistics "
        "(default: statistics synchronized over the whole mini-batch)",
    )
    t.set_defaults(func=cmd_train)
    p.train_parser = t  # --resume checks saved settings by these options' rules

    e = _command(sub, "evaluate", "loss and accuracy of a saved model")
    e.add_argument("checkpoint", help="a .safetensors checkpoint or a run folder")
    e.add_argument("--data", default=None, help="default: the data the model was trained on")
    e.add_argument("--split", choices=["test", "train"], default="test", help="which split of the data")
    e.set_defaults(func=cmd_evaluate)

    r = _command(sub, "predict", "predictions of a saved model for inputs in a .npy file")
    r.add_argument("checkpoint", help="a .safetensors checkpoint or a run folder")
    r.add_argument("input", help=".npy array of shape (N, features)")
    r.add_argument("--out", default=None, help="write predictions to this .npy (default: print them)")
    r.add_argument("--outputs", action="store_true", help="raw model outputs (logits) instead of labels")
    r.set_defaults(func=cmd_predict)

    x = _command(sub, "export", "export a saved model to ONNX")
    x.add_argument("checkpoint", help="a .safetensors checkpoint or a run folder")
    x.add_argument("--onnx", required=True, metavar="OUT.onnx")
    x.add_argument(
        "--fold",
        action="store_true",
        help="fold each Linear -> BatchNorm (Conv2d -> BatchNorm) pair into one Gemm (Conv)",
    )
    x.set_defaults(func=cmd_export)

    c = _command(sub, "recompute-stats", "replace running statistics by population statistics of the data")
    c.add_argument("checkpoint", help="a .safetensors checkpoint or a run folder")
    c.add_argument("--data", default=None, help="default: the data the model was trained on (its training split)")
    c.add_argument(
        "--mode",
        choices=["batch", "exact"],
        default="batch",
        help="batch: Alg. 2 of Ioffe & Szegedy (default); exact: full-data moments",
    )
    c.add_argument("--batch-size", type=_count, default=256, help="rows per batch (default 256)")
    c.add_argument(
        "--out", default=None, help="write here (default: beside the checkpoint, as model.recomputed.safetensors)"
    )
    c.add_argument("--in-place", action="store_true", help="replace the checkpoint itself (atomically)")
    c.set_defaults(func=cmd_recompute_stats)

    f = _command(sub, "fold", "write an eval-only copy with BatchNorm folded into the Linear/Conv2d layers")
    f.add_argument("checkpoint", help="a .safetensors checkpoint or a run folder")
    f.add_argument("out", help="the folded checkpoint to write")
    f.set_defaults(func=cmd_fold)
    ex = _command(sub, "experiment", "run an experiment and write its CSV, PNG and summary (needs the [plot] extra)")
    ex.add_argument("name", choices=list(experiments.EXPERIMENTS))
    ex.add_argument("--quick", action="store_true", help="a small version in seconds (what the tests run)")
    ex.add_argument("--steps", type=_positive, default=None, help="training steps per run (fig1 default 10000)")
    ex.add_argument("--epochs", type=_positive, default=None, help="batch-size only: epochs per run (default 2)")
    ex.add_argument("--data", default="mnist5k", help="'mnist5k' (bundled), a folder of MNIST IDX files, or an .npz")
    ex.add_argument("--seed", type=_seed, default=0, help="seeds every run of the experiment")
    ex.add_argument("--out", default=None, help="output folder (default: a new folder under runs/<name>/)")
    ex.add_argument("--quiet", action="store_true", help="no progress bar")
    ex.add_argument(
        "--threads",
        type=_threads,
        default=None,
        metavar="N",
        help="use at most N threads (default: OMP_NUM_THREADS if set, else every core)",
    )
    ex.set_defaults(func=cmd_experiment)

    sm = _command(sub, "summary", "each layer's output shape and parameter counts of a saved model")
    sm.add_argument("checkpoint", help="a .safetensors checkpoint or a run folder")
    sm.set_defaults(func=cmd_summary)

    rp = _command(sub, "report", "one markdown page from experiment folders")
    rp.add_argument("runs", nargs="+", metavar="RUN_DIR")
    rp.add_argument("--out", default="report.md", help="the page to write (default report.md)")
    rp.set_defaults(func=cmd_report)
    return p


def main(argv=None):
    """Run one command; return its exit status. Every failure is one line on stderr (the traceback
    only with --debug): 1 for errors, 2 for a bad command line (argparse), 130 for Ctrl-C."""
    parser = build_parser()
    try:  # shell completion, when argcomplete is installed (the [completion] extra) and the shell asks
        import argcomplete

        argcomplete.autocomplete(parser)
    except ImportError:
        pass
    args = parser.parse_args(argv)
    if args.command is None:  # bare `bnnet`: what it can do
        parser.print_help()
        return 0
    args.parser = parser
    try:
        if getattr(args, "threads", None) is not None:
            threads.set_num_threads(args.threads)
        args.func(args)
    except KeyboardInterrupt:
        print(f"bnnet {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of stdout stopped early (`bnnet predict ... | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:  # noqa: BLE001 - the one place every failure becomes one line
        if args.debug:
            traceback.print_exc()
        print(f"bnnet {args.command}: error: {error_message(e)}", file=sys.stderr)
        return 1
    return 0


def error_message(e):
    """One line for any exception: bnnet's own and OS errors as they are, anything else as a bug."""
    if isinstance(e, BnnetError):
        text = str(e)
    elif isinstance(e, ImportError) and e.name in OPTIONAL_EXTRAS:
        text = f'needs the optional package {e.name}: in bnnet\'s checkout, pip install ".[{OPTIONAL_EXTRAS[e.name]}]"'
    elif isinstance(e, OSError):
        text = f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e)
    elif isinstance(e, MemoryError):
        text = "out of memory; use a smaller model, batch or dataset"
    else:
        text = (
            f"internal error {type(e).__name__}: {e} -- this is a bug in bnnet; please report it with the "
            "output of the same command run as `bnnet --debug ...` (which adds the traceback)"
        )
    return " ".join(text.split())  # one line, whatever the message held


if __name__ == "__main__":
    sys.exit(main())
