"""Variants of Batch Norm, and Layer Norm, as layers: each one Batch Norm's operations (bnnet.ops:
the fused kernels of every backend) with a different choice of what is reduced over.

    BatchRenorm     Ioffe 2017: batch statistics corrected towards the running ones by r and d:
                    BN's moments, then BN's apply with gamma * r and gamma * d + beta
    GhostBatchNorm  Hoffer et al. 2017: statistics of small "virtual" batches inside a large one:
                    BN's forward and backward on each virtual batch's rows
    LayerNorm       Ba et al. 2016: statistics of each sample over its features: BN over the
                    (1, N, D) view of x, where every sample is a channel of D values
    GroupNorm       Wu and He 2018: statistics of each group of a sample's channels: BN over the
                    (1, N*G, C/G*H*W) view
    InstanceNorm2d  Ulyanov et al. 2016: GroupNorm with one group per channel

The first two keep BatchNorm's parameters, buffers and eval mode (running
statistics) and change only train mode.
"""

import numpy as np

from . import functional as F
from . import ops
from ._checks import check_bool, check_dtype, check_int, check_number, per_sample
from .device import contiguous, empty
from .equations import IDENTITY
from .errors import HyperparameterError, InputError
from .layers import LAYER_TYPES, BatchNorm, Layer, constant_arrays, on_rows


class BatchRenorm(BatchNorm):
    """Batch Renormalization (Ioffe 2017, Algorithm 1): train mode normalizes with the batch
    statistics, then corrects them towards moving averages mu and sigma of the batch statistics:

        sigma_B = sqrt(var_B + eps)
        r = clip(sigma_B / sigma, r_min, r_max)              (D,)  constant in backward
        d = clip((mu_B - mu) / sigma, -d_max, d_max)          (D,)  constant in backward
        x_hat = (x - mu_B) / sigma_B * r + d
        y = gamma * x_hat + beta
        mu    <- renorm_momentum * mu    + (1 - renorm_momentum) * mu_B       (after r and d)
        sigma <- renorm_momentum * sigma + (1 - renorm_momentum) * sigma_B

    mu and sigma are the buffers `renorm_mean` (starts at 0) and `renorm_std` (starts at 1).
    Eval mode is BatchNorm's: the running_mean/running_var buffers (what folding, ONNX export and
    recompute_bn_stats use). As TensorFlow and Keras keep them (running_std=True, the default),
    the running variance follows a running average of sigma_B rather than of var_B:

        running_mean <- decay * running_mean + (1 - decay) * mu_B
        s            <- decay * sqrt(running_var + eps) + (1 - decay) * sigma_B
        running_var  <- max(s^2 - eps, 0)
        (s starts at sqrt(running_var) before the first batch, as TF's moving_stddev)

    (running_std=False: BatchNorm's running average of var_B.) With r = 1, d = 0 (r_max = 1,
    d_max = 0) train mode is BatchNorm's.

    Args (besides BatchNorm's num_features, eps, decay, dtype, frozen; running_var defaults to
        "biased" here, as Keras's):
        running_std: keep the running variance as TF/Keras do (default True; see above).
        r_max: >= 1 (default 3.0, the paper's final value).
        d_max: >= 0 (default 5.0, the paper's final value).
        r_min: in (0, 1] (default None: 1 / r_max, as in the paper).
        renorm_momentum: weight of the old mu and sigma, in [0, 1] (default 0.99, Keras's;
            the paper's update rate alpha is 1 - renorm_momentum).
        warmup: number of train-mode batches over which r_max, r_min and d_max move
            linearly from 1, 1 and 0 to their values (default 0: from the start). The
            paper starts as plain BatchNorm and relaxes the clipping gradually, since
            the moving averages are poor at first.
    """

    fusable = False
    writes_out = False

    def __init__(
        self,
        num_features,
        r_max=3.0,
        d_max=5.0,
        warmup=0,
        eps=1e-5,
        decay=0.9,
        running_var="biased",
        dtype="float32",
        frozen=False,
        r_min=None,
        renorm_momentum=0.99,
        running_std=True,
    ):
        super().__init__(num_features, eps=eps, decay=decay, running_var=running_var, dtype=dtype, frozen=frozen)
        self.running_std = check_bool("BatchRenorm", "running_std", running_std)
        self.r_max = check_number("BatchRenorm", "r_max", r_max, low=1)
        self.d_max = check_number("BatchRenorm", "d_max", d_max, low=0)
        self.r_min = (
            None if r_min is None else check_number("BatchRenorm", "r_min", r_min, low=0, high=1, low_open=True)
        )
        self.renorm_momentum = check_number("BatchRenorm", "renorm_momentum", renorm_momentum, low=0, high=1)
        self.warmup = check_int("BatchRenorm", "warmup", warmup, low=0)
        self.buffers["renorm_mean"] = np.zeros(num_features, self.dtype)  # mu
        self.buffers["renorm_std"] = np.ones(num_features, self.dtype)  # sigma

    def state_spec(self):
        d = (self.num_features,)
        return {
            **super().state_spec(),
            ("buffers", "renorm_mean"): (d, self.dtype),
            ("buffers", "renorm_std"): (d, self.dtype),
        }

    def clipping(self):
        """(r_min, r_max, d_max) in effect for the next train-mode batch (the warm-up ramp)."""
        t = 1.0 if self.warmup == 0 else min(1.0, int(self.buffers["count"]) / self.warmup)
        r_max = 1.0 + (self.r_max - 1.0) * t
        r_min = 1.0 / r_max if self.r_min is None else 1.0 + (self.r_min - 1.0) * t
        return r_min, r_max, self.d_max * t

    @on_rows
    def _forward(self, x, train, out=None, activation=None):
        train = self._effective_train(x, train)
        if not train:
            return super()._forward(x, False)
        n, dtype = x.shape[0], x.dtype
        stats = empty(x, (3, self.num_features), np.float64)  # mu_B, var_B, 1 / sigma_B
        ops.bn_moments(x, stats[0], stats[1])
        mean, var = stats[0], stats[1]
        var /= n  # (M2 -> the biased variance)
        sigma_b = 1.0 / F.inverse_std(var, self.eps)  # sqrt(var_B + eps)
        mu = self.buffers["renorm_mean"].astype(np.float64)
        sigma = self.buffers["renorm_std"].astype(np.float64)
        r_min, r_max, d_max = self.clipping()
        r = np.clip(sigma_b / sigma, r_min, r_max)
        d = np.clip((mean - mu) / sigma, -d_max, d_max)
        # y = gamma * ((x - mu_B) / sigma_B * r + d) + beta: BN's apply with gamma * r and gamma * d + beta
        gamma = self.params["gamma"].astype(np.float64)
        y = empty(x, x.shape, dtype)
        scale, shift = (gamma * r).astype(dtype), (gamma * d + self.params["beta"]).astype(dtype)
        ops.bn_apply(x, scale, shift, self.eps, IDENTITY, 0.0, mean, var, y, stats[2])
        self.renorm = (r, d)
        if self.running_std:  # eval mode's statistics, as TF and Keras keep them
            self._update_running_std(mean, var, n)
        else:  # as BatchNorm
            self._update_running(mean, var, n)
        self.buffers["renorm_mean"][...] = F.running_average(mu, mean, self.renorm_momentum)
        self.buffers["renorm_std"][...] = F.running_average(sigma, sigma_b, self.renorm_momentum)
        self._cache = ("renorm", x, y, stats, scale, r, d)
        return y

    def _update_running_std(self, mean, var, m):
        """running_mean as BatchNorm's; running_var = s^2 - eps with s the running average of
        sqrt(var_B + eps), s read back from running_var (so that recompute_bn_stats and edits stay in
        force); count += 1."""
        decay, correction = self._running_update_args(m)
        running_mean, running_var = self.buffers["running_mean"], self.buffers["running_var"]
        # (before the first batch s starts at sqrt(running_var), as TF's moving_stddev initializer)
        s = np.sqrt(running_var.astype(np.float64) + (self.eps if int(self.buffers["count"]) else 0.0))
        s = F.running_average(s, np.sqrt(var * correction + self.eps), decay)
        running_mean[...] = F.running_average(running_mean.astype(np.float64), mean, decay)
        running_var[...] = np.maximum(s * s - self.eps, 0.0)
        self._count_batch(mean, var)

    @on_rows
    def _backward(self, dy, input_grad, dx_out=None):
        mode, x, *rest = self._cached()
        if mode != "renorm":  # eval mode or frozen: BatchNorm's cache
            return super()._backward(dy, input_grad)
        y, stats, scale, r, d = rest
        # r and d are constants: y depends on x through (x - mu_B) / sigma_B only, scaled by gamma * r,
        # which is BN's backward with gamma * r. Its sums give dbeta = sum(dy) and
        # sum(dy * x_norm), so dgamma = sum(dy * x_hat) = r * sum(dy * x_norm) + d * sum(dy).
        dx = empty(x, x.shape, x.dtype)
        sums = empty(x, (2, self.num_features), x.dtype)  # sum(dy * x_norm), sum(dy)
        ops.bn_backward(dy, y, x, stats[0], stats[2], scale, IDENTITY, 0.0, True, dx, sums[0], sums[1])
        self._grad("beta")[...] = sums[1]
        self._grad("gamma")[...] = r * sums[0] + d * sums[1]
        return dx

    def config(self):
        return {
            **super().config(),
            "r_max": self.r_max,
            "d_max": self.d_max,
            "warmup": self.warmup,
            "r_min": self.r_min,
            "renorm_momentum": self.renorm_momentum,
            "running_std": self.running_std,
        }


class GhostBatchNorm(BatchNorm):
    """Ghost Batch Normalization (Hoffer et al. 2017): in train mode the batch is cut into
    consecutive virtual batches of `virtual_batch_size` rows, each normalized with its own
    statistics (as BatchNorm would normalize it alone).

    The running statistics are updated once per virtual batch, in order (so that
    count grows by the number of virtual batches), exactly as if the virtual
    batches had been separate steps; Keras instead averages the virtual batches'
    statistics and updates once per batch. A trailing virtual batch of one row
    is merged into the one before it (one row has no variance). Eval mode is
    BatchNorm's.

    Images (N, C, H, W) are cut into virtual batches of `virtual_batch_size` samples, each
    normalized per channel over its samples' H x W values.

    Args (besides BatchNorm's): virtual_batch_size >= 2.
    """

    fusable = False
    writes_out = False

    def __init__(
        self,
        num_features,
        virtual_batch_size,
        eps=1e-5,
        decay=0.9,
        running_var="unbiased",
        dtype="float32",
        frozen=False,
    ):
        super().__init__(num_features, eps=eps, decay=decay, running_var=running_var, dtype=dtype, frozen=frozen)
        self.virtual_batch_size = check_int("GhostBatchNorm", "virtual_batch_size", virtual_batch_size, low=2)

    def _chunks(self, n):
        # the rows of N-D input are each sample's positions in turn (BatchNorm._rows): a virtual batch of
        # v samples is v * (positions per sample) consecutive rows
        bounds = list(range(0, n, self.virtual_batch_size * self._sample_rows)) + [n]
        if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
            del bounds[-2]  # merge a last single row into the previous virtual batch
        return list(zip(bounds[:-1], bounds[1:]))

    @on_rows
    def _forward(self, x, train, out=None, activation=None):
        train = self._effective_train(x, train)
        if not train:
            return super()._forward(x, False)
        y = empty(x, x.shape, x.dtype)
        gamma, beta, _, _ = self._affine(x)
        chunks = []
        for lo, hi in self._chunks(x.shape[0]):  # BN's forward on each virtual batch, in order
            stats = empty(x, (3, self.num_features), np.float64)  # mean, biased var, inv_std
            decay, correction = self._running_update_args(hi - lo)
            ops.bn_forward(
                x[lo:hi], gamma, beta, self.eps, IDENTITY, 0.0, True, *self._running(x), decay, correction,
                y[lo:hi], *stats,
            )  # fmt: skip
            self._count_batch(stats[0], stats[1])
            chunks.append((lo, hi, stats))
        self.batch_stats = None  # one per virtual batch: see the running statistics
        self._cache = ("ghost", x, y, chunks)
        return y

    @on_rows
    def _backward(self, dy, input_grad, dx_out=None):
        mode, x, *rest = self._cached()
        if mode != "ghost":  # eval mode or frozen: BatchNorm's cache
            return super()._backward(dy, input_grad)
        y, chunks = rest
        dx = empty(x, x.shape, x.dtype)
        gamma, _, dgamma, dbeta = self._affine(x)
        dgamma[...] = 0
        dbeta[...] = 0
        sums = empty(x, (2, self.num_features), x.dtype)  # one virtual batch's dgamma, dbeta
        for lo, hi, stats in chunks:  # BN's backward on each virtual batch
            ops.bn_backward(
                dy[lo:hi], y[lo:hi], x[lo:hi], stats[0], stats[2], gamma, IDENTITY, 0.0, True, dx[lo:hi], *sums
            )
            dgamma += sums[0]
            dbeta += sums[1]
        return dx

    def config(self):
        return {**super().config(), "virtual_batch_size": self.virtual_batch_size}


class _PerSampleNorm(Layer):
    """Statistics of each sample (or of each group of one sample's channels) instead of each feature
    over the batch: Batch Norm's forward and backward on a (1, R, M) view of x in which each of the R
    rows to normalize is a "channel" of M values, with gamma = 1 and beta = 0 per row; then the
    layer's own gamma and beta, per feature (LayerNorm, last axis) or per channel (GroupNorm, axis 1).
    The same in train and eval mode (no running statistics); a batch of one sample is fine.
    Subclasses set num_features, eps, affine, dtype and define _rows(x) -> R and affine_axis.
    """

    _constants = None  # per-row ones, zeros and sinks for BN's operations (see _per_row)
    affine_axis = -1  # the axis gamma and beta run along

    def _init_affine(self, affine):
        self.affine = check_bool(type(self).__name__, "affine", affine)
        if self.affine:
            self.params["gamma"] = np.ones(self.num_features, self.dtype)
            self.params["beta"] = np.zeros(self.num_features, self.dtype)

    def state_spec(self):
        if not self.affine:
            return {}
        return {
            ("params", "gamma"): ((self.num_features,), self.dtype),
            ("params", "beta"): ((self.num_features,), self.dtype),
        }

    def _view(self, a):
        """(1, R, M): the rows to normalize as BN's channels."""
        rows = self._rows(a)
        return a.reshape(1, rows, a.size // rows)

    def _broadcast(self, p, ndim):
        """gamma or beta shaped to broadcast over an ndim-D x along affine_axis."""
        shape = [1] * ndim
        shape[self.affine_axis] = self.num_features
        return p.reshape(shape)

    def _forward(self, x, train, out=None):
        rows = self._rows(x)
        x_hat = empty(x, x.shape, x.dtype)  # the normalized x, for backward
        stats = empty(x, (3, rows), np.float64)  # per row: mean, biased var, inv_std
        ones, zeros_, sink_mean, sink_var = self._per_row(x, rows)
        ops.bn_forward(
            self._view(x), ones, zeros_, self.eps, IDENTITY, 0.0, True, sink_mean, sink_var, 0.0, 1.0,
            self._view(x_hat), *stats,
        )  # fmt: skip
        self._cache = (x_hat, x, stats)  # (output-shaped first: Layer reads the shapes from the cache)
        if not self.affine:
            return x_hat.copy()  # (x_hat itself is kept for backward)
        gamma, beta = (self._broadcast(self.params[k], x.ndim) for k in ("gamma", "beta"))
        return (gamma * x_hat + beta).astype(x.dtype, copy=False)

    def _backward(self, dy, input_grad, dx_out=None):
        x_hat, x, stats = self._cached()
        g = dy
        if self.affine:
            axes = tuple(a for a in range(dy.ndim) if a != self.affine_axis % dy.ndim)
            self._grad("beta")[...] = dy.sum(axis=axes)
            self._grad("gamma")[...] = (dy * x_hat).sum(axis=axes)
            g = (dy * self._broadcast(self.params["gamma"], dy.ndim)).astype(x_hat.dtype, copy=False)  # dL/dx_hat
        g = contiguous(g, x_hat.dtype)  # (on g's own device)
        dx = empty(x_hat, x_hat.shape, x_hat.dtype)
        ones, _, sink_dgamma, sink_dbeta = self._per_row(x_hat, self._rows(x_hat))
        ops.bn_backward(
            self._view(g), self._view(x_hat), self._view(x), stats[0], stats[2], ones,
            IDENTITY, 0.0, True, self._view(dx), sink_dgamma, sink_dbeta,
        )  # fmt: skip
        return dx

    def _per_row(self, like, rows):
        """Per-row arrays for BN's operations on the (1, R, M) view: ones (its gamma), zeros (its beta)
        and two arrays it writes into that nothing reads (running statistics, or dgamma and dbeta)."""
        self._constants = constant_arrays(self._constants, like, (rows,), like.dtype, (1, 0, None, None))
        return self._constants


class LayerNorm(_PerSampleNorm):
    """Layer normalization (Ba et al. 2016): each sample normalized over its D features.

        mu_i = mean_j x_ij,   var_i = mean_j (x_ij - mu_i)^2    (biased, per row)
        y_ij = gamma_j * (x_ij - mu_i) / sqrt(var_i + eps) + beta_j

    The same in train and eval mode (no running statistics), and fine with a batch of one row.
    BN over the (1, N, D) view of x (see _PerSampleNorm). Matches torch.nn.LayerNorm(D, eps).

    Args: num_features D; eps (default 1e-5, as PyTorch); dtype "float32" (default) or "float64".
    Params: gamma (D,) ones, beta (D,) zeros. Needs D >= 2.
    """

    def __init__(self, num_features, eps=1e-5, dtype="float32"):
        super().__init__()
        self.num_features = check_int("LayerNorm", "num_features", num_features, low=2)
        self.eps = check_number("LayerNorm", "eps", eps, low=0, low_open=True)
        self.dtype = check_dtype("LayerNorm", dtype)
        self._init_affine(True)

    def in_shape(self):
        return (self.num_features,)

    def _rows(self, x):
        return x.shape[0]

    def config(self):
        return {"num_features": self.num_features, "eps": self.eps, "dtype": self.dtype}


class GroupNorm(_PerSampleNorm):
    """Group normalization (Wu and He 2018): the C channels of each sample split into G groups of C/G,
    each group normalized over its channels and positions; then gamma and beta per channel.

        x: (N, C, *S) -> (N, G, C/G * prod(S));  mu, var per (sample, group)   (biased variance)
        y = gamma_c * (x - mu) / sqrt(var + eps) + beta_c

    The same in train and eval mode, independent of the batch size: the usual choice when
    batches are too small for Batch Norm. G = 1 is LayerNorm over (C, *S); G = C is InstanceNorm.
    BN over the (1, N*G, C/G * prod(S)) view of x (see _PerSampleNorm). Matches
    torch.nn.GroupNorm(num_groups, num_channels, eps, affine).

    Args: num_groups G (divides num_channels); num_channels C; eps (default 1e-5); affine (default
        True: gamma and beta); dtype "float32" (default) or "float64".
    Params: gamma (C,) ones, beta (C,) zeros (when affine). Each group needs >= 2 values.
    """

    affine_axis = 1

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, dtype="float32"):
        super().__init__()
        owner = type(self).__name__
        self.num_groups = check_int(owner, "num_groups", num_groups, low=1)
        self.num_features = check_int(owner, "num_channels", num_channels, low=1)
        if self.num_features % self.num_groups:
            raise HyperparameterError(f"{owner}: num_groups={num_groups} must divide num_channels={num_channels}")
        self.eps = check_number(owner, "eps", eps, low=0, low_open=True)
        self.dtype = check_dtype(owner, dtype)
        self._init_affine(affine)

    @property
    def num_channels(self):
        return self.num_features

    def in_shape(self):
        return None  # (C,) or (C, *S): checked in out_shape

    def out_shape(self, shape):
        if len(shape) < 1 or shape[0] not in (None, self.num_features):
            raise InputError(f"{self.name}: x must be (N, {self.num_features}, ...), got {per_sample(shape)}")
        if all(d is not None for d in shape) and int(np.prod(shape)) // self.num_groups < 2:
            raise InputError(
                f"{self.name}: each of the {self.num_groups} groups needs at least 2 values to normalize, "
                f"got input {per_sample(shape)}"
            )
        return shape

    def _rows(self, x):
        return x.shape[0] * self.num_groups

    def config(self):
        return {
            "num_groups": self.num_groups,
            "num_channels": self.num_features,
            "eps": self.eps,
            "affine": self.affine,
            "dtype": self.dtype,
        }


class InstanceNorm2d(GroupNorm):
    """Instance normalization (Ulyanov et al. 2016): each channel of each image normalized over its
    H x W positions: GroupNorm with one group per channel. Matches torch.nn.InstanceNorm2d(C, eps,
    affine) (its default track_running_stats=False: the same in train and eval mode).

    Args: num_features C; eps (default 1e-5); affine (default False, as PyTorch); dtype.
    x: (N, C, H, W) with H * W >= 2.
    """

    def __init__(self, num_features, eps=1e-5, affine=False, dtype="float32"):
        super().__init__(num_features, num_features, eps=eps, affine=affine, dtype=dtype)

    def in_shape(self):
        return (self.num_features, None, None)

    def out_shape(self, shape):
        self._require(shape, self.in_shape())
        return super().out_shape(shape)

    def config(self):
        return {"num_features": self.num_features, "eps": self.eps, "affine": self.affine, "dtype": self.dtype}


NORMS = {"batch": BatchNorm, "renorm": BatchRenorm, "ghost": GhostBatchNorm, "layer": LayerNorm, "group": GroupNorm}
LAYER_TYPES.update({cls.__name__: cls for cls in (BatchRenorm, GhostBatchNorm, LayerNorm, GroupNorm, InstanceNorm2d)})
