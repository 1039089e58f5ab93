"""The package as users import it: light at import, every submodule reachable as an attribute."""

import subprocess
import sys


def _run(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_optional_submodules_are_attributes_that_import_on_first_use():
    res = _run(
        "import sys, bnnet\n"
        "heavy = ('torch', 'sklearn', 'mpi4py', 'matplotlib', 'onnx')\n"
        "assert not any(m in sys.modules for m in heavy), [m for m in heavy if m in sys.modules]\n"
        "assert callable(bnnet.interop.from_torch) and 'torch' not in sys.modules\n"
        "assert bnnet.sklearn.BNMLPClassifier and bnnet.distributed.SyncBatchNorm\n"
        "assert 'cnn' in bnnet.experiments.EXPERIMENTS and 'matplotlib' not in sys.modules\n"
        "assert bnnet.conv.Conv2d and bnnet.spatial.im2col and bnnet.backend.get_backend()\n"
        "try:\n    bnnet.no_such_thing\nexcept AttributeError as e:\n    print(e)\n"
    )
    assert res.returncode == 0, res.stderr
    assert "module 'bnnet' has no attribute 'no_such_thing'" in res.stdout
