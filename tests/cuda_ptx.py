"""Compile every kernel of bnnet.cuda_kernels to PTX for sm_90 (H100/H200) with NVVM: no GPU needed.

Run by tests/test_cuda.py in a process without NUMBA_ENABLE_CUDASIM. NVVM and libdevice come
from the nvidia-cuda-nvcc-cu12 wheel (the test extra); CUDA_HOME is pointed at it here.
Each signature is one a launch in bnnet.cuda_kernels makes (arrays C-contiguous or, for the
reductions' inputs, strided), so a kernel that uses something the CUDA target lacks fails here.
"""

import os
import sys
import types

import nvidia.cuda_nvcc

os.environ.setdefault("CUDA_HOME", list(nvidia.cuda_nvcc.__path__)[0])

import numba.cuda.dispatcher  # noqa: E402

# numba asks the current GPU for its compute capability when it compiles a device function;
# there is none here, so it is told the target's.
numba.cuda.dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=(9, 0))

from numba import cuda  # noqa: E402
from numba import types as nt  # noqa: E402

from bnnet import cuda_kernels as G  # noqa: E402

f64, i64, i32, b1 = nt.float64, nt.int64, nt.int32, nt.boolean


def arr(dtype, ndim, layout="C"):
    return nt.Array(dtype, ndim, layout)


def signatures(dt):
    c1, c2, f1, f2 = arr(dt, 1), arr(dt, 2), arr(f64, 1), arr(f64, 2)
    yield G._column_sums, (i64, *(arr(dt, 2, "A"),) * 3, f1, f1, i64, f64, i64, f2, f2)
    yield G._channel_sums, (i64, *(arr(dt, 3, "A"),) * 3, f1, f1, i64, f64, i64, f2, f2)
    yield G._finish_moments, (f64, f1, f2, f2, b1, f64, c1, c1, f64, f64, f1, f1, f1)
    yield G._finish_grads, (f64, f2, f2, c1, f1, b1, b1, c1, c1, f2)
    yield G._apply, (c1, c1, c1, f1, f1, i64, f64, i64, i64, c1)
    yield G._dx, (c1, c1, c1, f1, f1, f2, i64, f64, i64, i64, c1)
    yield G._bias_activation, (c1, c1, i64, f64, i64)
    yield G._update_running, (c1, c1, f1, f1, f64, f64)
    yield G._softmax_rows, (c2, arr(i64, 1), c2, f1, arr(i32, 1))
    yield G._sgd, (c1, c1, f64, f64)
    yield G._momentum, (c1, c1, c1, f64, f64, f64)
    yield G._rmsprop, (c1, c1, c1, *(dt,) * 5)  # (the coefficients in the parameters' dtype)
    yield G._adam, (c1, c1, c1, c1, *(dt,) * 8)
    yield G._copy_finite, (c1, c1, arr(i32, 1))
    yield G._nonfinite, (c1, arr(i32, 1))
    c4, i4 = arr(dt, 4), arr(i64, 4)
    yield G._im2col, (c4, *(i64,) * 8, c2)
    yield G._col2im, (c2, *(i64,) * 8, c4)
    yield G._max_pool2d, (c4, *(i64,) * 6, c4, i4)
    yield G._max_pool2d_backward, (c4, i4, c4)
    if dt is f64:
        yield G._merge, (f1, f1, i64)
        yield G._merge_counts, (f1, f1)
        yield G._sum, (f1, f1)


count = 0
for dt in (nt.float32, nt.float64):
    for kernel, sig in signatures(dt):
        ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=(9, 0))
        assert ".entry" in ptx, kernel.__name__
        count += 1
print(f"compiled {count} kernels to PTX for sm_90")
sys.exit(0)
