"""`mlecli plot` and `mlecli runs`: pictures of a run, and runs side by side."""

import json
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
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


def test_logistic_regression_draws_weights_png_titled_once_with_a_colour_bar_naming_the_classes(
        tiny, tiny_folder, tmp_path, monkeypatch):
    from mlecli.use import plot

    cfg = tiny.write_config(tmp_path / "lr.toml", tiny_folder, "[model]\nhidden = []\n[train]\nepochs = 1\n")
    run = tmp_path / "run"
    assert cli("train", cfg, "--run-dir", run, "--data-dir", tmp_path / "d", "-q").exit_code == 0
    drawn = {}
    real = plot.save_png

    def record(fig, path, tight=False):
        drawn[path.name] = [fig._suptitle.get_text()] + [t.get_text() for ax in fig.axes[1:] for t in
                                                          (ax.title, ax.xaxis.label, ax.yaxis.label)]
        real(fig, path, tight)

    monkeypatch.setattr(plot, "save_png", record)
    res = cli("plot", run, "--data-dir", tmp_path / "d")
    assert res.exit_code == 0
    assert res.stdout.splitlines() == [str(run / "curves.png"), str(run / "weights.png")]  # not hidden-units.png
    assert not (run / "hidden-units.png").exists() and png_size(run / "weights.png")[0] >= 400
    title, top, bottom, side = drawn["weights.png"]
    assert title.replace("\n", " ") == ("run: odd (1,3,5,7,9) vs even (0,2,4,6,8) (best.npz, epoch 1): logistic "
                                        "regression, the weight of each pixel")  # "logistic regression" once
    assert (top, bottom, side) == ("red (+): evidence\nfor odd (1,3,5,7,9)", "blue (−): evidence\nfor even (0,2,4,6,8)",
                                   "weight of a pixel's ink")


def test_a_network_with_hidden_layers_draws_hidden_units_png(evaluated_run, tmp_path):
    run, data = evaluated_run
    res = cli("plot", run, "--out", tmp_path, "--data-dir", data)
    assert "hidden-units.png" in [p.name for p in map(Path, res.stdout.splitlines())]
    assert not (tmp_path / "weights.png").exists()


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

    from mlecli.run import train as training

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
    assert lines[0].split() == ["name", "task", "dataset", "hidden", "lr", "batch", "epochs", "best", "val", "LL",
                                "best", "val", "acc", "test", "acc", "seconds", "status"]
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


# ---------------------------------------------------------------------------
# mlecli runs: the columns that tell runs apart, sweeps, --where


@pytest.fixture(scope="module")
def with_a_sweep(tmp_path_factory, tiny, tiny_folder):
    """runs/: one run of its own (batch 8) and a sweep of 2 learning rates x 2 seeds."""
    root = tmp_path_factory.mktemp("runs-sweep")
    cfg = tiny.write_config(root / "tiny-run.toml", tiny_folder, "validation = 0.2\n[model]\nhidden = [6]\n"
                            "[train]\nepochs = 2\nbatch_size = 16\n")
    runs, data = root / "runs", root / "data"
    res = cli("train", cfg, "--set", "train.batch_size=8", "--run-dir", runs / "alone", "--data-dir", data, "-q")
    assert res.exit_code == 0, res.output
    res = cli("sweep", cfg, "--grid", "train.learning_rate=0.01,0.1", "--seeds", "0-1", "--sweep-dir", runs / "lr",
              "--data-dir", data, "-q")
    assert res.exit_code == 0, res.output
    return runs


def test_runs_lists_a_sweeps_runs_with_dataset_learning_rate_batch_and_sweep(with_a_sweep):
    res = cli("runs", with_a_sweep)
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["name", "sweep", "task", "dataset", "hidden", "lr", "batch", "epochs", "best", "val",
                                "LL", "best", "val", "acc", "test", "acc", "seconds", "status"]
    cells = [line.split() for line in lines[1:]]
    assert [(c[0], c[1], c[5], c[6], c[7], c[8]) for c in cells] == [  # the task is 3 words
        ("alone", "-", "tiny", "[6]", "0.05", "8"),
        ("learning_rate=0.01,seed=0", "lr", "tiny", "[6]", "0.01", "16"),
        ("learning_rate=0.01,seed=1", "lr", "tiny", "[6]", "0.01", "16"),
        ("learning_rate=0.1,seed=0", "lr", "tiny", "[6]", "0.1", "16"),
        ("learning_rate=0.1,seed=1", "lr", "tiny", "[6]", "0.1", "16"),
    ]
    assert all(c[-1] == "finished" for c in cells)


def test_runs_of_a_sweep_folder_lists_its_runs(with_a_sweep):
    rows = json.loads(cli("runs", with_a_sweep / "lr", "--json").stdout)
    got = [(r["name"], r["sweep"], r["learning_rate"], r["batch_size"], r["dataset"], r["optimizer"]) for r in rows]
    assert got == [
        ("learning_rate=0.01,seed=0", "lr", 0.01, 16, "tiny", "sgd"),
        ("learning_rate=0.01,seed=1", "lr", 0.01, 16, "tiny", "sgd"),
        ("learning_rate=0.1,seed=0", "lr", 0.1, 16, "tiny", "sgd"),
        ("learning_rate=0.1,seed=1", "lr", 0.1, 16, "tiny", "sgd"),
    ]


@pytest.mark.parametrize("filters, names", [
    (["train.learning_rate=0.1"], ["learning_rate=0.1,seed=0", "learning_rate=0.1,seed=1"]),
    (["train.learning_rate=0.1", "model.seed=1"], ["learning_rate=0.1,seed=1"]),
    (["train.batch_size=8"], ["alone"]),
    (["sweep=lr", "train.seed=0"], ["learning_rate=0.01,seed=0", "learning_rate=0.1,seed=0"]),
    (["model.hidden=[6]", "status=finished", "dataset=tiny"], ["alone", "learning_rate=0.01,seed=0",
                                                                "learning_rate=0.01,seed=1", "learning_rate=0.1,seed=0",
                                                                "learning_rate=0.1,seed=1"]),
    (["train.learning_rate=1"], []),
    (["data.dataset=mnist"], []),
])
def test_runs_where_keeps_the_rows_that_match_every_filter(with_a_sweep, filters, names):
    args = [w for f in filters for w in ("--where", f)]
    res = cli("runs", with_a_sweep, "--json", *args)
    assert res.exit_code == 0, res.output
    assert [r["name"] for r in json.loads(res.stdout)] == names


def test_runs_where_that_matches_nothing_says_so(with_a_sweep):
    res = cli("runs", with_a_sweep, "--where", "train.learning_rate=1")
    assert res.exit_code == 0
    assert res.stdout == f"no runs in {with_a_sweep} with train.learning_rate=1\n"


def test_runs_where_an_unknown_key_suggests_the_closest():
    res = cli("runs", "--where", "train.learning_rat=0.1")
    assert res.exit_code == 2
    assert res.stderr.splitlines()[-1] == ("Error: Invalid value for '--where train.learning_rat=0.1': unknown key "
                                           "train.learning_rat (did you mean train.learning_rate?)")


def test_the_optimizer_column_shows_only_when_runs_differ_in_it_or_one_is_not_sgd(with_a_sweep):
    from mlecli.sweep.runs import format_table, list_runs

    rows = list_runs(with_a_sweep)
    assert "optimizer" not in format_table(rows).splitlines()[0]
    rows[0]["optimizer"] = "adam"
    header, first = format_table(rows).splitlines()[:2]
    assert header.split()[7] == "optimizer" and first.split()[9] == "adam"
    for r in rows:
        r["optimizer"] = "adam"
    assert format_table(rows).splitlines()[0].split()[7] == "optimizer"


# ---------------------------------------------------------------------------
# mlecli plot SWEEP_DIR / several run folders: compare.png


def test_plot_of_a_sweep_draws_compare_png_and_the_same_input_gives_the_same_bytes(with_a_sweep, tmp_path):
    sweep = with_a_sweep / "lr"
    for out in ("a", "b"):
        res = cli("plot", sweep, "--out", tmp_path / out)
        assert res.exit_code == 0, res.output
        assert res.stdout == f"{tmp_path / out / 'compare.png'}\n"
    assert (tmp_path / "a" / "compare.png").read_bytes() == (tmp_path / "b" / "compare.png").read_bytes()
    w, h = png_size(tmp_path / "a" / "compare.png")
    assert 1100 <= w <= 1300 and 450 <= h <= 650


def test_plot_of_a_sweep_writes_into_the_sweep_folder_by_default(with_a_sweep, tmp_path):
    copy = tmp_path / "lr"
    shutil.copytree(with_a_sweep / "lr", copy)
    res = cli("plot", copy)
    assert res.exit_code == 0, res.output
    assert (copy / "compare.png").is_file()


def test_runs_that_differ_only_in_their_seeds_are_one_group(with_a_sweep):
    from mlecli.sweep.compare import collect

    sweep = with_a_sweep / "lr"
    folders = sorted(p for p in sweep.iterdir() if p.is_dir())
    groups, title = collect([*folders, with_a_sweep / "alone"])
    assert title == "5 runs"
    assert [(g.label, [p.name for p in g.runs]) for g in groups] == [
        ("batch_size=16, learning_rate=0.01", ["learning_rate=0.01,seed=0", "learning_rate=0.01,seed=1"]),
        ("batch_size=16, learning_rate=0.1", ["learning_rate=0.1,seed=0", "learning_rate=0.1,seed=1"]),
        ("alone", ["alone"]),  # a run alone is called by its name
    ]
    groups, title = collect([sweep])
    assert title == "lr" and [g.label for g in groups] == ["learning_rate=0.01", "learning_rate=0.1"]
    rows = json.loads(cli("runs", sweep, "--json").stdout)  # the best point: highest mean best val LL
    means = {lr: sum(r["val_ll"] for r in rows if r["learning_rate"] == lr) / 2 for lr in (0.01, 0.1)}
    best = max(means, key=means.get)
    assert [g.best for g in groups] == [best == 0.01, best == 0.1]


def test_the_band_spans_the_lowest_to_highest_seed_and_the_line_is_their_mean():
    from mlecli.sweep.compare import band

    runs = [
        [{"epoch": 1, "val_acc": 0.5}, {"epoch": 2, "val_acc": 0.7}],
        [{"epoch": 1, "val_acc": 0.75}, {"epoch": 2, "val_acc": 0.8}, {"epoch": 3, "val_acc": 0.9}],
        [{"epoch": 1, "val_acc": 1.0}, {"epoch": 2, "val_acc": None}],
    ]
    assert band(runs, "val_acc") == ([1, 2, 3], [0.75, 0.75, 0.9], [0.5, 0.7, 0.9], [1.0, 0.8, 0.9])


def test_plot_of_a_folder_that_is_neither_a_run_nor_a_sweep_is_refused(with_a_sweep, tmp_path):
    res = cli("plot", with_a_sweep / "alone", tmp_path)
    assert res.exit_code == 1
    assert res.stderr == (f"Error: {tmp_path} is neither a run folder (no config.toml) nor a sweep folder "
                          "(no sweep.json)\n")


def test_compare_draws_each_run_from_its_epoch_records_only(tiny_config, tmp_path):
    """A run without validation draws its training LL per epoch; its step records (one every
    step here) carry a training LL of their own window, and must not be averaged in."""
    from mlecli.sweep.compare import band, collect

    cfg = tiny_config(data={"validation": 0.0}, train={"epochs": 2, "log_every": 1})
    runs = [tmp_path / "a", tmp_path / "b"]
    for run, seed in zip(runs, (1, 2)):
        assert cli("train", cfg, "--run-dir", run, "--data-dir", tmp_path / "d", "-q", "--set",
                   f"train.seed={seed}").exit_code == 0
    (group,) = collect(runs)[0]
    epochs = [[json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"kind": "epoch"' in x]
              for run in runs]
    assert group.epochs == epochs
    x, mean, _, _ = band(group.epochs, "train_ll_mean")
    assert x == [1, 2] and mean == [(a["train_ll_mean"] + b["train_ll_mean"]) / 2 for a, b in zip(*epochs)]


# ---------------------------------------------------------------------------
# compare.png as a reader sees it: names, title, legend, where it goes


def compare_figure(targets):
    from mlecli.sweep.compare import collect, figure
    from mlecli.use.plot import pyplot

    plt = pyplot()
    fig = figure(plt, *collect(targets))
    fig.canvas.draw()
    texts = (fig._suptitle.get_text(), [t.get_text() for t in fig.legends[0].get_texts()])
    plt.close(fig)
    return texts


def test_runs_given_by_hand_are_labelled_by_name_and_the_title_speaks_of_seeds_only_when_a_group_has_several(
        with_a_sweep):
    sweep = with_a_sweep / "lr"
    alone = with_a_sweep / "alone"
    names = ["alone", "learning_rate=0.01,seed=0", "learning_rate=0.1,seed=1"]
    title, labels = compare_figure([alone, sweep / names[1], sweep / names[2]])
    assert title == "3 runs"  # three single runs: no mean, no band
    val_ll = {r["name"]: r["val_ll"] for r in json.loads(cli("runs", with_a_sweep, "--json").stdout)}
    best = max(names, key=val_ll.get)
    assert labels == [name + ("  ← best" if name == best else "") for name in names]
    title, labels = compare_figure([sweep])
    assert title == "lr: line = mean over seeds, band = lowest to highest seed"
    assert [label.removesuffix("  ← best") for label in labels] == ["learning_rate=0.01 (2 seeds)",
                                                                     "learning_rate=0.1 (2 seeds)"]


def test_compare_png_holds_its_legend_whole_however_long_the_names(with_a_sweep, tmp_path):
    runs = []
    for k in range(7):  # seven runs whose names are far wider than a third of the picture
        copy = tmp_path / "runs" / (f"run-{k}-" + "a-very-long-name-for-a-run-" * 3)
        shutil.copytree(with_a_sweep / "alone", copy)
        runs.append(copy)
    res = cli("plot", *runs, "--out", tmp_path)
    assert res.exit_code == 0, res.output
    from PIL import Image

    picture = np.asarray(Image.open(tmp_path / "compare.png").convert("L"))
    edge = np.concatenate([picture[:5].ravel(), picture[-5:].ravel(), picture[:, :5].ravel(), picture[:, -5:].ravel()])
    assert (edge == 255).all()  # nothing reaches the picture's edge: nothing was cut off
    assert picture.shape[0] > 480  # the picture grew to hold the legend under the panels


def test_compare_png_of_several_folders_goes_into_the_folder_that_holds_them_and_says_where(with_a_sweep, tmp_path,
                                                                                          monkeypatch):
    runs = tmp_path / "work" / "runs"
    shutil.copytree(with_a_sweep, runs)
    monkeypatch.chdir(tmp_path / "work")
    res = cli("plot", "runs/alone", "runs/lr")
    assert (res.exit_code, res.stdout) == (0, "runs/compare.png\n")
    assert (runs / "compare.png").is_file() and not (tmp_path / "work" / "compare.png").exists()
    res = cli("plot", runs / "alone", "runs/lr/learning_rate=0.1,seed=0")  # however they are spelled
    assert (res.exit_code, res.stdout) == (0, "runs/compare.png\n")
    monkeypatch.chdir(runs / "lr")
    res = cli("plot", "../alone", "learning_rate=0.1,seed=0")  # above the current folder: said in full
    assert (res.exit_code, res.stdout) == (0, f"{runs / 'compare.png'}\n")


# ---------------------------------------------------------------------------
# mistakes.png only from a report that measured the checkpoint as it is now


def test_plot_after_a_resume_moved_the_best_checkpoint_skips_the_stale_mistakes_and_says_how_to_renew_them(
        evaluated_run, tmp_path):
    run, data = evaluated_run
    copy = shutil.copytree(run, tmp_path / "run")
    assert cli("plot", copy, "--data-dir", data).exit_code == 0 and (copy / "mistakes.png").is_file()
    before = json.loads((copy / "eval-test-best.json").read_text())["epoch"]
    res = cli("train", "--resume", copy, "--set", "train.epochs=6", "--data-dir", data, "-q")
    assert res.exit_code == 0, res.output
    best = json.loads(cli("runs", tmp_path, "--json").stdout)[0]
    assert best["best_epoch"] > before and best["test_acc"] is None  # runs already calls the report stale
    res = cli("plot", copy, "--data-dir", data)
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines() == [str(copy / "curves.png"), str(copy / "hidden-units.png")]
    assert res.stderr == (f"{copy / 'eval-test-best.json'} measured best.npz at epoch {before}, and best.npz is now "
                          f"epoch {best['best_epoch']}: no mistakes.png; removed the earlier {copy / 'mistakes.png'}; "
                          f"run `mlecli evaluate {copy}` to make it current\n")
    assert not (copy / "mistakes.png").exists()
    assert cli("evaluate", copy, "--data-dir", data).exit_code == 0  # what it said to do
    res = cli("plot", copy, "--data-dir", data)
    assert (res.stdout.splitlines()[-1], res.stderr) == (str(copy / "mistakes.png"), "")


def test_a_stale_report_of_another_split_names_the_command_that_renews_it(evaluated_run, tmp_path):
    from mlecli.use.plot import plot_run

    run, data = evaluated_run
    copy = copy_run_without_evaluations(run, tmp_path / "run")
    assert cli("evaluate", copy, "--data-dir", data, "--split", "validation", "--checkpoint", "last",
               "--threshold", "0.3").exit_code == 0
    written = plot_run(copy, None, data)
    assert written[-1] == copy / "mistakes.png"  # a report that still stands for its checkpoint is drawn
    assert cli("train", "--resume", copy, "--set", "train.epochs=4", "--data-dir", data, "-q").exit_code == 0
    said = []
    assert [p.name for p in plot_run(copy, tmp_path / "out", data, log=said.append)] == ["curves.png",
                                                                                          "hidden-units.png"]
    assert said == [f"{copy / 'eval-validation-last-t0.3.json'} measured last.npz at epoch 3, and last.npz is now "
                    f"epoch 4: no mistakes.png; run `mlecli evaluate {copy} --split validation --checkpoint last "
                    "--threshold 0.3` to make it current"]
