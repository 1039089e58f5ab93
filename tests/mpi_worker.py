"""Run under mpiexec by tests/test_distributed.py: each rank writes what it computed to OUT/<case>-rank<r>.npz.

    mpiexec -n K python tests/mpi_worker.py OUT          # equivalence cases
    mpiexec -n K python tests/mpi_worker.py OUT fault    # rank 1 fails at its third step
    mpiexec -n K python tests/mpi_worker.py OUT mismatch # ranks given different row counts

The cases (data, models, shard sizes) are defined in mpi_cases.py, which the
test imports too, so that it computes the single-process references from the
same definitions.
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

import mpi_cases  # noqa: E402

import bnnet  # noqa: E402
from bnnet import backend, distributed  # noqa: E402


def save(out, name, comm, **arrays):
    np.savez(os.path.join(out, f"{name}-rank{comm.rank}.npz"), **arrays)


def run_fit_cases(out, comm):
    for case in mpi_cases.FIT_CASES:
        with backend.using(case["backend"]):
            model, X, y, kwargs = mpi_cases.fit_setup(case, seed_model=100 + comm.rank)  # rank 0's weights win
            if case["sync"]:
                model = distributed.sync_batchnorm(model, comm)
            comm.reset_stats()
            hist = bnnet.fit(model, X, y, comm=comm, **kwargs)
            save(
                out,
                case["name"],
                comm,
                loss=np.array(hist["loss"]),
                accuracy=np.array(hist["accuracy"]),
                **{f"params/{k}": v for k, v in model.params.items()},
                **{f"buffers/{k}": v for k, v in model.buffers.items()},
                comm_calls=comm.stats["calls"],
                comm_bytes=comm.stats["bytes"],
            )


def run_layer_cases(out, comm):
    """SyncBatchNorm forward/backward on this rank's shard of one batch (shard sizes given per case)."""
    for case in mpi_cases.layer_cases(comm.size):
        with backend.using(case["backend"]):
            x, dy, gamma, beta = mpi_cases.layer_data(case)
            lo, hi = mpi_cases.shard_bounds(case["shards"], comm.rank)
            bn = distributed.SyncBatchNorm(x.shape[1], comm, dtype=case["dtype"])
            bn.params["gamma"][...], bn.params["beta"][...] = gamma, beta
            act = bnnet.layers.Sigmoid()
            if case["backend"] == "numba":  # the fused BN + activation step, as inside a model
                step = bnnet.engine.Step(bn, act)
                y = step.forward(x[lo:hi], True, None)
                dx = step.backward(dy[lo:hi], True, None)
            else:
                y = act._forward(bn._forward(x[lo:hi], True), True)
                dx = bn._backward(act._backward(dy[lo:hi], True), True)
            grads = np.stack([bn.grads["gamma"], bn.grads["beta"]]).astype(np.float64)
            comm.allreduce_sum(grads)  # what the step's gradient allreduce does
            save(
                out,
                case["name"],
                comm,
                y=y,
                dx=dx,
                grads=grads,
                running_mean=bn.buffers["running_mean"],
                running_var=bn.buffers["running_var"],
            )


def run_fault(comm):
    class FailingLoss(bnnet.losses.SoftmaxCrossEntropy):
        calls = 0

        def forward(self, outputs, targets):
            FailingLoss.calls += 1
            if comm.rank == 1 and FailingLoss.calls == 3:
                raise bnnet.InputError("injected failure on purpose at step 3")
            return super().forward(outputs, targets)

    case = mpi_cases.FIT_CASES[0]
    model, X, y, kwargs = mpi_cases.fit_setup(case, seed_model=0)
    model = distributed.sync_batchnorm(model, comm)
    kwargs.update(loss=FailingLoss(), epochs=1000)
    with distributed.abort_on_error(comm):
        bnnet.fit(model, X, y, comm=comm, **kwargs)


def run_mismatch(comm):
    """Rank r is given 10 * r fewer rows than rank 0: refused on every rank before the first step."""
    case = mpi_cases.FIT_CASES[0]
    model, X, y, kwargs = mpi_cases.fit_setup(case, seed_model=0)
    n = len(X) - 10 * comm.rank
    with distributed.abort_on_error(comm):
        bnnet.fit(model, X[:n], y[:n], comm=comm, **kwargs)
    print("after the block", file=sys.stderr)  # never reached: the job was aborted


def main():
    out = sys.argv[1]
    comm = distributed.Communicator()
    if sys.argv[2:] == ["fault"]:
        run_fault(comm)
        return
    if sys.argv[2:] == ["mismatch"]:
        run_mismatch(comm)
        return
    with distributed.abort_on_error(comm):
        run_fit_cases(out, comm)
        run_layer_cases(out, comm)


if __name__ == "__main__":
    main()
