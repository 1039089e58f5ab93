"""Optimizers: one update rule each, applied to every parameter (W, b, gamma, beta).

    opt = Adam(lr=1e-3)
    opt.step(model)        # reads model.params / model.grads, updates params in place

The base class loops over parameters; each rule is a few lines. State (velocity,
squared averages, ...) belongs to the optimizer, is created lazily the first
time a parameter is updated, and is keyed by the parameter's dotted name.
"""

import math
import weakref

import numpy as np

from . import backend
from ._checks import check_int, check_number, describe
from .device import contiguous, writable, zeros
from .errors import CheckpointError, HyperparameterError, InputError

# --------------------------------------------------------------------------
# Learning-rate schedules: a factor that multiplies the base lr after t updates.
# --------------------------------------------------------------------------


class Schedule:
    def __call__(self, t):
        raise NotImplementedError

    def config(self):
        return {"type": type(self).__name__, **vars(self)}


class StepDecay(Schedule):
    """lr_t = lr * gamma ** floor(t / step_size)."""

    def __init__(self, step_size, gamma=0.1):
        self.step_size = check_int("StepDecay", "step_size", step_size, low=1)
        self.gamma = check_number("StepDecay", "gamma", gamma, low=0, low_open=True)

    def __call__(self, t):
        return self.gamma ** (t // self.step_size)


class ExponentialDecay(Schedule):
    """lr_t = lr * decay_rate ** (t / decay_steps)   (the lecture's 0.95^epoch when decay_steps = steps per epoch)."""

    def __init__(self, decay_rate, decay_steps=1):
        self.decay_rate = check_number("ExponentialDecay", "decay_rate", decay_rate, low=0, high=1, low_open=True)
        self.decay_steps = check_int("ExponentialDecay", "decay_steps", decay_steps, low=1)

    def __call__(self, t):
        return self.decay_rate ** (t / self.decay_steps)


class InverseTimeDecay(Schedule):
    """lr_t = lr / (1 + decay_rate * t / decay_steps)   (the lecture's alpha0 / (1 + decay_rate * epoch))."""

    def __init__(self, decay_rate, decay_steps=1):
        self.decay_rate = check_number("InverseTimeDecay", "decay_rate", decay_rate, low=0)
        self.decay_steps = check_int("InverseTimeDecay", "decay_steps", decay_steps, low=1)

    def __call__(self, t):
        return 1.0 / (1.0 + self.decay_rate * t / self.decay_steps)


class CosineDecay(Schedule):
    """lr_t = lr * (final + (1 - final) * (1 + cos(pi * min(t, steps) / steps)) / 2): from lr down to
    lr * final over `steps` updates, then flat (torch's CosineAnnealingLR with eta_min = lr * final)."""

    def __init__(self, steps, final=0.0):
        self.steps = check_int("CosineDecay", "steps", steps, low=1)
        self.final = check_number("CosineDecay", "final", final, low=0, high=1)

    def __call__(self, t):
        return self.final + (1.0 - self.final) * (1.0 + math.cos(math.pi * min(t, self.steps) / self.steps)) / 2.0


class Warmup(Schedule):
    """A linear warm-up: lr_t = lr * (t + 1) / steps for the first `steps` updates, then `then`'s factor
    (counted from the end of the warm-up; default None: lr). Warmup(steps) equals torch's
    LinearLR(start_factor=1/steps, total_iters=steps-1)."""

    def __init__(self, steps, then=None):
        self.steps = check_int("Warmup", "steps", steps, low=1)
        if then is not None and not isinstance(then, Schedule):
            raise HyperparameterError(f"Warmup: then must be None or a Schedule, got {then!r}")
        self.then = then

    def __call__(self, t):
        if t < self.steps:
            return (t + 1) / self.steps
        return 1.0 if self.then is None else self.then(t - self.steps)

    def config(self):
        return {"type": "Warmup", "steps": self.steps, "then": None if self.then is None else self.then.config()}


SCHEDULES = {cls.__name__: cls for cls in (StepDecay, ExponentialDecay, InverseTimeDecay, CosineDecay, Warmup)}


def schedule_from_config(cfg):
    """A Schedule from its config() ({"type": name, **arguments}), or None."""
    if cfg is None:
        return None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("type"), str) or cfg["type"] not in SCHEDULES:
        raise HyperparameterError(
            f"schedule config must be {{'type': one of {', '.join(SCHEDULES)}, ...}}, got {cfg!r}"
        )
    cfg = dict(cfg)
    if "then" in cfg:  # (Warmup: the schedule after it, as a config of its own)
        cfg["then"] = schedule_from_config(cfg["then"])
    return SCHEDULES[cfg.pop("type")](**cfg)


# --------------------------------------------------------------------------
# Optimizers
# --------------------------------------------------------------------------


def _flat(a):
    return a.reshape(-1)  # a view: parameters, gradients and state are checked C-contiguous first


def _trainable(layout):
    """The dotted names of the parameters in `layout` that are not frozen, in layout order."""
    return [name for g in layout.groups for name, layer, key, *_ in g.entries if key not in layer.frozen_params]


class Optimizer:
    """Base class: loops over the parameters; a subclass's `_update` applies its rule to one.

    Args:
        lr: base learning rate, > 0.
        weight_decay: L2 coefficient (default 0): adds weight_decay * p to the
            gradient of each parameter whose own name is in `decay_names`.
        decay_names: parameter names that get weight decay (default ("W",): not
            gamma, beta or biases, which set scale and offset, not capacity).
        schedule: None or a Schedule; the lr used at update t (t = 0, 1, ...) is lr * schedule(t).

    The rules themselves are the functions of bnnet.optim_rules, run by the
    active backend (one compiled pass per parameter with the numba backend)
    after `_checked` has verified every array.
    State (velocity, squared averages, ...) is created lazily, shaped like the
    parameter, and keyed by the parameter's dotted name.
    """

    state_names = ()  # the rule's per-parameter arrays
    counter_names = ()  # the rule's per-parameter integer counters
    _flat = _runs = _count = None  # caches of the flat path (see _step_flat)
    _layer = None  # a weak reference to the single layer this optimizer steps (see _check_layer)
    decoupled = False  # weight decay as L2 in the gradient (False) or as a shrink of p before the rule (AdamW)

    def __init__(self, lr, weight_decay=0.0, decay_names=("W",), schedule=None):
        owner = type(self).__name__
        self.lr = check_number(owner, "lr", lr, low=0, low_open=True)
        self.weight_decay = check_number(owner, "weight_decay", weight_decay, low=0)
        if not isinstance(decay_names, (list, tuple)) or not all(isinstance(n, str) for n in decay_names):
            raise HyperparameterError(
                f"{owner}: decay_names must be a sequence of parameter names like ('W',), got {decay_names!r}"
            )
        self.decay_names = tuple(decay_names)
        if schedule is not None and not isinstance(schedule, Schedule):
            raise HyperparameterError(f"{owner}: schedule must be None or a bnnet.optim Schedule, got {schedule!r}")
        self.schedule = schedule
        self.t = 0  # updates applied so far
        self.state = {}  # dotted param name -> {state name: array}
        self._flat = None  # (layout, flat state arrays per group, views): see _flat_state
        self._runs = self._count = None

    def current_lr(self):
        return self.lr * (self.schedule(self.t) if self.schedule is not None else 1.0)

    def step(self, model):
        """Apply one update to every parameter of `model` (a Sequential or a layer) from its current grads.

        Every parameter, gradient and state array is checked first, so a bad one
        leaves all parameters as they were. A Sequential whose gradients all sit in its flat
        buffers (bnnet.flat) is updated in one call of the rule per dtype and weight-decay value,
        over the whole buffer; otherwise parameter by parameter. Both give the same numbers.
        """
        lr = self.current_lr()
        layout = model.flat_layout() if hasattr(model, "flat_layout") else None
        if layout is not None and self._step_flat(layout, lr):
            self.t += 1
            return
        if hasattr(model, "trainable_parameters"):
            triples = model.trainable_parameters()
        else:  # a single layer
            self._check_layer(model)
            triples = [(k, p, model.grads.get(k)) for k, p in model.params.items() if k not in model.frozen_params]
        work = [self._checked(name, p, g) for name, p, g in triples]
        counts = [self._next_count(name, state) for name, _, _, state in work]
        for (name, p, g, state), k in zip(work, counts):
            if k is not None:
                state["k"] = np.int64(k)
            arrays = {key: _flat(state[key]) for key in self.state_names}
            self._apply(_flat(p), _flat(g), arrays, lr, self._decay(name), k)
        self.t += 1

    def _check_layer(self, layer):
        """A single layer's parameters are keyed by their own names ('W', 'b'), so this optimizer's state
        must be that layer's: refuse (before any update) a second layer that would share it."""
        owner = self._layer() if self._layer is not None else None
        if owner is not None and owner is not layer and self.state:
            raise HyperparameterError(
                f"{type(self).__name__}.step: this optimizer already holds the state of another layer "
                f"({owner.name}), keyed by the same names ({', '.join(sorted(self.state))}); give each layer "
                "its own optimizer, or step the whole model (opt.step(model))"
            )
        self._layer = weakref.ref(layer)

    def _decay(self, name):
        """The weight-decay coefficient of parameter `name` (its own name in decay_names, else 0)."""
        return self.weight_decay if self.weight_decay and name.rsplit(".", 1)[-1] in self.decay_names else 0.0

    def _apply(self, p, g, state, lr, wd, k):
        """Weight decay, then the rule, over flat p, g and state arrays (views the caller checked).

        Weight decay lives here, once for every rule: L2 (decoupled=False) adds wd * p to the
        gradient the rule reads, in the rule's own pass over the data; decoupled (AdamW) shrinks
        p by (1 - lr * wd) before the rule runs without it.
        """
        if wd and self.decoupled:
            p *= 1.0 - lr * wd
            wd = 0.0
        self._rule(p, g, state, lr, wd, k)

    def _rule(self, p, g, state, lr, wd, k):
        """The update rule over flat arrays: the backend's compiled pass of bnnet.optim_rules (g + wd * p
        is the gradient it reads; k is the update count of rules that correct a bias, else None)."""
        raise NotImplementedError

    def _next_count(self, name, state):
        """The update count this step gives a parameter with `state` (rules with counter_names), else None."""
        if not self.counter_names:
            return None
        self._check_counters(name, state)
        return int(state.get("k", 0)) + 1

    # -- the flat path ------------------------------------------------------------

    def _step_flat(self, layout, lr):
        """One update over the model's flat buffers; False (nothing done) when the per-parameter path must
        run: a gradient is missing or not in its buffer, or the parameters' update counts differ."""
        if not all(group.grads_ready() for group in layout.groups):
            return False
        arrays = backend.array_types()
        for group in layout.groups:
            if not (isinstance(group.params, arrays) and group.params.dtype.char in "fd"):
                return False  # the per-parameter path says what is wrong
        names = _trainable(layout)
        states = self._flat_state(layout, names)
        k = self._common_count(names)
        if k is False:
            return False
        decay = (self.weight_decay, self.decay_names, names)
        runs = self._runs if self._runs is not None and self._runs[0] is layout and self._runs[1] == decay else None
        if runs is None:
            # frozen parameters: a run of value None, skipped
            by_name = {
                name: self._decay(name) if name in names else None for g in layout.groups for name, *_ in g.entries
            }
            runs = self._runs = (layout, decay, [group.runs(by_name) for group in layout.groups])
        for group, state, group_runs in zip(layout.groups, states, runs[2]):
            for start, stop, wd in group_runs:
                if wd is None:
                    continue
                sub = {key: a[start:stop] for key, a in state.items()}
                self._apply(group.params[start:stop], group.grads[start:stop], sub, lr, wd, k)
        if k is not None:
            count = self._count = np.int64(k)  # one object for every parameter (see _common_count)
            for name in names:
                self.state[name]["k"] = count
        return True

    def _common_count(self, names):
        """The update count this step gives every parameter (None for rules without one), or False when
        the parameters' counts differ. The counts this path wrote last are one shared object, so the
        common case is an identity test per parameter."""
        if not self.counter_names or not names:
            return None
        last = self._count
        if last is not None and all(self.state[name].get("k") is last for name in names):
            return int(last) + 1
        counts = {self._next_count(name, self.state[name]) for name in names}
        return counts.pop() if len(counts) == 1 else False

    def _flat_state(self, layout, names):
        """Per group, {state name: flat array} laid out like its parameters; self.state's entries are views
        into them (for the trainable parameters, `names`: a frozen one has no state). Kept while those
        views are still in self.state (identity per array); else laid out again, every existing state
        array checked (InputError) and its values copied in."""
        states = self.current_flat_state(layout, names)
        if states is not None:
            return states
        trainable = set(names)
        for group in layout.groups:  # check everything before anything changes
            for name, layer, pkey, *_ in group.entries:
                if name not in trainable:
                    continue
                for key in self.state_names:
                    a = self.state.get(name, {}).get(key)
                    if a is not None:  # (copied into the flat buffer: any layout will do)
                        self._check_state_array(name, key, a, layer.params[pkey], in_place=False)
                self._check_counters(name, self.state.get(name, {}))
        states, views = [], []
        for group in layout.groups:
            flat = {key: zeros(group.params, (group.size,), group.dtype) for key in self.state_names}
            for name, layer, pkey, start, stop in group.entries:
                if name not in trainable:
                    continue  # (its part of the flat state stays unused: a frozen parameter has no state)
                entry = self.state.setdefault(name, {})
                for key in self.state_names:
                    view = flat[key][start:stop].reshape(layer.params[pkey].shape)
                    if entry.get(key) is not None:
                        view[...] = entry[key]
                    entry[key] = view
                    views.append((name, key, view))
            states.append(flat)
        self._flat = (layout, states, views, names)
        return states

    def current_flat_state(self, layout, names=None):
        """The flat state arrays per group of `layout` while self.state's entries are still their views
        (an identity test per array) and the trainable parameters are still `names` (default: as now),
        else None."""
        cached = self._flat
        if (
            cached is not None
            and cached[0] is layout
            and cached[3] == (_trainable(layout) if names is None else names)
            and all(self.state.get(name, {}).get(key) is view for name, key, view in cached[2])
        ):
            return cached[1]
        return None

    def _check_state_array(self, name, key, a, p, in_place=True):
        """InputError unless state array `a` is like its parameter p: the same shape and dtype, and, where
        the rule updates it in place, C-contiguous and writable."""
        if (
            isinstance(a, backend.array_types())
            and a.shape == p.shape
            and a.dtype == p.dtype
            and (not in_place or (a.flags.c_contiguous and writable(a)))
        ):
            return
        need = "a writable C-contiguous" if in_place else "a"
        raise InputError(
            f"{type(self).__name__}.step: state[{name!r}][{key!r}] must be {need} {p.dtype} array of shape "
            f"{p.shape} like its parameter, got {describe(a)}"
        )

    def _check_counters(self, name, state):
        for key in self.counter_names:
            k = state.get(key)
            if k is not None and not (
                isinstance(k, (np.ndarray, np.integer)) and k.shape == () and k.dtype.kind in "iu"
            ):
                raise InputError(
                    f"{type(self).__name__}.step: state[{name!r}][{key!r}] must be an integer scalar array, "
                    f"got {describe(k)}"
                )

    def _checked(self, name, p, g):
        """(name, p, g, state) with g in p's dtype, or InputError naming the array that is wrong."""
        owner = type(self).__name__
        if g is None:
            raise InputError(f"{owner}.step: no gradient for {name!r}; run model.backward() first")
        arrays = backend.array_types()  # NumPy's, or the GPU's for the cuda backend
        if not (isinstance(p, arrays) and p.dtype.char in "fd" and p.flags.c_contiguous and writable(p)):
            raise InputError(
                f"{owner}.step: parameter {name!r} must be a writable C-contiguous float32/float64 "
                f"array, got {describe(p)}"
            )
        if not isinstance(g, arrays) or g.shape != p.shape:
            raise InputError(f"{owner}.step: the gradient of {name!r} has shape {np.shape(g)}, the parameter {p.shape}")
        if g.dtype != p.dtype or not g.flags.c_contiguous:
            g = contiguous(g, p.dtype)
        state = self.state.setdefault(name, {})
        for key in self.state_names:
            a = state.get(key)
            if a is None:
                a = state[key] = np.zeros_like(p)
            self._check_state_array(name, key, a, p)
        self._check_counters(name, state)
        return name, p, g, state

    # -- saving and restoring ------------------------------------------------

    def hyperparameters(self):
        return {
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "decay_names": list(self.decay_names),
            "schedule": self.schedule.config() if self.schedule is not None else None,
        }

    def state_dict(self):
        """(arrays, info): arrays keyed "<param>/<state>", info = {"type", "t", hyperparameters}."""
        arrays = {f"{name}/{k}": v for name, st in self.state.items() for k, v in st.items()}
        info = {"type": type(self).__name__, "t": self.t, **self.hyperparameters()}
        return arrays, info

    def load_state_dict(self, arrays, info):
        """Restore what state_dict() returned (hyperparameters stay those of this instance).

        Shapes are checked against the parameters at the next step().
        """
        if info.get("type") != type(self).__name__:
            raise CheckpointError(
                f"optimizer state is for {info.get('type')}, cannot load it into {type(self).__name__}"
            )
        self.t = int(info["t"])
        self.state = {}
        for key, value in arrays.items():
            name, _, k = key.rpartition("/")
            self.state.setdefault(name, {})[k] = np.array(value)

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_layer", None)  # (a weak reference does not pickle; the next single-layer step sets it)
        return state

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}({args})"


class SGD(Optimizer):
    """Plain gradient descent: p -= lr * g."""

    def _rule(self, p, g, state, lr, wd, k):
        backend.impl().sgd(p, g, lr, wd)


class Momentum(Optimizer):
    """Gradient descent with momentum, in the lecture's form:

        v = beta * v + (1 - beta) * g
        p -= lr * v

    v is an exponentially weighted average of gradients. PyTorch's SGD(momentum=beta)
    keeps u = beta * u + g instead, so u = v / (1 - beta): this optimizer equals
    torch.optim.SGD(lr = lr * (1 - beta), momentum = beta, dampening = 0).
    """

    state_names = ("v",)

    def __init__(self, lr, beta=0.9, **kwargs):
        super().__init__(lr, **kwargs)
        self.beta = check_number("Momentum", "beta", beta, low=0, high=1, high_open=True)

    def _rule(self, p, g, state, lr, wd, k):
        backend.impl().momentum(p, g, state["v"], lr, self.beta, wd)

    def hyperparameters(self):
        return {**super().hyperparameters(), "beta": self.beta}


class RMSprop(Optimizer):
    """s = beta * s + (1 - beta) * g^2;   p -= lr * g / (sqrt(s) + eps).

    Equals torch.optim.RMSprop(lr, alpha=beta, eps=eps) (eps outside the sqrt in both).
    """

    state_names = ("s",)

    def __init__(self, lr, beta=0.999, eps=1e-8, **kwargs):
        super().__init__(lr, **kwargs)
        self.beta = check_number("RMSprop", "beta", beta, low=0, high=1, high_open=True)
        self.eps = check_number("RMSprop", "eps", eps, low=0, low_open=True)

    def _rule(self, p, g, state, lr, wd, k):
        backend.impl().rmsprop(p, g, state["s"], lr, self.beta, self.eps, wd)

    def hyperparameters(self):
        return {**super().hyperparameters(), "beta": self.beta, "eps": self.eps}


class Adam(Optimizer):
    """Adam (Kingma & Ba 2014) with bias correction; k counts this parameter's updates:

        m = beta1 * m + (1 - beta1) * g              v = beta2 * v + (1 - beta2) * g^2
        m_hat = m / (1 - beta1^k)                    v_hat = v / (1 - beta2^k)
        p -= lr * m_hat / (sqrt(v_hat) + eps)

    Equals torch.optim.Adam(lr, betas=(beta1, beta2), eps=eps) up to rounding.
    """

    state_names = ("m", "v")
    counter_names = ("k",)

    def __init__(self, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, **kwargs):
        super().__init__(lr, **kwargs)
        self.beta1 = check_number("Adam", "beta1", beta1, low=0, high=1, high_open=True)
        self.beta2 = check_number("Adam", "beta2", beta2, low=0, high=1, high_open=True)
        self.eps = check_number("Adam", "eps", eps, low=0, low_open=True)

    def _rule(self, p, g, state, lr, wd, k):
        b1, b2 = self.beta1, self.beta2
        backend.impl().adam(p, g, state["m"], state["v"], lr, b1, b2, self.eps, 1 - b1**k, 1 - b2**k, wd)

    def hyperparameters(self):
        return {**super().hyperparameters(), "beta1": self.beta1, "beta2": self.beta2, "eps": self.eps}


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter 2019): before Adam's update,

        p *= 1 - lr * weight_decay

    instead of adding weight_decay * p to the gradient (which Adam would then rescale).
    Equals torch.optim.AdamW(lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay) on the
    parameters named in decay_names (default ("W",); torch decays every parameter of its group).

    Args: as Adam; weight_decay defaults to 0.01, as PyTorch's.
    """

    decoupled = True

    def __init__(self, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, **kwargs):
        super().__init__(lr, beta1, beta2, eps, weight_decay=weight_decay, **kwargs)


def clip_grad_norm(model, max_norm):
    """Scale all gradients of `model` in place so that their global L2 norm is at most max_norm.

    norm = sqrt(sum over parameters of sum(g^2)); if norm > max_norm every g is
    multiplied by max_norm / norm (as torch.nn.utils.clip_grad_norm_). Returns
    the norm before clipping (inf or nan if a gradient is not finite; then
    nothing is scaled).
    """
    max_norm = check_number("clip_grad_norm", "max_norm", max_norm, low=0, low_open=True)
    params = model.trainable_parameters() if hasattr(model, "trainable_parameters") else model.named_parameters()
    grads = [g for _, _, g in params if g is not None]  # (a frozen parameter's gradient is not an update)
    norm = float(np.sqrt(sum(float(np.square(g, dtype=np.float64).sum()) for g in grads)))
    if np.isfinite(norm) and norm > max_norm:
        for g in grads:
            g *= max_norm / norm
    return norm


OPTIMIZERS = {"sgd": SGD, "momentum": Momentum, "rmsprop": RMSprop, "adam": Adam, "adamw": AdamW}


def get_optimizer(optimizer, lr=None):
    """An Optimizer from an instance, or from a name in OPTIMIZERS with learning rate lr (default per rule)."""
    if isinstance(optimizer, Optimizer):
        return optimizer
    if optimizer not in OPTIMIZERS:
        raise HyperparameterError(f"optimizer must be an Optimizer or one of {sorted(OPTIMIZERS)}, got {optimizer!r}")
    default_lr = {"sgd": 0.1, "momentum": 0.1, "rmsprop": 1e-3, "adam": 1e-3, "adamw": 1e-3}[optimizer]
    return OPTIMIZERS[optimizer](default_lr if lr is None else lr)


def optimizer_from_info(info):
    """Rebuild an optimizer from the `info` of state_dict() (hyperparameters and type)."""
    info = dict(info)
    cls = {c.__name__: c for c in OPTIMIZERS.values()}.get(info.pop("type", None))
    if cls is None:
        raise CheckpointError(f"unknown optimizer type in checkpoint: {info!r}")
    info.pop("t", None)
    schedule = schedule_from_config(info.pop("schedule", None))
    info["decay_names"] = tuple(info.get("decay_names", ("W",)))
    return cls(schedule=schedule, **info)
