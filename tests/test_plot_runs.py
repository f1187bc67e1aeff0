"""`mlecli plot` and `mlecli runs`: pictures of a run, and runs side by side."""

import json
import shutil
import struct
import sys

import pytest
from click.testing import CliRunner
from fakes import copy_run_without_evaluations

from mlecli.cli import main

pytest.importorskip("matplotlib", reason="pip install 'mlecli[plot]' for the plot tests")


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory, tiny, tiny_folder):
    root = tmp_path_factory.mktemp("plot")
    cfg = tiny.write_config(root / "tiny-run.toml", tiny_folder, "validation = 0.2\n[model]\nhidden = [12]\n"
                            "[train]\nepochs = 3\nbatch_size = 16\nlearning_rate = 0.0005\n")
    run, data = root / "run", root / "data"
    assert cli("train", cfg, "--run-dir", run, "--data-dir", data, "-q").exit_code == 0
    res = cli("evaluate", run, "--data-dir", data, "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["most_confident_errors"]  # something to show
    return run, data


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_writes_three_readable_pngs_without_a_display(evaluated_run, tmp_path, monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    run, data = evaluated_run
    res = cli("plot", run, "--out", tmp_path, "--data-dir", data)
    assert res.exit_code == 0, res.output
    names = ["curves.png", "hidden-units.png", "mistakes.png"]
    assert res.stdout.splitlines() == [str(tmp_path / n) for n in names]
    for name in names:
        w, h = png_size(tmp_path / name)
        assert 400 <= w <= 2500 and 200 <= h <= 2500, (name, w, h)
        assert (tmp_path / name).stat().st_size > 10_000


def test_the_same_run_gives_byte_identical_pngs(evaluated_run, tmp_path):
    run, data = evaluated_run
    for out in ("a", "b"):
        assert cli("plot", run, "--out", tmp_path / out, "--data-dir", data).exit_code == 0
    for name in ("curves.png", "hidden-units.png", "mistakes.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_plot_defaults_to_the_run_folder_and_skips_mistakes_before_evaluate(evaluated_run, tmp_path):
    run, data = evaluated_run
    copy = copy_run_without_evaluations(run, tmp_path / "copy")
    res = cli("plot", copy, "--data-dir", data)
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in copy.glob("*.png")) == ["curves.png", "hidden-units.png"]
    assert f"no evaluation in {copy}: run `mlecli evaluate {copy}` for mistakes.png" in res.stderr


def test_logistic_regression_shows_its_single_weight_image(tiny, tiny_folder, tmp_path):
    cfg = tiny.write_config(tmp_path / "lr.toml", tiny_folder, "[model]\nhidden = []\n[train]\nepochs = 1\n")
    run = tmp_path / "run"
    assert cli("train", cfg, "--run-dir", run, "--data-dir", tmp_path / "d", "-q").exit_code == 0
    assert cli("plot", run, "--data-dir", tmp_path / "d").exit_code == 0
    assert png_size(run / "hidden-units.png")[0] >= 400


def test_without_matplotlib_plot_says_how_to_install_it(evaluated_run, monkeypatch):
    run, data = evaluated_run
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    res = cli("plot", run, "--data-dir", data)
    assert res.exit_code == 1
    assert res.stderr == "Error: mlecli plot needs matplotlib: pip install 'mlecli[plot]' (or pip install matplotlib)\n"


def test_train_prints_the_command_that_plots_the_run(tiny_config, tmp_path):
    res = cli("train", tiny_config(train={"epochs": 1}), "--run-dir", tmp_path / "r", "--data-dir", tmp_path / "d")
    assert res.stdout.splitlines()[-1] == f"plot:     mlecli plot {tmp_path / 'r'}"


# ---------------------------------------------------------------------------
# mlecli runs


@pytest.fixture
def runs_folder(evaluated_run, tiny_config, tmp_path, monkeypatch):
    """finished (evaluated), interrupted, failed, and two broken runs."""
    import os
    import signal

    from mlecli import train as training

    run, data = evaluated_run
    runs = tmp_path / "runs"
    runs.mkdir()
    shutil.copytree(run, runs / "a-finished")
    real = training.train_step
    calls = {"n": 0}

    def interrupt(*args):
        calls["n"] += 1
        if calls["n"] == 20:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args)

    monkeypatch.setattr(training, "train_step", interrupt)
    assert cli("train", tiny_config(), "--run-dir", runs / "b-interrupted", "--data-dir", data).exit_code == 130
    monkeypatch.setattr(training, "train_step", real)
    assert cli("train", tiny_config(train={"learning_rate": 1e38}), "--run-dir", runs / "c-failed",
               "--data-dir", data).exit_code == 1
    broken = runs / "d-broken"
    shutil.copytree(run, broken)
    (broken / "checkpoints" / "last.npz").write_bytes(b"not a checkpoint")
    (runs / "e-empty" / "checkpoints").mkdir(parents=True)
    (runs / "not-a-run").mkdir()
    return runs


def test_runs_lists_every_run_with_its_status(runs_folder):
    res = cli("runs", runs_folder)
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["name", "task", "hidden", "epochs", "best", "val", "LL", "best", "val", "acc", "test",
                                "acc", "seconds", "status"]
    by_name = {line.split()[0]: line for line in lines[1:] if not line.startswith(" ")}
    assert set(by_name) == {"a-finished", "b-interrupted", "c-failed", "d-broken", "e-empty"}
    assert by_name["a-finished"].endswith("finished") and " 3/3 " in by_name["a-finished"]
    assert by_name["b-interrupted"].endswith("interrupted") and " 1/4 " in by_name["b-interrupted"]
    assert by_name["c-failed"].endswith("failed") and " 0/4 " in by_name["c-failed"]
    assert by_name["d-broken"].endswith("broken") and by_name["e-empty"].endswith("broken")
    assert any(line.startswith("  c-failed: the log-likelihood became nan") for line in lines)
    assert any(line.startswith("  d-broken: ") and "is not a readable checkpoint" in line for line in lines)


def test_runs_json_has_the_same_figures(runs_folder):
    rows = json.loads(cli("runs", runs_folder, "--json").stdout)
    finished = next(r for r in rows if r["name"] == "a-finished")
    report = json.loads((runs_folder / "a-finished" / "eval-test-best.json").read_text())
    assert finished["test_acc"] == report["accuracy"]
    assert finished["status"] == "finished" and finished["epochs_done"] == 3 and finished["hidden"] == [12]
    lines = [json.loads(x) for x in (runs_folder / "a-finished" / "metrics.jsonl").read_text().splitlines()]
    assert finished["val_ll"] == max(m["val_ll_mean"] for m in lines)


def test_runs_sorts_by_a_figure_best_first_with_unknowns_last(runs_folder):
    rows = json.loads(cli("runs", runs_folder, "--json", "--sort", "val_acc").stdout)
    values = [r["val_acc"] for r in rows]
    known = [v for v in values if v is not None]
    assert known == sorted(known, reverse=True) and values[len(known):] == [None] * (len(values) - len(known))


def test_runs_of_a_missing_folder(tmp_path):
    res = cli("runs", tmp_path / "nope")
    assert res.exit_code == 1
    assert res.stderr == f"Error: {tmp_path / 'nope'} is not a folder: give the folder that holds your runs (default: runs)\n"
