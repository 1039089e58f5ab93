import os
import sys

# scikit-learn's check suite runs its array-API input check only when SciPy was
# imported with this set; set it before anything imports SciPy so that no check is skipped.
os.environ.setdefault("SCIPY_ARRAY_API", "1")

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
