"""A crash at every write boundary of a training run resumes into exactly the files of
an uninterrupted run (tests/crash.py enumerates the boundaries)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from crash import CRASHED

from mlecli.cli import main
from mlecli.run import checkpoint as ckpt
from mlecli.safe.files import TMP_SUFFIX

CRASH = Path(__file__).with_name("crash.py")
TIMING = ("seconds", "images_per_s")


def crash_at(n: int, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CRASH), str(n), *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(CRASH.parent)}, timeout=120)


def files(run: Path) -> dict[str, bytes]:
    """Every file of a run that must come out the same, manifest and lock aside."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and p.name not in ("manifest.json", ".lock", "metrics.jsonl")}


def records(run: Path) -> list[dict]:
    """metrics.jsonl without its wall-clock figures."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING} for x in lines]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny, tiny_folder):
    root = tmp_path_factory.mktemp("crashpoints")
    cfg = tiny.write_config(root / "c.toml", tiny_folder, "validation = 0.2\n[model]\nhidden = [4]\n"
                            "[train]\nepochs = 3\nbatch_size = 64\ncheckpoint_every = 2\nlog_every = 2\n")
    data = root / "data"
    whole = root / "whole"
    res = CliRunner().invoke(main, ["train", str(cfg), "--run-dir", str(whole), "--data-dir", str(data), "-q"])
    assert res.exit_code == 0, res.output
    return cfg, data, whole


def test_a_crash_at_every_write_boundary_of_training_resumes_into_identical_files(setup, tmp_path):
    cfg, data, whole = setup
    want_files, want_records = files(whole), records(whole)
    assert set(want_files) == {"config.toml", "checkpoints/last.npz", "checkpoints/best.npz",
                               "checkpoints/epoch-0002.npz", "checkpoints/epoch-0003.npz"}
    n = 0
    while True:
        n += 1
        run = tmp_path / f"crash-{n}"
        res = crash_at(n, "train", cfg, "--run-dir", run, "--data-dir", data, "-q")
        if res.returncode == 0:
            break  # the whole run passed fewer than n boundaries: every one was tried
        assert res.returncode == CRASHED, res.stderr
        started = (run / "checkpoints" / "last.npz").exists()
        if started:
            ckpt.load(run / "checkpoints" / "last.npz")  # the commit record always loads
            args = ["train", "--resume", str(run)]
        else:  # died before its first checkpoint: the same command starts it again
            args = ["train", str(cfg), "--run-dir", str(run)]
        res = CliRunner().invoke(main, [*args, "--data-dir", str(data), "-q"])
        assert res.exit_code == 0, f"crash at boundary {n}: {res.output}"
        assert files(run) == want_files, f"crash at boundary {n}"
        assert records(run) == want_records, f"crash at boundary {n}"
        assert not [p for p in run.rglob("*") if p.name.endswith(TMP_SUFFIX)], f"crash at boundary {n}"
        manifest = json.loads((run / "manifest.json").read_text())
        assert manifest["ended"]["status"] == "finished", f"crash at boundary {n}"
    assert n > 30  # the run has that many boundaries: the enumeration really ran
    print(f"\n{n - 1} crash points of a 3-epoch run enumerated")


def test_a_crash_at_every_boundary_of_a_resume_resumes_again(setup, tmp_path):
    """A crash while a resumed run repairs and goes on is one more crash like any other."""
    cfg, data, whole = setup
    half = tmp_path / "half"
    res = CliRunner().invoke(main, ["train", str(cfg), "--run-dir", str(half), "--data-dir", str(data), "-q",
                                    "--set", "train.epochs=1"])
    assert res.exit_code == 0
    n = 0
    while True:
        n += 1
        run = tmp_path / f"crash-{n}"
        subprocess.run(["cp", "-a", str(half), str(run)], check=True)
        res = crash_at(n, "train", "--resume", run, "--set", "train.epochs=3", "--data-dir", data, "-q")
        if res.returncode == 0:
            break
        assert res.returncode == CRASHED, res.stderr
        res = CliRunner().invoke(main, ["train", "--resume", str(run), "--set", "train.epochs=3", "--data-dir",
                                        str(data), "-q"])
        assert res.exit_code == 0, f"crash at boundary {n}: {res.output}"
        got = files(run)
        # config.toml says epochs = 3 in both; epoch-0001 exists only in the run that ended there first
        assert got.pop("checkpoints/epoch-0001.npz")
        assert got == files(whole), f"crash at boundary {n}"
        assert records(run) == records(whole), f"crash at boundary {n}"
    assert n > 15
    print(f"\n{n - 1} crash points of a resume enumerated")


def test_a_stop_at_every_batch_resumes_into_identical_files(tiny_config, tmp_path, monkeypatch):
    """Ctrl-C after each batch of a run in turn (log records and measurements fall between
    them): the resumed run's files are those of a run never stopped, sums included."""
    import os
    import signal

    from mlecli.run import train as training

    cfg = tiny_config(train={"epochs": 2, "batch_size": 32, "log_every": 3, "optimizer": "momentum"},
                      model={"hidden": [4], "dtype": "float64"})
    data = tmp_path / "d"
    whole = tmp_path / "whole"
    assert CliRunner().invoke(main, ["train", str(cfg), "--run-dir", str(whole), "--data-dir", str(data),
                                     "-q"]).exit_code == 0
    want_files, want_records = files(whole), records(whole)
    steps = records(whole)[-1]["step"]
    real = training.train_step
    for stop_after in range(1, steps):
        calls = {"n": 0}

        def step_then_stop(*args, stop_after=stop_after, calls=calls):
            calls["n"] += 1
            real(*args)
            if calls["n"] == stop_after:
                os.kill(os.getpid(), signal.SIGINT)

        run = tmp_path / f"stop-{stop_after}"
        monkeypatch.setattr(training, "train_step", step_then_stop)
        res = CliRunner().invoke(main, ["train", str(cfg), "--run-dir", str(run), "--data-dir", str(data), "-q"])
        assert res.exit_code in (0, 130), res.output  # 0: the stop came with the run's last batch
        monkeypatch.setattr(training, "train_step", real)
        res = CliRunner().invoke(main, ["train", "--resume", str(run), "--data-dir", str(data), "-q"])
        assert res.exit_code == 0, res.output
        assert files(run) == want_files, f"stopped after step {stop_after}"
        assert records(run) == want_records, f"stopped after step {stop_after}"
