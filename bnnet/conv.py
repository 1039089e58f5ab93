"""Layers for images (N, C, H, W): convolution, pooling, and Flatten into a Linear.

Same contract as bnnet.layers (forward(x, train), backward(dy), params, grads,
buffers); the math is bnnet.spatial's. Shapes follow PyTorch: channels first,
W of a convolution (out_channels, in_channels, kh, kw).
"""

import math
import numbers

import numpy as np

from . import ops, threads
from . import spatial as S
from ._checks import check_bool, check_dtype, check_int, per_sample
from .device import contiguous, empty
from .errors import HyperparameterError, InputError
from .layers import LAYER_TYPES, Layer, init_weights


def _pair(owner, name, value, low):
    """An int or a pair of ints (height, width), each >= low -> (int, int)."""
    items = value if isinstance(value, (tuple, list)) else (value, value)
    if len(items) != 2 or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in items):
        raise HyperparameterError(f"{owner}: {name} must be an int or a pair of ints (height, width), got {value!r}")
    return tuple(check_int(owner, name, int(v), low=low) for v in items)


def _require_image(layer, shape):
    """InputError unless the per-sample shape is an image's (C, H, W)."""
    if len(shape) != 3:
        raise InputError(f"{layer.name}: x must be (N, C, H, W), got {per_sample(shape)}")


class _Windowed(Layer):
    """A layer that slides a kernel over (N, C, H, W) input: the shape rules of all of them."""

    backward_reads_output = False
    channels_in = None  # required input channels (None: any)

    def in_shape(self):
        return (self.channels_in, None, None)

    def _channels_out(self, c):
        return c

    def out_shape(self, shape):
        _require_image(self, shape)
        self._require(shape, self.in_shape())
        sizes = []
        for size, k, s, p in zip(shape[1:], self.kernel_size, self.stride, self.padding):
            if size is None:
                sizes.append(None)
                continue
            if size + 2 * p < k:
                raise InputError(
                    f"{self.name}: x of {shape[1]}x{shape[2]} pixels (padding {p}) is smaller than "
                    f"the {self.kernel_size[0]}x{self.kernel_size[1]} kernel, got {per_sample(shape)}"
                )
            sizes.append(S.out_size(size, k, s, p))
        return (self._channels_out(shape[0]), *sizes)


class Conv2d(_Windowed):
    """y[n, o] = sum_c W[o, c] (*) x[n, c] + b[o]: a 2-D convolution (cross-correlation, as PyTorch).

    Args:
        in_channels, out_channels: C and O; W has shape (O, C, kh, kw), PyTorch's layout
            (Linear's W is (in, out): a matrix product x @ W, where here the kernel slides).
        kernel_size: int or (kh, kw).
        stride: int or (sh, sw) (default 1).
        padding: int or (ph, pw) zeros on each side (default 0; less than the kernel size).
        bias: learn b (O,) (default True). Set False when a BatchNorm follows: its mean
            subtraction (per channel, over N x H x W) cancels b, exactly as for Linear.
        init: "he" (default; N(0, 2 / fan_in), fan_in = C * kh * kw), "xavier"
            (N(0, 2 / (fan_in + fan_out)), fan_out = O * kh * kw) or "normal" (N(0, std^2)).
        std: standard deviation for init="normal" (default 0.01).
        rng: None, int seed, or numpy Generator for the initial W.
        dtype: "float32" (default) or "float64".
    Shapes: x (N, C, H, W) -> y (N, O, Ho, Wo), Ho = (H + 2 ph - kh) // sh + 1 (likewise Wo).
    Computed as one GEMM over the batch on the im2col matrix (see bnnet.spatial), which the
    forward keeps for backward: C * kh * kw * N * Ho * Wo values.
    """

    writes_out = True

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size,
        stride=1,
        padding=0,
        bias=True,
        init="he",
        std=None,
        rng=None,
        dtype="float32",
    ):
        super().__init__()
        self.in_channels = self.channels_in = check_int("Conv2d", "in_channels", in_channels, low=1)
        self.out_channels = check_int("Conv2d", "out_channels", out_channels, low=1)
        self.kernel_size = _pair("Conv2d", "kernel_size", kernel_size, 1)
        self.stride = _pair("Conv2d", "stride", stride, 1)
        self.padding = _pair("Conv2d", "padding", padding, 0)
        if any(p >= k for p, k in zip(self.padding, self.kernel_size)):
            # (padding k - 1 already gives every output that sees at least one input pixel)
            raise HyperparameterError(
                f"Conv2d: padding must be less than the kernel size {self.kernel_size}, got {self.padding}"
            )
        self.bias = check_bool("Conv2d", "bias", bias)
        self.dtype = check_dtype("Conv2d", dtype)
        area = self.kernel_size[0] * self.kernel_size[1]
        self.params["W"], self.std = init_weights(  # (O, C, kh, kw)
            "Conv2d",
            (out_channels, in_channels, *self.kernel_size),
            init,
            std,
            in_channels * area,
            out_channels * area,
            rng,
            self.dtype,
        )
        self.init = init
        if self.bias:
            self.params["b"] = np.zeros(out_channels, self.dtype)  # (O,)

    def _channels_out(self, c):
        return self.out_channels

    def state_spec(self):
        spec = {("params", "W"): ((self.out_channels, self.in_channels, *self.kernel_size), self.dtype)}
        if self.bias:
            spec["params", "b"] = ((self.out_channels,), self.dtype)
        return spec

    def _flops(self, y_shape):
        return int(np.prod(y_shape)) * self.in_channels * self.kernel_size[0] * self.kernel_size[1]

    def _im2col(self, x, positions):
        """The (C*kh*kw, positions) im2col matrix of x, positions = N * Ho * Wo (bnnet.ops.im2col)."""
        cols = empty(x, (self.in_channels * self.kernel_size[0] * self.kernel_size[1], positions), self.dtype)
        ops.im2col(x, self.kernel_size, self.stride, self.padding, cols)
        return cols

    def _forward(self, x, train, out=None):
        n, shape = x.shape[0], self.out_shape(x.shape[1:])  # (O, Ho, Wo)
        threads.for_gemm(self._flops((n, *shape)))
        cols = self._im2col(x, n * shape[1] * shape[2])  # (C*kh*kw, N*Ho*Wo)
        y = out if out is not None else empty(x, (n, *shape), self.dtype)
        S.conv2d_from_cols(cols, self.params["W"], self.params.get("b"), n, y)
        # cols (C*kh*kw, N*Ho*Wo) for dW, kept in train mode; an eval-mode forward (predict) keeps only
        # x, and a backward after it (rare: input gradients, frozen fine-tuning) rebuilds cols from x
        self._cache = (y, x, cols if train else None)
        return y

    def _backward(self, dy, input_grad, dx_out=None):
        _, x, cols = self._cached()
        if cols is None:
            cols = self._im2col(x, dy.shape[0] * dy.shape[2] * dy.shape[3])
        threads.for_gemm(self._flops(dy.shape))
        dcols, dw, db = S.conv2d_grads(dy, cols, self.params["W"], input_grad)
        self._grad("W")[...] = dw
        if self.bias:
            self._grad("b")[...] = db
        if dcols is None:
            return None
        dx = dx_out if dx_out is not None else empty(x, x.shape, self.dtype)
        ops.col2im(dcols, self.kernel_size, self.stride, self.padding, dx)
        return dx

    def config(self):
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": list(self.kernel_size),
            "stride": list(self.stride),
            "padding": list(self.padding),
            "bias": self.bias,
            "init": self.init,
            "std": self.std if self.init == "normal" else None,
            "dtype": self.dtype,
        }


class _Pool2d(_Windowed):
    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        owner = type(self).__name__
        self.kernel_size = _pair(owner, "kernel_size", kernel_size, 1)
        self.stride = self.kernel_size if stride is None else _pair(owner, "stride", stride, 1)
        self.padding = _pair(owner, "padding", padding, 0)
        if any(2 * p > k for p, k in zip(self.padding, self.kernel_size)):
            raise HyperparameterError(
                f"{owner}: padding must be at most half the kernel size {self.kernel_size}, got {self.padding}"
            )

    def config(self):
        return {"kernel_size": list(self.kernel_size), "stride": list(self.stride), "padding": list(self.padding)}


class MaxPool2d(_Pool2d):
    """y[n, c, p, q] = max of x[n, c] over the kernel_size window at (p * sh, q * sw).

    Args: kernel_size (int or pair), stride (default kernel_size), padding (default 0; at most
    half the kernel; padded values never win). The gradient goes to the first maximum of each
    window (row by row), as in PyTorch.
    """

    writes_out = True

    def _forward(self, x, train, out=None):
        shape = (x.shape[0], *self.out_shape(x.shape[1:]))
        y = out if out is not None else empty(x, shape, x.dtype)
        arg = empty(x, shape, np.int64)  # where each max is in its input plane
        ops.max_pool2d(x, self.kernel_size, self.stride, self.padding, y, arg)
        self._cache = (y, x, arg)  # (x for its shape)
        return y

    def _backward(self, dy, input_grad, dx_out=None):
        _, x, arg = self._cached()
        dx = dx_out if dx_out is not None else empty(dy, x.shape, dy.dtype)
        ops.max_pool2d_backward(contiguous(dy), arg, dx)
        return dx


class AvgPool2d(_Pool2d):
    """y[n, c, p, q] = mean of x[n, c] over the kernel_size window; zero padding counts in the
    divisor kh * kw (PyTorch's default count_include_pad=True). Args as MaxPool2d."""

    def _forward(self, x, train, out=None):
        y = S.avg_pool2d(x, self.kernel_size, self.stride, self.padding)
        self._cache = (y, x)  # (x for its shape)
        return y

    def _backward(self, dy, input_grad, dx_out=None):
        return S.avg_pool2d_backward(dy, self._cached()[1].shape, self.kernel_size, self.stride, self.padding)


class GlobalAvgPool2d(Layer):
    """y[n, c] = mean over H x W of x[n, c]: (N, C, H, W) -> (N, C). PyTorch:
    AdaptiveAvgPool2d(1) followed by Flatten."""

    backward_reads_output = False

    def out_shape(self, shape):
        _require_image(self, shape)
        return (shape[0],)

    def _forward(self, x, train, out=None):
        y = x.mean(axis=(2, 3), dtype=np.float64).astype(x.dtype)
        self._cache = (y, x)  # (x for its shape)
        return y

    def _backward(self, dy, input_grad, dx_out=None):
        n, c, h, w = self._cached()[1].shape
        return np.broadcast_to((dy / (h * w)).astype(dy.dtype)[:, :, None, None], (n, c, h, w)).copy()


class Flatten(Layer):
    """(N, d1, d2, ...) -> (N, d1 * d2 * ...), row-major (C, H, W order, as PyTorch's Flatten).

    The output is a reshaped view of x when x is C-contiguous (as numpy.reshape and PyTorch's flatten).
    """

    backward_reads_output = False

    def out_shape(self, shape):
        return (None if any(d is None for d in shape) else math.prod(shape),)

    def _forward(self, x, train, out=None):
        self._cache = (x.shape,)
        return x.reshape(x.shape[0], -1)

    def _cached_output_shape(self):
        shape = self._cached()[0]
        return (shape[0], math.prod(shape[1:]))

    def _cached_input_shape(self):
        return self._cached()[0]

    def _backward(self, dy, input_grad, dx_out=None):
        return dy.reshape(self._cached()[0])


CONV_LAYER_TYPES = {cls.__name__: cls for cls in (Conv2d, MaxPool2d, AvgPool2d, GlobalAvgPool2d, Flatten)}
LAYER_TYPES.update(CONV_LAYER_TYPES)
