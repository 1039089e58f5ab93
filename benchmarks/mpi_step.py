"""Data-parallel step time, run under mpiexec by benchmarks/run.py (section "mpi").

    mpiexec -n K python benchmarks/mpi_step.py \
        '{"sizes": [...], "activation": ..., "batch": B, "steps": S, "rounds": R}'

Times bnnet.fit over S global mini-batches of B rows (split over the K ranks),
alternating synchronized and local BatchNorm for R rounds, and prints one JSON
line from rank 0: per mode, the best per-step wall time, the time spent inside
collectives (waiting for the slower rank included) and the bytes this rank
handed to MPI per step. With K = 1 it trains without a communicator.
"""

import json
import sys
import time

import numpy as np

import bnnet
from bnnet import distributed


def run(cfg, comm, mode, steps):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(cfg["batch"] * steps, cfg["sizes"][0])).astype(np.float32)
    y = rng.integers(0, cfg["sizes"][-1], len(X))
    model = bnnet.mlp(cfg["sizes"], activation=cfg["activation"], seed=0)
    use = comm if comm.size > 1 else None
    if use is not None and mode == "sync":
        model = distributed.sync_batchnorm(model, comm)
    opt = bnnet.optim.SGD(0.01)
    bnnet.fit(
        model,
        X[: cfg["batch"] * 3],
        y[: cfg["batch"] * 3],
        optimizer=opt,
        epochs=1,
        batch_size=cfg["batch"],
        seed=0,
        progress=False,
        comm=use,
    )  # warm-up: buffers, caches
    if use is not None:
        comm.comm.Barrier()
    comm.reset_stats()
    start = time.perf_counter()
    bnnet.fit(model, X, y, optimizer=opt, epochs=1, batch_size=cfg["batch"], seed=0, progress=False, comm=use)
    seconds = time.perf_counter() - start
    stats = dict(comm.stats)
    n_bcast = len(model.params) + len(model.buffers)  # start-up broadcasts, not per step
    start_bytes = sum(a.nbytes for a in list(model.params.values()) + list(model.buffers.values()))
    return {
        "step_ms": 1e3 * seconds / steps,
        "comm_ms": 1e3 * stats["seconds"] / steps,
        "bytes_per_step": (stats["bytes"] - (start_bytes if use else 0)) / steps,
        "calls_per_step": (stats["calls"] - (n_bcast if use else 0)) / steps,
    }


def main():
    cfg = json.loads(sys.argv[1])
    comm = distributed.Communicator()
    distributed.limit_threads()
    modes = ["sync", "local"] if comm.size > 1 else ["single"]
    best = {}
    with distributed.abort_on_error(comm):
        for _ in range(cfg["rounds"]):
            for mode in modes:
                r = run(cfg, comm, mode, cfg["steps"])
                if mode not in best or r["step_ms"] < best[mode]["step_ms"]:
                    best[mode] = r
    if comm.rank == 0:
        print(json.dumps({"ranks": comm.size, **best}), flush=True)


if __name__ == "__main__":
    main()
