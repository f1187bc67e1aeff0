"""`mlecli evaluate`: figures that match training's, the JSON, and every refusal."""

import hashlib
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from fakes import copy_run_without_evaluations, rewrite_npz, tiny_dataset

from mlecli.cli import main

KEYS = {
    "checkpoint", "checkpoint_name", "checkpoint_sha256", "epoch", "split", "dataset", "dataset_sha256", "task", "hidden", "threshold",
    "images", "positives", "negatives", "log_likelihood", "log_likelihood_mean", "perplexity", "accuracy",
    "majority_baseline", "precision", "recall", "f1", "confusion", "roc_auc", "brier", "ece", "calibration",
    "most_confident_errors", "seconds", "images_per_s", "classes",
}


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny, tiny_folder):
    """One small run, trained once for the whole module."""
    root = tmp_path_factory.mktemp("evaluate")
    cfg = tiny.write_config(root / "tiny-run.toml", tiny_folder,
                            "validation = 0.2\n[model]\nhidden = [8]\n[train]\nepochs = 3\nbatch_size = 16\n")
    res = cli("train", cfg, "--run-dir", root / "run", "--data-dir", root / "data", "-q")
    assert res.exit_code == 0, res.output
    return root / "run", root / "data"


def evaluate(run, data, *args):
    return cli("evaluate", run, "--data-dir", data, *args)


def test_validation_figures_reproduce_what_training_logged(trained):
    run, data = trained
    res = evaluate(run, data, "--split", "validation", "--checkpoint", "last", "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert report["epoch"] == 3 and report["images"] == 60
    assert report["log_likelihood_mean"] == logged["val_ll_mean"]
    assert report["accuracy"] == logged["val_acc"]


def test_json_holds_every_figure_and_is_saved_in_the_run(trained):
    run, data = trained
    res = evaluate(run, data, "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert set(report) == KEYS
    assert report["split"] == "test" and report["checkpoint_name"] == "best" and report["images"] == 100
    assert report["checkpoint_sha256"] == hashlib.sha256((run / "checkpoints" / "best.npz").read_bytes()).hexdigest()
    assert report["positives"] + report["negatives"] == 100
    assert sum(map(sum, report["confusion"])) == 100
    assert report["perplexity"] == pytest.approx(np.exp(-report["log_likelihood_mean"]))
    assert json.loads((run / "eval-test-best.json").read_text()) == report
    assert len(report["calibration"]) == 10 and len(report["most_confident_errors"]) <= 10


def test_the_table_shows_the_same_numbers(trained):
    run, data = trained
    report = json.loads(evaluate(run, data, "--json").stdout)
    res = evaluate(run, data)
    assert res.exit_code == 0
    out = res.stdout
    assert f"(epoch {report['epoch']}) on the test split of tiny" in out
    assert f"  images            100 ({report['positives']} positive, {report['negatives']} negative)" in out
    assert f"{report['log_likelihood']:.4f} total, {report['log_likelihood_mean']:.6f} per image" in out
    assert f"accuracy          {100 * report['accuracy']:.2f}% at ŷ ≥ 0.5" in out
    assert f"(majority class: {100 * report['majority_baseline']:.2f}%)" in out
    assert f"ROC AUC           {report['roc_auc']:.4f}" in out
    assert f"Brier score       {report['brier']:.6f}" in out
    assert f"calibration error {report['ece']:.6f}" in out
    (tn, fp), (fn, tp) = report["confusion"]
    assert f"    actual 0 (neg)   {tn:>11,}  {fp:>11,}" in out
    assert report["classes"] == {"0": "even (0,2,4,6,8)", "1": "odd (1,3,5,7,9)"}
    assert "odd (1,3,5,7,9) (y=1) vs even (0,2,4,6,8) (y=0), hidden [8]" in out
    for e in report["most_confident_errors"]:
        said = {0: "even (0,2,4,6,8)", 1: "odd (1,3,5,7,9) "}[1 - e["y"]]  # ŷ in one column
        assert e["label"] == f"digit {e['digit']}"
        assert f"#{e['index']:<6} {e['label']:<12}  predicted {said}  ŷ={e['p']:.6f}" in out
    assert out.rstrip().endswith(f"report            {run / 'eval-test-best.json'}")


def test_a_checkpoint_file_and_epoch_n(trained):
    run, data = trained
    a = json.loads(evaluate(run / "checkpoints" / "epoch-0002.npz", data, "--json").stdout)
    b = json.loads(evaluate(run, data, "--checkpoint", "epoch-2", "--json").stdout)
    assert a["epoch"] == b["epoch"] == 2 and a["accuracy"] == b["accuracy"]


def test_a_higher_threshold_predicts_fewer_positives(trained):
    run, data = trained
    low = json.loads(evaluate(run, data, "--json", "--threshold", "0.1").stdout)
    high = json.loads(evaluate(run, data, "--json", "--threshold", "0.9").stdout)
    assert high["confusion"][1][1] + high["confusion"][0][1] <= low["confusion"][1][1] + low["confusion"][0][1]
    assert high["roc_auc"] == low["roc_auc"]


# ---------------------------------------------------------------------------
# Refusals: one line, exit 1, nothing written


def copy_run(trained, tmp_path):
    run, data = trained
    return copy_run_without_evaluations(run, tmp_path / "run"), data


def refused(run, data, *args):
    res = evaluate(run, data, *args)
    assert res.exit_code == 1
    assert res.stdout == ""
    *notes, error = res.stderr.splitlines()
    assert error.startswith("Error: ") and not any(n.startswith("Error") for n in notes)
    assert not (run.is_dir() and list(run.glob("eval-*.json")))  # nothing written
    return error.removeprefix("Error: ")


def test_missing_run_folder(tmp_path):
    assert refused(tmp_path / "nope", tmp_path) == f"{tmp_path / 'nope'} does not exist: give a run folder or a checkpoint file"


def test_a_folder_that_is_not_a_run(tmp_path):
    assert refused(tmp_path, tmp_path) == f"{tmp_path} is not a run folder (it has no checkpoints/ folder)"


def test_missing_checkpoint_lists_what_there_is(trained, tmp_path):
    run, data = copy_run(trained, tmp_path)
    msg = refused(run, data, "--checkpoint", "epoch-9")
    assert msg == (
        f"{run} has no epoch-9 checkpoint ({run / 'checkpoints' / 'epoch-0009.npz'}); "
        "it has: best, epoch-0001, epoch-0002, epoch-0003, last"
    )


def test_bad_checkpoint_name_is_a_usage_error(trained):
    run, data = trained
    res = evaluate(run, data, "--checkpoint", "newest")
    assert res.exit_code == 2 and "'newest' is not best, last or epoch-N" in res.stderr


def test_a_checkpoint_name_of_5000_characters_is_quoted_short(trained):
    run, data = trained
    res = evaluate(run, data, "--checkpoint", "epoch-" + "9" * 4994)
    assert res.exit_code == 2
    assert res.stderr.splitlines()[-1] == ("Error: Invalid value for '--checkpoint': 'epoch-" + "9" * 52
                                           + "… (5,000 characters) is not best, last or epoch-N")


def test_a_future_format_version(trained, tmp_path):
    run, data = copy_run(trained, tmp_path)
    path = run / "checkpoints" / "best.npz"
    rewrite_npz(path, meta={"format": 3})
    assert refused(run, data) == (
        f"{path} has checkpoint format 3; this mlecli reads formats 1, 2: use the mlecli version that wrote it"
    )


def test_arrays_that_do_not_match_the_config(trained, tmp_path):
    run, data = copy_run(trained, tmp_path)
    path = run / "checkpoints" / "best.npz"
    rewrite_npz(path, replace={"W1": np.zeros((784, 9), np.float32)})
    assert refused(run, data) == f"{path}: array W1 is float32 (784, 9), its config needs float32 (784, 8)"


def test_an_array_missing(trained, tmp_path):
    run, data = copy_run(trained, tmp_path)
    path = run / "checkpoints" / "best.npz"
    rewrite_npz(path, drop=("b2",))
    assert refused(run, data) == (
        f"{path}: its arrays do not match its config (hidden = [8]): missing ['b2'], unexpected none"
    )


def test_an_object_array_that_would_need_pickle(trained, tmp_path):
    run, data = copy_run(trained, tmp_path)
    path = run / "checkpoints" / "best.npz"
    rewrite_npz(path, replace={"W1": np.array([{"evil": 1}], dtype=object)})
    assert refused(run, data) == (
        f"{path} holds Python objects that would need pickle to load; refused (checkpoints are arrays only)"
    )


def test_a_truncated_checkpoint(trained, tmp_path):
    run, data = copy_run(trained, tmp_path)
    path = run / "checkpoints" / "best.npz"
    path.write_bytes(path.read_bytes()[:1000])
    assert refused(run, data).startswith(f"{path} is not a readable checkpoint (")


def test_data_whose_hashes_differ_from_training(tmp_path, tiny_config):
    # An unverified custom dataset (no sha256) that changed after training.
    first, second = tiny_dataset(seed=0), tiny_dataset(seed=5)
    mirror = first.write_folder(tmp_path / "mirror")
    cfg = tmp_path / "u.toml"
    cfg.write_text(f'[data]\ndataset = "unpinned"\nurl = "{mirror}"\n[model]\nhidden = [4]\n[train]\nepochs = 1\n')
    data = tmp_path / "data"
    assert cli("train", cfg, "--run-dir", tmp_path / "run", "--data-dir", data, "-q").exit_code == 0
    shutil.rmtree(mirror)
    second.write_folder(mirror)
    shutil.rmtree(data)
    # evaluate never downloads from a checkpoint's URL: the data is fetched deliberately first.
    assert cli("download", "--config", tmp_path / "run" / "config.toml", "--data-dir", data, "-q").exit_code == 0
    msg = refused(tmp_path / "run", data)
    assert msg.startswith(f"{tmp_path / 'run' / 'checkpoints' / 'best.npz'} was trained on unpinned files with other hashes")
    assert msg.endswith("evaluate it with the data it was trained on")


def test_threshold_out_of_range_is_a_usage_error(trained):
    run, data = trained
    res = evaluate(run, data, "--threshold", "1.5")
    assert res.exit_code == 2 and "Invalid value for '--threshold'" in res.stderr


def test_an_evaluation_at_another_threshold_is_saved_under_its_own_name(trained, tmp_path):
    run, data = trained
    copy = copy_run_without_evaluations(run, tmp_path / "copy")
    assert evaluate(copy, data).exit_code == 0
    default = (copy / "eval-test-best.json").read_bytes()
    res = evaluate(copy, data, "--threshold", "0.3")
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[-1] == f"  report            {copy / 'eval-test-best-t0.3.json'}"
    assert json.loads((copy / "eval-test-best-t0.3.json").read_text())["threshold"] == 0.3
    assert (copy / "eval-test-best.json").read_bytes() == default  # never replaced
    rows = json.loads(cli("runs", tmp_path, "--json").stdout)
    assert [r["test_acc"] for r in rows] == [json.loads(default)["accuracy"]]
    assert evaluate(copy, data, "--threshold", "0.5", "--json").exit_code == 0
    assert sorted(p.name for p in copy.glob("eval-*.json")) == ["eval-test-best-t0.3.json", "eval-test-best.json"]


def test_a_diverged_run_reports_its_perplexity_without_overflow(trained, tmp_path):
    run, data = trained
    run = copy_run(trained, tmp_path)[0]
    path = run / "checkpoints" / "best.npz"
    with np.load(path, allow_pickle=False) as z:
        w2, b2 = z["W2"], z["b2"]
    # the output layer turned round and scaled up: confidently wrong, as a diverged run is
    rewrite_npz(path, replace={"W2": (w2 * -1e6).astype(w2.dtype), "b2": (b2 * -1e6).astype(b2.dtype)})
    res = evaluate(run, data, "--json")
    assert res.exit_code == 0 and "Warning" not in res.stderr
    report = json.loads(res.stdout)
    assert -report["log_likelihood_mean"] >= 709 and report["perplexity"] is None
    line = next(x for x in evaluate(run, data).stdout.splitlines() if x.lstrip().startswith("perplexity"))
    assert line == (f"  perplexity        e^{-report['log_likelihood_mean']:.1f}, too large for a number (exp of "
                    "the mean negative log-likelihood: 1 is perfect, 2 a coin toss)")


def test_mistakes_are_said_in_the_class_words_short_where_long_with_y_hat_in_one_column():
    from mlecli.run.evaluate import format_report

    report = {"checkpoint": "runs/tour/checkpoints/best.npz", "epoch": 4, "split": "test", "dataset": "fashion-mnist",
              "classes": {"0": "T-shirt/top, Pullover, Coat, Shirt, Bag", "1": "Trouser, Dress, Sandal, Sneaker, Ankle boot"},
              "hidden": [128], "images": 4, "positives": 2, "negatives": 2, "log_likelihood": -1.0,
              "log_likelihood_mean": -0.25, "perplexity": 1.28, "accuracy": 0.5, "threshold": 0.5,
              "majority_baseline": 0.5, "precision": 0.5, "recall": 0.5, "f1": 0.5, "confusion": [[1, 1], [1, 1]],
              "roc_auc": 0.5, "brier": 0.25, "ece": 0.1, "calibration": [], "seconds": 0.1, "images_per_s": 40.0,
              "most_confident_errors": [
                  {"index": 1300, "digit": 8, "label": "Bag", "y": 0, "p": 0.999909},
                  {"index": 2721, "digit": 3, "label": "Dress", "y": 1, "p": 0.000253},
              ]}
    lines = format_report(report).splitlines()
    start = lines.index("  most confidently wrong (index in the split's IDX file, what it is, what was predicted, ŷ):")
    assert lines[start + 1 : start + 3] == [
        "    #1300   Bag           predicted Trouser, Dress, …         ŷ=0.999909",
        "    #2721   Dress         predicted T-shirt/top, Pullover, …  ŷ=0.000253",
    ]


def test_the_report_s_path_is_said_as_the_run_was_named(trained, tmp_path, monkeypatch):
    run, data = trained
    copy_run_without_evaluations(run, tmp_path / "runs" / "tour")
    monkeypatch.chdir(tmp_path)
    res = evaluate("runs/tour", data)
    assert res.stdout.splitlines()[-1] == "  report            runs/tour/eval-test-best.json"
    assert evaluate(tmp_path / "runs" / "tour", data).stdout.splitlines()[-1] == (
        f"  report            {tmp_path / 'runs' / 'tour' / 'eval-test-best.json'}")  # typed in full: said in full
