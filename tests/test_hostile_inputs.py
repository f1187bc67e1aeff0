"""Inputs a hostile user hands to `train` and `evaluate`: names that are paths, files that
are not files, TOML at the limits, symbolic links between runs."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

from mlecli.cli import main


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def error_line(res) -> str:
    assert res.exit_code == 1, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    (line,) = res.stderr.splitlines()
    return line


@pytest.mark.parametrize("name", ["../../x", "/x", "a/b", "a\\b", ".hidden", "..", "", "x" * 101, "tab\there",
                                  "nul\x00", "bell\x07"])
def test_a_config_name_that_is_not_a_plain_name_is_refused(tiny_config, tmp_path, name):
    res = cli("train", tiny_config(), "--set", f"name={json.dumps(name)}", "--data-dir", tmp_path / "d")
    line = error_line(res)
    assert "name = " in line and "must be a plain name for the run folder" in line
    assert all(c.isprintable() for c in line)
    assert not (tmp_path / "x").exists() and not os.path.exists("/x")


def test_a_config_file_whose_name_is_not_a_plain_name_needs_a_name_inside(tiny, tiny_folder, tmp_path):
    cfg = tiny.write_config(tmp_path / ".sneaky.toml", tiny_folder)
    line = error_line(cli("train", cfg, "--data-dir", tmp_path / "d"))
    assert line.startswith(f"Error: config {cfg}: name = '.sneaky': must be a plain name for the run folder")
    assert '(set name = "..." in the config)' in line


@pytest.mark.parametrize("path,says", [
    ("/dev/zero", "is not a regular file: give a TOML file"),
    ("/dev/null", "is not a regular file: give a TOML file"),
    ("/proc/self/fd", "is a folder: give a TOML file, or the name of a built-in config"),
])
def test_a_config_that_is_not_a_file(path, says):
    assert error_line(cli("train", path)) == f"Error: config {path} {says}"


def test_a_config_too_large_to_be_one(tmp_path):
    big = tmp_path / "big.toml"
    big.write_bytes(b"# " + b"x" * (2 << 20) + b"\n")
    assert error_line(cli("train", big)) == f"Error: config {big} is larger than 1024 KiB: it is not a config"


@pytest.mark.parametrize("body,says", [
    ("[train]\nepochs = " + "9" * 5000 + "\n", "not usable TOML: a number has more than 4300 digits"),
    ("x = " + "[" * 50000 + "]" * 50000 + "\n", "not usable TOML: arrays or tables nested too deeply"),
    ("name = \"a\x00b\"\n", "not valid TOML"),
    (b"\xff\xfe[train]\n", "is not UTF-8 text"),
])
def test_toml_at_the_limits_is_one_line(tmp_path, body, says):
    cfg = tmp_path / "c.toml"
    cfg.write_bytes(body if isinstance(body, bytes) else body.encode())
    assert says in error_line(cli("train", cfg))


@pytest.mark.parametrize("value", ["9" * 5000, "[" * 5000 + "]" * 5000])
def test_set_values_at_the_limits_are_usage_errors(value):
    res = cli("train", "--set", f"train.epochs={value}")
    assert res.exit_code == 2 and "Traceback" not in res.output


def test_a_run_folder_given_as_config_suggests_resume(tiny_config, tmp_path):
    run = tmp_path / "run"
    assert cli("train", tiny_config(train={"epochs": 1}), "--run-dir", run, "--data-dir", tmp_path / "d", "-q").exit_code == 0
    assert error_line(cli("train", run)) == (
        f"Error: {run} is a run folder, not a config: to continue it, mlecli train --resume {run}")


def test_a_config_name_without_its_suffix_suggests_the_file(tiny_config, tmp_path, monkeypatch):
    tiny_config("mine")
    monkeypatch.chdir(tmp_path)
    assert error_line(cli("train", "mine")) == "Error: config mine does not exist; did you mean mine.toml?"


def test_a_run_whose_checkpoints_link_into_another_run_never_writes_there(tiny_config, tmp_path):
    data = tmp_path / "d"
    victim, attacker = tmp_path / "victim", tmp_path / "attacker"
    for run in (victim, attacker):
        assert cli("train", tiny_config(train={"epochs": 1}), "--run-dir", run, "--data-dir", data, "-q").exit_code == 0
    before = {p.name: p.read_bytes() for p in victim.rglob("*") if p.is_file()}
    (attacker / "checkpoints").rename(attacker / "own")
    (attacker / "checkpoints").symlink_to(victim / "checkpoints")
    assert cli("evaluate", attacker, "--data-dir", data, "--json").exit_code == 0
    assert (attacker / "eval-test-best.json").is_file()  # the report goes to the run named
    line = error_line(cli("train", "--resume", attacker, "--set", "train.epochs=2", "--data-dir", data))
    assert line == (f"Error: {attacker / 'checkpoints'} is a symbolic link: a resumed run would write into the "
                    "folder it points to; copy the run (cp -rL) and resume the copy")
    assert {p.name: p.read_bytes() for p in victim.rglob("*") if p.is_file()} == before


def test_error_lines_show_control_characters_as_escapes(tmp_path):
    weird = tmp_path / "a\nb\x1b[31m"
    res = cli("evaluate", weird)
    line = error_line(res)
    assert "\\n" in line and "\\x1b" in line
