"""What a hostile tester found in `mlecli sweep`, `plot` (compare.png) and `runs`, each held:
run folders a trainer holds, adopted runs of another config or BLAS, stale test reports,
damaged sweep.json, the best grid point, --where, and a stopped worker."""

import copy
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlecli.cli import main
from mlecli.nn import blas
from mlecli.safe.locks import folder_lock
from mlecli.sweep import grid, workers
from mlecli.sweep.compare import best_point, collect, summary
from mlecli.sweep.runs import _equal

NAMES = ["learning_rate=0.05,seed=0", "learning_rate=0.1,seed=0"]
GRID = ("--grid", "train.learning_rate=0.05,0.1", "--seeds", "0")


def cli(*args, **kw):
    return CliRunner().invoke(main, [str(a) for a in args], **kw)


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def done(tmp_path_factory, tiny, tiny_folder):
    """A finished sweep of 2 learning rates x 1 seed, 3 epochs each, and its config."""
    root = tmp_path_factory.mktemp("hostile")
    cfg = tiny.write_config(root / "tiny.toml", tiny_folder, "validation = 0.2\n[model]\nhidden = [8]\n"
                            "[train]\nepochs = 3\nbatch_size = 16\nlearning_rate = 0.05\n")
    data = root / "data"
    res = cli("sweep", cfg, *GRID, "--sweep-dir", root / "sw", "--data-dir", data, "--jobs", 1)
    assert res.exit_code == 0, res.output
    return cfg, data, root / "sw"


def hand_command(cfg, sweep_dir, data, name, *extra):
    """The `mlecli train` arguments the sweep's --dry-run gives for run `name`."""
    res = cli("sweep", cfg, *GRID, "--sweep-dir", sweep_dir, "--data-dir", data, "--dry-run")
    (words,) = [w for w in map(shlex.split, res.stdout.splitlines())
                if w[w.index("--run-dir") + 1] == str(sweep_dir / name)]
    words = words[words.index("train"):]
    return [*words, *(() if "--data-dir" in words else ("--data-dir", data)), *extra]


# ---------------------------------------------------------------------------
# B4: a run folder a trainer holds is never taken over


def _before_first_checkpoint(run: Path, ref: Path):
    for name in ("config.toml", "manifest.json"):
        shutil.copy(ref / name, run / name)
    (run / "checkpoints").mkdir()


def _mid_run(run: Path, ref: Path):
    shutil.copytree(ref, run, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".lock"))
    shutil.copy(ref / "checkpoints" / "epoch-0001.npz", run / "checkpoints" / "last.npz")


def _finished(run: Path, ref: Path):
    shutil.copytree(ref, run, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".lock"))


@pytest.mark.parametrize("state", [lambda run, ref: None, _before_first_checkpoint, _mid_run, _finished],
                         ids=["only-its-lock", "before-its-first-checkpoint", "mid-run", "finished"])
def test_a_run_folder_whose_lock_a_trainer_holds_is_left_alone_in_every_state(done, tmp_path, state):
    cfg, data, ref = done
    sw = tmp_path / "sw"
    run = sw / NAMES[0]
    with folder_lock(run, wait=False, what="a trainer"):
        state(run, ref / NAMES[0])
        before = files_of(run)
        res = cli("sweep", cfg, *GRID, "--sweep-dir", sw, "--data-dir", data, "--json")
        assert files_of(run) == before  # nothing removed, restarted or trained into
    assert res.exit_code == 1
    assert (f"failed {NAMES[0]}: run folder {run} is in use by another mlecli process (its .lock is held); left "
            "alone: run the sweep again once it has ended\n") in res.stderr
    assert (sw / NAMES[1] / "checkpoints" / "epoch-0003.npz").is_file()  # the other run is trained
    statuses = {Path(r["run_dir"]).name: r["status"] for r in json.loads(res.stdout)["runs"]}
    assert statuses[NAMES[1]] == "finished" and statuses[NAMES[0]] != "finished"


def test_clearing_a_run_folder_a_trainer_holds_is_refused(done, tmp_path):
    from mlecli.run.rundir import clear_unstarted
    from mlecli.safe.errors import MlecliError

    cfg, data, ref = done
    run = tmp_path / "run"
    with folder_lock(run, wait=False, what="a trainer"):
        _before_first_checkpoint(run, ref / NAMES[0])
        before = files_of(run)
        with pytest.raises(MlecliError, match=f"^run folder {run} is in use by another mlecli process"):
            clear_unstarted(run)
        assert files_of(run) == before


# ---------------------------------------------------------------------------
# B14: an adopted run folder is the sweep's run, key for key


@pytest.mark.parametrize("override, differs", [
    ("train.epochs=1", "train.epochs is 1, not 3 as the sweep says"),
    ("train.epochs=4", "train.epochs is 4, not 3 as the sweep says"),
    ("train.batch_size=8", "train.batch_size is 8, not 16 as the sweep says"),
    ("model.hidden=[4]", "model.hidden is [4], not [8] as the sweep says"),
    ("train.optimizer='momentum'", "train.optimizer is momentum, not"),
])
def test_an_adopted_run_of_another_config_is_refused_naming_the_key_and_never_counted_finished(
        done, tmp_path, override, differs):
    cfg, data, ref = done
    sw = tmp_path / "sw"
    res = cli(*hand_command(cfg, sw, data, NAMES[0], "--set", override, "-q"))
    assert res.exit_code == 0, res.output
    before = files_of(sw / NAMES[0])
    for _ in range(2):  # and again: it never becomes finished
        res = cli("sweep", cfg, *GRID, "--sweep-dir", sw, "--data-dir", data, "--json")
        assert res.exit_code == 1
        assert f"failed {NAMES[0]}: run folder {sw / NAMES[0]} holds a run whose {differs}" in res.stderr
        assert [r["status"] for r in json.loads(res.stdout)["runs"]] == ["failed", "finished"]
        assert files_of(sw / NAMES[0]) == before


def test_an_adopted_run_made_by_its_dry_run_command_is_the_sweeps(done, tmp_path):
    cfg, data, ref = done
    sw = tmp_path / "sw"
    assert cli(*hand_command(cfg, sw, data, NAMES[0], "-q")).exit_code == 0
    before = files_of(sw / NAMES[0])
    res = cli("sweep", cfg, *GRID, "--sweep-dir", sw, "--data-dir", data)
    assert res.exit_code == 0, res.output
    assert "(1 finished, 0 to resume, 1 to start)" in res.stderr
    assert files_of(sw / NAMES[0]) == before


# ---------------------------------------------------------------------------
# B13: an adopted run resumes with the BLAS threads it began with


def test_an_adopted_interrupted_run_resumes_on_the_blas_threads_its_checkpoint_records(
        tiny_config, tmp_path, monkeypatch):
    from mlecli.run import checkpoint as ckpt
    from mlecli.run import train as training

    if blas.current_threads() is None:
        pytest.skip("this BLAS cannot be asked for its thread count")
    cfg = tiny_config(train={"epochs": 3, "batch_size": 80})  # over 64: the BLAS's threads are the run's
    sw, data = tmp_path / "sw", tmp_path / "d"
    res = cli("sweep", cfg, "--grid", "train.learning_rate=0.05", "--seeds", "0", "--jobs", 1, "--sweep-dir", sw,
              "--data-dir", data, "--dry-run")
    (line,) = res.stdout.splitlines()
    words = shlex.split(line)
    sweeps = int(words[0].split("=")[1]) if words[0].startswith("OPENBLAS_NUM_THREADS=") else 1
    recorded = sweeps + 1
    real, calls = training.train_step, {"n": 0}

    def interrupt(*args):
        calls["n"] += 1
        if calls["n"] == 4:  # in epoch 2 of 3
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args)

    monkeypatch.setattr(training, "train_step", interrupt)
    words = words[words.index("train"):]
    with blas.threads(recorded):
        res = cli(*words, *(() if "--data-dir" in words else ("--data-dir", data)), "-q")
    monkeypatch.setattr(training, "train_step", real)
    assert res.exit_code == 130, res.output
    run = sw / "learning_rate=0.05,seed=0"
    assert ckpt.load(run / "checkpoints" / "last.npz").meta["blas"]["threads"] == recorded
    res = cli("sweep", cfg, "--grid", "train.learning_rate=0.05", "--seeds", "0", "--jobs", 1, "--sweep-dir", sw,
              "--data-dir", data)
    assert res.exit_code == 0, res.output
    assert "(0 finished, 1 to resume, 0 to start)" in res.stderr
    last = ckpt.load(run / "checkpoints" / "last.npz")
    assert (last.epoch, last.meta["blas"]["threads"]) == (3, recorded)
    assert "warning" not in res.stderr


# ---------------------------------------------------------------------------
# B5/B6: a report counts only while it measures the run's best checkpoint as it is now


@pytest.fixture(scope="module")
def reports(done, tmp_path_factory):
    """For each epoch E of a finished run: a copy of the run whose best.npz is epoch E's
    checkpoint, evaluated (eval-test-best.json measured it)."""
    cfg, data, ref = done
    root = tmp_path_factory.mktemp("reports")
    made = {}
    for e in (1, 2, 3):
        run = root / f"best-{e}"
        shutil.copytree(ref / NAMES[0], run, ignore=shutil.ignore_patterns(".lock", "eval-*"))
        shutil.copy(run / "checkpoints" / f"epoch-{e:04d}.npz", run / "checkpoints" / "best.npz")
        res = cli("evaluate", run, "--data-dir", data, "--json")
        assert res.exit_code == 0, res.output
        made[e] = (run, json.loads(res.stdout))
    return made


@pytest.mark.parametrize("measured", [1, 2, 3])
@pytest.mark.parametrize("now", [1, 2, 3])
@pytest.mark.parametrize("old_report", [False, True], ids=["report", "report-without-sha256"])
def test_runs_shows_a_test_accuracy_only_while_its_report_measured_the_best_checkpoint_as_it_is_now(
        reports, tmp_path, measured, now, old_report):
    run, report = reports[measured]
    copy_ = tmp_path / "run"
    shutil.copytree(run, copy_)
    shutil.copy(reports[now][0] / "checkpoints" / "best.npz", copy_ / "checkpoints" / "best.npz")
    if old_report:  # as evaluate wrote it before reports recorded the checkpoint's hash: the epoch decides
        saved = json.loads((copy_ / "eval-test-best.json").read_text())
        del saved["checkpoint_sha256"]
        (copy_ / "eval-test-best.json").write_text(json.dumps(saved))
    (row,) = json.loads(cli("runs", tmp_path, "--json").stdout)
    assert row["test_acc"] == (report["accuracy"] if measured == now else None)


def test_a_report_of_last_stands_for_a_run_only_without_a_best_checkpoint(done, reports, tmp_path):
    run, _ = reports[3]
    copy_ = tmp_path / "run"
    shutil.copytree(run, copy_, ignore=shutil.ignore_patterns("eval-*"))
    res = cli("evaluate", copy_, "--checkpoint", "last", "--data-dir", done[1], "--json")
    assert res.exit_code == 0, res.output
    accuracy = json.loads(res.stdout)["accuracy"]
    (copy_ / "checkpoints" / "best.npz").write_bytes((run / "checkpoints" / "epoch-0001.npz").read_bytes())
    assert json.loads(cli("runs", tmp_path, "--json").stdout)[0]["test_acc"] is None
    (copy_ / "checkpoints" / "best.npz").unlink()
    assert json.loads(cli("runs", tmp_path, "--json").stdout)[0]["test_acc"] == accuracy


def test_a_sweep_with_evaluate_measures_again_a_run_whose_report_is_of_an_earlier_best(done, tmp_path):
    cfg, data, ref = done
    sw = tmp_path / "sw"
    shutil.copytree(ref, sw)
    run = sw / NAMES[0]
    best = (run / "checkpoints" / "best.npz").read_bytes()
    (run / "checkpoints" / "best.npz").write_bytes((run / "checkpoints" / "epoch-0001.npz").read_bytes())
    assert cli("evaluate", run, "--data-dir", data).exit_code == 0  # made mid-way, at epoch 1
    (run / "checkpoints" / "best.npz").write_bytes(best)  # the run went on
    stale = cli("sweep", cfg, *GRID, "--sweep-dir", sw, "--data-dir", data, "--json")
    assert [r["test_acc"] for r in json.loads(stale.stdout)["runs"]] == [None, None]
    res = cli("sweep", cfg, *GRID, "--sweep-dir", sw, "--data-dir", data, "--json", "--evaluate")
    assert res.exit_code == 0, res.output
    now = json.loads(cli("evaluate", run, "--data-dir", data, "--json").stdout)
    assert now["epoch"] == json.loads((run / "eval-test-best.json").read_text())["epoch"] != 1
    assert json.loads(res.stdout)["runs"][0]["test_acc"] == now["accuracy"]


# ---------------------------------------------------------------------------
# B11: a damaged sweep.json is one line, wherever it is read

ODD = [None, -1, 0, 1.5, "", "x", [], {}, [{}], {"key": 1}, True, 10**30]


def _paths(node, at=()):
    yield at
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*at, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*at, i))


@pytest.fixture(scope="module")
def sweep_json(done):
    return json.loads((done[2] / "sweep.json").read_text())


def _same_line_from_sweep_runs_and_plot(done, sw: Path, damaged: dict) -> str | None:
    """Write `damaged` as sweep.json of a copy of the finished sweep in `sw`; then sweep,
    runs and plot either all read it (None) or all say the same one line (returned);
    nothing is written either way."""
    cfg, data_dir, ref = done
    shutil.copytree(ref, sw)
    (sw / "sweep.json").write_text(json.dumps(damaged))
    before = files_of(sw)
    commands = {"sweep": ("sweep", cfg, *GRID, "--sweep-dir", sw, "--data-dir", data_dir, "-q"), "runs": ("runs", sw),
                "plot": ("plot", sw, "--data-dir", data_dir, "--out", sw.parent / "pictures")}
    said = {}
    for name, args in commands.items():
        res = cli(*args)
        assert res.exception is None or isinstance(res.exception, SystemExit), (name, res.exception)
        if res.exit_code != 0:
            assert res.exit_code == 1 and res.stderr.count("\n") == 1, (name, res.output)
        said[name] = res.stderr if res.exit_code else None
    try:
        collect([sw])  # what `mlecli plot` draws compare.png from
        read = None
    except Exception as exc:
        from mlecli.safe.errors import MlecliError

        assert isinstance(exc, MlecliError), exc
        read = f"Error: {exc}\n"
    assert files_of(sw) == before
    if read is not None and f"{sw / 'sweep.json'}: " in read:  # the file is damaged: all three say so
        assert said == {"sweep": read, "runs": read, "plot": read}, said
        return read.removeprefix(f"Error: {sw / 'sweep.json'}: ").rstrip("\n")
    assert said["runs"] is None, said  # readable: listed (plot may have nothing to draw, sweep another sweep)
    return None


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_damage_to_sweep_json_is_one_error_line_for_sweep_plot_and_runs(done, sweep_json, tmp_path_factory, data):
    where = data.draw(st.sampled_from([p for p in _paths(sweep_json) if p]))
    damaged = copy.deepcopy(sweep_json)
    node = damaged
    for part in where[:-1]:
        node = node[part]
    if data.draw(st.booleans(), label="delete") and isinstance(node, dict):
        del node[where[-1]]
    else:
        node[where[-1]] = data.draw(st.sampled_from(ODD), label="value")
    _same_line_from_sweep_runs_and_plot(done, tmp_path_factory.mktemp("damaged") / "sw", damaged)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_runs_list_that_is_not_the_grids_is_damage_for_sweep_plot_and_runs(done, sweep_json, tmp_path_factory,
                                                                            data):
    """Of the right types, but emptied, cut, doubled, reordered, or a run's folder, seed or
    grid value changed: sweep.json no longer describes the sweep its grid and seeds make."""
    runs = sweep_json["runs"]
    i = data.draw(st.integers(0, len(runs) - 1), label="run")
    edits = {
        "emptied": lambda: [],
        "cut": lambda: runs[:i] + runs[i + 1:],
        "doubled": lambda: runs + [runs[i]],
        "reordered": lambda: runs[::-1],
        "dir": lambda: [{**r, "dir": r["dir"] + "x"} if j == i else r for j, r in enumerate(runs)],
        "seed": lambda: [{**r, "seed": r["seed"] + 1} if j == i else r for j, r in enumerate(runs)],
        "point": lambda: [{**r, "point": {k: 0.2 for k in r["point"]}} if j == i else r for j, r in enumerate(runs)],
    }
    edit = data.draw(st.sampled_from(sorted(edits)), label="edit")
    damaged = {**sweep_json, "runs": edits[edit]()}
    said = _same_line_from_sweep_runs_and_plot(done, tmp_path_factory.mktemp("edited") / "sw", damaged)
    assert said is not None and said.startswith("runs") and said.endswith("; the file is damaged or not mlecli's")


# ---------------------------------------------------------------------------
# B12: compare.png's best is the table's best

run_rows = st.lists(st.tuples(st.sampled_from(["finished", "interrupted", "failed", "running"]),
                              st.one_of(st.none(), st.floats(-5, 0))), min_size=1, max_size=3)


@given(st.lists(run_rows, min_size=1, max_size=5))
def test_the_best_point_has_the_highest_mean_best_val_ll_over_its_finished_runs_alone(groups):
    rows = [[{"status": s, "val_ll": v} for s, v in g] for g in groups]
    means = {i: sum(v for s, v in g if s == "finished" and v is not None)
             / sum(1 for s, v in g if s == "finished" and v is not None)
             for i, g in enumerate(groups) if any(s == "finished" and v is not None for s, v in g)}
    best = best_point(rows)
    if len(groups) < 2 or not means:
        assert best is None
    else:
        assert best == min(i for i in means if means[i] == max(means.values()))


@pytest.mark.parametrize("cut", NAMES)
def test_compare_png_marks_the_grid_point_the_sweep_table_marks_whatever_run_is_unfinished(done, tmp_path, cut):
    cfg, data, ref = done
    sw = tmp_path / "sw"
    shutil.copytree(ref, sw)
    # the run stopped after epoch 1, but its metrics (and so its curve) went further
    shutil.copy(sw / cut / "checkpoints" / "epoch-0001.npz", sw / cut / "checkpoints" / "last.npz")
    s = summary(grid.plan(str(cfg), (), (GRID[1],), (0,)), sw)  # what the sweep's table says (a sweep would resume it)
    table = [pt["values"]["train.learning_rate"] for pt in s["points"] if pt["best"]]
    groups, _ = collect([sw])
    assert [g.label for g in groups if g.best] == [f"learning_rate={v}" for v in table]
    assert [g.legend() for g in groups if cut in str(g.runs[0])] == ["1 seed, 1 unfinished"]


# ---------------------------------------------------------------------------
# B15: --where compares as the config does: true is not 1, 1 is 1.0; names are text

config_values = st.one_of(st.booleans(), st.integers(-3, 3), st.sampled_from([0.0, 1.0, -1.0, 0.5]),
                          st.sampled_from(["", "1", "true", "sgd"]))


@given(config_values, config_values)
def test_where_matches_a_value_only_of_the_same_kind(have, want):
    number = (int, float)
    if isinstance(have, bool) or isinstance(want, bool) or isinstance(have, str) or isinstance(want, str):
        expected = type(have) is type(want) and have == want
    else:
        expected = isinstance(have, number) and isinstance(want, number) and float(have) == float(want)
    assert _equal(have, want) is expected
    assert _equal([have], [want]) is expected and _equal({"k": have}, {"k": want}) is expected


@pytest.mark.parametrize("name", ["true", "1e3", "1", "[1]", "0.50"])
def test_where_name_selects_a_run_named_like_a_toml_value(done, tmp_path, name):
    cfg, data, ref = done
    shutil.copytree(ref / NAMES[0], tmp_path / name)
    shutil.copytree(ref / NAMES[1], tmp_path / "other")
    res = cli("runs", tmp_path, "--where", f"name={name}", "--json")
    assert res.exit_code == 0, res.output
    assert [r["name"] for r in json.loads(res.stdout)] == [name]


@pytest.mark.parametrize("where, matches", [
    ("train.prior_biases=0", False), ("train.prior_biases=false", True), ("train.epochs=3.0", True),
    ("train.epochs=true", False), ("train.batch_size=16", True), ("train.batch_size='16'", False),
])
def test_where_on_config_keys_compares_bools_and_numbers_as_the_config_does(done, where, matches):
    cfg, data, ref = done
    res = cli("runs", ref, "--where", where, "--json")
    assert res.exit_code == 0, res.output
    assert len(json.loads(res.stdout)) == (2 if matches else 0)


# ---------------------------------------------------------------------------
# B16: a stopped worker does not keep Ctrl-C from ending the sweep


class FakeProcess:
    def __init__(self, pid):
        self.pid = pid


class FakeWorker:
    def __init__(self, pid):
        self.process, self.sent = FakeProcess(pid), []

    def signal(self, sig):
        self.sent.append(sig)


def test_each_sigterm_to_a_worker_comes_with_a_sigcont_and_a_worker_that_never_ends_is_killed():
    stop = workers._Stop([])
    w = FakeWorker(12345)
    stop.signal, stop.count = "SIGINT", 1
    for now in (0.0, 1.0, workers.GIVE_UP_AFTER - 0.1):
        stop.pass_on([w], now=now)
    assert w.sent == [signal.SIGTERM, signal.SIGCONT]
    stop.count, stop.at_once = 2, workers.GIVE_UP_AFTER - 0.1  # a second Ctrl-C
    stop.pass_on([w], now=workers.GIVE_UP_AFTER - 0.1)
    assert w.sent == [signal.SIGTERM, signal.SIGCONT] * 2
    stop.pass_on([w], now=workers.GIVE_UP_AFTER + 0.1)
    assert w.sent[-1] == signal.SIGKILL


def test_after_one_signal_a_worker_still_busy_is_killed_once_the_grace_has_passed():
    stop = workers._Stop([])
    w = FakeWorker(12345)
    stop.signal, stop.count = "SIGTERM", 1
    stop.pass_on([w], now=100.0)
    stop.pass_on([w], now=100.0 + workers.GIVE_UP_AFTER - 0.1)
    assert signal.SIGKILL not in w.sent
    stop.pass_on([w], now=100.0 + workers.GIVE_UP_AFTER + 0.1)
    assert w.sent == [signal.SIGTERM, signal.SIGCONT, signal.SIGKILL]


def test_ctrl_c_ends_a_sweep_whose_worker_someone_stopped_and_the_same_command_continues(done, tmp_path):
    from test_sweep import process_state, worker_pids

    cfg, data, ref = done
    endless = tmp_path / "endless.toml"
    endless.write_text(cfg.read_text().replace("epochs = 3", "epochs = 1000"))
    sw = tmp_path / "sw"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlecli", "sweep", str(endless), *GRID, "--sweep-dir", str(sw), "--data-dir",
         str(data), "--jobs", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, process_group=0,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 60
    while len(list(sw.glob("*/checkpoints/epoch-0002.npz"))) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    pids = worker_pids(proc.pid)
    assert len(pids) == 2
    os.kill(pids[0], signal.SIGSTOP)
    while process_state(pids[0]) != "T":
        time.sleep(0.01)
    started = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the stopped worker too must hear it
    try:
        out, err = proc.communicate(timeout=workers.GIVE_UP_AFTER / 2)  # well before it would be killed
    finally:
        with_pid = Path(f"/proc/{pids[0]}")
        if with_pid.exists():
            os.kill(pids[0], signal.SIGCONT)
    assert proc.returncode == 130, err
    assert time.monotonic() - started < workers.GIVE_UP_AFTER
    for name in NAMES:
        assert json.loads((sw / name / "manifest.json").read_text())["ended"]["status"] == "interrupted"


# ---------------------------------------------------------------------------
# B9: a sweep folder too deep for its runs' files is refused before anything is written


@pytest.mark.parametrize("length", [4030, 4060])
def test_a_sweep_folder_too_deep_for_its_runs_files_is_refused_before_anything_is_written(done, tmp_path, length):
    cfg, data, ref = done
    pad = length - len(os.fsencode(str(tmp_path)))
    sw = tmp_path.joinpath(*["d" * 99] * (pad // 100), "e" * max(pad % 100 - 1, 1))
    longest = (max(len(os.fsencode(str(sw / n))) for n in NAMES)
               + len("/checkpoints/.epoch-000000.npz.4194304.abcdefgh.tmp"))
    assert len(os.fsencode(str(sw))) < 4095 < longest
    res = cli("sweep", cfg, *GRID, "--sweep-dir", sw, "--data-dir", data)
    assert res.exit_code == 1
    assert res.stderr == (f"Error: --sweep-dir {sw}: the paths of its runs' files would be up to {longest:,} bytes "
                          "long, more than the 4,095 a path may have; choose a folder with a shorter path\n")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------
# The commands the sweep prints can be pasted into a shell


@pytest.mark.parametrize("name", ["with space", "it's", "$HOME;ls"])
def test_the_plot_and_runs_commands_quote_the_sweep_folder_for_the_shell(done, tmp_path, name):
    cfg, data, ref = done
    sw = tmp_path / name
    shutil.copytree(ref, sw)
    res = cli("sweep", cfg, *GRID, "--sweep-dir", sw, "--data-dir", data)
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[-2:] == [f"plot:     mlecli plot {shlex.quote(str(sw))}",
                                            f"runs:     mlecli runs {shlex.quote(str(sw))}"]
    assert shlex.split(res.stdout.splitlines()[-1])[-1] == str(sw)


@pytest.mark.parametrize("args", [
    ["--seeds", "1" + "0" * 400],
    ["--grid", "train.learning_rate=1" + "0" * 400 + ",0.1"],
    ["--set", "model.seed=1" + "0" * 400],
])
def test_integers_of_hundreds_of_digits_are_one_short_line(tiny_config, tmp_path, args):
    res = cli("sweep", tiny_config(), *args, "--sweep-dir", tmp_path / "s", "--dry-run")
    assert res.exit_code in (1, 2) and "Traceback" not in res.stderr
    line = res.stderr.splitlines()[-1]
    assert line.startswith("Error: ") and len(line) < 200 and ("2**63" in line or "finite number" in line), line
    assert not (tmp_path / "s").exists()


def test_runs_where_with_an_integer_of_hundreds_of_digits_matches_nothing(tiny_config, tmp_path):
    cfg = tiny_config(train={"epochs": 1}, model={"hidden": [4]})
    assert cli("train", cfg, "--run-dir", tmp_path / "runs" / "r", "--data-dir", tmp_path / "d", "-q").exit_code == 0
    res = cli("runs", tmp_path / "runs", "--where", "train.learning_rate=1" + "0" * 400)
    assert res.exit_code == 0 and res.output.startswith("no runs in "), res.output


# ---------------------------------------------------------------------------
# Hostile round 5: a signal at any moment of a worker's run gives the run's own status, once


class _Pipe:
    def __init__(self):
        self.sent = []

    def send(self, message):
        self.sent.append(message)


def _then_sigterm(real, when=lambda *args: True, before=False):
    def wrapped(*args, **kw):
        if before and when(*args):
            os.kill(os.getpid(), signal.SIGTERM)
        out = real(*args, **kw)
        if not before and when(*args):
            os.kill(os.getpid(), signal.SIGTERM)  # as PR_SET_PDEATHSIG or the sweep's stop sends it
        return out
    return wrapped


@pytest.mark.parametrize("moment", ["fetching its data", "epoch 1 ends", "epoch 2 ends", "epoch 3 ends",
                                    "evaluating it"])
def test_a_signal_at_any_moment_of_a_worker_s_run_gives_the_status_its_folder_says_and_no_internal_error(
        done, tmp_path, monkeypatch, capfd, moment):
    from mlecli.run import config
    from mlecli.run import evaluate as ev
    from mlecli.run import train as training
    from mlecli.run.rundir import read_manifest
    from mlecli.sweep.runs import run_row

    cfg_path, data, _ = done
    if moment == "fetching its data":  # before its training began: the trainer's own Stopped
        monkeypatch.setattr(training, "_prepare_data", _then_sigterm(training._prepare_data))
    elif moment.startswith("epoch"):  # the last one: the run is finished, whatever the signal
        k = int(moment.split()[1])
        monkeypatch.setattr(training, "_end_epoch", _then_sigterm(training._end_epoch,
                                                                  lambda run, *_: run.state.epochs_done == k))
    else:
        monkeypatch.setattr(ev, "evaluate", _then_sigterm(ev.evaluate, before=True))
    monkeypatch.setattr(workers, "_stop_signal", None)
    for sig in workers.STOP_SIGNALS:  # the worker's own handlers, as worker_main installs them
        signal.signal(sig, workers._on_stop_signal)
    run = tmp_path / "run"
    task = workers.Task("run", str(run), config.load(cfg_path).to_dict(), "start", evaluate=True)
    result = workers._perform(task, _Pipe(), data)
    if moment == "fetching its data":
        assert (result, run.exists()) == (workers.Result("not started"), False)
    else:
        expected = "interrupted" if moment in ("epoch 1 ends", "epoch 2 ends") else "finished"
        assert (result.status, run_row(run)["status"], read_manifest(run)["ended"]["status"]) == (expected,) * 3
    assert "internal error" not in capfd.readouterr().err


@settings(max_examples=200, deadline=None)
@given(runs=st.lists(st.tuples(st.sampled_from(["finished", "interrupted", "failed", "not started", "broken"]),
                               st.sampled_from([None, "finished", "interrupted", "at once", "failed", "not started"])),
                     min_size=1, max_size=6))
def test_a_stopped_sweep_counts_each_run_once_whatever_its_folder_and_its_worker_said(done, runs):
    from mlecli.sweep import runner as sweeping

    cfg_path, _, _ = done
    rates = ",".join(str(k + 1) for k in range(len(runs)))
    p = grid.plan(str(cfg_path), (), (f"train.learning_rate={rates}",), (0,))
    results = {r.name: workers.Result(said if said != "at once" else "interrupted",
                                      "stopped at once" if said == "at once" else None)
               for r, (_, said) in zip(p.runs, runs) if said is not None}
    rows = [{"status": folder} for folder, _ in runs]
    n = sweeping.stop_counts(p, sweeping.Outcome(Path("sw"), results, "SIGINT", {"runs": rows}))
    assert sum(n.values()) <= len(runs)
    assert n["finished"] == sum(folder == "finished" for folder, _ in runs)
    assert n["saved"] + n["at_once"] == sum(said in ("interrupted", "at once") and folder != "finished"
                                            for folder, said in runs)


def _link_to_nothing(run: Path, tmp: Path):
    run.symlink_to(tmp / "nowhere")


def _link_to_an_empty_folder(run: Path, tmp: Path):
    (tmp / f"empty-{run.name}").mkdir()
    run.symlink_to(tmp / f"empty-{run.name}")


def _link_in_a_loop(run: Path, tmp: Path):
    run.symlink_to(run.name)


def _link_to_a_file(run: Path, tmp: Path):
    (tmp / f"file-{run.name}").write_text("x")
    run.symlink_to(tmp / f"file-{run.name}")


@pytest.mark.parametrize("how", [_link_to_nothing, _link_to_an_empty_folder, _link_in_a_loop, _link_to_a_file])
@pytest.mark.parametrize("replaced", [1, 2])
def test_a_run_folder_replaced_by_a_link_is_refused_in_the_sweeps_own_words(done, tmp_path, how, replaced):
    cfg, data, ref = done
    sw = tmp_path / "sw"
    shutil.copytree(ref, sw, symlinks=True)
    for name in NAMES[:replaced]:
        shutil.rmtree(sw / name)
        how(sw / name, tmp_path)
    res = cli("sweep", cfg, *GRID, "--sweep-dir", sw, "--data-dir", data, "--jobs", 1)
    assert res.exit_code == 1
    target = "a folder" if how is _link_to_an_empty_folder else \
        "nothing it can use (a missing, looping or non-folder target)"
    lines = res.stderr.splitlines()
    for name in NAMES[:replaced]:
        assert (f"failed {name}: {sw / name} is a symbolic link to {target}: a run of the sweep starts in a folder of "
                "its own; move the link away and run the sweep again") in lines
    assert lines[-1] == ("Error: none of the 2 runs finished (listed above). Run the same command again to retry them"
                         if replaced == 2 else "Error: 1 of 2 runs did not finish (listed above); the others did. "
                                               "Run the same command again to retry them")
    assert "--run-dir" not in res.output


def test_a_sweep_of_one_run_that_did_not_finish_says_so_in_the_singular(done, tmp_path):
    cfg, data, ref = done
    sw = tmp_path / "sw"
    (sw / NAMES[0]).mkdir(parents=True)
    (sw / NAMES[0] / "notes.txt").write_text("mine")
    res = cli("sweep", cfg, "--grid", "train.learning_rate=0.05", "--seeds", "0", "--sweep-dir", sw, "--data-dir",
              data)
    assert res.exit_code == 1
    assert res.stderr.splitlines()[-1] == ("Error: the sweep's one run did not finish (listed above). Run the same "
                                           "command again to retry them")


def test_a_damaged_sweep_inside_a_listed_folder_is_one_broken_row(done, sweep_json, tmp_path):
    cfg, data_dir, ref = done
    shutil.copytree(ref, tmp_path / "all" / "sw")
    shutil.copytree(next(p for p in ref.iterdir() if p.is_dir()), tmp_path / "all" / "alone")
    (tmp_path / "all" / "sw" / "sweep.json").write_text(json.dumps({**sweep_json, "runs": []}))
    res = cli("runs", tmp_path / "all")
    assert res.exit_code == 0, res.output
    rows = res.stdout.splitlines()
    assert [r.split()[0] for r in rows[1:3]] == ["alone", "sw"] and rows[1].split()[-1] == "finished"
    assert rows[2].split()[-1] == "broken"
    assert rows[3:] == [f"  sw: {tmp_path / 'all' / 'sw' / 'sweep.json'}: runs lists no run; a sweep has at least "
                        "one; the file is damaged or not mlecli's"]
