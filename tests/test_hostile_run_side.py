"""What a hostile tester broke on the run side, each now a class of failure made
impossible: files that are not files, files shared with another run, streams that are
closed or full, checkpoints that are well-formed but impossible, resumes that would lose
a newer state, and the rest of the list."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlecli.cli import main
from mlecli.run import checkpoint as ckpt
from mlecli.safe.errors import MlecliError
from mlecli.safe.files import TMP_SUFFIX, atomic_write_text


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def mlecli(*args, timeout=60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlecli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, **kw)


def one_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    (line,) = stderr.splitlines()
    assert line.startswith("Error: "), line
    return line


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny, tiny_folder):
    root = tmp_path_factory.mktemp("hostile")
    cfg = tiny.write_config(root / "c.toml", tiny_folder, "validation = 0.2\n[model]\nhidden = [4]\n"
                            "[train]\nepochs = 2\nbatch_size = 16\nlog_every = 7\n")
    run, data = root / "runs" / "run", root / "data"
    assert cli("train", cfg, "--run-dir", run, "--data-dir", data, "-q").exit_code == 0
    assert cli("evaluate", run, "--data-dir", data).exit_code == 0
    return cfg, run, data


def copy_of(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "runs" / "copy"
    shutil.copytree(run, dst)
    return dst


@pytest.mark.parametrize("name", ["metrics.jsonl", "manifest.json", "eval-test-best.json", ".lock", "config.toml"])
def test_a_fifo_in_place_of_a_run_file_never_blocks_a_command(trained, tmp_path, name):
    _, run, data = trained
    run = copy_of(run, tmp_path)
    (run / name).unlink()
    os.mkfifo(run / name)
    for args in (["runs", run.parent], ["plot", run, "--data-dir", data, "--out", tmp_path / "p"],
                 ["evaluate", run, "--data-dir", data], ["train", "--resume", run, "--set", "train.epochs=3",
                                                          "--data-dir", data, "-q"]):
        res = mlecli(*args, timeout=60)  # blocked on the FIFO, this would time out
        assert "Traceback" not in res.stderr, (args, res.stderr)
        assert res.returncode in (0, 1), (args, res.returncode)


def test_a_metrics_file_shared_by_a_hard_link_is_not_written_through(trained, tmp_path):
    _, run, data = trained
    original = copy_of(run, tmp_path)
    linked = tmp_path / "runs" / "linked"
    subprocess.run(["cp", "-al", str(original), str(linked)], check=True)
    before = (original / "metrics.jsonl").read_bytes()
    res = cli("train", "--resume", linked, "--set", "train.epochs=3", "--data-dir", data, "-q")
    assert res.exit_code == 0, res.output
    assert (original / "metrics.jsonl").read_bytes() == before  # the other run is as it was
    assert [json.loads(x)["epoch"] for x in (linked / "metrics.jsonl").read_text().splitlines()][-1] == 3


def test_a_symlinked_metrics_file_is_refused(trained, tmp_path):
    _, run, data = trained
    run = copy_of(run, tmp_path)
    elsewhere = tmp_path / "elsewhere.jsonl"
    (run / "metrics.jsonl").rename(elsewhere)
    (run / "metrics.jsonl").symlink_to(elsewhere)
    before = elsewhere.read_bytes()
    res = cli("train", "--resume", run, "--set", "train.epochs=3", "--data-dir", data, "-q")
    assert res.exit_code == 1
    assert "metrics.jsonl is a symbolic link: appending would write into the file it points to" in res.stderr
    assert elsewhere.read_bytes() == before


def test_an_unreadable_last_checkpoint_is_never_passed_over(trained, tmp_path):
    _, run, data = trained
    run = copy_of(run, tmp_path)
    last = run / "checkpoints" / "last.npz"
    with np.load(last, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays["meta"][()]))
    arrays["meta"] = np.array(json.dumps({**meta, "format": 3}))
    np.savez(last, **arrays)  # as a newer mlecli might write it
    before = last.read_bytes()
    res = cli("train", "--resume", run, "--set", "train.epochs=3", "--data-dir", data, "-q")
    line = one_line(res.stderr)
    assert line.startswith(f"Error: cannot resume {run}: {last} has checkpoint format 3")
    assert line.endswith(f"to go on from its newest epoch checkpoint instead (epoch-0002.npz), losing what came "
                         f"after it, move last.npz out of {last.parent} and resume again")
    assert last.read_bytes() == before


@pytest.mark.parametrize("change,says", [
    ({"batch_in_epoch": 15}, "it stopped at batch 15 of an epoch of 15"),
    ({"step": 5}, "its step 5 is not 2 epochs of 15 batches and 0 more"),
    ({"n_inputs": 100, "image_shape": [10, 10]}, "it was trained on images of 100 pixels, these have 784"),
])
def test_a_checkpoint_that_cannot_be_this_runs_position_is_refused(trained, tmp_path, change, says):
    _, run, data = trained
    run = copy_of(run, tmp_path)
    cp = ckpt.load(run / "checkpoints" / "last.npz")
    meta = {k: v for k, v in cp.meta.items() if k != "format"} | change
    params = cp.params
    if "n_inputs" in change:
        params = [(np.zeros((100, 4), np.float32), params[0][1]), *params[1:]]
    (run / "checkpoints" / "last.npz").write_bytes(ckpt.encode(params, meta, cp.extra))
    res = cli("train", "--resume", run, "--set", "train.epochs=3", "--data-dir", data, "-q")
    assert one_line(res.stderr) == (f"Error: {run / 'checkpoints' / 'last.npz'} does not fit this run's data: {says}; "
                                    "the checkpoint is damaged or not this run's")


def test_weights_that_overflow_by_an_epochs_end_stop_with_advice_and_no_nan_record(tiny_config, tmp_path):
    run = tmp_path / "run"
    res = cli("train", tiny_config(model={"hidden": []}, train={"batch_size": 100000, "learning_rate": 1e36,
                                                                 "epochs": 2}), "--run-dir", run, "--data-dir",
              tmp_path / "d")
    line = one_line(res.stderr.splitlines()[-1])
    assert line.startswith("Error: the weights overflowed by the end of epoch 1")
    assert ("train.learning_rate = 1e+36 is too large for sgd at batches of 100000 (the step grows with the batch, "
            "since the LL is a sum): start a new run with a smaller one, such as 0.05, sgd's own rate (--resume cannot "
            "change it)") in line
    for text in (run / "metrics.jsonl").read_text().splitlines():
        json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))
    rows = json.loads(cli("runs", tmp_path, "--json").stdout)
    assert [r["status"] for r in rows] == ["failed"]


def test_the_first_step_record_after_a_resume_counts_the_whole_window(tiny_config, tmp_path, monkeypatch):
    from mlecli.run import train as training

    cfg = tiny_config(train={"epochs": 3, "log_every": 7})
    data = tmp_path / "d"
    assert cli("train", cfg, "--run-dir", tmp_path / "whole", "--data-dir", data, "-q").exit_code == 0
    real, calls = training.train_step, {"n": 0}

    def step_then_stop(*args):
        calls["n"] += 1
        if calls["n"] == 10:  # 3 steps past the record at step 7
            os.kill(os.getpid(), 2)
        return real(*args)

    monkeypatch.setattr(training, "train_step", step_then_stop)
    assert cli("train", cfg, "--run-dir", tmp_path / "cut", "--data-dir", data, "-q").exit_code == 130
    monkeypatch.setattr(training, "train_step", real)
    assert cli("train", "--resume", tmp_path / "cut", "--data-dir", data, "-q").exit_code == 0

    def steps(run):
        return [{k: v for k, v in json.loads(x).items() if k not in ("seconds", "images_per_s")}
                for x in (run / "metrics.jsonl").read_text().splitlines() if '"kind": "step"' in x]

    whole, cut = steps(tmp_path / "whole"), steps(tmp_path / "cut")
    assert [r["step"] for r in cut] == [r["step"] for r in whole]
    assert [r["train_acc"] for r in cut] == [r["train_acc"] for r in whole]
    assert [r["train_ll"] for r in cut] == [r["train_ll"] for r in whole]


def test_resume_cannot_make_a_run_shorter_than_it_is(trained, tmp_path):
    _, run, data = trained
    run = copy_of(run, tmp_path)
    before = (run / "config.toml").read_text()
    res = cli("train", "--resume", run, "--set", "train.epochs=1", "--data-dir", data, "-q")
    assert one_line(res.stderr) == ("Error: --set train.epochs = 1 is fewer than the 2 epochs this run has done: a "
                                    "run's epochs can only grow (its config.toml must keep saying what made its "
                                    "checkpoints)")
    assert (run / "config.toml").read_text() == before


def test_closed_or_full_output_streams(trained, tiny_config, tmp_path):
    _, run, data = trained
    cfg = tiny_config(train={"epochs": 1})
    closed = subprocess.run([sys.executable, "-m", "mlecli", "train", str(cfg), "--run-dir", str(tmp_path / "a"),
                             "--data-dir", str(data)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            close_fds=True, preexec_fn=lambda: os.close(1))
    assert closed.returncode == 0, closed.stderr
    assert ckpt.load(tmp_path / "a" / "checkpoints" / "last.npz").epoch == 1
    with open("/dev/full", "w") as full:
        res = subprocess.run([sys.executable, "-m", "mlecli", "train", str(cfg), "--run-dir", str(tmp_path / "b"),
                              "--data-dir", str(data)], stdout=subprocess.PIPE, stderr=full, text=True)
        assert res.returncode == 0  # notes that cannot be shown stop nothing
        assert ckpt.load(tmp_path / "b" / "checkpoints" / "last.npz").epoch == 1
        res = subprocess.run([sys.executable, "-m", "mlecli", "runs", str(run.parent)], stdout=full,
                             stderr=subprocess.PIPE, text=True)
    assert res.returncode == 1
    assert res.stderr == "Error: standard output: No space left on device\n"


def test_running_out_of_memory_is_one_line(tiny_config, tmp_path):
    def small_memory():
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    res = subprocess.run([sys.executable, "-m", "mlecli", "train", str(tiny_config()), "--set", "model.hidden=[400000]",
                          "--run-dir", str(tmp_path / "r"), "--data-dir", str(tmp_path / "d"), "-q"],
                         capture_output=True, text=True, preexec_fn=small_memory, timeout=120)
    assert res.returncode == 1
    line = one_line(res.stderr)
    assert "memory" in line


def test_names_with_control_characters_are_printed_escaped(trained, tmp_path):
    _, run, data = trained
    weird = tmp_path / "runs" / "evil\x1b]0;pwned\x07"
    shutil.copytree(run, weird)
    manifest = json.loads((weird / "manifest.json").read_text())
    manifest["ended"] = {"status": "failed", "at": "x", "error": "boom\x1b[2J\nsecond line"}
    (weird / "manifest.json").write_text(json.dumps(manifest))
    res = cli("runs", tmp_path / "runs")
    assert res.exit_code == 0
    assert "\x1b" not in res.stdout and "\x07" not in res.stdout
    assert "evil\\x1b]0;pwned\\x07" in res.stdout and "boom\\x1b[2J\\nsecond line" in res.stdout
    res = cli("evaluate", weird, "--data-dir", data)
    assert res.exit_code == 0 and "\x1b" not in res.stdout


def test_a_killed_writers_temporary_is_removed_by_the_next_command_and_a_live_ones_is_not(trained, tmp_path):
    from mlecli.safe import files as fsutil

    _, run, data = trained
    run = copy_of(run, tmp_path)
    ns = fsutil._NAMESPACE
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])  # ends, and is not reaped until wait()
    while not Path(f"/proc/{zombie.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
        pass
    stale = run / f".eval-test-best.json.{ns}-{dead.stdout.strip()}.abcd1234{TMP_SUFFIX}"
    of_zombie = run / f".eval-test-best.json.{ns}-{zombie.pid}.ijkl9012{TMP_SUFFIX}"
    alive = run / f".eval-test-best.json.{ns}-{os.getppid()}.efgh5678{TMP_SUFFIX}"
    # another pid namespace (a container sharing the folder): its pid 11 says nothing here
    foreign_new = run / f".curves.png.4026532999-11.mnop3456{TMP_SUFFIX}"
    foreign_old = run / f".mistakes.png.4026532999-11.qrst7890{TMP_SUFFIX}"
    for p in (stale, of_zombie, alive, foreign_new, foreign_old):
        p.write_text("half")
    a_day_ago = __import__("time").time() - fsutil.FOREIGN_TEMPORARY_AGE - 60
    os.utime(foreign_old, (a_day_ago, a_day_ago))
    assert cli("evaluate", run, "--data-dir", data).exit_code == 0
    zombie.wait()
    assert not stale.exists() and not of_zombie.exists() and not foreign_old.exists()
    assert alive.exists() and foreign_new.exists()


def test_a_damaged_manifest_is_kept_aside_when_a_resume_writes_a_new_one(trained, tmp_path):
    _, run, data = trained
    run = copy_of(run, tmp_path)
    atomic_write_text(run / "manifest.json", "{not json")
    res = cli("train", "--resume", run, "--set", "train.epochs=3", "--data-dir", data)
    assert res.exit_code == 0
    assert "writing a new manifest.json (the old one is kept as manifest.json.damaged)" in res.stderr
    assert (run / "manifest.json.damaged").read_text() == "{not json"
    assert json.loads((run / "manifest.json").read_text())["ended"]["status"] == "finished"


def test_an_evaluation_a_read_only_folder_cannot_keep_is_still_shown(trained, tmp_path, tmpfs):
    _, run, data = trained
    disk = tmpfs("ro", "4m")
    copy = disk / "run"
    shutil.copytree(run, copy)
    tmpfs.readonly(disk)
    res = cli("evaluate", copy, "--data-dir", data, "--json")
    assert res.exit_code == 0
    assert json.loads(res.stdout)["split"] == "test"
    assert res.stderr.startswith("warning: the report was not saved: cannot write ")


def test_paths_too_long_for_the_file_system_are_one_line(tmp_path):
    long = tmp_path / ("a" * 300)
    for args in (["runs", long], ["evaluate", long], ["train", "--resume", long], ["plot", long],
                 ["train", "default", "--run-dir", long]):
        res = cli(*args)
        assert res.exit_code == 1, args
        assert res.exception is None or isinstance(res.exception, SystemExit), (args, res.exception)
        assert len(res.stderr.splitlines()) == 1 and res.stderr.startswith("Error: "), (args, res.stderr)


@pytest.mark.parametrize("kind", ["fifo", "folder", "device"])
def test_no_file_is_ever_written_over_a_device_fifo_or_folder(tmp_path, kind):
    from mlecli.safe.errors import MlecliError
    from mlecli.safe.files import atomic_write_text

    target = tmp_path / "target"
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "folder":
        target.mkdir()
    else:
        os.mknod(target, 0o600 | __import__("stat").S_IFCHR, os.makedev(1, 3))  # like /dev/null (root)
    before = os.lstat(target)
    with pytest.raises(MlecliError, match=r"is not a regular file \(a folder, device or pipe\): not replacing it"):
        atomic_write_text(target, "x")
    after = os.lstat(target)
    assert (after.st_mode, after.st_ino) == (before.st_mode, before.st_ino)
    assert [p.name for p in tmp_path.iterdir()] == ["target"]


def test_runs_lists_every_run_when_one_folder_cannot_be_read(trained, tmp_path, monkeypatch):
    _, run, data = trained
    runs_dir = tmp_path / "runs"
    for name in ("mine", "theirs", "swept"):
        shutil.copytree(run, runs_dir / name)
    real_stat, real_open = os.stat, os.open

    def denied(path) -> bool:  # as for a user who may not look into runs/theirs (mode 700, another owner)
        return f"{os.sep}theirs{os.sep}" in os.fsdecode(path)

    def stat(path, *a, **k):
        if denied(path):
            raise PermissionError(13, "Permission denied", os.fsdecode(path))
        return real_stat(path, *a, **k)

    def open_(path, *a, **k):
        if denied(path):
            raise PermissionError(13, "Permission denied", os.fsdecode(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(os, "stat", stat)
    monkeypatch.setattr(os, "open", open_)
    res = cli("runs", runs_dir, "--json")
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in json.loads(res.stdout)}
    assert rows["mine"]["status"] == rows["swept"]["status"] == "finished"
    assert rows["theirs"]["status"] == "broken"
    assert rows["theirs"]["problem"].startswith(f"cannot read {runs_dir / 'theirs'}")
    assert rows["theirs"]["problem"].endswith(": Permission denied")



def test_the_deepest_network_allowed_writes_checkpoints_it_can_read_and_resume(tiny_config, tmp_path):
    from mlecli.run.config import MAX_LAYERS

    run, data = tmp_path / "deep", tmp_path / "d"
    cfg = tiny_config(model={"hidden": [2] * MAX_LAYERS}, train={"optimizer": "adam", "learning_rate": 0.001,
                                                                  "epochs": 1})
    assert cli("train", cfg, "--run-dir", run, "--data-dir", data, "-q").exit_code == 0
    assert cli("evaluate", run, "--data-dir", data).exit_code == 0
    assert cli("train", "--resume", run, "--set", "train.epochs=2", "--data-dir", data, "-q").exit_code == 0
    res = cli("train", cfg, "--set", f"model.hidden={[2] * (MAX_LAYERS + 1)}", "--data-dir", data)
    assert one_line(res.stderr).endswith(f": at most {MAX_LAYERS} hidden layers")


@pytest.mark.parametrize("sd", ["1e-200", "0", "-1", "nan", "inf"])
def test_a_prior_too_narrow_to_compute_is_refused(tiny_config, tmp_path, sd):
    res = cli("train", tiny_config(), "--set", f"train.prior_sd={sd}", "--data-dir", tmp_path / "d")
    assert "train.prior_sd = " in one_line(res.stderr)
    assert "must be a finite number of at least 1e-06 (the prior's standard deviation)" in res.stderr


def test_another_runs_checkpoint_copied_into_a_run_is_not_resumed(trained, tiny_config, tmp_path):
    _, run, data = trained
    run = copy_of(run, tmp_path)
    other = tmp_path / "other"
    assert cli("train", tiny_config(model={"seed": 7}, train={"learning_rate": 0.01, "epochs": 1}), "--run-dir",
               other, "--data-dir", data, "-q").exit_code == 0
    shutil.copy(other / "checkpoints" / "last.npz", run / "checkpoints" / "last.npz")
    before = (run / "metrics.jsonl").read_bytes()
    res = cli("train", "--resume", run, "--set", "train.epochs=3", "--data-dir", data, "-q")
    line = one_line(res.stderr)
    assert line.startswith(f"Error: {run / 'checkpoints' / 'last.npz'} is not this run's checkpoint: its config "
                           f"differs from {run / 'config.toml'} in ")
    assert "model.seed" in line
    assert (run / "metrics.jsonl").read_bytes() == before


def test_with_a_record_every_step_the_metrics_are_appended_and_checkpoints_do_not_grow(tiny_config, tmp_path):
    """log_every = 1 once rewrote the whole metrics file at every step and copied every
    step record into every checkpoint: the cost of a step grew with the run."""
    cfg = tiny_config(train={"epochs": 1, "log_every": 1})
    run, data = tmp_path / "run", tmp_path / "d"
    assert cli("train", cfg, "--run-dir", run, "--data-dir", data, "-q").exit_code == 0
    first_metrics, inode = (run / "metrics.jsonl").read_bytes(), (run / "metrics.jsonl").stat().st_ino
    first_size = (run / "checkpoints" / "last.npz").stat().st_size
    assert cli("train", "--resume", run, "--set", "train.epochs=4", "--data-dir", data, "-q").exit_code == 0
    metrics = (run / "metrics.jsonl").read_bytes()
    assert metrics.startswith(first_metrics)  # appended: not a byte of the first epoch's records rewritten
    assert (run / "metrics.jsonl").stat().st_ino == inode  # nor the file replaced by a rewritten copy
    added = metrics[len(first_metrics):].count(b'"kind": "step"')
    assert added >= 3 * first_metrics.count(b'"kind": "step"') > 0
    grown = (run / "checkpoints" / "last.npz").stat().st_size - first_size
    assert abs(grown) < 100 < len(metrics) - len(first_metrics)  # the step records are not in the checkpoint


# Third hostile round ---------------------------------------------------------------


def snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".lock"}


def test_a_resume_refused_for_another_runs_config_changes_no_file_of_the_run(trained, tmp_path):
    _, run, data = trained
    run = copy_of(run, tmp_path)
    config = run / "config.toml"
    config.write_text(config.read_text().replace("positive = [1, 3, 5, 7, 9]", "positive = [1, 3, 5, 7]"))
    before = snapshot(run)
    res = mlecli("train", "--resume", run, "--set", "train.epochs=3", "--data-dir", data, "-q")
    assert res.returncode == 1 and "is not this run's checkpoint" in one_line(res.stderr)
    assert snapshot(run) == before  # the manifest still says how the run ended: finished, not failed
    assert json.loads((run / "manifest.json").read_text())["ended"]["status"] == "finished"


@pytest.mark.parametrize("cut", [1, 40, "line"])
def test_a_metrics_file_cut_after_it_was_written_is_never_added_to(trained, tmp_path, cut):
    """A crash loses only records after the newest checkpoint; records it covers that are
    gone (a torn or deleted epoch record) are damage: resume, runs and plot say so."""
    _, run, data = trained
    run = copy_of(run, tmp_path)
    path = run / "metrics.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-1]) if cut == "line" else path.read_bytes()[:-cut])
    before = snapshot(run)
    res = mlecli("train", "--resume", run, "--set", "train.epochs=3", "--data-dir", data, "-q")
    assert one_line(res.stderr) == (
        f"Error: {path} ends at epoch 1's record, but {run / 'checkpoints' / 'last.npz'} has finished epoch 2: "
        "records of the run were lost after they were written (the file was cut or edited); restore the file, or "
        "move it away (a resumed run then records only what comes next)")
    assert snapshot(run) == before
    (row,) = json.loads(cli("runs", run.parent, "--json").output)
    assert row["status"] == "broken" and "ends at epoch 1's record" in row["problem"]
    res = mlecli("plot", run, "--data-dir", data, "--out", tmp_path / "p")
    assert "ends at epoch 1's record" in one_line(res.stderr)
    path.rename(run / "metrics.jsonl.kept")  # moved away: the run goes on, recording what comes next
    assert mlecli("train", "--resume", run, "--set", "train.epochs=3", "--data-dir", data, "-q").returncode == 0
    assert [json.loads(x)["epoch"] for x in path.read_text().splitlines() if '"epoch"' in x][-1] == 3


def test_a_damaged_metrics_line_stops_a_resume_before_it_writes_anything(trained, tmp_path):
    _, run, data = trained
    run = copy_of(run, tmp_path)
    with open(run / "metrics.jsonl", "a") as f:
        f.write("not json\n")
    n = len((run / "metrics.jsonl").read_text().splitlines())
    before = snapshot(run)
    res = mlecli("train", "--resume", run, "--set", "train.epochs=3", "--data-dir", data, "-q")
    assert one_line(res.stderr) == f"Error: {run}/metrics.jsonl, line {n}: not valid JSON; the file is damaged or not mlecli's"
    assert snapshot(run) == before


@given(st.lists(st.tuples(st.sampled_from(["drop", "twice", "swap"]), st.integers(0, 10**6), st.integers(0, 10**6)),
                min_size=1, max_size=4))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_lines_of_metrics_dropped_doubled_or_swapped_are_refused_or_leave_a_history_in_order(trained, ops):
    from mlecli.run.rundir import committed_epochs
    from mlecli.safe.schema import SchemaError

    _, run, _ = trained
    lines = (run / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    for op, i, j in ops:
        i, j = i % len(lines), j % len(lines)
        if op == "drop" and len(lines) > 1:
            del lines[i]
        elif op == "twice":
            lines.insert(i, lines[i])
        else:
            lines[i], lines[j] = lines[j], lines[i]
    last = ckpt.load(run / "checkpoints" / "last.npz")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "metrics.jsonl").write_bytes(b"".join(lines))
        try:
            epochs = committed_epochs(Path(tmp), last.meta, last.path)
        except (SchemaError, MlecliError):
            return
    assert [m["epoch"] for m in epochs] == list(range(epochs[0]["epoch"], 3))
    assert all(a["step"] < b["step"] for a, b in zip(epochs, epochs[1:]))


@pytest.mark.parametrize("steps", ["rising", "repeated"])
def test_runs_reads_a_metrics_file_of_300000_records_in_bounded_memory(trained, tmp_path, steps):
    """Every line is checked, only the epoch records are held: 300,000 step records (after
    the checkpoint, as a crash would leave them, or one record repeated: damage) cost no
    more memory than a few."""
    _, run, _ = trained
    run = copy_of(run, tmp_path)
    text = (run / "metrics.jsonl").read_text()
    record = json.loads(next(x for x in text.splitlines() if '"kind": "step"' in x))
    first = 1000 if steps == "rising" else record["step"]
    with open(run / "metrics.jsonl", "w" if steps == "repeated" else "a") as f:
        f.writelines(json.dumps({**record, "step": first + (i if steps == "rising" else 0)}) + "\n"
                     for i in range(300_000))
    probe = ("import resource, subprocess, sys; r = subprocess.run([sys.executable, '-m', 'mlecli', 'runs', sys.argv[1], "
             "'--json'], capture_output=True, text=True); print(r.stdout); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", probe, str(run.parent)], capture_output=True, text=True,
                         timeout=300).stdout.splitlines()
    (row,) = json.loads("\n".join(out[:-2]))
    if steps == "rising":
        assert row["status"] == "finished" and row["epochs_done"] == 2
    else:
        assert row["status"] == "broken" and "line 2: a record of epoch 1" in row["problem"]
    assert int(out[-1]) < 150_000  # KiB; held as dicts, 300,000 records would take about 500 MB


def test_a_resume_may_set_a_key_to_the_value_it_has(trained, tmp_path):
    _, run, data = trained
    run = copy_of(run, tmp_path)
    res = mlecli("train", "--resume", run, "--set", "train.learning_rate=0.05", "--set", "train.batch_size=16",
                 "--set", "train.epochs=3", "--data-dir", data, "-q")
    assert res.returncode == 0, res.stderr
    res = mlecli("train", "--resume", run, "--set", "train.batch_size=32", "--data-dir", data, "-q")
    assert one_line(res.stderr).startswith("Error: --set train.batch_size cannot change when resuming")


def test_a_pipe_in_place_of_a_checkpoint_is_named_as_such(trained, tmp_path):
    _, run, data = trained
    run = copy_of(run, tmp_path)
    (run / "checkpoints" / "best.npz").unlink()
    os.mkfifo(run / "checkpoints" / "best.npz")
    res = mlecli("evaluate", run, "--data-dir", data)
    assert one_line(res.stderr) == (f"Error: {run / 'checkpoints' / 'best.npz'} is not a regular file (a folder, "
                                    "device or pipe): put the run's checkpoint back, or name another with --checkpoint")


def test_a_run_whose_checkpoints_cannot_fit_on_its_disk_is_refused_before_it_starts(tiny_config, tmp_path,
                                                                                       monkeypatch):
    from mlecli.run import train as training
    from mlecli.safe import resources

    size = resources.checkpoint_bytes((4,), "float32", 28 * 28, 0)
    monkeypatch.setattr(training, "free_space", lambda folder: 8 * size)  # room for 6 epoch checkpoints
    cfg = tiny_config(model={"hidden": [4]}, train={"epochs": 12})
    res = CliRunner().invoke(main, ["train", str(cfg), "--run-dir", str(tmp_path / "r"), "--data-dir",
                                    str(tmp_path / "d"), "-q"])
    assert res.exit_code == 1 and res.output.startswith(
        "Error: train.epochs = 12 with train.checkpoint_every = 1 keeps 12 more epoch checkpoints of about ")
    assert "raise train.checkpoint_every" in res.output and not (tmp_path / "r").exists()
    assert CliRunner().invoke(main, ["train", str(cfg), "--run-dir", str(tmp_path / "r"), "--data-dir",
                                     str(tmp_path / "d"), "-q", "--set", "train.checkpoint_every=2"]).exit_code == 0
    assert len(list((tmp_path / "r" / "checkpoints").glob("epoch-*.npz"))) == 6
    res = CliRunner().invoke(main, ["train", "--resume", str(tmp_path / "r"), "--data-dir", str(tmp_path / "d"),
                                    "-q", "--set", "train.epochs=30"])  # 9 more: too many
    assert res.exit_code == 1 and "keeps 9 more epoch checkpoints" in res.output


@pytest.mark.parametrize("name", ["my run", "a;$(touch PWNED)", "it's", "*"])
def test_the_commands_training_prints_paste_back_into_a_shell_as_the_same_folder(tiny_config, tmp_path, name):
    import shlex

    run = tmp_path / name
    cfg = tiny_config(train={"epochs": 1}, model={"hidden": [4]})
    res = cli("train", cfg, "--run-dir", run, "--data-dir", tmp_path / "d")
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()[-2:]
    assert [shlex.split(x.split(":", 1)[1]) for x in lines] == [["mlecli", "evaluate", str(run)],
                                                                ["mlecli", "plot", str(run)]]
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("threshold", ["0.999999999", "1e-300", "0.5", "0.25"])
def test_evaluate_shows_the_threshold_as_given(trained, tmp_path, threshold):
    _, run, data = trained
    run = copy_of(run, tmp_path)
    res = cli("evaluate", run, "--data-dir", data, "--threshold", threshold)
    assert res.exit_code == 0
    assert f" at ŷ ≥ {float(threshold)!r} " in res.output


def test_epochs_edited_in_config_toml_are_used_by_a_resume(tiny_config, tmp_path):
    """A hand edit of a key a resume may change was silently thrown away (config.toml was
    written back from the checkpoint); now it is used, and said, as a --set of it would be."""
    cfg, data = tiny_config(train={"epochs": 1}, model={"hidden": [4]}), tmp_path / "d"
    assert cli("train", cfg, "--run-dir", tmp_path / "run", "--data-dir", data, "-q").exit_code == 0
    config = tmp_path / "run" / "config.toml"
    config.write_text(config.read_text().replace("epochs = 1\n", "epochs = 3\n"))
    res = mlecli("train", "--resume", tmp_path / "run", "--data-dir", data)
    assert res.returncode == 0, res.stderr
    assert f"{config} sets train.epochs=3: used for this resume" in res.stderr.splitlines()
    assert cli("train", cfg, "--run-dir", tmp_path / "whole", "--data-dir", data, "-q", "--set",
               "train.epochs=3").exit_code == 0
    for name in ("last.npz", "best.npz", "epoch-0003.npz"):
        assert (tmp_path / "run" / "checkpoints" / name).read_bytes() == \
            (tmp_path / "whole" / "checkpoints" / name).read_bytes()
    res = mlecli("train", "--resume", tmp_path / "run", "--set", "train.epochs=4", "--data-dir", data)
    assert res.returncode == 0 and "used for this resume" not in res.stderr  # config.toml says 3 = the checkpoint


@pytest.mark.parametrize("wrapped", [True, False])
def test_a_ctrl_c_a_library_wraps_in_its_own_error_is_a_stop_not_a_traceback(wrapped):
    """matplotlib's import turns a Ctrl-C into a RuntimeError ('Error calling __set_name__')."""
    import click

    from mlecli.cli import Group

    @click.group(cls=Group)
    def tool():
        pass

    @tool.command()
    def work():
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as exc:
            if wrapped:
                raise RuntimeError("Error calling __set_name__ on '_axis_method_wrapper'") from exc
            raise ValueError("a bug of ours") from None

    res = CliRunner().invoke(tool, ["work"])
    if wrapped:
        assert res.exit_code == 130 and res.output == (
            "Stopped by SIGINT: what was done so far is kept, nothing is half-written.\n")
    else:
        assert isinstance(res.exception, ValueError)  # a bug is not hidden as a stop
