import os
import sys

# scikit-learn's check suite runs its array-API input check only when SciPy was
# imported with this set; set it before anything imports SciPy so that no check is skipped.
os.environ.setdefault("SCIPY_ARRAY_API", "1")
# The cuda backend's kernels run on numba's CUDA simulator (on the CPU, thread by thread) unless
# BNNET_TEST_GPU=1 asks for the real GPU. numba reads this when it is first imported.
if os.environ.get("BNNET_TEST_GPU") != "1":
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
