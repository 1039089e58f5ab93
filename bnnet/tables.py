"""Tables: a CSV file of numeric features and one target column, as `bnnet train --data table.csv` reads it.

    table = read_csv("houses.csv", target="price")                 # header row first, one row per sample
    X, y, Xt, yt = table.split(task="regression", test_fraction=0.2, seed=0)
    scaler = Standardizer.fit(X); X, Xt = scaler(X), scaler(Xt)   # saved in the checkpoint, used by predict

Classification targets may be numbers or text; they become class indices 0..K-1 in sorted order and
`classes` keeps the original values, so predictions can be reported in the table's own terms.
"""

import csv
import math
import os

import numpy as np

from .errors import DatasetError

MAX_FILE_BYTES = 16 << 30  # as bnnet.datasets


class Table:
    """The parsed CSV: X (N, F) float64 features, `target` (N,) raw text of the target column or None,
    `features` their column names, `source` the path (for messages)."""

    def __init__(self, X, target, features, target_name, source):
        self.X, self.target, self.features = X, target, features
        self.target_name, self.source = target_name, source

    def labels(self, task):
        """(y, classes): class indices (N,) int64 and the sorted original values (classification), or the
        target as floats (N, 1) and None (regression)."""
        if task == "regression":
            y = np.empty((len(self.target), 1))
            for i, text in enumerate(self.target):
                y[i, 0] = _number(text, self.source, i + 2, self.target_name)
            return y, None
        values = [_maybe_number(t) for t in self.target]
        numeric = all(isinstance(v, float) for v in values)
        classes = sorted(set(values), key=(lambda v: v) if numeric else str)
        if len(classes) < 2:
            raise DatasetError(f"{self.source}: column {self.target_name} holds one class only ({classes[0]!r})")
        index = {c: i for i, c in enumerate(classes)}
        y = np.array([index[v] for v in values], np.int64)
        return y, [int(c) if numeric and c == int(c) else c for c in classes]

    def split(self, task, test_fraction=0.2, seed=0):
        """(X, y, X_test, y_test, classes): a shuffled split, stratified by class for classification."""
        y, classes = self.labels(task)
        rng = np.random.default_rng(seed)
        if classes is None:
            order = rng.permutation(len(y))
            n_test = max(1, int(round(len(y) * test_fraction)))
            test, train = order[:n_test], order[n_test:]
        else:
            test, train = [], []
            for c in range(len(classes)):
                rows = rng.permutation(np.flatnonzero(y == c))
                k = int(round(len(rows) * test_fraction))
                test.append(rows[:k])
                train.append(rows[k:])
            test, train = rng.permutation(np.concatenate(test)), rng.permutation(np.concatenate(train))
        if len(train) < 2 or len(test) < 1:
            raise DatasetError(
                f"{self.source}: {len(y)} rows are too few to hold out {test_fraction:.0%} for testing "
                "and train on the rest"
            )
        return self.X[train], y[train], self.X[test], y[test], classes


def read_csv(path, target=None, features=None):
    """Read a CSV with a header row.

    target: the target column's name (None: the file has no target, as for `bnnet predict`).
    features: the feature columns to take, in this order (default: every column but the target).
    Every feature value must be a number; a row with a different number of fields, a missing column,
    an empty file or a value that is not a number is a DatasetError naming the row and column.
    """
    try:
        if os.path.getsize(path) > MAX_FILE_BYTES:
            raise DatasetError(f"{path}: larger than {MAX_FILE_BYTES >> 30} GiB; bnnet reads tables that fit in memory")
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [row for row in csv.reader(f) if any(cell.strip() for cell in row)]
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DatasetError(f"{path}: cannot read as CSV ({e})") from None
    if not rows:
        raise DatasetError(f"{path}: is empty; expected a header row of column names, then one row per sample")
    header = [name.strip() for name in rows[0]]
    if len(set(header)) != len(header):
        raise DatasetError(f"{path}: the header names a column twice ({header})")
    if target is not None and target not in header:
        raise DatasetError(f"{path}: has no column {target!r}; its columns: {', '.join(header)}")
    if features is None:
        features = [name for name in header if name != target]
    missing = [name for name in features if name not in header]
    if missing:
        raise DatasetError(f"{path}: has no column(s) {', '.join(map(repr, missing))} the model was trained on")
    if not features:
        raise DatasetError(f"{path}: has no feature columns besides the target {target!r}")
    if len(rows) < 2:
        raise DatasetError(f"{path}: has a header but no rows")
    columns = [header.index(name) for name in features]
    X = np.empty((len(rows) - 1, len(columns)))
    for r, row in enumerate(rows[1:]):
        if len(row) != len(header):
            raise DatasetError(f"{path}: row {r + 2} has {len(row)} fields; the header has {len(header)}")
        for j, c in enumerate(columns):
            X[r, j] = _number(row[c], path, r + 2, header[c], " (a feature column must hold numbers)")
    y = None if target is None else [row[header.index(target)].strip() for row in rows[1:]]
    return Table(X, y, features, target, path)


class Standardizer:
    """x -> (x - mean) / std per feature, with the training data's mean and std (std 0 counts as 1)."""

    def __init__(self, mean, std):
        self.mean, self.std = np.asarray(mean, np.float64), np.asarray(std, np.float64)

    @classmethod
    def fit(cls, X):
        std = X.std(axis=0)
        return cls(X.mean(axis=0), np.where(std > 0, std, 1.0))

    def __call__(self, X):
        if X.shape[1:] != self.mean.shape:
            raise DatasetError(f"the model takes {self.mean.shape[0]} features per row, got {X.shape[1:]}")
        return (X - self.mean) / self.std

    def as_dict(self):
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, d, source):
        """From a checkpoint's metadata, checked: two lists of finite numbers of one length, std > 0."""
        ok = (
            isinstance(d, dict)
            and all(isinstance(d.get(k), list) for k in ("mean", "std"))
            and len(d["mean"]) == len(d["std"]) > 0
            and all(_finite(v) for v in d["mean"] + d["std"])
            and all(v > 0 for v in d["std"])
        )
        if not ok:
            raise DatasetError(
                f"{source}: metadata field user.standardize must be {{mean: [...], std: [...]}} (finite, std > 0)"
            )
        return cls(d["mean"], d["std"])


def _finite(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _maybe_number(text):
    try:
        v = float(text)
    except ValueError:
        return text
    return v if math.isfinite(v) else text


def _number(text, source, row, column, hint=""):
    try:
        v = float(text)
    except ValueError:
        v = None
    if v is None or not math.isfinite(v):
        shown = text if len(text) <= 40 else text[:37] + "..."
        raise DatasetError(f"{source}: row {row}, column {column}: {shown!r} is not a finite number{hint}")
    return v
