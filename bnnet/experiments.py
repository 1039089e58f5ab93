"""Experiments that show what Batch Norm does, each written to a folder as CSV + PNG + summary.

    bnnet experiment fig1          Ioffe & Szegedy (2015), Sec. 4.1, Figure 1
    bnnet experiment lr-sweep      which learning rates train stably, with and without BN
    bnnet experiment optimizers    GD, Momentum, RMSprop, Adam, each with and without BN
    bnnet experiment batch-size    BatchNorm vs Batch Renorm vs Ghost BN as the batch shrinks
    bnnet experiment cnn           a convnet with and without BN, and BN vs Batch Renorm at batch 4

Every experiment trains with the lecture's loop (`_train`) for a fixed number of
steps, is deterministic for a seed, and has a `quick` mode (used by the tests).
The numbers go to <name>.csv and summary.json, the picture to <name>.png
(bnnet.plots, needs matplotlib: pip install ".[plot]"), the key numbers to
summary.md.
"""

import contextlib
import csv
import json
import os
import platform
import time
import warnings

import numpy as np
from tqdm.auto import tqdm

from . import datasets, optim
from ._checks import check_int, check_seed
from .errors import HyperparameterError
from .layers import BatchNormUntrainedWarning, Sigmoid
from .losses import SoftmaxCrossEntropy
from .model import convnet, mlp
from .train import minibatches

PAPER_NET = [784, 100, 100, 100, 10]
# Learning rates of each optimizer in the curves experiment (those of `bnnet train`).
DEFAULT_LR = {"sgd": 0.5, "momentum": 0.5, "rmsprop": 1e-3, "adam": 3e-3}


def _train(model, X, y, opt, steps, batch_size, seed, every, record, bar):
    """The lecture's loop for `steps` mini-batches; record(step, mean loss since the last call) at
    step 0 and every `every` steps. Returns False if the loss became NaN/Inf (training stopped)."""
    loss_fn, rng, batches = SoftmaxCrossEntropy(), np.random.default_rng(seed), []
    with warnings.catch_warnings():  # step 0 measures the untrained model in eval mode, on purpose
        warnings.simplefilter("ignore", BatchNormUntrainedWarning)
        record(0, float("nan"))
    total, count = 0.0, 0
    for step in range(1, steps + 1):
        if not batches:
            batches = minibatches(len(X), batch_size, rng, drop_single=True)[::-1]
        idx = batches.pop()
        loss = loss_fn.forward(model.forward(X[idx], train=True), y[idx])
        if not np.isfinite(loss):
            bar.update(steps - step + 1)
            return False
        model.backward(loss_fn.backward())
        opt.step(model)
        total, count = total + loss, count + 1
        bar.update(1)
        if step % every == 0 or step == steps:
            record(step, total / count)
            total, count = 0.0, 0
    return True


@contextlib.contextmanager
def _saved_buffers(model):
    """Run train-mode forwards for measurement only: the running statistics are restored after."""
    saved = {k: v.copy() for k, v in model.buffers.items()}
    try:
        yield
    finally:
        for k, v in saved.items():
            model.buffers[k] = v


def _accuracy(model, X, y):
    return float(np.mean(np.argmax(model.predict(X), axis=1) == y))


def _write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _finish(out, name, rows, summary, lines, plot, quick):
    """Write <name>.png, <name>.csv, summary.json (with the date, the machine and what the figure shows)
    and summary.md into out."""
    os.makedirs(out, exist_ok=True)
    length = f"{summary['steps']:,} steps" if "steps" in summary else f"{summary['epochs']} epoch(s) per run"
    title = f"{name} on {summary['data']}: {length}, seed {summary['seed']}{' (quick run)' if quick else ''}"
    figure = plot(rows, os.path.join(out, f"{name}.png"), title)
    _write_csv(os.path.join(out, f"{name}.csv"), rows)
    machine = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(
            {
                "experiment": name,
                "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                "machine": machine,
                "quick": quick,
                **summary,
                "figure": figure,
            },
            f,
            indent=1,
        )
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return summary


def _step(step, steps):
    """A table cell for 'the first step at which ...': the step, or 'not in N steps'."""
    return f"{step:,}" if step is not None else f"not in {steps:,} steps"


def _data(spec, quick):
    X, y, Xt, yt = datasets.load(spec)
    if quick:  # a slice keeps the tests fast; the classes are shuffled in every loader's split
        X, y, Xt, yt = X[:1000], y[:1000], Xt[:300], yt[:300]
    return X, y, Xt, yt


# --------------------------------------------------------------------------
# Figure 1 of Ioffe & Szegedy (2015)
# --------------------------------------------------------------------------


def fig1(out, data="mnist5k", steps=None, every=None, lr=0.5, std=0.1, seed=0, quick=False, progress=True):
    """784-100-100-100-10 sigmoid net, N(0, std^2) weights, batch 60, SGD at lr, with and without BN
    (same seed). Every `every` steps: test accuracy, and the 15th/50th/85th percentiles over the test
    set of the input to sigmoid unit 0 of the last hidden layer (z~ with BN, z = Wx + b without)."""
    from . import plots

    steps = steps or (300 if quick else 10000)
    every = every or max(1, steps // (20 if quick else 50))
    X, y, Xt, yt = _data(data, quick)
    columns = {}
    with tqdm(total=2 * steps, desc="fig1", disable=not progress, unit="step") as bar:
        for tag, bn in (("bn", True), ("nobn", False)):
            model = mlp(PAPER_NET, activation="sigmoid", batchnorm=bn, init="normal", std=std, seed=seed)
            k = max(i for i, l in enumerate(model.layers) if isinstance(l, Sigmoid))  # last hidden sigmoid
            rows = []

            def record(step, loss, model=model, k=k, rows=rows):
                z = Xt
                for layer in model.layers[:k]:  # eval mode, up to the sigmoid's input
                    z = layer.forward(z, False)
                p15, p50, p85 = np.percentile(z[:, 0], [15, 50, 85])
                rows.append(
                    {
                        "step": step,
                        "test_accuracy": _accuracy(model, Xt, yt),
                        "train_loss": loss,
                        "p15": p15,
                        "p50": p50,
                        "p85": p85,
                    }
                )

            _train(model, X, y, optim.SGD(lr), steps, 60, seed, every, record, bar)
            columns[tag] = rows
    rows = [
        {
            "step": a["step"],
            **{f"{key}_bn": a[key] for key in a if key != "step"},
            **{f"{key}_nobn": b[key] for key in b if key != "step"},
        }
        for a, b in zip(columns["bn"], columns["nobn"])
    ]
    final = rows[-1]

    def first_step(tag, level):
        return next((r["step"] for r in rows if r[f"test_accuracy_{tag}"] >= level), None)

    level = 0.9
    drift = {tag: float(np.ptp([r[f"p50_{tag}"] for r in rows[len(rows) // 10 :]])) for tag in ("bn", "nobn")}
    summary = {
        "steps": steps,
        "every": every,
        "lr": lr,
        "std": std,
        "seed": seed,
        "data": data,
        "final_accuracy_bn": final["test_accuracy_bn"],
        "final_accuracy_nobn": final["test_accuracy_nobn"],
        "steps_to_90_bn": first_step("bn", level),
        "steps_to_90_nobn": first_step("nobn", level),
        "median_drift_bn": drift["bn"],
        "median_drift_nobn": drift["nobn"],
    }
    lines = [
        f"# Figure 1 of Ioffe & Szegedy (2015) on {data}",
        "",
        f"784-100-100-100-10 sigmoid, N(0, {std}^2) weights, batch 60, SGD lr {lr}, {steps} steps, seed {seed}; "
        f"test accuracy and the input to sigmoid unit 0 of the last hidden layer every {every} steps.",
        "",
        "| | with BN | without BN |",
        "|---|---|---|",
        f"| final test accuracy | {final['test_accuracy_bn']:.4f} | {final['test_accuracy_nobn']:.4f} |",
        f"| first step with test accuracy >= {level} | {_step(summary['steps_to_90_bn'], steps)} | "
        f"{_step(summary['steps_to_90_nobn'], steps)} |",
        f"| range of the median input after the first 10% of steps | {drift['bn']:.3f} | {drift['nobn']:.3f} |",
        f"| final 15/50/85th percentiles | {final['p15_bn']:.2f} / {final['p50_bn']:.2f} / {final['p85_bn']:.2f} "
        f"| {final['p15_nobn']:.2f} / {final['p50_nobn']:.2f} / {final['p85_nobn']:.2f} |",
        "",
        "![fig1](fig1.png)",
    ]
    return _finish(out, "fig1", rows, summary, lines, plots.fig1, quick)


# --------------------------------------------------------------------------
# Learning-rate sweep
# --------------------------------------------------------------------------


def lr_sweep(out, data="mnist5k", steps=None, lrs=None, seed=0, quick=False, progress=True):
    """Final training loss and test accuracy over a log grid of learning rates, with and without BN,
    for SGD, Momentum and Adam. A run "trains stably" when its loss stays finite and its last
    mean training loss is below the initial ln(10) = 2.30."""
    from . import plots

    steps = steps or (40 if quick else 600)
    lrs = lrs or ([1e-2, 1.0, 100.0] if quick else [float(v) for v in np.logspace(-4, 2, 13)])
    X, y, Xt, yt = _data(data, quick)
    rows = []
    runs = [(o, bn, lr) for o in ("sgd", "momentum", "adam") for bn in (True, False) for lr in lrs]
    with tqdm(total=len(runs) * steps, desc="lr-sweep", disable=not progress, unit="step") as bar:
        for opt_name, bn, lr in runs:
            model = mlp(PAPER_NET, activation="sigmoid", batchnorm=bn, init="xavier", seed=seed)
            losses = []
            finite = _train(
                model,
                X,
                y,
                optim.OPTIMIZERS[opt_name](lr),
                steps,
                60,
                seed,
                max(1, steps // 10),
                lambda step, loss, losses=losses: losses.append(loss),
                bar,
            )
            acc = _accuracy(model, Xt, yt) if finite else float("nan")
            final = losses[-1] if finite else float("nan")
            rows.append(
                {
                    "optimizer": opt_name,
                    "batchnorm": int(bn),
                    "lr": lr,
                    "final_loss": final,
                    "test_accuracy": acc,
                    "stable": int(finite and final < np.log(10)),
                }
            )
    ranges = {}
    lines = [
        f"# Learning-rate sweep on {data}",
        "",
        f"784-100-100-100-10 sigmoid, batch 60, {steps} steps per run, seed {seed}. Stable: the loss stays "
        "finite and ends below ln(10) = 2.30 (chance).",
        "",
        "| optimizer | BN | stable learning rates | best test accuracy (lr) |",
        "|---|---|---|---|",
    ]
    for opt_name in ("sgd", "momentum", "adam"):
        for bn in (1, 0):
            sel = [r for r in rows if r["optimizer"] == opt_name and r["batchnorm"] == bn]
            ok = [r["lr"] for r in sel if r["stable"]]
            best = max(sel, key=lambda r: -1 if np.isnan(r["test_accuracy"]) else r["test_accuracy"])
            key = f"{opt_name}_{'bn' if bn else 'nobn'}"
            ranges[key] = [min(ok), max(ok)] if ok else None
            span = f"{min(ok):.3g} to {max(ok):.3g} ({len(ok)} of {len(sel)})" if ok else "none"
            lines.append(
                f"| {opt_name} | {'yes' if bn else 'no'} | {span} | {best['test_accuracy']:.4f} ({best['lr']:.3g}) |"
            )
    lines += ["", "![lr-sweep](lr-sweep.png)"]
    summary = {"steps": steps, "lrs": lrs, "seed": seed, "data": data, "stable_ranges": ranges}
    return _finish(out, "lr-sweep", rows, summary, lines, plots.lr_sweep, quick)


# --------------------------------------------------------------------------
# Optimizers
# --------------------------------------------------------------------------


def optimizers(out, data="mnist5k", steps=None, every=None, seed=0, quick=False, progress=True):
    """Learning curves (training loss and test accuracy) of GD, Momentum, RMSprop and Adam, each
    with and without BN, at the learning rates of `bnnet train`."""
    from . import plots

    steps = steps or (60 if quick else 3000)
    every = every or max(1, steps // (6 if quick else 30))
    X, y, Xt, yt = _data(data, quick)
    rows, final = [], {}
    with tqdm(total=8 * steps, desc="optimizers", disable=not progress, unit="step") as bar:
        for opt_name, lr in DEFAULT_LR.items():
            for bn in (True, False):
                model = mlp(PAPER_NET, activation="sigmoid", batchnorm=bn, init="xavier", seed=seed)
                tag = f"{opt_name}_{'bn' if bn else 'nobn'}"

                def record(step, loss, model=model, opt_name=opt_name, bn=bn):
                    rows.append(
                        {
                            "optimizer": opt_name,
                            "batchnorm": int(bn),
                            "step": step,
                            "train_loss": loss,
                            "test_accuracy": _accuracy(model, Xt, yt),
                        }
                    )

                _train(model, X, y, optim.OPTIMIZERS[opt_name](lr), steps, 60, seed, every, record, bar)
                final[tag] = rows[-1]["test_accuracy"]
    lines = [
        f"# Optimizers with and without BatchNorm on {data}",
        "",
        f"784-100-100-100-10 sigmoid, batch 60, {steps} steps, seed {seed}; "
        "learning rates: " + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ".",
        "",
        "| optimizer | final test accuracy with BN | without BN |",
        "|---|---|---|",
    ]
    lines += [f"| {o} | {final[o + '_bn']:.4f} | {final[o + '_nobn']:.4f} |" for o in DEFAULT_LR]
    lines += ["", "![optimizers](optimizers.png)"]
    summary = {"steps": steps, "every": every, "seed": seed, "data": data, "lrs": DEFAULT_LR, "final_accuracy": final}
    return _finish(out, "optimizers", rows, summary, lines, plots.optimizers, quick)


# --------------------------------------------------------------------------
# Batch size: BatchNorm, Batch Renorm, Ghost BN
# --------------------------------------------------------------------------

# renorm_momentum 0.9: the same averaging horizon as BatchNorm's decay, for runs of 30 to 4,000 steps
NORM_OPTIONS = {"batch": {}, "renorm": {"r_max": 3.0, "d_max": 5.0, "warmup": 100, "renorm_momentum": 0.9}, "ghost": {}}
GHOST_VIRTUAL_BATCH = 8


def batch_size(out, data="mnist5k", epochs=None, sizes=None, lr=1e-3, seed=0, quick=False, progress=True):
    """Test accuracy and the train/eval gap as the batch shrinks, for BatchNorm, Batch Renorm and
    Ghost BN (virtual batches of min(batch, 8) rows). Each run sees the same number of samples
    (epochs over the training set) with Adam at lr. The gap is the mean absolute difference
    between the logits of the test set in train mode (batch statistics of test batches of the same
    size; running statistics restored afterwards) and in eval mode, relative to the mean absolute
    eval-mode logit; with it, the test accuracy in each mode."""
    from . import plots

    epochs = epochs or (1 if quick else 2)
    sizes = sizes or ([4, 16, 64] if quick else [2, 4, 8, 16, 32, 64, 128, 256])
    X, y, Xt, yt = _data(data, quick)
    runs = [(norm, b) for norm in NORM_OPTIONS for b in sizes]
    steps = {b: epochs * (len(X) // b) for b in sizes}
    rows = []
    with tqdm(total=sum(steps[b] for _, b in runs), desc="batch-size", disable=not progress, unit="step") as bar:
        for norm, b in runs:
            opts = dict(
                NORM_OPTIONS[norm], **({"virtual_batch_size": min(b, GHOST_VIRTUAL_BATCH)} if norm == "ghost" else {})
            )
            model = mlp(PAPER_NET, activation="sigmoid", norm=norm, norm_options=opts, init="xavier", seed=seed)
            _train(model, X, y, optim.Adam(lr), steps[b], b, seed, steps[b], lambda *a: None, bar)
            eval_out = model.predict(Xt)
            n = len(Xt) - len(Xt) % b
            with _saved_buffers(model):
                train_out = np.concatenate([model.forward(Xt[i : i + b], train=True) for i in range(0, n, b)])
            gap = float(np.abs(train_out - eval_out[:n]).mean() / np.abs(eval_out[:n]).mean())
            rows.append(
                {
                    "norm": norm,
                    "batch_size": b,
                    "steps": steps[b],
                    "test_accuracy": float(np.mean(eval_out.argmax(1) == yt)),
                    "train_mode_accuracy": float(np.mean(train_out.argmax(1) == yt[:n])),
                    "train_eval_gap": gap,
                }
            )
    lines = [
        f"# Batch size: BatchNorm, Batch Renorm, Ghost BN on {data}",
        "",
        f"784-100-100-100-10 sigmoid, Adam lr {lr:g}, {epochs} epoch(s) per run, seed {seed}; Batch Renorm "
        f"r_max 3, d_max 5 after a 100-step warm-up, renorm_momentum 0.9; Ghost BN virtual batches of "
        f"min(batch, {GHOST_VIRTUAL_BATCH}).",
        "",
        "| batch | " + " | ".join(f"{n} acc / gap" for n in NORM_OPTIONS) + " |",
        "|---|" + "---|" * len(NORM_OPTIONS),
    ]
    for b in sizes:
        cells = [next(r for r in rows if r["norm"] == n and r["batch_size"] == b) for n in NORM_OPTIONS]
        lines.append(
            f"| {b} | " + " | ".join(f"{c['test_accuracy']:.4f} / {c['train_eval_gap']:.3f}" for c in cells) + " |"
        )
    lines += [
        "",
        "acc: eval-mode test accuracy; gap: mean |train-mode - eval-mode logits| / mean |eval-mode logits|.",
        "",
        "![batch-size](batch-size.png)",
    ]
    summary = {
        "epochs": epochs,
        "sizes": sizes,
        "lr": lr,
        "seed": seed,
        "data": data,
        "results": {f"{r['norm']}_{r['batch_size']}": [r["test_accuracy"], r["train_eval_gap"]] for r in rows},
    }
    return _finish(out, "batch-size", rows, summary, lines, plots.batch_size, quick)


# --------------------------------------------------------------------------
# A convolutional network
# --------------------------------------------------------------------------

# (tag, norm, batch size): the builder's net at the paper's batch of 60 with and without BN,
# and BN vs Batch Renorm at a batch of 4 rows
CNN_RUNS = (("bn", "batch", 60), ("nobn", "none", 60), ("bn_b4", "batch", 4), ("renorm_b4", "renorm", 4))


def cnn(out, data="mnist5k", steps=None, every=None, lr=0.05, seed=0, quick=False, progress=True):
    """Learning curves (training loss, test accuracy) of bnnet.convnet on the images reshaped to
    1 x side x side, trained with SGD at lr for the same number of steps in each run (CNN_RUNS),
    and the first step at which each reaches 95% test accuracy."""
    from . import plots

    steps = steps or (30 if quick else 1500)
    every = every or max(1, steps // (3 if quick else 30))
    X, y, Xt, yt = _data(data, quick)
    side = int(np.sqrt(X.shape[1]))
    if side * side != X.shape[1]:
        raise HyperparameterError(
            f"experiment cnn takes square single-channel images, but {data} has {X.shape[1]} features per row"
        )
    X, Xt = X.reshape(-1, 1, side, side), Xt.reshape(-1, 1, side, side)
    start = time.perf_counter()
    shape = dict(channels=(4, 8), hidden=(32,)) if quick else dict(channels=(32, 64), hidden=(128,))
    rows, first, final = [], {}, {}
    with tqdm(total=len(CNN_RUNS) * steps, desc="cnn", disable=not progress, unit="step") as bar:
        for tag, norm, b in CNN_RUNS:
            opts = NORM_OPTIONS["renorm"] if norm == "renorm" else None
            model = convnet((1, side, side), classes=int(y.max()) + 1, norm=norm, norm_options=opts, seed=seed, **shape)

            def record(step, loss, model=model, tag=tag, b=b):
                rows.append(
                    {
                        "run": tag,
                        "batch_size": b,
                        "step": step,
                        "train_loss": loss,
                        "test_accuracy": _accuracy(model, Xt, yt),
                    }
                )

            _train(model, X, y, optim.SGD(lr), steps, b, seed, every, record, bar)
            curve = [r for r in rows if r["run"] == tag]
            first[tag] = next((r["step"] for r in curve if r["test_accuracy"] >= 0.95), None)
            final[tag] = curve[-1]["test_accuracy"]
    net = f"convnet conv {'-'.join(map(str, shape['channels']))} fc {'-'.join(map(str, shape['hidden']))}"
    lines = [
        f"# A convolutional network with and without BatchNorm on {data}",
        "",
        f"{net} (Conv -> BN (or nothing) -> ReLU -> MaxPool blocks), SGD lr {lr:g}, {steps} steps per run, "
        f"seed {seed}; "
        "test accuracy measured every "
        f"{every} steps. Batch Renorm: r_max 3, d_max 5 after a 100-step warm-up, renorm_momentum 0.9.",
        "",
        "| run | batch | first step at 95% test accuracy | final test accuracy |",
        "|---|---|---|---|",
    ]
    lines += [f"| {tag} | {b} | {_step(first[tag], steps)} | {final[tag]:.4f} |" for tag, _, b in CNN_RUNS]
    lines += ["", "![cnn](cnn.png)"]
    summary = {
        "steps": steps,
        "every": every,
        "lr": lr,
        "seed": seed,
        "data": data,
        "net": net,
        "runs": [list(r) for r in CNN_RUNS],
        "first_step_95": first,
        "final_accuracy": final,
        "seconds": time.perf_counter() - start,
    }
    return _finish(out, "cnn", rows, summary, lines, plots.cnn, quick)


EXPERIMENTS = {"fig1": fig1, "lr-sweep": lr_sweep, "optimizers": optimizers, "batch-size": batch_size, "cnn": cnn}


def run(name, out, **kwargs):
    """Run experiment `name` (a key of EXPERIMENTS), writing its files to the folder `out`."""
    if name not in EXPERIMENTS:
        raise HyperparameterError(f"experiment must be one of {', '.join(EXPERIMENTS)}, got {name!r}")
    for key in ("steps", "every", "epochs"):  # None (the default) or a positive count; 0 is not "default"
        if kwargs.get(key) is not None:
            kwargs[key] = check_int(f"experiment {name}", key, kwargs[key], low=1)
    if "seed" in kwargs:
        kwargs["seed"] = check_seed(f"experiment {name}", kwargs["seed"])
    return EXPERIMENTS[name](out, **kwargs)


def _train_run_summary(folder):
    """Draw a `bnnet train` run's learning curves (learning_curves.png) and write its summary.md."""
    from . import plots

    try:
        with open(os.path.join(folder, "history.json")) as f:
            history = json.load(f)
        with open(os.path.join(folder, "summary.json")) as f:
            summary = json.load(f)
        epochs = history["epoch"]
        assert isinstance(epochs, list) and all(len(history[k]) == len(epochs) for k in ("loss", "val_loss"))
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as e:
        raise HyperparameterError(
            f"report: {folder} is not a complete `bnnet train` run ({type(e).__name__}: {e})"
        ) from None
    settings = summary.get("args", {})
    title = (
        f"bnnet train on {settings.get('data', '?')}: {settings.get('model', 'mlp')}, "
        f"{settings.get('optimizer', '?')}, batch {settings.get('batch_size', '?')}"
    )
    plots.train_run(history, os.path.join(folder, "learning_curves.png"), title)
    lines = [
        f"# Training run {os.path.basename(os.path.normpath(folder))}",
        "",
        title + ".",
        "",
        f"Test accuracy {summary['test_accuracy']:.4f} (loss {summary['test_loss']:.4f}) after "
        f"{len(epochs)} epoch(s), {summary['train_seconds']:.1f} s of training.",
        "",
        "| setting | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in settings.items() if v is not None]
    lines += ["", "![learning curves](learning_curves.png)"]
    path = os.path.join(folder, "summary.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def report(run_dirs, out):
    """One markdown page from experiment folders: each folder's summary.md, figures re-linked."""
    parts = ["# bnnet experiments report", ""]
    base = os.path.dirname(os.path.abspath(out))
    for d in run_dirs:
        path = os.path.join(d, "summary.md")
        if not os.path.isfile(path) and os.path.isfile(os.path.join(d, "history.json")):
            path = _train_run_summary(d)  # a `bnnet train` run: its curves and numbers
        if not os.path.isfile(path):
            raise HyperparameterError(
                f"report: {d} holds no summary.md or history.json; pass folders written by "
                "`bnnet experiment` or `bnnet train`"
            )
        rel = os.path.relpath(os.path.abspath(d), base)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError as e:
            raise HyperparameterError(
                f"report: {path} is not UTF-8 text ({e.reason} at byte {e.start}); "
                "pass folders written by `bnnet experiment`"
            ) from None
        for png in sorted(p for p in os.listdir(d) if p.endswith(".png")):
            text = text.replace(f"]({png})", f"]({rel}/{png})")
        parts += [f"<!-- from {rel} -->", text.replace("\n# ", "\n## ").replace("# ", "## ", 1), ""]
    with open(out, "w") as f:
        f.write("\n".join(parts))
    return out
