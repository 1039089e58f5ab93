"""The equations of convolution and pooling over (N, C, H, W) images, as array code.

Stateless, as bnnet.functional: arrays in, arrays out, and what backward needs
returned by forward. The layers of bnnet.conv own the parameters and call these.

A convolution is a matrix product once every receptive field is laid out as a
column ("im2col"):

    cols[(c, i, j), (n, p, q)] = x_pad[n, c, p*sh + i, q*sw + j]        (C*kh*kw, N*Ho*Wo)
    y[n, o, p, q] = sum_(c,i,j) W[o, c, i, j] * cols[(c, i, j), (n, p, q)] + b[o]
                  = (W.reshape(O, -1) @ cols)[o, (n, p, q)] + b[o]

so dW = dy2 @ cols.T and dcols = W2.T @ dy2 with dy2[o, (n, p, q)] = dy[n, o, p, q],
and dx adds each column back to the pixels it was read from ("col2im"). One
GEMM over the whole batch each way, where BLAS is fastest. (It is a
cross-correlation, as in every deep-learning library: W is not flipped.)

Output size of every sliding window: Ho = (H + 2 * ph - kh) // sh + 1 (the
window never runs past the padded edge; no ceil mode).
"""

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .device import contiguous, zeros


def out_size(size, kernel, stride, padding):
    """Positions of a `kernel`-wide window moved by `stride` over `size` + 2 * `padding` values."""
    return (size + 2 * padding - kernel) // stride + 1


def _pad(x, padding, fill=0.0):
    ph, pw = padding
    if ph == 0 and pw == 0:
        return x
    return np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=fill)


def windows(x, kernel, stride, padding, fill=0.0):
    """(N, C, Ho, Wo, kh, kw): every window of x (N, C, H, W) padded with `fill` (a view of the padded x)."""
    xp = _pad(x, padding, fill)
    return sliding_window_view(xp, kernel, axis=(2, 3))[:, :, :: stride[0], :: stride[1]]


def add_windows(dwin, x_shape, stride, padding):
    """The adjoint of `windows`: dx (N, C, H, W) with each window's values added where they were read.

    dwin: (N, C, Ho, Wo, kh, kw), any strides (col2im). One strided add per kernel offset (i, j).
    """
    n, c, h, w = x_shape
    ph, pw = padding
    ho, wo, kh, kw = dwin.shape[2:]
    dxp = zeros(dwin, (n, c, h + 2 * ph, w + 2 * pw), dwin.dtype)  # on dwin's device
    for i in range(kh):
        for j in range(kw):
            dxp[:, :, i : i + stride[0] * ho : stride[0], j : j + stride[1] * wo : stride[1]] += dwin[:, :, :, :, i, j]
    return dxp[:, :, ph : ph + h, pw : pw + w]


def im2col(x, kernel, stride, padding):
    """cols (C*kh*kw, N*Ho*Wo): each receptive field of x (N, C, H, W) as a column (a new array)."""
    win = windows(x, kernel, stride, padding)  # (N, C, Ho, Wo, kh, kw)
    n, c, ho, wo, kh, kw = win.shape
    return np.ascontiguousarray(win.transpose(1, 4, 5, 0, 2, 3)).reshape(c * kh * kw, n * ho * wo)


def conv2d_from_cols(cols, w, b, n, out):
    """y (N, O, Ho, Wo) = W2 @ cols (+ b), written into out: the convolution once x is laid out as cols."""
    o = w.shape[0]
    y2 = w.reshape(o, -1) @ cols  # (O, N*Ho*Wo)
    np.copyto(out, y2.reshape(o, n, *out.shape[2:]).transpose(1, 0, 2, 3))
    if b is not None:
        out += b[:, None, None]
    return out


def conv2d_grads(dy, cols, w, input_grad=True):
    """(dcols (C*kh*kw, N*Ho*Wo) or None, dW (O, C, kh, kw), db (O,)) from dy (N, O, Ho, Wo) and forward's cols.

    dx is col2im(dcols): each column's gradient added back to the pixels it was read from.
    """
    n, o, ho, wo = dy.shape
    dy2 = contiguous(dy.transpose(1, 0, 2, 3)).reshape(o, n * ho * wo)  # (O, N*Ho*Wo), on dy's device
    dw = (dy2 @ cols.T).reshape(w.shape)
    db = dy.sum(axis=(0, 2, 3), dtype=np.float64).astype(dy.dtype)
    return (w.reshape(o, -1).T @ dy2 if input_grad else None), dw, db


def max_pool2d(x, kernel, stride, padding):
    """(y (N, C, Ho, Wo), argmax) of each window; padding counts as -inf (never the max).

    argmax (N, C, Ho, Wo): index of the max in the window flattened row by row, the
    first one on ties (as PyTorch).
    """
    win = windows(x, kernel, stride, padding, fill=-np.inf)
    flat = win.reshape(*win.shape[:4], -1)  # (N, C, Ho, Wo, kh*kw), a copy
    arg = flat.argmax(axis=-1)
    return np.take_along_axis(flat, arg[..., None], axis=-1)[..., 0], arg


def avg_pool2d(x, kernel, stride, padding):
    """Mean of each window, padding counted as zeros in the divisor kh*kw (PyTorch's count_include_pad)."""
    return windows(x, kernel, stride, padding).mean(axis=(4, 5), dtype=np.float64).astype(x.dtype)


def avg_pool2d_backward(dy, x_shape, kernel, stride, padding):
    """dx: each window's dy / (kh*kw) added to every element of the window."""
    share = (dy / (kernel[0] * kernel[1])).astype(dy.dtype)
    dwin = np.broadcast_to(share[..., None, None], (*dy.shape, *kernel))
    return add_windows(dwin, x_shape, stride, padding)
