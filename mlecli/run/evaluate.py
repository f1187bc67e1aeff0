"""Evaluation: a checkpoint measured on one split of its own task.

The task, dataset and model all come from the checkpoint's config, so nothing else is
needed. `validation` is exactly the held-out part of training the run used (rebuilt
from the same seed); `test` is the dataset's official test images of the task's digits.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mlecli.data.cache import ensure_splits, split_hashes
from mlecli.nn import metrics
from mlecli.nn.model import sigmoid
from mlecli.nn.pixels import image_scores
from mlecli.run import checkpoint as ckpt
from mlecli.run.task import build_task, class_words, label_name, short_word
from mlecli.safe import schema
from mlecli.safe.errors import CheckpointError, printable
from mlecli.safe.files import atomic_write_text, hash_file, remove_stale_temporaries

DEFAULT_THRESHOLD = 0.5


def run_dir_of(checkpoint_path: Path) -> Path | None:
    """The run folder holding a checkpoint (…/<run>/checkpoints/<file>), if it is one.

    The path is taken as given, not with its symbolic links resolved: a run whose
    checkpoints/ links into another run gets its reports itself, never writes into the
    other run."""
    folder = Path(os.path.abspath(checkpoint_path)).parent
    if folder.name == "checkpoints" and (folder.parent / "config.toml").exists():
        return folder.parent
    return None


def how_to_fetch(checkpoint_path: Path, data_dir: Path) -> str:
    """The command that fetches a checkpoint's custom dataset deliberately."""
    run_dir = run_dir_of(checkpoint_path)
    config = run_dir / "config.toml" if run_dir is not None else "CONFIG (a config with the checkpoint's [data] table)"
    return f"mlecli download --config {shlex.quote(str(config))} --data-dir {shlex.quote(str(data_dir))}"


def evaluate(
    target: Path,
    *,
    which: str = "best",
    split: str = "test",
    data_dir: Path,
    threshold: float = DEFAULT_THRESHOLD,
    log: Callable[[str], None] = lambda msg: None,
    progress: bool = False,
) -> dict[str, Any]:
    """Every figure of the report, as one JSON-ready dict."""
    path = ckpt.resolve(Path(target), which)
    hashed = hash_file(path)  # before loading: if the file is replaced meanwhile, the report looks stale, not current
    cp = ckpt.load(path)
    cfg = cp.config
    dataset = cfg.data.resolve()
    # Never download from a URL that came with a checkpoint: the cache, or a built-in mirror.
    splits = ensure_splits(dataset, data_dir, download="builtin", how_to_fetch=how_to_fetch(path, data_dir),
                           progress=progress, log=log)
    sha256 = split_hashes(splits)
    ckpt.check_same_data(cp, dataset.name, sha256, data_dir, "evaluate it with the data it was trained on")
    task = build_task(cfg, splits, np.random.default_rng(cfg.train.seed))
    if task.n_inputs != cp.meta["n_inputs"]:
        raise CheckpointError(f"{path} expects {cp.meta['n_inputs']} inputs, the dataset's images have {task.n_inputs}")
    subset = task.split(split)
    if len(subset) == 0:
        why = {"validation": f"data.validation = {cfg.data.validation} holds no images out",
               "test": f"the test files of {dataset.name} have none of the task's digits ({cfg.task.describe()})",
               "train": "every training image of the task was held out for validation"}[split]
        raise CheckpointError(f"the {split} split of this run is empty: {why}; choose another --split")

    t0 = time.perf_counter()
    z = image_scores(cp.params, subset.images)
    p = sigmoid(z)
    y = subset.y
    seconds = time.perf_counter() - t0

    n, pos = len(y), int(y.sum())
    total_ll = metrics.total_log_likelihood(z, y)
    pred = metrics.predictions(z, threshold)  # from z, exactly: the one rule (metrics.decide)
    cm = metrics.confusion(y, pred)
    precision, recall, f1 = metrics.precision_recall_f1(cm)
    bins = metrics.calibration_bins(y, p)
    worst = metrics.most_confident_errors(y, z, pred)
    words = class_words(cfg)  # (y = 0, y = 1)
    neg_log_lik = -total_ll / n
    return {
        "checkpoint": str(path),
        "checkpoint_name": path.stem,
        "checkpoint_sha256": None if hashed is None else hashed.sha256,
        "epoch": cp.epoch,
        "split": split,
        "dataset": dataset.name,
        "dataset_sha256": sha256,
        "task": cfg.task.describe(),
        "classes": {"0": words[0], "1": words[1]},
        "hidden": list(cfg.model.hidden),
        "threshold": threshold,
        "images": n,
        "positives": pos,
        "negatives": n - pos,
        "log_likelihood": total_ll,
        "log_likelihood_mean": total_ll / n,
        # exp(mean −LL): 1 is perfect, 2 a coin toss; past ~e^709 a float cannot hold it (null)
        "perplexity": math.exp(neg_log_lik) if neg_log_lik < 709 else None,
        "accuracy": metrics.accuracy(y, pred),
        "majority_baseline": max(pos, n - pos) / n,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "confusion": cm,
        "roc_auc": metrics.roc_auc(y, z),
        "brier": metrics.brier(y, p),
        "ece": metrics.expected_calibration_error(bins, n),
        "calibration": bins,
        "most_confident_errors": [
            {"index": int(subset.index[i]), "digit": int(subset.digits[i]),
             "label": label_name(dataset.name, int(subset.digits[i])), "y": int(y[i]), "p": float(p[i])}
            for i in worst
        ],
        "seconds": seconds,
        "images_per_s": n / seconds if seconds > 0 else None,
    }


def report_name(split: str, checkpoint_name: str, threshold: float = DEFAULT_THRESHOLD) -> str:
    """eval-<split>-<checkpoint>.json, with -t<threshold> before .json at any threshold but
    the default: such a report never replaces the default one that `mlecli runs` shows."""
    suffix = "" if threshold == DEFAULT_THRESHOLD else f"-t{threshold!r}"
    return f"eval-{split}-{checkpoint_name}{suffix}.json"


def default_report(run_dir: Path) -> Path | None:
    """The report that stands for a run (runs' and the sweep's test acc, plot's mistakes):
    the test split at the default threshold, of best.npz, else of last.npz, and only if it
    measured the very checkpoint the run's best is now (best.npz, or last.npz for a run
    without one): the SHA-256 of the checkpoint file it recorded, or for an older report
    without one, its checkpoint's epoch. A report made before the run went on is stale:
    None then (evaluate again). A report at another threshold has its own name and never
    stands in for it."""
    run_dir = Path(run_dir)
    best = run_dir / "checkpoints" / "best.npz"
    target = best if best.exists() else run_dir / "checkpoints" / "last.npz"
    for checkpoint in ("best", "last"):
        path = run_dir / report_name("test", checkpoint)
        if path.exists() and measured(read_report(path), target):
            return path
    return None


def stands(report_path: Path, run_dir: Path) -> bool:
    """Whether a report in a run folder still describes the checkpoint it names: the file at
    <run>/checkpoints/<checkpoint_name>.npz now is the very one it measured (`measured`, the
    rule `default_report` applies). A report the schema refuses raises its SchemaError."""
    report = read_report(report_path)
    name = report["checkpoint_name"]
    if not re.fullmatch(r"best|last|epoch-\d{1,12}", name):  # not a checkpoint of a run: stands for nothing
        return False
    return measured(report, Path(run_dir) / "checkpoints" / f"{name}.npz")


def command_for(report: dict[str, Any], run_dir: Path) -> str:
    """The `mlecli evaluate` command that makes a report like `report` again, of the run as it is now."""
    words = ["mlecli", "evaluate", str(run_dir)]
    if report["split"] != "test":
        words += ["--split", report["split"]]
    if report["checkpoint_name"] != "best":
        words += ["--checkpoint", report["checkpoint_name"]]
    if report.get("threshold", DEFAULT_THRESHOLD) != DEFAULT_THRESHOLD:
        words += ["--threshold", repr(float(report["threshold"]))]
    return shlex.join(words)


def measured(report: dict[str, Any], checkpoint_path: Path) -> bool:
    """Whether `report` measured the checkpoint file that is at `checkpoint_path` now."""
    if not checkpoint_path.is_file():
        return False
    if report.get("checkpoint_sha256") is not None:
        hashed = hash_file(checkpoint_path)
        return hashed is not None and hashed.sha256 == report["checkpoint_sha256"]
    try:  # a report from before reports recorded the file's hash: the epoch must match
        return report["epoch"] == ckpt.load(checkpoint_path).epoch
    except CheckpointError:
        return False


def read_report(path: Path) -> dict[str, Any]:
    """An evaluation report written by save_report, checked (schema.REPORT)."""

    return schema.read_json(path, schema.REPORT)


def save_report(report: dict[str, Any]) -> Path | None:
    """Write the report into the run folder (named by `report_name`) when the checkpoint is in one."""
    run = run_dir_of(Path(report["checkpoint"]))
    if run is None:
        return None
    path = run / report_name(report["split"], report["checkpoint_name"], report["threshold"])
    remove_stale_temporaries(run)  # an earlier evaluate's, if it was killed mid-write
    atomic_write_text(path, json.dumps(report, indent=2, allow_nan=False) + "\n")
    return path


def _pct(v: float | None) -> str:
    return metrics.shown(v, "%")


def _task_words(r: dict[str, Any]) -> str:
    classes = r.get("classes")
    return f"{classes['1']} (y=1) vs {classes['0']} (y=0)" if classes else r["task"]


def _perplexity(r: dict[str, Any]) -> str:
    if r["perplexity"] is not None:
        return f"{r['perplexity']:.6f}"
    return f"e^{-r['log_likelihood_mean']:.1f}, too large for a number"


def _num(v: float | None, fmt: str = ".4f") -> str:
    return metrics.shown(v, fmt)


def format_report(r: dict[str, Any]) -> str:
    """The human-readable table: the likelihood view first, since training maximised it."""
    (tn, fp), (fn, tp) = r["confusion"]
    lines = [
        printable(f"{r['checkpoint']} (epoch {r['epoch']}) on the {r['split']} split of {r['dataset']}: "
                  f"{_task_words(r)}, hidden {r['hidden']}"),
        f"  images            {r['images']:,} ({r['positives']:,} positive, {r['negatives']:,} negative)",
        f"  log-likelihood    {r['log_likelihood']:.4f} total, {r['log_likelihood_mean']:.6f} per image",
        f"  perplexity        {_perplexity(r)} (exp of the mean negative log-likelihood: 1 is perfect, "
        "2 a coin toss)",
        f"  accuracy          {_pct(r['accuracy'])} at ŷ ≥ {float(r['threshold'])!r} "
        f"(majority class: {_pct(r['majority_baseline'])})",
        f"  precision         {_pct(r['precision'])}",
        f"  recall            {_pct(r['recall'])}",
        f"  F1                {_num(r['f1'])}",
        f"  ROC AUC           {_num(r['roc_auc'])}",
        f"  Brier score       {_num(r['brier'], '.6f')}",
        f"  calibration error {_num(r['ece'], '.6f')} (ECE, 10 bins)",
        "  confusion            predicted 0  predicted 1",
        f"    actual 0 (neg)   {tn:>11,}  {fp:>11,}",
        f"    actual 1 (pos)   {fn:>11,}  {tp:>11,}",
        "  calibration        bin      images  mean ŷ   positive",
    ]
    for b in r["calibration"]:
        lines.append(
            f"    [{b['low']:.1f}, {b['high']:.1f}{']' if b['high'] == 1 else ')'}  {b['images']:>12,}  "
            f"{_num(b['mean_p'], '.4f'):>6}   {_num(b['positive_rate'], '.4f'):>6}"
        )
    lines.append("  most confidently wrong (index in the split's IDX file, what it is, what was predicted, ŷ):")
    if not r["most_confident_errors"]:
        lines.append("    none")
    classes = r.get("classes") or {"0": "y=0", "1": "y=1"}
    said = {y: short_word(classes[y]) for y in ("0", "1")}  # the task's words, short where long
    width = max(map(len, said.values()))  # ŷ in one column, whichever class was predicted
    for e in r["most_confident_errors"]:
        lines.append(printable(f"    #{e['index']:<6} {e.get('label') or 'digit ' + str(e['digit']):<12}  "
                               f"predicted {said[str(1 - e['y'])]:<{width}}  ŷ={e['p']:.6f}"))
    rate = f"{r['images_per_s']:,.0f} images/s" if r["images_per_s"] else "n/a"
    lines.append(f"  time              {r['seconds']:.3f} s ({rate})")
    return "\n".join(lines)
