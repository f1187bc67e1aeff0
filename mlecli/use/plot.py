"""Pictures of a run: learning curves, first-layer weights, the most confident mistakes.

matplotlib is an optional extra (`pip install 'mlecli[plot]'`), drawn with the Agg
backend (no display needed). The PNGs carry no timestamp or version, so the same run
gives byte-identical files.
"""

from __future__ import annotations

import io
import math
import shlex
import textwrap
from pathlib import Path

import numpy as np

from mlecli.data.cache import ensure_splits
from mlecli.run import checkpoint as ckpt
from mlecli.run.evaluate import command_for, default_report, read_report, report_name, stands
from mlecli.run.rundir import committed_epochs
from mlecli.run.task import class_words, short_word
from mlecli.safe.errors import MlecliError, printable
from mlecli.safe.files import atomic_write, remove_stale_temporaries

MAX_UNITS = 64
DPI = 100


def pyplot():
    """matplotlib.pyplot on the Agg backend with mlecli's fixed settings (the same run gives the
    same PNG bytes); one line saying how to install it if it is missing."""
    try:
        import matplotlib  # lazy: matplotlib is an optional extra
    except ImportError:
        raise MlecliError(
            "mlecli plot needs matplotlib: pip install 'mlecli[plot]' (or pip install matplotlib)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: matplotlib is an optional extra

    plt.rcdefaults()
    plt.rcParams.update({"font.family": "DejaVu Sans", "svg.hashsalt": "mlecli", "figure.dpi": DPI})
    return plt


def save_png(fig, path: Path, tight: bool = False) -> None:
    """The figure as a PNG at `path`, written atomically, with no timestamp in it; `tight`: the
    picture grows to hold every artist (a legend outside the axes is never cut off)."""
    buf = io.BytesIO()
    extra = {"bbox_inches": "tight", "pad_inches": 0.15} if tight else {}
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None}, **extra)
    data = buf.getvalue()
    atomic_write(path, lambda f: f.write(data))


def curves(plt, run_dir: Path, epochs: list[dict], best_epoch: int | None, title: str, out: Path) -> Path:
    """Mean log-likelihood and accuracy per epoch, train and validation, best epoch marked."""
    from matplotlib.ticker import MaxNLocator  # lazy: matplotlib is an optional extra

    x = [m["epoch"] for m in epochs]
    fig, (ax_ll, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label, scale in (
        (ax_ll, "ll_mean", "mean log-likelihood per image (nats)", 1.0),
        (ax_acc, "acc", "accuracy (%)", 100.0),
    ):
        train = [m.get(f"train_{key}") for m in epochs]
        ax.plot(x, [scale * v if v is not None else np.nan for v in train], "o-", color="tab:blue",
                label="training (running)")
        val = [m.get(f"val_{key}") for m in epochs]
        if any(v is not None for v in val):
            ax.plot(x, [scale * v if v is not None else np.nan for v in val], "s-", color="tab:orange",
                    label="validation")
        if best_epoch is not None:
            ax.axvline(best_epoch, color="tab:green", linestyle="--", linewidth=1, label=f"best epoch ({best_epoch})")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower right")
    ax_ll.set_title("log-likelihood (higher is better)")
    ax_acc.set_title("accuracy at ŷ ≥ 0.5")
    fig.suptitle(_wrapped(title, 11, 12))
    fig.tight_layout()
    path = out / "curves.png"
    save_png(fig, path)
    plt.close(fig)
    return path


def _image_shape(meta: dict, n_inputs: int) -> tuple[int, int]:
    shape = meta.get("image_shape")
    if isinstance(shape, list) and len(shape) == 2 and shape[0] * shape[1] == n_inputs:
        return int(shape[0]), int(shape[1])
    side = math.isqrt(n_inputs)
    return (side, side) if side * side == n_inputs else (1, n_inputs)


def _wrapped(text: str, inches: float, fontsize: float) -> str:
    """`text` broken into lines that fit a figure `inches` wide at `fontsize` points."""

    return textwrap.fill(text, width=max(20, int(inches * 72 / (0.55 * fontsize))))


def weights_name(cp: ckpt.Checkpoint) -> str:
    """The file `hidden_units` writes: hidden-units.png for a network with hidden layers;
    weights.png for logistic regression, whose one image is the weights themselves."""
    return "hidden-units.png" if cp.config.model.hidden else "weights.png"


def hidden_units(plt, cp: ckpt.Checkpoint, title: str, out: Path) -> Path:
    """The first layer's weights of up to 64 units as images, on one scale centred on 0.
    Logistic regression (weights.png): its one weight image, the colour bar saying which
    colour is evidence for which class (ink on a red pixel raises ŷ)."""
    W = cp.params[0][0]
    h, w = _image_shape(cp.meta, W.shape[0])
    total = W.shape[1]
    units = min(total, MAX_UNITS)
    cols = math.ceil(math.sqrt(units))
    rows = math.ceil(units / cols)
    limit = float(np.percentile(np.abs(W[:, :units]), 99.5)) or 1.0
    size = 1.2 if units > 1 else 4.0
    width = cols * size + 1.4
    if not cp.config.model.hidden:
        what = "logistic regression, the weight of each pixel"
    elif units < total:
        what = f"first-layer weights of units 1-{units} of {total}"
    else:
        what = f"first-layer weights of its {total} hidden units"
    title = _wrapped(f"{title}: {what}", width, 11)
    lines = title.count("\n") + 1
    head = 0.25 + 0.25 * lines  # inches above the grid for the title
    fig, axes = plt.subplots(rows, cols, figsize=(width, rows * size + 0.25 + head), squeeze=False)
    image = None
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= units:
            ax.axis("off")
            continue
        image = ax.imshow(W[:, i].reshape(h, w), cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
        if units > 1:
            ax.set_title(f"unit {i + 1}", fontsize=7)
    top = 1 - head / (rows * size + 0.25 + head)
    fig.subplots_adjust(left=0.03, right=0.82, bottom=0.03, top=top, wspace=0.08, hspace=0.3 if units > 1 else 0.0)
    bar = fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8)
    if cp.config.model.hidden:  # a hidden unit's weights are no evidence for either class by themselves
        bar.set_label("weight (red +, blue −)")
    else:
        negative, positive = (short_word(w, 18) for w in class_words(cp.config))
        bar.set_label("weight of a pixel's ink")
        bar.ax.set_title(f"red (+): evidence\nfor {positive}", fontsize=8)
        bar.ax.set_xlabel(f"blue (−): evidence\nfor {negative}", fontsize=8)
    fig.suptitle(title, fontsize=11)
    path = out / weights_name(cp)
    save_png(fig, path, tight=not cp.config.model.hidden)  # the class words under the bar stay whole
    plt.close(fig)
    return path


def mistakes(plt, report: dict, images: np.ndarray, out: Path) -> Path:
    """The most confidently wrong images of an evaluation: what each is, what the network
    predicted, and ŷ."""
    errors = report["most_confident_errors"]
    if not errors:
        fig, ax = plt.subplots(figsize=(6, 2))
        ax.axis("off")
        ax.text(0.5, 0.5, f"No wrong predictions on the {report['split']} split ({report['images']:,} images).",
                ha="center", va="center")
        path = out / "mistakes.png"
        save_png(fig, path)
        plt.close(fig)
        return path
    cols = min(5, len(errors))
    rows = math.ceil(len(errors) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.2, rows * 2.8 + 0.8), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    classes = report.get("classes") or {"0": "y=0", "1": "y=1"}
    for ax, e in zip(axes.flat, errors):
        ax.imshow(images[e["index"]], cmap="gray_r", vmin=0, vmax=255, interpolation="nearest")
        label = e.get("label") or f"digit {e['digit']}"
        said = short_word(classes[str(1 - e["y"])], width=20)
        ax.set_title(f"#{e['index']}  {label}\npredicted {said}\nŷ = {e['p']:.4f}", fontsize=8)
    task = f"{classes['1']} (y=1) vs {classes['0']} (y=0)" if report.get("classes") else report["task"]
    fig.suptitle(_wrapped(f"Most confidently wrong: {report['split']} split, {report['checkpoint_name']} "
                          f"checkpoint (epoch {report['epoch']}); {task}", cols * 2.2, 10), fontsize=10)
    fig.tight_layout()
    path = out / "mistakes.png"
    save_png(fig, path)
    plt.close(fig)
    return path


def plot_run(run_dir: Path, out: Path | None, data_dir: Path, log=lambda msg: None) -> list[Path]:
    """Write the run's PNGs into `out` (default: the run folder); return their paths."""
    plt = pyplot()
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir
    remove_stale_temporaries(out)  # an earlier plot's, if it was killed mid-write
    which = "best" if (run_dir / "checkpoints" / "best.npz").exists() else "last"
    cp = ckpt.load(ckpt.resolve(run_dir, which))
    last = cp if which == "last" else ckpt.load(ckpt.resolve(run_dir, "last"))
    # only what the newest checkpoint commits: a crash may have left a record after it
    epochs = committed_epochs(run_dir, last.meta, last.path)
    cfg = cp.config
    best = cp.meta.get("best") or {}
    negative, positive = class_words(cfg)
    network = f"hidden {list(cfg.model.hidden)}" if cfg.model.hidden else "logistic regression"
    task = printable(f"{run_dir.name}: {positive} vs {negative}")  # a name may not be UTF-8
    written = []
    if epochs:
        written.append(curves(plt, run_dir, epochs, best.get("epoch"), f"{task}, {network}", out))
    else:
        log(f"{run_dir} has no finished epoch yet: no curves.png")
    # the weights' own title says what the network is: logistic regression is named once
    units = f"{task}, {network}" if cfg.model.hidden else task
    written.append(hidden_units(plt, cp, f"{units} ({which}.npz, epoch {cp.epoch})", out))
    report_path, stale = _evaluation(run_dir)
    if report_path is None:
        old = out / "mistakes.png"
        removed = None
        if stale is not None and old.is_file():  # an earlier plot's picture of that report: stale as well
            old.unlink()
            removed = old
        log(_no_mistakes(run_dir, stale, removed))
    else:

        report = read_report(report_path)
        images = _split_images(cfg, report["split"], data_dir, run_dir)
        outside = [e["index"] for e in report.get("most_confident_errors", []) if e["index"] >= len(images)]
        if outside:
            raise MlecliError(f"{report_path}: image #{outside[0]} is not in the {report['split']} split's "
                              f"{len(images):,} images; the report is not this run's: evaluate again")
        written.append(mistakes(plt, report, images, out))
    return written


def _evaluation(run_dir: Path) -> tuple[Path | None, Path | None]:
    """The report mistakes.png is drawn from: the run's default report (evaluate.default_report),
    else another that still stands for the checkpoint it names (evaluate.stands: the rule
    `runs`, the sweep's table and the page's footer follow). Else (None, the report that
    would have been used but is stale), or (None, None) when there is none."""
    default = default_report(run_dir)
    if default is not None:
        return default, None
    preferred = [run_dir / report_name("test", "best"), run_dir / report_name("test", "last")]
    found = [p for p in preferred if p.is_file()] + [p for p in sorted(run_dir.glob("eval-*.json"))
                                                      if p not in preferred]
    for path in found:
        if stands(path, run_dir):
            return path, None
    return None, (found[0] if found else None)


def _no_mistakes(run_dir: Path, stale: Path | None, removed: Path | None) -> str:
    """Why there is no mistakes.png, and the command that makes one."""
    if stale is None:
        return f"no evaluation in {run_dir}: run `mlecli evaluate {shlex.quote(str(run_dir))}` for mistakes.png"
    report = read_report(stale)
    name, then = report["checkpoint_name"], report["epoch"]
    path = run_dir / "checkpoints" / f"{name}.npz"
    try:
        epoch = ckpt.load(path).epoch if path.is_file() else None
        now = "gone" if epoch is None else f"epoch {epoch}" if epoch != then else "another file of that epoch"
    except MlecliError:
        now = "no longer readable"
    gone = f"; removed the earlier {removed}" if removed is not None else ""
    return (f"{stale} measured {name}.npz at epoch {then}, and {name}.npz is now {now}: no mistakes.png"
            f"{gone}; run `{command_for(report, run_dir)}` to make it current")


def _split_images(cfg, split: str, data_dir: Path, run_dir: Path) -> np.ndarray:

    # Never download from a URL that came with a run folder: the cache, or a built-in mirror.
    config = shlex.quote(str(run_dir / "config.toml"))
    how = f"mlecli download --config {config} --data-dir {shlex.quote(str(data_dir))}"
    splits = ensure_splits(cfg.data.resolve(), data_dir, download="builtin", how_to_fetch=how)
    return splits["test" if split == "test" else "train"].images
