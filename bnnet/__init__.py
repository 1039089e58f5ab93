"""bnnet: batch-normalized neural networks, from the equations up, in NumPy.

import bnnet
X, y, Xt, yt = bnnet.datasets.load_mnist5k()
model = bnnet.mlp([784, 100, 100, 100, 10], activation="sigmoid", init="xavier", seed=0)
bnnet.fit(model, X, y, optimizer=bnnet.optim.Adam(1e-3), loss="softmax_cross_entropy",
          epochs=10, batch_size=60, seed=0)
print(bnnet.evaluate(model, Xt, yt))
"""

__version__ = "0.1.0"

from . import callbacks, conv, conventions, datasets  # noqa: F401  (submodules as attributes), engine, functional, layers, losses, normalization, ops, optim
from .errors import (
    BnnetError,
    CheckpointError,
    DatasetError,
    HyperparameterError,
    InputError,
    InputTypeError,
    NonFiniteError,
)
from .export import export_onnx
from .inference import fold_batchnorm, freeze_batchnorm, recompute_bn_stats
from .io import load, save
from .model import BiasBeforeBatchNormWarning, Sequential, convnet, mlp
from .step import CompiledStep, compile_step
from .threads import get_num_threads, set_num_threads
from .train import evaluate, fit

# Submodules with optional dependencies (torch, scikit-learn, mpi4py, matplotlib) or heavier imports:
# attributes of bnnet that import on first use (PEP 562), so `import bnnet` stays light.
_LAZY = (
    "interop",
    "sklearn",
    "distributed",
    "experiments",
    "plots",
    "cli",
    "backend",
    "kernels",
    "cuda_kernels",
    "device",
    "reference",
    "spatial",
    "threads",
)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "__version__",
    "conventions",
    "datasets",
    "engine",
    "functional",
    "layers",
    "losses",
    "normalization",
    "ops",
    "optim",
    "fold_batchnorm",
    "freeze_batchnorm",
    "recompute_bn_stats",
    "export_onnx",
    "Sequential",
    "mlp",
    "convnet",
    "fit",
    "compile_step",
    "CompiledStep",
    "evaluate",
    "save",
    "load",
    "set_num_threads",
    "get_num_threads",
    "BnnetError",
    "InputError",
    "InputTypeError",
    "HyperparameterError",
    "CheckpointError",
    "DatasetError",
    "NonFiniteError",
    "BiasBeforeBatchNormWarning",
]
