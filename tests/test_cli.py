"""The `bnnet` command end to end, in subprocesses, on a few epochs."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import bnnet


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "bnnet", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    res = run("train", "--epochs", "2", "--out", str(out), "--seed", "1")
    assert res.returncode == 0, res.stderr
    return out, res


def test_train_writes_a_run_folder(trained_run):
    out, res = trained_run
    assert "test accuracy" in res.stdout and str(out) in res.stdout
    acc = float(res.stdout.split("test accuracy ")[1].split()[0])
    assert acc > 0.8  # two epochs of the paper's net on the bundled data
    assert "epoch 2/2" in res.stderr  # the progress bar
    assert sorted(os.listdir(out)) == ["history.csv", "history.json", "model.safetensors", "summary.json"]
    hist = json.loads((out / "history.json").read_text())
    assert hist["epoch"] == [1, 2] and len(hist["val_accuracy"]) == 2
    assert (out / "history.csv").read_text().splitlines()[0] == "epoch,loss,accuracy,val_loss,val_accuracy"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_accuracy"] == pytest.approx(acc, abs=1e-4)
    model = bnnet.load(out / "model.safetensors")
    assert [type(l).__name__ for l in model.layers][:3] == ["Linear", "BatchNorm", "Sigmoid"]
    assert [l.out_features for l in model.layers if hasattr(l, "out_features")] == [100, 100, 100, 10]


def test_evaluate_and_predict(trained_run, tmp_path):
    out, res = trained_run
    acc = res.stdout.split("test accuracy ")[1].split()[0]
    ev = run("evaluate", str(out))
    assert ev.returncode == 0, ev.stderr
    assert ev.stdout.startswith(f"test: accuracy {acc}")
    _, _, Xt, yt = bnnet.datasets.load_mnist5k()
    np.save(tmp_path / "x.npy", Xt[:50])
    pr = run("predict", str(out / "model.safetensors"), str(tmp_path / "x.npy"), "--out", str(tmp_path / "p.npy"))
    assert pr.returncode == 0, pr.stderr
    preds = np.load(tmp_path / "p.npy")
    expected = bnnet.load(out / "model.safetensors").predict(Xt[:50]).argmax(1)
    np.testing.assert_array_equal(preds, expected)
    printed = run("predict", str(out), str(tmp_path / "x.npy"))
    assert [int(v) for v in printed.stdout.split()] == list(expected)


def test_options(tmp_path):
    res = run(
        "train",
        "--epochs",
        "1",
        "--hidden",
        "32",
        "--activation",
        "relu",
        "--no-batchnorm",
        "--optimizer",
        "momentum",
        "--dtype",
        "float64",
        "--batch-size",
        "100",
        "--quiet",
        "--out",
        str(tmp_path / "r"),
    )
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""  # --quiet: no progress bar
    model = bnnet.load(tmp_path / "r" / "model.safetensors")
    assert [type(l).__name__ for l in model.layers] == ["Linear", "ReLU", "Linear"] and model.dtype == "float64"


def test_train_on_an_npz_dataset(tmp_path, rng):
    X = rng.standard_normal((60, 4)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    np.savez(tmp_path / "d.npz", X_train=X[:40], y_train=y[:40], X_test=X[40:], y_test=y[40:])
    res = run(
        "train",
        "--data",
        str(tmp_path / "d.npz"),
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--hidden",
        "8",
        "--quiet",
        "--out",
        str(tmp_path / "r"),
    )
    assert res.returncode == 0, res.stderr
    assert "test accuracy" in res.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["evaluate", "missing.safetensors"], "no such checkpoint file"),
        (["train", "--data", "nowhere.npz", "--quiet"], "nowhere.npz: no such file"),
        (["train", "--data", "mnist6k"], "--data must be 'mnist5k'"),
        (["train", "--batch-size", "1", "--quiet"], "batch_size=1 cannot train BatchNorm"),
    ],
)
def test_errors_are_one_line_without_traceback(tmp_path, args, message):
    res = run(*args, cwd=tmp_path)
    assert res.returncode == 1
    assert message in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_usage_errors_exit_2(tmp_path):
    res = run("train", "--hidden", "a,b")
    assert res.returncode == 2 and "expected comma-separated integers" in res.stderr
    res = run("train", "--threads", "0")
    assert res.returncode == 2 and "argument --threads: must be an integer >= 1" in res.stderr
    res = run("train", "--lr", "-1")
    assert res.returncode == 2 and "argument --lr: must be a finite number > 0" in res.stderr


def test_export_recompute_and_fold(trained_run, tmp_path):
    import onnxruntime as ort

    out, _ = trained_run
    _, _, Xt, _ = bnnet.datasets.load_mnist5k()
    res = run("export", str(out), "--onnx", str(tmp_path / "m.onnx"), "--fold")
    assert res.returncode == 0, res.stderr
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    model = bnnet.load(out / "model.safetensors")
    np.testing.assert_allclose(session.run(["y"], {"x": Xt[:20]})[0], model.predict(Xt[:20]), rtol=1e-5, atol=1e-5)

    res = run("recompute-stats", str(out), "--mode", "exact", "--out", str(tmp_path / "r.safetensors"))
    assert res.returncode == 0, res.stderr
    recomputed = bnnet.load(tmp_path / "r.safetensors")
    expected = bnnet.recompute_bn_stats(model, bnnet.datasets.load_mnist5k()[0], mode="exact")
    for k in expected.buffers:
        np.testing.assert_allclose(recomputed.buffers[k], expected.buffers[k], rtol=1e-6)

    res = run("fold", str(out), str(tmp_path / "f.safetensors"))
    assert res.returncode == 0, res.stderr
    folded = bnnet.load(tmp_path / "f.safetensors")
    assert folded.eval_only and not any(type(l).__name__ == "BatchNorm" for l in folded.layers)
    np.testing.assert_allclose(
        folded.predict(Xt[:50]), bnnet.load(out / "model.safetensors").predict(Xt[:50]), rtol=1e-5, atol=1e-4
    )


def test_train_a_convnet_then_evaluate_predict_export_and_resume_it(tmp_path):
    out = tmp_path / "cnn"
    res = run(
        "train",
        "--model",
        "cnn",
        "--channels",
        "4,8",
        "--hidden",
        "16",
        "--epochs",
        "2",
        "--quiet",
        "--out",
        str(out),
        "--checkpoint-every",
        "30",
    )
    assert res.returncode == 0, res.stderr
    acc = float(res.stdout.split("test accuracy ")[1].split()[0])
    assert acc > 0.8  # two epochs of a small convnet on the bundled data
    model = bnnet.load(out / "model.safetensors")
    assert [type(l).__name__ for l in model.layers][:4] == ["Conv2d", "BatchNorm", "ReLU", "MaxPool2d"]
    assert model.input_shape == (1, None, None)
    settings = json.loads((out / "summary.json").read_text())["args"]
    assert settings["model"] == "cnn" and settings["channels"] == [4, 8] and settings["activation"] == "relu"
    ev = run("evaluate", str(out))
    assert ev.returncode == 0 and ev.stdout.startswith(f"test: accuracy {acc:.4f}"), ev.stderr
    _, _, Xt, yt = bnnet.datasets.load_mnist5k()
    np.save(tmp_path / "x.npy", Xt[:20])  # flat rows, as the data files hold them
    pr = run("predict", str(out), str(tmp_path / "x.npy"), "--out", str(tmp_path / "p.npy"))
    assert pr.returncode == 0, pr.stderr
    X = Xt[:20].reshape(20, 1, 28, 28)
    np.testing.assert_array_equal(np.load(tmp_path / "p.npy"), model.predict(X).argmax(1))
    ex = run("export", str(out), "--onnx", str(tmp_path / "m.onnx"), "--fold")
    assert ex.returncode == 0, ex.stderr
    np.save(tmp_path / "bad.npy", Xt[:3, :700])
    bad = run("predict", str(out), str(tmp_path / "bad.npy"))
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "not 1 square image" in bad.stderr
    wrong = run("train", "--channels", "4", "--epochs", "1", "--quiet", "--out", str(tmp_path / "x"))
    assert wrong.returncode == 1 and "--channels applies to --model cnn only" in wrong.stderr
    again = run("train", "--resume", str(out), "--quiet")
    assert again.returncode == 0 and "test accuracy" in again.stdout, again.stderr


def test_version_help_and_examples():
    assert run("--version").stdout.strip() == f"bnnet {bnnet.__version__}"
    bare = run()
    assert bare.returncode == 0 and bare.stdout.startswith("usage: bnnet") and "COMMAND --help" in bare.stdout
    page = run("train", "--help").stdout
    assert "(default: 20)" in page and "(default: 0)" in page and "(default: adam)" in page
    assert page.count("default") >= 15 and "examples:\n  bnnet train\n" in page
    for command in ("evaluate", "predict", "export", "recompute-stats", "fold", "experiment", "report"):
        assert run(command, "--help").stdout.count("\n  bnnet ") >= 2, command


def test_messages_about_folded_models_inputs_out_of_range_and_file_modes(trained_run, tmp_path):
    out, res = trained_run
    assert "Adam lr 0.003 -> 0.0003, batch 60, 2 epochs" in res.stderr  # the run's first line, readable
    assert "epoch 2/2: loss " in res.stderr and " test_acc " in res.stderr  # a log line per epoch (not a tty)
    old = os.umask(0o022)
    try:
        assert run("fold", str(out), str(tmp_path / "f.safetensors")).returncode == 0
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "f.safetensors").st_mode & 0o777 == 0o644  # as open() would make it
    ex = run("export", str(tmp_path / "f.safetensors"), "--onnx", str(tmp_path / "f.onnx"))
    assert ex.returncode == 0 and "no BatchNorm layers" in ex.stdout, ex.stdout + ex.stderr
    rs = run("recompute-stats", str(tmp_path / "f.safetensors"))
    assert rs.returncode == 1 and "has no BatchNorm layers" in rs.stderr
    again = run("fold", str(tmp_path / "f.safetensors"), str(tmp_path / "g.safetensors"))
    assert again.returncode == 1 and "no BatchNorm layers to fold" in again.stderr
    _, _, Xt, _ = bnnet.datasets.load_mnist5k()
    np.save(tmp_path / "raw.npy", (Xt[:5] * 255).astype(np.uint8))
    pr = run("predict", str(out), str(tmp_path / "raw.npy"))
    assert pr.returncode == 0 and "warning: the inputs range over [0, 255]" in pr.stderr and "X / 255" in pr.stderr
    np.save(tmp_path / "ok.npy", Xt[:5])
    assert "warning" not in run("predict", str(out), str(tmp_path / "ok.npy")).stderr


@pytest.mark.parametrize(
    "line,expected", [("bnnet tr", "train"), ("bnnet train --opt", "--optimizer"), ("bnnet train --model ", "cnn")]
)
def test_shell_completion(tmp_path, line, expected):
    """What bash asks argcomplete for (the [completion] extra), answered by the bnnet command itself."""
    out = tmp_path / "completions"
    env = dict(
        os.environ, _ARGCOMPLETE="1", COMP_LINE=line, COMP_POINT=str(len(line)), _ARGCOMPLETE_STDOUT_FILENAME=str(out)
    )
    res = subprocess.run([sys.executable, "-m", "bnnet"], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert expected in out.read_text().split(), out.read_text()
