"""Data-parallel training and SyncBatchNorm: K MPI ranks against one process.

The MPI runs launch tests/mpi_worker.py with this environment's own mpiexec
(from the `mpich` wheel of the [mpi] extra), one thread per rank.
"""

import functools
import os
import signal
import subprocess
import sys
import time

import mpi_cases
import numpy as np
import pytest
from helpers import assert_same_as, check_layer_gradients, rel_error

import bnnet
from bnnet import backend, distributed
from bnnet import functional as F

MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")
WORKER = os.path.join(os.path.dirname(__file__), "mpi_worker.py")
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "NUMBA_NUM_THREADS": "1",
}
TOL = {"float64": 1e-10, "float32": 1e-5}


def mpirun(k, *args, timeout=300):
    return subprocess.run(
        [MPIEXEC, "-n", str(k), sys.executable, WORKER, *args], env=ENV, capture_output=True, text=True, timeout=timeout
    )


def _warm_kernels():
    # Compile (and cache on disk) the kernels the ranks use, once, before K processes would each compile them.
    bn = distributed.SyncBatchNorm(3, distributed.SingleProcess(), dtype="float64")
    step = bnnet.engine.Step(bn, bnnet.layers.Sigmoid())  # BN + activation fused, as inside a model
    for dtype in ("float64", "float32"):
        bn.dtype = dtype
        bn.params = {k: v.astype(dtype) for k, v in bn.params.items()}
        bn.buffers = {k: v.astype(dtype) if v.ndim else v for k, v in bn.buffers.items()}
        x = np.random.default_rng(0).normal(size=(4, 3)).astype(dtype)
        step.forward(x, True, None)
        step.backward(x.copy(), True, None)
    packed = np.array([2.0, 1.0, 1.0])
    bnnet.ops.merge_moments(packed.copy(), packed)  # the MPI reduction's compiled body


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{K: folder of the ranks' .npz files} for K = 2 and 4."""
    _warm_kernels()
    for case in mpi_cases.FIT_CASES:  # compiles (and caches) every kernel the ranks will run
        _reference_fit(case)
    out = {}
    for k in (2, 4):
        folder = tmp_path_factory.mktemp(f"mpi{k}")
        proc = mpirun(k, str(folder))
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[k] = folder
    return out


def _rank_files(folder, name, k):
    return [dict(np.load(os.path.join(folder, f"{name}-rank{r}.npz"))) for r in range(k)]


@functools.cache
def _reference_fit_cached(name):
    case = next(c for c in mpi_cases.FIT_CASES if c["name"] == name)
    with backend.using(case["backend"]):
        model, X, y, kwargs = mpi_cases.fit_setup(case, seed_model=100)  # rank 0's weights
        hist = bnnet.fit(model, X, y, **kwargs)
    return model, hist


def _reference_fit(case):
    return _reference_fit_cached(case["name"])


def _close(a, b, tol):
    scale = max(1.0, float(np.abs(b).max())) if b.size else 1.0
    return float(np.abs(np.asarray(a, np.float64) - b).max(initial=0.0)) <= tol * scale


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("case", [c for c in mpi_cases.FIT_CASES if c["sync"]], ids=lambda c: c["name"])
def test_fit_on_k_ranks_equals_one_process(runs, case, k):
    """Parameters, running statistics and the loss history after 2 epochs (8-14 steps, with uneven
    and, for K=4, empty shards) equal those of one process with the same global batch."""
    model, hist = _reference_fit(case)
    ranks = _rank_files(runs[k], case["name"], k)
    tol = TOL[case["dtype"]]
    for r, got in enumerate(ranks):
        for key, ref in model.params.items():
            assert _close(got[f"params/{key}"], ref, tol), (r, key, np.abs(got[f"params/{key}"] - ref).max())
        for key, ref in model.buffers.items():
            assert _close(got[f"buffers/{key}"], ref, tol), (r, key)
        assert _close(got["loss"], np.array(hist["loss"]), tol), (got["loss"], hist["loss"])
        assert _close(got["accuracy"], np.array(hist["accuracy"]), tol)
    for got in ranks[1:]:  # and every rank holds bitwise the same model
        for key in got:
            if key.startswith(("params/", "buffers/")):
                np.testing.assert_array_equal(got[key], ranks[0][key])


@pytest.mark.parametrize("k", [2, 4])
def test_frozen_parameters_stay_put_on_every_rank(runs, k):
    case = next(c for c in mpi_cases.FIT_CASES if c.get("freeze"))
    initial, *_ = mpi_cases.fit_setup(case, seed_model=100)  # rank 0's weights, broadcast to all
    for got in _rank_files(runs[k], case["name"], k):
        for key in initial.frozen_params:
            np.testing.assert_array_equal(got[f"params/{key}"], initial.params[key])
    model, _ = _reference_fit(case)
    assert model.frozen_params == ["0.W", "1.gamma"] and kwargs_lr(case) == 0.01 * 0.5**2


def kwargs_lr(case):
    """The lr after the reference run (ReduceLROnPlateau halved it after each epoch but the first)."""
    model, X, y, kwargs = mpi_cases.fit_setup(case, seed_model=100)
    bnnet.fit(model, X, y, **kwargs)
    return kwargs["optimizer"].lr


@pytest.mark.parametrize("k", [2, 4])
def test_communication_volume(runs, k):
    """One moments allreduce per BN layer forward, one sums allreduce per BN backward, one gradient
    allreduce per step (plus the start-up broadcasts): counted by the Communicator."""
    case = mpi_cases.FIT_CASES[0]
    got = _rank_files(runs[k], case["name"], k)[0]
    model, X, y, kwargs = mpi_cases.fit_setup(case)
    steps = 2 * -(-len(X) // kwargs["batch_size"])
    bns = [l for l in model.layers if isinstance(l, bnnet.layers.BatchNorm)]
    n_params = sum(p.size for p in model.params.values())
    broadcasts = len(model.params) + len(model.buffers)
    assert int(got["comm_calls"]) == broadcasts + steps * (2 * len(bns) + 1)
    per_step = sum((2 * b.num_features + 1) * 8 + 2 * b.num_features * 8 for b in bns) + (n_params + 2) * 8
    start = sum(p.nbytes for p in model.params.values()) + sum(b.nbytes for b in model.buffers.values())
    assert int(got["comm_bytes"]) == start + steps * per_step


@pytest.mark.parametrize("k", [2, 4])
def test_local_batchnorm_keeps_ranks_identical(runs, k):
    """Unsynchronized BN: each shard is normalized alone (so the run differs from one process), yet the
    parameters and the averaged running statistics stay identical on every rank."""
    case = next(c for c in mpi_cases.FIT_CASES if not c["sync"])
    ranks = _rank_files(runs[k], case["name"], k)
    for got in ranks[1:]:
        for key in got:
            np.testing.assert_array_equal(got[key], ranks[0][key])
    model, hist = _reference_fit(case)
    assert np.isfinite(ranks[0]["loss"]).all()
    assert not _close(ranks[0]["params/0.W"], model.params["0.W"], 1e-6)


def _reference_layer(case):
    x, dy, gamma, beta = mpi_cases.layer_data(case)
    with backend.using("numpy"):
        bn = bnnet.layers.BatchNorm(x.shape[1], dtype="float64")
        bn.params["gamma"][...], bn.params["beta"][...] = gamma, beta
        act = bnnet.layers.Sigmoid()
        x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
        y = act.forward(bn.forward(x64, True), True)
        dx = bn.backward(act.backward(dy64))
    return y, dx, np.stack([bn.grads["gamma"], bn.grads["beta"]]), bn.buffers


@pytest.mark.parametrize("k", [2, 4])
def test_sync_batchnorm_layer_equals_batchnorm_on_the_whole_batch(runs, k):
    """Forward output, dx, dgamma, dbeta and running statistics of each rank's shard (7+5, 12+0,
    7+5+0+3, 0+1+1+0 rows) equal BatchNorm + sigmoid on the concatenated batch (float64 reference)."""
    for case in mpi_cases.layer_cases(k):
        y, dx, grads, buffers = _reference_layer(case)
        tol = TOL[case["dtype"]]
        for r, got in enumerate(_rank_files(runs[k], case["name"], k)):
            lo, hi = mpi_cases.shard_bounds(case["shards"], r)
            assert got["y"].shape == (hi - lo, 6)
            assert _close(got["y"], y[lo:hi], tol), (case["name"], r)
            assert _close(got["dx"], dx[lo:hi], tol), (case["name"], r)
            assert _close(got["grads"], grads, tol), (case["name"], r)
            assert _close(got["running_mean"], buffers["running_mean"], tol)
            assert _close(got["running_var"], buffers["running_var"], tol)


def test_a_failing_rank_ends_the_job_with_its_message(tmp_path):
    """Rank 1 raises at its third step while rank 0 waits in a collective: the whole job ends fast."""
    _warm_kernels()
    start = time.monotonic()
    proc = mpirun(2, str(tmp_path), "fault", timeout=60)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert "rank 1 of 2 failed" in proc.stderr and "injected failure on purpose at step 3" in proc.stderr, proc.stderr
    assert elapsed < 10, elapsed


def test_ranks_given_different_data_fail_together_with_one_message(tmp_path):
    """Ranks given 4 different row counts would wait forever in a collective: every rank is refused
    before the first step, one rank reports it, and the job ends."""
    _warm_kernels()
    start = time.monotonic()
    proc = mpirun(4, str(tmp_path), "mismatch", timeout=60)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("bnnet:")]
    assert len(lines) == 1 and "were not given the same training run (rows: rank 0" in lines[0], (
        proc.returncode,
        proc.stderr,
    )
    assert "after the block" not in proc.stderr
    assert time.monotonic() - start < 25


def test_cli_distributed_errors_are_the_single_process_line(tmp_path):
    """A distributed `bnnet train` that fails prints the CLI's own one line, with the rank."""
    proc = subprocess.run(
        [
            MPIEXEC,
            "-n",
            "2",
            sys.executable,
            "-m",
            "bnnet",
            "train",
            "--distributed",
            "--quiet",
            "--data",
            str(tmp_path / "missing.npz"),
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("bnnet train:")]
    assert lines and all(line.startswith("bnnet train: error: rank ") and "missing.npz" in line for line in lines)
    assert "Traceback" not in proc.stderr


def test_cli_distributed_ctrl_c_is_one_line(tmp_path):
    """Ctrl-C to mpiexec (forwarded to every rank, often inside an MPI reduction): the CLI's own
    line once, no traceback."""
    proc = subprocess.Popen(
        [
            MPIEXEC,
            "-n",
            "2",
            sys.executable,
            "-m",
            "bnnet",
            "train",
            "--distributed",
            "--quiet",
            "--epochs",
            "1000",
            "--out",
            str(tmp_path / "run"),
        ],
        env=ENV,
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(8)  # past start-up, inside training
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert err.count("bnnet train: interrupted") == 1, (proc.returncode, out, err)
    assert "Traceback" not in err and "Fatal Python error" not in err, err


def test_cli_distributed_trains_the_same_model(tmp_path):
    """mpiexec -n 2 bnnet train --distributed gives the model `bnnet train` gives (float32)."""
    bnnet_cmd = [sys.executable, "-m", "bnnet", "train", "--epochs", "1", "--quiet", "--hidden", "32,32"]
    single = subprocess.run(bnnet_cmd + ["--out", str(tmp_path / "one")], env=ENV, capture_output=True, text=True)
    assert single.returncode == 0, single.stderr
    multi = subprocess.run(
        [MPIEXEC, "-n", "2", *bnnet_cmd, "--distributed", "--out", str(tmp_path / "two")],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert multi.returncode == 0, multi.stderr
    assert multi.stdout.count("test accuracy") == 1  # only rank 0 reports
    a, b = bnnet.load(tmp_path / "one" / "model.safetensors"), bnnet.load(tmp_path / "two" / "model.safetensors")
    assert [type(l).__name__ for l in b.layers] == [type(l).__name__ for l in a.layers]  # saved as plain BatchNorm
    for key in a.params:
        assert _close(b.params[key], a.params[key], 1e-4), key  # 67 Adam steps in float32
    for key in a.buffers:
        assert _close(b.buffers[key], a.buffers[key], 1e-4), key


def test_cli_local_bn_needs_distributed(tmp_path):
    from bnnet.cli import main

    assert main(["train", "--local-bn", "--out", str(tmp_path)]) == 1


# --------------------------------------------------------------------------
# Without MPI: the math of the pieces
# --------------------------------------------------------------------------


@pytest.mark.parametrize("split", [[5, 7], [0, 12], [1, 1, 10], [12, 0, 0]])
def test_merge_moments_equals_two_pass_moments(split):
    rng = np.random.default_rng(0)
    x = rng.normal(1e4, 1.0, (sum(split), 4))  # |mean| >> std: E[x^2] - E[x]^2 would lose ~8 digits
    n, mean, m2 = 0.0, np.zeros(4), np.zeros(4)
    lo = 0
    for size in split:
        part = x[lo : lo + size]
        lo += size
        pm, pv = F.moments(part, 0) if size else (np.zeros(4), np.zeros(4))
        n, mean, m2 = F.merge_moments(n, mean, m2, float(size), pm, pv * size)
    ref_mean, ref_var = F.moments(x, 0)
    assert n == len(x)
    assert rel_error(mean, ref_mean) < 1e-15
    assert rel_error(m2 / n, ref_var) < 1e-12


def test_merge_moments_is_bitwise_symmetric():
    rng = np.random.default_rng(1)
    a = (3.0, rng.normal(size=5), rng.uniform(size=5))
    b = (8.0, rng.normal(size=5), rng.uniform(size=5))
    for x, y in zip(F.merge_moments(*a, *b), F.merge_moments(*b, *a)):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("be", ["numba", "numpy"])
def test_sync_batchnorm_on_one_process_equals_batchnorm(be):
    rng = np.random.default_rng(2)
    x, dy = rng.normal(2, 3, (9, 5)), rng.normal(size=(9, 5))
    with backend.using(be):
        ref = bnnet.layers.BatchNorm(5, dtype="float64")
        sync = distributed.SyncBatchNorm(5, distributed.SingleProcess(), dtype="float64")
        ref.params["gamma"][...] = sync.params["gamma"][...] = rng.uniform(0.5, 2, 5)
        assert_same_as(sync, ref, x, dy)


@pytest.mark.parametrize("be", ["numba", "numpy"])
def test_sync_batchnorm_gradients_by_finite_differences(be):
    with backend.using(be):
        layer = distributed.SyncBatchNorm(4, distributed.SingleProcess(), dtype="float64")
        layer.params["gamma"][...] = np.random.default_rng(3).uniform(0.5, 2, 4)
        check_layer_gradients(layer, np.random.default_rng(4).normal(1, 2, (6, 4)), True, np.random.default_rng(5))


def test_sync_batchnorm_needs_two_rows_in_the_global_batch():
    layer = distributed.SyncBatchNorm(3, distributed.SingleProcess(), dtype="float64")
    with pytest.raises(bnnet.InputError, match="global batch over 1 ranks has 1 row"):
        layer.forward(np.ones((1, 3)), True)


def test_sync_batchnorm_saves_as_batchnorm(tmp_path):
    model = distributed.sync_batchnorm(bnnet.mlp([4, 3, 2], seed=0, dtype="float64"), distributed.SingleProcess())
    assert isinstance(model.layers[1], distributed.SyncBatchNorm)
    bnnet.save(tmp_path / "m.safetensors", model)
    assert type(bnnet.load(tmp_path / "m.safetensors").layers[1]) is bnnet.layers.BatchNorm
