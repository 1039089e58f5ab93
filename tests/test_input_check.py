"""BatchNorm's NaN/Inf input check, folded into its statistics pass in train mode (Layer.forward).

The layer must refuse exactly what the separate scan refused, name the same first index, and leave
its running statistics as they were; finite inputs whose float64 sums overflow still go through.
"""

import re

import numpy as np
import pytest

import bnnet
from bnnet import backend
from bnnet.layers import BatchNorm


@pytest.mark.parametrize("backend_name", ["numba", "numpy"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("shape", [(6, 4), (5, 3, 2, 2)])
def test_a_nonfinite_input_is_refused_and_nothing_changes(bad, shape, backend_name):
    with backend.using(backend_name):
        layer = BatchNorm(shape[1], dtype="float64")
        rng = np.random.default_rng(0)
        layer.forward(rng.standard_normal(shape), train=True)  # one good batch
        before = {k: v.copy() for k, v in layer.buffers.items()}
        x = rng.standard_normal(shape)
        index = tuple(int(rng.integers(0, s)) for s in shape)
        x[index] = bad
        with pytest.raises(bnnet.InputError, match=rf"first at index {re.escape(str(index))}"):
            layer.forward(x, train=True)
        for k, v in before.items():
            np.testing.assert_array_equal(layer.buffers[k], v, err_msg=k)
        out = np.zeros(shape)
        with pytest.raises(bnnet.InputError, match="NaN or Inf"):
            layer.forward(x, train=True, out=out)
        for k, v in before.items():
            np.testing.assert_array_equal(layer.buffers[k], v, err_msg=k)
        y = layer.forward(x, train=True, check_input=False)  # let through, as NumPy would
        assert np.isnan(y).any()


def test_finite_inputs_whose_sums_overflow_still_go_through():
    layer = BatchNorm(2, dtype="float64")
    x = np.array([[1e200, 1.0], [-1e200, 2.0], [3e199, 3.0]])
    y = layer.forward(x, train=True)  # the float64 sum of squares overflows; x itself is finite
    assert y.shape == x.shape and np.isfinite(y[:, 1]).all()


def test_eval_mode_and_other_layers_keep_their_own_scan():
    layer = BatchNorm(3)
    layer.forward(np.ones((4, 3), "float32") * np.arange(4)[:, None], train=True)
    with pytest.raises(bnnet.InputError, match="NaN or Inf"):
        layer.forward(np.full((2, 3), np.nan, "float32"), train=False)
    with pytest.raises(bnnet.InputError, match="NaN or Inf"):
        bnnet.layers.Linear(3, 2).forward(np.full((2, 3), np.inf, "float32"), train=True)
