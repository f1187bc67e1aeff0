"""`mlecli sweep`: a grid of ordinary runs and seeds in parallel worker processes, continued
exactly, stopped cleanly, failures reported while the others finish, and the table per grid point."""

import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from mlecli.cli import main
from mlecli.run.config import toml_value
from mlecli.safe.errors import ConfigError
from mlecli.safe.locks import folder_lock
from mlecli.sweep import grid

RUNS = ["learning_rate=0.05,seed=0", "learning_rate=0.1,seed=0",  # in start order
        "learning_rate=0.05,seed=1", "learning_rate=0.1,seed=1"]
GRID = ("--grid", "train.learning_rate=0.05,0.1", "--seeds", "0-1")


def cli(*args, **kw):
    return CliRunner().invoke(main, [str(a) for a in args], **kw)


def arrays(run_dir: Path, name="last.npz"):
    with np.load(run_dir / "checkpoints" / name, allow_pickle=False) as z:
        return {k: z[k] for k in z.files if k != "meta"}


def assert_same_weights(a: Path, b: Path):
    """Bit-identical weights; and since a checkpoint is a pure function of the training
    state, byte-identical last.npz and best.npz."""
    for name in ("last.npz", "best.npz"):
        x, y = arrays(a, name), arrays(b, name)
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].dtype == y[k].dtype and x[k].tobytes() == y[k].tobytes(), (a.name, name, k)
        assert (a / "checkpoints" / name).read_bytes() == (b / "checkpoints" / name).read_bytes(), (a.name, name)


def epochs_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny, tiny_folder):
    """A config whose runs take about a second (so that they can be interrupted), the data
    cache, and one uninterrupted sweep of 2 learning rates x 2 seeds to compare against."""
    root = tmp_path_factory.mktemp("sweep")
    cfg = tiny.write_config(root / "tiny.toml", tiny_folder, "validation = 0.2\n[model]\nhidden = [8]\n"
                            "[train]\nepochs = 12\nbatch_size = 1\nlearning_rate = 0.05\n")
    data = root / "data"
    ref = root / "reference"
    res = cli("sweep", cfg, *GRID, "--sweep-dir", ref, "--data-dir", data, "--jobs", 2)
    assert res.exit_code == 0, res.output
    return cfg, data, ref, res


# ---------------------------------------------------------------------------
# The grid, the seeds, checked before anything starts


@pytest.mark.parametrize("text, values", [
    ("train.learning_rate=0.01,0.05, 0.1", [0.01, 0.05, 0.1]),
    ("model.hidden=[64,32],[128], []", [[64, 32], [128], []]),
    ("data.dataset=mnist,fashion-mnist", ["mnist", "fashion-mnist"]),
    ('task.negative="rest",[0, 2]', ["rest", [0, 2]]),
    ('data.files={train-images = "a,b"},{}', [{"train-images": "a,b"}, {}]),
    ("train.batch_size=32", [32]),
])
def test_grid_values_are_toml_split_at_the_commas_outside_brackets_and_quotes(text, values):
    assert list(grid.parse_grid(text).values) == values


toml_values = st.one_of(
    st.integers(-10**6, 10**6),
    st.floats(allow_nan=False),
    st.booleans(),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=8),
    st.lists(st.integers(0, 999), max_size=4),
)


@given(st.lists(toml_values, min_size=1, max_size=6, unique_by=lambda v: (type(v), json.dumps(v))))
@settings(max_examples=300, deadline=None)
def test_any_list_of_toml_values_comes_back_from_a_grid_option(values):
    distinct = [v for i, v in enumerate(values) if not any(type(w) is type(v) and w == v for w in values[:i])]
    axis = grid.parse_grid("x.y=" + ",".join(toml_value(v) for v in distinct))
    assert [(type(v), v) for v in axis.values] == [(type(v), v) for v in distinct]


@pytest.mark.parametrize("text, seeds", [("0-4", (0, 1, 2, 3, 4)), ("0,3,7", (0, 3, 7)), ("0-2,10", (0, 1, 2, 10)),
                                         ("5", (5,)), (" 1 - 2 ", (1, 2))])
def test_seeds_are_ranges_and_lists(text, seeds):
    assert grid.parse_seeds(text) == seeds
    assert grid.parse_seeds(grid.format_seeds(seeds)) == seeds


@pytest.mark.parametrize("text, message", [
    ("3-1", "--seeds '3-1': the range 3-1 runs backwards; write 1-3"),
    ("0-2,1", "--seeds '0-2,1' lists seed 1 twice"),
    ("x", "--seeds 'x': 'x' is not a seed (0, 1, ...) or a range such as 0-4"),
    ("5,0-9999", "--seeds '5,0-9999': more than 10,000 seeds; a sweep takes at most that many"),
])
def test_bad_seeds_are_refused(text, message):
    with pytest.raises(ConfigError) as exc:
        grid.parse_seeds(text)
    assert str(exc.value) == message


def test_a_typo_in_a_grid_key_fails_the_whole_sweep_naming_the_closest_key(tiny_config, tmp_path):
    res = cli("sweep", tiny_config(), "--grid", "train.learning_rate=0.1,0.2", "--grid", "train.batch_sise=8,16",
              "--sweep-dir", tmp_path / "s", "--data-dir", tmp_path / "d")
    assert res.exit_code == 1
    assert res.stderr == ("Error: --grid train.batch_sise=8: unknown key train.batch_sise "
                          "(did you mean train.batch_size?)\n")
    assert not (tmp_path / "s").exists() and not (tmp_path / "d").exists()


def test_a_bad_grid_value_is_refused_naming_it(tiny_config, tmp_path):
    res = cli("sweep", tiny_config(), "--grid", "train.learning_rate=0.1,-1", "--sweep-dir", tmp_path / "s")
    assert res.exit_code == 1
    assert res.stderr == ("Error: --grid train.learning_rate=-1: train.learning_rate = -1: "
                          "must be a finite number > 0\n")
    assert not (tmp_path / "s").exists()


def test_grid_values_that_give_the_same_config_are_refused(tiny_config, tmp_path):
    res = cli("sweep", tiny_config(), "--grid", "train.batch_size=16,32", "--grid", "train.learning_rate=1,1.0",
              "--sweep-dir", tmp_path / "s")
    assert res.exit_code == 1
    assert res.stderr == "Error: --grid train.learning_rate: 1 and 1.0 give the same config; give each value once\n"


def test_a_combination_of_grid_values_that_cannot_be_is_refused(tiny_config, tmp_path):
    cfg = tiny_config(task={"positive": [1], "negative": [0]})  # each value alone is fine with this
    res = cli("sweep", cfg, "--grid", "task.positive=[1],[2]", "--grid", "task.negative=[0],[2]",
              "--sweep-dir", tmp_path / "s")
    assert res.exit_code == 1
    assert res.stderr == ("Error: --grid task.positive=[2], task.negative=[2]: task.positive and task.negative "
                          "both list [2]: a digit can be in one class only\n")


@pytest.mark.parametrize("args, message", [
    (["--grid", "model.seed=1,2"],
     "--grid model.seed: a sweep sets model.seed and train.seed from --seeds; use --seeds"),
    (["--set", "train.seed=3"],
     "--set train.seed: a sweep sets model.seed and train.seed from --seeds; drop the --set"),
    (["--grid", "train.epochs=1,2", "--set", "train.epochs=3"],
     "--grid train.epochs and --set train.epochs both set it; keep one"),
    (["--grid", "train.epochs=1,2", "--grid", "train.epochs=3"],
     "--grid train.epochs is given twice; list all its values in one --grid"),
])
def test_the_seeds_come_from_seeds_and_each_key_from_one_place(tiny_config, tmp_path, args, message):
    res = cli("sweep", tiny_config(), *args, "--sweep-dir", tmp_path / "s")
    assert res.exit_code == 1
    assert res.stderr == f"Error: {message}\n"


def test_dry_run_prints_one_train_command_per_run_and_writes_nothing(tiny_config, tmp_path):
    cfg = tiny_config()
    res = cli("sweep", cfg, "--grid", "train.learning_rate=0.05,0.1", "--grid", "model.hidden=[8],[4, 4]",
              "--set", "train.epochs=2", "--seeds", "3", "--sweep-dir", tmp_path / "s", "--dry-run")
    assert res.exit_code == 0, res.output
    s = tmp_path / "s"
    assert res.stdout.splitlines() == [
        f"mlecli train {cfg} --set train.epochs=2 --set train.learning_rate=0.05 --set 'model.hidden=[8]' "
        f"--set model.seed=3 --set train.seed=3 --run-dir {s}/learning_rate=0.05,hidden=8,seed=3",
        f"mlecli train {cfg} --set train.epochs=2 --set train.learning_rate=0.05 --set 'model.hidden=[4, 4]' "
        f"--set model.seed=3 --set train.seed=3 --run-dir {s}/learning_rate=0.05,hidden=4x4,seed=3",
        f"mlecli train {cfg} --set train.epochs=2 --set train.learning_rate=0.1 --set 'model.hidden=[8]' "
        f"--set model.seed=3 --set train.seed=3 --run-dir {s}/learning_rate=0.1,hidden=8,seed=3",
        f"mlecli train {cfg} --set train.epochs=2 --set train.learning_rate=0.1 --set 'model.hidden=[4, 4]' "
        f"--set model.seed=3 --set train.seed=3 --run-dir {s}/learning_rate=0.1,hidden=4x4,seed=3",
    ]
    assert not s.exists()


def test_dry_run_gives_runs_with_batches_over_64_the_sweeps_blas_threads(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setattr("mlecli.sweep.workers.cores", lambda: 4)  # 2 jobs on 4 cores: 2 BLAS threads each
    res = cli("sweep", tiny_config(), "--grid", "train.batch_size=64,65", "--seeds", "0", "--jobs", "2",
              "--sweep-dir", tmp_path / "s", "--dry-run")
    lines = res.stdout.splitlines()
    assert lines[0].startswith("mlecli train ") and " --set train.batch_size=64 " in lines[0]
    assert lines[1].startswith("OPENBLAS_NUM_THREADS=2 mlecli train ") and " --set train.batch_size=65 " in lines[1]


# ---------------------------------------------------------------------------
# Running: complete run folders, bit-identical to mlecli train


def test_a_sweep_makes_one_complete_run_folder_per_grid_point_and_seed(setup):
    cfg, data, ref, res = setup
    assert sorted(p.name for p in ref.iterdir()) == sorted([".lock", "sweep.json", *RUNS])
    for name in RUNS:
        run = ref / name
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == \
            ["best.npz", *(f"epoch-{e:04d}.npz" for e in range(1, 13)), "last.npz"]
        assert [m["epoch"] for m in epochs_of(run)] == list(range(1, 13))
        manifest = json.loads((run / "manifest.json").read_text())
        assert manifest["ended"]["status"] == "finished"
        seed = int(name[-1])
        assert (manifest["model_seed"], manifest["train_seed"]) == (seed, seed)
        assert f"learning_rate = {name.split('=')[1].split(',')[0]}\n" in (run / "config.toml").read_text()
    described = json.loads((ref / "sweep.json").read_text())
    assert described["grid"] == [{"key": "train.learning_rate", "values": [0.05, 0.1]}]
    assert described["seeds"] == [0, 1] and described["config"] == str(cfg) and described["set"] == []
    assert described["blas_threads"] >= 1
    assert [(r["dir"], r["point"], r["seed"]) for r in described["runs"]] == [
        ("learning_rate=0.05,seed=0", {"train.learning_rate": 0.05}, 0),
        ("learning_rate=0.05,seed=1", {"train.learning_rate": 0.05}, 1),
        ("learning_rate=0.1,seed=0", {"train.learning_rate": 0.1}, 0),
        ("learning_rate=0.1,seed=1", {"train.learning_rate": 0.1}, 1),
    ]


def test_each_sweep_run_is_bit_identical_to_the_same_run_made_with_mlecli_train(setup, tmp_path):
    cfg, data, ref, _ = setup
    for lr in ("0.05", "0.1"):
        for seed in (0, 1):
            run = tmp_path / f"{lr}-{seed}"
            res = cli("train", cfg, "--set", f"train.learning_rate={lr}", "--set", f"model.seed={seed}",
                      "--set", f"train.seed={seed}", "--run-dir", run, "--data-dir", data, "-q")
            assert res.exit_code == 0, res.output
            assert_same_weights(run, ref / f"learning_rate={lr},seed={seed}")


def test_the_dry_run_commands_run_by_hand_give_the_same_weights(setup, tmp_path):
    cfg, data, ref, _ = setup
    res = cli("sweep", cfg, *GRID, "--sweep-dir", tmp_path / "by-hand", "--data-dir", data, "--dry-run")
    lines = res.stdout.splitlines()
    assert len(lines) == 4
    for line in lines:
        words = shlex.split(line)
        assert words[:2] == ["mlecli", "train"]
        assert cli(*words[1:], "-q").exit_code == 0
    for name in RUNS:
        assert_same_weights(tmp_path / "by-hand" / name, ref / name)


def test_the_table_gives_mean_and_standard_deviation_over_seeds_per_grid_point(setup):
    cfg, data, ref, res = setup
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["train.learning_rate", "runs", "best", "val", "LL", "best", "val", "acc", "test", "acc"]
    best = {}
    for lr in ("0.05", "0.1"):
        lls = []
        for seed in (0, 1):
            records = epochs_of(ref / f"learning_rate={lr},seed={seed}")
            lls.append(max(m["val_ll_mean"] for m in records))
        best[lr] = statistics.fmean(lls)
        row = next(line for line in lines if line.startswith(lr + " "))
        assert row.split()[1:5] == ["2/2", f"{statistics.fmean(lls):.4f}", "±", f"{statistics.stdev(lls):.4f}"]
    winner = max(best, key=best.get)
    assert [line.startswith(winner + " ") for line in lines if line.endswith("<- best")] == [True]
    assert lines[-2:] == [f"plot:     mlecli plot {ref}", f"runs:     mlecli runs {ref}"]


def test_quiet_prints_the_table_alone(setup):
    cfg, data, ref, first = setup
    res = cli("sweep", cfg, *GRID, "--sweep-dir", ref, "--data-dir", data, "-q")
    assert res.exit_code == 0, res.output
    table = first.stdout.splitlines()[:4]  # the header, its rule and the two grid points
    assert [line.split()[0] for line in table] == ["train.learning_rate", "-------------------", "0.05", "0.1"]
    assert (res.stdout, res.stderr) == ("\n".join(table) + "\n", "")  # no note, no plot: and runs: lines


def test_json_gives_every_run_and_every_grid_point(setup):
    cfg, data, ref, _ = setup
    res = cli("sweep", cfg, *GRID, "--sweep-dir", ref, "--data-dir", data, "--json")
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)
    assert s["grid"] == {"train.learning_rate": [0.05, 0.1]} and s["seeds"] == [0, 1]
    assert [(r["values"], r["seed"], r["status"]) for r in s["runs"]] == [
        ({"train.learning_rate": 0.05}, 0, "finished"), ({"train.learning_rate": 0.05}, 1, "finished"),
        ({"train.learning_rate": 0.1}, 0, "finished"), ({"train.learning_rate": 0.1}, 1, "finished")]
    for pt in s["points"]:
        mine = [r["val_ll"] for r in s["runs"] if r["values"] == pt["values"]]
        assert pt["val_ll"] == {"mean": statistics.fmean(mine), "std": statistics.stdev(mine), "n": 2}
        assert pt["test_acc"] is None and pt["finished"] == pt["runs"] == 2
    assert sum(pt["best"] for pt in s["points"]) == 1


def test_running_the_same_command_again_trains_nothing_and_prints_the_table(setup):
    cfg, data, ref, first = setup
    before = {p: p.stat().st_mtime_ns for p in ref.rglob("*.npz")}
    res = cli("sweep", cfg, *GRID, "--sweep-dir", ref, "--data-dir", data)
    assert res.exit_code == 0, res.output
    assert res.stdout == first.stdout
    assert res.stderr.startswith(f"continuing sweep {ref}: 2 grid points x 2 seeds = 4 runs (4 finished, 0 to resume, "
                                 "0 to start)\n")
    assert {p: p.stat().st_mtime_ns for p in ref.rglob("*.npz")} == before


# ---------------------------------------------------------------------------
# Stopping, killing, failing


def sweep_process(cfg, sweep_dir, data, *extra):
    """`mlecli sweep` as a shell runs a job: in a process group of its own, which Ctrl-C and Ctrl-Z signal."""
    return subprocess.Popen(
        [sys.executable, "-m", "mlecli", "sweep", str(cfg), *GRID, "--sweep-dir", str(sweep_dir), "--data-dir",
         str(data), "--jobs", "2", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        process_group=0, text=True,  # its own process group, as a shell job is
    )


def wait_for(path_glob: str, folder: Path, proc, timeout=60.0, count=1):
    """Until `count` files match `path_glob` in `folder` (while the sweep runs)."""
    deadline = time.monotonic() + timeout
    while len(list(folder.glob(path_glob))) < count:
        assert proc.poll() is None, f"the sweep ended first: {proc.communicate()}"
        assert time.monotonic() < deadline, "nothing happened in time"
        time.sleep(0.01)


def test_ctrl_c_stops_every_worker_cleanly_and_the_same_command_continues_bit_identical(setup, tmp_path):
    cfg, data, ref, _ = setup
    cut = tmp_path / "cut"
    proc = sweep_process(cfg, cut, data)
    wait_for("*/checkpoints/epoch-0002.npz", cut, proc)
    os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C on a terminal: the sweep and its workers
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and out == ""
    status = {n: json.loads((cut / n / "manifest.json").read_text())["ended"]["status"]
              for n in RUNS if (cut / n).exists()}
    finished, saved = list(status.values()).count("finished"), list(status.values()).count("interrupted")
    assert saved >= 1 and finished + saved == len(status)
    assert err.splitlines()[-1] == (
        f"Stopped by SIGINT: {finished} of 4 runs finished, {saved} saved mid-run. Continue with: mlecli sweep {cfg} "
        f"--grid train.learning_rate=0.05,0.1 --seeds 0-1 --jobs 2 --data-dir {data} --sweep-dir {cut}")
    for name in status:
        last = json.loads(str(np.load(cut / name / "checkpoints" / "last.npz")["meta"][()]))
        assert (last["epochs_done"] == 12) == (status[name] == "finished")
    res = cli("sweep", cfg, *GRID, "--sweep-dir", cut, "--data-dir", data, "--jobs", 2)
    assert res.exit_code == 0, res.output
    assert f"({finished} finished, {saved} to resume, {4 - finished - saved} to start)" in res.stderr
    for name in RUNS:
        assert_same_weights(cut / name, ref / name)
        assert [m["epoch"] for m in epochs_of(cut / name)] == list(range(1, 13))


def test_a_second_ctrl_c_stops_the_workers_at_once_and_the_sweep_still_continues_bit_identical(setup, tmp_path):
    cfg, data, ref, _ = setup
    cut = tmp_path / "cut"
    proc = sweep_process(cfg, cut, data)
    wait_for("*/checkpoints/epoch-0002.npz", cut, proc)
    os.killpg(proc.pid, signal.SIGINT)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert last.startswith("Stopped by SIGINT: ") and last.endswith(f"Continue with: mlecli sweep {cfg} --grid "
                                                                   f"train.learning_rate=0.05,0.1 --seeds 0-1 --jobs 2 "
                                                                   f"--data-dir {data} --sweep-dir {cut}")
    res = cli("sweep", cfg, *GRID, "--sweep-dir", cut, "--data-dir", data)
    assert res.exit_code == 0, res.output
    for name in RUNS:
        assert_same_weights(cut / name, ref / name)


@pytest.fixture(scope="module")
def endless(setup):
    """A config whose runs would take minutes: the sweep is surely mid-run when a test acts."""
    cfg, data, _, _ = setup
    path = cfg.with_name("endless.toml")
    path.write_text(cfg.read_text().replace("epochs = 12", "epochs = 1000"))
    return path, data


def test_ctrl_z_suspends_the_workers_with_the_sweep_and_they_go_on_together(endless, tmp_path):
    cfg, data = endless
    folder = tmp_path / "z"
    proc = sweep_process(cfg, folder, data)
    wait_for("*/checkpoints/epoch-0002.npz", folder, proc, count=2)  # both workers well into a run
    pids = worker_pids(proc.pid)
    assert len(pids) == 2
    os.killpg(proc.pid, signal.SIGTSTP)  # as Ctrl-Z on a terminal
    deadline = time.monotonic() + 10
    while {process_state(pid) for pid in [proc.pid, *pids]} != {"T"}:
        assert time.monotonic() < deadline, "the sweep and its workers did not all stop"
        time.sleep(0.01)
    files = {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}
    time.sleep(0.5)
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()} == files  # nothing trains
    os.killpg(proc.pid, signal.SIGCONT)
    deadline = time.monotonic() + 10
    while any(process_state(pid) == "T" for pid in [proc.pid, *pids]):
        assert time.monotonic() < deadline, "the sweep and its workers did not all go on"
        time.sleep(0.01)
    n = len(list(folder.glob("*/checkpoints/epoch-*.npz")))
    wait_for(f"*/checkpoints/epoch-{max(3, n):04d}.npz", folder, proc)  # they train again
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err


def test_workers_end_with_a_sweep_killed_hard_each_saving_its_run(endless, tmp_path):
    cfg, data = endless
    folder = tmp_path / "orphans"
    proc = sweep_process(cfg, folder, data)
    wait_for("*/checkpoints/epoch-0002.npz", folder, proc, count=2)  # both workers well into a run
    pids = worker_pids(proc.pid)
    assert len(pids) == 2
    proc.kill()
    proc.communicate(timeout=10)
    deadline = time.monotonic() + 20
    while any(Path(f"/proc/{pid}").exists() and process_state(pid) != "Z" for pid in pids):
        assert time.monotonic() < deadline, "workers outlived the sweep"
        time.sleep(0.01)
    runs = [p for p in folder.iterdir() if p.is_dir()]
    assert len(runs) == 2
    for run in runs:
        assert json.loads((run / "manifest.json").read_text())["ended"]["status"] == "interrupted"
        assert cli("runs", folder, "--json", "--where", f"name={run.name}").exit_code == 0


def process_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def worker_pids(parent: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == parent and b"spawn_main" in cmdline:
            pids.append(int(stat.parent.name))
    return pids


def test_a_worker_killed_hard_fails_only_its_run_and_the_sweep_goes_on(setup, tmp_path):
    cfg, data, ref, _ = setup
    folder = tmp_path / "killed"
    proc = sweep_process(cfg, folder, data)
    wait_for("*/checkpoints/epoch-0002.npz", folder, proc)
    assert len(worker_pids(proc.pid)) == 2
    victim = None
    while victim is None:  # a worker in the middle of a run: it holds the run folder's lock
        assert proc.poll() is None, "the sweep ended first"
        for pid in worker_pids(proc.pid):
            victim = next((n for n in RUNS if str(folder / n / ".lock") in open_files(pid)), None)
            if victim is not None:
                os.kill(pid, signal.SIGKILL)
                break
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, (out, err)
    assert err.count(f"failed {victim}: its worker process died (killed by SIGKILL); run the same sweep again to "
                     "resume it from its last checkpoint\n") == 2  # as it happened, and in the summary
    assert err.splitlines()[-1] == ("Error: 1 of 4 runs did not finish (listed above); the others did. "
                                    "Run the same command again to retry them")
    table = {line.split()[0]: line.split()[1] for line in out.splitlines()[2:4]}
    assert sorted(table.values()) == ["1/2", "2/2"]
    res = cli("sweep", cfg, *GRID, "--sweep-dir", folder, "--data-dir", data)
    assert res.exit_code == 0, res.output
    assert "(3 finished, 1 to resume, 0 to start)" in res.stderr or \
        "(3 finished, 0 to resume, 1 to start)" in res.stderr  # killed before its first checkpoint
    for name in RUNS:
        assert_same_weights(folder / name, ref / name)


def open_files(pid: int) -> set[str]:
    files = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            files.add(os.readlink(fd))
        except OSError:
            pass
    return files


def test_a_run_that_fails_is_reported_while_the_others_finish(tiny_config, tmp_path):
    cfg, data = tiny_config(train={"epochs": 2}), tmp_path / "d"
    res = cli("sweep", cfg, "--grid", "train.learning_rate=0.05,1e38", "--seeds", "0-1", "--sweep-dir", tmp_path / "s",
              "--data-dir", data)
    assert res.exit_code == 1
    lines = res.stdout.splitlines()
    assert lines[2].split()[:2] == ["0.05", "2/2"] and lines[2].endswith("<- best")
    assert lines[3].split() == ["1e+38", "0/2", "-", "-", "-"]
    for seed in (0, 1):
        run = tmp_path / "s" / f"learning_rate=1e+38,seed={seed}"
        assert (f"failed {run.name}: the log-likelihood became nan at epoch 1, batch 2: train.learning_rate = 1e+38 "
                f"is too large") in res.stderr
        assert (tmp_path / "s" / f"learning_rate=0.05,seed={seed}" / "checkpoints" / "epoch-0002.npz").is_file()
    assert res.stderr.splitlines()[-1] == ("Error: 2 of 4 runs did not finish (listed above); the others did. "
                                           "Run the same command again to retry them")


def test_a_second_sweep_in_the_same_folder_is_refused(setup, tmp_path):
    cfg, data, ref, _ = setup
    busy = tmp_path / "busy"
    with folder_lock(busy, wait=False, what="test"):
        res = cli("sweep", cfg, *GRID, "--sweep-dir", busy, "--data-dir", data)
    assert res.exit_code == 1
    assert res.stderr == (f"Error: sweep folder {busy} is in use by another mlecli process (lock {busy / '.lock'}); "
                          "wait for it to finish or use another folder\n")
    assert sorted(p.name for p in busy.iterdir()) == [".lock"]  # the holder's lock, nothing else


def test_a_finished_sweep_is_only_read_it_needs_no_lock(setup):
    cfg, data, ref, first = setup
    with folder_lock(ref, wait=False, what="test"):  # another sweep in it, or a disk that cannot be written
        res = cli("sweep", cfg, *GRID, "--sweep-dir", ref, "--data-dir", data)
    assert res.exit_code == 0, res.output
    assert res.stdout == first.stdout


def test_a_sweep_folder_holding_another_sweep_is_refused(setup):
    cfg, data, ref, _ = setup
    res = cli("sweep", cfg, "--grid", "train.learning_rate=0.05,0.2", "--seeds", "0-1", "--sweep-dir", ref,
              "--data-dir", data)
    assert res.exit_code == 1
    assert res.stderr == (f"Error: sweep folder {ref} holds another sweep (its grid is train.learning_rate=0.05,0.1); "
                          f"choose another --sweep-dir, or repeat the command that made it ({ref / 'sweep.json'} "
                          "describes it)\n")


def test_without_a_sweep_dir_the_same_command_continues_the_newest_sweep_it_made(tiny_config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config(train={"epochs": 1})
    first = cli("sweep", cfg, "--seeds", "0-1", "--data-dir", "d")
    assert first.exit_code == 0, first.output
    (made,) = Path("runs").iterdir()
    assert made.name.startswith("tiny-run-sweep-")
    again = cli("sweep", cfg, "--seeds", "0-1", "--data-dir", "d")
    assert again.stderr.startswith(f"continuing sweep {made}: 1 grid point x 2 seeds = 2 runs (2 finished, ")
    assert list(Path("runs").iterdir()) == [made]
    other = cli("sweep", cfg, "--seeds", "0-2", "--data-dir", "d")
    assert other.exit_code == 0 and len(list(Path("runs").iterdir())) == 2


def test_evaluate_measures_each_runs_best_checkpoint_on_the_test_split(tiny_config, tmp_path):
    cfg, data = tiny_config(train={"epochs": 2}), tmp_path / "d"
    res = cli("sweep", cfg, "--seeds", "0-1", "--sweep-dir", tmp_path / "s", "--data-dir", data, "--evaluate", "--json")
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)
    accs = []
    for r in s["runs"]:
        report = json.loads((Path(r["run_dir"]) / "eval-test-best.json").read_text())
        assert report["checkpoint_name"] == "best" and report["split"] == "test"
        assert r["test_acc"] == report["accuracy"]
        accs.append(report["accuracy"])
    assert s["points"][0]["test_acc"] == {"mean": statistics.fmean(accs), "std": statistics.stdev(accs), "n": 2}


def test_evaluate_on_a_finished_sweep_evaluates_without_training(setup, tmp_path):
    import shutil

    cfg, data, ref, _ = setup
    copy = tmp_path / "copy"
    shutil.copytree(ref, copy)
    before = {p: p.read_bytes() for p in copy.rglob("*.npz")}
    res = cli("sweep", cfg, *GRID, "--sweep-dir", copy, "--data-dir", data, "--evaluate")
    assert res.exit_code == 0, res.output
    assert all((copy / n / "eval-test-best.json").is_file() for n in RUNS)
    assert {p: p.read_bytes() for p in copy.rglob("*.npz")} == before


def test_a_run_folder_left_before_its_first_checkpoint_starts_afresh(setup, tmp_path):
    import shutil

    cfg, data, ref, _ = setup
    copy = tmp_path / "copy"
    shutil.copytree(ref, copy)
    run = copy / RUNS[0]
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints").mkdir()
    res = cli("sweep", cfg, *GRID, "--sweep-dir", copy, "--data-dir", data)
    assert res.exit_code == 0, res.output
    assert_same_weights(run, ref / RUNS[0])


# ---------------------------------------------------------------------------
# The dataset: downloaded once by the sweep, read once per worker


def test_the_sweep_downloads_the_data_once_before_any_worker_starts(tiny, mirrors, tmp_path):
    mirror = mirrors(tiny.gz_files())
    cfg = tiny.write_config(tmp_path / "web.toml", mirror.url, "validation = 0.2\n[model]\nhidden = [4]\n"
                            "[train]\nepochs = 1\n")
    res = cli("sweep", cfg, "--grid", "train.learning_rate=0.05,0.1", "--seeds", "0-1", "--jobs", 2,
              "--sweep-dir", tmp_path / "s", "--data-dir", tmp_path / "d")
    assert res.exit_code == 0, res.output
    from mlecli.data.cache import dataset_dir
    from mlecli.run.config import load

    folder = dataset_dir(load(cfg).data.resolve(), tmp_path / "d")
    assert res.stderr.startswith(f"tiny is not cached in {folder}; downloading it\n")
    assert sorted(mirror.counts.items()) == sorted((name, 1) for name in tiny.gz_files())


def test_a_sweep_that_cannot_get_its_data_leaves_no_folder(tiny_config, tmp_path):
    res = cli("sweep", tiny_config(data={"url": str(tmp_path / "nowhere")}), "--seeds", "0-1",
              "--sweep-dir", tmp_path / "s", "--data-dir", tmp_path / "d")
    assert res.exit_code == 1
    assert res.stderr.splitlines()[-1].startswith("Error: could not download train-images-idx3-ubyte")
    assert not (tmp_path / "s").exists()


def test_within_keep_loaded_two_trainings_read_the_cached_dataset_once(tiny_config, tmp_path, monkeypatch):
    from mlecli.data import cache
    from mlecli.run import train
    from mlecli.run.config import load
    from mlecli.safe import npz

    cfg = load(tiny_config(train={"epochs": 1}))
    report = train.Reporter(line=lambda s: None, log=lambda s: None, progress=False)
    train.run(cfg, tmp_path / "warm", data_dir=tmp_path / "d", report=report)  # downloads and caches
    real = npz.read
    reads = []
    monkeypatch.setattr(npz, "read", lambda path, **kw: reads.append(Path(path).name) or real(path, **kw))
    with cache.keep_loaded():
        train.run(cfg, tmp_path / "a", data_dir=tmp_path / "d", report=report)
        after_first = list(reads)
        train.run(cfg, tmp_path / "b", data_dir=tmp_path / "d", report=report)
    assert sorted(set(after_first)) == ["test.npz", "train.npz"]
    assert reads == after_first  # the second run read nothing
    assert_same_weights(tmp_path / "a", tmp_path / "b")


def test_a_kept_split_is_read_again_once_its_cache_file_changes(tiny_config, tmp_path):
    from mlecli.data import cache
    from mlecli.run.config import load

    dataset = load(tiny_config()).data.resolve()
    cache.ensure_splits(dataset, tmp_path)
    with cache.keep_loaded():
        first = cache.load_split(dataset, tmp_path, "train")
        assert cache.load_split(dataset, tmp_path, "train") is first
        assert not first.images.flags.writeable
        npz_file = cache.dataset_dir(dataset, tmp_path) / "train.npz"
        npz_file.write_bytes(npz_file.read_bytes())  # the same bytes, a new modification time
        again = cache.load_split(dataset, tmp_path, "train")
        assert again is not first and np.array_equal(again.images, first.images)
    assert cache.load_split(dataset, tmp_path, "train").images.flags.writeable


# ---------------------------------------------------------------------------
# A sweep over tasks: each task's best, each task's baseline


@pytest.fixture(scope="module")
def over_tasks(tmp_path_factory, tiny, tiny_folder):
    """Two tasks (0 vs the rest, 1 vs the rest) x two learning rates, one seed."""
    root = tmp_path_factory.mktemp("tasks")
    cfg = tiny.write_config(root / "tiny.toml", tiny_folder, "validation = 0.2\n[task]\nnegative = \"rest\"\n"
                            "[model]\nhidden = [4]\n[train]\nepochs = 2\nbatch_size = 16\n")
    res = cli("sweep", cfg, "--grid", "task.positive=[0],[1]", "--grid", "train.learning_rate=0.01,0.1", "--seeds",
              "0", "--sweep-dir", root / "sw", "--data-dir", root / "data", "--jobs", 2)
    assert res.exit_code == 0, res.output
    return root / "sw", root / "data", res


def test_a_sweep_over_tasks_marks_the_best_of_each_task_and_shows_each_task_s_majority_baseline(over_tasks):
    sw, data, res = over_tasks
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["task.positive", "train.learning_rate", "runs", "best", "val", "LL", "best", "val",
                                "acc", "majority", "test", "acc"]
    rows = {(line.split()[0], line.split()[1]): line for line in lines[2:6]}
    for positive in ("[0]", "[1]"):
        runs = {lr: sw / f"positive={positive[1]},learning_rate={lr},seed=0" for lr in ("0.01", "0.1")}
        val_ll = {lr: max(m["val_ll_mean"] for m in epochs_of(run)) for lr, run in runs.items()}
        for lr, run in runs.items():
            report = json.loads(cli("evaluate", run, "--split", "validation", "--data-dir", data, "--json").stdout)
            cells = rows[positive, lr].split()
            assert cells[5] == f"{100 * report['majority_baseline']:.2f}%"  # what evaluate says of the same images
            best = lr == max(val_ll, key=val_ll.get)
            assert rows[positive, lr].endswith("  <- best of its task") == best, (positive, lr)
    assert lines[6:8] == [
        "runs: finished/all; seed 0: each run's best epoch (by validation LL); test acc: that epoch's checkpoint",
        "majority: the share of the task's larger class among its validation images, the accuracy of always "
        "answering it; the best is marked within each task, never across tasks"]
    assert "±" not in res.stdout  # one seed: no spread to show


def test_compare_png_marks_the_best_of_each_task_as_the_table_does(over_tasks):
    from mlecli.sweep.compare import collect, figure
    from mlecli.use.plot import pyplot

    sw, _, res = over_tasks
    marked = {tuple(line.split()[:2]) for line in res.stdout.splitlines() if line.endswith("<- best of its task")}
    groups, _ = collect([sw])
    assert {tuple(g.label.replace("positive=", "").replace("learning_rate=", "").split(", ")) for g in groups
            if g.best} == marked
    fig = figure(pyplot(), groups, "tasks")
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == [g.label + ("  ← best of its task" if g.best else "") for g in groups]


@pytest.mark.parametrize("share", [0.2, 0.5, 7, 31])
@pytest.mark.parametrize("positive, negative", [([0], "rest"), ([1, 3], [2]), ([1, 3, 5, 7, 9], [0, 2, 4, 6, 8])])
def test_the_majority_baseline_is_that_of_the_validation_images_the_run_holds_out(tiny, tiny_config, share, positive,
                                                                                  negative):
    from mlecli.data.splits import Split
    from mlecli.run import config
    from mlecli.run.task import build_task
    from mlecli.sweep.compare import validation_majority

    cfg = config.load(tiny_config(data={"validation": share}, task={"positive": positive, "negative": negative}))
    splits = {name: Split(tiny.arrays[f"{name}-images"], tiny.arrays[f"{name}-labels"], {})
              for name in ("train", "test")}
    for seed in (0, 5):  # the hold-out's counts of each digit do not depend on the seed
        y = build_task(cfg, splits, np.random.default_rng(seed)).validation.y
        assert validation_majority(cfg, tiny.arrays["train-labels"]) == max(y.sum(), len(y) - y.sum()) / len(y)
