"""Training: batched gradient ascent on the summed log-likelihood, with exact resume.

The file reads top to bottom, like a script: what a run's state is and what a checkpoint
holds, where training reports, the data and the run folder, then the three phases of a
run, each a function on a screen, just above the loop that calls them:

- phase 1, `_open`: open a new run (its first checkpoint, epoch 0, written at once) or
  restore one from the checkpoint its resume goes on from (resume.py decides which,
  checks that it fits the run and repairs what a crash left half-done after it);
- phase 2, `_train_epoch`: one epoch, from where a stopped run left it: a seeded
  permutation cut into batches, the last smaller batch included; each batch one forward
  pass, one backward pass and one step of the update rule up the batch's log posterior,
  at the learning rate the schedule gives for that step (`get_lr`);
- phase 3, `_end_epoch`: the end of an epoch: validation, the metrics record, the
  watches of plateau, early stopping and divergence, and the commit: `last.npz`, then its
  copies.

`_train` is the loop: phase 1, then phases 2 and 3 epoch after epoch, until the run is
done or a signal stops it (signals.py), and how it ended into manifest.json. `run`, at the
bottom, is the whole of it: get the data and the task, claim the run folder, train; for a
resume, `_resume` just above it decides what the run goes on from once the folder is
claimed (a finished run: nothing to train, nothing written).

Exactness: the only randomness is `default_rng(model.seed)` for the initial weights and
one `default_rng(train.seed)` that first holds out the validation images, then draws
each epoch's permutation (and, with shifted digits, each image's shift). A checkpoint
stores that generator's state as it was before the current epoch's draws, how many
batches of the epoch are done, the update rule's state (arrays `opt.…`) and the
watches' (the plateau's scale of η among them), so a resumed run replays the very same
batches at the very same learning rates and ends with bit-identical weights.

Crash consistency (see rundir.py): `last.npz` is the commit record. Metrics lines are
appended and synced before it is renamed in; `epoch-NNNN.npz` and `best.npz` are byte
copies of it written after. Opening a run again cuts metrics.jsonl back to what the
checkpoint covers and writes the copies that were due (resume.py's `repair`), so a
crash between any two writes resumes into exactly the files of an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import shlex
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mlecli.data.cache import ensure_splits, split_hashes
from mlecli.nn import blas, optim
from mlecli.nn.model import Params, init_params, layer_sizes, log_prior
from mlecli.nn.pixels import draw_offsets, pad_images
from mlecli.nn.schedule import Watch, after_epoch, base_rate, diverged, learning_rate, stop_early
from mlecli.nn.step import MEASURE_EVERY, Tally, Workspace, blas_threads, ll_and_accuracy, train_step
from mlecli.run import checkpoint as ckpt
from mlecli.run import resume, rundir
from mlecli.run.config import STATE_SLOTS, Config, rate_advice, to_toml
from mlecli.run.signals import StopNow, StopRequest
from mlecli.run.task import BinaryTask, build_task
from mlecli.safe.errors import CheckpointError, MlecliError, TrainingError
from mlecli.safe.files import Appender, atomic_write_bytes, atomic_write_text, cannot_write
from mlecli.safe.resources import NoRoom, check_fits, checkpoint_bytes, fmt_bytes, free_space
from mlecli.version import __version__

# ---------------------------------------------------------------------------
# Run state and what a checkpoint holds


def _fresh_partial() -> dict:
    return {"ll": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}


@dataclass
class State:
    """Everything that changes during training; a checkpoint is this plus the config."""

    params: Params
    epochs_done: int = 0
    step: int = 0
    batch_in_epoch: int = 0  # batches done of epoch epochs_done + 1
    rng_state: dict = field(default_factory=dict)  # before epoch epochs_done + 1's permutation
    partial: dict = field(default_factory=_fresh_partial)  # the tally of a stopped epoch's batches
    best: dict | None = None  # {"epoch", "key", "value", "record": that epoch's figures}
    opt_state: optim.State = field(default_factory=dict)  # the update rule's arrays
    watch: Watch = field(default_factory=Watch)  # plateau and divergence, epoch to epoch
    stopped_early: dict | None = None  # {"epoch", "best_epoch"} once early stopping ended the run
    # A stop between measurements keeps the logits not yet measured (partial["measured"] on),
    # so the epoch's sums are grouped as in a run never stopped: the same bits.
    pending_z: np.ndarray = field(default_factory=lambda: np.empty(0))


TIMING_KEYS = ("seconds", "images_per_s")  # wall-clock figures: in metrics.jsonl, never in a checkpoint's best


def _meta(cfg: Config, state: State, task: BinaryTask, sha256: dict) -> dict[str, Any]:
    """The checkpoint's meta record. At an epoch's end it holds no wall-clock time, so the
    same training state always gives the same bytes."""
    return {
        "config": cfg.to_dict(),
        "n_inputs": task.n_inputs,
        "image_shape": list(task.train.images.shape[1:]),
        "epochs_done": state.epochs_done,
        "step": state.step,
        "batch_in_epoch": state.batch_in_epoch,
        "rng_state": state.rng_state,
        "partial": state.partial,
        "best": state.best,
        "watch": state.watch.to_dict(),
        "stopped_early": state.stopped_early,
        "dataset_sha256": sha256,
        "blas": rundir.blas_info(cfg),
        "mlecli": __version__,
    }


def _check_finite(params: Params, where: str) -> None:
    for i, (W, b) in enumerate(params, start=1):
        if not (np.all(np.isfinite(W)) and np.all(np.isfinite(b))):
            raise TrainingError(f"{where}: layer {i}'s weights are no longer finite")



def _restore(cp: ckpt.Checkpoint, rule: optim.Rule) -> State:
    """The state a checkpoint holds. Format 1 (mlecli 0.1, plain sgd) has no update-rule
    state or watches: it resumes as sgd, which is what its config says."""
    meta = cp.meta
    best = meta.get("best")
    if best is not None and "record" not in best:  # format 1: the figures are in its metrics history
        record = next((m for m in meta.get("metrics", []) if m.get("kind", "epoch") == "epoch"
                       and m.get("epoch") == best["epoch"]), {})
        best = {**best, "record": {k: v for k, v in record.items() if k not in TIMING_KEYS}}
    params = [(W.copy(), b.copy()) for W, b in cp.params]
    pending = cp.extra.get("loop.z", np.empty(0, params[0][0].dtype))
    try:
        if pending.ndim != 1 or pending.dtype != params[0][0].dtype or not np.all(np.isfinite(pending)):
            raise ValueError(f"its array loop.z is {pending.dtype} {pending.shape}, not finite logits of the network")
        opt_state = rule.from_arrays({k: v for k, v in cp.extra.items() if k.startswith("opt.")}, params)
        watch = Watch.from_dict(meta.get("watch"))
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{cp.path}: {exc}; it cannot be resumed") from None
    return State(
        params=params,
        epochs_done=meta["epochs_done"],
        step=meta["step"],
        batch_in_epoch=meta["batch_in_epoch"],
        rng_state=meta["rng_state"],
        partial=meta["partial"],
        best=best,
        opt_state=opt_state,
        watch=watch,
        stopped_early=meta.get("stopped_early"),
        pending_z=pending.copy(),
    )


def make_rule(cfg: Config) -> optim.Rule:
    t = cfg.train
    return optim.make(t.optimizer, momentum=t.momentum, beta1=t.beta1, beta2=t.beta2, eps=t.epsilon)



# ---------------------------------------------------------------------------
# How training reports and how it ended


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
    interrupted: str | None  # the signal that stopped the run, if one did
    best: dict | None
    at_once: bool = False  # a second signal: the position since the last checkpoint was not saved
    resume_point: tuple[int, int] = (0, 0)  # (epochs done, batches of the next) in last.npz
    stopped_early: dict | None = None  # {"epoch", "best_epoch", "patience"}: early stopping ended the run
    stopped_at: tuple[int, int] | None = None  # (epochs done, batches of the next) where a signal stopped it
    batches: int = 0  # of an epoch
    already_finished: str | None = None  # a resume of a run with nothing left to train: what to say instead


def epoch_line(m: dict, epochs: int) -> str:
    val = (
        f"val LL {m['val_ll_mean']:.4f}/img acc {100 * m['val_acc']:.2f}%"
        if m.get("val_ll_mean") is not None
        else "no validation"
    )
    rate = f"{m['images_per_s']:,.0f} img/s" if m.get("images_per_s") else "- img/s"
    return (
        f"epoch {m['epoch']}/{epochs}  train LL {m['train_ll_mean']:.4f}/img acc {100 * m['train_acc']:.2f}%  "
        f"{val}  {m['seconds']:.1f} s  {rate}"
    )



# ---------------------------------------------------------------------------
# The data, and the room the run needs: before any run folder is made


@dataclass
class _Data:
    name: str  # the dataset's
    task: BinaryTask
    sha256: dict[str, str]
    rng: np.random.Generator  # the run's generator, right after the validation hold-out
    data_dir: Path


def _prepare_data(cfg: Config, data_dir: Path, report: Reporter, resumed: Path | None) -> _Data:
    """The dataset (downloaded if need be), the task, and a check that training fits in memory.

    A resumed run's config came out of its folder, not from the user: its custom
    dataset is taken from the cache only, never from the URL the folder names."""
    dataset = cfg.data.resolve(data_dir)
    if resumed is None:
        splits = ensure_splits(dataset, data_dir, progress=report.progress, log=report.log)
    else:
        fetch = (f"mlecli download --config {shlex.quote(str(resumed / 'config.toml'))} "
                 f"--data-dir {shlex.quote(str(data_dir))}")
        splits = ensure_splits(dataset, data_dir, download="builtin", how_to_fetch=fetch, progress=report.progress,
                         log=report.log)
    sha256 = split_hashes(splits)
    rng = np.random.default_rng(cfg.train.seed)  # its first use is the validation hold-out
    task = build_task(cfg, splits, rng)
    check_fits(cfg.model.hidden, cfg.train.batch_size, cfg.model.dtype, task.n_inputs,
                      STATE_SLOTS[cfg.train.optimizer])
    return _Data(dataset.name, task, sha256, rng, Path(data_dir))


def _check_room(cfg: Config, data: _Data, folder: Path, epochs_done: int) -> None:
    """Refuse a run whose checkpoints (last, best and every checkpoint_every-th epoch's,
    the last epoch's always) cannot fit on the disk it writes to, before it starts."""
    t = cfg.train
    kept = max(0, t.epochs // t.checkpoint_every - epochs_done // t.checkpoint_every) + (
        1 if t.epochs % t.checkpoint_every and t.epochs > epochs_done else 0)
    size = checkpoint_bytes(cfg.model.hidden, cfg.model.dtype, data.task.n_inputs, STATE_SLOTS[t.optimizer])
    need, free = (kept + 2) * size, free_space(folder)
    if free is not None and need > free:
        raise NoRoom(
            f"train.epochs = {t.epochs} with train.checkpoint_every = {t.checkpoint_every} keeps {kept:,} more "
            f"epoch checkpoints of about {fmt_bytes(size)} ({fmt_bytes(need)} with last and best) in {folder}, only "
            f"{fmt_bytes(free)} is free there: raise train.checkpoint_every (only every N-th epoch is kept), train "
            "fewer epochs, or free some space"
        )


def _make_folder(run_dir: Path) -> bool:
    """Create the run folder if it is not there; return whether this call created it."""
    try:
        run_dir.mkdir(parents=True)
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        raise MlecliError(cannot_write(exc, run_dir)) from None


# ---------------------------------------------------------------------------
# An open run, and what every epoch of it shares


@dataclass
class _Run:
    """An open run: its config, folder, data and state, and where its metrics go."""

    cfg: Config
    dir: Path
    data: _Data
    state: State
    rule: optim.Rule = field(default_factory=optim.Sgd)
    metrics: Appender | None = None
    committed: tuple[int, int] = (0, 0)  # (epochs_done, batch_in_epoch) of last.npz

    @property
    def ckpt_dir(self) -> Path:
        return self.dir / "checkpoints"

    def commit(self, copies: tuple[str, ...] = ()) -> None:
        """Make the current state the run's truth: metrics synced, then last.npz renamed
        in (the commit), then its byte copies (`copies`, e.g. best.npz)."""
        _check_finite(self.state.params, "not saving last.npz")
        if self.metrics is not None:
            self.metrics.sync()
        meta = _meta(self.cfg, self.state, self.data.task, self.data.sha256)
        extra = self.rule.to_arrays(self.state.opt_state)
        if len(self.state.pending_z):
            extra["loop.z"] = self.state.pending_z
        data = ckpt.save(self.ckpt_dir / "last.npz", self.state.params, meta, extra=extra)
        self.committed = (self.state.epochs_done, self.state.batch_in_epoch)
        for name in copies:
            atomic_write_bytes(self.ckpt_dir / name, data)



class _Loop:
    """What every epoch of a run shares: the training arrays, the update rule bound to the
    weights and the step's buffers."""

    def __init__(self, run: _Run):
        task, dtype, t = run.data.task, np.dtype(run.cfg.model.dtype), run.cfg.train
        # Training images stay uint8 (n, n_0): each batch is converted as it is gathered;
        # with shifted digits, from zero-padded copies (n, (H+2k)(W+2k)).
        self.X = task.train.images.reshape(len(task.train), task.n_inputs)
        self.shifted = (pad_images(task.train.images, t.shift).reshape(len(task.train), -1)
                        if t.shift else None)
        self.Y = task.train.y.astype(dtype)
        self.n = len(self.X)
        self.bs = t.batch_size
        self.batches = math.ceil(self.n / self.bs)
        prior = optim.Prior(t.prior, t.prior_biases, self.n) if t.prior is not None else None
        state = run.state
        self.ws = Workspace(state.params, min(self.bs, self.n), run.rule.bind(state.params, state.opt_state, prior),
                            t.shift, task.train.images.shape[1:])
        self.z_epoch = np.empty((self.n, 1), dtype)  # each batch's logits, measured in chunks
        base = base_rate(task.train.y, task.validation.y)  # what divergence is measured against
        if base is not None:  # and the untrained network (the initial weights, made again from their seed)
            untrained = init_params(layer_sizes(task.n_inputs, run.cfg.model.hidden),
                                    np.random.default_rng(run.cfg.model.seed), dtype)
            base = replace(base, start=ll_and_accuracy(untrained, task.validation.images, task.validation.y)[0])
        self.base = base
        self.tally = Tally()
        self.t_start = 0.0
        self.lr = t.learning_rate  # the last step's



# ---------------------------------------------------------------------------
# What the phases say: metrics records, advice, the progress bar


def _record(kind: str, epoch: int, step: int, lr: float, t: Tally, seconds: float, busy: float, **figures) -> dict:
    """A metrics.jsonl line: the tally's LL and accuracy (then `figures`), the seconds it
    took, and its images per second of training (`busy`: without the validation pass)."""
    return {"kind": kind, "epoch": epoch, "step": step, "lr": lr, "train_ll": t.ll, "train_ll_mean": t.ll / t.seen,
            "train_acc": t.correct / t.seen, **figures, "seconds": seconds,
            "images_per_s": t.seen / busy if busy > 0 else None}


def _smaller_rate_advice(cfg: Config) -> str:
    return rate_advice(cfg.train)


def _check_logits(z: np.ndarray, epoch: int, first_batch: int, cfg: Config, ckpt_dir: Path) -> None:
    """Stop with advice if any logit (hence the log-likelihood) is not finite."""
    bad = np.flatnonzero(~np.isfinite(z))
    if len(bad):
        batch = first_batch + int(bad[0]) // cfg.train.batch_size + 1
        raise TrainingError(
            f"the log-likelihood became {'nan' if np.isnan(z[bad[0]]) else 'infinite'} at epoch {epoch}, "
            f"batch {batch}: {_smaller_rate_advice(cfg)}. The last good checkpoint is {ckpt_dir / 'last.npz'}"
        )


def _bar(report: Reporter, epoch: int, epochs: int, total: int, done: int):
    if not report.progress:
        return None
    from tqdm import tqdm  # lazy: tqdm (50 ms) only where a bar is shown

    return tqdm(
        total=total, initial=done, desc=f"epoch {epoch}/{epochs}", unit="batch", leave=False, file=sys.stderr,
        mininterval=0.2,
    )


# ---------------------------------------------------------------------------
# Phase 1: open or restore


def _open(cfg: Config, run_dir: Path, data: _Data, report: Reporter, plan: resume.Plan | None) -> _Run:
    """A new run (its first checkpoint written at once), or the run as the checkpoint its
    resume goes on from (`plan`) left it, with whatever a crash left half-done after that
    checkpoint repaired."""
    resume.remove_temporaries(run_dir)  # a killed process's, never a checkpoint
    if plan is None:
        ckpt_dir = run_dir / "checkpoints"
        try:
            ckpt_dir.mkdir(exist_ok=True)
        except OSError as exc:
            raise MlecliError(cannot_write(exc, ckpt_dir)) from None
        params = init_params(layer_sizes(data.task.n_inputs, cfg.model.hidden), np.random.default_rng(cfg.model.seed),
                             np.dtype(cfg.model.dtype))
        rule = make_rule(cfg)
        state = State(params=params, rng_state=data.rng.bit_generator.state, opt_state=rule.init_state(params))
        run = _Run(cfg, run_dir, data, state, rule)
        run.commit()  # epoch 0: from here on the folder is a run that --resume continues
        atomic_write_text(run_dir / "config.toml", to_toml(cfg))
        rundir.write_manifest(run_dir, rundir.new_manifest(cfg, data.sha256, rundir.now(), data.data_dir))
    else:
        cp = plan.checkpoint
        resume.check(cp, cfg, run_dir, data.task, data.name, data.sha256, data.data_dir)
        rule = make_rule(cfg)
        run = _Run(cfg, run_dir, data, _restore(cp, rule), rule)
        run.committed = (run.state.epochs_done, run.state.batch_in_epoch)
        resume.repair(run_dir, cp, cfg, sha256=data.sha256, data_dir=data.data_dir, log=report.log)
    run.metrics = Appender(run_dir / "metrics.jsonl")
    return run


# ---------------------------------------------------------------------------
# Phase 2: one epoch


def _train_epoch(run: _Run, loop: _Loop, stop: StopRequest, report: Reporter) -> bool:
    """Phase 2: the batches of epoch epochs_done + 1, from where a stopped run left it.
    Returns True if a signal stopped it part-way (the state then holds the position)."""
    cfg, state = run.cfg, run.state
    epoch, bs = state.epochs_done + 1, loop.bs
    dtype = loop.Y.dtype
    rng = run.data.rng
    rng.bit_generator.state = state.rng_state
    order = rng.permutation(loop.n)
    oy, ox = draw_offsets(rng, loop.n, cfg.train.shift) if loop.shifted is not None else (None, None)
    images = loop.shifted if loop.shifted is not None else loop.X
    y_epoch = loop.Y[order]
    target = y_epoch - dtype.type(0.5)  # y − ½, see train_step
    p = state.partial
    loop.tally = tally = Tally(p["ll"], p["correct"], p["seen"])
    w = p.get("window") or {}  # the step record's tally since the last one, if an epoch was stopped
    window = Tally(w.get("ll", 0.0), w.get("correct", 0), w.get("seen", 0))
    loop.t_start = time.perf_counter() - p.get("seconds", 0.0)  # optional in a checkpoint (schema.PARTIAL)
    t_window = time.perf_counter() - w.get("seconds", 0.0)
    bar = _bar(report, epoch, cfg.train.epochs, loop.batches, state.batch_in_epoch)
    measured = p.get("measured", state.batch_in_epoch * bs)  # examples whose logits are tallied
    loop.z_epoch[measured : measured + len(state.pending_z), 0] = state.pending_z  # a stop's, not yet tallied

    def get_lr(step: int) -> float:
        """The schedule: η in force after `step` steps (the plateau's scale is fixed within an epoch)."""
        return learning_rate(cfg.train, step, loop.batches, state.watch.plateau_scale)

    try:
        for k in range(state.batch_in_epoch, loop.batches):
            lo, hi = k * bs, min(loop.n, (k + 1) * bs)
            loop.lr = lr = get_lr(state.step)
            offsets = (oy[lo:hi], ox[lo:hi]) if oy is not None else None
            train_step(state.params, loop.ws, images, order[lo:hi], target[lo:hi], loop.z_epoch[lo:hi], lr,
                       state.step + 1, offsets)
            state.step += 1
            state.batch_in_epoch = k + 1
            last_batch = k + 1 == loop.batches
            stopping = stop.signal is not None and not last_batch
            record_due = cfg.train.log_every and state.step % cfg.train.log_every == 0
            if bar is not None:
                bar.update(1)
            # Measured at the same batches whether or not the run stops in between (a stop
            # keeps the logits not yet measured), so the sums come out bit for bit the same.
            if (k + 1) % MEASURE_EVERY == 0 or last_batch or record_due:
                z, y = loop.z_epoch[measured:hi, 0], y_epoch[measured:hi]
                _check_logits(z, epoch, measured // bs, cfg, run.ckpt_dir)
                chunk = Tally.of(z, y)
                tally.add(chunk)
                window.add(chunk)
                measured = hi
                if bar is not None:
                    bar.set_postfix_str(
                        f"LL {tally.ll / tally.seen:.4f}/img acc {100 * tally.correct / tally.seen:.2f}%", refresh=False
                    )
            if record_due:
                seconds = time.perf_counter() - t_window
                run.metrics.add(json.dumps(_record("step", epoch, state.step, lr, window, seconds, seconds),
                                           allow_nan=False))
                window, t_window = Tally(), time.perf_counter()
            if stopping:
                now = time.perf_counter()
                state.pending_z = loop.z_epoch[measured:hi, 0].copy()
                state.partial = {"ll": tally.ll, "correct": tally.correct, "seen": tally.seen,
                                 "measured": measured, "seconds": now - loop.t_start,
                                 "window": {"ll": window.ll, "correct": window.correct, "seen": window.seen,
                                            "seconds": now - t_window}}
                return True
    finally:
        if bar is not None:
            bar.close()
    return False



# ---------------------------------------------------------------------------
# Phase 3: the end of an epoch (the commit)


def _end_epoch(run: _Run, loop: _Loop, report: Reporter) -> None:
    """Phase 3: measure the epoch, append its record, update the watches (plateau, early
    stopping, divergence), commit it (last.npz), then write the copies due
    (epoch-NNNN.npz every checkpoint_every epochs, at the end and at an early stop;
    best.npz when the validation LL is the best so far, the training LL without
    validation). A run that diverged stops here, its epoch committed."""
    cfg, state, tally, t = run.cfg, run.state, loop.tally, run.cfg.train
    epoch = state.epochs_done + 1
    train_seconds = time.perf_counter() - loop.t_start
    task = run.data.task
    val_ll, val_acc = (ll_and_accuracy(state.params, task.validation.images, task.validation.y)
                       if len(task.validation) else (None, None))
    if not all(np.all(np.isfinite(a)) for pair in state.params for a in pair) or (
            val_ll is not None and not math.isfinite(val_ll)):
        raise TrainingError(
            f"the weights overflowed by the end of epoch {epoch} (the validation log-likelihood is {val_ll}): "
            f"{_smaller_rate_advice(cfg)}. The last good checkpoint is {run.ckpt_dir / 'last.npz'}"
        )
    prior = log_prior(state.params, t.prior, t.prior_biases) if t.prior is not None else None
    record = _record("epoch", epoch, state.step, loop.lr, tally, time.perf_counter() - loop.t_start, train_seconds,
                     log_prior=prior, log_posterior=tally.ll + prior if prior is not None else None,
                     val_ll_mean=val_ll, val_acc=val_acc)
    run.metrics.add(json.dumps(record, allow_nan=False))
    state.epochs_done = epoch
    state.batch_in_epoch = 0
    state.rng_state = run.data.rng.bit_generator.state
    state.partial = _fresh_partial()
    state.pending_z = state.pending_z[:0]
    key = "val_ll_mean" if val_ll is not None else "train_ll_mean"
    improved = state.best is None or record[key] > state.best["value"]
    if improved:
        figures = {k: v for k, v in record.items() if k not in TIMING_KEYS}
        state.best = {"epoch": epoch, "key": key, "value": record[key], "record": figures}
    state.watch = after_epoch(t, state.watch, val_ll, val_acc, loop.base)
    if stop_early(t, epoch, state.best["epoch"]):
        state.stopped_early = {"epoch": epoch, "best_epoch": state.best["epoch"], "patience": t.patience}
    due = epoch % t.checkpoint_every == 0 or epoch == t.epochs or state.stopped_early is not None
    run.commit(((f"epoch-{epoch:04d}.npz",) if due else ()) + (("best.npz",) if improved else ()))
    report.line(epoch_line(record, t.epochs))
    if diverged(state.watch):
        raise TrainingError(
            f"the run diverged: for {state.watch.worse_than_base} epochs in a row (to epoch {epoch}) it did no better "
            f"than predicting the training base rate for every image (validation LL {val_ll:.4f}/img against "
            f"{loop.base.ll:.4f}, accuracy {100 * val_acc:.2f}% against {100 * loop.base.acc:.2f}%); "
            f"{_smaller_rate_advice(cfg)}. Its best checkpoint is {run.ckpt_dir / 'best.npz'}"
        )



# ---------------------------------------------------------------------------
# The loop, and the run


def _train(cfg: Config, run_dir: Path, data: _Data, report: Reporter, stop: StopRequest,
           plan: resume.Plan | None) -> Outcome:
    """Open the run (phase 1), then epoch after epoch its batches (phase 2) and its end
    (phase 3), until the run is done or a signal stops it; manifest.json says how it ended."""
    run = None
    batches = math.ceil(len(data.task.train) / cfg.train.batch_size)
    try:
        stop.armed = True  # from here on, a first signal saves the run's position
        run = _open(cfg, run_dir, data, report, plan)
        if diverged(run.state.watch):  # its last commit says so: resuming it diverges again, however many epochs
            raise TrainingError(
                f"the run diverged by epoch {run.state.epochs_done} (it did no better than predicting the training "
                f"base rate for every image, {run.state.watch.worse_than_base} epochs in a row): "
                f"{_smaller_rate_advice(cfg)}. Its best checkpoint is {run.ckpt_dir / 'best.npz'}"
            )
        # Overflow is caught by the finiteness check and reported in words, once.
        with np.errstate(over="ignore", invalid="ignore"), blas.threads(blas_threads(cfg.train.batch_size)):
            loop = _Loop(run)
            while run.state.epochs_done < cfg.train.epochs and run.state.stopped_early is None:
                if _train_epoch(run, loop, stop, report):
                    run.commit()  # the position within the epoch
                    break
                _end_epoch(run, loop, report)
                if stop.signal is not None:
                    break
        stop.settled = True
    except StopNow as now:
        stop.settled = True
        cp = plan.checkpoint if plan is not None else None
        point = (run.committed if run is not None else
                 (cp.epoch, cp.meta["batch_in_epoch"]) if cp is not None else (0, 0))
        rundir.record_end(run_dir, "interrupted", rundir.now(), f"stopped at once by a second {now.signal_name}")
        best = run.state.best if run is not None else None
        at = (run.state.epochs_done, run.state.batch_in_epoch) if run is not None else None  # not saved
        return Outcome(run_dir, point[0], now.signal_name, best, at_once=True, resume_point=point, stopped_at=at,
                       batches=batches)
    except MlecliError as exc:
        stop.settled = True
        if run is not None or plan is None:  # a resume refused while opening changed nothing
            rundir.record_end(run_dir, "failed", rundir.now(), str(exc))
        raise
    finally:
        if run is not None:
            run.metrics.close()
    state = run.state
    # A signal that came as the last epoch ended stopped nothing: the run is finished, and
    # says so everywhere (its manifest, the sweep's count), not "interrupted" with nothing to resume.
    complete = state.epochs_done >= cfg.train.epochs or state.stopped_early is not None
    interrupted = None if complete else stop.signal
    rundir.record_end(run_dir, "interrupted" if interrupted else "finished", rundir.now(),
                      **({"stopped_early": state.stopped_early} if state.stopped_early else {}))
    return Outcome(run_dir, state.epochs_done, interrupted, state.best, resume_point=run.committed,
                   stopped_early=state.stopped_early, stopped_at=run.committed if interrupted else None,
                   batches=batches)


def _resume(run_dir: Path, request: resume.Request, data_dir: Path, report: Reporter, stop: StopRequest) -> Outcome:
    """Go on with the run in `run_dir`. What it goes on from, and with which config, is
    decided once the folder is ours, from its files as they are then: while this command
    got its data, another may have gone on with the run. The plan read before only fails
    fast (before any download) and names the data to get (none for a finished run)."""
    early = resume.decide(run_dir, request, lambda msg: None)
    data = None if early.finished else _prepare_data(early.cfg, data_dir, report, run_dir)
    with rundir.claim(run_dir, fresh=False):
        plan = resume.decide(run_dir, request, report.log)
        cp = plan.checkpoint
        if plan.finished:  # nothing to train: nothing is written (but what a crash left half-done)
            resume.settle_finished(run_dir, cp, data_dir=data_dir, log=report.log)
            stop.settled = True
            return Outcome(run_dir, cp.epoch, None, cp.meta.get("best"), resume_point=(cp.epoch, 0),
                           stopped_early=cp.meta.get("stopped_early"),
                           already_finished=resume.finished_note(run_dir, plan))
        if data is None or not resume.same_data(plan.cfg, early.cfg):  # its data, got under the lock
            data = _prepare_data(plan.cfg, data_dir, report, run_dir)
        _check_room(plan.cfg, data, run_dir, cp.epoch)
        if plan.edited:
            report.log(f"{run_dir / 'config.toml'} sets {', '.join(plan.edited)}: used for this resume")
        report.log(f"resuming {run_dir} from {cp.path.name} (epoch {cp.epoch} done)")
        with blas.threads(plan.threads):  # a sweep's resumed run goes on with the threads it began with: the same bits
            return _train(plan.cfg, run_dir, data, report, stop, plan)


def run(
    cfg: Config | None,
    run_dir: Path | None,
    *,
    data_dir: Path,
    report: Reporter,
    resuming: resume.Request | None = None,
    stop: StopRequest | None = None,
) -> Outcome:
    """Train `cfg` into `run_dir` (None: a new `runs/<name>-<timestamp>`), or, with
    `resuming`, go on with the run in `run_dir` (`cfg` None: the run's own config, as the
    request may change it); return how it ended.

    The data and the task come first: a run that cannot get its data, or does not fit
    in memory, creates no run folder. Signals are handled by `stop`, which the caller
    has entered (the CLI does, around everything it does), else by one entered here."""
    if stop is None:
        with StopRequest() as own:
            return run(cfg, run_dir, data_dir=data_dir, report=report, resuming=resuming, stop=own)
    if resuming is not None:
        return _resume(Path(run_dir), resuming, data_dir, report, stop)
    if run_dir is not None:
        rundir.check_unused(Path(run_dir))  # fail before any download; checked again under the lock
    data = _prepare_data(cfg, data_dir, report, None)
    _check_room(cfg, data, Path(run_dir) if run_dir is not None else rundir.RUNS_DIR, 0)
    if run_dir is None:
        run_dir, created = rundir.new_default(cfg.name), True
    else:
        created = _make_folder(Path(run_dir))
    run_dir = Path(run_dir)
    report.log(f"training {cfg.name}: {cfg.task.describe()}, hidden {list(cfg.model.hidden)}, into {run_dir}")
    with rundir.claim(run_dir, fresh=True, created=created):
        return _train(cfg, run_dir, data, report, stop, None)
