"""Run under mpiexec by tests/test_step.py: data-parallel fit with the compiled step (each rank's shard
compiled, the gradient allreduce after it) against the same fit with the interpreted step, on every rank.
Rank 0 prints rank:compiled step ran:histories and parameters bitwise equal, for every rank."""

import numpy as np

import bnnet
from bnnet import train
from bnnet.distributed import Communicator

comm = Communicator()
used = []
original = train.DataParallelStep.__call__


def spy(self, *args):
    used.append(self.compiled is not None)
    return original(self, *args)


train.DataParallelStep.__call__ = spy  # (Step.__call__, seen from the data-parallel step)
rng = np.random.default_rng(0)
X, y = rng.standard_normal((70, 6)), rng.integers(0, 3, 70)  # (70 rows: the last batch of 6 is uneven)
runs = []
for compiled in (True, False):
    if not compiled:
        train.compilable = lambda *args: "interpreted, for the comparison"
    model = bnnet.mlp([6, 8, 5, 3], activation="tanh", seed=0, dtype="float64")
    opt = bnnet.optim.Adam(1e-2, weight_decay=1e-3)
    history = bnnet.fit(model, X, y, optimizer=opt, epochs=2, batch_size=16, seed=0, progress=False, comm=comm)
    runs.append((history, model))
(h1, m1), (h2, m2) = runs
same = h1 == h2 and all(np.array_equal(m1.params[k], m2.params[k]) for k in m1.params)
same = same and all(np.array_equal(m1.buffers[k], m2.buffers[k]) for k in m1.buffers)
every = comm.allgather_object((comm.rank, used[0] and not used[-1], same))  # (one line, from rank 0)
if comm.rank == 0:
    print(" ".join(f"{r}:{u}:{s}" for r, u, s in every), flush=True)
