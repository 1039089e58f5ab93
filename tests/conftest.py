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


# The boundscheck re-run of the kernel tests (tests/test_safety.py) compiles every kernel again and
# takes minutes on one core: it starts as soon as the tests are collected, in a process of its
# own, and the test that owns it only collects its result. The rest of the suite runs meanwhile.
BOUNDSCHECK_TEST = "test_kernels_never_index_out_of_range_with_boundscheck"


# Under pytest-xdist (the test command runs `pytest -n 2`) every worker collects the tests, and one
# more background process would only compete with the workers for the two cores: there the test
# goes first instead, runs in whichever worker takes it, and the other worker runs the rest.


def pytest_collection_modifyitems(session, config, items):
    # (not inside that run itself, which deselects the test with -k after this hook has seen it)
    if os.environ.get("NUMBA_BOUNDSCHECK") == "1" or not any(item.name == BOUNDSCHECK_TEST for item in items):
        return
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items.sort(key=lambda item: item.name != BOUNDSCHECK_TEST)  # first: the longest test starts first
        return
    from boundscheck import start

    config._bnnet_boundscheck = start()


def pytest_unconfigure(config):
    run = getattr(config, "_bnnet_boundscheck", None)
    if run is not None:
        run.stop()
