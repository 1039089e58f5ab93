"""`bnnet train` on the user's own data: CSV tables (classification and regression), colour images in
an .npz, early stopping, class weights, `bnnet summary`; bad tables give one error line."""

import csv
import json

import numpy as np
import pytest
from test_cli import run

import bnnet


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    d = tmp_path_factory.mktemp("tables")
    rng = np.random.default_rng(0)
    X = rng.standard_normal((240, 3)) * [1.0, 50.0, 0.01] + [0.0, 100.0, 0.0]  # very different scales
    label = np.where(X[:, 0] + X[:, 1] / 50 > 0.3, "spam", "ham")
    price = X @ [2.0, 0.02, 100.0] + 0.05 * rng.standard_normal(240)
    names = ["a", "b", "c"]
    return {
        "class": _write_csv(d / "class.csv", [*names, "kind"], [[*x, k] for x, k in zip(X, label)]),
        "regr": _write_csv(d / "regr.csv", ["price", *names], [[p, *x] for x, p in zip(X, price)]),
        "new": _write_csv(d / "new.csv", ["c", "b", "a"], [x[::-1] for x in X[:4]]),  # other column order
        "X": X,
        "label": label,
        "price": price,
        "dir": d,
    }


def test_csv_classification_end_to_end(tables):
    out = tables["dir"] / "c"
    res = run("train", "--data", tables["class"], "--target", "kind", "--hidden", "16", "--activation", "relu",
              "--epochs", "40", "--early-stopping", "3", "--class-weight", "balanced",
              "--out", str(out), "--quiet")  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "test accuracy" in res.stdout
    meta = bnnet.load(str(out / "model.safetensors")).metadata
    assert meta["classes"] == ["ham", "spam"] and meta["features"] == ["a", "b", "c"]
    assert meta["cli"]["early_stopping"] == 3 and meta["cli"]["validation_split"] == 0.1
    history = json.loads((out / "history.json").read_text())
    assert len(history["val_loss"]) == len(history["epoch"]) <= 40
    predicted = run("predict", str(out), tables["new"])
    assert predicted.returncode == 0, predicted.stderr
    assert predicted.stdout.split() == list(_expected_labels(out, tables))
    evaluated = run("evaluate", str(out))
    assert evaluated.returncode == 0 and "accuracy" in evaluated.stdout and "(48 rows)" in evaluated.stdout
    # another table is scaled as the training rows were (its own statistics would hide the shift)
    X, label = tables["X"], tables["label"]
    rows = [[*x, k] for x, k in zip(X * [1, 1, 100], label)]
    shifted = _write_csv(tables["dir"] / "shifted.csv", ["a", "b", "c", "kind"], rows)
    other = run("evaluate", str(out), "--data", shifted)
    assert other.returncode == 0, other.stderr
    assert other.stdout != evaluated.stdout
    summary = run("summary", str(out))
    assert summary.returncode == 0 and "Linear(3, 16)" in summary.stdout and "(N, 2)" in summary.stdout


def _expected_labels(out, tables):
    """The labels bnnet.load + the saved standardization give for the first four rows."""
    model = bnnet.load(str(out / "model.safetensors"))
    std = model.metadata["standardize"]
    X = (tables["X"][:4] - np.array(std["mean"])) / np.array(std["std"])
    return np.array(model.metadata["classes"])[model.predict(X).argmax(axis=1)]


def test_csv_regression_end_to_end(tables):
    out = tables["dir"] / "r"
    res = run("train", "--data", tables["regr"], "--target", "price", "--task", "regression", "--hidden", "32",
              "--activation", "relu", "--epochs", "60", "--lr-decay", "1", "--out", str(out), "--quiet")  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "test MSE" in res.stdout
    meta = bnnet.load(str(out / "model.safetensors")).metadata
    assert meta["loss"] == "mse" and meta["task"] == "regression"
    predicted = run("predict", str(out), tables["new"])
    assert predicted.returncode == 0, predicted.stderr
    values = np.array(predicted.stdout.split(), float)
    assert values.shape == (4,)
    # it learned something: far better than predicting the mean
    spread = np.mean((tables["price"] - tables["price"].mean()) ** 2)
    mse = float(run("evaluate", str(out)).stdout.split("loss ")[1].split()[0])
    assert mse < 0.25 * spread


def test_colour_images_in_an_npz_train_a_convnet(tmp_path):
    rng = np.random.default_rng(1)
    X = rng.random((120, 3, 8, 10)).astype(np.float32)  # 3 channels, not square
    y = (X[:, 0].mean(axis=(1, 2)) > X[:, 2].mean(axis=(1, 2))).astype(np.int64)
    data = tmp_path / "img.npz"
    np.savez(data, X_train=X[:100], y_train=y[:100], X_test=X[100:], y_test=y[100:])
    out = tmp_path / "cnn"
    res = run("train", "--model", "cnn", "--data", str(data), "--channels", "4", "--hidden", "8", "--epochs", "2",
              "--out", str(out), "--quiet")  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert bnnet.load(str(out / "model.safetensors")).metadata["input_shape"] == [3, 8, 10]
    np.save(tmp_path / "new.npy", X[:5])
    assert run("predict", str(out), str(tmp_path / "new.npy")).stdout.split().__len__() == 5
    # flat rows with --in-shape
    flat = tmp_path / "flat.npz"
    np.savez(flat, X_train=X[:100].reshape(100, -1), y_train=y[:100], X_test=X[100:].reshape(20, -1), y_test=y[100:])
    res = run("train", "--model", "cnn", "--data", str(flat), "--in-shape", "3,8,10", "--channels", "4",
              "--hidden", "8", "--epochs", "1", "--out", str(tmp_path / "flat"), "--quiet")  # fmt: skip
    assert res.returncode == 0, res.stderr
    res = run("train", "--model", "cnn", "--data", str(flat), "--epochs", "1", "--out", str(tmp_path / "x"))
    assert res.returncode == 1 and "give --in-shape C,H,W" in res.stderr


@pytest.mark.parametrize(
    ("content", "args", "message"),
    [
        ("a,b,y\n1,2,0\n3,4\n", ["--target", "y"], "row 3 has 2 fields; the header has 3"),
        ("a,b,y\n1,two,0\n3,4,1\n", ["--target", "y"], "row 2, column b: 'two' is not a finite number"),
        ("a,b,y\n1,2,0\n3,4,1\n", ["--target", "label"], "has no column 'label'; its columns: a, b, y"),
        ("", ["--target", "y"], "is empty"),
        ("a,b,y\n", ["--target", "y"], "has a header but no rows"),
        ("a,b,y\n1,2,0\n3,4,1\n", [], "say which column to predict with --target COLUMN"),
        ("a,b,y\n1,2,0\n3,4,0\n", ["--target", "y"], "holds one class only"),
        ("a,b,y\n1,2,x\n3,4,1\n", ["--target", "y", "--task", "regression"], "column y: 'x' is not a finite number"),
    ],
)
def test_bad_tables_give_one_error_line(tmp_path, content, args, message):
    path = tmp_path / "t.csv"
    path.write_text(content)
    res = run("train", "--data", str(path), *args, "--epochs", "1", "--out", str(tmp_path / "o"))
    assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith("bnnet train: error:") and message in res.stderr, res.stderr


def test_table_options_on_image_data_are_refused(tmp_path):
    res = run("train", "--target", "y", "--epochs", "1", "--out", str(tmp_path / "o"))
    assert res.returncode == 1 and "apply to a CSV table" in res.stderr
    res = run("train", "--epochs", "1", "--validation-split", "1.5", "--out", str(tmp_path / "o"))
    assert res.returncode == 2 and "expected a number in (0, 1)" in res.stderr
