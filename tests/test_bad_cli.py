"""A table of bad command lines: each ends with the expected exit code and one clear line, never a traceback.

Exit 2 is argparse's (a bad option value, named in the message); exit 1 is every other error,
printed as the single line "bnnet <command>: error: <message>". The commands run in this
process (`bnnet.cli.main`), on files written by the fixture below.
"""

import gzip
import io
import json
import os
import pathlib
import struct
import sys
import zipfile

import numpy as np
import pytest

from bnnet.cli import main

BIG = str(2**63)


def _npy_claiming(a, shape):
    """The bytes of an .npy file holding a's data under a header that claims `shape`."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(a.dtype), "fortran_order": False, "shape": shape}
    )
    return buf.getvalue() + a.tobytes()


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Bad data files, a small trained run, and edited copies of its checkpoint."""
    d = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(0)
    X = rng.random((40, 6)).astype(np.float32)
    y = np.arange(40) % 3
    ok = {"X_train": X, "y_train": y, "X_test": X[:10], "y_test": y[:10]}
    f = {"ok": _npz(d / "ok.npz", **ok)}
    (d / "empty.npz").write_bytes(b"")
    f["empty"] = str(d / "empty.npz")
    for name, change in {
        "x1d": {"X_train": np.zeros(40)},
        "xscalar": {"X_train": np.float32(1)},
        "emptytrain": {"X_train": np.zeros((0, 6)), "y_train": np.zeros(0, int)},
        "emptytest": {"X_test": np.zeros((0, 6)), "y_test": np.zeros(0, int)},
        "strlab": {"y_train": np.array(["a"] * 40)},
        "biglab": {"y_train": np.where(y == 2, 1e9, y)},
        "neglab": {"y_train": y - 1},
        "fraclab": {"y_train": y + 0.5},
        "nanx": {"X_train": np.where(X > 0.9, np.nan, X)},
        "infx": {"X_test": np.full((10, 6), np.inf)},
        "complexx": {"X_train": X + 1j},
        "lenmismatch": {"y_train": y[:30]},
        "featmismatch": {"X_test": X[:10, :4]},
        "y2d": {"y_train": y[:, None]},
    }.items():
        f[name] = _npz(d / f"{name}.npz", **{**ok, **change})
    f["missingkey"] = _npz(d / "missingkey.npz", X_train=X, y_train=y)
    f["objects"] = _npz(d / "objects.npz", **{**ok, "X_train": np.array([object()] * 40, dtype=object)})
    # an .npz whose X_train header claims 10^12 rows: refused from the header, nothing allocated
    with zipfile.ZipFile(d / "hugeheader.npz", "w") as z:
        for k, v in ok.items():
            z.writestr(k + ".npy", _npy_claiming(v, (10**12, 6)) if k == "X_train" else _npy_claiming(v, v.shape))
    f["hugeheader"] = str(d / "hugeheader.npz")
    # IDX folders: corrupt gzip, bad magic number, truncated data
    for name, content in {
        "idxgz": b"\x1f\x8b\x08\x00garbage" * 10,
        "idxmagic": b"\x01\x02\x03\x04" + bytes(100),
        "idxshort": b"\x00\x00\x08\x03" + struct.pack(">III", 10, 28, 28) + bytes(50),
    }.items():
        folder = d / name
        folder.mkdir()
        for stem in (
            "train-images-idx3-ubyte",
            "train-labels-idx1-ubyte",
            "t10k-images-idx3-ubyte",
            "t10k-labels-idx1-ubyte",
        ):
            target = folder / (stem + ".gz")
            target.write_bytes(content if name == "idxgz" else gzip.compress(content))
        f[name] = str(folder)
    # inputs for predict
    np.save(d / "x.npy", X)
    np.save(d / "wrongfeatures.npy", X[:, :4])
    np.save(d / "nan.npy", np.where(X > 0.5, np.nan, X))
    np.save(d / "strings.npy", np.array(["a", "b"]))
    np.save(d / "objects.npy", np.array([object()], dtype=object), allow_pickle=True)
    (d / "empty.npy").write_bytes(b"")
    (d / "renamed.npy").write_bytes((d / "ok.npz").read_bytes())
    (d / "hugeheader.npy").write_bytes(_npy_claiming(X, (10**10, 6)))
    for name in ("x", "wrongfeatures", "nan", "strings", "objects", "empty", "renamed", "hugeheader"):
        f["npy_" + name] = str(d / f"{name}.npy")
    # a trained run (with --checkpoint-every) and edited copies of its checkpoint
    run = d / "run"
    assert (
        main(
            [
                "train",
                "--data",
                f["ok"],
                "--hidden",
                "8",
                "--epochs",
                "2",
                "--batch-size",
                "10",
                "--quiet",
                "--checkpoint-every",
                "3",
                "--out",
                str(run),
            ]
        )
        == 0
    )
    f["run"] = str(run)
    ckpt = (run / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", ckpt[:8])[0]
    header = json.loads(ckpt[8 : 8 + n])
    meta = json.loads(header["__metadata__"]["bnnet"])

    def edited(name, change, tensors=None):
        m = json.loads(json.dumps(meta))
        change(m)
        h = {**header, "__metadata__": {"bnnet": json.dumps(m)}, **(tensors or {})}
        text = json.dumps(h).encode()
        folder = d / name
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + ckpt[8 + n :])
        f[name] = str(folder)

    def setitem(*path, value):
        def change(m):
            for k in path[:-1]:
                m = m[k]
            m[path[-1]] = value

        return change

    edited("version2", setitem("format_version", value="2"))
    edited("versionfuture", setitem("format_version", value=99))
    edited("userlist", setitem("user", value=[1, 2]))
    edited("hugelayer", setitem("architecture", 0, "in_features", value=20000))
    edited("hugelayer7", setitem("architecture", 0, "out_features", value=10**7))
    edited("unknownlayer", setitem("architecture", 1, "type", value="Attention"))
    edited("badeps", setitem("architecture", 1, "eps", value=-1))
    edited("badbias", setitem("architecture", 0, "bias", value="yes"))
    edited("optstep", setitem("optimizer", "t", value="abc"))
    edited("opttype", setitem("optimizer", "type", value="LBFGS"))
    edited("optlr", setitem("optimizer", "lr", value=-1))
    edited("resumebatch", setitem("user", "cli", "batch_size", value=0))
    edited("resumeopt", setitem("user", "cli", "optimizer", value="lbfgs"))
    edited("resumerng", setitem("user", "fit", "rng", value={"bit_generator": "PCG64", "state": 5}))
    edited("resumehistory", lambda m: m["user"]["fit"].pop("history"))
    edited("resumestep", setitem("user", "fit", "step", value=-3))
    edited("resumeepoch", setitem("user", "fit", "epoch", value=1.5))
    edited("resumehidden", setitem("user", "cli", "hidden", value="8;8"))
    edited("resumenocli", lambda m: m["user"].pop("cli"))
    edited("countfloat", lambda m: None, {"buffers/1.count": {**header["buffers/1.count"], "dtype": "F64"}})
    edited("shapewrong", lambda m: None, {"params/0.W": {**header["params/0.W"], "shape": [8, 6]}})
    deep = b'{"__metadata__": {"bnnet": "' + b"[" * 200000 + b"]" * 200000 + b'"}}'
    (d / "deep").mkdir()
    (d / "deep" / "model.safetensors").write_bytes(struct.pack("<Q", len(deep)) + deep)
    f["deep"] = str(d / "deep")
    (d / "garbage.safetensors").write_bytes(os.urandom(4096))
    f["garbage"] = str(d / "garbage.safetensors")
    (d / "report").mkdir()
    (d / "report" / "summary.md").write_bytes(b"\xff\xfe bad bytes \x80")
    f["badreport"] = str(d / "report")
    f["dir"] = str(d)
    return f


# (command line with {placeholders} from the fixture, exit code, fragment of the last stderr line)
CASES = [
    # options: argparse names the option (exit 2)
    ("train --batch-size 0", 2, "argument --batch-size: must be an integer >= 1"),
    ("train --batch-size -5", 2, "argument --batch-size: must be an integer >= 1"),
    ("train --batch-size abc", 2, "argument --batch-size"),
    ("train --epochs 0", 2, "argument --epochs: must be an integer >= 1"),
    ("train --epochs -1", 2, "argument --epochs"),
    ("train --epochs 1.5", 2, "argument --epochs"),
    ("train --seed -1", 2, "argument --seed: must be an integer in [0, 2**63)"),
    ("train --seed abc", 2, "argument --seed"),
    (f"train --seed {BIG}", 2, "argument --seed"),
    ("train --lr 0", 2, "argument --lr: must be a finite number > 0"),
    ("train --lr -1", 2, "argument --lr"),
    ("train --lr nan", 2, "argument --lr"),
    ("train --lr inf", 2, "argument --lr"),
    ("train --lr-decay 0", 2, "argument --lr-decay: expected a number in (0, 1]"),
    ("train --lr-decay 1.5", 2, "argument --lr-decay"),
    ("train --hidden 0", 2, "argument --hidden: expected positive layer sizes"),
    ("train --hidden a,b", 2, "argument --hidden: expected comma-separated integers"),
    ("train --hidden ,", 2, "argument --hidden"),
    ("train --activation softmax", 2, "argument --activation: invalid choice"),
    ("train --optimizer lbfgs", 2, "argument --optimizer: invalid choice"),
    ("train --dtype float16", 2, "argument --dtype: invalid choice"),
    ("train --init zeros", 2, "argument --init: invalid choice"),
    ("train --threads 0", 2, "argument --threads: must be an integer >= 1"),
    ("train --clip-grad-norm 0", 2, "argument --clip-grad-norm: must be a finite number > 0"),
    ("train --clip-grad-norm -1", 2, "argument --clip-grad-norm"),
    ("train --checkpoint-every 0", 2, "argument --checkpoint-every: must be an integer >= 1"),
    ("experiment fig1 --steps 0", 2, "argument --steps: must be an integer >= 1"),
    ("experiment fig1 --steps -5", 2, "argument --steps"),
    ("experiment batch-size --epochs 0", 2, "argument --epochs"),
    ("experiment fig1 --seed -2", 2, "argument --seed"),
    ("experiment nosuch", 2, "invalid choice"),
    ("recompute-stats {run} --batch-size 1", 2, "argument --batch-size: must be an integer >= 2"),
    ("recompute-stats {run} --mode median", 2, "argument --mode: invalid choice"),
    ("evaluate {run} --split validation", 2, "argument --split: invalid choice"),
    ("export {run}", 2, "the following arguments are required: --onnx"),
    # settings that only fit can judge, and data files (exit 1)
    ("train --data {ok} --batch-size 1 --quiet", 1, "batch_size=1 cannot train BatchNorm"),
    ("train --local-bn --quiet", 1, "--local-bn only applies with --distributed"),
    ("train --data {dir}/nowhere.npz", 1, "nowhere.npz: no such file"),
    ("train --data mnist6k", 1, "--data must be 'mnist5k', a folder of MNIST IDX files, an .npz or a .csv file"),
    ("train --data {empty}", 1, "empty.npz: cannot read as .npz without pickle"),
    ("train --data {x1d}", 1, "X_train must have one row per sample"),
    ("train --data {xscalar}", 1, "X_train must have one row per sample"),
    ("train --data {emptytrain}", 1, "X_train is empty"),
    ("train --data {emptytest}", 1, "X_test is empty"),
    ("train --data {strlab}", 1, "y_train must hold integer class labels, got dtype <U1"),
    ("train --data {biglab}", 1, "y_train must hold integer class labels in [0, 65536), got 1000000000.0"),
    ("train --data {neglab}", 1, "got -1 at row 0"),
    ("train --data {fraclab}", 1, "got 0.5 at row 0"),
    ("train --data {nanx}", 1, "X_train holds NaN or Inf"),
    ("train --data {infx}", 1, "X_test holds NaN or Inf"),
    ("train --data {complexx}", 1, "X_train must hold real numbers, got dtype complex"),
    ("train --data {lenmismatch}", 1, "y_train must be 1-D with one label per row of X_train (40)"),
    ("train --data {featmismatch}", 1, "X_test has 4 features, X_train 6"),
    ("train --data {y2d}", 1, "y_train must be 1-D"),
    ("train --data {missingkey}", 1, "missing array(s) X_test, y_test"),
    ("train --data {objects}", 1, "X_train: holds Python objects"),
    ("train --data {hugeheader}", 1, "header says shape (1000000000000, 6)"),
    ("train --data {idxgz}", 1, "cannot read IDX file"),
    ("train --data {idxmagic}", 1, "not an IDX file (bad magic number"),
    ("train --data {idxshort}", 1, "header says shape (10, 28, 28)"),
    # predict inputs
    ("predict {run} {npy_empty}", 1, "empty.npy: not a valid .npy array"),
    ("predict {run} {npy_renamed}", 1, "is an .npz archive, not a .npy array"),
    ("predict {run} {npy_wrongfeatures}", 1, "X must have 6 features (columns), got 4"),
    ("predict {run} {npy_nan}", 1, "X contains NaN or Inf"),
    ("predict {run} {npy_strings}", 1, "X must hold real numbers, got an array of dtype <U1"),
    ("predict {run} {npy_objects}", 1, "holds Python objects"),
    ("predict {run} {npy_hugeheader}", 1, "header says shape (10000000000, 6)"),
    ("predict {run} {dir}/missing.npy", 1, "missing.npy: no such file"),
    # checkpoints
    ("evaluate {dir}/missing.safetensors", 1, "no such checkpoint file"),
    ("evaluate {garbage}", 1, "not a valid bnnet checkpoint"),
    ("evaluate {version2}", 1, "metadata field format_version must be an integer >= 1, got '2'"),
    ("evaluate {versionfuture}", 1, "written by a newer bnnet (format 99)"),
    ("evaluate {userlist}", 1, "metadata field user must be an object, got [1, 2]"),
    ("evaluate {deep}", 1, "not a valid bnnet checkpoint (RecursionError"),
    ("evaluate {hugelayer}", 1, "architecture[0].in_features = 20000 does not match the file's tensors"),
    ("export {hugelayer7} --onnx {dir}/m.onnx", 1, "architecture[0].out_features = 10000000 does not match"),
    ("fold {unknownlayer} {dir}/f.safetensors", 1, "metadata field architecture[1].type must be one of"),
    ("evaluate {badeps}", 1, "cannot rebuild the architecture (BatchNorm: eps must be in (0, inf), got -1.0)"),
    ("evaluate {badbias}", 1, "Linear: bias must be True or False, got 'yes'"),
    ("evaluate {optstep}", 1, "metadata field optimizer.t must be an integer >= 0, got 'abc'"),
    ("evaluate {opttype}", 1, "metadata field optimizer.type must be one of Adam, AdamW, Momentum, RMSprop, SGD"),
    ("evaluate {optlr}", 1, "metadata field optimizer is invalid (Adam: lr must be in (0, inf), got -1.0)"),
    ("evaluate {countfloat}", 1, "buffers 1.count: checkpoint float64, model int64"),
    ("evaluate {shapewrong}", 1, "does not match the model: params 0.W: checkpoint (8, 6), model (6, 8)"),
    # resume
    ("train --resume {resumebatch} --quiet", 1, "user.cli.batch_size = 0 is invalid (must be an integer >= 1"),
    ("train --resume {resumeopt} --quiet", 1, "user.cli.optimizer = 'lbfgs' is invalid (expected one of"),
    ("train --resume {resumehidden} --quiet", 1, "user.cli.hidden = '8;8' is invalid"),
    ("train --resume {resumerng} --quiet", 1, "metadata field user.fit.rng must be a numpy PCG64 state"),
    ("train --resume {resumehistory} --quiet", 1, "metadata field user.fit.history must be an object with the lists"),
    ("train --resume {resumestep} --quiet", 1, "metadata field user.fit.step must be an integer in [0, 8]"),
    ("train --resume {resumeepoch} --quiet", 1, "metadata field user.fit.epoch must be an integer in [1, 3]"),
    ("train --resume {resumenocli} --quiet", 1, "not written by `bnnet train` (no 'cli' settings)"),
    ("train --resume {run} --epochs 5", 1, "--epochs 5 conflicts with the resumed run's own setting (2)"),
    ("train --resume {dir}/norun", 1, "no such checkpoint file"),
    # other commands
    ("report {badreport}", 1, "summary.md is not UTF-8 text"),
    ("report {dir}", 1, "holds no summary.md"),
    ("recompute-stats {run} --data {nanx}", 1, "X_train holds NaN or Inf"),
    ("recompute-stats {run} --out {dir}/r.safetensors --in-place", 1, "give --out FILE or --in-place, not both"),
]


def run_cli(line, files, capsys):
    argv = [part.format(**files) for part in line.split()]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("line,code,fragment", CASES, ids=[c[0] or "no-command" for c in CASES])
def test_bad_command_line(files, capsys, line, code, fragment):
    got, err = run_cli(line, files, capsys)
    assert got == code, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert fragment in last, last
    if code == 1:  # our own errors: exactly one line
        assert err.count("\n") == 1 and last.startswith(f"bnnet {line.split()[0]}: error: "), err


def test_the_table_is_long_enough():
    assert len(CASES) >= 60


def test_recompute_stats_with_bad_data_leaves_the_run_as_it_was(files, capsys):
    path = pathlib.Path(files["run"]) / "model.safetensors"
    before = path.read_bytes()
    run_cli("recompute-stats {run} --data {nanx}", files, capsys)
    assert path.read_bytes() == before
    assert run_cli("recompute-stats {run} --data {ok}", files, capsys)[0] == 0
    assert path.read_bytes() == before  # written beside it by default
    assert os.path.exists(os.path.join(files["run"], "model.recomputed.safetensors"))


def test_export_without_the_onnx_extra_says_what_to_install(files, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    code, err = run_cli("export {run} --onnx {dir}/m.onnx", files, capsys)
    assert (
        code == 1
        and err.strip()
        == 'bnnet export: error: needs the optional package onnx: in bnnet\'s checkout, pip install ".[onnx]"'
    )


def test_an_unexpected_error_is_named_as_a_bug_with_the_traceback_only_under_debug(files, capsys, monkeypatch):
    import bnnet.cli

    def broken(args):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(bnnet.cli, "cmd_evaluate", broken)
    code, err = run_cli("evaluate {run}", files, capsys)
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert "internal error ZeroDivisionError: division by zero -- this is a bug in bnnet" in err
    code, err = run_cli("--debug evaluate {run}", files, capsys)
    assert code == 1 and "Traceback" in err and err.strip().splitlines()[-1].startswith("bnnet evaluate: error:")


def test_a_huge_layer_claim_is_refused_before_anything_is_allocated(files, capsys):
    import resource
    import time

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    code, _ = run_cli("evaluate {hugelayer7}", files, capsys)
    assert code == 1 and time.perf_counter() - start < 2
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50_000  # KiB


def test_resume_keeps_checkpoint_every(files, capsys, tmp_path, monkeypatch):
    """A run interrupted after step 4 (checkpoint at step 3) and resumed writes its periodic
    checkpoints again: --checkpoint-every comes back from the checkpoint."""
    import bnnet

    written, original = [], bnnet.train.Checkpoints.write

    def spy(self, run_state):
        written.append(run_state.step)
        original(self, run_state)
        if run_state.step == 3 and not self.resumed:
            raise KeyboardInterrupt  # as if killed after the step-3 checkpoint

    monkeypatch.setattr(bnnet.train.Checkpoints, "write", spy)
    monkeypatch.setattr(bnnet.train.Checkpoints, "resumed", False, raising=False)
    argv = [
        "train",
        "--data",
        files["ok"],
        "--hidden",
        "8",
        "--epochs",
        "2",
        "--batch-size",
        "10",
        "--quiet",
        "--checkpoint-every",
        "3",
        "--out",
        str(tmp_path / "run"),
    ]
    assert main(argv) == 130
    assert written == [3]
    monkeypatch.setattr(bnnet.train.Checkpoints, "resumed", True, raising=False)
    assert main(["train", "--resume", str(tmp_path / "run"), "--quiet"]) == 0
    assert written == [3, 6, 8]  # step 6 by --checkpoint-every, step 8 at the end
    capsys.readouterr()
