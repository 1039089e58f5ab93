"""Training: the lecture's loop with the public API, fit, evaluate."""

import sys
import warnings

import numpy as np
import pytest

import bnnet
from bnnet import optim


def _blobs(rng, n=200, d=5, classes=3):
    centers = rng.standard_normal((classes, d)) * 3
    y = rng.integers(0, classes, n)
    return (centers[y] + rng.standard_normal((n, d))).astype(np.float32), y


def test_lecture_loop_learns(rng):
    """The loop of the README, verbatim in spirit: forward with BN, backprop, update."""
    X, y = _blobs(rng)
    model = bnnet.mlp([5, 16, 16, 3], activation="relu", seed=0)
    loss_fn = bnnet.losses.SoftmaxCrossEntropy()
    opt = bnnet.optim.Momentum(lr=0.1, beta=0.9)
    losses = []
    for _epoch in range(5):
        for t in range(0, len(X), 20):
            X_t, y_t = X[t : t + 20], y[t : t + 20]
            logits = model.forward(X_t, train=True)
            losses.append(loss_fn.forward(logits, y_t))
            model.backward(loss_fn.backward())
            opt.step(model)
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])
    assert bnnet.evaluate(model, X, y)["accuracy"] > 0.9


def test_fit_is_deterministic_and_records_history(rng):
    X, y = _blobs(rng)
    Xv, yv = _blobs(rng, n=50)
    runs = []
    for _ in range(2):
        model = bnnet.mlp([5, 8, 3], seed=1)
        hist = bnnet.fit(
            model,
            X,
            y,
            optimizer=optim.Adam(0.01),
            loss="softmax_cross_entropy",
            epochs=3,
            batch_size=32,
            seed=7,
            validation_data=(Xv, yv),
            progress=False,
        )
        runs.append((hist, {k: v.copy() for k, v in model.params.items()}))
    (h1, p1), (h2, p2) = runs
    assert h1 == h2
    for k in p1:
        np.testing.assert_array_equal(p1[k], p2[k])
    assert h1["epoch"] == [1, 2, 3]
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        assert len(h1[key]) == 3 and all(np.isfinite(h1[key]))
    assert h1["loss"][-1] < h1["loss"][0]
    other = bnnet.mlp([5, 8, 3], seed=1)
    h3 = bnnet.fit(other, X, y, optimizer=optim.Adam(0.01), epochs=3, batch_size=32, seed=8, progress=False)
    assert h3["loss"] != h1["loss"]  # another shuffling seed, another run


def test_trailing_batch_of_one_is_dropped_with_one_warning(rng):
    X, y = _blobs(rng, n=9)
    model = bnnet.mlp([5, 4, 3], seed=0)
    opt = optim.SGD(0.1)
    with pytest.warns(UserWarning, match="last mini-batch of one row.*dropped") as record:
        bnnet.fit(model, X, y, optimizer=opt, epochs=3, batch_size=4, seed=0, progress=False)
    assert len([w for w in record if "mini-batch of one" in str(w.message)]) == 1
    assert opt.t == 3 * 2  # 9 rows = 4 + 4 + (1 dropped), three epochs
    # without BatchNorm the single row is kept and nothing is said
    plain = bnnet.mlp([5, 4, 3], batchnorm=False, seed=0)
    opt = optim.SGD(0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bnnet.fit(plain, X, y, optimizer=opt, epochs=1, batch_size=4, seed=0, progress=False)
    assert opt.t == 3


def test_fit_other_losses(rng):
    X = rng.standard_normal((128, 3)).astype(np.float32)
    yb = (X[:, 0] + X[:, 1] > 0).astype(np.int64)
    clf = bnnet.mlp([3, 8, 1], seed=0)
    hist = bnnet.fit(
        clf,
        X,
        yb,
        optimizer=optim.Adam(0.02),
        loss="binary_cross_entropy",
        epochs=20,
        batch_size=32,
        seed=0,
        progress=False,
    )
    assert hist["accuracy"][-1] > 0.9
    assert bnnet.evaluate(clf, X, yb, "bce")["accuracy"] > 0.9
    yr = (X @ np.array([1.0, -2.0, 0.5]))[:, None].astype(np.float32)
    reg = bnnet.mlp([3, 16, 1], seed=0)
    hist = bnnet.fit(
        reg,
        X,
        yr,
        optimizer=optim.Adam(0.02),
        loss=bnnet.losses.MSE(),
        epochs=30,
        batch_size=32,
        seed=0,
        progress=False,
    )
    assert hist["accuracy"] == [None] * 30
    assert bnnet.evaluate(reg, X, yr, "mse")["loss"] < 0.1 * np.var(yr)


def test_fit_progress_bar_shows_loss_and_accuracy(rng, capsys, monkeypatch):
    X, y = _blobs(rng, n=64)
    # stderr not a terminal (a log, CI): one plain line per epoch, no carriage returns
    bnnet.fit(
        bnnet.mlp([5, 4, 3]),
        X,
        y,
        epochs=2,
        batch_size=16,
        seed=0,
        validation_data=(X, y),
        progress=True,
        validation_name="test",
    )
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 2 and "\r" not in err, err
    assert lines[1].startswith("epoch 2/2: loss ") and " acc " in lines[1] and " test_acc " in lines[1]
    # a terminal: the tqdm bar
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    bnnet.fit(bnnet.mlp([5, 4, 3]), X, y, epochs=2, batch_size=16, seed=0, validation_data=(X, y), progress=True)
    err = capsys.readouterr().err
    assert "epoch 2/2" in err and "loss=" in err and "acc=" in err and "val_acc=" in err


def test_a_hidden_progress_bar_formats_nothing(monkeypatch):
    """progress=False (and the plain-line mode) leave the bar disabled: no per-step postfix is formatted."""
    from bnnet.train import Progress

    formatted = []
    monkeypatch.setattr("bnnet.train._postfix", lambda loss, acc: formatted.append(loss) or {})
    bar = Progress(False, 30, 0)
    for _ in range(30):
        bar.update(0.5, 0.9)
    assert formatted == []
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # a terminal: the bar is shown
    shown = Progress(True, 30, 0)
    for _ in range(30):
        shown.update(0.5, 0.9)
    shown.close()
    assert len(formatted) == 3  # every 10th step


@pytest.mark.parametrize(
    "change,error,match",
    [
        (
            lambda X, y: (np.where(np.arange(X.size).reshape(X.shape) == 7, np.nan, X), y),
            bnnet.InputError,
            r"fit: X contains NaN or Inf \(first at index \(1, 2\)\)",
        ),
        (lambda X, y: (X, y[:-1]), bnnet.InputError, "X has 20 rows but y has 19"),
        (lambda X, y: (X, y + 5), bnnet.InputError, r"label \d+ is out of range \[0, 3\)"),
        (lambda X, y: (X, y - 3), bnnet.InputError, r"label -\d+ is out of range"),
        (lambda X, y: (X, y + 0.5), bnnet.InputError, "integer class labels"),
        (lambda X, y: (X[:, :4], y), bnnet.InputError, "must have 5 features"),
        (lambda X, y: (X[:0], y[:0]), bnnet.InputError, "empty"),
    ],
)
def test_fit_rejects_bad_data(rng, change, error, match):
    X, y = _blobs(rng, n=20)
    X, y = change(X, y)
    with pytest.raises(error, match=match):
        bnnet.fit(bnnet.mlp([5, 4, 3]), X, y, epochs=1, progress=False)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(batch_size=0), "batch_size must be an integer >= 1"),
        (dict(batch_size=1), "batch_size=1 cannot train BatchNorm"),
        (dict(epochs=0), "epochs must be an integer >= 1"),
        (dict(loss="hinge"), "loss must be a Loss or one of"),
        (dict(optimizer="adagrad"), "optimizer must be an Optimizer or one of"),
    ],
)
def test_fit_rejects_bad_settings(rng, kwargs, match):
    X, y = _blobs(rng, n=20)
    with pytest.raises(bnnet.HyperparameterError if "cannot train" not in match else bnnet.InputError, match=match):
        bnnet.fit(bnnet.mlp([5, 4, 3]), X, y, progress=False, **kwargs)
