"""Batch norm at test time: population statistics, frozen statistics, folding BN into the Linear before it.

Three ways to get the statistics that eval mode normalizes with:

    exponential moving average   running = decay * running + (1 - decay) * batch, per training step
                                 BatchNorm(decay=0.9) (the lecture's method)
    cumulative average           running = mean over every batch seen so far: BatchNorm(decay=None)
    population (Alg. 2)          mean of batch means, m/(m-1) x mean of batch variances, after training:
                                 recompute_bn_stats(model, X, mode="batch")
    exact full data              the mean and variance of each BN's input over all of X, in eval mode:
                                 recompute_bn_stats(model, X, mode="exact")
"""

import copy
import math

import numpy as np

from . import functional as F
from ._checks import (
    as_float_array,
    check_choice,
    check_int,
    check_samples,
)
from .conv import Conv2d
from .errors import HyperparameterError, InputError, NonFiniteError
from .layers import BatchNorm, Linear
from .model import Sequential
from .ops import check_finite


def _bn_layers(model):
    return [(i, l) for i, l in enumerate(model.layers) if isinstance(l, BatchNorm) and l.track_running_stats]


def freeze_batchnorm(model, frozen=True):
    """Freeze (or unfreeze) the running statistics of every BatchNorm in `model`.

    Frozen layers normalize with their running statistics in train mode too, never
    update them, and still train gamma and beta: fine-tuning on small batches
    without disturbing the statistics. Eval mode is unaffected. Returns the model.
    """
    for _, bn in _bn_layers(model):
        bn.frozen = bool(frozen)
    return model


def recompute_bn_stats(model, X, batch_size=256, mode="batch"):
    """Replace every BatchNorm's running statistics by population statistics of X. Returns the model.

    mode="batch" (Ioffe & Szegedy 2015, Alg. 2): X is cut into mini-batches of
        batch_size rows (a last, shorter one is dropped unless it is the only one);
        the network runs in train mode on each, and each BatchNorm gets
        E[x] = mean of the batch means, Var[x] = m/(m-1) * mean of the biased batch variances.
    mode="exact": each BatchNorm, in order, gets the exact mean and variance of
        its input over all of X, with the layers before it in eval mode (using the
        statistics just computed); the variance follows the layer's running_var
        convention (N/(N-1) for "unbiased").
    count becomes the number of batches used. Parameters are not changed.
    """
    check_choice("recompute_bn_stats", "mode", mode, ("batch", "exact"))
    batch_size = check_int("recompute_bn_stats", "batch_size", batch_size, low=2)
    X = as_float_array(X, "X", "recompute_bn_stats", model.dtype)
    check_samples(X, "X", "recompute_bn_stats", model.input_shape)
    check_finite(X, "X", "recompute_bn_stats")
    bns = _bn_layers(model)
    if not bns:
        return model
    if mode == "batch" and len(X) < 2:
        raise InputError("recompute_bn_stats: mode='batch' needs at least 2 rows of X, got 1")
    saved = {k: v.copy() for k, v in model.buffers.items()}
    try:
        if mode == "batch":
            _batch_stats(model, bns, X, batch_size, saved)
        else:
            _exact_stats(model, bns, X, batch_size)
        for _, bn in bns:  # finite inputs can still overflow inside the network
            for key in ("running_mean", "running_var"):
                if not np.isfinite(bn.buffers[key]).all():
                    raise NonFiniteError(
                        f"recompute_bn_stats: the new {key} of {bn.name} holds NaN or Inf "
                        f"(X is finite, largest |x| = {np.abs(X).max():.3g}); the statistics "
                        "were left as they were"
                    )
    except BaseException:
        for k, v in saved.items():  # all layers or none
            model.buffers[k] = v
        raise
    return model


def _batch_stats(model, bns, X, batch_size, saved):
    """Alg. 2 of Ioffe & Szegedy; `saved` holds the buffers as they were, put back after the
    train-mode passes have moved them."""
    n = len(X)
    starts = list(range(0, n - batch_size + 1, batch_size)) or [0]
    frozen = [bn.frozen for _, bn in bns]
    freeze_batchnorm(model, False)
    sums = {i: [np.zeros(bn.num_features), np.zeros(bn.num_features)] for i, bn in bns}
    try:
        for s in starts:
            model.forward(X[s : s + batch_size], train=True)
            for i, bn in bns:
                mean, var = bn.batch_stats
                sums[i][0] += mean
                sums[i][1] += var
    finally:
        for k, v in saved.items():
            model.buffers[k] = v
        for (_, bn), f in zip(bns, frozen):
            bn.frozen = f
    for i, bn in bns:
        m = bn._last_shape[0] if len(bn._last_shape) == 2 else math.prod(bn._last_shape) // bn.num_features
        bn.buffers["running_mean"][...] = sums[i][0] / len(starts)
        bn.buffers["running_var"][...] = sums[i][1] / len(starts) * F.variance_correction(m, True)
        bn.buffers["count"][...] = len(starts)


def _exact_stats(model, bns, X, batch_size):
    """Layer by layer, the layers before each BatchNorm in eval mode with the statistics just computed."""
    n = len(X)
    for i, bn in bns:
        count, mean, m2 = 0, np.zeros(bn.num_features), np.zeros(bn.num_features)
        for s in range(0, n, batch_size):
            h = X[s : s + batch_size]
            for layer in model.layers[:i]:
                h = layer.forward(h, train=False)
            axes = tuple(a for a in range(h.ndim) if a != bn.axis % h.ndim)  # all but the channel axis
            b_mean, b_var = F.moments(h.astype(np.float64), axes=axes)
            values = h.size // bn.num_features  # per channel
            count, mean, m2 = F.merge_moments(count, mean, m2, values, b_mean, b_var * values)
        var = m2 / count * F.variance_correction(count, bn.running_var == "unbiased")
        bn.buffers["running_mean"][...] = mean
        bn.buffers["running_var"][...] = var
        bn.buffers["count"][...] = len(range(0, n, batch_size))


def fold_batchnorm(model):
    """An eval-only copy of `model` where each Linear -> BatchNorm (or Conv2d -> BatchNorm) pair is
    one Linear (Conv2d).

    With s = gamma / sqrt(running_var + eps):   W' = W * s (each column j by s_j; for a Conv2d,
    each output channel's kernel W[o] by s_o),
    b' = beta + (b - running_mean) * s   (b = 0 for a Linear without bias).
    Computed in float64, stored in the model's dtype. Other layers are copied.
    The result refuses train=True: it has no batch statistics left to train with.
    """
    layers, i = [], 0
    while i < len(model.layers):
        layer = model.layers[i]
        nxt = model.layers[i + 1] if i + 1 < len(model.layers) else None
        if isinstance(layer, (Linear, Conv2d)) and isinstance(nxt, BatchNorm):
            if not nxt.track_running_stats:
                raise HyperparameterError(
                    f"fold_batchnorm: {nxt.name} keeps no running statistics "
                    "(track_running_stats=False): it normalizes every batch with the batch's "
                    "own statistics, which no fixed Linear can do"
                )
            W = layer.params["W"].astype(np.float64)
            b = layer.params["b"].astype(np.float64) if layer.bias else 0.0
            gamma, beta, _, _ = nxt._affine()
            s = gamma.astype(np.float64) * F.inverse_std(nxt.buffers["running_var"].astype(np.float64), nxt.eps)
            folded = type(layer)(**{**layer.config(), "bias": True, "rng": 0})
            if isinstance(layer, Conv2d):
                folded.params["W"][...] = W * s[:, None, None, None]  # (O, C, kh, kw): output channel o by s_o
            else:
                folded.params["W"][...] = W * s  # (in, out): column j by s_j
            folded.params["b"][...] = beta + (b - nxt.buffers["running_mean"]) * s
            layers.append(folded)
            i += 2
        else:
            layers.append(copy.deepcopy(layer))
            i += 1
    out = Sequential(*layers)
    out.eval_only = True
    return out
