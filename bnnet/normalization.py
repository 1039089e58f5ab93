"""Variants of Batch Norm, and Layer Norm, as layers: each one Batch Norm's operations (bnnet.ops:
the fused kernels of every backend) with a different choice of what is reduced over.

    BatchRenorm     Ioffe 2017: batch statistics corrected towards the running ones by r and d:
                    BN's moments, then BN's apply with gamma * r and gamma * d + beta
    GhostBatchNorm  Hoffer et al. 2017: statistics of small "virtual" batches inside a large one:
                    BN's forward and backward on each virtual batch's rows
    LayerNorm       Ba et al. 2016: statistics of each sample over its features: BN over the
                    (1, N, D) view of x, where every sample is a channel of D values

The first two keep BatchNorm's parameters, buffers and eval mode (running
statistics) and change only train mode.
"""

import numpy as np

from . import functional as F
from . import ops
from ._checks import check_dtype, check_int, check_number
from .device import empty
from .equations import IDENTITY
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
    Eval mode is BatchNorm's: the running_mean/running_var buffers, updated from the batch
    mean and variance with `decay` as in BatchNorm; Keras does the same ("inference is the same
    for either value of renorm"), which is what folding, ONNX export and recompute_bn_stats
    use. With r = 1, d = 0 (r_max = 1, d_max = 0) train mode is BatchNorm's.

    Args (besides BatchNorm's num_features, eps, decay, running_var, dtype, frozen):
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
        running_var="unbiased",
        dtype="float32",
        frozen=False,
        r_min=None,
        renorm_momentum=0.99,
    ):
        super().__init__(num_features, eps=eps, decay=decay, running_var=running_var, dtype=dtype, frozen=frozen)
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
        self._update_running(mean, var, n)  # eval mode's statistics, as BatchNorm
        self.buffers["renorm_mean"][...] = F.running_average(mu, mean, self.renorm_momentum)
        self.buffers["renorm_std"][...] = F.running_average(sigma, sigma_b, self.renorm_momentum)
        self._cache = ("renorm", x, y, stats, scale, r, d)
        return y

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


class LayerNorm(Layer):
    """Layer normalization (Ba et al. 2016): each sample normalized over its D features.

        mu_i = mean_j x_ij,   var_i = mean_j (x_ij - mu_i)^2    (biased, per row)
        y_ij = gamma_j * (x_ij - mu_i) / sqrt(var_i + eps) + beta_j

    The same in train and eval mode (no running statistics), and fine with a
    batch of one row. The statistics are BatchNorm's equations on x.T (the
    batch axis and the feature axis swap roles), so the closed-form backward
    is shared too. Matches torch.nn.LayerNorm(D, eps).

    Args: num_features D; eps (default 1e-5, as PyTorch); dtype "float32" (default) or "float64".
    Params: gamma (D,) ones, beta (D,) zeros. Needs D >= 2.
    """

    _constants = None  # per-sample ones, zeros and sinks for BN's operations (see _per_sample)

    def __init__(self, num_features, eps=1e-5, dtype="float32"):
        super().__init__()
        self.num_features = check_int("LayerNorm", "num_features", num_features, low=2)
        self.eps = check_number("LayerNorm", "eps", eps, low=0, low_open=True)
        self.dtype = check_dtype("LayerNorm", dtype)
        self.params["gamma"] = np.ones(num_features, self.dtype)
        self.params["beta"] = np.zeros(num_features, self.dtype)

    def in_shape(self):
        return (self.num_features,)

    def state_spec(self):
        return {
            ("params", "gamma"): ((self.num_features,), self.dtype),
            ("params", "beta"): ((self.num_features,), self.dtype),
        }

    def _forward(self, x, train, out=None):
        # BN's forward over the (1, N, D) view of x: each sample is a channel whose D values are
        # normalized together, with gamma = 1, beta = 0 per sample; then LayerNorm's own gamma and
        # beta per feature. (Batch statistics in train and eval mode alike: no running update.)
        n = x.shape[0]
        x3 = x.reshape(1, n, self.num_features)
        x_hat = empty(x, x.shape, x.dtype)  # (N, D)
        stats = empty(x, (3, n), np.float64)  # per sample: mean, biased var, inv_std
        ones, zeros_, sink_mean, sink_var = self._per_sample(x, n)
        ops.bn_forward(
            x3, ones, zeros_, self.eps, IDENTITY, 0.0, True, sink_mean, sink_var, 0.0, 1.0,
            x_hat.reshape(1, n, self.num_features), *stats,
        )  # fmt: skip
        self._cache = (x_hat, x, stats)  # (output-shaped first: Layer reads the shapes from the cache)
        return (self.params["gamma"] * x_hat + self.params["beta"]).astype(x.dtype, copy=False)

    def _backward(self, dy, input_grad, dx_out=None):
        x_hat, x, stats = self._cached()
        n = x_hat.shape[0]
        x3 = x.reshape(1, n, self.num_features)
        self._grad("beta")[...] = dy.sum(axis=0)
        self._grad("gamma")[...] = (dy * x_hat).sum(axis=0)
        g = (dy * self.params["gamma"]).astype(x_hat.dtype, copy=False)  # dL/dx_hat (N, D)
        dx = empty(x_hat, x_hat.shape, x_hat.dtype)
        ones, _, sink_dgamma, sink_dbeta = self._per_sample(x_hat, n)
        ops.bn_backward(
            g.reshape(1, n, self.num_features), x_hat.reshape(1, n, self.num_features), x3, stats[0], stats[2], ones,
            IDENTITY, 0.0, True, dx.reshape(1, n, self.num_features), sink_dgamma, sink_dbeta,
        )  # fmt: skip
        return dx

    def _per_sample(self, like, n):
        """Per-sample arrays for BN's operations on the (1, N, D) view: ones (its gamma), zeros (its beta)
        and two arrays it writes into that nothing reads (running statistics, or dgamma and dbeta)."""
        self._constants = constant_arrays(self._constants, like, (n,), like.dtype, (1, 0, None, None), read_only=2)
        return self._constants

    def config(self):
        return {"num_features": self.num_features, "eps": self.eps, "dtype": self.dtype}


NORMS = {"batch": BatchNorm, "renorm": BatchRenorm, "ghost": GhostBatchNorm, "layer": LayerNorm}
LAYER_TYPES.update({cls.__name__: cls for cls in (BatchRenorm, GhostBatchNorm, LayerNorm)})
