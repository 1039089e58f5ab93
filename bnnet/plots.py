"""Figures: a training history (plot_history, for notebooks) and those of bnnet.experiments (files).

The experiments' figures are matplotlib Figure objects saved straight to files, without pyplot, so
importing this module changes no global matplotlib setting (a notebook keeps its inline backend).
plot_history draws with pyplot when it is given no axes, so that it shows inline in Jupyter.

matplotlib is an extra (in bnnet's checkout: pip install ".[plot]"); importing this module
without it raises a BnnetError that says so.
"""

import numpy as np

from .errors import BnnetError, HyperparameterError

try:
    import matplotlib.ticker
    from matplotlib.figure import Figure
except ImportError:
    raise BnnetError(
        "bnnet's figures need matplotlib, which is not installed: in bnnet's checkout, pip install \".[plot]\""
    ) from None


def plot_history(history, ax=None):
    """Draw fit's history: the loss (and validation loss) per epoch on the left axis, the accuracies on
    the right one (classification). Returns the Figure; in Jupyter it shows inline.

    history: what bnnet.fit returns. ax: a matplotlib Axes to draw into (default: a new pyplot figure).
    """
    if not isinstance(history, dict) or not isinstance(history.get("epoch"), list) or not history["epoch"]:
        raise HyperparameterError("plot_history: history must be what bnnet.fit returns (a dict with epochs)")
    if ax is None:
        _, ax = _subplots(figsize=(6, 3.8))
    epochs = history["epoch"]
    ax.plot(epochs, history["loss"], color="tab:blue", label="loss")
    if history.get("val_loss"):
        ax.plot(epochs, history["val_loss"], color="tab:blue", linestyle="--", label="val_loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    handles, labels = ax.get_legend_handles_labels()
    if any(v is not None for v in history.get("accuracy", [])):
        right = ax.twinx()
        right.plot(epochs, history["accuracy"], color="tab:orange", label="accuracy")
        if history.get("val_accuracy"):
            right.plot(epochs, history["val_accuracy"], color="tab:orange", linestyle="--", label="val_accuracy")
        right.set_ylabel("accuracy")
        more = right.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.legend(handles, labels, loc="center right")
    return ax.figure


def _subplots(*args, **kwargs):
    """plt.subplots without pyplot: a Figure of its own (nothing global), and its axes."""
    fig = Figure(figsize=kwargs.pop("figsize", None))
    return fig, fig.subplots(*args, **kwargs)


COLORS = {"bn": "tab:blue", "nobn": "tab:red"}
NORM_LABELS = {"batch": "BatchNorm", "renorm": "Batch Renorm", "ghost": "Ghost BN (virtual batches of 8)"}


def _save(fig, path, title):
    """Title, save and close the figure; return what it shows (its title and each panel's title,
    axis labels and tick labels), for summary.json and the tests."""
    fig.suptitle(title)
    fig.tight_layout()
    fig.draw_without_rendering()  # (tick labels exist once drawn)
    shown = {
        "title": title,
        "axes": [
            {
                "title": ax.get_title(),
                "xlabel": ax.get_xlabel(),
                "ylabel": ax.get_ylabel(),
                "xticklabels": [t.get_text() for t in ax.get_xticklabels() if t.get_text()],
                "ylim": [float(v) for v in ax.get_ylim()],
            }
            for ax in fig.axes
        ],
    }
    fig.savefig(path, dpi=110)
    return shown


def _zoom(ax, values, low=None, margin=0.1):
    """Limit the y-axis to where `values` are (their later part, where curves cross), with a margin."""
    values = np.asarray([v for v in values if np.isfinite(v)])
    if values.size:
        lo, hi = np.percentile(values, 5), values.max()
        pad = max(hi - lo, 1e-3) * margin
        ax.set_ylim(lo - pad if low is None else max(low, lo - pad), hi + pad)


def fig1(rows, path, title):
    """(a) test accuracy vs steps, with a zoomed panel; (b) 15/50/85th percentiles of one sigmoid's input."""
    steps = np.array([r["step"] for r in rows])
    fig, (a, z, b) = _subplots(1, 3, figsize=(14, 4))
    late = steps >= steps.max() * 0.2
    for tag, label in (("nobn", "Without BN"), ("bn", "With BN")):
        acc = np.array([r[f"test_accuracy_{tag}"] for r in rows])
        a.plot(steps, acc, color=COLORS[tag], label=label)
        z.plot(steps[late], acc[late], color=COLORS[tag], label=label)
        lo, mid, hi = (np.array([r[f"p{q}_{tag}"] for r in rows]) for q in (15, 50, 85))
        b.fill_between(steps, lo, hi, color=COLORS[tag], alpha=0.2)
        b.plot(steps, mid, color=COLORS[tag], label=f"{label}: median, 15-85th pct.")
    _zoom(z, [r[f"test_accuracy_{t}"] for r, keep in zip(rows, late) if keep for t in ("bn", "nobn")])
    a.set(title="(a) Test accuracy", xlabel="training steps", ylabel="test accuracy")
    z.set(title="(a) zoomed: after the first 20% of steps", xlabel="training steps", ylabel="test accuracy")
    a.legend()
    b.set(title="(b) Input to a last-hidden-layer sigmoid", xlabel="training steps", ylabel="z~ (with BN), z (without)")
    b.legend()
    return _save(fig, path, title)


def lr_sweep(rows, path, title):
    """Final test accuracy vs learning rate per optimizer; crosses mark runs that did not train stably."""
    opts = list(dict.fromkeys(r["optimizer"] for r in rows))
    fig, axes = _subplots(1, len(opts), figsize=(4 * len(opts), 3.8), sharey=True)
    for ax, opt in zip(np.atleast_1d(axes), opts):
        for bn, tag in ((1, "bn"), (0, "nobn")):
            sel = [r for r in rows if r["optimizer"] == opt and r["batchnorm"] == bn]
            lr = np.array([r["lr"] for r in sel])
            acc = np.array([r["test_accuracy"] if r["stable"] else 0.0 for r in sel])
            ax.plot(lr, acc, "o-", color=COLORS[tag], label="with BN" if bn else "without BN")
            bad = np.array([not r["stable"] for r in sel])
            ax.plot(lr[bad], acc[bad], "x", color="k", markersize=9)
        ax.set(xscale="log", title=opt, xlabel="learning rate")
    np.atleast_1d(axes)[0].set_ylabel("final test accuracy (x: unstable, shown as 0)")
    np.atleast_1d(axes)[0].legend()
    return _save(fig, path, title)


def optimizers(rows, path, title):
    """Training loss and test accuracy vs steps for each optimizer, solid with BN, dashed without; the
    accuracy axis zoomed to where the curves are after the first steps."""
    fig, (a, b) = _subplots(1, 2, figsize=(11, 4.2))
    last = max(r["step"] for r in rows)
    for i, opt in enumerate(dict.fromkeys(r["optimizer"] for r in rows)):
        for bn in (1, 0):
            sel = [r for r in rows if r["optimizer"] == opt and r["batchnorm"] == bn and r["step"] > 0]
            style = dict(color=f"C{i}", linestyle="-" if bn else "--", label=f"{opt}{' + BN' if bn else ''}")
            a.plot([r["step"] for r in sel], [r["train_loss"] for r in sel], **style)
            b.plot([r["step"] for r in sel], [r["test_accuracy"] for r in sel], **style)
    _zoom(b, [r["test_accuracy"] for r in rows if r["step"] >= 0.2 * last])
    a.set(title="Training loss", xlabel="training steps", ylabel="mean loss since the last point", yscale="log")
    b.set(title="Test accuracy (zoomed)", xlabel="training steps", ylabel="test accuracy")
    b.legend(fontsize=8, ncol=2)
    return _save(fig, path, title)


def batch_size(rows, path, title):
    """Test accuracy and train/eval gap vs batch size, one line per normalization, every size labelled."""
    fig, (a, b) = _subplots(1, 2, figsize=(11, 4.2))
    sizes = sorted({r["batch_size"] for r in rows})
    for i, norm in enumerate(dict.fromkeys(r["norm"] for r in rows)):
        sel = [r for r in rows if r["norm"] == norm]
        label = NORM_LABELS.get(norm, norm)
        a.plot([r["batch_size"] for r in sel], [r["test_accuracy"] for r in sel], "o-", color=f"C{i}", label=label)
        b.plot([r["batch_size"] for r in sel], [r["train_eval_gap"] for r in sel], "o-", color=f"C{i}", label=label)
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(v) for v in sizes])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("batch size (rows)")
    a.set(title="Test accuracy (eval mode)", ylabel="test accuracy")
    b.set(
        yscale="log", title="Train-mode vs eval-mode outputs", ylabel="gap = mean |train - eval| / mean |eval| (logits)"
    )
    a.legend()
    return _save(fig, path, title)


def cnn(rows, path, title):
    """Training loss and test accuracy vs steps, one line per run of the cnn experiment."""
    fig, (a, b) = _subplots(1, 2, figsize=(11, 4.2))
    last = max(r["step"] for r in rows)
    for i, run in enumerate(dict.fromkeys(r["run"] for r in rows)):
        sel = [r for r in rows if r["run"] == run and r["step"] > 0]
        style = dict(color=f"C{i}", label=f"{run} (batch {sel[0]['batch_size']})" if sel else run)
        a.plot([r["step"] for r in sel], [r["train_loss"] for r in sel], **style)
        b.plot([r["step"] for r in sel], [r["test_accuracy"] for r in sel], **style)
    b.axhline(0.95, color="0.6", linewidth=0.8, linestyle=":")
    _zoom(b, [r["test_accuracy"] for r in rows if r["step"] >= 0.1 * last])
    a.set(title="Training loss", xlabel="training steps", ylabel="mean loss since the last point", yscale="log")
    b.set(title="Test accuracy (dotted: 95%)", xlabel="training steps", ylabel="test accuracy")
    b.legend(fontsize=8)
    return _save(fig, path, title)


def train_run(history, path, title):
    """Loss and accuracy per epoch of a `bnnet train` run: training (train mode, mean over the epoch)
    and the test split (eval mode)."""
    epochs = history["epoch"]
    fig, (a, b) = _subplots(1, 2, figsize=(10, 4))
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
    return _save(fig, path, title)
