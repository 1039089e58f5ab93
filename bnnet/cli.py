"""The `bnnet` command: train, evaluate, predict.

    bnnet train                      # Ioffe & Szegedy's MNIST net (784-100-100-100-10, sigmoid, BN) on the bundled data
    bnnet evaluate runs/<run>        # test loss and accuracy of a saved model
    bnnet predict runs/<run> X.npy   # class labels (or raw outputs) for new inputs
    bnnet export runs/<run> --onnx model.onnx [--fold]
    bnnet recompute-stats runs/<run> [--mode batch|exact]
    bnnet fold runs/<run> folded.safetensors
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
import os
import sys
import time

import numpy as np

from . import datasets, distributed, experiments, optim, threads
from .errors import BnnetError
from .io import load, load_checkpoint, save
from .losses import get_loss
from .model import mlp
from .train import evaluate, fit

CHECKPOINT_NAME = "model.safetensors"
# Learning rates that `bnnet train` uses by default: BatchNorm tolerates rates
# well above the usual ones (tuned on the bundled data, see the README).
TRAIN_LR = {"sgd": 0.5, "momentum": 0.5, "rmsprop": 1e-3, "adam": 3e-3}


def _threads(text):
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return n


def _sizes(text):
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 100,100,100, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected positive layer sizes, got {text!r}")
    return sizes


def _fraction(text):
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def _new_run_dir(root="runs"):
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, i = os.path.join(root, stamp), 1
    while os.path.exists(path):
        path, i = os.path.join(root, f"{stamp}-{i}"), i + 1
    return path


def _checkpoint_path(path):
    """A run folder stands for the checkpoint inside it."""
    return os.path.join(path, CHECKPOINT_NAME) if os.path.isdir(path) else path


def _write_history(folder, history):
    with open(os.path.join(folder, "history.json"), "w") as f:
        json.dump(history, f, indent=1)
    with open(os.path.join(folder, "history.csv"), "w", newline="") as f:
        w = csv.writer(f)
        keys = list(history)
        w.writerow(keys)
        w.writerows(zip(*(history[k] for k in keys)))


TRAIN_SETTINGS = ("hidden", "activation", "no_batchnorm", "init", "optimizer", "lr", "lr_decay", "epochs",
                  "batch_size", "seed", "data", "dtype", "clip_grad_norm", "local_bn")


def _resume_settings(args):
    """With --resume RUN_DIR, the run's own settings (stored in its checkpoint) replace the command line's."""
    ckpt_path = _checkpoint_path(args.resume)
    saved = load_checkpoint(ckpt_path).metadata.get("cli")
    if saved is None:
        raise BnnetError(f"{ckpt_path}: not written by `bnnet train`, so it has no settings to resume with")
    for key in TRAIN_SETTINGS:
        setattr(args, key, saved.get(key, False))  # runs saved before a setting existed had it off
    args.out = args.out or (args.resume if os.path.isdir(args.resume) else os.path.dirname(args.resume))
    return ckpt_path


def cmd_train(args):
    if args.local_bn and not args.distributed:
        raise BnnetError("--local-bn only applies with --distributed (one process always uses its whole batch)")
    if not args.distributed:
        return _train(args, None)
    comm = distributed.Communicator()
    distributed.limit_threads()  # the ranks already fill the cores
    with distributed.abort_on_error(comm):  # a failure on one rank ends every rank, with its message
        _train(args, comm)


def _train(args, comm):
    root = distributed.is_root(comm)  # only rank 0 prints and writes files
    resume = _resume_settings(args) if args.resume else None
    X, y, Xt, yt = datasets.load(args.data)
    init = args.init or ("he" if args.activation in ("relu", "leaky_relu") else "xavier")
    sizes = [X.shape[1], *args.hidden, int(max(y.max(), yt.max())) + 1]
    model = mlp(sizes, activation=args.activation, batchnorm=not args.no_batchnorm, init=init,
                seed=args.seed, dtype=args.dtype)
    if comm is not None and not args.local_bn:
        model = distributed.sync_batchnorm(model, comm)
    lr = args.lr if args.lr is not None else TRAIN_LR[args.optimizer]
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
        print(f"bnnet: {'resuming' if resume else 'training'} {'-'.join(map(str, sizes))} {args.activation}"
              f"{'' if args.no_batchnorm else ' + BatchNorm'} with {opt!r} on {args.data} "
              f"({len(X)} train / {len(Xt)} test rows){where}", file=sys.stderr)
    start = time.perf_counter()
    settings = {k: getattr(args, k) for k in TRAIN_SETTINGS}
    # The checkpoint in the run folder is rewritten every --checkpoint-every steps and at the end.
    history = fit(model, X, y, optimizer=opt, loss="softmax_cross_entropy", epochs=args.epochs,
                  batch_size=args.batch_size, seed=args.seed, validation_data=(Xt, yt), progress=not args.quiet,
                  clip_grad_norm=args.clip_grad_norm, checkpoint=os.path.join(out, CHECKPOINT_NAME),
                  checkpoint_every=args.checkpoint_every, resume=resume,
                  checkpoint_metadata={"cli": settings, "data": args.data}, comm=comm)
    seconds = time.perf_counter() - start
    if not root:
        return
    test = evaluate(model, Xt, yt, "softmax_cross_entropy")
    _write_history(out, history)
    summary = {"test_loss": test["loss"], "test_accuracy": test["accuracy"], "train_seconds": seconds,
               "args": settings}
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"test accuracy {test['accuracy']:.4f} (loss {test['loss']:.4f}) after {args.epochs} epochs "
          f"in {seconds:.1f} s; run saved to {out}")


def cmd_evaluate(args):
    ckpt = load_checkpoint(_checkpoint_path(args.checkpoint))
    loss = ckpt.metadata.get("loss", "softmax_cross_entropy")
    X, y, Xt, yt = datasets.load(args.data or ckpt.metadata.get("data", "mnist5k"))
    Xs, ys = (X, y) if args.split == "train" else (Xt, yt)
    result = evaluate(ckpt.model, Xs, ys, loss)
    acc = "" if result["accuracy"] is None else f"accuracy {result['accuracy']:.4f} "
    print(f"{args.split}: {acc}loss {result['loss']:.4f} ({len(Xs)} rows)")


def cmd_predict(args):
    path = _checkpoint_path(args.checkpoint)
    model = load(path)
    try:
        X = np.load(args.input, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise BnnetError(f"{args.input}: cannot read as a .npy array without pickle ({e})") from None
    if X.ndim == 1:
        X = X[None, :]
    outputs = model.predict(X)
    result = outputs if args.outputs else get_loss(model.metadata.get("loss", "softmax_cross_entropy")).predict_labels(outputs)
    if args.out:
        np.save(args.out, result, allow_pickle=False)
        print(f"wrote {result.shape} {'outputs' if args.outputs else 'labels'} to {args.out}")
    else:
        np.savetxt(sys.stdout, result if result.ndim > 1 else result[:, None], fmt="%.6g" if args.outputs else "%d")


def cmd_export(args):
    from .export import export_onnx

    model = load(_checkpoint_path(args.checkpoint))
    export_onnx(model, args.onnx, fold=args.fold)
    print(f"wrote {args.onnx} ({'folded Gemm' if args.fold else 'Gemm/MatMul + BatchNormalization'} nodes)")


def cmd_recompute_stats(args):
    from .inference import recompute_bn_stats

    path = _checkpoint_path(args.checkpoint)
    ckpt = load_checkpoint(path)
    X, _, _, _ = datasets.load(args.data or ckpt.metadata.get("data", "mnist5k"))
    recompute_bn_stats(ckpt.model, X, batch_size=args.batch_size, mode=args.mode)
    out = args.out or path
    save(out, ckpt.model, **ckpt.metadata)  # the optimizer state is dropped: these statistics are for inference
    print(f"recomputed BatchNorm statistics ({args.mode} mode, {len(X)} rows); wrote {out}")


def cmd_fold(args):
    from .inference import fold_batchnorm

    ckpt = load_checkpoint(_checkpoint_path(args.checkpoint))
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


def cmd_report(args):
    print(f"wrote {experiments.report(args.runs, args.out)}")


def build_parser():
    p = argparse.ArgumentParser(prog="bnnet", description="Batch-normalized neural networks in NumPy.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train an MLP with BatchNorm (default: Ioffe & Szegedy's MNIST net)")
    t.add_argument("--hidden", type=_sizes, default=[100, 100, 100], help="hidden sizes (default 100,100,100)")
    t.add_argument("--activation", choices=["sigmoid", "relu", "leaky_relu", "tanh"], default="sigmoid")
    t.add_argument("--no-batchnorm", action="store_true", help="plain Linear(bias) -> activation layers")
    t.add_argument("--init", choices=["he", "xavier", "normal"], default=None,
                   help="weight init (default: xavier for sigmoid/tanh, he for relu)")
    t.add_argument("--optimizer", choices=sorted(optim.OPTIMIZERS), default="adam")
    t.add_argument("--lr", type=float, default=None, help="learning rate (default: 3e-3 adam, 1e-3 rmsprop, 0.5 sgd/momentum)")
    t.add_argument("--lr-decay", type=_fraction, default=0.1,
                   help="decay the lr exponentially to lr * LR_DECAY at the last step (default 0.1; 1 = constant)")
    t.add_argument("--epochs", type=int, default=20)
    t.add_argument("--batch-size", type=int, default=60, help="default 60, as in the paper")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--data", default="mnist5k", help="'mnist5k' (bundled), a folder of MNIST IDX files, or an .npz")
    t.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    t.add_argument("--out", default=None, help="run folder (default: a new folder under runs/)")
    t.add_argument("--quiet", action="store_true", help="no progress bar; print only the result")
    t.add_argument("--threads", type=_threads, default=None, metavar="N",
                   help="use at most N threads (default: OMP_NUM_THREADS if set, else every core)")
    t.add_argument("--clip-grad-norm", type=float, default=None, help="clip gradients to this global L2 norm")
    t.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                   help="also write the run's checkpoint every N steps (atomically), for --resume")
    t.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue an interrupted run from its checkpoint, with its own settings")
    t.add_argument("--distributed", action="store_true",
                   help="data-parallel over the MPI ranks (launch with mpiexec -n K; needs bnnet[mpi]): "
                        "each rank takes batch-size/K rows of every mini-batch")
    t.add_argument("--local-bn", action="store_true",
                   help="with --distributed: each rank normalizes with its own shard's statistics "
                        "(default: statistics synchronized over the whole mini-batch)")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="loss and accuracy of a saved model")
    e.add_argument("checkpoint", help="a .safetensors checkpoint or a run folder")
    e.add_argument("--data", default=None, help="default: the data the model was trained on")
    e.add_argument("--split", choices=["test", "train"], default="test")
    e.set_defaults(func=cmd_evaluate)

    r = sub.add_parser("predict", help="predictions of a saved model for inputs in a .npy file")
    r.add_argument("checkpoint", help="a .safetensors checkpoint or a run folder")
    r.add_argument("input", help=".npy array of shape (N, features)")
    r.add_argument("--out", default=None, help="write predictions to this .npy (default: print them)")
    r.add_argument("--outputs", action="store_true", help="raw model outputs (logits) instead of labels")
    r.set_defaults(func=cmd_predict)

    x = sub.add_parser("export", help="export a saved model to ONNX")
    x.add_argument("checkpoint", help="a .safetensors checkpoint or a run folder")
    x.add_argument("--onnx", required=True, metavar="OUT.onnx")
    x.add_argument("--fold", action="store_true", help="fold each Linear -> BatchNorm pair into one Gemm")
    x.set_defaults(func=cmd_export)

    c = sub.add_parser("recompute-stats", help="replace running statistics by population statistics of the data")
    c.add_argument("checkpoint", help="a .safetensors checkpoint or a run folder")
    c.add_argument("--data", default=None, help="default: the data the model was trained on (its training split)")
    c.add_argument("--mode", choices=["batch", "exact"], default="batch",
                   help="batch: Alg. 2 of Ioffe & Szegedy (default); exact: full-data moments")
    c.add_argument("--batch-size", type=int, default=256)
    c.add_argument("--out", default=None, help="write here (default: replace the checkpoint, atomically)")
    c.set_defaults(func=cmd_recompute_stats)

    f = sub.add_parser("fold", help="write an eval-only copy with BatchNorm folded into the Linear layers")
    f.add_argument("checkpoint", help="a .safetensors checkpoint or a run folder")
    f.add_argument("out", help="the folded checkpoint to write")
    f.set_defaults(func=cmd_fold)
    ex = sub.add_parser("experiment", help="run an experiment and write its CSV, PNG and summary (needs bnnet[plot])")
    ex.add_argument("name", choices=list(experiments.EXPERIMENTS))
    ex.add_argument("--quick", action="store_true", help="a small version in seconds (what the tests run)")
    ex.add_argument("--steps", type=int, default=None, help="training steps per run (fig1 default 10000)")
    ex.add_argument("--epochs", type=int, default=None, help="batch-size only: epochs per run (default 2)")
    ex.add_argument("--data", default="mnist5k", help="'mnist5k' (bundled), a folder of MNIST IDX files, or an .npz")
    ex.add_argument("--seed", type=int, default=0)
    ex.add_argument("--out", default=None, help="output folder (default: a new folder under runs/<name>/)")
    ex.add_argument("--quiet", action="store_true", help="no progress bar")
    ex.add_argument("--threads", type=_threads, default=None, metavar="N",
                    help="use at most N threads (default: OMP_NUM_THREADS if set, else every core)")
    ex.set_defaults(func=cmd_experiment)

    rp = sub.add_parser("report", help="one markdown page from experiment folders")
    rp.add_argument("runs", nargs="+", metavar="RUN_DIR")
    rp.add_argument("--out", default="report.md", help="the page to write (default report.md)")
    rp.set_defaults(func=cmd_report)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "threads", None) is not None:
            threads.set_num_threads(args.threads)
        args.func(args)
    except (BnnetError, OSError) as e:
        print(f"bnnet {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"bnnet {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
