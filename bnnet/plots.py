"""Figures of bnnet.experiments (matplotlib, Agg backend: files only, no screen).

matplotlib is an extra (in bnnet's checkout: pip install ".[plot]"); importing this module
without it raises a BnnetError that says so.
"""
import numpy as np

from .errors import BnnetError

try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
except ImportError:
    raise BnnetError("bnnet experiment draws its figures with matplotlib, which is not installed: "
                     "in bnnet's checkout, pip install \".[plot]\"") from None

COLORS = {"bn": "tab:blue", "nobn": "tab:red"}


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fig1(rows, path):
    """(a) test accuracy vs steps; (b) 15/50/85th percentiles of one sigmoid's input, with and without BN."""
    steps = np.array([r["step"] for r in rows])
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for tag, label in (("nobn", "Without BN"), ("bn", "With BN")):
        a.plot(steps, [r[f"test_accuracy_{tag}"] for r in rows], color=COLORS[tag], label=label)
        lo, mid, hi = (np.array([r[f"p{q}_{tag}"] for r in rows]) for q in (15, 50, 85))
        b.fill_between(steps, lo, hi, color=COLORS[tag], alpha=0.2)
        b.plot(steps, mid, color=COLORS[tag], label=f"{label}: median, 15-85th pct.")
    a.set(title="(a) Test accuracy", xlabel="training steps", ylabel="accuracy")
    a.legend()
    b.set(title="(b) Input to a last-hidden-layer sigmoid", xlabel="training steps")
    b.legend()
    _save(fig, path)


def lr_sweep(rows, path):
    """Final test accuracy vs learning rate per optimizer; crosses mark runs that did not train stably."""
    opts = list(dict.fromkeys(r["optimizer"] for r in rows))
    fig, axes = plt.subplots(1, len(opts), figsize=(4 * len(opts), 3.6), sharey=True)
    for ax, opt in zip(np.atleast_1d(axes), opts):
        for bn, tag in ((1, "bn"), (0, "nobn")):
            sel = [r for r in rows if r["optimizer"] == opt and r["batchnorm"] == bn]
            lr = np.array([r["lr"] for r in sel])
            acc = np.array([r["test_accuracy"] if r["stable"] else 0.0 for r in sel])
            ax.plot(lr, acc, "o-", color=COLORS[tag], label="with BN" if bn else "without BN")
            bad = np.array([not r["stable"] for r in sel])
            ax.plot(lr[bad], acc[bad], "x", color="k", markersize=9)
        ax.set(xscale="log", title=opt, xlabel="learning rate")
    np.atleast_1d(axes)[0].set_ylabel("test accuracy (x: unstable, shown as 0)")
    np.atleast_1d(axes)[0].legend()
    _save(fig, path)


def optimizers(rows, path):
    """Training loss and test accuracy vs steps for each optimizer, solid with BN, dashed without."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for i, opt in enumerate(dict.fromkeys(r["optimizer"] for r in rows)):
        for bn in (1, 0):
            sel = [r for r in rows if r["optimizer"] == opt and r["batchnorm"] == bn and r["step"] > 0]
            style = dict(color=f"C{i}", linestyle="-" if bn else "--", label=f"{opt}{' + BN' if bn else ''}")
            a.plot([r["step"] for r in sel], [r["train_loss"] for r in sel], **style)
            b.plot([r["step"] for r in sel], [r["test_accuracy"] for r in sel], **style)
    a.set(title="Training loss", xlabel="training steps", yscale="log")
    b.set(title="Test accuracy", xlabel="training steps")
    b.legend(fontsize=8)
    _save(fig, path)


def batch_size(rows, path):
    """Test accuracy and train/eval gap vs batch size, one line per normalization."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for i, norm in enumerate(dict.fromkeys(r["norm"] for r in rows)):
        sel = [r for r in rows if r["norm"] == norm]
        sizes = [r["batch_size"] for r in sel]
        a.plot(sizes, [r["test_accuracy"] for r in sel], "o-", color=f"C{i}", label=norm)
        b.plot(sizes, [r["train_eval_gap"] for r in sel], "o-", color=f"C{i}", label=norm)
    a.set(xscale="log", title="Test accuracy (eval mode)", xlabel="batch size")
    b.set(xscale="log", yscale="log", title="Train-mode vs eval-mode outputs (relative gap)", xlabel="batch size")
    a.legend()
    _save(fig, path)


def cnn(rows, path):
    """Training loss and test accuracy vs steps, one line per run of the cnn experiment."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for i, run in enumerate(dict.fromkeys(r["run"] for r in rows)):
        sel = [r for r in rows if r["run"] == run and r["step"] > 0]
        style = dict(color=f"C{i}", label=f"{run} (batch {sel[0]['batch_size']})" if sel else run)
        a.plot([r["step"] for r in sel], [r["train_loss"] for r in sel], **style)
        b.plot([r["step"] for r in sel], [r["test_accuracy"] for r in sel], **style)
    b.axhline(0.95, color="0.6", linewidth=0.8, linestyle=":")
    a.set(title="Training loss", xlabel="training steps", yscale="log")
    b.set(title="Test accuracy", xlabel="training steps")
    b.legend(fontsize=8)
    _save(fig, path)


def train_run(history, path, title):
    """Loss and accuracy per epoch of a `bnnet train` run: training (train mode, mean over the epoch)
    and the test split (eval mode)."""
    epochs = history["epoch"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(epochs, history["loss"], "o-", label="training (train mode)")
    a.plot(epochs, history["val_loss"], "o-", label="test split (eval mode)")
    a.set(title="Loss", xlabel="epoch", ylabel="softmax cross-entropy")
    if any(v is not None for v in history.get("accuracy", [])):
        b.plot(epochs, history["accuracy"], "o-", label="training (train mode)")
        b.plot(epochs, history["val_accuracy"], "o-", label="test split (eval mode)")
    b.set(title="Accuracy", xlabel="epoch", ylabel="accuracy")
    b.legend()
    for ax in (a, b):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    fig.suptitle(title)
    _save(fig, path)
