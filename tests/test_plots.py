"""Figures in notebooks: importing bnnet.plots changes no global matplotlib setting, and plot_history
draws a fit history."""

import subprocess
import sys

import numpy as np
import pytest

import bnnet

pytest.importorskip("matplotlib")


def test_importing_the_figures_keeps_the_notebooks_backend(tmp_path):
    code = (
        "import matplotlib, sys; import bnnet.plots as P\n"
        "rows = [{'step': s, 'bn': 0.9, 'nobn': 0.5} for s in range(3)]\n"
        "print(matplotlib.rcParams['backend'], 'matplotlib.pyplot' in sys.modules)\n"
    )
    env = {"MPLBACKEND": "svg", "PATH": ""}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["svg", "False"]


def test_plot_history_draws_losses_and_accuracies(tmp_path):
    from bnnet.plots import plot_history

    rng = np.random.default_rng(0)
    history = bnnet.fit(bnnet.mlp([4, 8, 2], seed=0), rng.standard_normal((60, 4)), rng.integers(0, 2, 60),
                        epochs=3, validation_split=0.25, progress=False)  # fmt: skip
    fig = plot_history(history)
    left, right = fig.axes
    assert [line.get_label() for line in left.lines] == ["loss", "val_loss"]
    assert [line.get_label() for line in right.lines] == ["accuracy", "val_accuracy"]
    np.testing.assert_array_equal(left.lines[0].get_ydata(), history["loss"])
    fig.savefig(tmp_path / "h.png")
    with pytest.raises(bnnet.HyperparameterError, match="history"):
        plot_history({})
