"""`mlecli train` with update rules, a prior, schedules, shifted digits, early stopping and
divergence: what each records, and exact resume after Ctrl-C and kill -9 for each."""

import json
import os
import signal
import uuid
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from fakes import MNIST_FILES, TinyDataset, kill_once, make_digits, mlecli_process, rewrite_npz
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_train import assert_bit_identical, metrics, train_cli, weights

from mlecli.cli import main
from mlecli.data.idx import idx_bytes
from mlecli.nn.model import log_prior
from mlecli.run import checkpoint as ckpt
from mlecli.run import train as training
from mlecli.run.config import toml_value
from mlecli.sweep.runs import run_row

# Each variant uses every feature at least once; together they cover each rule, schedule,
# the prior (weights, weights and biases), the plateau and shifts.
VARIANTS = {
    "sgd+prior+step": {"prior_sd": 0.5, "schedule": "step", "decay_every": 1, "decay_factor": 0.5},
    "momentum+cosine+warmup": {"optimizer": "momentum", "learning_rate": 0.01, "schedule": "cosine",
                               "warmup_epochs": 1.5, "prior_sd": 1.0, "prior_biases": True},
    "nesterov+shift": {"optimizer": "nesterov", "learning_rate": 0.01, "shift": 2},
    "adam+plateau+shift+prior": {"optimizer": "adam", "learning_rate": 0.01, "plateau_patience": 1,
                                 "plateau_factor": 0.5, "shift": 1, "prior_sd": 0.3},
}


@pytest.fixture
def noisy_config(tmp_path):
    """A config on tiny digits whose training labels are 30% wrong (a neighbouring digit):
    the validation LL stops improving after a few epochs, and wanders."""
    tr_x, tr_y = make_digits(300, 0)
    te_x, te_y = make_digits(100, 1)
    flip = np.random.default_rng(0).random(300) < 0.3
    tr_y = np.where(flip, (tr_y + 1) % 10, tr_y).astype(np.uint8)
    arrays = {"train-images": tr_x, "train-labels": tr_y, "test-images": te_x, "test-labels": te_y}
    noisy = TinyDataset({MNIST_FILES[r]: idx_bytes(a) for r, a in arrays.items()}, arrays)
    folder = noisy.write_folder(tmp_path / "noisy")

    def make(**train) -> object:
        keys = {"batch_size": 16, "seed": 2, "learning_rate": 0.05, **train}
        body = "validation = 0.2\n[model]\nhidden = [16]\nseed = 1\n[train]\n" + "".join(
            f"{k} = {v}\n" for k, v in keys.items())
        return noisy.write_config(tmp_path / "noisy.toml", str(folder), body)

    return make


def whole_and_cut(config, tmp_path, monkeypatch, cut_at):
    """A run trained whole, and the same run stopped by Ctrl-C before step `cut_at` and resumed."""
    cfg = config
    data = tmp_path / "d"
    res = train_cli(cfg, "--run-dir", tmp_path / "whole", data_dir=data)
    assert res.exit_code == 0, res.output
    real_step = training.train_step
    calls = {"n": 0}

    def step_then_ctrl_c(*args):
        calls["n"] += 1
        if calls["n"] == cut_at:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(*args)

    monkeypatch.setattr(training, "train_step", step_then_ctrl_c)
    run = tmp_path / "cut"
    assert train_cli(cfg, "--run-dir", run, data_dir=data).exit_code == 130
    monkeypatch.setattr(training, "train_step", real_step)
    res = CliRunner().invoke(main, ["train", "--resume", str(run), "--data-dir", str(data), "-q"])
    assert res.exit_code == 0, res.output
    return tmp_path / "whole", run


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_ctrl_c_mid_epoch_resumes_bit_identical_with_every_rule_schedule_prior_and_shift(
        variant, tiny_config, tmp_path, monkeypatch):
    cfg = tiny_config(model={"hidden": [8, 4]}, train=VARIANTS[variant])
    whole, cut = whole_and_cut(cfg, tmp_path, monkeypatch, cut_at=20)
    a, b = weights(whole), weights(cut)  # the weights and the rule's state (opt.* arrays)
    assert_bit_identical(a, b)
    assert_bit_identical(weights(whole, "best.npz"), weights(cut, "best.npz"))
    assert (whole / "checkpoints" / "last.npz").read_bytes() == (cut / "checkpoints" / "last.npz").read_bytes()
    assert [m["lr"] for m in metrics(whole)] == [m["lr"] for m in metrics(cut)]
    expected_state = {"sgd": [], "momentum": ["velocity"], "nesterov": ["velocity"], "adam": ["m", "v"]}
    rule = VARIANTS[variant].get("optimizer", "sgd")
    assert sorted({k.split(".")[1] for k in a if k.startswith("opt.")}) == sorted(expected_state[rule])


def test_the_plateau_scale_survives_a_resume(noisy_config, tmp_path, monkeypatch):
    cfg = noisy_config(plateau_patience=1, plateau_factor=0.5, epochs=8)
    whole, cut = whole_and_cut(cfg, tmp_path, monkeypatch, cut_at=95)  # epoch 7 of 8
    lrs = [m["lr"] for m in metrics(whole)]
    assert lrs[0] == 0.05 and 0 < min(lrs[:6]) < 0.05  # it was reduced before the cut
    assert [m["lr"] for m in metrics(cut)] == lrs
    assert_bit_identical(weights(whole), weights(cut))


@pytest.mark.parametrize("variant", ["momentum+cosine+warmup", "adam+plateau+shift+prior"])
def test_a_killed_process_resumes_bit_identical_with_rules_schedules_priors_and_shifts(variant, tiny_config, tmp_path):
    cfg = tiny_config(train={**VARIANTS[variant], "epochs": 30, "batch_size": 1}, model={"hidden": [8]})
    data = tmp_path / "d"
    assert train_cli(cfg, "--run-dir", tmp_path / "whole", data_dir=data).exit_code == 0
    run = tmp_path / "killed"
    kill_once(run / "checkpoints" / "epoch-0002.npz", mlecli_process("train", cfg, "--run-dir", run, "--data-dir", data))
    assert 2 <= ckpt.load(run / "checkpoints" / "last.npz").epoch < 30
    res = CliRunner().invoke(main, ["train", "--resume", str(run), "--data-dir", str(data), "-q"])
    assert res.exit_code == 0, res.output
    assert_bit_identical(weights(tmp_path / "whole"), weights(run))
    assert [m["lr"] for m in metrics(run)] == [m["lr"] for m in metrics(tmp_path / "whole")]


def test_metrics_record_the_rate_the_log_prior_and_the_log_posterior(tiny_config, tmp_path):
    run = tmp_path / "run"
    keys = {"prior_sd": 0.5, "schedule": "cosine", "epochs": 3}
    assert train_cli(tiny_config(train=keys), "--run-dir", run, data_dir=tmp_path / "d").exit_code == 0
    lines = metrics(run)
    # 240 training images in batches of 16: 15 steps an epoch, 45 in all; the last step of
    # epoch e is step 15e − 1 (0-based) of the cosine from 0.05 to 0
    assert [m["lr"] for m in lines] == pytest.approx(
        [0.05 * 0.5 * (1 + np.cos(np.pi * (15 * e - 1) / 45)) for e in (1, 2, 3)])
    last = ckpt.load(run / "checkpoints" / "last.npz")
    assert lines[-1]["log_prior"] == pytest.approx(log_prior(last.params, 0.5), rel=1e-12)
    assert lines[-1]["log_posterior"] == lines[-1]["train_ll"] + lines[-1]["log_prior"]


def test_early_stopping_ends_the_run_as_finished_and_says_so(noisy_config, tmp_path):
    run, data = tmp_path / "run", tmp_path / "d"
    res = train_cli(noisy_config(epochs=30, patience=2, checkpoint_every=50), "--run-dir", run, data_dir=data)
    assert res.exit_code == 0, res.output
    lines = metrics(run)
    best = max(lines, key=lambda m: m["val_ll_mean"])["epoch"]
    stopped = lines[-1]["epoch"]
    assert stopped == best + 2 < 30
    assert f"stopped early after epoch {stopped}: no better validation LL in 2 epochs (train.patience); " \
           "the run is finished" in res.stdout
    assert json.loads((run / "manifest.json").read_text())["ended"]["stopped_early"] == {
        "epoch": stopped, "best_epoch": best, "patience": 2}
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.npz", f"epoch-{stopped:04d}.npz", "last.npz"]
    assert ckpt.load(run / "checkpoints" / "best.npz").epoch == best
    row = run_row(run)
    assert row["status"] == "finished" and row["note"] == (
        f"stopped early after epoch {stopped}: no better validation LL since epoch {best}")
    res = CliRunner().invoke(main, ["runs", str(tmp_path)])
    assert f"  run: stopped early after epoch {stopped}" in res.output
    # resuming a run that stopped early trains nothing more
    before = (run / "checkpoints" / "last.npz").read_bytes()
    res = CliRunner().invoke(main, ["train", "--resume", str(run), "--data-dir", str(data), "-q"])
    assert res.exit_code == 0 and (run / "checkpoints" / "last.npz").read_bytes() == before


def test_a_diverging_run_stops_with_advice_to_start_again_with_a_smaller_rate(tiny_config, tmp_path):
    run = tmp_path / "run"
    res = train_cli(tiny_config(train={"learning_rate": 5.0, "epochs": 20}), "--run-dir", run, data_dir=tmp_path / "d")
    assert res.exit_code == 1
    error = res.stderr.splitlines()[-1]
    lines = metrics(run)
    epoch = lines[-1]["epoch"]
    assert epoch < 20
    assert error.startswith(f"Error: the run diverged: for 2 epochs in a row (to epoch {epoch}) it did no better than "
                            "predicting the training base rate for every image (validation LL ")
    assert error.endswith(
        "train.learning_rate = 5 is too large for sgd at batches of 16 (the step grows with the batch, since the LL is "
        "a sum): start a new run with a smaller one, such as 0.05, sgd's own rate (--resume cannot change it). Its best "
        f"checkpoint is {run / 'checkpoints' / 'best.npz'}")
    base = np.log(0.5)  # the tiny data's training digits are about half odd
    assert all(m["val_ll_mean"] < 1.1 * base and m["val_acc"] < 0.6 for m in lines[-2:])
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["ended"]["status"] == "failed" and manifest["ended"]["error"].startswith("the run diverged")


def test_resume_cannot_stretch_a_cosine_schedule(tiny_config, tmp_path):
    data = tmp_path / "d"
    assert train_cli(tiny_config(train={"schedule": "cosine", "epochs": 2}), "--run-dir", tmp_path / "r",
                     data_dir=data).exit_code == 0
    res = CliRunner().invoke(main, ["train", "--resume", str(tmp_path / "r"), "--set", "train.epochs=4"])
    assert res.exit_code == 1
    assert res.stderr == (
        "Error: --set train.epochs cannot change when resuming a run with the cosine schedule: it spreads the decay "
        "over the 2 epochs configured, so the learning rates already used would change; start a new run with the "
        "epochs you want\n"
    )


def test_another_rule_by_set_trains_at_its_own_rate_and_the_run_records_it(tiny_config, tmp_path):
    run = tmp_path / "run"
    res = train_cli(tiny_config(train={"epochs": 1}), "--set", "train.optimizer=adam", "--run-dir", run,
                    data_dir=tmp_path / "d")
    assert res.exit_code == 0, res.output
    assert res.stderr.splitlines()[0] == (
        f"note: train.optimizer = 'adam' trains at adam's own learning rate, 0.001: train.learning_rate = 0.05 in the "
        f"config {tmp_path / 'tiny-run.toml'} is for sgd (set train.learning_rate to choose another)")
    assert "\nlearning_rate = 0.001\n" in (run / "config.toml").read_text()
    for name in ("last.npz", "epoch-0001.npz", "best.npz"):
        cfg = ckpt.load(run / "checkpoints" / name).config
        assert (cfg.train.optimizer, cfg.train.learning_rate) == ("adam", 0.001)
    assert metrics(run)[0]["lr"] == 0.001


def test_a_checkpoint_whose_update_rule_state_is_missing_is_refused(tiny_config, tmp_path):
    run, data = tmp_path / "run", tmp_path / "d"
    assert train_cli(tiny_config(train={"optimizer": "adam", "learning_rate": 0.01, "epochs": 1}), "--run-dir", run,
                     data_dir=data).exit_code == 0
    last = run / "checkpoints" / "last.npz"
    rewrite_npz(last, drop=("opt.v.W2",))
    for p in (run / "checkpoints").glob("epoch-*.npz"):
        p.unlink()
    res = CliRunner().invoke(main, ["train", "--resume", str(run), "--set", "train.epochs=2", "--data-dir", str(data)])
    assert res.exit_code == 1
    assert res.stderr.splitlines()[-1] == (
        f"Error: {last}: the adam state array opt.v.W2 is missing; it cannot be resumed")


def test_run_as_a_library_call_handles_its_own_signals(tiny_config, tmp_path):
    # the benchmarks call train.run without a StopRequest of their own
    from mlecli.run.config import load

    report = training.Reporter(line=lambda s: None, log=lambda s: None, progress=False)
    outcome = training.run(load(tiny_config(train={"epochs": 2})), tmp_path / "run", data_dir=tmp_path / "d",
                           report=report)
    assert outcome.epochs_done == 2 and outcome.interrupted is None
    assert ckpt.load(tmp_path / "run" / "checkpoints" / "last.npz").epoch == 2


def test_a_run_that_diverged_diverges_again_when_resumed_however_many_epochs(tiny_config, tmp_path):
    run, data = tmp_path / "run", tmp_path / "d"
    assert train_cli(tiny_config(train={"learning_rate": 5.0, "epochs": 20}), "--run-dir", run,
                     data_dir=data).exit_code == 1
    epoch = metrics(run)[-1]["epoch"]
    for more in ([], ["--set", "train.epochs=40"]):
        res = CliRunner().invoke(main, ["train", "--resume", str(run), *more, "--data-dir", str(data)])
        assert res.exit_code == 1, res.output
        assert res.stderr.splitlines()[-1].startswith(
            f"Error: the run diverged by epoch {epoch} (it did no better than predicting the training base rate for "
            "every image, 2 epochs in a row): train.learning_rate = 5 is too large for sgd at batches of 16 (")
        assert json.loads((run / "manifest.json").read_text())["ended"]["status"] == "failed"
        assert metrics(run)[-1]["epoch"] == epoch  # nothing more was trained


@pytest.mark.parametrize("lr", [1e-6, 1e-9])
def test_a_learning_rate_too_small_to_move_the_network_is_slow_not_diverged(tiny_config, tmp_path, lr):
    run = tmp_path / "run"
    res = train_cli(tiny_config(train={"learning_rate": lr, "epochs": 4}), "--run-dir", run, data_dir=tmp_path / "d")
    assert res.exit_code == 0, res.output  # it learns next to nothing, but nothing got worse: not stopped
    assert [m["epoch"] for m in metrics(run)] == [1, 2, 3, 4]


def _powers_of_ten(lo: float, hi: float):
    return st.floats(min_value=lo, max_value=hi).map(lambda e: 10.0 ** e).filter(lambda v: v > 0)


# Each float key of [train] over its whole accepted range and beyond it at the small end (0,
# subnormal in float32 or float64), and the fractions up to 1 (1 − 10⁻¹⁷ is 1 as a double).
_NEAR_ONE = st.floats(min_value=-17, max_value=0).map(lambda e: 1.0 - 10.0 ** e)
FLOAT_KEYS = {
    "learning_rate": _powers_of_ten(-330, -1),
    "epsilon": _powers_of_ten(-330, 0),
    "momentum": st.one_of(_powers_of_ten(-330, 0), _NEAR_ONE),
    "beta1": st.one_of(_powers_of_ten(-330, 0), _NEAR_ONE),
    "beta2": st.one_of(_powers_of_ten(-330, 0), _NEAR_ONE),
    "min_learning_rate": _powers_of_ten(-330, -2),
    "prior_sd": _powers_of_ten(-6, 308),
}


@pytest.fixture
def bordered_config(tmp_path):
    """tiny_config's maker for a dataset whose top row of pixels is black in every image, as
    MNIST's border is: those weights' gradient is exactly 0 (Adam then divides 0 by √0 + ε)."""
    arrays = {}
    for role, (n, seed) in {"train": (200, 0), "test": (50, 1)}.items():
        x, y = make_digits(n, seed)
        x[:, 0, :] = 0
        arrays[f"{role}-images"], arrays[f"{role}-labels"] = x, y
    data = TinyDataset({MNIST_FILES[r]: idx_bytes(a) for r, a in arrays.items()}, arrays)
    folder = data.write_folder(tmp_path / "bordered-mirror")

    def make(**sections) -> Path:
        path = data.write_config(tmp_path / "bordered.toml", str(folder))
        lines = [f"[{section}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in values.items())
                 for section, values in sections.items()]
        path.write_text(path.read_text() + "validation = 0.2\n" + "".join(lines))
        return path

    return make


USED_BY = {"epsilon": ["adam"], "beta1": ["adam"], "beta2": ["adam"], "momentum": ["momentum", "nesterov"]}


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), dtype=st.sampled_from(["float32", "float64"]), name=st.sampled_from(sorted(FLOAT_KEYS)))
def test_a_float_key_trains_to_finite_weights_or_is_refused_naming_it(bordered_config, tmp_path, data, dtype, name):
    """One step of training (the whole training set is one batch), the key drawn for the
    update rules that read it."""
    optimizer = data.draw(st.sampled_from(USED_BY.get(name, ["sgd", "momentum", "nesterov", "adam"])), label="rule")
    value = data.draw(FLOAT_KEYS[name], label=name)
    train = {"epochs": 1, "batch_size": 100000, "optimizer": optimizer, name: value}  # one step
    if name == "min_learning_rate":
        train["schedule"] = "cosine"
    run = tmp_path / f"run-{uuid.uuid4().hex}"
    config = bordered_config(model={"hidden": [4], "dtype": dtype, "seed": 1}, train=train)
    res = train_cli(config, "--run-dir", run, "-q", data_dir=tmp_path / "d")
    if res.exit_code == 0:
        assert all(np.all(np.isfinite(a)) for a in weights(run).values())
    else:
        assert res.exit_code == 1 and len(res.stderr.splitlines()) == 1, res.output
        assert res.stderr.startswith(f"Error: config {config}: train.{name} = "), res.stderr
        assert not run.exists()  # refused before anything started
