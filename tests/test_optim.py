"""Optimizers: update rules, lazy state, weight decay, schedules, state round trip, errors."""

import numpy as np
import pytest

import bnnet
from bnnet import optim


def _model_with_grads(rng):
    model = bnnet.mlp([4, 3, 2], seed=0, dtype="float64")
    model.forward(rng.standard_normal((6, 4)), train=True)
    model.backward(rng.standard_normal((6, 2)))
    return model


def test_rules_by_hand(rng):
    """Two updates of each rule against the formulas written out here."""
    for opt in [
        optim.SGD(0.1),
        optim.Momentum(0.1, beta=0.8),
        optim.RMSprop(0.01, beta=0.9, eps=1e-6),
        optim.Adam(0.01, beta1=0.8, beta2=0.95, eps=1e-6),
    ]:
        model = _model_with_grads(rng)
        p0 = {k: v.copy() for k, v in model.params.items()}
        g = {k: v.copy() for k, v in model.grads.items()}
        opt.step(model)
        opt.step(model)  # same gradients twice
        for k in p0:
            if isinstance(opt, optim.SGD):
                expected = p0[k] - 2 * 0.1 * g[k]
            elif isinstance(opt, optim.Momentum):
                v1 = 0.2 * g[k]
                v2 = 0.8 * v1 + 0.2 * g[k]
                expected = p0[k] - 0.1 * (v1 + v2)
            elif isinstance(opt, optim.RMSprop):
                s1 = 0.1 * g[k] ** 2
                s2 = 0.9 * s1 + 0.1 * g[k] ** 2
                expected = p0[k] - 0.01 * g[k] / (np.sqrt(s1) + 1e-6) - 0.01 * g[k] / (np.sqrt(s2) + 1e-6)
            else:
                m1, v1 = 0.2 * g[k], 0.05 * g[k] ** 2
                m2, v2 = 0.8 * m1 + 0.2 * g[k], 0.95 * v1 + 0.05 * g[k] ** 2
                step1 = (m1 / 0.2) / (np.sqrt(v1 / 0.05) + 1e-6)
                step2 = (m2 / (1 - 0.8**2)) / (np.sqrt(v2 / (1 - 0.95**2)) + 1e-6)
                expected = p0[k] - 0.01 * (step1 + step2)
            np.testing.assert_allclose(model.params[k], expected, rtol=1e-12, atol=1e-14, err_msg=f"{opt} {k}")
        assert opt.t == 2


def test_state_is_lazy_and_per_parameter(rng):
    model = _model_with_grads(rng)
    opt = optim.Adam(1e-3)
    assert opt.state == {}
    opt.step(model)
    assert set(opt.state) == set(model.params)
    assert set(opt.state["0.W"]) == {"m", "v", "k"}


def test_weight_decay_skips_gamma_beta_and_biases(rng):
    model = _model_with_grads(rng)
    for g in model.grads.values():
        g[...] = 0.0  # only the decay term moves parameters
    p0 = {k: v.copy() for k, v in model.params.items()}
    optim.SGD(0.1, weight_decay=0.5).step(model)
    for k in model.params:
        if k.endswith(".W"):
            np.testing.assert_allclose(model.params[k], p0[k] * (1 - 0.05), rtol=1e-12)
        else:
            np.testing.assert_array_equal(model.params[k], p0[k])


def test_schedules():
    assert optim.StepDecay(10, gamma=0.5)(25) == 0.25
    assert optim.ExponentialDecay(0.5, decay_steps=4)(8) == pytest.approx(0.25)
    assert optim.InverseTimeDecay(1.0, decay_steps=2)(4) == pytest.approx(1 / 3)
    opt = optim.SGD(1.0, schedule=optim.StepDecay(1, gamma=0.5))
    model = bnnet.mlp([2, 2], batchnorm=False, seed=0, dtype="float64")
    model.forward(np.ones((2, 2)), True)
    model.backward(np.ones((2, 2)))
    lrs = []
    for _ in range(3):
        lrs.append(opt.current_lr())
        opt.step(model)
    assert lrs == [1.0, 0.5, 0.25]


def test_state_round_trip_continues_identically(rng):
    X, y = rng.standard_normal((32, 4)), rng.integers(0, 2, 32)
    loss = bnnet.losses.SoftmaxCrossEntropy()

    def steps(model, opt, n):
        for i in range(n):
            loss.forward(model.forward(X[i * 8 : (i + 1) * 8], True), y[i * 8 : (i + 1) * 8])
            model.backward(loss.backward())
            opt.step(model)

    a = bnnet.mlp([4, 3, 2], seed=0, dtype="float64")
    opt_a = optim.Adam(0.01, schedule=optim.ExponentialDecay(0.5, 3))
    steps(a, opt_a, 2)
    arrays, info = opt_a.state_dict()
    b = bnnet.mlp([4, 3, 2], seed=0, dtype="float64")
    for k in a.params:
        b.params[k] = a.params[k]
    for k in a.buffers:
        b.buffers[k] = a.buffers[k]
    opt_b = optim.optimizer_from_info(info)
    opt_b.load_state_dict({k: v.copy() for k, v in arrays.items()}, info)
    assert opt_b.t == 2 and repr(opt_b) == repr(opt_a)
    X = X[16:]
    y = y[16:]
    steps(a, opt_a, 2)
    steps(b, opt_b, 2)
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k])


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: optim.SGD(0), r"SGD: lr must be in \(0"),
        (lambda: optim.SGD(-1e-3), r"lr must be in \(0"),
        (lambda: optim.Adam(1e-3, beta1=1.0), r"Adam: beta1 must be in \[0, 1\)"),
        (lambda: optim.Adam(1e-3, beta2=-0.1), r"beta2 must be in \[0, 1\)"),
        (lambda: optim.RMSprop(1e-3, eps=0), r"RMSprop: eps must be in \(0"),
        (lambda: optim.Momentum(0.1, beta=1.2), r"Momentum: beta must be in \[0, 1\)"),
        (lambda: optim.SGD(0.1, weight_decay=-1), "weight_decay must be in"),
        (lambda: optim.SGD(float("nan")), "lr must be a finite real number"),
        (lambda: optim.SGD("0.1"), "lr must be a finite real number"),
        (lambda: optim.get_optimizer("adagrad"), "optimizer must be an Optimizer or one of"),
        (lambda: optim.SGD(0.1, schedule=lambda t: 1.0), "schedule must be None or a bnnet.optim Schedule"),
    ],
)
def test_hyperparameter_errors(make, match):
    with pytest.raises(bnnet.HyperparameterError, match=match):
        make()


def test_step_without_backward_is_an_error():
    with pytest.raises(bnnet.InputError, match="no gradient for '0.W'; run model.backward"):
        optim.SGD(0.1).step(bnnet.mlp([2, 2, 2]))


def test_cosine_and_warmup_schedules_match_torch():
    torch = pytest.importorskip("torch")
    from bnnet.optim import CosineDecay, Warmup, schedule_from_config

    def torch_rates(make, n, lr=0.1):
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([p], lr=lr)
        sched = make(opt)
        rates = []
        for _ in range(n):
            rates.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return rates

    cosine = optim.SGD(0.1, schedule=CosineDecay(10, final=0.05))
    ours = [cosine.lr * cosine.schedule(t) for t in range(15)]
    ref = torch_rates(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10, eta_min=0.005), 11)
    np.testing.assert_allclose(ours[:11], ref, rtol=1e-12)
    assert ours[10:] == [pytest.approx(0.005, rel=1e-12)] * 5  # flat after `steps`
    warm = Warmup(4)
    ref = torch_rates(lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=0.25, total_iters=3), 8)
    np.testing.assert_allclose([0.1 * warm(t) for t in range(8)], ref, rtol=1e-12)
    both = Warmup(3, then=CosineDecay(6))
    assert [both(t) for t in range(3)] == [1 / 3, 2 / 3, 1.0] and both(3) == 1.0 and both(9) == 0.0
    again = schedule_from_config(both.config())
    assert [again(t) for t in range(12)] == [both(t) for t in range(12)]
    with pytest.raises(bnnet.HyperparameterError, match="then must be"):
        Warmup(3, then="cosine")
