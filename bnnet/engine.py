"""How a Sequential actually runs: its execution plan.

The layers (bnnet.layers) say what to compute. The plan decides how a whole
model runs, and is the only place that does:

    fusion     a BatchNorm or a Linear followed by an activation runs as one step:
               the activation is applied in the same pass over the data (FUSIONS);
    buffers    every step's output except the model's last is written into an
               array the plan keeps from step to step, and every dx into one of
               two arrays it alternates between, so a training step allocates
               nothing large; the model's output and any dx it returns are new
               arrays the caller owns;
    in place   a BatchNorm step writes its dx over its own input when that input
               is the plan's buffer and nothing later needs it (saves one (N, D)
               array: the kernels read each element before writing it).

Both backends run the same plan: the operations inside the steps go to the
numba kernels or to the NumPy reference through bnnet.ops (bnnet.backend
chooses), never through branches here or in the layers.

Checks: building a plan refuses layers that do not chain (each layer must
take the per-sample shape the layers before it produce, as far as it is known
without an input; a layer replaced in model.layers makes model.plan() build a
new plan), and the first forward for each input shape checks the whole chain
with that shape (a 32x32 image where the model was built for 28x28 is refused
with the layer that cannot take it, before anything runs). Before every forward
the plan makes sure every layer's arrays are what its configuration implies
(Layer.check_state: shape, dtype, layout of each params/buffers entry): in
full when an array was replaced or reshaped since the last check, by identity
and shape otherwise. So an assignment into the dicts between steps is caught
before a kernel runs. The kernels' own arguments are checked once more by
bnnet.ops.
"""

import numpy as np

from . import backend
from ._checks import as_float_array, per_sample
from .device import empty
from .errors import HyperparameterError, InputError, NonFiniteError
from .layers import BatchNorm, Linear, _Activation


def check_chain(layers, shape=None, error=HyperparameterError):
    """Raise `error` unless each layer takes the per-sample shape the layers before it give.

    shape: the per-sample shape of the input (a tuple), or None to start from what the
    first layer declares (Layer.in_shape; sizes not known yet are None and match anything).
    A BatchNorm over axis 1 takes (C, ...) of any rank: met with nothing known yet, it passes the
    question on to the next layer, whose input must then have its C channels first.
    Returns [(in shape, out shape)] per layer (None where nothing is known yet).
    """
    shapes, source, channels = [], "the input", None
    for i, layer in enumerate(layers):
        if shape is None and isinstance(layer, BatchNorm) and layer.axis == 1:
            channels = channels or (i, layer.num_features)  # (C, ...): the rank is the next layer's to say
            shapes.append((None, None))
            continue
        if shape is None:
            shape = layer.in_shape()
            if channels is not None and shape is not None and shape[0] not in (None, channels[1]):
                raise error(
                    f"Sequential: layer {i} ({type(layer).__name__}) takes {per_sample(shape)}, but layer "
                    f"{channels[0]} (BatchNorm) gives {channels[1]} channels: the layers do not chain"
                )
        try:
            out = None if shape is None else layer.out_shape(tuple(shape))
        except InputError as e:
            if i == 0:
                raise error(str(e)) from None
            raise error(f"Sequential: {e}, which is what {source} gives: the layers do not chain") from None
        shapes.append((shape, out))
        shape, source = out, f"layer {i} ({type(layer).__name__})"
        channels = None if shape is not None else channels
    return shapes


# --------------------------------------------------------------------------
# Steps: what runs, and what each step's backward needs
# --------------------------------------------------------------------------


class Step:
    """One layer, or a layer and the activation after it fused into one pass.

    forward/backward call the layer's _forward/_backward with the arrays the
    plan gives them to write into (a layer that cannot use them returns new ones).
    """

    def __init__(self, layer, activation=None):
        self.layer, self.activation = layer, activation
        self.layers = (layer,) if activation is None else (layer, activation)
        self.writes_out = layer.writes_out  # writes into the array it is given (else returns its own)
        # Whether the step's backward reads its output (activation gradients are written from it;
        # BatchNorm kernels read it), which then must stay intact until then.
        self.needs_output = layer.backward_reads_output or activation is not None
        # BatchNorm's backward may write dx over its input x (read before written, element by element).
        self.dx_over_input = isinstance(layer, BatchNorm) and layer.fusable

    def forward(self, x, train, out):
        if self.activation is not None:
            return self.layer._forward(x, train, out=out, activation=self.activation)
        return self.layer._forward(x, train, out=out)

    def backward(self, dy, input_grad, dx_out):
        return self.layer._backward(dy, input_grad, dx_out=dx_out)

    @property
    def name(self):
        return " + ".join(layer.name for layer in self.layers)


def _fuse_batchnorm(layer, nxt):
    return isinstance(layer, BatchNorm) and layer.fusable and isinstance(nxt, _Activation)


def _fuse_linear(layer, nxt):
    return type(layer) is Linear and isinstance(nxt, _Activation)


# Which layer pairs run as one step. Each rule: (layer, next layer) -> bool.
FUSIONS = (_fuse_batchnorm, _fuse_linear)


def schedule(layers):
    """The steps a list of layers runs as: fused pairs where a rule of FUSIONS allows, else one per layer."""
    steps, i = [], 0
    while i < len(layers):
        nxt = layers[i + 1] if i + 1 < len(layers) else None
        if nxt is not None and any(rule(layers[i], nxt) for rule in FUSIONS):
            steps.append(Step(layers[i], nxt))
            i += 2
        else:
            steps.append(Step(layers[i]))
            i += 1
    return steps


# --------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------


class Plan:
    """The schedule of one Sequential for the active backend, with its buffers.

    model.plan() builds it (and rebuilds it when the layers or the backend
    change). forward/backward take and return what Sequential's do, without
    validating the input beyond its width and dtype: a batch may have 0 rows
    (a data-parallel rank's empty shard still takes part in every collective).
    """

    def __init__(self, model):
        self.model = model
        self.layers = tuple(model.layers)
        self.shapes = check_chain(self.layers)
        self.backend = backend.get_backend()
        self.steps = schedule(self.layers)
        self._ends = np.cumsum([len(step.layers) for step in self.steps]) - 1  # each step's last layer
        self._step_shapes = {}  # per-sample input shape -> per-sample output shape of each step
        self._buffers = {}  # ("out", k) or ("dx", shape, 0/1) -> array kept across steps
        self._inputs = [None] * len(self.steps)
        self._owned = [False] * len(self.steps)  # whether step k's input is one of the plan's buffers
        self._out_shape = None
        self._accepted, self._accepted_train = [], False  # arrays the last full check accepted

    def matches(self, model):
        """Still valid for `model`: the same layer objects, in order, and the same backend."""
        return (
            self.backend == backend.get_backend()
            and len(model.layers) == len(self.layers)
            and all(a is b for a, b in zip(model.layers, self.layers))
        )

    def check(self, train):
        """Every layer's arrays against its configuration.

        The full check (Layer.check_state) runs when the plan is new or an array was
        replaced or reshaped since the last one; otherwise each array's identity and
        shape are compared with what that check accepted (two comparisons per array).
        """
        for layer, kind, key, a, shape in self._accepted:
            b = getattr(layer, kind).get(key)
            if b is not a or b.shape != shape:
                break
        else:
            if self._accepted and (not train or self._accepted_train):
                return
        for layer in self.layers:
            layer.check_state(train)
        self._accepted = [
            (layer, kind, key, getattr(layer, kind)[key], getattr(layer, kind)[key].shape)
            for layer in self.layers
            for kind, key in layer.state_spec()
        ]
        self._accepted_train = train  # (train mode also requires writable buffers)

    def _buffer(self, key, shape, like):
        """A buffer kept across steps: `shape`, like's dtype, on like's device."""
        buf = self._buffers.get(key)
        if buf is None or buf.shape != shape or buf.dtype != like.dtype or type(buf) is not type(like):
            buf = self._buffers[key] = empty(like, shape, like.dtype)
        return buf

    def forward(self, x, train, check_finite=False):
        """Run every step; returns a new (N, ...) array. x: (N, ...) in the model's dtype, N >= 0."""
        if not isinstance(train, (bool, np.bool_)):
            raise HyperparameterError(f"Sequential.forward: train must be True or False, got {train!r}")
        if train and self.model.eval_only:
            raise HyperparameterError(
                "Sequential.forward: this model was folded for inference (bnnet.fold_batchnorm) "
                "and has no batch statistics to train with; train the original model"
            )
        if not hasattr(x, "ndim") or isinstance(x, np.generic) or x.ndim < 2:
            raise InputError(f"Sequential.forward: x must be a batch (N, ...), got {getattr(x, 'shape', type(x))}")
        out_shapes = self._step_shapes.get(x.shape[1:])
        if out_shapes is None:  # the first batch of this shape: check the chain with it
            shapes = check_chain(self.layers, x.shape[1:], error=InputError)
            out_shapes = self._step_shapes[x.shape[1:]] = [shapes[e][1] for e in self._ends]
        self.check(train)
        last = len(self.steps) - 1
        owned = False  # the model's input belongs to the caller
        for k, step in enumerate(self.steps):
            self._inputs[k], self._owned[k] = x, owned
            out = None
            if k < last and step.writes_out:
                out = self._buffer(("out", k), (x.shape[0], *out_shapes[k]), x)
            x = step.forward(x, train, out)
            owned = out is not None and x is out
            if check_finite and not np.isfinite(x).all():
                raise NonFiniteError(f"{step.name} produced NaN or Inf")
        self._out_shape = x.shape
        # The caller owns what forward returns. A last step that returns a view of its input
        # (Flatten, an activation in place) would hand out a buffer the next forward overwrites,
        # or the caller's own x: such an output is copied (a new array costs nothing else).
        if x.base is not None or x is self._inputs[last]:
            x = x.copy()
        return x

    def backward(self, dy, input_grad=False):
        """Backpropagate dL/d(output) of the last forward; fills every layer's grads.

        input_grad: also return dL/dx of the model's input (a new array).
        """
        dy = as_float_array(dy, "dy", "Sequential.backward", self.model.dtype)
        if self._out_shape is None:
            raise InputError(
                "Sequential.backward: no forward to backpropagate through (backward was already "
                "called for the last forward, or forward never ran); call forward(x, train) first"
            )
        if dy.shape != self._out_shape:
            raise InputError(
                f"Sequential.backward: dy must have the shape of the last output {self._out_shape}, got {dy.shape}"
            )
        # (no re-check of the layers here: every array a kernel reads or writes in backward is
        # checked by bnnet.ops, matrix products check their own shapes, and grads are replaced
        # when they do not fit)
        for k in range(len(self.steps) - 1, -1, -1):
            step, x = self.steps[k], self._inputs[k]
            below = self.steps[k - 1] if k > 0 else None
            if k == 0 and not input_grad:
                dx_out = None  # nobody reads the model's dx (a first Linear skips it)
            elif step.dx_over_input and self._owned[k] and not below.needs_output:
                dx_out = x  # the step below's output, a buffer of the plan, dead once this step has read it
            else:  # alternate between two buffers per shape: this step's dy may sit in the other one
                dx_out = self._buffer(("dx", x.shape, k % 2), x.shape, x)
            dy = step.backward(dy, input_grad or k > 0, dx_out)
        self._out_shape = None  # the buffers of this forward are spent: a second backward needs a new forward
        return dy.copy() if input_grad else None
