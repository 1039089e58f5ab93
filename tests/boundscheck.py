"""The kernel tests compiled with NUMBA_BOUNDSCHECK=1, run in the background (see conftest.py).

An out-of-range index raises IndexError there instead of touching memory. The kernels compile
into a cache of their own, so the suite's own cache is untouched.
"""

import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


class Run:
    def __init__(self):
        self.dir = tempfile.TemporaryDirectory(prefix="bnnet-boundscheck-")
        env = dict(
            os.environ,
            NUMBA_BOUNDSCHECK="1",
            NUMBA_CACHE_DIR=os.path.join(self.dir.name, "cache"),
            BNNET_BACKEND="numba",
            NUMBA_NUM_THREADS="2",
        )
        self.log = open(os.path.join(self.dir.name, "log.txt"), "w+")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-x",
                "-p",
                "no:cacheprovider",
                "-p",
                "no:xdist",
                os.path.join(HERE, "test_backends.py"),
                os.path.join(HERE, "test_safety.py"),
                "-k",
                "not boundscheck",
            ],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=HERE,
        )

    def result(self, timeout=1200):
        """(exit status, the run's output)."""
        code = self.proc.wait(timeout=timeout)
        self.log.seek(0)
        return code, self.log.read()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        self.dir.cleanup()


def start():
    return Run()
