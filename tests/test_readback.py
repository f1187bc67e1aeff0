"""Every JSON file mlecli reads back, fuzzed field by field: a checkpoint's meta record,
the manifest, metrics.jsonl lines and evaluation reports. Whatever hypothesis puts in a
field (or takes out), `runs` lists the run (as broken, saying why, if need be), and
`evaluate`, `plot` and `train --resume` either work or say what is wrong in one line.
Never a traceback."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from fakes import rewrite_npz
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlecli.cli import main

pytest.importorskip("matplotlib", reason="pip install 'mlecli[plot]' for the plot tests")

FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.integers(-(10**400), 10**400) | st.floats()
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny, tiny_folder):
    root = tmp_path_factory.mktemp("readback")
    cfg = tiny.write_config(root / "r.toml", tiny_folder, "validation = 0.2\n[model]\nhidden = [4]\n"
                            "[train]\nepochs = 2\nbatch_size = 64\nlog_every = 3\n")
    run, data = root / "runs" / "run", root / "data"
    cli = CliRunner()
    assert cli.invoke(main, ["train", str(cfg), "--run-dir", str(run), "--data-dir", str(data), "-q"]).exit_code == 0
    assert cli.invoke(main, ["evaluate", str(run), "--data-dir", str(data), "--json"]).exit_code == 0
    return run, data


def paths_in(doc, prefix=()) -> list[tuple]:
    """Every key path into a JSON document (the document itself is ())."""
    found = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            found += paths_in(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc[:4]):
            found += paths_in(v, (*prefix, i))
    return found


def mutate(doc, data):
    path = data.draw(st.sampled_from(paths_in(doc)), label="path")
    delete = bool(path) and data.draw(st.booleans(), label="delete")
    value = None if delete else data.draw(json_values, label="value")
    if not path:
        return value
    doc = json.loads(json.dumps(doc))
    node = doc
    for k in path[:-1]:
        node = node[k]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return doc


def one_line_or_fine(res, what: str) -> None:
    assert res.exception is None or isinstance(res.exception, SystemExit), (what, res.exception)
    assert res.exit_code in (0, 1), (what, res.output)
    if res.exit_code == 1:
        lines = res.stderr.splitlines()
        assert lines and lines[-1].startswith("Error: ") and "Traceback" not in res.stderr, (what, res.stderr)


def every_reader(run: Path, data: Path, readers=("evaluate", "plot", "train")) -> None:
    """`runs`, and each of `readers` that reads the file changed."""
    cli = CliRunner()
    res = cli.invoke(main, ["runs", str(run.parent)])
    assert res.exit_code == 0 and res.exception is None, res.output  # one broken run never stops the listing
    assert run.name in res.stdout
    commands = {"evaluate": ["evaluate", str(run), "--checkpoint", "last", "--data-dir", str(data)],
                "plot": ["plot", str(run), "--data-dir", str(data), "--out", str(run.parent / "pictures")],
                "train": ["train", "--resume", str(run), "--set", "train.epochs=3", "--data-dir", str(data), "-q"]}
    for name in readers:
        one_line_or_fine(cli.invoke(main, commands[name]), name)


def fresh_copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "runs" / "run"
    shutil.rmtree(tmp_path / "runs", ignore_errors=True)
    shutil.copytree(run, dst)
    return dst


@FUZZ
@given(data=st.data())
def test_a_fuzzed_checkpoint_meta_record(evaluated, tmp_path, data):
    run, cache = evaluated
    run = fresh_copy(run, tmp_path)
    for name in ("last.npz", "best.npz"):
        path = run / "checkpoints" / name
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"][()]))
        rewrite_npz(path, replace={"meta": np.array(json.dumps(mutate(meta, data)))})
    every_reader(run, cache)


@FUZZ
@given(data=st.data())
def test_a_fuzzed_manifest(evaluated, tmp_path, data):
    run, cache = evaluated
    run = fresh_copy(run, tmp_path)
    manifest = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").write_text(json.dumps(mutate(manifest, data)))
    every_reader(run, cache, readers=("train",))


@FUZZ
@given(data=st.data())
def test_a_fuzzed_metrics_line(evaluated, tmp_path, data):
    run, cache = evaluated
    run = fresh_copy(run, tmp_path)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    i = data.draw(st.integers(0, len(lines) - 1), label="line")
    lines[i] = json.dumps(mutate(json.loads(lines[i]), data))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    every_reader(run, cache, readers=("plot", "train"))


@FUZZ
@given(data=st.data())
def test_a_fuzzed_evaluation_report(evaluated, tmp_path, data):
    run, cache = evaluated
    run = fresh_copy(run, tmp_path)
    report = json.loads((run / "eval-test-best.json").read_text())
    (run / "eval-test-best.json").write_text(json.dumps(mutate(report, data)))
    every_reader(run, cache, readers=("plot",))


@pytest.mark.parametrize("text", ["", "{", "[]", "null", '{"step": 1e999}', "\x00", "9" * 5000, "[" * 100000])
def test_files_that_are_not_json_at_all(evaluated, tmp_path, text):
    run, cache = evaluated
    run = fresh_copy(run, tmp_path)
    for name in ("manifest.json", "eval-test-best.json"):
        (run / name).write_text(text)
    (run / "metrics.jsonl").write_text(text + "\n")
    every_reader(run, cache)


# Numbers mlecli never writes: a share of images outside [0, 1], a log-likelihood above 0, a
# time below 0 or past three centuries, a negative rate; and any number that is not finite.
_NOT_FINITE = st.sampled_from([math.inf, -math.inf, math.nan])
OUT_OF_RANGE = {
    "share": st.one_of(st.floats(max_value=-1e-300), st.floats(min_value=1.0000001), st.integers(2, 10**30),
                       st.integers(-(10**30), -1), _NOT_FINITE),
    "log-likelihood": st.one_of(st.floats(min_value=1e-300), st.integers(1, 10**30), _NOT_FINITE),
    "seconds": st.one_of(st.floats(max_value=-1e-300), st.floats(min_value=1.0001e10), st.integers(-(10**30), -1),
                         st.integers(10**10 + 1, 10**300), _NOT_FINITE),
    "rate": st.one_of(st.floats(max_value=-1e-300), st.integers(-(10**30), -1), _NOT_FINITE),
}
METRICS_FIGURES = {"train_acc": "share", "val_acc": "share", "train_ll": "log-likelihood",
                   "train_ll_mean": "log-likelihood", "val_ll_mean": "log-likelihood", "seconds": "seconds",
                   "images_per_s": "rate", "lr": "rate"}
REPORT_FIGURES = {"accuracy": "share", "threshold": "share"}


def listed_as_broken_for(run: Path, problem: str) -> None:
    res = CliRunner().invoke(main, ["runs", str(run.parent)])
    assert res.exit_code == 0, res.output
    assert f"{run.name}: {problem}" in res.stdout, res.stdout


@FUZZ
@given(data=st.data(), key=st.sampled_from(sorted(METRICS_FIGURES)))
def test_a_metrics_figure_mlecli_cannot_write_makes_the_run_broken(evaluated, tmp_path, data, key):
    run, cache = evaluated
    run = fresh_copy(run, tmp_path)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    i = data.draw(st.integers(0, len(lines) - 1), label="line")
    value = data.draw(OUT_OF_RANGE[METRICS_FIGURES[key]], label=key)
    lines[i] = json.dumps({**json.loads(lines[i]), key: value})
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    listed_as_broken_for(run, f"{run / 'metrics.jsonl'}, line {i + 1}: {key} is ")
    res = CliRunner().invoke(main, ["plot", str(run), "--data-dir", str(cache), "--out", str(tmp_path / "p")])
    assert res.exit_code == 1 and res.stderr.count("\n") == 1, res.output
    assert res.stderr.startswith(f"Error: {run / 'metrics.jsonl'}, line {i + 1}: {key} is "), res.stderr


@FUZZ
@given(data=st.data(), key=st.sampled_from(sorted(REPORT_FIGURES)))
def test_a_report_figure_mlecli_cannot_write_makes_the_run_broken(evaluated, tmp_path, data, key):
    run, cache = evaluated
    run = fresh_copy(run, tmp_path)
    path = run / "eval-test-best.json"
    value = data.draw(OUT_OF_RANGE[REPORT_FIGURES[key]], label=key)
    path.write_text(json.dumps({**json.loads(path.read_text()), key: value}))
    listed_as_broken_for(run, f"{path}: {key} is ")
    res = CliRunner().invoke(main, ["plot", str(run), "--data-dir", str(cache), "--out", str(tmp_path / "p")])
    assert res.exit_code == 1 and res.stderr.count("\n") == 1, res.output
    assert res.stderr.startswith(f"Error: {path}: {key} is "), res.stderr
