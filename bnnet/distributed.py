"""Data-parallel training over MPI, with Batch Norm synchronized across processes.

Launch K processes (ranks) with the virtual environment's own mpiexec:

    mpiexec -n 4 bnnet train --distributed            # or, in Python:

    comm = bnnet.distributed.Communicator()           # MPI.COMM_WORLD
    model = bnnet.distributed.sync_batchnorm(bnnet.mlp(...), comm)
    bnnet.fit(model, X, y, batch_size=60, seed=0, comm=comm)

Every rank loads the same data and draws the same shuffled order from one
seed; global mini-batch t (batch_size rows) is cut into K contiguous shards,
one per rank (sizes differ by at most one row; a shard may be empty). So the
ranks together compute the same step as one process with the whole batch:

    forward   each SyncBatchNorm merges every shard's (count, mean, M2) with
              Chan's formula in one allreduce of a packed (2D + 1) buffer, then
              normalizes its shard with the global mean and variance;
    loss      each rank scales its loss gradient by n_rank / batch_size, so that
              the gradients it computes are its share of the global mean loss;
    backward  each SyncBatchNorm all-reduces sum(dy) and sum(dy * x_hat) (2D
              numbers) to form dx with the global sums;
    update    all parameter gradients (and the loss) are summed with one
              allreduce of one flat buffer; every rank applies the same update.

Parameters and running statistics are broadcast from rank 0 at the start and
stay identical on every rank. Rank 0 alone writes checkpoints and shows the
progress bar. With plain BatchNorm layers (no sync_batchnorm) each rank
normalizes with its own shard's statistics ("local" BN, as DDP without
SyncBatchNorm); their running statistics are then averaged across ranks (weighted
by shard size) at every step, in the same allreduce as the gradients.

mpi4py is imported only when a Communicator is made: the rest of bnnet works
without MPI installed. `SingleProcess` is the one-rank stand-in.
"""

import contextlib
import os
import sys
import time
import traceback

import numpy as np

from . import ops, threads
from .device import empty, on_device, to_device, to_host, zeros
from .errors import BnnetError, InputError
from .layers import BatchNorm, _activation_code, on_rows


class Communicator:
    """The MPI operations bnnet needs, over an mpi4py communicator (default MPI.COMM_WORLD).

    Attributes:
        rank, size: this process's index and the number of processes.
        stats: {"calls", "bytes", "seconds"} spent in collectives since the last
            reset_stats() (bytes: the buffer sizes handed to MPI by this rank).
    """

    def __init__(self, comm=None):
        try:
            from mpi4py import MPI
        except ImportError:
            raise BnnetError(
                'bnnet.distributed needs mpi4py and an MPI library: in bnnet\'s checkout, pip install ".[mpi]", '
                "then launch with that environment's mpiexec"
            ) from None
        self._MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self._merge_op = _moments_op(MPI)
        self.reset_stats()

    def reset_stats(self):
        self.stats = {"calls": 0, "bytes": 0, "seconds": 0.0}

    def _timed(self, nbytes, fn, *args, **kwargs):
        t = time.perf_counter()
        _through_host(fn, *args, **kwargs)
        self.stats["seconds"] += time.perf_counter() - t
        self.stats["calls"] += 1
        self.stats["bytes"] += nbytes

    def allreduce_sum(self, buf):
        """buf <- sum of buf over all ranks, in place (a contiguous float array)."""
        self._timed(buf.nbytes, self.comm.Allreduce, self._MPI.IN_PLACE, buf, op=self._MPI.SUM)

    def merge_moments(self, buf):
        """buf = [count, mean (D), M2 (D)] float64 <- the same for the union of every rank's rows, in place."""
        self._timed(buf.nbytes, self.comm.Allreduce, self._MPI.IN_PLACE, buf, op=self._merge_op)

    def broadcast(self, buf, root=0):
        """buf <- root's buf, in place."""
        self._timed(buf.nbytes, self.comm.Bcast, buf, root=root)

    def broadcast_object(self, obj, root=0):
        return self.comm.bcast(obj, root=root)

    def allgather_object(self, obj):
        """[obj of rank 0, obj of rank 1, ...] on every rank."""
        return self.comm.allgather(obj)

    def abort(self, code=1):
        """End every rank of the job now (MPI_Abort): no rank is left waiting in a collective."""
        self.comm.Abort(code)


def _through_host(fn, *args, **kwargs):
    """fn(*args, **kwargs), with each GPU array among args replaced by a host copy that is copied back
    after: MPI reads and writes host memory (a CUDA-aware MPI or NCCL would spare the copies)."""
    copies = [(a, to_host(a)) if on_device(a) else (a, a) for a in args]
    fn(*(c for _, c in copies), **kwargs)
    for a, c in copies:
        if c is not a:
            np.copyto(a, to_device(c, "cuda"))


class SingleProcess:
    """A communicator of one rank: every collective leaves its buffer as it is."""

    rank, size = 0, 1

    def __init__(self):
        self.stats = {"calls": 0, "bytes": 0, "seconds": 0.0}

    def reset_stats(self):
        self.stats = {"calls": 0, "bytes": 0, "seconds": 0.0}

    def allreduce_sum(self, buf):
        pass

    merge_moments = broadcast = allreduce_sum

    def broadcast_object(self, obj, root=0):
        return obj

    def allgather_object(self, obj):
        return [obj]

    def abort(self, code=1):
        sys.exit(code)


_MOMENTS_OP = None


def _moments_op(MPI):
    """The MPI reduction that merges packed [count, mean, M2] buffers (Chan's formula)."""
    global _MOMENTS_OP
    if _MOMENTS_OP is None:

        def merge(inbuf, inoutbuf, datatype):
            ops.merge_moments(np.frombuffer(inbuf, dtype=np.float64), np.frombuffer(inoutbuf, dtype=np.float64))

        # commute=True is honest: merge_moments is bitwise symmetric in its two arguments.
        _MOMENTS_OP = MPI.Op.Create(merge, commute=True)
    return _MOMENTS_OP


def limit_threads():
    """One thread per process for numba and the BLAS (under MPI the ranks already fill the cores)."""
    threads.set_num_threads(1)


@contextlib.contextmanager
def abort_on_error(comm, command=None, describe=None):
    """Run a block; if it raises on any rank, print that rank's error and abort the whole job.

    Without it, a rank that fails leaves the others waiting forever in the next
    collective. KeyboardInterrupt and SystemExit abort too (with their exit code).
    The message is "bnnet: rank R of K failed: <error>" (with the traceback for
    errors that are not bnnet's own); with `command` (e.g. "bnnet train") it is the
    CLI's one line, "<command>: error: rank R of K: <describe(error)>".
    """
    try:
        yield
    except SystemExit as e:
        if e.code not in (None, 0) and comm.size > 1:
            _abort(comm, e.code if isinstance(e.code, int) else 1)
        raise
    except BaseException as e:
        if comm.size == 1:
            raise
        if getattr(e, "collective", False) and comm.rank != 0:
            time.sleep(30)  # every rank raised it: rank 0 reports it and ends the job
            os._exit(1)
        if isinstance(e, KeyboardInterrupt) and comm.rank != 0:
            time.sleep(2)  # Ctrl-C reaches every rank: let rank 0 say it once (unless it alone was spared)
        where = f"rank {comm.rank} of {comm.size}"
        if isinstance(e, KeyboardInterrupt):
            line, code = (f"{command}: interrupted ({where})" if command else f"bnnet: {where} interrupted"), 130
        elif command:
            line, code = f"{command}: error: {where}: {(describe or str)(e)}", 1
        elif isinstance(e, BnnetError):
            line, code = f"bnnet: {where} failed: {type(e).__name__}: {e}", 1
        else:  # not one of bnnet's own errors: the traceback says where
            line, code = f"bnnet: {where} failed: {type(e).__name__}: {e}\n{traceback.format_exc()}".rstrip(), 1
        print(line, file=sys.stderr, flush=True)
        _abort(comm, code)


def exit_on_interrupt(comm, command):
    """On Ctrl-C (SIGINT): rank 0 prints "<command>: interrupted" and exits at once (130); mpiexec,
    which forwards Ctrl-C to every rank, then ends the others.

    The other ranks ignore SIGINT: one that exited first would get rank 0 killed while it waits
    in a collective, before it could print. Exiting from the handler also works inside an MPI
    reduction, whose Python callback cannot raise KeyboardInterrupt.
    """
    import signal

    def handler(signum, frame):
        print(f"{command}: interrupted", file=sys.stderr, flush=True)
        os._exit(130)

    signal.signal(signal.SIGINT, handler if comm.rank == 0 else signal.SIG_IGN)


def _abort(comm, code):
    """End every rank. MPI_Abort can return to Python with some MPI builds: this rank then exits
    at once, so that code after the failing block never runs on it."""
    sys.stderr.flush()
    sys.stdout.flush()
    # mpiexec forwards each rank's output through its own process, and an abort kills the job at
    # once: without a moment's wait the message can be lost on its way (seen on busy machines)
    time.sleep(0.5)
    try:
        comm.abort(code)
    finally:
        os._exit(code)


# --------------------------------------------------------------------------
# Synchronized Batch Norm
# --------------------------------------------------------------------------


class SyncBatchNorm(BatchNorm):
    """BatchNorm whose train-mode statistics are those of the global batch, split across ranks.

    Same arguments, parameters, buffers and eval behaviour as BatchNorm, plus
    `comm` (a Communicator). In train mode (not frozen) each forward makes one
    `merge_moments` allreduce ((2D + 1) float64) and each backward one sum
    allreduce (2D float64). A rank's shard may have any number of rows, 0
    included, as long as the global batch has at least 2. dgamma and dbeta are
    left as this shard's contributions: the gradient allreduce of the training
    step sums them over the ranks like every other gradient.

    Every rank must call forward and backward in the same order (they are
    collective operations). Saved checkpoints record a plain BatchNorm.
    """

    saved_as = "BatchNorm"

    def __init__(self, num_features, comm, **kwargs):
        super().__init__(num_features, **kwargs)
        self.comm = comm

    @classmethod
    def from_batchnorm(cls, bn, comm):
        """A SyncBatchNorm sharing bn's parameter and buffer arrays (and which of them are frozen)."""
        sync = cls(comm=comm, **bn.config())
        sync.params, sync.buffers = bn.params, bn.buffers
        sync.frozen_params = bn.frozen_params
        return sync

    def _effective_train(self, x, train):
        if train and not self.frozen:
            return True  # the global batch size is checked after the merge
        return super()._effective_train(x, train)

    def _global_moments(self, x):
        """(n, mean, biased var) of the global batch; mean, var float64 (D,)."""
        d = self.num_features
        buf = empty(x, (2 * d + 1,), np.float64)  # packed [count, mean (D), M2 (D)]: one allreduce
        buf[0] = x.shape[0]
        ops.bn_moments(x, buf[1 : d + 1], buf[d + 1 :])
        self.comm.merge_moments(buf)
        n = int(buf[0])
        if n < 2:
            raise InputError(
                f"{self.name}: the global batch over {self.comm.size} ranks has {n} row(s) in train "
                "mode; BatchNorm needs at least 2 (use a larger batch_size)"
            )
        return n, buf[1 : d + 1], buf[d + 1 :] / n

    @on_rows
    def _forward(self, x, train, out=None, activation=None):
        train = self._effective_train(x, train)
        if not train:
            return super()._forward(x, False, out, activation)
        n, mean, var = self._global_moments(x)
        self._update_running(mean, var, n)
        stats = empty(x, (3, self.num_features), np.float64)  # mean, var, inv_std: float64 (D,)
        stats[0], stats[1] = mean, var
        act, slope = _activation_code(activation)
        out = out if out is not None else np.empty_like(x)
        gamma, beta, _, _ = self._affine(x)
        ops.bn_apply(x, gamma, beta, self.eps, act, slope, stats[0], stats[1], out, stats[2])
        self._cache = ("sync", x, out, stats, act, slope, n)
        return out

    @on_rows
    def _backward(self, dy, input_grad, dx_out=None):
        if self._cached()[0] != "sync":  # eval mode or frozen: BatchNorm's cache
            return super()._backward(dy, input_grad, dx_out)
        _, x, out, stats, act, slope, n = self._cached()
        sums = empty(x, (2, self.num_features), np.float64)  # sum(g), sum(g x_hat) over this shard
        ops.bn_grad_sums(dy, out, x, stats[0], stats[2], act, slope, sums[0], sums[1])
        gamma, _, dgamma, dbeta = self._affine(x)
        dbeta[...], dgamma[...] = sums  # the step's gradient allreduce adds the rest
        if not input_grad:
            return None
        self.comm.allreduce_sum(sums)
        dx = dx_out if dx_out is not None else np.empty_like(x)  # may be x: read before written, as in BatchNorm
        ops.bn_grad_dx(dy, out, x, stats[0], stats[2], gamma, act, slope, sums[0], sums[1], n, dx)
        if dx is x:
            self._cache = None
        return dx

    def __getstate__(self):
        state = super().__getstate__()
        state["comm"] = None  # a communicator does not survive pickling; set .comm again after loading
        return state


def sync_batchnorm(model, comm):
    """A Sequential like `model` with every BatchNorm replaced by a SyncBatchNorm over `comm`.

    The new layers share the old ones' parameter and buffer arrays (as PyTorch's
    SyncBatchNorm.convert_sync_batchnorm does, the model is converted, not copied).
    """
    from .model import Sequential

    layers = [SyncBatchNorm.from_batchnorm(l, comm) if type(l) is BatchNorm else l for l in model.layers]
    return Sequential(*layers)


# --------------------------------------------------------------------------
# What fit does differently when it runs on K ranks
# --------------------------------------------------------------------------


class DataParallel:
    """The per-step collective work of data-parallel training, for `bnnet.fit(..., comm=comm)`.

    Gradients live in one flat buffer: each layer's grads[k] is made a view into
    it, so the gradient allreduce copies nothing. Its tail holds the extras
    summed in the same call: the loss and correct-prediction sums, and the
    running statistics of unsynchronized BatchNorm layers.
    """

    def __init__(self, model, comm):
        self.model, self.comm = model, comm
        self.rank, self.size = comm.rank, comm.size
        # not synchronized, and keeping running statistics (averaged over the ranks at each step)
        self.local_bn = [l for l in model.layers if type(l) is BatchNorm and l.track_running_stats]
        params = model.named_parameters()
        n_grads = sum(p.size for _, p, _ in params)
        n_stats = sum(2 * l.num_features for l in self.local_bn)
        layout = model.flat_layout()
        groups = layout.groups if layout is not None else []
        if len(groups) == 1 and groups[0].dtype == np.dtype(model.dtype):
            # the model's own flat gradient buffer (bnnet.flat), with room for the extras after it:
            # the optimizer then updates the summed gradients in one call, as in one process
            group = groups[0]
            group.with_tail(2 + n_stats)
            self.flat = group.buffer[: group.size + 2 + n_stats]
            self.views = [(layer, key, layer._grad_homes[key]) for _, layer, key, *_ in group.entries]
            self._extra = group.size
            return
        first = params[0][1] if params else np.empty(0)
        self.flat = zeros(first, (n_grads + 2 + n_stats,), model.dtype)  # on the parameters' device
        self.views, offset = [], 0
        for name, p, _ in params:
            layer, key = model.layers[int(name.split(".")[0])], name.split(".", 1)[1]
            view = self.flat[offset : offset + p.size].reshape(p.shape)
            layer.grads[key] = view  # layers write their gradients here (Layer._grad keeps it)
            self.views.append((layer, key, view))
            offset += p.size
        self._extra = offset

    def check_agreement(self, settings):
        """Raise the same InputError on every rank unless every rank was given the same settings
        (row count, features, dtype, architecture, optimizer, loss, batch size, epochs): ranks that
        disagree would otherwise wait for each other forever in a collective."""
        every = self.comm.allgather_object(settings)
        differ = [k for k in settings if any(other.get(k) != every[0].get(k) for other in every)]
        if differ:
            detail = "; ".join(
                f"{k}: " + ", ".join(f"rank {r} {str(other.get(k))[:60]}" for r, other in enumerate(every))
                for k in differ
            )
            error = InputError(
                f"fit: the {self.size} ranks were not given the same training run ({detail}); "
                "give every rank the same data, model and settings"
            )
            error.collective = True  # raised on every rank: one of them reports it
            raise error

    def start(self, seed):
        """Copy rank 0's parameters and buffers to every rank; return rank 0's seed (drawn there if None)."""
        for arr in list(self.model.params.values()) + list(self.model.buffers.values()):
            self.comm.broadcast(arr)
        if seed is None and self.rank == 0:
            seed = int(np.random.SeedSequence().entropy % (1 << 63))
        return self.comm.broadcast_object(seed)

    def shard(self, idx):
        """This rank's rows of a global mini-batch: contiguous, sizes differ by at most one."""
        return np.array_split(idx, self.size)[self.rank]

    def allreduce(self, loss_sum, correct_sum, n_rank, n_global):
        """Sum gradients, loss and correct counts over the ranks, in one allreduce.

        Returns (global mean loss, global accuracy). Running statistics of local
        BatchNorm layers are replaced by their shard-size-weighted average.
        """
        for layer, key, view in self.views:  # a layer that replaced its grads array: copy it in
            if layer.grads.get(key) is not view:
                view[...] = layer.grads.get(key, 0)
                layer.grads[key] = view
        e = self._extra
        self.flat[e : e + 2] = loss_sum, correct_sum
        o, w = e + 2, n_rank / n_global
        for bn in self.local_bn:
            for key in ("running_mean", "running_var"):
                self.flat[o : o + bn.num_features] = bn.buffers[key] * w
                o += bn.num_features
        self.comm.allreduce_sum(self.flat)
        o = e + 2
        for bn in self.local_bn:
            for key in ("running_mean", "running_var"):
                bn.buffers[key][...] = self.flat[o : o + bn.num_features]
                o += bn.num_features
        return float(self.flat[e]) / n_global, float(self.flat[e + 1]) / n_global


def is_root(comm):
    return comm is None or comm.rank == 0
