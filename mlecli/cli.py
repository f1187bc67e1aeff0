"""The command line: parse options, call the library, print. Nothing else lives here.

numpy, requests and tqdm are imported inside the commands that need them so that
`mlecli --help` starts fast.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from mlecli import __version__
from mlecli.errors import MlecliError


class Group(click.Group):
    """Turns every MlecliError into one line on stderr and exit status 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MlecliError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(1)


def _log(quiet: bool):
    def log(msg: str) -> None:
        if not quiet:
            click.echo(msg, err=True)

    return log


def _progress(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty()


def data_dir_option(f):
    return click.option(
        "--data-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="Dataset cache folder.  [default: $MLECLI_DATA_DIR, else ./data]",
    )(f)


def quiet_option(f):
    return click.option("--quiet", "-q", is_flag=True, help="No progress bars or status lines.")(f)


def _data_dir(value: Path | None) -> Path:
    from mlecli.cache import default_data_dir

    return value if value is not None else default_data_dir()


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="mlecli")
def main() -> None:
    """Train neural networks on MNIST by maximum likelihood.

    Hidden sigmoid layers (none = logistic regression) trained by gradient ascent on
    the summed log-likelihood, with the gradient from hand-written backpropagation.
    """


@main.command()
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
    help="Take the dataset from this config's [data] table (built-in or custom IDX).",
)
@click.option(
    "--mirror",
    "mirrors",
    multiple=True,
    metavar="URL",
    help="Base URL, file:// URL or local folder to try before the built-in mirrors (repeatable).",
)
@data_dir_option
@click.option("--force", is_flag=True, help="Fetch every file again even if it is cached and verified.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1),
    default=30.0,
    help="Seconds to wait for a server to send anything before retrying.",
)
@click.option("--retries", type=click.IntRange(min=0), default=3, help="Further attempts per mirror after the first.")
@quiet_option
def download(dataset, config_path, mirrors, data_dir, force, timeout, retries, quiet):
    """Fetch a dataset from its mirrors, verify it and cache it.

    Each file's decompressed content must match its known SHA-256 and size; nothing
    unverified enters the cache. A file already cached costs no network.
    """
    from mlecli.cache import dataset_dir, ensure_dataset
    from mlecli.datasets import builtin
    from mlecli.download import HttpPolicy

    if config_path is not None:
        if dataset is not None:
            raise click.UsageError("give --dataset or --config, not both")
        from mlecli import config

        ds = config.load(config_path).data.resolve()
    else:
        ds = builtin(dataset or "mnist")
    for m in mirrors:
        from mlecli.download import mirror_location

        mirror_location(m)  # refuse an unsupported scheme before anything is fetched
    root = _data_dir(data_dir)
    policy = HttpPolicy(read_timeout=timeout, retries=retries)
    reports = ensure_dataset(
        ds, root, mirrors=tuple(mirrors), force=force, policy=policy, progress=_progress(quiet), log=_log(quiet)
    )
    if quiet:
        return
    click.echo(f"{ds.name}: {len(reports)} files in {dataset_dir(ds, root) / 'raw'}")
    width = max(len(r.path.name) for r in reports)
    for r in reports:
        state = "verified" if r.verified else "UNVERIFIED"
        where = "already cached" if r.source == "cache" else f"from {r.source}"
        click.echo(f"  {r.path.name:<{width}}  {r.size:>12,} bytes  {state:<10}  {where}")
    click.echo(f"  splits: {dataset_dir(ds, root) / 'train.npz'}, {dataset_dir(ds, root) / 'test.npz'}")
