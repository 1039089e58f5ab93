"""Data: the bundled MNIST subset, and IDX files the tests build themselves."""

import gzip

import numpy as np
import pytest

import bnnet
from bnnet.datasets import load_mnist, load_mnist5k, read_idx


def test_mnist5k_split():
    X, y, Xt, yt = load_mnist5k()
    assert X.shape == (4000, 784) and Xt.shape == (1000, 784)
    assert X.dtype == Xt.dtype == np.float32 and y.dtype == np.int64
    assert 0.0 <= X.min() and X.max() == 1.0
    np.testing.assert_array_equal(np.bincount(y), np.full(10, 400))  # stratified
    np.testing.assert_array_equal(np.bincount(yt), np.full(10, 100))
    assert len(np.unique(y[:100])) == 10  # shuffled, not sorted by label like the source
    again = load_mnist5k()
    np.testing.assert_array_equal(again[0], X)  # deterministic
    np.testing.assert_array_equal(again[3], yt)
    # train and test are disjoint images
    train_rows = {r.tobytes() for r in X}
    assert sum(r.tobytes() in train_rows for r in Xt) < 5  # MNIST has a few exact duplicates at most


def _idx(arr, type_code=0x08):
    header = bytes([0, 0, type_code, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    return header + arr.tobytes()


def _write_mnist(folder, n_train=12, n_test=5, gz=False, rng=None):
    rng = rng or np.random.default_rng(0)
    data = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, arr in data.items():
        raw = _idx(arr)
        if gz:
            (folder / (name + ".gz")).write_bytes(gzip.compress(raw))
        else:
            (folder / name).write_bytes(raw)
    return data


@pytest.mark.parametrize("gz", [False, True])
def test_load_mnist_reads_idx(tmp_path, gz):
    data = _write_mnist(tmp_path, gz=gz)
    X, y, Xt, yt = load_mnist(str(tmp_path))
    assert X.shape == (12, 784) and Xt.shape == (5, 784) and X.dtype == np.float32
    np.testing.assert_allclose(X * 255, data["train-images-idx3-ubyte"].reshape(12, -1), atol=1e-4)
    np.testing.assert_array_equal(yt, data["t10k-labels-idx1-ubyte"])


def test_load_mnist_errors(tmp_path):
    with pytest.raises(bnnet.DatasetError, match="not a folder"):
        load_mnist(str(tmp_path / "nope"))
    with pytest.raises(bnnet.DatasetError, match="missing train-images-idx3-ubyte"):
        load_mnist(str(tmp_path))
    _write_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx(np.zeros(4, np.uint8)))  # 4 labels for 5 images
    with pytest.raises(bnnet.DatasetError, match="do not match"):
        load_mnist(str(tmp_path))


@pytest.mark.parametrize(
    "raw,match",
    [
        (b"\x08\x08\x08\x01", "bad magic number"),
        (b"\x00\x00\x08\x02\x00\x00", "truncated IDX header"),
        (_idx(np.zeros((3, 4), np.uint8))[:-1], r"header says shape \(3, 4\) \(12 bytes of data\), file has 11"),
    ],
)
def test_read_idx_malformed(tmp_path, raw, match):
    path = tmp_path / "f-idx"
    path.write_bytes(raw)
    with pytest.raises(bnnet.DatasetError, match=match):
        read_idx(str(path))


def test_read_idx_types(tmp_path):
    arr = np.arange(6, dtype=">i4").reshape(2, 3)
    path = tmp_path / "i"
    path.write_bytes(_idx(arr, 0x0C))
    np.testing.assert_array_equal(read_idx(str(path)), arr)
