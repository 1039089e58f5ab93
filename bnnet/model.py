"""A model is a sequence of layers; backward walks it in reverse.

model = bnnet.mlp([784, 100, 10], activation="sigmoid")
logits = model.forward(X_t, train=True)          # (N, 10)
dX = model.backward(dlogits)                     # fills model.grads
model.params["0.W"]                               # layer 0's W, by dotted name
"""

import warnings
from collections.abc import MutableMapping

import numpy as np

from . import backend
from ._checks import as_float_array, check_choice, check_int, check_samples, check_seed
from .conv import Conv2d, Flatten, MaxPool2d
from .device import device_of, to_device, to_host
from .dropout import Dropout  # noqa: F401  (registers the layer for checkpoints)
from .engine import Plan, check_chain
from .errors import HyperparameterError, InputError, NonFiniteError
from .flat import FlatLayout, can_lay_out
from .layers import ACTIVATIONS, BatchNorm, Layer, Linear
from .normalization import NORMS, GroupNorm, LayerNorm
from .ops import check_finite
from .ops import check_finite as _check_finite  # forward's own argument is named check_finite


class BiasBeforeBatchNormWarning(UserWarning):
    """A Linear layer with a bias feeds a BatchNorm, which cancels the bias."""


class _DottedView(MutableMapping):
    """Live view of one dict kind ("params", "grads" or "buffers") across layers.

    Keys are "<layer index>.<name>", e.g. "0.W", "1.running_mean". Reading returns
    the layer's own array. Assigning copies into that array in place (shape must
    match, values are cast to its dtype), so that optimizers, checkpoints and
    users who set weights all see the same memory.
    """

    def __init__(self, layers, kind):
        self._layers = layers
        self._kind = kind

    def _split(self, key):
        index, _, name = key.partition(".")
        if (
            not index.isdigit()
            or int(index) >= len(self._layers)
            or name not in getattr(self._layers[int(index)], self._kind)
        ):
            raise KeyError(key)
        return getattr(self._layers[int(index)], self._kind), name

    def __getitem__(self, key):
        d, name = self._split(key)
        return d[name]

    def __setitem__(self, key, value):
        d, name = self._split(key)
        dtype = value.dtype if hasattr(value, "dtype") else np.asarray(value).dtype
        if dtype.kind not in "biuf":
            raise InputError(
                f"{self._kind}[{key!r}] holds {d[name].dtype} numbers; cannot assign a {type(value).__name__} "
                f"of dtype {dtype}"
            )
        value = to_device(value, device_of(d[name]))  # (a host value is copied to a GPU array's device)
        if value.shape != d[name].shape:
            raise InputError(
                f"{self._kind}[{key!r}] has shape {d[name].shape}; cannot assign an array of shape {value.shape}"
            )
        np.copyto(d[name], value, casting="same_kind")

    def __delitem__(self, key):
        raise TypeError(f"cannot delete {self._kind} entries; build a new model instead")

    def __iter__(self):
        for i, layer in enumerate(self._layers):
            for name in getattr(layer, self._kind):
                yield f"{i}.{name}"

    def __len__(self):
        return sum(len(getattr(layer, self._kind)) for layer in self._layers)

    def __repr__(self):
        return "{" + ", ".join(f"{k!r}: array{v.shape}" for k, v in self.items()) + "}"


class Sequential:
    """Layers applied in order. `params`, `grads` and `buffers` are live views with dotted names.

    Args:
        *layers: Layer instances. A Linear with bias=True directly before a
            BatchNorm works, but warns (BiasBeforeBatchNormWarning): BN subtracts
            the batch mean, so b has no effect and its gradient is zero.
    """

    eval_only = False  # set by bnnet.fold_batchnorm

    def __init__(self, *layers):
        if not layers:
            raise HyperparameterError("Sequential: needs at least one layer, got none")
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise HyperparameterError(f"Sequential: argument {i} must be a bnnet layer, got {type(layer).__name__}")
            layer.name = f"{type(layer).__name__} (layer {i})"
        for i, (a, b) in enumerate(zip(layers, layers[1:])):
            if isinstance(a, (Linear, Conv2d)) and a.bias and isinstance(b, BatchNorm):
                kind = type(a).__name__
                warnings.warn(
                    f"layer {i} is a {kind} with bias feeding the BatchNorm at layer {i + 1}: BatchNorm subtracts "
                    "the batch mean, which cancels b (its gradient is zero); beta takes its role. "
                    f"Use {kind}(..., bias=False).",
                    BiasBeforeBatchNormWarning,
                    stacklevel=2,
                )
        self.layers = list(layers)
        check_chain(self.layers)
        self.params = _DottedView(self.layers, "params")
        self.grads = _DottedView(self.layers, "grads")
        self.buffers = _DottedView(self.layers, "buffers")
        self._plan = None
        self._param_keys = [(f"{i}.{k}", layer, k) for i, layer in enumerate(self.layers) for k in layer.params]
        self._flat = None
        self.flat_layout()  # the parameters become views into one buffer per dtype from the start

    @property
    def dtype(self):
        """The dtype of the first layer that has one (inputs are cast to it)."""
        return next((l.dtype for l in self.layers if hasattr(l, "dtype")), "float64")

    @property
    def in_features(self):
        """The number of input features of a model that takes (N, D) input (None for images)."""
        shape = self.input_shape
        return shape[0] if shape is not None and len(shape) == 1 else None

    @property
    def input_shape(self):
        """The per-sample input shape the first layers imply: (784,) for mlp([784, ...]), (1, None, None)
        for a Conv2d(1, ...) first (None: any size the later layers allow); None if nothing is implied."""
        return next((shape for shape, _ in check_chain(self.layers) if shape is not None), None)

    def plan(self):
        """The execution plan (bnnet.engine.Plan) this model runs with: built on first use, rebuilt
        when the list of layers or the backend changes."""
        if self._plan is None or not self._plan.matches(self):
            self._plan = Plan(self)
        return self._plan

    def flat_layout(self):
        """The flat buffers the parameters and gradients live in (bnnet.flat.FlatLayout): laid out
        again, around the current values, when a parameter was replaced by another array; None while
        a parameter is not a float array (the optimizer's and the layers' checks then name it)."""
        flat = self._flat
        if flat is None or len(flat.layers) != len(self.layers) or not flat.current(self.layers):
            self._param_keys = [(f"{i}.{k}", layer, k) for i, layer in enumerate(self.layers) for k in layer.params]
            arrays = [layer.params[k] for _, layer, k in self._param_keys]
            self._flat = FlatLayout(self) if can_lay_out(arrays, backend.array_types()) else None
        return self._flat

    def forward(self, x, train, check_finite=False, check_input=True):
        """Run every layer. train: True for batch statistics (and running-stat updates), False for eval.

        x: (N, in_features), cast to the model's dtype (and copied to the GPU for a model there).
            Returns a new (N, out) array, on the model's device.
        check_finite: raise NonFiniteError naming the first layer whose output holds NaN/Inf
            (costs one pass over every activation; fit uses it with check_activations=True).
        check_input: refuse an x holding NaN/Inf with InputError (default True; one read pass over x).
            False lets NaN/Inf through, as NumPy would propagate them.
        """
        if self.device == "cuda":
            x = to_device(x, "cuda")  # a host batch is copied to the model's GPU
        x = self.layers[0]._input(x)
        if check_input:
            _check_finite(x, "x", "Sequential.forward")
        return self.plan().forward(x, train, check_finite)

    def backward(self, dy, input_grad=False):
        """Backpropagate dL/d(output) of the last forward through the layers in reverse; fills `grads`.

        input_grad: also compute and return dL/dx for the model's input (default
        False: nothing needs it in training, and it costs a matrix product).
        """
        return self.plan().backward(dy, input_grad)

    def to(self, device):
        """Move every parameter, buffer and gradient to `device` ("cpu" or "cuda"); returns self.

        "cuda" also selects the "cuda" backend (bnnet.device: the device and the
        backend go together) and needs an NVIDIA GPU with CuPy; "cpu" selects the
        default CPU backend again if "cuda" was active. Optimizer state follows on
        the optimizer's next step (it is created like the parameters).
        """
        from .device import check_device

        device = check_device("Sequential.to", device)
        if device == "cuda":
            backend.set_backend("cuda")  # says what is missing (CuPy, a GPU) before anything moves
        for layer in self.layers:
            for kind in ("params", "buffers", "grads"):
                arrays = getattr(layer, kind)
                for k, a in list(arrays.items()):
                    arrays[k] = to_device(a, device)
        if device == "cpu" and backend.get_backend() == "cuda":
            backend.set_backend("auto")
        self._plan = None  # its scratch buffers live on the old device
        self._flat = None
        self.flat_layout()  # the flat buffers on the new device, the parameters views into them again
        return self

    @property
    def device(self):
        """Where the parameters are: 'cuda' or 'cpu' (for a model without parameters, where the backend runs)."""
        first = next((a for l in self.layers for a in l.params.values()), None)
        if first is None:
            return "cuda" if backend.get_backend() == "cuda" else "cpu"
        return device_of(first)

    def named_parameters(self):
        """[(dotted name, param array, grad array or None)] in a fixed order, frozen ones included."""
        return [(name, layer.params[k], layer.grads.get(k)) for name, layer, k in self._param_keys]

    def trainable_parameters(self):
        """named_parameters without the frozen ones (what optimizers update)."""
        return [
            (name, layer.params[k], layer.grads.get(k))
            for name, layer, k in self._param_keys
            if k not in layer.frozen_params
        ]

    def summary(self, input_shape=None):
        """A table (bnnet.summary.ModelSummary: print it) of each layer's output shape for per-sample
        `input_shape` (default: what the first layers imply), its parameter and buffer counts, what
        is frozen, and the total memory of parameters and buffers."""
        from .summary import summarize

        return summarize(self, input_shape)

    @property
    def frozen_params(self):
        """The dotted names of the frozen parameters, in model order."""
        return [name for name, layer, k in self._param_keys if k in layer.frozen_params]

    def freeze(self, *names):
        """Freeze parameters: no update, no optimizer state, no part in clip_grad_norm. A frozen Linear's
        weight gradient is not computed (it stays zero); the fused kernels may still write the others'
        gradients, which nothing applies. names: layer indices (0, or "0": all of that layer's
        parameters) or dotted parameter names ("1.gamma"); none: every parameter. BatchNorm's running
        statistics are frozen apart, by bnnet.freeze_batchnorm."""
        self._set_frozen(names, True)
        return self

    def unfreeze(self, *names):
        """Undo freeze for these names (none: every parameter)."""
        self._set_frozen(names, False)
        return self

    def _set_frozen(self, names, freeze):
        owner = "freeze" if freeze else "unfreeze"
        chosen = {}  # layer index -> keys
        for name in names or range(len(self.layers)):
            text = str(name) if isinstance(name, (int, np.integer)) and not isinstance(name, bool) else name
            if not isinstance(text, str):
                raise HyperparameterError(f"{owner}: names must be layer indices or dotted names, got {name!r}")
            index, _, key = text.partition(".")
            if not index.isdigit() or int(index) >= len(self.layers):
                raise HyperparameterError(
                    f"{owner}: {name!r} names no layer of this {len(self.layers)}-layer model "
                    f"(use 0..{len(self.layers) - 1})"
                )
            layer = self.layers[int(index)]
            if key and key not in layer.params:
                raise HyperparameterError(
                    f"{owner}: layer {index} has no parameter {key!r} (it has {list(layer.params)})"
                )
            chosen.setdefault(int(index), set()).update([key] if key else layer.params)
        for i, keys in chosen.items():
            layer = self.layers[i]
            layer.set_frozen(layer.frozen_params | keys if freeze else layer.frozen_params - keys)

    def predict(self, X, batch_size=1024):
        """Eval-mode outputs for X (N, in_features) or (N, C, H, W), batch_size rows at a time -> (N, out),
        a NumPy array wherever the model is."""
        return to_host(self.outputs(X, batch_size, "predict"))

    def outputs(self, X, batch_size=1024, owner="predict"):
        """predict's outputs left on the model's device (each batch of X is copied there)."""
        batch_size = check_int(owner, "batch_size", batch_size, low=1)
        X = as_float_array(X, "X", owner, self.dtype)
        check_samples(X, "X", owner, self.input_shape)
        check_finite(X, "X", owner)
        device = self.device
        out = np.concatenate(
            [
                self.forward(to_device(X[i : i + batch_size], device), train=False, check_input=False)
                for i in range(0, len(X), batch_size)
            ]
        )
        with np.errstate(over="ignore", invalid="ignore"):
            finite = to_host(np.isfinite(out.reshape(len(out), -1)).all(axis=1))
        if not finite.all():
            bad = np.flatnonzero(~finite)
            raise NonFiniteError(
                f"{owner}: the outputs of {len(bad)} row(s) hold NaN or Inf (first: row {bad[0]}), "
                f"although X is finite: its values (largest |x| = {float(abs(X).max()):.3g}) overflow "
                f"{self.dtype} inside the model; scale the inputs as the training data was"
            )
        return out

    def config(self):
        """[{"type": "Linear", "in_features": ...}, ...]: enough to rebuild the model."""
        # A layer may be saved as the class it trains like (SyncBatchNorm loads as BatchNorm).
        return [{"type": getattr(l, "saved_as", type(l).__name__), **l.config()} for l in self.layers]

    def __len__(self):
        return len(self.layers)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_plan"] = None  # buffers of the last step: rebuilt on first use
        state["_flat"] = None  # laid out again on first use
        return state

    def __setstate__(self, state):
        state.setdefault("_plan", None)
        state["_flat"] = None
        for key in ("_grad_pool", "_out_shape"):
            state.pop(key, None)
        self.__dict__.update(state)

    def __getitem__(self, i):
        return self.layers[i]

    def __iter__(self):
        return iter(self.layers)

    def __repr__(self):
        body = "".join(f"\n  ({i}) {l!r}" for i, l in enumerate(self.layers))
        return f"Sequential({body}\n)"


def mlp(
    sizes,
    activation="relu",
    batchnorm=True,
    init="he",
    std=None,
    seed=None,
    dtype="float32",
    norm=None,
    norm_options=None,
):
    """A multilayer perceptron shaped like the lecture's network.

    Every hidden layer is   Linear(bias=False) -> BatchNorm -> activation   (the
    lecture's rule: beta replaces b), or Linear(bias=True) -> activation when
    batchnorm=False. The last layer is a Linear with bias and no activation
    (the loss takes logits).

    Args:
        sizes: [in, hidden_1, ..., hidden_k, out], at least two ints >= 1.
        activation: "relu" (default), "leaky_relu", "sigmoid" or "tanh".
        batchnorm: insert BatchNorm in every hidden layer (default True); the same as
            norm="batch" (True) or norm=None (False).
        norm: the normalization layer instead, when given: "batch" (BatchNorm), "renorm"
            (BatchRenorm), "ghost" (GhostBatchNorm), "layer" (LayerNorm), "group" (GroupNorm; its
            num_groups from norm_options, default the largest divisor of the width up to 32 that leaves
            each group two features) or "none".
            The Linear before a batch-statistics norm has no bias; before LayerNorm it keeps
            it (LayerNorm subtracts each row's mean over features, which does not cancel b).
        norm_options: keyword arguments for each norm layer, e.g. {"virtual_batch_size": 16}.
        init, std: weight initialization, see Linear.
        seed: None or int; one Generator draws every layer's weights in order.
        dtype: "float32" (default) or "float64".
    """
    if isinstance(sizes, (list, tuple, np.ndarray)):
        sizes = list(sizes)
    if not isinstance(sizes, list) or len(sizes) < 2:
        raise HyperparameterError(f"mlp: sizes must be a list [in, hidden..., out] of at least 2 ints, got {sizes!r}")
    sizes = [check_int("mlp", "sizes", s, low=1) for s in sizes]
    act = ACTIVATIONS[check_choice("mlp", "activation", activation, tuple(ACTIVATIONS))]
    if norm is None:
        norm = "batch" if batchnorm else "none"
    norm_cls = {**NORMS, "none": None}[check_choice("mlp", "norm", norm, (*NORMS, "none"))]
    rng = np.random.default_rng(check_seed("mlp", seed))
    layers = []
    for fan_in, fan_out in zip(sizes[:-2], sizes[1:-1]):
        bias = norm_cls is None or norm_cls in (LayerNorm, GroupNorm)  # (their means do not cancel b)
        layers.append(Linear(fan_in, fan_out, bias=bias, init=init, std=std, rng=rng, dtype=dtype))
        if norm_cls is not None:
            layers.append(_norm_layer("mlp", norm, norm_cls, fan_out, dtype, norm_options))
        layers.append(act())
    layers.append(Linear(sizes[-2], sizes[-1], bias=True, init=init, std=std, rng=rng, dtype=dtype))
    return Sequential(*layers)


def convnet(
    in_shape=(1, 28, 28),
    channels=(32, 64),
    hidden=(128,),
    classes=10,
    kernel_size=3,
    pool=2,
    activation="relu",
    batchnorm=True,
    norm=None,
    norm_options=None,
    init="he",
    seed=None,
    dtype="float32",
):
    """A convolutional network with Batch Norm in every block, as in the Ioffe & Szegedy paper.

    Each entry of `channels` is a block

        Conv2d(kernel_size, padding kernel_size // 2, bias=False) -> BatchNorm -> activation -> MaxPool2d(pool)

    (the padding keeps H and W; the pool divides them by `pool`), then

        Flatten -> [Linear(bias=False) -> BatchNorm -> activation] per entry of `hidden` -> Linear(classes)

    The convolution before BatchNorm has no bias for the same reason as the Linear: the
    per-channel mean subtraction cancels it, and beta takes its place.

    Args:
        in_shape: (C, H, W) of one input image (default (1, 28, 28)); H and W must stay >= 1
            through the pools.
        channels: output channels of each convolution block (default (32, 64)); may be empty.
        hidden: widths of the fully connected hidden layers (default (128,)); may be empty.
        classes: outputs of the last Linear (default 10).
        kernel_size: odd int, the convolutions' kernel (default 3).
        pool: max-pool size and stride after each block (default 2; 1 for no pooling).
        activation: "relu" (default), "leaky_relu", "sigmoid" or "tanh".
        batchnorm, norm, norm_options: as mlp; norm may be "batch", "renorm", "group" or "none" (the
            layer and virtual-batch variants take (N, D) input only).
        init, seed, dtype: as mlp.
    Input: (N, C, H, W). Output: (N, classes) logits.
    """
    owner = "convnet"
    if not isinstance(in_shape, (tuple, list)) or len(in_shape) != 3:
        raise HyperparameterError(f"{owner}: in_shape must be (channels, height, width), got {in_shape!r}")
    in_shape = [check_int(owner, "in_shape", d, low=1) for d in in_shape]
    channels = [check_int(owner, "channels", c, low=1) for c in _int_list(owner, "channels", channels)]
    hidden = [check_int(owner, "hidden", h, low=1) for h in _int_list(owner, "hidden", hidden)]
    classes = check_int(owner, "classes", classes, low=1)
    kernel_size = check_int(owner, "kernel_size", kernel_size, low=1)
    if kernel_size % 2 == 0:
        raise HyperparameterError(
            f"{owner}: kernel_size must be odd (the padding kernel_size // 2 then keeps "
            f"the image size), got {kernel_size}"
        )
    pool = check_int(owner, "pool", pool, low=1)
    act = ACTIVATIONS[check_choice(owner, "activation", activation, tuple(ACTIVATIONS))]
    if norm is None:
        norm = "batch" if batchnorm else "none"
    norm_cls = {"batch": BatchNorm, "renorm": NORMS["renorm"], "group": GroupNorm, "none": None}[
        check_choice(owner, "norm", norm, ("batch", "renorm", "group", "none"))
    ]
    bias = norm_cls in (None, GroupNorm)  # (a batch-statistics norm cancels b; GroupNorm's group means do not)
    rng = np.random.default_rng(check_seed(owner, seed))
    c, h, w = in_shape
    layers = []
    for out in channels:
        layers.append(Conv2d(c, out, kernel_size, padding=kernel_size // 2, bias=bias, init=init, rng=rng, dtype=dtype))
        if norm_cls is not None:
            layers.append(_norm_layer(owner, norm, norm_cls, out, dtype, norm_options))
        layers.append(act())
        if pool > 1:
            if h < pool or w < pool:
                raise HyperparameterError(
                    f"{owner}: {len(channels)} pools of {pool} shrink a {in_shape[1]}x"
                    f"{in_shape[2]} image below one pixel; use fewer channels entries or a "
                    "smaller pool"
                )
            layers.append(MaxPool2d(pool))
            h, w = h // pool, w // pool
        c = out
    layers.append(Flatten())
    width = c * h * w
    for size in hidden:
        layers.append(Linear(width, size, bias=bias, init=init, rng=rng, dtype=dtype))
        if norm_cls is not None:
            layers.append(_norm_layer(owner, norm, norm_cls, size, dtype, norm_options))
        layers.append(act())
        width = size
    layers.append(Linear(width, classes, bias=True, init=init, rng=rng, dtype=dtype))
    return Sequential(*layers)


def _norm_layer(owner, norm, norm_cls, features, dtype, norm_options):
    """norm_cls(features, dtype=dtype, **norm_options); a missing or unknown option is named.
    (GroupNorm: norm_cls(num_groups, features, ...), num_groups from the options or the largest
    divisor of features up to 32 that leaves two features per group.)"""
    if norm_options is not None and not isinstance(norm_options, dict):
        raise HyperparameterError(f"{owner}: norm_options must be a dict of keyword arguments, got {norm_options!r}")
    options = dict(norm_options or {})
    try:
        if norm_cls is GroupNorm:
            # (default: as many groups as divide the width, up to 32, keeping >= 2 features in each)
            default = max(g for g in range(1, 33) if features % g == 0 and (features // g >= 2 or g == 1))
            groups = options.pop("num_groups", default)
            return GroupNorm(groups, features, dtype=dtype, **options)
        return norm_cls(features, dtype=dtype, **options)
    except TypeError as e:
        raise HyperparameterError(
            f"{owner}: norm={norm!r} ({norm_cls.__name__}) cannot be built with norm_options={norm_options!r}: "
            f"{str(e).split(': ', 1)[-1]}"
        ) from None


def _int_list(owner, name, value):
    if isinstance(value, (list, tuple, np.ndarray)):
        return list(value)
    raise HyperparameterError(f"{owner}: {name} must be a list of ints, got {value!r}")


def first_nonfinite(model, x, train):
    """Where NaN/Inf first appears for input x: a parameter, the input, or a layer's output; None if nowhere.

    Runs one forward with the running statistics saved and restored, so that the
    diagnosis leaves the model as it was.
    """
    for name, p in model.params.items():
        if not np.isfinite(p).all():
            return f"parameter {name}"
    if not np.isfinite(x).all():
        return "the input batch"
    saved = {k: v.copy() for k, v in model.buffers.items()}
    try:
        model.forward(x, train, check_finite=True)
    except NonFiniteError as e:
        return str(e).replace(" produced NaN or Inf", "")
    finally:
        for k, v in saved.items():
            model.buffers[k] = v
    return None


def has_batchnorm(model):
    return any(isinstance(l, BatchNorm) for l in model.layers)
