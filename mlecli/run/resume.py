"""Resuming a run: which checkpoint it goes on from, what may change, the checks that
the checkpoint fits the run, and the repair of the folder after a crash.

- The decision (`decide`): what a resume asked for (`Request`: its `--set` items, and a
  sweep's own conditions) and the folder's files give a `Plan`: the checkpoint it goes
  on from and the config it goes on with. It is taken under the run folder's lock, from
  the files as they are then (train.py's `_resume`): another command may have gone on with
  the run while this one waited for its data, and a plan read before would be stale. A
  plan read before the lock only fails fast.
- Which checkpoint: `newest_checkpoint`: `last.npz` (refused, never passed over, if it
  cannot be read); without one, the newest readable `epoch-N.npz`.
- What may change: `RESUME_OVERRIDABLE` (the keys that cannot change the weights
  trained so far), `edited_keys` (those config.toml sets otherwise than the checkpoint:
  an edit by hand counts as a `--set`), `resumed_config`; the BLAS threads a run began
  with (`recorded_threads`), which a sweep's resume keeps.
- The checks (`check`): the data the checkpoint was trained on, a position this run's
  data and batch size can reach (`check_fits`), the run config.toml records
  (`check_own`), a history in metrics.jsonl that reaches the checkpoint.
- The repair (`repair`): what a crash left half-done after the checkpoint is brought
  back to what the checkpoint commits: metrics.jsonl cut back to its step, the copies due
  at its epoch written, config.toml rewritten, a `resumed` entry in manifest.json.
  Temporaries a killed process left are removed whenever a run is opened
  (`remove_temporaries`, a new run's too). A finished run (`Plan.finished`) is not
  trained: `settle_finished` writes only what a crash cut short at its end, and
  `finished_note` says how to train it further.

The state a checkpoint holds is restored by the training loop (train.py's `_restore`),
which also wrote it.
"""

from __future__ import annotations

import json
import math
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mlecli.nn.schedule import Watch, diverged
from mlecli.nn.step import blas_threads
from mlecli.run import checkpoint as ckpt
from mlecli.run import rundir
from mlecli.run.config import Config, apply_overrides, from_dict, parse_override, to_toml, toml_value
from mlecli.run.config import load as load_config
from mlecli.run.task import BinaryTask
from mlecli.safe.errors import CheckpointError, ConfigError, MlecliError
from mlecli.safe.files import atomic_write_bytes, atomic_write_text, read_regular, remove_stale_temporaries

# ---------------------------------------------------------------------------
# The decision: what a resume goes on from, and with


@dataclass(frozen=True)
class Request:
    """A resume as it was asked for; what it goes on from is decided from the folder."""

    overrides: tuple[str, ...] = ()  # --set items
    edits: bool = True  # config.toml's own values of the keys a resume may change count (a sweep's: the plan's)
    expect: Callable[[ckpt.Checkpoint], None] | None = None  # the caller's own refusal (a sweep's: not its run)
    same_threads: bool = False  # the BLAS threads the run began with, where its bits depend on them


@dataclass(frozen=True)
class Plan:
    """What a resume goes on from and with, decided from the folder's files as read at one moment."""

    checkpoint: ckpt.Checkpoint
    cfg: Config  # the checkpoint's config with the changes allowed
    edited: tuple[str, ...]  # config.toml's values used, as --set items
    threads: int | None  # the BLAS threads to train on (None: as they are)

    @property
    def finished(self) -> bool:
        """Whether the run has nothing left to train: all its epochs done, or stopped early,
        and not diverged (going on with a run that diverged is refused, saying so)."""
        meta = self.checkpoint.meta
        done = self.checkpoint.epoch >= self.cfg.train.epochs or meta.get("stopped_early") is not None
        try:
            return done and not diverged(Watch.from_dict(meta.get("watch")))
        except (ValueError, TypeError):  # a damaged watch: refused when the run is opened
            return False


def decide(run_dir: Path, request: Request, log: Callable[[str], None]) -> Plan:
    """The plan of a resume of `run_dir` as `request` asks, from the folder's files as they
    are now; raises the error that refuses it. Only a plan made under the folder's lock
    counts."""
    cp = newest_checkpoint(run_dir, log)
    if request.expect is not None:
        request.expect(cp)
    given = {item.partition("=")[0].strip() for item in request.overrides}
    edited = tuple(e for e in edited_keys(Path(run_dir), cp.config)
                   if e.partition("=")[0] not in given) if request.edits else ()
    cfg = resumed_config(cp.config, (*edited, *request.overrides), cp.epoch)
    return Plan(cp, cfg, edited, recorded_threads(cp) if request.same_threads else None)


def same_data(a: Config, b: Config) -> bool:
    """Whether two configs of a run train on the same data and task (they differ at most in
    the keys a resume may change, and the name)."""
    return not _differences(a, b)


# ---------------------------------------------------------------------------
# Which checkpoint a resume goes on from


def newest_checkpoint(run_dir: Path, log: Callable[[str], None]) -> ckpt.Checkpoint:
    """last.npz (refused, never passed over, if it cannot be used); without one, the
    newest readable epoch checkpoint."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir} does not exist: give the folder of the run to resume "
                              "(`mlecli runs` lists them)")
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
            older = _newest_first(run_dir)
            fallback = (f"; to go on from its newest epoch checkpoint instead ({older[0].name}), losing what came "
                        f"after it, move last.npz out of {last.parent} and resume again") if older else ""
            raise CheckpointError(f"cannot resume {run_dir}: {exc}{fallback}") from None
    for path in _newest_first(run_dir):
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


def _newest_first(run_dir: Path) -> list[Path]:
    """A run's epoch checkpoints, the newest epoch first."""
    return [p for p in reversed(ckpt.checkpoints_in(run_dir)) if ckpt.epoch_of(p) is not None]


# ---------------------------------------------------------------------------
# The config a resume may change

RESUME_OVERRIDABLE = {"train.epochs", "train.checkpoint_every", "train.log_every"}


def edited_keys(run_dir: Path, saved: Config) -> tuple[str, ...]:
    """The keys a resume may change that the run's config.toml sets otherwise than its
    checkpoint (edited by hand, or by a resume that stopped before its first checkpoint),
    as `--set` items; () if config.toml cannot be read."""

    try:
        recorded = load_config(run_dir / "config.toml").to_dict()
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


def recorded_threads(cp: ckpt.Checkpoint) -> int | None:
    """The BLAS threads a checkpoint's run trained on, where its bits depend on them
    (batches of 64 and fewer: step.blas_threads sets none), else None (the trainer sets its own)."""
    threads = (cp.meta.get("blas") or {}).get("threads")
    if blas_threads(cp.config.train.batch_size) is not None or not isinstance(threads, int) or threads < 1:
        return None
    return threads


def _differences(a: Config, b: Config) -> list[str]:
    """The keys (`section.key`) in which two configs differ, but for the name and the keys
    a resume may change."""
    x, y = a.to_dict(), b.to_dict()
    for d in (x, y):
        d.pop("name", None)
        for key in RESUME_OVERRIDABLE:
            section, name = key.split(".")
            d[section].pop(name, None)
    return sorted(f"{s}.{k}" for s in x for k in set(x[s]) | set(y.get(s, {})) if x[s].get(k) != y.get(s, {}).get(k))


# ---------------------------------------------------------------------------
# Whether a checkpoint fits the run


def check(cp: ckpt.Checkpoint, cfg: Config, run_dir: Path, task: BinaryTask, dataset: str, sha256: dict[str, str],
          data_dir: Path) -> None:
    """Refuse a checkpoint this run cannot go on from: trained on other data, at a
    position this data cannot reach, another run's, or beyond what metrics.jsonl records."""
    ckpt.check_same_data(cp, dataset, sha256, data_dir, "resume with the data it was trained on")
    check_fits(cp, cfg, task)
    check_own(cp, run_dir)
    if cp.format > 1:  # a format-1 checkpoint's history is written again from it
        rundir.committed_epochs(run_dir, cp.meta, cp.path)  # never add to a history cut short or damaged


def check_fits(cp: ckpt.Checkpoint, cfg: Config, task: BinaryTask) -> None:
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


def check_own(cp: ckpt.Checkpoint, run_dir: Path) -> None:
    """Refuse a checkpoint that is another run's (copied into this folder): its config must
    be the one config.toml records, but for the keys a resume may change. (A config.toml
    that is missing or damaged is written again from the checkpoint.)"""

    try:
        recorded = load_config(run_dir / "config.toml")
    except MlecliError:
        return
    differ = _differences(recorded, cp.config)
    if differ:
        raise CheckpointError(
            f"{cp.path} is not this run's checkpoint: its config differs from {run_dir / 'config.toml'} in "
            f"{', '.join(differ)}; put the run's own checkpoints back, or start a new run"
        )


# ---------------------------------------------------------------------------
# Repair on open


def remove_temporaries(run_dir: Path) -> None:
    """Remove the temporaries a killed process left in the run folder: never a checkpoint."""
    remove_stale_temporaries(run_dir / "checkpoints")
    remove_stale_temporaries(run_dir)


def _holds(path: Path, data: bytes) -> bool:
    """Whether `path` is a plain file holding exactly `data` (anything else is written anew)."""
    try:
        return os.lstat(path).st_size == len(data) and read_regular(path, len(data)) == data
    except OSError:
        return False


def _repair_history(run_dir: Path, cp: ckpt.Checkpoint) -> None:
    """metrics.jsonl cut back to the records `cp` covers, and the copies due at its epoch
    written again if they are missing or differ; nothing is written that is already so."""
    meta, saved = cp.meta, cp.config
    if cp.format == 1:  # metrics.jsonl was rewritten after the checkpoint: its history is the truth
        history = "".join(json.dumps(m) + "\n" for m in meta.get("metrics", []))
        if not _holds(run_dir / "metrics.jsonl", history.encode()):
            atomic_write_text(run_dir / "metrics.jsonl", history)
    rundir.cut_metrics(run_dir, meta["step"])
    epoch, best = meta["epochs_done"], meta.get("best")
    if cp.path.name == "last.npz" and meta["batch_in_epoch"] == 0 and epoch > 0:
        due_now = epoch % saved.train.checkpoint_every == 0 or epoch == saved.train.epochs
        due = [f"epoch-{epoch:04d}.npz"] if due_now else []
        if best is not None and best["epoch"] == epoch:
            due.append("best.npz")
        data = read_regular(cp.path, 1 << 40)
        for name in due:
            path = run_dir / "checkpoints" / name
            if not _holds(path, data):
                atomic_write_bytes(path, data)


def _manifest(run_dir: Path, cfg: Config, sha256: dict[str, str], data_dir: Path,
              log: Callable[[str], None]) -> dict[str, Any]:
    """The run's manifest, made anew (not yet written) if a crash came before it was first
    written, or if it is damaged (the damaged one kept as manifest.json.damaged)."""
    try:
        manifest = rundir.read_manifest(run_dir, strict=True)
    except MlecliError as exc:  # keep what is there: it may be all that records the run's start
        damaged = run_dir / "manifest.json.damaged"
        try:
            os.replace(run_dir / "manifest.json", damaged)
        except OSError:
            pass
        log(f"warning: {exc}; writing a new manifest.json (the old one is kept as {damaged.name})")
        manifest = {}
    return manifest or rundir.new_manifest(cfg, sha256, rundir.now(), data_dir)


def repair(run_dir: Path, cp: ckpt.Checkpoint, cfg: Config, *, sha256: dict[str, str], data_dir: Path,
           log: Callable[[str], None]) -> None:
    """Bring the folder of a run that goes on training back to what `cp` commits: metrics
    cut back to its step, the copies due at its epoch written, config.toml (of `cfg`, the
    config resumed with) written, a `resumed` entry in the manifest. `sha256` and
    `data_dir` are the data's, for a manifest that must be made anew."""
    meta = cp.meta
    _repair_history(run_dir, cp)
    atomic_write_text(run_dir / "config.toml", to_toml(cfg))
    manifest = _manifest(run_dir, cfg, sha256, data_dir, log)
    manifest.pop("ended", None)
    manifest["data_dir"] = str(Path(data_dir).absolute())
    manifest.setdefault("resumed", []).append(
        {"at": rundir.now(), "from": cp.path.name, "epochs_done": meta["epochs_done"], "step": meta["step"]}
    )
    rundir.write_manifest(run_dir, manifest)
    before, now = meta.get("blas") or {}, rundir.blas_info(cfg)
    if before.get("backend") is not None and (before.get("backend"), before.get("threads")) != (
            now["backend"], now["threads"]):
        log(
            f"warning: {cp.path} was trained with the BLAS {before['backend']} on {before.get('threads')} threads, "
            f"this process uses {now['backend']} on {now['threads']}: the resumed weights may differ in their last "
            "bits from an uninterrupted run (set OPENBLAS_NUM_THREADS to the same count to avoid it)"
        )


def settle_finished(run_dir: Path, cp: ckpt.Checkpoint, *, data_dir: Path, log: Callable[[str], None]) -> None:
    """A finished run resumed (`cp`, its newest checkpoint, has nothing left to train): what a
    crash cut short at its end is repaired (temporaries, metrics, the copies due, a missing
    or damaged config.toml or manifest, its end recorded); a whole folder is left as it is,
    not one byte written. The data is not needed, nor checked."""
    check_own(cp, run_dir)
    if cp.format > 1:
        rundir.committed_epochs(run_dir, cp.meta, cp.path)
    remove_temporaries(run_dir)
    _repair_history(run_dir, cp)
    try:
        load_config(run_dir / "config.toml")
    except MlecliError:  # what made its checkpoints
        atomic_write_text(run_dir / "config.toml", to_toml(cp.config))
    manifest = _manifest(run_dir, cp.config, cp.meta.get("dataset_sha256") or {}, data_dir, log)
    ended, early = manifest.get("ended") or {}, cp.meta.get("stopped_early")
    if ended.get("status") != "finished" or ended.get("stopped_early") != early:  # a new manifest has no end
        manifest["ended"] = {"status": "finished", "at": rundir.now(), "error": None,
                             **({"stopped_early": early} if early else {})}
        rundir.write_manifest(run_dir, manifest)


def finished_note(run_dir: Path, plan: Plan) -> str:
    """What a resume of a finished run says instead of training: that it is, and how to
    train it further where a resume can."""
    cp, t = plan.checkpoint, plan.cfg.train
    early = cp.meta.get("stopped_early")
    if early:
        return (f"{run_dir} stopped early after epoch {early['epoch']}: no better validation LL in {early['patience']} "
                "epochs (train.patience); it is finished, nothing to train")
    said = f"{run_dir} is finished: all {cp.epoch:,} epochs are done, nothing to train"
    if t.schedule == "cosine":
        return (f"{said}\nits cosine schedule spreads the decay over its {t.epochs:,} epochs, so a resume cannot "
                "add more: start a new run with the epochs you want")
    return (f"{said}\nto train it further: mlecli train --resume {shlex.quote(str(run_dir))} --set train.epochs=N "
            f"(N > {cp.epoch})")
