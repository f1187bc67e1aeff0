"""Training: batched gradient ascent on the summed log-likelihood, with exact resume.

`run` reads top to bottom: data, task, model, then epochs of seeded permutations cut
into batches (the last, smaller batch included), each one forward pass, one backward
pass and one ascent step θ ← θ + η ∇θ LL_batch. After each epoch: validation, metrics,
checkpoints. The helpers it uses sit just above it.

Exactness: the only randomness is `default_rng(model.seed)` for the initial weights and
one `default_rng(train.seed)` that first holds out the validation images, then draws
each epoch's permutation. A checkpoint stores that generator's state as it was before
the current epoch's permutation, and how many batches of the epoch are done, so a
resumed run replays the very same batches and ends with bit-identical weights.
"""

from __future__ import annotations

import json
import math
import platform
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mlecli import __version__, blas
from mlecli import checkpoint as ckpt
from mlecli.cache import prepare
from mlecli.config import Config, estimate_memory, physical_memory, to_toml
from mlecli.errors import CheckpointError, ConfigError, MlecliError, TrainingError
from mlecli.fsutil import atomic_write_text, folder_lock, remove_stale_temporaries
from mlecli.model import Params, init_params, layer_sizes
from mlecli.step import MEASURE_EVERY, Tally, Workspace, blas_threads, ll_and_accuracy, train_step
from mlecli.task import BinaryTask, build_task

# ---------------------------------------------------------------------------
# Run state, checkpoints and the run folder


@dataclass
class State:
    """Everything that changes during training; a checkpoint is this plus the config."""

    params: Params
    epochs_done: int = 0
    step: int = 0
    batch_in_epoch: int = 0  # batches done of epoch epochs_done + 1
    rng_state: dict = field(default_factory=dict)  # before epoch epochs_done + 1's permutation
    partial: dict = field(default_factory=lambda: {"ll": 0.0, "correct": 0, "seen": 0, "seconds": 0.0})
    metrics: list[dict] = field(default_factory=list)
    best: dict | None = None  # {"epoch", "key", "value"}


def _meta(cfg: Config, state: State, task: BinaryTask, sha256: dict) -> dict[str, Any]:
    return {
        "config": cfg.to_dict(),
        "n_inputs": task.n_inputs,
        "image_shape": list(task.train.images.shape[1:]),
        "epochs_done": state.epochs_done,
        "step": state.step,
        "batch_in_epoch": state.batch_in_epoch,
        "rng_state": state.rng_state,
        "partial": state.partial,
        "metrics": state.metrics,
        "best": state.best,
        "dataset_sha256": sha256,
        "mlecli": __version__,
        "saved": _now(),
    }


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _check_finite(params: Params, where: str) -> None:
    for i, (W, b) in enumerate(params, start=1):
        if not (np.all(np.isfinite(W)) and np.all(np.isfinite(b))):
            raise TrainingError(f"{where}: layer {i}'s weights are no longer finite")


def _write_metrics(run_dir: Path, metrics: list[dict]) -> None:
    atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in metrics))


def _manifest(cfg: Config, sha256: dict, started: str) -> dict:
    return {
        "mlecli": __version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "dataset": cfg.data.dataset,
        "dataset_sha256": sha256,
        "model_seed": cfg.model.seed,
        "train_seed": cfg.train.seed,
        "started": started,
        "resumed": [],
    }


class StopRequest:
    """Turns the first SIGINT/SIGTERM into a flag the loop checks between batches, so
    the checkpoint written on the way out holds a consistent state. A second Ctrl-C
    interrupts at once."""

    def __init__(self):
        self.signal: str | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


@dataclass
class Reporter:
    """Where training talks: `line` for epoch lines (stdout), `log` for notes (stderr)."""

    line: Callable[[str], None]
    log: Callable[[str], None]
    progress: bool  # tqdm bars (a terminal, and not --quiet)


@dataclass(frozen=True)
class Outcome:
    run_dir: Path
    epochs_done: int
    interrupted: str | None
    best: dict | None


def epoch_line(m: dict, epochs: int) -> str:
    val = (
        f"val LL {m['val_ll_mean']:.4f}/img acc {100 * m['val_acc']:.2f}%"
        if m.get("val_ll_mean") is not None
        else "no validation"
    )
    return (
        f"epoch {m['epoch']}/{epochs}  train LL {m['train_ll_mean']:.4f}/img acc {100 * m['train_acc']:.2f}%  "
        f"{val}  {m['seconds']:.1f} s  {m['images_per_s']:,.0f} img/s"
    )


def prepare_run_dir(run_dir: Path, resume: bool) -> None:
    if resume:
        if not (run_dir / "checkpoints").is_dir():
            raise CheckpointError(f"{run_dir} is not a run folder (no checkpoints/ inside); nothing to resume")
        return
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(
            f"run folder {run_dir} already exists and is not empty: resume it with --resume {run_dir}, "
            "or choose another --run-dir"
        )


def newest_checkpoint(run_dir: Path, log: Callable[[str], None]) -> ckpt.Checkpoint:
    """last.npz, or if that is unreadable the newest readable epoch checkpoint."""
    candidates = [run_dir / "checkpoints" / "last.npz"]
    candidates += sorted((p for p in ckpt.checkpoints_in(run_dir) if p.name.startswith("epoch-")), reverse=True)
    errors = []
    for path in candidates:
        if not path.exists():
            continue
        try:
            return ckpt.load(path)
        except CheckpointError as exc:
            errors.append(str(exc))
            log(f"warning: {exc}; trying an older checkpoint")
    raise CheckpointError(f"{run_dir} has no usable checkpoint to resume from ({'; '.join(errors) or 'none written'})")


RESUME_OVERRIDABLE = {"train.epochs", "train.checkpoint_every", "train.log_every"}


def resumed_config(saved: Config, overrides: tuple[str, ...]) -> Config:
    """The saved config with only the keys that cannot change the weights so far overridden."""
    from mlecli.config import apply_overrides, from_dict, parse_override

    for item in overrides:
        key = ".".join(parse_override(item)[0])
        if key not in RESUME_OVERRIDABLE:
            raise ConfigError(
                f"--set {key} cannot change when resuming (it would change the weights already trained); "
                f"allowed: {', '.join(sorted(RESUME_OVERRIDABLE))}"
            )
    return from_dict(apply_overrides(saved.to_dict(), overrides), name=saved.name)


# ---------------------------------------------------------------------------
# The training run


def run(
    cfg: Config,
    run_dir: Path,
    *,
    data_dir: Path,
    report: Reporter,
    resume_from: ckpt.Checkpoint | None = None,
) -> Outcome:
    """Train `cfg` into `run_dir` (or continue `resume_from`) and return how it ended.

    The data and the task come first: a run that cannot get its data, or does not fit
    in memory, creates no run folder (one left empty would refuse the retry)."""
    run_dir = Path(run_dir)
    data = _prepare_data(cfg, data_dir, report)
    with folder_lock(run_dir, wait=False, what=f"run folder {run_dir}"):
        try:
            outcome = _run_locked(cfg, run_dir, data, report, resume_from)
        except MlecliError as exc:
            _record_end(run_dir, "failed", str(exc))
            raise
        _record_end(run_dir, "interrupted" if outcome.interrupted else "finished")
        return outcome


@dataclass
class _Data:
    name: str  # the dataset's
    task: BinaryTask
    sha256: dict[str, str]
    rng: np.random.Generator  # the run's generator, right after the validation hold-out
    data_dir: Path


def _prepare_data(cfg: Config, data_dir: Path, report: Reporter) -> _Data:
    """The dataset (downloaded if need be), the task, and a check that training fits in memory."""
    dataset = cfg.data.resolve()
    splits = prepare(dataset, data_dir, progress=report.progress, log=report.log)
    sha256 = {**splits["train"].sha256, **splits["test"].sha256}
    rng = np.random.default_rng(cfg.train.seed)  # its first use is the validation hold-out
    task = build_task(cfg, splits, rng)
    need = estimate_memory(cfg.model.hidden, cfg.train.batch_size, cfg.model.dtype, task.n_inputs)
    have = physical_memory()
    if have and need > have:
        raise ConfigError(
            f"model.hidden = {list(cfg.model.hidden)}: training on {task.n_inputs}-pixel images would need about "
            f"{need / 2**30:.1f} GiB of memory, more than this machine's {have / 2**30:.1f} GiB"
        )
    return _Data(dataset.name, task, sha256, rng, Path(data_dir))


def _record_end(run_dir: Path, status: str, error: str | None = None) -> None:
    """Note in manifest.json how the run ended (best effort: never hides the real error)."""
    path = run_dir / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
        manifest["ended"] = {"status": status, "at": _now(), "error": error}
        atomic_write_text(path, json.dumps(manifest, indent=2) + "\n")
    except (OSError, ValueError, MlecliError):
        pass


def _run_locked(cfg, run_dir, data: _Data, report, resume_from) -> Outcome:
    dtype = np.dtype(cfg.model.dtype)
    ckpt_dir = run_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(ckpt_dir)
    remove_stale_temporaries(run_dir)
    task, sha256, rng, data_dir = data.task, data.sha256, data.rng, data.data_dir

    # Training images stay uint8 (n, n_0): each batch is converted as it is gathered.
    X = task.train.images.reshape(len(task.train), task.n_inputs)
    Y = task.train.y.astype(dtype)
    X_val = task.validation.images
    y_val = task.validation.y

    # Model and state: fresh, or exactly as the checkpoint left it.
    if resume_from is None:
        params = init_params(layer_sizes(task.n_inputs, cfg.model.hidden), np.random.default_rng(cfg.model.seed), dtype)
        state = State(params=params, rng_state=rng.bit_generator.state)
        manifest = _manifest(cfg, sha256, _now())
    else:
        meta = resume_from.meta
        ckpt.check_same_data(resume_from, data.name, sha256, data_dir, "resume with the data it was trained on")
        state = State(
            params=[(W.copy(), b.copy()) for W, b in resume_from.params],
            epochs_done=meta["epochs_done"],
            step=meta["step"],
            batch_in_epoch=meta["batch_in_epoch"],
            rng_state=meta["rng_state"],
            partial=meta["partial"],
            metrics=meta["metrics"],
            best=meta["best"],
        )
        try:
            manifest = json.loads((run_dir / "manifest.json").read_text())
        except (OSError, ValueError):
            manifest = _manifest(cfg, sha256, meta.get("saved", _now()))
        manifest.pop("ended", None)
        manifest.setdefault("resumed", []).append(
            {"at": _now(), "from": resume_from.path.name, "epochs_done": state.epochs_done, "step": state.step}
        )
    atomic_write_text(run_dir / "config.toml", to_toml(cfg))
    atomic_write_text(run_dir / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    _write_metrics(run_dir, state.metrics)

    def save(name: str) -> Path:
        _check_finite(state.params, f"not saving {name}")
        path = ckpt_dir / name
        ckpt.save(path, state.params, _meta(cfg, state, task, sha256))
        return path

    if resume_from is None:
        save("last.npz")  # epoch 0: a killed first epoch can resume from here

    n = len(X)
    bs, lr = cfg.train.batch_size, cfg.train.learning_rate
    ws = Workspace(state.params, min(bs, n))
    z_epoch = np.empty((n, 1), dtype)  # each batch's logits, measured in chunks
    batches_per_epoch = math.ceil(n / bs)
    interrupted = None
    # Overflow is caught by the finiteness check below and reported in words, once.
    with StopRequest() as stop, np.errstate(over="ignore", invalid="ignore"), blas.threads(blas_threads(bs)):
        while state.epochs_done < cfg.train.epochs and interrupted is None:
            epoch = state.epochs_done + 1
            rng.bit_generator.state = state.rng_state
            order = rng.permutation(n)
            y_epoch = Y[order]
            target = (y_epoch - dtype.type(0.5)) * dtype.type(lr)  # η (y − ½), see train_step
            p = state.partial
            tally = Tally(p["ll"], p["correct"], p["seen"])
            window = Tally()
            t_start = time.perf_counter() - p["seconds"]
            t_window = time.perf_counter()
            bar = _bar(report, epoch, cfg.train.epochs, batches_per_epoch, state.batch_in_epoch)
            measured = state.batch_in_epoch * bs  # examples whose logits are tallied
            for k in range(state.batch_in_epoch, batches_per_epoch):
                lo, hi = k * bs, min(n, (k + 1) * bs)
                train_step(state.params, ws, X, order[lo:hi], target[lo:hi], z_epoch[lo:hi], lr)
                state.step += 1
                state.batch_in_epoch = k + 1
                last_batch = k + 1 == batches_per_epoch
                stopping = stop.signal is not None and not last_batch
                record_due = cfg.train.log_every and state.step % cfg.train.log_every == 0
                if bar is not None:
                    bar.update(1)
                if (k + 1) % MEASURE_EVERY == 0 or last_batch or stopping or record_due:
                    z, y = z_epoch[measured:hi, 0], y_epoch[measured:hi]
                    _check_logits(z, epoch, measured // bs, bs, lr, ckpt_dir)
                    chunk = Tally.of(z, y)
                    tally.add(chunk)
                    window.add(chunk)
                    measured = hi
                    if bar is not None:
                        bar.set_postfix_str(
                            f"LL {tally.ll / tally.seen:.4f}/img acc {100 * tally.correct / tally.seen:.2f}%", refresh=False
                        )
                if record_due:
                    state.metrics.append(_step_record(epoch, state.step, window, time.perf_counter() - t_window))
                    _write_metrics(run_dir, state.metrics)
                    window, t_window = Tally(), time.perf_counter()
                if stopping:
                    state.partial = {"ll": tally.ll, "correct": tally.correct, "seen": tally.seen,
                                     "seconds": time.perf_counter() - t_start}
                    interrupted = stop.signal
                    break
            if bar is not None:
                bar.close()
            if interrupted is not None:
                save("last.npz")
                break

            # End of the epoch: measure, record, checkpoint.
            train_seconds = time.perf_counter() - t_start
            val_ll, val_acc = ll_and_accuracy(state.params, X_val, y_val) if len(y_val) else (None, None)
            record = {
                "kind": "epoch",
                "epoch": epoch,
                "step": state.step,
                "train_ll": tally.ll,
                "train_ll_mean": tally.ll / tally.seen,
                "train_acc": tally.correct / tally.seen,
                "val_ll_mean": val_ll,
                "val_acc": val_acc,
                "seconds": time.perf_counter() - t_start,
                "images_per_s": tally.seen / train_seconds if train_seconds > 0 else None,
            }
            state.metrics.append(record)
            state.epochs_done = epoch
            state.batch_in_epoch = 0
            state.rng_state = rng.bit_generator.state
            state.partial = {"ll": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}
            key = "val_ll_mean" if val_ll is not None else "train_ll_mean"
            improved = state.best is None or record[key] > state.best["value"]
            if improved:
                state.best = {"epoch": epoch, "key": key, "value": record[key]}
            save("last.npz")  # first, so that last.npz is always the newest checkpoint
            if epoch % cfg.train.checkpoint_every == 0 or epoch == cfg.train.epochs:
                save(f"epoch-{epoch:04d}.npz")
            if improved:
                save("best.npz")
            _write_metrics(run_dir, state.metrics)
            report.line(epoch_line(record, cfg.train.epochs))
            if stop.signal is not None:
                interrupted = stop.signal
    return Outcome(run_dir, state.epochs_done, interrupted, state.best)


def _step_record(epoch: int, step: int, w: Tally, seconds: float) -> dict:
    return {
        "kind": "step",
        "epoch": epoch,
        "step": step,
        "train_ll": w.ll,
        "train_ll_mean": w.ll / w.seen,
        "train_acc": w.correct / w.seen,
        "seconds": seconds,
        "images_per_s": w.seen / seconds if seconds > 0 else None,
    }


def _check_logits(z: np.ndarray, epoch: int, first_batch: int, bs: int, lr: float, ckpt_dir: Path) -> None:
    """Stop with advice if any logit (hence the log-likelihood) is not finite."""
    bad = np.flatnonzero(~np.isfinite(z))
    if len(bad):
        batch = first_batch + int(bad[0]) // bs + 1
        raise TrainingError(
            f"the log-likelihood became {'nan' if np.isnan(z[bad[0]]) else 'infinite'} at epoch {epoch}, "
            f"batch {batch}: train.learning_rate = {lr:g} is too large for batches of {bs} (the step grows with "
            f"the batch, since the LL is a sum); lower it. The last good checkpoint is {ckpt_dir / 'last.npz'}"
        )


def _bar(report: Reporter, epoch: int, epochs: int, total: int, done: int):
    if not report.progress:
        return None
    from tqdm import tqdm

    return tqdm(
        total=total, initial=done, desc=f"epoch {epoch}/{epochs}", unit="batch", leave=False, file=sys.stderr,
        mininterval=0.2,
    )
