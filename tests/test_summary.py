"""model.summary(): output shapes, parameter and buffer counts, frozen parameters, memory; the table in
the tutorial is the one the code prints."""

from pathlib import Path

import pytest

import bnnet
from bnnet.errors import InputError


def test_counts_shapes_and_frozen():
    model = bnnet.convnet((3, 8, 8), channels=(4,), hidden=(6,), classes=2, seed=0).freeze(0)
    s = model.summary((3, 8, 8))
    shapes = [r.output_shape for r in s.rows]
    assert shapes[0] == (4, 8, 8) and shapes[3] == (4, 4, 4) and shapes[-1] == (2,)
    assert s.total_params == sum(a.size for a in model.params.values())
    assert s.trainable_params == s.total_params - model.params["0.W"].size
    assert s.total_buffers == sum(a.size for a in model.buffers.values())
    nbytes = sum(a.nbytes for a in model.params.values()) + sum(a.nbytes for a in model.buffers.values())
    assert s.total_bytes == nbytes
    text = str(s)
    assert "Conv2d(3, 4)" in text and "(N, 4, 8, 8)" in text and f"{model.params['0.W'].size:,} frozen" in text
    assert "(N, 4, ?, ?)" in str(model.summary())  # image size left open without an input shape
    with pytest.raises(InputError, match="input_shape must be"):
        model.summary((3, 0, 8))
    with pytest.raises(InputError):
        model.summary((2, 8, 8))  # not 3 channels


def test_the_tutorials_table_is_what_summary_prints():
    page = (Path(__file__).resolve().parent.parent / "docs" / "tutorial.md").read_text()
    table = str(bnnet.mlp([784, 100, 100, 100, 10], activation="sigmoid", init="xavier", seed=0).summary())
    assert f"```text\n{table}\n```" in page
