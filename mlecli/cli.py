"""The command line: parse options, call the library, print. Nothing else lives here.

numpy, requests and tqdm are imported inside the commands that need them so that
`mlecli --help` starts fast.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shlex
import sys
from pathlib import Path

import click

from mlecli.safe.errors import MlecliError, Stopped, display, printable, quoted
from mlecli.version import __version__


class Group(click.Group):
    """Turns whatever stops a command into one line on stderr: an MlecliError (exit 1),
    and the failures no library call can word for the user, because they can happen
    anywhere: a file system refusing (permissions, a name too long), memory running out,
    standard output failing, a signal (exit 130)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MlecliError as exc:
            _error(str(exc), 1)
        except KeyboardInterrupt:  # Ctrl-C where no command turns it into a clean stop of its own
            _error("Stopped by SIGINT: what was done so far is kept, nothing is half-written.", 130, prefix="")
        except Stopped as exc:
            _error(f"Stopped by {exc.signal_name} before training began: no run was written.", 130, prefix="")
        except MemoryError:
            _error("out of memory: use smaller layers or batches, or give the process more memory", 1)
        except BrokenPipeError:  # `mlecli runs | head -1`: the reader has what it wanted
            _quiet_stdout()
            sys.exit(1)
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else "standard output: " if exc.errno == 28 else ""
            _error(f"{where}{exc.strerror or exc}", 1)
        except Exception as exc:  # any type, to look inside: a library may wrap a Ctrl-C in its own
            if not _interrupted(exc):
                raise  # not a Ctrl-C: a bug, with its traceback
            # a Ctrl-C inside a library's import, which wraps it (matplotlib: a RuntimeError)
            _error("Stopped by SIGINT: what was done so far is kept, nothing is half-written.", 130, prefix="")


def _interrupted(exc: BaseException) -> bool:
    """Whether `exc` was caused by a Ctrl-C (a KeyboardInterrupt it wraps)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    return False


def _error(message: str, code: int, prefix: str = "Error: ") -> None:
    try:
        echo(prefix + printable(message), err=True)
    except OSError:  # stderr itself is gone or full: the exit status still says it
        pass
    sys.exit(code)


def _quiet_stdout() -> None:
    """Send what is still to be written to stdout (and Python's flush at exit) nowhere."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def entry() -> None:
    """The `mlecli` program: standard streams that exist, the command, then an exit no
    signal can turn into a traceback (a Ctrl-C arriving while the interpreter shuts down
    would otherwise print one)."""
    import os

    for name in ("stdout", "stderr"):
        if getattr(sys, name) is None:  # started with that stream closed (`>&-`)
            setattr(sys, name, open(os.devnull, "w"))
        # A terminal whose encoding lacks a character we print (ŷ, ², a name's letters under
        # LANG=…ISO-8859-1) gets an escape such as \u0177, not a UnicodeEncodeError.
        try:
            getattr(sys, name).reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError, OSError):
            pass
    default_hook = sys.unraisablehook

    def quiet_interrupts(unraisable) -> None:
        # A Ctrl-C that lands in a callback Python cannot raise from (a weakref's, during an
        # import) would print a traceback and be lost; it is lost quietly instead.
        if not isinstance(unraisable.exc_value, KeyboardInterrupt):
            default_hook(unraisable)

    sys.unraisablehook = quiet_interrupts
    try:
        main(prog_name="mlecli")
    except KeyboardInterrupt:  # between start-up and the command (click's own parsing)
        _error("Stopped by SIGINT before the command began.", 130, prefix="")
    finally:
        import signal

        for sig in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", signal.SIGTERM)):
            signal.signal(sig, signal.SIG_IGN)


def echo(text: str = "", err: bool = False) -> None:
    """Everything the commands print goes through here, line by line with control
    characters shown as escapes (a value with a newline in it is escaped where it is
    put into a line: see errors.printable)."""
    click.echo("\n".join(printable(line) for line in str(text).split("\n")), err=err)


def _log(quiet: bool):
    def log(msg: str) -> None:
        if not quiet:
            try:
                echo(printable(msg), err=True)
            except OSError:  # a note that cannot be shown (stderr full or closed) stops nothing
                pass

    return log


def _as_typed(path: Path, typed: str | Path) -> Path:
    """`path`, which the library made absolute, as the user would write it: relative to the
    current folder when what they typed (`typed`) was relative, so that `mlecli evaluate
    runs/tour` says `runs/tour/eval-test-best.json`."""
    if not path.is_absolute() or Path(typed).is_absolute():
        return path
    try:
        return Path(os.path.relpath(path))
    except (OSError, ValueError):  # the current folder is gone
        return path


def _progress(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty()


class _Folder(click.Path):
    """A folder's path; an empty one is refused (Path('') would be the current folder)."""

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not value:
            self.fail("an empty name is no folder; give one, such as --data-dir data", param, ctx)
        return super().convert(value, param, ctx)


def data_dir_option(f):
    return click.option(
        "--data-dir",
        type=_Folder(file_okay=False, path_type=Path),
        default=None,
        help="Dataset cache folder.  [default: $MLECLI_DATA_DIR, else ./data]",
    )(f)


def quiet_option(f, help="No progress bars or status lines."):
    return click.option("--quiet", "-q", is_flag=True, help=help)(f)


def _data_dir(value: Path | None, run: Path | None = None) -> Path:
    """--data-dir, else $MLECLI_DATA_DIR, else the folder the run `run` was trained
    with (if it is still there), else ./data."""
    import os

    from mlecli.data.cache import default_data_dir

    if value is not None:
        return value
    if run is not None and not os.environ.get("MLECLI_DATA_DIR"):
        from mlecli.run.rundir import trained_data_dir

        remembered = trained_data_dir(run)
        if remembered is not None:
            return remembered
    return default_data_dir()


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="mlecli")
def main() -> None:
    """Train neural networks on MNIST by maximum likelihood.

    Hidden sigmoid layers (none = logistic regression) trained by gradient ascent on
    the summed log-likelihood, with the gradient from hand-written backpropagation.
    """


def _each_checked(check, prefix):
    """A click callback that runs `check` on every value of a repeatable option and turns
    its MlecliError into a usage error (exit 2), without the `prefix(value)` it starts with."""

    def callback(ctx, param, values):
        for value in values:
            try:
                check(value)
            except MlecliError as exc:
                raise click.BadParameter(
                    printable(str(exc).removeprefix(prefix(value))), param_hint=f"'{param.opts[0]} {printable(value)}'"
                ) from None
        return values

    return callback


class Finite(click.FloatRange):
    """A finite number in a range (click's FloatRange alone lets nan through, since every
    comparison with nan is false, and inf where there is no upper bound)."""

    def convert(self, value, param, ctx):
        import math

        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{number} is not a finite number", param, ctx)
        return number


def _mirror_location(value):
    from mlecli.data.download import mirror_location

    return mirror_location(value)


def _override(value):
    from mlecli.run.config import parse_override

    return parse_override(value)


def _where(value):
    from mlecli.sweep.runs import parse_where

    return parse_where(value)


@main.command(short_help="Fetch a dataset from its mirrors, verify it and cache it.")
@click.option(
    "--dataset",
    type=click.Choice(["mnist", "fashion-mnist"]),
    default=None,
    help="Built-in dataset to fetch.  [default: mnist, or the --config's dataset]",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Take the dataset from this config's [data] table (built-in or custom IDX); - reads it from standard input.",
)
@click.option(
    "--mirror",
    "mirrors",
    multiple=True,
    callback=_each_checked(_mirror_location, lambda m: f"mirror {m!r}: "),  # http(s), file:// or a folder
    metavar="URL",
    help="Base URL, file:// URL or local folder to try before the built-in mirrors (repeatable).",
)
@data_dir_option
@click.option("--force", is_flag=True, help="Fetch every file again even if it is cached and verified.")
@click.option(
    "--timeout",
    type=Finite(min=0.1),
    default=30.0,
    help="Seconds to wait for a server to send anything before retrying.",
)
@click.option("--retries", type=click.IntRange(min=0), default=3, help="Further attempts per mirror after the first.")
@click.option(
    "--min-rate",
    type=Finite(min=0.001),
    default=50.0,
    metavar="KB/S",
    help="Slowest average rate (kB/s) a mirror may send at, counted once 2 x --timeout seconds have passed since "
    "it was connected to; a slower mirror is given up.",
)
@quiet_option
def download(dataset, config_path, mirrors, data_dir, force, timeout, retries, min_rate, quiet):
    """Fetch a dataset from its mirrors, verify it and cache it.

    Each file's decompressed content must match its known SHA-256 and size; nothing
    unverified enters the cache. A file already cached costs no network.
    """
    from mlecli.data.cache import dataset_dir, ensure_dataset
    from mlecli.data.datasets import builtin
    from mlecli.data.download import HttpPolicy

    if config_path is not None:
        if dataset is not None:
            raise click.UsageError("give --dataset or --config, not both")
        from mlecli.run import config

        ds = config.load(config_path, pipe_ok=True).data.resolve()
    else:
        ds = builtin(dataset or "mnist")
    root = _data_dir(data_dir)
    policy = HttpPolicy(read_timeout=timeout, retries=retries, min_rate=min_rate * 1000)
    reports = ensure_dataset(
        ds, root, mirrors=tuple(mirrors), force=force, policy=policy, progress=_progress(quiet), log=_log(quiet)
    )
    if quiet:
        return
    echo(printable(f"{ds.name}: {len(reports)} files in {dataset_dir(ds, root) / 'raw'}"))
    width = max(len(r.path.name) for r in reports)
    for r in reports:
        state = "verified" if r.verified else "UNVERIFIED"
        where = "already cached" if r.source == "cache" else f"from {r.source}"
        echo(printable(f"  {r.path.name:<{width}}  {r.size:>12,} bytes  {state:<10}  {where}"))
    echo(printable(f"  splits: {dataset_dir(ds, root) / 'train.npz'}, {dataset_dir(ds, root) / 'test.npz'}"))


@main.command(short_help="Train a network on a binary digit task by maximum likelihood.")
@click.argument("config_path", metavar="[CONFIG]", required=False)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    callback=_each_checked(_override, lambda item: f"--set {item!r}: "),  # KEY=VALUE, a TOML value
    metavar="KEY=VALUE",
    help="Override a config key, value parsed as TOML, e.g. --set model.hidden=[256,64] (repeatable).",
)
@click.option(
    "--run-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder for this run (empty or new).  [default: runs/<config name>-<timestamp>]",
)
@click.option(
    "--resume",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    metavar="RUN_DIR",
    help="Continue this run from its newest checkpoint (--set train.epochs=N may extend it).",
)
@data_dir_option
@functools.partial(quiet_option, help="Print only errors (and what a stop needs to resume): no progress bars, "
                  "epoch lines, notes or hints.")
def train(config_path, overrides, run_dir, resume, data_dir, quiet):
    """Train a network on a binary digit task by maximum likelihood.

    CONFIG is a TOML file, or the name of a built-in config (default, logreg,
    four-vs-nine, deep, accurate); without it the built-in default is used. It may be
    a pipe, such as <(...), or - for standard input. The run folder gets config.toml,
    manifest.json, metrics.jsonl and checkpoints/.
    """
    from mlecli.run import config
    from mlecli.run import train as training

    log = _log(quiet)
    resume_from = None
    if resume is not None:
        if config_path is not None or run_dir is not None:
            raise click.UsageError("--resume takes its config and folder from the run; give no CONFIG or --run-dir")
        resume_from = training.newest_checkpoint(resume, log)
        given = {item.partition("=")[0].strip() for item in overrides}
        edited = tuple(e for e in training.edited_keys(Path(resume), resume_from.config)
                       if e.partition("=")[0] not in given)
        if edited:
            log(printable(f"{Path(resume) / 'config.toml'} sets {', '.join(edited)}: used for this resume"))
        cfg = training.resumed_config(resume_from.config, (*edited, *overrides), resume_from.epoch)
        run_dir = resume
        log(f"resuming {resume} from {resume_from.path.name} (epoch {resume_from.epoch} done)")
    else:
        cfg = config.load(config_path, overrides, pipe_ok=True, note=log)
    say = _stdout_lines(quiet)
    report = training.Reporter(line=say, log=log, progress=not quiet and sys.stdout.isatty())
    # One StopRequest from here to the last line printed: no signal meets Python's default
    # handlers in between (after the run, the message saying how to resume is never cut).
    with training.StopRequest() as stop:
        outcome = training.run(cfg, run_dir, data_dir=_data_dir(data_dir, resume), report=report,
                               resume_from=resume_from, stop=stop)
        code = _say_how_it_ended(outcome, say)
    if code:
        sys.exit(code)


def _say_how_it_ended(outcome, say) -> int:
    """Print how a training run ended; return the exit status it calls for."""
    run_dir = outcome.run_dir
    if outcome.interrupted:
        last = run_dir / "checkpoints" / "last.npz"
        if outcome.at_once:
            epochs, batches = outcome.resume_point
            where = f"epoch {epochs} done" + (f", {batches} batches of the next" if batches else "")
            said = f"Stopped at once by a second {outcome.interrupted}: the run goes on from {last} ({where})."
        else:
            said = f"Stopped by {outcome.interrupted}: saved {last}."
        with contextlib.suppress(OSError):  # stderr full: the exit status 130 still says it
            echo(printable(f"{said} Resume with: mlecli train --resume {shlex.quote(str(run_dir))}"), err=True)
        return 130
    early = outcome.stopped_early
    if early is not None:
        say(f"stopped early after epoch {early['epoch']}: no better validation LL in {early['patience']} epochs "
            f"(train.patience); the run is finished")
    best = outcome.best
    if best is not None:
        label = "validation" if best["key"] == "val_ll_mean" else "training"
        say(printable(f"best: epoch {best['epoch']} ({label} LL {best['value']:.4f}/img) -> "
                      f"{run_dir / 'checkpoints' / 'best.npz'}"))
    say(printable(f"evaluate: mlecli evaluate {shlex.quote(str(run_dir))}"))
    say(printable(f"plot:     mlecli plot {shlex.quote(str(run_dir))}"))
    return 0


def _stdout_lines(quiet: bool):
    """Echo to stdout, unless quiet; once stdout is closed (`mlecli train | head -1`),
    say so once on stderr and go on without it: the run's results are its files."""
    state = {"open": not quiet}

    def say(text: str) -> None:
        if not state["open"]:
            return
        try:
            echo(text)
            sys.stdout.flush()
        except OSError:  # BrokenPipeError, or a full disk behind a redirect
            state["open"] = False
            _quiet_stdout()  # later writes (and Python's own flush at exit) go nowhere instead of failing
            with contextlib.suppress(OSError):
                echo("note: standard output was closed; training goes on, its figures go to metrics.jsonl", err=True)

    return say


def _grid(value):
    from mlecli.sweep.grid import parse_grid

    return parse_grid(value)


def _seeds(ctx, param, value):
    from mlecli.sweep.grid import parse_seeds

    try:
        return parse_seeds(value)
    except MlecliError as exc:
        raise click.BadParameter(str(exc).removeprefix(f"--seeds {quoted(value)}: "), param_hint="'--seeds'") from None


@main.command(short_help="Train a grid of settings over seeds, in parallel; compare them.")
@click.argument("config_path", metavar="[CONFIG]", required=False)
@click.option(
    "--grid",
    "grids",
    multiple=True,
    callback=_each_checked(_grid, lambda item: f"--grid {item!r}: "),
    metavar="KEY=V1,V2,...",
    help="A config key and its values, each TOML as for --set, e.g. --grid train.learning_rate=0.01,0.05 or "
    "--grid model.hidden=[64],[128,32]; repeatable: every combination is a grid point.",
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    callback=_each_checked(_override, lambda item: f"--set {item!r}: "),
    metavar="KEY=VALUE",
    help="Override a config key for every run, as for mlecli train (repeatable).",
)
@click.option(
    "--seeds",
    default="0-2",
    callback=_seeds,
    metavar="LIST",
    help="Seeds of each grid point, e.g. 0-4 or 0,3,7: seed S sets model.seed and train.seed to S.",
)
@click.option("--jobs", "-j", type=click.IntRange(min=1), default=None,
              help="Runs at once, each in its own process.  [default: the number of cores]")
@click.option(
    "--sweep-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder of the sweep.  [default: the newest runs/<config name>-sweep-* made by the same command, "
    "else a new runs/<config name>-sweep-<timestamp>]",
)
@data_dir_option
@click.option("--evaluate", is_flag=True, help="Also evaluate each run's best checkpoint on the test split.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
@click.option("--dry-run", is_flag=True,
              help="Print the mlecli train command of every run, one per line; start nothing.")
@functools.partial(quiet_option, help="No progress bar or status lines; the table alone, without the note under it "
                  "and the commands to go on with.")
def sweep(config_path, grids, overrides, seeds, jobs, sweep_dir, data_dir, evaluate, as_json, dry_run, quiet):
    """Train one run per grid point and seed, in parallel, and compare them.

    Every combination of the --grid values, with every seed, is an ordinary run in
    its own folder inside the sweep folder. Running the same command again continues
    the sweep: finished runs are skipped, interrupted ones resumed. At the end, a table
    per grid point: the mean ± standard deviation over seeds of the best validation LL
    and accuracy (and of test accuracy with --evaluate).
    """
    from mlecli.run.train import StopRequest
    from mlecli.sweep import grid, record, runner

    plan = grid.plan(config_path, overrides, grids, seeds)
    if dry_run:
        folder = sweep_dir or record.find_sweep(plan) or record.default_sweep_dir(plan.base.name, create=False)
        for line in grid.train_commands(plan, folder, data_dir, runner.blas_threads(plan, folder, jobs)):
            echo(printable(line))
        return
    log = _log(quiet)
    with StopRequest() as stop:  # a signal before the workers start: one line, and no folder left half-made
        outcome = runner.execute(plan, sweep_dir, jobs=jobs, data_dir=_data_dir(data_dir), evaluate=evaluate,
                                   progress=_progress(quiet), log=log, stop=stop)
        _say_how_the_sweep_ended(plan, outcome, evaluate, jobs, data_dir, as_json, quiet)


def _say_how_the_sweep_ended(plan, outcome, evaluate, jobs, data_dir, as_json, quiet) -> None:
    """The table (with --quiet, the table alone: no note under it, no commands to go on with),
    the JSON, or how a stopped sweep stands; the runs that did not finish on stderr."""
    import json

    from mlecli.sweep import grid, runner
    from mlecli.sweep.compare import format_summary

    if outcome.stopped:
        extra = tuple(w for flag, words in ((evaluate, ("--evaluate",)), (jobs, ("--jobs", str(jobs))),
                                            (data_dir, ("--data-dir", str(data_dir)))) if flag for w in words)
        n = runner.stop_counts(plan, outcome)  # each run once
        echo(
            f"Stopped by {outcome.stopped}: {n['finished']} of {len(plan.runs)} runs finished, "
            f"{n['saved']} saved mid-run"
            + (f", {n['at_once']} stopped at once (they go on from their last checkpoint)" if n["at_once"] else "")
            + (f", {n['failed']} failed" if n["failed"] else "")
            + f". Continue with: {grid.command(plan, outcome.sweep_dir, extra)}",
            err=True,
        )
        sys.exit(130)
    s = outcome.summary
    echo(json.dumps(s, indent=2) if as_json else format_summary(s, notes=not quiet))
    failed = [r for r in s["runs"] if r["status"] != "finished"]
    if failed:
        for r in failed:
            echo(printable(f"{r['status']} {Path(r['run_dir']).name}: "
                           f"{r['error'] or 'see mlecli runs ' + shlex.quote(s['sweep_dir'])}"), err=True)
        total = len(s["runs"])
        if total == 1:
            said = "the sweep's one run did not finish (listed above)"
        elif len(failed) == total:
            said = f"none of the {total} runs finished (listed above)"
        else:
            said = f"{len(failed)} of {total} runs did not finish (listed above); the others did"
        raise MlecliError(f"{said}. Run the same command again to retry them")
    if not as_json and not quiet:
        echo(printable(f"plot:     mlecli plot {shlex.quote(str(outcome.sweep_dir))}"))
        echo(printable(f"runs:     mlecli runs {shlex.quote(str(outcome.sweep_dir))}"))


def checkpoint_option(help_text: str):
    def decorate(f):
        return click.option(
            "--checkpoint",
            "which",
            default="best",
            metavar="best|last|epoch-N",
            callback=_checkpoint_name,
            help=help_text,
        )(f)

    return decorate


def _checkpoint_name(ctx, param, value):
    import re

    if not re.fullmatch(r"best|last|epoch-\d{1,12}", value, flags=re.ASCII):
        raise click.BadParameter(f"{quoted(value)} is not best, last or epoch-N")
    return value


def threshold_option(f):
    return click.option(
        "--threshold",
        type=Finite(0, 1, min_open=True, max_open=True),
        default=0.5,
        help="Predict positive where ŷ ≥ this.",
    )(f)


@main.command(short_help="Measure a checkpoint on held-out data.")
@click.argument("target", type=click.Path(path_type=Path))
@checkpoint_option("Which checkpoint of a run folder to measure (ignored for a checkpoint file).")
@click.option(
    "--split",
    type=click.Choice(["test", "validation", "train"]),
    default="test",
    help="test: the dataset's official test images of the task's classes; validation: the images the run held "
    "out; train: the images it trained on.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
@data_dir_option
@threshold_option
def evaluate(target, which, split, as_json, data_dir, threshold):
    """Measure a checkpoint on held-out data.

    TARGET is a run folder or a checkpoint file. The task, dataset and network come
    from the checkpoint's own config. The JSON report is also written to
    <run>/eval-<split>-<checkpoint>.json (at another --threshold than 0.5,
    eval-<split>-<checkpoint>-t<threshold>.json, which never replaces it).
    """
    import json

    from mlecli.run import evaluate as ev

    report = ev.evaluate(
        target, which=which, split=split, data_dir=_data_dir(data_dir, target), threshold=threshold,
        log=_log(as_json), progress=_progress(as_json),
    )
    try:
        saved = ev.save_report(report)
    except MlecliError as exc:  # a read-only run folder, say: the figures are still worth showing
        saved = None
        _log(False)(f"warning: the report was not saved: {exc}")
    if as_json:
        echo(json.dumps(report, indent=2))
    else:
        echo(ev.format_report(report))
        if saved is not None:
            echo(printable(f"  report            {_as_typed(saved, target)}"))


@main.command(short_help="Predict on your own images, prepared as MNIST's were.")
@click.argument("target", type=click.Path(path_type=Path))
@click.argument("inputs", nargs=-1, required=True, metavar="INPUT...")
@checkpoint_option("Which checkpoint of a run folder to use (ignored for a checkpoint file).")
@threshold_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per image and line instead of the table.")
@click.option("--raw", is_flag=True, help="Skip the preparation: inputs are already 28×28, light ink on black.")
@click.option(
    "--show",
    type=click.Path(dir_okay=False),
    default=None,
    metavar="FILE",
    help="Also write a PNG (a name ending in .png) of the 28×28 images the network saw, each with its name, the "
    "decision in words and ŷ.",
)
def predict(target, inputs, which, threshold, as_json, raw, show):
    """Predict on your own images: ŷ = P(y = 1) and the decision, in words.

    TARGET is a run folder or a checkpoint file. INPUT: image files (PNG, JPEG, BMP, GIF,
    TIFF, WebP), folders of them (sorted by name), .npy arrays (H×W or N×H×W, uint8 0-255
    or float 0-1; colour H×W×3|4 or N×H×W×3|4), IDX image files (.gz or not), or - for standard input. Each image is
    prepared as the network's training images were (MNIST's digits: gray, ink light on
    dark, cropped, longer side 20 pixels, centred by mass in 28×28; Fashion-MNIST's:
    longer side 28, centred) unless --raw. An input that cannot be used gets one line on
    stderr, the others are still predicted, and the exit status is 1.
    """
    from mlecli.safe.outputs import check_output
    from mlecli.use import inputs as sources_of
    from mlecli.use import predict as pr
    from mlecli.use import sheet

    sources = sources_of.sources(list(inputs))
    if show is not None:  # refused before anything is read or written
        named = [item for item in inputs if item not in ("", sources_of.STDIN)]
        read = [(Path(p), "one of the inputs") for p in named]
        read += [(s.path, "one of the inputs") for s in sources if isinstance(s, sources_of.Source) and s.path]
        folders = [(item, display(item)) for item in named]
        show = check_output(show, "--show", ".png", "PNG picture", keep=read, folders=folders, what="the sheet")
    model = pr.load_model(target, which)
    width = max((len(printable(s.name)) for s in sources if isinstance(s, sources_of.Source)), default=0)
    failed = 0
    shown: list = []
    for result in model.predict_sources(sources, raw):
        if isinstance(result, MlecliError):
            failed += 1
            click.echo(f"Error: {printable(str(result))}", err=True)
            continue
        if as_json:
            lines = pr.json_lines(result, model.classes_, threshold)
        else:
            lines = pr.text_lines(result, model.classes_, threshold, width, printable(result.source))
        click.echo("\n".join(lines))  # one write for the whole batch
        if show is not None and sum(len(b.z) for b in shown) < sheet.LIMIT:
            shown.append(result)
    if show is not None:
        count = sheet.show_grid(shown, model.classes_, threshold, show) if shown else 0
        if count:
            click.echo(printable(f"wrote {show} ({count} image{'s' if count != 1 else ''})"), err=True)
        else:
            click.echo(printable(f"no image to show: {show} not written"), err=True)
    if failed:
        sys.exit(1)


@main.command(short_help="Export a network to ONNX, or to a web page to draw on.")
@click.argument("target", type=click.Path(path_type=Path))
@checkpoint_option("Which checkpoint of a run folder to export (ignored for a checkpoint file).")
@click.option("--format", "fmt", type=click.Choice(["onnx", "html"]), required=True,
              help="onnx: a model file for any ONNX runtime; html: a page to draw digits on.")
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    default=None,
    metavar="FILE",
    help="Where to write (a name ending in .onnx or .html).  [default: <run>/<checkpoint>.onnx or "
    ".html; beside a checkpoint file outside a run]",
)
def export(target, which, fmt, out):
    """Export a network to ONNX, or to a web page to draw on.

    onnx needs the onnx package: pip install 'mlecli[onnx]'. The page works offline,
    from a double-click (file://), and makes no network request of any kind.
    """
    from mlecli.use import export as ex

    path = ex.export(target, which, fmt, out)
    size = path.stat().st_size
    echo(f"wrote {_as_typed(path, target if out is None else out)} ({size / 1024:,.0f} KB)")
    if fmt == "html":
        echo(f"open it in a browser: {path.resolve().as_uri()}")
        if size > ex.PAGE_LIMIT:
            echo(f"warning: the page is {size / 1e6:.1f} MB, more than the {ex.PAGE_LIMIT / 1e6:.0f} MB a page should "
                 "be: a browser loads it slowly (its weights are most of it; a smaller network makes a lighter page)",
                 err=True)


@main.command(short_help="Draw a run, or compare runs.")
@click.argument("run_dir", nargs=-1, required=True, type=click.Path(file_okay=False, path_type=Path),
                metavar="RUN_DIR | SWEEP_DIR | RUN_DIR...")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder for the PNG files.  [default: the run or sweep folder; for several folders, the one holding "
    "them all]",
)
@data_dir_option
def plot(run_dir, out, data_dir):
    """Draw a run, or compare runs.

    One run folder: curves.png, hidden-units.png (weights.png for logistic regression)
    and (after evaluate) mistakes.png.
    A sweep folder, or several run folders: compare.png, validation LL and accuracy per
    epoch, one colour per grid point (runs that differ only in their seeds), the mean
    over seeds as a line and their spread as a band.

    Needs matplotlib: pip install 'mlecli[plot]'.
    """
    from mlecli.use import plot as plotting

    targets = run_dir  # one folder, or several
    if len(targets) == 1 and not (targets[0] / "sweep.json").is_file():
        for path in plotting.plot_run(targets[0], out, _data_dir(data_dir, targets[0]), log=_log(False)):
            echo(printable(str(path)))
        return
    from mlecli.sweep.compare import plot_compare

    echo(printable(str(plot_compare(list(targets), out))))


@main.command(short_help="List the runs in a folder side by side (default: runs).")
@click.argument("runs_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("runs"), required=False)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of the table.")
@click.option(
    "--sort",
    type=click.Choice(["name", "started", "epochs", "val_ll", "val_acc", "test_acc", "seconds"]),
    default="name",
    help="Order of the rows (figures best first).",
)
@click.option(
    "--where",
    "filters",
    multiple=True,
    callback=_each_checked(_where, lambda item: f"--where {item!r}: "),
    metavar="KEY=VALUE",
    help="Only runs whose config key (train.learning_rate=0.05) or column (status=finished, sweep=NAME, "
    "dataset=mnist) has this value; repeatable, all must hold.",
)
def runs(runs_dir, as_json, sort, filters):
    """List the runs in a folder side by side (default: runs).

    Each run's task, dataset, hidden layers, learning rate, batch size (and optimizer,
    once runs differ in it), epochs done, best validation LL and accuracy, test accuracy
    where evaluated, seconds and status (finished, interrupted, failed, running, broken).
    The runs of a sweep folder inside are listed too, with the sweep's name.
    """
    import json

    from mlecli.sweep import runs as listing

    rows = listing.list_runs(runs_dir, sort, tuple(listing.parse_where(f) for f in filters))
    if as_json:
        echo(json.dumps([listing.public(r) for r in rows], indent=2))
    elif not rows:
        echo(printable(f"no runs in {runs_dir}" + (f" with {' and '.join(filters)}" if filters else "")))
    else:
        echo(listing.format_table(rows))
