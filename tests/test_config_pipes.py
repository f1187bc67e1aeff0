"""A config the user names on the command line may be a pipe: the shell's process
substitution `<(...)`, a FIFO, or `-` for standard input, read to its end and at most
1 MiB. A pipe that mlecli would read back unasked (a run's config.toml, a sweep's config)
is refused at once, never waited on."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import pytest

from mlecli.run.config import load
from mlecli.safe.errors import ConfigError

TIMEOUT = 120  # a command blocked on a pipe would end the test here


def bash(script: str, **env: str | Path) -> subprocess.CompletedProcess:
    """`script` run by bash, with $MLECLI the command and `env` as variables."""
    variables = {**os.environ, "MLECLI": f"{sys.executable} -m mlecli", **{k: str(v) for k, v in env.items()}}
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=TIMEOUT, env=variables)


def mlecli(*args, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlecli", *map(str, args)], input=stdin, capture_output=True,
                          timeout=TIMEOUT)


def recorded(run: Path) -> dict:
    return tomllib.loads((run / "config.toml").read_text())


def test_train_reads_its_config_from_a_process_substitution(tiny_config, tmp_path):
    cfg, run = tiny_config(train={"epochs": 1}), tmp_path / "run"
    res = bash('$MLECLI train <(cat "$CFG") --run-dir "$RUN" --data-dir "$DATA" -q', CFG=cfg, RUN=run,
               DATA=tmp_path / "d")
    assert (res.returncode, res.stderr) == (0, "")
    assert recorded(run) == {**recorded_from_file(cfg, tmp_path), "name": "pipe"}


def recorded_from_file(cfg: Path, tmp_path: Path) -> dict:
    """The config.toml a run of the same config from its file records."""
    run = tmp_path / "from-file"
    assert mlecli("train", cfg, "--run-dir", run, "--data-dir", tmp_path / "d", "-q").returncode == 0
    return recorded(run)


def test_train_reads_its_config_from_standard_input_for_a_dash(tiny_config, tmp_path):
    cfg, run = tiny_config(train={"epochs": 1}), tmp_path / "run"
    res = mlecli("train", "-", "--run-dir", run, "--data-dir", tmp_path / "d", "-q", stdin=cfg.read_bytes())
    assert (res.returncode, res.stderr) == (0, b"")
    assert recorded(run) == {**recorded_from_file(cfg, tmp_path), "name": "stdin"}


def test_a_pipe_is_read_to_its_end_however_its_writer_cuts_it(tiny_config, tmp_path):
    text = tiny_config(train={"epochs": 1}).read_text()
    head, tail = text[: len(text) // 2], text[len(text) // 2:]  # cut mid-line
    run = tmp_path / "run"
    res = bash('$MLECLI train <(printf %s "$HEAD"; sleep 0.5; printf %s "$TAIL") --run-dir "$RUN" --data-dir "$DATA" '
               '--set name=halves -q', HEAD=head, TAIL=tail, RUN=run, DATA=tmp_path / "d")
    assert (res.returncode, res.stderr) == (0, "")
    assert recorded(run)["train"]["epochs"] == 1 and recorded(run)["name"] == "halves"


def test_download_takes_its_dataset_from_a_config_in_a_process_substitution(tiny_config, tmp_path):
    res = bash('$MLECLI download --config <(cat "$CFG") --data-dir "$DATA"', CFG=tiny_config(), DATA=tmp_path / "d")
    assert res.returncode == 0, res.stderr
    assert re.fullmatch(rf"tiny: 4 files in {re.escape(str(tmp_path / 'd'))}/tiny-\w+/raw",
                        res.stdout.splitlines()[0]), res.stdout


def test_a_fifo_named_on_the_command_line_is_read_once_its_writer_comes(tiny_config, tmp_path):
    fifo, run = tmp_path / "mine.toml", tmp_path / "run"
    os.mkfifo(fifo)
    text = tiny_config(train={"epochs": 1}).read_bytes()

    def write() -> None:
        with open(fifo, "wb") as f:  # waits until mlecli opens it to read
            f.write(text)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    res = mlecli("train", fifo, "--run-dir", run, "--data-dir", tmp_path / "d", "-q")
    writer.join(TIMEOUT)
    assert (res.returncode, res.stderr) == (0, b"")
    assert recorded(run)["name"] == "mine"


def test_a_wrong_key_in_a_pipe_names_the_pipe():
    res = bash("$MLECLI train <(printf '[train]\\nepoch = 1\\n')")
    assert res.returncode == 1
    assert re.fullmatch(r"Error: config /dev/fd/\d+: unknown key train\.epoch \(did you mean train\.epochs\?\)\n",
                        res.stderr), res.stderr


def test_a_pipe_of_more_than_1_MiB_is_one_line():
    res = bash("$MLECLI train <(head -c 2000000 /dev/zero)")
    assert res.returncode == 1
    assert re.fullmatch(r"Error: config /dev/fd/\d+ is larger than 1024 KiB: it is not a config\n", res.stderr)


@pytest.mark.parametrize("sent, says", [
    (b"#" * (2 << 20), "Error: config from standard input is larger than 1024 KiB: it is not a config"),
    (b"\xff\xfe[train]\n", "Error: config from standard input is not UTF-8 text"),
    (b"[train\n", "Error: config from standard input: not valid TOML: "),
])
def test_standard_input_that_is_not_a_config_is_one_line(sent, says):
    res = mlecli("train", "-", stdin=sent)
    assert res.returncode == 1
    (line,) = res.stderr.decode().splitlines()
    assert line.startswith(says), line


def test_a_sweep_refuses_a_pipe_it_could_not_read_again():
    res = bash("$MLECLI sweep <(printf '[train]\\nepochs = 1\\n') --grid train.epochs=1,2 --dry-run")
    assert res.returncode == 1
    assert re.fullmatch(r"Error: config /dev/fd/\d+ is a pipe, which can be read only once: give a TOML file\n",
                        res.stderr), res.stderr


def test_a_pipe_read_back_unasked_is_refused_without_waiting_for_a_writer(tmp_path):
    fifo = tmp_path / "config.toml"
    os.mkfifo(fifo)  # no writer ever comes: opening it to read would wait forever
    with pytest.raises(ConfigError) as err:
        load(fifo)
    assert str(err.value) == f"config {fifo} is a pipe, which can be read only once: give a TOML file"
    with pytest.raises(ConfigError, match=r"^config - does not exist "):
        load("-")  # standard input only where the user named it


def test_resuming_a_run_whose_config_toml_is_a_pipe_is_refused_at_once(tiny_config, tmp_path):
    run, data = tmp_path / "run", tmp_path / "d"
    assert mlecli("train", tiny_config(train={"epochs": 1}), "--run-dir", run, "--data-dir", data, "-q").returncode == 0
    (run / "config.toml").unlink()
    os.mkfifo(run / "config.toml")
    res = mlecli("train", "--resume", run, "--set", "train.epochs=2", "--data-dir", data, "-q")
    assert res.returncode == 1
    assert res.stderr.decode() == (f"Error: {run / 'config.toml'} is not a regular file (a folder, device or pipe): "
                                   "not replacing it; choose another name\n")
