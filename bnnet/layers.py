"""Layers: small classes that own parameters and buffers and call one operation each.

A layer has
    params  : dict name -> array, the trained parameters (W, b, gamma, beta);
    grads   : dict with the same keys, filled by backward();
    buffers : dict name -> array, state that is not trained (running statistics);
    forward(x, train) -> y     train: bool, passed explicitly on every call;
    backward(dy) -> dx         uses what the last forward cached.

The public forward/backward validate their input, check that every array in
`params` and `buffers` has the shape, dtype and layout the layer's
configuration implies (`check_state`), and return new arrays the caller owns.
The private `_forward(x, train, out=None)` / `_backward(dy, input_grad,
dx_out=None)` do the math; an execution plan (bnnet.engine) calls them for
the layers of a model, after the same checks, passing arrays to write into.
How a model runs (fusion, buffer reuse, in-place decisions) is the plan's
business, never the layer's.
"""

import functools
import warnings

import numpy as np

from . import backend, ops, threads
from . import functional as F
from ._checks import (
    as_array,
    as_float_array,
    check_allocation,
    check_batch,
    check_bool,
    check_choice,
    check_dtype,
    check_int,
    check_number,
    describe,
    per_sample,
)
from .device import empty, writable, zeros
from .errors import HyperparameterError, InputError
from .ops import check_finite


class Layer:
    """Base class: the three dicts, a display name (set by Sequential) and the checks."""

    writes_out = False  # _forward writes into the `out` array it is given (else it returns a new one)
    frozen_params = frozenset()  # the keys of params the optimizers leave alone (see `trainable`, Sequential.freeze)
    backward_reads_output = True  # _backward reads the forward's output (False lets a plan write over it)

    def __init__(self):
        self.params = {}
        self.grads = {}
        self.buffers = {}
        self.name = type(self).__name__
        self._cache = None
        self._grad_homes = {}  # key -> the view of the model's flat gradient buffer for grads[key] (bnnet.flat)

    @property
    def trainable(self):
        """False when every parameter is frozen (no update, no optimizer state); set it to freeze or
        unfreeze them all (as Keras's layer.trainable). See Sequential.freeze."""
        return not (self.params and self.frozen_params >= set(self.params))

    @trainable.setter
    def trainable(self, value):
        if not isinstance(value, bool):
            raise HyperparameterError(f"{self.name}: trainable must be True or False, got {value!r}")
        self.set_frozen(() if value else tuple(self.params))

    def set_frozen(self, keys):
        """Freeze exactly these parameter keys (the others train); their gradients are set to zero now
        (a frozen Linear's W keeps a zero gradient: it is not computed)."""
        unknown = [k for k in keys if k not in self.params]
        if unknown:
            raise HyperparameterError(
                f"{self.name}: no parameter {unknown[0]!r} to freeze (it has {list(self.params)})"
            )
        self.frozen_params = frozenset(keys)
        for k in self.frozen_params:
            if k in self.grads and hasattr(self.grads[k], "fill"):
                self.grads[k].fill(0)

    # -- the public, checked calls --------------------------------------------

    def forward(self, x, train, out=None, check_input=True):
        """y = layer(x). train: True for training behaviour (batch statistics), False for eval.

        Returns a new array, or `out` when given: an array of the output's shape and
        dtype to write into (not overlapping x), for callers that reuse their own buffers.
        check_input: refuse an x holding NaN/Inf with InputError (default True; one read
            pass over x, or none where the layer's own statistics pass reads x anyway: see
            BatchNorm); False lets them through, propagated as NumPy would.
        """
        x = self._input(x)
        shape = self.out_shape(x.shape[1:])  # (raises InputError when the layer cannot take x)
        folded = check_input and self._statistics_read_input(train)
        if check_input and not folded:
            check_finite(x, "x", self.name)
        self.check_state(train)
        if out is not None:
            out = _check_out(self.name, "out", out, (x.shape[0], *shape), x.dtype)
        saved = self._state_before_folded_check() if folded else None
        # the kernels write through reshaped views of `out`, which only a C-contiguous array has
        y = self._forward(x, train, out=out if out is not None and out.flags.c_contiguous else None)
        if folded and not self._statistics_finite():
            self._restore_after_folded_check(saved)  # x may hold NaN/Inf: undo the running update
            check_finite(x, "x", self.name)  # names the first one (finite x: the sums overflowed; go on)
        if out is None:
            return y
        if y is not out:
            out[...] = y
        return out

    # The NaN/Inf check of forward's input, folded into a pass that reads x anyway: a layer whose
    # train-mode statistics sum every x in float64 finds a NaN/Inf there (a non-finite sum) and
    # only then scans x for the first one. By default there is no such pass.

    def _statistics_read_input(self, train):
        return False

    def _state_before_folded_check(self):
        return None

    def _statistics_finite(self):
        return True

    def _restore_after_folded_check(self, saved):
        pass

    def backward(self, dy, input_grad=True, out=None):
        """dL/dx from dL/dy of the last forward; fills `grads`. input_grad=False may skip dx.

        Returns a new array, or `out` when given (an array shaped like the forward's input).
        """
        out_shape = self._cached_output_shape()
        dtype = getattr(self, "dtype", None)
        dy = as_array(dy, "dy", self.name) if dtype is None else as_float_array(dy, "dy", self.name, dtype)
        if dy.shape != out_shape:
            raise InputError(f"{self.name}: dy must have the shape of the last output {out_shape}, got {dy.shape}")
        self.check_state(False)
        if out is None:
            return self._backward(dy, input_grad)
        out = _check_out(self.name, "out", out, self._cached_input_shape(), dy.dtype)
        dx = self._backward(dy, True, dx_out=out if out.flags.c_contiguous else None)
        if dx is not out:
            out[...] = dx
        return out

    # -- what subclasses define -------------------------------------------------

    def _forward(self, x, train, out=None):
        raise NotImplementedError

    def _backward(self, dy, input_grad, dx_out=None):
        raise NotImplementedError

    def state_spec(self):
        """{(kind, key): (shape, dtype)} for every array in params and buffers, from the configuration."""
        return {}

    def in_shape(self):
        """The per-sample input shape this layer takes: a tuple, None where any size goes
        (Conv2d: (C, None, None)), or None for any shape at all (activations)."""
        return None

    def out_shape(self, shape):
        """The per-sample output shape for per-sample input `shape` (a tuple; None entries are
        sizes not known yet, which give None). Raises InputError when the layer cannot take it."""
        self._require(shape, self.in_shape())
        return shape

    def _require(self, shape, need):
        """InputError unless `shape` fits the template `need` (None entries match anything)."""
        if need is None or (
            len(shape) == len(need) and all(a is None or b is None or a == b for a, b in zip(shape, need))
        ):
            return
        raise InputError(f"{self.name}: x must be {per_sample(need)}, got {per_sample(shape)}")

    def config(self):
        """Constructor arguments, JSON-serializable: what a checkpoint needs to rebuild the layer."""
        return {}

    # -- checks ---------------------------------------------------------------------

    def check_state(self, train):
        """Raise InputError unless every params/buffers array is what the configuration implies.

        Each must be an ndarray of exactly the expected shape and dtype and
        C-contiguous; buffers written in train mode must be writable. Nothing
        is copied: this is a comparison of a few attributes per array.
        """
        for (kind, key), (shape, dtype) in self.state_spec().items():
            a = getattr(self, kind).get(key)
            if (
                not isinstance(a, backend.array_types())  # NumPy's, or the GPU's for the cuda backend
                or a.shape != shape
                or a.dtype != _DTYPES[dtype]
                or not a.flags.c_contiguous
                or (train and kind == "buffers" and not writable(a))
            ):
                raise InputError(
                    f"{self.name}: {kind}[{key!r}] must be a C-contiguous{' writable' if kind == 'buffers' else ''}"
                    f" {np.dtype(dtype).name} array of shape {shape}, got {describe(a)}"
                )

    def _input(self, x):
        # Layers with a dtype cast their input to it (no copy when it already matches);
        # dtype-free layers (activations) keep float32/float64 and compute in float64 otherwise.
        x = as_array(x, "x", self.name)
        dtype = getattr(self, "dtype", None) or (x.dtype.name if x.dtype.name in ("float32", "float64") else "float64")
        x = as_float_array(x, "x", self.name, dtype)
        check_batch(x, "x", self.name)
        return x

    def _cached(self):
        if self._cache is None:
            raise InputError(
                f"{self.name}: backward() called before forward(), or after a backward that "
                "consumed the forward's input; run forward(x, train) first"
            )
        return self._cache

    def _cached_output_shape(self):
        return self._cached()[0].shape

    def _cached_input_shape(self):
        return self._cached()[1].shape if len(self._cached()) > 1 else self._cached()[0].shape

    def _grad(self, key):
        """The array grads[key] is written into: kept across steps when it is a writable C-contiguous
        array shaped like params[key], else replaced by a new one."""
        g = self.grads.get(key)
        p = self.params[key]
        if (
            not isinstance(g, backend.array_types())
            or g.shape != p.shape
            or g.dtype != p.dtype
            or not g.flags.c_contiguous
            or not writable(g)
        ):
            home = self._grad_homes.get(key)  # (a gradient of a model laid out flat goes to its view)
            if home is not None and home.shape == p.shape and home.dtype == p.dtype:
                g = self.grads[key] = home
            else:
                g = self.grads[key] = np.empty_like(p)
        return g

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"

    def __getstate__(self):
        # Pickle (used by scikit-learn and joblib) keeps what defines the layer, not its
        # per-step cache, which the next forward rebuilds.
        state = self.__dict__.copy()
        state["_cache"] = None
        for key in ("_constants", "_stat_sinks"):  # constants and sinks for the kernels: made again on use
            state.pop(key, None)
        return state

    def __setstate__(self, state):
        # Arrays may come back read-only (joblib memory-maps them): training and the
        # in-place running-statistics update need them writable.
        for kind in ("params", "grads", "buffers"):
            state[kind] = {k: v if v.flags.writeable else np.array(v) for k, v in state[kind].items()}
        state.pop("_scratch_arrays", None)
        state["_grad_homes"] = {}  # views of the flat buffers of a model that did not come along
        self.__dict__.update(state)


_DTYPES = {"float32": np.dtype(np.float32), "float64": np.dtype(np.float64), np.int64: np.dtype(np.int64)}


def _check_out(owner, name, out, shape, dtype):
    # the backend's array types: NumPy's, or the GPU's for the cuda backend
    if not (isinstance(out, backend.array_types()) and out.shape == shape and out.dtype == dtype and writable(out)):
        raise InputError(
            f"{owner}: {name} must be a writable {np.dtype(dtype).name} array of shape {shape}, got {describe(out)}"
        )
    return out


class BatchNormUntrainedWarning(UserWarning):
    """A BatchNorm layer is used with running statistics that never saw a training batch."""


def _as_rng(rng, owner="Linear"):
    if rng is None or (isinstance(rng, (int, np.integer)) and not isinstance(rng, bool) and 0 <= rng < 2**63):
        return np.random.default_rng(rng)
    if isinstance(rng, np.random.Generator):
        return rng
    raise HyperparameterError(
        f"{owner}: rng must be None, an integer seed in [0, 2**63) or a numpy Generator, got {rng!r}"
    )


def init_weights(owner, shape, init, std, fan_in, fan_out, rng, dtype):
    """(W, std): W of `shape` drawn from N(0, std^2), the init rule of Linear and Conv2d.

    init "he": std = sqrt(2 / fan_in); "xavier": sqrt(2 / (fan_in + fan_out)); "normal": the given
    std (default 0.01), which the other two refuse.
    """
    init = check_choice(owner, "init", init, ("he", "xavier", "normal"))
    if std is not None and init != "normal":
        raise HyperparameterError(f"{owner}: std is used only with init='normal', got std={std!r} with init={init!r}")
    if init == "normal":
        std = 0.01 if std is None else check_number(owner, "std", std, low=0, low_open=True)
    else:
        std = float(np.sqrt(2.0 / (fan_in if init == "he" else fan_in + fan_out)))
    check_allocation(owner, "W", shape, 8)  # (drawn in float64, then cast)
    return (_as_rng(rng, owner).standard_normal(shape) * std).astype(dtype), std


def _activation_code(activation):
    return (ops.IDENTITY, 0.0) if activation is None else activation.kernel_code


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

    writes_out = True
    backward_reads_output = False  # dW and dx need x and W only

    def __init__(self, in_features, out_features, bias=True, init="he", std=None, rng=None, dtype="float32"):
        super().__init__()
        self.in_features = check_int("Linear", "in_features", in_features, low=1)
        self.out_features = check_int("Linear", "out_features", out_features, low=1)
        self.bias = check_bool("Linear", "bias", bias)
        self.dtype = check_dtype("Linear", dtype)
        self.params["W"], self.std = init_weights(  # (in, out)
            "Linear", (in_features, out_features), init, std, in_features, out_features, rng, self.dtype
        )
        self.init = init
        if self.bias:
            self.params["b"] = np.zeros(out_features, self.dtype)  # (out,)

    def in_shape(self):
        return (self.in_features,)

    def out_shape(self, shape):
        self._require(shape, self.in_shape())
        return (self.out_features,)

    def state_spec(self):
        spec = {("params", "W"): ((self.in_features, self.out_features), self.dtype)}
        if self.bias:
            spec["params", "b"] = ((self.out_features,), self.dtype)
        return spec

    def _forward(self, x, train, out=None, activation=None):
        """z = x @ W + b into `out`; with `activation` (an activation layer), a = g(z) in the same pass."""
        z = out if out is not None else empty(x, (x.shape[0], self.out_features), self.dtype)  # (N, out)
        threads.for_gemm(x.shape[0] * self.in_features * self.out_features)  # BLAS threads for this product
        if activation is None:
            F.linear(x, self.params["W"], self.params.get("b"), out=z)
        else:
            np.matmul(x, self.params["W"], out=z)
            b = self.params["b"] if self.bias else zeros(x, (self.out_features,), self.dtype)
            ops.bias_activation(z, b, *activation.kernel_code)  # z <- g(z + b), in place
        self._cache = (z, x, activation)  # z (N, out) is a when fused; x (N, in) for dW
        return z

    def _backward(self, dy, input_grad, dx_out=None):
        a, x, activation = self._cached()
        if activation is not None:
            dy = activation.grad_from_output(dy, a)  # dL/dz = dL/da * g'(z), g' written from a
        threads.for_gemm(x.shape[0] * self.in_features * self.out_features)
        dx, _, _ = F.linear_backward(
            dy,
            x,
            self.params["W"],
            self.bias,
            input_grad,
            dx_out,
            self._grad("W"),
            self._grad("b") if self.bias else None,
            weight_grad="W" not in self.frozen_params,  # (a frozen W's gradient stays zero: not computed)
        )
        return dx

    def config(self):
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias,
            "init": self.init,
            "std": self.std if self.init == "normal" else None,
            "dtype": self.dtype,
        }


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
        affine: learn gamma and beta (default True). False: y = (x - mu) / sqrt(var + eps), and
            the layer has no params (PyTorch's affine=False; Keras' center=scale=False).
        center, scale: learn beta, gamma apart (default None: as affine), as Keras's options:
            center=False keeps gamma and fixes beta at 0; scale=False keeps beta and fixes gamma
            at 1 (the usual choice before a ReLU, which a scale does not change). `affine` then
            reads True only when both are learned.
        track_running_stats: keep running statistics for eval mode (default True). False: no
            buffers; the batch's own statistics normalize in train and eval mode alike (as in
            PyTorch), so eval mode also needs >= 2 rows.
        axis: the channel axis of N-D input (default 1, PyTorch's (N, C, ...); -1 for channels
            last, as Keras). (N, C), (N, C, L), (N, C, H, W) and (N, C, D, H, W) inputs are
            normalized per channel over every other axis, as BatchNorm1d/2d/3d; the statistics
            are those of the N x L (x H x W ...) values of each channel.
    Params: gamma (D,) ones, beta (D,) zeros (none when affine=False).
    Buffers: running_mean (D,) zeros, running_var (D,) ones, count () int64 batches seen
        (none when track_running_stats=False).
    """

    fusable = True  # an execution plan may run it with the activation after it in one pass (variants set False)
    writes_out = True
    affine = track_running_stats = center = scale = True  # (class defaults: layers pickled before these options)
    axis = 1
    _constants = _stat_sinks = _layout = _last_shape = None
    _sample_rows = 1

    def __init__(
        self,
        num_features,
        eps=1e-5,
        decay=0.9,
        running_var="unbiased",
        dtype="float32",
        frozen=False,
        affine=True,
        track_running_stats=True,
        axis=1,
        center=None,
        scale=None,
    ):
        super().__init__()
        self.axis = check_int(type(self).__name__, "axis", axis)
        if self.axis not in (1, -1):
            raise HyperparameterError(
                f"{type(self).__name__}: axis must be 1 (channels first, as PyTorch) or -1 "
                f"(channels last, as Keras), got {axis}"
            )
        self.num_features = check_int("BatchNorm", "num_features", num_features, low=1)
        check_allocation(type(self).__name__, "each of gamma, beta and the running statistics", (num_features,), 32)
        self.eps = check_number("BatchNorm", "eps", eps, low=0, low_open=True)
        self.decay = None if decay is None else check_number("BatchNorm", "decay", decay, low=0, high=1)
        self.frozen = check_bool(type(self).__name__, "frozen", frozen)
        affine = check_bool(type(self).__name__, "affine", affine)
        self.center = affine if center is None else check_bool(type(self).__name__, "center", center)
        self.scale = affine if scale is None else check_bool(type(self).__name__, "scale", scale)
        self.affine = self.center and self.scale
        self.track_running_stats = check_bool(type(self).__name__, "track_running_stats", track_running_stats)
        if self.frozen and not self.track_running_stats:
            raise HyperparameterError(
                f"{type(self).__name__}: frozen=True normalizes with the running statistics, "
                "which track_running_stats=False does not keep"
            )
        self.batch_stats = None  # (mean, biased var) of the last train-mode batch, float64 (D,)
        self.running_var = check_choice("BatchNorm", "running_var", running_var, ("unbiased", "biased"))
        self.dtype = check_dtype("BatchNorm", dtype)
        self._constants = None  # gamma = 1, beta = 0 and gradient sinks when affine=False, made on first use
        self.reset_parameters()

    def reset_running_stats(self):
        """running_mean = 0, running_var = 1, count = 0 (nothing to reset with track_running_stats=False)."""
        if self.track_running_stats:
            d = self.num_features
            self.buffers["running_mean"] = np.zeros(d, self.dtype)
            self.buffers["running_var"] = np.ones(d, self.dtype)
            self.buffers["count"] = np.zeros((), np.int64)

    def reset_parameters(self):
        """gamma = 1, beta = 0 (those that are learned), and reset_running_stats()."""
        if self.scale:
            self.params["gamma"] = np.ones(self.num_features, self.dtype)
        if self.center:
            self.params["beta"] = np.zeros(self.num_features, self.dtype)
        self.reset_running_stats()

    def state_spec(self):
        d = (self.num_features,)
        spec = {}
        if self.scale:
            spec["params", "gamma"] = (d, self.dtype)
        if self.center:
            spec["params", "beta"] = (d, self.dtype)
        if self.track_running_stats:
            spec["buffers", "running_mean"] = spec["buffers", "running_var"] = (d, self.dtype)
            spec["buffers", "count"] = ((), np.int64)
        return spec

    def _affine(self, like=None):
        """(gamma, beta, dgamma, dbeta): the params and their grads; in place of one that is not
        learned (affine=False, center=False or scale=False) the constant 1 or 0 and an array the
        kernels may write its gradient into (never read), made on the device of `like` (the input;
        default the host)."""
        if self.affine:
            return self.params["gamma"], self.params["beta"], self._grad("gamma"), self._grad("beta")
        self._constants = self._per_feature_arrays(self._constants, like, (1, 0, None, None))
        ones, zeros, sink_gamma, sink_beta = self._constants
        gamma, dgamma = (self.params["gamma"], self._grad("gamma")) if self.scale else (ones, sink_gamma)
        beta, dbeta = (self.params["beta"], self._grad("beta")) if self.center else (zeros, sink_beta)
        return gamma, beta, dgamma, dbeta

    def _running(self, like=None):
        """(running_mean, running_var) for the kernels; with track_running_stats=False two arrays
        they may write into, never read (the layer always uses batch statistics then), on like's device."""
        if self.track_running_stats:
            return self.buffers["running_mean"], self.buffers["running_var"]
        self._stat_sinks = self._per_feature_arrays(self._stat_sinks, like, (0, 1))
        return self._stat_sinks

    def _per_feature_arrays(self, cached, like, fills):
        """constant_arrays of shape (num_features,) in the layer's dtype (on the host when like is None)."""
        like = np.empty(0, self.dtype) if like is None else like
        return constant_arrays(cached, like, (self.num_features,), self.dtype, fills)

    def _effective_train(self, x, train):
        """Batch statistics (True) or running ones (False: eval mode, or frozen); checks the batch."""
        train = (train and not self.frozen) or not self.track_running_stats
        if not train and int(self.buffers["count"]) == 0 and not getattr(self, "_warned_untrained", False):
            self._warned_untrained = True
            warnings.warn(
                f"{self.name} normalizes with running statistics that never saw a training batch "
                "(mean 0, variance 1): train it first, load a checkpoint, or call "
                "bnnet.recompute_bn_stats(model, X)",
                BatchNormUntrainedWarning,
                stacklevel=5,
            )
        if train and x.size // self.num_features < 2:
            rows = f"{x.shape[0]} row" if x.ndim == 2 else f"shape {x.shape} (1 value per channel)"
            raise InputError(
                f"{self.name}: a batch of {rows} in train mode has no variance to normalize with; "
                "use batch_size >= 2, or call forward(x, train=False) to use the running statistics"
            )
        return train

    def _running_update_args(self, m):
        """(decay, variance correction) of this batch's running update: decay, or 1 - 1/count for
        the cumulative average; m/(m-1) for the "unbiased" running variance, else 1."""
        count = int(self.buffers["count"]) if self.track_running_stats else 0
        decay = self.decay if self.decay is not None else 1.0 - 1.0 / (count + 1)
        return decay, F.variance_correction(m, self.running_var == "unbiased")

    def _update_running(self, mean, var, m):
        """running_* <- running average with the batch's float64 (mean, biased var) of m rows; count += 1."""
        # float64 on the device they are on (np.asarray would bring a GPU array to the host)
        mean, var = mean.astype(np.float64, copy=False), var.astype(np.float64, copy=False)
        if self.track_running_stats:
            ops.update_running(
                self.buffers["running_mean"], self.buffers["running_var"], mean, var, *self._running_update_args(m)
            )
        self._count_batch(mean, var)

    def _count_batch(self, mean, var):
        """After a running update: keep the batch's statistics (for recompute_bn_stats) and count it."""
        self.batch_stats = (mean, var)
        if self.track_running_stats:
            self.buffers["count"] += 1

    def _forward(self, x, train, out=None, activation=None):
        """y = BN(x) into `out`; with `activation`, a = g(BN(x)) in the same pass (bnnet.ops.bn_forward).

        Caches x, the output and the float64 statistics: backward recomputes x_hat from them.
        """
        train = self._effective_train(x, train)
        act, slope = _activation_code(activation)
        out = out if out is not None else empty(x, x.shape, self.dtype)  # like x, C-contiguous, on x's device
        xk, outk = self._kernel_view(x), self._kernel_view(out)  # (N, C) or (N, C, S) or (N*S, C)
        stats = empty(x, (3, self.num_features), np.float64)  # mean, biased var, inv_std: float64 (C,)
        decay, correction = self._running_update_args(x.size // self.num_features)
        gamma, beta, _, _ = self._affine(x)
        # in train mode the op also updates running_mean/var, as _update_running would
        ops.bn_forward(xk, gamma, beta, self.eps, act, slope, train, *self._running(x), decay, correction, outk, *stats)
        if train:
            self._count_batch(stats[0], stats[1])
        self._cache = (outk, xk, stats, train, act, slope, x)
        self._last_shape = x.shape
        return out

    # The input check folded into the statistics pass (see Layer.forward): in train mode the float64
    # sums of every x are finite exactly when x is, unless the sums overflow (|x| near 1e150), which
    # the scan that follows a non-finite sum tells apart.

    def _statistics_read_input(self, train):
        return type(self) is BatchNorm and self.fusable and self.track_running_stats and train and not self.frozen

    def _state_before_folded_check(self):
        return {k: v.copy() for k, v in self.buffers.items()}

    def _statistics_finite(self):
        stats = self._cache[2]  # (3, C) float64: mean, var, inv_std of this batch
        return bool(np.isfinite(stats[:2]).all())

    def _restore_after_folded_check(self, saved):
        for k, v in saved.items():
            self.buffers[k][...] = v

    def _backward(self, dy, input_grad, dx_out=None):
        """dx into dx_out (which may be the forward's input x: each element is read before it is
        written; x is then gone, so a second backward is refused); dgamma, dbeta into grads."""
        out, xk, stats, train, act, slope, x = self._cached()
        dx = dx_out if dx_out is not None else empty(x, x.shape, self.dtype)
        gamma, _, dgamma, dbeta = self._affine(x)
        ops.bn_backward(
            self._kernel_view(dy),
            out,
            xk,
            stats[0],
            stats[2],
            gamma,
            act,
            slope,
            train,
            self._kernel_view(dx),
            dgamma,
            dbeta,
        )
        if dx is x:
            self._cache = None
        return dx

    def config(self):
        cfg = {
            "num_features": self.num_features,
            "eps": self.eps,
            "decay": self.decay,
            "running_var": self.running_var,
            "dtype": self.dtype,
            "frozen": self.frozen,
        }
        # only when not the default, so that variants without these options rebuild from it
        cfg.update({k: False for k in ("affine", "track_running_stats") if not getattr(self, k)})
        if self.center != self.scale:  # (one of the two: affine alone cannot say which)
            cfg.update(center=self.center, scale=self.scale)
        if self.axis != 1:
            cfg["axis"] = self.axis
        return cfg

    # -- N-D input ----------------------------------------------------------------------

    def in_shape(self):
        return (self.num_features,) if self.axis == 1 else None

    def out_shape(self, shape):
        if not 1 <= len(shape) <= 4:
            raise InputError(
                f"{self.name}: x must be (N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W), got {per_sample(shape)}"
            )
        channels = shape[0] if self.axis == 1 else shape[-1]
        if channels is not None and channels != self.num_features:
            where = "axis 1" if self.axis == 1 else "the last axis"
            raise InputError(
                f"{self.name}: x must have {self.num_features} channels on {where}, got shape {per_sample(shape)}"
            )
        return shape

    def _kernel_view(self, a):
        """What the kernels see of an N-D array: (N, C, S) for channels on axis 1 (each channel's
        S = L or H*W or D*H*W values contiguous per sample), (N*S, C) for channels last; (N, C)
        as is. A view of a C-contiguous array (a copy of any other, which the kernels only read)."""
        if a.ndim == 2:
            return a
        if self.axis == 1:
            return a.reshape(a.shape[0], self.num_features, -1)
        return a.reshape(-1, self.num_features)

    def _cached_output_shape(self):
        self._cached()
        return self._last_shape

    _cached_input_shape = _cached_output_shape

    def _rows(self, x, layout=True):
        """(N, C, *S) -> (N * prod(S), C), channels last: the (N, D) rows that the variants'
        NumPy math takes (a copy unless the channels are already last)."""
        moved = np.moveaxis(x, self.axis, -1)  # (N, *S, C)
        if layout:
            self._layout = (self.axis, moved.shape)
        return np.ascontiguousarray(moved).reshape(-1, self.num_features)

    def _from_rows(self, y):
        """The inverse of _rows for the last forward's layout: a new C-contiguous array."""
        axis, moved_shape = self._layout
        return np.ascontiguousarray(np.moveaxis(y.reshape(moved_shape), -1, axis))


def constant_arrays(cached, like, shape, dtype, fills):
    """Arrays a normalization hands the batch-norm operations besides its own: `cached` if it holds
    arrays of `shape` on like's device, else new ones of `dtype` there, each filled with its value in
    `fills` (None: left uninitialized, for results nothing reads). They stay writable, although the
    kernels only read the constant ones: numba compiles a kernel again, for seconds, for each
    argument that is read-only, and these would make every affine=False BatchNorm, LayerNorm and
    GroupNorm compile its own copies of the kernels."""
    if cached is not None and cached[0].shape == shape and cached[0].dtype == dtype and type(cached[0]) is type(like):
        return cached
    arrays = tuple(empty(like, shape, dtype) for _ in fills)
    for a, fill in zip(arrays, fills):
        if fill is not None:
            a[...] = fill
    return arrays


def on_rows(method):
    """Decorator for the _forward/_backward of Batch Norm variants whose math is written for
    (N, D) rows: N-D input runs as the (rows, C) array of each channel's values (BatchNorm._rows)."""
    if method.__name__ == "_forward":

        @functools.wraps(method)
        def forward(self, x, train, out=None, activation=None):
            self._sample_rows = x[0].size // self.num_features if len(x) else 1  # rows per sample
            if x.ndim == 2:
                y = method(self, x, train, out, activation)
            else:
                y = self._from_rows(method(self, self._rows(x), train, None, activation))
                if out is not None:
                    out[...] = y
                    y = out
            self._last_shape = x.shape
            return y

        return forward

    @functools.wraps(method)
    def backward(self, dy, input_grad, dx_out=None):
        if dy.ndim == 2:
            return method(self, dy, input_grad, dx_out)
        dx = method(self, self._rows(dy, layout=False), input_grad, None)
        if dx is None:
            return None
        dx = self._from_rows(dx)
        if dx_out is not None:
            dx_out[...] = dx
            return dx_out
        return dx

    return backward


class _Activation(Layer):
    """Elementwise a = g(z); dz = da * g'(z), with g' written in terms of the output a
    (so only a is kept, and fused steps use the same rule). Subclasses define
    _fn, _grad and kernel_code (the bnnet.ops activation code and slope)."""

    def _forward(self, z, train, out=None):
        a = self._fn(z)
        self._cache = (a,)  # (N, D), the shape of both input and output
        return a

    def _backward(self, dy, input_grad, dx_out=None):
        return self.grad_from_output(dy, self._cached()[0])

    def grad_from_output(self, dy, a):
        """dL/dz = dy * g'(z), from the output a = g(z)."""
        return dy * self._grad(a)


class ReLU(_Activation):
    """a = max(z, 0)."""

    def _fn(self, z):
        return F.relu(z)

    def _grad(self, a):
        return F.relu_grad(a)  # a > 0 exactly where z > 0

    kernel_code = (ops.RELU, 0.0)


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
        return (ops.LEAKY_RELU, self.negative_slope)

    def config(self):
        return {"negative_slope": self.negative_slope}


class Sigmoid(_Activation):
    """a = 1 / (1 + exp(-z))."""

    def _fn(self, z):
        return F.sigmoid(z)

    def _grad(self, a):
        return F.sigmoid_grad_from_output(a)

    kernel_code = (ops.SIGMOID, 0.0)


class Tanh(_Activation):
    """a = tanh(z)."""

    def _fn(self, z):
        return F.tanh(z)

    def _grad(self, a):
        return F.tanh_grad_from_output(a)

    kernel_code = (ops.TANH, 0.0)


ACTIVATIONS = {"relu": ReLU, "leaky_relu": LeakyReLU, "sigmoid": Sigmoid, "tanh": Tanh}
LAYER_TYPES = {cls.__name__: cls for cls in (Linear, BatchNorm, ReLU, LeakyReLU, Sigmoid, Tanh)}
