"""Callbacks: EarlyStopping stops where its rule says, restores the best epoch's weights and resumes
bitwise; ReduceLROnPlateau lowers the rate exactly when the monitored value stalls; ModelCheckpoint."""

import numpy as np
import pytest

import bnnet
from bnnet import optim
from bnnet.callbacks import Callback, EarlyStopping, ModelCheckpoint, ReduceLROnPlateau
from bnnet.errors import CheckpointError, HyperparameterError


@pytest.fixture(scope="module")
def data():
    # few noisy rows and a wide net: the validation loss turns up after a few epochs
    rng = np.random.default_rng(3)
    X = rng.standard_normal((120, 8))
    y = (X[:, 0] + 1.5 * rng.standard_normal(120) > 0).astype(np.int64)
    return X, y


def _setup(seed=0):
    return bnnet.mlp([8, 64, 64, 2], dtype="float64", seed=seed), optim.Adam(0.02)


def _fit(model, opt, data, callbacks, **kw):
    X, y = data
    kw = {"epochs": 30, "batch_size": 16, "seed": 1, "validation_split": 0.25, "progress": False} | kw
    return bnnet.fit(model, X, y, optimizer=opt, callbacks=callbacks, **kw)


def _expected_stop(values, patience, min_delta=0.0):
    """(best epoch, stop epoch or None) of the early-stopping rule replayed on a list of values (min mode)."""
    best, best_epoch, wait = None, 0, 0
    for epoch, v in enumerate(values, 1):
        if best is None or v < best - min_delta:
            best, best_epoch, wait = v, epoch, 0
            continue
        wait += 1
        if wait >= patience:
            return best_epoch, epoch
    return best_epoch, None


def _state(model):
    return {f"{k}/{n}": np.array(a) for k in ("params", "buffers") for n, a in getattr(model, k).items()}


@pytest.fixture(scope="module")
def stopped(data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("es")
    model, opt = _setup()
    es = EarlyStopping(patience=3, restore_best_weights=True)
    saver = ModelCheckpoint(str(folder / "epoch-{epoch}.safetensors"))
    history = _fit(
        model, opt, data, [es, saver], checkpoint=str(folder / "step-{step}.safetensors"), checkpoint_every=4
    )
    return model, opt, es, history, folder


def test_early_stopping_stops_where_the_rule_says(stopped):
    model, _, es, history, _ = stopped
    best_epoch, stop = _expected_stop(history["val_loss"], 3)
    assert stop is not None and stop < 30, history["val_loss"]  # it did stop early
    assert history["epoch"] == list(range(1, stop + 1))
    assert (es.best_epoch, es.stopped_epoch) == (best_epoch, stop)
    assert es.best == min(history["val_loss"])


def test_restored_weights_are_those_saved_at_the_best_epoch(stopped):
    model, _, es, _, folder = stopped
    best = bnnet.load(str(folder / f"epoch-{es.best_epoch}.safetensors"))
    last = bnnet.load(str(folder / f"epoch-{es.stopped_epoch}.safetensors"))
    for key, value in _state(best).items():
        np.testing.assert_array_equal(_state(model)[key], value)
    assert any(not np.array_equal(_state(last)[k], v) for k, v in _state(best).items())


@pytest.mark.parametrize("step", [4, 12, 20])
def test_a_resumed_run_stops_at_the_same_epoch_bitwise(data, stopped, step):
    ref_model, ref_opt, ref_es, ref_history, folder = stopped
    model, opt = _setup(seed=9)
    es = EarlyStopping(patience=3, restore_best_weights=True)
    history = _fit(model, opt, data, [es, ModelCheckpoint(str(folder / "again-{epoch}.safetensors"))],
                   resume=str(folder / f"step-{step}.safetensors"))  # fmt: skip
    assert history == ref_history
    assert (es.best_epoch, es.stopped_epoch, es.best) == (ref_es.best_epoch, ref_es.stopped_epoch, ref_es.best)
    for key, value in _state(ref_model).items():
        np.testing.assert_array_equal(_state(model)[key], value)
    assert opt.t == ref_opt.t


def test_resuming_a_finished_early_stopped_run_trains_no_further(data, stopped, tmp_path):
    ref_model, ref_opt, _, ref_history, folder = stopped
    steps = ref_opt.t
    model, opt = _setup(seed=4)
    history = _fit(model, opt, data, [EarlyStopping(patience=3, restore_best_weights=True),
                                      ModelCheckpoint(str(tmp_path / "x-{epoch}.safetensors"))],
                   resume=str(folder / f"step-{steps}.safetensors"))  # fmt: skip
    assert history == ref_history and opt.t == steps


def test_resume_with_other_callbacks_is_refused(data, stopped):
    folder = stopped[4]
    model, opt = _setup()
    with pytest.raises(CheckpointError, match="same callbacks"):
        _fit(model, opt, data, [EarlyStopping(patience=3)], resume=str(folder / "step-4.safetensors"))


class Recorder(Callback):
    def on_train_begin(self):
        self.logs = []

    def on_epoch_end(self, epoch, logs):
        self.logs.append((epoch, dict(logs)))


def test_reduce_lr_on_plateau_lowers_the_rate_when_the_value_stalls(data):
    model, opt = _setup()
    rec = Recorder()
    _fit(model, opt, data, [ReduceLROnPlateau(factor=0.5, patience=2, min_delta=0.0), rec], epochs=14)
    # replay the rule on the logged values: the lr each epoch trained with
    lr, best, wait, expected = 0.02, None, 0, []
    for _, logs in rec.logs:
        expected.append(lr)
        v = logs["val_loss"]
        if best is None or v < best:
            best, wait = v, 0
            continue
        wait += 1
        if wait >= 2:
            lr, wait = lr * 0.5, 0
    assert [logs["lr"] for _, logs in rec.logs] == expected
    assert expected[-1] < 0.02  # it did lower the rate
    assert opt.lr == lr


def test_reduce_lr_cooldown_and_min_lr():
    class Opt:
        lr = 1.0

    cb = ReduceLROnPlateau(monitor="loss", factor=0.1, patience=0, cooldown=2, min_lr=0.005)
    cb.training = bnnet.callbacks.Training(None, Opt(), {})
    lrs = []
    for epoch in range(1, 8):
        cb.on_epoch_end(epoch, {"loss": 1.0})  # never improves after the first
        lrs.append(cb.training.optimizer.lr)
    # epoch 1 sets best; 2 reduces; 3, 4 cool down; 5 reduces; 6, 7 cool down (then min_lr would hold)
    np.testing.assert_allclose(lrs, [1.0, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01])
    cb.on_epoch_end(8, {"loss": 1.0})
    assert cb.training.optimizer.lr == 0.005


def test_reduce_lr_state_resumes(data, tmp_path):
    model, opt = _setup()
    cb = ReduceLROnPlateau(factor=0.5, patience=1)
    ref = _fit(model, opt, data, [cb], epochs=8, checkpoint=str(tmp_path / "s-{step}.safetensors"), checkpoint_every=6)
    m2, o2 = _setup(seed=5)
    cb2 = ReduceLROnPlateau(factor=0.5, patience=1)
    again = _fit(m2, o2, data, [cb2], epochs=8, resume=str(tmp_path / "s-30.safetensors"))
    assert again == ref and o2.lr == opt.lr < 0.02
    for k, v in model.params.items():
        np.testing.assert_array_equal(m2.params[k], v)


def test_model_checkpoint_save_best_only(data, tmp_path):
    model, opt = _setup()
    rec = Recorder()
    _fit(model, opt, data, [ModelCheckpoint(str(tmp_path / "best-{epoch}.safetensors"), save_best_only=True), rec],
         epochs=8)  # fmt: skip
    values = [logs["val_loss"] for _, logs in rec.logs]
    improved = [e for e, v in enumerate(values, 1) if v < min(values[: e - 1], default=np.inf)]
    saved = sorted(int(p.stem.split("-")[1]) for p in tmp_path.glob("best-*.safetensors"))
    assert saved == improved
    meta = bnnet.load(str(tmp_path / f"best-{improved[-1]}.safetensors")).metadata
    assert meta["epoch"] == improved[-1] and meta["logs"]["val_loss"] == values[improved[-1] - 1]


def test_a_callback_can_stop_the_run(data):
    class StopAtTwo(Callback):
        def on_epoch_end(self, epoch, logs):
            self.training.stop = epoch == 2

    model, opt = _setup()
    history = _fit(model, opt, data, [StopAtTwo()])
    assert history["epoch"] == [1, 2]


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: EarlyStopping(monitor="val_los"), "monitor must be one of"),
        (lambda: EarlyStopping(patience=-1), "patience"),
        (lambda: EarlyStopping(mode="up"), "mode"),
        (lambda: EarlyStopping(restore_best_weights=1), "restore_best_weights"),
        (lambda: ReduceLROnPlateau(factor=1.5), "factor"),
        (lambda: ModelCheckpoint(""), "path"),
    ],
)
def test_bad_callback_arguments(make, match):
    with pytest.raises(HyperparameterError, match=match):
        make()


def test_fit_refuses_what_the_callbacks_cannot_watch(data):
    X, y = data
    model, opt = _setup()
    with pytest.raises(HyperparameterError, match="needs validation data"):
        bnnet.fit(model, X, y, callbacks=[EarlyStopping()], progress=False)
    with pytest.raises(HyperparameterError, match="callbacks must be a list"):
        bnnet.fit(model, X, y, callbacks=EarlyStopping(monitor="loss"), progress=False)
    with pytest.raises(HyperparameterError, match=r"callbacks\[1\]"):
        bnnet.fit(model, X, y, callbacks=[EarlyStopping(monitor="loss"), print], progress=False)
    with pytest.raises(HyperparameterError, match="no accuracy"):
        bnnet.fit(model, X, X[:, :2], loss="mse", callbacks=[EarlyStopping(monitor="accuracy")], progress=False)
