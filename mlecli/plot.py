"""Pictures of a run: learning curves, first-layer weights, the most confident mistakes.

matplotlib is an optional extra (`pip install 'mlecli[plot]'`), drawn with the Agg
backend (no display needed). The PNGs carry no timestamp or version, so the same run
gives byte-identical files.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from mlecli import checkpoint as ckpt
from mlecli.errors import MlecliError
from mlecli.fsutil import atomic_write
from mlecli.rundir import read_metrics

MAX_UNITS = 64
DPI = 100


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise MlecliError(
            "mlecli plot needs matplotlib: pip install 'mlecli[plot]' (or pip install matplotlib)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcdefaults()
    plt.rcParams.update({"font.family": "DejaVu Sans", "svg.hashsalt": "mlecli", "figure.dpi": DPI})
    return plt


def _save(fig, path: Path) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    data = buf.getvalue()
    atomic_write(path, lambda f: f.write(data))


def curves(plt, run_dir: Path, epochs: list[dict], best_epoch: int | None, title: str, out: Path) -> Path:
    """Mean log-likelihood and accuracy per epoch, train and validation, best epoch marked."""
    from matplotlib.ticker import MaxNLocator

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
    fig.suptitle(title)
    fig.tight_layout()
    path = out / "curves.png"
    _save(fig, path)
    plt.close(fig)
    return path


def _image_shape(meta: dict, n_inputs: int) -> tuple[int, int]:
    shape = meta.get("image_shape")
    if isinstance(shape, list) and len(shape) == 2 and shape[0] * shape[1] == n_inputs:
        return int(shape[0]), int(shape[1])
    side = math.isqrt(n_inputs)
    return (side, side) if side * side == n_inputs else (1, n_inputs)


def hidden_units(plt, cp: ckpt.Checkpoint, title: str, out: Path) -> Path:
    """The first layer's weights of up to 64 units as images, on one scale centred on 0."""
    W = cp.params[0][0]
    h, w = _image_shape(cp.meta, W.shape[0])
    units = min(W.shape[1], MAX_UNITS)
    cols = math.ceil(math.sqrt(units))
    rows = math.ceil(units / cols)
    limit = float(np.percentile(np.abs(W[:, :units]), 99.5)) or 1.0
    size = 1.2 if units > 1 else 4.0
    fig, axes = plt.subplots(rows, cols, figsize=(cols * size + 1.2, rows * size + 0.8), squeeze=False)
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
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="weight (red +, blue −)")
    fig.suptitle(title)
    path = out / "hidden-units.png"
    _save(fig, path)
    plt.close(fig)
    return path


def mistakes(plt, report: dict, images: np.ndarray, out: Path) -> Path:
    """The most confidently wrong images of an evaluation, with digit, target and ŷ."""
    errors = report["most_confident_errors"]
    if not errors:
        fig, ax = plt.subplots(figsize=(6, 2))
        ax.axis("off")
        ax.text(0.5, 0.5, f"No wrong predictions on the {report['split']} split ({report['images']:,} images).",
                ha="center", va="center")
        path = out / "mistakes.png"
        _save(fig, path)
        plt.close(fig)
        return path
    cols = min(5, len(errors))
    rows = math.ceil(len(errors) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.2, rows * 2.6 + 0.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, e in zip(axes.flat, errors):
        ax.imshow(images[e["index"]], cmap="gray_r", vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(f"#{e['index']}  digit {e['digit']}\ny={e['y']}  ŷ={e['p']:.4f}", fontsize=8)
    fig.suptitle(f"Most confidently wrong: {report['split']} split, {report['checkpoint_name']} checkpoint "
                 f"(epoch {report['epoch']}), {report['task']}", fontsize=10)
    fig.tight_layout()
    path = out / "mistakes.png"
    _save(fig, path)
    plt.close(fig)
    return path


def plot_run(run_dir: Path, out: Path | None, data_dir: Path, log=lambda msg: None) -> list[Path]:
    """Write the run's PNGs into `out` (default: the run folder); return their paths."""
    plt = _pyplot()
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir
    which = "best" if (run_dir / "checkpoints" / "best.npz").exists() else "last"
    cp = ckpt.load(ckpt.resolve(run_dir, which))
    last = cp if which == "last" else ckpt.load(ckpt.resolve(run_dir, "last"))
    # only what the newest checkpoint commits: a crash may have left a record after it
    epochs = [m for m in read_metrics(run_dir, upto_step=last.meta["step"]) if m.get("kind", "epoch") == "epoch"]
    cfg = cp.config
    best = cp.meta.get("best") or {}
    title = f"{run_dir.name}: {cfg.task.describe()}, hidden {list(cfg.model.hidden)}"
    written = []
    if epochs:
        written.append(curves(plt, run_dir, epochs, best.get("epoch"), title, out))
    else:
        log(f"{run_dir} has no finished epoch yet: no curves.png")
    written.append(hidden_units(plt, cp, f"{title}: first-layer weights ({which}.npz, epoch {cp.epoch})", out))
    report_path = _evaluation(run_dir)
    if report_path is None:
        log(f"no evaluation in {run_dir}: run `mlecli evaluate {run_dir}` for mistakes.png")
    else:
        from mlecli.evaluate import read_report

        report = read_report(report_path)
        images = _split_images(cfg, report["split"], data_dir, run_dir)
        outside = [e["index"] for e in report.get("most_confident_errors", []) if e["index"] >= len(images)]
        if outside:
            raise MlecliError(f"{report_path}: image #{outside[0]} is not in the {report['split']} split's "
                              f"{len(images):,} images; the report is not this run's: evaluate again")
        written.append(mistakes(plt, report, images, out))
    return written


def _evaluation(run_dir: Path) -> Path | None:
    for name in ("eval-test-best.json", "eval-test-last.json"):
        if (run_dir / name).exists():
            return run_dir / name
    found = sorted(run_dir.glob("eval-*.json"))
    return found[0] if found else None


def _split_images(cfg, split: str, data_dir: Path, run_dir: Path) -> np.ndarray:
    from mlecli.cache import prepare

    # Never download from a URL that came with a run folder: the cache, or a built-in mirror.
    how = f"mlecli download --config {run_dir / 'config.toml'} --data-dir {data_dir}"
    splits = prepare(cfg.data.resolve(), data_dir, download="builtin", how_to_fetch=how)
    return splits["test" if split == "test" else "train"].images
