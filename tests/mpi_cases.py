"""Cases shared by tests/test_distributed.py (single-process references) and tests/mpi_worker.py (K ranks)."""

import numpy as np

import bnnet

# 50 rows with batch_size 12: batches of 12, 12, 12, 12 and 2 rows. Over 2 ranks the
# last one is split 1 + 1, over 4 ranks 1 + 1 + 0 + 0 (two empty shards). batch_size 7
# splits 4 + 3 over 2 ranks and 2 + 2 + 2 + 1 over 4.
FIT_CASES = [
    {
        "name": "fit-f64-numba",
        "dtype": "float64",
        "backend": "numba",
        "batch_size": 12,
        "optimizer": "adam",
        "activation": "sigmoid",
        "sync": True,
    },
    {
        "name": "fit-f32-numba",
        "dtype": "float32",
        "backend": "numba",
        "batch_size": 7,
        "optimizer": "momentum",
        "activation": "relu",
        "sync": True,
    },
    {
        "name": "fit-f64-numpy",
        "dtype": "float64",
        "backend": "numpy",
        "batch_size": 7,
        "optimizer": "rmsprop",
        "activation": "tanh",
        "sync": True,
    },
    {
        "name": "fit-frozen-callbacks",  # frozen parameters and a callback that lowers the lr, on every rank
        "dtype": "float64",
        "backend": "numba",
        "batch_size": 12,
        "optimizer": "adam",
        "activation": "relu",
        "sync": True,
        "freeze": ["0", "1.gamma"],
        "callbacks": True,
    },
    {
        "name": "fit-f64-local",
        "dtype": "float64",
        "backend": "numba",
        "batch_size": 10,
        "optimizer": "sgd",
        "activation": "relu",
        "sync": False,
    },
]
N_ROWS, N_IN, N_OUT = 50, 12, 3


def fit_setup(case, seed_model=0):
    """(model, X, y, fit kwargs) of a case; the model's weights depend on seed_model only."""
    rng = np.random.default_rng(0)
    X = rng.normal(3.0, 2.0, (N_ROWS, N_IN))  # an offset, so that the statistics matter
    y = rng.integers(0, N_OUT, N_ROWS)
    model = bnnet.mlp([N_IN, 16, 16, N_OUT], activation=case["activation"], seed=seed_model, dtype=case["dtype"])
    opt = bnnet.optim.OPTIMIZERS[case["optimizer"]](
        {"sgd": 0.1, "momentum": 0.1, "rmsprop": 1e-3, "adam": 1e-2}[case["optimizer"]]
    )
    kwargs = dict(optimizer=opt, epochs=2, batch_size=case["batch_size"], seed=1, progress=False)
    if case.get("freeze"):
        model.freeze(*case["freeze"])
    if case.get("callbacks"):  # (the lr is halved after every epoch but the first: patience 0, min_delta out of reach)
        kwargs.update(
            epochs=3, callbacks=[bnnet.callbacks.ReduceLROnPlateau("loss", factor=0.5, patience=0, min_delta=10.0)]
        )
    return model, X, y, kwargs


def layer_cases(size):
    """SyncBatchNorm on one batch, split in uneven and empty shards."""
    shards = {2: [[7, 5], [12, 0]], 4: [[7, 5, 0, 3], [0, 1, 1, 0]]}.get(size, [])
    cases = []
    for k, split in enumerate(shards):
        for dtype in ("float64", "float32"):
            for be in ("numba", "numpy"):
                cases.append({"name": f"layer-{size}-{k}-{dtype}-{be}", "shards": split, "dtype": dtype, "backend": be})
    return cases


def layer_data(case):
    n = sum(case["shards"])
    rng = np.random.default_rng(7)
    x = rng.normal(5.0, 3.0, (n, 6)).astype(case["dtype"])
    dy = rng.normal(size=(n, 6)).astype(case["dtype"])
    gamma = rng.uniform(0.5, 1.5, 6)
    beta = rng.normal(size=6)
    return x, dy, gamma, beta


def shard_bounds(shards, rank):
    lo = sum(shards[:rank])
    return lo, lo + shards[rank]
