"""Layers: small classes that own parameters and call the math in `bnnet.functional`.

A layer has
    params  : dict name -> array, the trained parameters (W, b, gamma, beta);
    grads   : dict with the same keys, filled by backward();
    buffers : dict name -> array, state that is not trained (running statistics);
    forward(x, train) -> y     train: bool, passed explicitly on every call;
    backward(dy) -> dx         uses what the last forward cached.

The public forward/backward validate their input and call _forward/_backward,
which Sequential calls directly for the layers inside a model (their input
was produced by the layer before). Inside a Sequential, a layer whose output
stays inside the model writes it into a buffer reused from step to step
(`reuse_buffers`), so a training step allocates nothing large.
"""
import warnings

import numpy as np

from . import backend
from . import functional as F
from ._checks import as_float_array, check_2d, check_choice, check_dtype, check_int, check_number
from .errors import HyperparameterError, InputError


class Layer:
    """Base class: holds the three dicts and a display name set by Sequential."""

    reuse_buffers = False  # Sequential sets it for layers whose output stays inside the model
    grad_pool = None  # Sequential sets it: [one flat array] that every layer's dx is written into
    overwrite_input = False  # Sequential sets it when the input is an internal buffer backward may reuse

    def __init__(self):
        self.params = {}
        self.grads = {}
        self.buffers = {}
        self.name = type(self).__name__
        self._cache = None
        self._scratch_arrays = {}

    def forward(self, x, train):
        """y = layer(x). train: True for training behaviour (batch statistics), False for eval."""
        return self._forward(self._input(x, getattr(self, "in_features", getattr(self, "num_features", None))), train)

    def backward(self, dy, input_grad=True):
        """dL/dx from dL/dy of the last forward; fills `grads`. input_grad=False may skip dx (returns None)."""
        out_shape = self._cached_output_shape()
        dtype = getattr(self, "dtype", None)
        dy = np.asarray(dy) if dtype is None else np.asarray(dy, dtype=dtype)
        if dy.shape != out_shape:
            raise InputError(f"{self.name}: dy must have the shape of the last output {out_shape}, got {dy.shape}")
        return self._backward(dy, input_grad)

    def _forward(self, x, train):
        raise NotImplementedError

    def _backward(self, dy, input_grad):
        raise NotImplementedError

    def _cached_output_shape(self):
        return self._cached_input().shape

    def config(self):
        """Constructor arguments, JSON-serializable: what a checkpoint needs to rebuild the layer."""
        return {}

    def _input(self, x, features=None):
        # Layers with a dtype cast their input to it (no copy when it already matches);
        # dtype-free layers (activations) keep float32/float64 and compute in float64 otherwise.
        x = np.asarray(x)
        dtype = getattr(self, "dtype", None) or (x.dtype.name if x.dtype.name in ("float32", "float64") else "float64")
        x = as_float_array(x, "x", self.name, dtype)
        check_2d(x, "x", self.name, features)
        return x

    def _cached(self):
        if self._cache is None:
            raise RuntimeError(f"{self.name}: backward() called before forward(); run forward(x, train) first")
        return self._cache

    def _cached_input(self):
        cache = self._cached()
        return cache if isinstance(cache, np.ndarray) else cache[1]

    def _scratch(self, key, shape, dtype, reuse=None):
        """An output array: a buffer kept across calls when reusing, else a new one."""
        if not (self.reuse_buffers if reuse is None else reuse):
            return np.empty(shape, dtype)
        buf = self._scratch_arrays.get(key)
        if buf is None or buf.shape != shape or buf.dtype != dtype:
            buf = self._scratch_arrays[key] = np.empty(shape, dtype)
        return buf

    def _dx_buffer(self, shape, dtype):
        """Where dL/dx goes: a view of the model's shared gradient pool (each dx is consumed
        by the layer below before the next one is written), else a buffer of our own."""
        if self.grad_pool is None:
            return self._scratch("dx", shape, dtype)
        n = shape[0] * shape[1]
        flat = self.grad_pool[0]
        if flat is None or flat.size < n or flat.dtype != dtype:
            flat = self.grad_pool[0] = np.empty(n, dtype)
        return flat[:n].reshape(shape)

    def _grad(self, key):
        """The array grads[key] is written into: reused across steps, shaped like params[key]."""
        g = self.grads.get(key)
        p = self.params[key]
        if g is None or g.shape != p.shape or g.dtype != p.dtype:
            g = self.grads[key] = np.empty_like(p)
        return g

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"

    def __getstate__(self):
        # Pickle (used by scikit-learn and joblib) keeps what defines the layer, not its
        # per-step caches and buffers, which are rebuilt by the next forward.
        state = self.__dict__.copy()
        state.update(_cache=None, _scratch_arrays={})
        return state

    def __setstate__(self, state):
        # Arrays may come back read-only (joblib memory-maps them): training and the
        # in-place running-statistics update need them writable.
        for kind in ("params", "grads", "buffers"):
            state[kind] = {k: v if v.flags.writeable else np.array(v) for k, v in state[kind].items()}
        self.__dict__.update(state)


class BatchNormUntrainedWarning(UserWarning):
    """A BatchNorm layer is used with running statistics that never saw a training batch."""


def _as_rng(rng):
    if rng is None or isinstance(rng, (int, np.integer)):
        return np.random.default_rng(rng)
    if isinstance(rng, np.random.Generator):
        return rng
    raise HyperparameterError(f"rng must be None, an int seed or a numpy Generator, got {rng!r}")


class Linear(Layer):
    """z = x @ W + b.

    Args:
        in_features, out_features: sizes; W has shape (in_features, out_features).
        bias: learn b (out_features,) (default True). Set False when a BatchNorm
            follows: its mean subtraction cancels b, and beta takes b's role.
        init: "he" (default; N(0, 2/in), for ReLU), "xavier" (N(0, 2/(in+out)),
            for sigmoid/tanh) or "normal" (N(0, std^2)).
        std: standard deviation for init="normal" (default 0.01); not allowed with the others.
        rng: None, int seed, or numpy Generator used for the initial W.
        dtype: "float32" (default) or "float64".
    Shapes: x (N, in_features) -> z (N, out_features).
    """

    def __init__(self, in_features, out_features, bias=True, init="he", std=None, rng=None, dtype="float32"):
        super().__init__()
        self.in_features = check_int("Linear", "in_features", in_features, low=1)
        self.out_features = check_int("Linear", "out_features", out_features, low=1)
        self.init = check_choice("Linear", "init", init, ("he", "xavier", "normal"))
        if std is not None and init != "normal":
            raise HyperparameterError(f"Linear: std is used only with init='normal', got std={std!r} with init={init!r}")
        if init == "normal":
            std = 0.01 if std is None else check_number("Linear", "std", std, low=0, low_open=True)
        else:
            fan = in_features if init == "he" else in_features + out_features
            std = float(np.sqrt(2.0 / fan))
        self.std = std
        self.bias = bool(bias)
        self.dtype = check_dtype("Linear", dtype)
        w = _as_rng(rng).standard_normal((in_features, out_features)) * std
        self.params["W"] = w.astype(self.dtype)  # (in, out)
        if self.bias:
            self.params["b"] = np.zeros(out_features, self.dtype)  # (out,)

    def _forward(self, x, train):
        self._cache = x  # (N, in), for dW
        z = self._scratch("z", (x.shape[0], self.out_features), self.dtype)
        return F.linear(x, self.params["W"], self.params.get("b"), out=z)

    def _cached_output_shape(self):
        return (self._cached().shape[0], self.out_features)

    def _backward(self, dy, input_grad):
        x = self._cached()
        dx_out = self._dx_buffer(x.shape, self.dtype) if input_grad else None
        dx, _, _ = F.linear_backward(dy, x, self.params["W"], self.bias, input_grad, dx_out,
                                     self._grad("W"), self._grad("b") if self.bias else None)
        return dx

    def config(self):
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias,
                "init": self.init, "std": self.std if self.init == "normal" else None, "dtype": self.dtype}


class BatchNorm(Layer):
    """Batch normalization over the batch axis of (N, D) input (Ioffe & Szegedy 2015).

    train=True:   y = gamma * (x - mu_B) / sqrt(var_B + eps) + beta,
                  mu_B, var_B = mean and biased variance of this mini-batch (Alg. 1); then
                  running_mean = decay * running_mean + (1 - decay) * mu_B
                  running_var  = decay * running_var  + (1 - decay) * var_B * m/(m-1)   ("unbiased")
                  count += 1
    train=False:  y = gamma * (x - running_mean) / sqrt(running_var + eps) + beta

    Convention, said out loud: `decay` is the weight kept by the OLD running
    value. It equals Keras' `momentum` and 1 - PyTorch's `momentum`; the
    default 0.9 equals PyTorch's momentum=0.1 (Keras' default is 0.99).

    Args:
        num_features: D.
        eps: added to the variance (default 1e-5, as PyTorch; Keras uses 1e-3).
        decay: in [0, 1], default 0.9; or None for the cumulative average of all batches
            seen, running = running + (batch - running) / count (PyTorch's momentum=None).
        frozen: if True, train mode also normalizes with the running statistics and never
            updates them, while gamma and beta still get gradients (fine-tuning with frozen
            statistics; see bnnet.freeze_batchnorm). Separate from eval mode.
        running_var: "unbiased" (default; m/(m-1) * var_B, Alg. 2 and PyTorch) or
            "biased" (var_B as is, as Keras). The batch itself is always
            normalized with the biased variance.
        dtype: "float32" (default) or "float64".
    Params: gamma (D,) ones, beta (D,) zeros.
    Buffers: running_mean (D,) zeros, running_var (D,) ones, count () int64 batches seen.
    """

    fusable = True  # the numba backend may run it fused with the activation after it (variants set False)

    def __init__(self, num_features, eps=1e-5, decay=0.9, running_var="unbiased", dtype="float32", frozen=False):
        super().__init__()
        self.num_features = check_int("BatchNorm", "num_features", num_features, low=1)
        self.eps = check_number("BatchNorm", "eps", eps, low=0, low_open=True)
        self.decay = None if decay is None else check_number("BatchNorm", "decay", decay, low=0, high=1)
        self.frozen = bool(frozen)
        self.batch_stats = None  # (mean, biased var) of the last train-mode batch, float64 (D,)
        self.running_var = check_choice("BatchNorm", "running_var", running_var, ("unbiased", "biased"))
        self.dtype = check_dtype("BatchNorm", dtype)
        self.params["gamma"] = np.ones(num_features, self.dtype)
        self.params["beta"] = np.zeros(num_features, self.dtype)
        self.buffers["running_mean"] = np.zeros(num_features, self.dtype)
        self.buffers["running_var"] = np.ones(num_features, self.dtype)
        self.buffers["count"] = np.zeros((), np.int64)

    def _effective_train(self, x, train):
        """Batch statistics (True) or running ones (False: eval mode, or frozen); checks the batch."""
        train = train and not self.frozen
        if not train and int(self.buffers["count"]) == 0 and not getattr(self, "_warned_untrained", False):
            self._warned_untrained = True
            warnings.warn(f"{self.name} normalizes with running statistics that never saw a training batch "
                          "(mean 0, variance 1): train it first, load a checkpoint, or call "
                          "bnnet.recompute_bn_stats(model, X)", BatchNormUntrainedWarning, stacklevel=5)
        if train and x.shape[0] < 2:
            raise InputError(
                f"{self.name}: a batch of {x.shape[0]} row in train mode has no variance to normalize with; "
                "use batch_size >= 2, or call forward(x, train=False) to use the running statistics"
            )
        return train

    def _forward(self, x, train):
        train = self._effective_train(x, train)
        m = x.shape[0]
        if backend.fast():
            return self._forward_fused(x, train)
        gamma, beta = self.params["gamma"], self.params["beta"]
        if not train:
            self._cache = ("eval", x)
            return F.batch_normalization(x, self.buffers["running_mean"], self.buffers["running_var"],
                                         beta, gamma, self.eps)
        y, mean, var, cache = F.batch_norm_forward(x, gamma, beta, self.eps)
        self.batch_stats = (mean, var)
        self._update_running(mean, var, m)
        self._cache = ("train", x, cache)
        return y

    def _decay_now(self):
        """The weight of the old running value in this update: decay, or 1 - 1/count for the cumulative average."""
        return self.decay if self.decay is not None else 1.0 - 1.0 / (int(self.buffers["count"]) + 1)

    def _forward_fused(self, x, train, activation=None, reuse=None):
        """BN (and the activation that follows, if given) in one numba kernel; see bnnet.kernels.

        Caches only x, the output and the float64 statistics: backward recomputes
        x_hat from them.
        """
        kernels = backend.kernels()
        act, slope = (kernels.IDENTITY, 0.0) if activation is None else activation.kernel_code
        out = self._scratch("y", x.shape, x.dtype, reuse)
        d = self.num_features
        stats = self._scratch_arrays.get("stats")
        if stats is None:
            stats = self._scratch_arrays["stats"] = np.empty((3, d))  # mean, var, inv_std in float64
        mean, var, inv_std = stats
        m = x.shape[0]
        correction = m / (m - 1) if self.running_var == "unbiased" and m > 1 else 1.0
        # the kernel also updates running_mean/var in train mode, as _update_running does
        kernels.bn_forward(x, self.params["gamma"], self.params["beta"], self.eps, act, slope, train,
                           self.buffers["running_mean"], self.buffers["running_var"], self._decay_now(),
                           correction, out, mean, var, inv_std)
        if train:
            self.batch_stats = (mean, var)
            self.buffers["count"] += 1
        self._cache = ("fused", x, out, train, act, slope)
        return out

    def _update_running(self, mean, var, m):
        if self.running_var == "unbiased":
            var = var * (m / (m - 1))
        d = self._decay_now()
        rm, rv = self.buffers["running_mean"], self.buffers["running_var"]
        rm *= d  # in place: the arrays in `buffers` keep their identity
        rm += (1 - d) * mean
        rv *= d
        rv += (1 - d) * var
        self.buffers["count"] += 1

    def _cached_output_shape(self):
        return self._cached()[1].shape

    def _backward(self, dy, input_grad):
        mode, x, *rest = self._cached()
        gamma = self.params["gamma"]
        dgamma, dbeta = self._grad("gamma"), self._grad("beta")
        if mode == "fused":
            out, train, act, slope = rest
            mean, _, inv_std = self._scratch_arrays["stats"]
            # The kernel's dx pass reads x[i, j] before writing dx[i, j], so dx may overwrite x
            # when x is a buffer of the model's (saves one (N, D) array); x is then gone.
            dx = x if self.overwrite_input else self._scratch("dx", x.shape, x.dtype)
            backend.kernels().bn_backward(dy, out, x, mean, inv_std, gamma, act, slope, train, dx, dgamma, dbeta)
            if self.overwrite_input:
                self._cache = None  # a second backward would read dx as x: make it an error instead
            return dx
        if mode == "train":
            dx, dgamma[...], dbeta[...] = F.batch_norm_backward(dy, gamma, rest[0])
            return dx
        # Eval mode: the statistics are constants, so BN is a per-feature affine map.
        inv_std = 1.0 / np.sqrt(self.buffers["running_var"] + self.eps)
        x_hat = (x - self.buffers["running_mean"]) * inv_std
        dgamma[...] = (dy * x_hat).sum(axis=0)
        dbeta[...] = dy.sum(axis=0)
        return dy * (gamma * inv_std)

    def config(self):
        return {"num_features": self.num_features, "eps": self.eps, "decay": self.decay,
                "running_var": self.running_var, "dtype": self.dtype, "frozen": self.frozen}


class _Activation(Layer):
    """Elementwise a = g(z); dz = da * g'(z), with g' written in terms of the output a
    (so only a is kept, and the fused kernels can use the same rule).
    Subclasses define _fn, _grad and kernel_code."""

    def _forward(self, z, train):
        a = self._fn(z)
        self._cache = a  # (N, D), the shape of both input and output
        return a

    def _backward(self, dy, input_grad):
        return dy * self._grad(self._cached())


class ReLU(_Activation):
    """a = max(z, 0)."""

    def _fn(self, z):
        return F.relu(z)

    def _grad(self, a):
        return F.relu_grad(a)  # a > 0 exactly where z > 0

    kernel_code = (1, 0.0)  # (bnnet.kernels.RELU, slope)


class LeakyReLU(_Activation):
    """a = z if z > 0 else negative_slope * z (default negative_slope=0.01, as PyTorch)."""

    def __init__(self, negative_slope=0.01):
        super().__init__()
        self.negative_slope = check_number("LeakyReLU", "negative_slope", negative_slope, low=0)

    def _fn(self, z):
        return F.leaky_relu(z, self.negative_slope)

    def _grad(self, a):
        return F.leaky_relu_grad(a, self.negative_slope)  # a > 0 exactly where z > 0 (slope >= 0)

    @property
    def kernel_code(self):
        return (2, self.negative_slope)  # (bnnet.kernels.LEAKY_RELU, slope)

    def config(self):
        return {"negative_slope": self.negative_slope}


class Sigmoid(_Activation):
    """a = 1 / (1 + exp(-z))."""

    def _fn(self, z):
        return F.sigmoid(z)

    def _grad(self, a):
        return F.sigmoid_grad_from_output(a)

    kernel_code = (3, 0.0)  # bnnet.kernels.SIGMOID


class Tanh(_Activation):
    """a = tanh(z)."""

    def _fn(self, z):
        return F.tanh(z)

    def _grad(self, a):
        return F.tanh_grad_from_output(a)

    kernel_code = (4, 0.0)  # bnnet.kernels.TANH


class BatchNormActivation:
    """A BatchNorm and the activation after it, run as one fused kernel (numba backend).

    Not a layer of its own: Sequential builds it over two of its layers, which
    keep their params, grads and buffers; only the schedule changes.
    """

    def __init__(self, bn, activation):
        self.bn, self.activation = bn, activation

    def forward(self, x, train):
        return self._forward(self.bn._input(x, self.bn.num_features), train)

    def _forward(self, x, train):
        train = self.bn._effective_train(x, train)
        return self.bn._forward_fused(x, train, self.activation, reuse=self.activation.reuse_buffers)

    def _backward(self, dy, input_grad):
        return self.bn._backward(dy, input_grad)


class LinearActivation:
    """A Linear and the activation after it, with the bias add and the activation in one
    kernel pass over z (numba backend; built by Sequential like BatchNormActivation)."""

    def __init__(self, linear, activation):
        self.linear, self.activation = linear, activation

    def forward(self, x, train):
        return self._forward(self.linear._input(x, self.linear.in_features), train)

    def _forward(self, x, train):
        lin = self.linear
        lin._cache = x  # (N, in), for dW
        a = lin._scratch("z", (x.shape[0], lin.out_features), lin.dtype, reuse=self.activation.reuse_buffers)
        np.matmul(x, lin.params["W"], out=a)
        b = lin.params["b"] if lin.bias else np.zeros(lin.out_features, lin.dtype)
        backend.kernels().bias_activation(a, b, *self.activation.kernel_code)  # a = g(x @ W + b), in place
        self.activation._cache = a
        return a

    def _backward(self, dy, input_grad):
        return self.linear._backward(dy * self.activation._grad(self.activation._cached()), input_grad)


ACTIVATIONS = {"relu": ReLU, "leaky_relu": LeakyReLU, "sigmoid": Sigmoid, "tanh": Tanh}
LAYER_TYPES = {cls.__name__: cls for cls in (Linear, BatchNorm, ReLU, LeakyReLU, Sigmoid, Tanh)}
