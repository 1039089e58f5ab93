"""Crash safety: `bnnet train` killed with SIGKILL at 20 random moments never leaves a bad checkpoint,
and `bnnet train --resume` then ends exactly where an uninterrupted run ends."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import bnnet
from bnnet.io import load_checkpoint

ARGS = ["train", "--hidden", "16", "--epochs", "3", "--seed", "3", "--quiet", "--checkpoint-every", "1"]


def _start(out):
    return subprocess.Popen(
        [sys.executable, "-m", "bnnet", *ARGS, "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def _check_consistent(path):
    """A checkpoint on disk loads, and its parts agree with each other."""
    ckpt = load_checkpoint(path)
    fit_state = ckpt.metadata["fit"]
    assert ckpt.optimizer_info["t"] == fit_state["step"]  # parameters and optimizer state from the same step
    assert all(np.isfinite(v).all() for v in ckpt.model.params.values())
    assert int(ckpt.model.buffers["1.count"]) == fit_state["step"]
    return fit_state["step"]


def _wait_for_folder(run, proc, timeout=120):
    """Until the run folder exists (the run has started training) or the process has ended."""
    start = time.monotonic()
    while not run.exists() and proc.poll() is None and time.monotonic() - start < timeout:
        time.sleep(0.05)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_sigkill_at_20_random_moments_then_exact_resume(tmp_path):
    reference = tmp_path / "reference"
    done = subprocess.run(
        [sys.executable, "-m", "bnnet", *ARGS, "--out", str(reference)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    expected = load_checkpoint(reference / "model.safetensors").model

    run = tmp_path / "run"
    rng = np.random.default_rng(2026)
    steps_seen = []
    for attempt in range(20):
        proc = (
            _start(run)
            if attempt == 0 or not (run / "model.safetensors").exists()
            else subprocess.Popen(
                [sys.executable, "-m", "bnnet", "train", "--resume", str(run), "--quiet", "--checkpoint-every", "1"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
        )
        _wait_for_folder(run, proc)  # (a loaded machine may take seconds to start Python and numba)
        time.sleep(rng.uniform(0.3, 1.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        path = run / "model.safetensors"
        if path.exists():
            steps_seen.append(_check_consistent(path))
        # anything else left behind is a temporary file that was never renamed into place
        assert all(
            name == "model.safetensors" or name.startswith(".tmp-") or name.endswith((".csv", ".json"))
            for name in os.listdir(run)
        ), os.listdir(run)
    assert steps_seen == sorted(steps_seen)  # each resume continued from the last checkpoint
    finish = subprocess.run(
        [sys.executable, "-m", "bnnet", "train", "--resume", str(run), "--quiet"], capture_output=True, text=True
    )
    assert finish.returncode == 0, finish.stderr
    final = load_checkpoint(run / "model.safetensors").model
    for k in expected.params:
        np.testing.assert_array_equal(final.params[k], expected.params[k])
    for k in expected.buffers:
        np.testing.assert_array_equal(final.buffers[k], expected.buffers[k])
    assert len(steps_seen) >= 5  # the kills really happened during training, with checkpoints being written


def test_half_written_checkpoint_files_are_refused(tmp_path):
    model = bnnet.mlp([4, 3, 2], seed=0)
    bnnet.save(tmp_path / "m.safetensors", model)
    data = (tmp_path / "m.safetensors").read_bytes()
    for cut in np.linspace(1, len(data) - 1, 25).astype(int):
        (tmp_path / "cut.safetensors").write_bytes(data[:cut])
        with pytest.raises(bnnet.CheckpointError):
            bnnet.load(tmp_path / "cut.safetensors")
