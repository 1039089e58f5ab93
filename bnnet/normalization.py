"""Variants of Batch Norm, and Layer Norm, as layers (NumPy; not fused by the numba backend).

    BatchRenorm     Ioffe 2017: batch statistics corrected towards the running ones by r and d
    GhostBatchNorm  Hoffer et al. 2017: statistics of small "virtual" batches inside a large one
    LayerNorm       Ba et al. 2016: statistics of each sample over its features

The first two keep BatchNorm's parameters, buffers and eval mode (running
statistics) and change only train mode. All three call the batch-norm
equations of `bnnet.functional`; LayerNorm runs them on the transposed input.
"""

import numpy as np

from . import functional as F
from ._checks import check_dtype, check_int, check_number
from .layers import LAYER_TYPES, BatchNorm, Layer, on_rows


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
        mean, var = F._moments_wide(x, 0, False)  # mu_B, var_B: (D,) float64
        sigma_b = 1.0 / F.inverse_std(var, self.eps)  # sqrt(var_B + eps)
        mu = self.buffers["renorm_mean"].astype(np.float64)
        sigma = self.buffers["renorm_std"].astype(np.float64)
        r_min, r_max, d_max = self.clipping()
        r = np.clip(sigma_b / sigma, r_min, r_max)
        d = np.clip((mean - mu) / sigma, -d_max, d_max)
        _, (x_norm, inv_std) = F.batch_norm_apply(x, 1.0, 0.0, mean, var, self.eps)  # (x - mu_B) / sigma_B
        x_hat = x_norm * r.astype(x.dtype) + d.astype(x.dtype)
        y = self.params["gamma"] * x_hat + self.params["beta"]
        self.renorm = (r, d)
        self._update_running(mean, var, x.shape[0])  # eval mode's statistics, as BatchNorm
        self.buffers["renorm_mean"][...] = F.running_average(mu, mean, self.renorm_momentum)
        self.buffers["renorm_std"][...] = F.running_average(sigma, sigma_b, self.renorm_momentum)
        self._cache = ("renorm", x, (x_norm, inv_std), x_hat, r.astype(x.dtype))
        return y.astype(x.dtype, copy=False)

    @on_rows
    def _backward(self, dy, input_grad, dx_out=None):
        mode, x, *rest = self._cached()
        if mode != "renorm":  # eval mode or frozen: BatchNorm's cache
            return super()._backward(dy, input_grad)
        cache, x_hat, r = rest
        self._grad("beta")[...] = dy.sum(axis=0)
        self._grad("gamma")[...] = (dy * x_hat).sum(axis=0)
        # r and d are constants: y depends on x through (x - mu_B) / sigma_B only, scaled by gamma * r.
        dx, _, _ = F.batch_norm_backward(dy, self.params["gamma"] * r, cache)
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
        y = np.empty_like(x)
        caches = []
        for lo, hi in self._chunks(x.shape[0]):
            y[lo:hi], mean, var, cache = F.batch_norm_forward(
                x[lo:hi], self.params["gamma"], self.params["beta"], self.eps
            )
            self._update_running(mean, var, hi - lo)
            caches.append((lo, hi, cache))
        self.batch_stats = None  # one per virtual batch: see the running statistics
        self._cache = ("ghost", x, caches)
        return y

    @on_rows
    def _backward(self, dy, input_grad, dx_out=None):
        mode, x, *rest = self._cached()
        if mode != "ghost":  # eval mode or frozen: BatchNorm's cache
            return super()._backward(dy, input_grad)
        dx = np.empty_like(dy)
        dgamma, dbeta = self._grad("gamma"), self._grad("beta")
        dgamma[...] = 0
        dbeta[...] = 0
        for lo, hi, cache in rest[0]:
            dx[lo:hi], dg, db = F.batch_norm_backward(dy[lo:hi], self.params["gamma"], cache)
            dgamma += dg
            dbeta += db
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
        # (D, N): each column is a sample; normalizing over axis 0 is normalizing each sample
        x_hat_t, _, _, cache = F.batch_norm_forward(x.T, 1.0, 0.0, self.eps)
        x_hat = x_hat_t.T  # (N, D)
        self._cache = (x, x_hat, cache)
        return (self.params["gamma"] * x_hat + self.params["beta"]).astype(x.dtype, copy=False)

    def _backward(self, dy, input_grad, dx_out=None):
        x, x_hat, cache = self._cached()
        self._grad("beta")[...] = dy.sum(axis=0)
        self._grad("gamma")[...] = (dy * x_hat).sum(axis=0)
        dx_t, _, _ = F.batch_norm_backward((dy * self.params["gamma"]).T, 1.0, cache)
        return dx_t.T

    def config(self):
        return {"num_features": self.num_features, "eps": self.eps, "dtype": self.dtype}


NORMS = {"batch": BatchNorm, "renorm": BatchRenorm, "ghost": GhostBatchNorm, "layer": LayerNorm}
LAYER_TYPES.update({cls.__name__: cls for cls in (BatchRenorm, GhostBatchNorm, LayerNorm)})
