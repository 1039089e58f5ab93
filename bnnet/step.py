"""A training step built once: forward, loss, backward (and the update) with nothing re-decided per call.

    step = bnnet.compile_step(model, bnnet.losses.SoftmaxCrossEntropy(), bnnet.optim.Adam(3e-3))
    for t in range(0, len(X), 60):
        loss, accuracy = step(X[t : t + 60], y[t : t + 60])      # the lecture's four lines, in one call

The interpreted path (model.forward -> loss -> model.backward -> opt.step) walks the layers, and
each layer hands its arrays to bnnet.ops, which checks them again at every call. A compiled step
does that work once, when it is built for (model, loss, optimizer, rows per batch, dtype, backend):

    checks     every layer's arrays against its configuration (Plan.check), the loss and the
               optimizer; between calls only the identity and shape of the arrays it holds are
               compared again (an assignment into `params`, `buffers`, `grads` or the optimizer
               state is still caught before a kernel runs, or laid out again when it is a valid
               array); the arrays a call reads and writes are looked up once per batch size
               (_Bound) and again only after such a change;
    buffers    every activation, statistic and gradient buffer is allocated for the largest batch
               (a smaller batch uses their first rows);
    program    the step becomes a list of calls: matrix products through NumPy's BLAS and the
               fused batch-norm / activation / loss passes of the active backend (bnnet.kernels, or
               bnnet.reference with BNNET_BACKEND=numpy), called directly with the checked arrays;
               the update is the optimizer's one call over the flat parameter buffer (bnnet.flat).

It runs exactly the functions the layers run, in the same order, with the same arguments, so its
numbers equal the layer-by-layer path bit for bit (tests/test_step.py). What it takes: a Sequential
in one dtype that ends in a Linear, any loss and any optimizer of bnnet, on the CPU. The longest
run of layers at the end made of blocks (a Linear, then optionally a normalization of (N, D) rows,
an activation and Dropout) and the last Linear is what the step runs itself: plain BatchNorm as the fused kernel
call, the other normalizations (Batch Renorm, Ghost BN, SyncBatchNorm, LayerNorm, GroupNorm) through
their layers' own _forward/_backward, as the plan runs them. The layers before that run (a convnet's
convolutions, pooling and Flatten) run through an execution plan of their own (bnnet.engine), the
same calls the model's plan makes. `compilable(...)` names what stands in the way; `fit` then runs
the interpreted step (the cuda backend, mixed dtypes). In data-parallel training each rank's shard
runs as a compiled step (a SyncBatchNorm's collectives inside it), the gradient allreduce after it.

Why a list of calls and not one compiled function: numba reaches a BLAS only through SciPy, and the
products are about half of a paper-net step either way; the calls between them are few (two per
hidden layer and pass) and each one runs a compiled kernel (measured in docs/performance.md).
"""

import numpy as np

from . import backend, ops, threads
from . import functional as F
from ._checks import as_float_array, check_int
from .device import device_of
from .dropout import Dropout
from .engine import Plan, _fuse_batchnorm, check_chain
from .errors import HyperparameterError, InputError
from .layers import BatchNorm, Linear, _Activation
from .losses import MSE, BinaryCrossEntropy, SoftmaxCrossEntropy
from .normalization import _PerSampleNorm


def _is_norm(layer):
    """A normalization the compiled step takes: BatchNorm and its variants (Renorm, Ghost BN,
    SyncBatchNorm), LayerNorm and GroupNorm."""
    return isinstance(layer, (BatchNorm, _PerSampleNorm))


def compilable(model, loss, optimizer=None):
    """None when compile_step can build a step for these, else the reason it cannot (a sentence)."""
    from .model import Sequential
    from .optim import Optimizer

    if not isinstance(model, Sequential):
        return f"the model must be a bnnet Sequential, got {type(model).__name__}"
    if type(loss) not in (SoftmaxCrossEntropy, BinaryCrossEntropy, MSE):
        return f"the loss must be one of bnnet.losses' (SoftmaxCrossEntropy, BinaryCrossEntropy, MSE), got {loss!r}"
    if optimizer is not None and not isinstance(optimizer, Optimizer):
        return f"the optimizer must be a bnnet.optim Optimizer or None, got {type(optimizer).__name__}"
    if backend.get_backend() not in ("numba", "numpy") or model.device != "cpu":
        return "it runs on the CPU backends (numba, numpy)"
    if model.eval_only:
        return "the model was folded for inference"
    dtypes = {layer.dtype for layer in model.layers if hasattr(layer, "dtype")}
    if len(dtypes) > 1:
        return f"its layers mix dtypes ({', '.join(sorted(dtypes))}); the compiled step runs in one"
    if not model.layers or type(model.layers[-1]) is not Linear:
        return "the model must end in a Linear layer (the loss takes its outputs)"
    return None


def _in_tail(layer):
    """A layer of the blocks the step runs itself: Linear, a normalization of (N, D) rows (every option:
    affine, track_running_stats, frozen, decay, running_var), an activation, Dropout."""
    return type(layer) is Linear or _is_norm(layer) or isinstance(layer, (_Activation, Dropout))


def _split(layers):
    """(prefix, blocks, last Linear): the longest run of layers at the end that forms blocks
    (Linear [-> normalization] [-> activation] [-> Dropout]) and the last Linear, and the layers
    before it (convolutions, pooling, Flatten, ...), which run through their own plan."""
    layers = list(layers)
    start = len(layers) - 1
    while start > 0 and _in_tail(layers[start - 1]):
        start -= 1
    for first in range(start, len(layers)):  # the run must start with a Linear and follow the grammar
        if type(layers[first]) is Linear:
            try:
                blocks, last = CompiledStep._schedule(layers[first:])
            except HyperparameterError:
                continue
            return layers[:first], blocks, last
    raise AssertionError("unreachable: compilable checked that the model ends in a Linear")


def compile_step(model, loss, optimizer=None, batch_size=None):
    """A CompiledStep for `model` trained with `loss` (and `optimizer`, applied by each call when given).

    loss: a bnnet.losses Loss or its name ("softmax_cross_entropy", "binary_cross_entropy", "mse");
    optimizer: None (default: gradients only), an Optimizer, or a name with its default learning rate.
    batch_size: the most rows a call will get (default: the first call's); more rebuilds the buffers.
    Raises HyperparameterError naming what cannot be compiled (see compilable).
    """
    from .losses import get_loss
    from .optim import get_optimizer

    loss = get_loss(loss)  # (a Loss, or a name as fit takes it)
    optimizer = None if optimizer is None else get_optimizer(optimizer)
    if batch_size is not None:
        batch_size = check_int("compile_step", "batch_size", batch_size, low=1)
    reason = compilable(model, loss, optimizer)
    if reason is not None:
        raise HyperparameterError(f"compile_step: cannot compile this step: {reason}")
    return CompiledStep(model, loss, optimizer, batch_size)


class _Prefix:
    """What the plan of the layers before the blocks needs to know of their model."""

    eval_only = False

    def __init__(self, layers, dtype):
        self.layers, self.dtype = list(layers), dtype


class _Hidden:
    """One hidden block: Linear [-> normalization] [-> activation] [-> Dropout]. A plain BatchNorm and
    its activation run as the fused kernel call the plan makes (`direct`); any other normalization runs
    through the layers' own _forward/_backward, fused with the activation where the plan fuses them."""

    def __init__(self, linear, norm, act, drop=None):
        self.linear, self.norm, self.act, self.drop = linear, norm, act, drop
        self.direct = type(norm) is BatchNorm
        # (the plan's own fusion rule: a fusable BatchNorm subclass, SyncBatchNorm, and its activation)
        self.fused = norm is not None and not self.direct and _fuse_batchnorm(norm, act)

    @property
    def activation(self):
        """(code, slope) of the activation the fused passes apply (read each step, as the layers do)."""
        return self.act.kernel_code if self.act is not None else (ops.IDENTITY, 0.0)


class CompiledStep:
    """One training step of a fixed model, loss and optimizer, built once (see the module docstring).

    Calling it with (X_t (N, D), y_t (N,)) runs forward in train mode, the loss, backward (filling
    model.grads) and, when an optimizer was given, its update; returns (loss, accuracy), accuracy
    None for regression.
    """

    def __init__(self, model, loss, optimizer=None, batch_size=None):
        self.model, self.loss, self.optimizer = model, loss, optimizer
        self.dtype = np.dtype(model.dtype)
        self.backend = backend.get_backend()
        self.layers = tuple(model.layers)
        prefix, self.blocks, self.last = _split(model.layers)
        # the layers before the first block (a convnet's convolutions, pooling and Flatten) run through
        # the execution plan of their own, as the model's plan runs them: the same calls, in order
        self.prefix = Plan(_Prefix(prefix, model.dtype)) if prefix else None
        self._checked_shapes = set()  # input shapes the whole chain was checked with
        self._bound = None  # the arrays of the last call's batch size (_Bound)
        self._plan = None  # the model's plan, as the last _recheck checked it
        self.capacity = 0
        if batch_size is not None:
            self._allocate(batch_size)

    # -- building -----------------------------------------------------------------

    @staticmethod
    def _schedule(layers):
        """[_Hidden] and the last Linear, from the layer list (compilable has checked its shape)."""
        blocks, i, layers = [], 0, list(layers)
        while i < len(layers) - 1:
            linear, norm, act = layers[i], None, None
            if not isinstance(linear, Linear):
                raise HyperparameterError(
                    f"compile_step: {linear.name} must follow a Linear "
                    "(Linear [-> normalization] [-> activation] [-> Dropout])"
                )
            i += 1
            if i < len(layers) - 1 and _is_norm(layers[i]):
                norm, i = layers[i], i + 1
            if i < len(layers) - 1 and isinstance(layers[i], _Activation):
                act, i = layers[i], i + 1
            drop = None
            if i < len(layers) - 1 and isinstance(layers[i], Dropout):
                drop, i = layers[i], i + 1
            blocks.append(_Hidden(linear, norm, act, drop))
        return blocks, layers[-1]

    def _allocate(self, rows):
        """Buffers for `rows` rows: per block z (the Linear's output) and a (the block's output), the
        float64 statistics of each BatchNorm, the logits and their gradient, two dx buffers."""
        empty = np.empty
        self.capacity, self._bound = rows, None
        self.z = [empty((rows, b.linear.out_features), self.dtype) for b in self.blocks]
        self.a = [empty((rows, b.linear.out_features), self.dtype) if b.norm is not None else None for b in self.blocks]
        self.stats = [empty((3, b.linear.out_features), np.float64) if b.direct else None for b in self.blocks]
        self.logits = empty((rows, self.last.out_features), self.dtype)
        self.dlogits = np.empty_like(self.logits)
        # dx of every Linear but the first (the first too when a prefix needs it), alternating between
        # two buffers (one is the dy being read)
        below = self.blocks if self.prefix is not None else self.blocks[1:]
        widest = max([b.linear.in_features for b in below] + [self.last.in_features])
        self.dx = [empty((rows * widest,), self.dtype) for _ in range(2)]

    # -- running --------------------------------------------------------------------

    def __call__(self, X_t, y_t, check_input=True):
        """(loss, accuracy) of one mini-batch; gradients in model.grads, then the update (when an optimizer
        was given). check_input=False skips the NaN/Inf scan of X_t (fit checks its data once)."""
        loss, acc = self.gradients(X_t, y_t, check_input)
        if self.optimizer is not None:
            self.optimizer.step(self.model)
        return loss, acc

    def gradients(self, X_t, y_t, check_input=True, share=None, sample_weight=None):
        """Forward (train mode), loss and backward for one mini-batch; returns (loss, accuracy).

        share: this process's fraction of a larger mini-batch (data-parallel training), which scales
        the loss gradient as the layer-by-layer bnnet.train.Step does (default None: the mean over
        these rows). sample_weight: optional (N,) row weights of the loss (bnnet.losses)."""
        x, y = self._arguments(X_t, y_t, check_input)
        n = len(x)
        if n > self.capacity:
            self._allocate(n)
        bound = self._bound_for(n)
        impl = backend.impl()
        if self.prefix is not None:  # (N, ...) -> (N, F): the layers before the blocks, through their plan
            x = self.prefix.forward(x, True)
        # forward: z = x @ W; a = g(BN(z)) in one pass (or g(z + b) without BatchNorm)
        inputs, trains = [], [False] * len(self.blocks)  # each block's input; batch statistics used?
        for k, (b, r) in enumerate(zip(self.blocks, bound.blocks)):
            code, slope = b.activation
            z = r.z
            threads.for_gemm(r.macs)
            np.matmul(x, r.W, out=z)
            inputs.append(x)
            if r.bias is not None and (b.norm is not None or b.act is None):
                z += r.bias  # (cancelled by a normalization's mean subtraction, but computed as the layer does)
            if b.norm is not None and not b.direct:
                x = self._layers_forward(b, z, r.a)
            elif b.norm is not None:
                x, trains[k] = self._norm_forward(b.norm, r, code, slope, impl)
            elif b.act is not None:  # as Linear's fused forward: z <- g(z + b) in one pass
                impl.bias_activation(z, r.bias if r.bias is not None else r.zero_bias, code, float(slope))
                x = z
            else:
                x = z
            if b.drop is not None:
                x = b.drop._forward(x, True)
        r = bound.last
        threads.for_gemm(r.macs)
        np.matmul(x, r.W, out=r.z)
        if r.bias is not None:
            r.z += r.bias
        loss, acc, dlogits = self._loss(r.z, y, impl, sample_weight)
        if share is not None:
            dlogits = dlogits * share  # (as Step: a new array, the same rounding)
        # backward: the last Linear, then each block from the top
        below = self.prefix is not None  # (the prefix's backward takes the first Linear's dx)
        dy = self._linear_backward(self.last, r, x, dlogits)
        for k in range(len(self.blocks) - 1, -1, -1):
            b, r = self.blocks[k], bound.blocks[k]
            code, slope = b.activation
            if b.drop is not None:
                dy = b.drop._backward(dy, True)
            if b.norm is not None and not b.direct:
                dz = self._layers_backward(b, dy)
            elif b.norm is not None:
                # BatchNorm's dx over its own input z (each element read before written), as the plan does
                impl.bn_backward(
                    dy, r.a, r.z, r.mean, r.inv_std, r.gamma, code, float(slope), trains[k], r.z, r.dgamma, r.dbeta
                )
                dz = r.z
            else:
                dz = dy if b.act is None else b.act.grad_from_output(dy, r.z)
            dy = self._linear_backward(b.linear, r, inputs[k], dz)
        if below:
            self.prefix.backward(dy)
        self._plan._out_shape = None  # the interpreted path's forward is spent (its buffers are not ours)
        return loss, acc

    def _bound_for(self, n):
        """The arrays a call with n rows reads and writes (_Bound), looked up once and kept while the
        plan's last full check still holds (the same arrays: see Plan.check) and every gradient is
        still the array it was (identity, shape, writable); else looked up again, as the layers
        would look them up (Layer._grad, BatchNorm._affine and _running)."""
        bound, plan = self._bound, self._plan  # (the plan _recheck has just checked)
        if bound is not None and bound.n == n and bound.plan is plan and bound.accepted is plan._accepted:
            for grads, key, g, shape in bound.grads:
                if grads.get(key) is not g or g.shape != shape or not g.flags.writeable:
                    break
            else:
                return bound
        self._bound = bound = _Bound(self, n, plan)
        return bound

    def _arguments(self, X_t, y_t, check_input):
        """The batch as the kernels need it, after the model's arrays are re-checked (identity, shape).

        check_input=False (fit, which checked its data once) skips the NaN/Inf scan of X_t and the
        conversion of integer labels; their shape is still checked, and the loss kernel checks each
        label's range before it uses it.
        """
        if self.backend != backend.get_backend():
            raise HyperparameterError("CompiledStep: the backend changed since the step was built; build a new one")
        self._recheck()
        if self.prefix is not None:  # (converted as model.forward converts it: by the first layer)
            x = self.layers[0]._input(X_t)
        elif type(X_t) is np.ndarray and X_t.dtype == self.dtype:
            x = X_t  # (what as_float_array returns for it)
        else:
            x = as_float_array(X_t, "X_t", "CompiledStep", self.dtype.name)
        if type(x) is not np.ndarray and device_of(x) != "cpu":
            raise InputError("CompiledStep: X_t must be a host array (the compiled step runs on the CPU)")
        if self.prefix is not None:
            if x.ndim < 2:
                raise InputError(f"CompiledStep: X_t must be a batch (N, ...), got shape {x.shape}")
            if x.shape[1:] not in self._checked_shapes:  # every layer takes it (else InputError naming one)
                check_chain(self.layers, x.shape[1:], error=InputError)
                self._checked_shapes.add(x.shape[1:])
        elif x.ndim != 2 or x.shape[1] != self.blocks_in():
            raise InputError(f"CompiledStep: X_t must be a (N, {self.blocks_in()}) host array, got shape {x.shape}")
        if not x.flags.c_contiguous:
            x = np.ascontiguousarray(x)
        if check_input:
            ops.check_finite(x, "X_t", "CompiledStep")
        if type(self.loss) is not SoftmaxCrossEntropy:
            return x, y_t  # (the loss checks its targets itself)
        trusted = not check_input and isinstance(y_t, np.ndarray) and y_t.dtype.kind in "iu"
        y = y_t if trusted else self.loss.check_targets(y_t, self.last.out_features)
        if y.shape != (len(x),):
            raise InputError(f"CompiledStep: X_t has {len(x)} rows but y_t has shape {y.shape}")
        return x, y

    def _recheck(self):
        """The model's layers are those the step was built for, and their arrays what they were
        (identity and shape; the full check of Layer.check_state when one was replaced)."""
        model = self.model
        if len(model.layers) != len(self.layers) or any(a is not b for a, b in zip(model.layers, self.layers)):
            raise HyperparameterError(
                "CompiledStep: the model's layers changed since the step was built; build a new one"
            )
        self._plan = model.plan()
        self._plan.check(True)

    def blocks_in(self):
        return self.blocks[0].linear.in_features if self.blocks else self.last.in_features

    @staticmethod
    def _layers_forward(block, z, out):
        """A normalization other than plain BatchNorm, and the activation after it, through the layers'
        own _forward: as one step with the activation where the plan fuses them (BatchNorm's
        fusable subclasses: SyncBatchNorm), else one after the other."""
        norm, act = block.norm, block.act
        if block.fused:
            return norm._forward(z, True, out=out, activation=act)
        y = norm._forward(z, True, out=out if norm.writes_out else None)
        return y if act is None else act._forward(y, True)

    @staticmethod
    def _layers_backward(block, dy):
        """The backward of _layers_forward: dL/dz from dL/d(block output before Dropout)."""
        if block.act is not None and not block.fused:  # (a fused step's backward includes its activation)
            dy = block.act._backward(dy, True)
        return block.norm._backward(dy, True)

    @staticmethod
    def _norm_forward(norm, r, code, slope, impl):
        """BatchNorm._forward's kernel call, with the same arguments and side effects: batch or running
        statistics (frozen, or track_running_stats=False), gamma/beta or the affine=False constants,
        the running update and its count. Returns (a, whether batch statistics were used)."""
        z = r.z
        # (refuses a 1-row batch that would need statistics, warns on untrained running statistics)
        train = True if len(z) > 1 and not norm.frozen else norm._effective_train(z, True)
        decay, correction = norm._running_update_args(len(z))
        impl.bn_forward(
            z, r.gamma, r.beta, float(norm.eps), code, float(slope), train, r.running_mean, r.running_var,
            float(decay), float(correction), r.a, r.mean, r.var, r.inv_std,
        )  # fmt: skip
        if train:
            norm._count_batch(r.mean, r.var)
        return r.a, train

    @staticmethod
    def _linear_backward(linear, r, x, dz):
        """dW = x.T @ dz, db = sum(dz), and dx = dz @ W.T into a dx buffer when the layer below needs it."""
        threads.for_gemm(r.macs)
        dx, _, _ = F.linear_backward(
            dz, x, r.W, r.bias is not None, r.dx is not None, r.dx, r.dW, r.db,
            weight_grad="W" not in linear.frozen_params,
        )  # fmt: skip
        return dx

    def _loss(self, logits, y, impl, sample_weight=None):
        """(loss, accuracy, dL/dlogits) as loss.forward, loss.accuracy and loss.backward give them."""
        dlogits = self.dlogits[: len(logits)]
        if type(self.loss) is SoftmaxCrossEntropy and sample_weight is None:
            loss = float(impl.softmax_cross_entropy(logits, y, dlogits))
            if loss < 0:
                c = logits.shape[1]
                raise InputError(f"CompiledStep: labels must be in [0, {c}), got values in [{y.min()}, {y.max()}]")
            return loss, self.loss.accuracy(logits, y), dlogits
        loss = self.loss.forward(logits, y) if sample_weight is None else self.loss.forward(logits, y, sample_weight)
        return loss, self.loss.accuracy(logits, y), self.loss.backward()


class _Rows:
    """One Linear's arrays for a batch of n rows (and its block's, when it has one)."""

    def __init__(self, linear, z, dx, grads):
        self.W = linear.params["W"]  # (in, out)
        self.bias = linear.params["b"] if linear.bias else None
        self.z, self.dx = z, dx  # (n, out) output; (n, in) input gradient, or None when nobody reads it
        self.macs = len(z) * self.W.shape[0] * self.W.shape[1]  # (threads.for_gemm's rule)
        self.dW = linear._grad("W")
        self.db = linear._grad("b") if linear.bias else None
        grads.extend((linear.grads, key, linear.grads[key], linear.grads[key].shape) for key in linear.params)


class _Bound:
    """Every array one call with n rows reads and writes, as the layers look them up at each call
    (gradients through Layer._grad, gamma/beta through BatchNorm._affine, the running statistics
    through _running). CompiledStep._bound_for keeps it while those lookups would give the same arrays."""

    def __init__(self, step, n, plan):
        self.n, self.plan, self.accepted = n, plan, plan._accepted
        self.grads = []  # (grads dict, key, array, shape) of every gradient it writes
        below = step.prefix is not None
        self.blocks = []
        for k, b in enumerate(step.blocks):
            width = b.linear.in_features
            dx = step.dx[(len(step.blocks) - k) % 2][: n * width].reshape(n, width) if k > 0 or below else None
            r = _Rows(b.linear, step.z[k][:n], dx, self.grads)
            r.a = step.a[k][:n] if step.a[k] is not None else None
            if b.act is not None and b.norm is None and r.bias is None:
                r.zero_bias = np.zeros(b.linear.out_features, step.dtype)
            if b.direct:
                r.mean, r.var, r.inv_std = step.stats[k]
                r.gamma, r.beta, r.dgamma, r.dbeta = b.norm._affine(r.z)
                r.running_mean, r.running_var = b.norm._running(r.z)
                self.grads.extend(
                    (b.norm.grads, key, b.norm.grads[key], b.norm.grads[key].shape) for key in b.norm.params
                )
            self.blocks.append(r)
        width = step.last.in_features
        dx = step.dx[0][: n * width].reshape(n, width) if step.blocks or below else None
        self.last = _Rows(step.last, step.logits[:n], dx, self.grads)
