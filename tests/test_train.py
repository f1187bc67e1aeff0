"""`mlecli train`: learning, the run folder, determinism, interruption and exact resume."""

import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from fakes import kill_once, mlecli_process, tiny_dataset

from mlecli.cli import main
from mlecli.run import checkpoint as ckpt
from mlecli.run import train as training
from mlecli.run.config import load


def train_cli(*args, data_dir):
    return CliRunner().invoke(main, ["train", *map(str, args), "--data-dir", str(data_dir)])


def weights(run_dir: Path, name="last.npz"):
    with np.load(run_dir / "checkpoints" / name, allow_pickle=False) as z:
        return {k: z[k] for k in z.files if k != "meta"}


def assert_bit_identical(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_training_raises_the_likelihood_and_reaches_high_accuracy(tiny_config, tmp_path):
    res = train_cli(tiny_config(), "--run-dir", tmp_path / "run", data_dir=tmp_path / "d")
    assert res.exit_code == 0, res.output
    epochs = metrics(tmp_path / "run")
    assert [m["epoch"] for m in epochs] == [1, 2, 3, 4]
    assert epochs[-1]["train_ll_mean"] > epochs[0]["train_ll_mean"]
    assert epochs[-1]["val_ll_mean"] > epochs[0]["val_ll_mean"]
    assert epochs[-1]["train_acc"] > 0.95 and epochs[-1]["val_acc"] > 0.95


def test_the_run_folder_holds_what_design_md_says(tiny_config, tmp_path):
    cfg_path = tiny_config(train={"checkpoint_every": 2, "epochs": 5})
    run = tmp_path / "run"
    res = train_cli(cfg_path, "--run-dir", run, data_dir=tmp_path / "d")
    assert res.exit_code == 0, res.output
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["best.npz", "epoch-0002.npz", "epoch-0004.npz", "epoch-0005.npz", "last.npz"]
    assert load(run / "config.toml") == load(cfg_path).__class__(**{**load(cfg_path).__dict__, "name": "tiny-run"})
    manifest = json.loads((run / "manifest.json").read_text())
    assert set(manifest) >= {"mlecli", "numpy", "python", "dataset", "dataset_sha256", "model_seed", "train_seed", "started"}
    assert manifest["dataset_sha256"]["train-images"] == load(cfg_path).data.sha256["train-images"]
    lines = metrics(run)
    assert set(lines[0]) == {
        "kind", "epoch", "step", "lr", "train_ll", "train_ll_mean", "train_acc", "log_prior", "log_posterior",
        "val_ll_mean", "val_acc", "seconds", "images_per_s",
    }
    assert lines[0]["lr"] == 0.05 and lines[0]["log_prior"] is None and lines[0]["log_posterior"] is None
    assert lines[0]["step"] == 15  # 240 training images in batches of 16
    assert lines[0]["train_ll"] == pytest.approx(lines[0]["train_ll_mean"] * 240)
    best_epoch = max(lines, key=lambda m: m["val_ll_mean"])["epoch"]
    best = ckpt.load(run / "checkpoints" / "best.npz")
    assert best.epoch == best_epoch
    last = ckpt.load(run / "checkpoints" / "last.npz")
    assert last.epoch == 5 and last.meta["step"] == 75 and last.meta["format"] == 2
    assert "metrics" not in last.meta  # the history lives in metrics.jsonl only
    assert last.meta["best"]["record"] == {k: v for k, v in lines[best_epoch - 1].items()
                                           if k not in ("seconds", "images_per_s")}
    # epoch-N.npz and best.npz are byte copies of last.npz as it was at their epoch
    assert (run / "checkpoints" / "epoch-0005.npz").read_bytes() == (run / "checkpoints" / "last.npz").read_bytes()
    assert res.stdout.splitlines()[0].startswith("epoch 1/5  train LL -")
    assert res.stdout.splitlines()[-2:] == [f"evaluate: mlecli evaluate {run}", f"plot:     mlecli plot {run}"]


def test_same_config_and_seeds_give_bit_identical_weights(tiny_config, tmp_path):
    cfg = tiny_config(model={"hidden": [8, 6, 4]})
    for name in ("a", "b"):
        assert train_cli(cfg, "--run-dir", tmp_path / name, data_dir=tmp_path / "d").exit_code == 0
    assert_bit_identical(weights(tmp_path / "a"), weights(tmp_path / "b"))
    assert_bit_identical(weights(tmp_path / "a", "best.npz"), weights(tmp_path / "b", "best.npz"))
    assert train_cli(cfg, "--run-dir", tmp_path / "c", "--set", "train.seed=3", data_dir=tmp_path / "d").exit_code == 0
    assert not np.array_equal(weights(tmp_path / "a")["W1"], weights(tmp_path / "c")["W1"])


def test_float64_models_train_too(tiny_config, tmp_path):
    res = train_cli(tiny_config(model={"dtype": "float64", "hidden": []}), "--run-dir", tmp_path / "r", data_dir=tmp_path)
    assert res.exit_code == 0, res.output
    assert weights(tmp_path / "r")["W1"].dtype == np.float64


def test_ctrl_c_mid_epoch_saves_and_resume_is_bit_identical(tiny_config, tmp_path, monkeypatch):
    cfg = tiny_config(model={"hidden": [8, 4]})
    assert train_cli(cfg, "--run-dir", tmp_path / "whole", data_dir=tmp_path / "d").exit_code == 0

    real_step = training.train_step
    calls = {"n": 0}

    def step_then_ctrl_c(*args):
        calls["n"] += 1
        if calls["n"] == 20:  # epoch 2, batch 5 of 15
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(*args)

    monkeypatch.setattr(training, "train_step", step_then_ctrl_c)
    run = tmp_path / "cut"
    res = train_cli(cfg, "--run-dir", run, data_dir=tmp_path / "d")
    assert res.exit_code == 130
    assert res.stderr.endswith(
        f"Stopped by SIGINT: saved {run / 'checkpoints' / 'last.npz'}. Resume with: mlecli train --resume {run}\n"
    )
    saved = ckpt.load(run / "checkpoints" / "last.npz")
    assert (saved.epoch, saved.meta["batch_in_epoch"], saved.meta["step"]) == (1, 5, 20)
    monkeypatch.setattr(training, "train_step", real_step)

    res = CliRunner().invoke(main, ["train", "--resume", str(run), "--data-dir", str(tmp_path / "d")])
    assert res.exit_code == 0, res.output
    assert "resuming" in res.stderr
    assert_bit_identical(weights(tmp_path / "whole"), weights(run))
    assert_bit_identical(weights(tmp_path / "whole", "best.npz"), weights(run, "best.npz"))
    assert [m["epoch"] for m in metrics(run)] == [1, 2, 3, 4]
    whole, cut = metrics(tmp_path / "whole"), metrics(run)
    # the stop kept the logits it had not measured yet: the epoch's LL is summed as in the whole run
    assert [m["train_ll"] for m in cut] == [m["train_ll"] for m in whole]
    assert [m["train_acc"] for m in cut] == [m["train_acc"] for m in whole]
    for name in ("last.npz", "best.npz", "epoch-0002.npz", "epoch-0004.npz"):
        assert (run / "checkpoints" / name).read_bytes() == (tmp_path / "whole" / "checkpoints" / name).read_bytes()


def test_a_killed_process_resumes_from_its_newest_checkpoint_bit_identical(tiny_config, tmp_path):
    cfg = tiny_config(train={"epochs": 40, "batch_size": 1}, model={"hidden": [8]})
    data = tmp_path / "d"
    assert train_cli(cfg, "--run-dir", tmp_path / "whole", data_dir=data).exit_code == 0
    run = tmp_path / "killed"
    kill_once(run / "checkpoints" / "epoch-0002.npz", mlecli_process("train", cfg, "--run-dir", run, "--data-dir", data))
    done = ckpt.load(run / "checkpoints" / "last.npz").epoch
    assert 2 <= done < 40
    res = CliRunner().invoke(main, ["train", "--resume", str(run), "--data-dir", str(data), "-q"])
    assert res.exit_code == 0, res.output
    assert_bit_identical(weights(tmp_path / "whole"), weights(run))
    assert [m["epoch"] for m in metrics(run)] == list(range(1, 41))


def test_resume_can_extend_the_epochs_and_nothing_else(tiny_config, tmp_path):
    data = tmp_path / "d"
    cfg = tiny_config(train={"epochs": 2})
    assert train_cli(cfg, "--run-dir", tmp_path / "short", data_dir=data).exit_code == 0
    res = CliRunner().invoke(
        main, ["train", "--resume", str(tmp_path / "short"), "--set", "train.epochs=4", "--data-dir", str(data)]
    )
    assert res.exit_code == 0, res.output
    assert train_cli(tiny_config(train={"epochs": 4}), "--run-dir", tmp_path / "long", data_dir=data).exit_code == 0
    assert_bit_identical(weights(tmp_path / "short"), weights(tmp_path / "long"))
    res = CliRunner().invoke(main, ["train", "--resume", str(tmp_path / "short"), "--set", "model.hidden=[3]"])
    assert res.exit_code == 1
    assert res.stderr == (
        "Error: --set model.hidden cannot change when resuming (it would change the weights already trained); "
        "allowed: train.checkpoint_every, train.epochs, train.log_every\n"
    )


def test_resume_on_data_whose_hashes_differ_is_refused_naming_the_file(tmp_path):
    first, second = tiny_dataset(seed=0), tiny_dataset(seed=5)
    mirror = first.write_folder(tmp_path / "mirror")
    cfg = tmp_path / "u.toml"  # an unverified custom dataset (no sha256) that changes between the runs
    cfg.write_text(f'[data]\ndataset = "unpinned"\nurl = "{mirror}"\n[model]\nhidden = [4]\n[train]\nepochs = 1\n')
    run, data = tmp_path / "run", tmp_path / "data"
    assert train_cli(cfg, "--run-dir", run, "-q", data_dir=data).exit_code == 0
    second.write_folder(mirror)
    shutil.rmtree(data)
    before = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    # A resumed run never fetches from the URL its folder names: it says how to, deliberately.
    res = CliRunner().invoke(main, ["train", "--resume", str(run), "--set", "train.epochs=2", "--data-dir", str(data)])
    assert res.exit_code == 1
    fetch = f"mlecli download --config {run / 'config.toml'} --data-dir {data}"
    assert res.stderr.splitlines()[-1].endswith(fetch)
    assert CliRunner().invoke(main, fetch.split()[1:]).exit_code == 0
    res = CliRunner().invoke(main, ["train", "--resume", str(run), "--set", "train.epochs=2", "--data-dir", str(data)])
    assert res.exit_code == 1
    last = res.stderr.splitlines()[-1]
    assert last.startswith(
        f"Error: {run / 'checkpoints' / 'last.npz'} was trained on unpinned files with other hashes than those cached "
        f"in {data} (test-images, test-labels, train-images, train-labels: trained "
    )
    assert last.endswith("; resume with the data it was trained on")
    assert {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()} == before


def test_a_non_finite_likelihood_stops_with_advice_and_keeps_the_last_good_checkpoint(tiny_config, tmp_path):
    run = tmp_path / "run"
    res = train_cli(tiny_config(train={"learning_rate": 1e38}), "--run-dir", run, data_dir=tmp_path / "d")
    assert res.exit_code == 1
    error = res.stderr.splitlines()[-1]
    assert error.startswith("Error: the log-likelihood became nan at epoch 1, batch 2: train.learning_rate = 1e+38 ")
    assert error.endswith(
        "is too large for sgd at batches of 16 (the step grows with the batch, since the LL is a sum): start a new run "
        "with a smaller one, such as 0.05, sgd's own rate (--resume cannot change it). The last good checkpoint is "
        f"{run / 'checkpoints' / 'last.npz'}"
    )
    assert "Warning" not in res.stderr  # the overflow is reported once, in words
    last = ckpt.load(run / "checkpoints" / "last.npz")
    assert last.epoch == 0 and all(np.isfinite(W).all() for W, _ in last.params)


def test_an_existing_run_folder_is_not_overwritten(tiny_config, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    res = train_cli(tiny_config(), "--run-dir", run, data_dir=tmp_path / "d")
    assert res.exit_code == 1
    assert res.stderr == (
        f"Error: run folder {run} already exists and is not empty: resume it with --resume {run}, "
        "or choose another --run-dir\n"
    )
    assert [p.name for p in run.iterdir()] == ["notes.txt"]


def test_without_validation_best_follows_the_training_likelihood(tiny_config, tmp_path):
    run = tmp_path / "run"
    res = train_cli(tiny_config(data={"validation": 0}), "--run-dir", run, data_dir=tmp_path / "d")
    assert res.exit_code == 0, res.output
    lines = metrics(run)
    assert all(m["val_ll_mean"] is None for m in lines)
    assert ckpt.load(run / "checkpoints" / "best.npz").epoch == max(lines, key=lambda m: m["train_ll_mean"])["epoch"]
    assert "(training LL" in res.stdout


def test_log_every_adds_step_records(tiny_config, tmp_path):
    run = tmp_path / "run"
    res = train_cli(tiny_config(train={"log_every": 5, "epochs": 2}), "--run-dir", run, data_dir=tmp_path / "d")
    assert res.exit_code == 0
    kinds = [(m["kind"], m["step"]) for m in metrics(run)]
    assert kinds == [("step", 5), ("step", 10), ("step", 15), ("epoch", 15), ("step", 20), ("step", 25), ("step", 30),
                     ("epoch", 30)]


def test_missing_data_is_downloaded_first(tiny_config, tmp_path):
    data = tmp_path / "fresh"
    res = train_cli(tiny_config(), "--run-dir", tmp_path / "r", data_dir=data)
    assert res.exit_code == 0
    assert "tiny is not cached in" in res.stderr
    assert len(list(data.glob("tiny-*/train.npz"))) == 1


def test_a_run_that_cannot_get_its_data_leaves_no_run_folder_and_can_be_retried(tiny_config, tmp_path):
    run, data = tmp_path / "run", tmp_path / "d"
    missing = tmp_path / "no-such-folder"
    res = train_cli(tiny_config(data={"url": str(missing)}), "--run-dir", run, data_dir=data)
    assert res.exit_code == 1
    assert res.stderr.splitlines()[-1].startswith("Error: could not download train-images-idx3-ubyte")
    assert not run.exists()  # no empty folder that would refuse the retry below
    res = train_cli(tiny_config(), "--run-dir", run, data_dir=data)
    assert res.exit_code == 0, res.output
    assert (run / "checkpoints" / "best.npz").is_file()


def test_a_network_too_big_for_the_memory_leaves_no_run_folder(tiny_config, tmp_path, monkeypatch):
    from mlecli.safe import resources

    monkeypatch.setattr(resources, "physical_memory", lambda: 1000)
    run = tmp_path / "run"
    res = train_cli(tiny_config(), "--run-dir", run, data_dir=tmp_path / "d")
    assert res.exit_code == 1
    assert "more than this machine's 1000 B" in res.stderr
    assert not run.exists()


def test_resume_of_a_folder_that_is_not_a_run(tmp_path):
    res = CliRunner().invoke(main, ["train", "--resume", str(tmp_path)])
    assert res.exit_code == 1
    assert res.stderr == (
        f"Error: {tmp_path} has no checkpoint to resume from: it is not a run folder, or its run never wrote its "
        f"first checkpoint; start it again with mlecli train CONFIG --run-dir {tmp_path}\n"
    )


def test_resume_of_a_folder_that_does_not_exist(tmp_path):
    res = CliRunner().invoke(main, ["train", "--resume", str(tmp_path / "nope")])
    assert res.exit_code == 1
    assert res.stderr == (
        f"Error: {tmp_path / 'nope'} does not exist: give the folder of the run to resume (`mlecli runs` lists them)\n"
    )


def test_resume_with_a_config_is_a_usage_error(tmp_path):
    res = CliRunner().invoke(main, ["train", "default", "--resume", str(tmp_path)])
    assert res.exit_code == 2


# ---------------------------------------------------------------------------
# Real data: Debian's Fashion-MNIST served over HTTP on 127.0.0.1


def test_short_real_data_run_on_fashion_mnist(debian_fashion, mirrors, tmp_path):
    m = mirrors(debian_fashion)
    run = tmp_path / "run"
    res = CliRunner().invoke(main, [
        "train", "--run-dir", str(run), "--data-dir", str(tmp_path / "d"), "-q",
        "--set", "data.dataset=fashion-mnist", "--set", f"data.url={m.url!r}".replace("'", '"'),
        "--set", "task.positive=[0,1,2,3,4]", "--set", 'task.negative="rest"',
        "--set", "model.hidden=[32]", "--set", "train.epochs=1", "--set", "train.batch_size=64",
        "--set", "train.learning_rate=0.01",
    ])
    assert res.exit_code == 0, res.output
    (epoch,) = metrics(run)
    assert epoch["step"] == 844  # 54,000 training images in batches of 64
    assert epoch["val_acc"] > 0.85
