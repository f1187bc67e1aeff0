"""Training: batched gradient ascent on the summed log-likelihood, with exact resume.

`run` reads top to bottom: get the data and the task, claim the run folder, then three
phases, each a function just above it: `_open` (a new run, or one restored from its
newest checkpoint and repaired), `_train_epoch` (seeded permutation cut into batches,
the last smaller batch included; each batch one forward pass, one backward pass and
one step of the update rule up the batch's log posterior, at the learning rate the
schedule gives for that step) and `_end_epoch` (validation, the metrics record, the
watches of plateau, early stopping and divergence, and the commit: `last.npz`, then
its copies).

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
checkpoint covers and writes the copies that were due, so a crash between any two
writes resumes into exactly the files of an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import signal
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mlecli.data.cache import ensure_splits, split_hashes
from mlecli.nn import blas, optim
from mlecli.nn.model import Params, init_params, layer_sizes, log_prior

# ---------------------------------------------------------------------------
from mlecli.nn.pixels import draw_offsets, pad_images
from mlecli.nn.schedule import Watch, after_epoch, base_rate, diverged, learning_rate, stop_early
from mlecli.nn.step import MEASURE_EVERY, Tally, Workspace, blas_threads, ll_and_accuracy, train_step
from mlecli.run import checkpoint as ckpt
from mlecli.run import rundir
from mlecli.run.config import (
    STATE_SLOTS,
    Config,
    apply_overrides,
    from_dict,
    load,
    parse_override,
    rate_advice,
    to_toml,
    toml_value,
)
from mlecli.run.config import load as load_config
from mlecli.run.task import BinaryTask, build_task
from mlecli.safe.errors import CheckpointError, ConfigError, MlecliError, Stopped, TrainingError
from mlecli.safe.files import (
    Appender,
    atomic_write_bytes,
    atomic_write_text,
    cannot_write,
    read_regular,
    remove_stale_temporaries,
)
from mlecli.safe.resources import NoRoom, check_fits, checkpoint_bytes, fmt_bytes, free_space
from mlecli.version import __version__

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
        "blas": blas_info(cfg),
        "mlecli": __version__,
    }


def blas_info(cfg: Config) -> dict[str, Any]:
    """Which BLAS computes the hot loop, with how many threads: its bits depend on it."""
    return {"backend": blas.backend(), "threads": blas_threads(cfg.train.batch_size) or blas.current_threads()}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _check_finite(params: Params, where: str) -> None:
    for i, (W, b) in enumerate(params, start=1):
        if not (np.all(np.isfinite(W)) and np.all(np.isfinite(b))):
            raise TrainingError(f"{where}: layer {i}'s weights are no longer finite")


def _manifest(cfg: Config, sha256: dict, started: str, data_dir: Path) -> dict:
    return {
        "mlecli": __version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "blas": blas_info(cfg),
        "dataset": cfg.data.dataset,
        "dataset_sha256": sha256,
        "data_dir": str(Path(data_dir).absolute()),
        "model_seed": cfg.model.seed,
        "train_seed": cfg.train.seed,
        "started": started,
        "resumed": [],
    }


# ---------------------------------------------------------------------------
# Signals, reporting, outcome


class StopNow(BaseException):
    """A second signal: stop at once, without saving the position (the run resumes from
    its last checkpoint). A BaseException, like KeyboardInterrupt, so nothing swallows it."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name


class StopRequest:
    """What SIGINT, SIGTERM and SIGHUP do, phase by phase, for as long as it is entered
    (the CLI enters it around a whole `mlecli train`, so no signal ever meets Python's
    default handlers in between):

    - before training starts (`armed` False): stop the command at once (Stopped);
    - while training (`armed`): the first signal is a flag the loop checks between
      batches, so the checkpoint written on the way out holds a consistent state; a
      second stops at once (StopNow), the run resuming from its last checkpoint;
    - once the run has stopped or finished (`settled`): nothing, so that what the
      command prints about it is never cut short.
    """

    SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None)

    def __init__(self):
        self.signal: str | None = None
        self.armed = False
        self.settled = False
        self._old: dict[int, Any] = {}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.settled:
            return
        if not self.armed:
            raise Stopped(name)
        if self.signal is not None:
            raise StopNow(name)
        self.signal = name

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
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
    interrupted: str | None  # the signal that stopped the run, if one did
    best: dict | None
    at_once: bool = False  # a second signal: the position since the last checkpoint was not saved
    resume_point: tuple[int, int] = (0, 0)  # (epochs done, batches of the next) in last.npz
    stopped_early: dict | None = None  # {"epoch", "best_epoch", "patience"}: early stopping ended the run


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
# Resuming


def newest_checkpoint(run_dir: Path, log: Callable[[str], None]) -> ckpt.Checkpoint:
    """last.npz (refused, never passed over, if it cannot be used); without one, the
    newest readable epoch checkpoint."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir} does not exist: give the folder of the run to resume (`mlecli runs` lists "
                              "them)")
    if (run_dir / "checkpoints").is_symlink():
        raise CheckpointError(
            f"{run_dir / 'checkpoints'} is a symbolic link: a resumed run would write into the folder it points to; "
            "copy the run (cp -rL) and resume the copy"
        )
    last = run_dir / "checkpoints" / "last.npz"
    if last.exists() or last.is_symlink():
        try:
            return ckpt.load(last)
        except CheckpointError as exc:
            # Never go back to an older checkpoint by itself: resuming would write over last.npz,
            # and whatever it holds (another mlecli's format, say) would be lost.
            older = sorted((p for p in ckpt.checkpoints_in(run_dir) if p.name.startswith("epoch-")), reverse=True)
            fallback = (f"; to go on from its newest epoch checkpoint instead ({older[0].name}), losing what came "
                        f"after it, move last.npz out of {last.parent} and resume again") if older else ""
            raise CheckpointError(f"cannot resume {run_dir}: {exc}{fallback}") from None
    for path in sorted((p for p in ckpt.checkpoints_in(run_dir) if p.name.startswith("epoch-")), reverse=True):
        try:
            cp = ckpt.load(path)
        except CheckpointError as exc:
            log(f"warning: {exc}; trying an older checkpoint")
            continue
        log(f"note: {last} is not there; going on from {path.name}")
        return cp
    raise CheckpointError(
        f"{run_dir} has no checkpoint to resume from: it is not a run folder, or its run never wrote its first "
        f"checkpoint; start it again with mlecli train CONFIG --run-dir {run_dir}"
    )


RESUME_OVERRIDABLE = {"train.epochs", "train.checkpoint_every", "train.log_every"}


def edited_keys(run_dir: Path, saved: Config) -> tuple[str, ...]:
    """The keys a resume may change that the run's config.toml sets otherwise than its
    checkpoint (edited by hand, or by a resume that stopped before its first checkpoint),
    as `--set` items; () if config.toml cannot be read."""

    try:
        recorded = load(run_dir / "config.toml").to_dict()
    except MlecliError:
        return ()
    mine = saved.to_dict()
    items = []
    for key in sorted(RESUME_OVERRIDABLE):
        section, name = key.split(".")
        if recorded[section].get(name) != mine[section].get(name):
            items.append(f"{key}={toml_value(recorded[section][name])}")
    return tuple(items)


def resumed_config(saved: Config, overrides: tuple[str, ...], epochs_done: int = 0) -> Config:
    """The saved config with only the keys that cannot change the weights so far overridden
    (others only set to the value they have), and train.epochs no fewer than the
    `epochs_done` of the checkpoint resumed."""

    for item in overrides:
        key = ".".join(parse_override(item)[0])
        if key not in RESUME_OVERRIDABLE and from_dict(apply_overrides(saved.to_dict(), (item,)),
                                                       name=saved.name) != saved:  # a value it already has is fine
            raise ConfigError(
                f"--set {key} cannot change when resuming (it would change the weights already trained); "
                f"allowed: {', '.join(sorted(RESUME_OVERRIDABLE))}"
            )
    cfg = from_dict(apply_overrides(saved.to_dict(), overrides), name=saved.name)
    if cfg.train.epochs < epochs_done:
        raise ConfigError(
            f"--set train.epochs = {cfg.train.epochs} is fewer than the {epochs_done} epochs this run has done: "
            "a run's epochs can only grow (its config.toml must keep saying what made its checkpoints)"
        )
    if cfg.train.epochs != saved.train.epochs and saved.train.schedule == "cosine":
        raise ConfigError(
            f"--set train.epochs cannot change when resuming a run with the cosine schedule: it spreads the "
            f"decay over the {saved.train.epochs} epochs configured, so the learning rates already used would "
            "change; start a new run with the epochs you want"
        )
    return cfg


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
# The training run


def run(
    cfg: Config,
    run_dir: Path | None,
    *,
    data_dir: Path,
    report: Reporter,
    resume_from: ckpt.Checkpoint | None = None,
    stop: StopRequest | None = None,
) -> Outcome:
    """Train `cfg` into `run_dir` (None: a new `runs/<name>-<timestamp>`), or continue
    the run `resume_from` came from, and return how it ended.

    The data and the task come first: a run that cannot get its data, or does not fit
    in memory, creates no run folder. Signals are handled by `stop`, which the caller
    has entered (the CLI does, around everything it does), else by one entered here."""
    if stop is None:
        with StopRequest() as own:
            return run(cfg, run_dir, data_dir=data_dir, report=report, resume_from=resume_from, stop=own)
    if resume_from is None and run_dir is not None:
        rundir.check_unused(Path(run_dir))  # fail before any download; checked again under the lock
    data = _prepare_data(cfg, data_dir, report, None if resume_from is None else Path(run_dir))
    _check_room(cfg, data, Path(run_dir) if run_dir is not None else rundir.RUNS_DIR,
                0 if resume_from is None else resume_from.epoch)
    created = False
    if run_dir is None:
        run_dir, created = rundir.new_default(cfg.name), True
    elif resume_from is None:
        created = _make_folder(Path(run_dir))
    run_dir = Path(run_dir)
    if resume_from is None:
        report.log(f"training {cfg.name}: {cfg.task.describe()}, hidden {list(cfg.model.hidden)}, into {run_dir}")
    with rundir.claim(run_dir, fresh=resume_from is None, created=created):
        opened = None  # not `run`: that would make the name local to this function
        try:
            stop.armed = True  # from here on, a first signal saves the run's position
            opened = _open(cfg, run_dir, data, report, resume_from is not None)
            outcome = _train(opened, report, stop)
        except StopNow as now:
            stop.settled = True
            point = (opened.committed if opened is not None else
                     (resume_from.epoch, resume_from.meta["batch_in_epoch"]) if resume_from is not None else (0, 0))
            rundir.record_end(run_dir, "interrupted", _now(), f"stopped at once by a second {now.signal_name}")
            best = opened.state.best if opened is not None else None
            return Outcome(run_dir, point[0], now.signal_name, best, at_once=True, resume_point=point)
        except MlecliError as exc:
            stop.settled = True
            if opened is not None or resume_from is None:  # a resume refused while opening changed nothing
                rundir.record_end(run_dir, "failed", _now(), str(exc))
            raise
        finally:
            if opened is not None:
                opened.metrics.close()
        early = outcome.stopped_early
        rundir.record_end(run_dir, "interrupted" if outcome.interrupted else "finished", _now(),
                          **({"stopped_early": early} if early else {}))
        return outcome


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
    dataset = cfg.data.resolve()
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


# Phase 1: open the run -------------------------------------------------------


def _open(cfg: Config, run_dir: Path, data: _Data, report: Reporter, resume: bool) -> _Run:
    """A new run (its first checkpoint written at once), or the run as its newest
    checkpoint left it, with whatever a crash left half-done after that checkpoint
    repaired."""
    ckpt_dir = run_dir / "checkpoints"
    remove_stale_temporaries(ckpt_dir)  # a killed process's, never a checkpoint
    remove_stale_temporaries(run_dir)
    if not resume:
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
        rundir.write_manifest(run_dir, _manifest(cfg, data.sha256, _now(), data.data_dir))
    else:
        cp = newest_checkpoint(run_dir, report.log)  # again, now that the folder is ours
        ckpt.check_same_data(cp, data.name, data.sha256, data.data_dir, "resume with the data it was trained on")
        _check_fits(cp, cfg, data.task)
        _check_own(cp, run_dir)
        if cp.format > 1:  # a format-1 checkpoint's history is written again from it
            rundir.committed_epochs(run_dir, cp.meta, cp.path)  # never add to a history cut short or damaged
        rule = make_rule(cfg)
        run = _Run(cfg, run_dir, data, _restore(cp, rule), rule)
        run.committed = (run.state.epochs_done, run.state.batch_in_epoch)
        _repair(run, cp, report)
    run.metrics = Appender(run_dir / "metrics.jsonl")
    return run


def _check_fits(cp: ckpt.Checkpoint, cfg: Config, task: BinaryTask) -> None:
    """Refuse a checkpoint whose position cannot be one of this run's on this data (each
    field may be well-formed and the whole still impossible: a crafted or mixed-up file)."""
    meta, bs = cp.meta, cfg.train.batch_size
    batches = math.ceil(len(task.train) / bs)
    done, batch, p = meta["epochs_done"], meta["batch_in_epoch"], meta["partial"]
    problems = []
    if meta["n_inputs"] != task.n_inputs or meta.get("image_shape", list(task.train.images.shape[1:])) != list(
            task.train.images.shape[1:]):
        problems.append(f"it was trained on images of {meta['n_inputs']} pixels, these have {task.n_inputs}")
    elif batch >= batches:
        problems.append(f"it stopped at batch {batch} of an epoch of {batches}")
    elif meta["step"] != done * batches + batch:
        problems.append(f"its step {meta['step']} is not {done} epochs of {batches} batches and {batch} more")
    elif not (p.get("measured", batch * bs) == p["seen"] >= p["correct"]
              and p["seen"] + len(cp.extra.get("loop.z", ())) == batch * bs and p["seen"] % bs == 0):
        problems.append(f"its tally of the epoch so far ({p['seen']} images measured, "
                        f"{len(cp.extra.get('loop.z', ()))} logits pending) is not {batch} batches of {bs}")
    if problems:
        raise CheckpointError(f"{cp.path} does not fit this run's data: {problems[0]}; the checkpoint is damaged "
                              "or not this run's")


def _check_own(cp: ckpt.Checkpoint, run_dir: Path) -> None:
    """Refuse a checkpoint that is another run's (copied into this folder): its config must
    be the one config.toml records, but for the keys a resume may change. (A config.toml
    that is missing or damaged is written again from the checkpoint.)"""

    try:
        recorded = load_config(run_dir / "config.toml").to_dict()
    except MlecliError:
        return
    mine = cp.config.to_dict()
    for key in sorted(RESUME_OVERRIDABLE):
        section, name = key.split(".")
        recorded[section].pop(name, None)
        mine[section].pop(name, None)
    recorded.pop("name", None)
    mine.pop("name", None)
    differ = sorted(f"{s}.{k}" for s in recorded for k in set(recorded[s]) | set(mine.get(s, {}))
                    if recorded[s].get(k) != mine.get(s, {}).get(k))
    if differ:
        raise CheckpointError(
            f"{cp.path} is not this run's checkpoint: its config differs from {run_dir / 'config.toml'} in "
            f"{', '.join(differ)}; put the run's own checkpoints back, or start a new run"
        )


def _holds(path: Path, data: bytes) -> bool:
    """Whether `path` is a plain file holding exactly `data` (anything else is written anew)."""
    try:
        return os.lstat(path).st_size == len(data) and read_regular(path, len(data)) == data
    except OSError:
        return False


def _repair(run: _Run, cp: ckpt.Checkpoint, report: Reporter) -> None:
    """Bring the folder back to what `cp` commits: metrics cut back to its step, the
    copies due at its epoch written, config and manifest rewritten."""
    if cp.format == 1:  # metrics.jsonl was rewritten after the checkpoint: its history is the truth
        atomic_write_text(run.dir / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in cp.meta.get("metrics", [])))
    rundir.cut_metrics(run.dir, run.state.step)
    state, saved = run.state, cp.config
    if cp.path.name == "last.npz" and state.batch_in_epoch == 0 and state.epochs_done > 0:
        epoch = state.epochs_done
        due = ([f"epoch-{epoch:04d}.npz"] if epoch % saved.train.checkpoint_every == 0 or epoch == saved.train.epochs
               else [])
        if state.best is not None and state.best["epoch"] == epoch:
            due.append("best.npz")
        data = read_regular(cp.path, 1 << 40)
        for name in due:
            path = run.ckpt_dir / name
            if not _holds(path, data):
                atomic_write_bytes(path, data)
    atomic_write_text(run.dir / "config.toml", to_toml(run.cfg))
    try:
        manifest = rundir.read_manifest(run.dir, strict=True)
    except MlecliError as exc:  # keep what is there: it may be all that records the run's start
        damaged = run.dir / "manifest.json.damaged"
        try:
            os.replace(run.dir / "manifest.json", damaged)
        except OSError:
            pass
        report.log(f"warning: {exc}; writing a new manifest.json (the old one is kept as {damaged.name})")
        manifest = {}
    manifest = manifest or _manifest(run.cfg, run.data.sha256, _now(), run.data.data_dir)
    manifest.pop("ended", None)
    manifest["data_dir"] = str(run.data.data_dir.absolute())
    manifest.setdefault("resumed", []).append(
        {"at": _now(), "from": cp.path.name, "epochs_done": state.epochs_done, "step": state.step}
    )
    rundir.write_manifest(run.dir, manifest)
    before, now = cp.meta.get("blas") or {}, blas_info(run.cfg)
    if before.get("backend") is not None and (before.get("backend"), before.get("threads")) != (
            now["backend"], now["threads"]):
        report.log(
            f"warning: {cp.path} was trained with the BLAS {before['backend']} on {before.get('threads')} threads, "
            f"this process uses {now['backend']} on {now['threads']}: the resumed weights may differ in their last "
            "bits from an uninterrupted run (set OPENBLAS_NUM_THREADS to the same count to avoid it)"
        )


# Phases 2 and 3: train an epoch, end it ---------------------------------------


def _train(run: _Run, report: Reporter, stop: StopRequest) -> Outcome:
    cfg = run.cfg
    # Overflow is caught by the finiteness check and reported in words, once.
    if diverged(run.state.watch):  # its last commit says so: resuming it diverges again, however many epochs
        raise TrainingError(
            f"the run diverged by epoch {run.state.epochs_done} (it did no better than predicting the training "
            f"base rate for every image, {run.state.watch.worse_than_base} epochs in a row): "
            f"{_smaller_rate_advice(cfg)}. Its best checkpoint is {run.ckpt_dir / 'best.npz'}"
        )
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
    state = run.state
    # A signal that came as the last epoch ended stopped nothing: the run is finished, and
    # says so everywhere (its manifest, the sweep's count), not "interrupted" with nothing to resume.
    complete = state.epochs_done >= cfg.train.epochs or state.stopped_early is not None
    return Outcome(run.dir, state.epochs_done, None if complete else stop.signal, state.best,
                   resume_point=run.committed, stopped_early=state.stopped_early)


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
