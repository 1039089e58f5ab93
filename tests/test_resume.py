"""Exact resume: a run continued from any checkpoint ends bitwise equal to an uninterrupted run."""

import numpy as np
import pytest

import bnnet
from bnnet import optim


def _setup(seed_init=0):
    model = bnnet.mlp([10, 12, 9, 4], activation="sigmoid", seed=seed_init)
    opt = optim.Adam(0.01, weight_decay=1e-3, schedule=optim.ExponentialDecay(0.5, 20))
    return model, opt


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(42)
    X = rng.standard_normal((101, 10)).astype(np.float32)  # 101 = 6 batches of 16 + 5: epochs do not align
    y = rng.integers(0, 4, 101)
    return X, y, X[:30], y[:30]


def _fit(model, opt, data, **kw):
    X, y, Xv, yv = data
    return bnnet.fit(
        model, X, y, optimizer=opt, epochs=4, batch_size=16, seed=7, validation_data=(Xv, yv), progress=False, **kw
    )


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ck")
    model, opt = _setup()
    history = _fit(model, opt, data, checkpoint=str(folder / "ck-{step}.safetensors"), checkpoint_every=5)
    return model, opt, history, folder


@pytest.mark.parametrize("step", [5, 10, 15, 25])  # mid-epoch; epoch boundaries below
def test_resume_is_bitwise_exact(data, uninterrupted, step):
    ref_model, ref_opt, ref_history, folder = uninterrupted
    model, opt = _setup(seed_init=123)  # different initial weights: all of them must come from the checkpoint
    history = _fit(model, opt, data, resume=str(folder / f"ck-{step}.safetensors"))
    assert history == ref_history
    for k in ref_model.params:
        np.testing.assert_array_equal(model.params[k], ref_model.params[k])
    for k in ref_model.buffers:
        np.testing.assert_array_equal(model.buffers[k], ref_model.buffers[k])
    assert opt.t == ref_opt.t == 28 and opt.current_lr() == ref_opt.current_lr()


def test_resume_at_an_epoch_boundary(data, tmp_path):
    ref, ref_opt = _setup()
    _fit(ref, ref_opt, data)
    m1, o1 = _setup()
    _fit(m1, o1, data, checkpoint=str(tmp_path / "ck-{step}.safetensors"), checkpoint_every=7)  # 7, 14, 21 = 3 epochs
    model, opt = _setup(seed_init=5)
    _fit(model, opt, data, resume=str(tmp_path / "ck-21.safetensors"))
    for k in ref.params:
        np.testing.assert_array_equal(model.params[k], ref.params[k])


def test_resume_with_other_settings_is_refused(data, uninterrupted):
    folder = uninterrupted[3]
    model, opt = _setup()
    X, y, _, _ = data
    with pytest.raises(bnnet.CheckpointError, match="resume with the same epochs, batch_size, seed"):
        bnnet.fit(
            model,
            X,
            y,
            optimizer=opt,
            epochs=5,
            batch_size=16,
            seed=7,
            progress=False,
            resume=str(folder / "ck-5.safetensors"),
        )
    other = bnnet.mlp([10, 12, 4], seed=0)
    with pytest.raises(bnnet.CheckpointError, match="does not match the model"):
        _fit(other, optim.Adam(0.01), data, resume=str(folder / "ck-5.safetensors"))
    with pytest.raises(bnnet.CheckpointError, match="holds Adam state; this run trains with SGD"):
        _fit(_setup()[0], optim.SGD(0.1), data, resume=str(folder / "ck-5.safetensors"))


def test_plain_checkpoint_cannot_be_resumed(data, tmp_path):
    model, opt = _setup()
    bnnet.save(tmp_path / "m.safetensors", model, opt)
    with pytest.raises(bnnet.CheckpointError, match="holds no training state to resume"):
        _fit(model, opt, data, resume=tmp_path / "m.safetensors")
    with pytest.raises(bnnet.HyperparameterError, match="checkpoint_every needs checkpoint=PATH"):
        _fit(model, opt, data, checkpoint_every=3)
