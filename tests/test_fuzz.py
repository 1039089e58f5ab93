"""Fuzzing checkpoints: mutations of a valid file (bytes, the safetensors header, every metadata
field: wrong type, range, nesting, missing, extra) through `bnnet.load`, `fit(resume=...)` and the
CLI. Each either loads a model that works like a valid one, or is refused with CheckpointError (CLI:
one line, exit 1): never another exception, a traceback, a signal, or more than 200 MB of memory."""

import json
import os
import subprocess
import sys

import fuzz_checkpoints as fc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bnnet

SETTINGS = settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "valid.safetensors"
    X, y = fc.valid_model_checkpoint(path)
    return path.read_bytes(), X, y


def meta_mutation(data):
    """A strategy of (description, mutated bytes) that edits one metadata field."""
    paths = fc.meta_paths(data)
    edit = st.tuples(st.sampled_from(paths), st.sampled_from(fc.ODD_VALUES)).map(
        lambda pv: (f"{pv[0]} = {pv[1]!r}", fc.mutate_meta(data, pv[0], pv[1]))
    )
    delete = st.sampled_from(paths).map(lambda p: (f"del {p}", fc.mutate_meta(data, p, None, delete=True)))
    extra = st.sampled_from([p for p in paths if isinstance(_at(data, p), dict)] or [()]).map(
        lambda p: (f"extra key in {p}", fc.mutate_meta(data, p + ("unexpected",), 1))
    )
    return st.one_of(edit, delete, extra)


def _at(data, path):
    header, _ = fc.split(data)
    value = json.loads(header["__metadata__"]["bnnet"])
    for k in path:
        value = value[k]
    return value


def tensor_mutation(data):
    header, _ = fc.split(data)
    keys = [k for k in header if k != "__metadata__"]
    values = fc.ODD_VALUES + [[10**9, 10**9], [0, 10**12], "F16", "I64", "BOOL", [1, 4], [-1]]
    return st.tuples(
        st.sampled_from(keys), st.sampled_from(["shape", "dtype", "data_offsets"]), st.sampled_from(values)
    ).map(lambda t: (f"tensor {t[0]}.{t[1]} = {t[2]!r}", fc.mutate_tensor_header(data, *t)))


def byte_mutation(data):
    flips = st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255)), min_size=1, max_size=8)
    flipped = flips.map(lambda fs: ("bytes flipped", _flip(data, fs)))
    truncated = st.integers(0, len(data) - 1).map(lambda n: (f"truncated to {n} bytes", data[:n]))
    return st.one_of(flipped, truncated)


def _flip(data, flips):
    b = bytearray(data)
    for i, v in flips:
        b[i] = v
    return bytes(b)


def mutations(data):
    return st.one_of(meta_mutation(data), tensor_mutation(data), byte_mutation(data))


def check_loads_or_refuses(path, X, y):
    """load, predict, load with an optimizer, resume: CheckpointError or a model that works."""
    try:
        model = bnnet.load(path)
    except bnnet.CheckpointError:
        return "refused"
    for layer in model.layers:
        layer.check_state(True)
    try:
        out = model.predict(X)
        assert out.shape == (len(X), 3)
    except bnnet.BnnetError:
        pass  # e.g. an edited eps or running_var that overflows: refused with a bnnet error
    try:
        bnnet.load(path, optimizer=bnnet.optim.Adam(1e-3))
        bnnet.fit(bnnet.mlp([4, 5, 3], seed=0), X, y, epochs=2, batch_size=8, seed=0, progress=False, resume=path)
    except (bnnet.CheckpointError, bnnet.NonFiniteError):
        pass
    return "loaded"


def test_mutated_checkpoints_through_the_api(valid, tmp_path):
    data, X, y = valid
    path = str(tmp_path / "m.safetensors")
    seen = {"refused": 0, "loaded": 0}

    @SETTINGS
    @given(mutations(data))
    def run(mutation):
        _, blob = mutation
        with open(path, "wb") as f:
            f.write(blob)
        with np.errstate(all="ignore"):
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                seen[check_loads_or_refuses(path, X, y)] += 1

    run()
    assert seen["refused"] > 50 and seen["loaded"] > 10, seen  # the mutations reach both outcomes


def test_every_metadata_field_with_every_odd_value(valid, tmp_path):
    """Exhaustive over fields x values (not sampled): the same contract."""
    data, X, y = valid
    path = str(tmp_path / "m.safetensors")
    import warnings

    for p in fc.meta_paths(data):
        for blob in [fc.mutate_meta(data, p, v) for v in fc.ODD_VALUES] + [fc.mutate_meta(data, p, None, True)]:
            with open(path, "wb") as f:
                f.write(blob)
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                check_loads_or_refuses(path, X, y)


def test_deeply_nested_json_is_refused(valid, tmp_path):
    for raw in (
        b'{"__metadata__": {"bnnet": "' + fc.deep_json(200000).encode() + b'"}}',
        fc.deep_json(200000).encode(),
    ):
        path = tmp_path / "deep.safetensors"
        path.write_bytes(fc.join(None, b"", raw_header=raw))
        with pytest.raises(bnnet.CheckpointError, match="not a valid bnnet checkpoint"):
            bnnet.load(path)


CLI_SAMPLES = 24


def test_mutated_checkpoints_through_the_cli(valid, tmp_path):
    """In subprocesses (`bnnet evaluate` and `bnnet fold`): exit 0, or one line and exit 1; no
    traceback, no signal, and at most 200 MB of resident memory."""
    data, X, y = valid
    np.savez(tmp_path / "d.npz", X_train=X, y_train=y, X_test=X, y_test=y)
    blobs = []

    @settings(max_examples=CLI_SAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(mutations(data))
    def collect(mutation):
        blobs.append(mutation)

    collect()
    blobs += [
        ("huge layer claimed", fc.mutate_meta(data, ("architecture", 0, "out_features"), 10**7)),
        ("deep json", fc.join(None, b"", raw_header=fc.deep_json(200000).encode())),
    ]
    results = []
    for i, (desc, blob) in enumerate(blobs):
        path = tmp_path / f"m{i}.safetensors"
        path.write_bytes(blob)
        command = (
            ["evaluate", str(path), "--data", str(tmp_path / "d.npz")]
            if i % 2
            else ["fold", str(path), str(tmp_path / f"f{i}.safetensors")]
        )
        code, err, peak_kib = _run_measured([sys.executable, "-m", "bnnet", *command], tmp_path / "err.txt")
        results.append(code)
        assert code in (0, 1), (desc, code, err[-2000:])  # negative: killed by a signal
        assert "Traceback" not in err, (desc, err[-2000:])
        if code == 1:
            assert err.count("\n") == 1 and err.startswith(f"bnnet {command[0]}: error: "), (desc, err)
        assert peak_kib < 200 * 1024, (desc, peak_kib)
    assert 1 in results


# Runs argv and writes its peak RSS (KiB) to a file. The measured process must be forked from a
# small one: Linux counts the memory of the process that forked (and exec'ed) a child in the
# child's own peak, so forked from this test process it would report pytest's size.
LAUNCHER = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(proc.pid, 0)
proc.returncode = 0
open(sys.argv[1], "w").write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status) % 256)
"""


def _run_measured(argv, err_path):
    """(exit code, stderr, peak resident memory in KiB) of one process running argv."""
    rss_path = str(err_path) + ".rss"
    with open(err_path, "w") as err:
        proc = subprocess.run(
            [sys.executable, "-c", LAUNCHER, rss_path, *argv], stdout=subprocess.DEVNULL, stderr=err, timeout=120
        )
    code = proc.returncode if proc.returncode < 128 else proc.returncode - 256  # a signal: negative
    return code, open(err_path).read(), int(open(rss_path).read())


def test_a_checkpoint_with_nan_is_not_resumed(valid, tmp_path):
    data, X, y = valid
    from safetensors.numpy import load as st_load
    from safetensors.numpy import save as st_save

    header, _ = fc.split(data)
    arrays = st_load(data)
    arrays["params/0.W"] = arrays["params/0.W"].copy()
    arrays["params/0.W"][0, 0] = np.nan
    path = tmp_path / "nan.safetensors"
    path.write_bytes(st_save(arrays, metadata=header["__metadata__"]))
    with pytest.raises(bnnet.CheckpointError, match="parameter 0.W holds NaN or Inf; resume from an earlier"):
        bnnet.fit(bnnet.mlp([4, 5, 3], seed=0), X, y, epochs=2, batch_size=8, seed=0, progress=False, resume=path)
    assert os.path.exists(path)
