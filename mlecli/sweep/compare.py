"""Runs side by side per grid point: the sweep's table (mean ± standard deviation over
seeds) and compare.png (validation curves, a line for the mean over seeds, a band for
their spread).

A grid point is a group of runs whose configs differ in nothing but the seeds: in a
sweep, one per combination of grid values; for run folders given by hand, the same rule
finds the groups, labelled by the keys in which they differ. Figures of different tasks
(another dataset, other classes) are never ranked against each other: the best point is
marked within each task, and a sweep over tasks shows each one's majority baseline.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mlecli.nn import metrics
from mlecli.run import checkpoint as ckpt
from mlecli.run import config as config_mod
from mlecli.run.config import Config
from mlecli.run.rundir import committed_epochs
from mlecli.run.task import validation_counts
from mlecli.safe.errors import MlecliError, display
from mlecli.safe.schema import is_number
from mlecli.sweep.grid import Plan, config_keys, format_seeds, show
from mlecli.sweep.record import config_difference, expected_configs, read_sweep_json
from mlecli.sweep.runs import run_row
from mlecli.use.plot import pyplot, save_png

# ---------------------------------------------------------------------------
# The sweep's table


def summary(p: Plan, sweep_dir: Path, errors: dict[str, str] | None = None,
            train_labels: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Every run's figures (as `mlecli runs` reads them) and, per grid point, their mean and
    standard deviation over the seeds that finished; the best point of each task by mean
    validation LL, and each point's majority baseline (`validation_majority`) where
    `train_labels` (`data_key` → the dataset's training labels) has its dataset.
    `errors` (run name → message) overrides what a run folder says about how it ended."""

    errors = errors or {}
    train_labels = train_labels or {}
    runs = []
    for r in p.runs:
        row = run_row(Path(sweep_dir) / r.name) if (Path(sweep_dir) / r.name).exists() else None
        status = row["status"] if row else "not started"
        error = errors.get(r.name) or (row["problem"] if row and status in ("failed", "broken") else None)
        if r.name in errors:
            status = "failed"
        runs.append({
            "run_dir": str(Path(sweep_dir) / r.name),
            "values": {k: v for k, v in r.point},
            "seed": r.seed,
            "status": status,
            "epochs_done": row["epochs_done"] if row else None,
            "epochs": r.config.train.epochs,
            "best_epoch": row.get("best_epoch") if row else None,
            "val_ll": row["val_ll"] if row else None,
            "val_acc": row["val_acc"] if row else None,
            "test_acc": row["test_acc"] if row else None,
            "error": error,
        })
    points = []
    row = {r.name: x for r, x in zip(p.runs, runs)}
    groups = [[row[r.name] for r in group] for group in p.runs_of()]
    configs = [group[0].config for group in p.runs_of()]
    tasks = [task_of(cfg) for cfg in configs]
    best = best_of_each_task(groups, tasks)
    for i, (point, mine, cfg) in enumerate(zip(p.points(), groups, configs)):
        done = [x for x in mine if x["status"] == "finished"]
        labels = train_labels.get(data_key(cfg))
        points.append({
            "values": {k: v for k, v in point},
            "task": cfg.task.describe(),
            "runs": len(mine),
            "finished": len(done),
            **{key: spread([x[key] for x in done]) for key in ("val_ll", "val_acc", "test_acc")},
            "majority": validation_majority(cfg, labels) if labels is not None else None,
            "best": i in best,
        })
    return json.loads(json.dumps({
        "sweep_dir": str(sweep_dir),
        "grid": {a.key: list(a.values) for a in p.axes},
        "seeds": list(p.seeds),
        "tasks": len(set(tasks)),
        "points": points,
        "runs": runs,
    }))


def data_key(cfg: Config) -> str:
    """Which dataset files a config trains on (its [data] but the validation share)."""
    return json.dumps({k: v for k, v in cfg.to_dict()["data"].items() if k != "validation"}, sort_keys=True)


def task_of(cfg: Config) -> tuple:
    """What a run's figures measure: its dataset and its two classes. Figures of two tasks
    are not better or worse than each other: a task with a larger majority class is easier."""
    return data_key(cfg), tuple(sorted(cfg.task.positive)), tuple(sorted(cfg.task.negative_digits))


def validation_majority(cfg: Config, train_labels: np.ndarray) -> float | None:
    """The share of the larger class among the run's validation images: the accuracy of always
    answering it, the baseline its validation accuracy beats. The validation hold-out takes a
    fixed count of each digit (task.validation_counts), whatever the seed; None without one."""
    positive, negative = cfg.task.positive, cfg.task.negative_digits
    per_digit = {d: int(np.count_nonzero(train_labels == d)) for d in sorted((*positive, *negative))}
    if not cfg.data.validation:
        return None
    counts = validation_counts(per_digit, cfg.data.validation)
    pos, neg = sum(counts[d] for d in positive), sum(counts[d] for d in negative)
    return max(pos, neg) / (pos + neg) if pos + neg else None


def best_of_each_task(groups: list[list[dict[str, Any]]], tasks: list) -> set[int]:
    """The best grid point (`best_point`) among those of each task: `tasks[i]` is point i's."""
    best = set()
    for task in dict.fromkeys(tasks):
        mine = [i for i, t in enumerate(tasks) if t == task]
        found = best_point([groups[i] for i in mine])
        if found is not None:
            best.add(mine[found])
    return best


def best_point(groups: list[list[dict[str, Any]]]) -> int | None:
    """Which grid point is the best, given each point's runs as `mlecli runs` rows (their
    status and best validation LL): the highest mean over its finished runs of each run's
    best validation LL, the figure training maximises. None with one point, or none with
    a figure. The sweep's table and compare.png both mark the one this gives."""
    means = [spread([r["val_ll"] for r in rows if r["status"] == "finished"]) for rows in groups]
    ranked = [(m["mean"], i) for i, m in enumerate(means) if m is not None]
    if len(groups) < 2 or not ranked:
        return None
    return max(ranked, key=lambda t: t[0])[1]  # the first of equals


def spread(values: list[float | None]) -> dict[str, Any] | None:
    """Mean and sample standard deviation (n − 1) of the known values; None if there are none."""
    known = [v for v in values if v is not None and math.isfinite(v)]
    if not known:
        return None
    return {"mean": statistics.fmean(known), "std": statistics.stdev(known) if len(known) > 1 else None,
            "n": len(known)}


def format_summary(s: dict[str, Any], notes: bool = True) -> str:
    """The table: one row per grid point, the best of each task marked; over several tasks,
    each one's majority baseline beside its validation accuracy. `notes`: the lines under it
    saying what the columns are."""
    keys = list(s["grid"]) or ["grid point"]
    tasks = s.get("tasks", 1) > 1
    headers = [*keys, "runs", "best val LL", "best val acc", *(["majority"] if tasks else []), "test acc", ""]
    body = [[
        *(show(pt["values"][k]) for k in s["grid"]), *([] if s["grid"] else ["the config"]),
        f"{pt['finished']}/{pt['runs']}",
        _pm(pt["val_ll"], 1, 4, ""),
        _pm(pt["val_acc"], 100, 2, "%"),
        *([metrics.shown(pt.get("majority"), "%", missing="-")] if tasks else []),
        _pm(pt["test_acc"], 100, 2, "%"),
        ("<- best of its task" if tasks else "<- best") if pt["best"] else "",
    ] for pt in s["points"]]
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *body)]
    right = range(len(keys) + 1, len(headers) - 1)  # the figures

    def line(row: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    lines = [line(headers), line(["-" * w for w in widths[:-1]] + [""]), *map(line, body)]
    if not notes:
        return "\n".join(lines)
    seeds = tuple(s["seeds"])
    over = (f"mean ± standard deviation over seeds {format_seeds(seeds)} of each run's" if len(seeds) > 1
            else f"seed {format_seeds(seeds)}: each run's")
    lines.append(f"runs: finished/all; {over} best epoch (by validation LL); test acc: that epoch's checkpoint")
    if tasks:
        lines.append("majority: the share of the task's larger class among its validation images, the accuracy of "
                     "always answering it; the best is marked within each task, never across tasks")
    return "\n".join(lines)


def _pm(stat: dict[str, Any] | None, scale: float, digits: int, unit: str) -> str:
    if stat is None:
        return "-"
    mean = f"{scale * stat['mean']:.{digits}f}"
    if stat["std"] is None:
        return f"{mean}{unit}"
    return f"{mean} ± {scale * stat['std']:.{digits}f}{unit}"


# ---------------------------------------------------------------------------
# compare.png

# Keys that never make two runs different grid points.
SEED_LIKE = {"name", "model.seed", "train.seed", "train.checkpoint_every", "train.log_every"}


@dataclass
class Group:
    label: str
    runs: list[Path]
    epochs: list[list[dict[str, Any]]]  # each run's epoch records
    rows: list[dict[str, Any]] = field(default_factory=list)  # each run as `mlecli runs` describes it
    best: bool = False
    by_hand: bool = True  # its runs were given as run folders, not found in a sweep folder
    task: tuple = ()  # task_of its runs' config: the best is marked within each task

    def legend(self) -> str:
        """How many runs (and seeds) the curves stand for, and how many have not finished."""
        seeds = {(r["config"]["model"]["seed"], r["config"]["train"]["seed"]) if r["config"] else None
                 for r in self.rows}
        n, unfinished = len(self.runs), sum(r["status"] != "finished" for r in self.rows)
        counted = f"{n} seed{'s' if n != 1 else ''}" if len(seeds) == n else \
            f"{n} run{'s' if n != 1 else ''}, {len(seeds)} seed{'s' if len(seeds) != 1 else ''}"
        return counted + (f", {unfinished} unfinished" if unfinished else "")


def collect(targets: list[Path]) -> tuple[list[Group], str]:
    """The groups of runs in `targets` (sweep folders and run folders, in order) and a
    title; raises MlecliError if there is nothing to draw. The best group of each task is the one
    `best_of_each_task` gives, from the same figures as the sweep's table."""

    runs: list[tuple[Path, dict[str, Any], dict[str, Any]]] = []
    in_sweep: set[Path] = set()
    tasks: dict[Path, tuple] = {}
    key_order: list[str] = []
    sweeps = 0
    for target in targets:
        target = Path(target)
        data = read_sweep_json(target) if target.is_dir() else None
        if data is not None:
            sweeps += 1
            key_order += [g["key"] for g in data["grid"] if g["key"] not in key_order]
            folders = list(expected_configs(target, data).items())
        elif (target / "config.toml").is_file():
            folders = [(target, None)]
        else:
            raise MlecliError(f"{target} is neither a run folder (no config.toml) nor a sweep folder (no sweep.json)")
        for folder, expected in folders:
            if not (folder / "config.toml").is_file():
                continue  # a sweep's run that has not started yet
            row = run_row(folder)
            if expected is not None:
                in_sweep.add(folder)
            if expected is not None and row["config"] is not None and row["status"] == "finished":

                if config_difference(config_mod.from_dict(row["config"], name=row["config"]["name"]), expected):
                    row = {**row, "status": "not the sweep's"}  # the sweep's table counts it out too
            loaded = config_mod.load(folder / "config.toml")
            tasks[folder] = task_of(loaded)
            runs.append((folder, loaded.to_dict(), row))
    if not runs:
        raise MlecliError(f"no run in {', '.join(map(str, targets))} has started yet: nothing to compare")
    flat = [{k: json.dumps(v, sort_keys=True) for k, v in config_keys(cfg).items()} for _, cfg, _ in runs]
    keys = sorted({k for f in flat for k in f} - SEED_LIKE)
    varying = [k for k in keys if len({f.get(k) for f in flat}) > 1]
    varying = [k for k in key_order if k in varying] + [k for k in varying if k not in key_order]
    groups: dict[tuple, Group] = {}
    for (folder, cfg, row), f in zip(runs, flat):
        key = tuple(f.get(k) for k in varying)
        if key not in groups:
            label = ", ".join(f"{k.rsplit('.', 1)[-1]}={show(json.loads(v)) if v is not None else '-'}"
                              for k, v in zip(varying, key)) or cfg["name"]
            groups[key] = Group(label, [], [], task=tasks[folder])
        groups[key].runs.append(folder)
        groups[key].by_hand = groups[key].by_hand and folder not in in_sweep
        if row["status"] == "broken":  # its row says why; it has no curve to draw
            groups[key].epochs.append([])
        else:
            last = ckpt.load(folder / "checkpoints" / "last.npz")
            groups[key].epochs.append(committed_epochs(folder, last.meta, last.path))
        groups[key].rows.append(row)
    ordered = list(groups.values())
    _name_single_runs(ordered)
    for best in best_of_each_task([g.rows for g in ordered], [g.task for g in ordered]):
        ordered[best].best = True
    title = Path(targets[0]).name if len(targets) == 1 and sweeps == 1 else f"{len(runs)} runs"
    return ordered, title


def _name_single_runs(groups: list[Group]) -> None:
    """A group of one run given by hand is labelled by the run's name (its folder's), not by
    the keys it differs in: those are the sweep's grid values, or a mouthful for runs made by
    hand. Runs of the same name in different folders are labelled by their paths."""
    single = [g for g in groups if g.by_hand and len(g.runs) == 1]
    names = [display(g.runs[0].name) for g in single]
    for g, name in zip(single, names):
        g.label = name if names.count(name) == 1 else display(str(g.runs[0]))


def _finite(v: Any) -> bool:

    return is_number(v)


def band(runs: list[list[dict[str, Any]]], key: str) -> tuple[list[int], list[float], list[float], list[float]]:
    """Per epoch that any run reached: the epoch, and the mean, lowest and highest of
    `key` over the runs that have it."""
    by_epoch: dict[int, list[float]] = {}
    for records in runs:
        for m in records:
            if _finite(m.get(key)):
                by_epoch.setdefault(int(m["epoch"]), []).append(float(m[key]))
    x = sorted(by_epoch)
    return x, [statistics.fmean(by_epoch[e]) for e in x], [min(by_epoch[e]) for e in x], [max(by_epoch[e]) for e in x]


def legend_label(g: Group, tasks: int = 1) -> str:
    """A group in the legend: its label, how many runs and seeds (not for a run alone that
    finished), and the best mark (`← best of its task` when the groups span `tasks` > 1)."""
    counted = g.legend()
    alone = len(g.runs) == 1 and counted == "1 seed"
    mark = ("  ← best of its task" if tasks > 1 else "  ← best") if g.best else ""
    return f"{g.label}{'' if alone else f' ({counted})'}{mark}"


def figure(plt, groups: list[Group], title: str):
    """compare.png's figure: mean log-likelihood per image and accuracy per epoch, validation
    (or, for runs without validation, training), one colour per group, its mean over seeds as
    a line and the lowest to highest seed as a band (the title says so when a group has
    several runs); the legend under the panels."""
    from matplotlib.ticker import MaxNLocator  # lazy: matplotlib is an optional extra

    validation = any(_finite(m.get("val_ll_mean")) for g in groups for e in g.epochs for m in e)
    which = "val" if validation else "train"
    fig, (ax_ll, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.8))
    if len(groups) <= 10:
        colours = list(plt.get_cmap("tab10").colors)
    else:
        cmap = plt.get_cmap("viridis")
        colours = [cmap(i / (len(groups) - 1)) for i in range(len(groups))]
    tasks = len({g.task for g in groups})
    for g, colour in zip(groups, colours):
        label = legend_label(g, tasks)
        for ax, key, scale in ((ax_ll, f"{which}_ll_mean", 1.0), (ax_acc, f"{which}_acc", 100.0)):
            x, mean, lo, hi = band(g.epochs, key)
            if not x:
                continue
            ax.fill_between(x, [scale * v for v in lo], [scale * v for v in hi], color=colour, alpha=0.2, linewidth=0)
            ax.plot(x, [scale * v for v in mean], "o-", color=colour, markersize=3, linewidth=1.6, label=label)
    where = "validation" if validation else "training (running)"
    for ax, ylabel in ((ax_ll, f"{where} mean log-likelihood per image (nats)"), (ax_acc, f"{where} accuracy (%)")):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    ax_ll.set_title("log-likelihood (higher is better)")
    ax_acc.set_title("accuracy at ŷ ≥ 0.5")
    seeds = any(len(g.runs) > 1 for g in groups)
    fig.suptitle(f"{title}: line = mean over seeds, band = lowest to highest seed" if seeds else title)
    fig.tight_layout()
    handles, labels = ax_ll.get_legend_handles_labels()
    if labels:
        longest = max(map(len, labels))
        columns = min(len(labels), 3 if longest <= 36 else 2 if longest <= 60 else 1)
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=columns, fontsize=9,
                   frameon=False)
    return fig


def draw(groups: list[Group], title: str, out: Path) -> Path:
    """Write compare.png into `out`; the picture grows to hold the legend whole."""
    plt = pyplot()
    fig = figure(plt, groups, title)
    path = Path(out) / "compare.png"
    save_png(fig, path, tight=True)
    plt.close(fig)
    return path


def default_out(targets: list[Path]) -> Path:
    """Where compare.png goes without --out: the sweep folder for one target, else the folder
    that holds all the targets (their common parent), as a path relative to the current
    folder when it is inside it. Folders with nothing in common but / need --out."""
    if len(targets) == 1:
        return Path(targets[0])
    parents = [os.path.dirname(os.path.abspath(t)) for t in targets]
    common = os.path.commonpath(parents)
    if common == os.path.abspath(os.sep):
        raise MlecliError(f"{', '.join(map(str, targets))} have no folder in common but {os.sep}: give --out DIR "
                          "for compare.png")
    here = os.getcwd()
    inside = common == here or common.startswith(here.rstrip(os.sep) + os.sep)
    return Path(os.path.relpath(common, here) if inside else common)


def plot_compare(targets: list[Path], out: Path | None) -> Path:
    """Draw compare.png for `targets` into `out` (default: `default_out`)."""
    groups, title = collect(targets)
    return draw(groups, title, default_out(targets) if out is None else out)
