"""The run folder as shared ground: races for it, signals in quick succession, a closed
standard output, and runs written by the previous checkpoint format."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from click.testing import CliRunner
from fakes import array_bytes as weights
from fakes import mlecli_process as mlecli
from fakes import rewrite_npz, trickle, wait_for

from mlecli.cli import main
from mlecli.data.cache import dataset_dir
from mlecli.run import checkpoint as ckpt

# ---------------------------------------------------------------------------
# Races


def test_of_several_trainings_started_on_one_folder_exactly_one_trains_it(tiny_config, tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    configs = [tiny_config(f"c{i}", model={"hidden": [4 + i]}, train={"epochs": 2}) for i in range(4)]
    assert CliRunner().invoke(main, ["download", "--config", str(configs[0]), "--data-dir", str(data), "-q"]).exit_code == 0
    procs = [mlecli("train", c, "--run-dir", run, "--data-dir", data, "-q") for c in configs]
    results = [(p.wait(timeout=120), p.stderr.read().decode()) for p in procs]
    winners = [i for i, (code, _) in enumerate(results) if code == 0]
    assert len(winners) == 1, results
    for i, (code, err) in enumerate(results):
        if i != winners[0]:
            assert code == 1 and err.count("\n") == 1, err
            assert err.startswith((f"Error: run folder {run} already exists and is not empty",
                                   f"Error: run folder {run} is in use by another mlecli process")), err
    # Everything in the folder is the winner's: its config, and checkpoints of its network.
    hidden = 4 + winners[0]
    assert f"hidden = [{hidden}]" in (run / "config.toml").read_text()
    for p in ckpt.checkpoints_in(run):
        assert ckpt.load(p).config.model.hidden == (hidden,)


def test_a_training_whose_download_is_slow_cannot_take_a_folder_another_started_in_meanwhile(
        tiny, tiny_config, mirrors, tmp_path):
    server = mirrors(tiny.gz_files(), behave=lambda h, name, data, n: data and trickle(h, data, 2048, 0.01))
    slow_cfg = tiny.write_config(tmp_path / "slow.toml", server.url, "[model]\nhidden = [3]\n")
    data, run = tmp_path / "data", tmp_path / "run"
    slow = mlecli("train", slow_cfg, "--run-dir", run, "--data-dir", tmp_path / "slow-data", "-q")
    wait_for(dataset_dir(tiny.spec(()), tmp_path / "slow-data"), slow)  # it is downloading, the folder not yet claimed
    fast = CliRunner().invoke(main, ["train", str(tiny_config(train={"epochs": 2})), "--run-dir", str(run),
                                     "--data-dir", str(data), "-q"])
    assert fast.exit_code == 0, fast.output
    assert slow.wait(timeout=120) == 1
    assert slow.stderr.read().decode().splitlines()[-1].startswith((
        f"Error: run folder {run} already exists and is not empty",
        f"Error: run folder {run} is in use by another mlecli process"))
    assert {ckpt.load(p).config.model.hidden for p in ckpt.checkpoints_in(run)} == {(16,)}  # the fast run's only
    assert "hidden = [16]" in (run / "config.toml").read_text()


def test_trainings_started_together_without_a_run_dir_each_get_their_own_folder(tiny_config, tmp_path):
    cfg, data = tiny_config(train={"epochs": 1}), tmp_path / "data"
    assert CliRunner().invoke(main, ["download", "--config", str(cfg), "--data-dir", str(data), "-q"]).exit_code == 0
    procs = [mlecli("train", cfg, "--data-dir", data, "-q", cwd=tmp_path) for _ in range(4)]
    assert [p.wait(timeout=120) for p in procs] == [0] * 4
    folders = sorted((tmp_path / "runs").iterdir())
    assert len(folders) == 4
    for f in folders:
        assert ckpt.load(f / "checkpoints" / "last.npz").epoch == 1


# ---------------------------------------------------------------------------
# Signals and a closed standard output


def test_two_signals_in_quick_succession_stop_at_once_and_still_say_how_to_resume(tiny_config, tmp_path):
    cfg = tiny_config(train={"epochs": 40, "batch_size": 1}, model={"hidden": [8]})
    data = tmp_path / "data"
    assert CliRunner().invoke(main, ["train", str(cfg), "--run-dir", str(tmp_path / "whole"), "--data-dir",
                                     str(data), "-q"]).exit_code == 0
    gaps = random.Random(20261127)
    for i, (first, second) in enumerate([(signal.SIGTERM, signal.SIGTERM), (signal.SIGTERM, signal.SIGINT),
                                         (signal.SIGINT, signal.SIGINT), (signal.SIGINT, signal.SIGTERM)] * 2):
        run = tmp_path / f"run-{i}"
        proc = mlecli("train", cfg, "--run-dir", run, "--data-dir", data, "-q")
        wait_for(run / "checkpoints" / "epoch-0001.npz", proc)
        proc.send_signal(first)
        time.sleep(gaps.uniform(0, 0.02))
        if proc.poll() is None:
            proc.send_signal(second)
        assert proc.wait(timeout=60) == 130
        err = proc.stderr.read().decode()
        assert err.endswith(f" Resume with: mlecli train --resume {run}\n"), err
        assert err.startswith("Stopped"), err
        res = CliRunner().invoke(main, ["train", "--resume", str(run), "--data-dir", str(data), "-q"])
        assert res.exit_code == 0, res.output
        assert weights(run / "checkpoints" / "last.npz") == weights(tmp_path / "whole" / "checkpoints" / "last.npz")


def test_training_goes_on_when_its_standard_output_is_closed(tiny_config, tmp_path):
    cfg = tiny_config(train={"epochs": 6})
    run = tmp_path / "run"
    proc = mlecli("train", cfg, "--run-dir", run, "--data-dir", tmp_path / "data")  # like `mlecli train | head -1`
    first = proc.stdout.readline().decode()
    proc.stdout.close()
    assert proc.wait(timeout=120) == 0
    assert first.startswith("epoch 1/6  train LL")
    assert "note: standard output was closed; training goes on" in proc.stderr.read().decode()
    assert ckpt.load(run / "checkpoints" / "last.npz").epoch == 6


def test_quiet_training_prints_nothing(tiny_config, tmp_path):
    res = CliRunner().invoke(main, ["train", str(tiny_config()), "--run-dir", str(tmp_path / "r"), "--data-dir",
                                    str(tmp_path / "d"), "-q"])
    assert res.exit_code == 0
    assert res.stdout == "" and res.stderr == ""


# ---------------------------------------------------------------------------
# The previous checkpoint format (mlecli 0.1)


def as_format_1(run: Path) -> None:
    """Turn a run's checkpoints into what mlecli 0.1 wrote: the metrics history inside each,
    a `saved` time, a best record without figures."""
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for p in ckpt.checkpoints_in(run):
        meta = ckpt.load(p).meta
        epoch = meta["epochs_done"]
        best = {k: meta["best"][k] for k in ("epoch", "key", "value")}
        rewrite_npz(p, meta={"format": 1, "metrics": [m for m in lines if m["epoch"] <= epoch], "best": best,
                             "saved": "2026-11-01T00:00:00+00:00"})


def test_a_run_of_checkpoint_format_1_is_evaluated_and_resumed_as_it_was(tiny_config, tmp_path):
    data = tmp_path / "data"
    cfg = tiny_config(train={"epochs": 2})
    old = tmp_path / "old"
    assert CliRunner().invoke(main, ["train", str(cfg), "--run-dir", str(old), "--data-dir", str(data), "-q"]).exit_code == 0
    as_format_1(old)
    assert ckpt.load(old / "checkpoints" / "last.npz").format == 1
    res = CliRunner().invoke(main, ["evaluate", str(old), "--data-dir", str(data), "--json"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["train", "--resume", str(old), "--set", "train.epochs=4", "--data-dir", str(data),
                                    "-q"])
    assert res.exit_code == 0, res.output
    longer = tmp_path / "longer"
    assert CliRunner().invoke(main, ["train", str(tiny_config(train={"epochs": 4})), "--run-dir", str(longer),
                                     "--data-dir", str(data), "-q"]).exit_code == 0
    assert weights(old / "checkpoints" / "last.npz") == weights(longer / "checkpoints" / "last.npz")
    assert ckpt.load(old / "checkpoints" / "last.npz").format == 2
    assert [json.loads(x)["epoch"] for x in (old / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


# ---------------------------------------------------------------------------
# What a run remembers


def test_a_run_remembers_its_data_folder_for_evaluate_plot_and_resume(tiny_config, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    monkeypatch.setenv("MLECLI_DATA_DIR", str(elsewhere))
    run = tmp_path / "run"
    cfg = tiny_config(train={"epochs": 1})
    assert CliRunner().invoke(main, ["train", str(cfg), "--run-dir", str(run), "-q"]).exit_code == 0
    monkeypatch.delenv("MLECLI_DATA_DIR")
    monkeypatch.chdir(tmp_path)  # where ./data does not exist
    for args in (["evaluate", str(run)], ["evaluate", str(run / "checkpoints" / "last.npz")],
                 ["train", "--resume", str(run), "--set", "train.epochs=2", "-q"]):
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 0, res.output
        assert "not cached" not in res.stderr
    assert not (tmp_path / "data").exists()
    # --data-dir still decides: from an empty one, evaluate says how to fetch the data (it never
    # downloads from a URL that a run names)
    res = CliRunner().invoke(main, ["evaluate", str(run), "--data-dir", str(tmp_path / "other")])
    assert res.exit_code == 1
    assert res.stderr.endswith(f"fetch it with: mlecli download --config {run / 'config.toml'} --data-dir "
                               f"{tmp_path / 'other'}\n")


def test_a_resume_with_another_blas_says_the_bits_may_differ_and_goes_on(tiny_config, tmp_path):
    run, data = tmp_path / "run", tmp_path / "data"
    assert CliRunner().invoke(main, ["train", str(tiny_config(train={"epochs": 1})), "--run-dir", str(run),
                                     "--data-dir", str(data), "-q"]).exit_code == 0
    trained_with = ckpt.load(run / "checkpoints" / "last.npz").meta["blas"]["backend"]
    assert json.loads((run / "manifest.json").read_text())["blas"]["backend"] == trained_with
    env = {**os.environ, "MLECLI_BLAS": "numpy"}
    res = subprocess.run([sys.executable, "-m", "mlecli", "train", "--resume", str(run), "--set", "train.epochs=2",
                          "--data-dir", str(data)], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    if trained_with != "numpy.matmul (fallback)":
        assert (f"warning: {run / 'checkpoints' / 'last.npz'} was trained with the BLAS {trained_with} on 1 threads, "
                "this process uses numpy.matmul (fallback) on 1: the resumed weights may differ in their last "
                "bits") in res.stderr
    assert ckpt.load(run / "checkpoints" / "last.npz").meta["blas"]["backend"] == "numpy.matmul (fallback)"


def test_training_in_process_leaves_the_signal_handlers_as_it_found_them(tiny_config, tmp_path):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    res = CliRunner().invoke(main, ["train", str(tiny_config(train={"epochs": 1})), "--run-dir", str(tmp_path / "r"),
                                    "--data-dir", str(tmp_path / "d"), "-q"])
    assert res.exit_code == 0
    assert {s: signal.getsignal(s) for s in before} == before


def test_a_signal_while_the_data_is_fetched_stops_before_any_run_is_written(tiny, mirrors, tmp_path):
    server = mirrors(tiny.gz_files(), behave=lambda h, name, data, n: data and trickle(h, data, 1024, 0.02))
    cfg = tiny.write_config(tmp_path / "slow.toml", server.url)
    run = tmp_path / "run"
    for sig in (signal.SIGINT, signal.SIGTERM):
        proc = mlecli("train", cfg, "--run-dir", run, "--data-dir", tmp_path / "data", "-q")
        deadline = time.monotonic() + 30
        while not server.requests:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == 130
        assert proc.stderr.read().decode() == (
            f"Stopped by {sig.name} before training began: no run was written.\n")
        assert not run.exists()
        server.requests.clear()


def test_a_folders_lock_is_seen_held_with_its_holder_only_while_it_is_held(tmp_path):
    from mlecli.safe.locks import Holder, folder_lock, holder_of, is_locked

    folder = tmp_path / "f"
    assert (is_locked(folder), holder_of(folder)) == (False, None)  # no folder, no lock file
    with folder_lock(folder, wait=False, what="f"):
        assert is_locked(folder) is True
        assert holder_of(folder) in (Holder(os.getpid(), False), Holder(None, False))  # None: /proc/locks hidden
    assert (folder / ".lock").exists()
    assert (is_locked(folder), holder_of(folder)) == (False, None)


def test_a_lock_removed_by_its_holder_is_taken_anew_by_whoever_waited(tmp_path):
    import threading

    from mlecli.safe.locks import folder_lock

    folder = tmp_path / "f"
    got = {}
    with folder_lock(folder, wait=True, what="f") as held:
        def waiter():
            with folder_lock(folder, wait=True, what="f"):
                got["lock"] = (folder / ".lock").exists()

        t = threading.Thread(target=waiter)
        t.start()
        time.sleep(0.2)  # the waiter now blocks on the lock file about to be removed
        held.discard()
        assert not folder.exists()
    t.join(timeout=10)
    assert got["lock"] is True  # it holds the folder's lock as the folder is now
    assert folder.is_dir()


def test_clearing_an_unstarted_run_never_deletes_through_a_linked_checkpoints_folder(tmp_path):
    from mlecli.run import rundir

    victim = tmp_path / "victim"
    victim.mkdir()
    names = [".notes.tmp", ".x.1.tmp", ".a.4026531836-999999.abcdefgh.tmp", "thesis.tex"]
    for name in names:
        (victim / name).write_text("mine")
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").symlink_to(victim)
    rundir._remove_unstarted(run, created=False)
    assert sorted(p.name for p in victim.iterdir()) == sorted(names)
