"""`bnnet experiment ... --quick` and `bnnet report`: the files and what is in them."""

import csv
import json
import math
import os

import pytest

from bnnet.cli import main


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _finite(rows, columns):
    return all(math.isfinite(float(r[c])) for r in rows for c in columns)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("experiments")
    for name in ("fig1", "lr-sweep", "optimizers", "batch-size", "cnn"):
        assert main(["experiment", name, "--quick", "--quiet", "--out", str(root / name)]) == 0
    return root


def _check_files(folder, name):
    for f in (f"{name}.csv", f"{name}.png", "summary.md", "summary.json"):
        assert os.path.getsize(folder / f) > 0, f
    with open(folder / f"{name}.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(folder / "summary.json") as f:
        summary = json.load(f)
    # what the figure shows, read back from it: a title with the dataset, length and mode; labelled axes
    figure = summary["figure"]
    assert figure["title"].startswith(f"{name} on mnist5k: ") and figure["title"].endswith("(quick run)")
    assert figure["axes"] and all(ax["title"] and ax["xlabel"] for ax in figure["axes"])
    assert figure["axes"][0]["ylabel"]
    return summary


def test_fig1(runs):
    summary = _check_files(runs / "fig1", "fig1")
    rows = _rows(runs / "fig1" / "fig1.csv")
    cols = [f"{k}_{t}" for k in ("test_accuracy", "p15", "p50", "p85") for t in ("bn", "nobn")]
    assert list(rows[0]) == ["step"] + [c for c in rows[0] if c != "step"] and set(cols) <= set(rows[0])
    steps = [int(r["step"]) for r in rows]
    assert steps == list(range(0, 301, 15))  # the accuracy of both runs is recorded at every checkpoint
    assert _finite(rows, cols)
    assert all(float(r["p15_bn"]) <= float(r["p50_bn"]) <= float(r["p85_bn"]) for r in rows)
    assert all(0 <= float(r["test_accuracy_bn"]) <= 1 for r in rows)
    # BN trains the sigmoid net faster at the same learning rate: the paper's finding, on 300 steps
    assert float(rows[-1]["test_accuracy_bn"]) > float(rows[-1]["test_accuracy_nobn"])
    assert summary["final_accuracy_bn"] == float(rows[-1]["test_accuracy_bn"])
    assert "with BN" in (runs / "fig1" / "summary.md").read_text()


def test_lr_sweep(runs):
    summary = _check_files(runs / "lr-sweep", "lr-sweep")
    rows = _rows(runs / "lr-sweep" / "lr-sweep.csv")
    assert len(rows) == 3 * 2 * 3  # optimizers x (BN, no BN) x learning rates
    assert {r["optimizer"] for r in rows} == {"sgd", "momentum", "adam"}
    for r in rows:  # unstable runs have no final numbers; stable ones have finite ones
        assert (r["stable"] == "1") == (math.isfinite(float(r["final_loss"])) and float(r["final_loss"]) < math.log(10))
    # BatchNorm widens the stable range for SGD
    assert summary["stable_ranges"]["sgd_bn"] is not None


def test_optimizers(runs):
    summary = _check_files(runs / "optimizers", "optimizers")
    rows = _rows(runs / "optimizers" / "optimizers.csv")
    assert {(r["optimizer"], r["batchnorm"]) for r in rows} == {
        (o, b) for o in ("sgd", "momentum", "rmsprop", "adam") for b in ("0", "1")
    }
    trained = [r for r in rows if r["step"] != "0"]
    assert _finite(trained, ["train_loss", "test_accuracy"])
    assert len(rows) == 8 * 7  # step 0 and every 10 of 60 steps, for each of the 8 runs
    assert set(summary["final_accuracy"]) == {
        f"{o}_{t}" for o in ("sgd", "momentum", "rmsprop", "adam") for t in ("bn", "nobn")
    }


def test_batch_size(runs):
    _check_files(runs / "batch-size", "batch-size")
    rows = _rows(runs / "batch-size" / "batch-size.csv")
    assert [(r["norm"], r["batch_size"]) for r in rows] == [
        (n, b) for n in ("batch", "renorm", "ghost") for b in ("4", "16", "64")
    ]
    assert _finite(rows, ["test_accuracy", "train_mode_accuracy", "train_eval_gap"])
    assert all(float(r["train_eval_gap"]) > 0 for r in rows)


def test_report_embeds_every_figure(runs, tmp_path):
    out = tmp_path / "report.md"
    names = ["fig1", "lr-sweep", "optimizers", "batch-size"]
    assert main(["report", *(str(runs / n) for n in names), "--out", str(out)]) == 0
    text = out.read_text()
    for n in names:
        link = os.path.relpath(runs / n / f"{n}.png", tmp_path)
        assert f"]({link})" in text
    assert text.count("| ---") + text.count("|---") >= 4  # the key-number tables came along


def test_experiments_are_deterministic(tmp_path):
    for k in (1, 2):
        assert (
            main(["experiment", "optimizers", "--quick", "--quiet", "--steps", "12", "--out", str(tmp_path / str(k))])
            == 0
        )
    assert (tmp_path / "1" / "optimizers.csv").read_text() == (tmp_path / "2" / "optimizers.csv").read_text()


def test_experiment_argument_errors(tmp_path, capsys):
    assert main(["experiment", "fig1", "--epochs", "2", "--out", str(tmp_path)]) == 1
    assert "--epochs applies to experiment batch-size only" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing")]) == 1


def test_batch_size_figure_labels_every_size(runs):
    figure = json.loads((runs / "batch-size" / "summary.json").read_text())["figure"]
    assert [ax["xticklabels"] for ax in figure["axes"]] == [["4", "16", "64"]] * 2
    assert "gap = mean |train - eval| / mean |eval|" in figure["axes"][1]["ylabel"]


def test_accuracy_panels_are_zoomed_to_the_curves(runs):
    rows = _rows(runs / "optimizers" / "optimizers.csv")
    late = [float(r["test_accuracy"]) for r in rows if int(r["step"]) >= 12]
    low, high = json.loads((runs / "optimizers" / "summary.json").read_text())["figure"]["axes"][1]["ylim"]
    assert min(late) - 0.2 * (max(late) - min(late)) <= low and high <= max(late) + 0.2 * (max(late) - min(late)) + 1e-3


def test_cnn(runs):
    summary = _check_files(runs / "cnn", "cnn")
    rows = _rows(runs / "cnn" / "cnn.csv")
    assert [r["run"] for r in rows[::4]] == ["bn", "nobn", "bn_b4", "renorm_b4"]  # steps 0, 10, 20, 30 of each
    assert [int(r["step"]) for r in rows[:4]] == [0, 10, 20, 30]
    assert _finite([r for r in rows if r["step"] != "0"], ["train_loss", "test_accuracy"])
    assert set(summary["first_step_95"]) == set(summary["final_accuracy"]) == {"bn", "nobn", "bn_b4", "renorm_b4"}
    final = {r["run"]: float(r["test_accuracy"]) for r in rows if r["step"] == "30"}
    assert final == summary["final_accuracy"]
    assert final["bn"] > 0.3  # 30 steps of a small convnet learn something (chance is 0.1)
    assert "first step at 95% test accuracy" in (runs / "cnn" / "summary.md").read_text()


def test_report_on_a_train_run_draws_its_learning_curves(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--epochs", "2", "--quiet", "--out", str(run)]) == 0
    assert main(["report", str(run), "--out", str(tmp_path / "report.md")]) == 0
    with open(run / "learning_curves.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    page = (tmp_path / "report.md").read_text()
    summary = json.loads((run / "summary.json").read_text())
    assert f"Test accuracy {summary['test_accuracy']:.4f}" in page and "(run/learning_curves.png)" in page
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "history.json").write_text("{}")
    assert main(["report", str(tmp_path / "broken")]) == 1


QUICK = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results", "experiments-quick")


def _close(a, b, what, acc=0.05):
    """Equal structure; numbers within `acc` absolute (accuracies, on a few hundred test images) or 10%
    relative (other quantities): BLAS and thread counts may round differently on another machine."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), what
        for k in a:
            _close(a[k], b[k], f"{what}.{k}", acc)
    elif isinstance(a, list):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{what}[{i}]", acc)
    elif isinstance(a, float) and isinstance(b, float):
        assert abs(a - b) <= max(acc if abs(a) <= 1 else 0, 0.1 * abs(b)), (what, a, b)
    else:
        assert a == b, (what, a, b)


@pytest.mark.parametrize("name", ["fig1", "lr-sweep", "optimizers", "batch-size", "cnn"])
def test_quick_runs_still_give_the_committed_findings(runs, name):
    """The code against benchmarks/results/experiments-quick (written by `bnnet experiment NAME --quick`):
    a change that moves an experiment's findings fails here until the findings are measured again."""
    with open(os.path.join(QUICK, f"{name}.json")) as f:
        committed = json.load(f)
    with open(runs / name / "summary.json") as f:
        now = json.load(f)
    skip = {"date", "machine", "figure", "seconds"}
    _close({k: v for k, v in now.items() if k not in skip}, {k: v for k, v in committed.items() if k not in skip}, name)
