"""Planning a sweep (mlecli/sweep/grid.py): any grid over any kind of config value plans, names
and lists its runs; what cannot be a sweep is refused in one line before anything is
written. Hypothesis searches the grids; a few of them are run for real."""

import json
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlecli.cli import main
from mlecli.run import config as config_mod
from mlecli.run.config import load, toml_value
from mlecli.safe.errors import ConfigError
from mlecli.sweep import grid
from mlecli.sweep.compare import summary

SEARCH = settings(max_examples=150, deadline=None, derandomize=True,
                  suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def digits(pool):
    return st.lists(st.sampled_from(pool), min_size=1, max_size=3, unique=True)


# Grid values of every kind a config key takes, each valid on the tiny dataset's config.
KEYS = {
    "train.epochs": st.integers(1, 2),  # integers
    "train.batch_size": st.integers(1, 100),
    "train.learning_rate": st.floats(1e-3, 0.5),  # floats
    "data.validation": st.floats(0.1, 0.5) | st.integers(10, 60),  # either
    "train.optimizer": st.sampled_from(["sgd", "momentum", "nesterov", "adam"]),  # strings
    "model.dtype": st.sampled_from(["float32", "float64"]),
    "train.prior_biases": st.booleans(),  # booleans
    "model.hidden": st.lists(st.integers(1, 4), max_size=3),  # lists
    "task.positive": digits([1, 3, 5, 7, 9]),
    "task.negative": digits([0, 2, 4, 6, 8]) | st.just("rest"),  # a list or a string
    "model": st.fixed_dictionaries({"hidden": st.lists(st.integers(1, 4), max_size=2),  # a whole table
                                    "dtype": st.sampled_from(["float32", "float64"])}),
}


@st.composite
def grids(draw, max_axes=2, max_values=3, max_seeds=2):
    keys = draw(st.lists(st.sampled_from(sorted(KEYS)), min_size=1, max_size=max_axes, unique=True))
    if "model" in keys:  # a table of [model] and a key in it would both set that key
        keys = [k for k in keys if not k.startswith("model.")]
    options = []
    for key in keys:
        values = draw(st.lists(KEYS[key], min_size=1, max_size=max_values, unique_by=lambda v: json.dumps(v, sort_keys=True)))
        options += ["--grid", f"{key}={','.join(toml_value(v) for v in values)}"]
    seeds = draw(st.lists(st.integers(0, 5), min_size=1, max_size=max_seeds, unique=True))
    return options, seeds


def planned(cfg: Path, options: list[str], seeds: list[int]) -> grid.Plan:
    texts = tuple(options[i + 1] for i in range(0, len(options), 2))
    return grid.plan(str(cfg), (), texts, tuple(seeds))


@SEARCH
@given(case=grids())
def test_any_grid_over_any_kind_of_value_plans_names_and_lists_its_runs(tiny_config, tmp_path, case):
    options, seeds = case
    cfg = tiny_config(train={"epochs": 1})
    p = planned(cfg, options, seeds)
    n_points = 1
    for axis in p.axes:
        n_points *= len(axis.values)
    assert len(p.points()) == n_points and len(p.runs) == n_points * len(seeds)
    names = [r.name for r in p.runs]
    assert len(set(names)) == len(names)
    assert all(len(n.encode()) <= grid.MAX_NAME_BYTES and "/" not in n for n in names)
    s = summary(p, tmp_path / "nothing-yet")  # the table of a sweep not started: every point, no figures
    assert [pt["runs"] for pt in s["points"]] == [len(seeds)] * n_points
    assert {r["status"] for r in s["runs"]} == {"not started"}
    res = cli("sweep", cfg, *options, "--seeds", ",".join(map(str, seeds)), "--sweep-dir", tmp_path / "s",
              "--dry-run")
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert len(lines) == len(p.runs)
    for line, run in zip(lines, p.order()):
        words = shlex.split(line.removeprefix("OPENBLAS_NUM_THREADS=1 ").removeprefix("OPENBLAS_NUM_THREADS=2 "))
        sets = tuple(words[i + 1] for i, w in enumerate(words) if w == "--set")
        assert load(cfg, sets) == run.config  # the command trains exactly the sweep's run
        assert words[-1] == str(tmp_path / "s" / run.name)
    assert not (tmp_path / "s").exists()


@settings(max_examples=8, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=grids(max_axes=1, max_values=2, max_seeds=1))
def test_a_real_sweep_over_any_kind_of_value_trains_every_run_as_its_dry_run_says(tiny_config, tmp_path_factory,
                                                                                 case):
    options, seeds = case
    folder = tmp_path_factory.mktemp("real")
    cfg = tiny_config(train={"epochs": 1})
    p = planned(cfg, options, seeds)
    res = cli("sweep", cfg, *options, "--seeds", ",".join(map(str, seeds)), "--sweep-dir", folder / "s",
              "--data-dir", folder / "d", "--jobs", 1, "--json")
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)
    assert [r["status"] for r in s["runs"]] == ["finished"] * len(p.runs)
    for run in p.runs:
        assert load(folder / "s" / run.name / "config.toml") == run.config
    again = cli("sweep", cfg, *options, "--seeds", ",".join(map(str, seeds)), "--sweep-dir", folder / "s",
                "--data-dir", folder / "d")
    assert again.exit_code == 0, again.output  # continuing it works too
    assert f"({len(p.runs)} finished, 0 to resume, 0 to start)" in again.stderr


def test_the_docs_grid_over_hidden_layers_runs(tiny_config, tmp_path):
    cfg = tiny_config(train={"epochs": 1})
    res = cli("sweep", cfg, "--grid", "model.hidden=[4],[8,2]", "--seeds", "0", "--sweep-dir", tmp_path / "s",
              "--data-dir", tmp_path / "d", "--jobs", 1)
    assert res.exit_code == 0, res.output
    assert [line.split()[:2] for line in res.stdout.splitlines()[2:4]] == [["[4]", "1/1"], ["[8,", "2]"]]
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [".lock", "hidden=4,seed=0", "hidden=8x2,seed=0",
                                                                   "sweep.json"]


# ---------------------------------------------------------------------------
# Run folder names fit any file system


def test_a_long_grid_value_gives_a_short_name_ending_in_a_hash_of_its_point():
    point = (("data.url", "/tmp/" + "u" * 240),)
    name = grid.folder_name(point, 3)
    assert len(name.encode()) == grid.MAX_NAME_BYTES
    assert name.startswith("url=_tmp_uuu") and name.endswith(",seed=3") and "~" in name
    assert grid.folder_name(point, 3) == name  # deterministic
    assert grid.folder_name(point, 4) == name.replace(",seed=3", ",seed=4")  # the point's seeds side by side
    other = (("data.url", "/tmp/" + "u" * 239 + "v"),)
    assert grid.folder_name(other, 3) != name
    assert grid.folder_name((("train.learning_rate", 0.05),), 0) == "learning_rate=0.05,seed=0"


@given(st.lists(st.text(min_size=1, max_size=300), min_size=1, max_size=3), st.integers(0, 10**4))
@settings(max_examples=200, deadline=None)
def test_every_folder_name_fits_in_128_bytes_and_is_one_path_component(values, seed):
    name = grid.folder_name(tuple((f"data.k{i}", v) for i, v in enumerate(values)), seed)
    assert 0 < len(name.encode()) <= grid.MAX_NAME_BYTES
    assert "/" not in name and name not in (".", "..") and not name.startswith(".")


def test_a_sweep_over_32_wide_hidden_layers_names_its_folders_within_the_limit(tiny_config, tmp_path):
    deep = "[" + ",".join(["1000"] * 32) + "]"  # the most layers a config may have
    res = cli("sweep", tiny_config(), "--grid", f"model.hidden={deep},[2]", "--seeds", "0",
              "--sweep-dir", tmp_path / "s", "--dry-run")
    assert res.exit_code == 0, res.output
    first, second = (Path(shlex.split(line)[-1]).name for line in res.stdout.splitlines())
    assert first.startswith("hidden=1000x1000x") and first.endswith(",seed=0") and len(first) == grid.MAX_NAME_BYTES
    assert second == "hidden=2,seed=0"


# ---------------------------------------------------------------------------
# How big a grid may be


def test_a_grid_of_more_runs_than_the_limit_is_refused_before_it_is_expanded(tiny_config, tmp_path):
    rates = ",".join(str(round(0.001 * (i + 1), 6)) for i in range(200))
    epochs = ",".join(str(e) for e in range(1, 101))
    res = cli("sweep", tiny_config(), "--grid", f"train.learning_rate={rates}", "--grid", f"train.epochs={epochs}",
              "--seeds", "0-999", "--sweep-dir", tmp_path / "s", "--dry-run")
    assert res.exit_code == 1
    assert res.stderr == ("Error: the grid is 200 x 100 x 1,000 seeds = 20,000,000 runs; a sweep takes at most "
                          "10,000: split it into smaller sweeps\n")
    assert res.stdout == ""


def test_a_grid_key_with_more_values_than_the_limit_is_refused():
    with pytest.raises(ConfigError) as exc:
        grid.parse_grid("train.epochs=" + ",".join(str(e) for e in range(1, 10_002)))
    assert str(exc.value).endswith(": 10,001 values; a sweep takes at most 10,000 runs")


def test_the_dry_run_is_made_line_by_line():
    from collections.abc import Iterator

    p = grid.plan(None, (), ("train.learning_rate=0.1,0.2",), (0,))
    lines = grid.train_commands(p, Path("s"), None, 1)
    assert isinstance(lines, Iterator)
    assert next(lines).endswith("--run-dir s/learning_rate=0.1,seed=0")


# ---------------------------------------------------------------------------
# The seeds come from --seeds, each key from one place, also through a table


@pytest.mark.parametrize("args, message", [
    (["--set", "model={seed=5, hidden=[8]}"],
     "--set model sets model.seed: a sweep sets model.seed and train.seed from --seeds; drop model.seed from the "
     "table"),
    (["--grid", "model={seed=1},{seed=2}"],
     "--grid model sets model.seed: a sweep sets model.seed and train.seed from --seeds; drop model.seed from the "
     "tables and use --seeds"),
    (["--set", "train={learning_rate=0.3, epochs=1}", "--grid", "train.learning_rate=0.1,0.2"],
     "--grid train.learning_rate and --set train both set train.learning_rate; keep one"),
    (["--grid", "train.epochs=1,2", "--grid", "train={epochs=3},{epochs=4}"],
     "--grid train and --grid train.epochs both set train.epochs; keep one"),
])
def test_keys_set_through_a_table_obey_the_same_rules(tiny_config, tmp_path, args, message):
    res = cli("sweep", tiny_config(), *args, "--sweep-dir", tmp_path / "s")
    assert res.exit_code == 1
    assert res.stderr == f"Error: {message}\n"
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("sets, want", [
    ((), {"sgd": 0.05, "momentum": 0.005, "adam": 0.001}),  # the config's 0.05 is sgd's
    (("train.learning_rate=0.02",), {"sgd": 0.02, "momentum": 0.02, "adam": 0.02}),
    (("train={learning_rate=0.02}",), {"sgd": 0.02, "momentum": 0.02, "adam": 0.02}),
])
def test_a_grid_over_update_rules_gives_each_rate_its_train_command_gives(tiny_config, sets, want):
    cfg = tiny_config(train={"epochs": 1})
    p = grid.plan(str(cfg), sets, ("train.optimizer=sgd,momentum,adam",), (0,))
    assert {r.config.train.optimizer: r.config.train.learning_rate for r in p.runs} == want
    for r in p.runs:  # as `mlecli train CONFIG --set ...` of the run's --dry-run line loads it
        assert load(cfg, (*sets, *r.overrides)) == r.config


@pytest.mark.parametrize("sets, grids, want", [
    (("model.dtype=float64",), ("model={hidden=[8]},{hidden=[4]}",), {"model.dtype": "float64"}),
    ((), ("train.batch_size=8,16", "train={learning_rate=0.1},{learning_rate=0.2}"), {"train.epochs": 3}),
    (("train={optimizer='momentum', momentum=0.5}",), ("train.learning_rate=0.1,0.2",),
     {"train.epochs": 3, "train.batch_size": 16, "train.optimizer": "momentum", "train.momentum": 0.5}),
])
def test_a_table_sets_the_keys_it_lists_and_keeps_the_rest_of_the_section(tiny_config, sets, grids, want):
    """`--set 'train={a=1}'` is `--set train.a=1`: the config's other keys of that section stay
    (a table once replaced the section, and a sweep silently trained with defaults)."""
    base = tiny_config(train={"epochs": 3, "batch_size": 16})
    for spec in grid.plan(str(base), sets, grids, (0,)).order():
        have = grid.config_keys(spec.config.to_dict())
        assert {k: have[k] for k in want} == want
        assert all(have[key] == value for item in (*sets, *spec.items)
                   for key, value in grid.keys_set(*config_mod.parse_override(item)))


# ---------------------------------------------------------------------------
# A malformed --grid is refused in the grid's own words


@pytest.mark.parametrize("text, message", [
    ("model.hidden=[64]],[32]", "a ']' closes nothing"),
    ("model.hidden=[64, 32],[32", "a '[' is never closed; a value with spaces must be inside one quoted argument, "
                                  "e.g. --grid 'model.hidden=[64, 32],[128]'"),
    ('data.url="a,b', "a '\"' is never closed; a value with spaces must be inside one quoted argument, e.g. "
                      "--grid 'model.hidden=[64, 32],[128]'"),
    ("model.hidden=[64 32],[32]", "'[64 32]' is not a valid TOML value"),
    ("model.hidden={,[1]", "a '{' is never closed; a value with spaces must be inside one quoted argument, e.g. "
                           "--grid 'model.hidden=[64, 32],[128]'"),
    ("model.hidden=[1},[2]", "a '}' closes nothing"),
])
def test_a_malformed_grid_is_refused_in_the_grids_words(text, message):
    res = cli("sweep", "--grid", text, "--dry-run")
    assert res.exit_code == 2
    assert res.stderr.splitlines()[-1] == f"Error: Invalid value for '--grid {text}': {message}"
